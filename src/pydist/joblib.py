"""A joblib backend that runs `joblib.Parallel` (and scikit-learn's `n_jobs`) on pydist workers.

Importing this module registers the backend under the name ``"pydist"`` (so does
`register()`, for those who prefer to say it)::

    import joblib
    import pydist.joblib

    pydist.addprocs(4)
    with joblib.parallel_config(backend="pydist"):
        joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

Each batch joblib makes (a `BatchedCalls`) becomes one `remotecall` on a free worker of a
pool (default: the default worker pool, every worker); at most `n_jobs` batches run at once.
A dispatch thread (one per backend, started by the first batch, ending when none is left)
takes workers from the pool and sends the batches, so that neither joblib's thread nor a
connection's reading thread ever waits for a worker; outcomes are fetched and handed to
joblib in the runtime's thread pool. An error reaches joblib as the `RemoteException` of
the call, which is also an instance of the original exception type, and a worker lost
mid-call as `ProcessExitedException`.

`import joblib` here is an absolute import: it finds the real joblib, never this module.
joblib is an optional dependency (``pip install 'pydist[joblib]'``); `import pydist` never
imports this module.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from typing import Any, Callable

import joblib
from joblib.parallel import (
    AutoBatchingMixin,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from .exceptions import PydistError
from .group import PGRP
from .remotecall import remotecall
from .threads import POOL
from .workerpool import AbstractWorkerPool, default_worker_pool

__all__ = ["BACKEND_NAME", "NoWorkersError", "PydistBackend", "register"]

log = logging.getLogger(__name__)

BACKEND_NAME = "pydist"

# How long the dispatch thread sleeps between looks at a pool whose workers are all busy
# with calls that are not ours (ours wake it as they finish) or while joblib's limit is
# reached: the bound of each of its waits.
_POLL_SECONDS = 0.05


class NoWorkersError(PydistError, RuntimeError):
    """The pydist joblib backend has no worker to run on: start some first (`addprocs`)."""


class _Batch:
    """One batch joblib submitted: its outcome, for `retrieve_result_callback`, and the
    `get(timeout)` of an `AsyncResult` (what `submit` returns)."""

    __slots__ = ("func", "callback", "ok", "value", "worker", "future", "_done")

    def __init__(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None) -> None:
        self.func = func
        self.callback = callback
        self.ok = False
        self.value: Any = None
        self.worker: int | None = None
        self.future: Any = None  # the remotecall's Future, while it runs
        self._done = threading.Event()

    def set(self, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value
        self._done.set()

    def get(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"joblib batch not done after {timeout} seconds")
        if not self.ok:
            raise self.value
        return self.value


class PydistBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend for pydist workers (registered as ``"pydist"``).

    `pool` (a `WorkerPool`; default: the default worker pool) is where batches run; pass it
    through joblib, as in ``parallel_config(backend="pydist", pool=WorkerPool([2, 3]))``.
    `n_jobs=-1` (the default under this backend, also when scikit-learn passes
    ``n_jobs=None``) means every worker of the pool, ``n_jobs=k`` at most `k` batches at
    once, ``-2`` all workers but one; `n_jobs=1`, or a pool of one worker, makes joblib run
    the calls in this process, as it does for every backend. With no worker at all,
    `NoWorkersError`. A `Parallel` inside a task runs in threads on that worker (a second
    level of nesting runs sequentially), as joblib does for its process backends.

    Running batches are not cancelled when another fails: they finish on their workers and
    joblib ignores their results; batches not yet started are dropped.
    """

    default_n_jobs = -1
    uses_threads = False
    supports_sharedmem = False
    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    # A remote call costs ~0.1-1 ms: batches of at least 0.2 s keep that negligible, and
    # at most 1 s keeps every worker busy until the end.
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(self, pool: AbstractWorkerPool | None = None, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if pool is not None and not isinstance(pool, AbstractWorkerPool):
            raise TypeError(f"pool must be a pydist worker pool, got {pool!r}")
        self._pool_arg = pool
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Batch] = deque()
        self._running = 0
        # The batches on workers: this holds their Futures, whose completion callbacks
        # give the workers back (a Future nobody holds is dropped with its callbacks).
        self._inflight: set[_Batch] = set()
        self._limit = 1 << 30  # set by `configure`
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by abort_everything: a batch being placed is dropped

    # ------------------------------------------------------------ sizing
    @property
    def pool(self) -> AbstractWorkerPool:
        """The worker pool batches run on."""
        return self._pool_arg if self._pool_arg is not None else default_worker_pool()

    def _nworkers(self) -> int:
        workers = [w for w in self.pool.workers() if w != PGRP.id]
        if not workers:
            raise NoWorkersError(
                f"the pydist joblib backend has no worker on process {PGRP.id}: start some "
                "with pydist.addprocs(n) (or run the script with `pydist -p N script.py`) "
                "before joblib.Parallel runs, or pass a pool that has workers")
        return len(workers)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches run at once: -1 (or None) is every worker of the pool, -2 all
        but one, a positive `n_jobs` at most that many. `NoWorkersError` without workers."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        n = self._nworkers()
        if n_jobs is None or n_jobs < 0:
            return max(n + 1 + (n_jobs or -1), 1)
        return min(n_jobs, n)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **backend_kwargs: Any) -> int:
        """Set up for one `Parallel`: returns (and enforces) its effective `n_jobs`."""
        self.parallel = parallel
        n = self.effective_n_jobs(n_jobs)
        with self._cond:
            self._limit = n
            self._cond.notify_all()
        return n

    def get_nested_backend(self) -> tuple[ParallelBackendBase, None]:
        """A `Parallel` inside a task runs in threads on its worker; deeper, sequentially."""
        level = (self.nesting_level or 0) + 1
        if level > 1:
            return SequentialBackend(nesting_level=level), None
        return ThreadingBackend(nesting_level=level), None

    # ------------------------------------------------------------ running batches
    def submit(self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None) -> _Batch:
        """Queue a batch; it runs on a free worker of the pool as soon as one is free and
        fewer than `n_jobs` batches run. `callback(batch)` follows its outcome."""
        batch = _Batch(func, callback)
        with self._cond:
            self._pending.append(batch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="pydist-joblib",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify_all()
        return batch

    # joblib 1.3 and 1.4 call apply_async; newer versions submit.
    apply_async = submit

    def retrieve_result_callback(self, out: _Batch) -> Any:
        """The batch's results, or its error raised (joblib calls this in `callback`)."""
        return out.get()

    def retrieve_result(self, out: _Batch, timeout: float | None = None) -> Any:
        """The batch's results, waiting up to `timeout` seconds."""
        return out.get(timeout)

    def _dispatch(self) -> None:
        """The dispatch thread: start pending batches while the limit allows; exits when
        none is pending (the next `submit` starts another)."""
        while True:
            with self._cond:
                while self._pending and self._running >= self._limit:
                    self._cond.wait(_POLL_SECONDS)
                if not self._pending:
                    self._thread = None
                    self._cond.notify_all()
                    return
                batch = self._pending.popleft()
                self._running += 1
                generation = self._generation
            pool = self.pool
            try:
                w = self._take(pool, generation)
            except BaseException as e:  # never lose a batch: joblib waits for each one
                self._finish(batch, pool, None, False, e)
                continue
            if w is None:  # aborted meanwhile: joblib wants no result
                self._running_done(pool, None)
                continue
            batch.worker = w
            try:
                fut = remotecall(batch.func, w)
            except BaseException as e:  # not picklable, or the worker is gone
                self._finish(batch, pool, w, False, e)
                continue
            batch.future = fut
            with self._cond:
                self._inflight.add(batch)
            # The callback may run in a connection's reading thread: the rest runs in the
            # runtime's thread pool (fetching a large result waits for it).
            fut.add_done_callback(functools.partial(self._later, batch, pool, w))

    def _take(self, pool: AbstractWorkerPool, generation: int) -> int | None:
        """A free worker of `pool`, or None once `abort_everything` has run."""
        while True:
            w = pool.try_take()
            with self._cond:
                if self._generation != generation:
                    break
                if w is not None:
                    return w
                self._cond.wait(_POLL_SECONDS)  # our batches wake it as they finish
        if w is not None:
            pool.put(w)
        return None

    def _later(self, batch: _Batch, pool: AbstractWorkerPool, w: int, fut: Any) -> None:
        run = functools.partial(self._landed, batch, pool, w, fut)
        if not POOL.submit(run):  # the runtime is stopping: finish here
            run()

    def _landed(self, batch: _Batch, pool: AbstractWorkerPool, w: int, fut: Any) -> None:
        try:
            value, ok = fut.fetch(), True
        except BaseException as e:
            value, ok = e, False
        self._finish(batch, pool, w, ok, value)

    def _running_done(self, pool: AbstractWorkerPool, w: int | None) -> None:
        """A batch has left its worker: give the worker back, make room for the next."""
        if w is not None:
            try:
                pool.put(w)
            except Exception:  # a proxy pool whose owner is gone: nothing to give back
                log.debug("pydist: could not give worker %s back to its pool", w, exc_info=True)
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def _finish(self, batch: _Batch, pool: AbstractWorkerPool, w: int | None, ok: bool,
                value: Any) -> None:
        with self._cond:
            self._inflight.discard(batch)
        batch.future = None
        self._running_done(pool, w)
        batch.set(ok, value)
        if batch.callback is not None:
            try:
                batch.callback(batch)
            except Exception:
                log.exception("pydist: error in joblib's batch callback")

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Drop the batches not started yet; running ones finish and are ignored."""
        with self._cond:
            self._pending.clear()
            self._generation += 1
            self._cond.notify_all()

    def terminate(self) -> None:
        """End of a `Parallel` that owned this backend: drop what was not started and let
        the dispatch thread end (up to 10 s)."""
        self.abort_everything()
        with self._cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)


def register(name: str = BACKEND_NAME, make_default: bool = False) -> None:
    """Register `PydistBackend` with joblib as `name` (done once when this module is
    imported; calling it again is harmless). `make_default=True` makes every
    `joblib.Parallel` use it without `parallel_config`."""
    joblib.register_parallel_backend(name, PydistBackend, make_default=make_default)


register()
