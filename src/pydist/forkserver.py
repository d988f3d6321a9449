"""The fork server: `python -m pydist.forkserver FD [--yield-to-master]`, a template that
forks local workers (the flag: the master's own, see `_yield_to_master`).

A master that asks for ``start_method="forkserver"`` starts one such process (see
`managers.forkserver`). It imports what a worker needs (cloudpickle too: see `_warm`) and
the modules named in PYDIST_PRELOAD (see `_preload`), starts no thread, and waits on the
control socket FD (a SOCK_SEQPACKET socket inherited from the master) for requests: a JSON
message (cookie, bind address, working directory, environment, how many workers, whether
paired) with the write ends of that many pipes attached (SCM_RIGHTS), then, if paired, as
many sockets: each worker's master connection, made by the master. For each pipe it forks a
worker: its own process group (in the fork server's session, which all its workers share:
see `_child`), the directory and environment asked for, the pipe as stdout and stderr, its
master connection (if any) as descriptor 3, every other descriptor closed, fresh random
state, then the normal worker path (`worker.start_worker`).
It answers with each child's pid as soon as it has forked it, reaps its children and reports
each one's exit status. It exits when the master closes the control socket (or dies: end of
file).
"""

from __future__ import annotations

import _signal  # type: ignore  # (typeshed has no stub for it)
import atexit
import contextlib
import gc
import importlib
import io
import json
import multiprocessing.process  # workers import it at JOIN: have it in the template
import os
import select
import signal
import socket
import sys
import threading
from typing import Callable, NoReturn

from . import threads, worker
from .managers.forkserver import PRELOAD_VAR

__all__ = ["serve", "main"]

MAX_MESSAGE = 1 << 20  # a request carries an environment: bounded by the socket buffer
MAX_FDS = 128  # descriptors in one request: 2 per worker (`managers.forkserver.MAX_FORKS_PER_REQUEST`: a test checks)
MASTER_FD = 3  # a paired worker's master connection


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _child(request: dict, out_fd: int, master_fd: int | None, environ: dict[str, str],
           stdio: tuple, logging_prepared: tuple) -> NoReturn:
    """In the forked child: become a worker as `python -m pydist.worker` would. Never returns."""
    code = 1
    try:
        # Its own process group (for signals to it and what it starts), but not its own
        # session: Linux schedules each session as one group (autogroup), and a session per
        # worker would give every worker a full share against the master, so a woken worker
        # would preempt the master for each call; the fork server's session keeps all its
        # workers in one group, as `make -j` is one, and they take calls in batches.
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        # `_signal`, not `signal`: the latter's enum conversions (a failed lookup for a
        # handler function) ran ~10 functions of `enum`, whose pages each worker then copied.
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if master_fd is not None:  # (not inheritable: not for what the worker starts)
            if master_fd == MASTER_FD:
                os.set_inheritable(MASTER_FD, False)
            else:
                os.dup2(master_fd, MASTER_FD, inheritable=False)
        first_free = MASTER_FD if master_fd is None else MASTER_FD + 1
        os.closerange(first_free, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
        sys.stdin, sys.stdout, sys.stderr = stdio  # (over descriptors 0, 1 and 2: ours now)
        try:
            os.chdir(request["dir"])
        except OSError as e:
            print(f"pydist worker: cannot work in directory {request['dir']!r}: {e}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        _set_environ(request["env"], environ)
        # (`random` reseeds itself in a forked child: its at-fork hook)
        multiprocessing.process.current_process().authkey = os.urandom(32)
        worker.configure_logging(prepared=logging_prepared)
        code = worker.start_worker(cookie=request["cookie"], close_stdin=False,
                                   stderr_to_stdout=False, bind_to=request["bind"],
                                   master_fd=None if master_fd is None else MASTER_FD)
        worker.exit_process(code)  # (never returns)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)  # never back into the template's loop


def _worker_stdio() -> tuple:
    """A worker's sys.stdin, stdout and stderr, over descriptors 0, 1 and 2, made once here
    (each worker making its own ran `codecs` code and copied its pages). Output goes out
    at once, as PYTHONUNBUFFERED makes it for a fresh interpreter: the relay sees it."""
    def out(fd: int) -> io.TextIOWrapper:
        return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True,
                                line_buffering=True, errors="backslashreplace")
    return io.TextIOWrapper(io.FileIO(0, "r", closefd=False)), out(1), out(2)


def _set_environ(env: dict[str, str], current: dict[str, str]) -> None:
    """Make `os.environ` (equal to `current`) equal `env`, touching only what differs:
    usually nothing, as the template started with the master's environment, and 50
    `putenv`s cost a third of a fork."""
    if env == current:
        return
    for key in current.keys() - env.keys():
        del os.environ[key]
    for key, value in env.items():
        if current.get(key) != value:
            os.environ[key] = value


def _reap(sock: socket.socket) -> None:
    """Report every child that ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            _send(sock, {"exit": pid, "status": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass  # the master is gone


def _warm() -> None:
    """Import cloudpickle (and what it imports) here, once, before the first fork, so that
    every worker shares it: the first call of a user's function, lambda or closure (the
    first thing most programs send) unpickles it with cloudpickle, and a worker importing
    it itself paid ~4.4 ms of CPU and ~1.7 MB of private memory (copies of the template's
    pages among them). At 128 workers, `addprocs` and a first `remotecall` of a `__main__`
    function to each: 0.89-0.95 s and 5.45 MB per worker with the import in each worker,
    0.52-0.59 s and 3.70 MB with it here. It costs the template ~3 ms at start, and a
    worker that never meets such a function ~0.06 MB (W6 of `bench/`)."""
    threads.prepare_kernel_timer()  # (a worker's first burst of calls sets one)
    try:
        import cloudpickle  # noqa: F401
    except ImportError:  # (a dependency: only a broken install lacks it)
        return


# Objects that fill the free blocks of the template's small-object pools (`_fill_pools`).
_FILLERS: list = []


def _fill_pools() -> None:
    """Fill the free blocks of pymalloc's partly used pools, so that what a forked worker
    allocates lands in fresh pools, packed, instead of in free blocks scattered over the
    template's pages, each of which the worker then copies (copy-on-write). An idle forked
    worker's USS: 3.47-3.51 -> 3.36-3.39 MB (16 workers, 4 alternating pairs). The free
    blocks come from `sys._debugmallocstats` (CPython's allocator report, the same table on
    3.10-3.13); where it says nothing readable, or cannot be read, nothing is filled.
    ~0.5 ms, once."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return
    try:
        report = _read_stderr_of(stats)
    except OSError:  # (descriptor 2 closed, no descriptors left)
        return
    for size, free in _free_blocks(report):
        if size >= 48:  # a bytes object of n bytes takes 33 + n
            _FILLERS.extend(bytes(size - 33) for _ in range(free))
        elif size == 32:  # an int below 2**30 takes 28
            _FILLERS.extend(10**9 + i for i in range(free))


