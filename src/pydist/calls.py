"""Calls between processes: the connection a call goes over (made on first use), reply
slots, sending a request and waiting for its reply, and running an incoming call in its own
thread, where an interrupt can reach it.

This is the plumbing under `remotecall_fetch`, `remote_do` and every operation on a remote
reference (which runs as a small call on the reference's owner, as Julia's `call_on_owner`).
The CALL_FETCH, REMOTE_DO and RESULT handlers are here; `runtime` registers them.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
import threading
import time
import types
from typing import Any, Callable

from . import protocol, serialization
from .exceptions import (
    CapturedException,
    ProcessExitedException,
    RemoteException,
    SerializationError,
    make_remote_exception,
)
from .group import PGRP, Worker
from .joining import PeerRefused, dial_peer
from .managers import worker_timeout
from .transport import ConnectionClosed, Connection, SendTimeout, flush_soon, give_back_lent_role

log = logging.getLogger(__name__)

_EMPTY: dict = {}


# ==================================================================== connections
def exited(pid: int) -> ProcessExitedException:
    """The ProcessExitedException for `pid`, saying why it was lost when that is known."""
    return ProcessExitedException(pid, PGRP.lost_reasons.get(pid))


def connection(pid: int) -> Connection:
    """The connection to `pid`, made now if it is a lazy worker-to-worker link."""
    w = PGRP.workers.get(pid)
    if w is not None and w.conn is not None and not w.conn.closed:
        return w.conn
    pg = PGRP
    with pg.lock:
        if pid in pg.deleted:
            raise exited(pid)
        w = pg.workers.get(pid)
        if w is None:
            if pg.is_master() or pid == 1:
                raise ValueError(f"no process with id {pid} exists")
            w = pg.workers[pid] = Worker(pid)
    if w.conn is not None:
        if w.conn.closed:
            raise exited(pid)
        return w.conn
    if pg.is_master():
        if not w.connected.wait(worker_timeout()):
            raise exited(pid)
        return connection(pid)
    return _connect_peer_lazily(w)


def _connect_peer_lazily(w: Worker) -> Connection:
    pg = PGRP
    if pg.topology != "all_to_all":
        raise RuntimeError(
            f"peer {w.pid} is not connected to {pg.id}. Topology : {pg.topology}"
        )
    if pg.id > w.pid:
        if w.connect_at is None:  # (it joined with us, or after us: the master knows)
            pg.learn(w.pid, call_fetch(1, address_of, (w.pid,)))
        try:
            dial_peer(w.pid)
        except PeerRefused as e:
            # Killed before the master could tell us, or an address wrong from here: the
            # master knows which (a lost worker's connection to it ends at once).
            reason = call_fetch(1, _lost_reason, (w.pid, REFUSED_GRACE))
            if reason is None:
                raise
            raise ProcessExitedException(w.pid, reason) from e
    else:
        # The higher pid dials: ask the master to have `w` connect to us.
        call_fetch(1, _ask_peer_to_connect, (w.pid, pg.id))
    if not w.connected.wait(worker_timeout()):
        raise RuntimeError(f"peer {w.pid} didn't connect to {pg.id} within {worker_timeout()} seconds")
    if w.conn is None or w.conn.closed:
        raise exited(w.pid)
    return w.conn


# How long the master waits to notice the loss of a worker whose peer was refused (s).
REFUSED_GRACE = 2.0


def _lost_reason(pid: int, within: float) -> str | None:
    """Run on the master: why worker `pid` was lost, waiting up to `within` seconds for its
    loss to be noticed; None if it is still a member then."""
    with PGRP.changed:  # (deregister pops the record and notifies)
        if not PGRP.changed.wait_for(lambda: pid not in PGRP.workers, within):
            return None
        return PGRP.lost_reasons.get(pid) or "has exited"


def _ask_peer_to_connect(target: int, requester: int) -> None:
    """Run on the master: have worker `target` (> requester) dial worker `requester`."""
    call_fetch(target, _dial_peer_at, (requester, address_of(requester)))


def address_of(pid: int) -> list | None:
    """Run on the master: where worker `pid` listens for its peers (None: not known)."""
    w = PGRP.workers.get(pid)
    return list(w.connect_at) if w is not None and w.connect_at else None


def _dial_peer_at(pid: int, at: list | None) -> None:
    """Run on a worker: dial peer `pid`, at `at` if we did not know where it listens."""
    PGRP.learn(pid, at)
    dial_peer(pid)


# ==================================================================== reply slots
class _Slot:
    """Where one reply will land: a single-assignment value with a lock-based latch."""

    __slots__ = ("pid", "ok", "value", "callback", "_latch", "done")

    def __init__(self, pid: int, callback: Callable[["_Slot"], None] | None = None):
        self.pid = pid
        self.callback = callback
        self.done = False
        self._latch = threading.Lock()
        self._latch.acquire()

    def set(self, ok: bool, value: Any) -> None:
        self.ok = ok
        self.value = value
        self.done = True
        self._latch.release()
        callback, self.callback = self.callback, None  # run once; a closure over its slot is no cycle
        if callback is not None:
            try:
                callback(self)
            except Exception:
                log.exception("pydist: error in a reply callback")

    def wait(self, timeout: float | None = None) -> bool:
        if self.done:
            return True
        if acquire(self._latch, timeout):
            self._latch.release()
            return True
        return False


SLOTS: dict[int, _Slot] = {}  # reply id -> the slot its RESULT lands in
_slot_ids = itertools.count(1)


def new_slot(pid: int, callback=None) -> tuple[int, _Slot]:
    """A reply slot for a request to `pid`, and its id (the `a` of the request's frame)."""
    sid = next(_slot_ids)
    slot = _Slot(pid, callback)
    SLOTS[sid] = slot
    if pid in PGRP.deleted:  # lost the race with the worker's death
        fail_slot(sid, exited(pid))
    return sid, slot


def fail_slot(sid: int, exc: BaseException) -> None:
    slot = SLOTS.pop(sid, None)
    if slot is not None:
        slot.set(False, exc)


def fail_slots_of(pid: int) -> None:
    """`pid` is gone: every reply still awaited from it is a ProcessExitedException."""
    lost = exited(pid)
    failed = 0
    for sid, slot in list(SLOTS.items()):
        if slot.pid == pid:
            fail_slot(sid, lost)
            failed += 1
    if failed:
        log.debug("process %d lost: %d requests waiting on it failed", pid, failed)


class _Late:
    """The callback of a slot whose caller gave up: hands a reply that lands afterwards to
    `late(ok, value)`, if the caller really gave up first (`armed`, decided under `lock`)."""

    __slots__ = ("lock", "armed", "late")

    def __init__(self, late: Callable[[bool, Any], None]) -> None:
        self.lock = threading.Lock()
        self.armed = False
        self.late = late

    def __call__(self, slot: _Slot) -> None:
        with self.lock:
            armed, self.armed = self.armed, False
        if armed:
            self.late(slot.ok, slot.value)


def _give_up(sid: int, slot: _Slot, late: Callable[[bool, Any], None] | None,
             cancel: Callable[[], None] | None) -> bool:
    """The caller stops waiting for reply `sid` (timeout, interrupt). True if it gave up before
    the reply landed: then `cancel()` has run, and a later reply goes to `late` (or is dropped
    without one). False if the reply is there after all: the caller uses it."""
    if late is None:
        SLOTS.pop(sid, None)
        if slot.done:
            return False
    else:
        # The slot stays: the reply may carry something that must not vanish (a taken item).
        # `_Slot.set` marks it done before it reads its callback, and we set the callback
        # before we look at `done`: so either we see the reply, or the hook gets it.
        hook = _Late(late)
        slot.callback = hook
        with hook.lock:
            if slot.done:
                return False
            hook.armed = True
    log.debug("gave up waiting for reply %d from process %d%s", sid, slot.pid,
              "; cancelling the request" if cancel is not None else "")
    if cancel is not None:
        try:
            cancel()
        except Exception:
            log.exception("pydist: could not cancel a request to process %d", slot.pid)
    return True


def on_result(conn: Connection, msg: protocol.Message):
    """RESULT: the reply to request `msg.a` lands in its slot."""
    slot = SLOTS.pop(msg.a, None)
    if slot is None:
        return None  # the waiter gave up (timeout) and wants no late reply: drop it
    try:
        value = serialization.loads(msg.body, msg.buffers)
    except BaseException as e:
        exc = RemoteException(PGRP.id, CapturedException(e))
        slot.set(False, exc)
        return None
    slot.set(not (msg.flags & protocol.FLAG_ERROR), value)
    return None


# ==================================================================== running a call here
class _Running:
    """A call running in some thread: what `interrupt` needs to stop it.

    An interrupt sets `interrupted`. A call blocked in one of pydist's waits (`waiting`: a
    sleep, a lock or condition, a reply it reads) is woken there and raises the
    KeyboardInterrupt itself, at a point pydist chose. Only a call that reaches no such wait
    (it computes) gets it as an asynchronous exception, a moment later (`_escalate`): one
    raised at any bytecode may land in pydist's own code and leave a lock held (CI's
    3.10 lane: a call's own record lock, and the call never answered). Each interrupt
    raises one KeyboardInterrupt (`interrupted` is cleared then): a call that catches it
    may wait again."""

    __slots__ = ("lock", "active", "interrupted", "waiting", "async_sent", "cancel", "reply",
                 "reading")

    def __init__(self, reply: Callable[[bool, Any], object] | None) -> None:
        self.lock = threading.Lock()
        self.active = True
        self.interrupted = False
        self.waiting = False
        self.async_sent = False
        # Made by the first interruptible sleep (most calls never sleep); released by
        # interrupt, which wakes that sleep.
        self.cancel: threading.Lock | None = None
        # Sends the call's outcome to its caller, for a call that may take that over
        # (`take_reply`); None once taken.
        self.reply = reply
        # The connection this call is blocked reading (`wait_reply`): interrupt pokes it.
        self.reading: Connection | None = None


_running: dict[int, _Running] = {}


def _set_async_exc(tid: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in thread `tid` at its next bytecode (None: cancel a pending one)."""
    import ctypes  # (here: only an interrupt needs it)

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(tid), None if exc is None else ctypes.py_object(exc)
    )


def _clear_pending_interrupt(tid: int) -> None:
    _set_async_exc(tid, None)


def run_user_call(f: Callable, args: tuple, kwargs: dict,
                  reply: Callable[[bool, Any], object] | None = None) -> tuple[bool, Any] | None:
    """Call `f(*args, **kwargs)`; return (True, value) or (False, RemoteException). With
    `reply` (what sends the outcome to the caller), `f` may take it over (`take_reply`):
    then this returns None, and what `f` itself returns goes nowhere."""
    tid = threading.get_ident()
    rec = _Running(reply)
    outer = _running.get(tid)  # a call that runs calls (a pmap lane): its record comes back
    _running[tid] = rec
    try:
        try:
            value = f(*args, **kwargs)
            ok = True
        except BaseException as e:
            value, ok = e, False
        with rec.lock:
            rec.active = False
    except BaseException as e:  # an interrupt that landed just after f returned
        rec.active = False
        value, ok = e, False
    finally:
        if outer is None:
            _running.pop(tid, None)
        else:
            _running[tid] = outer
        if rec.async_sent:
            _clear_pending_interrupt(tid)
    if not ok:
        value = capture(value)
    if reply is not None and rec.reply is None:  # taken over: the outcome is not the reply
        if not ok:
            print(f"Error on process {PGRP.id} in a call that had handed on its reply:\n"
                  f"{value}", file=sys.stderr, flush=True)
        return None
    return ok, value


def take_reply() -> Callable[[bool, Any], object]:
    """In a remote call: take over its reply. The caller gets the outcome given to the
    returned function, `reply(ok, value)` (a RemoteException if not ok), from any thread and
    at any time; what the call returns goes nowhere, and the rest of it cannot be
    interrupted. RuntimeError where there is no such reply to take."""
    rec = _running.get(threading.get_ident())
    if rec is None or rec.reply is None:
        raise RuntimeError("take_reply: not in a remote call whose reply can be taken")
    with rec.lock:
        _raise_if_interrupted(rec)
        rec.active = False
    reply, rec.reply = rec.reply, None
    return reply


def in_remote_call() -> bool:
    """True in a thread that is running a remote call (on behalf of another process)."""
    return threading.get_ident() in _running


def capture(exc: BaseException) -> RemoteException:
    """Wrap an exception raised here by user code as the RemoteException callers will see."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is run_user_call.__code__:
        exc = exc.with_traceback(tb.tb_next)  # hide our own frame
    return make_remote_exception(PGRP.id, CapturedException(exc))


def interrupt_running_calls() -> int:
    """Raise KeyboardInterrupt in every call running in this process; return how many. A
    call waiting in pydist raises it where it waits; one that computes gets it
    asynchronously after ESCALATE_AFTER (see `_Running`)."""
    n = 0
    for _, rec in list(_running.items()):
        with rec.lock:
            if not rec.active or rec.interrupted:
                continue
            rec.interrupted = True
            if rec.cancel is not None and rec.cancel.locked():  # asleep: wake it
                rec.cancel.release()
            if rec.reading is not None:  # blocked in recv: have the peer send something
                rec.reading.poke()
            n += 1
    if n:
        threading.Thread(target=_escalate, name="pydist-interrupt", daemon=True).start()
    log.info("interrupted %d running calls", n)
    return n


# How long an interrupted call may take to reach one of pydist's waits (which raise the
# KeyboardInterrupt there) before it gets it as an asynchronous exception.
ESCALATE_AFTER = 0.25


def _escalate() -> None:
    """(Its own thread, for ESCALATE_AFTER seconds) Raise KeyboardInterrupt asynchronously
    in the interrupted calls that still run and wait nowhere in pydist: they compute, and
    nothing else reaches them. (It fires when the thread next runs bytecode.)"""
    import ctypes  # noqa: F401  (before any lock: `_set_async_exc` needs it)

    _original_sleep(ESCALATE_AFTER)
    for tid, rec in list(_running.items()):
        with rec.lock:
            if rec.active and rec.interrupted and not rec.waiting:
                rec.interrupted = False
                rec.async_sent = True
                _set_async_exc(tid, KeyboardInterrupt)


def _raise_if_interrupted(rec: _Running) -> None:
    """(rec.lock held) Raise the KeyboardInterrupt of an interrupt not yet raised."""
    if rec.interrupted:
        rec.interrupted = False
        raise KeyboardInterrupt


def _begin_wait(rec: _Running) -> None:
    with rec.lock:
        rec.waiting = True


def _end_wait(rec: _Running, done: bool) -> None:
    """The wait of `rec`'s call has ended; raise KeyboardInterrupt if an interrupt ended
    it (not if what it waited for came: `done`)."""
    with rec.lock:
        rec.waiting = False
        if not done:
            _raise_if_interrupted(rec)


# How often a wait inside a remote call wakes up to look whether the call was interrupted:
# a thread blocked in a lock cannot be woken otherwise.
WAIT_SLICE = 0.1


def acquire(lock: Any, timeout: float | None = None) -> bool:
    """`lock.acquire(timeout=timeout)` (None: no bound) that an interrupt reaches: inside a
    remote call it waits in slices of WAIT_SLICE; elsewhere it is a plain acquire."""
    if lock.acquire(False):
        return True
    if timeout is not None and timeout <= 0:
        return False
    flush_soon()  # about to wait: what it waits for may follow a call still queued here
    rec = _running.get(threading.get_ident())
    if rec is None:
        return lock.acquire(True, -1 if timeout is None else timeout)
    give_back_lent_role()  # about to wait: the frames behind this call need not
    return _sliced(lambda t: lock.acquire(True, t), timeout, rec)


def _sliced(wait: Callable[[float], bool], timeout: float | None, rec: _Running) -> bool:
    """`wait(t)` for slices of at most WAIT_SLICE seconds until it returns True, or False once
    `timeout` seconds have passed; KeyboardInterrupt once `rec`'s call is interrupted
    (looked at before the first slice and after each)."""
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
    got = False
    _begin_wait(rec)
    try:
        while not rec.interrupted:
            if deadline is None:
                t = WAIT_SLICE
            else:
                t = deadline - time.monotonic()
                if t <= 0:
                    got = wait(0)
                    return got
                if t > WAIT_SLICE:
                    t = WAIT_SLICE
            if wait(t):
                got = True
                return True
        return False
    finally:
        _end_wait(rec, got)


_original_condition_wait = threading.Condition.wait
_allocate_lock = threading.Lock  # (what Condition.wait makes its waiter with)


def interruptible_condition_wait(self: threading.Condition, timeout: float | None = None) -> bool:
    """`threading.Condition.wait` for worker processes (so also `Event.wait`, `Channel`,
    `queue.Queue`): inside a remote call it waits in slices, so that an interrupt reaches it.

    It is `Condition.wait` itself (the same steps, on the same private members, unchanged
    from Python 3.10 to 3.13) with only the wait for the notify sliced: this thread stays
    among the waiters, with the lock released, until notified, out of time or interrupted.
    (Slicing whole `Condition.wait` calls lost wake-ups: a notify that came as a slice timed
    out was taken by that slice, which returned False, and the next slice waited for
    another notify, forever.)"""
    rec = _running.get(threading.get_ident())
    if rec is None:
        return _original_condition_wait(self, timeout)
    if timeout is None or timeout > 0:
        give_back_lent_role()  # about to wait: the frames behind this call need not
    if not self._is_owned():  # type: ignore[attr-defined]
        raise RuntimeError("cannot wait on un-acquired lock")
    waiter = _allocate_lock()
    waiter.acquire()
    self._waiters.append(waiter)  # type: ignore[attr-defined]
    saved_state = self._release_save()  # type: ignore[attr-defined]
    gotit = False
    try:  # the lock comes back whatever happens (an interrupt between slices)
        gotit = _sliced(lambda t: waiter.acquire(True, t), timeout, rec)
        return gotit
    finally:
        self._acquire_restore(saved_state)  # type: ignore[attr-defined]
        if not gotit:
            try:
                self._waiters.remove(waiter)  # type: ignore[attr-defined]
            except ValueError:  # notified just as it gave up (interrupted, out of time):
                self.notify()  # pass the wake-up on (a queue.Queue's put wakes one taker)


_original_sleep = time.sleep


def interruptible_sleep(seconds: float) -> None:
    """`time.sleep` for worker processes: a sleeping remote call wakes up on `interrupt`."""
    rec = _running.get(threading.get_ident())
    if rec is None:
        return _original_sleep(seconds)
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    if seconds > 0:
        give_back_lent_role()  # the frames behind this call need not wait for it
    with rec.lock:
        _raise_if_interrupted(rec)
        if rec.cancel is None or not rec.cancel.locked():  # (released by an earlier interrupt)
            rec.cancel = threading.Lock()
            rec.cancel.acquire()
        cancel = rec.cancel
        rec.waiting = True
    woken = False
    try:
        woken = cancel.acquire(timeout=seconds)
    finally:
        _end_wait(rec, not woken)


def wait_reply(conn: Connection, is_done: Callable[[], bool], timeout: float | None = None,
               held: bool = False) -> None:
    """`conn.wait_reply(...)` that an interrupt reaches: inside a remote call, the call's
    record names the connection this thread reads, and `interrupt` pokes it (the peer's
    answer wakes the blocked `recv`, and the KeyboardInterrupt fires)."""
    _this_thread.last_read = conn
    rec = _running.get(threading.get_ident())
    if rec is None:
        return conn.wait_reply(is_done, timeout, held)
    give_back_lent_role()  # the frames behind this call need not wait for the reply
    rec.reading = conn
    _begin_wait(rec)
    try:  # (with `held`, only conn.wait_reply gives the reading role back: nothing raises before)
        conn.wait_reply(lambda: is_done() or rec.interrupted, timeout, held)
    finally:
        rec.reading = None
        _end_wait(rec, is_done())


class _Waker:
    """A thread's wake-up signal as a file descriptor (an eventfd), so that a thread reading
    a connection can be told to look again; closed with its thread."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:  # (the counter cannot overflow with one writer per wake)
            pass

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except OSError:  # not set
            pass

    def __del__(self, _close=os.close) -> None:
        _close(self.fd)


_this_thread = threading.local()  # .last_read: the connection of its last reply; .waker


def read_until_woken(is_done: Callable[[], bool], watch: Callable[[Callable[[], None]], None],
                     unwatch: Callable[[Callable[[], None]], None]) -> None:
    """Before a wait for something that most likely comes from the peer whose reply this
    thread last read (a value it puts into a channel here): read that connection in this
    thread until `is_done()`, so that the peer's message is handled here and no other
    thread is woken for it. `watch(fn)` must have `fn()` called on anything that may make
    `is_done()` true (then this returns, for the caller's own wait); `unwatch(fn)` stops
    that. Returns at once if another thread reads the connection, or it is closed."""
    conn = getattr(_this_thread, "last_read", None)
    if conn is None or conn.closed or not hasattr(os, "eventfd"):
        return
    waker = getattr(_this_thread, "waker", None)
    if waker is None:
        try:
            waker = _this_thread.waker = _Waker()
        except OSError:  # out of file descriptors: the caller waits as usual
            return
    watch(waker.set)
    rec = _running.get(threading.get_ident())
    if rec is not None:
        rec.reading = conn
        _begin_wait(rec)
        done = is_done
        is_done = lambda: done() or rec.interrupted  # noqa: E731
    try:
        conn.read_until_woken(is_done, waker.fd)
    finally:
        unwatch(waker.set)
        waker.clear()
        if rec is not None:
            rec.reading = None
            _end_wait(rec, done())


# ==================================================================== sending
def pack(pid: int, kind: int, payload: Any, a: int = 0, b: int = 0, c: int = 0,
         flags: int = 0, what: Any = "the call") -> list:
    """Pickle `payload` for `pid` into frame chunks; SerializationError names what failed
    (`what`: a description, or the function called, described only on failure)."""
    try:
        body, buffers, context = serialization.dumps(payload, dest=pid)
    except Exception as e:
        if not isinstance(what, str):
            what = _describe(what)
        raise SerializationError(f"could not send {what} to process {pid}: {type(e).__name__}: {e}") from e
    serialization.run_after(context)
    return protocol.encode_frame(kind, body, buffers, a=a, b=b, c=c, flags=flags)


def _describe(f: Any) -> str:
    return f"a call of {getattr(f, '__qualname__', None) or repr(f)}"


def call_fetch(pid: int, f: Callable, args: tuple = (), kwargs: dict | None = None, *,
               timeout: float | None = None, what: str | Callable[[], str] | None = None,
               late: Callable[[bool, Any], None] | None = None,
               cancel: Callable[[], None] | None = None) -> Any:
    """Run `f(*args, **kwargs)` on `pid` and return its value (RemoteException if it raised,
    ProcessExitedException if `pid` is gone). On this process it runs in this thread.

    `timeout` bounds this caller's wait, whatever `pid` does: TimeoutError (naming `what` and
    `pid`) after that many seconds. If the caller gives up (that timeout, or an interrupt)
    before the reply, `cancel()` runs (it must not block), and a reply that lands later goes
    to `late(ok, value)` in the thread that reads it (it must not block) instead of being
    dropped: so that a reply carrying something that must not vanish can give it back."""
    kwargs = kwargs or _EMPTY
    if pid == PGRP.id:
        ok, value = run_user_call(f, args, kwargs)  # type: ignore[misc]
        if ok:
            return value
        try:
            raise value
        finally:
            del value  # its traceback holds this frame: no cycle through it
    deadline = None if timeout is None else time.monotonic() + timeout
    conn, sid, slot, held = _send_call(pid, f, args, kwargs, None, timeout, read_reply=True)
    gave_up = False
    try:
        if conn is not None:  # read the reply here if nobody else reads
            wait_reply(conn, lambda: slot.done, timeout, held)
        if not slot.wait(None if deadline is None else deadline - time.monotonic()):
            gave_up = _give_up(sid, slot, late, cancel)
            if gave_up:
                if callable(what):
                    what = what()
                raise TimeoutError(f"{what or _describe(f)}: process {pid} did not answer "
                                   f"within {timeout:g} seconds")
    except BaseException:
        if not gave_up and not _give_up(sid, slot, late, cancel) and late is not None:
            late(slot.ok, slot.value)  # interrupted as the reply landed: it is not lost
        raise
    if slot.ok:
        return slot.value
    try:
        raise slot.value
    finally:
        del slot  # the error's traceback holds this frame: no cycle through the slot


def call_async(pid: int, f: Callable, args: tuple = (), kwargs: dict | None = None,
               callback: Callable | None = None):
    """Send `f(*args, **kwargs)` to `pid`; return the reply slot (`callback(slot)` runs in the
    reading thread when the reply lands: it must not block)."""
    return _send_call(pid, f, args, kwargs, callback)[2]


def _send_call(pid: int, f: Callable, args: tuple, kwargs: dict | None, callback,
               timeout: float | None = None, read_reply: bool = False):
    """(connection or None if it is gone, reply id, reply slot, whether this thread holds
    the connection's reading role) for a call of `f` sent to `pid`. With `read_reply` this
    thread will read the reply itself: it may take the role before sending
    (`Connection.send_request`), and must then call `wait_reply` at once. A frame the
    socket has not taken after `timeout` seconds stays queued."""
    conn = connection(pid)
    sid, slot = new_slot(pid, callback)
    held = False
    try:
        chunks = pack(pid, protocol.CALL_FETCH, (f, args, kwargs or _EMPTY), a=sid, what=f)
        if read_reply:
            held = conn.send_request(chunks, timeout=timeout)
        else:
            conn.send(chunks, timeout=timeout)
    except ConnectionClosed:
        fail_slot(sid, exited(pid))
        return None, sid, slot, False
    except SendTimeout:
        pass  # still queued: the caller's wait runs out
    except BaseException:
        SLOTS.pop(sid, None)
        raise
    return conn, sid, slot, held


def remote_do_internal(pid: int, f: Callable, args: tuple = (), kwargs: dict | None = None) -> None:
    """Send `f(*args, **kwargs)` to `pid` without waiting; errors are printed there."""
    if pid == PGRP.id:
        threading.Thread(target=_do_locally, args=(f, args, kwargs or _EMPTY), daemon=True).start()
        return
    conn = connection(pid)
    chunks = pack(pid, protocol.REMOTE_DO, (f, args, kwargs or _EMPTY), what=f)
    try:
        conn.send_soon(chunks)
    except ConnectionClosed:
        raise exited(pid) from None


def _do_locally(f: Callable, args: tuple, kwargs: dict) -> None:
    ok, value = run_user_call(f, args, kwargs)  # type: ignore[misc]
    if not ok:
        print(f"Error in remote_do on process {PGRP.id}:\n{value}", file=sys.stderr, flush=True)


# ==================================================================== replying
def send_reply(conn: Connection, sid: int, ok: bool, value: Any) -> bool:
    """Send the RESULT of request `sid` back on `conn`; an unpicklable value becomes an error.
    False if the connection is closed (the caller is gone: nobody will get it)."""
    pid = conn.peer_pid if conn.peer_pid is not None else 0
    try:
        body, buffers, context = serialization.dumps(value, dest=pid)
        serialization.run_after(context)
    except Exception as e:
        err = SerializationError(f"the result could not be pickled: {type(e).__name__}: {e}")
        ok, value = False, make_remote_exception(
            PGRP.id, CapturedException(err, f"{type(err).__name__}: {err}\n"))
        body, buffers = serialization.dumps_inline(value), []
    try:
        conn.send_reply(protocol.encode_frame(protocol.RESULT, body, buffers, a=sid,
                                        flags=0 if ok else protocol.FLAG_ERROR))
    except ConnectionClosed:
        return False  # the caller is gone; nobody is waiting
    return True


def unpack_call(msg: protocol.Message) -> tuple[bool, Any]:
    """Unpickle a call's (f, args, kwargs); (False, RemoteException) if that fails."""
    try:
        f, args, kwargs = serialization.loads(msg.body, msg.buffers)
        return True, (f, args, kwargs)
    except BaseException as e:
        return False, make_remote_exception(
            PGRP.id, CapturedException(e.with_traceback(None),
                                       f"could not unpickle the call on process {PGRP.id}: "
                                       f"{type(e).__name__}: {e}\n")
        )


# Calls that may be done in the reading thread, with no task and no thread hand-off:
# f -> quick(reply, *args, **kwargs), which either does the whole call without waiting and
# sends its outcome with `reply(ok, value)` (returning True), or does nothing (False: the call
# runs as a task, as any other). A RemoteChannel's put into a channel with room is one:
# the reading thread has unpickled its value already, and its reply carries nothing.
_QUICK: dict[Callable, Callable[..., bool]] = {}


def register_quick(f: Callable, quick: Callable[..., bool]) -> None:
    """Let calls of `f` be tried in the reading thread first, with `quick` (see `_QUICK`)."""
    _QUICK[f] = quick


def _try_quick(quick: Callable[..., bool], conn: Connection, sid: int, call: tuple) -> bool:
    """The call done in the reading thread by its quick form, if that needs no wait (then
    its reply is sent)."""
    _, args, kwargs = call
    reply = functools.partial(send_reply, conn, sid)
    try:
        return quick(reply, *args, **kwargs)
    except Exception as e:  # a bug of the quick form: the caller hears it, never waits
        reply(False, capture(e))
        return True


def on_call_fetch(conn: Connection, msg: protocol.Message):
    """CALL_FETCH: run the call (as a task) and send its RESULT; a call with a quick form
    that needs no wait is done here instead (`register_quick`)."""
    sid = msg.a
    ok, call = unpack_call(msg)
    if not ok:
        return lambda: send_reply(conn, sid, False, call)
    quick = _QUICK.get(call[0]) if type(call[0]) is types.FunctionType else None
    if quick is not None and _try_quick(quick, conn, sid, call):
        return None
    box = [call]

    def task() -> None:
        f, args, kwargs = box.pop()
        outcome = run_user_call(f, args, kwargs, functools.partial(send_reply, conn, sid))
        # The arguments go before the reply does: the caller may reuse their memory as soon
        # as it has the reply (a large array's shared-memory region, see `sharedmem`).
        del f, args, kwargs
        if outcome is not None:
            send_reply(conn, sid, *outcome)

    return task


def on_remote_do(conn: Connection, msg: protocol.Message):
    """REMOTE_DO: run the call (as a task); nobody waits for it."""
    ok, call = unpack_call(msg)
    if not ok:
        print(f"Error in remote_do on process {PGRP.id}:\n{call}", file=sys.stderr, flush=True)
        return None
    return lambda: _do_locally(*call)

