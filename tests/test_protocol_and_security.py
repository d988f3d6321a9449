"""The wire protocol and its security: frames, the decoder under hostile input, the cookie
handshake, and a real worker facing unauthenticated, wrongly authenticated and slow clients;
plus what happens to values that cannot be pickled or unpickled.

Sections 1-3 are sans-IO (no sockets, or a local socketpair); sections 4-5 talk to real worker
processes started by the fixtures in conftest.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import pickle
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pydist
from pydist import protocol, serialization, transport
from pydist.calls import SLOTS
from pydist.group import PGRP

from conftest import recv_exact

# ============================================================================ helpers

STAGING = 256 * 1024  # FrameDecoder's default staging buffer
LARGE = STAGING + 44 * 1024 + 7  # bigger than the staging buffer
_rng = random.Random(20240611)
SMALL_BODY = _rng.randbytes(57)
LARGE_BODY = _rng.randbytes(LARGE)
LARGE_BUF = _rng.randbytes(LARGE + 13)

ALL_KINDS = sorted(protocol.KIND_NAMES)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def frame_bytes(kind, body=b"", buffers=(), a=0, b=0, c=0, flags=0) -> bytes:
    return b"".join(bytes(ch) for ch in protocol.encode_frame(kind, body, buffers, a=a, b=b, c=c, flags=flags))


def flags_for(kind: int) -> int:
    if kind == protocol.RESULT:
        return protocol.FLAG_ERROR
    if kind == protocol.PUSH:
        return protocol.FLAG_NOVALUE
    return 0


def as_tuple(msg: protocol.Message) -> tuple:
    assert isinstance(msg, protocol.Message)
    return (msg.kind, msg.flags, msg.a, msg.b, msg.c, bytes(msg.body), [bytes(x) for x in msg.buffers])


def spec_tuple(kind, body=b"", buffers=(), a=0, b=0, c=0, flags=0) -> tuple:
    return (kind, flags, a, b, c, bytes(body), [bytes(x) for x in buffers])


def pump(dec: protocol.FrameDecoder, data: bytes, chunk_sizes=(1 << 30,)) -> list:
    """Write `data` into the decoder through its buffer interface (get_buffer/buffer_updated),
    in chunks whose sizes cycle through `chunk_sizes`; return the messages. Fails instead of
    spinning if the decoder ever offers an empty buffer (that would hang a real reader)."""
    out = []
    mv = memoryview(data)
    i = 0
    while mv.nbytes:
        buf = dec.get_buffer()
        assert buf.nbytes > 0, "decoder offered an empty buffer: a reader would spin forever"
        n = min(buf.nbytes, mv.nbytes, chunk_sizes[i % len(chunk_sizes)])
        i += 1
        buf[:n] = mv[:n]
        dec.buffer_updated(n)
        mv = mv[n:]
        while (m := dec.next_message()) is not None:
            out.append(m)
    return out


def assert_stays_broken(dec: protocol.FrameDecoder) -> None:
    """Once a decoder has raised ProtocolError, every further use raises it again."""
    with pytest.raises(pydist.ProtocolError):
        dec.feed(b"\xd7")
    with pytest.raises(pydist.ProtocolError):
        dec.feed(frame_bytes(protocol.CALL, b"fine"))
    with pytest.raises(pydist.ProtocolError):
        dec.get_buffer()


def header(kind=protocol.CALL, flags=0, nbufs=0, body_len=0, a=0, b=0, c=0, magic=protocol.FRAME_MAGIC) -> bytes:
    return struct.pack("<2sBBIQqqq", magic, kind, flags, nbufs, body_len, a, b, c)


# ============================================================================ 1. frames

BODIES = {"empty": b"", "small": SMALL_BODY, "large": LARGE_BODY}
BUFFER_SETS = {
    "no-buffers": [],
    "one-buffer": [b"\x01\x02\x03oob"],
    "several-buffers": [b"", _rng.randbytes(1000), b"", LARGE_BUF, bytearray(b"tail"), b""],
}


@pytest.mark.parametrize("bufs_name", list(BUFFER_SETS))
@pytest.mark.parametrize("body_name", list(BODIES))
@pytest.mark.parametrize("kind", ALL_KINDS, ids=[protocol.KIND_NAMES[k] for k in ALL_KINDS])
def test_frame_round_trip_every_kind(kind, body_name, bufs_name):
    body, bufs = BODIES[body_name], BUFFER_SETS[bufs_name]
    ids = dict(a=INT64_MAX, b=INT64_MIN, c=-1)
    data = frame_bytes(kind, body, bufs, flags=flags_for(kind), **ids)
    want = spec_tuple(kind, body, bufs, flags=flags_for(kind), **ids)
    # all at once, with feed()
    dec = protocol.FrameDecoder()
    msgs = dec.feed(data)
    assert [as_tuple(m) for m in msgs] == [want]
    assert dec.pending_bytes == 0
    assert dec.next_message() is None
    # through the buffer interface, in odd-sized chunks, and then a second identical frame
    msgs = pump(dec, data + data, chunk_sizes=(1, 7, 4093, 65536, 3))
    assert [as_tuple(m) for m in msgs] == [want, want]
    assert all(isinstance(x, bytearray) or isinstance(x, bytes) for m in msgs for x in m.buffers)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=[protocol.KIND_NAMES[k] for k in ALL_KINDS])
def test_frame_round_trip_byte_by_byte(kind):
    specs = [
        dict(kind=kind),
        dict(kind=kind, body=b"x", a=1, b=2, c=3),
        dict(kind=kind, body=SMALL_BODY, buffers=[b"one"], flags=flags_for(kind)),
        dict(kind=kind, body=b"", buffers=[b"", b"ab", b"", b"cdef"], a=-5),
    ]
    data = b"".join(frame_bytes(**s) for s in specs)
    dec = protocol.FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(dec.feed(data[i : i + 1]))
    assert [as_tuple(m) for m in got] == [spec_tuple(**s) for s in specs]
    assert dec.pending_bytes == 0


frame_specs = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(ALL_KINDS),
        "flags": st.sampled_from([0, protocol.FLAG_ERROR, protocol.FLAG_NOVALUE, 3]),
        "a": st.integers(INT64_MIN, INT64_MAX),
        "b": st.integers(INT64_MIN, INT64_MAX),
        "c": st.integers(INT64_MIN, INT64_MAX),
        "body": st.binary(max_size=400),
        "buffers": st.lists(st.binary(max_size=300), max_size=6),
    }
)


@FUZZ
@given(
    specs=st.lists(frame_specs, min_size=1, max_size=4),
    chunks=st.lists(st.integers(1, 97), min_size=1, max_size=20),
    staging=st.sampled_from([protocol.HEADER_LEN, 41, 64, 100, 1024, STAGING]),
    use_feed=st.booleans(),
)
def test_frame_round_trip_random_splits(specs, chunks, staging, use_feed):
    """Any sequence of frames, cut anywhere, with any staging size, decodes to the same
    messages in order (small staging sizes force the in-place and grow paths)."""
    data = b"".join(frame_bytes(**s) for s in specs)
    dec = protocol.FrameDecoder(staging_size=staging)
    if use_feed:
        got, pos, i = [], 0, 0
        while pos < len(data):
            n = chunks[i % len(chunks)]
            got.extend(dec.feed(data[pos : pos + n]))
            pos, i = pos + n, i + 1
    else:
        got = pump(dec, data, chunks)
    assert [as_tuple(m) for m in got] == [spec_tuple(**s) for s in specs]
    assert dec.pending_bytes == 0


def test_back_to_back_frames_in_one_feed():
    specs = [
        dict(kind=protocol.CALL_FETCH, body=b"first", a=1),
        dict(kind=protocol.RESULT, body=LARGE_BODY, a=1, flags=protocol.FLAG_ERROR),
        dict(kind=protocol.PUSH, a=7, b=8, flags=protocol.FLAG_NOVALUE),
        dict(kind=protocol.REFS, body=b"r", buffers=[LARGE_BUF, b""]),
        dict(kind=protocol.EXIT),
        dict(kind=protocol.IDENTIFY, a=42),
    ]
    data = b"".join(frame_bytes(**s) for s in specs)
    dec = protocol.FrameDecoder()
    got = dec.feed(data)
    assert [as_tuple(m) for m in got] == [spec_tuple(**s) for s in specs]
    # and everything it completed is handed out once only
    assert dec.next_message() is None and dec.feed(b"") == []


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_an_idle_decoder_commits_no_memory_for_its_staging_buffer():
    """Every connection has a decoder with a 256 KB receive buffer: it costs memory only as
    data reaches it (1,000 connections of small frames must not hold 256 MB)."""
    before = _resident_bytes()
    decoders = [protocol.FrameDecoder() for _ in range(200)]
    grown = _resident_bytes() - before
    assert grown < 200 * 256 * 1024 // 4, f"{grown / 2**20:.1f} MB for 200 idle decoders"
    frame = frame_bytes(protocol.CALL, b"small", a=1)
    for dec in decoders[:3]:  # and they decode as before
        assert [as_tuple(m) for m in dec.feed(frame * 3)] == [
            spec_tuple(kind=protocol.CALL, body=b"small", a=1)] * 3


def test_frame_with_many_zero_length_buffers_round_trips():
    """A frame may carry many empty out-of-band buffers (well under max_buffers=65536)."""
    n = 5000
    data = frame_bytes(protocol.CALL, b"body", [b""] * n, a=3)
    dec = protocol.FrameDecoder(max_message=1 << 20)
    msgs = dec.feed(data)  # pydist bug: RecursionError (one recursion level per empty buffer)
    assert len(msgs) == 1
    assert msgs[0].body == b"body" and msgs[0].a == 3
    assert len(msgs[0].buffers) == n and all(len(x) == 0 for x in msgs[0].buffers)


def test_large_buffer_is_received_in_place():
    """While a big out-of-band buffer is arriving, get_buffer() is a view of its final
    allocation: the bytes are received straight into the message's bytearray, never copied."""
    data = frame_bytes(protocol.CALL, b"small body", [LARGE_BUF], a=9)
    head_len = len(data) - len(LARGE_BUF)
    dec = protocol.FrameDecoder()
    assert dec.feed(data[: head_len + 1000]) == []
    view = dec.get_buffer()
    target = view.obj
    assert isinstance(target, bytearray) and len(target) == len(LARGE_BUF)
    assert view.nbytes == len(LARGE_BUF) - 1000  # the unfilled tail of the final allocation
    assert bytes(target[:1000]) == LARGE_BUF[:1000]
    # receive the rest as a socket would, in two recv_into calls straight into the view
    rest = memoryview(LARGE_BUF)[1000:]
    half = rest.nbytes // 2
    view[:half] = rest[:half]
    dec.buffer_updated(half)
    assert dec.next_message() is None
    view2 = dec.get_buffer()
    assert view2.obj is target and view2.nbytes == rest.nbytes - half
    view2[:] = rest[half:]
    dec.buffer_updated(view2.nbytes)
    msg = dec.next_message()
    assert msg is not None and msg.body == b"small body" and msg.a == 9
    assert len(msg.buffers) == 1 and msg.buffers[0] is target
    assert target == LARGE_BUF
    assert dec.next_message() is None


