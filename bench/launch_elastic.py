"""Elastic launch benchmark: workers that dial in from 3 namespace hosts.

    sudo .ci/infra/up.sh                      # sshd + hosts h1..h3 (once)
    python bench/launch_elastic.py [--reps 3]

`measure()` is the seconds from starting 6 dial-in workers -- 2 per host on h1..h3: one ssh
session per host reads the cookie from its stdin into PYDIST_COOKIE and starts two
`python -m pydist.worker --join 10.200.0.254:PORT` -- until all 6 have joined an
`ElasticManager` and answered a call. The ssh sessions' start-up (~0.3-0.6 s here) is part
of it, as it is of `bench_ssh.py`'s "start 3 hosts x 2" (also one session per host), the
figure to compare with. `--session-per-worker` starts each worker in its own ssh session
instead (6 sessions).
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


def measure(session_per_worker: bool = False) -> float:
    """Seconds from starting 3 hosts x 2 dial-in workers (over ssh) until all 6 answer."""
    em = pydist.ElasticManager(addr=MASTER_ON_BRIDGE, port=0)
    worker = f"{sys.executable} -m pydist.worker --join {MASTER_ON_BRIDGE}:{em.port}"
    if session_per_worker:  # the worker reads the cookie from stdin
        per_session, remote = 1, f"cd {os.getcwd()} && PYTHONPATH={SRC} exec {worker}"
    else:  # the cookie goes into the environment, never on a command line
        per_session = PER_HOST
        remote = (f"cd {os.getcwd()} && read -r c && export PYDIST_COOKIE=\"$c\" "
                  f"PYTHONPATH={SRC} && {{ " + " & ".join([worker] * PER_HOST) + " & wait; }")
    cookie = pydist.cluster_cookie().encode() + b"\n"
    sessions: list[subprocess.Popen] = []
    try:
        t0 = time.perf_counter()
        for host in HOSTS:
            for _ in range(PER_HOST // per_session):
                proc = subprocess.Popen(["ssh", "-F", SSH_CONFIG, host, remote],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                sessions.append(proc)
                proc.stdin.write(cookie)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
        n = len(HOSTS) * PER_HOST
        pids = em.wait_for_workers(n, timeout=60)
        assert sorted(pydist.remotecall_fetch(pydist.myid, p) for p in pids) == pids
        return time.perf_counter() - t0
    finally:
        mine = [p for p in em.active if p in pydist.procs()]
        if mine:
            pydist.rmprocs(mine, waitfor=60)
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
    ap.add_argument("--session-per-worker", action="store_true",
                    help="one ssh session per worker (6), not per host (3)")
    args = ap.parse_args()
    runs = [measure(args.session_per_worker) for _ in range(args.reps)]
    how = "an ssh session per worker" if args.session_per_worker else "an ssh session per host"
    print(f"start 3 hosts x {PER_HOST} dial-in workers ({how}) until all answer: "
          f"median {statistics.median(runs):.2f} s (runs: "
          + ", ".join(f"{r:.2f}" for r in runs) + ")")


if __name__ == "__main__":
    main()
