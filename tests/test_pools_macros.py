"""Worker pools and the macros as functions (spawnat, spawn, fetchfrom, fetchany, everywhere,
distributed), against real workers."""

from __future__ import annotations

import os
import pickle
import signal
import threading

import pytest
from conftest import wait_until, worker_ospid

import pydist
from pydist import CachingPool, RemoteException, WorkerPool


def square(x):
    return x * x


def whoami_after(ev_channel):
    ev_channel.take()
    return pydist.myid()


# ---------------------------------------------------------------- WorkerPool
def test_worker_pool_basics(two_workers):
    a, b = two_workers
    pool = WorkerPool([a, b])
    assert len(pool) == 2 and pool.nworkers() == 2 and pool.workers() == [a, b]
    assert pool.isready()
    w = pool.take()
    assert w in (a, b)
    pool.put(w)
    assert sorted({pydist.remotecall_fetch(pydist.myid, pool) for _ in range(10)}) == [a, b]
    assert pydist.remotecall(square, pool, 7).fetch() == 49
    assert pydist.remotecall_wait(square, pool, 3).fetch() == 9
    assert pydist.remote(square, pool)(5) == 25


def test_empty_pool_take_raises():
    with pytest.raises(RuntimeError, match="No active worker available in pool"):
        WorkerPool().take()


def test_remotecall_gives_the_worker_back_only_when_done(two_workers):
    a, _ = two_workers
    pool = WorkerPool([a])
    gate = pydist.RemoteChannel(lambda: pydist.Channel(1))
    fut = pydist.remotecall(whoami_after, pool, gate)
    assert not pool.isready()  # the worker is busy with our call
    gate.put("go")
    assert fut.fetch() == a
    wait_until(pool.isready, what="the worker to return to the pool")


