"""Remote references: `Future`, `RemoteChannel`, and distributed reference counting.

A reference names a value that lives on its owner (`where`) under an `RRID(whence, id)`. The
owner keeps, per value, a count per client process; the value is freed when every count is
zero. A holder's count goes up when a reference reaches it and down when it fetches, puts, or
drops the reference. A process has one object per reference; its count sits on the weak
reference the process keeps to it (`_ClientRef`), whose callback gives the count back once the
object is gone: it only queues a message, so it is safe in any thread.

Why counts and not Julia's client *set*: when process p passes an unfetched reference to q, p
tells the owner "+1 for q" before the message to q leaves, on its own (FIFO) route to the
owner, so it always arrives before p's own later "-1". q's "-1" may overtake p's "+1" (they
travel on different connections); with counts, q then sits at -1 and the value survives until
the "+1" arrives. Julia's set loses that race and frees too early or leaks (julia#11731).
So a value, once freed, is never wanted again: every count message for it is a bug.

Three races this rests on (each has a test in test_refs.py):
- p's "-1" must not overtake its "+1 for q": p may be giving its count back (its Future just
  got its value) while another thread pickles the Future as a reference. The pickler *pins*
  the Future; a pinned Future keeps its count until the "+1 for q" has been sent. Also when q
  is the owner itself: it is counted by the same "+1" message, not on arrival (on arrival,
  p's release could already have freed the value).
- A reference that arrives again while the process's object for it is being released must
  get a new object: `__del__` would run with the object still reachable through a weak
  dictionary, so the arrival could revive it, and add to a count `__del__` gives back
  (freed too early) or that nobody gives back (leaked). Weak-reference callbacks run only
  once the object can no longer be reached.
- A pushed result may hold references, counted for us by the worker when it pushed. It is
  unpickled even when its Future is gone here, so that those counts are given back.

A `remotecall` Future also gets its result pushed by the worker as soon as the call ends (the
value when it is small, else just "done"), so `fetch`, `isready` and `wait` of a finished call
cost no round trip, and completion callbacks need no polling.
"""

from __future__ import annotations

import concurrent.futures as _cf
import functools
import inspect
import itertools
import logging
import queue
import threading
import time
import weakref
from _weakref import _remove_dead_weakref  # type: ignore[attr-defined]
from typing import Any, Callable, Generator, Generic, Iterator, NamedTuple, TypeVar, overload

from . import protocol, serialization
from .calls import (
    acquire,
    call_async,
    call_fetch,
    connection,
    exited,
    pack,
    read_until_woken,
    remote_do_internal,
    take_reply,
    wait_reply,
)
from .channel import Abandoned, Channel, take_until_closed
from .group import PGRP
from .exceptions import InvalidStateError, ProcessExitedException
from .transport import ConnectionClosed

__all__ = [
    "AbstractRemoteRef",
    "RRID",
    "Future",
    "RemoteChannel",
    "remoteref_id",
    "channel_from_id",
    "fetch",
    "put",
    "take",
    "isready",
    "wait",
]


class RRID(NamedTuple):
    """Remote reference id: the creating process and a number unique there."""

    whence: int
    id: int


_next_id = itertools.count(1)


def _new_rrid() -> RRID:
    return RRID(PGRP.id, next(_next_id))


