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
