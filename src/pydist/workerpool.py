"""Worker pools: sets of workers that calls take from and give back.

`remotecall*(f, pool, ...)` takes a free worker from the pool, runs the call there and gives
the worker back when the call has finished (for `remotecall`, when its Future completes). A
pool drops workers that die, so `take` and `wait` never hang on a dead one. A `WorkerPool`
sent to another process becomes a proxy whose operations run on the pool's owner; a
`CachingPool` sends each function to each worker only once.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Iterable

from .calls import call_fetch
from .cluster import procs, workers as all_workers
from .group import PGRP
from .exceptions import InvalidStateError, SerializationError
from .refs import _ERROR, RRID, STORE, RemoteChannel, _default_channel
from .remotecall import remote_do, remotecall, remotecall_fetch, remotecall_wait

__all__ = [
    "AbstractWorkerPool",
    "WorkerPool",
    "CachingPool",
    "default_worker_pool",
    "set_default_worker_pool",
    "remote",
    "clear",
]


class AbstractWorkerPool(ABC):
    """A pool of worker ids. Subclasses implement the seven primitives below; the remote-call
    functions accept any pool in place of a worker id."""

    @abstractmethod
    def push(self, w: int) -> None:
        """Add worker `w` to the pool (free)."""

    @abstractmethod
    def put(self, w: int) -> None:
        """Give worker `w` back after a call (ignored if it is no longer in the pool)."""

    @abstractmethod
    def take(self) -> int:
        """Take a free, live worker, waiting for one."""

    @abstractmethod
    def wait(self) -> None:
        """Wait until a live worker is free."""

    @abstractmethod
    def isready(self) -> bool:
        """True if `take` would not wait."""

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def workers(self) -> list[int]:
        """The ids of the workers in the pool, free or busy (sorted)."""

    def nworkers(self) -> int:
        """How many workers the pool holds."""
        return len(self.workers())

    def try_take(self) -> int | None:
        """A free live worker if there is one now, else None (never waits)."""
        return self.take() if self.isready() else None

    # -- how remote calls use a pool --
    def _prepare(self, w: int, f: Callable) -> tuple[Callable, tuple]:
        """What to send to `w` to run `f`: (function, leading args). CachingPool overrides it."""
        return f, ()

    def _unprepare(self, w: int, f: Callable) -> None:
        """What `_prepare(w, f)` gave was never sent (pickling failed): forget it."""

    def _call_failed(self, w: int, f: Callable, lead: tuple, started: bool = True) -> None:
        """A call sent to `w` with `_prepare(w, f)`'s `lead` failed (or, `started=False`,
        was taken back before it ran): what later calls rely on may be missing there (a
        cache that call was to fill)."""

    def _call_on(self, w: int, f: Callable, args: tuple, kwargs: dict) -> Any:
        """Run `f` on `w`, a worker already taken from this pool."""
        g, lead = self._prepare(w, f)
        try:
            return remotecall_fetch(g, w, *lead, *args, **kwargs)
        except SerializationError:
            self._unprepare(w, f)  # not sent: the next call must send `f` again
            raise
        except BaseException:
            self._call_failed(w, f, lead)
            raise

    def _remotecall_fetch(self, f: Callable, args: tuple, kwargs: dict) -> Any:
        w = self.take()
        try:
            return self._call_on(w, f, args, kwargs)
        finally:
            self.put(w)

    def _remotecall(self, f: Callable, args: tuple, kwargs: dict):
        w = self.take()
        g, lead = f, ()
        try:
            g, lead = self._prepare(w, f)
            fut = remotecall(g, w, *lead, *args, **kwargs)
        except SerializationError:
            self._unprepare(w, f)
            self.put(w)
            raise
        except BaseException:
            self._call_failed(w, f, lead)
            self.put(w)
            raise

        def done(fut: Any) -> None:
            if fut._st == _ERROR:  # (a failure pushed as "done" only is not seen here)
                self._call_failed(w, f, lead)
            self._give_back_later(w)

        fut.add_done_callback(done)
        return fut

    def _give_back_later(self, w: int) -> None:
        """Give `w` back from a completion callback (which must not block)."""
        self.put(w)

    def _remotecall_wait(self, f: Callable, args: tuple, kwargs: dict):
        w = self.take()
        try:
            g, lead = self._prepare(w, f)
        except BaseException:
            self.put(w)
            raise
        try:
            return remotecall_wait(g, w, *lead, *args, **kwargs)
        except SerializationError:
            self._unprepare(w, f)
            raise
        except BaseException:
            self._call_failed(w, f, lead)
            raise
        finally:
            self.put(w)

    def _remote_do(self, f: Callable, args: tuple, kwargs: dict) -> None:
        w = self.take()
        try:
            g, lead = self._prepare(w, f)
        except BaseException:
            self.put(w)
            raise
        try:
            remote_do(g, w, *lead, *args, **kwargs)
        except SerializationError:
            self._unprepare(w, f)
            raise
        except BaseException:
            self._call_failed(w, f, lead)
            raise
        finally:
            self.put(w)


def _alive(w: int) -> bool:
    return w in (PGRP.id, 1) or w in PGRP.workers  # removed workers leave PGRP.workers


_pool_ids = itertools.count(1)
_local_pools: "weakref.WeakValueDictionary[int, WorkerPool]" = weakref.WeakValueDictionary()


class WorkerPool(AbstractWorkerPool):
    """A pool of workers owned by the process that made it. Sent elsewhere (e.g. as an
    argument of a remote call), it arrives as a proxy that forwards every operation here."""

    def __init__(self, workers: Iterable[int] = ()):
        self._cond = threading.Condition(threading.Lock())
        self._workers: set[int] = set()
        self._free: deque[int] = deque()
        self._default = False
        self._id = next(_pool_ids)
        _local_pools[self._id] = self
        for w in workers:
            self.push(w)

    def __repr__(self) -> str:
        return f"WorkerPool({sorted(self._workers)})"

    def __reduce__(self):
        return (_WorkerPoolProxy, (PGRP.id, self._id))

    def push(self, w: int) -> None:
        with self._cond:
            if w not in self._workers:
                self._workers.add(w)
                self._free.append(w)
                self._cond.notify_all()

    def put(self, w: int) -> None:
        with self._cond:
            if w in self._workers and w not in self._free:
                self._free.append(w)
                self._cond.notify_all()

    def _take_free_live(self) -> int | None:
        """Pop a free live worker, dropping dead ones on the way (lock held)."""
        while self._free:
            w = self._free.popleft()
            if _alive(w):
                return w
            self._workers.discard(w)
        return None

    def take(self) -> int:
        with self._cond:
            while True:
                if not self._workers:
                    if self._default:
                        return 1
                    raise RuntimeError("No active worker available in pool")
                w = self._take_free_live()
                if w is not None:
                    return w
                if not self._workers:
                    continue
                self._cond.wait()

    def try_take(self) -> int | None:
        with self._cond:
            if not self._workers and self._default:
                return 1
            return self._take_free_live()

    def _take_this(self, w: int) -> bool:
        """Take worker `w` if it is free and live (True); never waits."""
        with self._cond:
            if w in self._free and _alive(w):
                self._free.remove(w)
                return True
            return False

    def _take_within(self, timeout: float) -> int | None:
        """A free live worker, waiting up to `timeout` seconds for one; else None."""
        with self._cond:
            if not self._workers and self._default:
                return 1
            w = self._take_free_live()
            if w is None and self._workers:
                self._cond.wait(timeout)
                w = self._take_free_live()
            return w

    def wait(self) -> None:
        with self._cond:
            while True:
                if not self._workers and self._default:
                    return
                w = self._take_free_live()
                if w is not None:
                    self._free.appendleft(w)
                    return
                if not self._workers:
                    raise RuntimeError("No active worker available in pool")
                self._cond.wait()

    def isready(self) -> bool:
        with self._cond:
            if not self._workers and self._default:
                return True
            w = self._take_free_live()
            if w is None:
                return False
            self._free.appendleft(w)
            return True

    def __len__(self) -> int:
        return len(self._workers)

    def workers(self) -> list[int]:
        if not self._workers and self._default:
            return [1]
        return sorted(self._workers)

    def _drop(self, w: int) -> None:
        with self._cond:
            if w in self._workers:
                self._workers.discard(w)
                try:
                    self._free.remove(w)
                except ValueError:
                    pass
                self._cond.notify_all()


def _pool_op(pool_id: int, op: str, args: tuple) -> Any:
    """Run on a pool's owner for a proxy elsewhere."""
    pool = _local_pools.get(pool_id)
    if pool is None:
        raise RuntimeError(f"worker pool {pool_id} no longer exists on process {PGRP.id}")
    return getattr(pool, op)(*args)


