"""The worker process: `python -m pydist.worker [--bind-to ADDR[:PORT]] [--join HOST:PORT]`.

It reads the cluster cookie from its first line of stdin (or `--cookie`), listens, prints
`pydist_worker:<port>#<addr>` and serves connections until its master goes away or tells it
to exit. If no master connects within `PYDIST_WORKER_TIMEOUT` seconds it exits, so a worker
never outlives a master that died while starting it. With `--exit-on-eof` (SSH workers) it
also exits when its stdin closes: the ssh session that started it is gone. With
`--join HOST:PORT` it dials in to an ElasticManager instead (`join_cluster`; the cookie from
`--cookie`, else `PYDIST_COOKIE`, else stdin) and serves on the connection it dialled.

A worker also starts sibling workers on its host when asked (`cluster.launch_additional`):
that is how `count > 1` workers per SSH host start with one ssh connection, as in Julia.

An entry point, at the top with `runtime`: importing it wires pydist (handlers, hooks)
even if nothing else imported `runtime`.
"""

from __future__ import annotations

import _signal  # type: ignore  # (typeshed has no stub for it)
import atexit
import logging
import os
import socket
import sys
import threading
import time
import types
from typing import NoReturn

from . import joining, runtime, transport
from .calls import (
    _original_sleep,
    interrupt_running_calls,
    interruptible_condition_wait,
    interruptible_sleep,
)
from .exceptions import AuthenticationError, ProtocolError
from .group import PGRP
from .managers import worker_timeout
from .transport import Listener, default_bind_addr

__all__ = ["init_worker", "start_worker", "listen_worker", "serve_worker", "join_cluster",
           "wait_for_shutdown", "main"]

log = logging.getLogger("pydist.worker")  # (run as a script, __name__ is "__main__")

# After the master is gone, how long a clean exit may take before we force it.
EXIT_GRACE_SECONDS = 2.0


def configure_logging(environ=os.environ,
                      prepared: tuple[logging.StreamHandler, str] | None = None) -> None:
    """A worker process's own logging: pydist's records at `PYDIST_LOG_LEVEL` (a level name
    or number; default WARNING) go to stderr, which the master relays ("From worker N:").
    Only `python -m pydist.worker` calls this: there pydist is the application. `prepared`:
    what `prepare_logging` set up before this process was forked, kept if made for the same
    `PYDIST_LOG_LEVEL`."""
    spec = environ.get("PYDIST_LOG_LEVEL", "").strip()
    level = _log_level(spec)
    if level is None:
        print(f"pydist worker: ignoring PYDIST_LOG_LEVEL={spec!r} (not a logging level)",
              file=sys.stderr, flush=True)
    if prepared is not None and prepared[1] == spec:
        return  # the template's handler, made for our stderr, is attached already
    logger = logging.getLogger("pydist")
    if prepared is not None:
        logger.removeHandler(prepared[0])
    handler = _handler(level)
    logger.addHandler(handler)
    logger.setLevel(handler.level)


def prepare_logging(environ=os.environ, stream=None) -> tuple[logging.StreamHandler, str]:
    """The fork server's share of `configure_logging`, done once before it forks: a handler
    for `stream` (the workers' stderr) attached to pydist's logger, at its level; a forked
    worker with the same `PYDIST_LOG_LEVEL` keeps it as it is (making the handler, attaching
    it and setting the level, which visits every logger, cost each worker half a millisecond
    and a hundred copied pages)."""
    spec = environ.get("PYDIST_LOG_LEVEL", "").strip()
    handler = _handler(_log_level(spec), stream)
    logger = logging.getLogger("pydist")
    logger.addHandler(handler)
    logger.setLevel(handler.level)
    # Each logger caches whether a level is enabled on first use (with a lock and a walk
    # up the hierarchy): filled here once, for the loggers pydist has, not in every worker.
    for name, each in list(logging.root.manager.loggerDict.items()):
        if name.startswith("pydist") and isinstance(each, logging.Logger):
            for lvl in (logging.DEBUG, logging.INFO, logging.WARNING):
                each.isEnabledFor(lvl)
    return handler, spec


