"""The cluster as users see it: addprocs / rmprocs / interrupt (launching workers through
their managers and joining them: Julia's cluster.jl), the membership API (myid, procs,
workers, ...), and what losing a worker means to every layer (`worker_lost`).

On the master (pid 1) `addprocs` launches workers through a `ClusterManager`, connects to
them and tells them who they are (JOIN); on a worker the process group is filled by that
message (`joining`). Worker-to-worker connections are made on first use (`lazy=True`, see
`calls.connection`) or at join time, the higher pid dialling the lower one, as in Julia.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Literal, Mapping, Sequence, Union, overload

from . import callbacks, protocol, serialization, transport
from .calls import address_of, call_fetch, fail_slots_of, new_slot, remote_do_internal, SLOTS
from .dispatch import HANDLER
from .exceptions import (
    AuthenticationError,
    LaunchWorkerError,
    ProcessExitedException,
    ProtocolError,
    error_group,
)
from .group import PGRP, Worker, WorkerState
from .joining import process_messages
from .managers import (
    OWN_PROCESS_GROUP,
    Authenticated,
    ClusterManager,
    WorkerConfig,
    WorkerOutput,
    exit_reason,
    heartbeat_timeout,
    launch_timeout,
    worker_timeout,
)
from .managers.local import LocalManager

log = logging.getLogger(__name__)

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
    "process_messages",
    "worker_lost",
    "launch_additional",
    "name_additional",
]

TOPOLOGIES = ("all_to_all", "master_worker", "custom")


# ==================================================================== losing a worker
def worker_lost(pid: int, w: Worker) -> None:
    """`PGRP.on_lost` (set by `runtime`): `deregister` has just forgotten `pid`. Learn why
    it was lost (on the master), fail every reply slot waiting on it, tell its manager and
    (on the master) the other workers, then the removed listeners (refs fails its Futures,
    pools drop it) and the exited callbacks."""
    master = PGRP.is_master()
    silent = w.lost_reason is not None  # we closed it: the heartbeat found it silent
    if master and not silent and w.state is not WorkerState.terminated and w.config is not None:
        reason = exit_reason(w.manager, pid, w.config)
        if reason:
            w.lost_reason = PGRP.lost_reasons[pid] = reason
    fail_slots_of(pid)
    if w.state is WorkerState.terminated:
        log.info("worker %d removed%s", pid, f": it {w.lost_reason}" if w.lost_reason else "")
    elif master:
        log.info("worker %d lost: %s", pid,
                    f"it {w.lost_reason}" if w.lost_reason else "its connection closed")
    else:
        log.info("peer worker %d gone%s", pid, f": it {w.lost_reason}" if w.lost_reason else "")
    if master:
        if w.state is not WorkerState.terminated and not PGRP.shutdown.is_set():
            print(f"Worker {pid} terminated" + (f": it {w.lost_reason}." if w.lost_reason else "."),
                  file=sys.stderr, flush=True)
        if w.manager is not None:
            if silent:  # maybe still running (stopped, partitioned): have it killed
                log.warning("worker %d was silent: having its manager kill it", pid)
                try:
                    w.manager.kill(pid, w.config)
                except Exception:
                    log.exception("pydist: kill failed for silent worker %d", pid)
            try:
                w.manager.manage(pid, w.config, "deregister")
            except Exception:
                log.exception("pydist: manage(deregister) failed for worker %d", pid)
        with PGRP.lock:  # (those being removed need not know: `rmprocs` of many is O(n))
            others = [o.pid for o in PGRP.workers.values()
                      if o.state not in (WorkerState.terminating, WorkerState.terminated)]
        for other in others:
            try:
                remote_do_internal(other, _forget_worker, (pid, w.lost_reason))
            except Exception:
                pass
    for listener in list(PGRP.removed_listeners):
        try:
            listener(pid, w.state)
        except Exception:
            log.exception("pydist: error in a worker-removed listener")
    if master:
        callbacks.run_exited(pid, w.state)
        if w.manager is not None:  # Julia calls this from the Worker's finalizer
            try:
                w.manager.manage(pid, w.config, "finalize")
            except Exception:
                log.exception("pydist: manage(finalize) failed for worker %d", pid)


def _forget_worker(pid: int, reason: str | None = None) -> None:
    """Run on workers when the master has lost `pid` (`reason`: why, if known)."""
    log.debug("the master lost worker %d: forgetting it", pid)
    PGRP.deregister(pid, reason)


def _set_valid_processes(members: list[tuple[int, list | None]]) -> None:
    """Run on workers after addprocs: learn every member and its address (connections
    stay lazy)."""
    for pid, at in members:
        PGRP.learn(pid, at)


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
    "callback_warning_interval", "heartbeat_timeout",
}
_LOCAL_KEYWORDS = _COMMON_KEYWORDS | {"restrict", "start_method"}
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


#: An SSH machine: ``"[count*][user@]host[:port] [bind_addr[:port]]"``, or ``(spec, count)``
#: with a number or ``"auto"`` (one worker per core).
Machine = Union[str, tuple[str, Union[int, Literal["auto"]]]]
Topology = Literal["all_to_all", "master_worker", "custom"]


@overload
def addprocs(np: int | None = None, /, *, restrict: bool = True,
             start_method: Literal["spawn", "forkserver"] | None = None,
             exename: str | None = None, exeflags: str | Sequence[str] = (),
             dir: str | None = None, env: Mapping[str, str] | None = None,
             topology: Topology = "all_to_all", lazy: bool = True,
             enable_threaded_blas: bool = False, timeout: float | None = None,
             heartbeat_timeout: float | None = 60.0,
             callback_warning_interval: float = 10.0) -> list[int]: ...
@overload
def addprocs(machines: Sequence[Machine], /, *, tunnel: bool = False, multiplex: bool = False,
             sshflags: str | Sequence[str] = (), max_parallel: int = 10,
             shell: Literal["posix", "csh", "wincmd"] = "posix", ssh: str = "ssh",
             cmdline_cookie: bool = False,
             exename: str | None = None, exeflags: str | Sequence[str] = (),
             dir: str | None = None, env: Mapping[str, str] | None = None,
             topology: Topology = "all_to_all", lazy: bool = True,
             enable_threaded_blas: bool = False, timeout: float | None = None,
             heartbeat_timeout: float | None = 60.0,
             callback_warning_interval: float = 10.0) -> list[int]: ...
@overload
def addprocs(manager: ClusterManager, /, **kw: Any) -> list[int]: ...
def addprocs(target: int | Sequence[Machine] | ClusterManager | None = None, /, **kw: Any) -> list[int]:
    """Start workers and return their ids (sorted); they join every process's cluster.

    - ``addprocs(n)`` starts `n` workers on this machine (default: `os.cpu_count()`), with a
      `LocalManager`; ``restrict=True`` makes them listen on 127.0.0.1 only;
      ``start_method="forkserver"`` forks them from a template process (fast, light),
      ``"spawn"`` starts fresh interpreters (default: `PYDIST_START_METHOD`, else
      ``"forkserver"``; a worker whose `exename`, `exeflags` or start-up `env` (PYTHON*,
      LD_*) differ is spawned anyway).
    - ``addprocs(machines)`` starts workers over SSH (an `SSHManager`): see the SSH guide for
      machine strings and `tunnel`, `multiplex`, `sshflags` (default `PYDIST_SSHFLAGS`),
      `max_parallel` (ssh sessions at once), `shell` (the remote shell's quoting), `ssh`
      (the ssh program) and `cmdline_cookie` (pass the cookie as an argument, not on stdin).
    - ``addprocs(manager)`` uses any `ClusterManager`; keywords not listed here go to its
      `launch` in `params`.

    Keywords for every kind: `exename` (the worker's Python, default `sys.executable`),
    `exeflags` (its flags), `dir` (working directory, default ours), `env` (extra
    environment variables), `topology` (``"all_to_all"``; ``"master_worker"`` forbids
    links between workers), `lazy` (link workers to each other on first use, not at once),
    `enable_threaded_blas` (else BLAS libraries run single-threaded), `timeout` (seconds to
    wait for a worker to start and connect; default `PYDIST_WORKER_TIMEOUT` or 60),
    `heartbeat_timeout` (seconds of silence after which a worker is declared dead; default
    `PYDIST_HEARTBEAT_TIMEOUT` or 60; ``0`` or ``None``: off), `callback_warning_interval`
    (seconds between reports of slow started-callbacks). An unknown keyword is a TypeError.

    If some workers fail to start, the error (an `ExceptionGroup` for several) carries
    `added_pids`: the workers that did start, and stay. Example::

        pids = addprocs(2, exeflags=["-X", "dev"], env={"OMP_NUM_THREADS": "1"})
        addprocs(["node1", "alice@node2:2222", ("node3", 4)], tunnel=True)
    """
    _check_master()
    if target is None or (isinstance(target, int) and not isinstance(target, bool)):
        _check_keywords(kw, _LOCAL_KEYWORDS)
        n = (os.cpu_count() or 1) if target is None else target
        if n < 0:
            raise ValueError(f"addprocs: number of workers must be >= 0, got {n}")
        manager: ClusterManager = LocalManager(n, restrict=kw.pop("restrict", True),
                                               start_method=kw.pop("start_method", None))
    elif isinstance(target, ClusterManager):
        manager = target
    elif isinstance(target, str):
        raise TypeError(f"addprocs: machines are given as a list, got the string {target!r} "
                        f"(for SSH workers on that host: addprocs([{target!r}]))")
    elif isinstance(target, (list, tuple)):
        _check_keywords(kw, _SSH_KEYWORDS)
        from .managers.ssh import SSHManager  # on first use: it keeps `import pydist` light

        manager = SSHManager(target)
    else:
        raise TypeError(f"addprocs: expected a count, a list of machines or a ClusterManager, got {target!r}")
    params = dict(manager.default_addprocs_params())
    params.update(kw)
    _normalize_params(params)
    warn_every = float(params.get("callback_warning_interval") or 10.0)
    log.info("addprocs: starting workers with %r", manager)
    callbacks.run_starting(manager, params, warn_every)
    with PGRP.launch_lock:
        if manager not in PGRP.managers:
            PGRP.managers.append(manager)
        new_pids, errors = _addprocs_locked(manager, params)
    log.info("addprocs: added workers %s%s", new_pids,
             f" ({len(errors)} failed to start)" if errors else "")
    callbacks.run_started(new_pids, warn_every)
    if errors:
        error = errors[0] if len(errors) == 1 else error_group(
            f"addprocs: {len(errors)} workers failed to start", errors)
        error.added_pids = new_pids  # type: ignore[attr-defined]  # the workers that did start stay in the cluster
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
    if "heartbeat_timeout" in params and params["heartbeat_timeout"] is None:
        params["heartbeat_timeout"] = 0  # an explicit None: off
    params["heartbeat_timeout"] = heartbeat_timeout(params.get("heartbeat_timeout"))
    if params.get("dir") is None:
        params["dir"] = os.getcwd()
    if params.get("exename") is None:
        params["exename"] = sys.executable


def _addprocs_locked(manager: ClusterManager, params: dict) -> tuple[list[int], list[BaseException]]:
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
            log.info("addprocs: a worker failed to start: %s", e)
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
    everyone = _member_addresses()
    for pid, _ in everyone:  # everyone learns the new membership, and where to find it
        try:
            remote_do_internal(pid, _set_valid_processes, (everyone,))
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


# ---------------------------------------------------------------- on a worker: its siblings (count > 1)
_siblings: dict[int, WorkerOutput] = {}  # ospid -> output relay, for naming it later


def launch_additional(n: int, exename: str, exeflags: list[str], bind_addr: str) -> list[tuple]:
    """Run on a worker: start `n` more workers on this host, listening on `bind_addr` (any
    free port), like Julia's `launch_additional`; return each one's (addr, port, ospid). Their output is relayed
    through ours; `name_additional` tells a relay which pid its worker got."""
    cmd = [exename, *exeflags, "-m", "pydist.worker", "--bind-to", bind_addr]
    procs: list[Any] = []
    try:
        forked = _fork_siblings(n, exename, exeflags, bind_addr)
        for _ in range(n):
            proc = next(forked, None) if forked is not None else None
            if proc is None:
                forked = None
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, **OWN_PROCESS_GROUP)
                proc.stdin.write(PGRP.cookie.encode() + b"\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            procs.append(proc)
        relays = [WorkerOutput(p.stdout) for p in procs]
        result = []
        for proc, relay in zip(procs, relays):
            addr, port = relay.wait_address(worker_timeout(), proc)
            result.append((addr, port, proc.pid))
    except BaseException as e:
        for proc in procs:
            proc.kill()
        if isinstance(e, (LaunchWorkerError, OSError)):
            raise LaunchWorkerError(f"worker {PGRP.id} could not start {n} more workers "
                                    f"with {cmd}: {e}") from e
        raise
    log.info("started %d more workers on this host: os pids %s", n, [p.pid for p in procs])
    for proc, relay in zip(procs, relays):
        _siblings[proc.pid] = relay
        threading.Thread(target=_reap, args=(proc,), name="pydist-reaper", daemon=True).start()
    return result


def _fork_siblings(n: int, exename: str, exeflags: list[str], bind_addr: str):
    """On a worker: an iterator of `n` workers forked by a fork server of this host (as
    `LocalManager` does), or None where this host's `PYDIST_START_METHOD` says spawn or a
    fork cannot give what was asked for. It ends early if forking fails: the caller spawns
    the rest."""
    from .managers import forkserver
    from .managers.local import default_start_method

    env = dict(os.environ)
    why = ("PYDIST_START_METHOD says spawn" if default_start_method() != "forkserver"
           else forkserver.unsuitable(exename, exeflags, env))
    if why is not None:
        log.debug("starting %d more workers as fresh interpreters: %s", n, why)
        return None

    def forks():
        try:
            yield from forkserver.fork_workers(n, PGRP.cookie, bind_addr, os.getcwd(), env)
        except OSError as e:
            log.debug("starting more workers as fresh interpreters, not forking: %s", e)

    return forks()


def _reap(proc: Any) -> None:
    proc.wait()
    _siblings.pop(proc.pid, None)


def name_additional(ospid: int, pid: int) -> None:
    """Run on a worker: the sibling with OS pid `ospid` joined as worker `pid`."""
    relay = _siblings.get(ospid)
    if relay is not None:
        relay.pid = pid


def _create_worker(manager: ClusterManager, config: WorkerConfig, params: dict) -> int:
    pg = PGRP
    with pg.lock:
        pid = pg.new_pid()
        w = Worker(pid, manager, config)
        pg.workers[pid] = w
    joining = False  # once JOIN is sent the worker knows its id: it is never given back
    timeout = params["timeout"]
    try:
        with launch_timeout(timeout):
            reached = manager.connect(pid, config)
        authenticated = isinstance(reached, Authenticated)  # (a pair made at the worker's fork)
        sock = transport.as_socket(reached.sock if isinstance(reached, Authenticated) else reached)
        try:
            transport.tune_socket(sock)
            if not authenticated:
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
        conn.set_heartbeat(params["heartbeat_timeout"])
        conn.start()
        other = _join_list(w, config, timeout)
        from multiprocessing import process as mp_process  # (here: not at `import pydist`)

        join_params = {
            "self_pid": pid,
            "other_workers": other,
            "topology": pg.topology,
            "lazy": pg.lazy,
            "enable_threaded_blas": bool(params.get("enable_threaded_blas", False)),
            "sys_path": [p for p in sys.path if p],
            "heartbeat_timeout": params["heartbeat_timeout"],
            # multiprocessing's authkey: the proxies of our `multiprocessing.Manager()` (a
            # Manager().Queue() passed to a call, as ProcessPoolExecutor code does) then
            # authenticate from the worker too, as from a child process.
            "mp_authkey": bytes(mp_process.current_process().authkey),
        }
        sid, slot = new_slot(pid)
        joining = True
        conn.send(protocol.encode_frame(protocol.JOIN, serialization.dumps_inline(join_params), a=sid))
        if not slot.wait(timeout):
            SLOTS.pop(sid, None)
            raise LaunchWorkerError(f"worker {pid} did not join within {timeout} seconds")
        if not slot.ok:
            raise LaunchWorkerError(f"worker {pid} failed to join: {slot.value}")
        facts = slot.value
        w.ospid = config.ospid = facts["ospid"]
        w.cpu_threads = facts["cpu_threads"]
        config.environ = dict(config.environ or {}, cpu_threads=facts["cpu_threads"])
        pg.attach(w, conn)
        log.info("worker %d joined: os pid %s%s, at %s", pid, w.ospid,
                 f" on {config.host}" if config.host else "", _address(w.connect_at))
        manager.manage(pid, config, "register")
        return pid
    except BaseException as e:
        if joining:
            with pg.lock:
                pg.workers.pop(pid, None)
                pg.deleted.add(pid)
                pg.changed.notify_all()
        else:
            pg.give_back_pid(pid)
        w.set_connected()
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


def _address(at: Any) -> str:
    """(host, port) as host:port, for log records."""
    return f"{at[0]}:{at[1]}" if isinstance(at, (tuple, list)) and len(at) == 2 else str(at)


def _join_list(w: Worker, config: WorkerConfig, timeout: float) -> list:
    """The earlier workers a new worker should know (and, unless lazy, dial).

    Lazy all-to-all links need none: the worker learns every member at the end of
    `addprocs` (`_set_valid_processes`), or from the master when it first needs one
    (`calls.connection`), so workers join in parallel (a list of the earlier ones in each
    JOIN made 128 workers cost 8,000 entries more to build, send and unpickle). Otherwise,
    as Julia, wait for the lower pids of the same `addprocs` to join, so that the new worker
    dials every one."""
    pg = PGRP
    if pg.topology == "master_worker" or (pg.lazy and pg.topology == "all_to_all"):
        return []
    deadline = time.monotonic() + timeout
    with pg.lock:
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
    return [(o.pid, list(o.connect_at)) for o in others]  # type: ignore[arg-type]


def _member_addresses() -> list[tuple[int, list | None]]:
    """Run on the master: (pid, address) of every worker, for `_set_valid_processes`."""
    with PGRP.lock:
        return [(w.pid, address_of(w.pid)) for w in PGRP.workers.values()
                if w.state is WorkerState.connected]


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


def rmprocs(*pids: int | Iterable[int], waitfor: float | None = None,
            callback_timeout: float = 10.0) -> RmprocsHandle | None:
    """Remove workers: run the worker-exiting callbacks (at most `callback_timeout` seconds),
    ask each worker to exit (the manager escalates if it does not), then wait up to `waitfor`
    seconds (forever if None) for all to be gone. `waitfor=0` returns a handle with `.wait()`
    at once."""
    _check_master()
    targets = _flatten_pids(pids)
    log.info("rmprocs: removing workers %s", targets)
    callbacks.run_exiting([p for p in targets if p != 1 and p in PGRP.workers], callback_timeout)
    with PGRP.launch_lock:
        to_kill = []
        for pid in targets:  # all first: none of them need hear that another one left
            if pid == 1:
                log.warning("rmprocs: process 1 not removed")
                continue
            w = PGRP.mark_terminating(pid)
            if w is not None:
                to_kill.append((pid, w))
        to_wait = [pid for pid, _ in to_kill]
        for pid, w in to_kill:
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


def interrupt(*pids: int | Iterable[int]) -> None:
    """Interrupt the calls running on the given workers (all workers if none given): each
    gets `KeyboardInterrupt` within about 0.1 s, also while it sleeps or waits on a Future,
    a channel or a `threading` primitive (a call that computes: within about 0.25 s); the
    workers stay usable."""
    _check_master("interrupt workers")
    targets = _flatten_pids(pids) if pids else [p for p in workers() if p != 1]
    log.info("interrupt: interrupting workers %s", targets)
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