def _read_stderr_of(fn: Callable[[], object]) -> str:
    """What `fn()` writes to descriptor 2 (a few KB: what a pipe holds; more is cut)."""
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        os.set_blocking(write, False)  # (a longer report is cut short, never waits)
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(write, 2)
            try:
                fn()
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read, 65536):
                chunks.append(chunk)
    finally:
        os.close(read)
        os.close(write)
    return b"".join(chunks).decode(errors="replace")


def _free_blocks(report: str) -> list[tuple[int, int]]:
    """(block size, free blocks in partly used pools) per size class of a
    `sys._debugmallocstats` report: the rows of its first table."""
    rows = []
    for line in report.splitlines():
        fields = line.split()
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            rows.append((int(fields[1]), int(fields[4])))
        elif rows:
            break
    return rows


def _preload(names: str) -> str | None:
    """Import the modules named in `names` (PYDIST_PRELOAD: comma-separated), which every
    worker forked from here then shares; one that fails is reported on stderr and left to
    each worker. Returns why this process must not fork any more (a module started a
    thread: a fork copies only the forking thread, and a lock another one held stays held
    in the child), else None."""
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            importlib.import_module(name)
        except BaseException as e:  # (SystemExit and KeyboardInterrupt of a module's own too)
            print(f"pydist fork server: cannot preload {name!r} ({type(e).__name__}: {e}); "
                  f"each worker imports it itself", file=sys.stderr, flush=True)
    threads = _os_threads()
    if threads > 1:
        return (f"preloading {names!r} started {threads - 1} thread(s) in the fork server, "
                f"which cannot fork safely now; workers start as fresh interpreters (a BLAS "
                f"library's threads? OPENBLAS_NUM_THREADS=1 and OMP_NUM_THREADS=1 prevent them)")
    return None


# The nice of the fork server's scheduling group (see `_yield_to_master`).
GROUP_NICE = 5


