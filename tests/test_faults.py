"""Heartbeats, and why a worker died: a stopped (silent) peer is declared dead within the
heartbeat bound, busy peers are not, a stopped master makes its workers exit, and every
ProcessExitedException says why (exit code, signal, silence), also one hop away.

Real processes, real signals (SIGSTOP/SIGCONT/SIGKILL). Bounds are generous: the heartbeat
timeout plus many seconds, so that a loaded 2-core machine never flakes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pydist
from pydist import ProcessExitedException, RemoteException
from pydist.group import PGRP
from pydist.managers import heartbeat_timeout

from conftest import pid_alive, stop_process, wait_until, worker_ospid

HB = 2.0  # the heartbeat timeout of these tests' workers
SLACK = 20.0  # what a loaded machine may add to a bound


@pytest.fixture
def stopped():
    """SIGSTOP processes; every one gets SIGCONT at the end (so that it can be killed)."""
    ospids: list[int] = []

    def stop(ospid: int) -> None:
        ospids.append(ospid)
        stop_process(ospid)

    yield stop
    for ospid in ospids:
        try:
            os.kill(ospid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _me() -> int:
    return pydist.myid()


def _busy_python(seconds: float) -> int:
    """Pure Python for `seconds` (the GIL is released every switch interval)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def _my_heartbeat_timeout():
    return PGRP.heartbeat_timeout


def _link_timeout(peer: int):
    """On a worker: the heartbeat timeout of its own link to worker `peer`."""
    pydist.remotecall_fetch(_me, peer)
    return PGRP.workers[peer].conn.heartbeat_timeout


def _call_me(peer: int) -> int:
    return pydist.remotecall_fetch(_me, peer)


def _blocked_in_c(seconds: float) -> bool:
    """A C call that releases the GIL for `seconds`."""
    select.select([], [], [], seconds)
    return True


# ------------------------------------------------------------------ settings
def test_heartbeat_timeout_setting(monkeypatch):
    monkeypatch.delenv("PYDIST_HEARTBEAT_TIMEOUT", raising=False)
    assert heartbeat_timeout() == 60.0
    assert heartbeat_timeout(5) == 5.0
    assert heartbeat_timeout(0) is None
    assert heartbeat_timeout("off") is None
    monkeypatch.setenv("PYDIST_HEARTBEAT_TIMEOUT", "7.5")
    assert heartbeat_timeout() == 7.5
    monkeypatch.setenv("PYDIST_HEARTBEAT_TIMEOUT", "0")
    assert heartbeat_timeout() is None
    monkeypatch.setenv("PYDIST_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PYDIST_HEARTBEAT_TIMEOUT"):
        heartbeat_timeout()
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        heartbeat_timeout(-1)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        pydist.addprocs(1, heartbeat_timeout="often")


class _Peer:
    """Stands in for a connection in a private heartbeat thread: what the thread reads (its
    timeout) and calls (`_heartbeat`, here only counted)."""

    def __init__(self, timeout: float) -> None:
        self.heartbeat_timeout = timeout
        self.ticks: list[float] = []

    def _heartbeat(self, now: float, stalled: bool) -> bool:
        self.ticks.append(now)
        return True


def test_watching_a_connection_wakes_the_heartbeat_only_if_it_must_tick_sooner():
    """Fifty connections with a 60 s timeout (a tick every 10 s): watching each one wakes the
    heartbeat thread for nothing, so none is checked yet (each watch used to run a whole
    tick, over every connection: 128 joining workers made 8,000 checks). One with a 0.6 s
    timeout wakes it, and from then on every connection is checked every 0.1 s."""
    from pydist.threads import _Heartbeat

    heartbeat = _Heartbeat()
    try:
        slow = [_Peer(60.0) for _ in range(50)]
        for peer in slow:
            heartbeat.watch(peer)
            time.sleep(0.002)
        time.sleep(0.3)
        assert [p for p in slow if p.ticks] == []
        fast = _Peer(0.6)
        heartbeat.watch(fast)
        wait_until(lambda: len(fast.ticks) >= 3, timeout=SLACK, what="three ticks")
        assert all(len(p.ticks) >= 3 for p in slow)
        gaps = [b - a for a, b in zip(fast.ticks, fast.ticks[1:])]
        assert min(gaps) >= 0.09, gaps  # (not sooner than the interval; later on a busy machine)
    finally:
        assert heartbeat.stop(5)


