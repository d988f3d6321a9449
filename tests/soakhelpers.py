"""Worker-side helpers for test_soak.py, importable by name on every process."""

from __future__ import annotations

import gc
import os

import pydist
import pydist.refs

BIG = 70_000  # pickles over the push limit (64 KiB): the owner keeps the value until fetched


def tiny(x):
    return x


def small():
    return b"s"


def big():
    return b"x" * BIG  # written, so that its pages count in the resident set


def fetch_twice(fut) -> int:
    return len(fut.fetch()) + len(fut.fetch())


def fetch_and_return(fut):
    fut.fetch()
    return fut


def give_back(ref):
    return ref


def put_into(chan, value) -> None:
    chan.put(value, 30)


def put_big_into(chan) -> None:
    chan.put(big(), 30)


def make_channel_here():
    return pydist.RemoteChannel()


def tables() -> dict:
    """This process's reference table and live reference objects, after a collection."""
    gc.collect()
    with pydist.refs.STORE.lock:
        store = {tuple(r): dict(v.clients) for r, v in pydist.refs.STORE.values.items()}
    live = [tuple(r) for r, ref in list(pydist.refs._client_refs.items()) if ref() is not None]
    return {"store": store, "live": live}


def rss() -> int:
    """Resident set size of this process, in bytes (from /proc)."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
