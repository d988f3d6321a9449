"""The wire protocol, sans I/O: the cookie handshake, frame encoding and a frame decoder.

Nothing here touches a socket; `transport` moves the bytes. Everything a peer sends before it
has proved that it knows the cluster cookie is fixed-size binary, checked by `struct` and HMAC:
no pickle is involved until the handshake has succeeded.

Handshake (initiator = the side that connects), version 2:

    initiator -> HELLO     magic, version, nonce_i
    acceptor  -> CHALLENGE magic, version, nonce_a, 32 zero bytes (nothing derived from the cookie)
    initiator -> PROOF     HMAC(cookie, "pydist-2 initiator" | nonce_i | nonce_a)
    acceptor  -> ACCEPT    1, HMAC(cookie, "pydist-2 acceptor" | nonce_i | nonce_a)
              or DENIED    0 (after a delay), then it closes

The unauthenticated side proves first: the acceptor says nothing that depends on the cookie
until the initiator has proved it knows it, so nobody can collect MACs to attack a weak cookie
offline. Distinct labels keep one side's MAC from being reflected as the other's. The cookie
itself never crosses the wire. (The zero bytes make CHALLENGE as long as version 1's, so a
version-1 peer reads it whole and reports the version mismatch.)

Frame: a 40-byte header (magic, kind, flags, buffer count, body length, three int64 ids),
then one uint64 length per out-of-band buffer, then the pickled body, then the buffers.
A length with `SHARED` set is a buffer in the sender's shared-memory arena (`sharedmem`):
its low bits are the buffer's size, and the stream carries 16 bytes (slot, offset) instead.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import mmap
import os
import struct
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .exceptions import AuthenticationError, ProtocolError

PROTOCOL_VERSION = 2

# --- handshake -------------------------------------------------------------------------------

HANDSHAKE_MAGIC = b"PYDIST\r\n"
NONCE_LEN = 32
MAC_LEN = 32
_HELLO = struct.Struct("<8sH32s")
_CHALLENGE = struct.Struct("<8sH32s32x")
HELLO_LEN = _HELLO.size
CHALLENGE_LEN = _CHALLENGE.size
PROOF_LEN = MAC_LEN
VERDICT_LEN = 1
VERDICT_OK = b"\x01"
VERDICT_DENIED = b"\x00"
ACCEPT_LEN = VERDICT_LEN + MAC_LEN
_INITIATOR_LABEL = b"pydist-2 initiator"
_ACCEPTOR_LABEL = b"pydist-2 acceptor"


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


_hmac_new: Callable[..., Any] = hmac.new
try:  # OpenSSL's HMAC object itself: what `hmac.new` makes, without its five Python
    # functions (which each forked worker would run, so copy the template's pages of)
    import _hashlib

    _hmac_new = _hashlib.hmac_new
except ImportError:  # (a Python built without OpenSSL)
    pass


def _mac(cookie: bytes, label: bytes, nonce_i: bytes, nonce_a: bytes) -> bytes:
    return _hmac_new(cookie, label + nonce_i + nonce_a, digestmod=hashlib.sha256).digest()


def encode_hello(nonce_i: bytes) -> bytes:
    return _HELLO.pack(HANDSHAKE_MAGIC, PROTOCOL_VERSION, nonce_i)


def decode_hello(data: bytes) -> tuple[int, bytes]:
    """Return (version, nonce_i) of an initiator's HELLO; ProtocolError if it is not one."""
    if len(data) != HELLO_LEN:
        raise ProtocolError(f"handshake: expected {HELLO_LEN} bytes of HELLO, got {len(data)}")
    magic, version, nonce = _HELLO.unpack(data)
    if magic != HANDSHAKE_MAGIC:
        raise ProtocolError("handshake: not a pydist peer (bad magic in HELLO)")
    return version, nonce


def encode_challenge(nonce_a: bytes) -> bytes:
    """The acceptor's answer to HELLO: its version and a fresh nonce, nothing secret."""
    return _CHALLENGE.pack(HANDSHAKE_MAGIC, PROTOCOL_VERSION, nonce_a)


