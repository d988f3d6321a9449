"""A worker's listener under abuse (issue #11, point 4): silent floods, drip clients, EMFILE,
internal errors, and frame headers announcing more than the limit or more than will come.

Real sockets and real worker processes (tests/listenerhelpers.py runs on the workers)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import listenerhelpers
import pydist
from pydist import protocol, transport
from pydist.group import PGRP
from conftest import wait_until

pytestmark = pytest.mark.timeout(180)

COOKIE = b"listener-abuse-cookie"


def worker_address(pid: int) -> tuple[str, int]:
    host, port = PGRP.workers[pid].connect_at
    return host, int(port)


def ospid_of(pid: int) -> int:
    return pydist.remotecall_fetch(os.getpid, pid)


def proc_status(ospid: int, field: str) -> int:
    with open(f"/proc/{ospid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def thread_cpu_seconds(ospid: int, tid: int) -> float:
    with open(f"/proc/{ospid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_serves(pid: int) -> None:
    t0 = time.monotonic()
    assert pydist.remotecall_fetch(pydist.myid, pid) == pid
    assert time.monotonic() - t0 < 10


def authenticated(pid: int) -> socket.socket:
    host, port = worker_address(pid)
    return transport.connect(host, port, pydist.cluster_cookie().encode(), 10)


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True once the peer has closed `s` (EOF or reset) within `timeout`; False if not."""
    s.settimeout(timeout)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# ============================================================================ floods


def test_silent_flood_costs_no_threads(fresh_workers):
    """500 clients that connect and say nothing: the worker's threads and descriptors stay
    bounded, calls are served and a new peer still authenticates meanwhile."""
    (pid,) = fresh_workers(1)
    ospid = ospid_of(pid)
    threads_before = proc_status(ospid, "Threads")
    fds_before = len(os.listdir(f"/proc/{ospid}/fd"))
    host, port = worker_address(pid)
    silent = []
    try:
        for _ in range(500):
            silent.append(socket.create_connection((host, port), timeout=10))
        time.sleep(1.5)  # time to accept them all
        threads = proc_status(ospid, "Threads")
        fds = len(os.listdir(f"/proc/{ospid}/fd"))
        assert threads <= threads_before + 3, f"{threads_before} threads before, {threads} now"
        assert fds <= fds_before + transport.MAX_PENDING_HANDSHAKES + 16
        assert_serves(pid)
        t0 = time.monotonic()
        authenticated(pid).close()
        assert time.monotonic() - t0 < 5
    finally:
        for s in silent:
            s.close()
    assert_serves(pid)


def test_drip_client_is_dropped_at_the_total_deadline(fresh_workers):
    """One byte every 0.2 s keeps a per-recv timeout from ever firing; the handshake deadline
    (the worker timeout, 5 s here) is for the whole handshake."""
    deadline = 5.0
    (pid,) = fresh_workers(1, timeout=deadline)
    hello = protocol.encode_hello(protocol.new_nonce())  # 42 bytes: 8.4 s at this pace
    t0 = time.monotonic()
    with socket.create_connection(worker_address(pid), timeout=10) as s:
        got = b""
        for byte in hello:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.2)
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        elapsed = time.monotonic() - t0
    assert got == b""
    assert deadline - 0.5 <= elapsed <= deadline + 2.5, f"dropped after {elapsed:.1f} s"
    assert_serves(pid)


# ============================================================================ EMFILE


def test_accept_backs_off_on_emfile_and_recovers(fresh_workers):
    """Out of descriptors, the listener must not spin on a failing accept (it did, at 40-86%
    CPU); once descriptors are free again it accepts and authenticates as before."""
    (pid,) = fresh_workers(1)
    ospid = ospid_of(pid)
    authenticated(pid).close()  # (the listener's thread starts with its first client)
    wait_until(lambda: pydist.remotecall_fetch(listenerhelpers.listener_tids, pid),
               timeout=30, what="the listener thread")
    tids = pydist.remotecall_fetch(listenerhelpers.listener_tids, pid)
    waiting = []
    held = pydist.remotecall_fetch(listenerhelpers.exhaust_fds, pid)
    try:
        assert held > 0
        for _ in range(3):  # they wait in the backlog: every accept fails with EMFILE
            waiting.append(socket.create_connection(worker_address(pid), timeout=10))
        time.sleep(0.5)
        cpu0 = sum(thread_cpu_seconds(ospid, t) for t in tids)
        time.sleep(1.5)
        cpu = sum(thread_cpu_seconds(ospid, t) for t in tids) - cpu0
        assert cpu < 0.2, f"the listener used {cpu:.2f} s of CPU in 1.5 s while out of fds"
        assert_serves(pid)  # the established connection is unaffected
    finally:
        pydist.remotecall_fetch(listenerhelpers.release_fds, pid)
    t0 = time.monotonic()
    authenticated(pid).close()
    assert time.monotonic() - t0 < 5
    for s in waiting:
        s.close()
    assert_serves(pid)


