"""One adapter per benchmarked system, all with the same small interface.

The workloads in bench_peers.py are written once against `System`; an adapter says how its
system starts n workers, makes one blocking call, submits a call (and gathers results),
maps with a given chunk size, moves an array, and, where it differs from the generic way,
how all workers answer at once (W6) and how two workers bounce a token (W7).

Each system is imported inside `import_modules()` (timed as W5's "import" phase), never at
module level: this module is imported by every benchmark child before the clock starts.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import struct
import uuid

from peers_common import NotAvailable, Rendezvous, chunks, default_chunksize
import peers_tasks as T

SCRATCH = "PYDIST_BENCH_SCRATCH"  # a per-run directory under /tmp, made by the parent


def scratch_dir(sub: str) -> str:
    d = os.path.join(os.environ.get(SCRATCH) or "/tmp", sub)
    os.makedirs(d, exist_ok=True)
    return d


class System:
    key = ""           # --systems name
    label = ""         # column header
    modules: tuple = ()  # must all be importable, else the system is skipped
    dists: tuple = ()    # distributions whose versions the header shows
    notes: dict = {}     # workload -> how this system runs it (shown under the table)
    by_default = True    # in a run without --systems

    def import_modules(self):
        pass

    def start(self, n: int):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def call(self, f, *args):
        """One blocking call on a worker: W1."""
        return self.gather([self.submit(f, *args)])[0]

    def submit(self, f, *args):
        raise NotImplementedError

    def gather(self, handles) -> list:
        raise NotImplementedError

    def map(self, f, xs, chunksize):
        """The system's map. chunksize=None: its batched form (W2); 1: one task per element (W4)."""
        raise NotImplementedError

    def to_worker(self, a):
        return self.call(T.sum_array, a)

    def from_worker(self, n):
        return self.call(T.make_array, n)

    def answer_all(self, n: int):
        """W6: return once n distinct worker processes have each answered a call."""
        rv = Rendezvous(n)
        handles = [self.submit(T.rendezvous, rv.port) for _ in range(n)]
        pids = self.gather(handles)
        rv.wait(5)
        if len(set(pids)) != n:
            raise RuntimeError(f"{len(set(pids))} distinct workers answered, not {n}")

    def ping_pong(self, n: int, warmup: int) -> float:
        """W7: seconds for n round trips of a token between two workers (master only waits)."""
        raise NotAvailable


# ---------------------------------------------------------------- raw socket + pickle floor
_HDR = struct.Struct("<QI")  # body length, number of out-of-band buffers
_LEN = struct.Struct("<Q")
_BIG = 1 << 20
_WINDOW = 1000


def _buffer(n: int):
    """A receive buffer: for large ones, anonymous memory faulted in before the data arrives,
    on transparent huge pages where the kernel allows (the best pydist's receiver does), not
    a bytearray that the kernel zero-fills page by page during the transfer."""
    if n < _BIG:
        return bytearray(n)
    try:
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))  # Linux >= 5.14
        return m
    except (AttributeError, OSError, ValueError):
        return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))


