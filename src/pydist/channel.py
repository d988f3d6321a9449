"""The local Channel: Julia's `Channel{Any}(sz)` for threads of one process."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Iterator, TypeVar

from .exceptions import InvalidStateError

__all__ = ["Channel"]


class Abandoned(Exception):
    """A channel operation stopped because its caller gave up on it (`abandon()` became
    true) before it took or put anything: a RemoteChannel's owner side (refs)."""


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


T = TypeVar("T")


class Channel(Generic[T]):
    """A FIFO channel. `sz=0` is unbuffered (a `put` waits until a `take` has the value),
    an int bounds the buffer, `math.inf` leaves it unbounded.

    `put`, `take`, `fetch` and `wait` block; each accepts `timeout=` (seconds) and raises
    `TimeoutError` when it runs out. A closed channel refuses `put`; `take` drains it and then
    raises `InvalidStateError`. `put_front` gives a value back (a RemoteChannel's owner uses it
    for an item taken for a caller who can no longer receive it).

    (The `_put`, `_take`, `_fetch`, `_wait` forms also take `abandon`, checked before every
    wait: once it returns true they raise `Abandoned`, having taken or put nothing; `_wake`
    makes waiters check it again. `_try_put` never waits: a RemoteChannel's owner does it in
    its reading thread.)
    """

    def __init__(self, sz: int | float = 0):
        if sz != math.inf and (isinstance(sz, bool) or not isinstance(sz, int) or sz < 0):
            raise ValueError(f"Channel size must be a non-negative int or math.inf, got {sz!r}")
        self.sz = sz
        self._items: deque = deque()  # unbuffered: [value, taken] entries of waiting putters
        self._cond = threading.Condition(threading.Lock())
        self._open = True
        self._close_exc: BaseException | None = None
        # Called (lock held) wherever a value may have arrived or the channel closed: a
        # thread that waits by reading a connection instead of on `_cond` (`_watch`).
        self._watchers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"Channel(sz={self.sz}, {state}, {len(self._items)} item(s))"

    def _closed_error(self, what: str) -> BaseException:
        if self._close_exc is not None:
            return self._close_exc
        return InvalidStateError(f"Channel is closed: cannot {what}")

    def put(self, v: T, timeout: float | None = None) -> Any:
        """Append `v`, waiting while the channel is full (or, unbuffered, until it is taken)."""
        return self._put(v, timeout, None)

    def _put(self, v: Any, timeout: float | None, abandon: Callable[[], bool] | None) -> Any:
        deadline = _deadline(timeout)
        with self._cond:
            if not self._open:
                raise self._closed_error("put")
            if self.sz == 0:
                entry = [v, False]
                self._items.append(entry)
                self._notify()
                while not entry[1]:
                    given_up = abandon is not None and abandon()
                    if given_up or not self._open or not self._cond.wait(_remaining(deadline)):
                        if entry[1]:
                            break
                        self._items.remove(entry)
                        if given_up:
                            raise Abandoned("put")
                        if not self._open:
                            raise self._closed_error("put")
                        raise TimeoutError(f"put: no taker within {timeout} seconds")
                return v
            while len(self._items) >= self.sz:
                if not self._open:
                    raise self._closed_error("put")
                if abandon is not None and abandon():
                    raise Abandoned("put")
                if not self._cond.wait(_remaining(deadline)):
                    raise TimeoutError(f"put: channel still full after {timeout} seconds")
            if not self._open:
                raise self._closed_error("put")
            self._items.append(v)
            self._notify()
            return v

    def _try_put(self, v: Any) -> bool:
        """Append `v` if that needs no wait (open, buffered, with room); else do nothing.
        Waiting takers are not woken yet: `_wake` them (after the put's reply has left)."""
        with self._cond:
            if not self._open or self.sz == 0 or len(self._items) >= self.sz:
                return False
            self._items.append(v)
            return True

    def _notify(self) -> None:
        """(Lock held) Wake the waiters: a value may be there, or the channel closed."""
        self._cond.notify_all()
        for fn in self._watchers:
            fn()

    def _watch(self, fn: Callable[[], None]) -> None:
        """Have `fn()` (which must not block) called with every `_notify`, until `_unwatch`."""
        with self._cond:
            self._watchers.append(fn)

    def _unwatch(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._watchers.remove(fn)

    def _wait_item(self, deadline: float | None, what: str, timeout: float | None,
                   abandon: Callable[[], bool] | None) -> None:
        while not self._items:
            if not self._open:
                raise self._closed_error(what)
            if abandon is not None and abandon():
                raise Abandoned(what)
            if not self._cond.wait(_remaining(deadline)):
                if not self._items:
                    raise TimeoutError(f"{what}: nothing arrived within {timeout} seconds")

    def take(self, timeout: float | None = None) -> T:
        """Remove and return the first value, waiting for one."""
        return self._take(timeout, None)

    def _take(self, timeout: float | None, abandon: Callable[[], bool] | None) -> Any:
        deadline = _deadline(timeout)
        with self._cond:
            self._wait_item(deadline, "take", timeout, abandon)
            item = self._items.popleft()
            self._cond.notify_all()  # (putters waiting for room)
            if self.sz == 0:
                item[1] = True
                return item[0]
            return item

    def fetch(self, timeout: float | None = None) -> T:
        """Return the first value without removing it, waiting for one."""
        return self._fetch(timeout, None)

    def _fetch(self, timeout: float | None, abandon: Callable[[], bool] | None) -> Any:
        deadline = _deadline(timeout)
        with self._cond:
            self._wait_item(deadline, "fetch", timeout, abandon)
            item = self._items[0]
            return item[0] if self.sz == 0 else item

    def wait(self, timeout: float | None = None) -> None:
        """Wait until a value is available (returns at once if one is)."""
        self._wait(timeout, None)

    def _wait(self, timeout: float | None, abandon: Callable[[], bool] | None) -> None:
        deadline = _deadline(timeout)
        with self._cond:
            self._wait_item(deadline, "wait", timeout, abandon)

    def put_front(self, v: Any) -> None:
        """Put `v` back at the front, whatever the size bound and even if closed: a value that
        was taken but could not be delivered goes back where it was."""
        with self._cond:
            self._items.appendleft([v, True] if self.sz == 0 else v)
            self._notify()

    def _wake(self) -> None:
        """Have every waiter look again (at the items, at its `abandon`)."""
        with self._cond:
            self._notify()

    def _take_is_due(self) -> bool:
        """A take would not wait: a value is there, or the channel is closed."""
        return bool(self._items) or not self._open

    def isready(self) -> bool:
        """True if a `take` would not block."""
        return bool(self._items)

    def isempty(self) -> bool:
        """True if no value is waiting (does not remove anything)."""
        return not self._items

    def close(self, exc: BaseException | None = None) -> None:
        """Close the channel; later puts fail, takes drain what is left. `exc`, if given, is
        what blocked and later callers see instead of InvalidStateError."""
        with self._cond:
            self._open = False
            self._close_exc = exc
            self._notify()

    def isopen(self) -> bool:
        """False once the channel is closed."""
        return self._open

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """Take values until the channel is closed and empty."""
        return take_until_closed(self.take)


def take_until_closed(take: Callable[[], Any]) -> Iterator[Any]:
    """Yield `take()` until it reports the channel closed and empty (InvalidStateError)."""
    while True:
        try:
            yield take()
        except InvalidStateError:
            return