def test_busy_pool_waits_for_a_free_worker(two_workers):
    a, _ = two_workers
    pool = WorkerPool([a])
    gate = pydist.RemoteChannel(lambda: pydist.Channel(1))
    fut = pydist.remotecall(whoami_after, pool, gate)
    got = []
    t = threading.Thread(target=lambda: got.append(pydist.remotecall_fetch(pydist.myid, pool)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waiting for the only worker
    gate.put("go")
    t.join(30)
    assert got == [a] and fut.fetch() == a


def test_dead_worker_is_dropped_from_pools(fresh_workers):
    a, b = fresh_workers(2)
    pool = WorkerPool([a, b])
    os.kill(worker_ospid(a), signal.SIGKILL)
    wait_until(lambda: a not in pydist.workers(), what="the dead worker to be deregistered")
    assert pool.workers() == [b]
    assert {pydist.remotecall_fetch(pydist.myid, pool) for _ in range(5)} == {b}
    only_dead = WorkerPool([a])
    assert not only_dead.isready()
    with pytest.raises(RuntimeError, match="No active worker"):
        only_dead.take()


def test_pool_waiter_is_woken_when_its_worker_dies(fresh_workers):
    (a,) = fresh_workers(1)
    pool = WorkerPool([a])
    w = pool.take()
    errors = []

    def waiter():
        try:
            pool.take()
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    os.kill(worker_ospid(w), signal.SIGKILL)
    t.join(30)
    assert not t.is_alive() and errors


def test_pool_sent_to_a_worker_is_a_proxy_of_the_master_pool(two_workers):
    a, b = two_workers
    pool = WorkerPool([b])
    # On worker a, the pool forwards take/put to the master, which hands out b.
    assert pydist.remotecall_fetch(lambda p: pydist.remotecall_fetch(pydist.myid, p), a, pool) == b
    assert pydist.remotecall_fetch(lambda p: p.workers(), a, pool) == [b]
    assert pool.isready()  # b was given back


# ---------------------------------------------------------------- default pool
def test_default_worker_pool_tracks_membership(fresh_workers):
    pool = pydist.default_worker_pool()
    (a,) = fresh_workers(1)
    assert a in pool.workers()
    pydist.rmprocs(a, waitfor=30)
    assert a not in pool.workers()
    assert pydist.remote(pydist.myid)() in pydist.workers()


def test_default_pool_with_no_workers_uses_the_master():
    pydist.rmprocs(pydist.workers(), waitfor=30)
    pool = pydist.default_worker_pool()
    assert pool.workers() == [1] and pool.isready() and pool.take() == 1
    assert pydist.remote(pydist.myid)() == 1


def test_set_default_worker_pool(two_workers):
    a, _ = two_workers
    old = pydist.default_worker_pool()
    try:
        pydist.set_default_worker_pool(WorkerPool([a]))
        assert {pydist.remote(pydist.myid)() for _ in range(5)} == {a}
    finally:
        pydist.set_default_worker_pool(old)
    with pytest.raises(TypeError):
        pydist.set_default_worker_pool([a])


# ---------------------------------------------------------------- CachingPool
def test_caching_pool_ships_each_function_once(two_workers):
    a, _ = two_workers
    big = list(range(200_000))  # captured: worth caching
    pool = CachingPool([a])
    f = lambda i: len(big) + i  # noqa: E731
    assert [pydist.remotecall_fetch(f, pool, i) for i in range(3)] == [200_000, 200_001, 200_002]
    assert len(pool._cache) == 1
    rc = next(iter(pool._cache.values()))[1].rc
    # The worker holds the function in its cache channel; later calls send only its id.
    assert pydist.remotecall_fetch(lambda c: c.isready(), a, rc)
    assert pydist.remotecall(f, pool, 10).fetch() == 200_010
    pydist.clear(pool)
    assert pool._cache == {}


@pytest.mark.timeout(120)
def test_caching_pool_calls_after_the_first_carry_no_reference(fresh_workers):
    """Calls after the first name the worker's cache by its id: no reference goes with them,
    so no count message goes before each; the cache is freed once the pool lets it go."""
    import gc

    import poolhelpers
    import refhelpers

    (w,) = fresh_workers(1)
    before = pydist.remotecall_fetch(refhelpers.store_len, w)
    pydist.remotecall_fetch(poolhelpers.count_frames, w, True)
    pool = CachingPool([w])
    assert [pydist.remotecall_fetch(square, pool, i) for i in range(40)] == [i * i for i in range(40)]
    assert pydist.pmap(square, pool, range(40)) == [i * i for i in range(40)]
    frames = pydist.remotecall_fetch(poolhelpers.frames_counted, w)
    pydist.remotecall_fetch(poolhelpers.count_frames, w, False)
    assert frames.get("CALL_FETCH", 0) >= 80  # (the spy saw the calls)
    assert frames.get("REFS", 0) <= 2, frames  # the first call's count, not one per call
    assert pydist.remotecall_fetch(refhelpers.store_len, w) == before + 1  # the cache
    del pool
    gc.collect()
    wait_until(lambda: pydist.remotecall_fetch(refhelpers.store_len, w) == before,
               what="the cache to be freed on the worker")


@pytest.mark.timeout(120)
def test_a_cached_call_may_arrive_before_the_call_that_brings_the_function(fresh_workers):
    """Two threads of the caller may send the first call of a function (which brings it) and
    a later one (which names the cache) in either order: the later one then waits for the
    function, and the counts stay right (the cache is freed when the caller lets it go)."""
    import gc

    import refhelpers
    from pydist.workerpool import _CacheRef, _exec_and_cache, _exec_from_cache

    (w,) = fresh_workers(1)
    before = pydist.remotecall_fetch(refhelpers.store_len, w)
    rc = pydist.RemoteChannel(w)
    early = pydist.remotecall(_exec_from_cache, w, _CacheRef(rc), 6)
    with pytest.raises(TimeoutError):
        early.wait(0.3)  # the function is not there yet
    assert pydist.remotecall_fetch(_exec_and_cache, w, square, rc, 7) == 49
    assert early.fetch() == 36
    del early, rc
    gc.collect()
    wait_until(lambda: pydist.remotecall_fetch(refhelpers.store_len, w) == before,
               what="the cache to be freed on the worker")


@pytest.mark.timeout(120)
def test_pmap_gets_each_result_in_the_reply_to_its_call(fresh_workers):
    """A map's call is answered with its result, small or large: nothing waits on the worker
    for a Future (no fetch afterwards, no count message to release it)."""
    import poolhelpers

    (w,) = fresh_workers(1)
    sizes = [10, 300_000, 20, 500_000]
    pydist.remotecall_fetch(poolhelpers.count_frames, w, True)
    got = pydist.pmap(poolhelpers.blob, WorkerPool([w]), sizes)
    frames = pydist.remotecall_fetch(poolhelpers.frames_counted, w)
    pydist.remotecall_fetch(poolhelpers.count_frames, w, False)
    assert [len(b) for b in got] == sizes
    assert frames.get("CALL_FETCH", 0) >= len(sizes), frames
    assert frames.get("CALL", 0) == 0 and frames.get("REFS", 0) == 0, frames


def test_caching_pool_is_not_serializable(two_workers):
    with pytest.raises(TypeError, match="CachingPool objects are not serializable"):
        pickle.dumps(CachingPool(two_workers))


def test_clear_globals(two_workers):
    a, b = two_workers
    pydist.everywhere("payload = list(range(10))", procs=[a, b])
    pydist.clear(["payload"], [a])
    assert pydist.everywhere("payload", procs=a) is None
    assert pydist.everywhere("payload", procs=b) == list(range(10))


# ---------------------------------------------------------------- macros
def test_spawnat_spawn_fetchfrom_fetchany(two_workers):
    a, b = two_workers
    assert pydist.spawnat(b, pydist.myid).fetch() == b
    seen = {pydist.spawnat("any", pydist.myid).fetch() for _ in range(6)}
    assert set(two_workers) <= seen
    assert pydist.spawn(square, 4).fetch() == 16
    assert pydist.fetchfrom(a, square, 6) == 36
    assert pydist.fetchany(pydist.myid) in pydist.workers()


def test_everywhere_code_runs_on_all_processes_master_included(two_workers):
    pydist.everywhere("import os; everywhere_pid = os.getpid()")
    import __main__

    assert __main__.everywhere_pid == os.getpid()
    pids = {pydist.everywhere("everywhere_pid", procs=w) for w in two_workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert pydist.everywhere("3 * 7", procs=two_workers[0]) == 21


def test_everywhere_as_decorator(two_workers):
    @pydist.everywhere
    def triple(x):
        return 3 * x

    @pydist.everywhere(procs=two_workers)
    class Box:
        def __init__(self, v):
            self.v = v

    assert triple(2) == 6
    assert pydist.everywhere("triple(5)", procs=two_workers[1]) == 15
    assert pydist.everywhere("Box(4).v", procs=two_workers[0]) == 4


def test_everywhere_errors_are_grouped(two_workers):
    with pytest.raises(pydist.ExceptionGroup) as info:
        pydist.everywhere("1 / 0", procs=two_workers)
    assert len(info.value.exceptions) == 2
    assert all(isinstance(e, RemoteException) for e in info.value.exceptions)
    with pytest.raises(RemoteException) as single:
        pydist.everywhere("undefined_name_xyz", procs=two_workers[0])
    assert single.value.pid == two_workers[0]


class NotSendable:
    def __reduce__(self):
        raise TypeError("deliberately unpicklable")


@pytest.mark.timeout(120)
def test_everywhere_binds_values_before_running_code(two_workers):
    """Julia's `@everywhere x = $foo`: everywhere(code, procs, **values) binds each value
    (pickled, lambdas by value) to its name in `__main__` of every process, then runs code."""
    import __main__

    a, b = two_workers
    data = {"k": list(range(1000))}
    scale = lambda x: 3 * x  # noqa: E731 - sent by value
    pydist.everywhere("ev_out = ev_scale(len(ev_data['k']))", ev_data=data, ev_scale=scale)
    assert __main__.ev_data is data  # this process binds the object itself
    assert __main__.ev_out == 3000
    assert [pydist.everywhere("ev_out", procs=p) for p in (a, b)] == [3000, 3000]
    assert pydist.everywhere("ev_data == {'k': list(range(1000))}", procs=b) is True
    # Without code: bind only, on the processes given.
    assert pydist.everywhere(procs=[a], ev_only=7) is None
    assert pydist.everywhere("ev_only", procs=a) == 7
    assert pydist.everywhere("'ev_only' in globals()", procs=b) is False
    # One pid: the value of the expression there.
    assert pydist.everywhere("ev_n + 1", procs=b, ev_n=41) == 42
    # A value that cannot be sent is named, with the process; nothing runs.
    with pytest.raises(pydist.SerializationError, match=r"ev_bad.* process"):
        pydist.everywhere("ev_ran = True", procs=[a, b], ev_good=1, ev_bad=NotSendable())
    assert pydist.everywhere("'ev_ran' in globals()", procs=a) is False
    # Code that fails says on which worker.
    with pytest.raises(pydist.ExceptionGroup) as info:
        pydist.everywhere("1 / ev_zero", procs=[a, b], ev_zero=0)
    assert sorted(e.pid for e in info.value.exceptions) == [a, b]
    assert all("ZeroDivisionError" in str(e) for e in info.value.exceptions)
    with pytest.raises(TypeError):
        pydist.everywhere(42, ev_x=1)


def test_splitrange_balance():
    from pydist.macros import splitrange

    for n in range(0, 40):
        for k in range(1, 7):
            parts = splitrange(n, k)
            sizes = [len(p) for p in parts]
            assert sum(sizes) == n
            assert list(itertools_chain(parts)) == list(range(n))
            if n:
                assert len(parts) == min(n, k)
                assert max(sizes) - min(sizes) <= 1


def itertools_chain(parts):
    for p in parts:
        yield from p


def test_distributed_with_reducer(two_workers):
    assert pydist.distributed(square, range(101), lambda x, y: x + y) == sum(i * i for i in range(101))
    # in order: a non-commutative reduction (string concatenation)
    assert pydist.distributed(str, range(12), lambda x, y: x + y) == "".join(map(str, range(12)))
    # the iterable is evaluated once
    calls = []

    def gen():
        calls.append(1)
        yield from range(10)

    assert pydist.distributed(lambda x: x, gen(), lambda x, y: x + y) == 45
    assert calls == [1]


def test_distributed_chunks_run_on_each_worker(two_workers):
    out = pydist.distributed(lambda x: {pydist.myid()}, range(20), lambda x, y: x | y)
    assert out == set(pydist.workers())


def test_distributed_without_reducer_returns_a_handle(two_workers):
    ch = pydist.RemoteChannel(lambda: pydist.Channel(100))
    handle = pydist.distributed(lambda x: ch.put(x), range(10))
    handle.wait(30)
    assert sorted(ch.take() for _ in range(10)) == list(range(10))
    bad = pydist.distributed(lambda x: 1 / (x - 3), range(10))
    with pytest.raises(ZeroDivisionError):
        bad.wait(30)


@pytest.mark.timeout(120)
def test_caching_pool_unpickles_the_function_once_per_worker(fresh_workers):
    """Whichever of remotecall_fetch, remotecall and pmap uses a function first, a
    CachingPool sends it to each worker once (Julia's pmap sends `f` itself through the
    pool); a WorkerPool sends it with every call."""
    import poolhelpers

    a, b, c = fresh_workers(3)
    f = poolhelpers.Counted("t")
    plain = WorkerPool([a])
    assert [pydist.remotecall_fetch(f, plain, i) for i in range(4)] == [("t", i) for i in range(4)]
    assert pydist.remotecall_fetch(poolhelpers.unpickled, a) == 4  # sent with every call
    cached = CachingPool([b])
    assert [pydist.remotecall_fetch(f, cached, i) for i in range(4)] == [("t", i) for i in range(4)]
    assert pydist.remotecall(f, cached, 9).fetch() == ("t", 9)
    assert pydist.pmap(f, cached, range(3)) == [("t", i) for i in range(3)]
    assert pydist.remotecall_fetch(poolhelpers.unpickled, b) == 1
    g = poolhelpers.Counted("g")  # pmap first, then the calls
    both = CachingPool([b, c])
    assert pydist.pmap(g, both, range(8)) == [("g", i) for i in range(8)]
    assert [pydist.remotecall_fetch(g, both, i) for i in range(4)] == [("g", i) for i in range(4)]
    assert [pydist.remotecall(g, both, i).fetch() for i in range(4)] == [("g", i) for i in range(4)]
    assert pydist.pmap(g, both, range(8)) == [("g", i) for i in range(8)]
    assert pydist.remotecall_fetch(poolhelpers.unpickled, b) == 2  # f once, g once
    assert pydist.remotecall_fetch(poolhelpers.unpickled, c) == 1


@pytest.mark.timeout(120)
def test_caching_pool_sends_a_batched_map_function_once_per_worker(fresh_workers):
    """A batched map (or one with on_error) sends a wrapper of `f`, once per worker and map,
    as Julia does: not `f` with every batch."""
    import poolhelpers

    (w,) = fresh_workers(1)
    f = poolhelpers.Counted("b")
    pool = CachingPool([w])
    assert pydist.pmap(f, pool, range(12), batch_size=3) == [("b", i) for i in range(12)]
    assert pydist.remotecall_fetch(poolhelpers.unpickled, w) == 1
    assert pydist.pmap(f, pool, range(6), on_error=repr) == [("b", i) for i in range(6)]
    assert pydist.remotecall_fetch(poolhelpers.unpickled, w) == 2


def test_progress_without_tqdm_draws_a_plain_bar(two_workers, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert pydist.pmap(square, range(3), progress=True) == [0, 1, 4]
    assert "3/3" in capsys.readouterr().err
