"""Starting 3 hosts x 2 workers, until all 6 answer a call, with each way pydist launches.

    sudo .ci/infra/up.sh             # sshd, namespace hosts h1..h3, Slurm, Open MPI (once)
    python bench/bench_launch.py [--reps 3] [--only ssh,slurm-outside,...] [--out FILE.md]

Rows (each the median and range of `--reps` runs; the workers are removed after each run,
untimed):
  - ssh: `addprocs([("h1", 2), ("h2", 2), ("h3", 2)])` over the hosts' sshd (bench_ssh.py);
  - slurm-outside: `addprocs(SlurmManager(6, partition="hosts", ntasks_per_node=2, ...))`,
    which submits the job and waits for it (launch_slurm.py);
  - slurm-inside: `addprocs(SlurmManager())` within an `salloc -N3 --ntasks-per-node=2`
    allocation (salloc itself not timed);
  - mpi: `mpiexec` of `python -m pydist.mpi` with rank 0 (the master) here and two worker ranks
    on each host, from the start of mpiexec (launch_mpi.py);
  - elastic: 2 workers started over ssh on each host with `python -m pydist.worker --join`,
    from their start until all have joined and answer (launch_elastic.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pydist  # noqa: E402


def ssh() -> float:
    from bench_ssh import SSHFLAGS

    t0 = time.perf_counter()
    pids = pydist.addprocs([("h1", 2), ("h2", 2), ("h3", 2)], sshflags=SSHFLAGS)
    answered = sorted(pydist.remotecall_fetch(pydist.myid, p) for p in pids)
    seconds = time.perf_counter() - t0
    assert answered == sorted(pids) and len(pids) == 6
    pydist.rmprocs(pids, waitfor=60)
    return seconds


def slurm(mode: str) -> Callable[[], float]:
    def run() -> float:
        import launch_slurm

        return launch_slurm.measure(mode)
    return run


def mpi() -> float:
    import launch_mpi

    return launch_mpi.measure()


def elastic() -> float:
    import launch_elastic

    return launch_elastic.measure()


ROWS: dict[str, tuple[str, Callable[[], float]]] = {
    "ssh": ("SSH (`addprocs` of 3 machines, count 2)", ssh),
    "slurm-outside": ("Slurm from outside (`SlurmManager` submits the job)", slurm("outside")),
    "slurm-inside": ("Slurm inside an allocation (one job step)", slurm("inside")),
    "mpi": ("MPI (`mpiexec ... python -m pydist.mpi`, from mpiexec's start)", mpi),
    "elastic": ("Elastic (workers dial in with `pydist.worker --join`)", elastic),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=",".join(ROWS))
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"# Starting 3 hosts x 2 workers until all answer: Python "
             f"{platform.python_version()}, {os.cpu_count()} CPUs, {args.reps} runs each", "",
             "| launch | median (s) | range (s) |", "|---|---:|---|"]
    for key in args.only.split(","):
        label, run = ROWS[key]
        try:
            runs = [run() for _ in range(args.reps)]
        except Exception as e:  # noqa: BLE001 - one system's failure fills only its row
            lines.append(f"| {label} | error: {type(e).__name__}: {str(e)[:120]} | |")
        else:
            lines.append(f"| {label} | {statistics.median(runs):.2f} | "
                         f"{min(runs):.2f}-{max(runs):.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
