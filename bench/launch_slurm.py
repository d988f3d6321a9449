"""Slurm launch benchmark: `addprocs(SlurmManager(...))` for 3 hosts x 2 workers (6 tasks,
2 per node, partition `hosts`), until every worker has answered a remote call.

    sudo .ci/infra/up.sh                 # Slurm with nodes h1..h3 (once)
    python bench/launch_slurm.py [--reps 3]

Modes:
  - "outside": from this process, SlurmManager submits the job (srun) and waits for it;
  - "inside": within an allocation (`salloc -p hosts -N3 --ntasks-per-node=2`), the master
    runs `addprocs(SlurmManager())`: one job step. Only the addprocs is timed, not salloc.

`measure(mode)` returns the seconds of one such addprocs (the workers are removed after,
untimed, and the job is gone from squeue before it returns).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import pydist

JOB_NAME = "pydist-bench"
PARTITION = "hosts"
MODES = ("outside", "inside")


def _addprocs_seconds(manager: "pydist.SlurmManager") -> float:
    """Time addprocs until all workers answer; then remove them (untimed)."""
    t0 = time.perf_counter()
    pids = pydist.addprocs(manager, timeout=120)
    answered = sorted(pydist.remotecall_fetch(pydist.myid, p) for p in pids)
    seconds = time.perf_counter() - t0
    assert answered == sorted(pids) and len(pids) == 6, (pids, answered)
    pydist.rmprocs(pids, waitfor=60)
    return seconds


def _wait_job_gone(name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                             text=True, timeout=30).stdout
        if not out.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"job {name} still in squeue after {timeout} s")


def measure(mode: str) -> float:
    """Seconds of `addprocs` for 3 hosts x 2 workers until all answer a remotecall; `mode`
    is "outside" (SlurmManager submits the job) or "inside" (in an salloc allocation)."""
    if mode == "outside":
        seconds = _addprocs_seconds(pydist.SlurmManager(
            6, partition=PARTITION, ntasks_per_node=2, time="00:05:00", job_name=JOB_NAME))
        _wait_job_gone(JOB_NAME)
        return seconds
    if mode == "inside":
        root = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH")] if p)
        done = subprocess.run(
            ["salloc", "-p", PARTITION, "-N3", "--ntasks-per-node=2", "-t", "5",
             "-J", JOB_NAME, sys.executable, os.path.abspath(__file__), "--inside-once"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("SECONDS ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"inside run failed ({done.returncode}):\n{done.stdout}"
                               f"{done.stderr}")
        _wait_job_gone(JOB_NAME)
        return float(lines[-1].split()[1])
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inside-once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside_once:  # run by measure("inside"), within salloc
        print(f"SECONDS {_addprocs_seconds(pydist.SlurmManager()):.4f}", flush=True)
        return
    for mode in MODES:
        runs = [measure(mode) for _ in range(args.reps)]
        print(f"addprocs 3 hosts x 2 workers via Slurm ({mode}): median "
              f"{statistics.median(runs):.3f} s, runs {', '.join(f'{r:.3f}' for r in runs)}")


if __name__ == "__main__":
    main()
