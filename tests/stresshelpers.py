"""Worker-side helpers for test_transport_stress.py, importable by name on every process."""

from __future__ import annotations

import numpy as np

import pydist


def identity(x):
    return x


def make_array(nbytes: int, seed: int) -> np.ndarray:
    """A reproducible float64 array of `nbytes` bytes."""
    return np.random.default_rng(seed).random(nbytes // 8)


def relay(x, path: list[int]):
    """Pass `x` along `path` (one worker after the other) and return what comes back."""
    if not path:
        return x
    return pydist.remotecall_fetch(relay, path[0], x, path[1:])


class Payload:
    """A large value whose lifetime the process holding it can observe (weak references)."""

    def __init__(self, nbytes: int) -> None:
        self.data = bytearray(nbytes)


_WATCHED: list = []


def watch(x) -> int:
    """Remember `x` weakly on this process (it must not be kept alive by pydist afterwards)."""
    import weakref

    _WATCHED.append(weakref.ref(x))
    return len(x.data)


def make_watched(nbytes: int) -> Payload:
    """A result that this process watches."""
    p = Payload(nbytes)
    watch(p)
    return p


def alive_watched(collect: bool = True) -> int:
    """How many watched values are still alive here (without a garbage collection: only
    what is still referenced; a quick call, so that the thread serving it is the one that
    served the calls before)."""
    if collect:
        import gc

        gc.collect()
    return sum(r() is not None for r in _WATCHED)


def scribble(a: np.ndarray) -> float:
    """Sum `a`, then overwrite it in place (a received array is writable and private)."""
    total = float(a.sum())
    a[:] = -1.0
    return total


def master_arena_in_use() -> int:
    """Bytes of this worker's arena for the master not yet released by the master."""
    from pydist.group import PGRP

    arena = PGRP.workers[1].conn.arena
    return -1 if arena is None else arena.in_use()


def master_arena_warm() -> bool:
    """Whether this worker's arena for the master has a warm region and none warming."""
    from pydist.group import PGRP

    arena = PGRP.workers[1].conn.arena
    if arena is None or arena._warming:
        return False
    arena.in_use()  # (takes back the regions the master released)
    return any(w for _, _, w in arena._free)


def in_arena(a: np.ndarray) -> bool:
    """Whether `a`'s data lies in a mapping of a pydist shared-memory arena (it came through
    shared memory, not the socket)."""
    from pydist import sharedmem

    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return len(fields) > 5 and fields[5].startswith(f"/memfd:{sharedmem.NAME}")
    return False


def sum_and_where(a: np.ndarray) -> tuple[float, bool]:
    """The sum of `a`, and whether it came through shared memory."""
    return float(a.sum()), in_arena(a)
