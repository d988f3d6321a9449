"""Static checks of the types pydist's API gives a user: mypy runs on this file (see
tests/test_docs.py); it is never executed, and pytest does not collect it."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # assert_type is 3.11+; mypy runs on 3.11 or later
    def assert_type(value: Any, typ: Any) -> Any:
        return value

from pydist import (Channel, Future, RemoteChannel, addprocs, fetch, fetchfrom, myid, procs,
                    remote_do, remotecall, remotecall_fetch, remotecall_wait, spawnat, workers)


def double(x: int) -> int:
    return 2 * x


def name(pid: int, suffix: str = "") -> str:
    return f"worker {pid}{suffix}"


def check() -> None:
    pids = addprocs(2)
    assert_type(pids, list[int])
    assert_type(workers(), list[int])
    assert_type(procs(), list[int])
    assert_type(myid(), int)
    assert_type(addprocs(["node1", ("node2", 4), ("node3", "auto")], tunnel=True), list[int])

    # a remote call's result has the function's return type
    assert_type(remotecall_fetch(double, 2, 21), int)
    assert_type(remotecall_fetch(name, 2, 2, suffix="!"), str)
    fut = remotecall(double, 2, 21)
    assert_type(fut, Future[int])
    assert_type(fut.fetch(), int)
    assert_type(fetch(fut), int)
    assert_type(fetch(3), int)
    assert_type(remotecall_wait(name, 2, 3), Future[str])
    assert_type(spawnat(2, double, 1), Future[int])
    assert_type(fetchfrom(2, name, 5), str)
    assert_type(remote_do(double, 2, 1), None)

    # channels carry what they are declared to carry
    ch: RemoteChannel[int] = RemoteChannel(lambda: Channel(10), 2)
    assert_type(ch.take(), int)
    assert_type(fetch(ch), int)
    assert_type(list(ch), list[int])
    local: Channel[str] = Channel(1)
    assert_type(local.take(), str)


def wrong_calls_are_caught() -> None:
    remotecall_fetch(double, 2, "x")  # type: ignore[arg-type]
    remotecall_fetch(double, 2)  # type: ignore[call-arg]
    addprocs(2, tunnel=True)  # type: ignore[call-overload]
    ch: RemoteChannel[int] = RemoteChannel(2)
    ch.put("x")  # type: ignore[arg-type]
