"""`pmap`: a parallel map over a worker pool, with Julia's keywords.

Elements (or batches of elements) go to free workers of the pool, every free worker getting
one before any gets a second; each worker runs one at a time (with the next already queued
there, see "pipelined maps" below); results come back in input order. A local map
(`distributed=False`) runs `nworkers(pool)` elements at a time in threads, and the elements
of a batch do not wait behind a blocking one (`_BatchRun`), as Julia's `asyncmap` would.
`on_error`, `retry_delays` and `retry_check` behave as in Julia: with `batch_size=1` the
`on_error` handler runs on the worker and retries run on the caller; with batches, failed
elements are retried one by one and `on_error` runs on the caller. An element whose worker dies fails with
`ProcessExitedException`: it is retried elsewhere, or (beyond Julia, for `batch_size=1`)
given to `on_error` on the caller, or stops the map; the dead worker gets nothing more.

A pmap never deadlocks when nested: a process that is itself running a remote call and finds
no free worker runs the element itself instead of waiting (it is a worker of the outer map,
lending itself to its own inner map). On the master, pmap waits for workers as usual.

A running map also uses workers that join its pool while it runs (beyond Julia for a map
given no pool, whose pool takes in every worker added meanwhile): it looks for them every
_GROW_POLL seconds while elements wait.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import operator
import os
import queue
import random
import reprlib
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .calls import call_async, in_remote_call, run_user_call, take_reply
from .cluster import myid
from .exceptions import (ProcessExitedException, PydistError, RemoteException,
                         SerializationError)
from .refs import Future
from .remotecall import remote_do, remotecall, remotecall_fetch
from .serialization import ships_by_name
from .threads import LEND_SECONDS, POOL, WATCHDOG
from .workerpool import AbstractWorkerPool, pool_of_all_workers

log = logging.getLogger(__name__)

__all__ = ["pmap", "ExponentialBackOff"]


class ExponentialBackOff:
    """The delays of `n` retries, as Julia's `ExponentialBackOff`: the first is `first_delay`
    exactly; each next one is the previous times `factor`, times a random `1 +/- jitter`,
    capped at `max_delay` (so the jitter compounds, as in Julia)."""

    def __init__(self, n: int = 1, first_delay: float = 0.05, max_delay: float = 10.0,
                 factor: float = 5.0, jitter: float = 0.1):
        if n < 0 or first_delay < 0 or max_delay < 0 or factor <= 0 or not 0 <= jitter <= 1:
            raise ValueError("ExponentialBackOff: n, delays >= 0, factor > 0, 0 <= jitter <= 1")
        self.n, self.first_delay, self.max_delay = n, first_delay, max_delay
        self.factor, self.jitter = factor, jitter

    def __iter__(self) -> Iterator[float]:
        delay = min(self.first_delay, self.max_delay)
        for _ in range(self.n):
            yield delay
            noise = 1 - self.jitter + 2 * self.jitter * random.random()
            delay = min(self.max_delay, delay * self.factor * noise)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"ExponentialBackOff(n={self.n}, first_delay={self.first_delay}, "
                f"max_delay={self.max_delay}, factor={self.factor}, jitter={self.jitter})")


class _Apply:
    """`fn(*args)`, with `on_error(exc)` as the result of a failing element when given.
    Picklable, so that it runs on the worker (Julia ships this wrapper too)."""

    def __init__(self, fn: Callable, on_error: Callable | None):
        self.fn = fn
        self.on_error = on_error

    def __call__(self, *args: Any) -> Any:
        if self.on_error is None:
            return self.fn(*args)
        try:
            return self.fn(*args)
        except Exception as e:
            return self.on_error(e)


class _Failed:
    """A failed element of a batch, kept for retry or on_error on the caller."""

    def __init__(self, args: tuple, exc: BaseException):
        self.args = args
        self.exc = exc


# A batch runs its elements in the calling thread, one after another, which costs nothing per
# element. An element that blocks (sleep, I/O) must not hold back the rest of its batch
# (Julia runs a batch through `asyncmap`): when an element has been blocked for OVERLAP_AFTER
# seconds, a pool thread starts on the next elements (up to BATCH_TASKS threads run one batch,
# Julia's asyncmap default). Blocked: no thread of the batch is running or runnable (the
# kernel's thread state, where /proc has it) and the process used less than BLOCKED_CPU of a
# core meanwhile. Elements that compute stay in one thread: more would only share the GIL.
# The watchdog's tick, already running while calls run, notices.
OVERLAP_AFTER = 0.005
BLOCKED_CPU = 0.5
BATCH_TASKS = 100


def _runnable(native_id: int) -> bool:
    """The thread is running or waiting for a CPU (state R in /proc); False where that cannot
    be read (the CPU-time rule alone then tells computing from blocked)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    end = stat.rfind(b")")  # the thread's name, in parentheses, may hold anything
    return stat[end + 2:end + 3] == b"R"


