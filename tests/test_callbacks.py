"""Worker lifecycle callbacks (starting / started / exiting / exited) and worker statuses
(`setstatus` / `getstatus`), as in DistributedNext.jl.

Callbacks live in global registries: every test registers through the `cbs` fixture, which
removes what is left at the end of the test (before the test's fresh workers are removed,
so no callback of this file ever sees another test's workers).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
from conftest import pid_alive, wait_until, worker_ospid

import pydist
from pydist import WorkerState
from pydist.exceptions import BaseExceptionGroup

KINDS = ("starting", "started", "exiting", "exited")
ADD = {k: getattr(pydist, f"add_worker_{k}_callback") for k in KINDS}
REMOVE = {k: getattr(pydist, f"remove_worker_{k}_callback") for k in KINDS}


class Registered:
    """Adds callbacks and remembers them, so that the fixture can remove them."""

    def __init__(self):
        self.keys: list[tuple[str, object]] = []

    def add(self, kind: str, f, key=None):
        key = ADD[kind](f, key)
        self.keys.append((kind, key))
        return key

    def remove(self, kind: str, key) -> None:
        REMOVE[kind](key)
        self.keys.remove((kind, key))

    def clear(self) -> None:
        while self.keys:
            kind, key = self.keys.pop()
            REMOVE[kind](key)


@pytest.fixture
def cbs(fresh_workers):
    # Depends on fresh_workers: set up after it, so torn down (callbacks removed) before the
    # fresh workers are removed.
    reg = Registered()
    try:
        yield reg
    finally:
        reg.clear()


@pytest.fixture
def release():
    """An Event that slow callbacks wait on; set at the end of the test so no thread lingers."""
    ev = threading.Event()
    yield ev
    ev.set()


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pydist") and r.levelno >= level]


def _callback_threads(key) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"pydist-callback-{key}" and t.is_alive()]


# ==================================================================== registration
def test_add_returns_keys_and_rejects_duplicates(cbs):
    def f(pid):
        pass

    assert cbs.add("started", f, key="my-key") == "my-key"
    k1 = cbs.add("started", f)
    k2 = cbs.add("started", f)
    assert k1 is not None and k2 is not None
    assert len({k1, k2, "my-key"}) == 3  # auto-generated keys are distinct
    with pytest.raises(ValueError, match="my-key"):
        ADD["started"](f, "my-key")
    with pytest.raises(ValueError, match=k1):
        ADD["started"](f, k1)
    # Keys are per kind: the same key may be used by another kind.
    assert cbs.add("exiting", f, key="my-key") == "my-key"
    assert cbs.add("exited", lambda pid, state: None, key=("tuple", 1)) == ("tuple", 1)
    # The rejected duplicates were not registered: each key is removed exactly once.
    cbs.clear()
    for kind, key in [("started", "my-key"), ("started", k1), ("exiting", "my-key")]:
        with pytest.raises(KeyError):
            REMOVE[kind](key)


def test_auto_generated_key_never_collides_with_a_user_key(cbs):
    """Without a key, add_* must not fail with a duplicate-key error for a key the caller
    never chose: user keys that look like generated ones must not get in the way."""
    def f(pid):
        pass

    k1 = cbs.add("started", f)
    if isinstance(k1, str) and "-" in k1 and k1.rsplit("-", 1)[1].isdigit():
        prefix, n = k1.rsplit("-", 1)
        for i in range(int(n) + 1, int(n) + 20):  # the keys the next calls would generate
            cbs.add("started", f, key=f"{prefix}-{i}")
    k2 = cbs.add("started", f)  # must not raise ValueError
    assert k2 != k1
    assert len({k for _, k in cbs.keys}) == len(cbs.keys)


@pytest.mark.parametrize("kind, bad", [
    ("starting", lambda manager: None),
    ("starting", lambda manager, params, extra: None),
    ("started", lambda: None),
    ("started", lambda pid, extra: None),
    ("exiting", lambda: None),
    ("exiting", lambda pid, extra: None),
    ("exited", lambda pid: None),
    ("exited", lambda pid, state, extra: None),
])
def test_invalid_callback_signature_raises_typeerror(cbs, kind, bad):
    with pytest.raises(TypeError, match="Callback function is invalid"):
        ADD[kind](bad)
    with pytest.raises(TypeError):
        ADD[kind](42)  # not callable at all


def test_flexible_signatures_are_accepted(cbs):
    class Callable2:
        def __call__(self, a, b):
            pass

    cbs.add("starting", lambda *args: None)
    cbs.add("started", lambda pid, extra=None: None)
    cbs.add("exiting", lambda *args, **kw: None)
    cbs.add("exited", Callable2())
    assert len(cbs.keys) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_remove_unknown_key_raises_keyerror(cbs, kind):
    with pytest.raises(KeyError):
        REMOVE[kind]("no-such-callback-key")
    f = (lambda a, b: None) if kind in ("starting", "exited") else (lambda pid: None)
    key = ADD[kind](f)
    REMOVE[kind](key)
    with pytest.raises(KeyError):
        REMOVE[kind](key)  # already removed
    # A key of another kind is unknown to this kind.
    other = "started" if kind != "started" else "exiting"
    okey = cbs.add(other, lambda pid: None)
    with pytest.raises(KeyError):
        REMOVE[kind](okey)


def test_removed_callbacks_are_not_called(cbs, fresh_workers):
    calls = []
    keys = {
        "starting": cbs.add("starting", lambda m, p: calls.append("starting")),
        "started": cbs.add("started", lambda pid: calls.append("started")),
        "exiting": cbs.add("exiting", lambda pid: calls.append("exiting")),
        "exited": cbs.add("exited", lambda pid, st: calls.append("exited")),
    }
    for kind, key in keys.items():
        cbs.remove(kind, key)
    kept = cbs.add("exited", lambda pid, st: calls.append(("kept", pid)))
    (w,) = fresh_workers(1)
    pydist.rmprocs(w, waitfor=30)
    assert calls == [("kept", w)]
    cbs.remove("exited", kept)


# ==================================================================== starting
def test_starting_callback_gets_manager_and_params_before_launch(cbs, fresh_workers):
    seen = []
    before = set(pydist.workers())

    def starting(manager, params):
        seen.append((manager, dict(params), set(pydist.workers()),
                     threading.current_thread() is threading.main_thread()))

    cbs.add("starting", starting, key="rec-starting")
    pids = fresh_workers(2, env={"PYDIST_CB_VAR": "x"}, callback_warning_interval=5)
    assert len(seen) == 1  # once per addprocs, not once per worker
    manager, params, workers_then, on_main = seen[0]
    assert isinstance(manager, pydist.LocalManager)
    assert params["env"] == {"PYDIST_CB_VAR": "x"}
    assert params["topology"] == "all_to_all"
    assert workers_then == before  # nothing launched yet
    assert not on_main  # runs in its own thread
    assert set(pids) <= set(pydist.workers())


def test_starting_callback_exception_aborts_addprocs(cbs, fresh_workers):
    started = []
    cbs.add("started", lambda pid: started.append(pid))

    class Boom(Exception):
        pass

    def starting(manager, params):
        raise Boom("no launch today")

    cbs.add("starting", starting, key="failing-starting")
    before = sorted(pydist.workers())
    with pytest.raises(Boom, match="no launch today"):
        fresh_workers(2)
    assert sorted(pydist.workers()) == before
    assert started == []
    time.sleep(0.3)  # nothing launched in the background either
    assert sorted(pydist.workers()) == before


def test_slow_starting_callback_warns(cbs, fresh_workers, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    cbs.add("starting", lambda m, p: time.sleep(1.0), key="slow-starting")
    cbs.add("starting", lambda m, p: None, key="fast-starting")
    t0 = time.monotonic()
    (w,) = fresh_workers(1, callback_warning_interval=0.3)
    assert time.monotonic() - t0 >= 0.9  # addprocs waited for the slow callback
    warnings = [m for m in _messages(caplog) if "worker-starting callbacks to finish" in m]
    assert len(warnings) >= 2, _messages(caplog)
    for m in warnings:
        assert m == "Waiting for these worker-starting callbacks to finish: 'slow-starting'"
    assert pydist.remotecall_fetch(pydist.myid, w) == w


# ==================================================================== started
def test_started_callback_called_for_each_new_worker(cbs, fresh_workers):
    seen = []
    lock = threading.Lock()

    def started(pid):
        # The worker is already part of the cluster and reachable.
        in_cluster = pid in pydist.workers()
        answer = pydist.remotecall_fetch(pydist.myid, pid)
        with lock:
            seen.append((pid, in_cluster, answer))

    cbs.add("started", started, key="rec-started")
    pids = fresh_workers(3)
    assert sorted(seen) == [(p, True, p) for p in pids]


def test_started_callback_exception_propagates_but_workers_stay(cbs, fresh_workers):
    seen = []
    cbs.add("started", lambda pid: seen.append(pid), key="good-started")

    def bad(pid):
        raise RuntimeError(f"started failed for {pid}")

    cbs.add("started", bad, key="bad-started")
    before = set(pydist.workers())
    new: list[int] = []
    try:
        with pytest.raises(RuntimeError, match="started failed for"):
            pydist.addprocs(1)
        new = sorted(set(pydist.workers()) - before)
        assert len(new) == 1
        (w,) = new
        assert seen == [w]  # the other started callback ran anyway
        assert pydist.remotecall_fetch(pydist.myid, w) == w
    finally:
        cbs.clear()
        new = sorted(set(pydist.workers()) - before)
        if new:
            pydist.rmprocs(new, waitfor=30)


def test_slow_started_callback_warns(cbs, fresh_workers, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    done = []
    cbs.add("started", lambda pid: (time.sleep(1.0), done.append(pid)), key="slow-started")
    cbs.add("started", lambda pid: None, key="fast-started")
    (w,) = fresh_workers(1, callback_warning_interval=0.3)
    assert done == [w]  # addprocs waited for it
    warnings = [m for m in _messages(caplog) if "worker-started callbacks to finish" in m]
    assert len(warnings) >= 2, _messages(caplog)
    for m in warnings:
        assert m == "Waiting for these worker-started callbacks to finish: 'slow-started'"


def test_no_warning_when_callbacks_are_fast(cbs, fresh_workers, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    cbs.add("starting", lambda m, p: time.sleep(0.05))
    cbs.add("started", lambda pid: time.sleep(0.05))
    fresh_workers(1, callback_warning_interval=0.5)
    assert not [m for m in _messages(caplog) if "callbacks to finish" in m]


# ==================================================================== concurrency
def test_callbacks_of_one_kind_run_concurrently(cbs, fresh_workers, caplog):
    """Two callbacks of the same kind meet at a barrier: this only works if they run at the
    same time, each in its own thread (run one after the other, the barrier times out)."""
    caplog.set_level(logging.ERROR, logger="pydist")
    idents: dict[str, set] = {k: set() for k in KINDS}
    passed: dict[str, list] = {k: [] for k in KINDS}
    barriers = {k: threading.Barrier(2, timeout=5) for k in KINDS}

    def meet(kind, tag):
        idents[kind].add(threading.get_ident())
        barriers[kind].wait()
        passed[kind].append(tag)

    for tag in ("a", "b"):
        cbs.add("starting", lambda m, p, tag=tag: meet("starting", tag))
        cbs.add("started", lambda pid, tag=tag: meet("started", tag))
        cbs.add("exiting", lambda pid, tag=tag: meet("exiting", tag))
        cbs.add("exited", lambda pid, st, tag=tag: meet("exited", tag))

    t0 = time.monotonic()
    (w,) = fresh_workers(1)
    pydist.rmprocs(w, waitfor=30, callback_timeout=10)
    assert time.monotonic() - t0 < 4  # no barrier timed out
    for kind in KINDS:
        assert sorted(passed[kind]) == ["a", "b"], (kind, passed, _messages(caplog))
        assert len(idents[kind]) == 2
        assert threading.main_thread().ident not in idents[kind]


# ==================================================================== exiting
def test_exiting_callback_runs_before_removal(cbs, fresh_workers):
    order = []

    def exiting(pid):
        time.sleep(0.3)
        # The worker is still there and answers.
        order.append(("exiting", pid, pydist.remotecall_fetch(pydist.myid, pid)))

    cbs.add("exiting", exiting, key="rec-exiting")
    cbs.add("exited", lambda pid, st: order.append(("exited", pid)), key="rec-exited")
    a, b = fresh_workers(2)
    pydist.rmprocs(a, waitfor=30)
    assert order == [("exiting", a, a), ("exited", a)]
    assert a not in pydist.procs()
    assert b in pydist.procs()  # only the removed worker is concerned


def test_slow_exiting_callback_is_waited_for_at_most_callback_timeout(
        cbs, fresh_workers, caplog, release):
    caplog.set_level(logging.WARNING, logger="pydist")
    entered = threading.Event()
    finished = []

    def slow(pid):
        entered.set()
        release.wait(30)
        finished.append(pid)

    cbs.add("exiting", slow, key="slow-exiting")
    (w,) = fresh_workers(1)
    ospid = worker_ospid(w)
    t0 = time.monotonic()
    pydist.rmprocs(w, waitfor=30, callback_timeout=0.5)
    elapsed = time.monotonic() - t0
    assert entered.is_set()
    assert 0.4 <= elapsed < 10, elapsed
    assert finished == []  # still running: rmprocs did not wait for it
    assert w not in pydist.procs()
    wait_until(lambda: not pid_alive(ospid), timeout=20, what="worker process exit")
    expected = ("Some worker-exiting callbacks have not yet finished, continuing to remove "
                "workers anyway. These are the callbacks still running: 'slow-exiting'")
    assert expected in _messages(caplog)
    release.set()
    wait_until(lambda: finished == [w], timeout=10, what="slow callback to finish")
    wait_until(lambda: not _callback_threads("slow-exiting"), timeout=10,
               what="callback thread end")


def test_exiting_callback_error_does_not_stop_removal(cbs, fresh_workers, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    exited = []

    def bad(pid):
        raise RuntimeError("exiting went wrong")

    cbs.add("exiting", bad, key="bad-exiting")
    cbs.add("exited", lambda pid, st: exited.append((pid, st)))
    (w,) = fresh_workers(1)
    pydist.rmprocs(w, waitfor=30)
    assert w not in pydist.procs()
    assert exited == [(w, WorkerState.terminated)]
    assert not [m for m in _messages(caplog) if "have not yet finished" in m]


# ==================================================================== exited
def test_exited_callback_after_rmprocs_is_terminated(cbs, fresh_workers):
    seen = []

    def exited(pid, state):
        time.sleep(0.5)  # rmprocs must still wait for it
        seen.append((pid, state))

    cbs.add("exited", exited, key="rec-exited")
    a, b = fresh_workers(2)
    pydist.rmprocs([a, b], waitfor=30)
    assert sorted(seen, key=lambda x: x[0]) == [(a, WorkerState.terminated),
                                                (b, WorkerState.terminated)]
    time.sleep(0.3)
    assert len(seen) == 2  # exactly once per worker


def test_exited_callback_after_kill_is_exterminated(cbs, fresh_workers):
    seen = []
    cbs.add("exited", lambda pid, state: seen.append((pid, state)), key="rec-exited")
    a, b = fresh_workers(2)
    os.kill(worker_ospid(a), signal.SIGKILL)
    wait_until(lambda: seen, timeout=30, what="exited callback")
    assert seen == [(a, WorkerState.exterminated)]
    assert a not in pydist.procs()
    time.sleep(0.3)
    assert seen == [(a, WorkerState.exterminated)]  # exactly once, and not for b
    assert pydist.remotecall_fetch(pydist.myid, b) == b


def test_exited_callback_errors_are_logged(cbs, fresh_workers, caplog):
    caplog.set_level(logging.ERROR, logger="pydist")
    seen = []

    def bad(pid, state):
        raise ValueError("exited went wrong")

    cbs.add("exited", bad, key="bad-exited")
    cbs.add("exited", lambda pid, st: seen.append(pid), key="good-exited")
    (w,) = fresh_workers(1)
    pydist.rmprocs(w, waitfor=30)  # does not raise
    assert seen == [w]
    errors = [m for m in _messages(caplog, logging.ERROR)
              if "Error when running worker-exited callback 'bad-exited'" in m]
    assert len(errors) == 1, _messages(caplog, logging.ERROR)
    assert "exited went wrong" in errors[0]
    assert not [m for m in _messages(caplog, logging.ERROR) if "good-exited" in m]


# ==================================================================== statuses
def test_status_set_and_get_on_master(fresh_workers):
    a, b = fresh_workers(2)
    assert pydist.getstatus(a) is None  # never set
    status = ["busy"]
    assert pydist.setstatus(status, a) is status  # returns its value, as Julia's setstatus!
    pydist.setstatus("busy", a)
    pydist.setstatus({"step": 3}, b)
    assert pydist.getstatus(a) == "busy"
    assert pydist.getstatus(b) == {"step": 3}
    pydist.setstatus("idle", a)
    assert pydist.getstatus(a) == "idle"
    # pid defaults to myid() == 1.
    old = pydist.getstatus()
    try:
        pydist.setstatus("master-status")
        assert pydist.getstatus() == "master-status"
        assert pydist.getstatus(1) == "master-status"
    finally:
        pydist.setstatus(old)


def test_status_from_worker_is_kept_on_master(fresh_workers):
    a, b = fresh_workers(2)
    assert pydist.remotecall_fetch(pydist.getstatus, a) is None
    assert pydist.remotecall_fetch(pydist.setstatus, a, "busy") == "busy"
    assert pydist.getstatus(a) == "busy"
    assert pydist.remotecall_fetch(pydist.getstatus, a) == "busy"
    # A worker sees (and sets) the statuses of others, all kept on the master.
    assert pydist.remotecall_fetch(pydist.getstatus, b, a) == "busy"
    pydist.remotecall_fetch(pydist.setstatus, b, "set-by-b", a)
    assert pydist.getstatus(a) == "set-by-b"
    assert pydist.getstatus(b) is None
    pydist.setstatus("from-master", b)
    assert pydist.remotecall_fetch(pydist.getstatus, b) == "from-master"


def test_status_of_unknown_worker_raises(fresh_workers):
    with pytest.raises(ValueError, match="Worker 999 does not exist, cannot set its status"):
        pydist.setstatus("x", 999)
    with pytest.raises(ValueError, match="Worker 999 does not exist, cannot get its status"):
        pydist.getstatus(999)
    # Forwarded from a worker, the error comes back too.
    (w,) = fresh_workers(1)
    with pytest.raises(Exception, match="Worker 999 does not exist, cannot set its status"):
        pydist.remotecall_fetch(pydist.setstatus, w, "x", 999)
    with pytest.raises(Exception, match="Worker 999 does not exist, cannot get its status"):
        pydist.remotecall_fetch(pydist.getstatus, w, 999)


def test_status_readable_in_exited_callback_then_deleted_after_rmprocs(cbs, fresh_workers):
    seen = []

    def exited(pid, state):
        seen.append((pid, pydist.getstatus(pid)))

    cbs.add("exited", exited, key="status-exited")
    a, b = fresh_workers(2)
    pydist.setstatus("about to go", a)
    pydist.rmprocs([a, b], waitfor=30)
    assert sorted(seen) == [(a, "about to go"), (b, None)]
    for p in (a, b):
        with pytest.raises(ValueError, match=f"Worker {p} does not exist, cannot get its status"):
            pydist.getstatus(p)
        with pytest.raises(ValueError, match=f"Worker {p} does not exist, cannot set its status"):
            pydist.setstatus("late", p)


def test_status_readable_in_exited_callback_then_deleted_after_kill(cbs, fresh_workers):
    seen = []
    cbs.add("exited", lambda pid, st: seen.append((pid, st, pydist.getstatus(pid))),
            key="status-exited")
    (w,) = fresh_workers(1)
    pydist.remotecall_fetch(pydist.setstatus, w, "working")
    ospid = worker_ospid(w)
    os.kill(ospid, signal.SIGKILL)
    wait_until(lambda: seen, timeout=30, what="exited callback")
    assert seen == [(w, WorkerState.exterminated, "working")]
    wait_until(lambda: w not in pydist.procs(), timeout=10, what="worker removal")

    def status_gone():
        try:
            pydist.getstatus(w)
        except ValueError:
            return True
        return False

    wait_until(status_gone, timeout=10, what="status deletion")


@pytest.mark.timeout(60)
def test_several_callbacks_exiting_the_interpreter_fail_addprocs_as_one_group(cbs):
    """Two starting callbacks raise SystemExit: `addprocs` raises both in a
    BaseExceptionGroup (`ExceptionGroup` itself refuses them: it raised TypeError)."""
    def leave(manager, params):
        raise SystemExit(3)

    cbs.add("starting", leave)
    cbs.add("starting", leave)
    before = set(pydist.procs())
    with pytest.raises(BaseExceptionGroup) as info:
        pydist.addprocs(1)
    assert [type(e) for e in info.value.exceptions] == [SystemExit, SystemExit]
    assert "2 worker-starting callbacks failed" in str(info.value)
    assert set(pydist.procs()) == before
