"""pydist against its peers: the same workloads, side by side, in one invocation.

    pip install -e '.[bench]'                      # loky, dask[distributed], ray, numpy, psutil
    python bench/bench_peers.py                    # full run (~10 min on 2 cores) -> bench/RESULTS.md
    python bench/bench_peers.py --quick --out /tmp/peers.md      # tiny sizes (~1.5 min), to test the harness
    python bench/bench_peers.py --only W1,W3 --systems pydist,loky
    python bench/bench_peers.py --scale            # cost against 2..128 workers, beside mp.Pool (peers_scale.py)

Systems (columns): a raw socket+pickle floor (forked echo servers, see peers_systems.Raw),
pydist, pydist.Executor (pydist's concurrent.futures interface: beside pydist, not a peer),
multiprocessing.Pool, concurrent.futures.ProcessPoolExecutor, loky, dask.distributed
(LocalCluster), ray (local), ipyparallel. A system that is not installed is skipped and says
so. Every system gets 2 workers (W6: 128) and runs the same functions (bench/peers_tasks.py),
pickled by reference.

Workloads (rows):
  W1  no-op round trip: median and p99 of >= 2000 blocking calls of identity(1), 3 repetitions;
  W2  20,000 tiny tasks: one message per task (submit all, then gather all), and the system's
      batched map (pydist: pmap batch_size="auto"; others: about 4 chunks per worker), whose
      repetitions are blocks of back-to-back maps lasting about 0.25 s (at most 50 maps),
      after one cold map timed apart (in the JSON details);
  W3  a 100 MB float64 NumPy array to a worker (summed there) and from one (created there);
      MB/s, best of 3;
  W4  a map of 200 x 10 ms sleeps, one task per element; efficiency against the 1.0 s ideal;
  W5  import, start 2 workers, first call, shutdown: each phase timed in a fresh process
      (median of 3 processes), plus the whole process's wall time (interpreter start and exit);
  W6  start 128 workers on this machine until all answer a call at once (after the system's
      import, which W5 times), then shut them down; RSS and USS of everything the system
      started, per worker;
  W7  worker-to-worker ping-pong: two workers bounce a token 1000 times through a pair of
      channels/queues while the master only starts them and waits; µs per round trip.

How it runs: each system runs in its own child process (`--child --system NAME`), in its own
session, with PYTHONPATH=bench/ and a marker variable in its environment. The parent bounds
each workload (--workload-timeout, default 150 s) and each system's W1-W4+W7 together
(--system-timeout, 300 s); W5 and W6 run one fresh child per repetition (--w5-timeout, 60 s,
and --w6-timeout, 120 s, each; W6 once only for a system whose first took over 20 s). A
child that overruns a bound (or lets the machine's free memory fall under 1.5 GB) is killed
with its whole process tree: every process seen below it while it ran, its process group,
and any process carrying the marker. The cell then says 'timeout' and the remaining
workloads run in a new child. After every child, and at the end, processes that carry the
marker are reported (as leftovers) and killed.
Exceptions in one workload show as 'error: ...' in its cells. Numbers are medians over
repetitions unless said otherwise; W2, W4 and W7 run fewer than 3 repetitions when 3 would
take over 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from peers_common import (  # noqa: E402
    MARKER, NotAvailable, alive, describe, descendants, marked_processes, median, p99,
    remove_leaked_shm, repeat, shm_names, short_error, terminate_then_kill, time_calls, timed, tree_memory, wait_exit,
)
from peers_systems import OWN, SCRATCH, SYSTEMS  # noqa: E402
import peers_tasks as T  # noqa: E402

WORKERS = 2
MAIN_WORKLOADS = ("W1", "W2", "W3", "W4", "W7")  # share one child per system
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")
REP_BUDGET = 30.0  # W2, W4, W7: fewer repetitions when they would take longer than this (s)
W6_REP_BUDGET = 20.0  # W6: one fresh process only for a system whose first took longer (s)
BATCHED_BLOCK = 0.25  # W2 batched: one repetition times this many seconds of maps...
MAX_MAPS_PER_BLOCK = 50  # ... but at most this many maps


@dataclass(frozen=True)
class Sizes:
    calls: int = 2000
    warm_calls: int = 200
    reps: int = 3
    tasks: int = 20_000
    mb: int = 100
    sleeps: int = 200
    scale: int = 128
    pingpong: int = 1000
    w5_reps: int = 3
    w3_reps: int = 5
    w6_reps: int = 3


FULL = Sizes()
QUICK = Sizes(calls=200, warm_calls=20, reps=1, tasks=1000, mb=10, sleeps=40, scale=16, pingpong=100, w5_reps=1,
              w3_reps=2, w6_reps=1)


# ---------------------------------------------------------------- the table's rows
@dataclass(frozen=True)
class Metric:
    workload: str
    key: str
    label: str  # formatted with the Sizes
    unit: str   # us, tasks/s, MB/s, s, %, MB, rt/s
    better: str  # "lower" or "higher"


METRICS = [
    Metric("W1", "median_us", "W1 round trip, median (µs)", "us", "lower"),
    Metric("W1", "p99_us", "W1 round trip, p99 (µs)", "us", "lower"),
    Metric("W2", "each_tps", "W2 {tasks:,} tiny tasks, one message each (tasks/s)", "tasks/s", "higher"),
    Metric("W2", "batched_tps", "W2 {tasks:,} tiny tasks, batched map (tasks/s)", "tasks/s", "higher"),
    Metric("W3", "to_MBps", "W3 {mb} MB array to a worker, summed there (MB/s)", "MB/s", "higher"),
    Metric("W3", "from_MBps", "W3 {mb} MB array from a worker, created there (MB/s)", "MB/s", "higher"),
    Metric("W3", "to_worst_MBps", "W3 to a worker, worst of {w3_reps} repetitions (MB/s)", "MB/s", "higher"),
    Metric("W3", "from_worst_MBps", "W3 from a worker, worst of {w3_reps} repetitions (MB/s)", "MB/s", "higher"),
    Metric("W4", "seconds", "W4 map of {sleeps} x 10 ms sleeps (s)", "s", "lower"),
    Metric("W4", "efficiency", "W4 efficiency vs the {ideal:.2f} s ideal (%)", "%", "higher"),
    Metric("W4", "ceiling", "W4 ceiling: the same sleeps back to back in one task per worker (%)",
           "%", "higher"),
    Metric("W5", "import_s", "W5 import (s)", "s", "lower"),
    Metric("W5", "start_s", "W5 start 2 workers (s)", "s", "lower"),
    Metric("W5", "first_call_s", "W5 first call (s)", "s", "lower"),
    Metric("W5", "shutdown_s", "W5 shutdown (s)", "s", "lower"),
    Metric("W5", "total_s", "W5 total of the four phases (s)", "s", "lower"),
    Metric("W5", "process_s", "W5 whole process, with interpreter start and exit (s)", "s", "lower"),
    Metric("W6", "start_s", "W6 start {scale} workers until all answer (s)", "s", "lower"),
    Metric("W6", "stop_s", "W6 shut down {scale} workers (s)", "s", "lower"),
    Metric("W6", "rss_MB", "W6 RSS per idle worker (MB)", "MB", "lower"),
    Metric("W6", "uss_MB", "W6 USS per idle worker (MB)", "MB", "lower"),
    Metric("W7", "us_per_rt", "W7 worker-to-worker ping-pong (µs per round trip)", "us", "lower"),
    Metric("W7", "rt_per_s", "W7 worker-to-worker ping-pong (round trips/s)", "rt/s", "higher"),
]


def metric_keys(workload):
    return [m.key for m in METRICS if m.workload == workload]


# ---------------------------------------------------------------- workloads (run in a child)
class running:
    """`with running(system, n):` start n workers, stop them afterwards."""

    def __init__(self, system, n):
        self.system, self.n = system, n

    def __enter__(self):
        self.system.start(self.n)
        return self.system

    def __exit__(self, *exc):
        try:
            self.system.stop()
        except Exception as e:  # noqa: BLE001 - the measurement stands; say so on stderr
            print(f"{self.system.key}: stop failed: {short_error(e)}", file=sys.stderr)


def attempt(results, keys, fn):
    """Run one sub-measure; its failure fills only its own cells."""
    try:
        results.update(fn())
    except NotAvailable:
        results.update({k: "n/a" for k in keys})
    except Exception as e:  # noqa: BLE001
        results.update({k: "error: " + short_error(e) for k in keys})


def warm(s, z):
    s.gather([s.submit(T.identity, i) for i in range(4 * WORKERS)])
    for _ in range(z.warm_calls):
        s.call(T.identity, 1)


def w1(s, z):
    with running(s, WORKERS):
        warm(s, z)
        meds, tails = [], []
        for _ in range(z.reps):
            ts = time_calls(lambda: s.call(T.identity, 1), z.calls)
            meds.append(median(ts) * 1e6)
            tails.append(p99(ts) * 1e6)
    return {"median_us": median(meds), "p99_us": median(tails), "detail": {"median_us": meds, "p99_us": tails}}


def w2(s, z):
    xs = list(range(z.tasks))
    want = [x + 1 for x in xs]
    out = {}
    with running(s, WORKERS):
        warm(s, z)

        def rate(run):
            dt, got = timed(run)
            assert list(got) == want, "wrong results"
            return z.tasks / dt

        def each():
            rates = repeat(lambda: rate(lambda: s.gather([s.submit(T.inc, x) for x in xs])), z.reps, REP_BUDGET)
            return {"each_tps": median(rates), "detail_each_tps": rates}

        def batched():
            # One map takes milliseconds: a repetition is a block of maps that lasts about
            # BATCHED_BLOCK seconds, so that one slow map on a noisy machine does not decide
            # the row. The first (cold) map is timed apart and kept in the details.
            first = rate(lambda: s.map(T.inc, xs, None))
            k = max(1, min(MAX_MAPS_PER_BLOCK, round(BATCHED_BLOCK * first / z.tasks)))

            def block():
                t = time.perf_counter()
                outs = [s.map(T.inc, xs, None) for _ in range(k)]
                dt = time.perf_counter() - t
                assert all(list(got) == want for got in outs), "wrong results"
                return k * z.tasks / dt

            rates = repeat(block, z.reps, REP_BUDGET)
            return {"batched_tps": median(rates), "detail_batched_tps": rates,
                    "detail_batched_first_map_tps": first, "detail_batched_maps_per_rep": k}

        attempt(out, ["each_tps"], each)
        attempt(out, ["batched_tps"], batched)
    return out


def w3(s, z):
    import numpy as np

    n = z.mb * 1024 * 1024 // 8
    a = np.ones(n)
    out = {}
    with running(s, WORKERS):
        warm(s, z)
        s.to_worker(a[:1000])
        s.from_worker(1000)

        def spread(key, transfer, check):
            """Best and worst of the repetitions, every one in the details (the first,
            on buffers not used yet, is in the worst)."""
            rates = []
            for _ in range(z.w3_reps):
                dt, got = timed(transfer)
                check(got)
                del got
                rates.append(z.mb / dt)
            return {f"{key}_MBps": max(rates), f"{key}_worst_MBps": min(rates), f"detail_{key}_MBps": rates}

        def sum_is_n(got):
            assert got == n, f"sum {got} != {n}"

        def same_size(got):
            assert got.nbytes == a.nbytes

        def to():
            return spread("to", lambda: s.to_worker(a), sum_is_n)

        def back():
            return spread("from", lambda: s.from_worker(n), same_size)

        attempt(out, ["to_MBps", "to_worst_MBps"], to)
        attempt(out, ["from_MBps", "from_worst_MBps"], back)
    return out


def w4(s, z):
    ideal = z.sleeps * 0.01 / WORKERS
    with running(s, WORKERS):
        warm(s, z)
        times = repeat(lambda: timed(s.map, T.sleep, [0.01] * z.sleeps, 1)[0], z.reps, REP_BUDGET)
        # What the machine allows: each worker sleeps its share back to back, no messages.
        share = z.sleeps // WORKERS
        alone = repeat(lambda: timed(lambda: s.gather([s.submit(T.sleep_many, 0.01, share)
                                                       for _ in range(WORKERS)]))[0],
                       z.reps, REP_BUDGET)
    t = median(times)
    return {"seconds": t, "efficiency": 100 * ideal / t, "ceiling": 100 * ideal / median(alone),
            "detail": times, "detail_ceiling_s": alone}


def w5(s, z):
    clock = time.perf_counter
    t0 = clock()
    s.import_modules()
    t1 = clock()
    s.start(WORKERS)
    t2 = clock()
    assert s.call(T.identity, 1) == 1
    t3 = clock()
    s.stop()
    t4 = clock()
    return {"import_s": t1 - t0, "start_s": t2 - t1, "first_call_s": t3 - t2, "shutdown_s": t4 - t3, "total_s": t4 - t0}


def w6(s, z):
    clock = time.perf_counter
    s.import_modules()  # (W5 times the import on its own: not a part of starting workers)
    t0 = clock()
    s.start(z.scale)
    try:
        s.answer_all(z.scale)
        t1 = clock()
        mem = tree_memory(z.scale)
    finally:
        t2 = clock()
        s.stop()
        t3 = clock()
    time.sleep(1)
    left = descendants()
    return {"start_s": t1 - t0, "stop_s": t3 - t2, "rss_MB": mem["rss_MB"], "uss_MB": mem["uss_MB"],
            "detail": {"processes": mem["processes"], "left_after_stop": [describe(p) for p in left]}}


def w7(s, z):
    warmup = max(10, z.pingpong // 10)
    with running(s, WORKERS):
        warm(s, z)
        secs = repeat(lambda: s.ping_pong(z.pingpong, warmup), z.reps, REP_BUDGET)
    t = median(secs)
    return {"us_per_rt": t / z.pingpong * 1e6, "rt_per_s": z.pingpong / t, "detail": secs}


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6, "W7": w7}


def child_main(opts):
    """Run `opts.only` for one system, writing the state file after every workload."""
    z = QUICK if opts.quick else FULL
    system = SYSTEMS[opts.system]()
    state = {"system": opts.system, "pid": os.getpid(), "results": {}, "current": None, "started": None}

    def save():
        tmp = opts.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, opts.json)

    save()
    for wl in opts.only:
        state["current"], state["started"] = wl, time.time()
        save()
        try:
            res = WORKLOADS[wl](system, z)
        except NotAvailable:
            res = {k: "n/a" for k in metric_keys(wl)}
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res = _fill(wl, "error: " + short_error(e))
        state["results"][wl] = res
        state["current"] = None
        save()
    state["finished"] = True
    save()


# ---------------------------------------------------------------- the parent: children, bounds, cleanup
@dataclass
class Bounds:
    system: float
    workload: float
    w5: float
    w6: float


class Runner:
    LOW_MEMORY = 1.5 * 1024**3

    def __init__(self, opts):
        self.opts = opts
        self.token = uuid.uuid4().hex
        self.scratch = tempfile.mkdtemp(prefix="pbp-", dir="/tmp")  # short: ray puts sockets under it
        self.t0 = time.perf_counter()
        self.leftovers: list[str] = []
        self.count = 0

    def log(self, msg):
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def env(self, key):
        env = dict(os.environ)
        env[MARKER] = self.token
        env[SCRATCH] = os.path.join(self.scratch, key)
        env["TMPDIR"] = os.path.join(self.scratch, key, "tmp")  # dask's scheduler, mp managers...
        os.makedirs(env["TMPDIR"], exist_ok=True)
        env["PYTHONPATH"] = os.pathsep.join([BENCH] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if key == "ray":
            # Token authentication stays on, but with a token in the environment Ray writes
            # nothing under ~/.ray; no usage statistics (there is no network anyway).
            env.setdefault("RAY_AUTH_MODE", "token")
            env.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex + uuid.uuid4().hex)
            env["RAY_USAGE_STATS_ENABLED"] = "0"
        if key == "ipyparallel":
            env["IPYTHONDIR"] = os.path.join(self.scratch, key, "ipython")
        if key == "dask":
            env.setdefault("DASK_CONFIG", os.path.join(self.scratch, key, "config"))
        return env

    def finish(self):
        """At the end of a run: report and kill what still carries the marker, then remove the
        scratch directory (unless --keep)."""
        for p in marked_processes(self.token):
            self.leftovers.append(f"at the end: {describe(p)}")
        terminate_then_kill(marked_processes(self.token))
        if self.opts.keep:
            self.log(f"logs kept in {self.scratch}")
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def run_child(self, key, workloads, total, per_workload, extra=()):
        """Run one child (`extra`: more arguments for it); returns (state or None, status, wall
        seconds). status is 'ok', 'timeout (...)', 'aborted: ...' or 'crashed (...): ...'."""
        import psutil

        self.count += 1
        state_path = os.path.join(self.scratch, f"{self.count:03d}-{key}.json")
        log_path = os.path.join(self.scratch, f"{self.count:03d}-{key}-{'-'.join(workloads)}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--system", key,
               "--only", ",".join(workloads), "--json", state_path] + (["--quick"] if self.opts.quick else [])
        cmd += list(extra)
        shm_before = shm_names()
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(key), cwd=self.scratch, start_new_session=True)
        seen: dict[int, psutil.Process] = {}
        status, state = "ok", None
        ended = None  # when the child exited, to the millisecond (W5's whole-process time)
        while True:
            rc = proc.poll()
            for p in descendants(proc.pid):
                seen.setdefault(p.pid, p)
            state = _read_state(state_path) or state
            now = time.perf_counter()
            if rc is not None:
                if rc != 0 or not (state or {}).get("finished"):
                    status = f"crashed (exit {rc}): {_last_line(log_path)}"
                break
            cur_started = (state or {}).get("started") if (state or {}).get("current") else None
            if now - start > total or (cur_started and time.time() - cur_started > per_workload):
                status = f"timeout ({len(descendants(proc.pid))} processes running)"
                break
            if psutil.virtual_memory().available < self.LOW_MEMORY:
                status = "aborted: free memory below 1.5 GB"
                break
            if wait_exit(proc, 0.25):  # (neither a sleep nor `proc.wait`: see wait_exit)
                ended = time.perf_counter()
        wall = (ended or time.perf_counter()) - start
        self.cleanup(key, proc, seen, forced=status != "ok" and proc.poll() is None, shm_before=shm_before)
        return state, status, wall

    def cleanup(self, key, proc, seen, forced, shm_before):
        """Kill what the child left: its tree (seen while it ran, or below it now), its process
        group, anything with our marker. After a normal exit, give stragglers 5 s to go, and
        report those that did not as leftovers."""
        import psutil

        if forced:
            procs = descendants(proc.pid) + list(seen.values()) + marked_processes(self.token)
            try:
                procs.append(psutil.Process(proc.pid))
            except psutil.Error:
                pass
            terminate_then_kill(procs)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
        stray = {p.pid: p for p in list(seen.values()) + marked_processes(self.token) if alive(p)}
        if stray and not forced:
            _, still = psutil.wait_procs(list(stray.values()), timeout=5)
            for p in still:
                self.leftovers.append(f"{key}: {describe(p)} was still running 5 s after its benchmark process exited")
            stray = {p.pid: p for p in still}
        terminate_then_kill(stray.values())
        leaked = remove_leaked_shm(shm_before)
        if leaked:
            after = " after a forced kill" if forced else ""
            self.leftovers.append(f"{key}: {len(leaked)} entries left in /dev/shm{after} (removed), e.g. {leaked[0]}")

    # ------------------------------------------------------------ per system
    def run_system(self, key, workloads, b: Bounds):
        """Every workload of one system; returns {workload: {metric: value}}."""
        out = {}
        main = [w for w in workloads if w in MAIN_WORKLOADS]
        deadline = time.perf_counter() + b.system
        while main:
            left = deadline - time.perf_counter()
            if left <= 0:
                for w in main:
                    out[w] = _fill(w, "timeout (system bound)")
                break
            self.log(f"{key}: {','.join(main)}")
            state, status, wall = self.run_child(key, main, left, b.workload)
            done = (state or {}).get("results", {})
            out.update(done)
            self.log(f"{key}: {status} after {wall:.1f} s")
            if status == "ok":
                break
            cur = (state or {}).get("current")
            if cur and cur not in done:
                out[cur] = _fill(cur, status)
            elif not cur and not done:  # died before starting a workload: do not loop on it
                for w in main:
                    out[w] = _fill(w, status)
            main = [w for w in main if w not in out]
        if "W5" in workloads:
            out["W5"] = self.run_w5(key, b.w5)
        if "W6" in workloads:
            out["W6"] = self.run_w6(key, b.w6)
        return out

    def run_w6(self, key, bound):
        """W6 in fresh processes, the median of each figure: one sample of starting and
        stopping 128 workers moves with the moment it lands in (0.06-0.14 s for the same
        shut-down). A system whose first run took over W6_REP_BUDGET gets one."""
        reps = (QUICK if self.opts.quick else FULL).w6_reps
        runs = []
        for i in range(reps):
            self.log(f"{key}: W6 ({i + 1} of {reps})")
            state, status, wall = self.run_child(key, ["W6"], bound, bound)
            self.log(f"{key}: W6 {status} after {wall:.1f} s")
            r = (state or {}).get("results", {}).get("W6")
            if r is None or any(isinstance(v, str) for v in r.values()):
                if runs:
                    break  # (the runs that did finish count)
                return r if r is not None else _fill("W6", status)
            runs.append(r)
            if wall > W6_REP_BUDGET:
                break
        out = {k: median([r[k] for r in runs]) for k in runs[0] if k != "detail"}
        out["detail"] = {"runs": [{k: v for k, v in r.items() if k != "detail"} for r in runs],
                         "processes": runs[0]["detail"]["processes"],
                         "left_after_stop": [p for r in runs
                                             for p in r["detail"]["left_after_stop"]]}
        return out

    def run_w5(self, key, bound):
        reps = (QUICK if self.opts.quick else FULL).w5_reps
        runs, walls = [], []
        self.log(f"{key}: W5 x {reps} fresh processes")
        for _ in range(reps):
            state, status, wall = self.run_child(key, ["W5"], bound, bound)
            r = (state or {}).get("results", {}).get("W5")
            if r is None:
                return _fill("W5", status)
            if any(isinstance(v, str) for v in r.values()):
                return r
            runs.append(r)
            walls.append(wall)
        out = {k: median([r[k] for r in runs]) for k in runs[0]}
        out["process_s"] = median(walls)
        out["detail"] = {"runs": runs, "process_s": walls}
        return out


def _fill(workload, text):
    """The same status in every cell of a workload; a long one only in its first row."""
    keys = metric_keys(workload)
    short = text if len(text) <= 40 else text.split(":")[0] + " (see above)"
    return {k: text if i == 0 else short for i, k in enumerate(keys)}


def _read_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_line(path):
    try:
        with open(path, "rb") as f:
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return short_error_text(lines[-1]) if lines else "no output"
    except OSError:
        return "no log"


def short_error_text(s, limit=100):
    s = s.strip().replace("|", "/")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def installed(cls):
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- the report
def machine_info():
    import importlib.metadata as md

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"
    except ImportError:
        ram = "?"
    osname = platform.platform()
    try:
        with open("/etc/os-release") as f:
            rel = dict(ln.rstrip("\n").split("=", 1) for ln in f if "=" in ln)
        osname = f"{rel.get('PRETTY_NAME', '?').strip(chr(34))}, kernel {platform.release()}"
    except OSError:
        pass

    def version(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return None

    versions = {d: version(d) for d in ("pydist", "loky", "dask", "distributed", "ray", "ipyparallel",
                                        "numpy", "cloudpickle", "psutil")}
    try:
        rev = subprocess.run(["git", "-C", BENCH, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", BENCH, "status", "--porcelain", "--", "../src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if rev:
            versions["pydist"] = f"{versions['pydist']} (git {rev}{', src/ modified' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": ram, "os": osname,
            "python": f"{platform.python_implementation()} {platform.python_version()}", "versions": versions}


def fmt(value, unit):
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if unit in ("us", "tasks/s", "MB/s", "rt/s"):
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:,.1f}"
    return f"{value:g}"


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def render(opts, info, order, status, results, wall, leftovers):
    z = QUICK if opts.quick else FULL
    fields = {**z.__dict__, "ideal": z.sleeps * 0.01 / WORKERS}
    labels = {k: SYSTEMS[k].label for k in order}
    rows = [m for m in METRICS if m.workload in opts.only]
    v = info["versions"]
    lines = [
        "# pydist and its peers",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; `python bench/bench_peers.py {' '.join(sys.argv[1:])}`"
        f" ({'quick sizes' if opts.quick else 'full sizes'}), {_duration(wall)} in all",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM; {info['os']}",
        f"- {info['python']}; pydist {v['pydist']}; " + "; ".join(
            f"{d} {v[d] or 'not installed'}" for d in ("loky", "dask", "distributed", "ray", "ipyparallel", "numpy",
                                                         "cloudpickle")),
        f"- {WORKERS} workers per system (W6: {z.scale}); medians of {z.reps} repetition(s) (W2, W4, W7: fewer"
        f" when they would take over {REP_BUDGET:.0f} s); W3 the best and the worst of {z.w3_reps}; W5 the median of {z.w5_reps} fresh"
        f" process(es), W6 of {z.w6_reps} (one for a system whose first took over {W6_REP_BUDGET:.0f} s);"
        f" bounds: {opts.workload_timeout:.0f} s per workload, {opts.system_timeout:.0f} s for W1-W4+W7"
        f" of a system, {opts.w5_timeout:.0f} s per W5 process, {opts.w6_timeout:.0f} s for W6",
        "",
        "| workload | " + " | ".join(labels[k] for k in order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    for m in rows:
        cells = []
        for k in order:
            if status.get(k):
                cells.append(status[k])
            else:
                cells.append(fmt(results.get(k, {}).get(m.workload, {}).get(m.key, ""), m.unit))
        lines.append(f"| {m.label.format(**fields)} | " + " | ".join(cells) + " |")

    peers = [k for k in order if k not in ("raw", "pydist", *OWN) and not status.get(k)]
    lines += ["", "## pydist against the floor and the best peer", "",
              "Ratios are pydist's figure divided by the other one; `better` says which way is better.",
              "", "| workload | better | pydist / floor | pydist / best peer | best peer | best system |",
              "|---|---|---:|---:|---|---|"]

    def val(k, m):
        return _num(results.get(k, {}).get(m.workload, {}).get(m.key))

    for m in rows:
        pick = min if m.better == "lower" else max
        pd, floor = val("pydist", m), val("raw", m)
        peer_vals = {k: val(k, m) for k in peers if val(k, m) is not None}
        best_peer = pick(peer_vals, key=peer_vals.get) if peer_vals else None
        contenders = dict(peer_vals, **({"pydist": pd} if pd is not None else {}))
        best = pick(contenders, key=contenders.get) if contenders else None

        def ratio(a, b):  # blank when either is missing or b rounds to 0 in the table
            if a is None or b is None or fmt(b, m.unit).strip("0.,%") == "":
                return ""
            return f"{a / b:.2f}x"

        lines.append(f"| {m.label.format(**fields)} | {m.better} | {ratio(pd, floor)} | "
                     f"{ratio(pd, peer_vals.get(best_peer))} | {labels.get(best_peer, '')} | {labels.get(best, '')} |")

    own = [k for k in order if k in OWN and not status.get(k) and k in results]
    if own and "pydist" in results:
        lines += ["", "## pydist's other interfaces against its own calls", "",
                  "Ratios are the interface's figure divided by pydist's (`better` says which way is"
                  " better); pydist's W1 is `remotecall_fetch`, its W2 `remotecall` then `fetch`.",
                  "", "| workload | better | " + " | ".join(f"{labels[k]} / pydist" for k in own) + " |",
                  "|---|---|" + "---:|" * len(own)]
        for m in rows:
            cells = []
            for k in own:
                a, b = val(k, m), val("pydist", m)
                cells.append("" if a is None or not b else f"{a / b:.2f}x")
            lines.append(f"| {m.label.format(**fields)} | {m.better} | " + " | ".join(cells) + " |")

    lines += ["", "## How each system runs the workloads", ""]
    for k in order:
        notes = SYSTEMS[k].notes
        if status.get(k) or not notes:
            continue
        parts = [notes["all"]] if "all" in notes else []
        parts += [f"{w}: {notes[w]}" for w in ALL_WORKLOADS if w in notes and w in opts.only]
        lines.append(f"- **{labels[k]}**: " + "; ".join(parts) + ".")
    lines += ["- Everything else: the generic form in `bench/peers_systems.py` (`System`): W6 for "
              "executors submits n tasks that block until all n have connected back to the parent.",
              "", "## Leftover processes", ""]
    lines += [f"- {x}" for x in leftovers] or ["None: every process each system started was gone after its shutdown."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: for testing the harness")
    p.add_argument("--only", default=",".join(ALL_WORKLOADS), help="workloads, e.g. W1,W3")
    p.add_argument("--systems", default=None, help="e.g. pydist,loky (the raw floor is a system: raw); --scale: "
                   "pydist,pool,ssh (ssh: W1 to the namespace hosts)")
    p.add_argument("--out", default=None, help="Markdown report (also printed); default bench/RESULTS.md, "
                   "--scale: bench/SCALE.md, its plot beside it (.png)")
    p.add_argument("--json", default=None, help="also write every figure (with per-repetition detail) here")
    p.add_argument("--system-timeout", type=float, default=300, help="bound on W1-W4+W7 of one system (s)")
    p.add_argument("--workload-timeout", type=float, default=150, help="bound on one of W1-W4, W7 (s)")
    p.add_argument("--w5-timeout", type=float, default=60, help="bound on each W5 process (s)")
    p.add_argument("--w6-timeout", type=float, default=120, help="bound on W6 (s)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (children's logs)")
    p.add_argument("--scale", action="store_true", help="how per-task cost grows with the number of workers "
                   "(2, 8, 32, 128; --quick: 2, 8, 16), pydist beside mp.Pool: see bench/peers_scale.py")
    p.add_argument("--scale-workers", default=None, help="--scale: the worker counts, e.g. 2,8 (default 2,8,32,128;"
                   " --quick: 2,8,16)")
    p.add_argument("--start-method", default="forkserver", choices=("auto", "spawn", "forkserver"),
                   help="--scale: how pydist starts its workers (default: forkserver, pydist's default;"
                   " auto: spawn up to 8, forkserver above)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)  # --scale --child
    opts = p.parse_args(argv)
    if opts.scale:
        import peers_scale

        return peers_scale.finish_options(p, opts)
    opts.out = opts.out or os.path.join(BENCH, "RESULTS.md")
    opts.systems = opts.systems or ",".join(k for k, c in SYSTEMS.items() if c.by_default)
    opts.only = [w.strip().upper() for w in opts.only.split(",") if w.strip()]
    bad = [w for w in opts.only if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {','.join(ALL_WORKLOADS)}")
    opts.systems = [s.strip().lower() for s in opts.systems.split(",") if s.strip()]
    bad = [s for s in opts.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown systems {bad}; choose from {','.join(SYSTEMS)}")
    if opts.child and not (opts.system and opts.json):
        p.error("--child needs --system and --json")
    return opts


def main(argv=None):
    opts = parse(argv)
    if opts.scale and opts.child:
        import peers_scale

        return peers_scale.child_main(opts)
    if opts.child:
        return child_main(opts)
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        sys.exit("bench_peers.py needs psutil (pip install -e '.[bench]')")
    if opts.scale:
        import peers_scale

        return peers_scale.main(opts)
    order = [k for k in SYSTEMS if k in opts.systems]
    bounds = Bounds(opts.system_timeout, opts.workload_timeout, opts.w5_timeout, opts.w6_timeout)
    runner = Runner(opts)
    info = machine_info()
    status, results = {}, {}
    try:
        for k in order:
            if not installed(SYSTEMS[k]):
                status[k] = "not installed"
                runner.log(f"{k}: not installed, skipped")
                continue
            results[k] = runner.run_system(k, opts.only, bounds)
    finally:
        runner.finish()
    wall = time.perf_counter() - runner.t0
    report = render(opts, info, order, status, results, wall, runner.leftovers)
    print(report)
    with open(opts.out, "w") as f:
        f.write(report)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"info": info, "status": status, "results": results, "leftovers": runner.leftovers,
                       "quick": opts.quick, "seconds": wall}, f, indent=1)
    runner.log(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
