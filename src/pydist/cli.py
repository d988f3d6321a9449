"""The command line, like `julia -p N`: `pydist -p N script.py [args]`, `pydist -p N -c CODE`,
`pydist -p N -m MODULE`, or `pydist -p N` alone for an interactive prompt; `pydist --slurm
script.py` inside a Slurm allocation starts one worker per task of the allocation.

The script's `sys.path` and `sys.argv` are set up as `python` would set them *before* the
workers start, because workers take the master's `sys.path` when they join: so a script can
import the modules beside it on the workers too, wherever it is run from.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import os
import runpy
import sys
import types

__all__ = ["main"]

USAGE = ("pydist [-p N] [--machine-file FILE] [--slurm] [-c CODE | -m MODULE | script.py] "
         "[args ...]")


def _count(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-p takes a number of workers or 'auto', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"-p takes a non-negative number, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pydist", usage=USAGE,
        description="Start local (and SSH) workers, then run a script, a module, a command or "
                    "an interactive prompt as __main__ on the master (like `julia -p N`).",
    )
    parser.add_argument("--version", action="version",
                        version=f"pydist {__version__} (Python {sys.version.split()[0]})")
    parser.add_argument("-p", "--procs", type=_count, default=0, metavar="N",
                        help="number of local workers to start ('auto': one per core)")
    parser.add_argument("--machine-file", metavar="FILE",
                        help="start SSH workers, one '[count*][user@]host[:port] [bind_addr[:port]]' per line")
    parser.add_argument("--slurm", action="store_true",
                        help="inside a Slurm allocation (salloc, sbatch): start one worker per "
                             "task of the allocation with srun")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What to run, as `python` takes it: `-c CODE`, `-m MODULE` or `script.py`, then its
    arguments (shared with `python -m pydist.mpi`)."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("-c", dest="command", metavar="CODE", help="run CODE (as python -c)")
    what.add_argument("-m", dest="module", metavar="MODULE", help="run MODULE as a script (as python -m)")
    parser.add_argument("script", nargs="?", help="the Python script to run (none: an interactive prompt)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def prepare_main(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Check what `opts` says to run (a missing script is a usage error) and set `sys.argv`
    and `sys.path[0]` as `python` would for it. Call before workers start: they take the
    master's `sys.path` when they join."""
    args = list(opts.args)
    if opts.command is not None or opts.module is not None:
        if opts.script is not None:  # `-c CODE a b`: a and b are arguments, as for python
            args.insert(0, opts.script)
    elif opts.script is not None and not os.path.isfile(opts.script):
        parser.error(f"no such script: {opts.script}")
    # As python does: sys.argv, and sys.path[0] is the script's folder (else the current one).
    if opts.command is not None:
        sys.argv = ["-c", *args]
        first = os.getcwd()
    elif opts.module is not None:
        sys.argv = ["-m", *args]  # runpy puts the module's file name first
        first = os.getcwd()
    elif opts.script is not None:
        sys.argv = [opts.script, *args]
        first = os.path.dirname(os.path.abspath(opts.script))
    else:
        sys.argv = [""]
        first = os.getcwd()
    if first in sys.path:
        sys.path.remove(first)
    sys.path.insert(0, first)


def run_main(opts: argparse.Namespace) -> None:
    """Run what `opts` says as `__main__` (after `prepare_main`): the command, the module,
    the script, or else an interactive prompt."""
    if opts.command is not None:
        with _as_main() as namespace:
            exec(compile(opts.command, "<string>", "exec"), namespace)
    elif opts.module is not None:
        runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    elif opts.script is not None:
        runpy.run_path(opts.script, run_name="__main__")
    else:
        from . import nworkers

        _interact(nworkers())


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_usage(sys.stderr)
        print("pydist: say what to run, or -p N for an interactive prompt with N workers "
              "(pydist --help)", file=sys.stderr)
        sys.exit(2)
    opts = parser.parse_args(argv)
    if opts.slurm and not os.environ.get("SLURM_JOB_ID"):
        parser.error("--slurm runs inside a Slurm allocation (salloc or sbatch), but "
                     "SLURM_JOB_ID is not set")
    prepare_main(parser, opts)  # before the workers start, so that they see the same path

    from . import addprocs

    if opts.procs:
        addprocs(opts.procs)
    if opts.machine_file:
        with open(opts.machine_file) as f:
            machines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if machines:
            addprocs(machines)
    if opts.slurm:
        from .managers.slurm import SlurmManager

        addprocs(SlurmManager())
    run_main(opts)


@contextlib.contextmanager
def _as_main():
    """A fresh `__main__` module while the code runs (functions defined in it are then
    `__main__` functions, sent to workers by value, as `runpy` does for scripts)."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = module
    try:
        yield module.__dict__
    finally:
        sys.modules["__main__"] = saved


def _interact(workers: int) -> None:
    """An interactive prompt, like `python` with no script, with pydist imported."""
    import code
    import importlib

    try:
        importlib.import_module("readline")  # line editing and history, where available
    except ImportError:
        pass
    from . import __version__

    banner = (f"Python {sys.version.split()[0]}, pydist {__version__} with {workers} "
              f"worker{'s' if workers != 1 else ''} (pydist is imported; Ctrl-D to leave)")
    with _as_main() as namespace:
        namespace["pydist"] = sys.modules["pydist"]
        code.interact(banner=banner, local=namespace, exitmsg="")


if __name__ == "__main__":
    main()
