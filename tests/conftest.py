"""Shared fixtures: real worker processes, started once per module where possible.

Tests that kill or remove workers ask for `fresh_workers` instead, so that they never break
the workers other tests share.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import pydist

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def ensure_workers(n: int) -> list[int]:
    """At least `n` live workers; returns the first `n` worker ids."""
    have = [p for p in pydist.workers() if p != 1]
    if len(have) < n:
        have += pydist.addprocs(n - len(have))
    return sorted(have)[:n]


@pytest.fixture
def two_workers():
    """Two shared workers (started only when missing); they outlive the test: do not kill
    them (use `fresh_workers` for that)."""
    return ensure_workers(2)


@pytest.fixture
def fresh_workers():
    """A factory of new workers owned by one test, removed at its end."""
    made: list[int] = []

    def make(n=1, **kw) -> list[int]:
        """addprocs(n, **kw); `n` may be anything addprocs takes (a list of machines...)."""
        try:
            pids = pydist.addprocs(n, **kw)
        except BaseException as e:
            made.extend(getattr(e, "added_pids", []))  # the workers that did start
            raise
        made.extend(pids)
        return pids

    yield make
    alive = [p for p in made if p in pydist.procs()]
    if alive:
        pydist.rmprocs(alive, waitfor=30)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_threads(targets: list, bound: float = 240.0) -> list:
    """Run each target in its own thread; return the errors; fail if any is still running
    after `bound` seconds (a deadlock or a hang)."""
    errors: list = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert stuck == 0, f"{stuck} of {len(threads)} threads still running after {bound} s: deadlock"
    return errors


def recv_exact(s, n: int) -> bytes:
    """Read exactly `n` bytes from socket `s` (a raw client in the security tests)."""
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"peer closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def autogroup_of(ospid: int | str = "self") -> tuple[str | None, int | None]:
    """(name, nice) of process `ospid`'s scheduling group where Linux groups by session
    (autogroup); None for what is unknown: the kernel has no such file or leaves it empty
    (autogroup off, or a process still in the default group: CI's machine, whose tree never
    started a session)."""
    try:
        with open(f"/proc/{ospid}/autogroup") as f:
            fields = f.read().split()
    except OSError:
        return None, None
    name = fields[0] if fields else None
    nice = int(fields[2]) if len(fields) == 3 and fields[1] == "nice" else None
    return name, nice


def pid_alive(ospid: int) -> bool:
    try:
        os.kill(ospid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{ospid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_process(ospid: int, timeout: float = 30.0) -> None:
    """SIGSTOP `ospid` and wait until every one of its threads is stopped (a signal stops a
    process asynchronously: a busy thread may still run for a moment)."""
    os.kill(ospid, signal.SIGSTOP)

    def all_stopped() -> bool:
        try:
            tasks = os.listdir(f"/proc/{ospid}/task")
        except OSError:
            return True  # gone
        for tid in tasks:
            try:
                with open(f"/proc/{ospid}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if state not in ("T", "t", "Z", "X"):
                return False
        return True

    wait_until(all_stopped, timeout=timeout, interval=0.005, what=f"process {ospid} to stop")


def worker_ospid(pid: int) -> int:
    return pydist.remotecall_fetch(os.getpid, pid)


def pytest_sessionfinish(session, exitstatus):
    """No worker may outlive the test session."""
    pids = [p for p in pydist.workers() if p != 1]
    if pids:
        try:
            pydist.rmprocs(pids, waitfor=30)
        except Exception:
            pass
