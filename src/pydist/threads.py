"""The runtime threads of a process: the thread pool that runs connection work, the epoll
poller, the watchdog that takes a connection's reading role back from a long call, and the
heartbeat that finds silent peers.

They are process-wide and know connections only through a few methods (`_on_events`,
`_watchdog_tick`, `_heartbeat`), so that this module needs no other pydist module; `stop_runtime`
(called by `pydist.shutdown`, also at exit) stops and joins them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

# An idle pool thread exits after this many seconds.
IDLE_THREAD_SECONDS = 30.0
# A call runs this long with its connection's reading role lent to it before the watchdog
# takes the role back for others (see `transport.Connection._serve`): about the GIL's switch
# interval, since a thread that took the role from a call that computes would wait about that
# long for the GIL anyway. A call that waits (a sleep, a condition, a lock, another process's
# reply) gives the role back at once (`transport.give_back_lent_role`).
LEND_SECONDS = 0.005


class _ThreadPool:
    """Daemon threads that run connection work (calls, reads). Work goes straight to an idle
    thread (the most recently idle first) or to a new one; a thread idle for
    IDLE_THREAD_SECONDS exits. A thread may stay busy for long (a worker's reader), so
    idle threads are handed work one by one, never through a shared queue.

    `stop` refuses new work, wakes the idle threads so that they exit, and joins them; no
    thread is started while stopped (none may start at interpreter exit)."""

    class _Idle:
        __slots__ = ("wake", "fn")

        def __init__(self) -> None:
            self.wake = threading.Lock()
            self.wake.acquire()
            self.fn: Callable[[], None] | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_ThreadPool._Idle] = []
        self._threads: set[threading.Thread] = set()
        self._stopped = False

    def submit(self, fn: Callable[[], None]) -> bool:
        """Run `fn` in a pool thread; False (and `fn` dropped) if the pool is stopped."""
        with self._lock:
            if self._stopped:
                log.debug("pydist: runtime stopped, dropped %r", fn)
                return False
            idle = self._idle.pop() if self._idle else None
            if idle is None:
                thread = threading.Thread(target=self._run, args=(fn,), name="pydist-task",
                                          daemon=True)
                self._threads.add(thread)
        if idle is not None:
            idle.fn = fn
            idle.wake.release()
            return True
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            with self._lock:
                self._threads.discard(thread)
            return False
        return True

    def _run(self, fn: Callable[[], None] | None) -> None:
        me = self._Idle()
        try:
            while fn is not None:
                try:
                    fn()
                except BaseException:  # work must never kill its thread silently
                    log.exception("pydist: internal error in a connection task")
                fn = None  # do not keep the work (and its result) alive while idle
                with self._lock:
                    if self._stopped:
                        return
                    self._idle.append(me)
                if not me.wake.acquire(timeout=IDLE_THREAD_SECONDS):
                    with self._lock:
                        if me in self._idle:
                            self._idle.remove(me)
                            return
                    me.wake.acquire()  # picked just as we timed out: the work is coming
                fn, me.fn = me.fn, None
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def stop(self, timeout: float) -> list[threading.Thread]:
        """Stop taking work, end the idle threads, wait up to `timeout` seconds for the busy
        ones; return those still running (blocked in user code)."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for slot in idle:
            slot.fn = None
            slot.wake.release()
        return _join_all(threads, timeout)

    def restart(self) -> None:
        with self._lock:
            self._stopped = False


def _join_all(threads: list[threading.Thread], timeout: float) -> list[threading.Thread]:
    """Join `threads` within `timeout` seconds in all; return those still alive."""
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threads:
        if thread is not me and thread.ident is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t is not me and t.is_alive()]


def _stop_thread(owner: Any, wake: Callable[[], None], timeout: float) -> bool:
    """Stop the one thread of `owner` (the poller or the watchdog: `_lock`, `_thread`,
    `_stopping`): flag it, `wake` it, join it within `timeout`; False if it is still running."""
    with owner._lock:
        thread, owner._stopping = owner._thread, True
    wake()
    if thread is None:
        return True
    alive = _join_all([thread], timeout)
    with owner._lock:
        if not alive:
            owner._thread = None
    return not alive


POOL = _ThreadPool()

_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0
_WRITE_EVENTS = select.EPOLLOUT if hasattr(select, "epoll") else 0
_ONESHOT = select.EPOLLONESHOT if hasattr(select, "epoll") else 0
_FAULT_EVENTS = select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0


