"""The command line: `pydist -p N script.py [args]`, like `julia -p N script.jl`."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pydist",
        description="Start local (and SSH) workers, then run a script as __main__ on the master.",
    )
    parser.add_argument("-p", "--procs", type=_count, default=0, metavar="N",
                        help="number of local workers to start ('auto': one per core)")
    parser.add_argument("--machine-file", metavar="FILE",
                        help="start SSH workers, one '[count*][user@]host[:port] [bind_addr[:port]]' per line")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    opts = parser.parse_args(argv)
    if not os.path.isfile(opts.script):
        parser.error(f"no such script: {opts.script}")

    from . import addprocs

    if opts.procs:
        addprocs(opts.procs)
    if opts.machine_file:
        with open(opts.machine_file) as f:
            machines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if machines:
            addprocs(machines)
    sys.argv = [opts.script, *opts.args]
    script_dir = os.path.dirname(os.path.abspath(opts.script))
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    runpy.run_path(opts.script, run_name="__main__")


if __name__ == "__main__":
    main()
