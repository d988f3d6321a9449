"""The handshake order on a real worker (issue #11, point 5): the connecting side proves it
knows the cookie first; before that the worker sends nothing derived from the cookie, a wrong
proof is denied after a delay, and wrong proofs from one source are checked at a bounded rate
without slowing down other sources."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time

import pytest

import pydist
from pydist import protocol, transport
from pydist.group import PGRP

from conftest import recv_exact

pytestmark = pytest.mark.timeout(180)


def worker_address(pid: int) -> tuple[str, int]:
    host, port = PGRP.workers[pid].connect_at
    return host, int(port)


def connect(pid: int, via: str = "tcp") -> socket.socket:
    host, port = worker_address(pid)
    if via == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(transport.local_socket_name(host, port, pydist.cluster_cookie().encode()))
        return s
    return socket.create_connection((host, port), timeout=10)


def macs_of(cookie: bytes, nonce_i: bytes, nonce_a: bytes) -> list[bytes]:
    """Every HMAC of the cookie an acceptor could leak about this exchange: version 1's
    CHALLENGE MAC, and both labels of version 2, over either nonce order."""
    out = []
    for label in (b"acceptor", b"initiator", b"pydist-2 acceptor", b"pydist-2 initiator"):
        for a, b in ((nonce_i, nonce_a), (nonce_a, nonce_i)):
            out.append(hmac.new(cookie, label + a + b, hashlib.sha256).digest())
    return out


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_worker_says_nothing_secret_before_the_client_proves(two_workers, via):
    """Two HELLOs with the same client nonce get fresh random nonces, zero padding, and
    nothing more until a proof comes: no MAC of the cookie to harvest."""
    pid = two_workers[0]
    cookie = pydist.cluster_cookie().encode()
    nonce_i = protocol.new_nonce()
    answers = []
    for _ in range(2):
        with connect(pid, via) as s:
            s.sendall(protocol.encode_hello(nonce_i))
            s.settimeout(10)
            challenge = recv_exact(s, protocol.CHALLENGE_LEN)
            s.settimeout(0.5)
            with pytest.raises(socket.timeout):  # nothing else before the proof
                s.recv(1)
        magic, version, nonce_a, padding = struct.unpack("<8sH32s32s", challenge)
        assert (magic, version, padding) == (protocol.HANDSHAKE_MAGIC, protocol.PROTOCOL_VERSION,
                                             b"\0" * 32)
        for mac in macs_of(cookie, nonce_i, nonce_a):
            assert mac not in challenge
        answers.append(nonce_a)
    assert answers[0] != answers[1]


def test_wrong_proof_is_denied_after_a_delay_and_the_right_one_accepted(two_workers):
    pid = two_workers[0]
    cookie = pydist.cluster_cookie().encode()
    with connect(pid) as s:
        nonce_i = protocol.new_nonce()
        s.sendall(protocol.encode_hello(nonce_i))
        nonce_a = protocol.decode_challenge(recv_exact(s, protocol.CHALLENGE_LEN))
        t0 = time.monotonic()
        s.sendall(protocol.encode_proof(b"not the cookie", nonce_i, nonce_a))
        assert recv_exact(s, protocol.VERDICT_LEN) == protocol.VERDICT_DENIED
        assert time.monotonic() - t0 >= 0.9 * transport.HANDSHAKE_FAIL_DELAY
    with connect(pid) as s:
        nonce_i = protocol.new_nonce()
        s.sendall(protocol.encode_hello(nonce_i))
        nonce_a = protocol.decode_challenge(recv_exact(s, protocol.CHALLENGE_LEN))
        t0 = time.monotonic()
        s.sendall(protocol.encode_proof(cookie, nonce_i, nonce_a))
        accept = recv_exact(s, protocol.ACCEPT_LEN)
        assert time.monotonic() - t0 < 0.9 * transport.HANDSHAKE_FAIL_DELAY
        protocol.check_accept(cookie, accept, nonce_i, nonce_a)  # the worker proved itself too
    assert pydist.remotecall_fetch(pydist.myid, pid) == pid


def test_wrong_proofs_from_one_source_are_rate_limited(fresh_workers):
    """Eight wrong proofs sent at once over TCP are checked HANDSHAKE_FAIL_INTERVAL apart (a
    guesser gains nothing from parallel connections), cost the worker no threads, and a peer
    from another source (the local Unix socket) authenticates at once meanwhile."""
    (pid,) = fresh_workers(1)
    ospid = pydist.remotecall_fetch(__import__("os").getpid, pid)
    threads_before = int(open(f"/proc/{ospid}/status").read().split("Threads:")[1].split()[0])
    socks, nonces = [], []
    for _ in range(8):
        s = connect(pid)
        nonce_i = protocol.new_nonce()
        s.sendall(protocol.encode_hello(nonce_i))
        nonces.append((nonce_i, protocol.decode_challenge(recv_exact(s, protocol.CHALLENGE_LEN))))
        socks.append(s)
    denied_at = [0.0] * len(socks)

    def wait_denied(i: int) -> None:
        socks[i].settimeout(30)
        assert recv_exact(socks[i], protocol.VERDICT_LEN) == protocol.VERDICT_DENIED
        denied_at[i] = time.monotonic()

    waiters = [threading.Thread(target=wait_denied, args=(i,)) for i in range(len(socks))]
    for w in waiters:
        w.start()
    t0 = time.monotonic()
    try:
        for s, (nonce_i, nonce_a) in zip(socks, nonces):
            s.sendall(protocol.encode_proof(b"guess", nonce_i, nonce_a))
        time.sleep(0.3)
        threads = int(open(f"/proc/{ospid}/status").read().split("Threads:")[1].split()[0])
        assert threads <= threads_before + 2
        t1 = time.monotonic()
        with connect(pid, "unix") as s:  # another source: not slowed down
            transport.handshake_initiator(s, pydist.cluster_cookie().encode(), 10)
        assert time.monotonic() - t1 < 0.5 * transport.HANDSHAKE_FAIL_DELAY
        for w in waiters:
            w.join(30)
    finally:
        for s in socks:
            s.close()
    spread = max(denied_at) - min(denied_at)
    assert min(denied_at) - t0 >= 0.9 * transport.HANDSHAKE_FAIL_DELAY
    assert spread >= 0.8 * 7 * transport.HANDSHAKE_FAIL_INTERVAL, f"denied within {spread:.2f} s"
    assert pydist.remotecall_fetch(pydist.myid, pid) == pid
