"""Julia's macros as functions: spawnat, spawn, fetchfrom, fetchany, everywhere, distributed.

Thin sugar over the remote-call API. `everywhere` runs code in `__main__` of every process;
`distributed` splits an iterable into contiguous chunks, one per worker, and reduces in order.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
from typing import Any, Callable, Iterable, Literal, ParamSpec, TypeVar

from .cluster import nworkers, procs, workers
from .group import PGRP
from .exceptions import ExceptionGroup, RemoteException
from .refs import Future
from .remotecall import remotecall, remotecall_fetch

__all__ = ["spawnat", "spawn", "fetchfrom", "fetchany", "everywhere", "distributed"]

T = TypeVar("T")
P = ParamSpec("P")

_next = itertools.count()
_next_lock = threading.Lock()


def nextproc() -> int:
    """The next worker in round-robin order (no load balancing, as in Julia)."""
    pids = workers()
    with _next_lock:
        return pids[next(_next) % len(pids)]


def spawnat(p: int | Literal["any"], f: Callable[P, T], *args: P.args,
            **kwargs: P.kwargs) -> Future[T]:
    """Run `f(*args, **kwargs)` on process `p` (`"any"`: the next worker, round-robin) and
    return its Future at once: Julia's ``@spawnat p expr``. Example::

        spawnat(2, sum, range(10)).fetch()   # 45
    """
    pid = nextproc() if p == "any" else p
    return remotecall(f, pid, *args, **kwargs)


def spawn(f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """`spawnat("any", f, ...)`: run on the next worker, round-robin (no load balancing)."""
    return spawnat("any", f, *args, **kwargs)


def fetchfrom(p: int, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `f(*args, **kwargs)` on process `p` and return its value (Julia's ``@fetchfrom``)."""
    return remotecall_fetch(f, p, *args, **kwargs)


def fetchany(f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `f(*args, **kwargs)` on the next worker (round-robin) and return its value."""
    return remotecall_fetch(f, nextproc(), *args, **kwargs)


# ==================================================================== everywhere
def _exec_in_main(code: str) -> Any:
    """Run `code` in this process's `__main__`; return the value if it is an expression."""
    namespace = sys.modules["__main__"].__dict__
    try:
        compiled = compile(code, "<everywhere>", "eval")
    except SyntaxError:
        exec(compile(code, "<everywhere>", "exec"), namespace)
        return None
    return eval(compiled, namespace)


def _define_in_main(obj: Any) -> None:
    setattr(sys.modules["__main__"], obj.__name__, obj)


def _run_on_all(fn: Callable, arg: Any, pids: list[int]) -> None:
    """Run `fn(arg)` on every pid (remote ones concurrently, this one last); raise an
    ExceptionGroup of everything that failed."""
    futures = [remotecall(fn, p, arg) for p in pids if p != PGRP.id]
    errors: list[BaseException] = []
    for fut in futures:
        try:
            fut.wait()
        except BaseException as e:  # RemoteException or ProcessExitedException
            errors.append(e)
    for _ in [p for p in pids if p == PGRP.id]:
        try:
            remotecall_fetch(fn, PGRP.id, arg)
        except RemoteException as e:
            errors.append(e)
    if errors:
        raise ExceptionGroup(f"everywhere: {len(errors)} of {len(pids)} processes failed", errors)  # type: ignore[type-var]


def everywhere(code: Any = None, procs: int | Iterable[int] | None = None) -> Any:
    """Run `code` (a str) in `__main__` on every process in `procs` (default: all, master
    included). With a single int pid, return the value of an expression there.

    As a decorator (`@everywhere` or `@everywhere(procs=...)`), define the decorated function
    or class in `__main__` on those processes and return it.
    """
    if code is None:  # @everywhere(procs=...)
        return functools.partial(everywhere, procs=procs)
    pids = _resolve_procs(procs)
    if isinstance(code, str):
        if isinstance(procs, int) and not isinstance(procs, bool):
            return remotecall_fetch(_exec_in_main, procs, code)
        _run_on_all(_exec_in_main, code, pids)
        return None
    if callable(code) and hasattr(code, "__name__"):
        _run_on_all(_define_in_main, code, pids)
        return code
    raise TypeError(f"everywhere: expected code as a str, a function or a class, got {code!r}")


def _resolve_procs(p: Any) -> list[int]:
    if p is None:
        return procs()
    if isinstance(p, int) and not isinstance(p, bool):
        return [p]
    return list(p)


# ==================================================================== distributed
def splitrange(n: int, chunks: int) -> list[range]:
    """Split range(n) into min(n, chunks) contiguous ranges whose sizes differ by at most one
    (the first ones are longer), as Julia's `splitrange`."""
    chunks = max(1, min(n, chunks))
    base, extra = divmod(n, chunks)
    out, lo = [], 0
    for i in range(chunks):
        hi = lo + base + (1 if i < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


def _run_chunk(f: Callable, items: list, reducer: Callable | None) -> Any:
    if reducer is None:
        for x in items:
            f(x)
        return None
    acc = f(items[0])
    for x in items[1:]:
        acc = reducer(acc, f(x))
    return acc


class DistributedHandle:
    """What `distributed` without a reducer returns: `.wait()` waits for every chunk and
    raises what failed (one error as is, several as an ExceptionGroup)."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def wait(self, timeout: float | None = None) -> None:
        errors: list[BaseException] = []
        for fut in self.futures:
            try:
                fut.wait(timeout)
            except TimeoutError:
                raise
            except BaseException as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"distributed: {len(errors)} chunks failed", errors)  # type: ignore[type-var]

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


def distributed(f: Callable, iterable: Iterable, reducer: Callable | None = None) -> Any:
    """Julia's `@distributed`: evaluate `f(x)` for every x of `iterable` (materialized once),
    split into `nworkers()` contiguous chunks that run on the workers.

    With `reducer`, return `reduce(reducer, ...)` over all results in order. Without, return at
    once a handle whose `.wait()` raises any error.
    """
    items = list(iterable)
    pids = workers()
    parts = splitrange(len(items), nworkers())
    if reducer is None:
        futures = [remotecall(_run_chunk, pids[i], f, items[r.start:r.stop], None)
                   for i, r in enumerate(parts) if len(r)]
        return DistributedHandle(futures)
    if not items:
        raise TypeError("distributed: reduction over an empty collection has no value")
    futures = [remotecall(_run_chunk, pids[i], f, items[r.start:r.stop], reducer)
               for i, r in enumerate(parts)]
    results = [fut.fetch() for fut in futures]
    return functools.reduce(reducer, results)
