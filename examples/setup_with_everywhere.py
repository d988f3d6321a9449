"""Set up every worker with `everywhere`, then use what it defined.

    pydist -p 2 examples/setup_with_everywhere.py
"""

import pydist

# Code run in __main__ on every process (the master included).
pydist.everywhere("""
import math
import os
TABLE = {n: math.factorial(n) for n in range(20)}
""")


@pydist.everywhere          # define this function on every process, as in Julia
def lookup(n):
    return TABLE[n], os.getpid()  # noqa: F821 (defined by the everywhere block above)


if __name__ == "__main__":
    for w in pydist.workers():
        value, pid = pydist.everywhere("lookup(10)", procs=w)
        print(f"worker {w} (os pid {pid}): 10! = {value}")
    print("on the master:", lookup(5)[0])
