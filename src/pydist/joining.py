"""Connection setup: dialling a peer worker, serving an accepted or custom-transport
connection, and the messages that make a connection a member's (JOIN from the master,
IDENTIFY between workers, EXIT).

Below calls: nothing here waits for a reply. Asking the master to have a peer dial us
(lazy worker-to-worker links) is a call, so that part lives in `calls.connection`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from . import protocol, serialization, transport
from .dispatch import HANDLER
from .exceptions import (
    CapturedException,
    LaunchWorkerError,
    ProcessExitedException,
    ProtocolError,
    RemoteException,
)
from .group import PGRP, Worker, WorkerState
from .managers import WorkerConfig, worker_timeout

log = logging.getLogger(__name__)

__all__ = ["PeerRefused", "dial_peer", "accept_connection", "serve_connection", "process_messages",
           "init_worker", "on_identify", "on_exit", "on_join"]


# ==================================================================== dialling a peer
class PeerRefused(RuntimeError):
    """Dialling a peer over TCP was refused: nothing listens at its address. A worker listens
    from its start to its end, so it has exited, unless that address is wrong from here
    (`calls` asks the master which)."""


def dial_peer(pid: int) -> None:
    """Connect to worker `pid` (lower than ours) and identify ourselves."""
    pg = PGRP
    with pg.lock:
        w = pg.workers.get(pid)
        if w is None:
            if pid in pg.deleted:
                raise ProcessExitedException(pid, PGRP.lost_reasons.get(pid))
            w = pg.workers[pid] = Worker(pid)
    with w.connect_lock:
        if w.conn is not None and not w.conn.closed:
            return
        if w.connect_at is None:
            raise RuntimeError(f"process {pg.id} does not know the address of peer {pid}")
        try:
            sock = _open_peer(pid, w.connect_at)
        except (OSError, ProtocolError, LaunchWorkerError) as e:
            what = f"Error on {pg.id} while connecting to peer {pid}"
            if isinstance(e, ConnectionRefusedError) and pg.manager is None:
                # (through a custom transport, a refusal may be the transport's own)
                raise PeerRefused(f"{what}: nothing listens at its address {w.connect_at[0]}:"
                                  f"{w.connect_at[1]} (connection refused)") from e
            raise RuntimeError(f"{what}: {e}") from e
        log.debug("worker %d: connected to worker %d at %s", pg.id, pid, w.connect_at)
        conn = transport.Connection(sock, HANDLER, f"worker {pid}")
        conn.peer_pid = pid
        conn.serve_blocking = True  # a worker serves calls on every connection
        conn.send(protocol.encode_frame(protocol.IDENTIFY, a=pg.id))
        pg.attach(w, conn)
        conn.start()


def _open_peer(pid: int, connect_at: Any):
    """An authenticated connection to peer `pid`: through this worker's own manager if
    `init_worker` was given one (custom transports), else TCP to `connect_at`."""
    if PGRP.manager is None:
        host, port = connect_at
        return transport.connect(host, port, PGRP.cookie_bytes(), worker_timeout())
    sock = transport.as_socket(PGRP.manager.connect(pid, WorkerConfig(connect_at=connect_at)))
    try:
        transport.tune_socket(sock)
        transport.handshake_initiator(sock, PGRP.cookie_bytes(), worker_timeout())
    except BaseException:
        sock.close()
        raise
    return sock


# ==================================================================== serving connections
def accept_connection(sock) -> None:
    """A worker's listener authenticated a new connection: serve it (JOIN or IDENTIFY first)."""
    if log.isEnabledFor(logging.DEBUG):
        try:
            peer = sock.getpeername() or "a local process"
        except OSError as e:
            peer = f"? ({e})"
        log.debug("accepted a connection from %s", peer)
    serve_connection(sock)


def serve_connection(sock, name: str = "incoming") -> transport.Connection:
    """Serve an authenticated connection as a worker does (JOIN or IDENTIFY comes first on
    it): accepted by the listener, or dialled to an ElasticManager. Returns it."""
    conn = transport.Connection(sock, HANDLER, name)
    conn.serve_blocking = True  # a worker serves calls on every connection
    conn.start()
    return conn