def test_the_heartbeat_thread_starts_when_the_first_tick_is_due(two_workers):
    """Watching a connection starts no thread: the poller (running: connections to two
    workers are open) starts it when the first tick is due, one interval after the first
    watch, never sooner; a sooner interval moves that start forward, and a heartbeat stopped
    before it starts none. Where no poller runs, the thread starts at once."""
    from pydist.threads import _get_poller, _Heartbeat

    assert _get_poller().running()
    heartbeat = _Heartbeat()
    try:
        slow = _Peer(60.0)  # (a tick every 10 s)
        heartbeat.watch(slow)
        time.sleep(0.3)
        assert heartbeat._thread is None and slow.ticks == []
        fast = _Peer(1.2)  # (a tick every 0.2 s: due 0.2 s after the first watch, now)
        t0 = time.monotonic()
        heartbeat.watch(fast)
        wait_until(lambda: fast.ticks, timeout=SLACK, what="the first tick")
        assert heartbeat._thread is not None and heartbeat._thread.is_alive()
        wait_until(lambda: len(fast.ticks) >= 3, timeout=SLACK, what="three ticks")
        assert fast.ticks[0] >= t0 and slow.ticks
        gaps = [b - a for a, b in zip(fast.ticks, fast.ticks[1:])]
        assert min(gaps) >= 0.19, gaps
    finally:
        assert heartbeat.stop(5)
    stopped = _Heartbeat()
    peer = _Peer(0.6)
    stopped.watch(peer)
    assert stopped._thread is None
    assert stopped.stop(5)
    time.sleep(0.5)  # (its start was due 0.1 s after the watch)
    assert stopped._thread is None and peer.ticks == []
    first = _Peer(0.6)
    fresh = _Heartbeat()
    try:
        t0 = time.monotonic()
        fresh.watch(first)
        wait_until(lambda: first.ticks, timeout=SLACK, what="the first tick")
        assert first.ticks[0] - t0 >= 0.09  # (one interval after the watch)
    finally:
        assert fresh.stop(5)
    alone = subprocess.run([sys.executable, "-c", _WATCH_WITHOUT_POLLER], capture_output=True,
                           text=True, timeout=60)
    assert alone.stdout.split() == ["True", "True"], alone.stderr


_WATCH_WITHOUT_POLLER = """
from pydist.threads import _get_poller, _Heartbeat
class Peer:
    heartbeat_timeout = 60.0
    def _heartbeat(self, now, stalled): return True
h = _Heartbeat()
h.watch(Peer())
print(not _get_poller().running(), h._thread is not None and h._thread.is_alive())
h.stop(5)
"""


def _runtime_threads() -> list[str]:
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith("pydist-"))


@pytest.mark.timeout(120)
def test_a_fresh_worker_starts_its_heartbeat_thread_when_its_first_tick_is_due(fresh_workers):
    """A worker whose heartbeat ticks every 10 s runs no heartbeat thread before then; one
    that ticks every 0.33 s runs it within about that."""
    slow = fresh_workers(1, heartbeat_timeout=60.0)[0]
    assert "pydist-heartbeat" not in pydist.remotecall_fetch(_runtime_threads, slow)
    fast = fresh_workers(1, heartbeat_timeout=HB)[0]
    wait_until(lambda: "pydist-heartbeat" in pydist.remotecall_fetch(_runtime_threads, fast),
               timeout=SLACK, what="the fast worker's heartbeat thread")


@pytest.mark.timeout(120)
def test_heartbeats_reach_workers_and_can_be_turned_off(fresh_workers):
    on = fresh_workers(1, heartbeat_timeout=HB)[0]
    off = fresh_workers(1, heartbeat_timeout=None)[0]
    assert PGRP.workers[on].conn.heartbeat_timeout == HB
    assert PGRP.workers[off].conn.heartbeat_timeout is None
    assert pydist.remotecall_fetch(_my_heartbeat_timeout, on) == HB
    assert pydist.remotecall_fetch(_my_heartbeat_timeout, off) is None
    # A worker's own links to other workers use its timeout too.
    assert pydist.remotecall_fetch(_link_timeout, on, off) == HB
    assert pydist.remotecall_fetch(_link_timeout, off, on) is None


# ------------------------------------------------------------------ silent peers
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stopped_worker_is_declared_dead_and_everything_waiting_on_it_fails(
        fresh_workers, stopped):
    w, other = fresh_workers(2, heartbeat_timeout=HB)
    ospid = worker_ospid(w)
    pool = pydist.WorkerPool([w, other])
    running = pydist.remotecall(_blocked_in_c, w, 300)
    channel = pydist.RemoteChannel(lambda: pydist.Channel(1), w)
    stopped(ospid)
    start = time.monotonic()
    with pytest.raises(ProcessExitedException, match=r"silent for [\d.]+ s \(heartbeat timeout 2 s\)") as err:
        pydist.remotecall_fetch(_me, w)
    assert time.monotonic() - start < HB + SLACK
    assert err.value.worker_id == w
    with pytest.raises(ProcessExitedException, match="silent for"):
        running.fetch()
    with pytest.raises(ProcessExitedException):
        channel.take()
    assert w not in pydist.workers()
    assert w not in pool.workers()
    assert pydist.remotecall_fetch(_me, other) == other
    # Its manager kills it (SIGTERM, then SIGKILL: it is stopped).
    wait_until(lambda: not pid_alive(ospid), timeout=60, what=f"silent worker {w} killed")


