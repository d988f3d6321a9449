"""pmap against real workers: results, keywords (the full 32-way matrix), retries over dying
workers, nesting on a busy pool, and ExponentialBackOff."""

from __future__ import annotations

import itertools
import os

import pytest
import pydist
from conftest import wait_until
from maphelpers import (ClosesItsLane, DiesAfterTakingBack, DiesOnce, FlakyOnOdd,
                        arm_take_back_then_die)
from pydist import CachingPool, ExponentialBackOff, RemoteException, WorkerPool, pmap


def square(x):
    return x * x


def test_basic_forms(two_workers):
    assert pmap(square, range(20)) == [x * x for x in range(20)]
    assert pmap(lambda a, b: a * b, [1, 2, 3], (4, 5, 6)) == [4, 10, 18]
    assert pmap(square, (x for x in range(5))) == [0, 1, 4, 9, 16]
    assert pmap(square, []) == []
    pool = WorkerPool(two_workers)
    assert pmap(square, pool, range(6)) == [0, 1, 4, 9, 16, 25]
    assert pmap(square, range(6), pool=pool) == [0, 1, 4, 9, 16, 25]
    assert pmap(square, range(6), distributed=False) == [0, 1, 4, 9, 16, 25]
    assert set(pmap(lambda _: pydist.myid(), range(20))) == set(two_workers)
    with pytest.raises(TypeError):
        pmap(square, pool, range(3), pool=pool)
    with pytest.raises(ValueError, match="batch_size"):
        pmap(square, range(3), batch_size=0)


def test_first_error_is_raised_as_remote_exception(two_workers):
    with pytest.raises(RemoteException) as info:
        pmap(lambda x: 1 / (x - 3), range(6))
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):  # also batched
        pmap(lambda x: 1 / (x - 3), range(6), batch_size=2)


def test_on_error_examples_from_julia_docs(two_workers):
    f = lambda x: (_ for _ in ()).throw(ValueError("foo")) if x % 2 == 0 else x  # noqa: E731
    out = pmap(f, range(1, 5), on_error=lambda e: e)
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], ValueError) and str(out[1]) == "foo"  # raw, not RemoteException
    assert pmap(f, range(1, 5), on_error=lambda e: 0) == [1, 0, 3, 0]


MATRIX = list(itertools.product(
    [True, False],               # distributed
    [1, 3],                      # batch_size
    [None, "on_error"],          # on_error
    [(), (0.01,)],               # retry_delays
    [None, "check"],             # retry_check
))


@pytest.mark.parametrize("distributed, batch_size, on_error, delays, check", MATRIX)
def test_keyword_matrix(two_workers, tmp_path, distributed, batch_size, on_error, delays, check):
    f = FlakyOnOdd(str(tmp_path))
    checks_seen = []

    def retry_check(state, exc):
        checks_seen.append(type(exc).__name__)
        return state, True

    kwargs = dict(
        distributed=distributed, batch_size=batch_size,
        on_error=(lambda e: f"handled {type(e).__name__}") if on_error else None,
        retry_delays=delays, retry_check=retry_check if check else None,
    )
    xs = list(range(8))
    batched = distributed and batch_size > 1
    # Julia: unbatched, on_error wraps f where it runs (no error reaches the retries);
    # batched, failed elements are retried first and on_error handles what is left.
    retried = bool(delays) and (batched or not on_error)
    if not on_error and not delays:
        with pytest.raises(ValueError, match="first try"):
            pmap(f, xs, **kwargs)
        return
    out = pmap(f, xs, **kwargs)
    if retried:
        assert out == [10 * x for x in xs]
        if check:
            assert checks_seen and set(checks_seen) == {"ValueError"}
    else:
        assert out == [10 * x if x % 2 == 0 else "handled ValueError" for x in xs]


def test_retry_check_can_refuse(two_workers, tmp_path):
    with pytest.raises(ValueError, match="first try"):
        pmap(FlakyOnOdd(str(tmp_path)), range(4), retry_delays=[0.01],
             retry_check=lambda s, e: (s, False))


