"""Futures, RemoteChannels and distributed reference counting, with real worker processes.

Whether a value is still kept by its owner is checked ON THE OWNER, by membership of its RRID
in `pydist.refs.STORE.values` (see refhelpers.has_ref); count messages travel asynchronously,
so "freed" is polled for with a deadline and "still kept" is checked over a short window.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import sys
import threading
import time
import uuid

import pytest

import pydist
import refhelpers as rh
from pydist import (
    RRID,
    Channel,
    Future,
    InvalidStateError,
    ProcessExitedException,
    RemoteChannel,
    RemoteException,
)

from conftest import wait_until, worker_ospid

BIG = 1_000_000  # a result this large is not pushed to the caller: the owner keeps it
FREED_WITHIN = 5.0  # values are normally freed within milliseconds
BLOCKED = 0.25


# ==================================================================== helpers
def on(pid, fn, *args):
    return pydist.remotecall_fetch(fn, pid, *args)


def fetch_in_time(fut, timeout=30):
    return fut.fetch(timeout=timeout)


def has_ref(pid, rrid) -> bool:
    return on(pid, rh.has_ref, tuple(rrid))


def counts(pid, rrid):
    return on(pid, rh.client_counts, tuple(rrid))


def wait_freed(pid, rrid, timeout=FREED_WITHIN):
    gc.collect()
    wait_until(lambda: not has_ref(pid, rrid), timeout=timeout,
               what=f"{tuple(rrid)} to be freed on {pid} (client counts {counts(pid, rrid)})")


def assert_kept(pid, rrid, window=0.3):
    """The owner keeps the value during the whole window (and at least 3 checks)."""
    gc.collect()
    deadline = time.monotonic() + window
    n = 0
    while n < 3 or time.monotonic() < deadline:
        assert has_ref(pid, rrid), f"{tuple(rrid)} was freed on {pid} too early"
        n += 1


def kill9(pid):
    os.kill(worker_ospid(pid), signal.SIGKILL)


def fresh_one_by_one(fresh_workers, n):
    """n fresh workers, each from its own addprocs call (so earlier ones never hear of later
    ones unless those connect to them)."""
    return [fresh_workers(1)[0] for _ in range(n)]


def big_result():
    return bytes(BIG)


class Runner:
    """Run `fn()` in a daemon thread; `done` is set when it returned or raised."""

    def __init__(self, fn, *args, **kwargs):
        self.done = threading.Event()
        self.result = None
        self.exc = None

        def run():
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001
                self.exc = e
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def value(self, timeout=20.0):
        assert self.done.wait(timeout), "still blocked"
        if self.exc is not None:
            raise self.exc
        return self.result

    def error(self, timeout=20.0):
        assert self.done.wait(timeout), "still blocked"
        assert self.exc is not None, f"expected an exception, got {self.result!r}"
        return self.exc


@pytest.fixture
def w(two_workers):
    """The two shared workers [w2, w3] (never killed here; see fresh_workers for that)."""
    return two_workers


# ==================================================================== 1. Future
def test_future_attributes(w):
    w2, w3 = w
    f = Future()
    assert (f.where, f.whence) == (pydist.myid(), pydist.myid()) == (1, 1)
    g = Future(w2)
    assert (g.where, g.whence) == (w2, 1)
    assert isinstance(f.id, int) and isinstance(g.id, int)
    assert f.id != g.id
    r = pydist.remotecall(lambda: 1, w3)
    assert (r.where, r.whence) == (w3, 1)
    assert len({f.id, g.id, r.id}) == 3
    r.wait()
    # Made on a worker: whence is that worker.
    h_where, h_whence = on(w3, lambda p: (lambda x: (x.where, x.whence))(pydist.Future(p)), w2)
    assert (h_where, h_whence) == (w2, w3)


def test_a_held_future_costs_the_garbage_collector_no_key(w):
    """The process's weak reference to a Future is keyed by a plain (whence, id) tuple,
    which the collector stops tracking, not by an RRID it would traverse in every full
    collection for as long as the Future lives; lookups by RRID still find it."""
    from pydist import refs

    futs = [pydist.remotecall(abs, w[i % 2], -i) for i in range(50)]
    assert [f.fetch() for f in futs] == list(range(50))
    gc.collect()
    for f in futs:
        held = refs._client_refs[f.rrid]
        assert held() is f and refs._local(f.rrid) is f
        assert type(held.rrid) is tuple and held.rrid == f.rrid
        assert not gc.is_tracked(held.rrid)


def test_future_has_no_remote_state_until_used(w):
    w2, _ = w
    gc.collect()
    # The store's size on w2 must not change when we make Future(w2). Other values may be
    # freed there meanwhile (count messages of earlier tests), so try a few times: a Future
    # that made remote state would grow the store every time.
    for _ in range(20):
        before = on(w2, lambda: len(pydist.refs.STORE))
        f = Future(w2)
        after = on(w2, lambda: len(pydist.refs.STORE))
        assert not has_ref(w2, f.rrid)
        if after == before:
            break
    else:
        pytest.fail(f"the store on {w2} changed each time a Future({w2}) was made")
    assert not f.isready()  # asking is not creating
    assert not has_ref(w2, f.rrid)
    with pytest.raises(TimeoutError):
        f.fetch(timeout=0.2)  # a fetch makes the owner's slot...
    assert has_ref(w2, f.rrid)
    assert counts(w2, f.rrid) == {1: 1}
    rrid = f.rrid
    del f  # ...which is freed when the only holder drops it
    wait_freed(w2, rrid)


@pytest.mark.parametrize("owner", ["master", "worker"])
def test_future_put_then_fetch_and_second_put(w, owner):
    pid = 1 if owner == "master" else w[0]
    n = Future(pid)
    n.put(None)  # None is a value like any other (julia#43396)
    assert n.isready() and n.fetch() is None
    with pytest.raises(InvalidStateError):
        n.put(None)
    assert pydist.remotecall(lambda: None, pid).fetch() is None
    f = Future(pid)
    assert f.put([1, 2]) is f
    assert f.isready()
    assert f.fetch() == [1, 2]
    with pytest.raises(InvalidStateError):
        f.put(3)
    assert f.fetch() == [1, 2]
    assert f.wait() is f


@pytest.mark.parametrize("owner", ["master", "worker2", "worker3"])
def test_second_put_from_another_process_is_invalid_state(w, owner):
    """The first put comes from worker 3; the master's own put must then fail on the owner."""
    w2, w3 = w
    pid = {"master": 1, "worker2": w2, "worker3": w3}[owner]
    f = Future(pid)
    pydist.remotecall_wait(lambda x: x.put("first") and None, w3, f)
    assert f.isready()
    try:
        f.put("second")
    except InvalidStateError:
        pass
    else:
        pytest.fail("a second put did not raise")
    assert f.fetch() == "first"


