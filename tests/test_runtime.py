"""The runtime as a whole: what a call leaves behind, removing and exiting in bounded time
when a worker does not read, killing a wrapper's children, and shutdown()."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pydist
from pydist import ProcessExitedException
from pydist import threads
from pydist.calls import connection

from conftest import pid_alive, stop_process, wait_until, worker_ospid
from stresshelpers import Payload, alive_watched, identity, make_watched, watch

MB = 1 << 20


def test_arguments_and_results_are_not_kept_alive_after_calls(fresh_workers):
    """After a call ends, nothing of its arguments or result stays referenced on the worker
    (a 1 GB argument must not stay until the serving thread changes jobs)."""
    w = fresh_workers(1)[0]

    def freed(what: str) -> None:
        # No reference cycles: the values go as soon as nothing refers to them. The thread
        # that ran the call may still be on its way out when the reply lands, hence a short
        # wait; the bug this guards against kept them until that thread changed jobs.
        wait_until(lambda: pydist.remotecall_fetch(alive_watched, w, False) == 0, timeout=5,
                   what=what)

    assert pydist.remotecall_fetch(watch, w, Payload(8 * MB)) == 8 * MB
    freed("the argument of a call freed")
    # A call that arrives while a long one runs is read by the poller and handed, with the
    # reading role, to a pool thread, which then serves the next calls itself.
    sleeping = pydist.remotecall(time.sleep, w, 0.5)
    time.sleep(0.1)
    assert pydist.remotecall_fetch(watch, w, Payload(8 * MB)) == 8 * MB
    freed("the argument of a call handed over with the reading role freed")
    sleeping.wait()
    pydist.remotecall(watch, w, Payload(8 * MB)).wait()
    freed("the argument of a remotecall freed")
    got = pydist.remotecall_fetch(make_watched, w, 8 * MB)
    assert len(got.data) == 8 * MB
    freed("a fetched result freed")
    pydist.remote_do(watch, w, Payload(8 * MB))
    fut = pydist.remotecall(make_watched, w, 8 * MB)
    assert len(fut.fetch().data) == 8 * MB
    del fut
    wait_until(lambda: pydist.remotecall_fetch(alive_watched, w) == 0, timeout=30,
               what="arguments and results freed on the worker")


def _kill_at_teardown(request, ospid: int) -> None:
    """A stopped worker must not outlive a failed test."""
    def kill():
        try:
            os.kill(ospid, signal.SIGKILL)
        except OSError:
            pass
    request.addfinalizer(kill)


def _stop_and_fill(w: int) -> tuple[int, threading.Thread, list]:
    """SIGSTOP worker `w`, then have a thread send it more than the socket buffers hold:
    the connection is now full and its peer does not read."""
    ospid = worker_ospid(w)
    stop_process(ospid)
    outcome: list = []

    def send_big():
        try:
            outcome.append(pydist.remotecall_fetch(identity, w, bytearray(32 * MB)))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=send_big, daemon=True)
    t.start()
    conn = connection(w)
    wait_until(lambda: conn._writers == 1, timeout=30, what="the sender waiting for the socket")
    assert t.is_alive() and not outcome
    return ospid, t, outcome


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rmprocs_of_a_worker_that_does_not_read_ends_in_bounded_time(fresh_workers, request):
    w = fresh_workers(1)[0]
    _kill_at_teardown(request, worker_ospid(w))
    ospid, sender, outcome = _stop_and_fill(w)
    t0 = time.monotonic()
    pydist.rmprocs(w, waitfor=60)  # EXIT cannot be written: SIGTERM, then SIGKILL
    assert time.monotonic() - t0 < 40
    assert w not in pydist.procs()
    wait_until(lambda: not pid_alive(ospid), timeout=30, what="the stopped worker killed")
    sender.join(30)
    assert not sender.is_alive()
    assert isinstance(outcome[0], ProcessExitedException)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_escalation_kills_the_children_of_a_wrapper_exename(fresh_workers, tmp_path, request):
    wrapper = tmp_path / "wrapped-python"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\necho wrapper done\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    w = fresh_workers(1, exename=str(wrapper))[0]
    ospid = worker_ospid(w)  # the Python child of the wrapper shell
    _kill_at_teardown(request, ospid)
    stop_process(ospid)  # it will not obey EXIT; SIGTERM stays pending
    pydist.rmprocs(w, waitfor=60)
    wait_until(lambda: not pid_alive(ospid), timeout=30,
               what="the wrapper's child killed with its process group")


EXIT_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import pydist
    from stresshelpers import identity
    ws = pydist.addprocs(2)
    ospids = [pydist.remotecall_fetch(os.getpid, w) for w in ws]
    assert pydist.remotecall_fetch(identity, ws[0], b"x" * 1000) == b"x" * 1000
    if sys.argv[1] == "stopped":
        os.kill(ospids[1], signal.SIGSTOP)  # a worker that will never read again
        def send_big():
            try:
                pydist.remotecall_fetch(identity, ws[1], bytearray(32 << 20))
            except pydist.ProcessExitedException:
                pass  # the worker is killed at exit
        threading.Thread(target=send_big, daemon=True).start()
        time.sleep(0.5)
    print(json.dumps(ospids), flush=True)
""")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["healthy", "stopped"])
def test_interpreter_exit_is_bounded_quiet_and_leaves_no_worker(case, tmp_path):
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True,
                          env=env, timeout=90)
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert "RuntimeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "can't create new thread" not in done.stderr
    ospids = [int(p) for p in done.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    for ospid in ospids:
        wait_until(lambda: not pid_alive(ospid), timeout=20, what=f"worker {ospid} gone")
    assert took < 60


def test_shutdown_stops_every_runtime_thread_and_pydist_works_again(tmp_path):
    script = tmp_path / "shutdown_script.py"
    script.write_text(textwrap.dedent("""
        import threading, pydist, numpy
        ws = pydist.addprocs(2)
        futs = [pydist.remotecall(numpy.ones, w, 10**6) for w in ws]
        assert sum(f.fetch().sum() for f in futs) == 2 * 10**6
        pydist.shutdown()
        names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        print("left:", names)
        assert pydist.workers() == [1], pydist.workers()
        w = pydist.addprocs(1)[0]
        print("again:", pydist.remotecall_fetch(pydist.myid, w) == w)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr
    assert "left: []" in done.stdout, done.stdout + done.stderr
    assert "again: True" in done.stdout


class _Ticks:
    """Counts the watchdog ticks it gets."""

    def __init__(self) -> None:
        self.n = 0

    def _watchdog_tick(self, now: float) -> None:
        self.n += 1


class _BrokenTick:
    def _watchdog_tick(self, now: float) -> None:
        raise RuntimeError("a bug in a tick")


def test_the_watchdog_reads_awake_while_it_ticks_and_ticks_again_after_a_stop():
    """`awake` decides whether a call lent the reading role also makes the poller watch its
    socket: it must be true from the watchdog's first tick, not only once it has slept. A
    watchdog stopped while it ticked must tick again after `restart` (`pydist.shutdown`
    then more work), and a tick that raises must not end it."""
    wd = threads._Watchdog()  # its own: the process-wide one serves this session's workers
    first, broken = _Ticks(), _BrokenTick()
    wd.watch(broken)
    wd.watch(first)
    wait_until(lambda: first.n >= 3, timeout=30, what="the watchdog to tick")
    assert wd.awake
    assert wd.stop(timeout=10)
    assert not wd.awake
    wd.restart()
    wd.unwatch(first)
    wd.unwatch(broken)
    second = _Ticks()
    wd.watch(second)
    wait_until(lambda: second.n >= 2, timeout=30, what="the watchdog to tick after a restart")
    assert wd.awake
    wd.unwatch(second)
    wait_until(lambda: not wd.awake, timeout=30, what="the watchdog to sleep")
    assert wd.stop(timeout=10)


class _TimerOwner:
    def __init__(self) -> None:
        self.fired = threading.Event()

    def _on_timer(self, now: float) -> None:
        self.fired.set()


class _QuietConn:
    """A registered socket that never becomes readable: the poller thread runs while a
    connection is registered."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.fd = self.sock.fileno()
        self.name = "quiet"

    def _on_events(self, ev: int) -> None:
        pass


def _close_poller(poller: threads._Poller, conn: _QuietConn) -> None:
    """Stop a test's own poller and close everything it and `conn` hold."""
    assert poller.stop(timeout=10)
    poller.unregister(conn)
    conn.sock.close()
    conn.peer.close()
    poller._epoll.close()
    os.close(poller._wake_r)
    os.close(poller._wake_w)
    if poller._alarms is not None:
        os.close(poller._alarms.fd)


def test_a_poller_timer_set_while_the_poller_was_stopped_fires_after_restart():
    """A timer set with `call_soon` while the poller thread is stopped (or as it ends) fires
    once a poller thread runs again. It was lost with the wake-up that `restart` drained,
    and the lost timer was the burst tick's (`_SoonFrames`): calls sent in a burst then
    left only when someone waited for a reply."""
    poller = threads._Poller()  # its own: the process-wide one serves this session's workers
    conn = _QuietConn()
    try:
        poller.register(conn)
        before = _TimerOwner()
        poller.call_soon(before, time.monotonic())
        assert before.fired.wait(30), "the poller ran no timer"
        assert poller.stop(timeout=10)
        during = _TimerOwner()
        poller.call_soon(during, time.monotonic())
        poller.restart()
        assert during.fired.wait(30), "a timer set while the poller was stopped never ran"
    finally:
        _close_poller(poller, conn)


class _AlarmOwner:
    """Notes when, and in which thread, its alarm ran."""

    def __init__(self) -> None:
        self.fired = threading.Event()
        self.at = 0.0
        self.thread = ""
        self.runs = 0

    def _on_timer(self, now: float) -> None:
        self.at, self.thread = now, threading.current_thread().name
        self.runs += 1
        self.fired.set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_alarms_run_once_in_the_poller_thread_at_their_deadline_and_cancelled_ones_never():
    """Deadlines set through the poller's kernel timer (`_Poller.alarms`, from any thread,
    waking none) each run once, in the poller thread, when their time has come: not before,
    even when a deadline is moved later after the timer was set for the earlier one (the
    timer then expires early and is set again); a cancelled deadline never runs, and the
    timer is disarmed once none is left."""
    poller = threads._Poller()  # its own: the process-wide one serves this session's workers
    conn = _QuietConn()
    try:
        poller.register(conn)
        alarms = poller.alarms()
        assert alarms is not None and poller.alarms() is alarms
        soon, moved, cancelled = _AlarmOwner(), _AlarmOwner(), _AlarmOwner()
        t0 = time.monotonic()
        alarms.set(moved, t0 + 0.1)  # the timer is set for this, then the deadline moves
        alarms.set(soon, t0 + 0.3)
        alarms.set(cancelled, t0 + 0.4)
        alarms.set(moved, t0 + 0.8)
        alarms.cancel(cancelled)
        assert soon.fired.wait(30) and moved.fired.wait(30), "an alarm never ran"
        assert soon.at >= t0 + 0.3 and moved.at >= t0 + 0.8, (soon.at - t0, moved.at - t0)
        assert soon.thread == moved.thread == "pydist-poller"
        time.sleep(0.3)
        assert (soon.runs, moved.runs, cancelled.runs) == (1, 1, 0)
        alarms.set(cancelled, time.monotonic() + 0.2)
        alarms.cancel(cancelled)
        assert alarms._armed_for == 0.0, "the timer stayed set with no deadline left"
        time.sleep(0.4)
        assert cancelled.runs == 0
    finally:
        _close_poller(poller, conn)


def _record_priority_at_exit(path: str) -> None:
    """On a worker: at its exit, write the priority its exit hooks run at to `path`."""
    import atexit

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(os.getpriority(os.PRIO_PROCESS, 0)))

    atexit.register(write)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no getpriority here")
def test_a_removed_worker_finishes_its_exit_at_the_lowest_priority(fresh_workers, tmp_path):
    """Once its connections are closed, a worker that `rmprocs` removes runs the rest of its
    exit (its threads, its exit hooks, the kernel unmapping its memory) at nice 19: removing
    many at once leaves the CPU to the master and to the workers still closing."""
    w = fresh_workers(1)[0]
    path = tmp_path / "priority"
    pydist.remotecall_fetch(_record_priority_at_exit, w, str(path))
    assert pydist.remotecall_fetch(os.getpriority, w, os.PRIO_PROCESS, 0) == os.getpriority(
        os.PRIO_PROCESS, 0)
    pydist.rmprocs(w, waitfor=60)
    wait_until(lambda: path.exists() and path.read_text(), timeout=30,
               what="the removed worker's exit hook")
    assert int(path.read_text()) == 19