def test_exponential_backoff():
    delays = list(ExponentialBackOff(n=4, first_delay=0.1, max_delay=1.0, factor=3.0, jitter=0.0))
    assert delays == pytest.approx([0.1, 0.3, 0.9, 1.0])
    # As Julia: the first delay is `first_delay` exactly; the jitter applies to each next
    # one, relative to the one before (it compounds), and `max_delay` caps them all.
    for _ in range(20):
        jittered = list(ExponentialBackOff(n=6, first_delay=1.0, max_delay=100.0, factor=2.0,
                                           jitter=0.1))
        assert jittered[0] == 1.0
        for before, after in zip(jittered, jittered[1:]):
            assert 2 * 0.9 * before - 1e-9 <= after <= 2 * 1.1 * before + 1e-9
    assert len({tuple(ExponentialBackOff(n=3, first_delay=1.0, jitter=0.5)) for _ in range(10)}) > 1
    assert list(ExponentialBackOff(n=3, first_delay=5.0, max_delay=2.0)) == [2.0, 2.0, 2.0]
    assert len(ExponentialBackOff(n=3)) == 3
    with pytest.raises(ValueError):
        ExponentialBackOff(n=-1)


def test_worker_dying_mid_pmap_with_retries_completes(fresh_workers, tmp_path):
    pool = WorkerPool(fresh_workers(2))
    out = pmap(DiesOnce(str(tmp_path), 5), range(12), pool=pool,
               retry_delays=ExponentialBackOff(n=3, first_delay=0.01))
    assert out == [x + 1 for x in range(12)]
    assert len(pool) == 1  # the dead worker left the pool


def test_worker_dying_mid_pmap_batched_with_retries_completes(fresh_workers, tmp_path):
    pool = WorkerPool(fresh_workers(2))
    out = pmap(DiesOnce(str(tmp_path), 5), range(12), pool=pool, batch_size=3,
               retry_delays=[0.01, 0.01])
    assert out == [x + 1 for x in range(12)]


@pytest.mark.parametrize("pool_type", [WorkerPool, CachingPool])
def test_element_taken_back_from_a_worker_that_dies_then_runs_elsewhere(fresh_workers,
                                                                        pool_type):
    # Element 3 waits behind element 1 on one worker; when the other worker is idle the map
    # takes 3 back, and that worker answers 3 "not run", then dies before confirming the
    # take-back. Element 3 must run on the other worker: never come back as a result.
    ws = fresh_workers(2)
    for w in ws:
        pydist.remotecall_fetch(arm_take_back_then_die, w)
    pool = pool_type(ws)
    out = pmap(DiesAfterTakingBack(1), range(4), pool=pool, on_error=lambda e: "lost")
    assert out == [1, "lost", 3, 4]
    assert len(pool) == 1


def test_batch_taken_back_from_a_worker_that_dies_then_runs_elsewhere(fresh_workers):
    ws = fresh_workers(2)
    for w in ws:
        pydist.remotecall_fetch(arm_take_back_then_die, w)
    pool = WorkerPool(ws)
    out = pmap(DiesAfterTakingBack(3), range(8), pool=pool, batch_size=2,
               on_error=lambda e: "lost")
    assert out == [1, 2, "lost", "lost", 5, 6, 7, 8]


def test_element_a_live_worker_did_not_run_is_an_error_not_a_value(two_workers):
    # One worker (nowhere to move element 1 to): its lane ends while element 0 runs.
    w = two_workers[0]
    with pytest.raises(pydist.PydistError, match=rf"worker {w} did not run element 1 of"):
        pmap(ClosesItsLane(0), range(3), pool=WorkerPool([w]))


def test_worker_dying_mid_pmap_without_retries_raises(fresh_workers, tmp_path):
    pool = WorkerPool(fresh_workers(2))
    with pytest.raises(pydist.ProcessExitedException):
        pmap(DiesOnce(str(tmp_path), 5), range(12), pool=pool)


def test_nested_pmap_on_a_busy_shared_pool_does_not_deadlock(two_workers):
    pool = WorkerPool(two_workers)

    def outer(x):
        # Every worker of `pool` is busy with the outer map: the inner map must still finish.
        return sum(pmap(square, range(x), pool=pool))

    assert pmap(outer, range(8), pool=pool) == [sum(i * i for i in range(x)) for x in range(8)]


def test_batch_size_auto(two_workers):
    xs = list(range(10_000))
    assert pmap(square, xs, batch_size="auto") == [x * x for x in xs]


def args_of(*args):
    return args