def test_put_on_worker_then_fetch_on_master(w):
    w2, w3 = w
    for pid in (1, w2, w3):
        f = Future(pid)
        pydist.remotecall_wait(lambda x: x.put({"from": pydist.myid()}) and None, w3, f)
        assert f.fetch() == {"from": w3}
    # A put made while the master is already waiting in fetch.
    f = Future(w2)
    fetcher = Runner(f.fetch)
    assert not fetcher.done.wait(BLOCKED)
    pydist.remote_do(lambda x: x.put(99), w3, f)
    assert fetcher.value() == 99


def test_fetch_timeout_on_never_set_future(w):
    for pid in (1, w[0]):
        f = Future(pid)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            f.fetch(timeout=0.2)
        with pytest.raises(TimeoutError):
            f.wait(timeout=0.2)
        assert 0.3 <= time.monotonic() - t0 < 10
        assert not f.isready()
        f.put(1)  # still usable after timing out
        assert f.fetch(timeout=0.2) == 1


def test_pending_remotecall_fetch_timeout(w):
    gate = RemoteChannel()
    f = pydist.remotecall(lambda g: g.take(), w[0], gate)
    with pytest.raises(TimeoutError):
        f.fetch(timeout=0.2)
    gate.put("go")
    assert f.fetch(timeout=20) == "go"


def test_fetch_caches_value_even_after_owner_dies(fresh_workers):
    (p,) = fresh_workers(1)
    small = pydist.remotecall(lambda: "small", p)
    large = pydist.remotecall(big_result, p)
    fut = Future(p)
    fut.put((1, 2))
    assert small.fetch() == "small"
    assert len(large.fetch()) == BIG
    kill9(p)
    wait_until(lambda: p not in pydist.procs(), timeout=20, what="worker removal")
    # No network: the owner is gone, the values come from the cache.
    assert small.fetch() == "small"
    assert len(large.fetch()) == BIG
    assert fut.fetch() == (1, 2)
    assert small.isready() and large.isready()
    assert large.wait() is large


def test_wait_and_isready(w):
    w2, w3 = w
    gate = RemoteChannel()
    f = pydist.remotecall(lambda g: g.take(), w2, gate)
    assert not f.isready()
    waiter = Runner(f.wait)
    assert not waiter.done.wait(BLOCKED)
    assert not f.isready()
    gate.put(5)
    assert waiter.value() is f
    assert f.isready()
    assert f.fetch() == 5
    # A Future(pid) becomes ready when anybody puts it.
    g = Future(w2)
    assert not g.isready()
    pydist.remotecall_wait(lambda x: x.put(0) and None, w3, g)
    assert g.isready()
    assert g.wait() is g


def test_remotecall_wait_returns_finished_future(w):
    f = pydist.remotecall_wait(lambda: 3 * 7, w[0])
    assert isinstance(f, Future)
    assert f.isready()
    assert f.fetch() == 21
    g = pydist.remotecall_wait(big_result, w[1])
    assert g.isready()
    assert len(g.fetch()) == BIG
    with pytest.raises(RemoteException):
        pydist.remotecall_wait(lambda: 1 / 0, w[0])


@pytest.mark.parametrize("where", ["worker", "myid"])
def test_fetch_of_failed_call_raises_remote_exception(w, where):
    pid = w[0] if where == "worker" else pydist.myid()
    f = pydist.remotecall(lambda: 1 / 0, pid)
    for _ in range(2):  # and again: the failure is kept, not forgotten
        with pytest.raises(RemoteException) as ei:
            f.fetch()
        e = ei.value
        assert e.pid == pid
        assert isinstance(e, ZeroDivisionError)
        assert isinstance(e.captured.ex, ZeroDivisionError)
        assert str(e).startswith(f"On worker {pid}:\n")
    with pytest.raises(ZeroDivisionError):
        f.wait()
    assert f.isready()


def test_future_passed_to_worker_can_be_fetched_there(w):
    w2, w3 = w
    assert pydist.remotecall_fetch(lambda f: f.fetch(), w3, pydist.remotecall(lambda: 7, w2)) == 7
    # Unfinished when sent: the worker waits for it.
    gate = RemoteChannel()
    f = pydist.remotecall(lambda g: g.take(), w2, gate)
    r = pydist.remotecall(lambda x: x.fetch() * 2, w3, f)
    gate.put(21)
    assert r.fetch() == 42
    # Large (kept on its owner): fetched from the owner by the third process.
    big = pydist.remotecall(big_result, w2)
    assert pydist.remotecall_fetch(lambda x: len(x.fetch()), w3, big) == BIG
    assert len(big.fetch()) == BIG


def test_await_returns_value(w):
    w2, w3 = w

    async def main():
        small = await pydist.remotecall(lambda: "v", w2)
        large = await pydist.remotecall(big_result, w3)
        local = Future()
        waiting = asyncio.ensure_future(_await(local))
        await asyncio.sleep(0)  # the task is now blocked in `await local`
        assert not waiting.done()
        local.put("later")
        later = await asyncio.wait_for(waiting, 20)
        with pytest.raises(RemoteException):
            await pydist.remotecall(lambda: [][1], w2)
        return small, len(large), later

    assert asyncio.run(main()) == ("v", BIG, "later")


def test_asyncio_gather_over_many_futures(w):
    w2, w3 = w

    async def main():
        futs = [pydist.remotecall(lambda i=i: i * i, (w2, w3)[i % 2]) for i in range(50)]
        return await asyncio.wait_for(asyncio.gather(*futs), 60)

    assert asyncio.run(main()) == [i * i for i in range(50)]


def _callback_recorder():
    calls = []
    ev = threading.Event()

    def cb(fut):
        calls.append(fut)
        ev.set()

    return calls, ev, cb


@pytest.mark.parametrize("kind", ["remotecall", "remotecall-big", "future-on-worker", "local"])
def test_add_done_callback_called_exactly_once(w, kind):
    w2, w3 = w
    gate = RemoteChannel()
    if kind == "remotecall":
        f = pydist.remotecall(lambda g: g.take(), w2, gate)
        finish = lambda: gate.put("x")  # noqa: E731
    elif kind == "remotecall-big":
        f = pydist.remotecall(lambda g: g.take() and bytes(BIG), w2, gate)
        finish = lambda: gate.put("x")  # noqa: E731
    elif kind == "future-on-worker":
        f = Future(w2)
        finish = lambda: pydist.remotecall_wait(lambda x: x.put("x") and None, w3, f)  # noqa: E731
    else:
        f = Future()
        finish = lambda: threading.Thread(target=f.put, args=("x",)).start()  # noqa: E731
    calls, ev, cb = _callback_recorder()
    f.add_done_callback(cb)
    assert not ev.wait(BLOCKED)
    finish()
    assert ev.wait(20), "callback not called"
    f.fetch()
    on(w2, rh.collect)  # a round trip: a duplicate notification would have landed by now
    f.fetch()
    assert len(calls) == 1 and calls[0] is f
    # Added after completion: called (at once), once.
    calls2, ev2, cb2 = _callback_recorder()
    f.add_done_callback(cb2)
    assert ev2.wait(20)
    assert len(calls2) == 1 and calls2[0] is f
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["local", "remotecall"])
def test_failing_done_callback_does_not_stop_the_others(w, kind):
    gate = RemoteChannel()
    f = Future() if kind == "local" else pydist.remotecall(lambda g: g.take(), w[0], gate)
    calls, ev, cb = _callback_recorder()

    def bad(_):
        raise RuntimeError("boom in a callback")

    f.add_done_callback(bad)
    f.add_done_callback(cb)
    if kind == "local":
        f.put(1)  # the callback's error does not surface here
    else:
        gate.put(1)
    assert ev.wait(20) and calls == [f]
    assert f.fetch() == 1


