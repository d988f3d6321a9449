"""The process group: who is in the cluster, as this process knows it (`PGRP`, one per
process): Worker records and their states, ids, the cookie, and forgetting a worker.

Membership only: it imports no other pydist module. What losing a worker means to the
layers above (failed replies, Futures, callbacks) is their business: `runtime` sets
`PGRP.on_lost`, and `deregister` calls it.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

__all__ = ["WorkerState", "Worker", "ProcessGroup", "PGRP"]


class WorkerState(enum.Enum):
    """The life of a worker, as DistributedNext names it."""

    created = "created"
    connected = "connected"
    terminating = "terminating"
    terminated = "terminated"  # removed by rmprocs
    exterminated = "exterminated"  # died on its own


class Worker:
    """What this process knows about another process of the cluster. `manager` is its
    ClusterManager (on the master), `config` its WorkerConfig, `conn` its
    transport.Connection once connected."""

    def __init__(self, pid: int, manager: Any = None, config: Any = None,
                 connect_at: tuple | None = None):
        self.pid = pid
        self.state = WorkerState.created
        self.conn: Any = None
        self.manager = manager
        self.config = config
        self.connect_at = connect_at
        # `connected` and `connect_lock` are made on first use: a worker holds a record of
        # every member, and most are never waited for nor dialled (an Event and a Lock for
        # each cost a worker of a 128-worker cluster 150 KB and half a millisecond).
        self._connected: threading.Event | None = None
        self._is_connected = False  # (what `connected` starts as, once made)
        self._connect_lock: threading.Lock | None = None
        self.ospid: int | None = None
        self.cpu_threads: int | None = None
        # Why it was lost, when that is known (heartbeat silence, exit code or signal).
        self.lost_reason: str | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.pid} {self.state.name}>"

    @property
    def connected(self) -> threading.Event:
        """Set once the worker is connected, or gone (waiters then look at `conn`)."""
        return self._made("_connected", self._new_connected_event)

    def _new_connected_event(self) -> threading.Event:
        event = threading.Event()
        if self._is_connected:
            event.set()
        return event

    def set_connected(self) -> None:
        """Wake whoever waits on `connected` (making no Event when nobody has)."""
        with _RECORD_LOCK:
            self._is_connected = True
            event = self._connected
        if event is not None:
            event.set()

    @property
    def connect_lock(self) -> threading.Lock:
        """Held while dialling the worker (one dial at a time)."""
        return self._made("_connect_lock", threading.Lock)

    def _made(self, attr: str, make: Callable[[], Any]) -> Any:
        """The object in attribute `attr`, made by `make()` (once, under _RECORD_LOCK) if
        there is none yet."""
        value = getattr(self, attr)
        if value is None:
            with _RECORD_LOCK:
                value = getattr(self, attr)
                if value is None:
                    value = make()
                    setattr(self, attr, value)
        return value


_RECORD_LOCK = threading.Lock()  # makes a Worker's Event and Lock on first use


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
        self.lost_reasons: dict[int, str] = {}  # removed pid -> why it was lost, if known
        # A worker's heartbeat timeout for all its connections (the master sets it in JOIN;
        # on the master each connection has its own, from its `addprocs`).
        self.heartbeat_timeout: float | None = None
        self.topology = "all_to_all"
        self.lazy: bool | None = None
        self.cookie = secrets.token_hex(16)
        self.next_pid = 2
        self.unused_pids: set[int] = set()  # given to launches that failed before joining
        self.launch_lock = threading.Lock()  # one addprocs/rmprocs at a time
        self.removed_listeners: list[Callable[[int, WorkerState], None]] = []
        self.added_listeners: list[Callable[[int], None]] = []
        # What losing worker `pid` means above this layer, `on_lost(pid, worker)`: set by
        # `runtime` (to `cluster.worker_lost`); it runs the removed listeners.
        self.on_lost: Callable[[int, Worker], None] | None = None
        self.listener: Any = None  # a worker's transport.Listener
        self.shutdown = threading.Event()
        self.exit_code = 0
        self.master_connected = threading.Event()
        self.manager: Any = None  # a worker's own ClusterManager (init_worker)
        self.managers: list = []  # every ClusterManager used, cleaned up at exit

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

    def attach(self, w: Worker, conn: Any) -> None:
        """`w` is connected through `conn`."""
        if self.heartbeat_timeout and not conn.heartbeat_timeout:
            conn.set_heartbeat(self.heartbeat_timeout)
        with self.lock:
            w.conn = conn
            w.state = WorkerState.connected
            self.changed.notify_all()
        w.set_connected()

    def learn(self, pid: int, at: Any = None) -> None:
        """On a worker: `pid` is a member, listening for its peers at `at` (host, port) if
        given and not known yet. Nothing for ourselves or a removed pid."""
        with self.lock:
            if pid == self.id or pid in self.deleted:
                return
            w = self.workers.get(pid)
            if w is None:
                w = self.workers[pid] = Worker(pid)
            if w.connect_at is None and at:
                w.connect_at = tuple(at)

    def new_pid(self) -> int:
        """The id for a worker being set up: the lowest one a failed launch gave back, else
        the next new one. (Ids of workers that joined are never reused.)"""
        with self.lock:
            if self.unused_pids:
                pid = min(self.unused_pids)
                self.unused_pids.discard(pid)
                return pid
            pid = self.next_pid
            self.next_pid += 1
            return pid

    def give_back_pid(self, pid: int) -> None:
        """A launch failed before its worker learned `pid` (before JOIN): nobody knows it."""
        with self.lock:
            self.workers.pop(pid, None)
            self.unused_pids.add(pid)
            self.changed.notify_all()

    # ---------------------------------------------------------------- losing a worker
    def mark_terminating(self, pid: int) -> "Worker | None":
        """Record that `pid` is being removed on purpose (its loss is then `terminated`, not
        `exterminated`); its Worker, or None if it is not a member."""
        with self.lock:
            w = self.workers.get(pid)
            if w is not None:
                w.state = WorkerState.terminating
                self.changed.notify_all()
            return w

    def deregister(self, pid: int, reason: str | None = None) -> None:
        """Forget `pid`: close its connection, then let the layers above fail everything
        waiting on it and tell the listeners (`on_lost`). `reason` says why it was lost
        (for example "was silent for 61 s ..."), when known. Idempotent."""
        with self.lock:
            if pid in self.deleted or pid == self.id:
                return
            w = self.workers.pop(pid, None) or Worker(pid)  # we may never have heard of it
            self.deleted.add(pid)
            if reason:
                w.lost_reason = self.lost_reasons[pid] = reason
            was_terminating = w.state is WorkerState.terminating
            w.state = WorkerState.terminated if was_terminating else WorkerState.exterminated
            self.changed.notify_all()
        w.set_connected()
        if w.conn is not None:
            w.conn.close()
        on_lost = self.on_lost
        if on_lost is not None:
            on_lost(pid, w)
        else:
            for listener in list(self.removed_listeners):
                try:
                    listener(pid, w.state)
                except Exception:
                    log.exception("pydist: error in a worker-removed listener")
        with self.lock:
            self.gone.add(pid)
            self.changed.notify_all()


PGRP = ProcessGroup()
