"""ElasticManager: workers that dial in to the master (Julia's ElasticManager, from
ClusterManagers.jl / ElasticClusterManager.jl), for container platforms and anything else
that starts workers on its own schedule.

The master listens on `addr:port`; a worker started anywhere with
``python -m pydist.worker --join HOST:PORT`` (the cookie on stdin or in `PYDIST_COOKIE`)
joins whenever it comes up. Step by step:

1. The worker connects to the manager's `transport.Listener` and runs the handshake as the
   initiator, so it proves the cookie first: nothing a stranger sends is read beyond the
   fixed-size HELLO and PROOF (the Listener bounds each handshake, delays and logs wrong
   proofs, and drops garbage). A refused worker exits with code 1 and says why; no id is
   spent on it.
2. The worker listens for its peers (`--bind-to`, by default on the local address of the
   connection it dialled: the interface that reaches the master) and sends one line on the
   dialled connection, ``pydist_worker:<port>#<addr>``, where its peers can reach it.
3. The Listener hands the socket to the manager; the manager's thread ("pydist-elastic")
   runs `addprocs(self)`, the normal path of every manager: `launch` hands over the
   pending sockets, `connect` reads the line and returns the socket itself, and `cluster`
   authenticates it once more as for any worker (now the master initiates) and sends JOIN.
   Ids, Worker records, callbacks, the default pool and heartbeats are `cluster`'s.

So the connection the worker dialled becomes its connection to the master: the master
never connects to a dialled-in worker, which may then sit behind NAT or in a pod network
that the master cannot route to (only worker-to-worker links, under the "all_to_all"
topology, need its listening address). Julia differs: there the dialled socket carries the
worker's stdout and the master connects back to the worker's port. A dialled-in worker's
output therefore stays where it runs (its terminal, its container's log).

The worker exits when that connection ends: the master exited or was killed, `rmprocs`
(an EXIT request; after `exit_timeout` seconds the master closes the connection), or
`close()` / `shutdown` before it was admitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping

from .. import transport
from ..calls import remote_do_internal
from ..cluster import TOPOLOGIES, addprocs
from ..exceptions import LaunchWorkerError, ProtocolError
from ..group import PGRP
from . import ADDRESS_LINE, ClusterManager, WorkerConfig, request_exit, worker_timeout

log = logging.getLogger(__name__)

__all__ = ["ElasticManager", "DEFAULT_PORT", "parse_join", "dial_master", "send_address",
           "await_admission"]

DEFAULT_PORT = 9009  # Julia's
_WILDCARDS = ("", "0.0.0.0", "::")
_LINE_MAX = 300  # the longest address line accepted (bytes)
# `addprocs` keywords that make sense for workers someone else starts.
_ADDPROCS_KEYWORDS = {"lazy", "heartbeat_timeout", "timeout", "callback_warning_interval",
                      "enable_threaded_blas"}


class ElasticManager(ClusterManager):
    """Listen on `addr:port` for workers that dial in (``python -m pydist.worker --join
    HOST:PORT``) and add each one to the cluster as it arrives (Julia's ElasticManager).

    `addr` is an address of this host, ``"0.0.0.0"`` (every interface) or ``"auto"`` (the
    first non-loopback one); `port` 0 picks a free port (see `address`). `cookie` sets the
    cluster cookie (`cluster_cookie`) that workers must prove; by default the current one.
    `topology`, and `lazy`, `heartbeat_timeout`, `timeout`, `enable_threaded_blas`,
    `callback_warning_interval` in `addprocs_kw`, are the `addprocs` keywords used for them.
    `manage_callback(manager, pid, op)` is called when a worker joins (``"register"``) and
    leaves (``"deregister"``). `printing_kwargs` are `worker_command`'s keywords for
    ``str(manager)``. A worker asked to exit (`rmprocs`) that is still connected after
    `exit_timeout` seconds is disconnected, which makes it exit.

    The listener and the manager's thread stop at `close()`, `pydist.shutdown()` or exit;
    the workers it added stay members until removed. ``addprocs(manager)`` is not needed
    (it adds whatever has dialled in and not been added yet, usually nothing).
    """

    def __init__(self, addr: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 cookie: str | None = None, *, topology: str = "all_to_all",
                 manage_callback: Callable[["ElasticManager", int, str], Any] | None = None,
                 printing_kwargs: Mapping[str, Any] | None = None, exit_timeout: float = 5.0,
                 **addprocs_kw: Any):
        if not PGRP.is_master():
            raise RuntimeError("Only process 1 can add and remove workers")
        if not isinstance(addr, str):
            raise TypeError(f"ElasticManager: addr must be a str, got {addr!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"ElasticManager: port must be an int from 0 to 65535, got {port!r}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"ElasticManager: topology must be one of {TOPOLOGIES}, "
                             f"got {topology!r}")
        for key in addprocs_kw:
            if key not in _ADDPROCS_KEYWORDS:
                raise TypeError(f"ElasticManager() got an unexpected keyword argument {key!r}")
        if manage_callback is not None and not callable(manage_callback):
            raise TypeError(f"ElasticManager: manage_callback must be callable, "
                            f"got {manage_callback!r}")
        if cookie is not None:
            if not isinstance(cookie, str) or not cookie:
                raise TypeError("ElasticManager: cookie must be a non-empty str")
            if cookie != PGRP.cookie and any(p != 1 for p in PGRP.workers):
                raise ValueError("ElasticManager: cannot change the cluster cookie while "
                                 "workers are connected (they know the old one)")
            PGRP.cookie = cookie
        if addr == "auto":
            addr = transport.default_bind_addr()
        self.topology = topology
        self.manage_callback = manage_callback
        self.printing_kwargs = dict(printing_kwargs or {})
        self.exit_timeout = exit_timeout
        self._addprocs_kw = dict(addprocs_kw)
        self.active: dict[int, WorkerConfig] = {}  # the workers it added that are members
        self.terminated: set[int] = set()  # those that left
        self._cond = threading.Condition()
        self._pending: deque[tuple[int, socket.socket]] = deque()  # (arrival number, socket)
        self._arrivals = 0
        self._busy = False  # the manager's thread is adding workers
        self._closed = False
        self._escalations: set[threading.Thread] = set()  # `kill`s waiting for their worker
        try:
            self._listener = transport.Listener(addr, port, PGRP.cookie_bytes, self._dialled,
                                                worker_timeout())
        except OSError as e:
            raise OSError(e.errno, f"ElasticManager cannot listen on {addr}:{port}: "
                                   f"{e.strerror or e}") from None
        self.address: tuple[str, int] = (addr, self._listener.address[1])
        self._thread = threading.Thread(target=self._run, name="pydist-elastic", daemon=True)
        PGRP.managers.append(self)  # so that shutdown and exit close it (`cleanup`)
        self._listener.start()
        self._thread.start()
        log.info("ElasticManager listening on %s:%d", *self.address)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.address[1]

    @property
    def pending(self) -> int:
        """How many workers have dialled in and wait to be handed to `addprocs`."""
        with self._cond:
            return len(self._pending)

    def __repr__(self) -> str:
        return f"ElasticManager(addr={self.address[0]!r}, port={self.address[1]})"

    def __str__(self) -> str:
        with self._cond:
            active, pending = sorted(self.active), len(self._pending)
            terminated = sorted(self.terminated)
        state = "closed" if self._closed else "listening"
        return (f"ElasticManager ({state} on {_join_spec(*self.address)}):\n"
                f"  Active workers : {active}\n"
                f"  Number of workers to be added : {pending}\n"
                f"  Terminated workers : {terminated}\n"
                f"  Worker connect command (the cookie on its stdin or in PYDIST_COOKIE):\n"
                f"    {self.worker_command(**self.printing_kwargs)}")

    def worker_command(self, *, absolute_exename: bool = True, pythonpath: bool = False,
                       cookie: bool = False, bind_to: str | None = None) -> str:
        """The shell command that starts a worker joining this manager (Julia's
        `get_connect_cmd`): ``/path/to/python -m pydist.worker --join HOST:PORT``.

        `absolute_exename`: this Python's path, else ``python3``; `pythonpath`: prefix
        ``PYTHONPATH=`` the directory pydist is imported from; `cookie`: prefix
        ``PYDIST_COOKIE=<cookie>`` (whoever sees the command then knows the cookie; without
        it, give the cookie on the worker's stdin or in its environment); `bind_to`: the
        worker's ``--bind-to``. A wildcard listening address shows as this host's address.
        """
        host, port = self.address
        if host in _WILDCARDS:
            host = transport.default_bind_addr()
        words = [sys.executable if absolute_exename else "python3", "-m", "pydist.worker",
                 "--join", _join_spec(host, port)]
        if bind_to is not None:
            words += ["--bind-to", bind_to]
        prefix = []
        if cookie:
            prefix.append(f"PYDIST_COOKIE={shlex.quote(PGRP.cookie)}")
        if pythonpath:
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            prefix.append(f"PYTHONPATH={shlex.quote(root)}")
        return " ".join(prefix + [shlex.join(words)])

    def wait_for_workers(self, n: int, timeout: float | None = None) -> list[int]:
        """Block until at least `n` workers added by this manager are members, with their
        started callbacks done, and return their ids; TimeoutError after `timeout` seconds
        (None: no limit), saying how many joined."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self.active) < n or self._busy:
                if self._closed and len(self.active) < n:
                    raise RuntimeError(f"ElasticManager is closed with {len(self.active)} of "
                                       f"{n} workers")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"ElasticManager: {len(self.active)} of {n} workers "
                                       f"joined within {timeout} seconds")
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
            return sorted(self.active)

    # ---------------------------------------------------------------- dial-ins
    def _dialled(self, sock: socket.socket) -> None:
        """The listener authenticated a worker's connection (in its thread: never block)."""
        with self._cond:
            if self._closed:
                sock.close()
                return
            self._arrivals += 1
            self._pending.append((self._arrivals, sock))
            self._cond.notify_all()
        log.debug("ElasticManager: a worker dialled in from %s", _peer(sock))

    def _run(self) -> None:
        """The manager's thread: add the workers that dialled in, a batch per `addprocs`
        (serialised with every other addprocs and rmprocs by the launch lock)."""
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait(1.0)
                if self._closed:
                    return
                self._busy = True
                last = self._arrivals
            try:
                if PGRP.shutdown.is_set():
                    self._drop_pending(last, "the master is shutting down")
                else:
                    addprocs(self)
            except Exception as e:
                log.warning("ElasticManager: could not add dialled-in workers: %s", e)
                # Those not handed to a launch (addprocs failed before it) are refused.
                self._drop_pending(last, f"addprocs failed: {e}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _drop_pending(self, upto: int, why: str) -> None:
        """Close the pending connections that arrived up to number `upto` (their workers
        exit, saying the master closed the connection before admitting them)."""
        with self._cond:
            drop = [s for n, s in self._pending if n <= upto]
            self._pending = deque((n, s) for n, s in self._pending if n > upto)
        for sock in drop:
            log.warning("ElasticManager: refusing the worker that dialled in from %s: %s",
                        _peer(sock), why)
            sock.close()

    # ---------------------------------------------------------------- ClusterManager
    def default_addprocs_params(self) -> dict[str, Any]:
        return dict(super().default_addprocs_params(), topology=self.topology,
                    **self._addprocs_kw)

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Hand over the workers that have dialled in (they are running already)."""
        with self._cond:
            taken = [s for _, s in self._pending]
            self._pending.clear()
        for sock in taken:
            config = WorkerConfig(io=sock, userdata={"dialled_from": _peer(sock)})
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig) -> socket.socket:
        """The connection the worker dialled, once its address line is read."""
        sock = config.io
        if not isinstance(sock, socket.socket):
            raise LaunchWorkerError(f"worker {pid}: not a dialled-in worker (no connection)")
        addr, port = _read_address(pid, sock, worker_timeout())
        if addr in _WILDCARDS:  # it listens everywhere: reach it where it came from
            addr = _peer(sock, default="127.0.0.1")
        config.host = config.bind_addr = addr
        config.port = port
        config.connect_at = (addr, port)
        return sock

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "register":
            with self._cond:
                self.active[pid] = config
                self._cond.notify_all()
        elif op == "deregister":
            with self._cond:
                self.active.pop(pid, None)
                self.terminated.add(pid)
                self._cond.notify_all()
        elif op == "interrupt":
            # Its process runs elsewhere: it signals itself, as a local worker is signalled.
            try:
                remote_do_internal(pid, os.kill, (config.ospid, int(signal.SIGINT)))
            except Exception as e:
                log.error("Worker %d cannot be presently interrupted: %s", pid, e)
        if op in ("register", "deregister") and self.manage_callback is not None:
            try:
                self.manage_callback(self, pid, op)
            except Exception:
                log.exception("ElasticManager: manage_callback failed for worker %d (%s)",
                              pid, op)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask worker `pid` to exit; if it is still connected after `exit_timeout` seconds,
        close its connection (it exits when it loses the master)."""
        w = PGRP.workers.get(pid)
        if w is None or w.conn is None or w.conn.closed:  # not (or no longer) connected
            if isinstance(config.io, socket.socket):
                config.io.close()  # a worker not admitted yet exits on end of file
            return
        request_exit(pid)
        thread = threading.Thread(target=self._escalate, args=(pid, w.conn), daemon=True,
                                  name="pydist-elastic-kill")
        with self._cond:
            self._escalations.add(thread)
        try:
            thread.start()
        except RuntimeError:  # at interpreter exit, exit closes it
            with self._cond:
                self._escalations.discard(thread)

    def _escalate(self, pid: int, conn: Any) -> None:
        try:
            deadline = time.monotonic() + self.exit_timeout
            with PGRP.lock:
                while pid not in PGRP.gone:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    PGRP.changed.wait(min(remaining, 0.5))
                else:
                    return
            log.warning("Worker %d did not exit within %g s: closing its connection", pid,
                        self.exit_timeout)
            conn.close()
        finally:
            with self._cond:
                self._escalations.discard(threading.current_thread())

    def cleanup(self) -> None:
        """At `shutdown` and exit: `close()`."""
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening and adding workers (those that dialled in and were not added yet
        are refused); the workers already added stay. Idempotent; each call also waits (within
        `timeout`) for the threads of `kill` still waiting for their worker to exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            escalations = list(self._escalations)
        for thread in escalations:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [s for _, s in self._pending]
            self._pending.clear()
            self._cond.notify_all()
        self._listener.close(timeout)
        for sock in pending:
            sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("ElasticManager: its thread is still adding workers after %g s",
                            timeout)
        log.info("ElasticManager on %s:%d closed", *self.address)

    def __enter__(self) -> "ElasticManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ==================================================================== the wire, both sides
def _join_spec(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(sock: socket.socket, default: str = "a local process") -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return default
    return peer[0] if isinstance(peer, tuple) else default


def _read_address(pid: int, sock: socket.socket, timeout: float) -> tuple[str, int]:
    """The worker's ``pydist_worker:<port>#<addr>`` line, read within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(data) > _LINE_MAX:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(_LINE_MAX + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise LaunchWorkerError(f"worker {pid} (dialled in from {_peer(sock)}): reading its "
                                f"address failed: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
    m = ADDRESS_LINE.match(data.rstrip(b"\n"))
    if not data.endswith(b"\n") or m is None:
        raise LaunchWorkerError(f"worker {pid} (dialled in from {_peer(sock)}) sent no "
                                f"address line within {timeout} seconds: got {data[:80]!r}")
    return m.group(2).decode(errors="replace"), int(m.group(1))


def parse_join(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (the argument of ``--join``) -> (host, port);
    ValueError naming what is wrong."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = spec.rpartition(":")
    if not host or not port:
        raise ValueError(f"--join expects HOST:PORT (the ElasticManager's address), got {spec!r}")
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"invalid port in --join {spec!r}") from None
    if not 0 < port_n <= 65535:
        raise ValueError(f"invalid port number in --join {spec!r}")
    return host, port_n


def dial_master(host: str, port: int, cookie: bytes, timeout: float) -> socket.socket:
    """On a worker: connect to the ElasticManager at `host:port` and prove the cookie. While
    the master is not reachable yet it tries again (every 0.2 s to 2 s) until `timeout`
    seconds have passed, then raises OSError; AuthenticationError if it refuses us."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        remaining = deadline - time.monotonic()
        try:
            sock = transport.open_connection(host, port, cookie, max(min(remaining, 10.0), 0.1))
            break
        except OSError as e:
            if time.monotonic() + delay >= deadline:
                raise OSError(f"could not reach it within {timeout:g} seconds: {e}") from e
            log.debug("the master at %s:%d is not reachable yet (%s): trying again", host,
                      port, e)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
    try:
        transport.tune_socket(sock)
        transport.handshake_initiator(sock, cookie, max(deadline - time.monotonic(), 5.0))
    except BaseException:
        sock.close()
        raise
    return sock


def local_address(sock: socket.socket, host: str) -> str:
    """The address this host reached the master from: where a dialled-in worker listens by
    default (`host` itself when the connection is a local Unix socket)."""
    name = sock.getsockname()
    return name[0] if isinstance(name, tuple) else host


def send_address(sock: socket.socket, addr: str, port: int) -> None:
    """On a worker: tell the master where peers reach us (one line)."""
    sock.sendall(f"pydist_worker:{port}#{addr}\n".encode())


def await_admission(sock: socket.socket, cookie: bytes, timeout: float) -> None:
    """On a worker: wait (up to `timeout` seconds) until the master admits us: it then
    authenticates this connection as for any worker, and sends JOIN on it. ProtocolError
    when it closes the connection or does not come in time."""
    try:
        transport.handshake_acceptor(sock, cookie, timeout)
    except ProtocolError as e:
        if "closed by peer" in str(e):
            raise ProtocolError("the master closed the connection before admitting this "
                                "worker (see the master's log)") from None
        raise