def test_module_level_functions(w):
    w2, _ = w
    f = pydist.remotecall(lambda: 11, w2)
    assert pydist.wait(f) is f
    assert pydist.isready(f)
    assert pydist.fetch(f) == 11
    g = Future(w2)
    pydist.put(g, "p")
    assert pydist.fetch(g) == "p"
    with pytest.raises(InvalidStateError):
        pydist.put(g, "again")
    rc = RemoteChannel(lambda: Channel(4), w2)
    assert not pydist.isready(rc)
    pydist.put(rc, 1)
    pydist.put(rc, 2)
    pydist.wait(rc)
    assert pydist.isready(rc)
    assert pydist.fetch(rc) == 1
    assert pydist.take(rc) == 1
    assert pydist.take(rc) == 2
    with pytest.raises(TimeoutError):
        pydist.take(rc, timeout=0.2)
    assert pydist.fetch(5) == 5
    assert pydist.fetch("abc") == "abc"
    assert pydist.fetch(None) is None
    obj = object()
    assert pydist.fetch(obj) is obj


def test_remoteref_id_is_rrid_named_tuple(w):
    f = Future(w[0])
    rid = pydist.remoteref_id(f)
    assert isinstance(rid, RRID) and isinstance(rid, tuple)
    assert rid == (f.whence, f.id)
    assert (rid.whence, rid.id) == (f.whence, f.id)
    assert RRID._fields == ("whence", "id")
    rc = RemoteChannel(w[1])
    rrc = pydist.remoteref_id(rc)
    assert isinstance(rrc, RRID) and rrc == (rc.whence, rc.id)
    assert rrc != rid


def test_channel_from_id(w):
    w2, w3 = w
    msg = "Local instance of remote reference not found"
    rc = RemoteChannel(lambda: Channel(10), w2)
    rc.put("a")
    rc.put("b")
    rrid = pydist.remoteref_id(rc)
    # On the owner: the backing channel itself.
    assert on(w2, lambda r: (type(pydist.channel_from_id(r)).__name__,
                             len(pydist.channel_from_id(r)),
                             pydist.channel_from_id(r).fetch()), rrid) == ("Channel", 2, "a")
    # Elsewhere: KeyError.
    with pytest.raises(KeyError) as ei:
        pydist.channel_from_id(rrid)
    assert ei.value.args[0] == msg
    with pytest.raises(KeyError) as ei:
        on(w3, pydist.channel_from_id, rrid)
    assert msg in str(ei.value)
    # A master-owned RemoteChannel: the very channel its operations use.
    local = RemoteChannel(lambda: Channel(3))
    local.put(1)
    ch = pydist.channel_from_id(pydist.remoteref_id(local))
    assert isinstance(ch, Channel) and len(ch) == 1
    ch.put(2)
    assert [local.take(), local.take()] == [1, 2]
    # A Future's backing object exists on its owner once used, not elsewhere.
    f = Future(w2)
    f.put(1)
    g = Future(w2)
    with pytest.raises(TimeoutError):
        g.fetch(timeout=0.05)
    assert on(w2, lambda r: pydist.channel_from_id(r) is not None, g.rrid)
    with pytest.raises(KeyError):
        pydist.channel_from_id(g.rrid)


# ==================================================================== 2. RemoteChannel
def test_remote_channel_constructors(w):
    w2, _ = w
    a = RemoteChannel(lambda: Channel(10), w2)
    assert (a.where, a.whence) == (w2, 1)
    assert has_ref(w2, a.rrid)  # made at once on its owner
    for i in range(10):
        a.put(i, timeout=5)
    with pytest.raises(TimeoutError):
        a.put(10, timeout=0.2)  # Channel(10) is full

    b = RemoteChannel(w2)  # an int first means the pid; a Channel(1) made on first use
    assert (b.where, b.whence) == (w2, 1)
    assert not has_ref(w2, b.rrid)
    b.put("one")
    assert has_ref(w2, b.rrid)
    with pytest.raises(TimeoutError):
        b.put("two", timeout=0.2)  # capacity 1
    assert b.take() == "one"

    c = RemoteChannel(pid=w2)
    assert c.where == w2

    d = RemoteChannel()  # local
    assert (d.where, d.whence) == (1, 1)
    d.put("x")
    with pytest.raises(TimeoutError):
        d.put("y", timeout=0.2)
    assert d.take() == "x"


@pytest.mark.parametrize("owner", ["master", "worker"])
def test_remote_channel_operations(w, owner):
    pid = 1 if owner == "master" else w[0]
    rc = RemoteChannel(lambda: Channel(5), pid)
    assert rc.isopen()
    assert rc.isempty() and not rc.isready()
    assert rc.put("a") is rc
    rc.put("b")
    assert not rc.isempty()
    assert not rc.isempty()  # asking does not consume
    assert rc.isready()
    assert rc.fetch() == "a"
    assert rc.fetch() == "a"  # peek
    rc.wait()
    assert rc.take() == "a"
    assert rc.fetch() == "b"
    assert rc.take() == "b"
    assert rc.isempty()
    # wait blocks until a value arrives and does not take it
    waiter = Runner(rc.wait)
    assert not waiter.done.wait(BLOCKED)
    rc.put("c")
    waiter.value()
    assert rc.take() == "c"
    # take blocks until a put
    taker = Runner(rc.take)
    assert not taker.done.wait(BLOCKED)
    rc.put("d")
    assert taker.value() == "d"
    rc.close()
    assert not rc.isopen()


def counts_reach(owner: int, expected: dict) -> None:
    """Wait until the owner's quick-form counts are `expected`: the spy counts a put once the
    quick form has returned, and by then its reply (or the take it woke) may have reached us
    (here: a put from another worker, read by another thread of the owner than our query)."""
    try:
        wait_until(lambda: on(owner, rh.quick_counts) == expected, timeout=30,
                   what=f"the owner's counts to reach {expected}")
    except AssertionError:
        assert on(owner, rh.quick_counts) == expected  # (shows what they are)