class _BatchRun:
    """One batch running on this process. The calling thread maps `fn` over the batch at C
    speed (`map`, no Python code per element but `fn`). If an element blocks, the watchdog
    takes the rest of the batch from that map at once (`_split`) and the threads that run it
    from then on (the calling thread too, once its element ends) claim its elements one by
    one from a shared iterator of indices (claiming is atomic: a range iterator's `next`
    holds the GIL), so each element runs once whichever thread takes it."""

    __slots__ = ("fn", "batch", "capture", "star", "out", "unmapped", "rest", "claims",
                 "error", "lock", "ended", "helpers", "limit", "finished", "seen", "since",
                 "cpu_since", "threads")

    def __init__(self, fn: Callable, batch: list, capture: bool, star: bool = True) -> None:
        self.fn, self.batch, self.capture, self.star = fn, batch, capture, star
        self.out: list = []  # the outcomes of the mapped elements, in order
        self.unmapped = iter(batch)  # what the calling thread's map has not reached yet
        self.rest: list = []  # the outcomes of the elements split off (from `len(out)` on)
        self.claims: Iterator[int] | None = None  # their indices, not claimed yet
        self.error: BaseException | None = None  # the first, without `capture`
        self.lock = threading.Lock()
        self.ended: threading.Condition | None = None  # a helper ended (made with the first)
        self.helpers = 0  # helper threads started and not yet ended
        self.limit = min(BATCH_TASKS, len(batch)) - 1
        self.finished = False  # the calling thread is done with its part: no more helpers
        self.seen = -1  # elements started at the last tick ...
        self.since = 0.0  # ... since when ...
        self.cpu_since = 0.0  # ... and the process's CPU time then
        self.threads: set[int] = set()  # native ids of the threads that ran elements

    def _map(self) -> None:
        """In the calling thread: the elements in order, until none is left to map (the
        batch ended, or the watchdog split the rest off) or one failed without `capture`."""
        fn, out = self.fn, self.out
        mapped = itertools.starmap(fn, self.unmapped) if self.star else map(fn, self.unmapped)
        while True:
            try:
                out.extend(mapped)  # (what `extend` appended stays if an element raises)
                return
            except Exception as e:
                if not self.capture:
                    raise
                out.append(self._failed(len(out), e))  # (the last element the map took)

    def _claim(self) -> None:
        """Run elements of the split-off rest until none is left to claim."""
        fn, batch, star = self.fn, self.batch, self.star
        rest, first = self.rest, len(batch) - len(self.rest)
        for i in self.claims:  # type: ignore[union-attr]
            try:
                rest[i - first] = fn(*batch[i]) if star else fn(batch[i])
            except Exception as e:
                if not self.capture:
                    raise
                rest[i - first] = self._failed(i, e)

    def _failed(self, i: int, e: Exception) -> _Failed:
        """Element `i` raised `e` (with `capture`)."""
        return _Failed(self.batch[i] if self.star else (self.batch[i],), e)

    def _stop(self, e: BaseException) -> None:
        """An element failed (without `capture`) or the run was interrupted: nothing more
        starts."""
        with self.lock:
            if self.error is None:
                self.error = e
            collections.deque(self.unmapped, maxlen=0)
            if self.claims is not None:
                collections.deque(self.claims, maxlen=0)

    def _split(self) -> bool:
        """Lock held: take the elements the calling thread's map has not reached yet from
        it, to be claimed one by one; False if none is left. The map's iterator is emptied
        in one C call, so the map gets no element after the split, and the split gets every
        element the map did not take."""
        left = list(self.unmapped)
        if not left:
            return False
        first = len(self.batch) - len(left)
        self.rest = [None] * len(left)
        self.claims = iter(range(first, len(self.batch)))
        return True

    def _started(self) -> int:
        """How many elements have started so far."""
        left = self.claims if self.claims is not None else self.unmapped
        return len(self.batch) - operator.length_hint(left)

    def _watchdog_tick(self, now: float) -> None:
        """The watchdog's tick (every LEND_SECONDS while watched): if the element running
        has been blocked for OVERLAP_AFTER seconds and elements are left, start a helper on
        them. Never blocks."""
        started = self._started()
        if started != self.seen:
            self.seen, self.since, self.cpu_since = started, now, time.process_time()
            return
        waited = now - self.since
        if started >= len(self.batch) or waited < OVERLAP_AFTER:
            return
        cpu = time.process_time()
        if (cpu - self.cpu_since >= BLOCKED_CPU * waited
                or any(_runnable(t) for t in list(self.threads))):  # computing, not blocked
            self.since, self.cpu_since = now, cpu
            return
        with self.lock:
            if self.finished or self.helpers >= self.limit:
                return
            if self.claims is None and not self._split():
                return
            if self.ended is None:
                self.ended = threading.Condition(self.lock)
            self.helpers += 1
        self.since, self.cpu_since = now, cpu  # the next helper only if this one is held up too
        if not POOL.submit(self._help):
            self._helper_ended()

    def _help(self) -> None:
        """In a pool thread: run elements as a remote call would (so that `interrupt` and the
        interruptible waits reach them)."""
        try:
            run_user_call(self._work_claimed, (), _NO_KWARGS)
        finally:
            self._helper_ended()

    def _work_claimed(self) -> None:
        self.threads.add(threading.get_native_id())
        try:
            self._claim()
        except BaseException as e:
            self._stop(e)

    def _helper_ended(self) -> None:
        with self.lock:
            self.helpers -= 1
            if not self.helpers and self.ended is not None:
                self.ended.notify_all()

    def run(self) -> list:
        self.threads.add(threading.get_native_id())
        WATCHDOG.watch(self)
        try:
            try:
                self._map()
            except BaseException as e:
                self._stop(e)
            with self.lock:
                split = self.claims is not None
            if split and self.error is None:
                self._work_claimed()
        finally:
            WATCHDOG.unwatch(self)
            with self.lock:
                self.finished = True
                if self.claims is not None:  # (interrupted: stop the helpers)
                    collections.deque(self.claims, maxlen=0)
                while self.helpers and self.ended is not None:  # each ends with its element
                    self.ended.wait()
        if self.error is not None:
            raise self.error
        self.out.extend(self.rest)
        return self.out


def _run_batch(fn: Callable, batch: list, capture: bool, star: bool = True) -> list:
    """On the worker: the results of one batch, of argument tuples (`star`) or of single
    arguments; failures become `_Failed` if `capture`. A blocking element lets the next ones
    start in other threads (see `_BatchRun`)."""
    if len(batch) > 1:
        return _BatchRun(fn, batch, capture, star).run()
    out = []
    for x in batch:
        args = x if star else (x,)
        try:
            out.append(fn(*args))
        except Exception as e:
            if not capture:
                raise
            out.append(_Failed(args, e))
    return out


class _Batch:
    """On the worker: the results of `fn` over one batch of argument tuples (`star`) or of
    single arguments (a map over one iterable: no tuple per element to build, pickle and
    unpack); failures become `_Failed` if `capture`. One per map (as Julia's batch
    closure), so that a CachingPool sends it, and `fn` with it, once per worker rather than
    with every batch (a map given no pool uses none if `fn` ships by name: then the batch
    costs its name each time)."""

    def __init__(self, fn: Callable, capture: bool, star: bool = True):
        self.fn = fn
        self.capture = capture
        self.star = star

    def __call__(self, batch: list) -> list:
        return _run_batch(self.fn, batch, self.capture, self.star)