class _WorkerPoolProxy(AbstractWorkerPool):
    """A WorkerPool seen from another process: every operation runs on its owner."""

    def __init__(self, owner: int, pool_id: int):
        self.owner = owner
        self.pool_id = pool_id

    def __repr__(self) -> str:
        return f"<WorkerPool {self.pool_id} of process {self.owner}>"

    def __reduce__(self):
        return (_WorkerPoolProxy, (self.owner, self.pool_id))

    def _op(self, op: str, *args: Any) -> Any:
        if self.owner == PGRP.id:
            return _pool_op(self.pool_id, op, args)
        return call_fetch(self.owner, _pool_op, (self.pool_id, op, args))

    def push(self, w: int) -> None:
        self._op("push", w)

    def put(self, w: int) -> None:
        self._op("put", w)

    def take(self) -> int:
        return self._op("take")

    def try_take(self) -> int | None:
        return self._op("try_take")

    def wait(self) -> None:
        self._op("wait")

    def isready(self) -> bool:
        return self._op("isready")

    def __len__(self) -> int:
        return self._op("__len__")

    def workers(self) -> list[int]:
        return self._op("workers")

    def _give_back_later(self, w: int) -> None:
        # Giving back is a remote call: never make it from a connection's reading thread.
        threading.Thread(target=self.put, args=(w,), name="pydist-pool-put", daemon=True).start()