def test_remote_channel_puts_that_need_no_wait_are_done_where_they_arrive(w):
    """A put into a channel with room is done by the owner's reading thread (no task); one
    that must wait (a full channel, an unbuffered one) runs as a task, and so does every
    take. Either way the values keep their order and nothing is lost, from the master and
    from another worker."""
    owner, other = w
    rc = RemoteChannel(lambda: Channel(2), owner)
    on(owner, rh.spy_quick_forms, True)
    try:
        rc.put(1)
        rc.put(2)
        assert on(owner, rh.quick_counts) == {"quick": 2, "task": 0}
        putter = Runner(rc.put, 3)  # full: waits, as a task
        assert not putter.done.wait(BLOCKED)
        assert rc.take() == 1
        putter.value()
        assert [rc.take(), rc.take()] == [2, 3]
        taker = Runner(rc.take)
        assert not taker.done.wait(BLOCKED)
        rc.put(4)  # wakes the waiting taker
        assert taker.value() == 4
        on(other, rh.put_into, rc, 5)
        assert rc.take() == 5
        counts_reach(owner, {"quick": 4, "task": 6})
        unbuffered = RemoteChannel(lambda: Channel(0), owner)
        putter = Runner(unbuffered.put, 6)  # an unbuffered put waits for its taker
        assert not putter.done.wait(BLOCKED)
        assert unbuffered.take() == 6
        putter.value()
        counts_reach(owner, {"quick": 4, "task": 8})
    finally:
        on(owner, rh.spy_quick_forms, False)


def _ping_pong(a, b, rounds, size):
    to_a, to_b = RemoteChannel(lambda: Channel(1), a), RemoteChannel(lambda: Channel(1), b)
    fa = pydist.remotecall(rh.ping_pong_player, a, to_a, to_b, rounds, size, True)
    fb = pydist.remotecall(rh.ping_pong_player, b, to_b, to_a, rounds, size, False)
    return fa.fetch(timeout=240), fb.fetch(timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [10, 1_500_000])
def test_a_take_on_its_own_channel_reads_the_partners_puts_itself(fresh_workers, size):
    """Two workers bounce values through channels they own (W7's ping-pong): a take that
    waits reads the connection of the partner it last heard from, so the partner's put is
    done by the taking thread itself (no other thread woken). Values larger than the socket
    buffers (and shared-memory ones) arrive intact. Once a thread serves calls on that
    connection (a call between the two), that thread reads it: the puts are done there and
    the taker woken, as before, and nothing else changes."""
    a, b = fresh_workers(2)  # (a new link between them: no thread serves calls on it yet)
    rounds = 200 if size < 1000 else 30
    for p in (a, b):
        on(p, rh.spy_quick_forms, True)
    for ok, player, quick in _ping_pong(a, b, rounds, size):
        assert ok, "a value arrived changed"
        assert sum(quick.values()) == rounds, quick
        assert quick.get(player, 0) >= rounds // 2, (player, quick)
    on(a, pydist.remotecall_fetch, pydist.myid, b)  # b's thread now serves a's link
    for p in (a, b):
        on(p, rh.spy_quick_forms, True)
    for ok, _, quick in _ping_pong(a, b, rounds, size):
        assert ok, "a value arrived changed"
        assert sum(quick.values()) == rounds, quick


@pytest.mark.timeout(300)
def test_the_poller_does_not_spin_on_a_connection_a_thread_is_taking(fresh_workers):
    """W7's ping-pong: each put's reply is read by the putting thread, which then takes the
    role again to read its partner's put. The poller, woken in between, fails to take the
    role at most about once; it used to find the socket still armed in the instant between
    the role's lock and the end of its interest, re-arm it and be woken again, 4-5 times a
    round trip, competing for the GIL with the thread it waited for."""
    a, b = fresh_workers(2)
    for p in (a, b):
        on(p, rh.count_poller_misses)
    rounds = 2000
    for ok, _, _ in _ping_pong(a, b, rounds, 10):
        assert ok
    misses = [on(p, rh.poller_misses) for p in (a, b)]
    assert max(misses) < rounds, misses


@pytest.mark.timeout(120)
def test_a_take_that_reads_a_connection_still_wakes_for_others(fresh_workers):
    """A take reading its last partner's connection returns for a value put through another
    connection, by another thread of its process, and for a close."""
    a, b = fresh_workers(2)
    on(a, rh.count_reads_while_taking)
    rc = RemoteChannel(lambda: Channel(4), a)
    fut = pydist.remotecall(rh.heard_from_then_take, a, b, rc)
    wait_until(lambda: on(a, rh.reads_begun) == 1, what="the take to read")
    assert not fut.isready()
    rc.put("from the master")
    assert fut.fetch(timeout=30) == "from the master"
    assert fetch_in_time(pydist.remotecall(rh.heard_from_then_take_local_put, a, b, rc)) == "local"
    fut = pydist.remotecall(rh.heard_from_then_take, a, b, rc)
    wait_until(lambda: on(a, rh.reads_begun) == 3, what="the take to read")
    assert not fut.isready()
    rc.close()
    with pytest.raises(RemoteException) as info:
        fut.fetch(timeout=30)
    assert isinstance(info.value.captured.ex, InvalidStateError), info.value
    assert on(a, rh.reads_while_taking) == 3  # each take waited reading b's connection
    with pytest.raises(RemoteException) as info:  # closed and empty: no wait at all
        fetch_in_time(pydist.remotecall(rh.heard_from_then_take, a, b, rc))
    assert isinstance(info.value.captured.ex, InvalidStateError), info.value
    assert on(a, rh.reads_while_taking) == 3


@pytest.mark.parametrize("owner", ["master", "worker"])
def test_remote_channel_closed(w, owner):
    pid = 1 if owner == "master" else w[0]
    rc = RemoteChannel(lambda: Channel(5), pid)
    rc.put(1)
    rc.put(2)
    rc.close()
    try:
        rc.put(3)
    except InvalidStateError:
        pass
    else:
        pytest.fail("put on a closed RemoteChannel did not raise")
    assert rc.fetch() == 1
    assert rc.take() == 1  # drains what is left
    assert list(rc) == [2]
    try:
        rc.take()
    except InvalidStateError:
        pass
    else:
        pytest.fail("take on a closed empty RemoteChannel did not raise")
    assert list(rc) == []


@pytest.mark.parametrize("owner", ["master", "worker"])
def test_remote_channel_timeouts(w, owner):
    pid = 1 if owner == "master" else w[0]
    rc = RemoteChannel(lambda: Channel(1), pid)
    for op in (rc.take, rc.fetch, rc.wait):
        t0 = time.monotonic()
        try:
            op(timeout=0.2)
        except TimeoutError:
            pass
        else:
            pytest.fail(f"{op.__name__} did not time out")
        assert 0.15 <= time.monotonic() - t0 < 10
    rc.put(1)
    try:
        rc.put(2, timeout=0.2)
    except TimeoutError:
        pass
    else:
        pytest.fail("put on a full channel did not time out")
    assert rc.take(timeout=1) == 1
    assert rc.isempty()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("owner", ["master", "worker"])