def test_large_body_is_received_in_place():
    data = frame_bytes(protocol.RESULT, LARGE_BODY, a=5)
    head_len = len(data) - len(LARGE_BODY)
    dec = protocol.FrameDecoder()
    assert dec.feed(data[: head_len + 10]) == []
    view = dec.get_buffer()
    target = view.obj
    assert isinstance(target, bytearray) and len(target) == len(LARGE_BODY)
    assert view.nbytes == len(LARGE_BODY) - 10
    view[:] = LARGE_BODY[10:]
    dec.buffer_updated(view.nbytes)
    msg = dec.next_message()
    assert msg is not None and msg.body is target and target == LARGE_BODY


def test_encode_frame_does_not_copy_buffers():
    big = bytearray(LARGE_BUF)
    chunks = protocol.encode_frame(protocol.CALL, b"x", [big])
    assert isinstance(chunks[-1], memoryview) and chunks[-1].obj is big
    assert sum(memoryview(c).nbytes for c in chunks) == protocol.HEADER_LEN + 8 + 1 + len(big)


def test_numpy_array_round_trips_out_of_band():
    big = np.arange(300_000, dtype=np.float64).reshape(600, 500)  # 2.4 MB: out of band
    small = np.arange(100, dtype=np.int32)  # 400 bytes: stays in band
    value = {"big": big, "small": small, "tag": "payload"}
    body, bufs, ctx = serialization.dumps(value, dest=2)
    assert len(bufs) == 1 and bufs[0].nbytes == big.nbytes  # only the large array left the pickle
    assert len(body) < 10_000
    data = frame_bytes(protocol.RESULT, body, bufs, a=77)
    dec = protocol.FrameDecoder()
    msgs = pump(dec, data, chunk_sizes=(65536, 1, 100_000))
    assert len(msgs) == 1 and msgs[0].a == 77
    out = serialization.loads(msgs[0].body, msgs[0].buffers)
    assert out["tag"] == "payload"
    np.testing.assert_array_equal(out["big"], big)
    np.testing.assert_array_equal(out["small"], small)
    assert out["big"].dtype == big.dtype and out["big"].shape == big.shape
    assert out["big"].flags.writeable and out["small"].flags.writeable
    out["big"][0, 0] = -1.0  # writable, and backed by the received buffer itself (no copy)
    assert np.frombuffer(msgs[0].buffers[0], dtype=np.float64)[0] == -1.0


