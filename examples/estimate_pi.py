"""Monte-Carlo estimate of pi on all workers.

    pydist -p 2 examples/estimate_pi.py [samples]

Each worker throws darts at the unit square and counts the hits inside the quarter circle;
the master adds up the counts. The dart function is defined here, in __main__, so pydist ships
it to the workers by value.
"""

import random
import sys
import time

import pydist


def count_hits(n: int, seed: int) -> int:
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        x, y = rng.random(), rng.random()
        hits += x * x + y * y <= 1.0
    return hits


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 4_000_000
    workers = pydist.workers()
    per_worker = samples // len(workers)
    t0 = time.perf_counter()
    futures = [pydist.remotecall(count_hits, w, per_worker, seed) for seed, w in enumerate(workers)]
    hits = sum(f.fetch() for f in futures)
    elapsed = time.perf_counter() - t0
    pi = 4 * hits / (per_worker * len(workers))
    print(f"pi ~= {pi:.5f} from {per_worker * len(workers):,} samples "
          f"on {len(workers)} worker(s) {workers} in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