class _KernelTimer:
    """A Linux timerfd on CLOCK_MONOTONIC (the clock of `time.monotonic`): set for an absolute
    time with one system call, its descriptor turns readable when that time comes, so that
    the poller's `epoll` wakes for it without another thread waking the poller first."""

    def __init__(self) -> None:
        flags = os.O_NONBLOCK | os.O_CLOEXEC  # (the values of TFD_NONBLOCK and TFD_CLOEXEC)
        make = _timerfd_of_os if sys.version_info >= (3, 13) else _timerfd_of_libc
        self.fd, self.set = make(flags)  # set(when): expire at monotonic `when` (0: disarm)

    def clear(self) -> None:
        """Read the expiry count, so that the descriptor is not readable any more."""
        with contextlib.suppress(OSError):
            os.read(self.fd, 8)


def _timerfd_of_os(flags: int) -> tuple[int, Callable[[float], None]]:
    """A timerfd through Python 3.13's own functions: its descriptor and its setter."""
    if sys.version_info >= (3, 13):  # (so that type checkers for older Pythons skip it)
        fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=flags)
        settime, absolute = os.timerfd_settime, os.TFD_TIMER_ABSTIME

        def set_time(when: float) -> None:
            settime(fd, flags=absolute, initial=when)
        return fd, set_time
    raise AttributeError("os.timerfd_create is Python 3.13's")


def _timerfd_of_libc(flags: int) -> tuple[int, Callable[[float], None]]:
    """A timerfd through libc (before Python 3.13): its descriptor and its setter."""
    ctypes, create, settime, Itimerspec = _libc_timerfd()
    fd = create(time.CLOCK_MONOTONIC, flags)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create failed")
    spec = Itimerspec()
    value, ref, get_errno = spec.it_value, ctypes.byref(spec), ctypes.get_errno

    def set_time(when: float) -> None:
        value.tv_sec = sec = int(when)
        value.tv_nsec = int((when - sec) * 1e9)
        if settime(fd, 1, ref, None) < 0:  # 1: TFD_TIMER_ABSTIME
            raise OSError(get_errno(), "timerfd_settime failed")
    return fd, set_time


_libc_functions: tuple | None = None


def _libc_timerfd() -> tuple:
    """(ctypes, timerfd_create, timerfd_settime, struct itimerspec) of libc, made once."""
    global _libc_functions
    if _libc_functions is None:
        import ctypes

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        class Itimerspec(ctypes.Structure):
            _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
        create.argtypes = [ctypes.c_int, ctypes.c_int]
        settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(Itimerspec),
                            ctypes.c_void_p]
        _libc_functions = (ctypes, create, settime, Itimerspec)
    return _libc_functions


def prepare_kernel_timer() -> None:
    """Load what a kernel timer takes (libc's functions through ctypes, before Python 3.13),
    so that the workers a fork server forks share it: in each worker it cost ~1.5 ms of CPU
    and ~0.2 MB at its first burst of calls."""
    if sys.version_info < (3, 13) and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # (then each worker tries, and falls back)
            _libc_timerfd()


class _Alarms:
    """Deadlines any thread can set for the poller thread through one kernel timer: setting
    or cancelling one costs at most one system call in the setting thread and wakes no
    thread, and the poller runs `owner._on_timer(now)` for each that expires. A burst of
    short calls on a worker thus wakes nothing (see `transport.Connection._serve_taken`),
    where the watchdog woke and fought the call's thread for the GIL once per burst."""

    name = "pydist-alarms"

    def __init__(self, timer: _KernelTimer) -> None:
        self._timer = timer
        self.fd = timer.fd
        self._lock = threading.Lock()
        self._due: dict[Any, float] = {}  # owner -> its deadline
        self._armed_for = 0.0  # what the kernel timer is set to (0: disarmed)

    def set(self, owner: Any, when: float) -> None:
        """Run `owner._on_timer(now)` in the poller thread at `when`, replacing the owner's
        earlier deadline; a later deadline than the armed one costs no system call (the
        timer then expires early, and the poller sets it again)."""
        with self._lock:
            if not self._armed_for or when < self._armed_for:
                self._timer.set(when)
                self._armed_for = when
            self._due[owner] = when

    def cancel(self, owner: Any) -> None:
        """Forget the owner's deadline (the kernel timer is disarmed if it was the last)."""
        with self._lock:
            if self._due.pop(owner, None) is not None and not self._due and self._armed_for:
                self._armed_for = 0.0
                with contextlib.suppress(OSError):  # (then it expires once for nothing)
                    self._timer.set(0)

    def _on_events(self, ev: int) -> None:
        """Poller thread: the kernel timer expired: run the deadlines that are due."""
        self._timer.clear()
        now = time.monotonic()
        due = []
        with self._lock:
            for owner, when in list(self._due.items()):
                if when <= now:
                    del self._due[owner]
                    due.append(owner)
            self._armed_for = min(self._due.values(), default=0.0)
            if self._armed_for:  # (an expired timer is disarmed already)
                self._timer.set(self._armed_for)
        for owner in due:
            try:
                owner._on_timer(now)
            except BaseException:
                log.exception("pydist: internal error on %s", getattr(owner, "name", owner))


