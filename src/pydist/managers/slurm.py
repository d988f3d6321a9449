"""SlurmManager: workers on the nodes of a Slurm job, one per task, started by one `srun`
(imported on first use: `pydist.SlurmManager` loads it, `import pydist` does not).

Two ways to get the nodes:

- **Inside an allocation** (`salloc`, `sbatch`: `SLURM_JOB_ID` is set, and no job options
  are given): one job step, `srun --ntasks=N` with N the allocation's task count (or
  `ntasks`), as SlurmClusterManager.jl does.
- **From outside** (no allocation, or job options such as `partition`, `time`, `job_name`):
  a plain `srun` with those options submits the job *and* is its only step. It waits in the
  queue (saying so, with the job id), and the job ends when that step does.

Why one `srun` whose step is the workers, rather than `salloc --no-shell` or an `sbatch`
job that holds an allocation for later `srun --jobid` steps: the job then lives exactly as
long as that one `srun` process, which we own and can stop; nothing holds the nodes when no
worker runs, and there is no second object (an allocation) to clean up. `salloc --no-shell`
and an `sbatch` holder both outlive a master that is SIGKILLed.

How it is tied to the master: `srun` runs under a small supervisor (a `python -c` process
using only the standard library). The master writes the cookie on the supervisor's stdin,
which forwards it to `srun` (Slurm broadcasts stdin to every task) and keeps `srun`'s stdin
open. When the master closes that pipe, or dies, the supervisor sees end-of-file: it closes
`srun`'s stdin (workers run with `--exit-on-eof`) and, if `srun` is still there a second
later, sends it SIGTERM (`srun` then revokes a job still in the queue, or ends the step)
and SIGKILL after 10 s more. Without it, a master killed while its job waits in the queue
would leave the job pending until it starts (tested: a SIGKILLed `srun` is noticed by
slurmctld only after the allocation is granted).

Each task runs ``sh -c 'printf "pydist_slurm:JOB:STEP:NODE\\n"; exec python -m pydist.worker
--exit-on-eof'``; `srun --label` prefixes every line with its task number, so one reader
splits `srun`'s output per task: the `pydist_slurm` line tells the task's node and job,
the rest goes to that worker's output relay (address line, then "From worker N" lines).
`srun --no-kill --wait=0 --kill-on-bad-exit=0` keeps the other workers running when a node
fails or a worker is removed, whatever the cluster's defaults say. Workers listen on their
node's first non-loopback address (`SSH_CONNECTION`, which `srun` would otherwise pass on
from a login shell, is removed from their environment).

Removing workers asks each to exit, then signals it through a one-task `srun --overlap` on
its node (SIGTERM, then SIGKILL); `interrupt` sends SIGINT the same way. When every worker
of a step is gone, `srun` ends by itself (else it is stopped as above) and a job submitted
from outside is `scancel`ed for good measure; `cleanup()` does the same at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, BinaryIO, Union

from ..exceptions import LaunchWorkerError
from ..group import PGRP
from . import ClusterManager, WorkerConfig, WorkerOutput, connect_tcp, request_exit, worker_env, \
    worker_timeout

log = logging.getLogger(__name__)

__all__ = ["SlurmManager", "srun_options"]

#: What a Slurm option's value may be: a string or number (``--key=value``), True (a bare
#: ``--key``), or False/None (left out).
OptionValue = Union[str, int, float, bool, None]

# Options SlurmManager sets itself: the way it reads the workers' output depends on them.
_RESERVED = {"label", "input", "output", "error", "pty", "unbuffered", "wait",
             "kill_on_bad_exit", "no_kill", "ntasks", "chdir", "jobid", "overlap"}
_OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")

# Run by every task: say which job, step and node it is, then become the worker.
_TASK_WRAPPER = ('printf "pydist_slurm:%s:%s:%s\\n" "$SLURM_JOB_ID" "$SLURM_STEP_ID" '
                 '"$SLURMD_NODENAME"; exec "$@"')
_TASK_LINE = re.compile(rb"^pydist_slurm:(\d*):([^:]*):(.*)$")
_LABELLED = re.compile(rb"^\s*(\d+): ?(.*)$")
_QUEUED = re.compile(r"job (\d+) queued and waiting for resources")
_STEP_WAIT = re.compile(r"[Jj]ob (\d+) step creation temporarily disabled")
_TASK_STATUS = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.*)$")

# The supervisor (see the module docstring): stdlib only, run as `python -I -S -c`.
_SUPERVISOR = r"""
import os, subprocess, sys, threading
srun = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE)
def watch():
    try:
        line = b""
        while not line.endswith(b"\n"):  # the cookie, for every task
            chunk = os.read(0, 1)
            if not chunk:
                break
            line += chunk
        srun.stdin.write(line)
        srun.stdin.flush()
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    try:
        srun.stdin.close()  # the workers see end-of-file and exit
    except OSError:
        pass
    for sig, grace in ((None, 1.0), ("terminate", 10.0), ("kill", None)):
        if sig is not None:
            getattr(srun, sig)()
        try:
            srun.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
