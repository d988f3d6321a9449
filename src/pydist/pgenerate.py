"""`pgenerate`: a streaming pmap (Julia's `pgenerate`).

`pgenerate(f, xs)` returns an iterator over `f(x)` for each `x`, run on the workers of a pool
as pmap runs them, but consuming its input lazily: it pulls an element (or a batch of
`batch_size`) only when fewer than WINDOW_PER_THREAD x nworkers of them have been pulled and
not yet yielded. So an infinite input works, memory stays bounded by the elements in flight
and those waiting for their turn, and a consumer that stops (takes 10 results and closes the
iterator, breaks out of its loop, or drops it) stops the work: nothing more is pulled or
started, the calls running finish and their results are dropped.

The work runs in `nworkers(pool)` runner threads owned by the iterator (started on its first
`next`, ended when it ends, is closed or is collected), each running one element or batch
at a time through the pool with pmap's on_error, retries and dead-worker handling
(`_element_runner`). The input is pulled in the consumer's thread, in `next`. Results come
in input order, or (`ordered=False`) as they complete. A failure without on_error is raised
at its position (as it completes, unordered), and ends the iterator.
"""

from __future__ import annotations

import collections
import operator
import threading
from typing import Any, Callable, Iterable, Iterator

from .calls import in_remote_call
from .pmap import (
    _all_retryable,
    _Batch,
    _element_runner,
    _Failed,
    _plan,
    _Progress,
    _run_on_pool,
    _split_pool,
    _unwrap,
)
from .workerpool import AbstractWorkerPool

__all__ = ["pgenerate"]

# Tasks (elements, or batches) pulled and not yet yielded, per runner thread: one running and
# one done or waiting for its turn. The bound on what a pgenerate holds.
WINDOW_PER_THREAD = 2

# A task's outcome: (True, result) or (False, exception), per element.
_Outcome = tuple[bool, Any]


class _Stream:
    """What a pgenerate's consumer (the generator, in `next`) and its runner threads share:
    the tasks pulled and waiting for a runner, and the outcomes not yet yielded."""

    def __init__(self, run: Callable[[Any], list[_Outcome]], nthreads: int,
                 ordered: bool) -> None:
        self.run, self.nthreads, self.ordered = run, nthreads, ordered
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # a task was queued, or the stream stopped
        self.ready = threading.Condition(self.lock)  # a task finished
        self.tasks: collections.deque[tuple[int, Any]] = collections.deque()
        self.done: dict[int, list[_Outcome]] = {}  # ordered: by task index
        self.finished: collections.deque[list[_Outcome]] = collections.deque()  # unordered
        self.failed_at: int | None = None  # the first task (by index) with a failed element
        self.stopped = False
        self.idle = 0  # runner threads waiting for a task
        self.threads: list[threading.Thread] = []

    def submit(self, index: int, task: Any) -> None:
        """Queue task `index` for a runner; start one if none is idle (up to `nthreads`)."""
        with self.lock:
            self.tasks.append((index, task))
            if self.idle:  # claim an idle runner (it counts itself idle again if need be)
                self.idle -= 1
                self.work.notify()
                return
            if len(self.threads) >= self.nthreads:
                return  # a busy runner takes it next
            t = threading.Thread(target=self._runner, name="pydist-pgenerate", daemon=True)
            self.threads.append(t)
        t.start()

    def _runner(self) -> None:
        """A runner thread: run tasks until the stream stops."""
        while True:
            with self.lock:
                while not self.tasks and not self.stopped:
                    self.idle += 1  # (`submit` takes it back when it wakes this one)
                    self.work.wait()
                if self.stopped:
                    return
                index, task = self.tasks.popleft()
                if self.ordered and self.failed_at is not None and index > self.failed_at:
                    continue  # after a failure, in order: never yielded
            try:
                outcome = self.run(task)
            except BaseException as e:
                outcome = [(False, e)]
            with self.lock:
                if self.stopped:
                    return
                if not all(ok for ok, _ in outcome) and (
                        self.failed_at is None or index < self.failed_at):
                    self.failed_at = index
                if self.ordered:
                    self.done[index] = outcome
                else:
                    self.finished.append(outcome)
                self.ready.notify()

    def failing(self) -> bool:
        with self.lock:
            return self.failed_at is not None

    def take(self, index: int) -> list[_Outcome]:
        """The outcome of task `index` (ordered), or of the next task to finish (unordered),
        waiting for it; only called for a task pulled and not yet taken."""
        with self.lock:
            if self.ordered:
                while index not in self.done:
                    self.ready.wait()
                return self.done.pop(index)
            while not self.finished:
                self.ready.wait()
            return self.finished.popleft()

    def stop(self) -> None:
        """No more tasks run: queued ones are dropped, runners end after their current task
        (its outcome dropped)."""
        with self.lock:
            self.stopped = True
            self.tasks.clear()
            self.done.clear()
            self.finished.clear()
            self.work.notify_all()


