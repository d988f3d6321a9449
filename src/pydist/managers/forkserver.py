"""The master's side of the fork server (`start_method="forkserver"` of LocalManager).

One template process per master (`python -m pydist.forkserver`, see that module), started on
first use; the master itself never forks. `fork_workers` asks it for workers and returns a
`ForkedProcess`: the part of `subprocess.Popen` that managers use (`pid`, `poll`, `wait`,
`returncode`, `send_signal`, `terminate`, `kill`). The template reports each child's exit
status; a reader thread ("pydist-forkserver") files them, and ends when the template does.
`stop()` closes the control socket: the template exits (its children, the workers, keep
running until their master connection ends, as any worker).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Iterator

from . import process_ended, wait_process

log = logging.getLogger(__name__)

__all__ = ["ForkedProcess", "fork_workers", "unsuitable", "running", "stop"]

START_TIMEOUT = 30.0  # seconds for the template to start and answer a request
MAX_MESSAGE = 1 << 20
READER_END_TIMEOUT = 5.0  # seconds for the reader to read the last words of a template gone
MAX_FORKS_PER_REQUEST = 64  # workers in one message: 2 descriptors each (the kernel allows 253; see the template's MAX_FDS)

# Environment variables read while the interpreter starts (or by the C library at load):
# a worker that needs a value other than the template's must be a fresh interpreter.
_STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "DYLD_")
_RUNTIME_PYTHON = {"PYTHONUNBUFFERED"}  # the fork server applies this one in the child


# Modules the template imports before its first fork (comma-separated), so that workers
# share them instead of each importing them (numpy: ~50 ms of CPU and ~9 MB per worker).
# Read when the template starts; so are the thread counts BLAS libraries read at load.
PRELOAD_VAR = "PYDIST_PRELOAD"
_PRELOAD_LOAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _startup_vars(env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items()
           if k.startswith(_STARTUP_PREFIXES) and k not in _RUNTIME_PYTHON}
    if env.get(PRELOAD_VAR, "").strip():
        out.update((k, env[k]) for k in (PRELOAD_VAR, *_PRELOAD_LOAD_VARS) if k in env)
    return out


class ForkedProcess:
    """A worker forked by the fork server: the subset of `subprocess.Popen` managers use."""

    def __init__(self, server: "_Server", pid: int, stdout: IO[bytes],
                 master_socket: socket.socket | None = None):
        self._server = server
        self.pid = pid
        self.stdout = stdout
        # Our end of the socket pair whose other end the worker got at its fork: its
        # master connection, authenticated by construction (see `take_master_socket`).
        self._master_socket = master_socket
        self.args = ["pydist.forkserver", str(pid)]
        self.returncode: int | None = None
        self._ended = threading.Event()  # set once `returncode` is known
        server.register(self)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def take_master_socket(self) -> socket.socket | None:
        """Our end of the worker's master connection (once; None if not paired or taken).

        No other process can hold its other end: we made the pair and passed that end only
        to our own template (over its control socket, itself a pair made before the template
        started), which passed it only to the child it forked. So the worker at the other end
        is the one we asked for, and knows our cookie: no handshake is needed on it, as none
        is on the pipes of a `multiprocessing` child."""
        sock, self._master_socket = self._master_socket, None
        return sock

    def close_master_socket(self) -> None:
        """Drop our end of the master connection if nobody took it (the worker then sees the
        end of its master connection and exits)."""
        sock = self.take_master_socket()
        if sock is not None:
            sock.close()

    def poll(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal), else None."""
        if self.returncode is None:
            self._server.refresh(self)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; `subprocess.TimeoutExpired` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            step = 0.05 if self._server.closed else 0.5  # (an orphan: polled)
            self._ended.wait(step if left is None else min(left, step))
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process unless it has ended."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


