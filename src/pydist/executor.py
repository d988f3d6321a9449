"""`Executor`: a `concurrent.futures.Executor` that runs calls on pydist workers.

Code written for `ProcessPoolExecutor` moves onto a pydist cluster (local or SSH workers) by
changing the line that makes the executor. `submit` returns a pydist `Future`, which is a
`concurrent.futures.Future` (`wait`, `as_completed`, `asyncio.wrap_future` work on it).

How calls reach workers: the executor holds workers taken from its pool (given back once it
has nothing for them; the workers it started itself, with `max_workers`, it keeps) and keeps
calls in flight on each: one, as a ProcessPoolExecutor's process runs one, and more when
that worker's calls are short: its *window* is about
BUDGET seconds of work (the average time between two of its completions, which is a call's
duration when calls wait there, a round trip plus a call when none do). So tiny calls are
pipelined, and what waits on a worker behind its running call (while another worker may
be free) stays under about BUDGET seconds. On the worker, the calls of one executor run one
at a time, in order (`_serial_call`): a worker is one slot, as a process of a
ProcessPoolExecutor is. A call sent to a worker with nothing else of ours in flight there
goes *bare* (the plain call, no lane on the worker: it runs as soon as it arrives), and no
other call follows it there until it is done; so a lone `submit(...).result()` costs what a
`remotecall` does. Calls beyond the windows wait here in the executor's
queue, and are sent as calls finish (from the completion callback, without a thread hop)
or, when workers free up elsewhere in the pool, by the executor's feeder thread, which
runs only while calls are queued and waits in slices of at most FEED_WAIT seconds.

Cancelling: a queued call is taken out of the queue; one waiting on its worker behind
another is taken out of the worker's lane (one round trip); a running one is not.
A worker that dies fails only the calls sent to it (the running one and those waiting
behind it), with ProcessExitedException; the executor goes on with its other workers.
"""

from __future__ import annotations

import concurrent.futures as _cf
import functools
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

from . import protocol
from .calls import (
    SLOTS,
    call_fetch,
    capture,
    connection,
    exited,
    fail_slot,
    new_slot,
    pack,
    run_user_call,
    take_reply,
)
from .cluster import addprocs, rmprocs
from .group import PGRP
from .refs import (
    _ERROR,
    Future,
    _CancelledCall,
    _cancelled_error,
    landed,
    new_queued_future,
    not_cancellable,
    sending,
)
from .remotecall import run_into_future
from .transport import ConnectionClosed
from .workerpool import AbstractWorkerPool, WorkerPool, _alive, default_worker_pool

__all__ = ["Executor"]

T = TypeVar("T")

log = logging.getLogger(__name__)

BUDGET = 0.002     # s of calls in flight on a worker (see above)
MAX_WINDOW = 64    # calls in flight on a worker, at most
FEED_WAIT = 0.05   # s: the feeder's wait for a free worker, in slices
LINGER = 0.002     # s: a worker with nothing to do is given back to the pool after this

_ids = itertools.count(1)
_EMPTY: dict = {}


class _Lane:
    """A worker the executor holds: calls in flight there, how many it may have."""

    __slots__ = ("w", "inflight", "window", "last", "bare")

    def __init__(self, w: int, window: int) -> None:
        self.w = w
        self.inflight = 0
        self.window = window
        self.last = 0.0
        self.bare = False  # a bare call (see above) is in flight: nothing may follow it

    def room(self) -> int:
        """How many more calls may be sent here now."""
        return 0 if self.bare else self.window - self.inflight


