"""Workers in one network namespace talk over local Unix sockets (transport.open_connection).

A worker listens on TCP and on an abstract Unix socket named after its TCP address and keyed
with the cluster cookie; connectors here use the Unix one, and fall back to TCP where it is
not there (other hosts: see test_ssh.py; the security tests run over both sockets).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pydist
from pydist import transport
from pydist.calls import connection
from pydist.group import PGRP

from conftest import wait_until, worker_ospid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="abstract Unix sockets are Linux-only")


def peer_ospid(sock: socket.socket) -> int:
    """The OS pid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def link_to(pid: int) -> tuple[str, int | None]:
    """Run anywhere: (address family, peer OS pid or None) of the connection to `pid`."""
    sock = connection(pid).sock
    return sock.family.name, peer_ospid(sock) if sock.family == socket.AF_UNIX else None


def call_other(target: int) -> int:
    return pydist.remotecall_fetch(pydist.myid, target)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_master_and_workers_talk_over_unix_sockets_to_the_right_process(method, fresh_workers):
    a, b = fresh_workers(2, start_method=method)
    ospid = {p: worker_ospid(p) for p in (a, b)}
    for p in (a, b):
        # A forked worker's master connection is a socket pair, whose SO_PEERCRED names
        # the process that made it (us) on both ends; a spawned one's, the worker's socket.
        assert link_to(p) == ("AF_UNIX", ospid[p] if method == "spawn" else os.getpid())
    assert pydist.remotecall_fetch(call_other, a, b) == b  # worker to worker
    assert pydist.remotecall_fetch(link_to, a, b) == ("AF_UNIX", ospid[b])
    assert pydist.remotecall_fetch(link_to, b, a) == ("AF_UNIX", ospid[a])
    assert pydist.remotecall_fetch(link_to, a, 1) == ("AF_UNIX", os.getpid())


def checksum_on(pid: int, arr):
    """Run on a worker: send `arr` on to worker `pid` and back; return what came back."""
    return pydist.remotecall_fetch(lambda x: x, pid, arr)


def test_large_arrays_cross_unix_sockets_intact(two_workers):
    """Unix socket buffers are small (~200 KB), so a large frame goes out in many partial
    sends, to a worker and between workers."""
    a, b = two_workers
    arr = np.random.default_rng(7).random(4 * 2**20)  # 32 MB
    back = pydist.remotecall_fetch(checksum_on, a, b, arr)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert link_to(a)[0] == "AF_UNIX"


def test_the_local_name_is_keyed_with_the_cookie(two_workers):
    host, port = PGRP.workers[two_workers[0]].connect_at
    cookie = pydist.cluster_cookie().encode()
    name = transport.local_socket_name(host, port, cookie)
    assert name.startswith(b"\0pydist-") and str(port).encode() not in name
    assert transport.local_socket_name(host, port, b"another cookie") != name
    assert transport.local_socket_name(host, port + 1, cookie) != name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(name)
        assert peer_ospid(s) == worker_ospid(two_workers[0])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect(transport.local_socket_name(host, port, b"another cookie"))
    # With the wrong cookie a client cannot find the Unix socket, takes TCP and is refused.
    with pytest.raises(pydist.AuthenticationError):
        transport.connect(host, port, b"another cookie", 5)
    sock = transport.connect(host, port, cookie, 5)
    try:
        assert sock.family == socket.AF_UNIX
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_listener_whose_local_name_is_taken_serves_over_tcp():
    cookie = b"listener-test-cookie"
    port = _free_port()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(transport.local_socket_name("127.0.0.1", port, cookie))
    accepted: list[socket.socket] = []
    got = threading.Event()

    def on_connection(sock):
        accepted.append(sock)
        got.set()

    listener = transport.Listener("127.0.0.1", port, lambda: cookie, on_connection, 5)
    listener.start()
    try:
        assert listener.local_sock is None and listener.address[1] == port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            transport.handshake_initiator(s, cookie, 5)
            assert got.wait(10)
    finally:
        listener.close()
        squatter.close()
        for s in accepted:
            s.close()


def test_a_listener_closes_both_sockets():
    cookie = b"listener-close-cookie"
    listener = transport.Listener("127.0.0.1", 0, lambda: cookie, lambda s: s.close(), 5)
    listener.start()
    name = transport.local_socket_name("127.0.0.1", listener.address[1], cookie)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(name)
    listener.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect(name)
    wait_until(lambda: not any(t.is_alive() for t in listener._threads), timeout=10,
               what="the accept threads to stop")


SWITCHED_OFF = textwrap.dedent("""
    import json, pydist

    def family_to(pid):
        from pydist.calls import connection
        return connection(pid).sock.family.name

    def via_other(pid):
        assert pydist.remotecall_fetch(pydist.myid, pid) == pid
        return family_to(pid)

    a, b = pydist.addprocs(2)
    out = {"master": [family_to(a), family_to(b)],
           "a_to_b": pydist.remotecall_fetch(via_other, a, b),
           "sum": pydist.remotecall_fetch(sum, b, range(10))}
    pydist.rmprocs([a, b])
    print(json.dumps(out))
""")


def test_local_sockets_can_be_switched_off():
    env = dict(os.environ, PYDIST_LOCAL_SOCKETS="0")
    proc = subprocess.run([sys.executable, "-c", SWITCHED_OFF], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"master": ["AF_INET", "AF_INET"], "a_to_b": "AF_INET", "sum": 45}


def test_family_of_reads_a_plain_int_and_tune_socket_sets_nodelay_on_tcp_only():
    """`sharedmem.family_of` (which skips `socket.family`'s enum) is what decides TCP
    tuning and shared memory: it must name each family right."""
    from pydist import sharedmem, transport

    families = [socket.AF_INET, socket.AF_UNIX] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            got = sharedmem.family_of(sock)
            assert got == family and type(got) is int, (family, got)
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as tcp:
        transport.tune_socket(tcp)
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert not sharedmem.usable(tcp)  # shared memory is for Unix sockets only
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        transport.tune_socket(a)  # (no TCP option on a Unix socket: must not raise)
        if hasattr(os, "memfd_create") and "PYDIST_SHARED_MEMORY" not in os.environ:
            assert sharedmem.usable(a)