def test_remote_channel_over_a_channel_type_without_timeouts(w, owner):
    """A user channel type with plain put(v) / take() / fetch() / wait() backs a
    RemoteChannel (Julia lets any AbstractChannel); a caller's timeout then bounds the
    caller's own wait, and the item a given-up take gets later goes back to the channel."""
    import channelhelpers

    pid = 1 if owner == "master" else w[0]
    rc = RemoteChannel(channelhelpers.BareChannel, pid)
    assert rc.put("a") is rc
    assert pydist.put(rc, "b") is rc
    assert rc.fetch() == "a"
    rc.wait()
    assert rc.take() == "a" and pydist.take(rc) == "b"
    assert len(rc) == 0
    taker = Runner(rc.take)
    assert not taker.done.wait(BLOCKED)
    rc.put("c")
    assert taker.value() == "c"
    if owner == "master":
        # Nothing here can bound a wait the channel type cannot bound: say so.
        with pytest.raises(TypeError, match="BareChannel.take has no timeout parameter"):
            rc.take(timeout=0.2)
        return
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        rc.take(timeout=0.3)
    assert time.monotonic() - t0 < 10
    rc.put("d")  # the owner's take, given up on, gets it and gives it back
    assert rc.take(timeout=30) == "d"
    with pytest.raises(TimeoutError):
        rc.fetch(timeout=0.2)
    rc.put("e")
    assert rc.fetch(timeout=30) == "e" and rc.take(timeout=30) == "e"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("owner", ["master", "worker"])
def test_remote_channel_forwards_extra_arguments(w, owner):
    """Julia's put!(rr, args...) / take!(rr, args...): arguments after the timeout, and
    keyword arguments, go to the channel type's own methods (here a tag)."""
    import channelhelpers

    pid = 1 if owner == "master" else w[0]
    rc = RemoteChannel(channelhelpers.TaggedChannel, pid)
    rc.put("r1", None, "red")
    rc.put("b1", tag="blue")
    pydist.put(rc, "r2", None, "red")
    pydist.put(rc, "p1")  # the type's default tag
    assert rc.fetch(tag="red") == "r1"
    assert rc.take(None, "blue") == "b1"
    assert rc.take(tag="red") == "r1"
    assert pydist.take(rc, 5, "red") == "r2"
    assert pydist.fetch(rc, None, "plain") == "p1"
    assert rc.take(timeout=5, tag="plain") == "p1"
    with pytest.raises(TimeoutError):
        rc.take(0.2, "blue")  # its own timeout, and the caller's
    # A Channel has no such arguments.
    plain = RemoteChannel(lambda: Channel(2), pid)
    with pytest.raises((TypeError, RemoteException)):
        plain.put(1, None, "red")
    assert plain.isempty()


@pytest.mark.parametrize("owner", ["master", "worker2", "worker3"])
def test_remote_channel_iteration_until_closed(w, owner):
    w2, w3 = w
    pid = {"master": 1, "worker2": w2, "worker3": w3}[owner]
    rc = RemoteChannel(lambda: Channel(3), pid)

    def produce(c, n):
        for i in range(n):
            c.put(i)
        c.close()

    prod = pydist.remotecall(produce, w2, rc, 20)
    assert list(rc) == list(range(20))
    prod.fetch()
    assert not rc.isopen()


@pytest.mark.parametrize("owner", ["master", "worker2", "worker3"])
def test_pipeline_between_two_workers(w, owner):
    w2, w3 = w
    pid = {"master": 1, "worker2": w2, "worker3": w3}[owner]
    rc = RemoteChannel(lambda: Channel(10), pid)

    def produce(c):
        for i in range(100):
            c.put(i)
        return pydist.myid()

    def consume(c):
        return sum(c.take() for _ in range(100)), pydist.myid()

    consumer = pydist.remotecall(consume, w3, rc)
    producer = pydist.remotecall(produce, w2, rc)
    assert producer.fetch() == w2
    assert consumer.fetch() == (sum(range(100)), w3)
    assert rc.isempty()


def test_master_owned_channel_used_by_workers(w):
    w2, w3 = w
    jobs = RemoteChannel(lambda: Channel(math.inf))
    results = RemoteChannel(lambda: Channel(math.inf))
    for i in range(30):
        jobs.put(i)
    jobs.close()

    def work(j, r):
        n = 0
        for x in j:
            r.put((pydist.myid(), x * 10))
            n += 1
        return n

    f2 = pydist.remotecall(work, w2, jobs, results)
    f3 = pydist.remotecall(work, w3, jobs, results)
    assert f2.fetch() + f3.fetch() == 30
    got = [results.take(timeout=10) for _ in range(30)]
    assert sorted(x for _, x in got) == [i * 10 for i in range(30)]
    assert {p for p, _ in got} <= {w2, w3}
    assert results.isempty()


def test_workers_from_one_addprocs_can_share_refs(fresh_workers):
    """Workers started by one addprocs call pass a RemoteChannel around a ring at once."""
    for _ in range(4):
        pids = fresh_workers(3)
        rc = RemoteChannel(lambda: Channel(10), pids[0])
        for p in pids:
            pydist.remotecall_fetch(lambda c: (c.put(pydist.myid()), None)[1], p, rc)
        # each worker takes one item from a channel owned by another worker
        got = sorted(pydist.remotecall_fetch(lambda c: c.take(timeout=10), p, rc) for p in pids)
        assert got == sorted(pids)
        rc2 = RemoteChannel(lambda: Channel(10), pids[1])
        assert pydist.remotecall_fetch(lambda c: (c.put(1), c.take())[1], pids[2], rc2) == 1
        assert pydist.remotecall_fetch(lambda c: (c.put(2), c.take())[1], pids[0], rc2) == 2
        rc3 = RemoteChannel(lambda: Channel(10), pids[2])
        assert pydist.remotecall_fetch(lambda c: (c.put(3), c.take())[1], pids[0], rc3) == 3
        assert pydist.remotecall_fetch(lambda c: (c.put(4), c.take())[1], pids[1], rc3) == 4
        pydist.rmprocs(pids, waitfor=30)


# ==================================================================== 3. reference counting
@pytest.mark.parametrize("size", ["small", "big"])
def test_remotecall_result_freed_after_fetch(w, size):
    w2, _ = w
    fn = (lambda: "s") if size == "small" else big_result
    f = pydist.remotecall(fn, w2)
    f.wait()
    if size == "big":
        assert_kept(w2, f.rrid)  # not pushed: the owner keeps it for our fetch
    f.fetch()
    wait_freed(w2, f.rrid)
    assert f.fetch() in ("s", bytes(BIG))  # still cached here