def pgenerate(f: Callable, *iterables: Any, pool: AbstractWorkerPool | None = None,
              ordered: bool = True, distributed: bool = True, batch_size: int | str = 1,
              on_error: Callable | None = None, retry_delays: Iterable[float] = (),
              retry_check: Callable | None = None, progress: bool = False) -> Iterator:
    """An iterator over `f` mapped over `iterables` (zipped, like `map`) on the workers of
    `pool`, as `pmap` but streaming: the input is consumed lazily (an infinite one works) and
    at most ``2 * nworkers(pool)`` elements (or batches of `batch_size`) are pulled and not
    yet yielded. Results come in input order, or as they complete with ``ordered=False``.

    Nothing starts before the first `next`. Closing the iterator (`close()`, leaving a
    `for` loop, dropping it) stops the work: no more input is pulled, the calls running
    finish and their results are dropped. A failure is raised at its position (as it
    completes, unordered) and ends the iterator, as does an error raised by the input.

    The keywords are pmap's: `pool` (also positional after `f`), `distributed=False` (run in
    threads here), `batch_size` (an int, or "auto" from the input's length hint),
    `on_error`, `retry_delays`, `retry_check`, and `progress` (a count, as the total is
    unknown).
    """
    pool, iterables = _split_pool("pgenerate", pool, iterables)
    source: Iterator[tuple] = (zip(iterables[0]) if len(iterables) == 1
                               else zip(*iterables))
    hint = min(operator.length_hint(it, 0) for it in iterables)
    pool, nworkers, distributed, batch_size = _plan("pgenerate", pool, distributed,
                                                    batch_size, hint)
    delays = list(retry_delays)
    return _generate(f, source, pool, ordered, distributed, batch_size, on_error, delays,
                     retry_check, nworkers, progress)


def _generate(f: Callable, source: Iterator[tuple], pool: AbstractWorkerPool, ordered: bool,
              distributed: bool, batch_size: int, on_error: Callable | None, delays: list,
              check: Callable | None, nworkers: int, progress: bool) -> Iterator:
    """The generator behind `pgenerate` (its body runs from the first `next`)."""
    lend = in_remote_call()  # as pmap: decided by the thread that consumes
    run_one = _element_runner(f, pool, distributed, on_error, delays, check, lend)
    run: Callable[[Any], list[_Outcome]]
    if batch_size == 1:
        def run(args: tuple) -> list[_Outcome]:
            return [(True, run_one(args))]
    else:
        run = _batch_runner(f, pool, on_error, delays, check, lend)
    stream = _Stream(run, nworkers, ordered)
    window = WINDOW_PER_THREAD * nworkers
    pulled = taken = 0  # tasks pulled from the input, and tasks whose outcome was taken
    input_error: BaseException | None = None
    exhausted = False
    bar = _Progress(progress, None, "pgenerate")
    try:
        while True:
            while not exhausted and pulled - taken < window and not stream.failing():
                batch: list[tuple] = []
                try:
                    while len(batch) < batch_size:
                        batch.append(next(source))
                except StopIteration:
                    exhausted = True
                except Exception as e:  # raised after the elements pulled before it
                    exhausted, input_error = True, e
                if batch:
                    stream.submit(pulled, batch[0] if batch_size == 1 else batch)
                    pulled += 1
            if taken == pulled:
                if input_error is not None:
                    raise input_error
                return
            outcome = stream.take(taken)
            taken += 1
            for ok, value in outcome:
                if not ok:
                    raise value
                bar.update()
                yield value
    finally:
        stream.stop()
        bar.close()


def _batch_runner(f: Callable, pool: AbstractWorkerPool, on_error: Callable | None,
                  delays: list, check: Callable | None, lend: bool
                  ) -> Callable[[list], list[_Outcome]]:
    """`run(batch)`: one batch in one call through the pool, an outcome per element. As
    pmap's batches: failed elements are retried one by one with the remaining delays (if
    `check` lets every one of them), else given to on_error here."""
    run_batch = _Batch(f, True)
    retry_one = _element_runner(f, pool, True, on_error, delays[1:], check, lend)

    def run(batch: list) -> list[_Outcome]:
        try:
            results = _run_on_pool(pool, run_batch, (batch,), lend)
        except Exception as e:  # the whole batch failed (its worker died...)
            results = [_Failed(args, _unwrap(e)) for args in batch]
        failed = [r for r in results if isinstance(r, _Failed)]
        if not failed:
            return [(True, r) for r in results]
        retry = bool(delays) and (check is None or _all_retryable(check, [r.exc for r in failed]))
        out: list[_Outcome] = []
        for r in results:
            if not isinstance(r, _Failed):
                out.append((True, r))
                continue
            try:
                if retry:
                    out.append((True, retry_one(r.args)))
                elif on_error is not None:
                    out.append((True, on_error(r.exc)))
                else:
                    out.append((False, r.exc))
            except Exception as e:
                out.append((False, e))
            if not out[-1][0]:
                break  # the elements after it are never yielded
        return out

    return run