class _DumpsInside:
    """Pickles by calling `serialization.dumps` itself (a reducer that re-enters it)."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        body, bufs, _ = serialization.dumps(self.value, oob=False)
        return (pickle.loads, (body,))


def test_reused_picklers_start_clean_every_time():
    """`dumps` reuses its picklers: nothing of one call (memo, buffers, context, a failure
    half-way) may leak into the next, re-entered or concurrent call."""
    big = np.arange(200_000, dtype=np.float64)
    with pytest.raises(TypeError):  # fails after the array went out of band
        serialization.dumps([big, threading.Lock()], dest=2)
    shared = ["shared"]
    body, bufs, ctx = serialization.dumps((shared, shared), dest=2)
    assert bufs == [] and ctx == {}
    a, b = serialization.loads(body)
    assert a == ["shared"] and a is b  # the memo works within a call...
    body2, _, _ = serialization.dumps((shared, shared), dest=2)
    assert body2 == body  # ...and starts empty in the next one
    body, bufs, _ = serialization.dumps({"x": _DumpsInside({"inner": [1, 2]}), "big": big})
    out = serialization.loads(body, bufs)
    assert out["x"] == {"inner": [1, 2]} and len(bufs) == 1
    np.testing.assert_array_equal(out["big"], big)

    errors: list = []

    def worker(k: int) -> None:
        try:
            for i in range(500):
                value = (k, i, [k] * (i % 7), np.full(3, i))
                body, bufs, _ = serialization.dumps(value, dest=2)
                got = serialization.loads(body, bufs)
                assert got[:3] == value[:3] and (got[3] == i).all()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)


# ============================================================================ 2. decoder robustness


def _feed_hostile(data: bytes, chunks=(1 << 30,)) -> None:
    """Feed hostile bytes: messages or ProtocolError, nothing else, never a spin."""
    dec = protocol.FrameDecoder(max_message=1 << 20)
    try:
        msgs = pump(dec, data, chunks)
    except pydist.ProtocolError:
        assert_stays_broken(dec)
        return
    assert all(isinstance(m, protocol.Message) and m.kind in protocol.KIND_NAMES for m in msgs)


@FUZZ
@given(data=st.binary(max_size=2000), chunks=st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_decoder_random_bytes(data, chunks):
    _feed_hostile(data, chunks)


@FUZZ
@given(
    kind=st.integers(0, 255),
    flags=st.integers(0, 255),
    nbufs=st.one_of(st.integers(0, 130), st.integers(0, (1 << 32) - 1)),
    body_len=st.one_of(st.integers(0, 2000), st.integers(0, (1 << 64) - 1)),
    tail=st.binary(max_size=1024),
    chunks=st.lists(st.integers(1, 300), min_size=1, max_size=8),
)
def test_decoder_random_headers(kind, flags, nbufs, body_len, tail, chunks):
    """A right magic and anything else: the structured part of the fuzzing."""
    _feed_hostile(header(kind, flags, nbufs, body_len, 1, 2, 3) + tail, chunks)


@FUZZ
@given(
    specs=st.lists(frame_specs, min_size=1, max_size=3),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    chunks=st.lists(st.integers(1, 120), min_size=1, max_size=8),
)
def test_decoder_corrupted_valid_frames(specs, edits, cut, chunks):
    """Valid frames with a few bytes changed and/or cut short."""
    data = bytearray(b"".join(frame_bytes(**s) for s in specs))
    for pos, val in edits:
        data[pos % len(data)] = val
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _feed_hostile(bytes(data), chunks)


@FUZZ
@given(specs=st.lists(frame_specs, min_size=1, max_size=3), cut=st.integers(0, 10_000))
def test_decoder_truncated_frames_give_exactly_the_complete_ones(specs, cut):
    frames = [frame_bytes(**s) for s in specs]
    data = b"".join(frames)
    cut %= len(data) + 1
    dec = protocol.FrameDecoder(max_message=1 << 20)
    got = dec.feed(data[:cut])  # a truncation is never an error, just an incomplete frame
    ends = np.cumsum([len(f) for f in frames])
    n_complete = int(np.sum(ends <= cut))
    assert [as_tuple(m) for m in got] == [spec_tuple(**s) for s in specs[:n_complete]]
    assert (dec.pending_bytes == 0) == (cut in (0, *ends.tolist()))
    # the rest completes them
    rest = dec.feed(data[cut:])
    assert [as_tuple(m) for m in got + rest] == [spec_tuple(**s) for s in specs]


BAD_HEADERS = {
    "bad-magic": header(magic=b"PY"),
    "bad-magic-swapped": header(magic=protocol.FRAME_MAGIC[::-1]),
    "unknown-kind-0": header(kind=0),
    "unknown-kind-14": header(kind=14),
    "unknown-kind-255": header(kind=255),
    "unknown-flag-4": header(flags=4),
    "unknown-flag-0x80": header(flags=0x80),
    "too-many-buffers": header(nbufs=protocol.DEFAULT_MAX_BUFFERS + 1),
    "uint32-max-buffers": header(nbufs=(1 << 32) - 1),
    "body-over-max-message": header(body_len=(1 << 20) + 1),
    "body-uint64-max": header(body_len=(1 << 64) - 1),
    # the buffer lengths, not the body, go over the limit (caught once the lengths are read)
    "buffers-over-max-message": header(nbufs=2, body_len=10)
    + struct.pack("<QQ", 1 << 19, (1 << 19) + 1),
    "buffer-uint64-max": header(nbufs=1) + struct.pack("<Q", (1 << 64) - 1),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_decoder_rejects_bad_header_at_once(name):
    """Rejected as soon as the header (and buffer lengths) arrive: no waiting for a body that
    will never come, no allocation of what it claims."""
    dec = protocol.FrameDecoder(max_message=1 << 20)
    with pytest.raises(pydist.ProtocolError):
        dec.feed(BAD_HEADERS[name])
    assert_stays_broken(dec)


def test_decoder_rejects_bad_frame_after_a_good_one():
    good = frame_bytes(protocol.CALL, b"ok", a=1)
    dec = protocol.FrameDecoder(max_message=1 << 20)
    assert [m.a for m in dec.feed(good)] == [1]
    with pytest.raises(pydist.ProtocolError):
        dec.feed(header(kind=99))
    assert_stays_broken(dec)


def test_decoder_max_buffers_is_configurable():
    dec = protocol.FrameDecoder(max_buffers=3)
    assert len(dec.feed(frame_bytes(protocol.CALL, b"", [b"a", b"b", b"c"]))[0].buffers) == 3
    with pytest.raises(pydist.ProtocolError, match="buffers"):
        dec.feed(frame_bytes(protocol.CALL, b"", [b"a", b"b", b"c", b"d"]))


# ============================================================================ 3. handshake, pure

COOKIE = b"the-real-cluster-cookie-0123456789"


def _exchange(init_cookie: bytes, acc_cookie: bytes):
    """Run the handshake messages in order; return them (raises where a side would refuse)."""
    nonce_i = protocol.new_nonce()
    hello = protocol.encode_hello(nonce_i)
    version, got_nonce_i = protocol.decode_hello(hello)
    assert version == protocol.PROTOCOL_VERSION and got_nonce_i == nonce_i
    nonce_a = protocol.new_nonce()
    challenge = protocol.encode_challenge(nonce_a)
    assert len(challenge) == protocol.CHALLENGE_LEN
    assert protocol.decode_challenge(challenge) == nonce_a
    proof = protocol.encode_proof(init_cookie, nonce_i, nonce_a)
    assert len(proof) == protocol.PROOF_LEN
    protocol.check_proof(acc_cookie, proof, got_nonce_i, nonce_a)
    accept = protocol.encode_accept(acc_cookie, got_nonce_i, nonce_a)
    assert len(accept) == protocol.ACCEPT_LEN
    protocol.check_accept(init_cookie, accept, nonce_i, nonce_a)
    return hello, challenge, proof, accept, nonce_i, nonce_a


def test_handshake_success():
    hello, challenge, proof, accept, nonce_i, nonce_a = _exchange(COOKIE, COOKIE)
    assert len(hello) == protocol.HELLO_LEN and hello.startswith(protocol.HANDSHAKE_MAGIC)
    assert nonce_i != nonce_a and len(nonce_i) == len(nonce_a) == protocol.NONCE_LEN
    # fresh nonces each time: nothing of one exchange is reusable in the next
    hello2, challenge2, proof2, accept2, *_ = _exchange(COOKIE, COOKIE)
    assert hello2 != hello and challenge2 != challenge and proof2 != proof and accept2 != accept


def test_challenge_carries_nothing_derived_from_the_cookie():
    """The acceptor speaks before the initiator has proved anything: its CHALLENGE must be
    the same whatever the cookie (magic, version, the nonce and zero padding)."""
    nonce_a = protocol.new_nonce()
    challenge = protocol.encode_challenge(nonce_a)
    assert challenge == struct.pack("<8sH32s32x", protocol.HANDSHAKE_MAGIC,
                                    protocol.PROTOCOL_VERSION, nonce_a)


def test_handshake_acceptor_rejects_wrong_cookie_proof():
    nonce_i, nonce_a = protocol.new_nonce(), protocol.new_nonce()
    bad_proof = protocol.encode_proof(b"wrong", nonce_i, nonce_a)
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_proof(COOKIE, bad_proof, nonce_i, nonce_a)
    for junk in (b"", b"\x00" * protocol.PROOF_LEN, bad_proof[:-1], bad_proof + b"\x00"):
        with pytest.raises(pydist.AuthenticationError):
            protocol.check_proof(COOKIE, junk, nonce_i, nonce_a)


def test_handshake_initiator_rejects_acceptor_with_wrong_cookie():
    nonce_i, nonce_a = protocol.new_nonce(), protocol.new_nonce()
    accept = protocol.encode_accept(b"wrong", nonce_i, nonce_a)
    with pytest.raises(pydist.AuthenticationError, match="cookie"):
        protocol.check_accept(COOKIE, accept, nonce_i, nonce_a)
    # an ACCEPT made for another handshake (replayed) is refused too
    other = protocol.encode_accept(COOKIE, protocol.new_nonce(), nonce_a)
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_accept(COOKIE, other, nonce_i, nonce_a)
    with pytest.raises(pydist.AuthenticationError, match="rejected"):
        protocol.check_accept(COOKIE, protocol.VERDICT_DENIED, nonce_i, nonce_a)


def test_handshake_proofs_are_bound_to_nonces_and_roles():
    _, challenge, proof, accept, nonce_i, nonce_a = _exchange(COOKIE, COOKIE)
    # replay of an old proof against a new challenge
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_proof(COOKIE, proof, nonce_i, protocol.new_nonce())
    # reflection: the acceptor's MAC is not a valid initiator proof, nor the other way round
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_proof(COOKIE, accept[protocol.VERDICT_LEN:], nonce_i, nonce_a)
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_accept(COOKIE, protocol.VERDICT_OK + proof, nonce_i, nonce_a)
    # swapped nonces do not verify either
    with pytest.raises(pydist.AuthenticationError):
        protocol.check_proof(COOKIE, proof, nonce_a, nonce_i)


def test_handshake_wrong_protocol_version_is_reported():
    nonce = protocol.new_nonce()
    other = protocol.PROTOCOL_VERSION + 1
    hello = struct.pack("<8sH32s", protocol.HANDSHAKE_MAGIC, other, nonce)
    assert protocol.decode_hello(hello) == (other, nonce)  # the acceptor learns the version
    challenge = struct.pack("<8sH32s32x", protocol.HANDSHAKE_MAGIC, other, protocol.new_nonce())
    with pytest.raises(pydist.AuthenticationError, match="version"):
        protocol.decode_challenge(challenge)
    # a version-1 acceptor's CHALLENGE (it carried a MAC) reads as a version mismatch too
    v1 = struct.pack("<8sH32s32s", protocol.HANDSHAKE_MAGIC, 1, nonce, hmac_v1(COOKIE, nonce, nonce))
    with pytest.raises(pydist.AuthenticationError, match="version 1"):
        protocol.decode_challenge(v1)


def hmac_v1(cookie: bytes, nonce_i: bytes, nonce_a: bytes) -> bytes:
    """Protocol version 1's acceptor MAC, sent in its CHALLENGE before any proof."""
    return hmac.new(cookie, b"acceptor" + nonce_i + nonce_a, hashlib.sha256).digest()


