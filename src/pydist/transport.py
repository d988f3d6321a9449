"""Connections: the authenticated connection to one peer (socket or stream pair), the
handshakes, and the listener of a worker. The threads that serve them live in `threads`.

Data flow and ownership (the full model, with every lock and its order: ARCHITECTURE.md,
"Concurrency model"):

    caller thread --send()--> [Connection._outq] --sendmsg(MSG_DONTWAIT)--> socket
                                    |  (what the socket does not take now)
                                    +--> poller thread, on EPOLLOUT: writes more, never blocks
    socket --recv--> whoever holds the reading role: a caller waiting for its reply
                     (wait_reply), a worker thread that has just answered a call (_serve),
                     or the poller thread (one-shot EPOLLIN while nobody holds the role)
                --> cheap frames handled in place; calls --> POOL threads (_ThreadPool)

Two rules make a deadlock impossible: (1) no thread ever blocks in a socket write, writes
are non-blocking and the rest waits in the queue, so every connection is always being read
by someone or watched by the poller; (2) a thread inside `Connection._read` (it reads a
connection) never waits for its frames to be written: the poller, which never blocks,
finishes the write. Other senders wait until their frame is written (back-pressure), writing
the queue themselves whenever the socket drains.
Memory bounds the queue, not the socket buffer. Stream pairs (custom transports) have no
descriptor to poll: one reading and one writing thread each.

Owners: the poller, the watchdog and the pool (module `threads`) are process-wide and
stopped by `threads.stop_runtime` (`pydist.shutdown`, also at exit); a Listener's thread by
`Listener.close`; a stream pair's threads end when its connection closes.

We measured the alternative (one asyncio/uvloop loop thread per process): it adds two thread
hand-offs per round trip, about 50-80 µs here, against a ~125 µs raw floor. See ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from . import protocol, sharedmem
from .sharedmem import family_of
from .exceptions import AuthenticationError, ProtocolError
from .threads import (
    _FAULT_EVENTS,
    _ONESHOT,
    _READ_EVENTS,
    _WRITE_EVENTS,
    HEARTBEAT,
    POOL,
    WATCHDOG,
    _get_poller,
    _Watchdog,
)

log = logging.getLogger(__name__)

_IOV_MAX = 512
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# At most this many replies wait for the next flush (see `Connection.send_reply`).
MAX_DEFERRED_REPLIES = 64
# A request at most this large takes its connection's reading role before it is sent
# (`Connection.send_request`); a larger one is sent with back-pressure first.
REQUEST_READ_FIRST = 64 * 1024
# Calls that nobody waits for yet, sent in a burst (`Connection.send_soon`): one sent within
# BURST_GAP seconds of the last such call of this process may wait in its connection's queue,
# up to MAX_SOON of them per connection and SOON_TICK seconds (frames up to SOON_MAX_BYTES).
BURST_GAP = 200e-6
MAX_SOON = 16
SOON_TICK = 0.002
SOON_MAX_BYTES = 16 * 1024


class ConnectionClosed(ConnectionError):
    """The connection was closed (by us or by the peer) before or while sending."""


class SendTimeout(TimeoutError):
    """A frame could not be written within the sender's deadline (the peer does not read)."""


class Handler(Protocol):
    def on_message(self, conn: "Connection", msg: protocol.Message) -> Callable[[], None] | None:
        """Handle `msg` in the reading thread; return work to run concurrently, or None."""

    def on_close(self, conn: "Connection", exc: BaseException | None) -> None:
        """The connection is gone; called exactly once."""


class StreamPair:
    """A socket look-alike over a pair of binary streams (pipes, a custom manager's IO), so
    that the handshake and `Connection` serve custom transports unchanged.

    `reader` needs `readinto1` or `readinto`, `writer` needs `write` and `flush`. Timeouts
    apply only when `reader` is unbuffered and has a file descriptor (use `bufsize=0` pipes).
    """

    family = None

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self._readinto = getattr(reader, "readinto1", None) or reader.readinto
        self._timeout: float | None = None
        self._write_lock = threading.Lock()

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv_into(self, buf) -> int:
        if self._timeout is not None and isinstance(self.reader, io.RawIOBase):
            try:
                fd = self.reader.fileno()
            except (OSError, ValueError):
                fd = None
            if fd is not None and not select.select([fd], [], [], self._timeout)[0]:
                raise socket.timeout("timed out")
        n = self._readinto(buf)
        return 0 if n is None else n

    def sendmsg(self, chunks) -> int:
        total = 0
        with self._write_lock:
            for chunk in chunks:
                view = memoryview(chunk)
                while view.nbytes:
                    n = self.writer.write(view)
                    n = view.nbytes if n is None else n
                    view = view[n:]
                    total += n
            self.writer.flush()
        return total

    def send(self, data) -> int:
        return self.sendmsg([data])

    def sendall(self, data) -> None:
        self.sendmsg([data])

    def setsockopt(self, *args) -> None:
        pass

    def shutdown(self, how: int) -> None:
        """Close our writing end: the peer reads EOF, closes its end, and our reader ends."""
        try:
            self.writer.close()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for stream in (self.writer, self.reader):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def as_socket(endpoint) -> "socket.socket | StreamPair":
    """What a manager's `connect` returned -- a socket or a (reader, writer) pair -- as
    something the handshake and `Connection` can use."""
    if isinstance(endpoint, (socket.socket, StreamPair)):
        return endpoint
    if isinstance(endpoint, tuple) and len(endpoint) == 2:
        return StreamPair(*endpoint)
    raise TypeError(
        f"ClusterManager.connect must return a socket or a (reader, writer) pair, got {endpoint!r}"
    )


def interface_addresses() -> list[str]:
    """The IPv4 addresses of this host's network interfaces, in interface order (Linux)."""
    import fcntl
    import struct

    addrs = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            addrs.append(socket.inet_ntoa(packed[20:24]))
    return addrs


def default_bind_addr() -> str:
    """The address a worker listens on when not told: the one its ssh client reached it at
    (`SSH_CONNECTION`), else the first interface that is neither loopback nor link-local,
    else 127.0.0.1."""
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) == 4:
        return ssh[2]
    try:
        candidates = interface_addresses()
    except (OSError, ImportError, AttributeError):
        candidates = []
    for addr in candidates:
        if not addr.startswith(("127.", "169.254.")):
            return addr
    return "127.0.0.1"


def local_sockets() -> bool:
    """Whether processes of one network namespace talk over Unix sockets: on Linux, unless
    `PYDIST_LOCAL_SOCKETS=0` forces TCP everywhere."""
    return sys.platform.startswith("linux") and os.environ.get("PYDIST_LOCAL_SOCKETS") != "0"


def local_socket_name(host: str, port: int, cookie: bytes) -> bytes | None:
    """The abstract Unix socket name of the worker listening on TCP `host:port` in this
    network namespace, or None (not Linux, or `PYDIST_LOCAL_SOCKETS=0`).

    A worker listens on both. Abstract names live per network namespace, just like TCP
    ports, and a worker binds its name only after binding the TCP port: the name reaches
    exactly the process that TCP to `host:port` would reach from here, or nothing. It is
    keyed with the cluster cookie, so only members can know it (nobody can squat it)."""
    if not local_sockets():
        return None
    tag = hashlib.blake2s(f"{host}:{port}".encode(), key=cookie[:32], digest_size=16)
    return b"\0pydist-" + tag.hexdigest().encode()


def open_connection(host: str, port: int, cookie: bytes, timeout: float) -> "socket.socket":
    """A stream socket to the worker at `host:port`: its local Unix socket when it runs in
    this network namespace (about a third of TCP loopback's cost per message), else TCP."""
    name = local_socket_name(host, port, cookie)
    if name is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(name)
            sock.settimeout(None)
            return sock
        except OSError:  # no such worker here: another host, a tunnel, a wildcard bind
            sock.close()
    return socket.create_connection((host, port), timeout=timeout)


