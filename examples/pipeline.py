"""A producer/consumer pipeline over RemoteChannels.

    pydist -p 2 examples/pipeline.py

The first worker produces numbers into a channel that lives on the master, the second squares
them into a results channel; the master collects. `None` marks the end of the stream.
"""

from __future__ import annotations

import pydist
from pydist import Channel, RemoteChannel


def produce(jobs: RemoteChannel[int | None], n: int) -> int:
    for i in range(n):
        jobs.put(i)
    jobs.put(None)
    return n


def square_all(jobs: RemoteChannel[int | None], results: RemoteChannel[int]) -> int:
    done = 0
    while (x := jobs.take()) is not None:
        results.put(x * x)
        done += 1
    results.close()
    return done


if __name__ == "__main__":
    n = 100
    jobs: RemoteChannel[int | None] = RemoteChannel(lambda: Channel(10))  # bounded: the producer waits
    results: RemoteChannel[int] = RemoteChannel(lambda: Channel(10))
    ws = pydist.workers()
    producer = pydist.remotecall(produce, ws[0], jobs, n)
    consumer = pydist.remotecall(square_all, ws[-1], jobs, results)
    total = sum(results)                             # iterates until the consumer closes it
    print(f"produced {producer.fetch()}, squared {consumer.fetch()}, sum of squares {total}")
    assert total == sum(i * i for i in range(n))