@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_elements_reach_f_as_given_whatever_the_batching(two_workers, batch_size):
    """Batches of one iterable carry the values themselves (no 1-tuples): a tuple, a list or
    None is still one argument, and several iterables are still several arguments."""
    xs = [(1, 2), [3], None, (), "ab", (4,), 5]
    assert pmap(args_of, xs, batch_size=batch_size) == [(x,) for x in xs]
    assert pmap(args_of, xs, range(7), batch_size=batch_size) == list(zip(xs, range(7)))
    # A failure captured by on_error and a retried one keep the element's own arguments.
    out = pmap(lambda x: 1 / x[0], [(1,), (0,), (2,)], batch_size=batch_size,
               on_error=lambda e: type(e).__name__)
    assert out == [1.0, "ZeroDivisionError", 0.5]


def test_progress_bar(two_workers, capsys):
    pytest.importorskip("tqdm")
    assert pmap(square, range(30), progress=True) == [x * x for x in range(30)]
    assert "30/30" in capsys.readouterr().err



# ==================================================================== pipelining (lanes)
def timed_element(x):
    """(worker pid, start, end, x): element 0 sleeps long, the others briefly."""
    import time

    start = time.time()
    time.sleep(3.0 if x == 0 else 0.05)
    return pydist.myid(), start, time.time(), x


def test_each_worker_runs_one_element_at_a_time(two_workers):
    out = pmap(timed_element, range(1, 25), pool=WorkerPool(two_workers))
    assert [r[3] for r in out] == list(range(1, 25))
    by_worker: dict[int, list] = {}
    for pid, start, end, _ in out:
        by_worker.setdefault(pid, []).append((start, end))
    assert set(by_worker) == set(two_workers)
    for spans in by_worker.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end - 1e-3, "two elements of one map overlapped on a worker"


def test_an_element_queued_behind_a_long_one_moves_to_an_idle_worker(two_workers):
    """Elements 0 and 1 start at once, one per worker, 2 and 3 queue behind them; 0 runs
    for 3 s: the other worker, done with 1 and 3, takes 2 over instead of leaving it queued
    behind 0."""
    out = pmap(timed_element, range(4), pool=WorkerPool(two_workers))
    (pid0, _, end0, _), (pid1, _, end1, _) = out[0], out[1]
    assert pid1 != pid0 and end1 < end0 - 1.0
    assert {r[0] for r in out[1:]} == {pid1}
    assert all(r[2] < end0 - 1.0 for r in out[1:])


