"""`bench_peers.py --scale`: how pydist's per-task cost grows with the cluster, beside
multiprocessing.Pool (issue 16, point 4).

    python bench/bench_peers.py --scale                  # 2, 8, 32, 128 workers (~5 min) -> bench/SCALE.md (+ .png)
    python bench/bench_peers.py --scale --quick --out /tmp/scale.md     # 2, 8, 16 workers, ~20 s

For each worker count n, and for pydist then mp.Pool, one child process (bench_peers' Runner:
its own session, the run's marker variable, bounded, its process tree cleaned up after it)
starts n local workers and measures on them:

  start  starting the n workers until each has answered a call (and the start method used);
  W1     blocking round trips of identity(1), round-robin: call i goes to worker i mod n
         (pydist `remotecall_fetch`; mp.Pool has no way to address a worker: `apply`, whichever
         idle worker takes it from the shared queue); median and p99;
  W2     N tiny tasks inc(x), one message each, submitted round-robin then all gathered
         (pydist `remotecall` then `fetch`; mp.Pool `apply_async` then `get`): tasks/s, and
         CPU per task: the master's (`time.process_time`, all its threads) and the workers'
         (user + system of every process below the master, found with psutil, summed);
  pmap   (n = 2 and 8) a map of M x 1 ms sleeps: pydist `pmap` with batch_size=1 (its
         default: one element per message) and with batch_size="auto", mp.Pool `map` with
         its own default chunksize (about 4 chunks per worker); seconds and efficiency
         against the ideal M x 1 ms / n, and the ceiling the machine allows;
  stop   removing the workers.

Then, if the namespace hosts of `.ci/infra/up.sh` answer over ssh, one pydist child measures
W1 to a local worker, to a worker on h1 over plain TCP and to one on h2 through an ssh tunnel
(as tests/test_ssh.py adds them); otherwise that table says "n/a: no namespace hosts".

pydist starts workers with its default start method, the fork server (`--start-method
spawn` for fresh interpreters, which are very slow to start by the hundred on 2 cores;
`auto`: spawn up to 8 workers and the fork server above).
mp.Pool uses the platform's default start method (fork on Linux). Each measure is bounded
by --workload-timeout and each child by --system-timeout, as in bench_peers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from peers_common import default_chunksize, descendants, median, p99, repeat, short_error, time_calls, timed
from peers_systems import Pool, Pydist
import peers_tasks as T

BENCH = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("pydist", "pool")  # the columns compared; "ssh" is the namespace-host child
LABELS = {"pydist": "pydist", "pool": "mp.Pool"}
REP_BUDGET = 30.0  # W2 and pmap: fewer repetitions when they would take longer than this (s)
SSH_CONFIG = os.path.join(os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra"), "ssh-client", "config")


@dataclass(frozen=True)
class Sizes:
    workers: tuple = (2, 8, 32, 128)
    calls: int = 2000       # W1 round trips per repetition
    warm_calls: int = 200
    reps: int = 3
    tasks: int = 20_000     # W2
    # W2 repetitions: one process's repetitions of the same 20,000 tasks read anywhere from
    # 37,000 to 67,000 tasks/s at 32 workers on the 2-core VM (bench/README, seventeenth
    # round): with medians of 3, the 32-against-2 ratio read 0.56x and 0.66x in two runs.
    w2_reps: int = 7
    pmap_workers: tuple = (2, 8)
    sleeps: int = 10_000    # pmap elements
    sleep_s: float = 0.001


FULL = Sizes()
QUICK = Sizes(workers=(2, 8, 16), calls=1000, warm_calls=100, reps=1, tasks=5000, w2_reps=1, sleeps=2000)


def sizes(opts) -> Sizes:
    z = QUICK if opts.quick else FULL
    if getattr(opts, "scale_workers", None):
        z = replace(z, workers=tuple(int(n) for n in opts.scale_workers.split(",") if n.strip()))
    return z


def start_method(choice: str, n: int) -> str:
    """pydist's start method for n workers: `choice`, or for "auto" spawn up to 8 workers
    and forkserver above."""
    if choice != "auto":
        return choice
    return "spawn" if n <= 8 else "forkserver"


def finish_options(parser, opts):
    """bench_peers.parse's part for --scale: defaults and checks of this mode."""
    opts.out = opts.out or os.path.join(BENCH, "SCALE.md")
    opts.systems = [s.strip().lower() for s in (opts.systems or "pydist,pool,ssh").split(",") if s.strip()]
    bad = [s for s in opts.systems if s not in SYSTEMS + ("ssh",)]
    if bad:
        parser.error(f"--scale compares {','.join(SYSTEMS)}; unknown {bad}")
    opts.only = [w.strip() for w in opts.only.split(",") if w.strip()]
    if opts.child and not (opts.system and opts.json and opts.workers is not None):
        parser.error("--scale --child needs --system, --json and --workers")
    return opts


