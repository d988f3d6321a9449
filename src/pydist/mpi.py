"""MPI launch: `mpiexec -n N python -m pydist.mpi script.py [args]` (or `srun --mpi=pmix`).

Rank 0 runs the script (or `-c CODE`, `-m MODULE`, or an interactive prompt) as `__main__`
on the master; ranks 1..N-1 are its workers 2..N. MPI only starts the cluster (see
`managers.mpi`: the cookie and the addresses go over MPI, then every rank calls
`MPI_Finalize`); pydist's own connections do the rest, so a rank that dies is a lost worker
like any other. When the script ends, the workers are told to exit and every rank exits;
the job's exit status is the script's (with `mpiexec --enable-recovery`, which keeps the job
running when a worker rank dies, Open MPI's mpiexec exits with 0 whatever the ranks did).

`pydist.mpi.start()` does the same from inside a script started as
`mpiexec -n N python script.py`: on rank 0 it returns the worker ids, on the other ranks it
serves as a worker and then exits the process (MPIClusterManagers.jl's `start_main_loop`).

Needs mpi4py (`pip install 'pydist[mpi]'`), imported only here. An entry point, at the top
layer with `worker` and `cli`.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn, TextIO

from . import addprocs, cli
from . import worker as _worker
from .group import PGRP
from .managers import mpi as _mpi_manager
from .managers.mpi import MPIManager, abort_exchange, master_exchange, worker_exchange

__all__ = ["start", "main"]

USAGE = "mpiexec -n N python -m pydist.mpi [-c CODE | -m MODULE | script.py] [args ...]"


def _import_mpi() -> Any:
    """mpi4py's `MPI` module (importing it initializes MPI), or ImportError saying how to
    install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"pydist.mpi needs mpi4py (pip install 'pydist[mpi]', or "
                          f"pip install mpi4py): {e}") from e
    return MPI


def start() -> list[int]:
    """Make the ranks of this MPI job a cluster. On rank 0: the master; returns the worker
    ids (rank r is worker r+1). On every other rank: serve as a worker until the master is
    done with it, then exit the process (this call does not return). MPI is finalized
    afterwards on every rank: the script cannot use MPI itself."""
    MPI = _import_mpi()
    if MPI.Is_finalized():
        if _mpi_manager.started is not None:  # already done (e.g. by python -m pydist.mpi)
            return list(_mpi_manager.started)
        raise RuntimeError("pydist.mpi.start(): MPI is already finalized; call start() "
                           "before MPI_Finalize, once")
    comm = MPI.COMM_WORLD
    _check_launch(comm)
    if comm.Get_rank() != 0:
        _serve(comm, MPI)
    return _master(comm, MPI)