@pytest.mark.parametrize("size", ["small", "big"])
def test_unfetched_result_freed_when_dropped(w, size):
    w2, _ = w
    fn = (lambda: "s") if size == "small" else big_result
    f = pydist.remotecall(fn, w2)
    f.wait()
    rrid = f.rrid
    if size == "big":
        assert_kept(w2, rrid)
    del f
    wait_freed(w2, rrid)


def test_unused_future_to_worker_dropped_leaves_nothing(w):
    w2, _ = w
    fs = [Future(w2) for _ in range(20)]
    rrids = [f.rrid for f in fs]
    del fs
    gc.collect()
    for r in rrids:
        wait_freed(w2, r)
    assert on(w2, rh.bad_counts) == []


@pytest.mark.parametrize("how,observer", [("fetch", "master"), ("drop", "master"), ("drop", "peer")])
def test_value_object_released_on_owner(w, how, observer):
    """The worker's own object (seen through a WeakSet there) dies after fetch / drop.

    observer="peer": worker 3 looks at worker 2 for us, so that after the drop nothing more
    reaches worker 2 over the master's connection: a worker left idle must not keep the value.
    """
    w2, w3 = w
    tag = f"t-{uuid.uuid4().hex[:8]}"
    if observer == "master":
        look = lambda: on(w2, rh.live_tags)  # noqa: E731
        kept = lambda r: has_ref(w2, r)  # noqa: E731
    else:
        look = lambda: on(w3, rh.live_tags_on, w2)  # noqa: E731
        kept = lambda r: on(w3, lambda r, p: pydist.remotecall_fetch(rh.has_ref, p, r), tuple(r), w2)  # noqa: E731
        on(w3, rh.ping, w2)
    f = pydist.remotecall(rh.make_tracked, w2, tag, 200_000)
    f.wait()
    assert tag in look()
    rrid = f.rrid
    assert kept(rrid)
    if how == "fetch":
        v = f.fetch()
        assert isinstance(v, rh.Tracked) and v.tag == tag and len(v.payload) == 200_000
    else:
        del f
        gc.collect()
    wait_until(lambda: not kept(rrid), timeout=FREED_WITHIN, what="the STORE entry to go")
    wait_until(lambda: tag not in look(), timeout=FREED_WITHIN,
               what=f"worker {w2} to let go of the value object")


@pytest.mark.parametrize("kind", ["future", "channel"])
def test_third_party_reference_keeps_value_alive(w, kind):
    """Master makes f on 2, worker 3 keeps a copy (in a global), master drops its own: 2 keeps
    the value until 3 drops it too."""
    w2, w3 = w
    on(w3, rh.ping, w2)  # 3 is connected to the owner
    key = uuid.uuid4().hex
    if kind == "future":
        ref = pydist.remotecall(big_result, w2)
        ref.wait()
    else:
        ref = RemoteChannel(lambda: Channel(2), w2)
        ref.put("kept")
    rrid = ref.rrid
    box = RemoteChannel(lambda: Channel(1))  # on the master: 3 takes the reference out of it
    box.put(ref)
    pydist.remotecall_wait(rh.take_into, w3, box, key)
    del ref
    gc.collect()
    wait_until(lambda: counts(w2, rrid) == {w3: 1}, timeout=FREED_WITHIN,
               what=f"only worker 3 to hold the value (counts {counts(w2, rrid)})")
    assert_kept(w2, rrid)
    if kind == "future":
        assert on(w3, rh.len_of_held_fetch, key, 10) == BIG  # and 3 can still use it
    else:
        assert on(w3, lambda k: rh.held(k).fetch(timeout=10), key) == "kept"
        assert_kept(w2, rrid)
    pydist.remotecall_wait(rh.drop, w3, key)
    wait_freed(w2, rrid)


@pytest.mark.slow
def test_third_party_fetch_and_drop_race(w):
    w2, w3 = w
    rrids = []
    for _ in range(20):
        f = pydist.remotecall(big_result, w2)
        rrids.append(f.rrid)
        assert pydist.remotecall_fetch(rh.fetch_and_drop, w3, f) == BIG
        del f
    gc.collect()
    for r in rrids:
        wait_freed(w2, r)
    assert on(w2, rh.bad_counts) == []
    assert on(w3, rh.bad_counts) == []
    assert rh.bad_counts() == []


def test_future_passed_back_to_its_owner(w):
    w2, _ = w
    f = pydist.remotecall(big_result, w2)
    assert pydist.remotecall_fetch(lambda x: len(x.fetch()), w2, f) == BIG
    assert_kept(w2, f.rrid)  # the master has not fetched it yet
    assert len(f.fetch()) == BIG
    wait_freed(w2, f.rrid)
    g = Future(w2)
    pydist.remotecall_wait(lambda x: x.put("own") and None, w2, g)
    assert g.fetch() == "own"
    wait_freed(w2, g.rrid)
    assert on(w2, rh.bad_counts) == []


def test_remote_channel_freed_when_master_drops_it(w):
    w2, _ = w
    rc = RemoteChannel(lambda: Channel(10), w2)
    rrid = rc.rrid
    rc.put(1)
    assert rc.take() == 1
    assert_kept(w2, rrid)
    rc2 = RemoteChannel(w2)
    rrid2 = rc2.rrid
    rc2.put("x")
    assert_kept(w2, rrid2)
    del rc, rc2
    wait_freed(w2, rrid)
    wait_freed(w2, rrid2)


def test_remote_channel_used_by_worker_freed_when_master_drops_it(w):
    """A worker used the channel in a call that has returned: only the master holds it."""
    w2, w3 = w
    rc = RemoteChannel(lambda: Channel(10), w2)
    rrid = rc.rrid
    pydist.remotecall_fetch(lambda c: (c.put(pydist.myid()), None)[1], w3, rc)
    assert rc.take() == w3
    assert_kept(w2, rrid)
    del rc
    wait_freed(w2, rrid)


def test_future_made_on_worker_handed_to_master_is_freed(fresh_workers):
    """Worker b makes Future(a) and returns it; the master puts and fetches; a frees it."""
    a, b = fresh_workers(2)
    f = on(b, lambda p: pydist.Future(p), a)
    assert (f.where, f.whence) == (a, b)
    f.put("v")
    assert f.fetch() == "v"
    assert on(b, rh.collect) is None
    rrid = f.rrid
    del f
    wait_freed(a, rrid)
    assert on(a, rh.bad_counts) == []