class _Poller:
    """One thread per process watching sockets through epoll (one-shot): for reading while
    nobody holds a connection's reading role, for writing while frames wait in its send
    queue. The thread never blocks on anything but `epoll.poll`: it reads and writes without
    blocking, and hands calls to the pool. `stop` wakes it through a pipe and joins it."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._conns: dict[int, Any] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        # modify(fd, mask): change what epoll watches for a registered descriptor (raises
        # OSError or ValueError if it was closed meanwhile); called on the hot path
        self.modify = self._epoll.modify
        # connection -> when its `_on_timer` runs; set and run by the poller thread only
        self._timers: dict[Any, float] = {}
        self._incoming: list[tuple[Any, float]] = []  # timers set by other threads (`call_soon`)
        self._alarms: _Alarms | None = None  # made on first use (`alarms`)
        self._no_alarms = False  # no kernel timer here: `alarms` is None for good

    def register(self, conn: Any) -> None:
        with self._lock:
            self._conns[conn.fd] = conn
            self._epoll.register(conn.fd, 0)
            if self._thread is None and not self._stopping:
                thread = threading.Thread(target=self._run, name="pydist-poller", daemon=True)
                thread.start()
                self._thread = thread

    def unregister(self, conn: Any) -> None:
        with self._lock:
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]  # type: ignore[union-attr]
                try:
                    self._epoll.unregister(conn.fd)  # type: ignore[union-attr]
                except (OSError, ValueError):
                    pass

    def call_at(self, conn: Any, when: float) -> None:
        """Poller thread only: run `conn._on_timer(now)` in this thread at `when` (monotonic
        seconds), replacing an earlier timer of `conn`."""
        self._timers[conn] = when

    def alarms(self) -> _Alarms | None:
        """Any thread: the deadlines that wake this poller through a kernel timer (made and
        registered on first use); None where the kernel has no timerfd."""
        alarms = self._alarms
        if alarms is not None or self._no_alarms:
            return alarms
        with self._lock:
            if self._alarms is None and not self._no_alarms:
                try:
                    timer = _KernelTimer()
                except (OSError, AttributeError, ImportError) as e:  # (not Linux)
                    log.debug("pydist: no kernel timer (%s): the watchdog times calls", e)
                    self._no_alarms = True
                    return None
                alarms = _Alarms(timer)
                try:
                    self._epoll.register(alarms.fd, select.EPOLLIN)
                except (OSError, ValueError) as e:  # (never seen)
                    log.debug("pydist: cannot poll a kernel timer (%s): the watchdog times "
                              "calls", e)
                    os.close(alarms.fd)
                    self._no_alarms = True
                    return None
                self._conns[alarms.fd] = alarms
                self._alarms = alarms
            return self._alarms

    def running(self) -> bool:
        """Whether the poller thread runs (it does while any connection is registered)."""
        return self._thread is not None and not self._stopping

    def call_soon(self, owner: Any, when: float) -> None:
        """Any thread: run `owner._on_timer(now)` in the poller thread at `when` (as
        `call_at`; it wakes the poller thread)."""
        with self._lock:
            self._incoming.append((owner, when))
        self._wake_thread()

    def stop(self, timeout: float) -> bool:
        """Stop and join the poller thread; False if it did not end within `timeout`."""
        return _stop_thread(self, self._wake_thread, timeout)

    def _wake_thread(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def restart(self) -> None:
        """Allow the thread to run again (the next one empties the wake pipe and adopts the
        timers set meanwhile: `_run`)."""
        with self._lock:
            self._stopping = False
            if self._thread is None and self._conns:
                self._thread = threading.Thread(target=self._run, name="pydist-poller",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        poll = self._epoll.poll
        wake = self._wake_r
        timers = self._timers
        # Timers set while no poller thread ran (after `stop`, or just as the last one ended)
        # are in `_incoming`: adopt them now, or they never fire (a burst's calls then waited
        # for someone to flush them). This also empties the wake pipe of what `stop` wrote.
        self._take_incoming()
        # `_stopping` is read after each drain of the wake pipe, never before: a drain may
        # swallow the byte `stop` wrote (it is set before that byte), and a thread that had
        # looked first then slept in `poll` for good, and `stop` timed out.
        while not self._stopping:
            timeout = -1.0
            if timers:
                timeout = max(0.0, min(timers.values()) - time.monotonic())
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            if timers:
                self._run_timers(time.monotonic())
            for fd, ev in events:
                if fd == wake:
                    self._take_incoming()
                    continue
                conn = self._conns.get(fd)
                if conn is None:
                    continue
                try:
                    conn._on_events(ev)
                except BaseException:
                    log.exception("pydist: internal error on %s", conn.name)

    def _take_incoming(self) -> None:
        """Poller thread: the wake pipe was written: empty it, and adopt the timers that
        other threads set (`call_soon`)."""
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass
        with self._lock:
            for owner, when in self._incoming:
                self._timers[owner] = min(when, self._timers.get(owner, when))
            self._incoming.clear()

    def _run_timers(self, now: float) -> None:
        for conn, when in list(self._timers.items()):
            if when <= now:
                del self._timers[conn]
                try:
                    conn._on_timer(now)
                except BaseException:
                    log.exception("pydist: internal error on %s", conn.name)


class _Watchdog:
    """Takes the reading role back from calls that run long (see `Connection._serve`); any
    watched object's `_watchdog_tick(now)` runs every tick (a long pmap batch uses it too).

    It polls every LEND_SECONDS while something is watched, and one tick more if anything was
    watched meanwhile (so that a steady stream of short calls never has to wake it), then
    sleeps until the next `watch`. A call lent the role while it sleeps does not wake it: the
    poller watches that connection instead (`Connection._serve`), so that a worker that
    gets a call now and then does not poll a thousand times a second. Taking a role back
    never blocks (it writes without blocking).
    """

    PROMOTE_AFTER = LEND_SECONDS

    def __init__(self) -> None:
        self._watched: set[Any] = set()
        self._watches = 0  # `watch` calls so far (a tick with none since the last: sleep)
        self._wake = threading.Event()
        self._sleeping = True  # not ticking: a `watch` must wake the thread (or start it)
        self._stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def awake(self) -> bool:
        """Ticking now: watching one more thing costs nothing."""
        return not self._sleeping

    def watch(self, conn: Any) -> None:
        """Called with the connection's lend lock held."""
        self._watched.add(conn)
        self._watches += 1
        if self._sleeping:
            with self._lock:
                if self._thread is None and not self._stopping:
                    thread = threading.Thread(target=self._run, name="pydist-watchdog",
                                              daemon=True)
                    try:
                        thread.start()
                    except RuntimeError:  # interpreter shutdown
                        return
                    self._thread = thread
                    # It ticks from its start: until its first sleep it would otherwise
                    # read as asleep, and every call lent the role meanwhile made the
                    # poller watch its socket too (two epoll changes, and a poller wake-up
                    # for each frame that arrived during the call).
                    self._sleeping = False
            self._wake.set()

    def unwatch(self, conn: Any) -> None:
        """Called with the connection's lend lock held."""
        self._watched.discard(conn)

    def stop(self, timeout: float) -> bool:
        """Stop and join the watchdog thread; False if it did not end within `timeout`."""
        return _stop_thread(self, self._wake.set, timeout)

    def restart(self) -> None:
        with self._lock:
            self._stopping = False

    def _run(self) -> None:
        seen = -1
        try:
            while not self._stopping:
                if not self._watched and self._watches == seen:
                    self._sleeping = True
                    self._wake.clear()
                    if not self._watched and not self._stopping:
                        self._wake.wait()
                    self._sleeping = False
                    continue
                seen = self._watches
                _sleep(self.PROMOTE_AFTER)
                now = time.monotonic()
                for conn in list(self._watched):
                    try:
                        conn._watchdog_tick(now)
                    except BaseException:  # the watchdog must outlive a bug in one tick
                        log.exception("pydist: internal error in the watchdog tick of %r", conn)
        finally:
            # Stopped: the first `watch` after `restart` must start a thread again (one
            # stopped while it ticked left this False, and the watchdog never ran again).
            self._sleeping = True