def _log_level(spec: str) -> int | None:
    """The logging level `spec` names (WARNING if empty), None if it names none."""
    if not spec:
        return logging.WARNING
    value = int(spec) if spec.isdigit() else logging.getLevelName(spec.upper())
    return value if isinstance(value, int) else None


def _handler(level: int | None, stream=None) -> logging.StreamHandler:
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING if level is None else level)
    return handler


def parse_bind_to(spec: str | None) -> tuple[str, int, bool]:
    """'ADDR', 'ADDR:PORT', 'ADDR:[PORT]', '[IPv6]:PORT' -> (addr, port, is_hint). Port 0
    means any free port; a hint ('[PORT]', DistributedNext's syntax) means the first free
    port from PORT on, so that several workers can share one spec. No spec: see
    `transport.default_bind_addr`."""
    if not spec:
        return default_bind_addr(), 0, False
    if spec.startswith("["):
        addr, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        addr, port = spec.split(":")
    else:
        addr, port = spec, ""
    hint = port.startswith("[") and port.endswith("]")
    port = port.strip("[]")
    try:
        port_n = int(port) if port else 0
    except ValueError:
        raise ValueError(f"invalid port in --bind-to {spec!r}") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"invalid port number in --bind-to {spec!r}")
    return addr, port_n, hint and port_n > 0


def _listen(addr: str, port: int, hint: bool, timeout: float) -> Listener:
    """Listen on addr:port; with a port hint, on the first free port from `port` on."""
    last = port + 1000 if hint else port
    while True:
        try:
            return Listener(addr, port, PGRP.cookie_bytes, joining.accept_connection, timeout)
        except OSError:
            if port >= min(last, 65535):
                raise
            port += 1