# ---------------------------------------------------------------- the two systems (in a child)
class ScalePydist(Pydist):
    """pydist with a chosen start method and calls addressed round-robin."""

    def __init__(self, method: str):
        self.method = method

    def start(self, n):
        self.import_modules()
        self.ws = self.pd.addprocs(n, start_method=start_method(self.method, n))
        self._next = 0

    def started_with(self) -> str:
        """The start method the workers really had (forkserver falls back to spawning)."""
        from pydist.group import PGRP

        kinds = {type(PGRP.workers[w].config.process).__name__ for w in self.ws}
        return "forkserver" if kinds == {"ForkedProcess"} else "spawn" if "ForkedProcess" not in kinds else "mixed"

    def call_at(self, i, f, *args):
        return self.pd.remotecall_fetch(f, self.ws[i % len(self.ws)], *args)

    def maps(self, n_items):
        """(how, map function) for each form of pmap measured."""
        return [("`pmap`, batch_size=1 (its default)", lambda f, xs: self.pd.pmap(f, xs)),
                ('`pmap`, batch_size="auto"', lambda f, xs: self.pd.pmap(f, xs, batch_size="auto"))]


class ScalePool(Pool):
    """multiprocessing.Pool; it cannot address a worker, so 'round-robin' is its queue's."""

    def __init__(self, method: str):
        pass

    def started_with(self) -> str:
        return self.mp.get_start_method()

    def call_at(self, i, f, *args):
        return self.pool.apply(f, args)

    def maps(self, n_items):
        cs = default_chunksize(n_items, self.n)  # what Pool.map itself would choose
        return [(f"`Pool.map`, chunksize={cs} (its default)", lambda f, xs: self.pool.map(f, xs, chunksize=cs))]


def process_cpu(p) -> float:
    """CPU seconds (user + system, all threads) that process `p` (a psutil.Process) has used,
    to the nanosecond: its CPU-time clock (clock_getcpuclockid). psutil's own figure counts
    in clock ticks (10 ms per process), too coarse for 128 workers that each run ~150 tiny
    tasks; it is the fallback where that clock is not available."""
    import psutil

    try:
        clock = ctypes.c_int()
        if _libc is not None and _libc.clock_getcpuclockid(p.pid, ctypes.byref(clock)) == 0:
            return time.clock_gettime(clock.value)
    except OSError:
        pass
    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def tree_cpu() -> float:
    """CPU seconds used so far by every process below this one (the workers, and helpers
    such as pydist's fork server), summed."""
    return sum(process_cpu(p) for p in descendants())


# ---------------------------------------------------------------- measures (in a child)
def m_start(s, n, z):
    s.import_modules()  # (not a part of starting workers: W5 times it)
    t, _ = timed(s.start, n)
    s.gather([s.submit(T.identity, i) for i in range(4 * n)])
    for i in range(max(z.warm_calls, 2 * n)):  # every worker has run identity before W1
        s.call_at(i, T.identity, 1)
    return {"start_s": t, "method": s.started_with()}