# ==================================================================== owner side
class _Cell:
    """A Future's value on its owner: written once, waited for by any number of threads.
    (Most are set before anyone waits: the Event waiters sleep on is made only if needed.)"""

    __slots__ = ("_lock", "_event", "done", "ok", "value", "_callbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self.done = False
        self.ok = True
        self.value: Any = None
        self._callbacks: list[Callable[["_Cell"], None]] | None = None

    def set(self, ok: bool, value: Any) -> None:
        with self._lock:
            if self.done:
                raise InvalidStateError("Future can be set only once")
            self.ok, self.value, self.done = ok, value, True
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for cb in callbacks or ():
            cb(self)

    def wait(self, timeout: float | None = None) -> bool:
        if self.done:
            return True
        with self._lock:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        event.wait(timeout)
        return self.done

    def on_done(self, cb: Callable[["_Cell"], None]) -> None:
        with self._lock:
            if not self.done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(cb)
                return
        cb(self)


class _RemoteValue:
    __slots__ = ("store", "clients")

    def __init__(self, whence: int):
        self.store: Any = None  # a _Cell (Future) or a channel (RemoteChannel), made on first use
        self.clients: dict[int, int] = {whence: 1}


class RefStore:
    """The values this process owns, with their client counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[RRID, _RemoteValue] = {}

    def lookup(self, rrid: RRID, factory: Callable[[], Any]) -> Any:
        """The store of `rrid` (a _Cell or a channel), created by `factory` on first use."""
        with self.lock:
            rv = self.values.get(rrid)
            if rv is None:
                rv = self.values[rrid] = _RemoteValue(rrid.whence)
            if rv.store is None:
                rv.store = factory()
            return rv.store

    def get(self, rrid: RRID) -> Any:
        rv = self.values.get(rrid)
        return None if rv is None else rv.store

    def apply(self, rrid: RRID, pid: int, delta: int) -> None:
        with self.lock:
            rv = self.values.get(rrid)
            if rv is None:
                rv = self.values[rrid] = _RemoteValue(rrid.whence)
            n = rv.clients.get(pid, 0) + delta
            if n:
                rv.clients[pid] = n
            else:
                rv.clients.pop(pid, None)
            if not rv.clients:
                del self.values[rrid]

    def remove_pid(self, pid: int) -> None:
        with self.lock:
            for rrid in list(self.values):
                rv = self.values[rrid]
                if rv.clients.pop(pid, None) is not None and not rv.clients:
                    del self.values[rrid]

    def __len__(self) -> int:
        return len(self.values)


STORE = RefStore()


def on_refs(conn, msg: protocol.Message):
    for whence, id_, pid, delta in serialization.loads(msg.body, msg.buffers):
        STORE.apply(RRID(whence, id_), pid, delta)
    return None



# ==================================================================== holder side: count deltas
_deltas: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()


class _ClientRef(weakref.ref):
    """This process's weak reference to its object for a reference, carrying this process's
    count on the owner (changed under the object's lock); given back by `_released` once the
    object is gone. Unlike `__del__`, the callback runs when nothing can reach the object any
    more, so no other thread can revive it meanwhile (see the module docstring).

    `rrid` is a plain `(whence, id)` tuple, equal to the `RRID` and hashed alike, which the
    garbage collector stops tracking at its first pass (an `RRID` stays tracked for as long
    as its object lives: a loop holding 20,000 Futures gave every full collection 20,000
    more objects to traverse)."""

    __slots__ = ("where", "rrid", "count")
    where: int
    rrid: tuple[int, int]
    count: int


def _released(ref: _ClientRef, _put=_deltas.put, _remove=_remove_dead_weakref) -> None:
    """The object of `ref` is gone: give its count back; forget it (unless a new object
    for the same reference has taken its place meanwhile)."""
    try:
        if ref.count > 0:
            _put((ref.where, ref.rrid, _pid(), -ref.count))
        _remove(_client_refs, ref.rrid)
    except Exception:  # at interpreter exit, module globals may be gone
        pass


def _pid() -> int:
    return PGRP.id


# (whence, id) -> the weak reference to this process's object for that reference (one object per
# reference).
_client_refs: "dict[tuple[int, int], _ClientRef]" = {}  # (looked up by RRID too: equal)


def _local(rrid: RRID) -> "Future | RemoteChannel | None":
    """This process's live object for `rrid`, if any (never one that is being released)."""
    ref = _client_refs.get(rrid)
    return None if ref is None else ref()

_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _queue_delta(where: int, rrid: RRID, pid: int, delta: int) -> None:
    """Queue a count change for the owner. Safe from finalizers and weak-reference callbacks,
    also at interpreter exit: SimpleQueue.put is reentrant, and nothing here starts a thread."""
    _deltas.put((where, rrid, pid, delta))


def _start_flusher() -> None:
    """Start the thread that sends queued count changes (once, when the first reference is
    made: never from a release, which may run while the interpreter is shutting down)."""
    global _flusher
    with _flusher_lock:
        if _flusher is None:
            t = threading.Thread(target=_flush_loop, name="pydist-refcount", daemon=True)
            t.start()
            _flusher = t


# Count changes come in bursts (a loop fetching thousands of Futures): after the first one,
# wait this long so that the burst goes out as a few messages instead of thousands.
FLUSH_DELAY = 0.002
# And one owner gets at most one message of counts per this many seconds: each message
# wakes the owner, and results streaming in from many workers would otherwise cost every
# worker a wake-up per few results (a give-back only frees memory: later is always safe).
OWNER_INTERVAL = 0.05


_STOP = ("stop",)  # queued by stop_flusher: send what is queued, then end


def _flush_loop() -> None:
    pending: dict[int, list] = {}  # owner -> its count changes not sent yet, in order
    due: dict[int, float] = {}  # owner -> when they go
    last: dict[int, float] = {}  # owner -> when the last message went to it
    while True:
        if pending:  # let changes gather until the next owner is due
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))
            batch = []
        else:
            batch = [_deltas.get()]
            if batch[0] is not _STOP:
                time.sleep(FLUSH_DELAY)
        try:
            while True:
                batch.append(_deltas.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        for it in batch:
            if it is not None and it is not _STOP:
                where, rrid, pid, delta = it
                todo = pending.get(where)
                if todo is None:
                    todo = pending[where] = []
                    due[where] = max(now, last.get(where, 0.0) + OWNER_INTERVAL)
                todo.append((rrid[0], rrid[1], pid, delta))  # (an RRID or a plain tuple)
        stopping = _STOP in batch
        for where in [w for w, t in due.items() if stopping or t <= now]:
            del due[where]
            last[where] = now
            _send_deltas(where, pending.pop(where))
        if stopping:
            return
        if len(last) > 64:  # forget the owners not written to lately
            last = {w: t for w, t in last.items() if now - t < OWNER_INTERVAL}


def stop_flusher(timeout: float) -> bool:
    """Send the queued count changes and end the flusher thread (`pydist.shutdown`); False
    if it did not end within `timeout` seconds. It starts again with the next reference."""
    global _flusher
    with _flusher_lock:
        thread = _flusher
        if thread is None:
            return True
        _deltas.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            return False
        _flusher = None
        return True


def _send_deltas(where: int, deltas: list) -> None:
    """Deliver count changes to owner `where`, always by the same route (so they stay in
    order): directly, or through the master when the topology forbids a direct link."""
    if where == PGRP.id:
        for whence, id_, pid, delta in deltas:
            STORE.apply(RRID(whence, id_), pid, delta)
        return
    if where in PGRP.deleted:
        return  # owner gone: its values went with it
    if PGRP.id != 1 and where != 1 and PGRP.topology != "all_to_all":
        w = PGRP.workers.get(where)
        if w is None or w.conn is None:
            try:  # the master forwards them
                remote_do_internal(1, _send_deltas, (where, deltas))
            except ProcessExitedException:
                pass
            return
    try:
        conn = connection(where)  # connects now if this is a lazy worker-to-worker link
        # Never waits for the owner to read (the flusher serves every owner): counts are
        # small, they queue until the socket drains.
        conn.send(protocol.encode_frame(protocol.REFS, serialization.dumps_inline(deltas)),
                  wait=False)
    except (ConnectionClosed, ProcessExitedException, ValueError):
        pass
    except Exception:
        logging.getLogger(__name__).exception("pydist: could not send reference counts to %d", where)


# ==================================================================== waits on the owner
# An operation that may block on the owner (a Future's fetch or wait; a channel's put, take,
# fetch or wait) runs there as a call that carries a `_Ticket`. Unpickled on the owner (in
# the reading thread, in frame order), it registers a `_Request` there. If the caller gives up (its timeout, an interrupt) it sends a `_Cancel`, also acted on when it is
# unpickled: so the request is cancelled before any frame read after it is handled, and an
# operation still waiting stops, having taken or put nothing. A take that has already taken
# its item hands it over with its reply; if the caller cannot get that reply (it gave up
# first, or it is lost: `worker_lost` cancels its requests, a reply to a closed connection
# fails), the item goes back to the front of the channel, from the owner (cancelled in time)
# or from the caller (the reply came late): exactly one of them gives it back.

# How often an owner-side wait that cannot be woken (a Future's; a take or put on a channel
# type other than Channel) looks whether its caller gave up.
_OP_SLICE = 0.2

_ticket_ids = itertools.count(1)


class _Request:
    """Owner side: an operation that may block (on a channel or a Future's cell), run here
    for process `key[0]`; `cancel` (its caller gave up, or is lost) makes it stop."""

    __slots__ = ("key", "cancelled", "chan")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.cancelled = False
        self.chan: Any = None

    def is_cancelled(self) -> bool:
        return self.cancelled

    def cancel(self) -> None:
        self.cancelled = True
        chan = self.chan
        if isinstance(chan, Channel):
            chan._wake()


_requests: dict[tuple[int, int], _Request] = {}


def _request_arrived(pid: int, n: int) -> _Request:
    req = _requests[(pid, n)] = _Request((pid, n))
    return req


def _cancel_request(pid: int, n: int) -> None:
    req = _requests.get((pid, n))
    if req is not None:  # else it has finished: its reply is on its way
        req.cancel()


class _Ticket:
    """Caller side: names one blocking operation; on the owner it becomes its `_Request`."""

    __slots__ = ("pid", "n")

    def __init__(self) -> None:
        self.pid, self.n = PGRP.id, next(_ticket_ids)

    def __reduce__(self):
        return (_request_arrived, (self.pid, self.n))


class _Cancel:
    """Caller side: unpickled on the owner, cancels the request of `ticket`."""

    __slots__ = ("ticket",)

    def __init__(self, ticket: _Ticket) -> None:
        self.ticket = ticket

    def __reduce__(self):
        return (_cancel_request, (self.ticket.pid, self.ticket.n))


def _cancelled(_: None) -> None:
    """The REMOTE_DO that carries a `_Cancel` (whose work is done when it is unpickled)."""


# How much longer than its `timeout` a caller waits for the owner's own answer (which says
# TimeoutError too) before it gives up by itself and cancels.
CALLER_GRACE = 0.5


def _ask_owner(ref: "Future | RemoteChannel", what: str, f: Callable, args: tuple,
               timeout: float | None, late: Callable[[bool, Any], None] | None = None) -> Any:
    """`f(rrid, *args, timeout, request)` on the reference's owner, an operation that may block
    there: the owner waits up to `timeout`, and so does this caller (plus CALLER_GRACE),
    whatever the owner does. If this caller gives up (timeout, interrupt), the owner is told
    to stop (see `_Request`) and a reply that comes anyway goes to `late`."""
    owner = ref.where
    if owner == PGRP.id:
        return f(ref.rrid, *args, timeout, None)
    ticket = _Ticket()

    def cancel() -> None:  # never waits for the owner to read
        try:
            connection(owner).send(pack(owner, protocol.REMOTE_DO,
                                        (_cancelled, (_Cancel(ticket),), {})), wait=False)
        except (ConnectionClosed, ProcessExitedException, ValueError):
            pass  # the owner is gone, with the value

    return call_fetch(owner, f, (ref.rrid, *args, timeout, ticket),
                      timeout=None if timeout is None else timeout + CALLER_GRACE,
                      what=lambda: f"{what} on {ref!r}", cancel=cancel, late=late)


# ==================================================================== Future
_PENDING, _VALUE, _ERROR, _REMOTE_DONE = 0, 1, 2, 3
_NO_TRACEBACK_YET = object()  # a Future's `_error_tb` before its error is first raised

# What a Future is for cancel() and running() (its `_phase`): an empty `Future(pid)`; a call
# still queued in an Executor (not sent yet); a call sent to its worker; anything else (a
# Future that arrived from another process, a call running in a thread here).
_PH_PLAIN, _PH_QUEUED, _PH_SENT, _PH_OTHER = 0, 1, 2, 3


class _CancelledCall(_cf.CancelledError):
    """The outcome of a cancelled Future (a `concurrent.futures.CancelledError`)."""


if _cf.TimeoutError is TimeoutError:  # Python >= 3.11
    FutureTimeoutError = TimeoutError
else:  # 3.10: concurrent.futures.TimeoutError is not the builtin; be both
    class FutureTimeoutError(_cf.TimeoutError, TimeoutError):  # type: ignore[no-redef, misc]
        """A Future's wait ran out of time (both TimeoutErrors of Python 3.10)."""


def _cancelled_error(fut: "Future") -> _CancelledCall:
    return _CancelledCall(f"{fut!r} was cancelled")


# Calls that arrived on this process and have not started yet, by RRID: a call's task takes
# its entry out before it runs, `_cancel_unstarted_ref` takes it out instead (both pop, so
# exactly one of them wins).
_unstarted: dict = {}


def _cancel_unstarted_ref(rrid: RRID) -> bool:
    """On a call's worker: make the call never run, if it has not started (True)."""
    cell = _unstarted.pop(rrid, None)
    if cell is None:
        return False
    try:
        cell.set(False, _CancelledCall(f"the call {tuple(rrid)} was cancelled on process {PGRP.id}"))
    except InvalidStateError:
        pass
    return True


def _cancel_plain_ref(rrid: RRID) -> bool:
    """On the owner of an empty `Future(pid)`: cancel it unless a value was put (True)."""
    try:
        STORE.lookup(rrid, _Cell).set(False, _CancelledCall(
            f"Future {tuple(rrid)} was cancelled on process {PGRP.id}"))
    except InvalidStateError:
        return False
    return True


def _on_owner(ref: "Future | RemoteChannel", f: Callable, *args: Any) -> Any:
    """Run `f(rrid, *args)` on the reference's owner (here, without a message, if we own it)."""
    if ref.where == PGRP.id:
        return f(ref.rrid, *args)
    return call_fetch(ref.where, f, (ref.rrid, *args))


T = TypeVar("T")


class AbstractRemoteRef:
    """What a Future and a RemoteChannel share: an owner (`where`), an RRID, and this
    process's count on the owner, given back when the reference is dropped."""

    __slots__ = ("where", "whence", "id", "_lock", "_held", "__weakref__")
    where: int
    whence: int
    id: int

    def _init_ref(self, where: int, rrid: RRID, count: int) -> None:
        if _flusher is None:
            _start_flusher()
        self.where = where
        self.whence, self.id = rrid
        self._lock = threading.Lock()
        held = self._held = _ClientRef(self, _released)
        key = (self.whence, self.id)  # a plain tuple, not the RRID: see `_ClientRef`
        held.where, held.rrid, held.count = where, key, count
        _client_refs[key] = held

    @property
    def rrid(self) -> RRID:
        """`RRID(whence, id)`: the reference's identity, the same in every process."""
        return RRID(self.whence, self.id)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.rrid == self.rrid

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.whence, self.id))


