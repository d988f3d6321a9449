"""The process group: who is in the cluster, the connections to them, and the request/reply
plumbing every higher layer uses.

There is one `ProcessGroup` per process (`PGRP`). On the master (pid 1) it launches workers
through a `ClusterManager`, connects to them and tells them who they are; on a worker it is
filled by the master's JOIN message. Worker-to-worker connections are made on first use
(`lazy=True`) or at join time, the higher pid dialling the lower one, as in Julia.

Higher layers register message handlers (`register_handler`) and listen for workers leaving
(`on_worker_removed`), so this module never imports them.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable

from . import callbacks, protocol, serialization, transport
from .exceptions import (
    AuthenticationError,
    CapturedException,
    ExceptionGroup,
    LaunchWorkerError,
    ProcessExitedException,
    ProtocolError,
    RemoteException,
)
from .managers import (
    ClusterManager,
    LocalManager,
    WorkerConfig,
    launch_timeout,
    worker_timeout,
)

log = logging.getLogger("pydist")

__all__ = [
    "WorkerState",
    "myid",
    "myrole",
    "nprocs",
    "nworkers",
    "procs",
    "workers",
    "other_workers",
    "other_procs",
    "addprocs",
    "rmprocs",
    "interrupt",
    "cluster_cookie",
    "worker_id_from_socket",
    "init_worker",
    "process_messages",
]

TOPOLOGIES = ("all_to_all", "master_worker", "custom")


class WorkerState(enum.Enum):
    """The life of a worker, as DistributedNext names it."""

    created = "created"
    connected = "connected"
    terminating = "terminating"
    terminated = "terminated"  # removed by rmprocs
    exterminated = "exterminated"  # died on its own


class Worker:
    """What this process knows about another process of the cluster."""

    def __init__(self, pid: int, manager: ClusterManager | None = None,
                 config: WorkerConfig | None = None, connect_at: tuple | None = None):
        self.pid = pid
        self.state = WorkerState.created
        self.conn: transport.Connection | None = None
        self.manager = manager
        self.config = config
        self.connect_at = connect_at
        self.connected = threading.Event()
        self.connect_lock = threading.Lock()
        self.ospid: int | None = None
        self.cpu_threads: int | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.pid} {self.state.name}>"


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
        if self.callback is not None:
            try:
                self.callback(self)
            except Exception:
                log.exception("pydist: error in a reply callback")

    def wait(self, timeout: float | None = None) -> bool:
        if self.done:
            return True
        if self._latch.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._latch.release()
            return True
        return False


class ProcessGroup:
    """All cluster state of this process; one instance, `PGRP`."""

    def __init__(self) -> None:
        self.id = 1
        self.role = "master"
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on every membership change
        self.workers: dict[int, Worker] = {}
        self.deleted: set[int] = set()  # removed pids (never reused)
        self.gone: set[int] = set()  # removed pids whose removal has been fully handled
        self.topology = "all_to_all"
        self.lazy: bool | None = None
        self.cookie = secrets.token_hex(16)
        self.next_pid = 2
        self.launch_lock = threading.Lock()  # one addprocs/rmprocs at a time
        self.slots: dict[int, _Slot] = {}
        self.slot_ids = itertools.count(1)
        self.handlers: dict[int, Callable] = {}
        self.removed_listeners: list[Callable[[int, WorkerState], None]] = []
        self.added_listeners: list[Callable[[int], None]] = []
        self.listener: transport.Listener | None = None
        self.shutdown = threading.Event()
        self.exit_code = 0
        self.master_connected = threading.Event()
        self.manager: ClusterManager | None = None  # a worker's own manager (init_worker)
        self.managers: list[ClusterManager] = []  # every manager used, cleaned up at exit

    # ---------------------------------------------------------------- identity / membership
    def is_master(self) -> bool:
        return self.id == 1

    def cookie_bytes(self) -> bytes:
        return self.cookie.encode()

    def member_pids(self) -> list[int]:
        with self.lock:
            if self.is_master():
                live = [p for p, w in self.workers.items() if w.state is WorkerState.connected]
            else:
                live = [p for p, w in self.workers.items()
                        if w.state in (WorkerState.created, WorkerState.connected)]
            pids = set(live)
            pids.add(self.id)
            pids.add(1)
            return sorted(pids)

    # ---------------------------------------------------------------- connections
    def connection(self, pid: int) -> transport.Connection:
        """The connection to `pid`, made now if it is a lazy worker-to-worker link."""
        w = self.workers.get(pid)
        if w is not None and w.conn is not None and not w.conn.closed:
            return w.conn
        with self.lock:
            if pid in self.deleted:
                raise ProcessExitedException(pid)
            w = self.workers.get(pid)
            if w is None:
                if self.is_master() or pid == 1:
                    raise ValueError(f"no process with id {pid} exists")
                w = self.workers[pid] = Worker(pid)
        if w.conn is not None:
            if w.conn.closed:
                raise ProcessExitedException(pid)
            return w.conn
        if self.is_master():
            if not w.connected.wait(worker_timeout()):
                raise ProcessExitedException(pid)
            return self.connection(pid)
        return self._connect_peer_lazily(w)

    def _connect_peer_lazily(self, w: Worker) -> transport.Connection:
        if self.topology != "all_to_all":
            raise RuntimeError(
                f"peer {w.pid} is not connected to {self.id}. Topology : {self.topology}"
            )
        if self.id > w.pid:
            self.dial_peer(w.pid)
        else:
            # The higher pid dials: ask the master to have `w` connect to us.
            from .calls import call_fetch

            call_fetch(1, _ask_peer_to_connect, (w.pid, self.id))
        if not w.connected.wait(worker_timeout()):
            raise RuntimeError(f"peer {w.pid} didn't connect to {self.id} within {worker_timeout()} seconds")
        if w.conn is None or w.conn.closed:
            raise ProcessExitedException(w.pid)
        return w.conn

    def dial_peer(self, pid: int) -> None:
        """Connect to worker `pid` (lower than ours) and identify ourselves."""
        with self.lock:
            w = self.workers.get(pid)
            if w is None:
                if pid in self.deleted:
                    raise ProcessExitedException(pid)
                w = self.workers[pid] = Worker(pid)
        with w.connect_lock:
            if w.conn is not None and not w.conn.closed:
                return
            if w.connect_at is None:
                raise RuntimeError(f"process {self.id} does not know the address of peer {pid}")
            try:
                sock = self._open_peer(pid, w.connect_at)
            except (OSError, ProtocolError, LaunchWorkerError) as e:
                raise RuntimeError(f"Error on {self.id} while connecting to peer {pid}: {e}") from e
            conn = transport.Connection(sock, HANDLER, f"worker {pid}")
            conn.peer_pid = pid
            conn.serve_blocking = True  # a worker serves calls on every connection
            conn.send(protocol.encode_frame(protocol.IDENTIFY, a=self.id))
            self._attach(w, conn)
            conn.start()

    def _open_peer(self, pid: int, connect_at: Any):
        """An authenticated connection to peer `pid`: through this worker's own manager if
        `init_worker` was given one (custom transports), else TCP to `connect_at`."""
        if self.manager is None:
            host, port = connect_at
            return transport.connect(host, port, self.cookie_bytes(), worker_timeout())
        sock = transport.as_socket(self.manager.connect(pid, WorkerConfig(connect_at=connect_at)))
        try:
            transport.tune_socket(sock)
            transport.handshake_initiator(sock, self.cookie_bytes(), worker_timeout())
        except BaseException:
            sock.close()
            raise
        return sock

    def _attach(self, w: Worker, conn: transport.Connection) -> None:
        with self.lock:
            w.conn = conn
            w.state = WorkerState.connected
            self.changed.notify_all()
        w.connected.set()

    # ---------------------------------------------------------------- replies
    def new_slot(self, pid: int, callback=None) -> tuple[int, _Slot]:
        sid = next(self.slot_ids)
        slot = _Slot(pid, callback)
        self.slots[sid] = slot
        if pid in self.deleted:  # lost the race with the worker's death
            self.fail_slot(sid, ProcessExitedException(pid))
        return sid, slot

    def fail_slot(self, sid: int, exc: BaseException) -> None:
        slot = self.slots.pop(sid, None)
        if slot is not None:
            slot.set(False, exc)

    # ---------------------------------------------------------------- losing a worker
    def deregister(self, pid: int) -> None:
        """Forget `pid`: fail everything waiting on it and tell the listeners. Idempotent."""
        with self.lock:
            if pid in self.deleted or pid == self.id:
                return
            w = self.workers.pop(pid, None) or Worker(pid)  # we may never have heard of it
            self.deleted.add(pid)
            was_terminating = w.state is WorkerState.terminating
            w.state = WorkerState.terminated if was_terminating else WorkerState.exterminated
            self.changed.notify_all()
        w.connected.set()
        if w.conn is not None:
            w.conn.close()
        if self.is_master() and not was_terminating and not self.shutdown.is_set():
            print(f"Worker {pid} terminated.", file=sys.stderr, flush=True)
        lost = ProcessExitedException(pid)
        for sid, slot in list(self.slots.items()):
            if slot.pid == pid:
                self.fail_slot(sid, lost)
        if self.is_master():
            if w.manager is not None:
                try:
                    w.manager.manage(pid, w.config, "deregister")
                except Exception:
                    log.exception("pydist: manage(deregister) failed for worker %d", pid)
            from .calls import remote_do_internal

            for other in list(self.workers):
                try:
                    remote_do_internal(other, _forget_worker, (pid,))
                except Exception:
                    pass
        for listener in list(self.removed_listeners):
            try:
                listener(pid, w.state)
            except Exception:
                log.exception("pydist: error in a worker-removed listener")
        if self.is_master():
            callbacks.run_exited(pid, w.state)
            if w.manager is not None:  # Julia calls this from the Worker's finalizer
                try:
                    w.manager.manage(pid, w.config, "finalize")
                except Exception:
                    log.exception("pydist: manage(finalize) failed for worker %d", pid)
        with self.lock:
            self.gone.add(pid)
            self.changed.notify_all()


PGRP = ProcessGroup()


# ==================================================================== message dispatch
class _Handler:
    """Dispatches each incoming frame to the handler registered for its kind."""

    def on_message(self, conn: transport.Connection, msg: protocol.Message):
        handler = PGRP.handlers.get(msg.kind)
        if handler is None:
            log.warning("pydist: no handler for %s message", protocol.KIND_NAMES.get(msg.kind))
            return None
        return handler(conn, msg)

    def on_close(self, conn: transport.Connection, exc: BaseException | None) -> None:
        pid = conn.peer_pid
        if pid is None:
            return
        if pid == 1 and not PGRP.is_master():
            # Our master is gone: a worker never outlives it.
            PGRP.exit_code = 0 if PGRP.shutdown.is_set() else 1
            PGRP.shutdown.set()
            return
        w = PGRP.workers.get(pid)
        if w is not None and w.conn is conn:
            PGRP.deregister(pid)


HANDLER = _Handler()


def register_handler(kind: int, fn: Callable) -> None:
    """Handle frames of `kind` with `fn(conn, msg)`, run in the reading thread; it returns a
    callable to run concurrently (in the thread that gives up the reading role), or None."""
    PGRP.handlers[kind] = fn


def _on_result(conn: transport.Connection, msg: protocol.Message):
    slot = PGRP.slots.pop(msg.a, None)
    if slot is None:
        return None  # the waiter gave up (timeout); drop the late reply
    try:
        value = serialization.loads(msg.body, msg.buffers)
    except BaseException as e:
        exc = RemoteException(PGRP.id, CapturedException(e))
        slot.set(False, exc)
        return None
    slot.set(not (msg.flags & protocol.FLAG_ERROR), value)
    return None


def _on_identify(conn: transport.Connection, msg: protocol.Message):
    pid = msg.a
    conn.peer_pid = pid
    conn.name = f"worker {pid}"
    with PGRP.lock:
        if pid in PGRP.deleted:
            conn.close()
            return None
        w = PGRP.workers.get(pid)
        if w is None:
            w = PGRP.workers[pid] = Worker(pid)
    if w.conn is None or w.conn.closed:
        PGRP._attach(w, conn)
    return None


def _on_exit(conn: transport.Connection, msg: protocol.Message):
    if conn.peer_pid == 1:
        PGRP.exit_code = 0
        PGRP.shutdown.set()
    return None


register_handler(protocol.RESULT, _on_result)
register_handler(protocol.IDENTIFY, _on_identify)
register_handler(protocol.EXIT, _on_exit)


# ==================================================================== worker side: joining
def _on_join(conn: transport.Connection, msg: protocol.Message):
    params = serialization.loads(msg.body, msg.buffers)
    sid = msg.a

    def join() -> None:
        try:
            reply = _join(conn, params)
            ok = True
        except BaseException as e:
            reply, ok = RemoteException(PGRP.id, CapturedException(e)), False
        body = serialization.dumps_inline(reply)
        conn.send(protocol.encode_frame(protocol.RESULT, body, a=sid,
                                        flags=0 if ok else protocol.FLAG_ERROR))

    return join


def _join(conn: transport.Connection, params: dict) -> dict:
    pg = PGRP
    if pg.master_connected.is_set():
        raise RuntimeError("this worker has already joined a cluster")
    pg.id = params["self_pid"]
    pg.role = "worker"
    pg.topology = params["topology"]
    pg.lazy = params["lazy"]
    conn.peer_pid = 1
    conn.name = "master"
    for path in reversed(params.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    if not params.get("enable_threaded_blas", False):
        _limit_blas_threads()
    master = Worker(1)
    pg._attach(master, conn)
    with pg.lock:
        pg.workers[1] = master
        for pid, addr in params["other_workers"]:
            if pid not in pg.workers:
                pg.workers[pid] = Worker(pid, connect_at=tuple(addr) if addr else None)
                pg.workers[pid].state = WorkerState.created
    pg.master_connected.set()
    if not pg.lazy:
        errors: list[BaseException] = []

        def dial(pid: int) -> None:
            try:
                pg.dial_peer(pid)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=dial, args=(pid,)) for pid, _ in params["other_workers"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return {"ospid": os.getpid(), "cpu_threads": os.cpu_count(), "version": protocol.PROTOCOL_VERSION}


def _limit_blas_threads() -> None:
    """Pin BLAS pools to one thread for libraries loaded from now on (LocalManager already
    sets these variables at launch; other managers may not)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


