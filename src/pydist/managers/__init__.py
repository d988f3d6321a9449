"""Cluster managers: how worker processes are started, reached, interrupted and stopped.

This package holds `ClusterManager` (Julia's interface, with its defaults), `WorkerConfig`
and the helpers every manager uses; one module per manager: `local` (LocalManager), `ssh`
(SSHManager). A manager launches processes and describes each with a `WorkerConfig`;
`cluster` then connects, authenticates and registers them. Each launched worker's output is
relayed by a `WorkerOutput` (one thread reads all their pipes): it finds the worker's
address line, then prefixes every later line with "From worker N".
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .. import protocol, transport
from ..exceptions import LaunchWorkerError
from ..group import PGRP

log = logging.getLogger(__name__)

__all__ = [
    "ClusterManager",
    "WorkerConfig",
    "WorkerOutput",
    "launch",
    "manage",
    "kill",
    "connect",
    "Authenticated",
    "request_exit",
    "read_worker_address",
    "connect_tcp",
    "worker_env",
    "worker_timeout",
    "process_ended",
]

_timeout_override: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pydist_timeout", default=None
)


def worker_timeout() -> float:
    """Seconds to wait for a worker to start, join or connect: the `timeout` of the current
    `addprocs`, else `PYDIST_WORKER_TIMEOUT`, else 60."""
    override = _timeout_override.get()
    if override is not None:
        return override
    return float(os.environ.get("PYDIST_WORKER_TIMEOUT", "60"))


DEFAULT_HEARTBEAT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Authenticated:
    """What `ClusterManager.connect` returns for a socket that needs no cookie handshake:
    one end of a pair whose other end only the worker holds, handed to it at its fork
    (`LocalManager` with the fork server). Only for such sockets: pydist trusts it."""

    sock: socket.socket


def heartbeat_timeout(value: Any = None) -> float | None:
    """Seconds of silence after which a peer is declared dead: `value` (an `addprocs`
    keyword), else `PYDIST_HEARTBEAT_TIMEOUT`, else 60; None when 0, "0", "off" or "none"
    turn heartbeats off. ValueError (naming the setting) for anything else."""
    what = "addprocs(heartbeat_timeout=...)"
    if value is None:
        value = os.environ.get("PYDIST_HEARTBEAT_TIMEOUT")
        what = "PYDIST_HEARTBEAT_TIMEOUT"
        if value is None or value.strip() == "":
            return DEFAULT_HEARTBEAT_TIMEOUT
    if isinstance(value, str) and value.strip().lower() in ("off", "none", "0", "false"):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, or 0/None to turn heartbeats "
                         f"off; got {value!r}") from None
    if seconds != seconds or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {value!r}")
    return seconds or None


@contextlib.contextmanager
def launch_timeout(seconds: float):
    token = _timeout_override.set(seconds)
    try:
        yield
    finally:
        _timeout_override.reset(token)


@dataclass
class WorkerConfig:
    """What a manager knows about one launched worker (Julia's fields, all None by default)."""

    io: Any = None
    host: str | None = None
    port: int | None = None
    count: int | str | None = None
    exename: str | None = None
    exeflags: list[str] | None = None
    userdata: Any = None
    tunnel: bool | None = None
    multiplex: bool | None = None
    forward: str | None = None
    bind_addr: str | None = None
    sshflags: list[str] | None = None
    max_parallel: int | None = None
    connect_at: Any = None
    process: Any = None
    ospid: int | None = None
    environ: dict | None = None
    ident: Any = None
    connect_idents: list | None = None
    enable_threaded_blas: bool | None = None
    # Not Julia's: the relay of this worker's output, made by `read_worker_address`.
    output: "WorkerOutput | None" = field(default=None, repr=False, compare=False)


ADDRESS_LINE = re.compile(rb"^pydist_worker:(\d+)#(.*?)\r?$")
_MAX_STARTUP_LINES = 1000


class WorkerOutput:
    """Relays a worker's stdout to ours, after finding its `pydist_worker:<port>#<addr>` line.

    Lines before the address line are kept, and echoed as startup output once the address
    line has come (if it never does, they are in the launch error instead: said once);
    later lines are printed as ``"      From worker N:\\t<line>"``.
    A pipe (a buffered binary file, as `subprocess` gives) is read by the one `_RelayLoop`
    thread that serves all of them: 128 workers would otherwise be 128 threads in the
    master, all woken at once when the workers exit. Any other stream gets a thread of its
    own. Either way the relay ends when the worker closes its stdout (it exits).
    """

    _all: "weakref.WeakSet[WorkerOutput]" = weakref.WeakSet()

    def __init__(self, stream: BinaryIO, pid: int | None = None):
        WorkerOutput._all.add(self)
        self.stream = stream
        self.pid = pid
        self.address: tuple[str, int] | None = None
        self.startup: list[str] = []
        self.tail: deque[str] = deque(maxlen=10)  # its last lines, for why it ended
        self.eof = False
        self.too_chatty = False
        self.found = threading.Event()
        self.done = threading.Event()  # set once the last line is relayed
        self._partial = b""  # (relay loop) the unfinished last line read so far
        if not _RELAY.add(self):
            threading.Thread(target=self._run, name="pydist-output", daemon=True).start()

    def _emit(self, text: str) -> None:
        if text.startswith("      From worker "):
            line = text
        elif self.address is None or self.pid is None:
            line = f"\tFrom worker startup:\t{text}"
        else:
            line = f"      From worker {self.pid}:\t{text}"
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (ValueError, OSError):
            pass  # our stdout is closed (interpreter shutting down)

    def _line(self, raw: bytes) -> None:
        """One line of the worker's output (with its newline, unless it is the last)."""
        if self.address is None:
            m = ADDRESS_LINE.match(raw.rstrip(b"\n"))
            if m:
                for text in self.startup:
                    self._emit(text)
                self.address = (m.group(2).decode(), int(m.group(1)))
                self.found.set()
                return
            text = raw.decode(errors="replace").rstrip("\r\n")
            self.startup.append(text)
            if len(self.startup) >= _MAX_STARTUP_LINES:
                self.too_chatty = True
                self.found.set()
            return
        text = raw.decode(errors="replace").rstrip("\r\n")
        self.tail.append(text)
        self._emit(text)

    def _feed(self, data: bytes) -> None:
        """(relay loop) Relay the complete lines of `data`, after what came before it."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line + b"\n")

    def _ended(self) -> None:
        last, self._partial = self._partial, b""
        try:
            if last:  # a last line without a newline
                self._line(last)
        finally:
            self.eof = True
            self.found.set()
            self.done.set()

    def _run(self) -> None:
        """The relay's own thread, for a stream the relay loop cannot watch."""
        try:
            for raw in iter(self.stream.readline, b""):
                self._line(raw)
        except (OSError, ValueError):
            pass
        finally:
            self._ended()

    @classmethod
    def drain_all(cls, timeout: float) -> None:
        """Wait (up to `timeout` in all) for relays of exited workers to print their last lines."""
        deadline = time.monotonic() + timeout
        for relay in list(cls._all):
            relay.done.wait(max(0.0, deadline - time.monotonic()))

    def wait_address(self, timeout: float, process: Any = None) -> tuple[str, int]:
        """The worker's (addr, port); LaunchWorkerError saying what went wrong otherwise."""
        self.found.wait(timeout)
        if self.address is not None:
            return self.address
        output = "\n".join(self.startup[-50:])
        detail = f"\nWorker output:\n{output}" if output else "\n(the worker printed nothing)"
        if self.too_chatty:
            raise LaunchWorkerError(
                "Unexpected output from worker launch command. Host:port string not found." + detail
            )
        if self.eof:
            code = None
            if process is not None:
                with contextlib.suppress(Exception):
                    code = process.wait(timeout=5)
            status = f" (exit code {code})" if code is not None else ""
            raise LaunchWorkerError(
                "Unable to read host:port string from worker. Launch command exited with error?"
                + status + detail
            )
        raise LaunchWorkerError(
            f"Timed out waiting to read host:port string from worker (after {timeout} seconds)."
            + detail
        )


class _RelayLoop:
    """One thread reading every worker output pipe of this process (epoll), for
    `WorkerOutput`. It starts with the first pipe and ends when the last one is closed."""

    READ_SIZE = 1 << 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sel: Any = None  # a selector, while the thread runs
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._added: list[tuple[int, WorkerOutput]] = []  # for the thread to register

    def add(self, relay: WorkerOutput) -> bool:
        """Watch `relay`'s stream; False if it is not a pipe this loop can read."""
        stream = relay.stream
        if not isinstance(stream, io.BufferedReader) or os.name != "posix":
            return False
        try:
            fd = stream.fileno()
            os.set_blocking(fd, False)
            # What the stream has buffered already (someone read from it before us) comes
            # first; from then on its buffer stays empty and we read the pipe directly.
            pending = stream.read1(self.READ_SIZE) or b""
        except (OSError, ValueError):
            return False
        if pending:  # (before the thread sees the pipe: the lines keep their order)
            relay._feed(pending)
        with self._lock:
            self._added.append((fd, relay))
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._sel = selectors.DefaultSelector()
                self._sel.register(self._wake_r, selectors.EVENT_READ)
                self._thread = threading.Thread(target=self._run, name="pydist-output",
                                                daemon=True)
                self._thread.start()
            else:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
        return True

    def _run(self) -> None:
        relays: dict[int, WorkerOutput] = {}
        try:
            while self._adopt(relays):
                self._step(relays)
        except BaseException:  # (a bug): end every relay rather than leave waiters hanging
            log.exception("pydist: internal error relaying worker output")
            with self._lock:
                relays.update(self._added)
                self._added.clear()
                self._close()
            for relay in relays.values():
                relay._ended()

    def _adopt(self, relays: dict[int, "WorkerOutput"]) -> bool:
        """Watch the pipes added since; False (and the thread's resources released) once
        there is none left to watch."""
        with self._lock:
            for fd, relay in self._added:
                old = relays.pop(fd, None)
                if old is not None:  # its stream was closed before its end: that one is over
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(fd)
                    old._ended()
                try:
                    self._sel.register(fd, selectors.EVENT_READ)
                except (ValueError, OSError):  # closed already
                    relay._ended()
                    continue
                relays[fd] = relay
            self._added.clear()
            if relays:
                return True
            self._close()
            return False

    def _close(self) -> None:
        """(Lock held) the thread is ending: release its selector and wake pipe. Never
        raises, and a second call does nothing: the thread's error path calls it too, and
        the next `add` must start a new thread whatever happened here."""
        sel, self._sel, self._thread = self._sel, None, None
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        if sel is not None:
            with contextlib.suppress(OSError):
                sel.close()
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _step(self, relays: dict[int, "WorkerOutput"]) -> None:
        """Wait for output, relay it; end the relays whose pipes reached end of file."""
        for key, _ in self._sel.select():
            fd = key.fd
            if fd == self._wake_r:
                with contextlib.suppress(OSError):
                    while os.read(fd, 512):
                        pass
                continue
            relay = relays[fd]
            try:
                data = os.read(fd, self.READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                relay._feed(data)
                continue
            self._sel.unregister(fd)
            del relays[fd]
            relay._ended()


_RELAY = _RelayLoop()


class ClusterManager(ABC):
    """How workers are started, reached, interrupted and stopped (Julia's interface).

    Subclasses implement `launch(params, launched, launch_ntfy)`: start the workers, append
    one `WorkerConfig` per worker to `launched` (under `launch_ntfy`, a `threading.Condition`,
    then `notify_all()`), and return when all are launched. The defaults of the other methods
    serve any manager whose workers run `python -m pydist.worker` and speak TCP:

    - `connect(pid, config)` returns a connected socket, or a `(reader, writer)` pair of binary
      streams for a custom transport; the process group then authenticates it. The default
      reads the worker's address line from `config.io` (or uses `config.host`/`config.port`,
      or `config.connect_at` between workers) and opens a TCP connection.
    - `kill(pid, config)` asks the worker to exit.
    - `exit_reason(pid, config)` says why a lost worker ended, for its
      `ProcessExitedException` (beyond Julia); the default reads `config.process`.
    - `manage(pid, config, op)` is told "register", "deregister", "interrupt" and "finalize";
      the default interrupts a worker on this machine with SIGINT.
    - `cleanup()` runs at interpreter exit: release processes and tunnels still held.
    """

    @abstractmethod
    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Start the workers; called once per `addprocs`, in its own thread.

        `params` are the `addprocs` keywords merged over `default_addprocs_params()` (and
        normalized: `exename`, `exeflags` as a list, `dir`, `env`, `timeout`...). For each
        worker started, append a `WorkerConfig` to `launched` while holding `launch_ntfy`
        and call `launch_ntfy.notify_all()`: `addprocs` connects to each worker as soon as
        it is announced. Return when every worker is launched; an exception fails the
        workers not yet announced (the others still join).
        """

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Hear about worker `pid`: `op` is "register" (it joined), "interrupt" (from
        `interrupt(pid)`), "deregister" (it left) or "finalize" (after its exited
        callbacks). The default handles "interrupt" by sending SIGINT to `config.ospid`."""
        if op == "interrupt":
            ospid = config.ospid
            if ospid is None:
                log.error("Worker %d cannot be presently interrupted.", pid)
                return
            os.kill(ospid, signal.SIGINT)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Stop worker `pid` (from `rmprocs`, or when it went silent). The default asks it
        to exit over its connection; managers that own the process also escalate to
        signals when it does not."""
        request_exit(pid)

    def exit_reason(self, pid: int, config: WorkerConfig) -> str | None:
        """Why worker `pid` ended, as the end of a sentence ("exited with code 3"), or None
        when unknown; asked when its connection is lost. The default describes
        `config.process` (a `subprocess.Popen`) once it has ended, waiting up to a second."""
        return describe_exit(config.process, wait=1.0)

    def connect(self, pid: int, config: WorkerConfig) -> "socket.socket | tuple[Any, Any] | Authenticated":
        """A connection to worker `pid`: a connected socket, or a `(reader, writer)` pair of
        binary streams for a custom transport; pydist then runs the cookie handshake over it
        (unless it comes as `Authenticated`: a pair made at the worker's fork).
        Also called on a worker to reach another worker (then `config.connect_at` is set).
        The default reads the worker's address line and connects over TCP."""
        host, port = read_worker_address(pid, config)
        return connect_tcp(pid, host, port)

    def default_addprocs_params(self) -> dict[str, Any]:
        """The `addprocs` keywords this manager assumes when they are not given."""
        return {
            "topology": "all_to_all",
            "dir": os.getcwd(),
            "exename": sys.executable,
            "exeflags": [],
            "env": {},
            "enable_threaded_blas": False,
            "lazy": True,
        }

    def cleanup(self) -> None:
        """Release whatever the manager still holds at exit (processes, tunnels)."""


def exit_reason(manager: Any, pid: int, config: WorkerConfig) -> str | None:
    """`manager.exit_reason(pid, config)`, for any manager (errors logged, never raised)."""
    describe = getattr(manager, "exit_reason", None)
    if describe is None:
        return None
    try:
        return describe(pid, config)
    except Exception:
        log.exception("pydist: exit_reason failed for worker %d", pid)
        return None


def describe_exit(proc: Any, wait: float) -> str | None:
    """How process `proc` (a Popen, or a handle like it: a `ForkedProcess`) ended, waiting up
    to `wait` seconds; None if unknown."""
    if not isinstance(proc, subprocess.Popen) and not (
            callable(getattr(proc, "wait", None)) and hasattr(proc, "returncode")):
        return None
    try:
        code = proc.wait(wait)
    except subprocess.TimeoutExpired:
        return None
    return describe_status(code)


def describe_status(code: int) -> str:
    """A Popen return code as the end of a sentence: "exited with code 3", "was killed by
    signal 9 (SIGKILL) ..." (SIGKILL is also what the kernel's out-of-memory killer sends)."""
    if code >= 0:
        return f"exited with code {code}"
    sig = -code
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "unknown signal"
    text = f"was killed by signal {sig} ({name})"
    if sig == signal.SIGKILL:
        text += ("; SIGKILL is also what the kernel's out-of-memory killer sends, so it may "
                 "have run out of memory")
    return text


def read_worker_address(pid: int, config: WorkerConfig) -> tuple[str, int]:
    """Where to connect to worker `pid`: (host, port). Fills in `config.bind_addr`,
    `config.port` and `config.connect_at` (the address other workers will use).

    With `config.io` set, reads the worker's `pydist_worker:<port>#<addr>` line from it (and
    relays its later output); else uses `config.host`/`config.port`; between workers (only
    `connect_at` set) uses `connect_at`.
    """
    if config.connect_at is not None and config.io is None and config.host is None:
        host, port = config.connect_at
        return host, port
    if config.io is not None:
        if config.output is None:
            config.output = WorkerOutput(config.io, pid)
        config.output.pid = pid
        bind_addr, port = config.output.wait_address(worker_timeout(), config.process)
        host = _strip_user(config.host) or bind_addr
        config.bind_addr = config.bind_addr or bind_addr
        config.port = port
    else:
        host, port = _strip_user(config.host), config.port
        if host is None or port is None:
            raise LaunchWorkerError(f"worker {pid}: WorkerConfig has neither io nor host and port")
    config.connect_at = (config.bind_addr or host, port)
    return host, port


def _strip_user(host: str | None) -> str | None:
    return None if host is None else host.rpartition("@")[2]


def connect_tcp(pid: int, host: str, port: int) -> socket.socket:
    """A connection to worker `pid` listening on TCP `host:port` -- through the worker's
    local Unix socket when it runs in this network namespace (`transport.open_connection`)
    -- or LaunchWorkerError saying where it failed."""
    try:
        return transport.open_connection(host, port, PGRP.cookie_bytes(), worker_timeout())
    except OSError as e:
        raise LaunchWorkerError(f"could not connect to worker {pid} at {host}:{port}: {e}") from e


def request_exit(pid: int) -> None:
    """Ask worker `pid` to exit (the default `ClusterManager.kill`)."""
    w = PGRP.workers.get(pid)
    if w is None or w.conn is None:
        return
    try:  # never waits for the worker to read: the manager escalates if it does not exit
        w.conn.send(protocol.encode_frame(protocol.EXIT), wait=False)
    except transport.ConnectionClosed:
        pass


def launch(manager: ClusterManager, params: dict[str, Any], launched: list[WorkerConfig],
           launch_ntfy: threading.Condition) -> None:
    """`manager.launch(params, launched, launch_ntfy)` (Julia's `launch` as a function)."""
    manager.launch(params, launched, launch_ntfy)


def manage(manager: ClusterManager, pid: int, config: WorkerConfig, op: str) -> None:
    """`manager.manage(pid, config, op)` (Julia's `manage` as a function)."""
    manager.manage(pid, config, op)


def kill(manager: ClusterManager, pid: int, config: WorkerConfig) -> None:
    """`manager.kill(pid, config)` (Julia's `kill` as a function)."""
    manager.kill(pid, config)


def connect(manager: ClusterManager, pid: int, config: WorkerConfig
            ) -> "socket.socket | tuple[Any, Any] | Authenticated":
    """`manager.connect(pid, config)` (Julia's `connect` as a function)."""
    return manager.connect(pid, config)


def worker_env(params: dict, base: dict | None = None) -> dict:
    """The environment for a worker process: `base` (default: ours) plus what pydist needs
    (unbuffered output, the worker timeout, single-threaded BLAS unless asked) and the
    `env` of `params`, which wins."""
    env = dict(os.environ if base is None else base)
    env["PYDIST_WORKER_TIMEOUT"] = str(params.get("timeout") or worker_timeout())
    env["PYTHONUNBUFFERED"] = "1"
    if not params.get("enable_threaded_blas", False):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
    env.update(params.get("env") or {})
    return env


def process_ended(ospid: int) -> bool:
    """Whether process `ospid` (of this PID namespace) has ended: gone, or a zombie."""
    try:
        with open(f"/proc/{ospid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        try:
            os.kill(ospid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


# Popen options that start a worker as the leader of its own process group (so that
# `signal_group` reaches it and what it starts, and a terminal's ^C, sent to the foreground
# group, only the master), in the master's session: Linux schedules a session as one group
# (autogroup), and a session per worker would give each worker a full share against the
# master and the user's other programs. Python 3.10 has no `process_group`: a new session.
OWN_PROCESS_GROUP: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                                     else {"start_new_session": True})


def signal_group(proc: Any, sig: int) -> None:
    """Send `sig` to the process group that `proc` (a Popen or a `ForkedProcess`) leads
    (started with `OWN_PROCESS_GROUP` or `start_new_session=True`, or forked into a group of
    its own), so that a wrapper's children get it too; to `proc` alone if it leads none."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone (the process may be a zombie)
        pass
    except OSError:
        with contextlib.suppress(OSError):
            proc.send_signal(sig)


def wait_process(proc: Any, timeout: float) -> int:
    """`proc.wait(timeout)`, woken by the kernel when a Popen's process exits (a pidfd,
    Linux >= 5.3) instead of `Popen.wait`'s polling, which sleeps 0.5, 1, 2, 4 ... ms
    between looks: 7 of the 10 ms that stopping the fork server took. Raises
    `subprocess.TimeoutExpired` as `wait` does."""
    if isinstance(proc, subprocess.Popen) and proc.returncode is None:
        try:
            # (our child, not yet reaped: its pid cannot have been reused)
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # (an old kernel or Python, or it was reaped)
            pass
        else:
            try:
                ended = select.select([fd], [], [], max(0.0, timeout))[0]
            finally:
                os.close(fd)
            return proc.wait(timeout if ended else 0)  # (reaps it, or raises at once)
    return proc.wait(timeout)


def reap(procs: list, grace: float) -> None:
    """Wait up to `grace` seconds in all for `procs` to exit, then kill the rest."""
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait_process(proc, max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, signal.SIGKILL)  # the process and whatever it started
        with contextlib.suppress(Exception):
            proc.wait(5)
