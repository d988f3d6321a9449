"""Large buffers between local processes go through shared memory (`pydist.sharedmem`):
arrays arrive intact and writable both ways, regions are released and reused, a received
array outlives its sender, and whatever cannot share falls back to the socket or a copy."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest

import pydist
from pydist import protocol, sharedmem
from pydist.exceptions import ProtocolError
from pydist.group import PGRP

from conftest import wait_until
from stresshelpers import (in_arena, make_array, master_arena_in_use, master_arena_warm,
                           scribble, sum_and_where)

MB = 1 << 20

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd (Linux)")


def _conn(w):
    return PGRP.workers[w].conn


@pytest.mark.timeout(120)
def test_arrays_both_ways_arrive_intact_and_writable(fresh_workers):
    (w,) = fresh_workers(1)
    a = make_array(8 * MB, 1)
    for _ in range(3):  # the first one makes the offer and goes through the socket
        assert pydist.remotecall_fetch(scribble, w, a) == pytest.approx(a.sum())
        # The worker frees a call's arguments before it replies: the region is free again.
        assert _conn(w).arena is None or _conn(w).arena.in_use() == 0
    assert _conn(w).share_state == 2
    assert a.min() >= 0.0, "the worker's writes reached the sender's array"
    for seed in range(4):
        b = pydist.remotecall_fetch(make_array, w, 8 * MB, seed)
        assert np.array_equal(b, make_array(8 * MB, seed)), f"array {seed} corrupted"
        assert b.flags.writeable
        b[:] = 7.0  # private: the region stays the worker's, for the next array
        del b
    assert _conn(w).peer_arena is not None, "results did not come through shared memory"


@pytest.mark.timeout(120)
def test_regions_are_released_when_the_receiver_drops_them(fresh_workers):
    (w,) = fresh_workers(1)
    pydist.remotecall_fetch(make_array, w, 2 * MB, 0)  # the offer
    held = [pydist.remotecall_fetch(make_array, w, 2 * MB, s) for s in range(3)]
    assert pydist.remotecall_fetch(master_arena_in_use, w) == 3 * 2 * MB
    del held
    gc.collect()
    wait_until(lambda: pydist.remotecall_fetch(master_arena_in_use, w) == 0,
               what="the worker's regions to be released")
    for s in range(20):  # released regions are reused: the arena does not grow
        assert pydist.remotecall_fetch(make_array, w, 2 * MB, s)[-1] == make_array(2 * MB, s)[-1]
    assert pydist.remotecall_fetch(master_arena_in_use, w) <= 2 * MB


@pytest.mark.timeout(120)
def test_a_received_array_outlives_its_sender(fresh_workers):
    (w,) = fresh_workers(1)
    got = [pydist.remotecall_fetch(make_array, w, 4 * MB, s) for s in range(3)]
    assert _conn(w).peer_arena is not None
    pydist.rmprocs([w], waitfor=30)
    for s, b in enumerate(got):
        assert np.array_equal(b, make_array(4 * MB, s))
        b += 1.0


@pytest.mark.timeout(120)
def test_a_worker_that_refuses_gets_everything_through_the_socket(fresh_workers):
    (w,) = fresh_workers(1, env={"PYDIST_SHARED_MEMORY": "0"})
    a = make_array(4 * MB, 3)
    for _ in range(3):
        assert pydist.remotecall_fetch(scribble, w, a) == pytest.approx(a.sum())
        assert np.array_equal(pydist.remotecall_fetch(make_array, w, 4 * MB, 3), a)
    conn = _conn(w)
    assert conn.share_state == -1 and conn.arena is None and conn.peer_arena is None


def _arena_pair():
    arena = sharedmem.Arena()
    return arena, sharedmem.PeerArena(os.getpid(), arena.fd, arena.capacity, arena.token)


def test_regions_are_copied_out_beyond_the_mapping_limit(monkeypatch):
    monkeypatch.setattr(sharedmem, "_TRACKFD", {})  # as on Python < 3.13: one fd per mapping
    monkeypatch.setattr(sharedmem, "MAX_MAPPED_WITH_FD", 1)
    arena, peer = _arena_pair()
    try:
        data = [os.urandom(MB + 100) for _ in range(3)]
        bufs = [peer.buffer(*arena.put(memoryview(d)), len(d)) for d in data]
        assert [bytes(b) for b in bufs] == data
        assert arena.in_use() == sharedmem._round(MB + 100), "only the mapped one stays in use"
        del bufs
        gc.collect()
        assert arena.in_use() == 0
    finally:
        peer.close()
        arena.close()


def test_free_memory_beyond_keep_warm_is_given_back(monkeypatch):
    warm_before = sharedmem._warm_free  # (what earlier tests' arenas keep warm: not ours)
    monkeypatch.setattr(sharedmem, "KEEP_WARM", warm_before + 3 * MB)
    arena, peer = _arena_pair()
    try:
        bufs = [peer.buffer(*arena.put(memoryview(bytes(2 * MB))), 2 * MB) for _ in range(3)]
        del bufs
        gc.collect()
        assert arena.in_use() == 0
        assert sharedmem._warm_free - warm_before == 2 * MB  # one region kept, two given back
        assert len(arena._free) <= 3  # adjacent free blocks of one kind merged
        again = peer.buffer(*arena.put(memoryview(b"x" * (2 * MB))), 2 * MB)
        assert bytes(again[:3]) == b"xxx"
        assert sharedmem._warm_free - warm_before == 0, "a warm region is reused first"
        del again
        gc.collect()
        arena.trim(time.monotonic())  # recently used: stays warm
        assert sharedmem._warm_free - warm_before == 2 * MB
        arena.trim(time.monotonic() + sharedmem.IDLE_SECONDS)  # idle: all given back
        assert sharedmem._warm_free == warm_before
        assert arena._free == [[0, arena.capacity, False]], arena._free
    finally:
        peer.close()
        arena.close()
    assert sharedmem._warm_free == warm_before


def _warm_blocks(arena):
    return [(off, n) for off, n, warm in arena._free if warm]


def _warm_up_ended(arena):
    return lambda: not arena._warming


@pytest.fixture
def warm_budget(monkeypatch):
    """Room under KEEP_WARM for this test's warm-ups, whatever other tests' arenas keep."""
    monkeypatch.setattr(sharedmem, "KEEP_WARM", sharedmem._warm_free + (1 << 30))


@pytest.mark.timeout(60)
def test_a_large_buffer_goes_through_the_socket_until_a_region_is_warm(warm_budget):
    """Fresh arena memory costs more to copy into than the socket: a large buffer with no
    warm region is refused (it goes through the socket) while a region of its size is made
    warm in the background; the next one goes into that region, intact; small buffers
    still use fresh memory at once."""
    n = sharedmem.WARM_AHEAD_MIN + 100
    warm_before = sharedmem._warm_free
    arena, peer = _arena_pair()
    try:
        first = np.random.default_rng(1).bytes(n)
        assert arena.put(memoryview(first)) is None, "fresh memory was copied into"
        wait_until(_warm_up_ended(arena), what="the warm-up")
        assert _warm_blocks(arena) == [(0, sharedmem._round(n))]
        assert sharedmem._warm_free - warm_before == sharedmem._round(n)
        for seed in range(3):  # the warm region, each time (released in between)
            data = np.random.default_rng(seed).bytes(n)
            slot, off = arena.put(memoryview(data))
            assert off == 0
            buf = peer.buffer(slot, off, n)
            assert bytes(buf) == data, f"transfer {seed} corrupted"
            del buf
            gc.collect()
            assert arena.in_use() == 0
        small = os.urandom(2 * MB)  # below WARM_AHEAD_MIN: a fresh region at once
        slot, off = arena.put(memoryview(small))
        assert bytes(peer.buffer(slot, off, len(small))) == small
    finally:
        peer.close()
        arena.close()
    gc.collect()
    assert sharedmem._warm_free == warm_before


@pytest.mark.timeout(60)
def test_a_warm_up_that_finds_no_memory_gives_the_region_back_and_is_not_retried(
        monkeypatch, warm_budget):
    """posix_fallocate fails (no memory left for the arena: ENOSPC): the region's memory is
    freed and nothing counts as warm; large buffers keep going through the socket, with no
    warm-up tried again."""
    calls = []

    def full(fd, off, n):
        calls.append(off)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharedmem.os, "posix_fallocate", full)
    warm_before = sharedmem._warm_free
    arena = sharedmem.Arena()
    try:
        for _ in range(3):
            assert arena.put(memoryview(bytes(sharedmem.WARM_AHEAD_MIN))) is None
            wait_until(_warm_up_ended(arena), what="the warm-up")
        assert len(calls) == 1, "the warm-up was tried again"
        assert arena._free == [[0, arena.capacity, False]], arena._free
        assert sharedmem._warm_free == warm_before
        assert arena.put(memoryview(bytes(2 * MB))) is not None, "small buffers still go in"
    finally:
        arena.close()


@pytest.mark.timeout(60)
def test_an_arena_closed_during_a_warm_up_keeps_its_descriptor_until_the_warm_up_ends(
        monkeypatch, warm_budget):
    """The connection closes while the arena's thread allocates a region (the GIL is free
    then): the descriptor must stay the arena's until that thread is done with it, never a
    number that another open could take meanwhile; the thread closes it and stops."""
    arena = sharedmem.Arena()
    fd, inode = arena.fd, os.fstat(arena.fd).st_ino
    real = os.posix_fallocate
    seen = []

    def allocate(f, off, n):
        if not seen:
            arena.close()
        seen.append(os.fstat(f).st_ino)
        return real(f, off, n)

    monkeypatch.setattr(sharedmem.os, "posix_fallocate", allocate)
    warm_before = sharedmem._warm_free
    assert arena.put(memoryview(bytes(sharedmem.WARM_AHEAD_MIN))) is None
    wait_until(_warm_up_ended(arena), what="the warm-up to stop")
    assert seen == [inode], "the warm-up went on after the close, or used another descriptor"
    gone = not os.path.exists(f"/proc/self/fd/{fd}") or os.fstat(fd).st_ino != inode
    assert gone, "the arena's descriptor was never closed"
    assert sharedmem._warm_free == warm_before


@pytest.mark.timeout(120)
def test_large_arrays_move_to_shared_memory_once_a_region_is_warm(fresh_workers, warm_budget):
    """End to end, both ways: a 24 MB array goes through the socket first (with the offer),
    and through a warm region of the sender's arena once one is ready; every one arrives
    intact, wherever it came through."""
    (w,) = fresh_workers(1)
    n = 24 * MB
    to, back = [], []
    for seed in range(6):
        a = make_array(n, seed)
        total, shared = pydist.remotecall_fetch(sum_and_where, w, a)
        assert total == pytest.approx(a.sum())
        to.append(shared)
        b = pydist.remotecall_fetch(make_array, w, n, seed)
        assert np.array_equal(b, make_array(n, seed)), f"array {seed} corrupted"
        back.append(in_arena(b))
        del b
        gc.collect()
        if seed == 1:  # each side has asked for a warm region by now: let them be ready
            wait_until(lambda: not _conn(w).arena._warming, what="the master's warm-up")
            wait_until(lambda: pydist.remotecall_fetch(master_arena_warm, w),
                       what="the worker's warm-up")
    assert to[0] is False and back[0] is False, "the first one makes the offer"
    assert all(to[2:]) and all(back[2:]), (to, back)


def test_shared_buffers_are_checked_before_use(tmp_path):
    head = protocol.encode_frame(protocol.RESULT, b"body", [bytes(16)])
    frame = bytearray(head[0])
    ref = protocol.mark_shared(frame, 0, 4 * MB, 0, 0)
    with pytest.raises(ProtocolError, match="never offered"):
        protocol.FrameDecoder().feed(bytes(frame) + ref)
    arena, peer = _arena_pair()
    try:
        for slot, off, n in [(sharedmem.SLOTS, 0, 10), (0, 0, 10), (20, 1, 10),
                             (20, 0, arena.capacity + 1)]:
            with pytest.raises(ProtocolError, match="bad shared-memory region"):
                peer.buffer(slot, off, n)
        with open(tmp_path / "f", "wb") as f:  # not an arena: refused
            with pytest.raises(ProtocolError, match="not a pydist arena"):
                sharedmem.PeerArena(os.getpid(), f.fileno(), arena.capacity, arena.token)
        with pytest.raises(ProtocolError, match="token differs"):  # another arena
            sharedmem.PeerArena(os.getpid(), arena.fd, arena.capacity, bytes(16))
    finally:
        peer.close()
        arena.close()