@pytest.mark.timeout(180)
def test_a_stopped_peer_worker_is_declared_dead_by_the_worker_calling_it(fresh_workers, stopped):
    a, b = fresh_workers(2, heartbeat_timeout=HB)
    assert pydist.remotecall_fetch(_call_me, a, b) == b
    stopped(worker_ospid(b))
    start = time.monotonic()
    with pytest.raises(ProcessExitedException) as err:
        pydist.remotecall_fetch(_call_me, a, b)
    assert time.monotonic() - start < HB + SLACK
    assert err.value.worker_id == b
    assert pydist.remotecall_fetch(_me, a) == a


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_busy_workers_and_large_transfers_are_not_declared_dead(fresh_workers):
    """Heartbeats do not wait behind calls: many times the timeout of pure Python, or of a C
    call that releases the GIL, and a transfer that takes longer than the timeout."""
    hb = 1.0
    a, b = fresh_workers(2, heartbeat_timeout=hb)
    busy = pydist.remotecall(_busy_python, a, 6 * hb)
    blocked = pydist.remotecall(_blocked_in_c, b, 6 * hb)
    assert busy.fetch() > 0
    assert blocked.fetch() is True
    assert sorted(set(pydist.workers()) & {a, b}) == sorted([a, b])


def _nbytes(a) -> int:
    return a.nbytes


def _zeros(n: int):
    import numpy

    return numpy.zeros(n, dtype=numpy.uint8)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shared", ["0", "1"], ids=["socket", "shared-memory"])
def test_a_transfer_longer_than_the_timeout_is_not_silence(fresh_workers, monkeypatch, shared):
    """Arrays that take several heartbeat timeouts to cross (the worker's socket buffers are
    4 KiB), both ways: the side that only writes hears nothing back meanwhile (its PING
    waits behind the array it sends, the PONG behind the one it reads), yet the peer is
    alive. The arrays travel out of band: no copy holds the GIL for long, neither into the
    socket nor into the shared-memory arena (then the second round goes through it)."""
    numpy = pytest.importorskip("numpy")
    monkeypatch.setenv("PYDIST_SHARED_MEMORY", shared)
    hb = 0.5
    (w,) = fresh_workers(1, heartbeat_timeout=hb, env={"PYDIST_SOCKET_BUFFER": "4096"})
    n = 400 << 20
    big = numpy.zeros(n, dtype=numpy.uint8)
    for _ in range(2):
        start = time.monotonic()
        assert pydist.remotecall_fetch(_nbytes, w, big) == n
        assert pydist.remotecall_fetch(_zeros, w, n).nbytes == n
        took = time.monotonic() - start
    assert w in pydist.workers()
    print(f"two 400 MB transfers took {took:.1f} s with a {hb} s heartbeat timeout")


def _result_line(proc) -> str:
    """The next "result ..." line of the master script (worker output lines are skipped)."""
    while True:
        line = proc.stdout.readline()
        assert line, "the master script ended early"
        if line.startswith("result "):
            return line.split(None, 1)[1].strip()


MASTER = textwrap.dedent("""
    import sys, time, pydist
    from pydist.group import PGRP
    ws = pydist.addprocs(2, heartbeat_timeout=float(sys.argv[1]))
    print("ospids", *[PGRP.workers[w].ospid for w in ws], flush=True)
    for line in sys.stdin:
        if line.strip() == "gone":  # wait (bounded) until it has noticed the workers left
            deadline = time.monotonic() + 30
            while set(pydist.workers()) & set(ws) and time.monotonic() < deadline:
                time.sleep(0.05)
        alive = sorted(set(pydist.workers()) & set(ws))
        try:
            out = [pydist.remotecall_fetch(lambda: pydist.myid() * 10, w) for w in alive]
        except Exception as e:
            out = type(e).__name__
        # One write: the relay of a worker's output (a line of its own) can come between
        # the pieces a `print` of several arguments writes.
        sys.stdout.write(f"result {alive} {out}\\n")
        sys.stdout.flush()
""")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stopped_master_keeps_its_workers_for_less_than_the_timeout_not_longer(tmp_path):
    hb = 3.0
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script), str(hb)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["ospids"], line
        ospids = [int(p) for p in line[1:]]
        # Stopped for a third of the timeout: the cluster carries on.
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(hb / 3)
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert _result_line(proc) == "[2, 3] [20, 30]"
        # Stopped for longer: the workers exit by themselves while it is stopped.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not any(pid_alive(p) for p in ospids), timeout=hb + 30,
                       what="workers of a stopped master exit")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("gone\n")
        proc.stdin.flush()
        assert _result_line(proc) == "[] []"
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------ why a worker died
@pytest.mark.timeout(120)
def test_exit_code_and_signal_are_named(fresh_workers):
    a, b = fresh_workers(2)
    with pytest.raises(ProcessExitedException, match=r"worker \d+ exited with code 3$"):
        pydist.remotecall_fetch(os._exit, a, 3)
    ospid = worker_ospid(b)
    with pytest.raises(ProcessExitedException,
                       match=r"killed by signal 9 \(SIGKILL\).*out-of-memory"):
        pydist.remotecall_fetch(os.kill, b, ospid, signal.SIGKILL)
    # Later calls to them say the same.
    with pytest.raises(ProcessExitedException, match="exited with code 3"):
        pydist.remotecall_fetch(_me, a)
    with pytest.raises(ProcessExitedException, match="signal 9"):
        pydist.remotecall(_me, b).fetch()