def m_w1(s, n, z):
    it = itertools.count()
    meds, tails = [], []
    for _ in range(z.reps):
        ts = time_calls(lambda: s.call_at(next(it), T.identity, 1), z.calls)
        meds.append(median(ts) * 1e6)
        tails.append(p99(ts) * 1e6)
    return {"median_us": median(meds), "p99_us": median(tails), "detail": {"median_us": meds, "p99_us": tails}}


def m_w2(s, n, z):
    xs = list(range(z.tasks))
    want = [x + 1 for x in xs]

    def once():
        cpu_w, cpu_m, t = tree_cpu(), time.process_time(), time.perf_counter()
        got = s.gather([s.submit(T.inc, x) for x in xs])
        t, cpu_m, cpu_w = time.perf_counter() - t, time.process_time() - cpu_m, tree_cpu() - cpu_w
        assert got == want, "wrong results"
        return {"tps": z.tasks / t, "master_us": cpu_m / z.tasks * 1e6, "workers_us": cpu_w / z.tasks * 1e6}

    runs = repeat(once, z.w2_reps, REP_BUDGET)
    out = {k: median([r[k] for r in runs]) for k in runs[0]}
    out["total_us"] = out["master_us"] + out["workers_us"]
    out["detail"] = runs
    return out


def m_pmap(s, n, z):
    xs = [z.sleep_s] * z.sleeps
    ideal = z.sleeps * z.sleep_s / n
    forms = []
    for how, fn in s.maps(len(xs)):
        def once(fn=fn):
            t, got = timed(fn, T.sleep, xs)
            assert len(got) == len(xs), "wrong results"
            return t

        times = repeat(once, z.reps, REP_BUDGET)
        forms.append({"how": how, "seconds": median(times), "efficiency": 100 * ideal / median(times),
                      "detail": times})
    # What the machine allows (a 1 ms sleep lasts longer than 1 ms): each worker sleeps its
    # share back to back in one task, no messages, in this child's time window.
    alone = repeat(lambda: timed(lambda: s.gather([s.submit(T.sleep_many, z.sleep_s, z.sleeps // n)
                                                   for _ in range(n)]))[0], z.reps, REP_BUDGET)
    return {"forms": forms, "ideal_s": ideal, "ceiling": 100 * ideal / median(alone), "detail_ceiling_s": alone}


def m_stop(s, n, z):
    t, _ = timed(s.stop)
    return {"stop_s": t}


def m_ssh(z):
    """W1 to a local worker, to one on h1 (plain TCP) and to one on h2 (ssh tunnel)."""
    import pydist

    src = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))  # this pydist
    remote = dict(sshflags=["-F", SSH_CONFIG], exename=sys.executable,
                  env={"PYTHONPATH": os.pathsep.join([src, BENCH])})
    out = {}
    ways = (("local", lambda: pydist.addprocs(1)),
            ("h1", lambda: pydist.addprocs(["h1"], **remote)),
            ("h2_tunnel", lambda: pydist.addprocs(["h2"], tunnel=True, **remote)))
    try:
        for key, add in ways:
            try:
                [w] = add()
                for _ in range(z.warm_calls):
                    pydist.remotecall_fetch(T.identity, w, 1)
                meds, tails = [], []
                for _ in range(z.reps):
                    ts = time_calls(lambda: pydist.remotecall_fetch(T.identity, w, 1), z.calls)
                    meds.append(median(ts) * 1e6)
                    tails.append(p99(ts) * 1e6)
                out[key] = {"median_us": median(meds), "p99_us": median(tails)}
            except Exception as e:  # noqa: BLE001 - one row fails, not the table
                out[key] = {"error": "error: " + short_error(e)}
    finally:
        pydist.rmprocs(pydist.workers(), waitfor=60)
    return out


STEPS = {"start": m_start, "W1": m_w1, "W2": m_w2, "pmap": m_pmap, "stop": m_stop}


