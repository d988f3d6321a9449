"""User channel types importable on workers (tests/ is on their sys.path): Julia lets any
AbstractChannel back a RemoteChannel, with its own `put!`/`take!` signatures."""

import threading
from collections import deque


class BareChannel:
    """put(v) / take() / fetch() / wait(): no timeout parameters at all."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items = deque()

    def put(self, v):
        with self.cond:
            self.items.append(v)
            self.cond.notify_all()
        return v

    def _first(self):
        while not self.items:
            self.cond.wait()
        return self.items[0]

    def take(self):
        with self.cond:
            self._first()
            return self.items.popleft()

    def fetch(self):
        with self.cond:
            return self._first()

    def wait(self):
        with self.cond:
            self._first()

    def isready(self):
        with self.cond:
            return bool(self.items)

    def __len__(self):
        with self.cond:
            return len(self.items)


class TaggedChannel:
    """put(v, tag) / take(tag) / fetch(tag): extra arguments, and a `timeout` keyword."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items = []

    def put(self, v, tag="plain", timeout=None):
        with self.cond:
            self.items.append((tag, v))
            self.cond.notify_all()
        return v

    def _find(self, tag, timeout):
        def found():
            return [i for i, (t, _) in enumerate(self.items) if tag is None or t == tag]

        if not self.cond.wait_for(found, timeout):
            raise TimeoutError(f"no item tagged {tag!r} within {timeout} seconds")
        return found()[0]

    def take(self, tag=None, *, timeout=None):
        with self.cond:
            return self.items.pop(self._find(tag, timeout))[1]

    def fetch(self, tag=None, timeout=None):
        with self.cond:
            return self.items[self._find(tag, timeout)][1]

    def isready(self):
        with self.cond:
            return bool(self.items)
