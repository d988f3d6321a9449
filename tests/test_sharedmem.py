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
from stresshelpers import make_array, master_arena_in_use, scribble

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
    monkeypatch.setattr(sharedmem, "KEEP_WARM", 3 * MB)
    warm_before = sharedmem._warm_free
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
        assert arena._free == [[0, arena.capacity, sharedmem.COLD]], arena._free
    finally:
        peer.close()
        arena.close()
    assert sharedmem._warm_free == warm_before


def _level_at(arena, off):
    return next(level for start, _, level in arena._free if start == off)


def test_each_region_is_written_the_cheapest_way_for_its_memory(monkeypatch):
    """A region with no memory behind it is written with pwrite (in the kernel, no page
    faults), then mapped in at its next use, then copied into directly: the data arrives
    intact each way, and the region is the same each time."""
    pwrites = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(sharedmem.os, "pwrite",
                        lambda fd, data, off: pwrites.append(off) or real_pwrite(fd, data, off))
    warm_before = sharedmem._warm_free
    arena, peer = _arena_pair()
    try:
        n = 2 * sharedmem.COPY_STEP + 100  # three slices
        levels, offsets, writes = [], [], []
        for seed in range(4):
            data = np.random.default_rng(seed).bytes(n)
            slot, off = arena.put(memoryview(data))
            writes.append(len(pwrites))
            buf = peer.buffer(slot, off, n)
            assert bytes(buf) == data, f"transfer {seed} corrupted"
            del buf
            gc.collect()
            assert arena.in_use() == 0
            levels.append(_level_at(arena, off))
            offsets.append(off)
        assert writes == [3, 3, 3, 3], "only the cold region is written with pwrite"
        assert levels == [sharedmem.ALLOCATED, sharedmem.MAPPED, sharedmem.MAPPED,
                          sharedmem.MAPPED]
        assert offsets == [offsets[0]] * 4, "the region is reused"
    finally:
        peer.close()
        arena.close()
    assert sharedmem._warm_free == warm_before


def test_a_region_that_cannot_be_written_is_given_back(monkeypatch):
    """pwrite fails (no memory left for the arena: ENOSPC): the buffer goes through the
    socket (put says None), and the region and its slot are free again."""
    real_pwrite = os.pwrite

    def full(fd, data, off):
        raise OSError(28, "No space left on device")

    arena = sharedmem.Arena()
    try:
        monkeypatch.setattr(sharedmem.os, "pwrite", full)
        assert arena.put(memoryview(bytes(2 * MB))) is None
        assert arena.in_use() == 0 and len(arena._free) == 1
        monkeypatch.setattr(sharedmem.os, "pwrite", real_pwrite)
        assert arena.put(memoryview(bytes(2 * MB))) is not None
    finally:
        arena.close()


def test_an_arena_closed_during_a_copy_keeps_its_descriptor_until_the_copy_ends(monkeypatch):
    """The connection closes while a sender writes into its arena with pwrite (the GIL is
    free then): the descriptor must stay the arena's until that write is done, never a
    number that another open could take meanwhile; the last copier closes it."""
    arena = sharedmem.Arena()
    fd, inode = arena.fd, os.fstat(arena.fd).st_ino
    real_pwrite = os.pwrite
    seen = []

    def pwrite(f, data, off):
        if not seen:
            arena.close()
        seen.append(os.fstat(f).st_ino)
        return real_pwrite(f, data, off)

    monkeypatch.setattr(sharedmem.os, "pwrite", pwrite)
    assert arena.put(memoryview(bytes(2 * sharedmem.COPY_STEP))) is None, "closed meanwhile"
    assert seen == [inode, inode], "a slice was written through another descriptor"
    gone = not os.path.exists(f"/proc/self/fd/{fd}") or os.fstat(fd).st_ino != inode
    assert gone, "the arena's descriptor was never closed"


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