# ============================================================================ a listener that cannot die


def _fail_once(monkeypatch, where: str, on_connection):
    """Arrange for one failure at `where`; return the on_connection to give the listener."""
    armed = [True]

    def trip() -> bool:
        if armed[0]:
            armed[0] = False
            return True
        return False

    if where == "thread-start":  # the old listener started a thread per handshake
        start = threading.Thread.start

        def failing_start(self):
            if self.name.startswith("pydist-handshake") and trip():
                raise RuntimeError("can't start new thread")
            return start(self)

        monkeypatch.setattr(threading.Thread, "start", failing_start)
    elif where == "accept-step":
        begin = getattr(transport.Listener, "_begin", None)

        def failing_begin(self, *args):
            if trip():
                raise RuntimeError("injected failure in the accept loop")
            return begin(self, *args)

        monkeypatch.setattr(transport.Listener, "_begin", failing_begin, raising=False)
    elif where == "on-connection":
        inner = on_connection

        def on_connection(sock):
            if trip():
                raise RuntimeError("injected failure in on_connection")
            inner(sock)

    return on_connection


@pytest.mark.parametrize("where", ["thread-start", "accept-step", "on-connection"])
def test_listener_survives_an_exception(monkeypatch, where):
    accepted: list[socket.socket] = []
    got = threading.Event()

    def on_connection(sock):
        accepted.append(sock)
        got.set()

    listener = transport.Listener("127.0.0.1", 0, lambda: COOKIE,
                                  _fail_once(monkeypatch, where, on_connection), 5)
    listener.start()
    try:
        with socket.create_connection(listener.address, timeout=5) as s:
            try:  # this one meets the failure
                transport.handshake_initiator(s, COOKIE, 3)
            except (pydist.ProtocolError, OSError):
                pass
        with socket.create_connection(listener.address, timeout=5) as s:
            transport.handshake_initiator(s, COOKIE, 5)
            assert got.wait(10)
        assert all(t.is_alive() for t in listener._threads)
    finally:
        listener.close()
        for s in accepted:
            s.close()


def _listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pydist-listener"]


@pytest.mark.parametrize("family", ["tcp", "local"])
def test_the_listener_thread_starts_with_its_first_client(family):
    """No thread until a client comes, on either listening socket; then it accepts and
    authenticates that client as before (the process's poller watched the sockets)."""
    accepted: list[socket.socket] = []
    got = threading.Event()

    def on_connection(sock):
        accepted.append(sock)
        got.set()

    before = _listener_threads()
    listener = transport.Listener("127.0.0.1", 0, lambda: COOKIE, on_connection, 5)
    listener.start()
    try:
        if family == "local":
            if listener.local_sock is None:
                pytest.skip("no local socket here")
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(5)
            client.connect(listener.local_sock.getsockname())
        else:
            time.sleep(0.3)
            assert _listener_threads() == before and listener._thread.ident is None
            client = socket.create_connection(listener.address, timeout=5)
        with client:
            transport.handshake_initiator(client, COOKIE, 5)
            assert got.wait(10)
        assert listener._thread.is_alive()
        with socket.create_connection(listener.address, timeout=5) as again:
            transport.handshake_initiator(again, COOKIE, 5)
            wait_until(lambda: len(accepted) == 2, timeout=10, what="the second client")
    finally:
        listener.close()
        for s in accepted:
            s.close()
    assert not listener._thread.is_alive()


def test_a_listener_closed_before_any_client_starts_no_thread_and_is_forgotten():
    """Closed while the poller watched it: the poller forgets both sockets, no thread ever
    starts, and nothing listens any more."""
    from pydist.threads import _get_poller

    listener = transport.Listener("127.0.0.1", 0, lambda: COOKIE, lambda s: s.close(), 5)
    listener.start()
    bells = list(listener._doorbells)
    assert bells and all(_get_poller()._conns.get(b.fd) is b for b in bells)
    listener.close()
    assert all(_get_poller()._conns.get(b.fd) is not b for b in bells)
    listener._start_thread()  # (a doorbell that rang just as it closed)
    assert listener._thread.ident is None
    with pytest.raises(OSError):
        socket.create_connection(listener.address, timeout=5).close()