def decode_challenge(data: bytes) -> bytes:
    """Return nonce_a of the acceptor's CHALLENGE; ProtocolError if it is not one,
    AuthenticationError if the peer speaks another protocol version."""
    if len(data) != CHALLENGE_LEN:
        raise ProtocolError(f"handshake: expected {CHALLENGE_LEN} bytes of CHALLENGE, got {len(data)}")
    magic, version, nonce_a = _CHALLENGE.unpack(data)
    if magic != HANDSHAKE_MAGIC:
        raise ProtocolError("handshake: not a pydist peer (bad magic in CHALLENGE)")
    if version != PROTOCOL_VERSION:
        raise AuthenticationError(
            f"handshake: peer speaks pydist protocol version {version}, we speak {PROTOCOL_VERSION}"
        )
    return nonce_a


def encode_proof(cookie: bytes, nonce_i: bytes, nonce_a: bytes) -> bytes:
    """The initiator's proof that it knows the cookie (sent first, before the acceptor's)."""
    return _mac(cookie, _INITIATOR_LABEL, nonce_i, nonce_a)


def check_proof(cookie: bytes, data: bytes, nonce_i: bytes, nonce_a: bytes) -> None:
    """Verify the initiator's PROOF; AuthenticationError if it does not know the cookie."""
    if len(data) != PROOF_LEN or not hmac.compare_digest(
        data, _mac(cookie, _INITIATOR_LABEL, nonce_i, nonce_a)
    ):
        raise AuthenticationError("handshake: invalid connection credentials (wrong cluster cookie)")


def encode_accept(cookie: bytes, nonce_i: bytes, nonce_a: bytes) -> bytes:
    """The acceptor's verdict after a valid PROOF: OK and its own proof over both nonces."""
    return VERDICT_OK + _mac(cookie, _ACCEPTOR_LABEL, nonce_i, nonce_a)


def check_accept(cookie: bytes, data: bytes, nonce_i: bytes, nonce_a: bytes) -> None:
    """Verify the acceptor's ACCEPT (after its one-byte verdict); AuthenticationError if it
    denied us or does not know the cookie."""
    if data[:VERDICT_LEN] != VERDICT_OK:
        raise AuthenticationError("handshake: peer rejected our credentials (wrong cluster cookie)")
    if len(data) != ACCEPT_LEN or not hmac.compare_digest(
        data[VERDICT_LEN:], _mac(cookie, _ACCEPTOR_LABEL, nonce_i, nonce_a)
    ):
        raise AuthenticationError("handshake: peer does not know the cluster cookie")


# --- frames ----------------------------------------------------------------------------------

FRAME_MAGIC = b"\xd7\x1b"
_HEADER = struct.Struct("<2sBBIQqqq")
HEADER_LEN = _HEADER.size
_LEN = struct.Struct("<Q")

# Message kinds. The meaning of the three ids (a, b, c) is given for each.
CALL = 1  # remotecall: (a, b) = RRID of the Future that will hold the result
CALL_FETCH = 2  # remotecall_fetch and internal requests: a = reply id
REMOTE_DO = 3  # remote_do: no reply
RESULT = 4  # reply to CALL_FETCH or JOIN: a = reply id; FLAG_ERROR: body is a RemoteException
PUSH = 5  # a remotecall finished: (a, b) = RRID; body = the value, or nothing (FLAG_NOVALUE)
JOIN = 6  # master -> new worker: a = reply id; body: join parameters; answered by RESULT
IDENTIFY = 7  # worker -> worker, first message on a peer connection: a = sender pid
EXIT = 8  # master -> worker: exit now
REFS = 9  # batched reference-count deltas: body = [(whence, id, pid, delta), ...]
PING = 10  # heartbeat: are you there? (answered at once with PONG, by whoever reads)
PONG = 11  # heartbeat: the answer to PING (any bytes received count as a sign of life)
SHARE_OFFER = 12  # large buffers may come through shared memory: a = pid, b = fd, c = size;
#                   body: the arena's token
SHARE_ANSWER = 13  # reply to SHARE_OFFER: a = 1 (the arena is open) or 0 (never use it)