class RecordsRuns:
    """Records each element it runs in `directory`; element 0 fails after a moment."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, x):
        import time

        open(os.path.join(self.directory, f"ran-{x}"), "w").close()
        time.sleep(0.3)
        if x == 0:
            raise ValueError("element 0 fails")
        time.sleep(0.3)
        return x


def test_the_first_error_takes_back_elements_that_have_not_started(two_workers, tmp_path):
    with pytest.raises(RemoteException) as info:
        pmap(RecordsRuns(str(tmp_path)), range(12), pool=WorkerPool(two_workers))
    assert "element 0 fails" in str(info.value)
    ran = sorted(int(name.split("-")[1]) for name in os.listdir(tmp_path))
    # 0 and 1 started at once (one per worker), 2 and 3 were queued behind them. 2 starts as
    # soon as 0 fails, before the caller hears of it; 3, still queued behind 1, was taken
    # back; nothing later was sent. The map returned only once 1 (and 2) had finished.
    assert ran in ([0, 1], [0, 1, 2])


class Unpicklable:
    def __reduce__(self):
        raise TypeError("deliberately unpicklable")


def test_caching_pool_resends_a_function_whose_first_call_was_never_sent(two_workers):
    pool = pydist.CachingPool(two_workers[:1])
    f = lambda x: ("ok", x)  # noqa: E731
    with pytest.raises(pydist.SerializationError):
        pmap(f, [Unpicklable()], pool=pool)
    assert pmap(f, [1, 2], pool=pool) == [("ok", 1), ("ok", 2)]
    with pytest.raises(pydist.SerializationError):
        pydist.remotecall_fetch(f, pool, Unpicklable())
    assert pydist.remotecall_fetch(f, pool, 3) == ("ok", 3)


@pytest.mark.timeout(120)
def test_a_map_given_no_pool_caches_only_a_function_sent_by_value(fresh_workers):
    """pmap's own pool keeps `f` in a cache on each worker (a CachingPool) only when `f`
    travels by value (a closure): a module-level function is found there by name anyway, so
    its calls carry no cache channel, and no count message follows them."""
    import poolhelpers
    import refhelpers

    (w,) = fresh_workers(1)
    rf = pydist.remotecall_fetch
    before = rf(refhelpers.store_len, w)
    rf(poolhelpers.count_frames, w, True)
    xs = list(range(300))
    assert pmap(square, xs) == [x * x for x in xs]
    assert pmap(square, xs, batch_size="auto") == [x * x for x in xs]
    assert pmap(abs, [-x for x in xs], batch_size=7) == xs
    frames = rf(poolhelpers.frames_counted, w)
    assert frames.get("REFS", 0) == 0, frames
    assert rf(refhelpers.store_len, w) == before
    k = 3
    rf(poolhelpers.count_frames, w, True)
    assert pmap(lambda x: x + k, xs) == [x + 3 for x in xs]
    wait_until(lambda: rf(poolhelpers.frames_counted, w).get("REFS", 0) >= 1,
               what="the closure's cache on the worker to be counted")
    rf(poolhelpers.count_frames, w, False)


def _lane_exists(key):
    import sys

    return key in sys.modules["pydist.pmap"]._lanes


def _lane_queue_length(key):
    import sys

    lane = sys.modules["pydist.pmap"]._lanes.get(key)
    return -1 if lane is None else len(lane.queued)


def test_lane_calls_after_close_or_cancel_answer_without_running(two_workers):
    import operator
    import sys

    lanes = sys.modules["pydist.pmap"]  # `pydist.pmap` is the function
    w, rf = two_workers[0], pydist.remotecall_fetch
    rf(lanes._lane_close, w, "test-lane")
    assert rf(lanes._lane_run, w, "test-lane", 3, operator.neg, (1,)) == lanes._CANCELLED
    assert rf(_lane_exists, w, "test-lane") is False
    assert rf(lanes._lane_cancel, w, "other-lane", 0) is True  # not started: taken back
    assert rf(lanes._lane_run, w, "other-lane", 0, operator.neg, (2,)) == lanes._CANCELLED
    assert rf(lanes._lane_run, w, "other-lane", 1, operator.neg, (3,)) == -3  # it ran
    assert rf(lanes._lane_cancel, w, "other-lane", 1) is False  # it has run
    rf(lanes._lane_close, w, "other-lane")
    assert rf(_lane_exists, w, "other-lane") is False


def element_thread(x):
    import threading
    import time

    time.sleep(0.02)
    return pydist.myid(), threading.get_ident()


def test_a_lane_runs_consecutive_elements_in_one_thread(two_workers):
    """The next element is already queued when one ends: the same thread runs it, with no
    hand-off between threads (that is what makes a map of short sleeps efficient)."""
    out = pmap(element_thread, range(40), pool=WorkerPool(two_workers))
    threads = {}
    for pid, tid in out:
        threads.setdefault(pid, set()).add(tid)
    assert set(threads) == set(two_workers)
    assert all(len(t) <= 2 for t in threads.values()), threads


def slow_square(x):
    """An element that runs long enough (10 ms) for the caller to wait between outcomes."""
    import time
    time.sleep(0.01)
    return x * x


def test_a_smooth_map_sends_each_next_element_where_the_last_outcome_landed(two_workers,
                                                                              monkeypatch):
    """Once a map runs, an outcome that lands (in a connection's reading thread) sends its
    worker the next element at once: the caller's thread is not woken for each element.
    (Only while the caller waits: a caller that cannot keep up, as on a loaded machine with
    instant elements, takes every outcome itself. Elements of 10 ms leave it waiting.)"""
    import importlib
    import threading

    pmap_module = importlib.import_module("pydist.pmap")
    senders = []
    original = pmap_module._call_lane

    def recording(*args):
        senders.append(threading.get_ident())
        return original(*args)

    monkeypatch.setattr(pmap_module, "_call_lane", recording)
    got = pmap(slow_square, range(100), pool=WorkerPool(two_workers))
    assert got == [x * x for x in range(100)]
    # One send per element; at the end, a call still queued behind a slow one may be taken
    # back and sent to the idle worker (`move_queued_call_to`), as on a loaded machine.
    assert 100 <= len(senders) <= 102, len(senders)
    caller = threading.get_ident()
    assert senders[:4] == [caller] * 4  # the first elements: two for each worker
    assert senders.count(caller) < 50, senders.count(caller)


def test_an_element_that_cannot_be_pickled_mid_map_raises_and_loses_nothing(two_workers):
    """The element is sent from where the outcome before it landed: its SerializationError
    still reaches the caller at once, and the workers serve the next map in full."""
    xs = list(range(200))
    xs[120] = Unpicklable()
    with pytest.raises(pydist.SerializationError, match="deliberately unpicklable"):
        pmap(square, xs, pool=WorkerPool(two_workers))
    assert pmap(square, range(300), pool=WorkerPool(two_workers)) == [x * x for x in range(300)]


def digest(data: bytes) -> tuple[int, str]:
    import hashlib

    return len(data), hashlib.sha1(data).hexdigest()


def test_large_elements_sent_from_where_outcomes_land_arrive_intact(two_workers):
    """Elements larger than the kernel's socket buffers (and below `sharedmem.SHARE_MIN`:
    they go through the socket), sent while outcomes land (partial writes, finished by the
    poller; in CI also with 4 KiB buffers), arrive whole and in order, results too."""
    import hashlib

    from pydist import sharedmem

    size = sharedmem.SHARE_MIN - 4096
    xs = [bytes([i]) * size + i.to_bytes(4, "big") for i in range(24)]
    want = [(len(x), hashlib.sha1(x).hexdigest()) for x in xs]
    assert pmap(digest, xs, pool=WorkerPool(two_workers)) == want
    assert pmap(bytes, xs, pool=WorkerPool(two_workers)) == xs


def test_elements_queued_in_a_lane_are_answered_when_it_closes(two_workers):
    """Elements still queued behind a running one when the map ends get their reply (they
    do not run), so nobody waits for them."""
    import sys

    lanes = sys.modules["pydist.pmap"]
    w = two_workers[0]
    running = pydist.remotecall(lanes._lane_run, w, "closing-lane", 0, timed_element, (0,))
    queued = [pydist.remotecall(lanes._lane_run, w, "closing-lane", i, timed_element, (i,))
              for i in (1, 2)]
    wait_until(lambda: pydist.remotecall_fetch(_lane_queue_length, w, "closing-lane") == 2,
               timeout=30, what="both elements to queue behind the running one")
    assert not any(f.isready() for f in queued)
    pydist.remote_do(lanes._lane_close, w, "closing-lane")
    assert [f.fetch() for f in queued] == [lanes._CANCELLED] * 2
    assert not running.isready()  # answered at once, not after the running one
    assert running.fetch()[3] == 0  # the running one finishes normally


def _cyclic_garbage(run) -> list:
    """What `run()` leaves that only the cyclic garbage collector could free."""
    import gc

    run()  # warm: caches and pools made once are not garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.timeout(120)
def test_maps_and_calls_leave_no_reference_cycles(two_workers):
    """A map's replies, results and batches are freed when the map returns, not later by the
    cyclic collector: garbage in cycles made the master's heap grow map after map (page
    faults) and its collections take milliseconds in the middle of a map."""
    a, b = two_workers
    xs = list(range(3000))
    runs = {
        "pmap": lambda: pmap(square, xs[:300]),
        "pmap batched": lambda: pmap(square, xs, batch_size="auto"),
        "pmap on a CachingPool": lambda: pmap(square, pydist.CachingPool([a, b]), xs[:300]),
        "remotecall, fetch": lambda: [f.fetch() for f in [pydist.remotecall(square, a, x) for x in xs[:200]]],
        "remotecall_fetch": lambda: [pydist.remotecall_fetch(square, b, x) for x in xs[:200]],
    }
    for what, run in runs.items():
        garbage = _cyclic_garbage(run)
        ours = sorted({type(o).__qualname__ for o in garbage if type(o).__module__.startswith("pydist")})
        big = [len(o) for o in garbage if isinstance(o, list) and len(o) >= 100]
        assert not ours and not big, f"{what} left {len(garbage)} objects in cycles: {ours}, lists of {big}"