def child_main(opts):
    """Run the steps `opts.only` for one system and worker count, writing bench_peers' state
    file after each (so the parent can bound each step and keep what finished)."""
    z = sizes(opts)
    state = {"system": opts.system, "pid": os.getpid(), "results": {}, "current": None, "started": None}

    def save():
        tmp = opts.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, opts.json)

    def step(name, fn):
        state["current"], state["started"] = name, time.time()
        save()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res = {"error": "error: " + short_error(e)}
        state["results"][name] = res
        state["current"] = None
        save()
        return "error" not in res

    if opts.system == "ssh":
        step("ssh", lambda: m_ssh(z))
    else:
        s = (ScalePydist if opts.system == "pydist" else ScalePool)(opts.start_method)
        n = opts.workers
        if step("start", lambda: m_start(s, n, z)):
            for name in opts.only:
                if name not in ("start", "stop"):
                    step(name, lambda name=name: STEPS[name](s, n, z))
            step("stop", lambda: m_stop(s, n, z))
    state["finished"] = True
    save()


# ---------------------------------------------------------------- the parent
def namespace_hosts_missing() -> str | None:
    """Why the SSH measure cannot run (None if h1 and h2 answer over ssh as root by key)."""
    if not os.path.exists(SSH_CONFIG):
        return f"no ssh client config at {SSH_CONFIG}"
    for h in ("h1", "h2"):
        cmd = ["ssh", "-F", SSH_CONFIG, "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", h, "true"]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"ssh {h}: {short_error(e)}"
        if done.returncode != 0:
            return f"ssh {h} failed (exit {done.returncode})"
    return None


def main(opts):
    """The parent: one child per system and worker count, then the SSH child, the report and
    the plot."""
    import bench_peers as peers  # the entry point; it imports this module only for --scale

    z = sizes(opts)
    runner = peers.Runner(opts)
    info = peers.machine_info()
    info["load_start"] = os.getloadavg()
    runs: dict = {k: {} for k in opts.systems if k in SYSTEMS}  # system -> n -> {step: result}
    status: dict = {k: {} for k in runs}                       # system -> n -> child status
    ssh: dict = {}
    try:
        for n in z.workers:
            for key in runs:
                steps = ["start", "W1", "W2"] + (["pmap"] if n in z.pmap_workers else []) + ["stop"]
                runner.log(f"{key}: {n} workers")
                extra = ["--scale", "--workers", str(n), "--start-method", opts.start_method]
                state, st, wall = runner.run_child(key, steps, opts.system_timeout, opts.workload_timeout,
                                                   extra=extra)
                runner.log(f"{key}: {n} workers: {st} after {wall:.1f} s")
                runs[key][n] = (state or {}).get("results", {})
                status[key][n] = st
        if "ssh" in opts.systems:
            why = namespace_hosts_missing()
            if why:
                ssh = {"status": f"n/a: no namespace hosts ({why})"}
                runner.log(ssh["status"])
            else:
                runner.log("ssh: W1 to a local worker, h1 (TCP), h2 (tunnel)")
                state, st, wall = runner.run_child("ssh", ["ssh"], opts.system_timeout, opts.workload_timeout,
                                                   extra=["--scale", "--workers", "1"])
                runner.log(f"ssh: {st} after {wall:.1f} s")
                ssh = {"status": st, "results": (state or {}).get("results", {}).get("ssh", {})}
    finally:
        runner.finish()
    info["load_end"] = os.getloadavg()
    wall = time.perf_counter() - runner.t0
    png = os.path.splitext(opts.out)[0] + ".png"
    plotted = plot(png, z, runs)
    report = render(opts, z, info, runs, status, ssh, wall, runner.leftovers, plotted)
    print(report)
    with open(opts.out, "w") as f:
        f.write(report)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"info": info, "runs": runs, "status": status, "ssh": ssh, "quick": opts.quick,
                       "seconds": wall, "leftovers": runner.leftovers}, f, indent=1, default=str)
    runner.log(f"wrote {opts.out}")