def test_reference_passed_on_by_worker_not_connected_to_owner(fresh_workers):
    """b (never connected to the owner a) hands the Future on to c, then fetches its own copy;
    the master drops its copy. c still holds it: a must keep the value for c."""
    a, b, c = fresh_workers(3)
    f = pydist.remotecall(big_result, a)
    f.wait()
    rrid = f.rrid
    assert on(b, rh.relay, f, c) == BIG
    del f
    gc.collect()
    # Let every count message settle: the master and b are done with it.
    wait_until(lambda: (lambda n: n is None or (1 not in n and b not in n))(counts(a, rrid)),
               timeout=FREED_WITHIN, what="master and b to release")
    assert counts(a, rrid) == {c: 1}
    assert on(c, rh.len_of_held_fetch, "relayed", 5) == BIG


def test_holder_that_never_talked_to_owner_releases(fresh_workers):
    """b gets a reference owned by a, without ever talking to a, and drops it: a frees it."""
    a, b = fresh_workers(2)
    f = pydist.remotecall(big_result, a)
    f.wait()
    rrid = f.rrid
    box = RemoteChannel(lambda: Channel(1))
    box.put(f)
    pydist.remotecall_wait(rh.take_into, b, box, "k")
    del f
    gc.collect()
    wait_until(lambda: counts(a, rrid) == {b: 1}, timeout=FREED_WITHIN, what="only b to hold it")
    pydist.remotecall_wait(rh.drop, b, "k")
    wait_freed(a, rrid)


@pytest.mark.parametrize("launch", ["one_addprocs", "two_addprocs"])
@pytest.mark.parametrize("kind", ["future", "channel"])
def test_dead_holder_releases_value_on_owner(fresh_workers, kind, launch):
    """b holds a reference to a value on a and is killed: a releases the value."""
    a, b = fresh_workers(2) if launch == "one_addprocs" else fresh_one_by_one(fresh_workers, 2)
    ref = pydist.remotecall(big_result, a) if kind == "future" else RemoteChannel(lambda: Channel(2), a)
    if kind == "future":
        ref.wait()
    rrid = ref.rrid
    pydist.remotecall_wait(rh.hold, b, "k", ref)
    del ref
    gc.collect()
    wait_until(lambda: counts(a, rrid) == {b: 1}, timeout=FREED_WITHIN, what="only b to hold it")
    assert_kept(a, rrid)
    kill9(b)
    wait_freed(a, rrid, timeout=10)
    assert a in pydist.procs()


# ==================================================================== 3b. no leaks for values kept on their owner
def table_empty_on(pids, rrids=None, timeout=FREED_WITHIN):
    """Wait until no process in `pids` keeps any of `rrids` (or anything at all, if None)."""
    gc.collect()

    def left():
        if rrids is None:
            return {p: on(p, rh.store_len) for p in pids if on(p, rh.store_len)}
        return {p: [r for r in rrids if has_ref(p, r)] for p in pids
                if any(has_ref(p, r) for r in rrids)}

    wait_until(lambda: not left(), timeout=timeout, what=f"owners to free everything (left: {left()})")


@pytest.mark.timeout(120)
def test_future_kept_on_owner_sent_to_owner_fetched_twice_then_dropped(w):
    """Issue 12 item 6a, run many times: a large remotecall result (kept on w) is sent to w
    itself, fetched there twice (in one call and in two calls), then dropped by the master."""
    w2, _ = w
    rrids = []
    for i in range(30):
        f = pydist.remotecall(big_result, w2)
        if i % 3 == 0:
            f.wait()
        assert on(w2, rh.fetch_twice, f) == 2 * BIG
        if i % 2:
            assert on(w2, rh.fetch_and_drop, f) == BIG
        rrids.append(f.rrid)
        del f
    table_empty_on([w2], rrids)
    assert on(w2, rh.bad_counts) == []


@pytest.mark.timeout(120)
def test_many_unfetched_large_futures_dropped_at_once(w):
    """Issue 12 item 6b, run many times: 32 unfetched large results dropped together, before
    or after their "done" notices arrive."""
    rrids = []
    for i in range(20):
        fs = [pydist.remotecall(big_result, w[j % 2]) for j in range(32)]
        if i % 2:
            for f in fs:
                f.wait()
            del f
        rrids += [(g.where, g.rrid) for g in fs]
        del fs
    gc.collect()
    for p in w:
        table_empty_on([p], [r for where, r in rrids if where == p])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("made_by", ["master", "owner"])
def test_remote_channel_on_w_sent_to_x_and_dropped(w, made_by):
    """A RemoteChannel on w (made by the master, or by w and returned) is sent to x, used
    there, and dropped by everybody: w frees it, every time."""
    w2, w3 = w
    on(w3, rh.ping, w2)
    rrids = []
    for i in range(30):
        rc = RemoteChannel(w2) if made_by == "master" else on(w2, rh.make_channel_here)
        assert rc.where == w2
        on(w3, rh.put_into, rc, i)
        if i % 2:
            pydist.remotecall_wait(rh.hold, w3, f"c{i}", rc)
            pydist.remotecall_wait(rh.drop, w3, f"c{i}")
        assert rc.take(10) == i
        rrids.append(rc.rrid)
        del rc
    table_empty_on([w2], rrids)
    assert on(w2, rh.bad_counts) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [rh.make_channel_here, rh.make_future_here])
def test_pushed_result_holding_a_reference_dropped_before_it_arrives(w, make):
    """A remotecall's small result holds a reference owned by the worker (which counts the
    caller as a holder when it pushes the result). The caller drops the Future before the
    push arrives: the reference inside must still be given back."""
    w2, _ = w
    before = on(w2, rh.store_len)
    for _ in range(20):
        f = pydist.remotecall(make, w2)
        del f
    gc.collect()
    wait_until(lambda: on(w2, rh.store_len) == before, timeout=FREED_WITHIN,
               what=f"worker {w2} to free the references inside dropped results "
                    f"({on(w2, rh.store_len)} left, {before} before)")


def _pause_in(names, entered, go):
    """A trace function that, in the thread it is set in, stops at the first call of one of
    refs.py's functions `names` (event 'call') until `go` is set."""
    refs_file = pydist.refs.__file__

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename == refs_file and code.co_name in names:
            entered.set()
            go.wait(20)
        return None
    return tracer


@pytest.mark.timeout(60)
def test_reference_arriving_while_its_holder_releases_it(w):
    """The master drops its last RemoteChannel object in one thread (stopped inside the
    release) while the same reference arrives again in another thread. The arrival must not
    revive the dying object (whose count is being given back): the owner keeps the channel
    for the new object, and frees it once that is dropped too."""
    w2, _ = w
    rc = RemoteChannel(lambda: Channel(10), w2)
    rrid = rc.rrid
    key = uuid.uuid4().hex
    pydist.remotecall_wait(rh.hold, w2, key, rc)
    box = [rc]
    del rc
    entered, go = threading.Event(), threading.Event()

    def drop():
        sys.settrace(_pause_in({"__del__", "_released"}, entered, go))
        try:
            box.clear()  # the last reference here: the release runs in this thread
        finally:
            sys.settrace(None)

    t = threading.Thread(target=drop, daemon=True)
    t.start()
    try:
        assert entered.wait(10), "the release of the dropped RemoteChannel did not run"
        again = on(w2, rh.held, key)  # the same reference arrives while the old one dies
    finally:
        go.set()
        t.join(10)
    pydist.remotecall_wait(rh.drop, w2, key)  # now only `again` holds it
    gc.collect()
    assert_kept(w2, rrid)
    again.put("v")
    assert again.take(10) == "v"
    del again
    table_empty_on([w2], [rrid])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("to", ["owner", "third"])