class Executor(_cf.Executor):
    """A `concurrent.futures.Executor` whose calls run on pydist workers.

    `Executor(max_workers=N)` starts N local workers (`addprocs(N)`) and removes them at
    `shutdown`; `Executor(pool=p)` runs on the workers of pool `p` (SSH workers too);
    `Executor()` on the default worker pool (every worker). Each worker runs one of the
    executor's calls at a time. `submit` returns a pydist `Future` at once (never waiting
    for a free worker); `map` is `concurrent.futures.Executor.map`, with `chunksize`
    elements per call. A worker that dies fails the Futures of the calls sent to it with
    `ProcessExitedException`; the executor stays usable. Example::

        with pydist.Executor(max_workers=2) as ex:
            print(list(ex.map(pow, [2, 3], [5, 2])))   # [32, 9]
            fut = ex.submit(sum, [1, 2, 3])
            fut.result()                                # 6
    """

    def __init__(self, max_workers: int | None = None, pool: AbstractWorkerPool | None = None):
        if max_workers is not None and pool is not None:
            raise ValueError("give max_workers or pool, not both")
        self._own: list[int] = []
        if max_workers is not None:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            self._own = addprocs(max_workers)
            pool = WorkerPool(self._own)
        self._pool: AbstractWorkerPool = pool if pool is not None else default_worker_pool()
        # Workers of a shared pool are given back LINGER s after their last call; those the
        # executor started itself are nobody else's: it keeps them (and nothing polls).
        self._keep = bool(self._own)
        self._local_pool = isinstance(self._pool, WorkerPool)
        self._key = PGRP.id << 32 | next(_ids)  # names this executor's lanes on the workers
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is left to do
        self._kick = threading.Condition(self._lock)  # wakes the feeder at shutdown
        self._queue: OrderedDict[Future, tuple] = OrderedDict()  # not sent yet, in order
        self._lanes: dict[int, _Lane] = {}
        self._gaps: dict[int, float] = {}  # worker -> average time between completions there
        self._windows: dict[int, int] = {}  # worker -> its window (kept while it is given back)
        self._live = 0  # Futures submitted and not done
        self._recent = 0  # the worker given back last
        self._closed = False
        self._feeder: threading.Thread | None = None
        self._tl = threading.local()  # `pumping` in a thread that runs `_pump`
        self._closer: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "running"
        return f"<pydist.Executor on {self._pool!r}, {state}>"

    # -- submitting --
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule `fn(*args, **kwargs)` on a worker; return its Future at once.
        RuntimeError after `shutdown`."""
        fut = new_queued_future(self._cancel_queued, self._finished)
        lane = None
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._live += 1
            behind = bool(self._queue)
            if not behind:
                lane = self._lane_with_room()
            if lane is None:
                self._queue[fut] = (fn, args, kwargs)
            else:  # a held worker has room: straight there
                bare = self._start_sending(lane, [fut])
        if lane is None:
            # Behind other queued calls, it is sent when they are: the completions and the
            # feeder (started by the pump that left them queued) send the queue in order.
            if not behind:
                self._pump(take=True)
        else:
            self._send(lane.w, [(fut, (fn, args, kwargs))], bare)
        return fut

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[T]:
        """`fn` over the iterables' elements in parallel: their results in order, as
        `concurrent.futures.Executor.map` (every call is submitted at once; `timeout`
        counts from this call; leaving the loop early cancels what has not started).
        `chunksize` elements go to a worker in one call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        parts = super().map(functools.partial(_run_chunk, fn), _chunks(iterables, chunksize),
                            timeout=timeout)
        return itertools.chain.from_iterable(parts)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls (`submit` raises RuntimeError). `cancel_futures=True` cancels
        the calls not sent to a worker yet. `wait=True` returns once every other call has
        finished; then (or, with `wait=False`, later, in a thread) the workers that
        `max_workers` started are removed."""
        with self._lock:
            first = not self._closed
            self._closed = True
            queued = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for fut in queued:
            fut._complete(_ERROR, _cancelled_error(fut))
        with self._lock:
            self._kick.notify_all()
        if not first:
            if wait:
                self._wait_idle()
            return
        if wait:
            self._close()
        else:
            self._closer = threading.Thread(target=self._close, name="pydist-executor-close",
                                            daemon=True)
            self._closer.start()

    def _wait_idle(self) -> None:
        with self._lock:
            while self._live:
                self._idle.wait(1.0)  # (in slices: a lost worker fails its calls meanwhile)
        feeder = self._feeder
        if feeder is not None:
            feeder.join(10 * FEED_WAIT + 1.0)

    def _close(self) -> None:
        self._wait_idle()
        if self._own:
            try:
                rmprocs([w for w in self._own if _alive(w)], waitfor=30)
            except Exception:
                log.exception("pydist.Executor: could not remove its workers")

    # -- sending --
    def _lane_with_room(self) -> _Lane | None:
        """The held worker with the fewest calls in flight, if any has room (lock held)."""
        best = None
        for lane in self._lanes.values():
            if lane.room() > 0 and (best is None or lane.inflight < best.inflight):
                best = lane
        return best

    def _start_sending(self, lane: _Lane, futs: list[Future]) -> bool:
        """(Lock held.) `futs` are about to be sent to `lane`'s worker: count them in flight
        there; True if they go bare (a lone call to a worker with nothing of ours)."""
        bare = not lane.inflight and len(futs) == 1 and lane.w != PGRP.id
        if not lane.inflight:
            lane.last = time.monotonic()
        lane.inflight += len(futs)
        lane.bare = bare
        for fut in futs:
            # (a bare call runs as it arrives: there is no lane to take it out of)
            sending(fut, lane.w, not_cancellable if bare else self._cancel_sent)
        return bare

    def _send(self, w: int, batch: list, bare: bool = False) -> None:
        """Send a batch of queued calls to worker `w`, in one write (a Future whose call
        could not be sent fails, as a call would); `bare`: one call, without its lane."""
        if w == PGRP.id:
            for fut, (fn, args, kwargs) in batch:
                run_into_future(fut, _serial_call, (self._key, fut.id, fn, args, kwargs), {})
            return
        try:
            conn = connection(w)
        except BaseException as e:  # lost
            with self._lock:
                self._lanes.pop(w, None)
            for fut, _ in batch:
                fut._complete(_ERROR, e)
            return
        chunks: list = []
        sids = []
        for fut, (fn, args, kwargs) in batch:
            sid, _ = new_slot(w, functools.partial(landed, fut))
            call = (fn, args, kwargs) if bare else (
                _serial_call, (self._key, fut.id, fn, args, kwargs), _EMPTY)
            try:
                chunks += pack(w, protocol.CALL_FETCH, call, a=sid, what=fn)
            except BaseException as e:  # could not pickle
                SLOTS.pop(sid, None)
                fut._complete(_ERROR, e)
                continue
            sids.append(sid)
        try:
            conn.send(chunks)
        except ConnectionClosed:
            for sid in sids:
                fail_slot(sid, exited(w))

    def _pump(self, take: bool) -> None:
        """Send queued calls while held workers have room; with `take`, take more workers
        from the pool (never waiting); start the feeder if calls are left over. (A call that
        fails to send completes its Future, whose callback pumps: that nested pump returns
        at once, this loop goes on.)"""
        tl = self._tl
        if getattr(tl, "pumping", False):
            return
        tl.pumping = True
        try:
            self._pump_loop(take)
        finally:
            tl.pumping = False

    def _pump_loop(self, take: bool) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                lane = self._lane_with_room()
                if lane is not None:
                    n = min(lane.room(), len(self._queue))
                    batch = [self._queue.popitem(last=False) for _ in range(n)]
                    bare = self._start_sending(lane, [fut for fut, _ in batch])
                elif not take:
                    self._start_feeder()
                    return
            if lane is None:
                w: int | None = self._recent  # the worker we gave back last: still awake
                if not (w and self._local_pool and self._pool._take_this(w)):  # type: ignore[attr-defined]
                    w = self._pool.try_take()
                if w is None or not self._hold(w):
                    with self._lock:
                        self._start_feeder()
                    return
                continue
            self._send(lane.w, batch, bare)

    def _hold(self, w: int) -> bool:
        with self._lock:
            if w in self._lanes:
                held = False
            else:
                lane = self._lanes[w] = _Lane(w, self._windows.get(w, 1))
                lane.last = time.monotonic()
                held = True
                if not self._keep:
                    self._start_feeder()  # (it gives the worker back once idle)
        if not held:
            self._pool.put(w)
        return held

    def _start_feeder(self) -> None:
        """(Lock held.) Calls are queued and no held worker has room: have the feeder thread
        take workers as they free up in the pool."""
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feed, name="pydist-executor-feeder",
                                            daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        """The feeder thread, while the executor holds workers or has calls queued: takes
        workers for queued calls as they free up in the pool, and gives back those idle
        for LINGER seconds (checked at least every FEED_WAIT seconds)."""
        try:
            while True:
                with self._lock:
                    now = time.monotonic()
                    expired = [] if self._keep else [
                        lane.w for lane in self._lanes.values()
                        if not lane.inflight and now - lane.last >= LINGER]
                    for w in expired:
                        del self._lanes[w]
                    if expired:
                        self._recent = expired[-1]
                    if not self._queue:
                        if not self._lanes or self._keep:
                            self._feeder = None
                        else:
                            idle = [lane.last for lane in self._lanes.values() if not lane.inflight]
                            self._kick.wait(min(FEED_WAIT, max(0.0, min(idle, default=now + FEED_WAIT)
                                                               + LINGER - now)))
                    room = self._lane_with_room() is not None
                    queued = bool(self._queue)
                    stop = self._feeder is None
                for w in expired:
                    self._pool._give_back_later(w)
                if stop:
                    return
                if not queued:
                    continue
                if room:
                    self._pump(take=False)
                    continue
                if not self._pool.workers():
                    self._fail_queued(RuntimeError(f"no worker left in {self._pool!r}"))
                    continue
                got = self._take_within(FEED_WAIT)
                if got is not None and self._hold(got):
                    self._pump(take=False)
        except BaseException:
            log.exception("pydist.Executor: the feeder failed")
            with self._lock:
                self._feeder = None
                lanes, self._lanes = list(self._lanes), {}
            for w in lanes:
                self._pool._give_back_later(w)
            self._fail_queued(RuntimeError("pydist.Executor: the feeder failed"))

    def _take_within(self, timeout: float) -> int | None:
        if self._local_pool:
            return self._pool._take_within(timeout)  # type: ignore[attr-defined]
        w = self._pool.try_take()
        if w is None:
            time.sleep(timeout)
        return w

    def _fail_queued(self, exc: BaseException) -> None:
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for fut in queued:
            fut._complete(_ERROR, exc)

    # -- completion and cancelling --
    def _finished(self, fut: Future) -> None:
        """A Future of ours is done (often in a connection's reading thread: never blocks)."""
        give_back = None
        with self._lock:
            self._live -= 1
            lane = self._lanes.get(fut.where)
            if lane is not None and fut.where:
                lane.inflight -= 1
                lane.bare = False  # (a bare call is the only one in flight on its lane)
                now = time.monotonic()
                gap, lane.last = now - lane.last, now
                avg = self._gaps[lane.w] = 0.5 * (self._gaps.get(lane.w, gap) + gap)
                lane.window = self._windows[lane.w] = (
                    MAX_WINDOW if avg * MAX_WINDOW <= BUDGET else max(1, int(BUDGET / avg)))
                if fut._st == _ERROR and not _alive(lane.w):
                    del self._lanes[lane.w]
                elif not lane.inflight and not self._queue:
                    if self._closed:
                        del self._lanes[lane.w]
                        give_back = self._recent = lane.w
                    elif not self._keep:  # kept a moment for the next call; the feeder
                        self._start_feeder()  # gives it back
            if not self._live and self._closed:
                self._idle.notify_all()
            # Refill a worker once half its window is free: calls go in batches, one write.
            more = bool(self._queue) and (lane is None or 2 * lane.inflight <= lane.window)
        if give_back is not None:
            self._pool._give_back_later(give_back)
        if more:
            self._pump(take=self._local_pool)

    def _cancel_queued(self, fut: Future) -> bool:
        with self._lock:
            if self._queue.pop(fut, None) is not None:
                return True
        return self._cancel_sent(fut)  # sent meanwhile

    def _cancel_sent(self, fut: Future) -> bool:
        args = (self._key, fut.id)
        if fut.where == PGRP.id:
            return _cancel_lane_call(*args)
        return call_fetch(fut.where, _cancel_lane_call, args)


# ==================================================================== on the worker
# An executor's calls waiting on this process behind the one running, by executor key.
_lanes: dict[int, deque] = {}
_lanes_lock = threading.Lock()


def _serial_call(key: int, fid: int, f: Callable, args: tuple, kwargs: dict) -> Any:
    """Run `f(*args, **kwargs)` after the calls of executor `key` that came here before it,
    one at a time. A call that finds none running runs at once; one that does queues (its
    reply taken over) and returns. When a call ends with calls queued behind it, it sends
    its own reply, then runs those in its thread (a connection's reading thread, mostly,
    whose replies to a burst of calls leave together)."""
    with _lanes_lock:
        lane = _lanes.get(key)
        if lane is not None:
            lane.append((fid, f, args, kwargs, take_reply()))
            return None
        lane = _lanes[key] = deque()
    try:
        value = f(*args, **kwargs)
    except BaseException as e:
        if _lane_done(key, lane):
            raise
        take_reply()(False, capture(e))
    else:
        if _lane_done(key, lane):
            return value
        take_reply()(True, value)
    _drain(key, lane)
    return None


def _lane_done(key: int, lane: deque) -> bool:
    """True (and the lane closed) if nothing is queued in it."""
    with _lanes_lock:
        if lane:
            return False
        del _lanes[key]
        return True


def _drain(key: int, lane: deque) -> None:
    """Run the calls queued in `lane`, in order, until it is empty (then it is closed)."""
    while True:
        with _lanes_lock:
            if not lane:
                del _lanes[key]
                return
            _, f, args, kwargs, reply = lane.popleft()
        outcome = run_user_call(f, args, kwargs)
        try:
            reply(*outcome)  # type: ignore[misc]
        except Exception:
            log.exception("pydist.Executor: could not send a call's outcome")


def _cancel_lane_call(key: int, fid: int) -> bool:
    """Cancel call `fid` of executor `key` if it waits in its lane here: True if it will
    never run. (One still on its way to the lane, a few microseconds, is not found.)"""
    with _lanes_lock:
        lane = _lanes.get(key)
        item = next((it for it in lane if it[0] == fid), None) if lane else None
        if item is None:
            return False
        lane.remove(item)  # type: ignore[union-attr]
    item[4](False, _CancelledCall(f"call {fid} of an Executor was cancelled on process {PGRP.id}"))
    return True


def _run_chunk(fn: Callable, chunk: list) -> list:
    """One call of a chunked `map`: `fn` over a chunk of argument tuples."""
    return [fn(*args) for args in chunk]


def _chunks(iterables: tuple, size: int) -> Iterator[list]:
    it = zip(*iterables)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk
