"""Soak: many round trips and many Futures and RemoteChannels of every kind, made and
dropped; afterwards every process's reference table is empty again and no process grew.

Bounded for CI: about 100,000 round trips and 20,000 references, well under a minute on a
loaded 2-core machine. The resident-set margin is generous (allocators keep freed memory)
but far below what leaking the large values would cost (over 10,000 of them, 70 KB each).
"""

from __future__ import annotations

import gc
import random
import time

import pytest

import pydist
import soakhelpers as sh
from pydist import Future, RemoteChannel

from conftest import wait_until

ROUND_TRIPS = 100_000
REFERENCES = 20_000
DROP_TOGETHER = 32  # references are dropped in groups, like a list of Futures going away
WARM_UP = 0.2  # resident sets are measured after this share of the work, and at the end
RSS_MARGIN = 96 * 2**20  # bytes; leaking the large values made after the warm-up: > 500 MiB
SETTLE = 30.0  # seconds for the last count messages to arrive


def _one_reference(kind: int, w: int, x: int):
    """Make one reference of `kind` (owned by w, or here), use it, and return what the
    caller then drops (None if nothing is left)."""
    if kind == 0:  # local Future, small value, fetched
        f = Future()
        f.put(1)
        f.fetch()
        return f
    if kind == 1:  # local Future, large value, dropped unfetched
        f = Future()
        f.put(sh.big())
        return f
    if kind == 2:  # Future on w, put from here, fetched
        f = Future(w)
        f.put(2)
        assert f.fetch() == 2
        return f
    if kind == 3:  # pushed small result
        f = pydist.remotecall(sh.small, w)
        assert f.fetch() == b"s"
        return f
    if kind == 4:  # large result, waited for, never fetched
        return pydist.remotecall(sh.big, w).wait()
    if kind == 5:  # large result, fetched
        f = pydist.remotecall(sh.big, w)
        assert len(f.fetch()) == sh.BIG
        return f
    if kind == 6:  # large result sent to its owner, fetched twice there
        f = pydist.remotecall(sh.big, w)
        assert pydist.remotecall_fetch(sh.fetch_twice, w, f) == 2 * sh.BIG
        return f
    if kind == 7:  # large result sent to another worker, fetched there, and back
        f = pydist.remotecall(sh.big, w)
        g = pydist.remotecall_fetch(sh.fetch_and_return, x, f)
        assert g is f
        return f
    if kind == 8:  # ... not fetched there, and back
        f = pydist.remotecall(sh.big, w)
        assert pydist.remotecall_fetch(sh.give_back, x, f) is f
        return f
    if kind == 9:  # channel on w, large value through it
        c = RemoteChannel(w)
        c.put(sh.big())
        assert len(c.take()) == sh.BIG
        return c
    if kind == 10:  # channel on w, another worker puts
        c = RemoteChannel(w)
        pydist.remotecall_fetch(sh.put_into, x, c, 10)
        assert c.take() == 10
        return c
    if kind == 11:  # channel made by w, passed to x (which keeps a value in it), dropped
        c = pydist.remotecall_fetch(sh.make_channel_here, w)
        pydist.remotecall_fetch(sh.put_into, x, c, 11)
        return c
    if kind == 12:  # channel here, a worker puts a large value
        c = RemoteChannel()
        pydist.remotecall_fetch(sh.put_big_into, w, c)
        assert len(c.take()) == sh.BIG
        return c
    if kind == 13:  # a result holding a reference, dropped before it arrives
        return pydist.remotecall(sh.make_channel_here, w)
    if kind == 14:  # large result dropped at once (still running or not yet done here)
        return pydist.remotecall(sh.big, w)
    raise AssertionError(kind)


KINDS = 15


def _tables_clean(pids, baseline):
    """What is left in the reference tables of `pids` (and here, beyond `baseline`)."""
    left = {}
    for p in pids:
        t = pydist.remotecall_fetch(sh.tables, p)
        if t["store"] or t["live"]:
            left[p] = t
    here = sh.tables()
    extra = {r: c for r, c in here["store"].items() if r not in baseline}
    if extra:
        left[1] = extra
    return left


def _settle(pids, baseline):
    gc.collect()
    wait_until(lambda: not _tables_clean(pids, baseline), timeout=SETTLE, interval=0.05,
               what=f"reference tables to empty (left: {_tables_clean(pids, baseline)})")


def _rss(pids) -> dict:
    out = {p: pydist.remotecall_fetch(sh.rss, p) for p in pids}
    out[1] = sh.rss()
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_round_trips_and_references(fresh_workers):
    pids = fresh_workers(2)
    gc.collect()
    baseline = set(sh.tables()["store"])
    rnd = random.Random(12)
    t0 = time.monotonic()

    def work(n_trips, n_refs):
        """n_trips round trips and n_refs references, interleaved; references dropped
        DROP_TOGETHER at a time."""
        kept = []
        per_ref = n_trips // n_refs
        for i in range(n_refs):
            w, x = pids if i % 2 else pids[::-1]
            for k in range(per_ref):
                assert pydist.remotecall_fetch(sh.tiny, pids[k % 2], k) == k
            kept.append(_one_reference(rnd.randrange(KINDS), w, x))
            if len(kept) == DROP_TOGETHER:
                kept.clear()
        kept.clear()

    work(int(ROUND_TRIPS * WARM_UP), int(REFERENCES * WARM_UP))
    _settle(pids, baseline)
    warm = _rss(pids)
    work(int(ROUND_TRIPS * (1 - WARM_UP)), int(REFERENCES * (1 - WARM_UP)))
    _settle(pids, baseline)
    end = _rss(pids)
    elapsed = time.monotonic() - t0
    grown = {p: end[p] - warm[p] for p in end}
    assert all(g < RSS_MARGIN for g in grown.values()), (
        f"resident sets grew (bytes, per process): {grown}; after warm-up: {warm}")
    print(f"soak: {elapsed:.1f} s; resident set growth after warm-up (MiB): "
          f"{ {p: round(g / 2**20, 1) for p, g in grown.items()} }")
