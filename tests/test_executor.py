"""pydist.Executor against the concurrent.futures.Executor contract: submit, map (in order,
timeout, chunksize), shutdown (wait, cancel_futures, RuntimeError after), the context
manager, cancelling queued calls (here and on a worker), a worker killed mid-run, pools,
asyncio's run_in_executor. Real workers, real concurrent.futures and asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import signal
import threading
import time

import pytest

import pydist
from pydist import Executor

import futurehelpers as H
from conftest import wait_until


@pytest.fixture
def pool1(two_workers):
    """A pool of one shared worker: its executor runs one call at a time."""
    return pydist.WorkerPool([two_workers[0]])


@pytest.mark.timeout(120)
def test_max_workers_starts_and_removes_its_workers():
    before = set(pydist.workers())
    with Executor(max_workers=2) as ex:
        own = set(pydist.workers()) - before
        assert len(own) == 2
        pids = {ex.submit(H.getpid_after, 0.3).result(60) for _ in range(1)}
        fs = [ex.submit(H.getpid_after, 0.3) for _ in range(4)]
        pids |= {f.result(60) for f in fs}
        assert len(pids) == 2  # both workers ran calls
        assert ex.submit(H.add, 2, 3).result(60) == 5
    assert not (set(pydist.workers()) & own)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(H.add, 1, 1)
    with pytest.raises(ValueError):
        Executor(max_workers=0)


@pytest.mark.timeout(60)
def test_submit_returns_pydist_futures_that_cf_functions_accept(two_workers):
    with Executor(pool=pydist.WorkerPool(two_workers)) as ex:
        futs = [ex.submit(H.sleep_then, t, t) for t in (0.6, 0.1, 0.3)]
        assert all(isinstance(f, pydist.Future) and isinstance(f, cf.Future) for f in futs)
        assert [f.result() for f in cf.as_completed(futs, timeout=30)] == [0.1, 0.3, 0.6]
        bad = ex.submit(H.fail, "oops")
        slow = ex.submit(H.sleep_then, 2.0)
        done, _ = cf.wait([bad, slow], timeout=30, return_when=cf.FIRST_EXCEPTION)
        assert bad in done
        with pytest.raises(ValueError, match="oops"):
            bad.result()
        with pytest.raises(cf.TimeoutError):
            slow.result(0.05)


@pytest.mark.timeout(60)
def test_submit_never_waits_for_a_free_worker(pool1):
    with Executor(pool=pool1) as ex:
        t0 = time.monotonic()
        futs = [ex.submit(H.sleep_then, 0.3, i) for i in range(4)]
        assert time.monotonic() - t0 < 0.25  # (4 x 0.3 s of work are queued, not waited for)
        assert [f.result(30) for f in futs] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_one_call_at_a_time_per_worker(pool1):
    w = pool1.workers()[0]
    with Executor(pool=pool1) as ex:
        t0 = time.monotonic()
        futs = [ex.submit(H.sleep_then, 0.2, i) for i in range(5)]
        cf.wait(futs, timeout=30)
        # Run one after the other (a pydist worker runs calls in threads, concurrently).
        assert time.monotonic() - t0 >= 0.95
        assert [f.result() for f in futs] == list(range(5))
        assert all(f.where == w for f in futs)


@pytest.mark.timeout(60)
def test_map_in_order_lazy_results_and_chunksize(two_workers):
    with Executor(pool=pydist.WorkerPool(two_workers)) as ex:
        assert list(ex.map(H.square, range(20))) == [x * x for x in range(20)]
        assert list(ex.map(H.add, range(5), itertools.count(10))) == [10, 12, 14, 16, 18]
        for cs in (2, 3, 7, 100):
            assert list(ex.map(H.add, range(23), range(23), chunksize=cs)) == [2 * x for x in range(23)]
        with pytest.raises(ValueError):
            ex.map(H.square, [1], chunksize=0)
        # Submitted at once (as concurrent.futures does), results handed out in order.
        it = ex.map(H.sleep_then, [0.4, 0.1], [0.4, 0.1])
        assert next(it) == 0.4 and next(it) == 0.1
        # An error comes out at its place.
        it = ex.map(H.fail, ["a"])
        with pytest.raises(ValueError):
            next(it)


@pytest.mark.timeout(60)
def test_map_timeout(pool1):
    with Executor(pool=pool1) as ex:
        it = ex.map(H.sleep_then, [2.0, 2.0], timeout=0.3)
        with pytest.raises(cf.TimeoutError):
            list(it)


@pytest.mark.timeout(60)
def test_cancel_a_call_queued_in_the_executor(pool1):
    w = pool1.workers()[0]
    pydist.remotecall_fetch(H.forget, w)
    with Executor(pool=pool1) as ex:
        busy = ex.submit(H.sleep_then, 1.0, "busy")
        queued = ex.submit(H.record, "queued")    # one call per worker: waits here
        time.sleep(0.2)
        assert busy.running() and not busy.cancel()
        assert not queued.running()
        assert queued.cancel() is True
        assert queued.cancelled() and queued.done() and not queued.running()
        with pytest.raises(cf.CancelledError):
            queued.result()
        assert busy.result(30) == "busy"
        assert ex.submit(H.record, "after").result(30) == "after"
    assert pydist.remotecall_fetch(H.ran, w) == ["busy", "after"]


@pytest.mark.timeout(60)
def test_cancel_a_call_waiting_on_its_worker(pool1, monkeypatch):
    """A call sent behind a long one waits on the worker (not started) and can still be
    cancelled; the worker never runs it. The first call of a burst goes alone (bare); the
    calls queued behind it are sent together once it is done, as many as the worker's window
    allows. The window follows the machine's speed (BUDGET seconds of work): a large BUDGET
    keeps it open however slow the machine, and `first` runs long enough that `busy` and
    `behind` are both queued behind it."""
    monkeypatch.setattr(pydist.executor, "BUDGET", 60.0)
    w = pool1.workers()[0]
    with Executor(pool=pool1) as ex:
        pydist.remotecall_fetch(H.forget, w)
        first = ex.submit(H.sleep_then, 0.5, "first")
        busy = ex.submit(H.sleep_then, 3.0, "busy")
        behind = ex.submit(H.record, "behind")
        assert not busy.running() and not behind.running()  # queued here behind `first`
        assert first.result(30) == "first"
        # sent to the worker, waiting there behind busy (a loaded machine may take a while)
        wait_until(behind.running, timeout=2.5, what="the call behind busy to reach the worker")
        assert not busy.done()
        assert behind.cancel() is True
        assert behind.cancelled() and behind.done()
        with pytest.raises(cf.CancelledError):
            behind.exception()
        assert busy.result(30) == "busy"
        assert ex.submit(H.record, "after").result(30) == "after"
    assert pydist.remotecall_fetch(H.ran, w) == ["first", "busy", "after"]


@pytest.mark.timeout(60)
def test_shutdown_waits_and_cancel_futures(pool1):
    w = pool1.workers()[0]
    pydist.remotecall_fetch(H.forget, w)
    ex = Executor(pool=pool1)
    first = ex.submit(H.sleep_then, 0.5, "first")
    rest = [ex.submit(H.record, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.done() and first.result() == "first"
    assert all(f.done() for f in rest)
    cancelled = [f for f in rest if f.cancelled()]
    assert cancelled  # those still queued here (at least the last ones)
    ran = pydist.remotecall_fetch(H.ran, w)
    assert ran == ["first"] + [f.result() for f in rest if not f.cancelled()]
    with pytest.raises(RuntimeError):
        ex.submit(H.square, 1)
    ex.shutdown()  # a second time: nothing to do


@pytest.mark.timeout(60)
def test_shutdown_wait_runs_everything_queued(pool1):
    ex = Executor(pool=pool1)
    futs = [ex.submit(H.sleep_then, 0.1, i) for i in range(5)]
    ex.shutdown(wait=True)
    assert [f.result(0) for f in futs] == list(range(5))


@pytest.mark.timeout(60)
def test_shutdown_without_wait_returns_at_once(pool1):
    ex = Executor(pool=pool1)
    fut = ex.submit(H.sleep_then, 0.5, "x")
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t0 < 0.4
    assert fut.result(30) == "x"


@pytest.mark.timeout(60)
def test_leaving_map_early_cancels_the_rest(pool1):
    w = pool1.workers()[0]
    pydist.remotecall_fetch(H.forget, w)
    with Executor(pool=pool1) as ex:
        it = ex.map(H.sleep_then, [0.2] * 8, range(8))
        assert next(it) == 0
        it.close()  # as a `break` does: the rest is cancelled where it has not started
    ran = pydist.remotecall_fetch(H.ran, w)
    assert ran[0] == 0 and len(ran) < 8


@pytest.mark.timeout(120)
def test_worker_killed_mid_run_fails_only_its_calls(fresh_workers):
    w2, w3 = fresh_workers(2)
    pool = pydist.WorkerPool([w2, w3])
    with Executor(pool=pool) as ex:
        victim = ex.submit(H.getpid_after, 30)
        other = ex.submit(H.getpid_after, 1.0)
        time.sleep(0.5)
        assert victim.where != other.where
        os_pid = pydist.remotecall_fetch(os.getpid, victim.where)
        os.kill(os_pid, signal.SIGKILL)
        with pytest.raises(pydist.ProcessExitedException):
            victim.result(60)
        assert isinstance(victim.exception(), pydist.ProcessExitedException)
        assert other.result(60) == pydist.remotecall_fetch(os.getpid, other.where)
        # Still usable: later calls go to the worker that is left.
        futs = [ex.submit(H.square, i) for i in range(10)]
        assert [f.result(60) for f in futs] == [i * i for i in range(10)]
        assert {f.where for f in futs} == {other.where}


@pytest.mark.timeout(120)
def test_worker_killed_with_calls_queued_behind_it(fresh_workers):
    (w2,) = fresh_workers(1)
    with Executor(pool=pydist.WorkerPool([w2])) as ex:
        futs = [ex.submit(H.getpid_after, 0.5) for _ in range(6)]
        time.sleep(0.2)
        os.kill(pydist.remotecall_fetch(os.getpid, w2), signal.SIGKILL)
        done, not_done = cf.wait(futs, timeout=60)
        assert not not_done
        for f in futs:  # sent to it: ProcessExitedException; still queued here: no worker left
            assert isinstance(f.exception(), (pydist.ProcessExitedException, RuntimeError))
        assert isinstance(futs[0].exception(), pydist.ProcessExitedException)


@pytest.mark.timeout(60)
def test_default_pool_and_run_in_executor(two_workers):
    ex = Executor()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            return await asyncio.gather(*(loop.run_in_executor(ex, H.square, i) for i in range(6)))

        assert asyncio.run(main()) == [0, 1, 4, 9, 16, 25]
        assert ex.submit(H.getpid_after, 0).result(30) != os.getpid()
    finally:
        ex.shutdown()


@pytest.mark.timeout(60)
def test_executor_leaves_the_pool_usable(two_workers):
    pool = pydist.WorkerPool(two_workers)
    with Executor(pool=pool) as ex:
        assert list(ex.map(H.square, range(10))) == [x * x for x in range(10)]
    # Every worker was given back.
    assert pool.isready()
    assert pydist.remotecall(H.square, pool, 3).fetch(30) == 9


@pytest.mark.timeout(60)
def test_many_tiny_calls_and_a_submitting_thread_each(two_workers):
    with Executor(pool=pydist.WorkerPool(two_workers)) as ex:
        futs = [ex.submit(H.add, i, 1) for i in range(2000)]
        assert [f.result(60) for f in futs] == list(range(1, 2001))
        out: list = []

        def submitter(k):
            out.append(sum(f.result(60) for f in [ex.submit(H.square, k)] * 3))

        ts = [threading.Thread(target=submitter, args=(k,)) for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert sorted(out) == sorted(3 * k * k for k in range(8))


@pytest.mark.timeout(60)
def test_unpicklable_call_fails_its_future_only(two_workers):
    with Executor(pool=pydist.WorkerPool(two_workers)) as ex:
        lock = threading.Lock()
        fut = ex.submit(H.square, lock)
        with pytest.raises(pydist.SerializationError):
            fut.result(30)
        assert ex.submit(H.square, 4).result(30) == 16


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_multiprocessing_manager_queue_works_on_the_workers(pool1):
    """ProcessPoolExecutor code passes a `multiprocessing.Manager().Queue()` to its calls:
    the master's Manager proxies authenticate from pydist workers too, as from its children."""
    import multiprocessing

    with multiprocessing.Manager() as manager, Executor(pool=pool1) as ex:
        q = manager.Queue()
        assert ex.submit(H.put_items, q, 3).result(60) == 3
        assert sorted(q.get(timeout=30) for _ in range(3)) == [0, 1, 2]
        assert pydist.remotecall_fetch(H.put_items, pool1.workers()[0], q, 1) == 1
        assert q.get(timeout=30) == 0
