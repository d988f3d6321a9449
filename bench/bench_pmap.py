"""pmap benchmark, 2 local workers.

    python bench/bench_pmap.py [--tasks 20000] [--sleeps 200]

  - 20,000 tiny elements with batch_size=1 and with batch_size="auto" (tasks/s);
  - 200 x 10 ms sleeps (efficiency against the ideal 200 * 10 ms / 2 workers = 1.0 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def inc(x):
    return x + 1


def main() -> None:
    import pydist

    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--sleeps", type=int, default=200)
    opts = parser.parse_args()
    ws = pydist.addprocs(2)
    pydist.pmap(inc, range(100))  # warm up
    rows = []
    for batch in (1, "auto"):
        t = time.perf_counter()
        out = pydist.pmap(inc, range(opts.tasks), batch_size=batch)
        dt = time.perf_counter() - t
        assert out[-1] == opts.tasks
        rows.append((f"pmap {opts.tasks:,} tiny, batch_size={batch!r}", f"{opts.tasks / dt:,.0f} tasks/s"))
    ideal = opts.sleeps * 0.01 / len(ws)
    t = time.perf_counter()
    pydist.pmap(time.sleep, [0.01] * opts.sleeps)
    dt = time.perf_counter() - t
    rows.append((f"pmap {opts.sleeps} x 10 ms sleeps", f"{dt:.3f} s, {100 * ideal / dt:.1f}% efficiency"))
    print(f"pydist pmap benchmark: Python {platform.python_version()}, {os.cpu_count()} cores")
    print("| workload | pydist |")
    print("|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} |")
    pydist.rmprocs(ws, waitfor=30)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
