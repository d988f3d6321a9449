"""The functions every system runs on its workers.

They live in a module of their own (importable on every worker: the harness puts bench/ on
PYTHONPATH for everything it starts), so that every system pickles them by reference, as it
would a library function, rather than by value.
"""

from __future__ import annotations

import os
import socket
import time


def identity(x):
    return x


def inc(x):
    return x + 1


def apply_chunk(f, xs):
    """A batch of a hand-batched map (the raw floor and ray)."""
    return [f(x) for x in xs]


def sleep(s):
    time.sleep(s)
    return s


def sleep_many(s, n):
    """n sleeps of s seconds back to back (W4's ceiling: the sleeps without any messaging)."""
    for _ in range(n):
        time.sleep(s)
    return n


def sum_array(a):
    return float(a.sum())


def make_array(n):
    import numpy as np

    return np.ones(n)


def getpid(*_):
    return os.getpid()


def rendezvous(port, timeout=600.0):
    """W6: report this process to peers_common.Rendezvous and block until all have."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(str(os.getpid()).encode())
        if s.recv(8) != b"go\n":
            raise RuntimeError("rendezvous closed early")
    finally:
        s.close()
    return os.getpid()


# ---------------------------------------------------------------- W7 ping-pong players
def _play(get, put, n, warmup, first):
    """Bounce a token `warmup + n` times; the first player times the last n round trips."""
    t = None
    for i in range(warmup + n):
        if i == warmup:
            t = time.perf_counter()
        if first:
            put(i)
            assert get() == i
        else:
            put(get())
    return time.perf_counter() - t if first else None


def channel_player(inbox, outbox, n, warmup, first):
    """pydist: `inbox` is a RemoteChannel owned by this worker, `outbox` one owned by the other."""
    return _play(inbox.take, outbox.put, n, warmup, first)


def queue_player(inbox, outbox, n, warmup, first):
    """multiprocessing Manager queues, distributed.Queue, ray.util.queue.Queue: get/put."""
    return _play(inbox.get, outbox.put, n, warmup, first)


def dask_queue_player(in_name, out_name, n, warmup, first):
    from distributed import Queue

    return queue_player(Queue(in_name), Queue(out_name), n, warmup, first)


class PidActor:
    """ray W6: one actor per worker process."""

    def pid(self):
        return os.getpid()