def tune_socket(sock) -> None:
    """TCP_NODELAY and keepalive: small messages go out at once, dead peers are noticed.
    `PYDIST_SOCKET_BUFFER=N` shrinks the kernel buffers to N bytes (a test knob: then every
    large frame is a partial write)."""
    if not isinstance(sock, socket.socket):
        return
    if family_of(sock) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    size = socket_buffer_size()
    if size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def socket_buffer_size() -> int:
    """The `PYDIST_SOCKET_BUFFER` test knob in bytes (0: the kernel's defaults)."""
    value = os.environ.get("PYDIST_SOCKET_BUFFER", "")
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        raise ValueError(f"PYDIST_SOCKET_BUFFER must be a number of bytes, got {value!r}") from None


# A wrong handshake proof is answered (DENIED) only after this many seconds, and the next
# proof from the same source address waits this long after the last failure: online guessing
# of the cookie is slow, and costs the listener no thread while it waits.
HANDSHAKE_FAIL_DELAY = 1.0
HANDSHAKE_FAIL_INTERVAL = 0.25
# A listener authenticates at most this many connections at once; a new one beyond that
# drops the oldest (a flood of silent clients then holds a bounded number of descriptors).
MAX_PENDING_HANDSHAKES = 256
# After an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM...) a listener pauses accepting for
# a delay that doubles from ACCEPT_BACKOFF_MIN up to ACCEPT_BACKOFF_MAX seconds.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
# Refused connections are logged at most once per this many seconds (with a count).
REFUSAL_LOG_INTERVAL = 1.0


def _recv_exact(sock: "socket.socket | StreamPair", n: int, what: str, deadline: float) -> bytes:
    """Read exactly `n` handshake bytes before `deadline` (time.monotonic()): the timeout is
    for the whole handshake, so a peer dripping bytes one by one cannot stretch it."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("handshake deadline passed")
        sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ProtocolError(f"handshake: connection closed by peer while reading {what}")
        got += k
    return bytes(buf)


def handshake_initiator(sock: "socket.socket | StreamPair", cookie: bytes, timeout: float) -> None:
    """Authenticate both ways as the connecting side, which proves itself first; raise
    AuthenticationError on failure, ProtocolError if it takes more than `timeout` in all."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        nonce_i = protocol.new_nonce()
        sock.sendall(protocol.encode_hello(nonce_i))
        challenge = _recv_exact(sock, protocol.CHALLENGE_LEN, "CHALLENGE", deadline)
        nonce_a = protocol.decode_challenge(challenge)
        sock.sendall(protocol.encode_proof(cookie, nonce_i, nonce_a))
        verdict = _recv_exact(sock, protocol.VERDICT_LEN, "VERDICT", deadline)
        if verdict == protocol.VERDICT_OK:
            verdict += _recv_exact(sock, protocol.MAC_LEN, "ACCEPT", deadline)
        protocol.check_accept(cookie, verdict, nonce_i, nonce_a)
    except socket.timeout:
        raise ProtocolError(f"handshake: peer did not answer within {timeout} seconds") from None
    finally:
        sock.settimeout(None)