def _check_launch(comm: Any) -> None:
    """RuntimeError if Slurm started several tasks that MPI sees as separate one-rank jobs
    (`srun` without `--mpi=pmix`): each would otherwise run the script as its own master."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if comm.Get_size() == 1 and tasks.isdigit() and int(tasks) > 1:
        raise RuntimeError(f"srun started {tasks} tasks but MPI sees a job of 1 rank: start "
                           f"them with srun --mpi=pmix (or the MPI plugin your MPI uses)")


def _master(comm: Any, MPI: Any) -> list[int]:
    """Rank 0: exchange addresses, finalize MPI, then connect to the worker ranks."""
    size = comm.Get_size()
    ranks, errors = _collective(comm, lambda: master_exchange(comm, PGRP.cookie))
    MPI.Finalize()
    pids: list[int] = []
    if size > 1:
        _report_sigterm()
        pids = addprocs(MPIManager(ranks, errors))
    _mpi_manager.started = pids
    return list(pids)


def _serve(comm: Any, MPI: Any) -> NoReturn:
    """A worker rank: listen, tell rank 0 where, finalize MPI, serve; then exit."""
    rank = comm.Get_rank()
    for name in ("stdout", "stderr"):
        setattr(sys, name, _LinePrefix(getattr(sys, name), _label(rank)))
    _worker.configure_logging()  # its records go to our (prefixed) stderr
    listened = []

    def listen(cookie: str, bind_to: str | None) -> tuple[str, int]:
        listened.append(bind_to)
        return _worker.listen_worker(cookie, bind_to)

    joined = _collective(comm, lambda: worker_exchange(comm, listen))
    MPI.Finalize()  # with every rank at once, right after the exchange: see managers.mpi
    if joined is None:  # rank 0 gave up (a usage error), or we could not listen (it says why)
        code = 1 if listened else 0
    else:
        code = _worker.serve_worker()
    sys.stdout.flush()
    _worker._force_exit_later(code)  # user threads must not keep the rank alive
    sys.exit(code)


def _collective(comm: Any, exchange: Callable[[], Any]) -> Any:
    """Run our part of the exchange; if it fails, abort the whole job (the other ranks are
    waiting in a collective call that would never end, and so would MPI_Finalize)."""
    try:
        return exchange()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        raise


def _label(rank: int) -> Callable[[], str]:
    def label() -> str:
        who = PGRP.id if PGRP.id > 1 else f"(MPI rank {rank})"
        return f"      From worker {who}:\t"

    return label


class _LinePrefix(io.TextIOBase):
    """A worker rank's stdout or stderr: whole lines, each written at once and prefixed
    with "From worker N" (the launcher forwards every rank's output; lines written in one
    piece do not interleave with other ranks' lines)."""

    def __init__(self, stream: TextIO, label: Callable[[], str]):
        self._stream = stream
        self._label = label
        self._pending = ""
        self._mid_line = False  # a flushed partial line: its rest gets no prefix
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + s).split("\n")
            if lines:
                out = []
                for line in lines:
                    out.append(("" if self._mid_line else self._label()) + line + "\n")
                    self._mid_line = False
                self._emit("".join(out))
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit(("" if self._mid_line else self._label()) + self._pending)
                self._pending = ""
                self._mid_line = True
            else:
                self._emit("")

    def _emit(self, text: str) -> None:
        try:
            if text:
                self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # the launcher's end of our output is gone

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    @property
    def buffer(self) -> Any:
        return self._stream.buffer


def _report_sigterm() -> None:
    """On rank 0: say so when the launcher stops the job (by default mpiexec stops every
    rank when one dies), then die of SIGTERM as without this handler."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        try:
            os.write(2, b"pydist.mpi: the MPI launcher is stopping this job (SIGTERM). "
                        b"mpiexec stops every rank when one rank dies, unless started with "
                        b"--enable-recovery.\n")
        except OSError:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m pydist.mpi", usage=USAGE,
        description="Under mpiexec or srun --mpi=pmix: rank 0 runs the script (a module, a "
                    "command or an interactive prompt) as __main__ on the master, every other "
                    "rank is a worker (rank r is worker r+1).",
    )
    parser.add_argument("--version", action="version",
                        version=f"pydist {__version__} (Python {sys.version.split()[0]})")
    cli.add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m pydist.mpi`: rank 0 parses the command line and runs it; the other ranks
    serve as workers."""
    try:
        MPI = _import_mpi()
    except ImportError as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(1)
    comm = MPI.COMM_WORLD
    try:
        _check_launch(comm)
    except RuntimeError as e:
        print(f"python -m pydist.mpi: {e}", file=sys.stderr, flush=True)
        MPI.Finalize()
        sys.exit(1)
    if comm.Get_rank() != 0:
        _serve(comm, MPI)
    parser = _parser()
    try:
        opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
        cli.prepare_main(parser, opts)  # before the workers join: they take our sys.path
    except SystemExit:  # a usage error, --help, --version: the workers exit too
        abort_exchange(comm)
        MPI.Finalize()
        raise
    _master(comm, MPI)
    cli.run_main(opts)


if __name__ == "__main__":
    main()