@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * protocol.HELLO_LEN,
     b"pydist\r\n" + b"\x01\x00" + b"n" * 32, protocol.encode_hello(b"n" * 32) + b"!",
     protocol.encode_hello(b"n" * 32)[:-1]],
    ids=["empty", "one-byte", "http", "zeros", "lowercase-magic", "too-long", "too-short"],
)
def test_garbage_hello_raises_protocol_error(data):
    with pytest.raises(pydist.ProtocolError):
        protocol.decode_hello(data)


@FUZZ
@given(data=st.binary(max_size=100))
def test_handshake_decoders_fuzz(data):
    """Any bytes: a typed ProtocolError (or a valid parse), never struct.error etc."""
    try:
        version, nonce = protocol.decode_hello(data)
        assert data.startswith(protocol.HANDSHAKE_MAGIC) and len(data) == protocol.HELLO_LEN
        assert len(nonce) == protocol.NONCE_LEN
    except pydist.ProtocolError:
        pass
    with pytest.raises(pydist.ProtocolError):  # random bytes are never a valid CHALLENGE
        protocol.decode_challenge(data)
    with pytest.raises(pydist.ProtocolError):  # nor carry a valid MAC
        protocol.check_proof(COOKIE, data, b"n" * 32, b"m" * 32)
    with pytest.raises(pydist.ProtocolError):
        protocol.check_accept(COOKIE, data, b"n" * 32, b"m" * 32)