def handshake_acceptor(sock: "socket.socket | StreamPair", cookie: bytes, timeout: float) -> None:
    """Authenticate both ways as the accepting side, blocking (custom transports; a worker's
    `Listener` runs the same steps without a thread per client). Raises ProtocolError or
    AuthenticationError; a wrong proof is answered only after HANDSHAKE_FAIL_DELAY."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        hello = _recv_exact(sock, protocol.HELLO_LEN, "HELLO", deadline)
        version, nonce_i = protocol.decode_hello(hello)
        nonce_a = protocol.new_nonce()
        sock.sendall(protocol.encode_challenge(nonce_a))
        if version != protocol.PROTOCOL_VERSION:
            raise AuthenticationError(
                f"handshake: peer speaks protocol version {version}, we speak {protocol.PROTOCOL_VERSION}"
            )
        proof = _recv_exact(sock, protocol.PROOF_LEN, "PROOF", deadline)
        try:
            protocol.check_proof(cookie, proof, nonce_i, nonce_a)
        except AuthenticationError:
            time.sleep(HANDSHAKE_FAIL_DELAY)
            sock.sendall(protocol.VERDICT_DENIED)
            raise
        sock.sendall(protocol.encode_accept(cookie, nonce_i, nonce_a))
    except socket.timeout:
        raise ProtocolError(f"handshake: peer sent nothing valid within {timeout} seconds") from None
    finally:
        sock.settimeout(None)


# ==================================================================== connections
_tls = threading.local()  # .reading: this thread is inside Connection._read
# .serving: the connection whose calls this thread last ran (`Connection._serve`);
# .send_waiting: this thread waits on a connection's `_sent` (`Connection._sent_wait`)


def give_back_lent_role() -> None:
    """In a call that `Connection._serve` runs with the reading role lent to it: the call is
    about to wait (a sleep, a condition, a lock, another process's reply), so the frames behind
    it are read by another thread now rather than once the watchdog takes the role back."""
    conn = getattr(_tls, "serving", None)
    if conn is not None and conn._lent_at != 0.0 and not getattr(_tls, "send_waiting", False):
        conn._give_back_lent()  # (not while holding a connection's `_sent`: see `_sent_wait`)


def _reading() -> bool:
    """Whether this thread is reading a connection (then it must never wait for a peer)."""
    return getattr(_tls, "reading", False)


class _SoonFrames:
    """The connections holding calls that `Connection.send_soon` let wait, and their bound:
    the poller thread writes them every SOON_TICK seconds while there are any."""

    name = "calls sent in a burst"  # (for the poller's log)

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[Connection] = set()
        self._ticking = False  # a poller timer is set
        self._last = 0.0  # when this process last sent a call nobody waits for

    def in_burst(self, now: float) -> bool:
        """Whether a call sent `now` follows the last one closely (and note it)."""
        last, self._last = self._last, now
        return now - last < BURST_GAP

    def add(self, conn: "Connection") -> None:
        """`conn` holds calls that wait: have the poller write them within SOON_TICK."""
        with self._lock:
            self._conns.add(conn)
            if self._ticking:
                return
            self._ticking = True
        _get_poller().call_soon(self, time.monotonic() + SOON_TICK)  # type: ignore[union-attr]

    def flush(self, on_tick: bool = False) -> bool:
        """Write every waiting call now; whether there were any. `on_tick` (the poller's
        timer): if there were none, the tick stops."""
        with self._lock:
            conns, self._conns = self._conns, set()
            if on_tick and not conns:
                self._ticking = False
        for conn in conns:
            conn.flush()
        return bool(conns)

    def _on_timer(self, now: float) -> None:
        """Poller thread: write what waits; look again in SOON_TICK while bursts go on."""
        if self.flush(on_tick=True):
            _get_poller().call_at(self, now + SOON_TICK)  # type: ignore[union-attr]


_SOON = _SoonFrames()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SOON._reset)  # (its lock may be held in the parent)


def flush_soon() -> None:
    """Write the calls `Connection.send_soon` let wait: a thread about to wait for a reply
    calls this (the call it waits for may be among them)."""
    if _SOON._conns:
        _SOON.flush()


class _Frame:
    """A frame in a connection's send queue: the byte chunks not written yet."""

    __slots__ = ("views", "done")

    def __init__(self, views: list) -> None:
        self.views = views
        self.done = False


def _consume(queue: deque, sent: int) -> bool:
    """Drop `sent` written bytes from the head of `queue`; True if a frame was completed."""
    finished = False
    while queue:
        frame = queue[0]
        views = frame.views
        while views:
            k = len(views[0])
            if k <= sent:
                sent -= k
                del views[0]
            elif sent:
                views[0] = memoryview(views[0])[sent:]
                sent = 0
                break
            else:
                break
        if views:
            break
        queue.popleft()
        frame.done = True
        finished = True
    return finished


class Connection:
    """An authenticated socket to one peer.

    Receiving: whoever holds the reading role (`_role`) reads frames and handles the cheap
    ones in place; a frame that asks for work (a call) becomes a task. See `_Poller` for who
    reads when. Sockets are read without any dedicated thread; stream pairs (custom
    transports) get one reading thread.

    Sending never blocks a reader: a frame is queued, and written without blocking as far
    as the socket takes it; the poller writes the rest when the socket drains. A sender that
    reads no connection then waits until its frame is written (back-pressure, and its
    buffers may be reused); a reading thread never waits. Stream pairs get one writing
    thread instead of the poller.
    """

    def __init__(self, sock: "socket.socket | StreamPair", handler: Handler, name: str):
        self.sock = sock
        self.handler = handler
        self.name = name
        self.peer_pid: int | None = None
        self.closed = False
        # After running a call, go straight back to reading (a worker's connections): the
        # next call is then read by the thread that answered the last one.
        self.serve_blocking = False
        self._decoder = protocol.FrameDecoder()
        # Large buffers through shared memory (`sharedmem`): 0 not offered yet, 1 offered,
        # 2 accepted by the peer, -1 never; our arena for the peer, the peer's for us.
        self.share_state = 0 if sharedmem.usable(sock) else -1
        self.arena: sharedmem.Arena | None = None
        self.peer_arena: sharedmem.PeerArena | None = None
        # Sending. `_outq` holds frames not fully written, in order; its head may be partly
        # written. Only the holder of `_send_lock` writes or removes (appending needs no
        # lock), and it holds it only for non-blocking work.
        self._outq: deque[_Frame] = deque()
        self._send_lock = threading.Lock()
        self._sent = threading.Condition(threading.Lock())  # senders waiting for their frame
        self._send_waiters = 0
        self._writers = 0  # senders writing the queue themselves (`_wait_written`)
        self._soon = 0  # the queue holds only calls that `send_soon` let wait: how many
        self._broken: BaseException | None = None  # the write error that lost the stream
        # Receiving.
        self._role = threading.Lock()
        self._state = threading.Lock()
        self._closed_reported = False
        self._gone = threading.Event()
        self._lend_lock = threading.Lock()
        self._lent_at = 0.0  # when the reading role was lent to a running call (0: not lent)
        self._lent_thread = 0  # the thread running that call
        # While calls already received wait behind the lent one, a kernel timer of the poller
        # (`_Alarms`) takes the role back if it runs long: `_alarmed` from the first call of
        # such a burst until the last has run, or the timer found no lent call (lend lock
        # held). `_alarms` None: not used yet, or none here (then the watchdog does it).
        self._alarms: Any = None
        self._alarmed = False
        # The serving thread while calls it has already received wait behind the one it runs:
        # its replies may wait in `_outq` for the next flush (see `send_reply`).
        self._deferring = 0
        # Interest in the poller: readable while nobody reads, writable while frames wait.
        self._arm_lock = threading.Lock()
        self._want_read = False
        self._want_write = False
        self._lent_watch = False  # readable wanted while the role is lent (_watch_while_lent)
        self._armed = 0  # what the kernel watches (0 once a one-shot event has fired)
        self._poller = _get_poller() if isinstance(sock, socket.socket) else None
        self.fd = sock.fileno() if self._poller is not None else -1  # type: ignore[union-attr]
        self._epoll_modify = self._poller.modify if self._poller is not None else None
        # Heartbeats (`set_heartbeat`, `_heartbeat`): reads that returned bytes and writes
        # of queued bytes so far (signs of life), and what the heartbeat thread made of them.
        self.heartbeat_timeout: float | None = None
        self.lost_reason: str | None = None  # why we closed it, if we did (silence)
        self._heard = 0
        self._wrote = 0
        self._life_seen = -1
        self._life_at = 0.0
        self._pinged_at = 0.0

    def __repr__(self) -> str:
        return f"<Connection {self.name} peer={self.peer_pid}{' closed' if self.closed else ''}>"

    def start(self) -> None:
        """Start serving incoming frames."""
        if self._poller is None:
            for target, what in ((self._dedicated_reader, "reader"),
                                 (self._stream_writer, "writer")):
                threading.Thread(target=target, name=f"pydist-{what}-{self.name}",
                                 daemon=True).start()
            return
        self._poller.register(self)
        with self._arm_lock:
            self._want_read = True
            self._apply_interest()

    # -- interest in the poller --
    def _apply_interest(self) -> None:
        """Tell epoll what we wait for (arm lock held); no system call if unchanged."""
        if self._closed_reported:  # the descriptor is closed and may already be reused
            return
        reading = self._want_read or self._lent_watch
        want = (_READ_EVENTS if reading else 0) | (_WRITE_EVENTS if self._want_write else 0)
        if want != self._armed:
            self._armed = want
            try:
                self._epoll_modify(self.fd, want | _ONESHOT)  # type: ignore[misc]
            except (OSError, ValueError):
                pass  # closed meanwhile

    def _on_events(self, ev: int) -> None:
        """Poller thread: the socket is readable or writable (or failed)."""
        with self._arm_lock:
            self._armed = 0  # one-shot: the kernel stopped watching
            readable = (self._want_read or self._lent_watch) and ev & (_READ_EVENTS | _FAULT_EVENTS)
            if readable:
                self._lent_watch = False  # once: then the watchdog takes over (_on_readable)
            writable = self._want_write and ev & (_WRITE_EVENTS | _FAULT_EVENTS)
            if writable:
                self._want_write = False
        if writable:
            self.flush()
        if readable:
            self._on_readable()
        with self._arm_lock:
            self._apply_interest()

    # -- sending --
    def send(self, chunks: list, *, wait: bool = True, timeout: float | None = None) -> None:
        """Send one frame's chunks; thread-safe, in order per thread. What the socket does not
        take at once is queued. Then, with `wait` and unless this thread reads a connection,
        wait until the frame is written (SendTimeout after `timeout` seconds). Raises
        ConnectionClosed if the connection is or gets closed first."""
        chunks = self._share(chunks)
        if self._poller is None:
            frame = _Frame(list(chunks))
            self._outq.append(frame)
            with self._sent:
                self._sent.notify_all()  # wake the writing thread
        else:
            lock = self._send_lock
            if not self._outq and lock.acquire(False):  # uncontended: straight to the socket
                try:
                    frame = self._send_now(chunks)  # type: ignore[assignment]
                finally:
                    lock.release()
                if frame is None:
                    return
            else:  # contended: queue; whoever holds the lock next writes everything queued
                frame = _Frame(chunks)
                self._outq.append(frame)
                with lock:
                    self._flush_locked()
            if self._broken is not None:
                self._lose_stream()
        if frame.done:
            return
        if self.closed:
            raise ConnectionClosed(f"connection to {self.name} is closed")
        if wait and not _reading():
            self._wait_written(frame, timeout)

    def send_soon(self, chunks: list) -> None:
        """Send a call that nobody waits for yet (`remotecall`, `remote_do`): as `send`, but
        while this process sends such calls in a burst (each within BURST_GAP of the last),
        a small one may wait in the queue to leave with the next ones to the same peer, so
        that up to MAX_SOON calls cost one system call here and one wake-up there. They
        leave with any other frame to that peer, when any thread here is about to wait for
        a reply (`flush_soon`), and at the latest about SOON_TICK seconds later (the
        poller). Calls to one peer keep their order. (With the send lock busy, another
        thread writes: the call goes as `send` sends it.)"""
        lock = self._send_lock
        if (_SOON.in_burst(time.monotonic()) and self._poller is not None and len(chunks) == 1
                and len(chunks[0]) <= SOON_MAX_BYTES and not _reading() and lock.acquire(False)):
            try:
                waiting = self._soon  # (not closed, not behind a full socket, room left)
                held = not self.closed and len(self._outq) == waiting < MAX_SOON
                if held:
                    self._outq.append(_Frame(chunks))
                    self._soon = waiting + 1
            finally:
                lock.release()
            if held:
                if not waiting:
                    _SOON.add(self)
                return
        self.send(chunks)

    def _share(self, chunks: list) -> list:
        """The frame's chunks with its large buffers in the shared-memory arena, where the
        peer takes them from there (`sharedmem`); a frame in one chunk has no buffers."""
        if len(chunks) > 1 and self.share_state >= 0:
            return sharedmem.outgoing(self, chunks)
        return chunks

    def _send_now(self, chunks: list) -> _Frame | None:
        """Write a frame into an empty queue (send lock held); the unwritten rest becomes the
        head of the queue, returned; None if all of it was written."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self.name} is closed")
        if self._outq or len(chunks) > _IOV_MAX:  # others queued meanwhile: keep the order
            frame = _Frame(chunks)
            self._outq.append(frame)
            self._flush_locked()
            return frame
        try:
            sent = self.sock.sendmsg(chunks, (), _DONTWAIT)  # type: ignore[call-arg]
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._broken = e
            return _Frame(chunks)
        if sent == (len(chunks[0]) if len(chunks) == 1 else sum(map(len, chunks))):
            return None
        rest = _Frame(list(chunks))
        _consume(deque([rest]), sent)
        self._outq.appendleft(rest)  # before anything queued since: it is partly written
        self._want_writable()
        return rest

    def _want_writable(self) -> None:
        """Frames wait in the queue: have the poller write them when the socket drains,
        unless a sender is writing them itself (`_wait_written`)."""
        if self._writers == 0 and self._poller is not None:
            with self._arm_lock:
                self._want_write = True
                self._apply_interest()

    def _flush_locked(self) -> None:
        """Write queued frames without blocking (send lock held). What the socket does not
        take stays queued and the poller is asked to write it when the socket drains."""
        queue = self._outq
        finished = False
        self._soon = 0
        while queue:
            if self.closed or self._broken is not None:
                queue.clear()
                break
            iov: list = []
            n = len(queue)
            i = 0
            while i < n and len(iov) < _IOV_MAX:
                iov.extend(queue[i].views)
                i += 1
            try:
                sent = self.sock.sendmsg(iov[:_IOV_MAX], (), _DONTWAIT)  # type: ignore[call-arg]
            except InterruptedError:
                continue
            except BlockingIOError:
                self._want_writable()
                break
            except OSError as e:
                self._broken = e
                queue.clear()
                break
            self._wrote += 1  # queued bytes left: the peer is reading (see `_heartbeat`)
            finished |= _consume(queue, sent)
        if finished and self._send_waiters:
            with self._sent:
                self._sent.notify_all()

    def _wait_written(self, frame: _Frame, timeout: float | None) -> None:
        """Write the queue in this thread until `frame` is out: wait for the socket to drain
        (poll, no lock held), then write without blocking. A large frame thus leaves from
        its sender's thread, with no hand-off per partial write; stream pairs wait for
        their writing thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._poller is None:
            return self._wait_done(frame, deadline, timeout)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        with self._send_lock:
            self._writers += 1
        try:
            while not frame.done:
                remaining = self._time_left(deadline, timeout)
                wait_ms = 100 if remaining is None else max(1, min(100, int(remaining * 1000)))
                try:
                    poller.poll(wait_ms)
                except InterruptedError:
                    pass
                with self._send_lock:
                    self._flush_locked()
                if self._broken is not None:
                    self._lose_stream()
        finally:
            with self._send_lock:
                self._writers -= 1
                if self._outq and self._writers == 0:  # what is left: the poller writes it
                    self._want_writable()

    def _time_left(self, deadline: float | None, timeout: float | None) -> float | None:
        """Seconds a sender may still wait for its frame (None: no deadline); raises
        ConnectionClosed or SendTimeout when it may not."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self.name} closed while sending")
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SendTimeout(f"{self.name} has not read a frame for {timeout} seconds")
        return remaining

    def _wait_done(self, frame: _Frame, deadline: float | None, timeout: float | None) -> None:
        with self._sent:
            self._send_waiters += 1
            try:
                while not frame.done:
                    self._sent_wait(self._time_left(deadline, timeout))
            finally:
                self._send_waiters -= 1

    def _sent_wait(self, timeout: float | None) -> None:
        """Wait on `_sent` (its lock held). The wait gives no lent reading role back
        (`give_back_lent_role`): that would flush, taking a send lock, in the opposite order
        to a writer that holds the send lock and notifies `_sent`."""
        _tls.send_waiting = True
        try:
            self._sent.wait(timeout)
        finally:
            _tls.send_waiting = False

    def wait_sent(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until every queued frame is written; False if some
        are still queued (the peer does not read) and the connection is open."""
        deadline = time.monotonic() + timeout
        with self._sent:
            self._send_waiters += 1
            try:
                while self._outq and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._sent_wait(remaining)
            finally:
                self._send_waiters -= 1
        return True

    def _lose_stream(self) -> None:
        """A write failed: the stream is lost; close and raise ConnectionClosed."""
        e = self._broken
        self.close()
        raise ConnectionClosed(f"connection to {self.name} lost: {e}") from e

    def send_reply(self, chunks: list) -> None:
        """Send a call's reply. While the thread serving this connection has more calls
        already received, its replies queue up and leave together (one system call for many,
        and one wake-up of the reader on the other side). They leave before this thread
        blocks to read, when it gives up the reading role (the watchdog takes it back from
        a call that runs long, so a queued reply waits at most about LEND_SECONDS behind
        it; a call that waits gives it up at once), with any other frame sent, or when
        MAX_DEFERRED_REPLIES have queued."""
        me = self._deferring
        if me and me == threading.get_ident() and len(self._outq) < MAX_DEFERRED_REPLIES:
            self._outq.append(_Frame(self._share(chunks)))
            if self._deferring != me:  # the role was taken back meanwhile (and flushed)
                self.flush()
            return
        self.send(chunks)

    def flush(self) -> None:
        """Write what is queued, without blocking; the poller writes what the socket does
        not take now. Never raises."""
        if not self._outq or self._poller is None:
            return
        with self._send_lock:
            self._flush_locked()
        if self._broken is not None:
            with contextlib.suppress(ConnectionClosed):
                self._lose_stream()

    def _stream_writer(self) -> None:
        """Stream pairs: one thread writes the queue (blocking writes), until closed."""
        queue = self._outq
        while True:
            with self._sent:
                while not queue and not self.closed:
                    self._sent.wait()
                if self.closed:
                    return
            frame = queue[0]
            try:
                self.sock.sendmsg(frame.views)
            except (OSError, ValueError) as e:
                log.debug("pydist: writing to %s failed: %s", self.name, e)
                self.close()
                return
            queue.popleft()
            self._wrote += 1
            frame.done = True
            with self._sent:
                self._sent.notify_all()

    # -- heartbeats --
    def set_heartbeat(self, timeout: float | None) -> None:
        """Declare the peer dead once it has been silent for `timeout` seconds (None or 0:
        never). Silence is checked by the heartbeat thread (`threads._Heartbeat`), which
        pings a peer quiet for a third of that; any bytes received, and queued bytes the
        socket took (the peer is reading them), count as signs of life, so a large
        transfer in progress, either way, is never silence."""
        self.heartbeat_timeout = float(timeout) if timeout else None
        if self.heartbeat_timeout and not self.closed:
            HEARTBEAT.watch(self)
        else:
            HEARTBEAT.unwatch(self)

    def _heartbeat(self, now: float, stalled: bool) -> bool:
        """Heartbeat thread: ping a quiet peer, close a silent one (`lost_reason` says why).
        After a stall of our own (`stalled`) the peer's silence is not its fault: its clock
        restarts. Returns False once there is nothing more to watch."""
        timeout = self.heartbeat_timeout
        if self.closed or not timeout:
            return False
        arena = self.arena
        if arena is not None:  # regions the peer released: given back if not reused soon
            arena.trim(now)
        # Signs of life: bytes read, and queued bytes written (the peer drains its socket:
        # our PING may wait behind a large frame it is reading, its PONG behind one it sends).
        life = self._heard + self._wrote
        if life != self._life_seen or stalled:
            self._life_seen = life
            self._life_at = now
            return True
        silent = now - self._life_at
        if silent >= timeout and not self._data_waiting():
            self.lost_reason = (f"was silent for {silent:.1f} s (heartbeat timeout {timeout:g} s) "
                                "and is declared dead")
            log.info("heartbeat: %s %s", self.name, self.lost_reason)
            self.close()
            return False
        if silent >= timeout / 3 and now - self._pinged_at >= timeout / 3:
            self._pinged_at = now
            log.debug("heartbeat: pinging %s, silent for %.1f s", self.name, silent)
            self.poke()
        return True

    def _data_waiting(self) -> bool:
        """Bytes from the peer wait unread in the socket (so it is not silent: we are slow)."""
        if self._poller is None:
            return False
        try:
            p = select.poll()
            p.register(self.fd, select.POLLIN)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return False

    def answer_ping(self) -> None:
        """Reading thread: the peer pinged us; answer at once, never waiting."""
        try:
            self.send(protocol.encode_frame(protocol.PONG), wait=False)
        except ConnectionClosed:
            pass

    # -- receiving --
    def _read(self, blocking: bool, until: Callable[[], bool] | None = None):
        """Read and handle frames (reading role held). Returns a task as soon as a frame
        yields one; None when `until()` is true, when non-blocking and nothing is left to
        read, or when the connection is dead (then `self.closed`). Handlers run here, in a
        thread marked as reading: nothing they send waits for the peer."""
        tls = _tls
        was_reading = getattr(tls, "reading", False)
        tls.reading = True
        try:
            return self._read_frames(blocking, until)
        finally:
            tls.reading = was_reading

    def _read_frames(self, blocking: bool, until: Callable[[], bool] | None):
        dec = self._decoder
        on_message = self.handler.on_message
        flags = 0 if blocking else socket.MSG_DONTWAIT
        while True:
            msg = dec.next_message()
            if msg is None:
                if until is not None and until():
                    return None
                if self._outq:  # replies queued behind the calls just handled leave first
                    self.flush()
                try:
                    buf = dec.get_buffer()
                    n = self.sock.recv_into(buf, 0, flags) if flags else self.sock.recv_into(buf)  # type: ignore[call-arg]
                    if n == 0:
                        self._report_closed(None)
                        return None
                    self._heard += 1
                    dec.buffer_updated(n)
                except BlockingIOError:
                    return None
                except InterruptedError:
                    continue
                except Exception as e:  # OSError, ProtocolError, a decoder bug: the stream is lost
                    self._report_closed(e)
                    return None
                continue
            try:
                task = on_message(self, msg)
            except Exception:
                log.exception("pydist: error handling a %s message on %s",
                              protocol.KIND_NAMES.get(msg.kind), self.name)
                continue
            if task is not None:
                return task

    def _take_role(self) -> bool:
        """Take the reading role if it is free; the poller stops watching for reading. Both at
        once, under the arm lock: between the two, a poller woken for a readable socket saw
        the role taken but the socket still wanted, failed to take the role, re-armed epoll
        and was woken again at once, as often as five times a round trip of W7."""
        if self._closed_reported:
            return False
        if self._poller is None:
            return self._role.acquire(False)
        with self._arm_lock:
            if not self._role.acquire(False):
                return False
            self._want_read = False
            self._apply_interest()
        return True

    def _release_role(self) -> None:
        """Give up the reading role: frames already received go to a pool thread, otherwise
        the poller watches the socket again."""
        if self._outq:
            self.flush()
        pending = self._decoder.has_message()
        if self._poller is not None and not pending and not self.closed:
            with self._arm_lock:
                self._want_read = True
                self._role.release()
                self._apply_interest()
            return
        self._role.release()
        if self._closed_reported:
            return
        if pending or self.closed:  # closed: someone must read the end and report it
            POOL.submit(self._read_on)

    def _on_readable(self) -> None:
        """Poller thread: data arrived while nobody was reading, or while the reading role
        is lent to a running call (`_watch_while_lent`). Read what is there, or take the
        lent role back if the call has run long (else look again when it will have: most
        calls end first, and their thread reads the frame itself)."""
        if self._take_role():
            self._drain_taken()
        else:
            self._on_timer(time.monotonic())

    def _on_timer(self, now: float) -> None:
        """Poller thread: a frame waits behind a call lent the reading role: take the role
        back if the call has run `PROMOTE_AFTER`, else look again when it will have."""
        self._take_back(now, early=self._look_again)

    def _look_again(self, _: "Connection") -> None:
        """(lend lock held, poller thread) See `_on_timer`."""
        self._poller.call_at(self, self._lent_at + _Watchdog.PROMOTE_AFTER)  # type: ignore[union-attr]

    def _watch_while_lent(self, on: bool) -> None:
        """While a call runs with the lent role and no frame waits behind it, the poller
        watches the socket instead of the watchdog polling every tick: a short call that no
        frame interrupts then costs two epoll changes and wakes no thread."""
        if self._poller is None:
            if on:
                with self._lend_lock:
                    WATCHDOG.watch(self)
            return
        with self._arm_lock:
            self._lent_watch = on
            self._apply_interest()

    def _drain(self) -> None:
        if self._take_role():
            self._drain_taken()

    def _drain_taken(self) -> None:
        """Read without blocking until nothing is left (role held); tasks go to the pool.
        On a serving connection the first task goes to a pool thread *with the role*: that
        thread runs it, then reads on (`_serve`), so a stream of calls costs one hand-off."""
        try:
            while True:
                task = self._read(blocking=False)
                if task is None:
                    break
                if self.serve_blocking:
                    if POOL.submit(_ServeWith(self, task)):
                        return  # the role went with the task
                    break
                POOL.submit(self._task_runner(task))
        except BaseException:
            self._release_role()
            raise
        self._release_role()

    def _task_runner(self, task: Callable[[], None]) -> Callable[[], None]:
        """`task`, then read on; the task is not referenced once it has run."""
        box = [task]
        del task

        def run() -> None:
            t = box.pop()
            t()
            del t
            self._read_on()
        return run

    def _read_on(self) -> None:
        """Read here if nobody else does: serve (run calls in this thread) on a worker's
        connection, else drain what has arrived."""
        if self.serve_blocking:
            self._serve()
        else:
            self._drain()

    def _serve(self, box: list | None = None) -> None:
        """Read in this thread and run each call it yields here, for as long as this thread
        can keep the reading role (a worker's thread after answering a call). With a `box`
        holding a task, the role is already held and that call runs first (boxed, so that
        nothing keeps it alive once it has run).

        A call runs with the role *lent* to it: if it begins to wait, it gives the role back
        (`give_back_lent_role`); if it is still running after `_Watchdog.PROMOTE_AFTER`, the
        watchdog takes the role back for others (so a call that waits for another message
        never blocks the connection); if it finishes first, this thread simply reads on,
        with no system call and no other thread involved.
        """
        first = [box.pop()] if box else []
        if not first and not self._take_role():
            return
        outer = getattr(_tls, "serving", None)
        _tls.serving = self
        try:
            self._serve_taken(first)
        finally:
            _tls.serving = outer  # (an idle pool thread keeps no closed connection alive)

    def _serve_taken(self, first: list) -> None:
        """`_serve` with the role held: the task boxed in `first` (if any), then what this
        thread reads."""
        task = first.pop() if first else None
        me = threading.get_ident()
        while True:
            if task is None:
                try:
                    task = self._read(blocking=True)
                except BaseException:
                    self._release_role()
                    raise
                if task is None:
                    self._release_role()
                    return
            queued = self._decoder.has_message()
            with self._lend_lock:  # lend and watch at once (see _watchdog_tick)
                self._lent_at = now = time.monotonic()
                self._lent_thread = me
                # If the watchdog ticks anyway, it takes the role back if the call runs long;
                # while calls wait behind this one (a burst), a kernel timer does, set once
                # for the burst (no thread woken: the watchdog's wake-up, and its fight with
                # this thread for the GIL, cost more than the calls; if it expires during a
                # younger call, the poller looks again as for a frame, `_on_timer`). Else the
                # poller watches for a frame to arrive.
                watched = WATCHDOG.awake
                if watched:
                    WATCHDOG.watch(self)
                elif queued or self._alarmed:
                    watched = True
                    if not self._alarmed and not self._set_alarm(now + _Watchdog.PROMOTE_AFTER):
                        WATCHDOG.watch(self)
            if queued:  # the reply may wait with those of the calls behind it
                self._deferring = me
            elif not watched:
                self._watch_while_lent(True)
            try:
                task()
            except BaseException:
                log.exception("pydist: internal error in a task on %s", self.name)
            self._deferring = 0
            task = None
            with self._lend_lock:
                still_ours = self._lent_at != 0.0
                self._lent_at = 0.0
                if still_ours and self._alarmed and not self._decoder.has_message():
                    self._cancel_alarm()  # the burst is over
            if still_ours and not watched:
                self._watch_while_lent(False)
            if not still_ours:  # taken back while the call ran: read again if it is free
                self.flush()
                if not self._take_role():
                    return

    def _give_back_lent(self) -> None:
        """See `give_back_lent_role`: as `_take_back` does, if the role is lent to this
        thread's call."""
        with self._lend_lock:
            if self._lent_at == 0.0 or self._lent_thread != threading.get_ident():
                return
            self._unlend()
        if self._lent_watch:  # the poller watched for a frame during the call: no more
            self._watch_while_lent(False)
        self._release_role()

    def _watchdog_tick(self, now: float) -> None:
        """Watchdog: give the role lent to a long call back to the others; stop watching
        once the call is not lent any more."""
        self._take_back(now)

    def _take_back(self, now: float, early: Callable[[Connection], None] | None = None) -> None:
        """Give the role lent to a call running since `PROMOTE_AFTER` or longer back to the
        others; `early(self)` if the call is younger (unwatch if the call is not lent)."""
        with self._lend_lock:  # so that a new lend cannot slip between check and unwatch
            if self._lent_at == 0.0:
                WATCHDOG.unwatch(self)
                if self._alarmed:  # (between two calls of a burst: the next sets it again)
                    self._cancel_alarm()
                return
            if now - self._lent_at < _Watchdog.PROMOTE_AFTER:
                if early is not None:
                    early(self)
                return
            self._unlend()
        self._release_role()

    def _unlend(self) -> None:
        """(lend lock held) The role lent to a running call is taken from it: the watchdog
        and the kernel timer stop watching, and the call's later replies (a pmap lane's) are
        not deferred."""
        self._lent_at = 0.0
        self._deferring = 0
        WATCHDOG.unwatch(self)
        if self._alarmed:
            self._cancel_alarm()

    def _set_alarm(self, when: float) -> bool:
        """(lend lock held) Have the poller run `_on_timer` at `when` through its kernel
        timer; False where there is none (no poller, no timerfd)."""
        alarms = self._alarms
        if alarms is None:
            if self._poller is None:
                return False
            alarms = self._alarms = self._poller.alarms()
            if alarms is None:
                return False
        try:
            alarms.set(self, when)
        except OSError:  # (never seen: the watchdog then)
            return False
        self._alarmed = True
        return True

    def _cancel_alarm(self) -> None:
        """(lend lock held) Undo `_set_alarm`."""
        self._alarmed = False
        self._alarms.cancel(self)

    def send_request(self, chunks: list, timeout: float | None = None) -> bool:
        """Send a request whose reply this thread will then read itself (`wait_reply` with
        `held=True`). A small request takes the reading role *before* it leaves, so that the
        poller, watching the socket while nobody reads it, does not wake up for a reply that
        arrives before this thread could take the role. Returns whether this thread holds
        the role (it must then call `wait_reply`, which gives it up); False: sent as `send`
        does (a large request, or another thread reads)."""
        if (self._poller is None or sum(map(len, chunks)) > REQUEST_READ_FIRST
                or not self._take_role()):
            self.send(chunks, timeout=timeout)
            return False
        tls = _tls
        was_reading = getattr(tls, "reading", False)
        tls.reading = True  # what the socket does not take now, the poller writes
        try:
            self.send(chunks)
        except BaseException:
            self._release_role()
            raise
        finally:
            tls.reading = was_reading
        return True

    def wait_reply(self, is_done: Callable[[], bool], timeout: float | None = None,
                   held: bool = False) -> None:
        """Read this connection in the calling thread until `is_done()`, if nobody else is
        reading it (then there is no thread hand-off for the reply). Returns early, leaving
        the caller to wait as usual, when another thread reads or the connection is dead,
        and after `timeout` seconds (then it waits in `poll` and reads without blocking). A
        thread blocked here wakes up when anything arrives: `poke` makes the peer send.
        `held`: this thread already holds the reading role (`send_request`)."""
        flush_soon()
        if not held and (self._poller is None or is_done() or not self._take_role()):
            return
        try:
            if timeout is None:
                while not is_done():
                    task = self._read(blocking=True, until=is_done)
                    if task is not None:
                        POOL.submit(self._task_runner(task))  # never run calls while waiting
                    elif self.closed:
                        break
                return
            self._poll_read(is_done, time.monotonic() + timeout, None)
        finally:
            self._release_role()

    def _poll_read(self, is_done: Callable[[], bool], deadline: float | None,
                   wake_fd: int | None) -> None:
        """(Reading role held) Wait in `poll` and read without blocking until `is_done()`, the
        connection is dead, `deadline` has passed, or `wake_fd` is readable; calls read
        meanwhile go to the pool (never run while waiting)."""
        watch = select.poll()
        watch.register(self.fd, select.POLLIN | select.POLLRDHUP)
        if wake_fd is not None:
            watch.register(wake_fd, select.POLLIN)
        while not is_done() and not self.closed:
            if deadline is None:
                left = None
            else:
                left = (deadline - time.monotonic()) * 1000
                if left <= 0:
                    break
            if not self._decoder.has_message():
                events = watch.poll(left)
                if not events:
                    continue
                if wake_fd is not None and any(fd == wake_fd for fd, _ in events):
                    break
            task = self._read(blocking=False, until=is_done)
            if task is not None:
                POOL.submit(self._task_runner(task))

    def read_until_woken(self, is_done: Callable[[], bool], wake_fd: int) -> bool:
        """Read this connection in the calling thread until `is_done()`, or until `wake_fd`
        is readable (another thread's signal: look again), if nobody else reads it; calls
        read meanwhile go to the pool. False at once if another thread reads it or it is
        dead. Bounded by the signal, as a condition wait is; `poke` wakes it as well."""
        flush_soon()
        if self._poller is None or self.closed or not self._take_role():
            return False
        try:
            self._poll_read(is_done, None, wake_fd)
            return True
        finally:
            self._release_role()

    def poke(self) -> None:
        """Have the peer send us something soon (a PING, answered at once), so that a thread
        blocked reading this connection returns to Python (where an interrupt raised in it
        fires). Never waits."""
        try:
            self.send(protocol.encode_frame(protocol.PING), wait=False)
        except ConnectionClosed:
            pass

    def _dedicated_reader(self) -> None:
        """Stream pairs: one thread holds the reading role for the connection's lifetime."""
        with self._role:
            while not self.closed:
                task = self._read(blocking=True)
                if task is not None:
                    POOL.submit(task)

    def _report_closed(self, exc: BaseException | None) -> None:
        self.close()
        with self._state:
            if self._closed_reported:
                return
            self._closed_reported = True
        sharedmem.drop(self)
        if self._poller is not None:
            with self._arm_lock:  # an epoll change in flight ends before the descriptor closes
                self._poller.unregister(self)
        with self._send_lock:  # no write may use the descriptor once it can be reused
            try:
                self.sock.close()
            except OSError:
                pass
        if self._poller is not None and threading.current_thread() is self._poller._thread:
            if POOL.submit(lambda: self._handle_loss(exc)):  # user callbacks may run there
                return
        self._handle_loss(exc)

    def _handle_loss(self, exc: BaseException | None) -> None:
        try:
            self.handler.on_close(self, exc)
        except Exception:
            log.exception("pydist: error while handling the loss of %s", self.name)
        self._gone.set()

    def set_shared_resolver(self, resolve: Callable) -> None:
        """Where buffers sent through the peer's shared-memory arena come from (`sharedmem`)."""
        self._decoder.resolve_shared = resolve

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection is gone and its loss handled; False on timeout."""
        return self._gone.wait(timeout)

    def close(self) -> None:
        """Close the connection: queued frames are dropped, waiting senders get
        ConnectionClosed, and whoever reads it next reports it to the handler once."""
        with self._state:
            if self.closed:
                return
            self.closed = True
        if self.heartbeat_timeout:
            HEARTBEAT.unwatch(self)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        with self._sent:
            self._sent.notify_all()
        if not self._role.locked():
            POOL.submit(self._drain)  # read the end and report the loss


def on_ping(conn: Connection, msg: protocol.Message) -> None:
    """PING: answer with PONG at once (in the reading thread, which never waits)."""
    conn.answer_ping()


def on_pong(conn: Connection, msg: protocol.Message) -> None:
    """PONG: nothing to do; receiving it already counted as a sign of life."""
    return None


class _ServeWith:
    """Pool work: serve `conn` starting with `task` (the reading role already held). The
    task is handed over in a box, so the pool thread does not keep it alive afterwards."""

    __slots__ = ("conn", "box")

    def __init__(self, conn: Connection, task: Callable[[], None]) -> None:
        self.conn = conn
        self.box = [task]

    def __call__(self) -> None:
        self.conn._serve(self.box)


class _Pending:
    """A connection a `Listener` is authenticating: which message it reads, what it has read,
    and when it must be done (or, parked, when it is next due)."""

    __slots__ = ("sock", "addr", "source", "deadline", "state", "want", "buf", "nonce_i",
                 "nonce_a", "wake_at", "error")

    def __init__(self, sock: socket.socket, addr, source, deadline: float):
        self.sock = sock
        self.addr = addr
        self.source = source
        self.deadline = deadline
        self.state = _HELLO
        self.want = protocol.HELLO_LEN
        self.buf = b""
        self.nonce_i = self.nonce_a = b""
        self.wake_at = 0.0
        self.error: BaseException | None = None


# _Pending states: reading HELLO, reading PROOF (both watched by the selector), a proof
# waiting for its source's turn to be checked, a wrong proof waiting for its DENIED.
_HELLO, _PROOF, _PARKED, _DENIED = range(4)


class _ReadSelector:
    """What the listener waits with: read readiness, a value per registered socket.
    `select.epoll` itself where there is one (`selectors`' layers ran a dozen functions in
    every forked worker, each one's pages then copied from the template), else
    `selectors.DefaultSelector`."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._selector = None if self._epoll is not None else selectors.DefaultSelector()
        self._watched: dict[int, tuple[Any, Any]] = {}  # fd -> (socket, value)

    def register(self, sock: Any, value: Any) -> None:
        fd = sock.fileno()
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self._selector.register(fd, selectors.EVENT_READ)  # type: ignore[union-attr]
        self._watched[fd] = (sock, value)

    def unregister(self, sock: Any) -> None:
        """(`sock` still open.) KeyError if it is not registered."""
        fd = sock.fileno()
        del self._watched[fd]
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                self._selector.unregister(fd)  # type: ignore[union-attr]
        except (OSError, KeyError, ValueError):  # (the kernel forgot it already)
            pass

    def select(self, timeout: float | None) -> list[tuple[Any, Any]]:
        """(socket, value) of each registered socket that is readable, waiting up to
        `timeout` seconds (None: until one is)."""
        if self._epoll is not None:
            fds = [fd for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        else:
            fds = [key.fd for key, _ in self._selector.select(timeout)]  # type: ignore[union-attr]
        watched = self._watched
        return [watched[fd] for fd in fds if fd in watched]

    def close(self) -> None:
        (self._epoll or self._selector).close()  # type: ignore[union-attr]


class _Doorbell:
    """One listening socket watched by the process's poller until a first client arrives
    there: then its listener's thread starts (see `Listener.start`)."""

    def __init__(self, sock: socket.socket, listener: "Listener") -> None:
        self.fd = sock.fileno()
        self._sock = sock
        self._listener = listener

    @property
    def name(self) -> str:  # (for the poller's log)
        return f"the listening socket {self._sock.getsockname()!r}"

    def _on_events(self, ev: int) -> None:
        self._listener._start_thread()


class Listener:
    """A worker's listening sockets -- TCP, and its twin local Unix socket (see
    `local_socket_name`) -- served by one thread that accepts and authenticates every client
    through a selector, so that slow or hostile clients cost no thread and delay no one.
    That thread starts with the first client (`start`).

    Every handshake has a total deadline (`handshake_timeout`); at most
    MAX_PENDING_HANDSHAKES run at once (a new one drops the oldest); accept errors pause
    accepting with a growing delay; nothing but `close()` stops the thread. `on_connection`
    gets each authenticated socket (blocking mode) in that thread and must not block.
    """

    def __init__(
        self,
        bind_addr: str,
        port: int,
        cookie: Callable[[], bytes],
        on_connection: Callable[[socket.socket], None],
        handshake_timeout: float,
    ):
        family = socket.AF_INET6 if ":" in bind_addr else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((bind_addr, port))
            self.sock.listen(1024)
        except BaseException:
            self.sock.close()
            raise
        self.address = self.sock.getsockname()[:2]
        self.local_sock = self._listen_local(local_socket_name(bind_addr, self.address[1], cookie()))
        self._cookie = cookie
        self._on_connection = on_connection
        self._timeout = handshake_timeout
        self._closed = False
        self._sel = _ReadSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._listening = [s for s in (self.sock, self.local_sock) if s is not None]
        for sock in self._listening:
            sock.setblocking(False)
        self._accepting = False
        self._pending: dict[int, _Pending] = {}  # by file descriptor, oldest first
        self._penalty: dict = {}  # source -> when its next proof may be checked
        self._backoff = 0.0  # the current accept back-off (0: accepting normally)
        self._paused_until = 0.0
        self._last_refusal_log = 0.0
        self._unlogged_refusals = 0
        self._thread = threading.Thread(target=self._run, name="pydist-listener", daemon=True)
        self._threads = [self._thread]
        self._start_lock = threading.Lock()  # the thread starts at most once, never after stop
        self._started = False
        self._doorbells: list[_Doorbell] = []

    @staticmethod
    def _listen_local(name: bytes | None) -> socket.socket | None:
        if name is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
            sock.listen(1024)
        except OSError as e:  # taken by someone else: peers here use TCP instead
            log.debug("pydist: no local socket %r: %s", name, e)
            sock.close()
            return None
        return sock

    def start(self) -> None:
        """Serve from now on. The thread starts when the first client arrives (the process's
        poller watches the listening sockets until then), or at once where there is no
        poller: most workers are never dialled (a forked worker's master connection is made
        at its fork), and a thread's start was ~0.25 ms of such a worker's ~4.4 ms."""
        poller = _get_poller()
        if poller is None:
            self._start_thread()
            return
        with self._start_lock:
            if self._started or self._closed:
                return
            self._doorbells = [_Doorbell(sock, self) for sock in self._listening]
            for bell in self._doorbells:
                poller.register(bell)  # (starts the poller's thread if none runs)
                poller.modify(bell.fd, select.EPOLLIN | _ONESHOT)
        if not poller.running():  # (stopped by `stop_runtime`: nothing would ring)
            self._start_thread()

    def _start_thread(self) -> None:
        """(Any thread, a doorbell's in the poller's.) Start the listener thread, once."""
        with self._start_lock:
            if self._started or self._closed:
                return
            self._started = True
            self._disarm()
            self._thread.start()

    def _disarm(self) -> None:
        """(Start lock held.) The poller stops watching the listening sockets."""
        poller = _get_poller()
        for bell in self._doorbells:
            if poller is not None:
                poller.unregister(bell)
        self._doorbells = []

    def stop(self) -> None:
        """Stop accepting, from any thread and never waiting (`close` then joins the thread
        and closes the sockets)."""
        with self._start_lock:
            self._closed = True
            self._disarm()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop the handshakes in progress and join the listener thread
        (waiting at most `timeout` seconds), then close the listening sockets."""
        self.stop()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for sock in (self.sock, self.local_sock, self._wake_w):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread.ident is None:  # never started: nothing else will close these
            self._sel.close()
            self._wake_r.close()

    # -- the listener thread --
    def _run(self) -> None:
        try:
            self._sel.register(self._wake_r, None)
            self._set_accepting(True)
            while not self._closed:
                try:
                    self._step()
                except BaseException:  # the listener must outlive any bug or surprise
                    if self._closed:
                        break
                    log.exception("pydist: internal error in the listener (it goes on)")
                    time.sleep(0.05)  # never spin on an error that repeats
        finally:
            for p in list(self._pending.values()):
                self._forget(p)
            self._sel.close()
            self._wake_r.close()

    def _step(self) -> None:
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._set_accepting(True)
        timeout = self._run_timers(now)
        for sock, data in self._sel.select(timeout):
            if self._closed:
                return
            if data is None:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            elif isinstance(data, str):
                if self._accepting:  # not paused earlier in this batch
                    self._accept(sock)
            elif data.state in (_HELLO, _PROOF) and data.sock.fileno() >= 0:
                self._readable(data)  # (not dropped earlier in this batch)

    def _run_timers(self, now: float) -> float | None:
        """Refuse handshakes past their deadline, check parked proofs whose turn has come,
        send due DENIED verdicts; return how long the selector may sleep."""
        next_at = self._paused_until or None
        for p in list(self._pending.values()):
            if p.state == _DENIED and p.wake_at <= now:
                try:
                    p.sock.send(protocol.VERDICT_DENIED)
                except OSError:
                    pass
                self._refuse(p, p.error)
                continue
            if p.state != _DENIED and p.deadline <= now:
                self._refuse(p, ProtocolError(
                    f"handshake: not completed within {self._timeout} seconds"))
                continue
            if p.state == _PARKED and p.wake_at <= now:
                self._check(p, now)
            if p.sock.fileno() < 0:  # done (accepted)
                continue
            due = p.wake_at if p.state in (_PARKED, _DENIED) else p.deadline
            next_at = due if next_at is None else min(next_at, due)
        if len(self._penalty) > 4096:
            self._penalty = {k: t for k, t in self._penalty.items() if t > now}
        return None if next_at is None else max(next_at - now, 0.0)

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        for sock in self._listening:
            if on:
                self._sel.register(sock, "listen")
            else:
                self._sel.unregister(sock)
        self._accepting = on

    def _accept(self, lsock: Any) -> None:
        for _ in range(64):  # a batch at a time, so that handshakes in progress go on
            try:
                fd, addr = lsock._accept()  # (`accept` without its enum steps)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM...: pause, do not spin
                self._backoff = min(max(2 * self._backoff, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                if self._backoff == ACCEPT_BACKOFF_MIN:  # once per episode
                    log.warning("pydist: cannot accept connections (%s); retrying every "
                                "%g s at most until it works again", e, ACCEPT_BACKOFF_MAX)
                self._set_accepting(False)
                self._paused_until = time.monotonic() + self._backoff
                return
            if self._backoff:
                log.warning("pydist: accepting connections again")
                self._backoff = 0.0
            try:
                client = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                self._begin(client, addr)
            except BaseException:
                client.close()
                raise

    def _begin(self, client: socket.socket, addr) -> None:
        if len(self._pending) >= MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self._pending.values()))
            self._refuse(oldest, ProtocolError(
                f"handshake: dropped, {MAX_PENDING_HANDSHAKES} handshakes in progress"))
        client.setblocking(False)
        tune_socket(client)
        p = _Pending(client, addr or "a local process", _source_of(client, addr),
                     time.monotonic() + self._timeout)
        self._pending[client.fileno()] = p
        self._sel.register(client, p)

    def _readable(self, p: _Pending) -> None:
        try:
            data = p.sock.recv(p.want - len(p.buf))  # never more: what follows is not ours
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._refuse(p, e)
            return
        if not data:
            what = "HELLO" if p.state == _HELLO else "PROOF"
            self._refuse(p, ProtocolError(f"handshake: connection closed by peer while reading {what}"))
            return
        p.buf += data
        if len(p.buf) < p.want:
            return
        try:
            if p.state == _HELLO:
                version, p.nonce_i = protocol.decode_hello(p.buf)
                p.nonce_a = protocol.new_nonce()
                self._send(p, protocol.encode_challenge(p.nonce_a))
                if version != protocol.PROTOCOL_VERSION:
                    raise AuthenticationError(f"handshake: peer speaks protocol version {version}, "
                                              f"we speak {protocol.PROTOCOL_VERSION}")
                p.state, p.want, p.buf = _PROOF, protocol.PROOF_LEN, b""
                return
            self._sel.unregister(p.sock)  # nothing more is read before the verdict
            now = time.monotonic()
            turn = self._penalty.get(p.source, 0.0)
            if turn > now:  # this source failed lately: its proofs wait their turn
                p.state, p.wake_at = _PARKED, turn
                self._penalty[p.source] = turn + HANDSHAKE_FAIL_INTERVAL
            else:
                self._check(p, now)
        except (ProtocolError, OSError) as e:
            self._refuse(p, e)

    def _check(self, p: _Pending, now: float) -> None:
        """Verify a proof: accept at once, or answer DENIED after HANDSHAKE_FAIL_DELAY."""
        try:
            protocol.check_proof(self._cookie(), p.buf, p.nonce_i, p.nonce_a)
        except AuthenticationError as e:
            self._penalty[p.source] = max(self._penalty.get(p.source, 0.0),
                                          now + HANDSHAKE_FAIL_INTERVAL)
            p.state, p.wake_at, p.error = _DENIED, now + HANDSHAKE_FAIL_DELAY, e
            return
        try:
            self._send(p, protocol.encode_accept(self._cookie(), p.nonce_i, p.nonce_a))
        except (ProtocolError, OSError) as e:
            self._refuse(p, e)
            return
        del self._pending[p.sock.fileno()]
        sock, p.sock = p.sock, _DONE  # type: ignore[assignment]
        try:
            sock.setblocking(True)
            self._on_connection(sock)
        except Exception:
            log.exception("pydist: error setting up the connection from %s", p.addr)
            sock.close()

    @staticmethod
    def _send(p: _Pending, data: bytes) -> None:
        # An acceptor sends at most 107 bytes in all: a fresh socket's buffer takes them.
        if p.sock.send(data) != len(data):
            raise ProtocolError("handshake: peer does not read")

    def _forget(self, p: _Pending) -> None:
        """Stop watching `p` and close its socket."""
        self._pending.pop(p.sock.fileno(), None)
        if p.state in (_HELLO, _PROOF):
            try:
                self._sel.unregister(p.sock)
            except (KeyError, ValueError):
                pass
        p.sock.close()
        p.state = _DENIED

    def _refuse(self, p: _Pending, why) -> None:
        self._forget(p)
        now = time.monotonic()
        if now - self._last_refusal_log < REFUSAL_LOG_INTERVAL:
            self._unlogged_refusals += 1
            return
        more = self._unlogged_refusals
        log.warning("pydist: refused connection from %s: %s%s", p.addr, why,
                    f" (and {more} more since the last report)" if more else "")
        self._last_refusal_log, self._unlogged_refusals = now, 0


class _Done:
    """Stands for the socket of a handshake that has succeeded (handed to its connection)."""

    @staticmethod
    def fileno() -> int:
        return -1


_DONE = _Done()


def _source_of(client: socket.socket, addr):
    """Who is connecting, for rate-limiting wrong proofs: an IPv4 address, an IPv6 /64
    (one host has many addresses), or the user id of a local Unix-socket peer."""
    try:
        family = family_of(client)
        if family == socket.AF_INET:
            return addr[0]
        if family == socket.AF_INET6:
            packed = socket.inet_pton(socket.AF_INET6, addr[0].partition("%")[0])
            return packed if packed.startswith(b"\0" * 10 + b"\xff\xff") else packed[:8]
        if family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
            cred = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return ("uid", struct.unpack("3i", cred)[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def connect(host: str, port: int, cookie: bytes, timeout: float) -> socket.socket:
    """Open a connection (see `open_connection`) and authenticate it (as initiator)."""
    sock = open_connection(host, port, cookie, timeout)
    try:
        tune_socket(sock)
        handshake_initiator(sock, cookie, timeout)
    except BaseException:
        sock.close()
        raise
    return sock