# ---------------------------------------------------------------- the report
ROWS = [  # (step, key, label, unit)
    ("start", "start_s", "start n workers, until each has answered (s)", "s"),
    ("start", "method", "start method", ""),
    ("W1", "median_us", "W1 round trip, round-robin, median (µs)", "us"),
    ("W1", "p99_us", "W1 round trip, round-robin, p99 (µs)", "us"),
    ("W2", "tps", "W2 {tasks:,} tiny tasks, one message each (tasks/s)", "n"),
    ("W2", "master_us", "W2 master CPU per task (µs)", "us1"),
    ("W2", "workers_us", "W2 workers' CPU per task, all summed (µs)", "us1"),
    ("W2", "total_us", "W2 master + workers CPU per task (µs)", "us1"),
    ("stop", "stop_s", "shut down n workers (s)", "s"),
]


def fmt(v, unit):
    if isinstance(v, str) or v is None:
        return v or ""
    if unit == "s":
        return f"{v:.3f}"
    if unit == "us1":
        return f"{v:,.1f}"
    return f"{v:,.0f}"


def cell(runs, status, key, n, step, metric):
    """A table cell: the figure, or why there is none."""
    res = runs.get(key, {}).get(n, {}).get(step)
    if res is None:  # the child never got to it: say why, if it ended badly
        st = status.get(key, {}).get(n)
        return None, st if st and st != "ok" else ""
    if "error" in res:
        return None, res["error"]
    return res.get(metric), None


def render(opts, z, info, runs, status, ssh, wall, leftovers, plotted):
    v = info["versions"]
    ns = list(z.workers)
    lines = [
        "# How pydist's per-task cost grows with the cluster, beside multiprocessing.Pool",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; `python bench/bench_peers.py {' '.join(sys.argv[1:])}`"
        f" ({'quick sizes' if opts.quick else 'full sizes'}), {wall:.0f} s in all",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM; {info['os']}; load average"
        f" {info['load_start'][0]:.2f} at the start, {info['load_end'][0]:.2f} at the end",
        f"- {info['python']}; pydist {v['pydist']}; psutil {v['psutil']}",
        f"- local workers on this machine; pydist's start method: `--start-method {opts.start_method}`"
        + (" (spawn up to 8 workers, forkserver above)" if opts.start_method == "auto" else "")
        + "; mp.Pool: the platform's default (row 'start method')",
        f"- W1: {z.calls:,} round trips per repetition after {z.warm_calls} warm-up calls; W2: {z.tasks:,} tasks;"
        f" medians of {z.reps} repetition(s), {z.w2_reps} for W2 (W2 and pmap: fewer when they would take over"
        f" {REP_BUDGET:.0f} s);"
        f" bounds: {opts.workload_timeout:.0f} s per measure, {opts.system_timeout:.0f} s per system and size",
        "",
        "## Per-task cost against the number of workers",
        "",
        "W1: call i goes to worker i mod n (pydist `remotecall_fetch`); mp.Pool's `apply` goes to whichever "
        "worker takes it from the pool's queue. W2: `remotecall` round-robin then `fetch` all (pydist), "
        "`apply_async` then `get` all (mp.Pool). Master CPU: `process_time` of the benchmark process (all its "
        "threads); workers' CPU: user + system of every process below it (psutil).",
        "",
    ]
    if not runs:
        lines.append("Not run (`--systems` has neither pydist nor pool).")
    else:
        lines += ["| measure | system | " + " | ".join(f"{n} workers" for n in ns) + f" | {ns[-1]} / {ns[0]} |",
                  "|---|---|" + "---:|" * (len(ns) + 1)]
    for step, metric, label, unit in ROWS:
        for key in runs:
            cells, vals = [], []
            for n in ns:
                val, why = cell(runs, status, key, n, step, metric)
                cells.append(fmt(val, unit) if why is None else why)
                vals.append(val if isinstance(val, (int, float)) else None)
            ratio = f"{vals[-1] / vals[0]:.2f}x" if unit and vals[0] and vals[-1] is not None else ""
            lines.append(f"| {label.format(tasks=z.tasks)} | {LABELS[key]} | " + " | ".join(cells) + f" | {ratio} |")

    lines += ["", f"## pmap of {z.sleeps:,} x {z.sleep_s * 1000:g} ms sleeps", ""]
    lines += pmap_table(z, runs, status) if runs else ["Not run (`--systems` has neither pydist nor pool)."]

    lines += ["", "## W1 to a worker on another host (pydist)", "",
              "Namespace hosts of `.ci/infra/up.sh` (a veth pair away); one worker each, added as "
              "tests/test_ssh.py does, `remotecall_fetch(identity, w, 1)`.", ""]
    res = ssh.get("results") or {}
    if not res:
        lines.append(ssh.get("status") or "n/a: not run (--systems)")
    else:
        lines += ["| worker | W1 median (µs) | W1 p99 (µs) |", "|---|---:|---:|"]
        names = {"local": "local worker (this machine, for reference)", "h1": "h1, plain TCP",
                 "h2_tunnel": "h2, through an ssh tunnel (`tunnel=True`)"}
        for k, name in names.items():
            r = res.get(k, {"error": ssh.get("status", "")})
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | |")
            else:
                lines.append(f"| {name} | {r['median_us']:,.0f} | {r['p99_us']:,.0f} |")

    lines += ["", "## Plot", "", plotted, "", "## Leftover processes", ""]
    lines += [f"- {x}" for x in leftovers] or ["None: every process each child started was gone after it."]
    return "\n".join(lines) + "\n"


