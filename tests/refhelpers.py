"""Worker-side helpers for test_refs.py, importable by name on every process (workers inherit
the master's sys.path, which conftest extends with this directory)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pydist
import pydist.refs

# Instances of Tracked alive in this process (observed through weak references only).
LIVE: "weakref.WeakSet[Tracked]" = weakref.WeakSet()
# References a test asked this process to keep, by key.
HELD: dict = {}


class Tracked:
    """A value whose lifetime a test can observe on the process that holds it."""

    def __init__(self, tag: str, payload: bytes = b""):
        self.tag = tag
        self.payload = payload
        LIVE.add(self)

    def __reduce__(self):  # unpickled copies are tracked too
        return (Tracked, (self.tag, self.payload))


def make_tracked(tag: str, size: int = 0) -> Tracked:
    """A Tracked carrying `size` bytes (over 64 KB: the worker keeps it until fetched)."""
    return Tracked(tag, bytes(size))


def live_tags() -> list[str]:
    """Tags of the Tracked objects alive here, after a full collection."""
    gc.collect()
    return sorted(t.tag for t in LIVE)


def has_ref(rrid) -> bool:
    """Is the value of `rrid` still kept in this process's reference store?"""
    return pydist.refs.RRID(*rrid) in pydist.refs.STORE.values


def client_counts(rrid) -> dict | None:
    rv = pydist.refs.STORE.values.get(pydist.refs.RRID(*rrid))
    return None if rv is None else dict(rv.clients)


def store_len() -> int:
    return len(pydist.refs.STORE)


def hold(key, obj) -> None:
    HELD[key] = obj


def held(key):
    return HELD[key]


def drop(key) -> None:
    HELD.pop(key, None)
    gc.collect()


def collect() -> None:
    gc.collect()


def fetch_and_drop(fut) -> int:
    """Fetch a Future passed in, and let it go at once; returns len of the value."""
    value = fut.fetch()
    n = len(value)
    del fut, value
    gc.collect()
    return n


def live_tags_on(pid: int) -> list[str]:
    """`live_tags()` of process `pid`, asked from here (over this process's own connection)."""
    return pydist.remotecall_fetch(live_tags, pid)


def ping(pid: int) -> int:
    """One round trip to `pid` (makes the lazy connection to it)."""
    return pydist.remotecall_fetch(pydist.myid, pid)


def bad_counts() -> list:
    """Entries of this process's store with a zero or negative client count."""
    with pydist.refs.STORE.lock:
        return [(tuple(r), dict(v.clients)) for r, v in pydist.refs.STORE.values.items()
                if any(n <= 0 for n in v.clients.values())]


def relay(fut, to_pid: int) -> int:
    """Hand `fut` on to `to_pid` (which keeps it), then fetch our own copy."""
    pydist.remotecall_wait(hold, to_pid, "relayed", fut)
    return len(fut.fetch())


def fetch_held(key, timeout=None):
    return HELD[key].fetch(timeout=timeout)


def len_of_held_fetch(key, timeout=None) -> int:
    return len(HELD[key].fetch(timeout=timeout))


def take_into(box, key) -> None:
    """Take a reference out of RemoteChannel `box` and keep it under `key` (the reference then
    lives only in HELD, not in the arguments of a call)."""
    HELD[key] = box.take(timeout=30)


def fetch_twice(fut) -> int:
    """Fetch a Future passed in twice (the second from the local cache); total length."""
    return len(fut.fetch()) + len(fut.fetch())


def fetch_within(fut, timeout: float):
    return fut.fetch(timeout=timeout)


def make_channel_here():
    """A RemoteChannel owned by this process (returned to the caller: the owner keeps a count
    for it)."""
    return pydist.RemoteChannel()


def make_future_here():
    return pydist.Future()


def put_into(chan, value) -> None:
    chan.put(value, 10)


def take_from(chan):
    return chan.take(10)


# What the quick form of a RemoteChannel operation (`calls.register_quick`) did here while
# `spy_quick_forms` is on: how often it did the call ("quick") or left it to a task ("task"),
# and which threads did the quick ones (thread ident -> count).
QUICK_COUNTS: dict = {"quick": 0, "task": 0}
QUICK_THREADS: dict = {}