class _Server:
    """One running template process and the reader of its reports."""

    def __init__(self, env: dict[str, str], yield_to_master: bool):
        self.env = env
        self.startup = _startup_vars(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pydist.forkserver", str(theirs.fileno()),
                 *(["--yield-to-master"] if yield_to_master else [])],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env,  # (stderr: ours, for its own failures)
                # its own session (a terminal's ^C is for the master only), which the
                # workers it forks share: one scheduling group for them all (see forkserver)
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.changed = threading.Condition()
        self.send_lock = threading.Lock()
        self.next_req = 0
        self.replies: dict[int, dict] = {}
        self.procs: dict[int, ForkedProcess] = {}  # running, by pid
        self.exits: dict[int, int] = {}  # exit codes of children not registered yet
        self.closed = False
        self.refused: str | None = None  # why the template would not fork (see _preload)
        self.reader = threading.Thread(target=self._read, name="pydist-forkserver", daemon=True)
        self.reader.start()
        log.debug("fork server started: os pid %d", self.proc.pid)

    def _read(self) -> None:
        resets = 0
        try:
            while True:
                try:
                    data = self.sock.recv(MAX_MESSAGE)
                except ConnectionResetError:
                    # The template ended with a request of ours unread (one that refused
                    # ends at once): the reset comes first, then what it sent before it
                    # ended (its refusal), then the end of the socket.
                    resets += 1
                    if resets > 3:
                        raise
                    continue
                if not data:
                    break
                msg = json.loads(data)
                with self.changed:
                    if "refused" in msg:
                        self.refused = str(msg["refused"])
                        _refused[frozenset(self.startup.items())] = self.refused
                    elif "exit" in msg:
                        proc = self.procs.pop(msg["exit"], None)
                        if proc is None:
                            self.exits[msg["exit"]] = msg["status"]
                        else:
                            proc.returncode = msg["status"]
                            proc._ended.set()  # (wakes only who waits for this one)
                    else:
                        self.replies[msg["req"]] = msg
                        self.changed.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            self._mark_closed()
            if self.refused is not None:  # it ends right after saying so: reap it here
                try:
                    self.proc.wait(READER_END_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass

    def _mark_closed(self) -> None:
        """The template is gone: waiters for its replies stop waiting."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def alive(self) -> bool:
        """The template still runs: its control socket is open and the process has not
        exited (the reader may not have seen the end of the socket yet)."""
        return not self.closed and self.proc.poll() is None

    def submit(self, request: dict, out_fds: list[int], master_fds: list[int] | None = None
               ) -> list[int]:
        """Ask the template to fork one worker per pipe in `out_fds` (at most
        `MAX_FORKS_PER_REQUEST`), each with the socket of `master_fds` at the same place as
        its master connection if given; their request numbers, for `result`. One message for
        them all: a message per worker filled the socket at 128 workers, and the master then
        waited for the template to fork the first hundred before it could connect to any."""
        count = len(out_fds)
        if not 0 < count <= MAX_FORKS_PER_REQUEST:
            raise ValueError(f"a fork request carries 1 to {MAX_FORKS_PER_REQUEST} pipes")
        if master_fds is not None and len(master_fds) != count:
            raise ValueError(f"{count} pipes came with {len(master_fds)} master sockets")
        with self.send_lock:
            first = self.next_req + 1
            self.next_req += count
            data = json.dumps(dict(request, req=first, count=count,
                                   paired=master_fds is not None)).encode()
            try:
                socket.send_fds(self.sock, [data], out_fds + (master_fds or []))
            except OSError as e:
                if isinstance(e, ConnectionError) or self.proc.poll() is not None:
                    # Gone: the reader reads what it said last (a refusal, which `unsuitable`
                    # must know of before the next request) and then the end of the socket.
                    self.reader.join(READER_END_TIMEOUT)
                if self.refused is not None:
                    raise OSError(_refusal(self.refused)) from e
                code = self.proc.poll()
                raise OSError("the fork server exited" + (
                    f" with code {code}" if code is not None else f" ({e})")) from e
        return list(range(first, first + count))

    def result(self, req: int) -> int:
        """The pid of the worker forked for request `req`; OSError if the template could not."""
        deadline = time.monotonic() + START_TIMEOUT
        with self.changed:
            while req not in self.replies:
                left = deadline - time.monotonic()
                if self.refused is not None:
                    raise OSError(_refusal(self.refused))
                if self.closed or left <= 0:
                    raise OSError("the fork server " + ("exited" if self.closed else
                                  f"did not answer within {START_TIMEOUT:g} s"))
                self.changed.wait(left)
            reply = self.replies.pop(req)
        if "error" in reply:
            raise OSError(f"the fork server could not fork: {reply['error']}")
        return int(reply["pid"])

    def register(self, proc: ForkedProcess) -> None:
        """File `proc`, to be told its exit status."""
        with self.changed:
            code = self.exits.pop(proc.pid, None)
            if code is None:
                self.procs[proc.pid] = proc
                return
            proc.returncode = code
            proc._ended.set()

    def refresh(self, proc: ForkedProcess) -> None:
        with self.changed:
            if proc.returncode is not None or not self.closed:
                return
            self.procs.pop(proc.pid, None)
        # The template is gone: our child was adopted by init, which may be slow to reap it.
        if process_ended(proc.pid):
            proc.returncode = 255  # its status is unknown
            proc._ended.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the control socket: the template exits; reap it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            wait_process(self.proc, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(timeout)
        self.sock.close()
        self._mark_closed()  # (the reader may not have seen the end of the socket yet)
        log.debug("fork server stopped")


_lock = threading.Lock()
_server: _Server | None = None
_failed: str | None = None  # why the template could not start (then: fresh interpreters)
# Why a template started with these start-up variables would not fork (a preloaded module
# started a thread): workers that need them are fresh interpreters, and no template is
# tried again for them.
_refused: dict[frozenset, str] = {}


def _refusal(why: str) -> str:
    """What a worker start (or `unsuitable`) says of a template that refused to fork."""
    return f"the fork server refused: {why}"


def unsuitable(exename: str, exeflags: list[str], env: dict[str, str]) -> str | None:
    """Why a worker with these settings cannot be forked from the template (None: it can)."""
    if exename != sys.executable:  # (a symlink to the same binary may be another venv)
        return f"exename {exename!r} is not this interpreter ({sys.executable})"
    if exeflags:
        return f"exeflags {exeflags!r} apply at interpreter start-up"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return "this platform has no fork or fd passing"
    refused = _refused.get(frozenset(_startup_vars(env).items()))
    if refused is not None:
        return _refusal(refused)
    with _lock:
        if _failed is not None:
            return _failed
        server = _server
    if server is not None and not server.closed:
        differ = sorted(k for k in set(server.startup) | set(_startup_vars(env))
                        if server.startup.get(k) != env.get(k))
        if differ:
            return (f"environment variables {', '.join(differ)} differ from the fork server's "
                    f"and apply at interpreter start-up")
    return None


def _get_server(env: dict[str, str], yield_to_master: bool) -> _Server:
    global _server, _failed
    with _lock:
        if _server is not None and _server.alive():
            return _server
        if _server is not None:
            _server.stop(1.0)
            _server = None
        try:
            _server = _Server(env, yield_to_master)
        except OSError as e:
            _failed = f"the fork server failed to start: {e}"
            raise
        return _server


def fork_workers(n: int, cookie: str, bind: str, cwd: str, env: dict[str, str], *,
                 yield_to_master: bool = False, paired: bool = False) -> Iterator[ForkedProcess]:
    """`n` workers forked by the fork server (started on first use with `env`; with
    `yield_to_master` when this process is the master, see `pydist.forkserver`), each with
    its stdout and stderr on a pipe (`.stdout`), yielded as they come; with `paired`, each
    also with its master connection made here (`take_master_socket`). The requests go out
    at once, so the template forks while the master reads the answers. OSError when the
    fork server cannot provide them (check `unsuitable` first); a caller then starts fresh
    interpreters for the rest."""
    server = _get_server(env, yield_to_master)
    differ = sorted(k for k in set(server.startup) | set(_startup_vars(env))
                    if server.startup.get(k) != env.get(k))
    if differ:  # (our environment changed since the template started)
        raise OSError(f"environment variables {', '.join(differ)} differ from the fork server's")
    # (request, read end of its output pipe, our end of its master connection or None)
    pending: list[tuple[int, int, socket.socket | None]] = []
    request = {"cookie": cookie, "bind": bind, "dir": cwd, "env": env}
    try:
        while len(pending) < n:
            pipes: list[tuple[int, int]] = []
            pairs: list[tuple[socket.socket, socket.socket]] = []
            try:
                for _ in range(min(n - len(pending), MAX_FORKS_PER_REQUEST)):
                    pipes.append(os.pipe())
                    if paired:
                        pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
                reqs = server.submit(request, [w for _, w in pipes],
                                     [theirs.fileno() for _, theirs in pairs] if paired else None)
            except BaseException:
                for r, _ in pipes:
                    os.close(r)
                for ours, _ in pairs:
                    ours.close()
                raise
            finally:  # (the template has its own copies now)
                for _, w in pipes:
                    os.close(w)
                for _, theirs in pairs:
                    theirs.close()
            socks: list[socket.socket | None] = [ours for ours, _ in pairs] or [None] * len(pipes)
            pending.extend(zip(reqs, (r for r, _ in pipes), socks))
        while pending:
            req, r, master = pending[0]
            pid = server.result(req)
            pending.pop(0)
            yield ForkedProcess(server, pid, os.fdopen(r, "rb"), master)
    finally:
        for _, r, master in pending:  # (a worker forked for one of these exits: its pipe is gone)
            os.close(r)
            if master is not None:
                master.close()


def _forget_in_child() -> None:
    """After a fork of the master (user code): the child has no fork server of its own;
    its copy of the control socket must not keep the master's template alive."""
    global _lock, _server, _failed
    _lock = threading.Lock()
    if _server is not None:
        try:
            os.close(_server.sock.detach())
        except OSError:
            pass
    _server, _failed = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def running() -> bool:
    """Whether a fork server is running."""
    with _lock:
        return _server is not None and not _server.closed


def stop() -> None:
    """Stop the fork server, if one runs (it starts again on next use)."""
    global _server, _failed
    with _lock:
        server, _server, _failed = _server, None, None
        _refused.clear()
    if server is not None:
        server.stop()
