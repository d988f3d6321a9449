"""Shared pieces of bench_peers.py: statistics, the rendezvous used by W6, process trees.

Nothing here imports a benchmarked system; psutil is imported lazily (the parent needs it,
a system's child process only for W6's memory figures).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import subprocess
import threading
import time

# Every process a benchmark child starts inherits this variable (set by the parent with a
# per-run value): the leftover check finds stray processes by it, and never touches anyone
# else's processes (another pydist user on the same machine, for instance).
MARKER = "PYDIST_BENCH_PEERS_RUN"


class NotAvailable(Exception):
    """The system has no equivalent of this workload: shown as 'n/a'."""


# ---------------------------------------------------------------- statistics
def median(xs):
    return statistics.median(xs)


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def time_calls(fn, n):
    """Call fn() n times; the list of durations in seconds."""
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def timed(fn, *args, **kw):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    r = fn(*args, **kw)
    return time.perf_counter() - t, r


def repeat(fn, reps, budget):
    """[fn(), ...]: `reps` times, but no more repetitions than fit in `budget` seconds (at
    least one), judging by the mean duration so far. Slow systems get fewer repetitions."""
    out = []
    t0 = time.perf_counter()
    while len(out) < reps:
        out.append(fn())
        spent = time.perf_counter() - t0
        if spent + spent / len(out) > budget:
            break
    return out


def chunks(xs, size):
    return [xs[i : i + size] for i in range(0, len(xs), size)]


def default_chunksize(n_items, n_workers):
    """multiprocessing.Pool.map's own heuristic: about 4 chunks per worker."""
    return max(1, -(-n_items // (4 * n_workers)))


def short_error(e: BaseException, limit: int = 100) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


# ---------------------------------------------------------------- W6 rendezvous
class Rendezvous:
    """A TCP server in the benchmark process: `n` tasks connect (peers_tasks.rendezvous), each
    sends its pid, and all are released together once `n` distinct processes have connected.
    A task that blocks until all n are connected proves that n workers are running at once."""

    def __init__(self, n: int, timeout: float = 600.0):
        self.n = n
        self.pids: set[int] = set()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(max(128, 2 * n))
        self._sock.settimeout(timeout)
        self.port = self._sock.getsockname()[1]
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        conns = []
        try:
            while len(self.pids) < self.n:
                c, _ = self._sock.accept()
                conns.append(c)
                pid = int(c.recv(32).decode())
                self.pids.add(pid)
            for c in conns:
                c.sendall(b"go\n")
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._error = e
        finally:
            for c in conns:
                c.close()
            self._sock.close()
            self._done.set()

    def wait(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"rendezvous: {len(self.pids)} of {self.n} workers after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.pids


# ---------------------------------------------------------------- process trees
def wait_exit(proc, timeout: float) -> bool:
    """Whether Popen `proc` has exited within `timeout` seconds, seen the moment it does
    (a pidfd, Linux >= 5.3; it stays unreaped). `Popen.wait(timeout)` polls, sleeping up to
    50 ms between looks: W5's whole-process times read 0.17 or 0.22 s for the same code."""
    if proc.returncode is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def descendants(pid: int | None = None):
    """psutil.Process objects below `pid` (default: this process), recursively."""
    import psutil

    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


def tree_memory(n_workers: int) -> dict:
    """RSS and USS (MB, per worker) of every process below this one, divided by n_workers:
    a system's whole footprint (workers, nannies, raylets, managers...) per worker."""
    import psutil

    rss = uss = 0
    procs = descendants()
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        uss += info.uss
    mb = 1024 * 1024
    return {"rss_MB": rss / mb / n_workers, "uss_MB": uss / mb / n_workers, "processes": len(procs)}


def marked_processes(token: str, exclude=()):
    """Processes whose environment carries MARKER=token (other than `exclude` pids)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid in exclude or p.pid == os.getpid():
            continue
        try:
            if p.environ().get(MARKER) == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def describe(p) -> str:
    import psutil

    try:
        cmd = " ".join(p.cmdline())[:100] or p.name()
    except psutil.Error:
        cmd = "?"
    return f"pid {p.pid} ({cmd})"


def terminate_then_kill(procs, grace=5.0):
    """SIGTERM, up to `grace` seconds to go, then SIGKILL. multiprocessing's resource tracker
    ignores SIGTERM and cleans up its named semaphores once everyone else has gone: a SIGKILL
    straight away would leave them in /dev/shm."""
    import psutil

    procs = [p for p in procs if alive(p)]
    kill_processes(procs, signal.SIGTERM, wait=0)
    _, still = psutil.wait_procs(procs, timeout=grace)
    kill_processes(still)


def alive(p):
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:  # noqa: BLE001 - psutil.Error, or gone
        return False


def shm_names():
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def remove_leaked_shm(before):
    """Remove the /dev/shm entries that appeared since `before` and that no process maps (a
    killed process's semaphores or shared memory); returns their names."""
    new = shm_names() - before
    if not new:
        return []
    mapped = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/maps") as f:
                    mapped.update(ln.split("/dev/shm/", 1)[1].strip() for ln in f if "/dev/shm/" in ln)
            except OSError:
                continue
    leaked = sorted(n for n in new if n not in mapped and not n.endswith(" (deleted)"))
    for n in leaked:
        try:
            os.unlink(os.path.join("/dev/shm", n))
        except OSError:
            pass
    return leaked


def kill_processes(procs, sig=signal.SIGKILL, wait=5.0):
    """Send `sig` to each psutil.Process that is still the same process (pid and creation
    time checked by psutil), then wait briefly for them to go."""
    import psutil

    signalled = []
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(sig)
                signalled.append(p)
        except psutil.Error:
            pass
    if wait:
        psutil.wait_procs(signalled, timeout=wait)