class Future(AbstractRemoteRef, _cf.Future[T]):
    """A write-once value that lives on process `where` (default: this one).

    Returned by `remotecall`; `Future(pid)` makes an empty one that anybody holding it may
    `put` once. `fetch` caches the value, so a second `fetch` costs nothing. Futures can be
    awaited (`await fut`) and accept completion callbacks. A Future can be passed to other
    workers as an argument of a remote call; they fetch from the owner.

    It is also a `concurrent.futures.Future`: `result`, `exception`, `cancel`, `running`,
    `cancelled`, and `concurrent.futures.wait`, `as_completed` and `asyncio.wrap_future`
    work on it (see `cancel` for what can be cancelled).

    `Future[T]` is the type of a Future whose value is a `T`: `remotecall(f, ...)` returns
    a `Future[int]` when `f` returns an `int`.

    Example::

        fut = remotecall(sum, 2, [1, 2, 3])   # Future[int]
        fut.fetch()                            # 6
        f = Future(2)                          # an empty Future owned by worker 2
        remotecall_fetch(lambda f: f.put("x") and None, 3, f)
        f.fetch()                              # "x"
    """

    __slots__ = ("_st", "_value", "_pushed", "_latch", "_callbacks", "_watching", "_pins",
                 "_phase", "_cancel_hook", "_cond", "_wlist", "_error_tb")

    def __init__(self, pid: int | None = None):
        rrid = _new_rrid()
        self._setup(PGRP.id if pid is None else pid, rrid, _PENDING, None, 1, push=False)

    @classmethod
    def _make(cls, where: int, rrid: RRID, state: int, value: Any, count: int,
              push: bool, phase: int = _PH_OTHER) -> "Future":
        self = cls.__new__(cls)
        self._setup(where, rrid, state, value, count, push, phase)
        return self

    def _setup(self, where: int, rrid: RRID, state: int, value: Any, count: int,
               push: bool, phase: int = _PH_PLAIN) -> None:
        self._st = state
        self._value = value
        self._error_tb: Any = _NO_TRACEBACK_YET  # see `_error`
        self._phase = phase
        self._cancel_hook: Callable[[Future], bool] | None = None
        self._cond: threading.Condition | None = None  # concurrent.futures' view, made on demand
        self._wlist: list | None = None
        # A call's Future: its outcome comes to us (a push, a reply), no need to ask the
        # owner. Who waits before it lands waits on the latch, made by the first such waiter
        # (most Futures are fetched after their outcome landed: no lock for them).
        self._pushed = push and state == _PENDING
        self._latch: threading.Lock | None = None
        self._callbacks: list | None = None
        self._watching = False
        self._pins = 0  # messages being pickled that send this Future as a reference
        self._init_ref(where, rrid, count)

    def __repr__(self) -> str:
        state = {_PENDING: "pending", _VALUE: "ready", _ERROR: "failed", _REMOTE_DONE: "done"}[self._st]
        if state == "failed" and type(self._value) is _CancelledCall:
            state = "cancelled"
        return f"Future(where={self.where}, whence={self.whence}, id={self.id}, {state})"

    def __reduce__(self):
        if self._st in (_VALUE, _ERROR):
            return (_rebuild_future, (self.where, self.whence, self.id, self._st, self._value))
        raise TypeError("a pending Future can only be sent to pydist processes, inside a remote call")

    # -- completion (called by the push handler, local owners, or death) --
    def _complete(self, state: int, value: Any) -> None:
        """Record the outcome; release our count once the value is cached here."""
        if state == _REMOTE_DONE and value is not None:
            state = _ERROR  # finished remotely with an error: the error is all there is
        with self._lock:
            if self._st in (_VALUE, _ERROR):
                return
            if state == _REMOTE_DONE and self._st == _REMOTE_DONE:
                return
            was_pending = self._st == _PENDING
            self._st = state
            self._value = value
            release = 0
            held = self._held
            if state in (_VALUE, _ERROR) and held.count > 0 and not self._pins:
                release, held.count = held.count, 0  # (pinned: `_unpin` gives it back)
            callbacks = self._callbacks if was_pending else None
            if was_pending:
                self._callbacks = None
                if self._wlist or self._cond is not None:  # concurrent.futures waits
                    self._notify_waiters(state, value)
            latch = self._latch if was_pending else None
        if release and not isinstance(value, ProcessExitedException):
            _queue_delta(self.where, self.rrid, PGRP.id, -release)
        if latch is not None:
            latch.release()
        for cb in callbacks or ():
            try:
                cb(self)
            except Exception:
                logging.getLogger(__name__).exception("pydist: error in a Future done-callback")

    def _notify_waiters(self, state: int, value: Any) -> None:
        """Tell the waiters of `concurrent.futures.wait` / `as_completed` (lock held), as
        `concurrent.futures.Future.set_result` does."""
        for waiter in self._wlist or ():
            if state != _ERROR:
                waiter.add_result(self)
            elif type(value) is _CancelledCall:
                waiter.add_cancelled(self)
            else:
                waiter.add_exception(self)
        if self._cond is not None:
            self._cond.notify_all()

    # What concurrent.futures' module functions (wait, as_completed) read of a Future, made
    # on demand so that a Future nobody waits for that way costs nothing more. The condition
    # is over the Future's own lock, which `_complete` holds while it changes the state.
    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            cond = self._cond = threading.Condition(self._lock)
        return cond

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        # (read and changed by concurrent.futures with `_condition` held)
        if self._wlist is None:
            self._wlist = []
        return self._wlist

    @property
    def _state(self) -> str:  # type: ignore[override]
        st = self._st
        if st == _PENDING:
            return _cf._base.RUNNING if self._phase == _PH_SENT else _cf._base.PENDING
        if st == _ERROR and type(self._value) is _CancelledCall:
            return _cf._base.CANCELLED_AND_NOTIFIED
        return _cf._base.FINISHED

    def _unpin(self) -> None:
        """A message that sends this Future as a reference has been counted for (or will not
        be sent): give back the count `_complete` kept for it meanwhile."""
        with self._lock:
            self._pins -= 1
            release = 0
            held = self._held
            if not self._pins and self._st in (_VALUE, _ERROR) and held.count > 0:
                release, held.count = held.count, 0
        if release and not isinstance(self._value, ProcessExitedException):
            _queue_delta(self.where, self.rrid, PGRP.id, -release)

    def _error(self) -> BaseException:
        """The error, with the traceback it had when it was first raised from here: raising
        one exception object again would add each raise's frames to the last one's, and a
        Future fetched n times would show its frames n times."""
        exc = self._value
        if self._error_tb is _NO_TRACEBACK_YET:
            self._error_tb = exc.__traceback__
        return exc.with_traceback(self._error_tb)

    def _outcome(self) -> Any:
        if self._st == _ERROR:
            try:
                raise self._error()
            finally:
                # The error's traceback keeps the frames it passes through: without `self`
                # in them it makes no cycle with this Future, which is then freed as soon as
                # it is dropped, and its owner's copy with it (as concurrent.futures does).
                del self
        return self._value

    # -- public API --
    def isready(self) -> bool:
        """True if a value has been put (or the call has finished)."""
        if self._st != _PENDING:
            return True
        if self.where == PGRP.id:
            cell = STORE.get(self.rrid)
            return cell is not None and cell.done
        if self._pushed:
            return False
        return _on_owner(self, _isready_ref)

    def wait(self, timeout: float | None = None) -> "Future[T]":
        """Wait until the value is there and return the Future; raise the RemoteException of
        a failed call, `TimeoutError` after about `timeout` seconds."""
        try:
            self._wait_done(timeout)
            if self._st == _ERROR:
                raise self._error()
            return self
        finally:
            del self  # (see `_outcome`)

    def _wait_done(self, timeout: float | None) -> None:
        if self._st != _PENDING:
            return
        if self.where == PGRP.id:
            cell = STORE.lookup(self.rrid, _Cell)
            if not cell.wait(timeout):
                raise TimeoutError(f"Future not ready after {timeout} seconds")
            self._complete(_VALUE if cell.ok else _ERROR, cell.value)
            return
        if self._pushed:
            # Read the push here if nobody else reads that connection.
            w = PGRP.workers.get(self.where)
            if w is not None and w.conn is not None:
                wait_reply(w.conn, lambda: self._st != _PENDING, timeout)
            with self._lock:  # (`_complete` reads the latch under this lock)
                if self._st != _PENDING:
                    return
                latch = self._latch
                if latch is None:
                    latch = self._latch = threading.Lock()
                    latch.acquire()
            if not acquire(latch, timeout):
                raise TimeoutError(f"Future not ready after {timeout} seconds (process {self.where})")
            latch.release()
            return
        ok, err = _ask_owner(self, "Future.wait", _wait_ref, (), timeout)
        self._complete(_REMOTE_DONE, None if ok else err)

    def fetch(self, timeout: float | None = None) -> T:
        """The value (waiting for it); raises the RemoteException of a failed call,
        `ProcessExitedException` if the owner is lost, `TimeoutError` after about `timeout`
        seconds (the Future stays usable)."""
        try:
            if self._st in (_VALUE, _ERROR):
                return self._outcome()
            self._wait_done(timeout)
            if self._st in (_VALUE, _ERROR):
                return self._outcome()
            ok, value = _ask_owner(self, "Future.fetch", _fetch_ref, (), timeout)
            self._complete(_VALUE if ok else _ERROR, value)
            del value
            return self._outcome()
        finally:
            del self  # (see `_outcome`)

    def put(self, value: T) -> "Future[T]":
        """Set the value; a Future can be set only once (InvalidStateError)."""
        if self._st in (_VALUE, _ERROR):
            raise InvalidStateError("Future can be set only once")
        _on_owner(self, _put_ref, value)
        self._complete(_VALUE, value)
        return self

    def done(self) -> bool:
        """True once the outcome is known here: finished, failed or cancelled (never blocks,
        never messages)."""
        return self._st != _PENDING

    # -- concurrent.futures.Future --
    def result(self, timeout: float | None = None) -> T:
        """The value, as `fetch`, for `concurrent.futures` code: raises what `fetch` raises
        (the RemoteException of a failed call, `ProcessExitedException`), `CancelledError`
        if cancelled, `TimeoutError` (also `concurrent.futures.TimeoutError`) after about
        `timeout` seconds."""
        try:
            return self.fetch(timeout)
        except TimeoutError as e:
            raise self._timeout_error(e) from None
        finally:
            del self  # (see `_outcome`)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception `result` would raise, or None once it succeeded (waiting up to
        `timeout` seconds, then `TimeoutError`); raises `CancelledError` if cancelled. A
        result too large to have been pushed is not fetched for this."""
        if self._st == _PENDING:
            try:
                self._wait_done(timeout)
            except TimeoutError as e:
                raise self._timeout_error(e) from None
            except ProcessExitedException as e:
                return e
        if self._st == _ERROR:
            if type(self._value) is _CancelledCall:
                try:
                    raise self._error()
                finally:
                    del self  # (see `_outcome`)
            return self._error()
        return None

    def _timeout_error(self, e: TimeoutError) -> BaseException:
        """`e` as concurrent.futures' TimeoutError, unless it is the call's own outcome."""
        if isinstance(e, FutureTimeoutError) or (self._st == _ERROR and e is self._value):
            return e
        return FutureTimeoutError(*e.args)

    def cancelled(self) -> bool:
        """True if `cancel` succeeded (here or in another holder of a `Future(pid)`)."""
        return self._st == _ERROR and type(self._value) is _CancelledCall

    def running(self) -> bool:
        """True while the call has been sent to its worker and has not finished (it may be
        waiting there behind another call of its Executor, and then `cancel` still works)."""
        return self._st == _PENDING and self._phase == _PH_SENT

    def cancel(self) -> bool:
        """Make sure the call never runs; True if it will not (or was cancelled already).

        A call still queued in its `Executor`, or sent to its worker but not started there
        (the worker is asked: one round trip), is cancelled: `result` and `fetch` then raise
        `concurrent.futures.CancelledError`. A running or finished call is not (False). An
        empty `Future(pid)` is cancelled on its owner unless a value was put: every holder's
        `fetch` then raises CancelledError and `put` raises InvalidStateError. Only the
        process that made the call (or the Future) can cancel it; elsewhere this says False."""
        if self._st != _PENDING:
            return self.cancelled()
        phase = self._phase
        hook = self._cancel_hook
        try:
            if phase == _PH_PLAIN:
                ok = _on_owner(self, _cancel_plain_ref)
            elif hook is not None:
                ok = hook(self)
            elif phase == _PH_SENT:
                ok = call_fetch(self.where, _cancel_unstarted_ref, (self.rrid,))
            else:
                ok = False
        except ProcessExitedException:
            ok = False  # (the Future fails with it)
        if ok:
            self._complete(_ERROR, _cancelled_error(self))
        return self.cancelled()

    def set_running_or_notify_cancel(self) -> bool:
        """For executors (concurrent.futures): False if the Future was cancelled, True if it
        is pending; RuntimeError once it has finished."""
        if self.cancelled():
            return False
        if self._st == _PENDING:
            return True
        raise RuntimeError(f"{self!r} in unexpected state")

    def set_result(self, result: T) -> None:
        """`put(result)`, for executors (concurrent.futures): InvalidStateError if set."""
        self.put(result)

    def set_exception(self, exception: BaseException | None) -> None:
        """Make the Future fail with `exception` (`fetch` and `result` raise it, on every
        holder): InvalidStateError if it is set already."""
        if self._st in (_VALUE, _ERROR):
            raise InvalidStateError("Future can be set only once")
        _on_owner(self, _set_error_ref, exception)
        self._complete(_ERROR, exception)

    def add_done_callback(self, fn: Callable[["Future[T]"], object]) -> None:
        """Call `fn(self)` once, when the Future is done (at once if it is). It runs in the
        thread that completes the Future, often a connection's reading thread: it must not
        block. An exception it raises is logged."""
        with self._lock:
            pending = self._st == _PENDING
            if pending:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                start_watch = not self._watching and not self._pushed
                self._watching = True
        if not pending:
            try:
                fn(self)
            except Exception:
                logging.getLogger(__name__).exception("pydist: error in a Future done-callback")
        elif start_watch:
            self._watch()

    def _watch(self) -> None:
        """Learn of completion without a push: ask the owner to tell us."""
        if self.where == PGRP.id:
            cell = STORE.lookup(self.rrid, _Cell)
            cell.on_done(lambda c: self._complete(_VALUE if c.ok else _ERROR, c.value))
            return

        def landed(slot) -> None:
            if slot.ok:
                ok, err = slot.value
                self._complete(_REMOTE_DONE, None if ok else err)
            else:
                self._complete(_ERROR, slot.value)

        try:
            call_async(self.where, _wait_ref, (self.rrid, None), None, landed)
        except ProcessExitedException as e:
            self._complete(_ERROR, e)

    def __await__(self) -> Generator[Any, None, T]:
        import asyncio

        if self._st == _PENDING:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: Future) -> None:
                loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))  # type: ignore[func-returns-value]

            self.add_done_callback(wake)
            yield from waiter.__await__()
        try:
            if self._st in (_VALUE, _ERROR):
                return self._outcome()
            loop = asyncio.get_running_loop()
            return (yield from loop.run_in_executor(None, self.fetch).__await__())
        finally:
            del self  # (see `_outcome`)

    def __getitem__(self, key: Any) -> Any:
        return self.fetch()[key]  # type: ignore[index]


# Owner-side operations, run as calls on the owner.
def _isready_ref(rrid: RRID) -> bool:
    cell = STORE.get(rrid)
    return cell is not None and cell.done


def _wait_ref(rrid: RRID, timeout: float | None, req: "_Request | None" = None) -> tuple[bool, Any]:
    cell = _wait_cell(rrid, timeout, req)
    return (True, None) if cell.ok else (False, cell.value)


def _fetch_ref(rrid: RRID, timeout: float | None, req: "_Request | None" = None) -> tuple[bool, Any]:
    cell = _wait_cell(rrid, timeout, req)
    return cell.ok, cell.value


def _wait_cell(rrid: RRID, timeout: float | None, req: "_Request | None") -> _Cell:
    """The cell of `rrid` once set; TimeoutError after `timeout`, Abandoned once the caller
    of `req` gives up (looked at every _OP_SLICE seconds)."""
    cell = STORE.lookup(rrid, _Cell)
    if req is None:
        done = cell.wait(timeout)
    else:
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not req.cancelled:
                t = _OP_SLICE if deadline is None else min(_OP_SLICE, deadline - time.monotonic())
                done = cell.wait(max(t, 0.0))
                if done or (deadline is not None and time.monotonic() >= deadline):
                    break
            else:
                raise Abandoned("wait")
        finally:
            _requests.pop(req.key, None)
    if not done:
        raise TimeoutError(f"Future not ready after {timeout} seconds")
    return cell


def _put_ref(rrid: RRID, value: Any) -> None:
    STORE.lookup(rrid, _Cell).set(True, value)


def _set_error_ref(rrid: RRID, exc: BaseException) -> None:
    STORE.lookup(rrid, _Cell).set(False, exc)


def _reduce_future(fut: Future, pickler: Any):
    with fut._lock:  # decide and pin at once: `_complete` then keeps our count (see _pin)
        if fut._st in (_VALUE, _ERROR):
            return (_rebuild_future, (fut.where, fut.whence, fut.id, fut._st, fut._value))
        if fut._pushed and fut._held.count == 0:  # an Executor's, see `sending`
            raise TypeError(f"{fut!r} is an Executor's and not done: it cannot be sent yet")
        if pickler.dest is not None:
            fut._pins += 1
    if pickler.dest is not None:
        _note_new_client(fut, pickler, fut._unpin)
    return (_rebuild_future, (fut.where, fut.whence, fut.id, _PENDING, None))


def _note_new_client(ref: "Future | RemoteChannel", pickler: Any,
                     unpin: Callable[[], None] | None = None) -> None:
    """A pending reference is being sent to `pickler.dest`: once the message has pickled,
    the owner gets "+1 for dest" before the message leaves, by the route our own later
    count changes take (also when dest is the owner: counting on arrival would be too late,
    see the module docstring). Then `unpin` lets the Future give its own count back."""
    dest = pickler.dest
    if dest is None:
        return
    where, rrid = ref.where, ref.rrid
    if where == PGRP.id:
        count = lambda: STORE.apply(rrid, dest, +1)  # noqa: E731
    else:
        count = lambda: _send_deltas(where, [(rrid.whence, rrid.id, dest, +1)])  # noqa: E731
    context = pickler.context
    if unpin is None:
        context.setdefault("after", []).append(count)
        return

    def after() -> None:
        try:
            count()
        finally:
            unpin()

    context.setdefault("after", []).append(after)
    context.setdefault("discard", []).append(unpin)  # not sent after all: nothing to count


def _arrived(ref_cls: type, where: int, rrid: RRID) -> Any:
    """Count this process as a client of a pending reference that just arrived; return the
    local object (the existing one, if we already hold this reference)."""
    existing = _local(rrid)  # (the sender has counted us already, also if we are the owner)
    if existing is not None and type(existing) is ref_cls:
        with existing._lock:
            if getattr(existing, "_st", _PENDING) not in (_VALUE, _ERROR):
                existing._held.count += 1
                return existing
        _queue_delta(where, rrid, PGRP.id, -1)  # already fetched here: give it back
        return existing
    return None


def _rebuild_future(where: int, whence: int, id_: int, state: int, value: Any) -> Future:
    rrid = RRID(whence, id_)
    if state in (_VALUE, _ERROR):
        existing = _local(rrid)
        if isinstance(existing, Future):
            existing._complete(state, value)
            return existing
        return Future._make(where, rrid, state, value, 0, push=False)
    existing = _arrived(Future, where, rrid)
    if existing is not None:
        return existing
    return Future._make(where, rrid, _PENDING, None, 1, push=False)


serialization.register_reducer(Future, _reduce_future)


def on_push(conn, msg: protocol.Message):
    """A remotecall we made has finished on its worker."""
    fut = _local(RRID(msg.a, msg.b))
    if not isinstance(fut, Future):  # dropped already (its release gave our count back)
        if not msg.flags & protocol.FLAG_NOVALUE:
            # The worker counted us for the references the value holds: unpickled and let
            # go, they give those counts back.
            try:
                serialization.loads(msg.body, msg.buffers)
            except BaseException:
                pass
        return None
    if msg.flags & protocol.FLAG_NOVALUE:
        fut._complete(_REMOTE_DONE, None)
        return None
    try:
        value = serialization.loads(msg.body, msg.buffers)
    except BaseException:
        fut._complete(_REMOTE_DONE, None)  # fetch will ask the owner, and report the failure
        return None
    fut._complete(_ERROR if msg.flags & protocol.FLAG_ERROR else _VALUE, value)
    return None



def new_call_future(where: int) -> Future:
    """The Future of a remotecall to `where`, whose result the worker will push to us."""
    return Future._make(where, _new_rrid(), _PENDING, None, 1, push=True, phase=_PH_SENT)


def landed(fut: Future, slot: Any) -> None:
    """The reply to the request of a queued Future (see `sending`) is its outcome."""
    fut._complete(_VALUE if slot.ok else _ERROR, slot.value)


def not_cancellable(fut: Future) -> bool:
    """The cancel hook of a call that starts as soon as it is made (a call to this process)."""
    return False


def new_queued_future(cancel: Callable[[Future], bool],
                      done: Callable[[Future], object] | None = None) -> Future:
    """The Future of a call not sent yet (queued in an Executor): no owner yet (`where` 0),
    `cancel` (the queue's) takes it back; `sending` then makes it a call's Future. Its
    outcome comes in a reply (`landed`): it can be sent to other processes only once done."""
    fut = Future._make(0, _new_rrid(), _PENDING, None, 0, push=True, phase=_PH_QUEUED)
    fut._cancel_hook = cancel
    if done is not None:  # (a first done-callback, before anyone else can see the Future)
        fut._callbacks = [done]
    return fut


def sending(fut: Future, where: int, cancel: Callable[[Future], bool] | None = None) -> None:
    """A queued Future's call is about to be sent to `where`, as a request whose reply
    completes the Future (nothing is stored there, no count is held); to this process, it
    runs as a call of a Future owned here (one count, on our own store)."""
    fut.where = fut._held.where = where
    if where == PGRP.id:
        fut._held.count = 1
    fut._cancel_hook = cancel
    fut._phase = _PH_SENT


def worker_lost(pid: int, state: Any) -> None:
    """Fail every Future owned by `pid` still waiting here; drop `pid` from our counts; stop
    the channel operations `pid` was waiting for here (they take nothing more)."""
    STORE.remove_pid(pid)
    for key in [k for k in list(_requests) if k[0] == pid]:
        req = _requests.pop(key, None)
        if req is not None:
            req.cancel()
    lost = exited(pid)
    for held in list(_client_refs.values()):
        ref = held()
        if isinstance(ref, Future) and ref.where == pid and ref._st in (_PENDING, _REMOTE_DONE):
            ref._complete(_ERROR, lost)



# ==================================================================== RemoteChannel
def _default_channel() -> Channel:
    return Channel(1)


class RemoteChannel(AbstractRemoteRef, Generic[T]):
    """A channel that lives on process `where`; every operation runs there.

    `RemoteChannel(f, pid)` creates the channel now by running `f()` on `pid` (any object with
    Channel's methods); `RemoteChannel(pid)` or `RemoteChannel(pid=pid)` gets a `Channel(1)`
    on first use. Pass it to remote calls to share it: every holder talks to the owner.
    `RemoteChannel[T]` is the type of one that carries values of type `T`.

    Example::

        jobs: RemoteChannel[int] = RemoteChannel(lambda: Channel(32), 1)
        remote_do(lambda ch: [ch.put(i) for i in range(3)], 2, jobs)
        [jobs.take() for _ in range(3)]   # [0, 1, 2]
    """

    __slots__ = ()

    def __init__(self, f: Callable[[], Any] | int | None = None, pid: int | None = None):
        if isinstance(f, int) and not isinstance(f, bool):
            f, pid = None, f
        where = PGRP.id if pid is None else pid
        self._init_ref(where, _new_rrid(), 1)
        if f is not None:
            if not callable(f):
                raise TypeError(f"RemoteChannel: f must be a zero-argument callable, got {f!r}")
            _on_owner(self, _create_channel, f)

    def __repr__(self) -> str:
        return f"RemoteChannel(where={self.where}, whence={self.whence}, id={self.id})"

    def __reduce__(self):
        raise TypeError("a RemoteChannel can only be sent to pydist processes, inside a remote call")

    # put/take/fetch/wait pass arguments after `timeout`, and keyword arguments, on to the
    # channel object's own method (Julia's `put!(rr, args...)`): for a user channel type.

    def put(self, v: T, timeout: float | None = None, *args: Any,
            **kwargs: Any) -> "RemoteChannel[T]":
        """Put `v` (waits while the channel is full); returns the channel. After a
        TimeoutError (or an interrupt) the put may still have happened, if the owner had
        already made it, but never happens later: once the owner hears that the caller gave
        up, a put still waiting for room is withdrawn."""
        _blocking_op(self, "put", (v, *args), timeout, kwargs)
        return self

    def take(self, timeout: float | None = None, *args: Any, **kwargs: Any) -> T:
        """Remove and return the first value, waiting for one. After a TimeoutError (or an
        interrupt) nothing is lost: a value the owner took for this caller goes back to the
        front of the channel (with a channel type that has no `put_front`, to its end)."""
        return _blocking_op(self, "take", args, timeout, kwargs)

    def fetch(self, timeout: float | None = None, *args: Any, **kwargs: Any) -> T:
        """The first value, without removing it (waiting for one)."""
        return _blocking_op(self, "fetch", args, timeout, kwargs)

    def wait(self, timeout: float | None = None, *args: Any, **kwargs: Any) -> None:
        """Wait until a value is there (without taking it); `TimeoutError` after about
        `timeout` seconds."""
        _blocking_op(self, "wait", args, timeout, kwargs)

    def isready(self) -> bool:
        """True if a `take` would not wait (asks the owner)."""
        return _on_owner(self, _channel_op, "isready", ())

    def isempty(self) -> bool:
        """True if no value is waiting (asks the owner)."""
        return _on_owner(self, _channel_op, "isempty", ())

    def close(self) -> None:
        """Close the channel on its owner: later puts fail, takes drain what is left and
        then raise InvalidStateError (iteration stops)."""
        _on_owner(self, _channel_op, "close", ())

    def isopen(self) -> bool:
        """False once the channel is closed (asks the owner)."""
        return _on_owner(self, _channel_op, "isopen", ())

    def __len__(self) -> int:
        return _on_owner(self, _channel_op, "__len__", ())

    def __iter__(self) -> Iterator[T]:
        """Take values until the channel is closed and empty."""
        return take_until_closed(self.take)


def _create_channel(rrid: RRID, f: Callable[[], Any]) -> None:
    chan = f()
    for method in ("put", "take", "isready"):
        if not callable(getattr(chan, method, None)):
            raise TypeError(f"RemoteChannel: f() must return a channel-like object, got {chan!r}")
    STORE.lookup(rrid, lambda: chan)


_CHANNEL_OPS = {"put", "take", "fetch", "wait", "isready", "isempty", "close", "isopen", "__len__"}


def _channel_op(rrid: RRID, op: str, args: tuple) -> Any:
    if op not in _CHANNEL_OPS:
        raise ValueError(f"unknown channel operation {op!r}")
    chan = STORE.lookup(rrid, _default_channel)
    return getattr(chan, op)(*args)


def _blocking_op(rc: "RemoteChannel", op: str, args: tuple, timeout: float | None,
                 kwargs: dict) -> Any:
    """`op(*args, timeout=timeout, **kwargs)` on the channel's owner; giving up on it loses
    nothing."""
    late = functools.partial(_late_take, rc.where, rc.rrid) if op == "take" else None
    if kwargs:
        return _ask_owner(rc, op, _owner_op_kw, (op, args, kwargs), timeout, late)
    return _ask_owner(rc, op, _owner_op, (op, args), timeout, late)


def _late_take(owner: int, rrid: RRID, ok: bool, value: Any) -> None:
    """Caller side: the reply to a take we gave up on came anyway; give its item back."""
    if not ok:
        return  # cancelled in time (Abandoned), timed out, or the owner is lost
    try:
        connection(owner).send(pack(owner, protocol.REMOTE_DO, (_give_back_ref, (rrid, value), {})),
                               wait=False)
    except (ConnectionClosed, ProcessExitedException, ValueError):
        pass  # the owner is gone, with its channel
    except Exception:
        logging.getLogger(__name__).exception(
            "pydist: could not give an item back to process %d", owner)


def _give_back_ref(rrid: RRID, value: Any) -> None:
    _give_back(STORE.lookup(rrid, _default_channel), value)


def _give_back(chan: Any, value: Any) -> None:
    """Put a taken value back at the front (at the end, for a type without `put_front`)."""
    put_front = getattr(chan, "put_front", None)
    if put_front is not None:
        put_front(value)
    else:
        chan.put(value)


def _owner_op(rrid: RRID, op: str, args: tuple, timeout: float | None,
              req: _Request | None) -> Any:
    """Owner side of `_blocking_op`: in a remote call on behalf of process `req.key[0]`, or
    here for this process (`req` None)."""
    return _owner_op_kw(rrid, op, args, None, timeout, req)


def _owner_op_kw(rrid: RRID, op: str, args: tuple, kwargs: dict | None,
                 timeout: float | None, req: _Request | None) -> Any:
    """`_owner_op` with keyword arguments for the channel type's method."""
    if op not in ("put", "take", "fetch", "wait"):
        if req is not None:
            _requests.pop(req.key, None)
        raise ValueError(f"unknown channel operation {op!r}")
    plain = kwargs is None and len(args) == (op == "put")  # no arguments for the channel type
    if req is None:
        chan = STORE.lookup(rrid, _default_channel)
        if plain and isinstance(chan, Channel):
            if op == "take" and timeout is None and not chan._take_is_due():
                # Its value most likely comes from the peer this thread last heard from (a
                # pipeline, a ping-pong): read that connection here until it does.
                read_until_woken(chan._take_is_due, chan._watch, chan._unwatch)
            return getattr(chan, op)(*args, timeout)
        return _user_op(chan, op, args, kwargs or {}, timeout, None)
    try:
        chan = STORE.lookup(rrid, _default_channel)
        req.chan = chan
        if req.cancelled:
            raise Abandoned(op)
        if plain and isinstance(chan, Channel):
            value = getattr(chan, "_" + op)(*args, timeout, req.is_cancelled)
        else:
            value = _user_op(chan, op, args, kwargs or {}, timeout, req)
        if op != "take":
            return None if op == "put" else value  # (a put's reply need not carry its value)
    finally:
        _requests.pop(req.key, None)
    # Hand the item over with our reply; if that cannot happen, it goes back.
    if req.cancelled:
        _give_back(chan, value)
        raise Abandoned(op)
    try:
        reply = take_reply()
    except BaseException:  # interrupted here
        _give_back(chan, value)
        raise
    if not reply(True, value):  # the caller's connection is closed
        _give_back(chan, value)


def owner_op_now(reply: Callable[[bool, Any], bool], rrid: RRID, op: str, args: tuple,
                 timeout: float | None, req: _Request | None) -> bool:
    """The quick form of `_owner_op` (`calls.register_quick`), in the owner's reading thread:
    a put into a plain Channel with room is done and replied to at once (no thread hand-off;
    the taker is woken from here). False, having done nothing, for anything else: it runs as
    a task. (Not a take: its reply pickles a user's value, which may run user code.)"""
    if req is None or req.cancelled or op != "put" or len(args) != 1:
        return False
    chan = STORE.lookup(rrid, _default_channel)
    if type(chan) is not Channel or not chan._try_put(args[0]):
        return False
    _requests.pop(req.key, None)
    reply(True, None)  # (first: a woken taker would contend for the GIL with this send)
    chan._wake()
    return True


_has_timeout: dict[tuple[type, str], bool] = {}


def _takes_timeout(chan: Any, op: str) -> bool:
    """Whether the channel type's `op` method has a `timeout` parameter (one of a user's
    channel type may not: Julia's `put!(c, v)` has none)."""
    key = (type(chan), op)
    known = _has_timeout.get(key)
    if known is None:
        try:
            param = inspect.signature(getattr(chan, op)).parameters.get("timeout")
        except (TypeError, ValueError):  # cannot tell (a builtin): give it one, as Channel's
            known = True
        else:
            known = param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD,
                                                          param.KEYWORD_ONLY)
        _has_timeout[key] = known
    return known


def _user_op(chan: Any, op: str, args: tuple, kwargs: dict, timeout: float | None,
             req: _Request | None) -> Any:
    """`chan.op(*args, **kwargs)` on a channel that is not a plain `Channel` (or is, with
    extra arguments), with `timeout=` if its method takes one. If it takes none, a remote
    caller's own wait is still bounded (`_ask_owner`), and a take it gave up on gives its
    item back when that comes; a caller here cannot be bounded: it is told so."""
    method = getattr(chan, op)
    if not _takes_timeout(chan, op):
        if req is None and timeout is not None:
            raise TypeError(f"{type(chan).__name__}.{op} has no timeout parameter: a timeout "
                            f"on a RemoteChannel owned by this process (process {PGRP.id}) "
                            f"needs one")
        return method(*args, **kwargs)
    if req is None or op not in ("put", "take"):
        return method(*args, timeout=timeout, **kwargs)
    return _sliced_op(method, op, args, kwargs, timeout, req)


def _sliced_op(method: Callable, op: str, args: tuple, kwargs: dict, timeout: float | None,
               req: _Request) -> Any:
    """`method(*args, timeout=, **kwargs)` of a channel type that cannot be woken: in slices
    of _OP_SLICE, looking between them whether the caller gave up."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if req.cancelled:
            raise Abandoned(op)
        t = _OP_SLICE if deadline is None else min(_OP_SLICE, deadline - time.monotonic())
        try:
            return method(*args, timeout=max(t, 0.0), **kwargs)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{op}: nothing within {timeout} seconds") from None


def _reduce_channel(rc: RemoteChannel, pickler: Any):
    _note_new_client(rc, pickler)
    return (_rebuild_channel, (rc.where, rc.whence, rc.id))


def _rebuild_channel(where: int, whence: int, id_: int) -> RemoteChannel:
    rrid = RRID(whence, id_)
    existing = _arrived(RemoteChannel, where, rrid)
    if existing is not None:
        return existing
    rc = RemoteChannel.__new__(RemoteChannel)
    rc._init_ref(where, rrid, 1)
    return rc


serialization.register_reducer(RemoteChannel, _reduce_channel)


# ==================================================================== module-level forms
def remoteref_id(r: Future[Any] | RemoteChannel[Any]) -> RRID:
    """The RRID(whence, id) of a remote reference."""
    return r.rrid


def channel_from_id(rrid: RRID | tuple) -> Any:
    """The backing channel (or Future cell) of `rrid`; only on its owner."""
    store = STORE.get(RRID(*rrid))
    if store is None:
        raise KeyError("Local instance of remote reference not found")
    return store


@overload
def fetch(x: Future[T] | RemoteChannel[T] | Channel[T],
          timeout: float | None = None, *args: Any, **kwargs: Any) -> T: ...
@overload
def fetch(x: T, timeout: float | None = None, *args: Any, **kwargs: Any) -> T: ...
def fetch(x: Any, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
    """Fetch a Future or RemoteChannel (or Channel); any other object is returned as is.

    `fetch(remotecall(f, 2))` is `remotecall_fetch(f, 2)`; the second form lets code accept
    either a value or a reference to one. Arguments after `timeout` go to the channel's own
    `fetch` (see `RemoteChannel.put`)."""
    if isinstance(x, (Future, RemoteChannel, Channel)):
        if timeout is None and not args and not kwargs:
            return x.fetch()
        return x.fetch(timeout, *args, **kwargs)
    return x


def put(x: Any, v: Any, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
    """`x.put(v)`: put into a Future (once), RemoteChannel or Channel; returns `x`. `timeout`
    bounds the wait for room in a channel (a Future's put never waits); arguments after
    `timeout` go to a RemoteChannel's channel (Julia's `put!(rr, args...)`)."""
    if isinstance(x, Future):
        return x.put(v, *args, **kwargs)
    if timeout is None and not args and not kwargs:
        return x.put(v)
    return x.put(v, timeout, *args, **kwargs)


def take(x: Any, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
    """`x.take()`: remove and return the first value of a RemoteChannel or Channel (or take a
    worker from a pool), waiting at most `timeout` seconds; arguments after `timeout` go to a
    RemoteChannel's channel."""
    if timeout is None and not args and not kwargs:
        return x.take()
    return x.take(timeout, *args, **kwargs)


def isready(x: Any) -> bool:
    """`x.isready()`: True if fetching or taking from `x` would not wait (a Future with its
    value, a channel with an item, a pool with a free worker)."""
    return x.isready()


def wait(x: Any, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
    """`x.wait()`: wait until `x` is ready (a Future has its value, a channel an item, a pool a
    free worker), at most `timeout` seconds; returns what `x.wait` returns. Arguments after
    `timeout` go to a RemoteChannel's channel."""
    if timeout is None and not args and not kwargs:
        return x.wait()
    return x.wait(timeout, *args, **kwargs)
