"""Worker-side helpers for test_waits.py, importable by name on every process (workers inherit
the master's sys.path, which conftest extends with this directory)."""

from __future__ import annotations

import threading
import time

import pydist


def take_from(rc):
    """Block in `rc.take()` (a RemoteChannel owned by another process)."""
    return rc.take()


def blocked_in(kind: str, started, arg=None):
    """Say "started" on the RemoteChannel `started`, then block in one of pydist's own waits
    (or threading's) until interrupted."""
    started.put(kind)
    if kind == "channel":
        return pydist.Channel(1).take()
    if kind == "remotechannel":
        return arg.take()
    if kind == "own_remotechannel":  # ours: the take reads the master's connection (the
        return pydist.RemoteChannel(pydist.myid()).take()  # reply to `started.put` came there)
    if kind == "future":  # a Future owned by another process: a call on its owner
        return arg.fetch()
    if kind == "pushed_future":  # a remotecall's Future: waits for the result's push
        return pydist.remotecall(time.sleep, arg, 60).fetch()
    if kind == "event":
        return threading.Event().wait()
    if kind == "condition":
        cond = threading.Condition()
        with cond:
            return cond.wait()
    raise ValueError(kind)


class PlainChannel:
    """A user channel type with no `put_front` (and no way to wake its waiters)."""

    def __init__(self):
        import queue

        self.q = queue.Queue()

    def put(self, v, timeout=None):
        self.q.put(v)
        return v

    def take(self, timeout=None):
        import queue

        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"take: nothing within {timeout} seconds") from None

    def isready(self):
        return not self.q.empty()

    def __len__(self):
        return self.q.qsize()


def notify_storm(rounds: int, slice_s: float) -> int:
    """In a remote call, whose waits on a `threading.Condition` are sliced so that an
    interrupt reaches them: ping-pong `rounds` times with a plain thread through a Channel,
    a queue.Queue and an Event, with slices of `slice_s` seconds, so that many wake-ups come
    just as a slice ends. None may be missed (the call would then wait forever). Returns
    the rounds done."""
    import queue
    import random

    from pydist import calls

    old = calls.WAIT_SLICE
    calls.WAIT_SLICE = slice_s
    try:
        ping, pong = pydist.Channel(1), pydist.Channel(1)
        q: queue.Queue = queue.Queue()
        events = [threading.Event() for _ in range(rounds)]

        def partner() -> None:  # (not in a remote call: its waits and sleeps are plain)
            for i in range(rounds):
                ping.take()
                time.sleep(random.uniform(0, 2 * slice_s))
                pong.put(i)
                time.sleep(random.uniform(0, 2 * slice_s))
                q.put(i)
                time.sleep(random.uniform(0, 2 * slice_s))
                events[i].set()

        t = threading.Thread(target=partner, daemon=True)
        t.start()
        for i in range(rounds):
            ping.put(i)
            assert pong.take() == i
            assert q.get() == i
            events[i].wait()
        t.join(10)
        return rounds
    finally:
        calls.WAIT_SLICE = old


def interrupted_then_waits(started) -> str:
    """Say "started", sleep until interrupted, then wait again (a sleep, a channel, an
    event): each interrupt raises one KeyboardInterrupt, and the call goes on."""
    started.put("started")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        pass
    else:
        return "not interrupted"
    time.sleep(0.2)
    ch = pydist.Channel(1)
    ch.put(1)
    assert ch.take(timeout=5) == 1
    assert not threading.Event().wait(0.2)
    return "recovered"


ASYNC_RAISES: list = []


def count_async_raises() -> None:
    """Count the asynchronous exceptions `interrupt` raises in calls here (a spy)."""
    from pydist import calls

    ASYNC_RAISES.clear()
    if getattr(calls, "_real_set_async_exc", None) is None:
        real = calls._real_set_async_exc = calls._set_async_exc

        def spy(tid, exc):
            if exc is not None:
                ASYNC_RAISES.append(tid)
            return real(tid, exc)

        calls._set_async_exc = spy


def async_raises() -> int:
    return len(ASYNC_RAISES)


def busy(started) -> str:
    """Say "started", then compute (no wait) until interrupted."""
    started.put("started")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass
    return "not interrupted"


def waiting_calls() -> int:
    """How many calls running here wait in one of pydist's waits now."""
    from pydist import calls

    return sum(rec.waiting for rec in list(calls._running.values()))
