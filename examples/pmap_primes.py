"""A pmap over a real workload (counting primes per block), with retries and a progress bar.

    pydist -p 2 examples/pmap_primes.py [blocks]

Each block is checked by trial division on some worker. `retry_delays` retries a block whose
worker failed (here: a worker that dies on purpose once, to show the map still completes).
"""

import os
import signal
import sys
import tempfile

import pydist


def count_primes(lo: int, hi: int) -> int:
    count = 0
    for n in range(max(lo, 2), hi):
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            count += 1
    return count


class OneCrash:
    """Runs `count_primes`, but kills its worker the first time it sees block `target`."""

    def __init__(self, marker: str, target: int):
        self.marker, self.target = marker, target

    def __call__(self, block: int, size: int) -> int:
        if block == self.target and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return count_primes(block * size, (block + 1) * size)


if __name__ == "__main__":
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    size = 5_000
    marker = os.path.join(tempfile.mkdtemp(), "crashed")
    crash = OneCrash(marker, blocks // 2) if pydist.nworkers() > 1 and pydist.workers() != [1] else None
    work = crash or (lambda b, s: count_primes(b * s, (b + 1) * s))
    counts = pydist.pmap(work, range(blocks), [size] * blocks,
                         retry_delays=pydist.ExponentialBackOff(n=3, first_delay=0.05),
                         progress=True)  # tqdm's bar if installed, else a plain one
    print(f"{sum(counts)} primes below {blocks * size:,}; workers left: {pydist.workers()}")
