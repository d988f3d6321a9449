"""Concurrent large transfers in both directions must never deadlock (issue: both sides
writing, nobody reading). Payloads are larger than the kernel's socket buffers; the same
tests run in CI with `PYDIST_SOCKET_BUFFER=4096`, where every large frame is a partial write,
and `stress_workers` below runs them with 4 KiB buffers in any case. Large buffers between
local processes go through shared memory (`pydist.sharedmem`): the socket path is stressed
with it turned off, and the shared-memory path with it on."""

from __future__ import annotations

import numpy as np
import pytest

import pydist
from pydist import sharedmem
from pydist.group import PGRP

from conftest import run_threads
from stresshelpers import identity, make_array, relay

MB = 1 << 20


@pytest.fixture(params=["socket", "tiny", "shared", "shared-tiny"])
def stress_workers(request, fresh_workers, monkeypatch):
    """Two new workers, with the kernel's socket buffers or with 4 KiB ones (the master's
    connections to them and theirs to each other then all have tiny buffers); large
    buffers through the sockets or, where the platform allows, through shared memory."""
    if "tiny" in request.param:
        monkeypatch.setenv("PYDIST_SOCKET_BUFFER", "4096")
    shared = request.param.startswith("shared")
    if not shared:
        monkeypatch.setenv("PYDIST_SHARED_MEMORY", "0")
    workers = fresh_workers(2)
    yield workers
    conns = [PGRP.workers[w].conn for w in workers]
    used = [(c.share_state, c.peer_arena is not None) for c in conns]
    if not shared:
        assert used == [(-1, False)] * 2, used
    elif sharedmem.usable(conns[0].sock):  # we sent through it, or the worker did
        assert any(state == 2 or theirs for state, theirs in used), used


@pytest.mark.timeout(600)
def test_concurrent_arrays_both_ways_with_relays_and_tiny_calls(stress_workers):
    a, b = stress_workers
    arrays = [make_array(4 * MB, seed) for seed in range(16)]

    def roundtrips(i):
        def run():
            for k in range(3):
                w = (a, b)[(i + k) % 2]
                back = pydist.remotecall_fetch(identity, w, arrays[i])
                assert np.array_equal(back, arrays[i]), f"array {i} corrupted via worker {w}"
        return run

    def relays(i):
        def run():
            x = arrays[i]
            for _ in range(2):  # master -> a -> b -> a -> master
                back = pydist.remotecall_fetch(relay, a, x, [b, a])
                assert np.array_equal(back, x), f"relayed array {i} corrupted"
        return run

    def tiny_calls():
        for k in range(300):
            assert pydist.remotecall_fetch(pydist.myid, (a, b)[k % 2]) == (a, b)[k % 2]

    errors = run_threads([roundtrips(i) for i in range(16)] + [relays(0), relays(1)]
                         + [tiny_calls, tiny_calls])
    assert not errors, errors[:3]


@pytest.mark.timeout(600)
def test_many_threads_fetch_large_results_from_one_worker(stress_workers):
    w = stress_workers[0]

    def fetch(seed):
        def run():
            for _ in range(2):
                got = pydist.remotecall_fetch(make_array, w, 8 * MB, seed)
                assert np.array_equal(got, make_array(8 * MB, seed)), f"result {seed} corrupted"
        return run

    errors = run_threads([fetch(seed) for seed in range(16)])
    assert not errors, errors[:3]


@pytest.mark.timeout(600)
def test_futures_and_remote_do_with_large_payloads_both_ways(stress_workers):
    """remotecall (a PUSH of the result) and remote_do share the connection with fetches."""
    a, b = stress_workers
    arrays = [make_array(3 * MB, 100 + seed) for seed in range(8)]

    def futures(i):
        def run():
            futs = [pydist.remotecall(identity, (a, b)[k % 2], arrays[i]) for k in range(4)]
            for fut in futs:
                assert np.array_equal(fut.fetch(), arrays[i])
        return run

    def dos(i):
        def run():
            for _ in range(4):
                pydist.remote_do(identity, a, arrays[i])
            assert pydist.remotecall_fetch(pydist.myid, a) == a
        return run

    errors = run_threads([futures(i) for i in range(8)] + [dos(i) for i in range(4)])
    assert not errors, errors[:3]