class _Conn:
    """Length-prefixed pickle-5 frames over a blocking TCP socket, big buffers out of band."""

    def __init__(self, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.sent = 0  # pipelined calls since the last gather
        self.replies = []

    def send(self, obj):
        bufs = []
        body = pickle.dumps(obj, 5, buffer_callback=bufs.append)
        raws = [b.raw() for b in bufs]
        head = _HDR.pack(len(body), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws)
        self.sock.sendall(head + body)
        for r in raws:
            self.sock.sendall(r)

    def _exact(self, n, buf=None):
        buf = _buffer(n) if buf is None else buf
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError
            got += k
        return buf

    def recv(self):
        body_len, nbufs = _HDR.unpack(self._exact(_HDR.size))
        lens = [_LEN.unpack(self._exact(8))[0] for _ in range(nbufs)]
        body = self._exact(body_len)
        bufs = [self._exact(n) for n in lens]
        return pickle.loads(body, buffers=bufs)


def _raw_server(lsock):
    conn = _Conn(lsock.accept()[0])
    lsock.close()
    try:
        while True:
            f, args = conn.recv()
            conn.send(f(*args))
    except (EOFError, OSError):
        pass


def _raw_player(sock, n, warmup, first, out):
    conn = _Conn(sock)
    out.send(T._play(conn.recv, conn.send, n, warmup, first))


def _tcp_pair():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    a = socket.create_connection(ls.getsockname())
    b = ls.accept()[0]
    ls.close()
    return a, b


class Raw(System):
    key, label = "raw", "raw floor"
    notes = {
        "all": "forked echo servers; pickle protocol 5 frames over TCP loopback, large buffers out "
        "of band into pre-faulted (huge-page) memory; submits are pipelined on one socket per worker",
        "W7": "two forked processes bounce a pickled token over one TCP connection",
    }

    def start(self, n):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.procs, self.conns = [], []
        for _ in range(n):
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            p = ctx.Process(target=_raw_server, args=(ls,), daemon=True)
            p.start()
            self.conns.append(_Conn(socket.create_connection(ls.getsockname())))
            ls.close()
            self.procs.append(p)
        self._next = 0

    def stop(self):
        for c in self.conns:
            c.sock.close()
        for p in self.procs:
            p.join(10)

    def call(self, f, *args):
        c = self.conns[0]
        c.send((f, args))
        return c.recv()

    def submit(self, f, *args):
        # Pipelined, with at most _WINDOW unread replies per socket, so that a server never
        # blocks on a full socket buffer while we are still sending.
        i = self._next
        self._next = (i + 1) % len(self.conns)
        c = self.conns[i]
        if c.sent - len(c.replies) >= _WINDOW:
            c.replies.append(c.recv())
        c.send((f, args))
        c.sent += 1
        return (i, c.sent - 1)

    def gather(self, handles):
        for c in self.conns:
            while len(c.replies) < c.sent:
                c.replies.append(c.recv())
        out = [self.conns[i].replies[k] for i, k in handles]
        for c in self.conns:
            c.replies, c.sent = [], 0
        return out

    def map(self, f, xs, chunksize):
        cs = chunksize or default_chunksize(len(xs), len(self.conns))
        return [y for part in self.gather([self.submit(T.apply_chunk, f, c) for c in chunks(xs, cs)]) for y in part]

    def answer_all(self, n):
        pids = self.gather([self.submit(T.getpid) for _ in range(n)])
        assert len(set(pids)) == n

    def ping_pong(self, n, warmup):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        a, b = _tcp_pair()
        r, w = ctx.Pipe(duplex=False)
        pa = ctx.Process(target=_raw_player, args=(a, n, warmup, True, w), daemon=True)
        pb = ctx.Process(target=_raw_player, args=(b, n, warmup, False, w), daemon=True)
        pa.start()
        pb.start()
        a.close()
        b.close()
        out = [r.recv(), r.recv()]
        pa.join(10)
        pb.join(10)
        return next(x for x in out if x is not None)


# ---------------------------------------------------------------- pydist
class Pydist(System):
    key, label = "pydist", "pydist"
    modules = ("pydist",)
    dists = ("pydist",)
    notes = {
        "W1": "`remotecall_fetch(identity, w, 1)`",
        "W2": "`remotecall` round-robin then `fetch` all; batched: `pmap(f, xs, batch_size=\"auto\")`",
        "W4": "`pmap(sleep, xs)` (batch_size=1)",
        "W6": "`addprocs(n)`, `remotecall(myid, w)` to every worker, `rmprocs(ws)`; W5 and W6: "
              "workers forked by the fork server (the default start method; "
              "`PYDIST_START_METHOD=spawn` for fresh interpreters)",
        "W7": "each worker owns the RemoteChannel it takes from; puts go worker to worker",
    }

    def import_modules(self):
        import pydist

        self.pd = pydist

    def start(self, n):
        self.import_modules()
        self.ws = self.pd.addprocs(n)
        self._next = 0

    def stop(self):
        self.pd.rmprocs(self.ws, waitfor=60)

    def call(self, f, *args):
        return self.pd.remotecall_fetch(f, self.ws[0], *args)

    def submit(self, f, *args):
        w = self.ws[self._next]
        self._next = (self._next + 1) % len(self.ws)
        return self.pd.remotecall(f, w, *args)

    def gather(self, handles):
        return [h.fetch() for h in handles]

    def map(self, f, xs, chunksize):
        return self.pd.pmap(f, xs, batch_size=chunksize or "auto")

    def answer_all(self, n):
        futs = [self.pd.remotecall(self.pd.myid, w) for w in self.ws]
        ids = [f.fetch() for f in futs]
        if sorted(ids) != sorted(self.ws) or len(ids) != n:
            raise RuntimeError(f"myid answers {ids[:5]}... do not match workers")

    def ping_pong(self, n, warmup):
        pd = self.pd
        a, b = self.ws[:2]
        to_a, to_b = pd.RemoteChannel(a), pd.RemoteChannel(b)  # a Channel(1) on each, like the queues
        fa = pd.remotecall(T.channel_player, a, to_a, to_b, n, warmup, True)
        fb = pd.remotecall(T.channel_player, b, to_b, to_a, n, warmup, False)
        fb.fetch()
        return fa.fetch()


# ---------------------------------------------------------------- stdlib and loky
def _manager_ping_pong(submit, wait, n, warmup):
    """Two tasks of an executor bounce a token through a pair of Manager().Queue()s."""
    import multiprocessing as mp

    with mp.Manager() as m:
        q1, q2 = m.Queue(), m.Queue()
        ha = submit(T.queue_player, q1, q2, n, warmup, True)
        hb = submit(T.queue_player, q2, q1, n, warmup, False)
        return wait(ha, hb)


class Pool(System):
    key, label = "pool", "mp.Pool"
    modules = ("multiprocessing",)
    notes = {
        "all": "`multiprocessing.Pool(2)`, the platform's default start method",
        "W1": "`pool.apply(identity, (1,))`",
        "W2": "`apply_async` each then `get` all; batched: `pool.map` with its default chunksize "
        "(about 4 chunks per worker)",
        "W4": "`pool.map(sleep, xs, chunksize=1)`",
        "W6": "`Pool(n)`, n tasks that block until all n have connected back, `close(); join()`",
        "W7": "two `apply_async` tasks and a `Manager().Queue()` pair (each op goes through the "
        "manager process)",
    }

    def import_modules(self):
        import multiprocessing

        self.mp = multiprocessing

    def start(self, n):
        self.import_modules()
        self.pool = self.mp.Pool(n)
        self.n = n

    def stop(self):
        self.pool.close()
        self.pool.join()

    def call(self, f, *args):
        return self.pool.apply(f, args)

    def submit(self, f, *args):
        return self.pool.apply_async(f, args)

    def gather(self, handles):
        return [h.get() for h in handles]

    def map(self, f, xs, chunksize):
        return self.pool.map(f, xs, chunksize=chunksize or default_chunksize(len(xs), self.n))

    def ping_pong(self, n, warmup):
        return _manager_ping_pong(self.submit, lambda a, b: (b.get(), a.get())[1], n, warmup)


class PoolForkserver(Pool):
    """multiprocessing.Pool whose workers a fork server starts (Python 3.14's default on
    Linux): the stdlib's design beside pydist's template. Only with --systems."""

    key, label = "pool-forkserver", "mp.Pool (forkserver)"
    by_default = False
    notes = {**Pool.notes, "all": "`multiprocessing.get_context(\"forkserver\").Pool(2)`"}

    def start(self, n):
        self.import_modules()
        self.pool = self.mp.get_context("forkserver").Pool(n)
        self.n = n


class Executor(System):
    """concurrent.futures.ProcessPoolExecutor."""

    key, label = "ppe", "ProcessPoolExecutor"
    modules = ("concurrent.futures",)
    notes = {
        "all": "`ProcessPoolExecutor(2)`, the platform's default start method",
        "W1": "`submit(identity, 1).result()`",
        "W2": "`submit` each then `result` all; batched: `executor.map` with chunksize of about 4 "
        "chunks per worker",
        "W4": "`executor.map(sleep, xs)` (chunksize=1)",
        "W6": "n tasks that block until all n have connected back, `shutdown(wait=True)`",
        "W7": "two submitted tasks and a `multiprocessing.Manager().Queue()` pair",
    }

    def import_modules(self):
        import concurrent.futures

        self.cf = concurrent.futures

    def _make(self, n):
        return self.cf.ProcessPoolExecutor(n)

    def start(self, n):
        self.import_modules()
        self.ex = self._make(n)
        self.n = n

    def stop(self):
        self.ex.shutdown(wait=True)

    def call(self, f, *args):
        return self.ex.submit(f, *args).result()

    def submit(self, f, *args):
        return self.ex.submit(f, *args)

    def gather(self, handles):
        return [h.result() for h in handles]

    def map(self, f, xs, chunksize):
        return list(self.ex.map(f, xs, chunksize=chunksize or default_chunksize(len(xs), self.n)))

    def ping_pong(self, n, warmup):
        return _manager_ping_pong(self.submit, lambda a, b: (b.result(), a.result())[1], n, warmup)


class PydistExecutor(Executor):
    """pydist.Executor: the concurrent.futures interface over pydist workers."""

    key, label = "executor", "pydist.Executor"
    modules = ("pydist",)
    dists = ("pydist",)
    notes = {
        "all": "`pydist.Executor(max_workers=2)` (starts 2 pydist workers, removes them at shutdown)",
        "W1": "`submit(identity, 1).result()`",
        "W2": "`submit` each then `result` all; batched: `executor.map` with chunksize of about 4 "
        "chunks per worker",
        "W4": "`executor.map(sleep, xs)` (chunksize=1)",
        "W6": "n tasks that block until all n have connected back, `shutdown(wait=True)`",
        "W7": "two submitted tasks and a `multiprocessing.Manager().Queue()` pair",
    }

    def import_modules(self):
        import pydist

        self.pd = pydist

    def _make(self, n):
        return self.pd.Executor(max_workers=n)


class Loky(Executor):
    key, label = "loky", "loky"
    modules = ("loky",)
    dists = ("loky",)
    notes = {
        "all": "`loky.get_reusable_executor(max_workers=2)` (fresh interpreters, cloudpickle)",
        "W1": "`submit(identity, 1).result()`",
        "W2": "`submit` each then `result` all; batched: `executor.map` with chunksize of about 4 "
        "chunks per worker",
        "W4": "`executor.map(sleep, xs)` (chunksize=1)",
        "W6": "`max_workers=n`, n tasks that block until all n have connected back, `shutdown`",
        "W7": "two submitted tasks and a `multiprocessing.Manager().Queue()` pair",
    }

    def import_modules(self):
        import loky

        self.loky = loky

    def _make(self, n):
        return self.loky.get_reusable_executor(max_workers=n, timeout=600, reuse=False)


class Dask(System):
    key, label = "dask", "dask"
    modules = ("distributed", "dask.bag")
    dists = ("dask", "distributed")
    notes = {
        "all": "`LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` and a `Client`",
        "W1": "`client.submit(identity, 1, pure=False).result()` (dask batches the client's and the "
        "scheduler's messages, every 2-10 ms by default)",
        "W2": "`client.submit(..., pure=False)` each then `client.gather`; batched: a dask.bag of "
        "about 4 partitions per worker, `.map(f).compute()`",
        "W3": "to: `client.scatter(a, direct=True)` then `submit(sum, future)`; from: `submit(...).result()`",
        "W4": "`client.gather(client.map(sleep, xs, pure=False))`",
        "W6": "`LocalCluster(n_workers=n, threads_per_worker=1)`, `client.run(getpid)` on all",
        "W7": "two tasks pinned to the two workers and a `distributed.Queue` pair (each op goes "
        "through the scheduler)",
    }

    def import_modules(self):
        import dask.bag
        import distributed

        self.db, self.dd = dask.bag, distributed

    def start(self, n):
        import logging

        self.import_modules()
        self.cluster = self.dd.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
            local_directory=scratch_dir("dask"), silence_logs=logging.ERROR,
        )
        self.client = self.dd.Client(self.cluster)
        self.n = n

    def stop(self):
        self.client.close()
        self.cluster.close()

    def call(self, f, *args):
        return self.client.submit(f, *args, pure=False).result()

    def submit(self, f, *args):
        return self.client.submit(f, *args, pure=False)

    def gather(self, handles):
        return self.client.gather(handles)

    def map(self, f, xs, chunksize):
        if chunksize is None:
            cs = default_chunksize(len(xs), self.n)
            return self.db.from_sequence(xs, partition_size=cs).map(f).compute()
        return self.client.gather(self.client.map(f, xs, pure=False, batch_size=None))

    def to_worker(self, a):
        fut = self.client.scatter(a, direct=True)
        try:
            return self.client.submit(T.sum_array, fut, pure=False).result()
        finally:
            fut.release()

    def answer_all(self, n):
        self.client.wait_for_workers(n)
        pids = self.client.run(os.getpid)
        if len(set(pids.values())) != n:
            raise RuntimeError(f"{len(set(pids.values()))} workers answered, not {n}")

    def ping_pong(self, n, warmup):
        addrs = sorted(self.client.scheduler_info()["workers"])[:2]
        qa, qb = f"pp-a-{uuid.uuid4().hex}", f"pp-b-{uuid.uuid4().hex}"
        fa = self.client.submit(T.dask_queue_player, qa, qb, n, warmup, True, workers=[addrs[0]],
                                allow_other_workers=False, pure=False)
        fb = self.client.submit(T.dask_queue_player, qb, qa, n, warmup, False, workers=[addrs[1]],
                                allow_other_workers=False, pure=False)
        fb.result()
        return fa.result()