@FUZZ
@given(cookie=st.binary(min_size=16, max_size=64))
def test_cookie_never_appears_in_handshake_messages(cookie):
    assume(cookie.strip(b"\0"))  # an all-zero "cookie" is found in CHALLENGE's padding
    hello, challenge, proof, accept, _, _ = _exchange(cookie, cookie)
    for message in (hello, challenge, proof, accept, protocol.VERDICT_DENIED):
        assert cookie not in message
        assert cookie.hex().encode() not in message


def _run_pair(init_cookie: bytes, acc_cookie: bytes):
    """handshake_initiator / handshake_acceptor over a real local socketpair."""
    a, b = socket.socketpair()
    results: dict = {}

    def acceptor():
        try:
            transport.handshake_acceptor(b, acc_cookie, 5)
            results["acc"] = "ok"
        except BaseException as e:  # noqa: BLE001 - recorded for the assertions
            results["acc"] = e
        finally:
            b.close()

    t = threading.Thread(target=acceptor, daemon=True)
    t.start()
    try:
        transport.handshake_initiator(a, init_cookie, 5)
        results["init"] = "ok"
    except BaseException as e:  # noqa: BLE001
        results["init"] = e
    finally:
        a.close()
    t.join(10)
    assert not t.is_alive()
    return results["init"], results["acc"]