_sleep = time.sleep  # the real one (workers replace time.sleep with an interruptible one)
WATCHDOG = _Watchdog()


class _Heartbeat:
    """Finds silent peers: every connection with a heartbeat timeout T is checked every T/6
    seconds (`Connection._heartbeat`: ping a peer quiet for T/3, declare one silent for T
    dead). The thread sleeps while no connection has a timeout.

    A tick that comes much later than planned means this process itself was stopped or
    starved (SIGSTOP, a C call holding the GIL): what looks like silence is then ours, so
    the clocks of every peer restart instead of declaring them dead.

    The thread starts when the first tick is due, not at the first `watch`: the poller
    starts it then (`_on_timer`), where there is one. Nothing ticks sooner either way, and
    a worker that lives less than a tick (10 s by default) never starts it: a thread's start
    was ~0.25 ms of a forked worker's ~4.4 ms.
    """

    MIN_INTERVAL = 0.05
    name = "the heartbeat"  # (the poller's log names what it runs a timer for)

    def __init__(self) -> None:
        self._conns: set[Any] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._interval = float("inf")  # what the thread waits between ticks now
        self._since: float | None = None  # no thread yet: when the first watch came
        self._start_at = float("inf")  # no thread yet: when the poller starts it

    @classmethod
    def _interval_of(cls, conn: Any) -> float:
        return max(cls.MIN_INTERVAL, (conn.heartbeat_timeout or 60.0) / 6)

    def watch(self, conn: Any) -> None:
        with self._lock:
            self._conns.add(conn)
            if self._thread is None:
                if not self._stopping:
                    self._start_when_due(self._interval_of(conn))
                return
            # Woken only if it must tick sooner now: 128 workers joining woke it 128 times,
            # and each wake checked every connection (a tick), all of it for nothing.
            sooner = self._interval_of(conn) < self._interval
        if sooner:
            self._wake.set()

    def _start_when_due(self, interval: float) -> None:
        """(Lock held, no thread.) Have the thread start when its first tick is due."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        due = self._since + interval
        if due >= self._start_at:
            return
        poller = _get_poller()
        if poller is None or not poller.running():  # (no connection here is polled)
            self._start()
            return
        self._start_at = due
        poller.call_soon(self, due)

    def _on_timer(self, now: float) -> None:
        """(The poller's thread.) The first tick is due: start the thread."""
        with self._lock:
            if self._thread is None and not self._stopping and self._conns:
                self._start()
            self._since, self._start_at = None, float("inf")

    def _start(self) -> None:
        """(Lock held.) Start the thread; its first tick is one interval after the first
        watch."""
        since = time.monotonic() if self._since is None else self._since
        thread = threading.Thread(target=self._run, args=(since,), name="pydist-heartbeat",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown
            return
        self._thread = thread
        self._since, self._start_at = None, float("inf")

    def unwatch(self, conn: Any) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self, timeout: float) -> bool:
        """Stop and join the heartbeat thread; False if it did not end within `timeout`."""
        return _stop_thread(self, self._wake.set, timeout)

    def restart(self) -> None:
        with self._lock:
            self._stopping = False
            self._since, self._start_at = None, float("inf")  # (a start due meanwhile: lost)
            if self._thread is None and self._conns:
                self._start()

    def _run(self, last: float) -> None:
        while not self._stopping:
            with self._lock:
                conns = list(self._conns)
                interval = min(map(self._interval_of, conns), default=float("inf"))
                self._interval = interval
            if not conns:
                self._wake.wait()
                self._wake.clear()
                last = time.monotonic()
                continue
            due = last + interval
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            now = time.monotonic()
            if now < due:  # woken early: stopping, or a connection that must tick sooner
                continue
            stalled = now - last > 2 * interval + 1.0
            last = now
            for conn in conns:
                try:
                    if not conn._heartbeat(now, stalled):
                        self.unwatch(conn)
                except BaseException:
                    log.exception("pydist: internal error in the heartbeat of %s", conn)


HEARTBEAT = _Heartbeat()

_poller: _Poller | None = None
_poller_lock = threading.Lock()


def _get_poller() -> _Poller | None:
    global _poller
    if _poller is None and hasattr(select, "epoll"):
        with _poller_lock:
            if _poller is None:
                _poller = _Poller()
    return _poller


def stop_runtime(timeout: float = 2.0) -> list[str]:
    """Stop and join the runtime threads (poller, watchdog, pool); connections should be
    closed first. Returns the names of threads still running after `timeout` (busy in user
    code). Nothing here starts a thread."""
    deadline = time.monotonic() + timeout
    left: list[str] = []
    if _poller is not None and not _poller.stop(timeout):
        left.append("pydist-poller")
    if not WATCHDOG.stop(max(0.0, deadline - time.monotonic())):
        left.append("pydist-watchdog")
    if not HEARTBEAT.stop(max(0.0, deadline - time.monotonic())):
        left.append("pydist-heartbeat")
    left += [t.name for t in POOL.stop(max(0.0, deadline - time.monotonic()))]
    return left


def restart_runtime() -> None:
    """Allow the runtime threads to start again after `stop_runtime`."""
    POOL.restart()
    WATCHDOG.restart()
    HEARTBEAT.restart()
    if _poller is not None:
        _poller.restart()
