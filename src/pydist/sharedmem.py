"""Large buffers between processes on one host go through shared memory (Linux).

Over a Unix socket, an out-of-band buffer of `SHARE_MIN` bytes or more (a NumPy array's
data) does not cross the socket: the sender copies it into its *arena* for that connection
(a memfd) and the frame carries only where it is; the receiver maps that range
copy-on-write and unpickles the array over it. One copy instead of two, and no fresh memory
on either side: arena pages stay allocated between transfers (up to `KEEP_WARM` bytes of
free ones per process), where a socket receive needs a new buffer each time (on a VM that
hands freed memory back to its host, touching new memory costs ~3 ms per MB).

Lifetime: every region in flight has a *slot*, one byte at the start of the arena, which
the sender sets and the receiver clears once the region's mapping is gone (nothing in the
receiver references the data any more) or its data has been copied out. The sender reuses
regions whose byte is clear. No message and no lock is involved in a release: it may run
in any thread, in a finalizer, at interpreter exit.

Memory the arena has not used yet is slow to copy into (4 KiB pages allocated, zeroed and
mapped one by one, where a socket's receiver gets fresh huge pages): a buffer of
`WARM_AHEAD_MIN` bytes or more that finds no used ("warm") region goes through the socket,
and the arena makes a region of its size warm in the background for the next one.

Negotiation: the first large buffer on a connection goes through the socket, preceded by a
SHARE_OFFER (pid, descriptor, capacity, token). The receiver opens
`/proc/<pid>/fd/<descriptor>`, checks that it is a sealed pydist arena of its own user that
starts with the token, and answers SHARE_ANSWER; the
sender uses the arena only after a yes, so every frame that refers to it is read after it
was opened. When the connection closes both sides drop the arena; mapped regions stay valid
(the kernel frees the memory with the last mapping). `PYDIST_SHARED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import _socket
import contextlib
import fcntl
import mmap
import os
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable

from . import protocol
from .exceptions import ProtocolError

# Buffers at least this large go through the arena (below it, the socket costs less than
# mapping a region).
SHARE_MIN = 1 << 20
# Free arena memory a process keeps allocated for reuse, over all its arenas; beyond it,
# released regions are given back to the kernel, and all of it once an arena has had
# nothing to send for IDLE_SECONDS (checked by `trim`, with the connection's heartbeat).
KEEP_WARM = 256 << 20
IDLE_SECONDS = 30.0
# Regions in flight per arena; the slot table is this many bytes at the start of the arena,
# the first TOKEN_LEN of which hold the arena's token instead (a receiver checks that what it
# opened through /proc is the arena offered, not another process's: pid namespaces differ).
SLOTS = 1 << 16
TOKEN_LEN = 16
# A buffer is copied into the arena this much at a time: the GIL is free in between (a
# long copy would keep the heartbeat from answering).
COPY_STEP = 4 << 20
# A buffer at least this large that finds no warm region goes through the socket, while a
# region of its size is made warm in the background (`Arena._warm`): 100 MB into fresh arena
# memory took ~100 ms, through the socket ~45 ms, into a warm region ~13 ms. Below it the
# difference is a millisecond or two, and the buffer is copied into a fresh region at once.
WARM_AHEAD_MIN = 16 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
# Without `trackfd` (Python < 3.13), each mapped region holds a duplicate file descriptor:
# at most this many are mapped at once, further buffers are copied out of the arena.
MAX_MAPPED_WITH_FD = 128
NAME = "pydist-arena"

_PAGE = mmap.ALLOCATIONGRANULARITY
_TRACKFD = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2)

_lock = threading.Lock()  # the two process-wide counters below
_warm_free = 0  # bytes of free arena memory kept allocated, over all arenas
_mapped_with_fd = 0  # regions mapped with a duplicate descriptor (no `trackfd`)


_family = _socket.socket.__dict__["family"]  # (the C attribute: a plain int)


def family_of(sock: socket.socket) -> int:
    """`sock.family` as a plain int. (`socket.socket.family` makes an enum member: `enum`'s
    code that each forked worker ran, so copying the template's pages of it, for a
    comparison.)"""
    return _family.__get__(sock)


def usable(sock: Any) -> bool:
    """Whether a connection over `sock` may offer an arena: a Unix socket on Linux, and not
    turned off by `PYDIST_SHARED_MEMORY=0`."""
    return (
        hasattr(os, "memfd_create")
        and isinstance(sock, socket.socket)
        and family_of(sock) == getattr(socket, "AF_UNIX", None)
        and os.environ.get("PYDIST_SHARED_MEMORY", "1").strip() not in ("0", "false", "no", "off")
    )


def capacity() -> int:
    """An arena's address space (not memory: only what is written is allocated): half the
    machine's RAM. A buffer that does not fit goes through the socket."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        ram = 8 << 30
    return max(64 << 20, ram // 2 // _PAGE * _PAGE)


def _round(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class Arena:
    """The sending side: a memfd that large buffers for one peer are copied into."""

    def __init__(self) -> None:
        self.capacity = capacity()
        fd = os.memfd_create(NAME, os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 2))
        try:
            os.ftruncate(fd, SLOTS + self.capacity)
            # Sealed against shrinking: a receiver's mapped pages can never vanish (SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | getattr(fcntl, "F_SEAL_SEAL", 1))
            self.map = mmap.mmap(fd, SLOTS + self.capacity)
        except BaseException:
            os.close(fd)
            raise
        self.token = os.urandom(TOKEN_LEN)
        self.map[:TOKEN_LEN] = self.token
        self.fd = fd
        self.closed = False
        self._lock = threading.Lock()
        self._free: list[list] = [[0, self.capacity, False]]  # [offset, size, warm] by offset
        self._used: dict[int, tuple[int, int]] = {}  # slot -> (offset, size)
        self._slots = list(range(SLOTS - 1, TOKEN_LEN - 1, -1))  # free slots, lowest last
        self._last_put = time.monotonic()
        self._warming = False  # a region is being made warm (one at a time)
        self._warm_failed = False  # that failed (no memory for it): never try again
        self._users = 0  # warm-ups using the descriptor: `close` leaves it to the last one

    def put(self, view: memoryview) -> tuple[int, int] | None:
        """Copy `view` into a free region: (slot, offset), or None if there is no room."""
        n = view.nbytes
        size = _round(n)
        with self._lock:
            if self.closed:
                return None
            self._last_put = time.monotonic()
            self._reclaim()
            if not self._slots:
                return None
            off = self._alloc(size, cold_ok=size < WARM_AHEAD_MIN)
            if off is None:
                self._warm_ahead(size)
                return None
            slot = self._slots.pop()
            self._used[slot] = (off, size)
            self.map[slot] = 1
        base = SLOTS + off
        try:
            for i in range(0, n, COPY_STEP):  # memcpy under the GIL, a slice at a time
                j = min(n, i + COPY_STEP)
                self.map[base + i : base + j] = view[i:j]
        except ValueError:  # closed meanwhile: the connection is gone
            return None
        return None if self.closed else (slot, off)

    def expect(self, n: int) -> None:
        """A buffer of `n` bytes will likely come (the one that made the offer went through
        the socket): have a warm region ready for it, if it is large."""
        with self._lock:
            if not self.closed and n >= WARM_AHEAD_MIN:
                self._warm_ahead(_round(n))

    def in_use(self) -> int:
        """Bytes of regions not released yet (sent, or still mapped by the receiver)."""
        with self._lock:
            self._reclaim()
            return sum(size for _, size in self._used.values())

    def trim(self, now: float) -> None:
        """Take back released regions; after IDLE_SECONDS without a send, give every free
        page back to the kernel (the heartbeat thread calls this now and then)."""
        global _warm_free
        with self._lock:
            if self.closed:
                return
            self._reclaim()
            if now - self._last_put < IDLE_SECONDS:
                return
            cooled = 0
            for block in self._free:
                if block[2]:
                    try:
                        self.map.madvise(mmap.MADV_REMOVE, SLOTS + block[0], block[1])
                    except (OSError, AttributeError):
                        continue
                    block[2] = False
                    cooled += block[1]
            if cooled:
                self._merge_all()
                with _lock:
                    _warm_free -= cooled

    def close(self) -> None:
        """Drop the arena (the connection is closed); the receiver's mappings stay valid."""
        global _warm_free
        with self._lock:
            if self.closed:
                return
            self.closed = True
            warm = sum(size for _, size, w in self._free if w)
            self._free = []
            if not self._users:  # else the warm-up closes them (it may be using them now)
                self.map.close()
                os.close(self.fd)
        with _lock:
            _warm_free -= warm

    # -- internals (arena lock held) --
    def _reclaim(self) -> None:
        """Take back the regions whose slot the receiver cleared."""
        m = self.map
        for slot in [s for s in self._used if not m[s]]:
            off, size = self._used.pop(slot)
            self._slots.append(slot)
            self._give_back(off, size)

    def _alloc(self, size: int, cold_ok: bool = True) -> int | None:
        """A region of `size` bytes: the smallest warm block that fits, else the first (if
        `cold_ok`)."""
        global _warm_free
        fits = [i for i, block in enumerate(self._free) if block[1] >= size]
        warm = [i for i in fits if self._free[i][2]]
        if not warm and not (cold_ok and fits):
            return None
        pick = min(warm, key=lambda i: self._free[i][1]) if warm else fits[0]
        block = self._free[pick]
        off = block[0]
        if block[1] == size:
            del self._free[pick]
        else:
            block[0] += size
            block[1] -= size
        if block[2]:
            with _lock:
                _warm_free -= size
        return off

    def _warm_ahead(self, size: int) -> None:
        """Have a thread make a cold region of `size` bytes warm, unless one is at it already
        or free memory kept warm would exceed KEEP_WARM."""
        global _warm_free
        if self._warming or self._warm_failed or any(
                warm and n >= size for _, n, warm in self._free):
            return
        with _lock:
            if _warm_free + size > KEEP_WARM:
                return
            _warm_free += size  # counted from now, as the region will be
        off = self._alloc(size)  # (no warm block fits, or we would not be here)
        if off is None:
            with _lock:
                _warm_free -= size
            return
        self._warming = True
        self._users += 1
        thread = threading.Thread(target=self._warm, args=(off, size), daemon=True,
                                  name="pydist-arena-warm")
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown
            self._warming = False
            self._users -= 1
            self._drop_warm_up(off, size)

    def _warm(self, off: int, size: int) -> None:
        """(Its own thread, owned by the arena: it ends within a step once the arena is
        closed.) Allocate the region and map it in, a COPY_STEP at a time, with the GIL
        free and at the lowest priority (nice 19), so that it takes only CPU time nobody
        else wants (a transfer in progress, first of all): `posix_fallocate` allocates,
        MADV_POPULATE_WRITE maps into our mapping what a copy would otherwise fault in page
        by page. Then the region is a free warm block."""
        global _warm_free
        done = False
        try:
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            populate = _populate_function(self.map)
            for i in range(0, size, COPY_STEP):
                n = min(COPY_STEP, size - i)
                if self.closed:
                    break
                os.posix_fallocate(self.fd, SLOTS + off + i, n)
                populate(SLOTS + off + i, n)
            else:
                done = True
        except (OSError, ValueError):  # no memory for it (ENOSPC), or closed meanwhile
            pass
        finally:
            with self._lock:
                self._users -= 1
                if self.closed:  # (its free list is gone: only the count is undone)
                    if not self._users:
                        self.map.close()
                        os.close(self.fd)
                    with _lock:
                        _warm_free -= size
                elif done:
                    self._give_back(off, size, warm=True)
                else:  # never again: such buffers keep going through the socket
                    self._warm_failed = True
                    self._drop_warm_up(off, size)
                self._warming = False  # (last: whoever sees it sees the rest done)

    def _drop_warm_up(self, off: int, size: int) -> None:
        """A warm-up that will not be: its region goes back freed, and out of the count."""
        global _warm_free
        self._give_back(off, size, warm=False)
        with _lock:
            _warm_free -= size

    def _give_back(self, off: int, size: int, warm: bool | None = None) -> None:
        """Return a region to the free list: warm if the process keeps that much free
        memory warm (KEEP_WARM), else its memory is freed. `warm` given: already counted
        as kept warm (True), or to be freed (False)."""
        global _warm_free
        if warm is None:
            with _lock:
                warm = _warm_free + size <= KEEP_WARM
                if warm:
                    _warm_free += size
        if not warm:
            try:
                self.map.madvise(mmap.MADV_REMOVE, SLOTS + off, size)  # free the memory
            except (OSError, AttributeError):
                pass
        i = 0
        while i < len(self._free) and self._free[i][0] < off:
            i += 1
        self._free.insert(i, [off, size, warm])
        self._merge_all()

    def _merge_all(self) -> None:
        """Merge adjacent free blocks of the same kind (warm or given back)."""
        merged: list[list] = []
        for block in self._free:
            last = merged[-1] if merged else None
            if last is not None and last[2] == block[2] and last[0] + last[1] == block[0]:
                last[1] += block[1]
            else:
                merged.append(block)
        self._free = merged


def _populate_function(region: mmap.mmap) -> Callable[[int, int], None]:
    """`populate(offset, n)`: map `region[offset:offset + n]` in (MADV_POPULATE_WRITE) with
    the GIL free (`mmap.madvise` holds it); a no-op where that cannot be done (then a copy
    faults the pages in). `region` must stay open meanwhile."""
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        anchor = ctypes.c_char.from_buffer(region)
        base = ctypes.addressof(anchor)
        del anchor  # (an exported buffer would keep `region` from closing)
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return lambda offset, n: None

    def populate(offset: int, n: int) -> None:
        madvise(base + offset, n, _MADV_POPULATE_WRITE)  # (an error: the copy faults them in)

    return populate


class PeerArena:
    """The receiving side: the peer's arena, opened through /proc, and its regions mapped."""

    def __init__(self, pid: int, fd_number: int, size: int, token: bytes) -> None:
        path = f"/proc/{int(pid)}/fd/{int(fd_number)}"
        if not os.readlink(path).startswith(f"/memfd:{NAME} "):
            raise ProtocolError(f"{path} is not a pydist arena")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_size != SLOTS + size:
                raise ProtocolError(f"{path}: not an arena of {size} bytes of this user")
            if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS:
                raise ProtocolError(f"{path}: the arena is not sealed against shrinking")
            self.slots = mmap.mmap(fd, SLOTS)
            if self.slots[:TOKEN_LEN] != token:
                self.slots.close()
                raise ProtocolError(f"{path} is not the arena offered (token differs)")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.capacity = size
        self.closed = False

    def buffer(self, slot: int, offset: int, n: int):
        """The buffer for region (`slot`, `offset`) of `n` bytes: mapped copy-on-write
        (writable; the region is released when the mapping is freed), or copied out."""
        global _mapped_with_fd
        if not (TOKEN_LEN <= slot < SLOTS and offset % _PAGE == 0 and 0 < n
                and offset + n <= self.capacity):
            raise ProtocolError(f"bad shared-memory region: slot {slot}, {n} bytes at {offset}")
        if self.closed:
            raise ProtocolError("shared-memory region received after the arena was dropped")
        with _lock:
            track = not _TRACKFD
            mappable = not track or _mapped_with_fd < MAX_MAPPED_WITH_FD
            if mappable and track:
                _mapped_with_fd += 1
        if mappable:
            try:
                m = mmap.mmap(self.fd, _round(n), flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=SLOTS + offset,
                              **_TRACKFD)
            except OSError:
                m = None
            if m is not None:
                weakref.finalize(m, _release, self.slots, slot, track).atexit = False
                return memoryview(m)[:n] if n != len(m) else m
            if track:
                with _lock:
                    _mapped_with_fd -= 1
        buf = protocol.allocate(n)
        got = os.preadv(self.fd, [buf], SLOTS + offset)
        _release(self.slots, slot, False)
        if got != n:
            raise ProtocolError(f"shared-memory region of {n} bytes at {offset}: read {got}")
        return buf

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)


