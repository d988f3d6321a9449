"""pydist Futures as standard `concurrent.futures.Future`s: the module functions of
concurrent.futures (wait with each return_when, as_completed), asyncio (wrap_future, await),
result/exception/timeouts, done callbacks, cancel and running. Real workers, real
concurrent.futures and asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

import pydist
from pydist import Future, remotecall, spawnat

import futurehelpers as H


@pytest.fixture
def w(two_workers):
    return two_workers


def test_is_a_concurrent_future(w):
    fut = remotecall(H.square, w[0], 3)
    assert isinstance(fut, cf.Future)
    assert isinstance(spawnat(w[1], H.square, 4), cf.Future)
    assert isinstance(Future(), cf.Future)
    assert fut.result(30) == 9


@pytest.mark.timeout(60)
def test_wait_all_completed_mixed_with_a_standard_future(w):
    std: cf.Future = cf.Future()
    threading.Timer(0.3, std.set_result, ("std",)).start()
    futs = [remotecall(H.sleep_then, w[0], 0.2, "a"), spawnat(w[1], H.sleep_then, 0.4, "b"), std]
    done, not_done = cf.wait(futs, timeout=30, return_when=cf.ALL_COMPLETED)
    assert done == set(futs) and not not_done
    assert [f.result() for f in futs] == ["a", "b", "std"]


@pytest.mark.timeout(60)
def test_wait_first_completed(w):
    slow = remotecall(H.sleep_then, w[0], 3.0, "slow")
    fast = remotecall(H.sleep_then, w[1], 0.1, "fast")
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    # Already done: returns at once with it.
    done, _ = cf.wait([slow, fast], timeout=0, return_when=cf.FIRST_COMPLETED)
    assert fast in done


@pytest.mark.timeout(60)
def test_wait_first_exception(w):
    slow = remotecall(H.sleep_then, w[0], 3.0, "slow")
    bad = remotecall(H.fail, w[1], "boom")
    done, not_done = cf.wait([slow, bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    assert isinstance(bad.exception(), ValueError)
    # No exception at all: FIRST_EXCEPTION waits for everything.
    a, b = remotecall(H.square, w[0], 2), remotecall(H.sleep_then, w[1], 0.2, "b")
    done, not_done = cf.wait([a, b], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {a, b} and not not_done


@pytest.mark.timeout(60)
def test_wait_timeout_leaves_pending_ones(w):
    slow = remotecall(H.sleep_then, w[0], 2.0, "slow")
    done, not_done = cf.wait([slow], timeout=0.1)
    assert not done and not_done == {slow}
    assert slow.result(30) == "slow"  # (the waiter it left behind was removed)


@pytest.mark.timeout(60)
def test_as_completed_yields_in_completion_order(w):
    futs = [remotecall(H.sleep_then, w[i % 2], t, t) for i, t in enumerate([1.5, 0.1, 0.8])]
    order = [f.result() for f in cf.as_completed(futs, timeout=30)]
    assert order == [0.1, 0.8, 1.5]


@pytest.mark.timeout(60)
def test_as_completed_timeout(w):
    slow = remotecall(H.sleep_then, w[0], 3.0, "slow")
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([slow], timeout=0.2))
    assert slow.result(30) == "slow"


@pytest.mark.timeout(60)
def test_asyncio_wrap_future_and_await(w):
    async def main():
        a = asyncio.wrap_future(remotecall(H.sleep_then, w[0], 0.2, "a"))
        b = asyncio.wrap_future(spawnat(w[1], H.square, 7))
        direct = await remotecall(H.add, w[0], 1, 2)
        results = await asyncio.gather(a, b)
        with pytest.raises(ValueError):
            await asyncio.wrap_future(remotecall(H.fail, w[1]))
        return results, direct

    assert asyncio.run(main()) == (["a", 49], 3)


@pytest.mark.timeout(60)
def test_asyncio_wait_for_timeout_cancels_the_wrapper_only(w):
    fut = remotecall(H.sleep_then, w[0], 1.0, "late")

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(fut), 0.1)

    asyncio.run(main())
    # The call was running: cancelling the asyncio side could not cancel it.
    assert not fut.cancelled()
    assert fut.result(30) == "late"


@pytest.mark.timeout(60)
def test_result_exception_and_timeouts(w):
    ok = remotecall(H.square, w[0], 5)
    assert ok.result(30) == 25 and ok.exception(30) is None
    bad = remotecall(H.fail, w[1], "no")
    with pytest.raises(ValueError, match="no") as info:
        bad.result(30)
    assert isinstance(info.value, pydist.RemoteException)
    exc = bad.exception(30)
    assert isinstance(exc, ValueError) and isinstance(exc, pydist.RemoteException)
    slow = remotecall(H.sleep_then, w[0], 2.0, "slow")
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        slow.result(0.1)
    with pytest.raises(TimeoutError):  # the builtin too (they differ on 3.10)
        slow.exception(0.1)
    assert time.monotonic() - t0 < 1.9
    assert slow.result(30) == "slow"
    # A call that itself raises TimeoutError is its outcome, not a wait that ran out.
    own = remotecall(H.fail, w[0], "x")
    assert own.exception(30) is not None


@pytest.mark.timeout(60)
def test_result_of_a_large_value_not_pushed(w):
    fut = remotecall(bytes, w[0], 1 << 20)  # above the push limit: fetched by result()
    fut.wait(30)
    assert fut.done() and fut.exception() is None
    assert len(fut.result(30)) == 1 << 20


@pytest.mark.timeout(60)
def test_done_callback_called_once_with_the_future(w):
    calls: list = []
    got = threading.Event()
    fut = remotecall(H.sleep_then, w[0], 0.2, "x")

    def cb(f):
        calls.append(f)
        got.set()

    fut.add_done_callback(cb)
    assert got.wait(30)
    assert fut.result() == "x"
    time.sleep(0.1)
    assert calls == [fut]
    late: list = []
    fut.add_done_callback(late.append)  # after completion: at once, in this thread
    assert late == [fut]


def test_done_callback_that_raises_is_logged_not_raised(w, caplog):
    fut = remotecall(H.square, w[0], 2)
    fut.result(30)

    def bad(_):
        raise RuntimeError("callback failed")

    fut.add_done_callback(bad)  # logged, as concurrent.futures does
    assert "done-callback" in caplog.text


@pytest.mark.timeout(60)
def test_cancel_of_a_running_or_finished_call_is_false(w):
    tag = f"run-{time.monotonic()}"
    fut = remotecall(H.sleep_then, w[0], 1.0, tag)
    time.sleep(0.3)
    assert fut.running() and not fut.done()
    assert fut.cancel() is False
    assert not fut.cancelled()
    assert fut.result(30) == tag
    assert not fut.running()
    assert fut.cancel() is False  # finished


@pytest.mark.timeout(120)
def test_cancel_is_exact_about_whether_a_call_ran(w):
    """Right after sending a burst, cancel every call: True for exactly those that never
    ran on the worker (checked there), and their result() raises CancelledError."""
    pydist.remotecall_fetch(H.forget, w[0])
    n = 200
    futs = [remotecall(H.record, w[0], i) for i in range(n)]
    cancelled = {i for i, f in enumerate(futs) if f.cancel()}
    print(f"{len(cancelled)} of {n} cancelled")
    for i, f in enumerate(futs):
        if i in cancelled:
            assert f.cancelled() and f.done() and not f.running()
            with pytest.raises(cf.CancelledError):
                f.result(30)
            with pytest.raises(cf.CancelledError):
                f.fetch()
        else:
            assert f.result(30) == i
    ran = set(pydist.remotecall_fetch(H.ran, w[0]))
    assert ran == set(range(n)) - cancelled


@pytest.mark.timeout(60)
def test_cancel_of_an_empty_future_on_its_owner(w):
    local = Future()
    assert local.cancel() and local.cancelled() and local.done()
    with pytest.raises(pydist.InvalidStateError):
        local.put(1)
    with pytest.raises(cf.CancelledError):
        local.result()
    remote_owned = Future(w[0])
    assert remote_owned.cancel() is True
    with pytest.raises(cf.CancelledError):
        remote_owned.fetch()
    # Another holder sees it cancelled on the owner.
    with pytest.raises(cf.CancelledError):
        pydist.remotecall_fetch(_fetch_it, w[1], _fresh_cancelled(w[0]))
    put_first = Future(w[0])
    put_first.put("v")
    assert put_first.cancel() is False and put_first.result() == "v"


def _fetch_it(f):
    return f.fetch()


def _fresh_cancelled(owner):
    f = Future(owner)
    assert f.cancel()
    return f


@pytest.mark.timeout(60)
def test_cancelled_future_in_wait_and_as_completed(w):
    empty = Future()
    running = remotecall(H.sleep_then, w[0], 0.3, "r")
    threading.Timer(0.1, empty.cancel).start()
    done, _ = cf.wait([empty], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {empty} and empty.cancelled()
    assert set(cf.as_completed([empty, running], timeout=30)) == {empty, running}
    with pytest.raises(cf.CancelledError):
        empty.exception()


def test_set_result_and_set_exception_on_an_empty_future(w):
    f = Future(w[0])
    assert f.set_running_or_notify_cancel() is True
    f.set_result(5)
    assert f.result() == 5 and pydist.fetch(f) == 5
    with pytest.raises(cf.InvalidStateError):
        f.set_result(6)
    with pytest.raises(RuntimeError):
        f.set_running_or_notify_cancel()
    g = Future()
    g.set_exception(KeyError("k"))
    assert isinstance(g.exception(), KeyError)
    with pytest.raises(KeyError):
        g.fetch()
    h = Future()
    h.cancel()
    assert h.set_running_or_notify_cancel() is False


def test_julia_operations_unchanged(w):
    fut = remotecall(H.square, w[0], 6)
    assert pydist.fetch(fut) == 36 and fut.isready() and pydist.wait(fut) is fut
    f = Future(w[1])
    assert not f.isready()
    pydist.put(f, "x")
    assert f.fetch() == "x" and f.isready()
    with pytest.raises(pydist.InvalidStateError):
        f.put("y")