register_handler(protocol.JOIN, _on_join)


def _forget_worker(pid: int) -> None:
    """Run on workers when the master has lost `pid`."""
    PGRP.deregister(pid)


def _set_valid_processes(pids: list[int]) -> None:
    """Run on workers after addprocs: learn every member (connections stay lazy)."""
    with PGRP.lock:
        for pid in pids:
            if pid != PGRP.id and pid not in PGRP.workers and pid not in PGRP.deleted:
                PGRP.workers[pid] = Worker(pid)


def _ask_peer_to_connect(target: int, requester: int) -> None:
    """Run on the master: have worker `target` (> requester) dial worker `requester`."""
    from .calls import call_fetch

    call_fetch(target, _dial_peer, (requester,))


def _dial_peer(pid: int) -> None:
    PGRP.dial_peer(pid)


def _accept_connection(sock: socket.socket) -> None:
    """A worker's listener authenticated a new connection: serve it (JOIN or IDENTIFY first)."""
    conn = transport.Connection(sock, HANDLER, "incoming")
    conn.serve_blocking = True  # a worker serves calls on every connection
    conn.start()


def init_worker(cookie: str, manager: ClusterManager | None = None) -> None:
    """Make this process a worker that authenticates peers with `cookie`. With a `manager`,
    connections to other workers are made through `manager.connect` (custom transports)."""
    PGRP.id = 0
    PGRP.role = "worker"
    PGRP.cookie = cookie
    PGRP.manager = manager