def _unwrap(exc: BaseException) -> BaseException:
    return exc.captured.ex if isinstance(exc, RemoteException) else exc


def _run_on_pool(pool: AbstractWorkerPool, fn: Callable, args: tuple, lend: bool) -> Any:
    """One call through the pool. With `lend` (the map was started inside a remote call), this
    process runs the call itself rather than wait for a free worker: that is what keeps
    nested maps from deadlocking."""
    if lend:
        w = pool.try_take()
        if w is None:
            return fn(*args)
    else:
        w = pool.take()
    try:
        return pool._call_on(w, fn, args, {})
    finally:
        pool.put(w)


def _ask(check: Callable, state: Any, exc: BaseException) -> tuple[Any, bool]:
    """Julia's `retry_check(state, exc)`: returns (state, retry?) or just retry?."""
    verdict = check(state, exc)
    return verdict if isinstance(verdict, tuple) else (state, verdict)


def _with_retries(run: Callable[[tuple], Any], delays: list, check: Callable | None):
    """`run` with Julia's `retry(delays=, check=)`: failures are unwrapped from
    RemoteException, `check(state, exc) -> (state, retry?)` may stop the retries."""

    def attempt(args: tuple) -> Any:
        state = None
        pending = iter(delays)
        tries = 0
        while True:
            try:
                return run(args)
            except Exception as e:
                exc = _unwrap(e)
                tries += 1
                delay = next(pending, None)
                if delay is not None and check is not None:
                    state, again = _ask(check, state, exc)
                    if not again:
                        delay = None
                if delay is None:
                    log.debug("pmap: element %s failed (attempt %d: %r), no retry left",
                              _short(args), tries, exc)
                    raise exc from (e if exc is not e else None)
                log.debug("pmap: element %s failed (attempt %d: %r), retry in %.3g s",
                          _short(args), tries, exc, delay)
                time.sleep(delay)

    return attempt


def _short(args: tuple) -> str:
    """An element's arguments for a log record, at most about 100 characters."""
    return reprlib.repr(args[0] if len(args) == 1 else args)


class _TextBar:
    """A progress bar on stderr for when tqdm is not installed: `pmap: [####    ] 12/30`
    (without a total, as for pgenerate: `pgenerate: 12`), redrawn in place at most every
    REDRAW seconds (and at the end)."""

    REDRAW = 0.1
    WIDTH = 30

    def __init__(self, total: int | None, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.start = self.drawn = time.monotonic()
        self.draw()

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.drawn >= self.REDRAW or (self.total is not None and self.n >= self.total):
            self.drawn = now
            self.draw()

    def draw(self, end: str = "") -> None:
        took = time.monotonic() - self.start
        if self.total is None:
            text = f"{self.desc}: {self.n} {took:.1f}s"
        else:
            filled = self.WIDTH * self.n // self.total if self.total else self.WIDTH
            bar = "#" * filled + " " * (self.WIDTH - filled)
            text = f"{self.desc}: [{bar}] {self.n}/{self.total} {took:.1f}s"
        try:
            sys.stderr.write(f"\r{text}{end}")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed: no bar

    def close(self) -> None:
        self.draw("\n")


class _Progress:
    """`progress=True`: a tqdm bar when tqdm can be imported, else a `_TextBar`; `total` is
    None when unknown (a stream)."""

    def __init__(self, enabled: bool, total: int | None, desc: str = "pmap"):
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = _TextBar(total, desc)
            else:
                self.bar = tqdm(total=total, desc=desc)
        self.lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parallel_map(run: Callable[[Any], Any], items: list, ntasks: int, progress: _Progress,
                  weight: Callable[[Any], int] = lambda _: 1,
                  grow: Callable[[], int] | None = None) -> list:
    """Results of `run(item)` in order, `ntasks` at a time; the first error stops the map and
    is raised. With `grow` (the pool's current size), the calling thread watches it every
    _GROW_POLL seconds and runs more at a time when it grows (workers joined)."""
    results: list = [None] * len(items)
    if not items:
        return results
    ntasks = max(1, min(ntasks, len(items)))
    claimed = 0  # items taken by a thread so far
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop() -> None:
        nonlocal claimed
        while True:
            with lock:
                if errors or claimed == len(items):
                    return
                i = claimed
                claimed += 1
            try:
                results[i] = run(items[i])
            except BaseException as e:
                with lock:
                    errors.append(e)
                return
            progress.update(weight(items[i]))

    def start(n: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=loop, name="pydist-pmap", daemon=True)
                   for _ in range(n)]
        for t in threads:
            t.start()
        return threads

    if grow is not None:
        running = start(ntasks)
        while running:
            running[0].join(_GROW_POLL)
            running = [t for t in running if t.is_alive()]
            with lock:
                left = 0 if errors else len(items) - claimed
            if left:
                try:
                    size = grow()
                except Exception:  # (a pool owned elsewhere, unreachable): no growth
                    size = 0
                more = min(size, len(running) + left) - len(running)
                if more > 0:
                    running += start(more)
    elif ntasks == 1:
        loop()
    else:
        threads = start(ntasks - 1)
        loop()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


# ==================================================================== pipelined maps
# A worker runs one element of a map at a time, but the next one is already there when it
# finishes: the caller keeps PIPELINE_DEPTH calls in flight per worker (BATCH_PIPELINE_DEPTH
# for batches), and the worker runs them in the order sent (a *lane*). A second call goes to
# a worker only when every free worker of the pool has one. At the end of the input (or when
# a shared pool gives a worker back), an element still queued behind a running one is taken
# back (if it has not started) and given to a worker that is idle, so no element waits
# behind a long one while a worker has nothing to do (if the wait would be long enough to
# be worth the round trip, see `worth_moving`).
PIPELINE_DEPTH = 2
# Batches keep one more in flight: a batch is a good share of its worker's part of the map
# ("auto": a quarter), so a reply's round trip between two of them idles the worker for a
# larger share of the map than between two elements; the tail moves (`worth_moving`) still
# rebalance a batch that runs long.
BATCH_PIPELINE_DEPTH = 3