def _release(slots: mmap.mmap, slot: int, tracked: bool) -> None:
    """Hand a region back to its sender (its mapping is gone, or its data copied out)."""
    global _mapped_with_fd
    if tracked:
        with _lock:
            _mapped_with_fd -= 1
    try:
        slots[slot] = 0
    except (ValueError, TypeError):  # unmapped at exit
        pass


# ------------------------------------------------------------------ the connection's side
def outgoing(conn: Any, chunks: list) -> list:
    """The chunks of a frame for `conn` with its large buffers moved into the arena (once
    the peer has accepted it; the first large buffer makes the offer)."""
    nbufs = protocol.buffer_count(chunks)
    if not nbufs:
        return chunks
    big = [i for i in range(len(chunks) - nbufs, len(chunks)) if len(chunks[i]) >= SHARE_MIN]
    if not big:
        return chunks
    if conn.share_state == 0:
        _offer(conn)
        if conn.arena is not None:
            conn.arena.expect(max(memoryview(chunks[i]).nbytes for i in big))
        return chunks
    arena = conn.arena
    if conn.share_state != 2 or arena is None:
        return chunks
    head = None
    for i in big:
        view = chunks[i]
        if not isinstance(view, memoryview):
            view = memoryview(view).cast("B")
        where = arena.put(view)
        if where is None:
            continue
        if head is None:
            head = bytearray(chunks[0])
            chunks = list(chunks)
        chunks[i] = protocol.mark_shared(head, i - (len(chunks) - nbufs), view.nbytes, *where)
    if head is not None:
        chunks[0] = bytes(head)
    return chunks