def spy_quick_forms(on: bool) -> None:
    """Start (on, from zero) or stop (off) recording what the quick form does."""
    from pydist import calls, refs

    def recorded(reply, *args, **kwargs):
        done = refs.owner_op_now(reply, *args, **kwargs)
        QUICK_COUNTS["quick" if done else "task"] += 1
        if done:
            t = threading.get_ident()
            QUICK_THREADS[t] = QUICK_THREADS.get(t, 0) + 1
        return done

    QUICK_COUNTS.update(quick=0, task=0)
    QUICK_THREADS.clear()
    calls.register_quick(refs._owner_op, recorded if on else refs.owner_op_now)


def quick_counts() -> dict:
    return dict(QUICK_COUNTS)


# Takes that read a connection while they waited here (`Connection.read_until_woken`), while
# `count_reads_while_taking`: [begun, got the connection].
READS_WHILE_TAKING = [0, 0]


def count_reads_while_taking() -> None:
    from pydist.transport import Connection

    original = getattr(Connection, "_counted_original", Connection.read_until_woken)

    def counted(self, is_done, wake_fd):
        READS_WHILE_TAKING[0] += 1
        # The poller may hold the reading role at this instant (reading a heartbeat or a
        # reference-count frame): the take would then wait as usual, and the test would not
        # cover a take that reads. So try again until it reads or is done (bounded).
        deadline = time.monotonic() + 10
        while True:
            got = original(self, is_done, wake_fd)
            if got or is_done() or self.closed or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        READS_WHILE_TAKING[1] += got
        return got

    Connection._counted_original = original
    Connection.read_until_woken = counted
    READS_WHILE_TAKING[:] = [0, 0]


def reads_while_taking() -> int:
    """Takes that got the connection to read while they waited."""
    return READS_WHILE_TAKING[1]


def reads_begun() -> int:
    return READS_WHILE_TAKING[0]


def heard_from_then_take(other: int, rc):
    """Read a reply from `other` (so this thread last heard from it), then take from `rc`,
    a channel this process owns: the take reads `other`'s connection while it waits."""
    pydist.remotecall_fetch(pydist.myid, other)
    return rc.take()


def _put_once_reading(rc, value, begun: int, timeout: float = 30.0) -> None:
    """Put `value` into `rc` once a take here has begun reading (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while READS_WHILE_TAKING[0] <= begun and time.monotonic() < deadline:
        time.sleep(0.005)
    rc.put(value)


def heard_from_then_take_local_put(other: int, rc):
    """As `heard_from_then_take`, with the value put by another thread of this process once
    the take reads (`count_reads_while_taking` on)."""
    threading.Thread(target=_put_once_reading, args=(rc, "local", READS_WHILE_TAKING[0]),
                     daemon=True).start()
    return heard_from_then_take(other, rc)


def ping_pong_player(inbox, outbox, rounds: int, size: int, first: bool):
    """Bounce values of `size` bytes `rounds` times; return (the values this side saw are
    right, this thread's ident, the quick puts by thread)."""
    ok = True
    for i in range(rounds):
        value = bytes([i % 256]) * size
        if first:
            outbox.put(value)
            ok = ok and inbox.take() == value
        else:
            got = inbox.take()
            ok = ok and got == value
            outbox.put(got)
    return ok, threading.get_ident(), dict(QUICK_THREADS)


# Wake-ups of the poller for a readable connection whose reading role another thread holds
# (`Connection._on_readable` failing to take it), while `count_poller_misses` is on.
POLLER_MISSES = [0]


def count_poller_misses() -> None:
    from pydist.transport import Connection

    POLLER_MISSES[0] = 0
    if getattr(Connection, "_spied_take_role", None) is None:
        real = Connection._take_role

        def take_role(self):
            taken = real(self)
            if not taken and threading.current_thread().name == "pydist-poller":
                POLLER_MISSES[0] += 1
            return taken

        Connection._spied_take_role = real
        Connection._take_role = take_role


def poller_misses() -> int:
    return POLLER_MISSES[0]
