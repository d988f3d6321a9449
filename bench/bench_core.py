"""Core benchmark: pydist against a raw socket+pickle floor, with 2 local workers.

    python bench/bench_core.py [--calls 3000] [--tasks 20000] [--mb 100] [--json out.json]

Measures, in one run:
  - round-trip latency of a no-op `remotecall_fetch` (median, p99) vs a raw ping-pong;
  - throughput of tiny tasks: N `remotecall`s round-robin over the workers, then fetch all;
  - bandwidth of a NumPy array to a worker and back from it, vs raw socket bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import socket
import statistics
import struct
import sys
import time

_LEN = struct.Struct("<Q")


def identity(x):
    return x


def nbytes(a):
    return a.nbytes


_cache = {}


def make_array(mb: int):
    import numpy as np

    a = _cache.get(mb)
    if a is None:
        a = _cache[mb] = np.ones(mb * 1024 * 1024 // 8)
    return a


# ---------------------------------------------------------------- raw floor
def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return buf


def _raw_server(port_q):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    port_q.put(ls.getsockname()[1])
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            (n,) = _LEN.unpack(_recv_exact(conn, 8))
            if n & (1 << 63):  # raw bytes, no pickle: the bandwidth floor
                data = _recv_exact(conn, n & ~(1 << 63))
                conn.sendall(_LEN.pack(len(data)))
                continue
            f, args = pickle.loads(_recv_exact(conn, n))
            out = pickle.dumps(f(*args), 5)
            conn.sendall(_LEN.pack(len(out)) + out)
    except (EOFError, OSError):
        pass


def raw_floor(calls: int, mb: int) -> dict:
    q = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_raw_server, args=(q,), daemon=True)
    proc.start()
    port = q.get(timeout=30)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(f, *args):
        d = pickle.dumps((f, args), 5)
        s.sendall(_LEN.pack(len(d)) + d)
        (n,) = _LEN.unpack(_recv_exact(s, 8))
        return pickle.loads(_recv_exact(s, n))

    for _ in range(200):
        call(identity, 1)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call(identity, 1)
        times.append(time.perf_counter() - t)
    payload = bytes(mb * 1024 * 1024)
    to_s = float("inf")
    for _ in range(3):  # raw bytes over loopback: sendall of the buffer, recv_into a new one
        t = time.perf_counter()
        s.sendall(_LEN.pack(len(payload) | (1 << 63)))
        s.sendall(payload)
        _recv_exact(s, 8)
        to_s = min(to_s, time.perf_counter() - t)
    s.close()
    proc.join(10)
    return {"latency": _stats(times), "to_worker_MBps": mb / to_s}


def _stats(times):
    times = sorted(times)
    return {"median_us": statistics.median(times) * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


# ---------------------------------------------------------------- pydist
def pydist_bench(calls: int, tasks: int, mb: int) -> dict:
    import numpy as np

    import pydist

    t = time.perf_counter()
    ws = pydist.addprocs(2)
    start_s = time.perf_counter() - t
    w = ws[0]
    for _ in range(200):
        pydist.remotecall_fetch(identity, w, 1)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        pydist.remotecall_fetch(identity, w, 1)
        times.append(time.perf_counter() - t)

    t = time.perf_counter()
    futures = [pydist.remotecall(identity, ws[i % 2], i) for i in range(tasks)]
    results = [f.fetch() for f in futures]
    tput_s = time.perf_counter() - t
    assert results == list(range(tasks))
    del futures

    a = np.ones(mb * 1024 * 1024 // 8)
    pydist.remotecall_fetch(nbytes, w, a[:10])
    best_to = best_from = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        assert pydist.remotecall_fetch(nbytes, w, a) == a.nbytes
        best_to = min(best_to, time.perf_counter() - t)
        t = time.perf_counter()
        b = pydist.remotecall_fetch(make_array, w, mb)
        best_from = min(best_from, time.perf_counter() - t)
        assert b.nbytes == a.nbytes
        del b
    pydist.rmprocs(ws, waitfor=30)
    return {
        "addprocs_2_s": start_s,
        "latency": _stats(times),
        "tasks_per_s": tasks / tput_s,
        "to_worker_MBps": mb / best_to,
        "from_worker_MBps": mb / best_from,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    raw = raw_floor(opts.calls, opts.mb)
    pd = pydist_bench(opts.calls, opts.tasks, opts.mb)
    ratio = pd["latency"]["median_us"] / raw["latency"]["median_us"]
    rows = [
        ("round trip median (µs)", f"{raw['latency']['median_us']:.1f}", f"{pd['latency']['median_us']:.1f}", f"{ratio:.2f}x floor (target <= 1.5x)"),
        ("round trip p99 (µs)", f"{raw['latency']['p99_us']:.1f}", f"{pd['latency']['p99_us']:.1f}", ""),
        (f"{opts.tasks} tiny tasks (tasks/s)", "", f"{pd['tasks_per_s']:,.0f}", "target >= 20,000"),
        (f"{opts.mb} MB array to worker (MB/s)", f"{raw['to_worker_MBps']:,.0f}", f"{pd['to_worker_MBps']:,.0f}", "target >= 1,500"),
        (f"{opts.mb} MB array from worker (MB/s)", "", f"{pd['from_worker_MBps']:,.0f}", "target >= 1,500"),
        ("addprocs(2) (s)", "", f"{pd['addprocs_2_s']:.3f}", ""),
    ]
    print(f"pydist core benchmark: Python {platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}")
    print("| workload | raw socket (+pickle) | pydist | note |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"raw": raw, "pydist": pd}, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
