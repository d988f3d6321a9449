"""LocalManager: workers on this machine (`python -m pydist.worker` as child processes),
written on the public ClusterManager interface only, like any third-party manager."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Iterator

from ..exceptions import LaunchWorkerError
from ..group import PGRP
from ..transport import default_bind_addr, local_sockets
from . import (
    OWN_PROCESS_GROUP,
    Authenticated,
    ClusterManager,
    WorkerConfig,
    forkserver,
    read_worker_address,
    reap,
    signal_group,
    worker_env,
)

log = logging.getLogger(__name__)

__all__ = ["LocalManager", "default_addprocs_params", "START_METHODS"]

START_METHODS = ("spawn", "forkserver")


def default_start_method() -> str:
    """`PYDIST_START_METHOD` (``"spawn"`` or ``"forkserver"``), else ``"forkserver"``."""
    value = os.environ.get("PYDIST_START_METHOD", "").strip().lower() or "forkserver"
    if value not in START_METHODS:
        raise ValueError(f"PYDIST_START_METHOD must be one of {START_METHODS}, got {value!r}")
    return value


def default_addprocs_params(manager: ClusterManager | None = None) -> dict[str, Any]:
    """The `addprocs` keywords `manager` assumes when they are not given (default: those
    of a `LocalManager`), e.g. ``default_addprocs_params()["topology"] == "all_to_all"``."""
    return (manager or LocalManager(0)).default_addprocs_params()


def _pydist_import_root() -> str:
    """The directory that holds the pydist package, so that workers can import it."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LocalManager(ClusterManager):
    """Workers on this machine, listening on 127.0.0.1 unless `restrict=False`. Removal asks
    politely, then sends SIGTERM after `exit_timeout` seconds and SIGKILL after
    `term_timeout` more. Written on the public interface only.

    `start_method` (default `PYDIST_START_METHOD`, else ``"forkserver"``): ``"forkserver"``
    forks each worker from a template process started once per master
    (`pydist.forkserver`), which is much faster and lighter; ``"spawn"`` starts it as a
    fresh interpreter (`python -m pydist.worker`). A worker that needs another `exename`,
    `exeflags`, or an `env` entry read at interpreter start-up (PYTHON*, LD_*...), or a
    platform without fork, gets a fresh interpreter anyway."""

    def __init__(self, np: int, restrict: bool = True, exit_timeout: float = 5.0,
                 term_timeout: float = 5.0, start_method: str | None = None):
        if start_method is None:
            start_method = default_start_method()
        elif start_method not in START_METHODS:
            raise ValueError(f"LocalManager: start_method must be one of {START_METHODS}, "
                             f"got {start_method!r}")
        self.np = np
        self.restrict = restrict
        self.exit_timeout = exit_timeout
        self.term_timeout = term_timeout
        self.start_method = start_method
        self._procs: set[Any] = set()  # started and not yet reaped (Popen or ForkedProcess)
        self._dying: list[_Dying] = []  # asked to exit and still running (oldest first)
        self._reaper: threading.Thread | None = None  # waits for those; ends when none is left
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"LocalManager(np={self.np}, restrict={self.restrict}, "
                f"start_method={self.start_method!r})")

    def default_addprocs_params(self) -> dict:
        return dict(super().default_addprocs_params(), restrict=self.restrict)

    def launch(self, params: dict, launched: list, launch_ntfy: threading.Condition) -> None:
        bind = "127.0.0.1" if self.restrict else default_bind_addr()
        cmd = [params["exename"], *params["exeflags"], "-m", "pydist.worker", "--bind-to", bind]
        env = worker_env(params)
        root = _pydist_import_root()  # so that workers import this very pydist
        paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        cookie = PGRP.cookie
        fork = self.start_method == "forkserver"
        if fork:
            why = forkserver.unsuitable(params["exename"], params["exeflags"], env)
            if why is not None:
                log.debug("starting fresh interpreters, not forking: %s", why)
                fork = False
        log.debug("starting %d local workers: %s", self.np,
                  "forked by the fork server" if fork else " ".join(cmd))
        forked: Iterator[forkserver.ForkedProcess] | None = None
        if fork:  # (addprocs runs on the master only: its workers yield the CPU to it)
            # Each with its master connection, a Unix socket pair (see `connect`), unless
            # PYDIST_LOCAL_SOCKETS=0 asks for TCP.
            forked = forkserver.fork_workers(self.np, cookie, bind, params["dir"], env,
                                             yield_to_master=True, paired=local_sockets())
        for _ in range(self.np):
            proc: Any = None
            if forked is not None:
                try:
                    proc = next(forked)
                except OSError as e:
                    log.debug("starting fresh interpreters, not forking: %s", e)
                    forked = None
            if proc is None:
                proc = self._spawn(cmd, params["dir"], env, cookie)
            else:
                with self._lock:
                    self._procs.add(proc)
                log.info("forked a local worker process: os pid %d", proc.pid)
            config = WorkerConfig(
                process=proc, io=proc.stdout, ospid=proc.pid, exename=params["exename"],
                exeflags=params["exeflags"],
                enable_threaded_blas=bool(params.get("enable_threaded_blas", False)),
            )
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig) -> "socket.socket | tuple[Any, Any] | Authenticated":
        """A forked worker's master connection is the socket pair made at its fork (no
        connect, no handshake: see `ForkedProcess.take_master_socket`); we still read its
        address line, for the workers that will dial it. Others: over TCP (the default)."""
        proc = config.process
        sock = proc.take_master_socket() if isinstance(proc, forkserver.ForkedProcess) else None
        if sock is None:
            return super().connect(pid, config)
        try:
            read_worker_address(pid, config)
        except BaseException:
            sock.close()
            raise
        return Authenticated(sock)

    def _spawn(self, cmd: list[str], cwd: str, env: dict, cookie: str) -> subprocess.Popen:
        """A worker as a fresh interpreter, the cookie on its stdin."""
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, **OWN_PROCESS_GROUP,
            )
        except OSError as e:
            raise LaunchWorkerError(f"could not start worker process {cmd}: {e}") from e
        with self._lock:
            self._procs.add(proc)
        log.info("started a local worker process: os pid %d", proc.pid)
        try:
            proc.stdin.write(cookie.encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass  # it died at once; the address reader will say so
        return proc

    def kill(self, pid: int, config: WorkerConfig) -> None:
        try:
            super().kill(pid, config)
        except Exception:
            pass
        proc = config.process
        if proc is None:
            return
        if isinstance(proc, forkserver.ForkedProcess):  # (never connected: it exits at once)
            proc.close_master_socket()
        with self._lock:
            self._dying.append(_Dying(pid, proc, time.monotonic() + self.exit_timeout))
            if self._reaper is not None:
                return
            reaper = self._reaper = threading.Thread(target=self._reap_dying, name="pydist-reaper",
                                                     daemon=True)
        try:
            reaper.start()
        except RuntimeError:  # at interpreter exit: `cleanup` reaps
            with self._lock:
                self._reaper = None

    def _reap_dying(self) -> None:
        """The reaper thread, while workers asked to exit are still running: waits for them
        in order and escalates for each that passes its deadline (SIGTERM after
        `exit_timeout`, SIGKILL after `term_timeout` more). One thread for all of them:
        removing 128 workers used to start 128 threads, a quarter of rmprocs' time."""
        while True:
            with self._lock:
                if not self._dying:
                    self._reaper = None
                    return
                first = self._dying[0]
            if first.ended():
                with self._lock:
                    with contextlib.suppress(ValueError):  # (cleared by `cleanup`)
                        self._dying.remove(first)
                    self._procs.discard(first.proc)
                continue
            now = time.monotonic()
            with self._lock:
                due = [d for d in self._dying if d.deadline <= now]
            for d in due:
                if not d.ended():
                    d.escalate(self.exit_timeout, self.term_timeout)
            with self._lock:
                wait = min((d.deadline for d in self._dying), default=now) - now
            wait = min(max(wait, 0.0), _REAP_STEP)
            if first.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    first.proc.wait(wait)
            else:  # it exited, other processes of its group have not yet
                time.sleep(min(wait, _GROUP_POLL))

    def cleanup(self, grace: float = 3.0) -> None:
        """Reap every worker process this manager started; kill those still running after
        `grace` seconds (workers asked to exit get that long to finish cleanly). The
        reaper thread then ends."""
        with self._lock:
            procs = list(self._procs)
            self._procs.clear()
        reap(procs, grace)
        with self._lock:
            self._dying.clear()
            reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(2 * _REAP_STEP)


# The reaper's longest wait on one process before it looks at the others again (s), and
# how often it looks for the rest of a process group that outlived its leader.
_REAP_STEP = 0.5
_GROUP_POLL = 0.05


class _Dying:
    """A worker process asked to exit, and how far its removal has escalated: `stage` 0
    asked, 1 sent SIGTERM, 2 sent SIGKILL; the next step is due at `deadline`."""

    __slots__ = ("pid", "proc", "deadline", "stage")

    def __init__(self, pid: int, proc: Any, deadline: float) -> None:
        self.pid, self.proc, self.deadline, self.stage = pid, proc, deadline, 0

    def ended(self) -> bool:
        """It exited; after SIGTERM, its whole process group too (a wrapper shell may die
        at once and leave its child behind, which then gets SIGKILL)."""
        if self.proc.poll() is None:
            return False
        return self.stage != 1 or _group_gone(self.proc)

    def escalate(self, exit_timeout: float, term_timeout: float) -> None:
        """Its deadline passed: SIGTERM, or SIGKILL after SIGTERM (then it is waited for
        without a deadline: nothing outlives SIGKILL for long)."""
        if self.stage == 0:
            log.warning("Failed to gracefully kill worker %d (os pid %d) within %g s, sending "
                        "SIGTERM", self.pid, self.proc.pid, exit_timeout)
            signal_group(self.proc, signal.SIGTERM)
            self.stage, self.deadline = 1, time.monotonic() + term_timeout
        elif self.stage == 1:
            log.warning("Worker %d ignored SIGTERM, sending SIGKILL", self.pid)
            signal_group(self.proc, signal.SIGKILL)
            self.stage, self.deadline = 2, float("inf")


def _group_gone(proc: Any) -> bool:
    """No process of the group that `proc` led is left."""
    try:
        os.killpg(proc.pid, 0)
    except OSError:  # ProcessLookupError: none left (or no such group to look at)
        return True
    return False
