"""SSH benchmark: starting workers on 3 namespace hosts over real sshd, and the round trip to
a worker on another "host" against one on this machine.

    sudo .ci/infra/up.sh                      # sshd + hosts h1..h3 (once)
    python bench/bench_ssh.py [--reps 3] [--calls 2000] [--json out.json]

Measures:
  - `addprocs(["h1", "h2", "h3"], count 2 each)` until all 6 answer, then `rmprocs`, for
    the plain, `tunnel=True` and `tunnel=True, multiplex=True` modes;
  - the median and p99 round trip of a no-op `remotecall_fetch` to a worker on h1 (direct
    and tunnelled) and to a local worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import pydist

SSHFLAGS = ["-F", os.path.join(os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra"),
                               "ssh-client", "config")]
MODES = {"plain": {}, "tunnel": {"tunnel": True},
         "tunnel+multiplex": {"tunnel": True, "multiplex": True}}


def identity(x):
    return x


def time_addprocs(mode: dict, reps: int) -> dict:
    starts, stops = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        pids = pydist.addprocs([("h1", 2), ("h2", 2), ("h3", 2)], sshflags=SSHFLAGS, **mode)
        assert sorted(pydist.remotecall_fetch(pydist.myid, p) for p in pids) == sorted(pids)
        t1 = time.perf_counter()
        pydist.rmprocs(pids, waitfor=60)
        t2 = time.perf_counter()
        assert len(pids) == 6
        starts.append(t1 - t0)
        stops.append(t2 - t1)
    return {"addprocs_s": starts, "rmprocs_s": stops}


def round_trips(pid: int, calls: int) -> dict:
    for _ in range(200):
        pydist.remotecall_fetch(identity, pid, 1)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        pydist.remotecall_fetch(identity, pid, 1)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"median_us": statistics.median(samples) * 1e6,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()

    results: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for name, mode in MODES.items():
        results[f"start 3 hosts x 2 ({name})"] = time_addprocs(mode, args.reps)

    [local] = pydist.addprocs(1)
    [remote] = pydist.addprocs(["h1"], sshflags=SSHFLAGS)
    [tunnelled] = pydist.addprocs(["h2"], sshflags=SSHFLAGS, tunnel=True)
    for label, pid in (("local worker", local), ("worker on h1", remote),
                       ("worker on h2 via tunnel", tunnelled)):
        results[f"round trip, {label}"] = round_trips(pid, args.calls)
    pydist.rmprocs(pydist.workers(), waitfor=60)

    print(f"# pydist SSH benchmark: Python {results['python']}, {results['cpus']} CPUs")
    print("| workload | result |\n|---|---|")
    for key, value in results.items():
        if key.startswith("start"):
            s, r = value["addprocs_s"], value["rmprocs_s"]
            print(f"| {key}: addprocs until all answer | {min(s):.2f}-{max(s):.2f} s "
                  f"(rmprocs {min(r):.2f}-{max(r):.2f} s) |")
        elif key.startswith("round trip"):
            print(f"| {key} | median {value['median_us']:.0f} µs, p99 {value['p99_us']:.0f} µs |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