def _call_and_die(target: int) -> None:
    pydist.remotecall_fetch(os._exit, target, 3)


@pytest.mark.timeout(120)
def test_process_exited_one_hop_away_is_still_a_process_exited_exception(fresh_workers):
    a, b = fresh_workers(2)
    with pytest.raises(ProcessExitedException) as err:
        pydist.remotecall_fetch(_call_and_die, a, b)
    assert isinstance(err.value, RemoteException)
    assert err.value.pid == a
    assert err.value.captured.ex.worker_id == b
    assert err.value.worker_id == b
    assert f"worker {b}" in str(err.value)


# ------------------------------------------------------------------ killed owners
def _take_from(channel):
    return channel.take()


def _dial_refused(pid):
    """On a worker: dial lower-numbered process `pid` (not connected yet) at an address where
    nothing listens, as a killed worker's is before the master says so; what it raises."""
    import socket

    from pydist.calls import _connect_peer_lazily
    from pydist.group import PGRP, Worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed, never listened: connections are refused)
    known = PGRP.workers.get(pid)
    assert known is None or known.conn is None, "already connected"
    w = PGRP.workers[pid] = Worker(pid)
    w.connect_at = ("127.0.0.1", port)
    try:
        _connect_peer_lazily(w)
    except Exception as e:
        return type(e).__name__, getattr(e, "worker_id", None), str(e)
    finally:
        if known is None:
            del PGRP.workers[pid]
        else:
            PGRP.workers[pid] = known
    return None


@pytest.mark.timeout(60)
def test_a_refused_peer_is_an_exited_one_if_the_master_says_so(fresh_workers):
    """A worker that dials a peer killed before the master could tell it gets the typed
    error (ProcessExitedException naming the peer); a live peer at an address wrong from
    here stays an error about the connection."""
    (gone,) = fresh_workers(1)
    pydist.rmprocs(gone, waitfor=30)
    alive, dialler = fresh_workers(2)  # (the dialler never heard of `gone`: it came later)
    kind, who, text = pydist.remotecall_fetch(_dial_refused, dialler, gone)
    assert (kind, who) == ("ProcessExitedException", gone), text
    kind, who, text = pydist.remotecall_fetch(_dial_refused, dialler, alive)
    assert kind == "PeerRefused" and "connection refused" in text and f"peer {alive}" in text
    assert pydist.remotecall_fetch(_me, dialler) == dialler


@pytest.mark.timeout(120)
def test_killing_the_owner_of_a_channel_fails_every_taker_at_once(fresh_workers):
    owner, taker = fresh_workers(2)
    channel = pydist.RemoteChannel(lambda: pydist.Channel(1), owner)
    remote_take = pydist.remotecall(_take_from, taker, channel)
    local_take = pydist.remotecall(_take_from, 1, channel)  # a take blocked on the master
    # Let both takes reach the owner; a taker still dialling it when it dies (a slow
    # start) is refused, which is the same typed error.
    time.sleep(0.5)
    assert not remote_take.isready() and not local_take.isready()
    ospid = worker_ospid(owner)
    start = time.monotonic()
    os.kill(ospid, signal.SIGKILL)
    with pytest.raises(ProcessExitedException, match="signal 9"):
        local_take.fetch()
    with pytest.raises(ProcessExitedException) as err:  # one hop away, still that type
        remote_take.fetch()
    assert err.value.worker_id == owner
    assert time.monotonic() - start < SLACK
    assert pydist.remotecall_fetch(_me, taker) == taker
