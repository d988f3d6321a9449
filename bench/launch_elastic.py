"""Elastic launch benchmark: workers that dial in from 3 namespace hosts.

    sudo .ci/infra/up.sh                      # sshd + hosts h1..h3 (once)
    python bench/launch_elastic.py [--reps 3]

`measure()` is the seconds from starting 6 dial-in workers -- 2 per host on h1..h3, each
`python -m pydist.worker --join 10.200.0.254:PORT` in its own ssh session, the cookie on
its stdin -- until all 6 have joined an `ElasticManager` and answered a call. The ssh
sessions' own start-up (~0.3-0.6 s each here) is part of it, as it is of `bench_ssh.py`'s
`addprocs` figure, which is the one to compare with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import pydist

SSH_CONFIG = os.path.join(os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra"), "ssh-client",
                          "config")
HOSTS = ["h1", "h2", "h3"]
PER_HOST = 2
MASTER_ON_BRIDGE = "10.200.0.254"  # the master's side of the hosts' bridge
SRC = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))


def measure() -> float:
    """Seconds from starting 3 hosts x 2 dial-in workers (over ssh) until all 6 answer."""
    em = pydist.ElasticManager(addr=MASTER_ON_BRIDGE, port=0)
    remote = (f"cd {os.getcwd()} && PYTHONPATH={SRC} exec {sys.executable} -m pydist.worker "
              f"--join {MASTER_ON_BRIDGE}:{em.port}")
    cookie = pydist.cluster_cookie().encode() + b"\n"
    sessions: list[subprocess.Popen] = []
    try:
        t0 = time.perf_counter()
        for host in HOSTS:
            for _ in range(PER_HOST):
                proc = subprocess.Popen(["ssh", "-F", SSH_CONFIG, host, remote],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                sessions.append(proc)
                proc.stdin.write(cookie)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
        n = len(HOSTS) * PER_HOST
        pids = em.wait_for_workers(n, timeout=120)
        assert sorted(pydist.remotecall_fetch(pydist.myid, p) for p in pids) == pids
        elapsed = time.perf_counter() - t0
        pydist.rmprocs(pids, waitfor=60)
        return elapsed
    finally:
        em.close()
        for proc in sessions:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    runs = [measure() for _ in range(args.reps)]
    print(f"start 3 hosts x {PER_HOST} dial-in workers until all answer: "
          f"median {statistics.median(runs):.2f} s (runs: "
          + ", ".join(f"{r:.2f}" for r in runs) + ")")


if __name__ == "__main__":
    main()