def process_messages(reader: Any, writer: Any = None, incoming: bool = True) -> transport.Connection:
    """Serve the pydist protocol over a custom transport and return the connection at once.

    `reader`/`writer` are binary streams (pass unbuffered ones, e.g. `bufsize=0` pipes), or
    `reader` is a socket and `writer` None. `incoming=True` means the peer opened the
    connection (the master, to a worker): we authenticate as the accepting side. A worker
    serves until `pydist.worker.wait_for_shutdown()` returns.
    """
    sock = transport.as_socket(reader if writer is None else (reader, writer))
    timeout = worker_timeout()
    try:
        if incoming:
            transport.handshake_acceptor(sock, PGRP.cookie_bytes(), timeout)
        else:
            transport.handshake_initiator(sock, PGRP.cookie_bytes(), timeout)
    except BaseException:
        sock.close()
        raise
    conn = transport.Connection(sock, HANDLER, "custom")
    conn.start()
    return conn


# ==================================================================== public membership API
def myid() -> int:
    """The id of this process: 1 on the master, 2, 3, ... on workers."""
    return PGRP.id


def myrole() -> str:
    """'master' on process 1, 'worker' elsewhere."""
    return "master" if PGRP.id == 1 else "worker"


def procs(pid: int | None = None) -> list[int]:
    """All process ids (1 first); with `pid`, those on the same host as `pid`."""
    if pid is None:
        return PGRP.member_pids()
    if not PGRP.is_master():
        from .calls import call_fetch

        return call_fetch(1, procs, (pid,))
    all_pids = PGRP.member_pids()
    if pid not in all_pids:
        raise ValueError(f"no process with id {pid} exists")
    host = _host_of(pid)
    return [p for p in all_pids if _host_of(p) == host]