_LISTEN_AFTER_STOP = """
import socket, sys, threading
from pydist import threads, transport
cookie = b"listener-abuse-cookie"
got = threading.Event()
threads._get_poller()
assert threads.stop_runtime(5) == []  # (as after pydist.shutdown(): no poller thread runs)
listener = transport.Listener("127.0.0.1", 0, lambda: cookie, lambda s: got.set(), 5)
listener.start()
with socket.create_connection(listener.address, timeout=5) as s:
    transport.handshake_initiator(s, cookie, 5)
    print(got.wait(20), listener._thread.is_alive())
listener.close()
"""


def test_a_listener_started_while_the_runtime_is_stopped_serves_at_once():
    """After `stop_runtime` no poller thread watches sockets: the listener's thread starts
    at once, and a client is accepted and authenticated."""
    done = subprocess.run([sys.executable, "-c", _LISTEN_AFTER_STOP], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_a_worker_starts_its_listener_thread_only_when_a_peer_dials_it(fresh_workers):
    """A forked worker's master connection is made at its fork: nobody dials it until a peer
    does (a worker-to-worker call), and only then does it run a listener thread."""
    a, b = fresh_workers(2)
    assert pydist.remotecall_fetch(listenerhelpers.listener_tids, a) == []
    assert pydist.remotecall_fetch(listenerhelpers.listener_tids, b) == []
    # b's call to a makes the link: the lower pid is dialled (joining.dial_peer)
    assert pydist.remotecall_fetch(pydist.remotecall_fetch, b, pydist.myid, a) == a
    low = min(a, b)
    wait_until(lambda: pydist.remotecall_fetch(listenerhelpers.listener_tids, low),
               timeout=30, what=f"worker {low}'s listener thread")
    assert_serves(a)
    assert_serves(b)


def test_listener_close_stops_its_thread_and_drops_handshakes():
    listener = transport.Listener("127.0.0.1", 0, lambda: COOKIE, lambda s: s.close(), 30)
    listener.start()
    silent = [socket.create_connection(listener.address, timeout=5) for _ in range(20)]
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        listener.close()
        assert time.monotonic() - t0 < 5
        assert not any(t.is_alive() for t in listener._threads)
        assert all(closed_by_peer(s, 5) for s in silent)
    finally:
        for s in silent:
            s.close()


# ============================================================================ frame sizes


def _header(body_len: int, nbufs: int = 0) -> bytes:
    return struct.pack("<2sBBIQqqq", protocol.FRAME_MAGIC, protocol.CALL, 0, nbufs, body_len, 1, 2, 3)


@pytest.mark.parametrize("value", ["1MB", "-5", "0"])
def test_max_frame_bad_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("PYDIST_MAX_FRAME", value)
    with pytest.raises(ValueError, match=r"PYDIST_MAX_FRAME must be a positive number of bytes"):
        protocol.max_frame()


def test_max_frame_default_and_environment(monkeypatch):
    monkeypatch.delenv("PYDIST_MAX_FRAME", raising=False)
    assert protocol.max_frame() == protocol.DEFAULT_MAX_FRAME >= 16 << 30
    monkeypatch.setenv("PYDIST_MAX_FRAME", str(1 << 20))
    dec = protocol.FrameDecoder()
    with pytest.raises(pydist.ProtocolError, match=r"2097152 bytes .*limit of 1048576"):
        dec.feed(_header(2 << 20))
    dec = protocol.FrameDecoder()  # the total of body and buffers counts
    frame = _header(1 << 19, nbufs=2) + struct.pack("<QQ", 1 << 19, 1 << 19)
    with pytest.raises(pydist.ProtocolError, match=r"1572864 bytes .*limit of 1048576"):
        dec.feed(frame)


def test_oversized_frame_drops_the_connection_with_the_size(monkeypatch):
    """In-process: a Connection whose peer announces a frame over the limit is closed, and its
    handler learns why (a ProtocolError naming the size and the limit)."""
    monkeypatch.setenv("PYDIST_MAX_FRAME", str(1 << 20))
    closed: list = []
    done = threading.Event()

    class Handler:
        def on_message(self, conn, msg):
            return None

        def on_close(self, conn, exc):
            closed.append(exc)
            done.set()

    a, b = socket.socketpair()
    conn = transport.Connection(a, Handler(), "oversized")
    conn.start()
    try:
        b.sendall(_header(5 << 20))
        assert done.wait(10)
        assert isinstance(closed[0], pydist.ProtocolError)
        assert "5242880" in str(closed[0]) and "1048576" in str(closed[0])
        assert closed_by_peer(b, 5)
    finally:
        conn.close()
        b.close()


def test_worker_drops_a_frame_over_its_limit(fresh_workers):
    (pid,) = fresh_workers(1, env={"PYDIST_MAX_FRAME": str(1 << 20)})
    s = authenticated(pid)
    try:
        s.sendall(_header((1 << 20) + 1))
        assert closed_by_peer(s, 10)
    finally:
        s.close()
    assert_serves(pid)


def test_announced_body_commits_no_memory_before_it_arrives(fresh_workers):
    """An authenticated header announcing 2 GB (under the limit) followed by a trickle: the
    worker's memory grows with what arrives, not with what was announced."""
    (pid,) = fresh_workers(1)
    ospid = ospid_of(pid)
    rss0 = proc_status(ospid, "VmRSS")
    s = authenticated(pid)
    try:
        s.sendall(_header(2 << 30) + b"x" * 65536)
        time.sleep(1.5)
        grown_mb = (proc_status(ospid, "VmRSS") - rss0) / 1024
        assert grown_mb < 48, f"RSS grew by {grown_mb:.0f} MB for 64 KiB received"
    finally:
        s.close()
    assert_serves(pid)


def test_decoder_populates_as_data_arrives():
    """Sans-IO: the decoder faults in a large body a step at a time, ahead of the data."""
    dec = protocol.FrameDecoder()
    dec.feed(_header(1 << 30))
    rss0 = proc_status(os.getpid(), "VmRSS")
    buf = dec.get_buffer()
    assert buf.nbytes == 1 << 30
    assert (proc_status(os.getpid(), "VmRSS") - rss0) / 1024 < 48
    chunk = b"\1" * (4 << 20)
    for _ in range(16):  # 64 MiB through the buffer interface
        buf = dec.get_buffer()
        buf[: len(chunk)] = chunk
        dec.buffer_updated(len(chunk))
    grown_mb = (proc_status(os.getpid(), "VmRSS") - rss0) / 1024
    assert 60 <= grown_mb < 64 + 48


def _vm_flags(start: int, end: int) -> list[set[str]]:
    """The VmFlags of each mapping of this process that overlaps [start, end)."""
    out: list[set[str]] = []
    overlaps = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):  # a mapping's first line: its range
                lo, hi = (int(x, 16) for x in first.split("-"))
                overlaps = lo < end and start < hi
            elif first == "VmFlags:" and overlaps:
                out.append(set(line.split()[1:]))
    return out


