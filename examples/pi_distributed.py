"""Monte-Carlo pi with `distributed`: Julia's `@distributed (+) for i in 1:n ... end`.

    pydist -p 2 examples/pi_distributed.py [samples]
"""

import random
import sys

import pydist


def hit(_):
    x, y = random.random(), random.random()
    return 1 if x * x + y * y <= 1.0 else 0


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    hits = pydist.distributed(hit, range(n), lambda a, b: a + b)
    print(f"pi ~= {4 * hits / n:.4f} from {n:,} samples split over workers {pydist.workers()}")