def _host_of(pid: int) -> str:
    if pid == 1:
        return "local"
    w = PGRP.workers.get(pid)
    if w is None or isinstance(w.manager, LocalManager) or w.connect_at is None:
        return "local"
    return str(w.connect_at[0])


def nprocs() -> int:
    """Number of processes, master included."""
    return len(PGRP.member_pids())


def workers() -> list[int]:
    """Worker ids; `[1]` when there are none (the master then acts as the worker)."""
    pids = procs()
    return pids if len(pids) == 1 else [p for p in pids if p != 1]


def nworkers() -> int:
    """Number of workers; 1 when there are none."""
    n = nprocs()
    return 1 if n == 1 else n - 1


def other_workers() -> list[int]:
    """`workers()` without this process."""
    return [p for p in workers() if p != PGRP.id]


def other_procs(pid: int | None = None) -> list[int]:
    """`procs(pid)` without this process."""
    return [p for p in procs(pid) if p != PGRP.id]


def cluster_cookie(cookie: str | None = None) -> str:
    """The cluster cookie; with an argument, set it (before adding workers)."""
    if cookie is not None:
        if not isinstance(cookie, str):
            raise TypeError(f"cluster cookie must be a str, got {type(cookie).__name__}")
        PGRP.cookie = cookie
    return PGRP.cookie


