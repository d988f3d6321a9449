"""MPI launch: the ranks of an MPI job (`mpiexec`, `srun --mpi=pmix`) become a cluster.

Rank 0 is the master and ranks 1..N-1 become workers 2..N (rank r is worker r+1), as in
MPIClusterManagers.jl's `start_main_loop` with TCP transport. MPI is used only to start:
four collective calls exchange what pydist's own transport needs, then every rank calls
`MPI_Finalize` (the caller does: `pydist.mpi`), and the cluster runs over pydist's
connections as any other does:

1. rank 0 broadcasts its host's addresses;
2. each worker rank gathers back its network namespace and, for each of those addresses,
   the local address it would reach it from (no packet is sent: a UDP `connect`);
3. rank 0 scatters the cookie and where each worker listens: 127.0.0.1 when every rank
   shares rank 0's network namespace, else each worker's own address on the first network
   that reaches rank 0 from every worker (so workers reach each other there too);
4. each worker starts listening and gathers back (address, port, hostname, OS pid), or why
   it could not.

Then `MPIManager` "launches" them: one `WorkerConfig` per rank, and `addprocs` connects,
authenticates (the cookie) and joins each, as for SSH workers. The messages are JSON in
byte buffers (mpi4py's `Bcast`, `Gather(v)`, `Scatter(v)`), so nothing from another rank is
unpickled; the cookie travels over MPI, so the MPI job is the trust boundary, as MPI's own
is. This module never imports mpi4py: callers pass a communicator (mpi4py's `Comm`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import transport
from ..exceptions import LaunchWorkerError
from . import ClusterManager, WorkerConfig, connect_tcp, process_ended, read_worker_address

log = logging.getLogger(__name__)

__all__ = ["MPIManager", "RankAddress", "master_exchange", "worker_exchange", "abort_exchange"]

ROOT = 0

# The worker ids rank 0 got from its MPI job, once it has made its cluster (`pydist.mpi`
# sets it; kept here because `python -m pydist.mpi` runs that module as `__main__`, so a
# script's `import pydist.mpi` is a second copy of it).
started: list[int] | None = None


@dataclass(frozen=True)
class RankAddress:
    """Where a worker rank listens, as it told rank 0."""

    rank: int
    addr: str
    port: int
    hostname: str
    ospid: int
    machine: str  # kernel boot id and PID namespace: equal means signals reach it from here


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    """This kernel's boot id and this process's `kind` namespace ("net", "pid"), or the
    hostname where /proc does not say: equal strings mean the same network stack (or the
    same process ids)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        inode = os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return f"host:{socket.gethostname()}"
    return f"{boot}/{kind}:{inode}"


def _route_source(addr: str) -> str | None:
    """The local address this host would send from to reach `addr`, or None (no route).
    A UDP `connect` only asks the routing table: nothing is sent."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            source = s.getsockname()[0]
    except OSError:
        return None
    return None if source.startswith(("0.", "127.", "169.254.")) else source


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses, neither loopback nor link-local, in interface order."""
    try:
        found = transport.interface_addresses()
    except (OSError, ImportError, AttributeError):
        return []
    return [a for a in found if not a.startswith(("127.", "169.254."))]


def _choose_binds(master_addrs: list[str], netns: str, infos: list[dict]) -> list[str]:
    """Where each worker rank listens ("" = its own default, `default_bind_addr`)."""
    if all(info["netns"] == netns for info in infos):
        return ["127.0.0.1"] * len(infos)  # one machine (one network stack): loopback
    for i in range(len(master_addrs)):  # the first network every worker reaches us on
        sources = [info["routes"][i] for info in infos]
        if all(sources):
            return sources
    return [next((s for s in info["routes"] if s), "") for info in infos]


# JSON over MPI byte buffers: sizes first (8 bytes each), then the bytes.
_SIZE = struct.Struct("<q")