def _address(buf) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _receive_start(n: int):
    """A decoder receiving a frame whose body is `n` bytes, after its first `get_buffer`
    (which faults in the first step of the body); returns the buffer (the body's home)."""
    dec = protocol.FrameDecoder()
    dec.feed(_header(n))
    return dec.get_buffer()


def _huge_pages_here() -> bool:
    buf = protocol.allocate(8 << 20)
    return isinstance(buf, protocol.mmap.mmap) and buf in protocol._on_huge_pages


@pytest.mark.skipif(not hasattr(protocol.mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages")
def test_a_buffer_whose_huge_pages_prove_slow_takes_small_pages_for_the_rest(monkeypatch):
    """Where fresh huge pages cost more than 4 KiB pages (a VM whose host reclaims free
    memory: 0.3-0.5 GB/s against 2-3 for 4 KiB pages), the receive buffer that met them
    takes 4 KiB pages after its first step; the next buffer tries huge pages again.
    (Simulated with a threshold of 0 ns per MB: every huge page is "slow".)"""
    if not _huge_pages_here():
        pytest.skip("madvise(MADV_HUGEPAGE) not supported here")
    monkeypatch.setattr(protocol, "HUGE_SLOW_NS_PER_MB", 0)
    n = 64 << 20
    view = _receive_start(n)
    start = _address(view)
    first = protocol.FIRST_POPULATE_STEP
    assert all("hg" in f for f in _vm_flags(start, start + first))  # the first step: huge
    rest = _vm_flags(start + first, start + n)
    assert rest and all("nh" in f and "hg" not in f for f in rest), rest
    assert protocol.allocate(8 << 20) in protocol._on_huge_pages


@pytest.mark.skipif(not hasattr(protocol.mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages")
def test_a_buffer_whose_huge_pages_stay_cheap_keeps_them(monkeypatch):
    if not _huge_pages_here():
        pytest.skip("madvise(MADV_HUGEPAGE) not supported here")
    monkeypatch.setattr(protocol, "HUGE_SLOW_NS_PER_MB", 10**12)  # nothing is that slow
    n = 64 << 20
    dec = protocol.FrameDecoder()
    dec.feed(_header(n))
    chunk = b"\1" * (4 << 20)
    for _ in range(8):  # 32 MiB through the buffer interface
        buf = dec.get_buffer()
        buf[: len(chunk)] = chunk
        dec.buffer_updated(len(chunk))
    start = _address(dec.get_buffer()) - (32 << 20)
    assert all("hg" in f and "nh" not in f for f in _vm_flags(start, start + n))
