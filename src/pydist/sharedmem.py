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

Negotiation: the first large buffer on a connection goes through the socket, preceded by a
SHARE_OFFER (pid, descriptor, capacity, token). The receiver opens
`/proc/<pid>/fd/<descriptor>`, checks that it is a sealed pydist arena of its own user that
starts with the token, and answers SHARE_ANSWER; the
sender uses the arena only after a yes, so every frame that refers to it is read after it
was opened. When the connection closes both sides drop the arena; mapped regions stay valid
(the kernel frees the memory with the last mapping). `PYDIST_SHARED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
import sys
import threading
import time
import weakref
from typing import Any

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
# What a free region of the arena costs to copy into (its `level`), cheapest last:
#  COLD: no memory behind it. Written with `pwrite` (allocation and copy in the kernel, the
#        GIL free), about half the time of a copy through the mapping, which would also
#        fault every page into it (100 MB: ~50 ms against ~100 ms here).
#  ALLOCATED: memory behind it, not yet in the sender's mapping. Mapped in with one
#        MADV_POPULATE_WRITE, then copied through the mapping (~42 ms against ~58 ms
#        through the faults), which makes it:
#  MAPPED: copied through the mapping, no fault at all (~13 ms).
COLD, ALLOCATED, MAPPED = 0, 1, 2
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


def usable(sock: Any) -> bool:
    """Whether a connection over `sock` may offer an arena: a Unix socket on Linux, and not
    turned off by `PYDIST_SHARED_MEMORY=0`."""
    return (
        hasattr(os, "memfd_create")
        and isinstance(sock, socket.socket)
        and sock.family == getattr(socket, "AF_UNIX", None)
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
        self._free: list[list] = [[0, self.capacity, COLD]]  # [offset, size, level] by offset
        self._used: dict[int, tuple[int, int, int]] = {}  # slot -> (offset, size, level)
        self._copying = 0  # puts copying now: `close` leaves the descriptor to the last one
        self._slots = list(range(SLOTS - 1, TOKEN_LEN - 1, -1))  # free slots, lowest last
        self._last_put = time.monotonic()

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
            found = self._alloc(size)
            if found is None:
                return None
            off, level = found
            slot = self._slots.pop()
            self._used[slot] = (off, size, ALLOCATED if level == COLD else MAPPED)
            self.map[slot] = 1
            self._copying += 1
        copied = False
        try:
            self._copy(view, SLOTS + off, level)
            copied = True
        except (ValueError, OSError):  # closed meanwhile: the connection is gone
            pass
        finally:
            with self._lock:
                self._copying -= 1
                closed = self.closed
                if closed and not self._copying:
                    os.close(self.fd)
                elif not copied and not closed:  # no memory for it (ENOSPC): give it back
                    with contextlib.suppress(OSError):
                        self.map.madvise(mmap.MADV_REMOVE, SLOTS + off, size)
                    self._used[slot] = (off, size, COLD)
                    self.map[slot] = 0
        return (slot, off) if copied and not closed else None

    def _copy(self, view: memoryview, base: int, level: int) -> None:
        """Copy `view` to `base` in the arena, the cheapest way for a region at `level`,
        a slice at a time (see COLD)."""
        n = view.nbytes
        for i in range(0, n, COPY_STEP):
            j = min(n, i + COPY_STEP)
            if level == COLD:
                os.pwrite(self.fd, view[i:j], base + i)  # (the descriptor outlives us)
                continue
            if level == ALLOCATED:
                try:
                    self.map.madvise(_MADV_POPULATE_WRITE, base + i, j - i)
                except OSError:  # an older kernel: the copy faults the pages in
                    level = MAPPED
            self.map[base + i : base + j] = view[i:j]

    def in_use(self) -> int:
        """Bytes of regions not released yet (sent, or still mapped by the receiver)."""
        with self._lock:
            self._reclaim()
            return sum(size for _, size, _ in self._used.values())

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
                if block[2] != COLD:
                    try:
                        self.map.madvise(mmap.MADV_REMOVE, SLOTS + block[0], block[1])
                    except (OSError, AttributeError):
                        continue
                    block[2] = COLD
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
            warm = sum(size for _, size, level in self._free if level != COLD)
            self._free = []
            self.map.close()
            if not self._copying:  # else the last put closes it: a `pwrite` may be under way
                os.close(self.fd)
        with _lock:
            _warm_free -= warm

    # -- internals (arena lock held) --
    def _reclaim(self) -> None:
        """Take back the regions whose slot the receiver cleared."""
        m = self.map
        for slot in [s for s in self._used if not m[s]]:
            off, size, level = self._used.pop(slot)
            self._slots.append(slot)
            self._give_back(off, size, level)

    def _alloc(self, size: int) -> tuple[int, int] | None:
        """(offset, level) of a region of `size` bytes: the smallest block that fits of the
        cheapest level to copy into (see COLD), else the first cold one."""
        global _warm_free
        fits = [i for i, block in enumerate(self._free) if block[1] >= size]
        if not fits:
            return None
        level = max(self._free[i][2] for i in fits)
        if level == COLD:  # (any cold block fits as well: the first keeps the arena dense)
            pick = fits[0]
        else:
            pick = min((i for i in fits if self._free[i][2] == level),
                       key=lambda i: self._free[i][1])
        block = self._free[pick]
        off = block[0]
        if block[1] == size:
            del self._free[pick]
        else:
            block[0] += size
            block[1] -= size
        if level != COLD:
            with _lock:
                _warm_free -= size
        return off, level

    def _give_back(self, off: int, size: int, level: int) -> None:
        global _warm_free
        if level != COLD:
            with _lock:
                keep = _warm_free + size <= KEEP_WARM
                if keep:
                    _warm_free += size
            if not keep:
                level = COLD
                try:
                    self.map.madvise(mmap.MADV_REMOVE, SLOTS + off, size)  # free the memory
                except (OSError, AttributeError):
                    pass
        i = 0
        while i < len(self._free) and self._free[i][0] < off:
            i += 1
        self._free.insert(i, [off, size, level])
        self._merge_all()

    def _merge_all(self) -> None:
        """Merge adjacent free blocks of the same level."""
        merged: list[list] = []
        for block in self._free:
            last = merged[-1] if merged else None
            if last is not None and last[2] == block[2] and last[0] + last[1] == block[0]:
                last[1] += block[1]
            else:
                merged.append(block)
        self._free = merged


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