threading.Thread(target=watch, daemon=True).start()
code = srun.wait()
os._exit(code if code >= 0 else 128 - code)
"""

def srun_options(options: dict[str, OptionValue]) -> list[str]:
    """Keyword options as `srun` arguments: ``cpus_per_task=2`` -> ``--cpus-per-task=2``,
    ``exclusive=True`` -> ``--exclusive``; False and None are left out. TypeError or
    ValueError naming the option for anything else."""
    args = []
    for key, value in options.items():
        if not isinstance(key, str) or not _OPTION_NAME.match(key):
            raise ValueError(f"SlurmManager: invalid option name {key!r}")
        if key in _RESERVED:
            raise ValueError(f"SlurmManager: option {key!r} is set by SlurmManager itself"
                             + (" (use the ntasks argument)" if key == "ntasks" else "")
                             + (" (use addprocs(..., dir=...))" if key == "chdir" else ""))
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (str, int, float)):
            text = str(value)
            if "\n" in text or "\0" in text:
                raise ValueError(f"SlurmManager: option {key}={value!r} contains a newline or NUL")
            args.append(f"{flag}={text}")
        else:
            raise TypeError(f"SlurmManager: option {key}= must be a str, a number or a bool, "
                            f"got {type(value).__name__} {value!r}")
    return args


def _task_ids(spec: str) -> list[int]:
    """srun's task list "0-2,5" -> [0, 1, 2, 5]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class _Task:
    """One task of a step: its node, its output pipe, its worker's config and fate."""

    def __init__(self, index: int):
        self.index = index
        self.node: str | None = None
        rfd, self.wfd = os.pipe()
        self.reader: BinaryIO = os.fdopen(rfd, "rb")
        self.write_lock = threading.Lock()
        self.config: WorkerConfig | None = None
        self.status: str | None = None  # what srun said when it ended ("Killed", ...)
        self.ended = threading.Event()  # srun said it ended (or srun itself ended)
        self.done = False  # its worker left (or never joined): the step no longer needs it

    def write(self, text: bytes) -> None:
        with self.write_lock:
            if self.wfd < 0:
                return
            with contextlib.suppress(OSError):
                os.write(self.wfd, text + b"\n")

    def close(self) -> None:
        with self.write_lock:
            if self.wfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.wfd)
                self.wfd = -1


