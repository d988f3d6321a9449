"""Logging: pydist's records go to the `pydist.*` loggers (INFO for the lifecycle of workers,
WARNING for escalations and refused peers, DEBUG for detail), never one per call, and never
with the cookie in them. A worker started with PYDIST_LOG_LEVEL logs to its stderr, which
the master relays ("From worker N: ...").

Real workers; each test collects the records it needs from `caplog` and waits for the ones
that come from other threads (a worker's loss is handled in the thread that saw it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys

import pytest

import pydist
from pydist import pmap, transport
from pydist.dispatch import HANDLER

from conftest import stop_process, wait_until, worker_ospid

HERE = os.path.dirname(os.path.abspath(__file__))


def _records(caplog, level: int = logging.DEBUG) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pydist") and r.levelno >= level]


def _messages(caplog, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in _records(caplog, level)]


def _has(caplog, level: int, *words: str) -> bool:
    return any(all(w in m for w in words) for m in _messages(caplog, level))


def _echo(x):
    return x


@pytest.mark.timeout(120)
def test_addprocs_and_rmprocs_log_start_join_and_removal(fresh_workers, caplog):
    caplog.set_level(logging.INFO, logger="pydist")
    pids = fresh_workers(2)
    info = _messages(caplog, logging.INFO)
    assert any("addprocs" in m and "LocalManager" in m for m in info), info
    for pid in pids:
        assert _has(caplog, logging.INFO, f"worker {pid} joined", "os pid"), info
    assert _has(caplog, logging.INFO, "addprocs", str(pids)), info
    joined = [r for r in _records(caplog, logging.INFO) if "joined" in r.getMessage()]
    assert all(r.name == "pydist.cluster" for r in joined), [r.name for r in joined]
    pydist.rmprocs(pids, waitfor=60)
    wait_until(lambda: all(_has(caplog, logging.INFO, f"worker {pid} removed") for pid in pids),
               timeout=30, what="the removal records")
    assert _has(caplog, logging.INFO, "rmprocs", str(pids)), _messages(caplog)


@pytest.mark.timeout(120)
def test_a_killed_worker_logs_its_loss_and_why(fresh_workers, caplog):
    caplog.set_level(logging.INFO, logger="pydist")
    (pid,) = fresh_workers(1)
    os.kill(worker_ospid(pid), signal.SIGKILL)
    wait_until(lambda: _has(caplog, logging.INFO, f"worker {pid} lost", "killed by signal 9"),
               timeout=60, what="the loss record")
    assert pid not in pydist.procs()


@pytest.mark.timeout(120)
def test_an_escalation_to_sigkill_is_a_warning(fresh_workers, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    (pid,) = fresh_workers(1)
    manager = pydist.group.PGRP.workers[pid].manager
    manager.exit_timeout = manager.term_timeout = 0.5  # (this test's own manager)
    ospid = worker_ospid(pid)
    stop_process(ospid)  # it cannot obey EXIT, and SIGTERM stays pending
    pydist.rmprocs(pid, waitfor=60)

    def escalations() -> list[logging.LogRecord]:
        return [r for r in _records(caplog, logging.WARNING)
                if f"worker {pid}" in r.getMessage().lower() and "SIG" in r.getMessage()]

    wait_until(lambda: len(escalations()) >= 2, timeout=30, what="the escalation records")
    escalations = escalations()
    assert [r.name for r in escalations] == ["pydist.managers.local"] * 2, _messages(caplog)
    assert str(ospid) in escalations[0].getMessage()


class _FlakyOnOdd:
    """Fails the first attempt at each odd element (a marker file per element)."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, x):
        if x % 2:
            marker = os.path.join(self.directory, f"tried-{x}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise ValueError(f"first try at {x}")
        return x


@pytest.mark.timeout(120)
def test_pmap_retries_are_logged_at_debug(two_workers, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="pydist")
    assert pmap(_FlakyOnOdd(str(tmp_path)), range(4), retry_delays=[0.01]) == [0, 1, 2, 3]
    retries = [r for r in _records(caplog) if "retry" in r.getMessage()]
    assert len(retries) == 2, _messages(caplog)
    for r in retries:
        assert r.levelno == logging.DEBUG and r.name == "pydist.pmap"
        m = r.getMessage()
        assert "ValueError" in m and "first try at" in m and "attempt 1" in m, m


@pytest.mark.timeout(60)
def test_a_wrong_cookie_at_the_listener_is_a_warning_naming_the_peer(caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    listener = transport.Listener("127.0.0.1", 0, lambda: b"the-right-cookie",
                                  lambda s: s.close(), 10)
    listener.start()
    try:
        with socket.create_connection(listener.address, timeout=10) as s:
            port = s.getsockname()[1]
            with pytest.raises(pydist.AuthenticationError):
                transport.handshake_initiator(s, b"a-wrong-cookie", 10)
        wait_until(lambda: _has(caplog, logging.WARNING, "refused", str(port)), timeout=20,
                   what="the refusal record")
        (r,) = [r for r in _records(caplog, logging.WARNING) if "refused" in r.getMessage()]
        assert r.name == "pydist.transport" and "127.0.0.1" in r.getMessage()
    finally:
        listener.close()


@pytest.mark.timeout(60)
def test_garbage_on_a_connection_is_a_warning_naming_the_peer(caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    a, b = socket.socketpair()
    conn = transport.Connection(a, HANDLER, "a garbled peer")
    conn.start()
    try:
        b.sendall(b"this is not a pydist frame header at all, not even close" * 4)
        wait_until(lambda: _has(caplog, logging.WARNING, "a garbled peer"), timeout=20,
                   what="the warning")
        assert conn.closed
    finally:
        conn.close()
        b.close()


def _relayed(capsys, enough, timeout: float = 20.0) -> tuple[str, str]:
    """What was printed (stdout, stderr) once `enough(stdout)` holds, or after `timeout`:
    workers' output reaches us through relay threads, a little later."""
    import time

    out = err = ""
    deadline = time.monotonic() + timeout
    while True:
        captured = capsys.readouterr()
        out, err = out + captured.out, err + captured.err
        if enough(out) or time.monotonic() > deadline:
            return out, err
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_the_cookie_is_in_no_record_nor_in_a_worker_log(fresh_workers, caplog, capsys):
    """A whole cycle at DEBUG, on the master and (PYDIST_LOG_LEVEL) on the worker."""
    caplog.set_level(logging.DEBUG, logger="pydist")
    cookie = pydist.cluster_cookie()
    assert len(cookie) >= 8
    (pid,) = fresh_workers(1, env={"PYDIST_LOG_LEVEL": "DEBUG"})
    assert pydist.remotecall_fetch(_echo, pid, 5) == 5
    assert pydist.remotecall_fetch(lambda: pydist.remotecall_fetch(_echo, 1, 6), pid) == 6
    pydist.rmprocs(pid, waitfor=60)
    wait_until(lambda: _has(caplog, logging.INFO, f"worker {pid} removed"), timeout=30,
               what="the removal record")
    records = _records(caplog)
    assert len(records) >= 3, _messages(caplog)  # not vacuous: the cycle was logged
    for r in records:
        assert cookie not in r.getMessage(), r.getMessage()
        assert cookie not in repr(r.args), r.args
    out, err = _relayed(capsys, lambda out: f"From worker {pid}:" in out and "exiting" in out)
    assert f"From worker {pid}:" in out and "pydist." in out, out[-2000:]
    assert cookie not in out + err


@pytest.mark.timeout(120)
def test_a_worker_with_pydist_log_level_relays_its_records(fresh_workers, capsys):
    # The fork server exists before: started for another level (or none), so that the INFO
    # worker is forked from a template whose prepared handler does not fit it.
    fresh_workers(1, env={"PYDIST_LOG_LEVEL": "WARNING"})
    (pid,) = fresh_workers(1, env={"PYDIST_LOG_LEVEL": "INFO"})
    pydist.remotecall_fetch(_log, pid, logging.WARNING, "one warning")
    pydist.rmprocs(pid, waitfor=60)
    out, _ = _relayed(capsys, lambda out: f"joined as worker {pid}" in out
                      and "one warning" in out)
    lines = [line for line in out.splitlines() if f"From worker {pid}:" in line]
    assert any("INFO" in line and "pydist.joining" in line and f"joined as worker {pid}" in line
               for line in lines), lines
    assert not any("DEBUG" in line for line in lines), lines
    # once: a forked worker whose level differs from its fork server's swaps the handler
    # the fork server attached for its own, it does not add a second one
    assert sum("one warning" in line for line in lines) == 1, lines


def _log(level: int, message: str) -> None:
    logging.getLogger("pydist.test_logging").log(level, message)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_worker_relays_its_warnings_at_the_default_level(fresh_workers, capsys, method):
    """With no PYDIST_LOG_LEVEL a worker relays pydist's warnings and drops its INFO records
    (a forked worker uses the handler its fork server prepared)."""
    (pid,) = fresh_workers(1, start_method=method)
    pydist.remotecall_fetch(_log, pid, logging.INFO, "an info record")
    pydist.remotecall_fetch(_log, pid, logging.WARNING, "a warning record")
    out, _ = _relayed(capsys, lambda out: "a warning record" in out)
    lines = [line for line in out.splitlines() if f"From worker {pid}:" in line]
    assert any("WARNING pydist.test_logging: a warning record" in line for line in lines), lines
    assert not any("an info record" in line for line in lines), lines


@pytest.mark.timeout(120)
def test_remote_calls_log_nothing(two_workers, caplog):
    """The hot path: 200 calls, each way, at DEBUG, and at most a few records in all."""
    caplog.set_level(logging.DEBUG, logger="pydist")
    pid = two_workers[0]
    pydist.remotecall_fetch(_echo, pid, 0)  # any lazy set-up done
    caplog.clear()
    for i in range(200):
        assert pydist.remotecall_fetch(_echo, pid, i) == i
    futures = [pydist.remotecall(_echo, pid, i) for i in range(200)]
    assert [f.fetch() for f in futures] == list(range(200))
    assert len(_records(caplog)) <= 3, _messages(caplog)


_FAKE_SSH = """#!/bin/sh
# Stands for ssh in tests: runs the remote command (the last argument) here.
for last; do :; done
exec /bin/sh -c "$last"
"""


@pytest.mark.timeout(180)
def test_ssh_command_line_is_logged_without_the_cookie(fresh_workers, tmp_path, caplog):
    """SSHManager with a stand-in ssh that runs the command here, and the cookie on the
    command line (`cmdline_cookie=True`): the launch is logged, the cookie is not."""
    fake = tmp_path / "ssh"
    fake.write_text(_FAKE_SSH)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    caplog.set_level(logging.DEBUG, logger="pydist")
    cookie = pydist.cluster_cookie()
    (pid,) = fresh_workers(["localhost 127.0.0.1"], ssh=str(fake), cmdline_cookie=True,
                           exename=sys.executable)
    assert pydist.remotecall_fetch(_echo, pid, 7) == 7
    ssh_records = [r for r in _records(caplog) if r.name == "pydist.managers.ssh"]
    assert any(str(fake) in r.getMessage() and "--cookie" in r.getMessage()
               for r in ssh_records), _messages(caplog)
    for r in _records(caplog):
        assert cookie not in r.getMessage(), r.getMessage()


_UNCONFIGURED = r'''
import logging, os, signal, sys, time
import pydist
(pid,) = pydist.addprocs(1)
ospid = pydist.remotecall_fetch(os.getpid, pid)
os.kill(ospid, signal.SIGKILL)
deadline = time.monotonic() + 60
while pid in pydist.procs() and time.monotonic() < deadline:
    time.sleep(0.05)
logging.getLogger("pydist.cluster").warning("a warning with no logging configured")
'''


@pytest.mark.timeout(120)
def test_without_logging_configured_a_loss_is_told_once_and_warnings_still_show():
    """No logging configuration: the loss is printed once ("Worker N terminated: ..."), not
    again as a record, and pydist's warnings reach stderr (Python's last-resort handler),
    so an escalation is never silent."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _UNCONFIGURED], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("killed by signal 9") == 1, out.stderr
    assert "a warning with no logging configured" in out.stderr, out.stderr