def _yield_to_master() -> None:
    """(A template of the master's, not of an ssh worker's siblings: there no master runs.)
    Give this session's scheduling group -- Linux's autogroup, which every worker forked
    from here shares (see `_child`) -- nice GROUP_NICE, so that when the master wants a CPU
    it weighs three times all our workers together (1024 against 335), not as much. The
    nice of a worker's own threads counts only within its group: `rmprocs` of 128 workers
    lowered each exiting one to nice 19 (`joining._yield_for_exit`), and still the master's
    threads waited 40-140 ms for a CPU while they ran 4-6 ms, behind the exits of the
    workers it had let go; 30-150 ms (median ~100) -> 41-54 ms. Without autogroups (cgroups,
    or the kernel's switch off), or where the kernel refuses (it rate-limits the change for
    an unprivileged user to one per 0.1 s on the machine), nothing changes."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(GROUP_NICE))
    except OSError:
        pass


def _os_threads() -> int:
    """Threads of this process, those not started by Python too (Linux), else Python's."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def serve(fd: int, yield_to_master: bool = False) -> int:
    """Serve fork requests on control socket `fd` until the master closes it; with
    `yield_to_master`, our workers yield the CPU to the master (`_yield_to_master`)."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master's ^C is not for us
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    if yield_to_master:
        _yield_to_master()
    environ = dict(os.environ)  # (a plain copy: cheap to compare in each child)
    stdio = _worker_stdio()
    logging_prepared = worker.prepare_logging(environ, stdio[2])
    _warm()
    unsafe = _preload(environ.get(PRELOAD_VAR, ""))
    if unsafe is not None:  # (the master remembers it: no template is tried again for this)
        print(f"pydist fork server: {unsafe}", file=sys.stderr, flush=True)
        _answer(sock, {"refused": unsafe})
        return 3
    gc.collect()
    _fill_pools()
    gc.freeze()  # the children share the template's pages instead of copying them
    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        _reap(sock)
        if sock.fileno() not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            data, fds = b"", []
        if not data:
            return 0  # the master is gone: our children notice that on their own
        if not _fork_all(sock, data, fds, environ, stdio, logging_prepared):
            return 0


def _fork_all(sock: socket.socket, data: bytes, fds: list[int], environ: dict[str, str],
              stdio: tuple, logging_prepared: tuple) -> bool:
    """Fork a worker for each pipe of one request, answering each pid as soon as it is
    known (the master connects to the first workers while the next are forked). False once
    the master is gone."""
    reqs: list = [None]
    try:
        request = json.loads(data)
        reqs = list(range(request["req"], request["req"] + request["count"]))
        expected = len(reqs) * (2 if request.get("paired") else 1)
        if len(fds) != expected:
            raise ValueError(f"a request for {len(reqs)} workers came with {len(fds)} "
                             f"descriptors, not {expected}")
    except Exception as e:
        return _refuse(sock, reqs, fds, e)
    pipes = fds[:len(reqs)]
    masters: list = fds[len(reqs):] or [None] * len(reqs)

    def held_from(i: int) -> list[int]:
        """Our copies of the descriptors of workers i, i+1, ..."""
        return pipes[i:] + [m for m in masters[i:] if m is not None]

    for i, req in enumerate(reqs):
        try:
            pid = os.fork()
        except OSError as e:
            return _refuse(sock, reqs[i:], held_from(i), e)
        if pid == 0:
            _child(request, pipes[i], masters[i], environ, stdio, logging_prepared)
        for fd in (pipes[i], masters[i]):
            if fd is not None:
                os.close(fd)
        if not _answer(sock, {"req": req, "pid": pid}):
            for rest in held_from(i + 1):
                os.close(rest)
            return False
    return True


def _refuse(sock: socket.socket, reqs: list, fds: list[int], e: Exception) -> bool:
    """Answer requests `reqs` (whose pipes are `fds`) with error `e`."""
    for fd in fds:
        os.close(fd)
    error = f"{type(e).__name__}: {e}"
    return all([_answer(sock, {"req": req, "error": error}) for req in reqs])


def _answer(sock: socket.socket, message: dict) -> bool:
    """Send `message` to the master; False if it is gone."""
    try:
        _send(sock, message)
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    flags = args[1:]
    if not args or not args[0].isdigit() or flags not in ([], ["--yield-to-master"]):
        print("usage: python -m pydist.forkserver FD [--yield-to-master] (started by the "
              "master, or by a worker for its siblings)", file=sys.stderr)
        sys.exit(2)
    code = serve(int(args[0]), yield_to_master=bool(flags))
    # The master waits for this exit at its own: skip the interpreter's teardown of what was
    # imported here (~6 ms of its ~10 ms shutdown), not what a preloaded module registered.
    atexit._run_exitfuncs()
    worker._flush_stdio()
    os._exit(code)


if __name__ == "__main__":
    main()