class _NotRun:
    """A lane's answer for an element it did not run (taken back, or its map had ended).
    Pickled by reference, so the caller tells it by identity (`is _CANCELLED`) and never
    takes it for a value of the map."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return "_CANCELLED"

    def __repr__(self) -> str:
        return "<pmap: element not run>"


_CANCELLED = _NotRun()
_NO_KWARGS: dict = {}
_LANE_LINGER = 0.005  # how long a lane's runner waits for the next element after a long one (s)
_POOL_POLL = 0.02  # how often a map looks for a worker given back to a shared pool (s)
# A call queued behind a running one moves to an idle worker only if the running one will
# likely run at least this much longer (s): taking a call back costs a round trip, which
# waits behind the running call if it computes (see `_pipelined_map.worth_moving`).
_MOVE_AFTER = 0.005
_GROW_POLL = 0.1  # how often a running map looks for workers that joined its pool (s)


class _Lane:
    """On a worker: the elements of one map sent here, run one at a time in the order sent.

    An element that finds the lane idle runs it in its own thread: itself, then each next
    element already queued there (their replies are taken over, `take_reply`, and each
    leaves as its element ends). So consecutive elements follow each other in one thread,
    with no hand-off between threads."""

    __slots__ = ("lock", "arrived", "turn", "queued", "cancelled", "running", "waiting",
                 "closed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)  # an element or a cancel came in
        self.turn = 0  # the sequence number to run next; those below it started or were skipped
        self.queued: dict[int, tuple] = {}  # seq -> (fn, args, reply), waiting for its turn
        self.cancelled: set[int] = set()  # taken back, not yet skipped
        self.running = False  # some thread is running the lane
        self.waiting = False  # ... and waits for the next element (see _run_lane)
        self.closed = False

    def wake(self) -> None:
        """Lock held: the lane changed; wake its runner if it waits."""
        if self.waiting:
            self.arrived.notify()


_lanes: dict[str, _Lane] = {}
_closed_lanes: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_MAX_CLOSED_LANES = 1024  # remembered, so that a call arriving after its map ended returns
_lanes_lock = threading.Lock()


def _lane(key: str) -> _Lane:
    with _lanes_lock:
        lane = _lanes.get(key)
        if lane is None:
            lane = _Lane()
            if key in _closed_lanes:  # its map has ended: do not keep it
                lane.closed = True
            else:
                _lanes[key] = lane
        return lane


def _lane_run(key: str, seq: int, fn: Callable, args: tuple) -> None:
    """On the worker: run `fn(*args)` when element `seq` of lane `key` has its turn, and reply
    with its outcome then; reply _CANCELLED without running it if it was taken back or its
    map has ended."""
    reply = take_reply()
    lane = _lane(key)
    with lane.lock:
        skip = lane.closed or seq < lane.turn
        if not skip:
            lane.queued[seq] = (fn, args, reply)
            lane.wake()
        run = not (skip or lane.running)
        if run:
            lane.running = True
    if skip:
        reply(True, _CANCELLED)
    elif run:
        _run_lane(lane)


def _run_lane(lane: _Lane) -> None:
    """Run the lane's elements in order for as long as the next one is already here.

    An element's reply leaves from this thread before the next element starts, unless the
    element spent most of its time waiting (sleep, I/O) rather than computing: then a pool
    thread sends it while the next element runs, as that one will most likely leave the GIL
    to it as well. A computing element's reply never waits behind the next one.

    After an element that ran long, this thread no longer reads its connection (the
    watchdog gave the reading role to another): if the next element is not here yet, it
    waits a moment for it rather than leave, so that the next one does not start in the
    reading thread (which would have to hand its role on again)."""
    ended = None  # (reply, outcome, waited) of the element that just ended
    linger = False  # the element that just ended ran long
    while True:
        with lane.lock:
            seq = lane.turn
            item = lane.queued.pop(seq, None)
            cancelled = seq in lane.cancelled
            if cancelled:
                lane.cancelled.discard(seq)  # skipped now; if not here yet, on arrival
            stop = False
            if cancelled or item is not None:
                lane.turn = seq + 1
            elif not linger or lane.closed:
                lane.running, stop = False, True
        if ended is not None:
            reply, outcome, waited = ended
            ended = None
            if waited and item is not None and not cancelled:
                POOL.submit(functools.partial(reply, *outcome))  # type: ignore[misc]
            else:
                reply(*outcome)  # type: ignore[misc]
        if item is None:
            if stop:
                return
            if cancelled:
                continue
            linger = False  # wait once: if nothing comes, the next pass leaves
            with lane.lock:
                if lane.turn not in lane.queued and lane.turn not in lane.cancelled \
                        and not lane.closed:
                    lane.waiting = True
                    lane.arrived.wait(_LANE_LINGER)
                    lane.waiting = False
            continue
        fn, args, reply = item
        if cancelled:
            reply(True, _CANCELLED)
            continue
        cpu, wall = time.thread_time(), time.perf_counter()
        outcome = run_user_call(fn, args, _NO_KWARGS)
        took = time.perf_counter() - wall
        waited = 2 * (time.thread_time() - cpu) < took
        linger = took >= LEND_SECONDS
        ended = (reply, outcome, waited)


def _lane_cancel(key: str, seq: int) -> bool:
    """On the worker: take element `seq` of lane `key` back; False if it has started.

    Also how the caller tells a lane that element `seq` will never arrive (its call failed
    before reaching the lane: it could not be unpickled here): the elements queued behind it
    then run, in a pool thread, instead of waiting for it forever."""
    lane = _lane(key)
    with lane.lock:
        if seq < lane.turn:
            return False
        lane.cancelled.add(seq)
        item = lane.queued.pop(seq, None)
        lane.wake()
        start = not lane.running and bool(lane.queued)
        if start:
            lane.running = True
    if item is not None:
        item[2](True, _CANCELLED)
    if start and not POOL.submit(functools.partial(_run_lane, lane)):
        with lane.lock:
            lane.running = False  # the runtime is stopping: nothing runs any more
    return True


def _lane_close(key: str) -> None:
    """On the worker: the map has ended; elements still waiting are answered at once."""
    with _lanes_lock:
        lane = _lanes.pop(key, None)
        _closed_lanes[key] = None
        while len(_closed_lanes) > _MAX_CLOSED_LANES:
            _closed_lanes.popitem(last=False)
    if lane is not None:
        with lane.lock:
            lane.closed = True
            lane.wake()
            waiting = list(lane.queued.values())
            lane.queued.clear()
        for _, _, reply in waiting:
            reply(True, _CANCELLED)


_lane_ids = itertools.count()


class _Slot:
    """An element in flight: its index, the worker and lane sequence number, what the pool
    prepared for it (`_prepare`'s lead), and where its outcome lands (`_call_lane`)."""

    __slots__ = ("index", "worker", "seq", "lead", "reply", "stolen")

    def __init__(self, index: int, worker: int, seq: int, lead: tuple) -> None:
        self.index, self.worker, self.seq, self.lead = index, worker, seq, lead
        self.reply: Any = None
        self.stolen = False

    def outcome(self) -> Any:
        """The element's value; raises its failure."""
        reply = self.reply
        if isinstance(reply, Future):
            return reply.fetch()
        if reply.ok:
            return reply.value
        raise reply.value


def _call_lane(w: int, args: tuple, landed: Callable[[_Slot], None], slot: _Slot) -> Any:
    """Send `_lane_run(*args)` to worker `w`; `landed(slot)` runs once its outcome is there.

    A call to another process waits for its reply in a reply slot (`calls.call_async`): the
    outcome comes back in the reply, and nothing is kept on the worker for a Future (no
    reference to release afterwards, a large result in the same message). A call to this
    process runs in a thread of its own, through a Future (`remotecall`)."""
    if w != myid():
        return call_async(w, _lane_run, args, None, lambda _: landed(slot))
    fut = remotecall(_lane_run, w, *args)
    fut.add_done_callback(lambda _: landed(slot))
    return fut


def _worker_died(exc: BaseException) -> bool:
    """`exc` says the worker of the call is gone (not a remote call that failed with it)."""
    return isinstance(exc, ProcessExitedException) and not isinstance(exc, RemoteException)


def _pipelined_map(pool: AbstractWorkerPool, fn: Callable, items: list, progress: _Progress,
                   weight: Callable[[Any], int] = lambda _: 1,
                   on_failure: Callable[[Any, BaseException], Any] | None = None,
                   depth: int = PIPELINE_DEPTH) -> list:
    """Results of `fn(*item)` for each item, in order, run on the pool's workers with
    `depth` calls in flight per worker (see `_Lane`). A failure becomes
    `on_failure(item, exc)`, or (without it, or if that raises) stops the map: calls not yet
    started are taken back, and the error is raised once the others have finished. A worker
    goes back to the pool as soon as it has nothing left to do; one that dies is never sent
    anything again (its calls fail with ProcessExitedException; an element not yet sent to
    it goes to another worker)."""
    results: list = [None] * len(items)
    if not items:
        return results
    key = f"{myid()}:{next(_lane_ids)}"
    done: "queue.SimpleQueue[_Slot | None]" = queue.SimpleQueue()  # None: look again
    # The map's state below is the main loop's, but while it waits for `done`, a reading
    # thread where a call's outcome lands may hold it to send that worker its next element
    # at once (`landed`); each holds `state` meanwhile.
    state = threading.Lock()
    raised: list[BaseException] = []  # what a send in `landed` raised (the main loop raises it)
    inflight: dict[int, list[_Slot]] = {}  # the workers held -> their calls, oldest first
    next_seq: dict[int, int] = {}
    used: set[int] = set()
    lost: set[int] = set()  # workers held that died: their calls fail, nothing more is sent
    wanted = max(1, pool.nworkers())
    todo = 0  # the next index to send
    unsent: collections.deque[int] = collections.deque()  # to send again: their worker died
    pending = 0  # calls whose Future has not been handled yet
    errors: list[BaseException] = []
    # When each held worker's running call started (about: when its previous one ended), and
    # how long the map's calls have run so far: to tell a long call from a usual one.
    started: dict[int, float] = {}
    ran, ran_count = 0.0, 0
    look_again_at: float | None = None  # a move declined for now (see `worth_moving`)

    def has_work() -> bool:
        return todo < len(items) or bool(unsent)

    def next_index() -> int:
        nonlocal todo
        if unsent:
            return unsent.popleft()
        todo += 1
        return todo - 1

    def lose(w: int) -> None:
        """`w` died: hold it only until its calls have failed, and never send to it again."""
        nonlocal wanted
        if w not in lost:
            wanted = max(1, wanted - 1)  # the pool drops it too
        lost.add(w)
        if not inflight.get(w, True):
            del inflight[w]

    def send(w: int, index: int) -> None:
        nonlocal pending
        seq = next_seq.get(w, 0)
        g, lead = pool._prepare(w, fn)
        slot = _Slot(index, w, seq, lead)
        try:
            slot.reply = _call_lane(w, (key, seq, g, (*lead, *items[index])), landed, slot)
        except SerializationError:
            pool._unprepare(w, fn)  # nothing was sent
            raise
        except ProcessExitedException:  # `w` has just died: the element goes elsewhere
            pool._call_failed(w, fn, lead)
            unsent.appendleft(index)
            lose(w)
            return
        next_seq[w] = seq + 1  # only once sent: a lane waits for every number handed out
        if not inflight[w]:
            started[w] = time.monotonic()
        inflight[w].append(slot)
        pending += 1

    def live() -> list[int]:
        return [w for w in inflight if w not in lost]

    def hold(w: int | None) -> bool:
        """Hold `w`, just taken from the pool; False if there is none."""
        if w is None:
            return False
        if w not in lost and w not in inflight:  # (a lost one is dropped)
            inflight[w] = []
            used.add(w)
        return True

    def fill() -> None:
        """Send the next elements: first one to every worker of the pool that is free (taken
        now), and only then a second one to each, so that no element queues behind another
        while a worker is idle."""
        held = len(live())
        while held < wanted and has_work():
            # Wait for a worker only when there is nothing else to wait for.
            if not hold(pool.try_take() if held or pending else pool.take()):
                break
            held = len(live())
        for level in range(1, depth + 1):
            for w in live():
                if not has_work():
                    return
                if len(inflight[w]) < level:
                    send(w, next_index())

    def grow() -> None:
        """Workers may have joined the pool (added while the map runs): want them too."""
        nonlocal wanted
        try:
            members = pool.workers()
        except Exception:  # (a pool owned elsewhere, unreachable): no growth
            return
        wanted = max(wanted, len([w for w in members if w not in lost]))

    def queued() -> bool:
        """Some call waits behind a running one on its worker."""
        return any(len(calls) > 1 for w, calls in inflight.items() if w not in lost)

    def held_back() -> bool:
        """Some element waits (unsent, or queued behind a running one) while the pool may
        have a worker we do not hold: another user of the pool may give one back."""
        workers = live()
        return len(workers) < wanted and (
            has_work() or any(len(inflight[w]) > 1 for w in workers))

    def spread() -> None:
        """The input is used up: give each idle worker (held, or free in the pool) a call
        still queued behind a running one; give back those left with nothing to do. (Moves
        it declines set `look_again_at` afresh.)"""
        nonlocal look_again_at
        look_again_at = None
        for w in [w for w, calls in inflight.items() if not calls]:
            if errors or not move_queued_call_to(w):
                del inflight[w]
                pool.put(w)
        while not errors and held_back():
            free = pool.try_take()
            if free is None or free in lost or free in inflight:
                return
            hold(free)
            if not move_queued_call_to(free):
                del inflight[free]
                pool.put(free)
                return

    def take_back(slot: _Slot) -> bool:
        """Cancel `slot`, queued behind a running call; True if it will not run."""
        try:
            taken = remotecall_fetch(_lane_cancel, slot.worker, key, slot.seq)
        except Exception as e:
            # Its worker is gone: the call fails, and that is reported; or the worker took
            # it back and died before saying so, and it lands "not run" (see `land`).
            if _worker_died(e):
                lose(slot.worker)
            return False
        if taken:
            slot.stolen = True
            inflight[slot.worker].remove(slot)
            pool._call_failed(slot.worker, fn, slot.lead, started=False)
        return taken

    def worth_moving(w: int) -> bool:
        """A call queued behind the one running on `w` would likely wait _MOVE_AFTER or
        longer. The running call is expected to run the map's mean so far, or (once past it)
        about as long again as it has; with no call ended yet, there is nothing to tell by.
        If not worth it now, look again when it may be (`look_again_at`)."""
        nonlocal look_again_at
        if not ran_count:
            return True
        began = started.get(w, 0.0)
        age = time.monotonic() - began
        if max(ran / ran_count - age, age) >= _MOVE_AFTER:
            return True
        at = began + _MOVE_AFTER
        look_again_at = at if look_again_at is None else min(look_again_at, at)
        return False

    def move_queued_call_to(idle: int) -> bool:
        """The input is used up: give `idle` a call still queued behind a running one, if
        it would wait there long enough to be worth the move."""
        queues = [(w, calls) for w, calls in inflight.items() if w not in lost]
        w, victim = max(queues, key=lambda q: len(q[1]))
        if len(victim) < 2 or not worth_moving(w):
            return False
        slot = victim[-1]
        if not take_back(slot):
            return False
        send(idle, slot.index)
        return True

    def failed(slot: _Slot, e: BaseException) -> None:
        """`slot`'s call failed with `e`."""
        nonlocal todo
        w = slot.worker
        pool._call_failed(w, fn, slot.lead)
        died = _worker_died(e)
        if died:
            lose(w)
        handled = False
        if on_failure is not None:
            try:
                results[slot.index] = on_failure(items[slot.index], e)
                progress.update(weight(items[slot.index]))
                handled = True
            except BaseException as raised:
                e = raised
        if not handled:
            if not errors:  # stop: take back what has not started
                todo = len(items)
                unsent.clear()
                for held, calls in list(inflight.items()):
                    if held not in lost:
                        for queued in list(calls):
                            take_back(queued)
            errors.append(e)
        elif not died and len(slot.lead) > 1:
            # The failed call was to bring what the calls queued behind it on `w` rely on (a
            # CachingPool's first call brings the function; the pool forgets it now, see
            # `_call_failed`): they would fail for want of it. They cannot have started (the
            # lane waits for this one until the cancel below): send them again.
            for queued in reversed(list(inflight.get(w, ()))):
                if take_back(queued):
                    unsent.appendleft(queued.index)
        if not died:
            # If the call failed before reaching its lane (it could not be unpickled there),
            # the lane must not wait for it: the calls queued behind it would wait forever.
            try:
                remote_do(_lane_cancel, w, key, slot.seq)
            except Exception:
                pass  # gone: its calls fail anyway

    def land(slot: _Slot) -> bool:
        """`slot`'s call has been answered (or has failed): take its outcome. False if it did
        not run (it was taken back: sent elsewhere, or the map failed)."""
        nonlocal pending, ran, ran_count
        pending -= 1
        if slot.stolen:
            return False
        w = slot.worker
        calls = inflight[w]
        calls.remove(slot)
        ran_here = True  # (one that did not run does not count in the map's times)
        try:
            value = slot.outcome()
            if value is _CANCELLED:
                ran_here = False
                not_run(slot)
            else:
                results[slot.index] = value
                progress.update(weight(items[slot.index]))
        except BaseException as e:
            failed(slot, e)
        if ran_here:
            ended = time.monotonic()
            ran += ended - started.get(w, ended)
            ran_count += 1
            started[w] = ended  # the next call queued there starts about now
        if w in lost and not calls:
            inflight.pop(w, None)
        return True

    def not_run(slot: _Slot) -> None:
        """`slot`'s lane did not run it, yet `take_back` did not learn it was taken back:
        its worker took it back and died before it could say so. It runs elsewhere."""
        if slot.worker not in lost:  # (no other way is known: never take it for a value)
            failed(slot, PydistError(
                f"pmap: worker {slot.worker} did not run element {slot.index} of the map, "
                "though the map did not take it back"))
            return
        pool._call_failed(slot.worker, fn, slot.lead, started=False)
        if not errors:
            unsent.appendleft(slot.index)

    def landed(slot: _Slot) -> None:
        """In the thread where `slot`'s outcome lands (it must not block): if the map runs
        smoothly (a good outcome, elements left, nothing failed) and the main loop waits,
        take the outcome here and send the worker its next element at once, with no
        wake-up of the main loop; else hand the slot to the main loop."""
        if quick and state.acquire(False):  # (False: the main loop, or another thread, works)
            try:
                if quick[0](slot):
                    return
            finally:
                state.release()
        done.put(slot)

    def take_here(slot: _Slot) -> bool:
        """(`state` held) See `landed`; False: the main loop takes `slot`. (`slot.reply` is
        set: the send that set it held `state`.)"""
        w, reply = slot.worker, slot.reply
        if (errors or raised or slot.stolen or w in lost or not has_work()
                or isinstance(reply, Future) or not reply.ok or reply.value is _CANCELLED):
            return False
        try:
            land(slot)
            send(w, next_index())
        except BaseException as e:  # (the element could not be pickled; a progress bar failed)
            raised.append(e)
        if raised or unsent:  # (or `w` died as it was sent: its element goes elsewhere)
            done.put(None)
        return True

    # (through a list, emptied at the end: `landed` -> `take_here` -> `send` -> `landed` would
    # be a reference cycle, keeping the map's state for the cyclic collector). Not with a
    # progress bar: it writes to the terminal, and a reading thread must never block.
    quick = [take_here] if progress.bar is None else []

    try:
        grow_at = time.monotonic() + _GROW_POLL
        while True:
            with state:
                if raised:
                    raise raised.pop()
                # While elements wait, look every _GROW_POLL s for workers that joined.
                now = time.monotonic()
                waiting = has_work() or queued()
                if waiting and now >= grow_at:
                    grow_at = now + _GROW_POLL
                    grow()
                    if not has_work():
                        spread()
                if has_work():
                    fill()
                if not pending:
                    break
                # Each call is answered, or fails when its worker is lost. While elements
                # wait and other users of the pool hold some of its workers, look now and
                # then for one given back.
                if held_back():
                    wait: float | None = _POOL_POLL
                else:
                    wait = max(grow_at - now, 0.001) if waiting else None
                if look_again_at is not None:  # a move declined: look again then
                    until = max(look_again_at - now, 0.0005)
                    wait = until if wait is None else min(wait, until)
            try:
                slots = [done.get(timeout=wait)]
            except queue.Empty:
                slots = []
            while True:  # those already here too, before the next sends (one wake for all)
                try:
                    slots.append(done.get_nowait())
                except queue.Empty:
                    break
            with state:
                handled = False
                for slot in slots:
                    if slot is not None:
                        handled = land(slot) or handled
                if (handled or not slots) and not has_work():
                    spread()
    finally:
        with state:
            quick.clear()  # outcomes landing from now on stay where they land
        for w in list(inflight):
            if w not in lost:
                pool.put(w)
        for w in used - lost:
            try:
                remote_do(_lane_close, w, key)
            except Exception:
                pass  # gone: nothing to clean up there
    if errors:
        error = errors[0]
        errors.clear()  # (closures hold the list, the frames in the error's traceback them)
        try:
            raise error
        finally:
            del error
    return results


def _split_pool(name: str, pool: AbstractWorkerPool | None,
                iterables: tuple) -> tuple[AbstractWorkerPool | None, tuple]:
    """The pool, which may also come first among the iterables, and the iterables (pmap's
    and pgenerate's arguments)."""
    if iterables and isinstance(iterables[0], AbstractWorkerPool):
        if pool is not None:
            raise TypeError(f"{name}: pool given both positionally and as pool=")
        pool, iterables = iterables[0], iterables[1:]
    if not iterables:
        raise TypeError(f"{name}: expected at least one iterable")
    return pool, iterables


def _plan(name: str, pool: AbstractWorkerPool | None, distributed: bool, batch_size: Any,
          count: int, sent: tuple = ()) -> tuple[AbstractWorkerPool, int, bool, int]:
    """(pool, nworkers, distributed, batch_size) of a map over about `count` elements: the
    default pool is a CachingPool of all workers (and of those that join during the map),
    or a plain WorkerPool if every function of `sent` (what goes to the workers: `f`,
    `on_error`) ships by name, so that caching it would cost and save nothing; a pool of no
    worker but this process runs here; "auto" makes about 4 batches per worker."""
    if pool is None:
        by_name = bool(sent) and all(g is None or ships_by_name(g) for g in sent)
        pool = pool_of_all_workers(cache=not by_name)  # takes in workers joining meanwhile
    nworkers = max(1, pool.nworkers())
    if distributed and (len(pool) == 0 or pool.workers() == [myid()]):
        distributed = False
    if batch_size == "auto":
        batch_size = max(1, math.ceil(count / (4 * nworkers))) if distributed else 1
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{name}: batch_size must be a positive int or 'auto', got {batch_size!r}")
    if not distributed:
        batch_size = 1
    return pool, nworkers, distributed, batch_size


def pmap(f: Callable, *iterables: Any, pool: AbstractWorkerPool | None = None,
         distributed: bool = True, batch_size: int | str = 1, on_error: Callable | None = None,
         retry_delays: Iterable[float] = (), retry_check: Callable | None = None,
         progress: bool = False) -> list:
    """Map `f` over `iterables` (zipped, like `map`) on the workers of `pool` (default: a fresh
    CachingPool of all workers, which takes in workers added during the map; a WorkerPool if
    `f` and `on_error` are module-level functions, sent by name anyway), returning the
    results in order. Workers that join the pool while the map runs get elements too.

    `pool` may also come first after `f`. `batch_size` (an int or "auto") groups elements into
    one call; `on_error(exc)` turns a failure into that element's result; `retry_delays` (an
    iterable such as `ExponentialBackOff(n=3)`) retries failures, filtered by
    `retry_check(state, exc) -> (state, bool)`; `progress=True` shows a progress bar on stderr
    (tqdm's if tqdm is installed, else a plain text one).
    """
    pool, iterables = _split_pool("pmap", pool, iterables)
    star = len(iterables) > 1  # else batches carry the values themselves, not 1-tuples
    values = list(zip(*iterables)) if star else list(iterables[0])
    pool, nworkers, distributed, batch_size = _plan("pmap", pool, distributed, batch_size,
                                                    len(values), sent=(f, on_error))
    delays = list(retry_delays)
    progress_bar = _Progress(progress, len(values))
    lend = in_remote_call()  # decided here: the map's helper threads act for this thread
    try:
        if batch_size == 1:
            items = values if star else [(x,) for x in values]
            return _map_elements(f, items, pool, distributed, on_error, delays, retry_check,
                                 nworkers, progress_bar, lend)
        return _map_batches(f, values, star, pool, batch_size, on_error, delays, retry_check,
                            nworkers, progress_bar, lend)
    except BaseException as e:
        _clear_own_frames(e.__traceback__)
        raise
    finally:
        progress_bar.close()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _clear_own_frames(tb: Any) -> None:
    """Drop the locals of pydist's finished frames in a failed map's traceback. They hold
    the map's state, which holds the error, whose traceback holds them: a cycle that kept
    the map's inputs and results alive until the next garbage collection. The frames still
    print; the user's own frames keep their locals (for a post-mortem debugger)."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            try:
                frame.clear()
            except RuntimeError:  # still running: pmap's own frame
                pass
        tb = tb.tb_next


def _map_elements(f, items, pool, distributed, on_error, delays, check, nworkers, progress,
                  lend):
    if distributed and not lend and not delays:
        apply, died = _apply_and_on_death(f, on_error, distributed)
        return _pipelined_map(pool, apply, items, progress, on_failure=died)
    run = _element_runner(f, pool, distributed, on_error, delays, check, lend)
    # As Julia's `asyncmap(f, c; ntasks=() -> nworkers(p))`: also a local map runs that many
    # elements at a time (in threads of this process).
    return _parallel_map(run, items, nworkers, progress,
                         grow=pool.nworkers if distributed and not lend else None)


def _apply_and_on_death(f: Callable, on_error: Callable | None, distributed: bool
                        ) -> tuple[Callable, Callable[[tuple, BaseException], Any] | None]:
    """What runs an element (`f`, or `f` wrapped with on_error to run on the worker), and what
    turns the failure of an element whose worker died into its result (on_error on the
    caller), if anything."""
    # As Julia: `f` itself goes through the pool unless on_error wraps it, so that a
    # CachingPool that already sent `f` to a worker (for a remotecall) does not send it again.
    apply = f if on_error is None else _Apply(f, on_error)

    def on_death(args: tuple, e: BaseException) -> Any:
        """on_error runs where f ran, except for an element whose worker died (after any
        retries): then it runs here."""
        if _worker_died(e):
            return on_error(e)  # type: ignore[misc]
        raise e

    return apply, (on_death if on_error is not None and distributed else None)


def _element_runner(f: Callable, pool: AbstractWorkerPool, distributed: bool,
                    on_error: Callable | None, delays: list, check: Callable | None,
                    lend: bool) -> Callable[[tuple], Any]:
    """`run(args)`: one element, one call at a time through the pool (or here, if not
    `distributed`), with pmap's on_error, retries and death handling; raises its failure."""
    apply, died = _apply_and_on_death(f, on_error, distributed)
    if distributed:
        def run(args: tuple) -> Any:
            return _run_on_pool(pool, apply, args, lend)
    else:
        def run(args: tuple) -> Any:
            return apply(*args)
    if delays:
        run = _with_retries(run, delays, check)
    if died is not None:
        attempt = run

        def run(args: tuple) -> Any:
            try:
                return attempt(args)
            except Exception as e:
                return died(args, e)

    return run


def _map_batches(f, items, star, pool, batch_size, on_error, delays, check, nworkers,
                 progress, lend):
    """`items`: argument tuples (`star`) or single arguments."""
    capture = on_error is not None or bool(delays)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def failed_batch(batch: list, e: BaseException) -> list:
        if not capture or not isinstance(e, Exception):
            raise e
        exc = _unwrap(e)  # the whole batch failed
        return [_Failed(args if star else (args,), exc) for args in batch]

    run_batch = _Batch(f, capture, star)

    def run(batch: list) -> list:
        try:
            return _run_on_pool(pool, run_batch, (batch,), lend)
        except Exception as e:
            return failed_batch(batch, e)

    if lend:
        chunks = _parallel_map(run, batches, nworkers, progress, weight=len)
    else:
        chunks = _pipelined_map(pool, run_batch, [(batch,) for batch in batches],
                                progress, weight=lambda call: len(call[0]),
                                on_failure=lambda call, e: failed_batch(call[0], e),
                                depth=BATCH_PIPELINE_DEPTH)
    results: list = []
    for chunk in chunks:
        results.extend(chunk)  # (twice as fast as itertools.chain on a large map)
    if not capture:  # (a failure raised)
        return results
    failed = [i for i, r in enumerate(results) if isinstance(r, _Failed)]
    if not failed:
        return results
    if delays and (check is None or _all_retryable(check, [results[i].exc for i in failed])):
        # As Julia: retry the failed elements one by one, with the remaining delays.
        log.debug("pmap: %d elements of failed batches are retried one by one (first: %r)",
                  len(failed), results[failed[0]].exc)
        retried = pmap(_Star(f), [results[i].args for i in failed], pool=pool, batch_size=1,
                       on_error=on_error, retry_delays=delays[1:], retry_check=check)
        for i, value in zip(failed, retried):
            results[i] = value
        return results
    if on_error is not None:
        for i in failed:
            results[i] = on_error(results[i].exc)
        return results
    raise results[failed[0]].exc


class _Star:
    """`f(*args)` for a single argument tuple (picklable)."""

    def __init__(self, f: Callable):
        self.f = f

    def __call__(self, args: tuple) -> Any:
        return self.f(*args)


def _all_retryable(check: Callable, excs: list[BaseException]) -> bool:
    state = None
    for exc in excs:
        state, again = _ask(check, state, exc)
        if not again:
            return False
    return True