_offer_lock = threading.Lock()


def _offer(conn: Any) -> None:
    with _offer_lock:  # one offer per connection, whichever thread sends first
        if conn.share_state != 0:
            return
        conn.share_state = 1
    try:
        arena = Arena()
    except (OSError, ValueError, AttributeError):
        conn.share_state = -1
        return
    conn.arena = arena
    try:
        conn.send(protocol.encode_frame(protocol.SHARE_OFFER, arena.token, a=os.getpid(),
                                        b=arena.fd, c=arena.capacity), wait=False)
    except Exception:
        conn.share_state = -1
        conn.arena = None
        arena.close()
        raise


def on_offer(conn: Any, msg: protocol.Message) -> None:
    """SHARE_OFFER: open the peer's arena and say whether we will read it."""
    ok = 0
    if usable(conn.sock) and conn.peer_arena is None:
        try:
            conn.peer_arena = PeerArena(msg.a, msg.b, msg.c, bytes(msg.body))
            conn.set_shared_resolver(conn.peer_arena.buffer)
            ok = 1
        except (OSError, ProtocolError, ValueError):
            pass
    conn.send(protocol.encode_frame(protocol.SHARE_ANSWER, a=ok), wait=False)


def on_answer(conn: Any, msg: protocol.Message) -> None:
    """SHARE_ANSWER: from now on (yes) or never (no), large buffers go through the arena."""
    if msg.a == 1 and conn.arena is not None:
        conn.share_state = 2
    else:
        conn.share_state = -1
        arena, conn.arena = conn.arena, None
        if arena is not None:
            arena.close()


def drop(conn: Any) -> None:
    """The connection is closed: drop both arenas (mapped regions stay valid)."""
    arena, conn.arena = conn.arena, None
    if arena is not None:
        arena.close()
    peer, conn.peer_arena = conn.peer_arena, None
    if peer is not None:
        peer.close()
