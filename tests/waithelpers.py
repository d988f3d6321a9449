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