def test_pending_future_sent_while_it_completes(w, to):
    """The master pickles a pending Future (stopped right after deciding to send it as a
    reference) while its small result arrives and completes it here. The master's release
    must not reach the owner before the new holder is counted: the holder can still fetch,
    and the owner frees the value afterwards."""
    w2, w3 = w
    dest = w2 if to == "owner" else w3
    if dest != w2:
        on(w3, rh.ping, w2)
    gate = RemoteChannel(lambda: Channel(1))
    f = pydist.remotecall(rh.take_from, w2, gate)
    rrid = f.rrid
    entered, go = threading.Event(), threading.Event()
    out = {}

    def send():
        sys.settrace(_pause_in({"_note_new_client"}, entered, go))
        try:
            out["v"] = pydist.remotecall_fetch(rh.fetch_within, dest, f, 10)
        except BaseException as e:  # noqa: BLE001
            out["e"] = e
        finally:
            sys.settrace(None)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        assert entered.wait(10), "the Future was not sent as a pending reference"
        gate.put("x")
        wait_until(f.done, timeout=10, what="the result to be pushed")
        time.sleep(0.2)  # the master's release (if any) reaches the owner meanwhile
    finally:
        go.set()
        t.join(30)
    assert "e" not in out, repr(out.get("e"))
    assert out["v"] == "x"
    del f
    table_empty_on([w2], [rrid])
    assert on(w2, rh.bad_counts) == []


# ==================================================================== 4. owners that die
def test_waiters_get_process_exited_when_owner_dies(fresh_workers):
    (p,) = fresh_workers(1)
    rc = RemoteChannel(lambda: Channel(1), p)
    pending = pydist.remotecall(lambda: time.sleep(120), p)
    fut = Future(p)
    takers = [Runner(rc.take), Runner(rc.take, timeout=100)]
    fetchers = [Runner(pending.fetch), Runner(pending.wait), Runner(fut.fetch)]
    calls, ev, cb = _callback_recorder()
    pending.add_done_callback(cb)
    for r in takers + fetchers:
        assert not r.done.wait(0.05)
    assert not pending.isready()
    kill9(p)
    t0 = time.monotonic()
    for r in takers + fetchers:
        e = r.error(timeout=15)
        assert type(e) is ProcessExitedException, repr(e)
        assert e.worker_id == p
    assert time.monotonic() - t0 < 15
    assert ev.wait(10) and calls == [pending]
    with pytest.raises(ProcessExitedException):
        pending.fetch()
    with pytest.raises(ProcessExitedException):
        rc.put(1)
    with pytest.raises(ProcessExitedException):
        Future(p).fetch()


def test_await_pending_future_of_dead_owner(fresh_workers):
    (p,) = fresh_workers(1)
    f = pydist.remotecall(lambda: time.sleep(120), p)

    async def main():
        task = asyncio.ensure_future(_await(f))
        await asyncio.sleep(0)  # the task starts and blocks in `await f`
        assert not task.done()
        kill9(p)
        return await asyncio.wait_for(task, 20)

    with pytest.raises(ProcessExitedException):
        asyncio.run(main())


async def _await(f):
    return await f


def _fail(x):
    raise ValueError(f"bad {x}")


def _dropped_after_raising(method: str, times: int) -> tuple[bool, tuple]:
    """Make a failing call's Future, call its `method` `times` times (each raises the call's
    error), drop it; whether the Future was freed at once (by reference counting alone, the
    cyclic collector being off), and its reference. (A frame of one's own that holds the
    Future while the error passes through it, such as a lambda's, would make a cycle.)"""
    import weakref

    fut = pydist.remotecall(_fail, pydist.workers()[0], 1)
    rrid = tuple(fut.rrid)
    gone = weakref.ref(fut)
    for _ in range(times):
        try:
            getattr(fut, method)()
        except Exception:
            pass
    del fut
    return gone() is None, rrid


@pytest.mark.timeout(60)
def test_a_failed_futures_error_holds_no_cycle_so_dropping_it_frees_the_owners_copy(two_workers):
    """Raising a Future's stored error puts pydist's frames, which hold the Future, into the
    error's traceback. They let go of it (as concurrent.futures does), so the Future is freed
    as soon as it is dropped, and its owner frees the error then, not whenever the cyclic
    collector happens to run."""
    w = pydist.workers()[0]
    gc.disable()
    try:
        for method, times in (("fetch", 1), ("wait", 1), ("result", 1), ("fetch", 3)):
            freed, rrid = _dropped_after_raising(method, times)
            assert freed, f"after {method}() x{times}, the failed Future is still alive (in a cycle)"
            wait_until(lambda: not pydist.remotecall_fetch(rh.has_ref, w, rrid),
                       what=f"worker {w} to free the error of the Future ({method})")
    finally:
        gc.enable()


@pytest.mark.timeout(60)
def test_a_failed_remotecall_fetch_leaves_no_cycle(two_workers):
    """The reply slot of a call that failed is not kept alive by the error it raised."""
    w = pydist.workers()[0]
    pydist.remotecall_fetch(abs, w, -1)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(5):
            with pytest.raises(ValueError):
                pydist.remotecall_fetch(_fail, w, i)
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("pydist")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not ours, f"a failed remotecall_fetch left {ours} in reference cycles"


def _take_then(rc, tag):
    return (rc.take(), tag)


@pytest.mark.timeout(60)
def test_many_threads_wait_for_one_calls_future(two_workers):
    """Threads that wait for a call's Future before its outcome lands (fetch, wait, result,
    one with a timeout that runs out) and after it landed: each gets the outcome, once."""
    w = two_workers[0]
    gate = RemoteChannel(lambda: Channel(1), w)
    fut = pydist.remotecall(_take_then, w, gate, "done")
    waiters = [Runner(fut.fetch), Runner(fut.fetch), Runner(fut.result), Runner(fut.wait),
               Runner(fut.fetch, timeout=60)]
    early = Runner(fut.fetch, timeout=0.2)
    assert isinstance(early.error(), TimeoutError)
    for r in waiters:
        assert not r.done.is_set()
    assert not fut.isready() and not fut.done()
    gate.put("go")
    got = [r.value() for r in waiters]
    assert got[:3] + got[4:] == [("go", "done")] * 4 and got[3] is fut
    assert fut.fetch(timeout=0) == ("go", "done") and fut.isready()
    assert Runner(fut.wait).value() is fut