def worker_id_from_socket(sock: Any) -> int:
    """The pid of the process connected through `sock`, or -1 if unknown."""
    for w in list(PGRP.workers.values()):
        if w.conn is not None and (w.conn.sock is sock or w.conn is sock):
            return w.pid
    return -1


# ==================================================================== addprocs
_COMMON_KEYWORDS = {
    "exename", "exeflags", "dir", "env", "topology", "lazy", "enable_threaded_blas", "timeout",
    "callback_warning_interval",
}
_LOCAL_KEYWORDS = _COMMON_KEYWORDS | {"restrict"}
_SSH_KEYWORDS = _COMMON_KEYWORDS | {
    "tunnel", "multiplex", "sshflags", "max_parallel", "shell", "ssh", "cmdline_cookie",
}


def _check_master(what: str = "add and remove workers") -> None:
    if not PGRP.is_master():
        raise RuntimeError(f"Only process 1 can {what}")


def _check_keywords(kw: dict, valid: set[str]) -> None:
    for key in kw:
        if key not in valid:
            raise TypeError(f"addprocs() got an unexpected keyword argument {key!r}")


def addprocs(target: int | list | ClusterManager | None = None, **kw: Any) -> list[int]:
    """Start workers and return their ids (sorted).

    `addprocs(n)` starts `n` local workers (default: `os.cpu_count()`); `addprocs(machines)`
    starts workers over SSH; `addprocs(manager)` uses any ClusterManager. See API.md for the
    keywords.
    """
    _check_master()
    if target is None or (isinstance(target, int) and not isinstance(target, bool)):
        _check_keywords(kw, _LOCAL_KEYWORDS)
        n = (os.cpu_count() or 1) if target is None else target
        if n < 0:
            raise ValueError(f"addprocs: number of workers must be >= 0, got {n}")
        manager: ClusterManager = LocalManager(n, restrict=kw.pop("restrict", True))
    elif isinstance(target, ClusterManager):
        manager = target
    elif isinstance(target, (list, tuple, str)):
        _check_keywords(kw, _SSH_KEYWORDS)
        from .sshmanager import SSHManager

        manager = SSHManager(target)
    else:
        raise TypeError(f"addprocs: expected a count, a list of machines or a ClusterManager, got {target!r}")
    params = dict(manager.default_addprocs_params())
    params.update(kw)
    _normalize_params(params)
    warn_every = float(params.get("callback_warning_interval") or 10.0)
    callbacks.run_starting(manager, params, warn_every)
    with PGRP.launch_lock:
        if manager not in PGRP.managers:
            PGRP.managers.append(manager)
        new_pids, errors = _addprocs_locked(manager, params)
    callbacks.run_started(new_pids, warn_every)
    if errors:
        error = errors[0] if len(errors) == 1 else ExceptionGroup(
            f"addprocs: {len(errors)} workers failed to start", errors)
        error.added_pids = new_pids  # the workers that did start stay in the cluster
        raise error
    return new_pids


