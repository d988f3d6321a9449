"""Worker lifecycle callbacks and worker statuses (DistributedNext's additions).

Callbacks run on the master, each in its own thread, all of one kind concurrently:

- starting `f(manager, params)` before a launch; an exception aborts `addprocs`;
- started `f(pid)` for each new worker when `addprocs` is done; exceptions propagate from
  `addprocs`, but the workers stay added;
- exiting `f(pid)` at the start of `rmprocs`; waited for at most `callback_timeout` seconds;
- exited `f(pid, state)` whenever a worker is gone, `WorkerState.terminated` after `rmprocs`,
  `WorkerState.exterminated` after a crash; exceptions are logged.

A status (`setstatus` / `getstatus`) is any value kept on the master per worker, readable in
exited callbacks and deleted after them.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from typing import Any, Callable, Hashable

from .calls import call_fetch
from .exceptions import error_group
from .group import PGRP

log = logging.getLogger(__name__)

__all__ = [
    "add_worker_starting_callback", "add_worker_started_callback",
    "add_worker_exiting_callback", "add_worker_exited_callback",
    "remove_worker_starting_callback", "remove_worker_started_callback",
    "remove_worker_exiting_callback", "remove_worker_exited_callback",
    "setstatus", "getstatus",
]

_lock = threading.Lock()
_registries: dict[str, dict[Hashable, Callable]] = {
    "starting": {}, "started": {}, "exiting": {}, "exited": {},
}
_signatures = {"starting": "f(manager, params)", "started": "f(pid)", "exiting": "f(pid)",
               "exited": "f(pid, state)"}
_arity = {"starting": 2, "started": 1, "exiting": 1, "exited": 2}
_counter = itertools.count(1)
_statuses: dict[int, Any] = {}
_exiting: set[int] = set()  # pids whose exited callbacks are running (their status is readable)


def _add(kind: str, f: Callable, key: Hashable | None) -> Hashable:
    if not callable(f):
        raise TypeError(f"worker-{kind} callback must be callable, got {f!r}")
    try:
        inspect.signature(f).bind(*([None] * _arity[kind]))
    except TypeError:
        raise TypeError(
            "Callback function is invalid, it must be able to be called with these arguments: "
            f"{_signatures[kind]}"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): trust it
    auto = key is None
    with _lock:
        registry = _registries[kind]
        while key is None or (auto and key in registry):  # a user key may look like ours
            key = f"{getattr(f, '__name__', 'callback')}-{next(_counter)}"
        if key in registry:
            raise ValueError(f"A callback function with key {key!r} already exists")
        registry[key] = f
    return key


def _remove(kind: str, key: Hashable) -> None:
    with _lock:
        if _registries[kind].pop(key, None) is None:
            raise KeyError(f"no worker-{kind} callback with key {key!r}")


def add_worker_starting_callback(f: Callable, key: Hashable | None = None) -> Hashable:
    """Call `f(manager, params)` before workers are launched; returns the key."""
    return _add("starting", f, key)


def add_worker_started_callback(f: Callable, key: Hashable | None = None) -> Hashable:
    """Call `f(pid)` for each new worker once `addprocs` has added it; returns the key."""
    return _add("started", f, key)


def add_worker_exiting_callback(f: Callable, key: Hashable | None = None) -> Hashable:
    """Call `f(pid)` when `rmprocs` starts removing a worker; returns the key."""
    return _add("exiting", f, key)


def add_worker_exited_callback(f: Callable, key: Hashable | None = None) -> Hashable:
    """Call `f(pid, state)` when a worker is gone, for any reason; returns the key."""
    return _add("exited", f, key)


def remove_worker_starting_callback(key: Hashable) -> None:
    """Unregister the starting callback that `add_worker_starting_callback` returned `key` for
    (KeyError if there is none)."""
    _remove("starting", key)


def remove_worker_started_callback(key: Hashable) -> None:
    """Unregister the started callback that `add_worker_started_callback` returned `key` for
    (KeyError if there is none)."""
    _remove("started", key)


def remove_worker_exiting_callback(key: Hashable) -> None:
    """Unregister the exiting callback that `add_worker_exiting_callback` returned `key` for
    (KeyError if there is none)."""
    _remove("exiting", key)


def remove_worker_exited_callback(key: Hashable) -> None:
    """Unregister the exited callback that `add_worker_exited_callback` returned `key` for
    (KeyError if there is none)."""
    _remove("exited", key)


def _snapshot(kind: str) -> list[tuple[Hashable, Callable]]:
    with _lock:
        return list(_registries[kind].items())


class _Run:
    """One callback running in its own thread; in the calling thread when no thread may
    start (at interpreter exit)."""

    def __init__(self, key: Hashable, f: Callable, args: tuple):
        self.key = key
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(f, args), daemon=True,
                                       name=f"pydist-callback-{key}")
        try:
            self.thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            self._run(f, args)

    def _run(self, f: Callable, args: tuple) -> None:
        try:
            f(*args)
        except BaseException as e:
            self.error = e


def _run_all(kind: str, calls: list[tuple], warn_every: float | None,
             timeout: float | None = None) -> list[_Run]:
    """Run every callback of `kind` once per argument tuple in `calls`, concurrently; wait
    for all (at most `timeout` seconds), warning every `warn_every` seconds about the slow
    ones. Returns the runs (finished or not)."""
    runs = [_Run(key, f, args) for key, f in _snapshot(kind) for args in calls]
    start = time.monotonic()
    next_warning = start + warn_every if warn_every else None
    while True:
        pending = [r for r in runs if r.thread.is_alive()]
        if not pending:
            return runs
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            return runs
        if next_warning is not None and now >= next_warning:
            names = ", ".join(f"'{k}'" for k in dict.fromkeys(r.key for r in pending))
            log.warning("Waiting for these worker-%s callbacks to finish: %s", kind, names)
            next_warning = now + warn_every  # type: ignore[operator]
        limits = []
        if timeout is not None:
            limits.append(start + timeout - now)
        if next_warning is not None:
            limits.append(next_warning - now)
        pending[0].thread.join(max(0.0, min(limits)) if limits else None)


def _raise_errors(kind: str, runs: list[_Run]) -> None:
    errors = [r.error for r in runs if r.error is not None]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise error_group(f"{len(errors)} worker-{kind} callbacks failed", errors)


def run_starting(manager: Any, params: dict, warn_every: float) -> None:
    """Before a launch: run the starting callbacks; raise what they raised."""
    _raise_errors("starting", _run_all("starting", [(manager, params)], warn_every))


def run_started(pids: list[int], warn_every: float) -> None:
    """After `addprocs`: run the started callbacks for each new pid; raise what they raised."""
    if pids:
        _raise_errors("started", _run_all("started", [(p,) for p in pids], warn_every))


def run_exiting(pids: list[int], timeout: float) -> None:
    """At the start of `rmprocs`: run the exiting callbacks, waiting at most `timeout`."""
    if not pids:
        return
    runs = _run_all("exiting", [(p,) for p in pids], None, timeout)
    for r in runs:
        if r.error is not None and not r.thread.is_alive():
            log.error("Error when running worker-exiting callback '%s': %r", r.key, r.error)
    pending = [r for r in runs if r.thread.is_alive()]
    if pending:
        names = ", ".join(f"'{k}'" for k in dict.fromkeys(r.key for r in pending))
        log.warning("Some worker-exiting callbacks have not yet finished, continuing to remove "
                    "workers anyway. These are the callbacks still running: %s", names)


def run_exited(pid: int, state: Any, warn_every: float = 10.0) -> None:
    """A worker is gone: run the exited callbacks (errors logged), then drop its status."""
    with _lock:
        _exiting.add(pid)
    try:
        for r in _run_all("exited", [(pid, state)], warn_every):
            if r.error is not None:
                log.error("Error when running worker-exited callback '%s': %r", r.key, r.error)
    finally:
        with _lock:
            _statuses.pop(pid, None)
            _exiting.discard(pid)


# ---------------------------------------------------------------- statuses
def _check_pid(pid: int, what: str) -> None:
    if pid != 1 and pid not in PGRP.workers and pid not in _exiting:
        raise ValueError(f"Worker {pid} does not exist, cannot {what} its status")


def setstatus(x: Any, pid: int | None = None) -> Any:
    """Record `x` as the status of worker `pid` (default: this process), kept on the master;
    returns `x` (as Julia's `setstatus!`)."""
    pid = PGRP.id if pid is None else pid
    if not PGRP.is_master():
        call_fetch(1, setstatus, (x, pid))
        return x
    _check_pid(pid, "set")
    with _lock:
        _statuses[pid] = x
    return x


def getstatus(pid: int | None = None) -> Any:
    """The status of worker `pid` (default: this process), or None if never set."""
    pid = PGRP.id if pid is None else pid
    if not PGRP.is_master():
        return call_fetch(1, getstatus, (pid,))
    with _lock:
        if pid in _statuses:
            return _statuses[pid]
    _check_pid(pid, "get")
    return None
