"""Worker-side helpers for test_futures_std.py and test_executor.py, importable by name on
every process (workers inherit the master's sys.path, which conftest extends)."""

from __future__ import annotations

import os
import threading
import time

# What ran on this process, in order (tags), for tests that check a call never ran.
RAN: list = []
_lock = threading.Lock()


def record(tag, value=None):
    with _lock:
        RAN.append(tag)
    return tag if value is None else value


def ran() -> list:
    with _lock:
        return list(RAN)


def forget() -> None:
    with _lock:
        RAN.clear()


def sleep_then(seconds: float, tag=None):
    time.sleep(seconds)
    if tag is not None:
        record(tag)
    return tag


def fail(msg: str = "boom"):
    raise ValueError(msg)


def getpid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def square(x):
    return x * x


def add(x, y):
    return x + y


def put_items(q, n):
    """Put 0..n-1 on queue `q` (a multiprocessing Manager's queue proxy); return n."""
    for i in range(n):
        q.put(i)
    return n