def _fresh_main() -> None:
    """Give user code (`everywhere`, by-value functions) a clean `__main__`, not this module."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main


def _on_sigint(signum, frame) -> None:
    interrupt_running_calls()


def init_worker(cookie: str, manager=None) -> None:
    """Make this process a worker that authenticates peers with `cookie`; SIGINT (the
    master's `interrupt`) then interrupts running calls instead of the process. With a
    `manager`, connections to other workers go through `manager.connect` (custom
    transports). A custom-transport worker then calls `process_messages` and
    `wait_for_shutdown`."""
    runtime.wire()  # already done if `pydist` was imported; a worker must not depend on it
    joining.init_worker(cookie, manager)
    if threading.current_thread() is threading.main_thread():
        _signal.signal(_signal.SIGINT, _on_sigint)  # (`signal.signal`'s enum steps: see forkserver)
    time.sleep = interruptible_sleep  # type: ignore[assignment]  # a sleeping remote call can be interrupted
    # ... and one waiting on a condition (Event.wait, Channel, queue.Queue), which a blocked
    # lock acquire would otherwise hide from the interrupt
    threading.Condition.wait = interruptible_condition_wait  # type: ignore[method-assign]


def start_worker(out=None, cookie: str | None = None, close_stdin: bool = True,
                 stderr_to_stdout: bool = True, bind_to: str | None = None,
                 master_fd: int | None = None) -> int:
    """Serve as a worker until the master goes away; returns the exit code.

    Reads the cookie from stdin unless given, listens on `bind_to` (default: see
    `transport.default_bind_addr`), prints the address line to `out`, then serves.
    `master_fd`: a socket the master made and handed to this process at its fork (see
    `pydist.forkserver`), already its master connection: served at once, with no
    handshake (no other process holds its other end), and the worker exits if it closes
    before the master's JOIN came on it."""
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
    addr, port = listen_worker(cookie, bind_to)
    master = None
    if master_fd is not None:
        sock = socket.socket(fileno=master_fd)
        transport.tune_socket(sock)
        master = joining.serve_connection(sock)
    print(f"pydist_worker:{port}#{addr}", file=out, flush=True)
    return serve_worker(master=master)


def listen_worker(cookie: str, bind_to: str | None = None) -> tuple[str, int]:
    """Make this process a worker that authenticates peers with `cookie` and start listening
    on `bind_to` (see `parse_bind_to`); return the (addr, port) the master should dial.
    Then `serve_worker` serves. (`start_worker` is both, with the address line between.)"""
    init_worker(cookie)
    _fresh_main()
    addr, port, hint = parse_bind_to(bind_to)
    listener = _listen(addr, port, hint, worker_timeout())
    PGRP.listener = listener
    listener.start()
    log.info("worker process %d listening on %s:%d", os.getpid(), addr, listener.address[1])
    return addr, listener.address[1]


def serve_worker(timeout: float | None = None, master: transport.Connection | None = None) -> int:
    """After `listen_worker`: wait up to `timeout` seconds (default: the worker timeout) for
    the master to connect (on `master` if given: then only while it is open), then serve
    until it tells this worker to exit or goes away; return the exit code (1 if no master
    came)."""
    timeout = worker_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not PGRP.master_connected.wait(0.2):
        if PGRP.shutdown.is_set():  # e.g. stdin closed (--exit-on-eof)
            return PGRP.exit_code
        if master is not None and master.closed:
            print("The master closed its connection before it joined this worker.\nexiting.",
                  file=sys.stderr, flush=True)
            return 1
        if time.monotonic() > deadline:
            print(f"Master process (id 1) could not connect within {timeout} seconds.\nexiting.",
                  file=sys.stderr, flush=True)
            return 1
    return wait_for_shutdown()


def join_cluster(join: str, cookie: str, bind_to: str | None = None) -> int:
    """Dial in to the ElasticManager at `join` (``"HOST:PORT"``) and serve as its worker
    until the master goes away; returns the exit code (1, with a message on stderr, when
    the master cannot be reached, refuses the cookie or does not admit us).

    Listens for peer workers on `bind_to` (``"addr[:port]"``; default: the local address of
    the connection to the master, on any free port)."""
    from .managers import elastic  # (only dial-in workers need it)

    host, port = elastic.parse_join(join)
    where = f"the master at {host}:{port}"
    init_worker(cookie)
    _fresh_main()
    timeout = worker_timeout()
    try:
        sock = elastic.dial_master(host, port, PGRP.cookie_bytes(), timeout)
    except AuthenticationError as e:
        _say(f"{where} refused this worker: {e}. Give the worker the master's cluster "
             f"cookie (on its stdin, or in PYDIST_COOKIE).")
        return 1
    except (OSError, ProtocolError) as e:
        _say(f"could not join {where}: {e}")
        return 1
    try:
        if bind_to:
            addr, lport, hint = parse_bind_to(bind_to)
        else:
            addr, lport, hint = elastic.local_address(sock, host), 0, False
        listener = _listen(addr, lport, hint, timeout)
    except (OSError, ValueError) as e:
        sock.close()
        _say(f"cannot listen for peer workers on {bind_to or addr}: {e}")
        return 1
    PGRP.listener = listener
    listener.start()
    log.info("worker process %d listening on %s:%d, joining %s", os.getpid(), addr,
             listener.address[1], where)
    try:
        elastic.send_address(sock, addr, listener.address[1])
        elastic.await_admission(sock, PGRP.cookie_bytes(), timeout)
    except (OSError, ProtocolError, AuthenticationError) as e:
        sock.close()
        listener.close()
        _say(f"{where} did not admit this worker: {e}")
        return 1
    conn = joining.serve_connection(sock, "master")  # the master's JOIN comes first on it
    deadline = time.monotonic() + timeout
    while not PGRP.master_connected.wait(0.2):
        if conn.closed or time.monotonic() > deadline:
            _say(f"{where} admitted this worker but did not let it join "
                 + ("(it closed the connection; see the master's log)" if conn.closed
                    else f"within {timeout} seconds"))
            listener.close()
            conn.close()
            return 1
    _say(f"joined the cluster of {where} as worker {PGRP.id}")
    return wait_for_shutdown()


def _say(text: str) -> None:
    print(f"pydist worker: {text}", file=sys.stderr, flush=True)


def _join_cookie(given: str | None) -> str | None:
    """A dial-in worker's cookie: `--cookie`, else PYDIST_COOKIE, else stdin's first line
    (stdin is then replaced by /dev/null, as for any worker); None if there is none."""
    cookie = given or os.environ.get("PYDIST_COOKIE", "").strip()
    if not cookie:
        try:
            cookie = sys.stdin.readline().strip() if sys.stdin is not None else ""
        except (OSError, ValueError):
            cookie = ""
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    return cookie or None


def wait_for_shutdown() -> int:
    """Block until the master tells this worker to exit or goes away; close every connection
    and return the exit code (0 when told to exit). A custom-transport worker calls this
    after `process_messages`."""
    while not PGRP.shutdown.wait(1.0):
        pass
    log.info("worker %d exiting (code %d)", PGRP.id, PGRP.exit_code)
    if PGRP.listener is not None:
        PGRP.listener.close()
    for w in list(PGRP.workers.values()):
        if w.conn is not None:
            w.conn.close()
    return PGRP.exit_code


def _exit_on_stdin_eof() -> None:
    """Shut down when stdin reaches end of file: whoever launched us (ssh) is gone."""

    def watch() -> None:
        try:
            while sys.stdin.readline():
                pass
        except (OSError, ValueError):
            pass
        if not PGRP.shutdown.is_set():
            PGRP.exit_code = 1
            PGRP.shutdown.set()
            try:  # our output went through that session too: it may be gone
                print("pydist worker: stdin closed (the launching ssh session is gone), "
                      "exiting.", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    threading.Thread(target=watch, name="pydist-stdin-watch", daemon=True).start()


def _force_exit_later(code: int) -> None:
    """Exit for sure a little later, even if user threads would keep the process alive."""
    def force() -> None:
        _original_sleep(EXIT_GRACE_SECONDS)
        os._exit(code)

    threading.Thread(target=force, name="pydist-exit", daemon=True).start()


def exit_process(code: int) -> NoReturn:
    """End this worker process as the interpreter would, without its teardown: wait for user
    threads (bounded: `_force_exit_later`), run the exit hooks, flush, `os._exit`. The
    teardown (freeing every module) was most of a spawned worker's exit CPU, which an
    exiting worker gets only when nobody else wants it (`joining.EXIT_NICE`)."""
    _flush_stdio()  # (before waiting for user threads)
    _force_exit_later(code)  # user threads must not keep an orphan alive
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        runtime.ending_by_os_exit()
        atexit._run_exitfuncs()
    finally:
        _flush_stdio()
        os._exit(code)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # (closed, or its reader is gone)
            pass


def main(argv: list[str] | None = None) -> None:
    import argparse  # (here: a forked worker never parses arguments)

    parser = argparse.ArgumentParser(prog="python -m pydist.worker",
                                     description="Run a pydist worker (the cookie is read from stdin).")
    parser.add_argument("--bind-to", default=None, metavar="ADDR[:PORT]",
                        help="address to listen on (default: the address ssh reached this "
                             "host at, else the first non-loopback interface; with --join, "
                             "the address this host reaches the master from)")
    parser.add_argument("--cookie", default=None,
                        help="the cluster cookie (default: read from the first line of stdin)")
    parser.add_argument("--exit-on-eof", action="store_true",
                        help="exit when stdin closes (the launching ssh session is gone)")
    parser.add_argument("--join", default=None, metavar="HOST:PORT",
                        help="dial in to the ElasticManager listening at HOST:PORT (the "
                             "cookie from --cookie, else PYDIST_COOKIE, else stdin)")
    args = parser.parse_args(argv)
    configure_logging()
    if args.join is not None:
        cookie = _join_cookie(args.cookie)
        if cookie is None:
            _say("no cluster cookie: give it on stdin (first line) or in PYDIST_COOKIE")
            sys.exit(2)
        try:
            code = join_cluster(args.join, cookie, args.bind_to)
        except ValueError as e:  # a bad --join or --bind-to
            _say(str(e))
            code = 2
        exit_process(code)
    cookie = args.cookie
    if args.exit_on_eof:
        if cookie is None:
            cookie = sys.stdin.readline().strip()
        _exit_on_stdin_eof()
    code = start_worker(bind_to=args.bind_to, cookie=cookie, close_stdin=not args.exit_on_eof)
    exit_process(code)


if __name__ == "__main__":
    main()
