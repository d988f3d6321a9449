"""One `Connection` over a socketpair, against a scripted peer (the raw other end) that
stops reading and resumes: a connection keeps reading while its writes cannot proceed,
readers never wait on a peer, waiting senders are released in order, deadlines hold."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pydist import protocol, transport

pytestmark = pytest.mark.timeout(120)

FRAME_BODY = 1 << 20  # 1 MiB: far more than the 4 KiB socket buffers below


class Recorder:
    """A Handler that records what arrives and can send from the reading thread."""

    def __init__(self) -> None:
        self.messages: list[protocol.Message] = []
        self.closed = threading.Event()
        self.close_exc = None
        self.reply_from_reader = False
        self.reader_send_seconds: list[float] = []
        self.conn = None

    def on_message(self, conn, msg):
        self.messages.append(msg)
        if self.reply_from_reader:
            t0 = time.monotonic()
            conn.send(protocol.encode_frame(protocol.RESULT, b"r" * FRAME_BODY, a=msg.a))
            self.reader_send_seconds.append(time.monotonic() - t0)
        return None

    def on_close(self, conn, exc):
        self.close_exc = exc
        self.closed.set()


def pair(buffer: int = 4096):
    ours, peer = socket.socketpair()
    for s in (ours, peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    handler = Recorder()
    conn = transport.Connection(ours, handler, "scripted")
    handler.conn = conn
    conn.start()
    return conn, handler, peer


def read_frames(peer: socket.socket, count: int, timeout: float = 60) -> list[protocol.Message]:
    """The scripted peer reads `count` whole frames."""
    dec = protocol.FrameDecoder()
    out: list[protocol.Message] = []
    peer.settimeout(timeout)
    while len(out) < count:
        buf = dec.get_buffer()
        n = peer.recv_into(buf)
        assert n, "connection closed early"
        dec.buffer_updated(n)
        while (msg := dec.next_message()) is not None:
            out.append(msg)
    return out


def wait_for(pred, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start_waiting_sender(conn) -> tuple[threading.Thread, list]:
    """A thread sending 1 MiB to a peer that does not read, once it waits for the socket;
    the ConnectionClosed it gets lands in the returned list."""
    errors: list = []

    def waiting_sender():
        try:
            conn.send(protocol.encode_frame(protocol.RESULT, b"w" * FRAME_BODY))
        except transport.ConnectionClosed as e:
            errors.append(e)

    t = threading.Thread(target=waiting_sender, daemon=True)
    t.start()
    wait_for(lambda: conn._writers == 1, what="the sender waiting for the socket")
    assert t.is_alive() and not errors
    return t, errors


def test_reads_go_on_while_writes_are_stuck_then_everything_arrives_in_order():
    conn, handler, peer = pair()
    try:
        senders = []
        for t in range(4):
            def send_all(t=t):
                for k in range(3):
                    conn.send(protocol.encode_frame(protocol.RESULT, bytes([t]) * FRAME_BODY,
                                                    a=t, b=k))
            senders.append(threading.Thread(target=send_all, daemon=True))
        for s in senders:
            s.start()
        # The peer does not read: senders are stuck writing their frames themselves...
        wait_for(lambda: conn._writers == 4, what="four senders waiting for the socket")
        assert all(s.is_alive() for s in senders)
        # ...but the connection still reads what the peer sends.
        for k in range(20):
            peer.sendall(b"".join(protocol.encode_frame(protocol.RESULT, b"x" * 100, a=k)))
        wait_for(lambda: len(handler.messages) == 20, what="frames read while writes are stuck")
        assert [m.a for m in handler.messages] == list(range(20))
        # The peer resumes reading: every frame arrives whole, each sender's in order.
        frames = read_frames(peer, 12)
        for s in senders:
            s.join(30)
            assert not s.is_alive()
        by_sender: dict[int, list[int]] = {}
        for m in frames:
            assert bytes(m.body) == bytes([m.a]) * FRAME_BODY
            by_sender.setdefault(m.a, []).append(m.b)
        assert by_sender == {t: [0, 1, 2] for t in range(4)}
    finally:
        conn.close()
        peer.close()


def test_a_reading_thread_never_waits_for_the_peer():
    conn, handler, peer = pair()
    try:
        handler.reply_from_reader = True  # each frame read is answered with 1 MiB
        for k in range(5):
            peer.sendall(b"".join(protocol.encode_frame(protocol.RESULT, b"q", a=k)))
        # Five 1 MiB answers could not be written (the peer reads nothing) and yet the
        # reading thread went on: each send returned without waiting for the peer.
        wait_for(lambda: len(handler.reader_send_seconds) == 5, what="frames read and answered")
        assert max(handler.reader_send_seconds) < 5.0
        answers = read_frames(peer, 5)
        assert [m.a for m in answers] == list(range(5))
        assert all(len(m.body) == FRAME_BODY for m in answers)
    finally:
        conn.close()
        peer.close()


def test_send_deadline_and_close_release_waiting_senders():
    conn, handler, peer = pair()
    try:
        big = protocol.encode_frame(protocol.RESULT, b"z" * FRAME_BODY)
        t0 = time.monotonic()
        with pytest.raises(transport.SendTimeout):
            conn.send(big, timeout=0.5)
        assert time.monotonic() - t0 < 10
        # A sender waiting without a deadline is released by close().
        t, errors = start_waiting_sender(conn)
        conn.close()
        t.join(10)
        assert not t.is_alive() and len(errors) == 1
        with pytest.raises(transport.ConnectionClosed):
            conn.send(protocol.encode_frame(protocol.RESULT, b"after"))
    finally:
        conn.close()
        peer.close()


def test_a_peer_that_goes_away_fails_waiting_senders_and_reports_the_loss():
    conn, handler, peer = pair()
    t, errors = start_waiting_sender(conn)
    peer.close()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1
    assert handler.closed.wait(10)
    assert conn.closed


def test_no_waiting_when_not_asked_and_queue_drains_later():
    conn, handler, peer = pair()
    try:
        t0 = time.monotonic()
        for k in range(4):
            conn.send(protocol.encode_frame(protocol.RESULT, b"n" * FRAME_BODY, a=k), wait=False)
        assert time.monotonic() - t0 < 5.0
        frames = read_frames(peer, 4)
        assert [m.a for m in frames] == [0, 1, 2, 3]
    finally:
        conn.close()
        peer.close()