KIND_NAMES = {
    CALL: "CALL",
    CALL_FETCH: "CALL_FETCH",
    REMOTE_DO: "REMOTE_DO",
    RESULT: "RESULT",
    PUSH: "PUSH",
    JOIN: "JOIN",
    IDENTIFY: "IDENTIFY",
    EXIT: "EXIT",
    REFS: "REFS",
    PING: "PING",
    PONG: "PONG",
    SHARE_OFFER: "SHARE_OFFER",
    SHARE_ANSWER: "SHARE_ANSWER",
}

FLAG_ERROR = 1  # the body is a RemoteException
FLAG_NOVALUE = 2  # PUSH only: the call is done, its value stays on the owner
_KNOWN_FLAGS = FLAG_ERROR | FLAG_NOVALUE

# The largest frame (body plus buffers) a decoder accepts: a bound on garbage and on what a
# corrupt header can make us allocate, not on real data. PYDIST_MAX_FRAME overrides it (bytes).
DEFAULT_MAX_FRAME = 16 << 30
DEFAULT_MAX_BUFFERS = 1 << 16
SHARED = 1 << 63  # in a buffer length: the buffer is in the sender's arena (see above)
_SHARED_REF = struct.Struct("<QQ")  # what the stream carries for it: slot, offset
# Receive buffers at least this large are anonymous mappings: a fresh bytearray is zero-filled
# page by page first, which halves the bandwidth of a 100 MB transfer.
PREFAULT_THRESHOLD = 1 << 20
HUGE_THRESHOLD = 2 << 20
# A large receive buffer is faulted in this much at a time, ahead of the data (see `populate`):
# a first step of one huge page, which shows what huge pages cost here, then POPULATE_STEP.
FIRST_POPULATE_STEP = HUGE_THRESHOLD
POPULATE_STEP = 16 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_can_populate = hasattr(mmap.mmap, "madvise")
# Huge pages make a large receive buffer cheap to fault in (100 MB: ~10 ms of CPU, against
# ~35 for 4 KiB pages), unless fresh huge pages are slow to come by: on a VM whose host takes
# back the guest's free memory (virtio-balloon free page reporting, as on Firecracker), a
# huge page the host has taken back costs the host's page faults too, 0.3-0.5 GB/s (100 MB:
# ~250 ms), while 4 KiB pages cost what they always do; direct compaction on a fragmented
# machine has the same effect. So `populate` times the huge pages it faults in (CPU time of
# this thread: a busy machine does not count), and a buffer whose huge pages cost more than
# HUGE_SLOW_NS_PER_MB takes 4 KiB pages for the rest. Each buffer starts on huge pages
# again: memory freed a moment ago is still the host's, and its huge pages are cheap.
HUGE_SLOW_NS_PER_MB = 500_000  # 2 GB/s: what 4 KiB pages give (2.3-3.3 GB/s here)
_on_huge_pages: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()  # (and not proved slow)


def max_frame() -> int:
    """The frame size limit: `PYDIST_MAX_FRAME` (bytes) if set, else DEFAULT_MAX_FRAME."""
    value = os.environ.get("PYDIST_MAX_FRAME", "").strip()
    if not value:
        return DEFAULT_MAX_FRAME
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"PYDIST_MAX_FRAME must be a positive number of bytes, got {value!r}")
    return limit


def allocate(n: int):
    """A writable buffer of `n` bytes for received data (the final home of an array).

    Large buffers are anonymous mappings, on transparent huge pages where the kernel allows
    while they are cheap (see HUGE_SLOW_NS_PER_MB; a fresh `bytearray` is zero-filled page
    by page, which costs more than the transfer). Nothing is committed here: the decoder
    faults pages in as the data comes (`populate`), so a header announcing a huge body costs
    no memory until its bytes arrive."""
    if n >= PREFAULT_THRESHOLD:
        try:
            m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, AttributeError):
            return bytearray(n)
        if n >= HUGE_THRESHOLD and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
                _on_huge_pages.add(m)
            except OSError:
                pass
        return m
    return bytearray(n)