class CachingPool(WorkerPool):
    """A WorkerPool that sends each function to each worker once and reuses it from a cache on
    the worker (a RemoteChannel holding the function). Cannot be sent to other processes."""

    def __init__(self, workers: Iterable[int] = ()):
        super().__init__(workers)
        self._cache: dict[tuple[int, int], tuple[Any, _CacheRef]] = {}
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachingPool({sorted(self._workers)})"

    def __reduce__(self):
        raise TypeError("CachingPool objects are not serializable.")

    def clear(self) -> "CachingPool":
        """Forget every cached function (the workers free them)."""
        with self._cache_lock:
            self._cache.clear()
        return self

    def _prepare(self, w: int, f: Callable) -> tuple[Callable, tuple]:
        """Through the cache: ship `f` to `w` the first time, only its cache channel later."""
        if w == PGRP.id:
            return f, ()
        key = (w, id(f))
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] is f:
                return _exec_from_cache, (entry[1],)
            cache = _CacheRef(RemoteChannel(w))
            self._cache[key] = (f, cache)
        return _exec_and_cache, (f, cache.rc)


    def _unprepare(self, w: int, f: Callable) -> None:
        with self._cache_lock:
            entry = self._cache.get((w, id(f)))
            if entry is not None and entry[0] is f:
                del self._cache[(w, id(f))]

    def _call_failed(self, w: int, f: Callable, lead: tuple, started: bool = True) -> None:
        """Forget `f`'s cache channel on `w` if the call that was to fill it failed or did
        not run (it could not be unpickled there, its worker died, it was taken back), so
        that the next call sends `f` again. A failed call that only used the channel forgets
        it too (it may have found it empty); one taken back before it ran does not."""
        if not lead:
            return  # `f` was not cached (a call to this process)
        first = len(lead) > 1  # (f, rc): the call that was to fill the channel; else (cache,)
        if not started and not first:
            return  # it would only have used the channel
        rc: RemoteChannel = lead[-1] if first else lead[-1].rc
        with self._cache_lock:
            entry = self._cache.get((w, id(f)))
            if entry is not None and entry[0] is f and entry[1].rc is rc:
                del self._cache[(w, id(f))]
        if first:
            # The call that was to fill the channel failed: close it, so that calls already
            # sent that wait on it there fail now (if `f` did arrive, they still read it).
            # Without waiting: this may run in a connection's reading thread.
            try:
                remote_do(RemoteChannel.close, w, rc)
            except Exception:
                pass  # the worker is gone: so are the calls waiting there


def _exec_and_cache(f: Callable, rc: RemoteChannel, *args: Any, **kwargs: Any) -> Any:
    """On the worker: keep `f` in the cache channel (owned here), then run it."""
    rc.put(f)
    return f(*args, **kwargs)


class _CacheRef:
    """The caller's handle on the cache channel of a function on a worker, as the calls after
    the first carry it. It pickles to the channel's id alone, so a call sends no reference
    and no count message goes before it: it is unpickled on the worker, in frame order, as
    the channel itself (`_cache_channel`). The caller holds the channel meanwhile, and gives
    its count back only after the call has gone, through the same connection: so the channel
    is always there when the call arrives."""

    __slots__ = ("rc",)

    def __init__(self, rc: RemoteChannel) -> None:
        self.rc = rc

    def __reduce__(self):
        rc = self.rc
        return _cache_channel, (rc.where, rc.whence, rc.id)


