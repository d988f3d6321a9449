"""pydist: Julia's Distributed for Python.

Start workers (`addprocs`), run functions on them (`remotecall`, `remotecall_fetch`,
`remote_do`), and move data with `Future`s and `RemoteChannel`s. The documentation (docs/,
built with Sphinx) has the guides and the reference of every name in `__all__`.
"""

from __future__ import annotations

from typing import IO, Any

from .channel import Channel
from .cluster import (
    addprocs,
    cluster_cookie,
    interrupt,
    myid,
    myrole,
    nprocs,
    nworkers,
    other_procs,
    other_workers,
    process_messages,
    procs,
    rmprocs,
    worker_id_from_socket,
    workers,
)
from .exceptions import (
    AuthenticationError,
    CapturedException,
    ExceptionGroup,
    InvalidStateError,
    LaunchWorkerError,
    ProcessExitedException,
    ProtocolError,
    PydistError,
    RemoteError,
    RemoteException,
    SerializationError,
)
from .group import WorkerState
from .managers import ClusterManager, WorkerConfig, connect, kill, launch, manage
from .managers.local import LocalManager, default_addprocs_params
from .callbacks import (
    add_worker_exited_callback,
    add_worker_exiting_callback,
    add_worker_started_callback,
    add_worker_starting_callback,
    getstatus,
    remove_worker_exited_callback,
    remove_worker_exiting_callback,
    remove_worker_started_callback,
    remove_worker_starting_callback,
    setstatus,
)
from .refs import (
    RRID,
    Future,
    RemoteChannel,
    channel_from_id,
    fetch,
    isready,
    put,
    remoteref_id,
    take,
    wait,
)
from .remotecall import remote_do, remotecall, remotecall_fetch, remotecall_wait
from .workerpool import (
    AbstractWorkerPool,
    CachingPool,
    WorkerPool,
    clear,
    default_worker_pool,
    remote,
    set_default_worker_pool,
)
from .macros import distributed, everywhere, fetchany, fetchfrom, spawn, spawnat
from .pmap import ExponentialBackOff, pmap
from .executor import Executor
from .pgenerate import pgenerate
from .runtime import shutdown


def start_worker(out: IO[str] | None = None, cookie: str | None = None, close_stdin: bool = True,
                 stderr_to_stdout: bool = True, bind_to: str | None = None) -> int:
    """Serve as a worker on this process until the master goes away; returns the exit code.

    What `python -m pydist.worker` runs, for a custom manager's own worker command: reads the
    cookie from stdin unless `cookie` is given, listens on `bind_to` (``"addr[:port]"``;
    default: an address of this host), prints the ``pydist_worker:<port>#<addr>`` line that
    the manager's `connect` reads to `out` (default: stdout), then serves calls.
    """
    from .worker import start_worker as _start_worker

    return _start_worker(out, cookie, close_stdin, stderr_to_stdout, bind_to)


def init_worker(cookie: str, manager: ClusterManager | None = None) -> None:
    """Make this process a worker that authenticates its peers with `cookie`, for a custom
    transport: then call `process_messages(reader, writer)` with the streams to the master
    and `pydist.worker.wait_for_shutdown()`. With a `manager`, links to other workers go
    through `manager.connect`. SIGINT (the master's `interrupt`) then interrupts the
    running calls instead of the process."""
    from .worker import init_worker as _init_worker

    _init_worker(cookie, manager)


def __getattr__(name: str) -> Any:
    # SSHManager pulls in shlex, shutil, tempfile and getpass: imported on first use only,
    # so that `import pydist` (and every worker's start) stays light; SlurmManager and
    # ElasticManager too.
    if name == "SSHManager":
        from .managers.ssh import SSHManager

        return SSHManager
    if name == "SlurmManager":
        from .managers.slurm import SlurmManager

        return SlurmManager
    if name == "ElasticManager":
        from .managers.elastic import ElasticManager

        return ElasticManager
    raise AttributeError(f"module 'pydist' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AbstractWorkerPool", "CachingPool", "WorkerPool", "clear", "default_worker_pool", "remote",
    "set_default_worker_pool", "distributed", "everywhere", "fetchany", "fetchfrom", "spawn",
    "spawnat", "pmap", "pgenerate", "ExponentialBackOff", "shutdown", "Executor",
    "AuthenticationError", "CapturedException", "Channel", "ClusterManager", "ExceptionGroup",
    "Future", "InvalidStateError", "LaunchWorkerError", "LocalManager", "ProcessExitedException",
    "ProtocolError", "PydistError", "RRID", "RemoteChannel", "RemoteError", "RemoteException",
    "SerializationError", "WorkerConfig", "WorkerState", "addprocs", "channel_from_id",
    "cluster_cookie", "connect", "default_addprocs_params", "fetch", "init_worker", "interrupt",
    "isready", "kill", "launch", "manage", "myid", "myrole", "nprocs", "nworkers", "other_procs",
    "other_workers", "process_messages", "procs", "put", "remote_do", "remotecall",
    "remotecall_fetch", "remotecall_wait", "remoteref_id", "rmprocs", "start_worker", "take",
    "wait", "worker_id_from_socket", "workers", "SSHManager", "SlurmManager", "ElasticManager",
    "add_worker_starting_callback", "add_worker_started_callback", "add_worker_exiting_callback",
    "add_worker_exited_callback", "remove_worker_starting_callback",
    "remove_worker_started_callback", "remove_worker_exiting_callback",
    "remove_worker_exited_callback", "setstatus", "getstatus",
]