def populate(buf, start: int, end: int) -> None:
    """Fault in `buf[start:end]` of a mapping from `allocate` before data is received into
    it (100 MB on huge pages: ~9 ms this way against ~40 ms faulting page by page). On huge
    pages, timed: see HUGE_SLOW_NS_PER_MB."""
    global _can_populate
    if not _can_populate or not isinstance(buf, mmap.mmap) or start >= len(buf):
        return
    start -= start % mmap.PAGESIZE
    n = min(end, len(buf)) - start
    huge = buf in _on_huge_pages
    began = time.thread_time_ns() if huge else 0
    try:
        buf.madvise(_MADV_POPULATE_WRITE, start, n)
    except OSError as e:  # pages then fault in on first write
        if e.errno == errno.EINVAL:  # kernel older than 5.14: do not try again
            _can_populate = False
        return
    if huge and (time.thread_time_ns() - began) * (1 << 20) > HUGE_SLOW_NS_PER_MB * n:
        _on_huge_pages.discard(buf)  # huge pages are slow to come by: 4 KiB pages for the rest
        rest = start + n
        if rest < len(buf):
            try:
                buf.madvise(mmap.MADV_NOHUGEPAGE, rest, len(buf) - rest)
            except OSError:
                pass


def _staging_buffer(n: int):
    """A decoder's receive buffer: an anonymous mapping, whose pages the kernel provides as
    data first reaches them (a `bytearray` is zero-filled at once: 256 KB of page faults
    per connection, which a connection that only ever sees small frames never uses)."""
    if n >= 65536:
        try:
            return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, AttributeError):
            pass
    return bytearray(n)


@dataclass(slots=True)
class Message:
    """One decoded frame; `body` is still pickled (the caller decides when to unpickle)."""

    kind: int
    flags: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    body: bytes | bytearray | memoryview = b""
    buffers: list = field(default_factory=list)


def encode_frame(
    kind: int, body: bytes = b"", buffers=(), a: int = 0, b: int = 0, c: int = 0, flags: int = 0
) -> list:
    """The byte chunks of one frame, ready for `socket.sendmsg` (buffers are not copied)."""
    if not buffers:  # (most frames)
        head = _HEADER.pack(FRAME_MAGIC, kind, flags, 0, len(body), a, b, c)
        return [head + body] if len(body) < 16384 else [head, body]
    views = [buf if isinstance(buf, bytes) else memoryview(buf).cast("B") for buf in buffers]
    head = _HEADER.pack(FRAME_MAGIC, kind, flags, len(views), len(body), a, b, c)
    head += b"".join([_LEN.pack(len(v)) for v in views])
    if len(body) < 16384:
        return [head + body, *views]
    return [head, body, *views]


def buffer_count(chunks: list) -> int:
    """How many out-of-band buffers the frame made by `encode_frame` carries (its last
    chunks); 0 for a frame in one chunk."""
    if len(chunks) < 2:
        return 0
    return _HEADER.unpack_from(chunks[0])[3]


def mark_shared(head: bytearray, i: int, nbytes: int, slot: int, offset: int) -> bytes:
    """Mark buffer `i` of the frame whose first chunk is `head` as sent through the arena,
    in region (`slot`, `offset`); returns the chunk to send in place of its bytes."""
    _LEN.pack_into(head, HEADER_LEN + 8 * i, SHARED | nbytes)
    return _SHARED_REF.pack(slot, offset)


_S_HEADER, _S_LENGTHS, _S_BODY, _S_BUFFER = range(4)


