"""Julia's macros as functions: spawnat, spawn, fetchfrom, fetchany, everywhere, distributed.

Thin sugar over the remote-call API. `everywhere` runs code in `__main__` of every process
(after binding the values it is given there);
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
from . import serialization
from .exceptions import RemoteException, SerializationError, error_group
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


def _bind_and_exec(values: dict[str, Any], code: str | None) -> Any:
    """Bind each of `values` to its name in this process's `__main__`, then run `code`."""
    main = sys.modules["__main__"]
    for name, value in values.items():
        setattr(main, name, value)
    return None if code is None else _exec_in_main(code)


def _define_in_main(obj: Any) -> None:
    setattr(sys.modules["__main__"], obj.__name__, obj)


def _run_on_all(fn: Callable, args: tuple, pids: list[int],
                on_send_error: Callable[[SerializationError], BaseException] | None = None
                ) -> None:
    """Run `fn(*args)` on every pid (remote ones concurrently, this one last); raise an
    ExceptionGroup of everything that failed. Arguments that cannot be pickled stop it
    before anything more is sent (`on_send_error` may name them)."""
    futures = []
    errors: list[BaseException] = []
    unsendable: SerializationError | None = None
    for p in pids:
        if p == PGRP.id:
            continue
        try:
            futures.append(remotecall(fn, p, *args))
        except SerializationError as e:  # the same for every process: send no more
            unsendable = e
            break
        except BaseException as e:  # ProcessExitedException: that worker is gone
            errors.append(e)
    for fut in futures:
        try:
            fut.wait()
        except BaseException as e:  # RemoteException or ProcessExitedException
            errors.append(e)
    if unsendable is not None:
        if on_send_error is None:
            raise unsendable
        raise on_send_error(unsendable) from unsendable
    for _ in [p for p in pids if p == PGRP.id]:
        try:
            remotecall_fetch(fn, PGRP.id, *args)
        except RemoteException as e:
            errors.append(e)
    if errors:
        raise error_group(f"everywhere: {len(errors)} of {len(pids)} processes failed", errors)


def _unsendable_values(values: dict[str, Any], err: SerializationError) -> SerializationError:
    """`err` (sending everywhere's values failed), naming the values that cannot be pickled."""
    bad = []
    for name, value in values.items():
        try:
            _, _, context = serialization.dumps(value)
            serialization.discard(context)
        except Exception:
            bad.append(name)
    names = ", ".join(bad) if bad else ", ".join(values)
    return SerializationError(f"everywhere: could not send the value of {names}: {err}")


def everywhere(code: Any = None, procs: int | Iterable[int] | None = None,
               **values: Any) -> Any:
    """Run `code` (a str) in `__main__` on every process in `procs` (default: all, master
    included). With a single int pid, return the value of an expression there.

    Keyword arguments are values to bind first (Julia's `@everywhere x = $foo`): each is
    pickled (cloudpickle: lambdas and `__main__` objects by value) and bound to its name in
    `__main__` of every process before `code` runs there; this process binds the object
    itself. `everywhere(procs=..., x=value)` without code only binds.

    As a decorator (`@everywhere` or `@everywhere(procs=...)`), define the decorated function
    or class in `__main__` on those processes and return it.
    """
    if code is None and not values:  # @everywhere(procs=...)
        return functools.partial(everywhere, procs=procs)
    pids = _resolve_procs(procs)
    if values:
        if code is not None and not isinstance(code, str):
            raise TypeError(f"everywhere: with values, code must be a str, got {code!r}")
        if isinstance(procs, int) and not isinstance(procs, bool):
            try:
                return remotecall_fetch(_bind_and_exec, procs, values, code)
            except SerializationError as e:
                raise _unsendable_values(values, e) from e
        _run_on_all(_bind_and_exec, (values, code), pids,
                    functools.partial(_unsendable_values, values))
        return None
    if isinstance(code, str):
        if isinstance(procs, int) and not isinstance(procs, bool):
            return remotecall_fetch(_exec_in_main, procs, code)
        _run_on_all(_exec_in_main, (code,), pids)
        return None
    if callable(code) and hasattr(code, "__name__"):
        _run_on_all(_define_in_main, (code,), pids)
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
            raise error_group(f"distributed: {len(errors)} chunks failed", errors)

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
