"""The script tests/test_mpi.py runs under `mpiexec` / `srun` with `python -m pydist.mpi`:
`mpi_script.py check [args]` checks a working cluster, `mpi_script.py kill` loses a worker
rank during a pmap. Each prints one line `RESULT <json>` on the master."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pydist
from pydist import Channel, ProcessExitedException, RemoteChannel

VICTIM = 3


def rank_and_host() -> tuple[int, str]:
    """Run on a worker: its MPI rank (as the launcher numbered it) and hostname."""
    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID") or "-1"
    return int(rank), socket.gethostname()


def say(text: str) -> None:
    print(f"{text} from {pydist.myid()}", flush=True)


def put_into(channel: RemoteChannel, value: object) -> None:
    channel.put(value)


def call_other(target: int) -> tuple[int, str]:
    """Run on a worker: ask another worker for its rank and host (a worker-to-worker call)."""
    return pydist.remotecall_fetch(rank_and_host, target)


def sleeper(started: RemoteChannel) -> None:
    started.put(pydist.myid())
    time.sleep(60)


def square(x: int) -> int:
    return x * x


def dies_on_victim(x: int) -> int:
    """A pmap element: the victim worker kills itself (SIGKILL) on its first element."""
    if pydist.myid() == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x * x


def check() -> dict:
    out: dict = {"argv": sys.argv, "name": __name__, "path0": sys.path[0],
                 "master_host": socket.gethostname()}
    workers = pydist.workers()
    out["workers"] = workers
    out["ranks"] = {p: pydist.remotecall_fetch(rank_and_host, p) for p in workers}
    # sys.path[0] (this script's folder) reached the workers: they import this module
    out["imports"] = [pydist.remotecall_fetch(lambda: __import__("mpi_script").__name__, p)
                      for p in workers]
    out["pmap"] = pydist.pmap(square, range(30))
    channel = RemoteChannel(lambda: Channel(10), workers[0])
    for p in workers:
        pydist.remotecall_fetch(put_into, p, channel, p)
    out["channel"] = sorted(channel.take() for _ in workers)
    out["w2w"] = pydist.remotecall_fetch(call_other, workers[0], workers[-1])
    pydist.remotecall_fetch(say, workers[1], "marker")
    started = RemoteChannel(lambda: Channel(1), workers[0])
    sleeping = pydist.remotecall(sleeper, workers[1], started)
    started.take()
    pydist.interrupt(workers[1])
    try:
        sleeping.result(timeout=30)
    except Exception as e:
        out["interrupted"] = f"{type(e).__name__}: {e}"
    pydist.rmprocs(workers[-1], waitfor=30)
    out["after_rmprocs"] = pydist.workers()
    out["pmap_after"] = pydist.pmap(square, range(6))
    return out


def kill() -> dict:
    out: dict = {"workers": pydist.workers()}
    out["pmap"] = pydist.pmap(dies_on_victim, range(12), retry_delays=[0.05] * 5)
    out["after"] = pydist.workers()
    try:
        pydist.remotecall_fetch(square, VICTIM, 2)
    except ProcessExitedException as e:
        out["error"] = str(e)
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "check":
        result = check()
    elif mode == "kill":
        result = kill()
    elif mode == "raise":
        raise ValueError("the script failed on purpose")
    elif mode == "die":  # the master dies: the workers must exit by themselves
        print("RESULT " + json.dumps({"workers": pydist.workers()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        sys.exit(int(mode))
    print("RESULT " + json.dumps(result), flush=True)
    time.sleep(float(os.environ.get("MPI_SCRIPT_LINGER", "0")))
    print("script done", flush=True)