class FrameDecoder:
    """Turns received bytes into `Message`s; raises ProtocolError on anything malformed.

    Use it like asyncio's BufferedProtocol: write received bytes into `get_buffer()` and report
    how many with `buffer_updated(n)`, then pop messages with `next_message()`. While a large
    body or out-of-band buffer is being received, `get_buffer()` returns the unfilled part of
    its final allocation, so big data is received in place, never copied. `feed(data)` is the
    copying convenience form.
    """

    def __init__(
        self,
        max_message: int | None = None,
        max_buffers: int = DEFAULT_MAX_BUFFERS,
        staging_size: int = 256 * 1024,
    ):
        self.max_message = max_frame() if max_message is None else max_message
        self.max_buffers = max_buffers
        self._staging = _staging_buffer(max(staging_size, 4 * HEADER_LEN))
        self._view = memoryview(self._staging)
        self._start = 0
        self._end = 0
        self._state = _S_HEADER
        self._msg: Message | None = None
        self._lengths: list[int] = []
        self._target: bytearray | None = None
        self._target_view: memoryview | None = None
        self._filled = 0
        self._populated = 0  # how much of the target has been faulted in
        self._direct = False
        self._ready: deque[Message] = deque()
        self._broken: ProtocolError | None = None
        # fn(slot, offset, nbytes) -> buffer: where buffers in the peer's arena come from
        # (set once the peer's SHARE_OFFER is accepted); `_shared` is the size of the one
        # whose reference is being received.
        self.resolve_shared: Callable[[int, int, int], Any] | None = None
        self._shared = 0

    # -- buffer interface --
    def get_buffer(self) -> memoryview:
        if self._broken is not None:
            raise self._broken
        if self._target_view is not None and self._start == self._end:
            self._direct = True
            if self._filled + POPULATE_STEP // 2 > self._populated < len(self._target):  # type: ignore[arg-type]
                step = POPULATE_STEP if self._populated else FIRST_POPULATE_STEP
                populate(self._target, self._populated, self._populated + step)
                self._populated += step
            return self._target_view[self._filled :]
        self._direct = False
        if self._end == len(self._staging):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._filled += nbytes
            if self._filled == len(self._target):  # type: ignore[arg-type]
                self._finish_target()
        else:
            self._end += nbytes
        try:
            self._process()
        except ProtocolError as e:
            self._broken = e
            raise

    def next_message(self) -> Message | None:
        return self._ready.popleft() if self._ready else None

    def has_message(self) -> bool:
        """A complete message is waiting (already received, not yet taken)."""
        return bool(self._ready)

    def feed(self, data: bytes) -> list[Message]:
        """Copy `data` in and return every message it completed."""
        mv = memoryview(data)
        while mv.nbytes:
            buf = self.get_buffer()
            n = min(buf.nbytes, mv.nbytes)
            buf[:n] = mv[:n]
            self.buffer_updated(n)
            mv = mv[n:]
        out, self._ready = list(self._ready), deque()
        return out

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame received so far (0 between frames)."""
        if self._state == _S_HEADER:
            return self._end - self._start
        return 1

    # -- internals --
    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._staging[:n] = self._staging[self._start : self._end]
            self._start, self._end = 0, n

    def _process(self) -> None:
        header = _HEADER.unpack_from
        while True:
            avail = self._end - self._start
            if self._state == _S_HEADER:
                if avail < HEADER_LEN:
                    return
                # Fast path: a frame without buffers whose body is all here (most frames).
                magic, kind, flags, nbufs, body_len, a, b, c = header(self._staging, self._start)
                if (not nbufs and avail - HEADER_LEN >= body_len and magic == FRAME_MAGIC
                        and kind in KIND_NAMES and not flags & ~_KNOWN_FLAGS):
                    start = self._start + HEADER_LEN
                    self._start = start + body_len
                    self._ready.append(
                        Message(kind, flags, a, b, c, bytes(self._view[start:self._start])))
                    if self._start == self._end:
                        self._start = self._end = 0
                    continue
                self._parse_header()
            elif self._state == _S_LENGTHS:
                need = 8 * len(self._lengths)
                if avail < need:
                    if need > len(self._staging) - self._start:
                        self._compact()
                        if need > len(self._staging):
                            self._grow(need)
                    return
                lengths = [
                    _LEN.unpack_from(self._staging, self._start + 8 * i)[0]
                    for i in range(len(self._lengths))
                ]
                self._start += need
                total = self._msg_body_len + sum([n & ~SHARED for n in lengths])
                if total > self.max_message:
                    raise ProtocolError(
                        f"frame of {total} bytes exceeds the limit of {self.max_message} bytes"
                        " (PYDIST_MAX_FRAME)"
                    )
                if self.resolve_shared is None and any([n & SHARED for n in lengths]):
                    raise ProtocolError("frame refers to shared memory the peer never offered")
                self._lengths = lengths
                self._begin_body()
            elif self._target is not None:
                if avail == 0:
                    return
                n = min(avail, len(self._target) - self._filled)
                self._target_view[self._filled : self._filled + n] = self._view[  # type: ignore[index]
                    self._start : self._start + n
                ]
                self._start += n
                self._filled += n
                if self._filled == len(self._target):
                    self._finish_target()
            else:
                return

    def _grow(self, need: int) -> None:
        new = bytearray(max(need, 2 * len(self._staging)))
        n = self._end - self._start
        new[:n] = self._staging[self._start : self._end]
        self._staging, self._view = new, memoryview(new)
        self._start, self._end = 0, n

    def _parse_header(self) -> None:
        magic, kind, flags, nbufs, body_len, a, b, c = _HEADER.unpack_from(
            self._staging, self._start
        )
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}: stream is out of sync or not pydist")
        if kind not in KIND_NAMES:
            raise ProtocolError(f"unknown message kind {kind}")
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"unknown frame flags {flags:#x}")
        if nbufs > self.max_buffers:
            raise ProtocolError(f"frame declares {nbufs} buffers, limit is {self.max_buffers}")
        if body_len > self.max_message:
            raise ProtocolError(f"frame body of {body_len} bytes exceeds the limit of "
                                f"{self.max_message} bytes (PYDIST_MAX_FRAME)")
        self._start += HEADER_LEN
        self._msg = Message(kind, flags, a, b, c)
        self._msg_body_len = body_len
        self._lengths = [0] * nbufs
        self._state = _S_LENGTHS if nbufs else _S_BODY
        if not nbufs:
            self._begin_body()

    def _begin_body(self) -> None:
        self._state = _S_BODY
        n = self._msg_body_len
        avail = self._end - self._start
        if avail >= n:  # small body, all here: one copy out of the staging buffer
            self._msg.body = bytes(self._view[self._start : self._start + n])  # type: ignore[union-attr]
            self._start += n
            self._next_buffer()
        else:
            self._set_target(allocate(n))

    def _set_target(self, target) -> None:
        self._target = target
        self._target_view = memoryview(target)
        self._filled = 0
        self._populated = 0

    def _finish_target(self) -> None:
        target = self._target
        self._target = None
        self._target_view = None
        if self._state == _S_BODY:
            self._msg.body = target  # type: ignore[union-attr]
        elif self._shared:
            self._msg.buffers.append(self._map_shared(target))  # type: ignore[union-attr,arg-type]
        else:
            self._msg.buffers.append(target)  # type: ignore[union-attr]
        self._next_buffer()

    def _next_buffer(self) -> None:
        """Start receiving the next out-of-band buffer, or emit the finished message."""
        i = len(self._msg.buffers)  # type: ignore[union-attr]
        while i < len(self._lengths) and self._lengths[i] == 0:
            self._msg.buffers.append(bytearray())  # type: ignore[union-attr]
            i += 1
        if i < len(self._lengths):
            self._state = _S_BUFFER
            n = self._lengths[i]
            if n & SHARED:
                self._shared = n & ~SHARED
                if not self._shared:
                    raise ProtocolError("frame refers to an empty buffer in shared memory")
                self._set_target(bytearray(_SHARED_REF.size))
            else:
                self._set_target(allocate(n))
        else:
            self._ready.append(self._msg)  # type: ignore[arg-type]
            self._msg = None
            self._state = _S_HEADER
            if self._start == self._end:
                self._start = self._end = 0

    def _map_shared(self, ref: bytearray):
        """The buffer a received (slot, offset) reference names in the peer's arena."""
        n, self._shared = self._shared, 0
        if self.resolve_shared is None:
            raise ProtocolError("frame refers to shared memory the peer never offered")
        slot, offset = _SHARED_REF.unpack(ref)
        try:
            return self.resolve_shared(slot, offset, n)
        except OSError as e:
            raise ProtocolError(f"could not read a {n}-byte buffer from the peer's shared "
                                f"memory: {e}") from e