class Ray(System):
    key, label = "ray", "ray"
    modules = ("ray",)
    dists = ("ray",)
    notes = {
        "all": "`ray.init(num_cpus=2)` (local cluster, no dashboard), tasks with num_cpus=1",
        "W1": "`ray.get(f.remote(1))`",
        "W2": "`f.remote(i)` each then `ray.get(refs)`; batched: tasks over chunks of about 4 per worker",
        "W3": "to: `ray.get(f.remote(a))` (Ray puts the array in its object store); from: the "
        "driver gets a zero-copy read-only view of the object store",
        "W4": "one task per sleep, `ray.get` of all",
        "W6": "`ray.init(num_cpus=n)`, n actors (num_cpus=1), `ray.shutdown()`",
        "W7": "two tasks and a `ray.util.queue.Queue` pair (each queue is an actor)",
    }

    def import_modules(self):
        import ray

        self.ray = ray

    def start(self, n):
        self.import_modules()
        self.ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
                      _temp_dir=scratch_dir("ray"), configure_logging=False)
        self._remote = {}

    def stop(self):
        self.ray.shutdown()

    def _rf(self, f):
        rf = self._remote.get(f)
        if rf is None:
            rf = self._remote[f] = self.ray.remote(f)
        return rf

    def submit(self, f, *args):
        return self._rf(f).remote(*args)

    def gather(self, handles):
        return self.ray.get(list(handles))

    def call(self, f, *args):
        return self.ray.get(self._rf(f).remote(*args))

    def map(self, f, xs, chunksize):
        if chunksize == 1:
            return self.gather([self.submit(f, x) for x in xs])
        cs = chunksize or default_chunksize(len(xs), int(self.ray.cluster_resources()["CPU"]))
        parts = self.gather([self.submit(T.apply_chunk, f, c) for c in chunks(xs, cs)])
        return [y for p in parts for y in p]

    def answer_all(self, n):
        actor = self.ray.remote(num_cpus=1)(T.PidActor)
        self._actors = [actor.remote() for _ in range(n)]
        pids = self.ray.get([a.pid.remote() for a in self._actors])
        if len(set(pids)) != n:
            raise RuntimeError(f"{len(set(pids))} actors answered, not {n}")

    def ping_pong(self, n, warmup):
        from ray.util.queue import Queue

        q1, q2 = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
        ha = self.submit(T.queue_player, q1, q2, n, warmup, True)
        hb = self.submit(T.queue_player, q2, q1, n, warmup, False)
        return self.gather([ha, hb])[0]