def _bcast(comm: Any, obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank."""
    data = json.dumps(obj).encode() if comm.Get_rank() == ROOT else b""
    size = bytearray(_SIZE.pack(len(data)))
    comm.Bcast(size, root=ROOT)
    buf = bytearray(data) if comm.Get_rank() == ROOT else bytearray(_SIZE.unpack(size)[0])
    comm.Bcast(buf, root=ROOT)
    return json.loads(buf)


def _gather(comm: Any, obj: Any) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    data = json.dumps(obj).encode()
    if comm.Get_rank() != ROOT:
        comm.Gather(_SIZE.pack(len(data)), None, root=ROOT)
        comm.Gatherv(data, None, root=ROOT)
        return None
    n = comm.Get_size()
    sizes = bytearray(_SIZE.size * n)
    comm.Gather(_SIZE.pack(len(data)), sizes, root=ROOT)
    counts = [_SIZE.unpack_from(sizes, _SIZE.size * i)[0] for i in range(n)]
    buf = bytearray(sum(counts))
    comm.Gatherv(data, [buf, counts], root=ROOT)
    out, at = [], 0
    for count in counts:
        out.append(json.loads(buf[at:at + count]))
        at += count
    return out


def _scatter(comm: Any, objs: list | None = None) -> Any:
    """`objs[r]` (given on rank 0) on each rank r."""
    if comm.Get_rank() == ROOT:
        parts = [json.dumps(o).encode() for o in objs or []]
        counts = [len(p) for p in parts]
        sizes: bytes | None = b"".join(_SIZE.pack(c) for c in counts)
        send: list | None = [b"".join(parts), counts]
    else:
        sizes = send = None
    mine = bytearray(_SIZE.size)
    comm.Scatter(sizes, mine, root=ROOT)
    buf = bytearray(_SIZE.unpack(mine)[0])
    comm.Scatterv(send, buf, root=ROOT)
    return json.loads(buf)


def abort_exchange(comm: Any) -> None:
    """On rank 0, instead of `master_exchange`: tell the worker ranks that no cluster will
    be made (their `worker_exchange` returns None), e.g. after a usage error."""
    _bcast(comm, None)


def master_exchange(comm: Any, cookie: str) -> tuple[list[RankAddress], list[str]]:
    """On rank 0 (collective with `worker_exchange` on every other rank): give the worker
    ranks the cookie and where to listen; return where each listens, and for each rank
    that could not, why."""
    if comm.Get_rank() != ROOT:
        raise RuntimeError("master_exchange runs on rank 0; the other ranks call worker_exchange")
    addrs = _host_addresses()
    netns = _namespace("net")
    _bcast(comm, {"addrs": addrs})  # 1
    infos = (_gather(comm, None) or [])[1:]  # 2
    binds = _choose_binds(addrs, netns, infos)
    _scatter(comm, [None] + [{"cookie": cookie, "bind": b} for b in binds])  # 3
    answers = _gather(comm, None) or []  # 4
    ranks, errors = [], []
    for rank, answer in enumerate(answers[1:], start=1):
        if isinstance(answer, dict):
            ranks.append(RankAddress(rank, str(answer["addr"]), int(answer["port"]),
                                     str(answer["hostname"]), int(answer["ospid"]),
                                     str(answer["machine"])))
        else:
            errors.append(f"MPI rank {rank} could not start listening: {answer}")
    log.info("MPI: %d worker ranks listen%s", len(ranks),
             f" ({len(errors)} failed)" if errors else "")
    return ranks, errors


def worker_exchange(comm: Any, listen: Callable[[str, str | None], tuple[str, int]]
                    ) -> RankAddress | None:
    """On a worker rank (collective with `master_exchange` on rank 0): get the cookie and
    where to listen, call `listen(cookie, bind_to)` (which returns the (addr, port) it
    listens on) and tell rank 0. None if rank 0 aborted or `listen` failed (then rank 0
    knows why)."""
    hello = _bcast(comm)  # 1
    if hello is None:
        return None
    _gather(comm, {"netns": _namespace("net"),
                   "routes": [_route_source(a) for a in hello["addrs"]]})  # 2
    setup = _scatter(comm)  # 3
    try:
        addr, port = listen(setup["cookie"], setup["bind"] or None)
    except Exception as e:
        _gather(comm, f"{type(e).__name__}: {e}")  # 4
        return None
    me = RankAddress(comm.Get_rank(), addr, port, socket.gethostname(), os.getpid(),
                     _namespace("pid"))
    _gather(comm, {"addr": me.addr, "port": me.port, "hostname": me.hostname,
                   "ospid": me.ospid, "machine": me.machine})  # 4
    return me


class MPIManager(ClusterManager):
    """The worker ranks of an MPI job, from `master_exchange`: `addprocs(MPIManager(ranks))`
    on rank 0 connects to them (rank r becomes worker r+1 when they are the first workers).

    The processes belong to `mpiexec` (or `srun`): `kill` asks a worker to exit, and one
    on this machine can be interrupted (SIGINT); one on another machine cannot.
    """

    def __init__(self, ranks: list[RankAddress], errors: list[str] | tuple[str, ...] = ()):
        self.ranks = sorted(ranks, key=lambda r: r.rank)
        self.errors = list(errors)
        self._free = {r.rank: r for r in self.ranks}
        self._lock = threading.Lock()
        self._launched = False
        self._machine = _namespace("pid")

    def __repr__(self) -> str:
        return f"MPIManager({len(self.ranks)} worker ranks)"

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Announce one WorkerConfig per worker rank (they are listening already); raise
        LaunchWorkerError for ranks that could not listen."""
        with self._lock:
            if self._launched:
                raise RuntimeError("MPIManager: the ranks of an MPI job join once; "
                                   "use a new exchange for another addprocs")
            self._launched = True
        with launch_ntfy:
            for _ in self.ranks:
                launched.append(WorkerConfig(enable_threaded_blas=params.get("enable_threaded_blas")))
            launch_ntfy.notify_all()
        if self.errors:
            raise LaunchWorkerError("; ".join(self.errors))

    def _claim(self, pid: int) -> RankAddress:
        """The rank that becomes worker `pid`: rank pid-1 if still free, else the lowest."""
        with self._lock:
            rank = self._free.pop(pid - 1, None)
            if rank is None:
                rank = self._free.pop(min(self._free))
        return rank

    def connect(self, pid: int, config: WorkerConfig) -> socket.socket:
        """Connect to the rank that becomes worker `pid` (at rank 0), or to a worker rank
        whose address `config.connect_at` holds (on a worker, rarely used: workers dial
        each other by address)."""
        if config.host is None and config.connect_at is not None:
            host, port = read_worker_address(pid, config)
            return connect_tcp(pid, host, port)
        if config.userdata is None:
            rank = self._claim(pid)
            config.host, config.port, config.ospid = rank.addr, rank.port, rank.ospid
            config.userdata = {"mpi_rank": rank.rank, "hostname": rank.hostname,
                               "machine": rank.machine}
        host, port = read_worker_address(pid, config)
        return connect_tcp(pid, host, port)

    def _where(self, config: WorkerConfig) -> str:
        data = config.userdata or {}
        return f"MPI rank {data.get('mpi_rank', '?')} on {data.get('hostname', '?')}"

    def exit_reason(self, pid: int, config: WorkerConfig) -> str | None:
        """Which rank on which host it was, and whether its process ended (known when it
        ran on this machine; waits up to a second for it)."""
        data = config.userdata or {}
        if data.get("machine") == self._machine and config.ospid:
            deadline = time.monotonic() + 1.0
            while True:
                if process_ended(config.ospid):
                    return f"ended ({self._where(config)}, OS pid {config.ospid})"
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        return f"closed its connection ({self._where(config)})"

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Interrupt (SIGINT) a worker rank on this machine; one elsewhere cannot be."""
        if op != "interrupt":
            return
        data = config.userdata or {}
        if data.get("machine") != self._machine or not config.ospid:
            log.error("Worker %d (%s) cannot be interrupted from here: it runs on another "
                      "machine.", pid, self._where(config))
            return
        try:
            os.kill(config.ospid, signal.SIGINT)
        except ProcessLookupError:
            pass