def _normalize_params(params: dict) -> None:
    topology = str(params.get("topology", "all_to_all"))
    if topology not in TOPOLOGIES:
        raise ValueError(f"addprocs: topology must be one of {TOPOLOGIES}, got {topology!r}")
    params["topology"] = topology
    lazy = bool(params.get("lazy", True))
    if topology != "all_to_all":
        lazy = False
    params["lazy"] = lazy
    flags = params.get("exeflags") or []
    if isinstance(flags, str):
        import shlex

        flags = shlex.split(flags)
    elif not all(isinstance(f, str) for f in flags):
        raise TypeError("addprocs: exeflags must be a str or a list of str")
    params["exeflags"] = list(flags)
    env = params.get("env") or {}
    if not isinstance(env, dict):
        env = dict(env)
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"addprocs: env must map str to str, got {k!r}: {v!r}")
    params["env"] = env
    timeout = params.get("timeout")
    params["timeout"] = worker_timeout() if timeout is None else float(timeout)
    if params.get("dir") is None:
        params["dir"] = os.getcwd()
    if params.get("exename") is None:
        params["exename"] = sys.executable


def _addprocs_locked(manager: ClusterManager, params: dict) -> list[int]:
    pg = PGRP
    with pg.lock:
        existing = [w for w in pg.workers.values() if w.state is WorkerState.connected]
        if existing and pg.topology != params["topology"]:
            raise RuntimeError(
                f"Workers with Topology {pg.topology} already exist. "
                f"Requested Topology {params['topology']} cannot be set."
            )
        if existing and pg.lazy is not None and pg.lazy != params["lazy"]:
            raise ValueError(f"Active workers with lazy={pg.lazy}. Cannot set lazy={params['lazy']}")
        pg.topology = params["topology"]
        pg.lazy = params["lazy"]

    launched: list[WorkerConfig] = []
    notify = threading.Condition()
    launch_error: list[BaseException] = []

    def run_launch() -> None:
        try:
            manager.launch(params, launched, notify)
        except BaseException as e:
            launch_error.append(e)
        finally:
            with notify:
                notify.notify_all()

    launcher = threading.Thread(target=run_launch, name="pydist-launch", daemon=True)
    launcher.start()
    new_pids: list[int] = []
    errors: list[BaseException] = []
    setups: list[threading.Thread] = []

    def add(config: WorkerConfig) -> int | None:
        try:
            pid = _create_worker(manager, config, params)
        except BaseException as e:
            errors.append(e)
            return None
        new_pids.append(pid)
        return pid

    def setup(config: WorkerConfig) -> None:
        pid = add(config)
        if pid is None:
            return
        count = config.count
        if count == "auto":
            count = PGRP.workers[pid].cpu_threads or 1
        if isinstance(count, int) and count > 1:
            try:
                more = _launch_additional(manager, pid, config, count - 1)
            except BaseException as e:
                errors.append(e)
                return
            subs = [threading.Thread(target=setup_additional, args=(pid, c), daemon=True,
                                     name="pydist-setup") for c in more]
            for t in subs:
                t.start()
            for t in subs:
                t.join()

    def setup_additional(first: int, config: WorkerConfig) -> None:
        pid = add(config)
        if pid is None:
            return
        from .calls import remote_do_internal
        from .worker import name_additional

        with contextlib.suppress(ProcessExitedException):
            remote_do_internal(first, name_additional, (config.ospid, pid))

    while True:
        with notify:
            while not launched and launcher.is_alive():
                notify.wait(0.1)
            batch = list(launched)
            launched.clear()
        for config in batch:
            t = threading.Thread(target=setup, args=(config,), name="pydist-setup", daemon=True)
            t.start()
            setups.append(t)
        if not batch and not launcher.is_alive():
            with notify:
                if not launched:
                    break
    for t in setups:
        t.join()
    if launch_error and not new_pids:
        raise launch_error[0]
    errors[:0] = launch_error
    all_workers = workers()
    from .calls import remote_do_internal

    for pid in [p for p in all_workers if p != 1]:  # everyone learns the new membership
        try:
            remote_do_internal(pid, _set_valid_processes, (all_workers,))
        except ProcessExitedException:
            pass
    for pid in sorted(new_pids):
        for listener in list(pg.added_listeners):
            try:
                listener(pid)
            except Exception:
                log.exception("pydist: error in a worker-added listener")
    return sorted(new_pids), errors