def _cache_channel(where: int, whence: int, id_: int) -> Any:
    """On the worker, as a call is unpickled: the cache channel of `_CacheRef`. It may not
    have been made yet (the call that brings the function may come second, from another
    thread of the caller): it is made now, as that call would make it."""
    if where != PGRP.id:
        raise ValueError(f"CachingPool: a function cache of process {where} reached process "
                         f"{PGRP.id}")
    return STORE.lookup(RRID(whence, id_), _default_channel)


def _exec_from_cache(cache: Any, *args: Any, **kwargs: Any) -> Any:
    """On the worker: run the cached function from `cache`, this worker's channel for it
    (unpickled from a `_CacheRef`; a local peek, no message). It may wait for
    the call that brings it (calls run concurrently here); if that call failed before
    caching it (it could not be unpickled here), the pool closes the channel and this fails
    rather than wait for a function that never comes (the pool's next call sends it again)."""
    try:
        f = cache.fetch()
    except InvalidStateError:
        raise RuntimeError(f"CachingPool: the function never reached the cache of worker "
                           f"{PGRP.id}: the call that was to bring it failed") from None
    return f(*args, **kwargs)


# ==================================================================== the default pool
_default_pool: AbstractWorkerPool | None = None
_default_lock = threading.Lock()


def default_worker_pool() -> AbstractWorkerPool:
    """The pool that `remote` and pool-less calls use: on the master, every worker, filled as
    workers join and emptied as they leave (with none, `take` gives 1); on a worker, a proxy
    of the master's."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            if PGRP.is_master():
                pool = WorkerPool([p for p in procs() if p != 1])
                pool._default = True
                _default_pool = pool
            else:
                _default_pool = call_fetch(1, default_worker_pool)
        return _default_pool


def set_default_worker_pool(pool: AbstractWorkerPool) -> None:
    """Make `pool` the default worker pool of this process (Julia's `default_worker_pool!`)."""
    global _default_pool
    if not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"expected a worker pool, got {pool!r}")
    with _default_lock:
        _default_pool = pool


# Pools that take in every worker that joins, as the default pool does: the pool a pmap
# makes when given none (so that a running map uses workers added meanwhile).
_joining_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def pool_of_all_workers(cache: bool = True) -> WorkerPool:
    """A CachingPool (`cache`; else a WorkerPool) of every worker, which (on the master) also
    takes in the workers that join while it lives: the pool of a map given none."""
    pool = CachingPool() if cache else WorkerPool()
    _joining_pools.add(pool)  # first, so that a worker joining meanwhile is not missed
    for w in all_workers():
        pool.push(w)
    return pool


def worker_added(pid: int) -> None:
    """A new worker joins the default pool, and the pools that take in joining workers (a
    listener, registered by `runtime`)."""
    if _default_pool is not None and isinstance(_default_pool, WorkerPool) and _default_pool._default:
        _default_pool.push(pid)
    for pool in list(_joining_pools):
        pool.push(pid)


def worker_removed(pid: int, state: Any) -> None:
    """A lost worker leaves every pool of this process (registered by `runtime`)."""
    for pool in list(_local_pools.values()):
        pool._drop(pid)



def remote(f: Callable, pool: AbstractWorkerPool | None = None) -> Callable:
    """A function that runs `f` on a worker of `pool` (default: the default pool)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return remotecall_fetch(f, pool if pool is not None else default_worker_pool(),
                                *args, **kwargs)

    run.__name__ = f"remote({getattr(f, '__name__', 'f')})"
    return run


def _clear_globals(names: list[str]) -> None:
    main = sys.modules["__main__"].__dict__
    for name in names:
        if name in main:
            main[name] = None


def clear(pool_or_names: Any, pids: Any = None) -> Any:
    """`clear(caching_pool)` empties its function cache; `clear(names, pids=None)` sets those
    `__main__` globals to None on `pids` (default: all workers)."""
    if isinstance(pool_or_names, CachingPool):
        return pool_or_names.clear()
    names = [pool_or_names] if isinstance(pool_or_names, str) else list(pool_or_names)
    if pids is None:
        targets = [p for p in procs() if p != 1] or [1]
    elif isinstance(pids, int):
        targets = [pids]
    else:
        targets = list(pids)
    for pid in targets:
        remotecall_fetch(_clear_globals, pid, names)
    return None