def pmap_table(z, runs, status):
    lines = ["Efficiency is the ideal (elements x sleep / workers) over the measured time; the ceiling is the "
             "same for the sleeps back to back in one task per worker (no messages: a sleep lasts a little "
             "longer than asked), measured in the same child.", "",
             "| workers | ideal (s) | system | map | seconds | efficiency | ceiling |",
             "|---:|---:|---|---|---:|---:|---:|"]
    for n in (n for n in z.pmap_workers if n in z.workers):
        head = f"| {n} | {z.sleeps * z.sleep_s / n:.2f} | "
        for key in runs:
            _, why = cell(runs, status, key, n, "pmap", "forms")
            if why is not None:
                lines.append(head + f"{LABELS[key]} | {why} | | | |")
                continue
            r = runs[key][n]["pmap"]
            for form in r["forms"]:
                lines.append(head + f"{LABELS[key]} | {form['how']} | {form['seconds']:.2f} | "
                             f"{form['efficiency']:.1f}% | {r['ceiling']:.1f}% |")
    return lines


def plot(path, z, runs) -> str:
    """W2 tasks/s and master CPU per task against the number of workers (log x), one line per
    system, to `path`; returns a line for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Skipped: matplotlib is not installed (`pip install -e '.[bench]'`)."
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for key, by_n in runs.items():
        pts = [(n, by_n[n]["W2"]) for n in z.workers if "tps" in (by_n.get(n, {}).get("W2") or {})]
        if not pts:
            continue
        drawn = True
        xs = [n for n, _ in pts]
        a.plot(xs, [r["tps"] for _, r in pts], marker="o", label=LABELS[key])
        b.plot(xs, [r["master_us"] for _, r in pts], marker="o", label=LABELS[key])
    if not drawn:
        plt.close(fig)
        return "Skipped: no W2 figures to plot."
    for ax, title in ((a, f"W2: {z.tasks:,} tiny tasks, one message each (tasks/s)"),
                      (b, "W2: master CPU per task (µs)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(z.workers), [str(n) for n in z.workers])
        ax.set_xlabel("workers")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![W2 tasks/s and master CPU per task against workers]({os.path.basename(path)}) (`{path}`)"