def _launch_additional(manager: ClusterManager, first: int, config: WorkerConfig,
                       n: int) -> list[WorkerConfig]:
    """Have worker `first` start `n` more workers on its host (Julia's launch_additional);
    one config each, with the first one's connection settings."""
    from .calls import call_fetch
    from .worker import launch_additional

    addresses = call_fetch(first, launch_additional,
                           (n, config.exename or "python3", list(config.exeflags or []),
                            config.bind_addr or "127.0.0.1"))
    return [
        WorkerConfig(host=config.host, port=port, bind_addr=addr, ospid=ospid,
                     tunnel=config.tunnel, multiplex=config.multiplex, sshflags=config.sshflags,
                     exename=config.exename, exeflags=config.exeflags, userdata=config.userdata,
                     enable_threaded_blas=config.enable_threaded_blas,
                     max_parallel=config.max_parallel)
        for addr, port, ospid in addresses
    ]


def _create_worker(manager: ClusterManager, config: WorkerConfig, params: dict) -> int:
    pg = PGRP
    with pg.lock:
        pid = pg.next_pid
        pg.next_pid += 1
        w = Worker(pid, manager, config)
        pg.workers[pid] = w
    timeout = params["timeout"]
    try:
        with launch_timeout(timeout):
            sock = transport.as_socket(manager.connect(pid, config))
        try:
            transport.tune_socket(sock)
            transport.handshake_initiator(sock, pg.cookie_bytes(), timeout)
        except AuthenticationError as e:
            sock.close()
            raise LaunchWorkerError(f"worker {pid} refused the master: {e}") from e
        except (OSError, ProtocolError) as e:
            sock.close()
            raise LaunchWorkerError(f"could not connect to worker {pid}: {e}") from e
        conn = transport.Connection(sock, HANDLER, f"worker {pid}")
        conn.peer_pid = pid
        w.connect_at = config.connect_at
        w.conn = conn
        conn.start()
        other = _join_list(w, config, timeout)
        join_params = {
            "self_pid": pid,
            "other_workers": other,
            "topology": pg.topology,
            "lazy": pg.lazy,
            "enable_threaded_blas": bool(params.get("enable_threaded_blas", False)),
            "sys_path": [p for p in sys.path if p],
        }
        sid, slot = pg.new_slot(pid)
        conn.send(protocol.encode_frame(protocol.JOIN, serialization.dumps_inline(join_params), a=sid))
        if not slot.wait(timeout):
            pg.slots.pop(sid, None)
            raise LaunchWorkerError(f"worker {pid} did not join within {timeout} seconds")
        if not slot.ok:
            raise LaunchWorkerError(f"worker {pid} failed to join: {slot.value}")
        facts = slot.value
        w.ospid = config.ospid = facts["ospid"]
        w.cpu_threads = facts["cpu_threads"]
        config.environ = dict(config.environ or {}, cpu_threads=facts["cpu_threads"])
        pg._attach(w, conn)
        manager.manage(pid, config, "register")
        return pid
    except BaseException as e:
        with pg.lock:
            pg.workers.pop(pid, None)
            pg.deleted.add(pid)
            pg.changed.notify_all()
        w.connected.set()
        if w.conn is not None:
            w.conn.close()
        try:
            manager.kill(pid, config)
        except Exception:
            pass
        if isinstance(e, (LaunchWorkerError, ProcessExitedException)):
            if isinstance(e, ProcessExitedException):
                raise LaunchWorkerError(f"worker {pid} exited while joining") from e
            raise
        raise LaunchWorkerError(f"could not set up worker {pid}: {e!r}") from e