class _Step:
    """One `srun` (under its supervisor) and the tasks it runs: one `addprocs`."""

    def __init__(self, proc: subprocess.Popen, ntasks: int, inside: bool, job_id: str | None,
                 partition: str | None):
        self.proc = proc
        self.ntasks = ntasks
        self.inside = inside
        self.job_id = job_id  # known at once inside an allocation; else from srun
        self.step_id: str | None = None
        self.partition = partition
        self.tasks: dict[int, _Task] = {}
        self.announce: list[_Task] = []  # tasks whose node is known, not yet announced
        self.cond = threading.Condition()
        self.waiting: str | None = None  # srun's "queued and waiting" line, while it waits
        self.tail: deque[str] = deque(maxlen=20)  # srun's own last messages
        self.readers_done = 0
        self.launching = True
        self.finishing = False
        self.forced = False  # srun had to be stopped (its step or job may need scancel)

    # ------------------------------------------------------------ names for messages
    def job(self) -> str:
        if self.job_id is None:
            where = f"; partition {self.partition}" if self.partition else ""
            return f"Slurm job (no job id yet{where})"
        step = f".{self.step_id}" if self.step_id not in (None, "") else ""
        return f"Slurm job {self.job_id}{step}"

    def where(self, task: _Task) -> str:
        return f"{self.job()}, task {task.index} on node {task.node or '(unknown)'}"

    def srun_said(self) -> str:
        lines = [t for t in self.tail if t.strip()]
        return ("; srun said:\n    " + "\n    ".join(lines[-8:])) if lines else ""

    # ------------------------------------------------------------ reading srun's output
    def task(self, index: int) -> _Task:
        with self.cond:
            task = self.tasks.get(index)
            if task is None:
                task = self.tasks[index] = _Task(index)
            return task

    def read_stdout(self, stream: BinaryIO) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.rstrip(b"\r\n")
                m = _LABELLED.match(line)
                if m is None:
                    self._srun_line(line.decode(errors="replace"))
                    continue
                task = self.task(int(m.group(1)))
                text = m.group(2)
                t = _TASK_LINE.match(text) if task.node is None else None
                if t is not None:
                    with self.cond:
                        if self.job_id is None or self.job_id == "":
                            self.job_id = t.group(1).decode() or None
                        self.step_id = t.group(2).decode()
                        task.node = t.group(3).decode() or "(unknown)"
                        self.waiting = None
                        self.announce.append(task)
                        self.cond.notify_all()
                    continue
                task.write(text)
        except (OSError, ValueError):
            pass
        finally:
            self._reader_done()

    def read_stderr(self, stream: BinaryIO) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.rstrip(b"\r\n")
                m = _LABELLED.match(line)
                if m is not None:  # a task's stderr: its worker's output too
                    self.task(int(m.group(1))).write(m.group(2))
                else:
                    self._srun_line(line.decode(errors="replace"))
        except (OSError, ValueError):
            pass
        finally:
            self._reader_done()

    def _srun_line(self, text: str) -> None:
        """One of srun's own messages: queue waits, job ids, tasks that ended."""
        if not text.strip():
            return
        log.info("%s: %s", self.job(), text)
        with self.cond:
            self.tail.append(text)
            m = _QUEUED.search(text) or _STEP_WAIT.search(text)
            if m:
                self.job_id = self.job_id or m.group(1)
                self.waiting = text
            s = _TASK_STATUS.match(text)
            if s:
                for index in _task_ids(s.group(2)):
                    task = self.tasks.get(index)
                    if task is not None:
                        task.node = task.node or s.group(1)
                        task.status = s.group(3)
                        task.ended.set()
            self.cond.notify_all()

    def _reader_done(self) -> None:
        with self.cond:
            self.readers_done += 1
            if self.readers_done < 2:
                return
            tasks = list(self.tasks.values())
            self.cond.notify_all()
        for task in tasks:  # srun is gone: so is every task
            task.ended.set()
            task.close()

    def output_ended(self) -> bool:
        return self.readers_done >= 2


