"""pydist in this process as a whole: `wire()` connects the layers (message handlers by
kind, the worker-lost hook, membership listeners), so that no module is wired by being
imported, and `shutdown()` stops everything in bounded time (it is also the exit hook).
It sits above every other module but the entry points (it imports them; they import it).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time

from . import (callbacks, calls, cluster, joining, protocol, refs, sharedmem, threads, transport,
               workerpool)
from .dispatch import HANDLERS, register_handler
from .remotecall import on_call  # (`pydist.remotecall` is the function, not the module)
from .group import PGRP
from .managers import ClusterManager, WorkerOutput, request_exit
from .managers import forkserver
from .managers.local import LocalManager

log = logging.getLogger(__name__)

_wire_lock = threading.Lock()


def wire() -> None:
    """Register every message handler and hook; idempotent. Runs when this module is
    imported (by `import pydist` and by `pydist.worker`)."""
    with _wire_lock:
        if PGRP.on_lost is not None:
            return
        register_handler(protocol.RESULT, calls.on_result)
        register_handler(protocol.CALL_FETCH, calls.on_call_fetch)
        register_handler(protocol.REMOTE_DO, calls.on_remote_do)
        register_handler(protocol.CALL, on_call)
        register_handler(protocol.PUSH, refs.on_push)
        register_handler(protocol.REFS, refs.on_refs)
        register_handler(protocol.JOIN, joining.on_join)
        register_handler(protocol.IDENTIFY, joining.on_identify)
        register_handler(protocol.EXIT, joining.on_exit)
        register_handler(protocol.PING, transport.on_ping)
        register_handler(protocol.PONG, transport.on_pong)
        register_handler(protocol.SHARE_OFFER, sharedmem.on_offer)
        register_handler(protocol.SHARE_ANSWER, sharedmem.on_answer)
        assert set(HANDLERS) == set(protocol.KIND_NAMES), "a message kind has no handler"
        calls.register_quick(refs._owner_op, refs.owner_op_now)
        PGRP.removed_listeners.append(refs.worker_lost)
        PGRP.removed_listeners.append(workerpool.worker_removed)
        PGRP.added_listeners.append(workerpool.worker_added)
        PGRP.on_lost = cluster.worker_lost


def shutdown(timeout: float = 10.0) -> None:
    """Stop pydist in this process within about `timeout` seconds, starting no thread.

    On the master: run the worker-exiting callbacks, ask every worker to exit, and when
    time runs out kill those still running (their whole process groups) through their
    managers' cleanup. Then close every connection and stop and join pydist's threads (the
    poller, the watchdog, the connection thread pool, the reference-count flusher). Runs at
    interpreter exit; after an explicit call pydist can be used again (`addprocs`).
    """
    _shutdown(timeout, at_exit=False)


# Set by a forked worker that ends with `os._exit` once the exit hooks have run
# (`forkserver`): its daemon threads end with the process, so that shutdown need not wake
# and join each of them (half of a worker's CPU time after it was told to exit).
_ending_by_os_exit = False


def ending_by_os_exit() -> None:
    """This process ends with `os._exit` right after the exit hooks: pydist's hook only
    closes connections and waits for output relays, it does not stop its threads."""
    global _ending_by_os_exit
    _ending_by_os_exit = True


def _shutdown(timeout: float, at_exit: bool) -> None:
    deadline = time.monotonic() + timeout

    def left(share: float = 1.0) -> float:
        return max(0.0, (deadline - time.monotonic()) * share)

    if PGRP.is_master():
        log.info("shutdown: removing workers %s%s", [p for p in PGRP.workers if p != 1],
                 " (at exit)" if at_exit else "")
        _remove_all_workers(left, at_exit)
    for w in list(PGRP.workers.values()):
        if w.conn is not None:
            w.conn.close()
    WorkerOutput.drain_all(min(1.0, left()))
    if at_exit and _ending_by_os_exit:
        return
    if not refs.stop_flusher(min(1.0, left())):
        log.warning("pydist: the reference-count flusher did not stop")
    stuck = threads.stop_runtime(left())
    if stuck:
        log.debug("pydist: threads still busy at shutdown: %s", ", ".join(stuck))
    log.debug("shutdown: done")
    if not at_exit:
        threads.restart_runtime()
        PGRP.shutdown.clear()


def _remove_all_workers(left, at_exit: bool) -> None:
    """Ask every worker to exit; whatever is left when the time is up is killed."""
    PGRP.shutdown.set()
    pids = [p for p in PGRP.workers if p != 1]
    if pids:
        callbacks.run_exiting(pids, min(5.0, left(0.3)))
    conns = []
    for pid in pids:
        w = PGRP.mark_terminating(pid)
        if w is None:
            continue
        request_exit(pid)  # queued, never waits for the worker to read
        if w.conn is not None:
            conns.append(w.conn)
        if not _uses_default_kill(w.manager):
            try:  # a custom manager's own way to stop its worker
                w.manager.kill(pid, w.config)
            except Exception:
                log.exception("pydist: kill failed for worker %d", pid)
    for conn in conns:
        conn.wait_sent(min(1.0, left(0.2)))
    with PGRP.lock:
        while any(p not in PGRP.gone for p in pids) and left(0.5) > 0:
            PGRP.changed.wait(min(0.1, left(0.5)))
    left_over = [p for p in pids if p not in PGRP.gone]
    if left_over:
        log.warning("shutdown: workers %s have not exited yet; those still running in "
                    "%.1f s are killed", left_over, left(0.5))
    for manager in list(PGRP.managers):
        try:
            if _is_builtin(manager):
                manager.cleanup(grace=left(0.5))  # reaps; kills what is still running
            else:
                manager.cleanup()
        except Exception:
            log.exception("pydist: %r failed to clean up", manager)
    forkserver.stop()  # after its workers are reaped; a later addprocs starts it again


def _is_builtin(manager) -> bool:
    """LocalManager or SSHManager: their `kill` is an EXIT request plus an escalation that
    `cleanup(grace=...)` also does, without a thread. (SSHManager by name: importing it
    would make `import pydist` heavier.)"""
    return isinstance(manager, LocalManager) or type(manager).__name__ == "SSHManager"


def _uses_default_kill(manager) -> bool:
    """Whether `manager` stops workers the way shutdown already does (an EXIT request, then
    `cleanup`): the built-in managers, and managers that keep the default `kill`."""
    if manager is None or _is_builtin(manager):
        return True
    return type(manager).kill is ClusterManager.kill


wire()
atexit.register(_shutdown, 10.0, True)