def test_transport_handshake_over_socketpair():
    assert _run_pair(COOKIE, COOKIE) == ("ok", "ok")
    for init_cookie, acc_cookie in ((b"wrong", COOKIE), (COOKIE, b"wrong")):
        t0 = time.monotonic()
        init, acc = _run_pair(init_cookie, acc_cookie)
        assert isinstance(init, pydist.AuthenticationError)  # DENIED
        assert isinstance(acc, pydist.AuthenticationError)  # the initiator's proof was wrong
        assert time.monotonic() - t0 >= 0.9 * transport.HANDSHAKE_FAIL_DELAY


# ============================================================================ 4. a real worker


def worker_address(pid: int) -> tuple[str, int]:
    host, port = PGRP.workers[pid].connect_at
    return host, int(port)


@pytest.fixture(params=["tcp", "unix"])
def via(request) -> str:
    """Which of a worker's two listening sockets a raw client uses: TCP, or its local Unix
    twin (transport.local_socket_name); both must refuse the same way."""
    return request.param


def raw_connect(pid: int, via: str = "tcp") -> socket.socket:
    if via == "unix":
        host, port = worker_address(pid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(transport.local_socket_name(host, port, pydist.cluster_cookie().encode()))
        return s
    s = socket.create_connection(worker_address(pid), timeout=5)
    s.settimeout(5)
    return s


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes; fails if it has not closed by `timeout`."""
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return got
        except socket.timeout:
            raise AssertionError(f"peer did not close the connection within {timeout}s") from None
        if not chunk:
            return got
        got += chunk


def touch_frame(path: pathlib.Path, sid: int = 1) -> bytes:
    """A well-formed CALL_FETCH frame whose call, if ever run, creates `path`."""
    body, bufs, ctx = serialization.dumps((pathlib.Path.touch, (path,), {}))
    data = frame_bytes(protocol.CALL_FETCH, body, bufs, a=sid)
    assert len(data) > protocol.HELLO_LEN
    return data


def assert_serves(pid: int) -> None:
    t0 = time.monotonic()
    assert pydist.remotecall_fetch(pydist.myid, pid) == pid
    assert time.monotonic() - t0 < 5


def test_worker_closes_on_random_bytes(two_workers, via):
    pid = two_workers[0]
    junk = os.urandom(64)
    while junk.startswith(protocol.HANDSHAKE_MAGIC[:2]):
        junk = os.urandom(64)
    with raw_connect(pid, via) as s:
        s.sendall(junk)
        assert read_until_closed(s) == b""  # refused before any challenge was sent
    assert_serves(pid)


def test_worker_refuses_wrong_cookie(two_workers):
    pid = two_workers[0]
    host, port = worker_address(pid)
    with pytest.raises(pydist.AuthenticationError):
        transport.connect(host, port, b"wrong", 5)
    assert_serves(pid)


def test_worker_denies_wrong_cookie_proof_and_runs_nothing(two_workers, via, tmp_path):
    """A client that sends a proof made with a wrong cookie, then a call: the worker says no
    and never runs the call."""
    pid = two_workers[0]
    marker = tmp_path / "after-bad-proof"
    with raw_connect(pid, via) as s:
        nonce_i = protocol.new_nonce()
        s.sendall(protocol.encode_hello(nonce_i))
        nonce_a = protocol.decode_challenge(recv_exact(s, protocol.CHALLENGE_LEN))
        s.sendall(protocol.encode_proof(b"wrong", nonce_i, nonce_a))
        assert recv_exact(s, protocol.VERDICT_LEN) == protocol.VERDICT_DENIED
        try:
            s.sendall(touch_frame(marker))
        except OSError:
            pass
        assert read_until_closed(s) == b""
    assert_serves(pid)
    assert not marker.exists()


def test_worker_refuses_frame_before_handshake(two_workers, via, tmp_path):
    """A well-formed frame sent instead of HELLO is refused unread: nothing is unpickled
    before authentication."""
    pid = two_workers[0]
    marker = tmp_path / "pre-auth-call"
    with raw_connect(pid, via) as s:
        s.sendall(touch_frame(marker))
        assert read_until_closed(s) == b""
    assert_serves(pid)  # the worker has had time to run it, had it accepted it
    assert not marker.exists()


def test_worker_refuses_frame_instead_of_proof(two_workers, via, tmp_path):
    """Mid-handshake: a frame sent in place of the PROOF is refused too."""
    pid = two_workers[0]
    marker = tmp_path / "mid-handshake-call"
    with raw_connect(pid, via) as s:
        s.sendall(protocol.encode_hello(protocol.new_nonce()))
        recv_exact(s, protocol.CHALLENGE_LEN)
        try:
            s.sendall(touch_frame(marker))
        except OSError:
            pass
        assert read_until_closed(s) in (b"", protocol.VERDICT_DENIED)
    assert_serves(pid)
    assert not marker.exists()


def test_worker_refuses_other_protocol_version(two_workers, via):
    pid = two_workers[0]
    cookie = pydist.cluster_cookie().encode()
    with raw_connect(pid, via) as s:
        nonce_i = protocol.new_nonce()
        s.sendall(struct.pack("<8sH32s", protocol.HANDSHAKE_MAGIC, protocol.PROTOCOL_VERSION + 1, nonce_i))
        challenge = recv_exact(s, protocol.CHALLENGE_LEN)
        magic, version, nonce_a = struct.unpack("<8sH32s32x", challenge)  # it states its version
        assert version == protocol.PROTOCOL_VERSION
        try:  # even a correct proof does not get a peer of another version in
            s.sendall(protocol.encode_proof(cookie, nonce_i, nonce_a))
        except OSError:
            pass
        assert read_until_closed(s) == b""
    assert_serves(pid)


def test_slow_clients_do_not_block_the_worker(two_workers, via):
    """Clients that connect and send nothing (or half a HELLO) hold no lock the worker needs:
    calls keep being served and new peers can still authenticate."""
    pid = two_workers[0]
    host, port = worker_address(pid)
    idle = [raw_connect(pid, via) for _ in range(4)]
    partial = raw_connect(pid, via)
    partial.sendall(protocol.encode_hello(protocol.new_nonce())[:10])
    try:
        for _ in range(3):
            assert_serves(pid)
        t0 = time.monotonic()
        good = transport.connect(host, port, pydist.cluster_cookie().encode(), 5)
        good.close()
        assert time.monotonic() - t0 < 5
        assert_serves(two_workers[1])
    finally:
        for s in idle + [partial]:
            s.close()
    assert_serves(pid)


def test_right_cookie_authenticates_both_ways_and_calls_run(two_workers, tmp_path):
    """The positive control: with the right cookie, connect() succeeds, and the very frame the
    other tests send is then run and answered (so the refusals above are real refusals)."""
    pid = two_workers[0]
    host, port = worker_address(pid)
    marker = tmp_path / "authenticated-call"
    s = transport.connect(host, port, pydist.cluster_cookie().encode(), 5)
    try:
        s.settimeout(5)
        s.sendall(touch_frame(marker, sid=4242))
        dec = protocol.FrameDecoder(max_message=1 << 20)
        msgs: list = []
        while not msgs:
            chunk = s.recv(65536)
            assert chunk, "worker closed an authenticated connection"
            msgs = dec.feed(chunk)
        assert len(msgs) == 1
        reply = msgs[0]
        assert reply.kind == protocol.RESULT and reply.a == 4242 and reply.flags == 0
        assert serialization.loads(reply.body, reply.buffers) is None
    finally:
        s.close()
    assert marker.exists()
    assert_serves(pid)


# ============================================================================ 5. (un)picklable values


def _make_lock():
    return threading.Lock()


def _explode(message):
    raise ValueError(message)


class _ExplodesWhenUnpickled:
    def __reduce__(self):
        return (_explode, ("deliberate failure while unpickling",))


def _touch_with(path, _obj):
    pathlib.Path(path).touch()


def test_unpicklable_argument_raises_serialization_error(two_workers):
    pid = two_workers[0]
    conn = PGRP.workers[pid].conn
    slots_before = set(SLOTS)
    with pytest.raises(pydist.SerializationError) as ei:
        pydist.remotecall_fetch(pydist.myid, pid, threading.Lock())
    assert isinstance(ei.value, pickle.PicklingError)
    msg = str(ei.value)
    assert f"process {pid}" in msg or f"worker {pid}" in msg, msg
    assert set(SLOTS) == slots_before  # no reply slot leaked
    with pytest.raises(pydist.SerializationError):
        pydist.remotecall(pydist.myid, pid, threading.Lock())
    with pytest.raises(pydist.SerializationError):
        pydist.remote_do(pydist.myid, pid, threading.Lock())
    assert PGRP.workers[pid].conn is conn and not conn.closed  # the connection is intact
    assert_serves(pid)


def test_unpicklable_result_raises_remote_exception(two_workers):
    pid = two_workers[0]
    with pytest.raises(pydist.RemoteException) as ei:
        pydist.remotecall_fetch(_make_lock, pid)
    e = ei.value
    assert e.pid == pid
    assert str(e).startswith(f"On worker {pid}:")
    assert "pickl" in repr(e.captured.ex).lower()
    # pydist bug: str(e) is just "On worker N:\n" (the reason is lost)
    assert "pickl" in str(e).lower(), repr(str(e))
    assert_serves(pid)


def test_unpicklable_result_of_remotecall_future(two_workers):
    pid = two_workers[0]
    fut = pydist.remotecall(_make_lock, pid)
    with pytest.raises(pydist.RemoteException) as ei:
        fut.fetch(timeout=10)
    assert "pickl" in repr(ei.value.captured.ex).lower() or "pickl" in str(ei.value).lower()
    assert_serves(pid)


def test_call_that_cannot_be_unpickled_on_the_worker(two_workers, tmp_path):
    pid = two_workers[0]
    marker = tmp_path / "never-run"
    with pytest.raises(pydist.RemoteException) as ei:
        pydist.remotecall_fetch(_touch_with, pid, str(marker), _ExplodesWhenUnpickled())
    e = ei.value
    assert e.pid == pid
    assert "deliberate failure while unpickling" in str(e)
    assert isinstance(e.captured.ex, ValueError)
    assert not marker.exists()
    assert_serves(pid)
    # the same through remotecall: the Future carries the error, the worker goes on
    fut = pydist.remotecall(_touch_with, pid, str(marker), _ExplodesWhenUnpickled())
    with pytest.raises(pydist.RemoteException, match="deliberate failure while unpickling"):
        fut.fetch(timeout=10)
    assert not marker.exists()
    assert_serves(pid)
