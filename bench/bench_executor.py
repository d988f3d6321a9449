"""pydist.Executor against pydist's own calls, interleaved in one process.

    python bench/bench_executor.py [--rounds 15] [--calls 400] [--tasks 5000]

`bench_peers.py` measures each system in its own time window, so on a busy machine the ratio
of two systems moves with the load. Here the forms alternate block by block on the same two
workers, and each figure is the median of its blocks:

  - W1 round trip (median of each block of `--calls` sequential calls):
    `remotecall_fetch(identity, w, 1)`, `remotecall(identity, w, 1).fetch()`,
    `executor.submit(identity, 1).result()`;
  - W2 tiny tasks, one message each (`--tasks` per block): `remotecall` round-robin then
    `fetch` all, against `executor.submit` each then `result` all.

The goal (issue 14): the Executor within 10% of pydist's own figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pydist
from peers_tasks import identity


def block_w1(call, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def block_w2(submit, get, n: int) -> float:
    t0 = time.perf_counter()
    handles = [submit(i) for i in range(n)]
    for h in handles:
        get(h)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--tasks", type=int, default=5000)
    args = ap.parse_args()
    with pydist.Executor(max_workers=2) as ex:
        w = ex._own[0]
        ws = list(ex._own)
        w1 = {
            "remotecall_fetch": lambda: pydist.remotecall_fetch(identity, w, 1),
            "remotecall + fetch": lambda: pydist.remotecall(identity, w, 1).fetch(),
            "Executor.submit + result": lambda: ex.submit(identity, 1).result(),
        }
        w2 = {
            "remotecall + fetch": (lambda i: pydist.remotecall(identity, ws[i % 2], i),
                                   lambda f: f.fetch()),
            "Executor.submit + result": (lambda i: ex.submit(identity, i), lambda f: f.result()),
        }
        for call in w1.values():  # warm up
            block_w1(call, 200)
        for submit, get in w2.values():
            block_w2(submit, get, 1000)
        r1: dict[str, list[float]] = {k: [] for k in w1}
        r2: dict[str, list[float]] = {k: [] for k in w2}
        for _ in range(args.rounds):
            for k, call in w1.items():
                r1[k].append(block_w1(call, args.calls))
            for k, (submit, get) in w2.items():
                r2[k].append(block_w2(submit, get, args.tasks))
    m1 = {k: statistics.median(v) for k, v in r1.items()}
    m2 = {k: statistics.median(v) for k, v in r2.items()}
    ex1, ex2 = m1["Executor.submit + result"], m2["Executor.submit + result"]
    print(f"# pydist.Executor against pydist's own calls: Python {sys.version.split()[0]}, "
          f"2 local workers, {args.rounds} interleaved rounds (medians of the blocks)\n")
    print("| workload | form | figure | Executor / this |\n|---|---|---:|---:|")
    for k, v in m1.items():
        print(f"| W1 round trip, median (µs, lower is better) | {k} | {v:.1f} | {ex1 / v:.2f}x |")
    for k, v in m2.items():
        print(f"| W2 {args.tasks:,} tiny tasks, one message each (tasks/s, higher is better) "
              f"| {k} | {v:,.0f} | {ex2 / v:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