class SlurmManager(ClusterManager):
    """Workers on the nodes of a Slurm job, one per task (`srun` runs them).

    Inside an allocation (`salloc`, `sbatch`) with no job options, one job step runs a
    worker on each of the allocation's tasks (`ntasks`: how many; default all of them).
    Otherwise `srun` submits a new job with `ntasks` tasks (default: one per node, as
    `srun` does), `partition`, `time` (`--time`), `job_name` (`--job-name`, default
    "pydist") and every other keyword as an option: ``cpus_per_task=2`` is
    ``--cpus-per-task=2``, True a bare flag; addprocs then waits while the job is queued,
    up to its `timeout` (the job is cancelled after that). Removal asks a worker to exit,
    then signals it after `exit_timeout` and `term_timeout` seconds.
    """

    def __init__(self, ntasks: int | None = None, *, partition: str | None = None,
                 time: str | None = None, job_name: str | None = None,
                 exit_timeout: float = 5.0, term_timeout: float = 5.0,
                 **options: OptionValue):
        if ntasks is not None and (not isinstance(ntasks, int) or isinstance(ntasks, bool)):
            raise TypeError(f"SlurmManager: ntasks must be an int, got {ntasks!r}")
        if ntasks is not None and ntasks < 1:
            raise ValueError(f"SlurmManager: ntasks must be >= 1, got {ntasks}")
        for key, value in (("partition", partition), ("time", time), ("job_name", job_name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"SlurmManager: {key} must be a str, got {value!r}")
        self.ntasks = ntasks
        self.partition = partition
        self.time = time
        self.job_name = job_name
        self.options = dict(options)
        self.exit_timeout = exit_timeout
        self.term_timeout = term_timeout
        # Validated now, so that bad options fail before anything runs.
        self._job_args = srun_options({"job_name": job_name or "pydist", "partition": partition,
                                       "time": time, **self.options})
        self._lock = threading.Lock()
        self._steps: list[_Step] = []
        self._gone: dict[int, threading.Event] = {}  # pid -> set when deregistered

    def __repr__(self) -> str:
        args = [f"ntasks={self.ntasks!r}"] if self.ntasks is not None else []
        for key in ("partition", "time", "job_name"):
            if getattr(self, key) is not None:
                args.append(f"{key}={getattr(self, key)!r}")
        args += [f"{k}={v!r}" for k, v in self.options.items()]
        return f"SlurmManager({', '.join(args)})"

    def submits_job(self) -> bool:
        """Whether `launch` submits a new job (True) or runs a step in the allocation this
        process runs in (False: `SLURM_JOB_ID` is set and no job option was given)."""
        given = (self.partition, self.time, self.job_name)
        return any(v is not None for v in given) or bool(self.options) or \
            not os.environ.get("SLURM_JOB_ID")

    def _task_count(self, submit: bool) -> int:
        if self.ntasks is not None:
            return self.ntasks
        if not submit:
            for var in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
                value = os.environ.get(var, "")
                if value.isdigit() and int(value) > 0:
                    return int(value)
            return 1
        nodes = self.options.get("nodes", 1)
        per_node = self.options.get("ntasks_per_node", 1)
        try:
            return int(nodes) * int(per_node)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"SlurmManager: give ntasks= (it cannot be derived from "
                             f"nodes={nodes!r}, ntasks_per_node={per_node!r})") from None

    # ---------------------------------------------------------------- launch
    def launch(self, params: dict, launched: list, launch_ntfy: threading.Condition) -> None:
        submit = self.submits_job()
        ntasks = self._task_count(submit)
        srun = shutil.which("srun")
        if srun is None:
            raise LaunchWorkerError("SlurmManager: srun not found on PATH (is Slurm installed "
                                    "here?)")
        timeout = float(params.get("timeout") or worker_timeout())
        exename = params.get("exename") or sys.executable
        exeflags = list(params.get("exeflags") or [])
        cmd = [srun, "--label", "--input=all", f"--ntasks={ntasks}", "--no-kill", "--wait=0",
               "--kill-on-bad-exit=0"]
        if params.get("dir"):
            cmd.append(f"--chdir={params['dir']}")
        if submit:
            cmd += self._job_args
        cmd += ["sh", "-c", _TASK_WRAPPER, "pydist-slurm-task", exename, *exeflags,
                "-m", "pydist.worker", "--exit-on-eof"]
        env = self._environment(params, submit)
        inside_job = None if submit else os.environ.get("SLURM_JOB_ID")
        log.info("starting %d workers with srun (%s)", ntasks,
                 "a new job" if submit else f"a step of Slurm job {inside_job}")
        log.debug("srun command: %s", cmd)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SUPERVISOR, *cmd],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            raise LaunchWorkerError(f"SlurmManager: could not run srun: {e}") from e
        step = _Step(proc, ntasks, not submit, inside_job, self.partition)
        with self._lock:
            self._steps.append(step)
        try:
            proc.stdin.write(PGRP.cookie.encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]  # it stays open (see the docstring)
        except OSError:
            pass  # srun failed at once; its output says why
        for reader, stream in ((step.read_stdout, proc.stdout), (step.read_stderr, proc.stderr)):
            threading.Thread(target=reader, args=(stream,), daemon=True,
                             name="pydist-slurm-output").start()
        try:
            self._wait_for_tasks(step, params, timeout, launched, launch_ntfy)
        finally:
            with step.cond:
                step.launching = False
            self._maybe_finish(step)

    def _environment(self, params: dict, submit: bool) -> dict[str, str]:
        """srun's environment, which it passes on to every task."""
        base = dict(os.environ)
        for var in ("SSH_CONNECTION", "SSH_CLIENT"):  # the login node's, not the task's
            base.pop(var, None)
        if submit and base.get("SLURM_JOB_ID"):
            # A new job from inside an allocation: srun must not see the allocation.
            base = {k: v for k, v in base.items()
                    if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        env = worker_env(params, base)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                          if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join(paths)  # the workers import this very pydist
        return env

    def _wait_for_tasks(self, step: _Step, params: dict, timeout: float, launched: list,
                        launch_ntfy: threading.Condition) -> None:
        """Announce each task once its node is known; return when all are, else raise
        LaunchWorkerError (after `timeout`, or when srun ended first)."""
        start = time.monotonic()
        deadline = start + timeout
        reported_at: float | None = None
        announced = 0
        while True:
            with step.cond:
                batch, step.announce = step.announce, []
                waiting = step.waiting
                ended = step.output_ended()
            for task in batch:
                self._announce(step, task, params, launched, launch_ntfy)
            announced += len(batch)
            if announced >= step.ntasks:
                return
            now = time.monotonic()
            if ended:
                code = _wait_code(step.proc, 5.0)
                missing = step.ntasks - announced
                raise LaunchWorkerError(
                    f"{step.job()}: srun ended{_status(code)} before starting {missing} of "
                    f"{step.ntasks} workers{step.srun_said()}")
            queue = "for its job step to start" if step.inside else "in the queue"
            if now >= deadline:
                reason = self._reason(step) if waiting is not None else ""
                self._give_up(step)
                if waiting is not None and announced == 0:
                    raise LaunchWorkerError(
                        f"{step.job()} was still waiting {queue} after {timeout:g} s "
                        f"({reason}), and was cancelled; pass addprocs(..., timeout=SECONDS) "
                        f"to wait longer")
                hint = (" (no task started: do other job steps hold the allocation's "
                        "resources?)" if step.inside and announced == 0 else "")
                raise LaunchWorkerError(
                    f"{step.job()}: {step.ntasks - announced} of {step.ntasks} workers did "
                    f"not start within {timeout:g} s{hint}{step.srun_said()}")
            if waiting is not None and (reported_at is None or now - reported_at >= 30):
                reason = self._reason(step)
                if reported_at is None:
                    print(f"pydist: {step.job()} is waiting {queue} ({reason}); addprocs "
                          f"will wait up to {timeout:g} s (its timeout)",
                          file=sys.stderr, flush=True)
                log.info("%s is waiting %s (%s) for %.0f s", step.job(), queue, reason,
                         now - start)
                reported_at = now
            with step.cond:
                if not step.announce and not step.output_ended():
                    step.cond.wait(min(0.5, max(0.0, deadline - now)))

    def _announce(self, step: _Step, task: _Task, params: dict, launched: list,
                  launch_ntfy: threading.Condition) -> None:
        config = WorkerConfig(
            io=task.reader, host=task.node, exename=params.get("exename") or sys.executable,
            exeflags=list(params.get("exeflags") or []),
            enable_threaded_blas=bool(params.get("enable_threaded_blas", False)),
            userdata={"slurm_job": step.job_id, "slurm_step": step.step_id,
                      "slurm_task": task.index, "slurm_node": task.node})
        config.output = WorkerOutput(task.reader)  # reads (and keeps) its output from now on
        task.config = config
        config.userdata["_task"] = task
        config.userdata["_step"] = step
        log.info("%s: task %d started on node %s", step.job(), task.index, task.node)
        with launch_ntfy:
            launched.append(config)
            launch_ntfy.notify_all()

    @staticmethod
    def _reason(step: _Step) -> str:
        """Why the job waits, as squeue says (e.g. "Resources", "Priority")."""
        if step.job_id is None:
            return "reason unknown"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["squeue", "-h", "-j", step.job_id, "-o", "%r"],
                                  capture_output=True, text=True, timeout=10)
            reason = done.stdout.strip()
            if done.returncode == 0 and reason and reason != "None":
                return f"reason: {reason}"
        return "reason unknown"

    def _give_up(self, step: _Step) -> None:
        """Stop a step whose launch failed: cancel its job (or step) at once."""
        with step.cond:
            step.forced = True
        _scancel(step)
        with contextlib.suppress(OSError, ValueError):
            step.proc.stdin.close()  # type: ignore[union-attr]

    # ---------------------------------------------------------------- connect
    def connect(self, pid: int, config: WorkerConfig) -> Any:
        task: _Task | None = (config.userdata or {}).get("_task")
        step: _Step | None = (config.userdata or {}).get("_step")
        if task is None or step is None or config.output is None:
            return super().connect(pid, config)  # worker to worker: plain TCP
        self._gone.setdefault(pid, threading.Event())
        output = config.output
        output.pid = pid
        deadline = time.monotonic() + worker_timeout()
        while not output.found.wait(0.1):
            if task.ended.is_set():
                output.found.wait(1.0)  # its last lines may still be on their way
                break
            if time.monotonic() >= deadline:
                break
        if output.address is None:
            startup = "\n".join(output.startup[-30:])
            detail = f"\nWorker output:\n{startup}" if startup else " (the worker printed nothing)"
            if task.ended.is_set() or output.eof:
                what = f"the worker ended ({task.status})" if task.status else "the worker ended"
            elif output.too_chatty:
                what = "no address line among the worker's first lines of output"
            else:
                what = f"no address line from the worker within {worker_timeout():g} s"
            raise LaunchWorkerError(f"{step.where(task)}: {what}{step.srun_said()}{detail}")
        addr, port = output.address
        config.bind_addr = addr
        config.port = port
        config.connect_at = (addr, port)
        try:
            return connect_tcp(pid, addr, port)
        except LaunchWorkerError as e:
            raise LaunchWorkerError(f"{step.where(task)}: {e}") from e

    # ---------------------------------------------------------------- manage / kill
    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "interrupt":
            self._signal(pid, config, "INT")
        elif op == "deregister":
            self._gone.setdefault(pid, threading.Event()).set()
            self._task_done(config)

    def exit_reason(self, pid: int, config: WorkerConfig) -> str | None:
        """How the worker's task ended, as srun reported it, with its job, node and task."""
        task: _Task | None = (config.userdata or {}).get("_task")
        step: _Step | None = (config.userdata or {}).get("_step")
        if task is None or step is None:
            return None
        task.ended.wait(1.0)  # srun reports a task's end a moment after its connection drops
        if task.status:
            how = f"ended ({task.status})"
        elif step.output_ended():
            how = f"ended with its srun{_status(_wait_code(step.proc, 1.0))}"
        else:
            how = "lost its connection"
        return f"{how} on node {task.node} ({step.job()}, task {task.index})"

    def kill(self, pid: int, config: WorkerConfig) -> None:
        if config.ospid is None:  # it never joined: nothing to ask, the step may end
            self._task_done(config)
            return
        if pid not in PGRP.workers:  # already lost, being silent: make sure it is gone
            with contextlib.suppress(RuntimeError):
                threading.Thread(target=self._signal, args=(pid, config, "KILL"), daemon=True,
                                 name="pydist-slurm-kill").start()
            return
        with contextlib.suppress(Exception):
            request_exit(pid)
        with contextlib.suppress(RuntimeError):  # at interpreter exit `cleanup` stops srun
            threading.Thread(target=self._escalate, args=(pid, config), daemon=True,
                             name="pydist-slurm-escalate").start()

    def _escalate(self, pid: int, config: WorkerConfig) -> None:
        """Still there after `exit_timeout`: SIGTERM its task; after `term_timeout`: SIGKILL."""
        gone = self._gone.setdefault(pid, threading.Event())
        if gone.wait(self.exit_timeout):
            return
        log.warning("Failed to gracefully kill worker %d within %g s, sending SIGTERM", pid,
                    self.exit_timeout)
        self._signal(pid, config, "TERM")
        if gone.wait(self.term_timeout):
            return
        log.warning("Worker %d ignored SIGTERM, sending SIGKILL", pid)
        self._signal(pid, config, "KILL")

    def _signal(self, pid: int, config: WorkerConfig, sig: str) -> None:
        """Send `sig` to worker `pid`'s process, on its node, through a one-task
        `srun --overlap` step of its job (Slurm cannot signal one task of a step)."""
        userdata = config.userdata or {}
        job, node, ospid = userdata.get("slurm_job"), userdata.get("slurm_node"), config.ospid
        if job is None or node is None or ospid is None:
            log.error("Worker %d cannot be presently signalled (no job, node or os pid).", pid)
            return
        srun = shutil.which("srun") or "srun"
        cmd = [srun, f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1",
               f"--nodelist={node}", "--quiet", "kill", f"-{sig}", str(ospid)]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("could not signal worker %d on node %s (Slurm job %s): %s", pid, node,
                      job, e)
            return
        if done.returncode != 0:
            log.error("kill -%s %s on node %s (Slurm job %s) failed: %s", sig, ospid, node,
                      job, done.stderr.decode(errors="replace").strip())

    # ---------------------------------------------------------------- ending a step
    def _task_done(self, config: WorkerConfig) -> None:
        task: _Task | None = (config.userdata or {}).get("_task")
        step: _Step | None = (config.userdata or {}).get("_step")
        if task is None or step is None:
            return
        with step.cond:
            task.done = True
        self._maybe_finish(step)

    def _maybe_finish(self, step: _Step) -> None:
        """Once the launch is over and every worker of `step` is gone, end it."""
        with step.cond:
            if step.launching or step.finishing:
                return
            if any(t.config is not None and not t.done for t in step.tasks.values()):
                return
            step.finishing = True
        with contextlib.suppress(RuntimeError):
            threading.Thread(target=self._finish, args=(step,), daemon=True,
                             name="pydist-slurm-finish").start()

    def _finish(self, step: _Step, grace: float = 3.0) -> None:
        """srun ends by itself once its tasks have; else its supervisor stops it (stdin
        closed). A job submitted from outside is then cancelled for good measure."""
        if _wait_code(step.proc, grace) is None:
            with step.cond:
                step.forced = True
            log.info("%s: stopping srun (its workers are gone)", step.job())
        with contextlib.suppress(OSError, ValueError):
            step.proc.stdin.close()  # type: ignore[union-attr]
        if _wait_code(step.proc, 15.0) is None:
            _kill_group(step.proc)
        if not step.inside or step.forced:
            _scancel(step)
        with self._lock:
            with contextlib.suppress(ValueError):
                self._steps.remove(step)
        log.info("%s: ended", step.job())

    def cleanup(self, grace: float = 3.0) -> None:
        """At exit: stop every srun still running (workers see end-of-file and exit),
        kill what is left after `grace` seconds, and cancel the jobs submitted from outside."""
        with self._lock:
            steps = list(self._steps)
            self._steps.clear()
        for step in steps:
            with contextlib.suppress(OSError, ValueError):
                step.proc.stdin.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + grace + 11.0  # the supervisor's own SIGTERM grace
        for step in steps:
            if _wait_code(step.proc, max(0.0, deadline - time.monotonic())) is None:
                step.forced = True
                _kill_group(step.proc)
            if not step.inside or step.forced:
                _scancel(step)


# ==================================================================== helpers
def _wait_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _status(code: int | None) -> str:
    if code is None:
        return ""
    if code > 128:
        return f" (killed by signal {code - 128})"
    return f" with status {code}"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)


def _scancel(step: _Step) -> None:
    """Cancel the step's job (submitted from outside) or its step (inside an allocation)."""
    if not step.job_id:
        return
    target = step.job_id
    if step.inside:
        if step.step_id in (None, ""):
            return
        target = f"{step.job_id}.{step.step_id}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", "--quiet", target], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