def _join_list(w: Worker, config: WorkerConfig, timeout: float) -> list:
    """The earlier workers a new worker should know (and, unless lazy, dial)."""
    pg = PGRP
    if pg.topology == "master_worker":
        return []
    deadline = time.monotonic() + timeout
    with pg.lock:
        # Lower pids of the same addprocs may still be joining: wait for them (as Julia does),
        # so that the new worker learns every earlier worker's address.
        while any(o.pid < w.pid and o.state is WorkerState.created for o in pg.workers.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchWorkerError(f"peer workers did not connect within {timeout} seconds")
            pg.changed.wait(min(remaining, 0.5))
        others = [o for o in pg.workers.values()
                  if o.pid < w.pid and o.state is WorkerState.connected and o.connect_at]
    if pg.topology == "custom":
        idents = set(config.connect_idents or [])
        others = [o for o in others if o.config is not None and o.config.ident in idents]
    return [(o.pid, list(o.connect_at)) for o in others]


# ==================================================================== rmprocs / interrupt
class RmprocsHandle:
    """Returned by `rmprocs(..., waitfor=0)`: `.wait()` blocks until the workers are gone."""

    def __init__(self, thread: threading.Thread, errors: list):
        self._thread = thread
        self._errors = errors

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._errors:
            raise self._errors[0]

    def done(self) -> bool:
        return not self._thread.is_alive()


def _flatten_pids(pids: Iterable) -> list[int]:
    out: list[int] = []
    for p in pids:
        if isinstance(p, int) and not isinstance(p, bool):
            out.append(p)
        elif isinstance(p, Iterable) and not isinstance(p, (str, bytes)):
            out.extend(_flatten_pids(p))
        else:
            raise TypeError(f"rmprocs: expected worker ids, got {p!r}")
    return out


def rmprocs(*pids: Any, waitfor: float | None = None, callback_timeout: float = 10.0):
    """Remove workers: run the worker-exiting callbacks (at most `callback_timeout` seconds),
    ask each worker to exit (the manager escalates if it does not), then wait up to `waitfor`
    seconds (forever if None) for all to be gone. `waitfor=0` returns a handle with `.wait()`
    at once."""
    _check_master()
    targets = _flatten_pids(pids)
    callbacks.run_exiting([p for p in targets if p != 1 and p in PGRP.workers], callback_timeout)
    with PGRP.launch_lock:
        to_wait = []
        for pid in targets:
            if pid == 1:
                log.warning("rmprocs: process 1 not removed")
                continue
            with PGRP.lock:
                w = PGRP.workers.get(pid)
                if w is None:
                    continue
                w.state = WorkerState.terminating
                PGRP.changed.notify_all()
            to_wait.append(pid)
            try:
                w.manager.kill(pid, w.config)
            except Exception:
                log.exception("pydist: kill failed for worker %d", pid)

    def wait_all(limit: float | None) -> None:
        deadline = None if limit is None else time.monotonic() + limit
        with PGRP.lock:
            while True:
                left = [p for p in to_wait if p not in PGRP.gone]
                if not left:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"rmprocs: pids {left} not terminated after {limit} seconds.")
                PGRP.changed.wait(0.1 if remaining is None else min(remaining, 0.1))

    if waitfor == 0:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                wait_all(None)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=run, name="pydist-rmprocs", daemon=True)
        t.start()
        return RmprocsHandle(t, errors)
    wait_all(waitfor)
    return None


def interrupt(*pids: Any) -> None:
    """Interrupt the calls running on the given workers (all workers if none given)."""
    _check_master("interrupt workers")
    targets = _flatten_pids(pids) if pids else [p for p in workers() if p != 1]
    threads = []
    for pid in targets:
        w = PGRP.workers.get(pid)
        if w is None:
            continue
        t = threading.Thread(target=w.manager.manage, args=(pid, w.config, "interrupt"), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