def init_worker(cookie: str, manager: Any = None) -> None:
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


# ==================================================================== handlers
def on_identify(conn: transport.Connection, msg: protocol.Message):
    """IDENTIFY: a peer worker dialled us; `msg.a` is its pid."""
    pid = msg.a
    log.debug("worker %d: worker %d connected", PGRP.id, pid)
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
        PGRP.attach(w, conn)
    return None


def on_exit(conn: transport.Connection, msg: protocol.Message):
    """EXIT: our master tells this worker to exit. It stops accepting and closes its
    connections here and now (the master counts it gone once they are closed), rather than
    once the main thread has woken up and joined the listener thread: removing 32 workers
    waited for those two wake-ups of each in turn. The main thread does the rest, at the
    lowest priority (`_yield_for_exit`)."""
    if conn.peer_pid == 1:
        log.info("worker %d: the master asks it to exit", PGRP.id)
        PGRP.exit_code = 0
        if PGRP.listener is not None:
            PGRP.listener.stop()
        for w in list(PGRP.workers.values()):
            if w.conn is not None:
                w.conn.close()
        _yield_for_exit()
        PGRP.shutdown.set()  # (last: the main thread it wakes would compete for the GIL)
    return None


# The priority (nice) of a worker that was asked to exit, once it has closed its connections.
EXIT_NICE = 19


def _yield_for_exit() -> None:
    """Give this process's threads the lowest priority: what is left of its exit (joining
    threads, exit hooks, the kernel unmapping its memory: ~1.7 ms of CPU per forked worker)
    then takes only CPU time nobody else wants. Removing 128 workers at once, the exits of
    the first competed with the master and with the workers that had not yet closed their
    connections: `rmprocs` took 0.039-0.123 s (median 0.085) before and 0.031-0.130 (0.046)
    with this, in 12 alternating pairs. Its own time stays bounded (EXIT_GRACE_SECONDS, then
    the manager's escalation). On Linux the priority is per thread: each one gets it (and
    the threads they start inherit it)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except (OSError, ValueError):
        tids = [0]  # elsewhere the priority is the process's
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, EXIT_NICE)
        except (OSError, AttributeError):  # gone, or not allowed
            pass


def on_join(conn: transport.Connection, msg: protocol.Message):
    """JOIN (on a new worker): the master tells us who we are and who the others are; the
    answer is a RESULT for reply slot `msg.a`."""
    params = serialization.loads(msg.body, msg.buffers)
    sid = msg.a

    def join() -> None:
        try:
            reply = _join(conn, params)
            ok = True
        except BaseException as e:
            reply, ok = RemoteException(PGRP.id, CapturedException(e)), False  # type: ignore[assignment]
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
    # The master's heartbeat timeout holds for every connection of this worker (`attach`).
    pg.heartbeat_timeout = params.get("heartbeat_timeout")
    for path in reversed(params.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    if params.get("mp_authkey"):  # the master's: its Manager proxies work here (see cluster)
        from multiprocessing import process as mp_process

        mp_process.current_process().authkey = params["mp_authkey"]
    if not params.get("enable_threaded_blas", False):
        _limit_blas_threads()
    master = Worker(1)
    pg.attach(master, conn)
    with pg.lock:
        pg.workers[1] = master
        for pid, addr in params["other_workers"]:
            if pid not in pg.workers:
                pg.workers[pid] = Worker(pid, connect_at=tuple(addr) if addr else None)
                pg.workers[pid].state = WorkerState.created
    log.info("joined as worker %d (topology %s%s)", pg.id, pg.topology,
             ", lazy" if pg.lazy else "")
    pg.master_connected.set()
    if not pg.lazy:
        errors: list[BaseException] = []

        def dial(pid: int) -> None:
            try:
                dial_peer(pid)
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
