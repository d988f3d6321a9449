"""MPI launch benchmark: `mpiexec ... python -m pydist.mpi` with 6 worker ranks on the 3
namespace hosts (h1..h3, 2 ranks each, orted started over ssh) and rank 0, the master, on
this machine: seconds from starting mpiexec until all 6 workers have answered a call.

    sudo .ci/infra/up.sh                      # sshd, hosts h1..h3, Open MPI + mpi4py (once)
    python bench/launch_mpi.py [--reps 3]

`measure()` returns one such time (the job's teardown after that is not counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import pydist

INFRA = os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra")
SRC = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))
HOSTS = "h1:2,h2:2,h3:2"
MASTER = """
import time, pydist
pids = pydist.workers()
assert pids == [2, 3, 4, 5, 6, 7], pids
assert [pydist.remotecall_fetch(pydist.myid, p) for p in pids] == pids
print("READY", repr(time.time()), flush=True)
"""


def command() -> list[str]:
    """mpiexec: rank 0 on this machine, then 2 ranks on each of h1, h2, h3."""
    me = os.uname().nodename
    return ["mpiexec", "--host", f"{me}:1,{HOSTS}", "-n", "7",
            "--mca", "plm_rsh_args", f"-F {os.path.join(INFRA, 'ssh-client', 'config')}",
            "--mca", "oob_tcp_if_include", "10.200.0.0/24",
            "--mca", "btl_tcp_if_include", "10.200.0.0/24",
            "-x", "PYTHONPATH",
            sys.executable, "-m", "pydist.mpi", "-c", MASTER]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    return env


def measure() -> float:
    """Seconds from starting mpiexec (7 ranks: the master here, 2 workers on each of h1, h2,
    h3) until every worker has answered a call."""
    t0 = time.time()
    done = subprocess.run(command(), env=environment(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    ready = [line for line in done.stdout.splitlines() if line.startswith("READY ")]
    if done.returncode != 0 or not ready:
        raise RuntimeError(f"the MPI launch failed (exit status {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return float(ready[0].split()[1]) - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    times = [measure() for _ in range(args.reps)]
    print(f"mpiexec, master here + 3 hosts x 2 worker ranks, until all 6 answer: "
          f"median {statistics.median(times):.2f} s (runs: "
          f"{', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