class IPyParallel(System):
    key, label = "ipyparallel", "ipyparallel"
    modules = ("ipyparallel",)
    dists = ("ipyparallel",)
    notes = {
        "all": "`ipp.Cluster(n=2).start_and_connect_sync()`",
        "W1": "`rc[0].apply_sync(identity, 1)` (a direct view)",
        "W2": "load-balanced `apply_async` each then `get` all; batched: `view.map_sync` with "
        "chunksize of about 4 chunks per worker",
        "W4": "load-balanced `view.map_sync(sleep, xs)`",
        "W6": "`Cluster(n=n)`, `rc[:].apply_sync(getpid)`",
    }

    def import_modules(self):
        import ipyparallel

        self.ipp = ipyparallel

    def start(self, n):
        self.import_modules()
        self.cluster = self.ipp.Cluster(n=n, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=600)
        self.view = self.rc.load_balanced_view()
        self.n = n

    def stop(self):
        self.rc.close()
        self.cluster.stop_cluster_sync()

    def call(self, f, *args):
        return self.rc[0].apply_sync(f, *args)

    def submit(self, f, *args):
        return self.view.apply_async(f, *args)

    def gather(self, handles):
        return [h.get() for h in handles]

    def map(self, f, xs, chunksize):
        return self.view.map_sync(f, xs, chunksize=chunksize or default_chunksize(len(xs), self.n))

    def answer_all(self, n):
        pids = self.rc[:].apply_sync(os.getpid)
        if len(set(pids)) != n:
            raise RuntimeError(f"{len(set(pids))} engines answered, not {n}")


SYSTEMS = {cls.key: cls for cls in (Raw, Pydist, PydistExecutor, Pool, PoolForkserver, Executor,
                                    Loky, Dask, Ray, IPyParallel)}
# pydist's own other interfaces: shown beside pydist, not counted as its peers.
OWN = ("executor",)
