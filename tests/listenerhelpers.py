"""Worker-side helpers for test_listener_abuse.py (tests/ is on the workers' sys.path)."""

from __future__ import annotations

import os
import resource
import threading

HELD: list[int] = []
_OLD_LIMIT: list = []


def listener_tids() -> list[int]:
    """Native thread ids of this process's listener thread(s)."""
    return [t.native_id for t in threading.enumerate() if t.name.startswith("pydist-listener")]


def exhaust_fds() -> int:
    """Lower RLIMIT_NOFILE to a little above what is open, then open /dev/null until EMFILE;
    return how many descriptors are now held."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _OLD_LIMIT[:] = [(soft, hard)]
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    while True:
        try:
            HELD.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return len(HELD)


def release_fds() -> None:
    while HELD:
        os.close(HELD.pop())
    if _OLD_LIMIT:
        resource.setrlimit(resource.RLIMIT_NOFILE, _OLD_LIMIT.pop())
