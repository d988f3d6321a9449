"""The worker process: `python -m pydist.worker [--bind-to ADDR[:PORT]]`.

It reads the cluster cookie from its first line of stdin, listens, prints
`pydist_worker:<port>#<addr>` and serves connections until its master goes away or tells it
to exit. If no master connects within `PYDIST_WORKER_TIMEOUT` seconds it exits, so a worker
never outlives a master that died while starting it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import types

from .calls import interrupt_running_calls, interruptible_sleep
from .cluster import PGRP, _accept_connection, init_worker
from .managers import worker_timeout
from .transport import Listener

__all__ = ["start_worker", "main"]

# After the master is gone, how long a clean exit may take before we force it.
EXIT_GRACE_SECONDS = 2.0


def parse_bind_to(spec: str | None) -> tuple[str, int]:
    """'ADDR', 'ADDR:PORT', '[IPv6]:PORT' -> (addr, port); port 0 means any free port."""
    if not spec:
        return "127.0.0.1", 0
    if spec.startswith("["):
        addr, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        addr, port = spec.split(":")
    else:
        addr, port = spec, ""
    port = port.strip("[]")
    try:
        port_n = int(port) if port else 0
    except ValueError:
        raise ValueError(f"invalid port in --bind-to {spec!r}") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"invalid port number in --bind-to {spec!r}")
    return addr, port_n


def _fresh_main() -> None:
    """Give user code (`everywhere`, by-value functions) a clean `__main__`, not this module."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main


def _on_sigint(signum, frame) -> None:
    interrupt_running_calls()


def start_worker(out=None, cookie: str | None = None, close_stdin: bool = True,
                 stderr_to_stdout: bool = True, bind_to: str | None = None) -> int:
    """Serve as a worker until the master goes away; returns the exit code."""
    out = sys.stdout if out is None else out
    if cookie is None:
        cookie = sys.stdin.readline().strip()
    if close_stdin:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    if stderr_to_stdout:
        sys.stdout.flush()
        os.dup2(1, 2)
    init_worker(cookie)
    _fresh_main()
    addr, port = parse_bind_to(bind_to)
    timeout = worker_timeout()
    listener = Listener(addr, port, PGRP.cookie_bytes, _accept_connection, timeout)
    PGRP.listener = listener
    listener.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    time.sleep = interruptible_sleep  # a sleeping remote call can be interrupted
    print(f"pydist_worker:{listener.address[1]}#{addr}", file=out, flush=True)

    if not PGRP.master_connected.wait(timeout):
        print(f"Master process (id 1) could not connect within {timeout} seconds.\nexiting.",
              file=sys.stderr, flush=True)
        return 1
    while not PGRP.shutdown.wait(1.0):
        pass
    listener.close()
    for w in list(PGRP.workers.values()):
        if w.conn is not None:
            w.conn.close()
    return PGRP.exit_code


def _force_exit_later(code: int) -> None:
    """Exit for sure a little later, even if user threads would keep the process alive."""
    from .calls import _original_sleep

    def force() -> None:
        _original_sleep(EXIT_GRACE_SECONDS)
        os._exit(code)

    threading.Thread(target=force, name="pydist-exit", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pydist.worker",
                                     description="Run a pydist worker (the cookie is read from stdin).")
    parser.add_argument("--bind-to", default=None, metavar="ADDR[:PORT]")
    args = parser.parse_args(argv)
    code = start_worker(bind_to=args.bind_to)
    sys.stdout.flush()
    _force_exit_later(code)  # user threads must not keep an orphan alive
    sys.exit(code)


if __name__ == "__main__":
    main()
