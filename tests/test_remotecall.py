"""Remote calls: remotecall, remotecall_fetch, remotecall_wait, remote_do.

The README's "What works today" and "When things fail"; Julia reference sections 1.5, 1.8, 2.6.

The first part of this module uses the two workers shared by the module (`two_workers`) and,
for anything that kills workers, workers owned by one test (`fresh_workers`). The last part
(`TestTopologies`) needs a cluster without other workers, because the topology belongs to the
whole cluster: it removes every worker first and leaves none behind. It must stay last.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import textwrap
import threading
import time
from typing import Callable

import pytest

import pydist
from pydist import serialization
from conftest import run_threads, wait_until, worker_ospid
from pydist.calls import connection


# ==================================================================== helpers run on workers
def f_args(v1, v2=0, *, kw1=0, kw2=0):
    """Julia's test D:947-966."""
    return v1 + v2 + kw1 + kw2


def pid_and(x, *, tag="t"):
    return (pydist.myid(), x, tag)


def by_reference_probe():
    """True when this very function object is the one of the imported test module, i.e. it
    was sent by reference (a by-value copy would be a different object)."""
    mod = sys.modules.get(__name__)
    return mod is not None and getattr(mod, "by_reference_probe", None) is by_reference_probe


def put_into(ch, value, *, extra=None):
    ch.put((pydist.myid(), value, extra))


def mutate_first(v):
    v[0] = "changed"
    return v


def identity(x):
    return x


def divide_by_zero():
    return 1 / 0  # marker-divide-by-zero


class CustomError(Exception):
    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code
        self.text = text


def raise_custom(code, text="custom failure"):
    raise CustomError(code, text)


def raise_worker_only_error(msg):
    """Raise an exception whose class lives in a module that exists on this worker only
    (importable here, so pickled by reference, but not importable on the master)."""
    import types

    mod = sys.modules.get("pydist_worker_only_mod")
    if mod is None:
        mod = types.ModuleType("pydist_worker_only_mod")
        exec("class WorkerOnlyError(Exception):\n    pass\n", mod.__dict__)
        sys.modules["pydist_worker_only_mod"] = mod
    raise mod.WorkerOnlyError(msg)


def raise_worker_exec_error(msg):
    """Raise an exception whose class was made by `exec` into a throw-away namespace here."""
    ns = {"__name__": "pydist_worker_script"}
    exec("class WorkerExecError(Exception):\n    pass\n", ns)
    raise ns["WorkerExecError"](msg)


def call_on(pid, f, *args, **kwargs):
    """Make a remote call from wherever this runs."""
    return pydist.remotecall_fetch(f, pid, *args, **kwargs)


def signal_then_sleep(ch, seconds):
    ch.put(pydist.myid())
    time.sleep(seconds)
    return "woke up"


def signal_then_take(started, ch):
    started.put(pydist.myid())
    return ch.take()


def forget_address_of(pid):
    """On a worker: forget where peer `pid` listens, as if it had joined after us."""
    from pydist.group import PGRP

    PGRP.workers[pid].connect_at = None


def knows_address_of(pid):
    from pydist.group import PGRP

    w = PGRP.workers.get(pid)
    return w is not None and w.connect_at is not None


def has_live_connection(pid):
    from pydist.group import PGRP

    w = PGRP.workers.get(pid)
    return w is not None and w.conn is not None and not w.conn.closed


class _StderrRecorder:
    """Installed as sys.stderr on a worker: records what is written, and passes it on."""

    def __init__(self, orig):
        self.orig = orig
        self.parts: list[str] = []

    def write(self, text):
        self.parts.append(text)
        return self.orig.write(text)

    def flush(self):
        self.orig.flush()

    def __getattr__(self, name):
        return getattr(self.orig, name)


def start_recording_stderr():
    if not isinstance(sys.stderr, _StderrRecorder):
        sys.stderr = _StderrRecorder(sys.stderr)
    sys.stderr.parts.clear()


def recorded_stderr():
    return "".join(sys.stderr.parts) if isinstance(sys.stderr, _StderrRecorder) else ""


def stop_recording_stderr():
    if isinstance(sys.stderr, _StderrRecorder):
        sys.stderr = sys.stderr.orig


class Counter:
    def __init__(self, n):
        self.n = n

    def bump(self, by=1, *, times=1):
        self.n += by * times
        return (pydist.myid(), self.n)


def _unused_pid():
    from pydist.group import PGRP

    return 99 if PGRP.next_pid <= 99 else PGRP.next_pid + 1_000_000


def _master_channel(size=math.inf):
    """A RemoteChannel owned by the master, that workers can put into."""
    return pydist.RemoteChannel(lambda: pydist.Channel(size))


def _run_in_thread(fn, *args, **kwargs):
    """Run `fn` in a daemon thread; returns (thread, box) where box gets 'value' or 'error'
    and 'finished_at' (monotonic time when it finished)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e
        box["finished_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ==================================================================== 1. what can be called
def test_module_function_by_reference_with_args_and_kwargs(two_workers):
    w = two_workers[0]
    assert pydist.remotecall_fetch(f_args, w, 1) == 1
    assert pydist.remotecall_fetch(f_args, w, 1, 2, kw1=3, kw2=4) == 10
    assert pydist.remotecall_fetch(f_args, w, 1, kw2=100) == 101
    assert pydist.remotecall(f_args, w, 1, 2, kw1=3).fetch(timeout=30) == 6
    fut = pydist.remotecall_wait(f_args, w, 5, v2=5, kw1=5, kw2=5)
    assert isinstance(fut, pydist.Future)
    assert fut.isready()
    assert fut.fetch() == 20
    assert pydist.remotecall_fetch(pid_and, w, "x", tag="kw") == (w, "x", "kw")
    # tests/ is on the workers' sys.path: the function travels by reference
    assert pydist.remotecall_fetch(by_reference_probe, w) is True


def test_remote_do_with_args_and_kwargs_runs_on_the_worker(two_workers):
    w = two_workers[1]
    ch = _master_channel()
    assert pydist.remote_do(put_into, w, ch, 42, extra={"k": 1}) is None
    assert ch.take(timeout=30) == (w, 42, {"k": 1})
    pydist.remote_do(lambda c, v, *, plus: c.put((pydist.myid(), v + plus)), w, ch, 1, plus=2)
    assert ch.take(timeout=30) == (w, 3)


def test_lambdas_and_closures_by_value(two_workers):
    w = two_workers[0]
    assert pydist.remotecall_fetch(lambda x, y=1: (x * y, pydist.myid()), w, 3, y=4) == (12, w)

    base = [10, 20, 30]
    offset = 7

    def closure(i, *, scale=1):
        return base[i] * scale + offset

    assert pydist.remotecall_fetch(closure, w, 1, scale=2) == 47
    assert pydist.remotecall(closure, w, 2).fetch(timeout=30) == 37

    def make_adder(k):
        return lambda x: x + k + offset

    assert pydist.remotecall_wait(make_adder(100), w, 1).fetch() == 108


def test_functions_and_classes_defined_by_exec_in_a_main_like_namespace(two_workers):
    w = two_workers[1]
    for modname in ("__main__", "pydist_fake_user_script"):
        ns = {"__name__": modname}
        exec(
            "import os\n"
            "SCALE = 3\n"
            "def square_plus(x, *, plus=0):\n"
            "    return x * x * SCALE + plus, os.getpid()\n"
            "class Acc:\n"
            "    def __init__(self, k):\n"
            "        self.k = k\n"
            "    def add(self, x):\n"
            "        return self.k + x\n",
            ns,
        )
        value, ospid = pydist.remotecall_fetch(ns["square_plus"], w, 2, plus=1)
        assert value == 13
        assert ospid != os.getpid()
        assert pydist.remotecall_fetch(ns["Acc"](5).add, w, 3) == 8
        assert pydist.remotecall(ns["square_plus"], w, 1).fetch(timeout=30)[0] == 3


def test_functions_by_value_see_their_current_globals_closure_and_defaults(two_workers):
    """Functions sent by value reuse their pickled bytes only while nothing they see changed."""
    w = two_workers[0]
    ns: dict = {"__name__": "__main__"}
    exec(textwrap.dedent("""
        scale = 2
        items = [1]
        def scaled(x): return x * scale
        def count(): return len(items)
        def default(a=3): return a
        def make(v): return lambda: v
    """), ns)
    assert pydist.remotecall_fetch(ns["scaled"], w, 5) == 10
    ns["scale"] = 3
    assert pydist.remotecall_fetch(ns["scaled"], w, 5) == 15
    assert pydist.remotecall_fetch(ns["count"], w) == 1
    ns["items"].append(2)  # mutated in place: never served from the cache
    assert pydist.remotecall_fetch(ns["count"], w) == 2
    assert pydist.remotecall_fetch(ns["default"], w) == 3
    ns["default"].__defaults__ = (4,)
    assert pydist.remotecall_fetch(ns["default"], w) == 4
    assert [pydist.remotecall_fetch(ns["make"](v), w) for v in (5, 6)] == [5, 6]
    for _ in range(3):  # the same function, unchanged, again and again
        assert pydist.remotecall_fetch(ns["scaled"], w, 1) == 3


def _function_loads() -> tuple[int, int]:
    """(hits, misses) of this process's cache of functions received by value."""
    info = serialization._load_function.cache_info()
    return info.hits, info.misses


def test_a_function_sent_by_value_is_unpickled_once_while_unchanged(two_workers):
    """The same bytes come with every call of an unchanged function: the worker unpickles
    them once. What the function sees changing makes new bytes, loaded anew."""
    w = two_workers[0]
    ns: dict = {"__name__": "__main__"}
    exec("scale = 2\ndef scaled(x): return x * scale\n", ns)
    hits0, misses0 = pydist.remotecall_fetch(_function_loads, w)
    assert [pydist.remotecall_fetch(ns["scaled"], w, x) for x in range(5)] == [0, 2, 4, 6, 8]
    hits1, misses1 = pydist.remotecall_fetch(_function_loads, w)
    assert (hits1 - hits0, misses1 - misses0) == (4, 1)
    ns["scale"] = 3
    assert pydist.remotecall_fetch(ns["scaled"], w, 1) == 3
    assert pydist.remotecall_fetch(_function_loads, w)[1] == misses1 + 1
    # A closure over a large constant is unpickled each time rather than kept.
    big = bytes(serialization.LOADED_BY_VALUE_MAX_BYTES + 1)
    assert [pydist.remotecall_fetch(lambda: len(big), w) for _ in range(2)] == [len(big)] * 2
    assert pydist.remotecall_fetch(_function_loads, w)[1] == misses1 + 1


def test_a_function_sent_by_value_keeps_the_globals_it_rebinds_on_a_worker(two_workers):
    """One function object per worker while the sender's is unchanged (as in dask and Ray):
    a global it rebinds there keeps its value between calls, per worker, until the sender's
    function sees something new."""
    w1, w2 = two_workers
    ns: dict = {"__name__": "__main__"}
    exec("calls = 0\ndef bump():\n    global calls\n    calls += 1\n    return calls\n", ns)
    assert [pydist.remotecall_fetch(ns["bump"], w1) for _ in range(3)] == [1, 2, 3]
    assert pydist.remotecall_fetch(ns["bump"], w2) == 1
    assert ns["calls"] == 0  # the master's own is untouched
    ns["calls"] = 10  # the sender's changes: sent again, from there
    assert pydist.remotecall_fetch(ns["bump"], w1) == 11


def test_builtin_function_and_bound_method(two_workers):
    w1, w2 = two_workers
    p1 = pydist.remotecall_fetch(os.getpid, w1)
    p2 = pydist.remotecall_fetch(os.getpid, w2)
    assert len({p1, p2, os.getpid()}) == 3
    assert p1 == worker_ospid(w1)

    c = Counter(10)
    assert pydist.remotecall_fetch(c.bump, w1, 2, times=3) == (w1, 16)
    assert c.n == 10  # the worker worked on a copy
    assert pydist.remotecall(c.bump, w2).fetch(timeout=30) == (w2, 11)
    assert pydist.remotecall_fetch(len, w1, [1, 2, 3]) == 3
    assert pydist.remotecall_fetch(sorted, w2, [3, 1, 2], reverse=True) == [3, 2, 1]


# ==================================================================== 2. local calls
def test_local_call_shares_arguments_by_reference(two_workers):
    me = pydist.myid()
    assert me == 1
    v = ["original", 2]
    out = pydist.remotecall_fetch(mutate_first, me, v)
    assert out is v
    assert v == ["changed", 2]

    v2 = ["original", 2]
    assert pydist.remotecall(mutate_first, me, v2).fetch(timeout=30) is v2
    assert v2[0] == "changed"
    v3 = ["original", 2]
    assert pydist.remotecall_wait(mutate_first, me, v3).fetch() is v3
    assert v3[0] == "changed"


def test_remote_call_copies_arguments_and_result(two_workers):
    w = two_workers[0]
    v = ["original", 2]
    out = pydist.remotecall_fetch(mutate_first, w, v)
    assert v == ["original", 2]
    assert out == ["changed", 2]
    assert out is not v


def test_unpicklable_arguments_are_fine_locally_but_not_remotely(two_workers):
    lock = threading.Lock()
    assert pydist.remotecall_fetch(identity, pydist.myid(), lock) is lock
    assert pydist.remotecall_fetch(lambda l: l, 1, lock) is lock
    with pytest.raises(pydist.SerializationError):
        pydist.remotecall_fetch(identity, two_workers[0], lock)
    # the failed send did not disturb the connection
    assert pydist.remotecall_fetch(pydist.myid, two_workers[0]) == two_workers[0]


# ==================================================================== 3. errors
def test_remote_error_is_a_remote_exception_with_traceback(two_workers):
    w = two_workers[0]
    fails = lambda: 1 / 0  # noqa: E731 - marker-lambda-line
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(fails, w)
    e = info.value
    assert e.pid == w
    text = str(e)
    assert text.startswith(f"On worker {w}:\n")
    assert "ZeroDivisionError" in text
    assert "marker-lambda-line" in text  # the lambda's source line, read on the worker
    assert "<lambda>" in text
    assert isinstance(e.captured, pydist.CapturedException)
    assert type(e.captured.ex) is ZeroDivisionError
    assert "ZeroDivisionError" in e.captured.traceback
    # also catchable as the original type
    with pytest.raises(ZeroDivisionError) as info2:
        pydist.remotecall_fetch(divide_by_zero, w)
    assert isinstance(info2.value, pydist.RemoteException)
    assert "marker-divide-by-zero" in str(info2.value)
    assert info2.value.pid == w


def test_local_call_error_is_a_remote_exception_too(two_workers):
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(divide_by_zero, 1)
    assert info.value.pid == 1
    assert type(info.value.captured.ex) is ZeroDivisionError
    assert isinstance(info.value, ZeroDivisionError)


def test_custom_exception_type_is_rebuilt(two_workers):
    w = two_workers[1]
    with pytest.raises(CustomError) as info:
        pydist.remotecall_fetch(raise_custom, w, 7, text="boom seven")
    e = info.value
    assert isinstance(e, pydist.RemoteException)
    assert e.pid == w
    assert type(e.captured.ex) is CustomError
    assert e.captured.ex.code == 7
    assert e.captured.ex.text == "boom seven"
    assert "boom seven" in str(e)
    assert "CustomError" in str(e)


def test_exception_class_not_importable_on_master_becomes_remote_error(two_workers):
    w = two_workers[0]
    assert "pydist_worker_only_mod" not in sys.modules
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(raise_worker_only_error, w, "only over there")
    e = info.value
    assert e.pid == w
    ex = e.captured.ex
    assert isinstance(ex, pydist.RemoteError)
    assert "WorkerOnlyError" in ex.type_name
    assert ex.message == "only over there"
    assert "WorkerOnlyError" in str(e) and "only over there" in str(e)
    assert str(e).startswith(f"On worker {w}:\n")
    assert "pydist_worker_only_mod" not in sys.modules
    # the worker is still fine
    assert pydist.remotecall_fetch(pydist.myid, w) == w


def test_exception_class_made_by_exec_on_worker_keeps_name_and_message(two_workers):
    w = two_workers[1]
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(raise_worker_exec_error, w, "exec'd there")
    ex = info.value.captured.ex
    name = ex.type_name if isinstance(ex, pydist.RemoteError) else type(ex).__name__
    assert name.endswith("WorkerExecError")
    assert "exec'd there" in str(ex)
    assert "WorkerExecError" in str(info.value)


def test_future_fetch_and_remotecall_wait_raise_the_remote_exception(two_workers):
    w = two_workers[0]
    fut = pydist.remotecall(divide_by_zero, w)
    with pytest.raises(pydist.RemoteException) as info:
        fut.fetch(timeout=30)
    assert info.value.pid == w
    assert type(info.value.captured.ex) is ZeroDivisionError
    with pytest.raises(ZeroDivisionError):
        fut.wait(timeout=30)
    with pytest.raises(CustomError) as info2:
        pydist.remotecall_wait(raise_custom, w, 3)
    assert isinstance(info2.value, pydist.RemoteException)
    assert info2.value.pid == w
    assert info2.value.captured.ex.code == 3


def test_remote_do_error_is_printed_on_worker_and_not_raised(two_workers):
    w = two_workers[1]
    pydist.remotecall_fetch(start_recording_stderr, w)
    try:
        assert pydist.remote_do(raise_custom, w, 11, text="remote-do-failure-marker") is None
        # the worker keeps serving
        assert pydist.remotecall_fetch(pydist.myid, w) == w
        assert pydist.remotecall_fetch(f_args, w, 1, 1) == 2

        def printed_on_worker():
            text = pydist.remotecall_fetch(recorded_stderr, w)
            return text if "remote-do-failure-marker" in text else None

        printed = wait_until(printed_on_worker, timeout=15,
                             what="the remote_do error printed on the worker")
        assert "CustomError" in printed
        assert str(w) in printed
    finally:
        pydist.remotecall_fetch(stop_recording_stderr, w)


def test_nested_failure_wraps_the_inner_remote_exception(fresh_workers):
    # two separate addprocs calls, so that this test does not depend on the address exchange
    # between workers started together (see test_all_to_all_lazy_worker_to_worker_...)
    (a,) = fresh_workers(1)
    (b,) = fresh_workers(1)
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(call_on, a, b, divide_by_zero)
    outer = info.value
    assert outer.pid == a
    inner = outer.captured.ex
    assert isinstance(inner, pydist.RemoteException)
    assert inner.pid == b
    assert type(inner.captured.ex) is ZeroDivisionError
    assert str(outer).startswith(f"On worker {a}:\n")
    assert f"On worker {b}:" in str(outer)


# ==================================================================== 4. unknown / removed pids
def test_unknown_pid_is_a_value_error(two_workers):
    bogus = _unused_pid()
    msg = f"no process with id {bogus} exists"
    with pytest.raises(ValueError) as info:
        pydist.remotecall_fetch(pydist.myid, bogus)
    assert str(info.value) == msg
    for call in (pydist.remotecall, pydist.remotecall_wait, pydist.remote_do):
        with pytest.raises(ValueError, match=msg):
            call(pydist.myid, bogus)


def test_removed_pid_raises_process_exited_at_once(fresh_workers):
    (w,) = fresh_workers(1)
    assert pydist.remotecall_fetch(pydist.myid, w) == w
    pydist.rmprocs(w, waitfor=30)
    assert w not in pydist.procs()
    for call in (pydist.remotecall_fetch, pydist.remotecall, pydist.remotecall_wait,
                 pydist.remote_do):
        t0 = time.monotonic()
        with pytest.raises(pydist.ProcessExitedException) as info:
            call(pydist.myid, w)
        assert time.monotonic() - t0 < 2.0
        assert type(info.value) is pydist.ProcessExitedException
        assert info.value.worker_id == w


# ==================================================================== 5. death of a worker
def test_killed_worker_fails_every_waiter_promptly(fresh_workers):
    (w,) = fresh_workers(1)
    ospid = worker_ospid(w)
    started = _master_channel()

    t_fetch, box_fetch = _run_in_thread(pydist.remotecall_fetch, signal_then_sleep, w, started, 60)
    futures = [pydist.remotecall(signal_then_sleep, w, started, 60) for _ in range(3)]
    t_wait, box_wait = _run_in_thread(pydist.remotecall_wait, signal_then_sleep, w, started, 60)
    for _ in range(5):  # all five calls are running on the worker
        assert started.take(timeout=30) == w

    def wait_future(f):
        return f.wait(timeout=30)

    t_fwait, box_fwait = _run_in_thread(wait_future, futures[0])

    killed_at = time.monotonic()
    os.kill(ospid, signal.SIGKILL)

    for t in (t_fetch, t_wait, t_fwait):
        t.join(timeout=15)
        assert not t.is_alive(), "a waiter hung after its worker was killed"
    for box in (box_fetch, box_wait, box_fwait):
        err = box.get("error")
        assert type(err) is pydist.ProcessExitedException, box
        assert err.worker_id == w
        assert box["finished_at"] - killed_at < 5.0
    for fut in futures:
        with pytest.raises(pydist.ProcessExitedException) as info:
            fut.fetch(timeout=15)
        assert type(info.value) is pydist.ProcessExitedException
        assert info.value.worker_id == w
    assert time.monotonic() - killed_at < 10.0

    wait_until(lambda: w not in pydist.workers(), timeout=10, what=f"worker {w} to be dropped")
    assert w not in pydist.procs()
    t0 = time.monotonic()
    with pytest.raises(pydist.ProcessExitedException):
        pydist.remotecall_fetch(pydist.myid, w)
    with pytest.raises(pydist.ProcessExitedException):
        pydist.remotecall(pydist.myid, w)
    with pytest.raises(pydist.ProcessExitedException):
        pydist.remote_do(pydist.myid, w)
    assert time.monotonic() - t0 < 2.0


# ==================================================================== 6. concurrency on a worker
def test_calls_blocked_in_take_do_not_block_other_calls(two_workers):
    w = two_workers[0]
    ch = pydist.RemoteChannel(lambda: pydist.Channel(1), w)
    assert ch.where == w
    started = _master_channel()
    futures = [pydist.remotecall(signal_then_take, w, started, ch) for _ in range(5)]
    for _ in range(5):
        assert started.take(timeout=30) == w
    assert not any(f.isready() for f in futures)
    # the worker still answers while five of its calls are blocked
    assert pydist.remotecall(pydist.myid, w).fetch(timeout=10) == w
    assert pydist.remotecall(f_args, w, 2, 3).fetch(timeout=10) == 5
    for i in range(5):
        ch.put(i, timeout=30)
    assert sorted(f.fetch(timeout=30) for f in futures) == [0, 1, 2, 3, 4]


# ==================================================================== 7. thread safety
def test_many_master_threads_calling_concurrently(two_workers):
    ws = list(two_workers)
    n_threads, n_calls = 8, 200
    errors: list = []
    counts = [0] * n_threads

    def hammer(t):
        try:
            for i in range(n_calls):
                w = ws[(t + i) % 2]
                x = t * 10_000 + i
                got = pydist.remotecall_fetch(pid_and, w, x, tag=f"{t}-{i}")
                if got != (w, x, f"{t}-{i}"):
                    errors.append((t, i, w, got))
                    return
                counts[t] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=hammer, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "some caller threads hung"
    assert errors == []
    assert counts == [n_calls] * n_threads


def test_one_caller_per_new_worker_while_workers_join(fresh_workers):
    """Each fresh worker is called from its own thread right after it joins, while the master
    still sends it start-up messages (a pool thread handed two pieces of work at once once
    made one of them wait forever behind a worker's reading loop)."""
    for _ in range(4):
        pids = fresh_workers(3)
        errors: list = []

        def hit(p):
            try:
                for _ in range(100):
                    assert pydist.remotecall_fetch(pydist.myid, p) == p
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=hit, args=(p,), daemon=True) for p in pids]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in threads), "a caller hung"
        assert errors == []
        pydist.rmprocs(pids, waitfor=60)


def call_that_waits_for_a_later_message(ch):
    """Runs on a worker: blocks until the master's next call on the same connection puts."""
    return ch.take()


def test_a_call_waiting_for_the_next_message_on_its_connection(two_workers):
    w = two_workers[0]
    ch = pydist.RemoteChannel(lambda: pydist.Channel(1), w)
    for i in range(20):  # the waiting call holds the reading role until it is taken back
        fut = pydist.remotecall(call_that_waits_for_a_later_message, w, ch)
        pydist.remotecall_fetch(put_value, w, ch, i)
        assert fut.fetch(timeout=30) == i


def put_value(ch, value):
    ch.put(value)


def watchdog_awake() -> bool:
    from pydist.threads import WATCHDOG
    return WATCHDOG.awake


def take_noting_the_watchdog(ch):
    """Runs on a worker: whether its watchdog ticked as this call began, and what it took."""
    return watchdog_awake(), ch.take()


def note_who_wakes_the_watchdog():
    """Runs on a worker: from now on, count the callers of its watchdog's `watch` by name."""
    import collections

    from pydist import threads

    wd = threads.WATCHDOG
    if not hasattr(wd, "callers"):
        wd.callers = collections.Counter()
        watch = wd.watch

        def counting(conn):
            wd.callers[sys._getframe(1).f_code.co_name] += 1
            return watch(conn)

        wd.watch = counting
    wd.callers.clear()


def who_woke_the_watchdog() -> dict:
    from pydist import threads

    return dict(threads.WATCHDOG.callers)


def test_a_call_lent_the_role_while_the_watchdog_sleeps_lets_the_next_message_in(two_workers):
    """A worker whose watchdog sleeps lends the reading role to a call without waking it;
    the poller then watches the socket, and a frame that arrives while the call runs (here
    the call it waits for) is read: the poller takes the role back, without the watchdog."""
    w = two_workers[0]
    ch = pydist.RemoteChannel(lambda: pydist.Channel(1), w)
    pydist.remotecall_fetch(note_who_wakes_the_watchdog, w)
    asleep_runs = 0
    for i in range(10):
        wait_until(lambda: not pydist.remotecall_fetch(watchdog_awake, w), timeout=30,
                   what="the worker's watchdog to sleep")
        time.sleep(0.05)  # (the call that asked may have woken it for one more tick)
        fut = pydist.remotecall(take_noting_the_watchdog, w, ch)
        time.sleep(0.02)  # the call has begun and waits
        pydist.remote_do(put_value, w, ch, i)
        awake, got = fut.fetch(timeout=30)
        assert got == i
        asleep_runs += not awake
    assert asleep_runs > 0, "the watchdog never slept as a call began: the path is untested"
    callers = pydist.remotecall_fetch(who_woke_the_watchdog, w)
    assert "_take_back" not in callers and "_on_readable" not in callers, callers


def set_promote_after(seconds: float) -> None:
    from pydist.threads import _Watchdog

    _Watchdog.PROMOTE_AFTER = seconds


def mark_then_spin(path: str, seconds: float) -> None:
    """Runs on a worker: create `path` (the call has started), then compute for `seconds`
    (a call that waits would give its reading role back at once)."""
    open(path, "w").close()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_frame_behind_a_young_lent_call_waits_for_the_poller_timer(fresh_workers, tmp_path):
    """A frame that arrives while a lent call (computing) is younger than PROMOTE_AFTER
    (stretched to 1 s here) is left to that call's thread; the poller looks again when the
    call reaches that age, and takes the role back then, without waking the watchdog."""
    w = fresh_workers(1)[0]
    pydist.remotecall_fetch(set_promote_after, w, 1.0)
    pydist.remotecall_fetch(note_who_wakes_the_watchdog, w)
    wait_until(lambda: not pydist.remotecall_fetch(watchdog_awake, w), timeout=30,
               what="the worker's watchdog to sleep")
    started = tmp_path / "started"
    slow = pydist.remotecall(mark_then_spin, w, str(started), 4)
    wait_until(started.exists, timeout=30, what="the slow call to start")
    t0 = time.monotonic()  # the slow call runs, lent the role; now a quick call arrives
    assert pydist.remotecall_fetch(pydist.myid, w) == w
    waited = time.monotonic() - t0
    assert 0.5 < waited < 3.0, f"the quick call was answered after {waited:.2f} s"
    assert slow.fetch(timeout=30) is None
    callers = pydist.remotecall_fetch(who_woke_the_watchdog, w)
    assert "_take_back" not in callers and "_on_readable" not in callers, callers


def go_without_kernel_timer() -> None:
    """Runs on a worker: its poller has no kernel timer from now on (as where the kernel has
    no timerfd), so the watchdog times the calls of a burst."""
    from pydist import threads

    poller = threads._get_poller()
    poller._no_alarms, poller._alarms = True, None
    connection(1)._alarms = None


@pytest.mark.parametrize("timer", ["kernel timer", "watchdog"])
def test_a_long_call_with_calls_queued_behind_it_gives_them_the_role(fresh_workers, tmp_path,
                                                                      timer):
    """Calls read together (a burst) wait behind the one that runs. If it runs longer than
    PROMOTE_AFTER (1 s here), the reading role is taken back from it, so the calls behind it
    run meanwhile: through the poller's kernel timer, set once for the burst, which wakes no
    thread while the calls are short (the watchdog's wake-up and its fight with the calls'
    thread for the GIL cost more than a burst of tiny calls); where there is no kernel
    timer, the watchdog does it."""
    w = fresh_workers(1)[0]
    pydist.remotecall_fetch(set_promote_after, w, 1.0)
    if timer == "watchdog":
        pydist.remotecall_fetch(go_without_kernel_timer, w)
    pydist.remotecall_fetch(note_who_wakes_the_watchdog, w)
    wait_until(lambda: not pydist.remotecall_fetch(watchdog_awake, w), timeout=30,
               what="the worker's watchdog to sleep")
    first, second = tmp_path / "first", tmp_path / "second"
    slow = pydist.remotecall(mark_then_spin, w, str(first), 3)
    wait_until(first.exists, timeout=30, what="the first slow call to start")
    # Sent while it runs: both are read at once when the poller takes the role back from it
    # (after 1 s), so the quick call waits behind the second slow one (8 s).
    t0 = time.monotonic()
    slower = pydist.remotecall(mark_then_spin, w, str(second), 8)
    quick = pydist.remotecall(pydist.myid, w)
    assert quick.fetch(timeout=60) == w
    waited = time.monotonic() - t0
    assert second.exists(), "the quick call did not wait behind the second slow one"
    assert waited < 6.0, f"the quick call waited {waited:.1f} s: until the slow call ended"
    assert slow.fetch(timeout=60) is None and slower.fetch(timeout=60) is None
    callers = pydist.remotecall_fetch(who_woke_the_watchdog, w)
    if timer == "kernel timer":
        assert "_serve_taken" not in callers, callers
    else:
        assert callers.get("_serve_taken", 0) > 0, callers


_GATE: dict = {}


def _gate():
    """Runs on a worker: this process's gate (an Event and a Queue), made once."""
    import queue

    if not _GATE:
        _GATE["event"], _GATE["queue"] = threading.Event(), queue.Queue()
    return _GATE


def wait_at_the_gate(kind: str, path: str) -> str:
    """Runs on a worker: create `path` (the call has started), then wait until `open_the_gate`
    runs, in one of the ways a call waits: a sleep, an Event, a Queue, another process's reply."""
    gate = _gate()
    open(path, "w").close()
    if kind == "sleep":
        while not gate["event"].is_set():
            time.sleep(0.01)
    elif kind == "event":
        assert gate["event"].wait(120)
    elif kind == "queue":
        gate["queue"].get(timeout=120)
    elif kind == "reply":
        while not gate["event"].is_set():
            pydist.remotecall_fetch(time.sleep, 1, 0.01)
    return kind


def open_the_gate() -> None:
    gate = _gate()
    gate["event"].set()
    gate["queue"].put(None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sleep", "event", "queue", "reply"])
def test_a_call_that_waits_gives_its_reading_role_back_at_once(fresh_workers, tmp_path, kind):
    """A call that waits (here for a call sent behind it on the same connection) gives the
    reading role lent to it back as it begins to wait, so the frame behind it is read now: not
    once the watchdog or the poller takes the role back (stretched to 60 s here, beyond the
    bounds below)."""
    w = fresh_workers(1)[0]
    pydist.remotecall_fetch(set_promote_after, w, 60.0)
    started = tmp_path / "started"
    waiting = pydist.remotecall(wait_at_the_gate, w, kind, str(started))
    wait_until(started.exists, timeout=30, what="the waiting call to start")
    pydist.remotecall(open_the_gate, w).fetch(timeout=30)  # behind it: read only if given back
    assert waiting.fetch(timeout=30) == kind


def count_reference_count_frames() -> None:
    """Runs on a worker: count the REFS frames it receives from now on."""
    from pydist import dispatch, protocol

    if not hasattr(dispatch, "refs_frames"):
        handle = dispatch.HANDLERS[protocol.REFS]

        def counting(conn, msg):
            dispatch.refs_frames += 1
            return handle(conn, msg)

        dispatch.HANDLERS[protocol.REFS] = counting
    dispatch.refs_frames = 0


def reference_count_frames() -> int:
    from pydist import dispatch

    return dispatch.refs_frames


def stored_values() -> int:
    from pydist.refs import STORE

    return len(STORE)


def test_results_streaming_from_a_worker_cost_it_few_count_messages(fresh_workers):
    """Each pushed result gives its count back to the worker; those give-backs reach one
    worker at most once per OWNER_INTERVAL (a message wakes the worker), and none is lost:
    the worker frees every value."""
    from pydist import refs

    w = fresh_workers(1)[0]
    pydist.remotecall_fetch(count_reference_count_frames, w)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 1.0:
        assert pydist.remotecall(pydist.myid, w).fetch(timeout=30) == w
        n += 1
    elapsed = time.monotonic() - t0
    wait_until(lambda: pydist.remotecall_fetch(stored_values, w) == 0, timeout=30,
               what="the worker to free every result")
    frames = pydist.remotecall_fetch(reference_count_frames, w)
    assert n > 50, f"only {n} calls in {elapsed:.1f} s"
    assert 1 <= frames <= elapsed / refs.OWNER_INTERVAL + 3, f"{frames} REFS frames for {n} results"


def test_a_caller_reads_its_own_reply_and_the_poller_never_wakes_for_it(two_workers):
    """`remotecall_fetch` takes the connection's reading role before its request leaves, so
    the poller (which watches the socket while nobody reads it) never wakes for the reply."""
    w = two_workers[0]
    conn = connection(w)
    for _ in range(20):
        pydist.remotecall_fetch(pydist.myid, w)
    wakes = []
    conn._on_events = lambda ev, on_events=conn._on_events: (wakes.append(ev), on_events(ev))
    try:
        for _ in range(300):
            assert pydist.remotecall_fetch(pydist.myid, w) == w
    finally:
        del conn._on_events
    assert wakes == []


def call_back_with(payload: bytes) -> int:
    """Runs on a worker: send `payload` back to the master in a call, return what it saw."""
    return pydist.remotecall_fetch(len, 1, payload) + len(payload)


def test_requests_that_fill_the_socket_buffer_from_many_threads_both_ways(two_workers):
    """Requests up to REQUEST_READ_FIRST are sent by a thread that already reads the
    connection: what the socket does not take (every write, with PYDIST_SOCKET_BUFFER=4096)
    is written by the poller while that thread reads. Many threads, both directions."""
    from pydist.transport import REQUEST_READ_FIRST

    w = two_workers[0]

    def hammer(k: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(30):
                payload = bytes([k]) * (REQUEST_READ_FIRST - 4096 * (i % 8) - 200)
                assert pydist.remotecall_fetch(call_back_with, w, payload) == 2 * len(payload)
        return run

    assert run_threads([hammer(k) for k in range(8)], bound=120) == []


@pytest.mark.slow
def test_a_reply_queued_behind_a_long_call_is_not_held_by_it(fresh_workers):
    """A worker that has received several calls at once lets their replies leave together
    (Connection.send_reply); a reply must still not wait for a long call queued after it."""
    w = fresh_workers(1)[0]  # a connection that nothing else writes to (no reference counts)
    conn = connection(w)
    kept: list[dict] = []  # dropping a Future would send a count on this connection

    def submit(futures, name, f, *args):
        futures[name] = pydist.remotecall(f, w, *args)

    for _ in range(2):
        # Hold the send lock, so that both calls queue and leave in one write (the worker
        # then reads them together): first a quick one, then a long one.
        futures: dict[str, pydist.Future] = {}
        kept.append(futures)
        with conn._send_lock:
            quick = threading.Thread(target=submit, args=(futures, "quick", pydist.myid))
            quick.start()
            wait_until(lambda: len(conn._outq) >= 1, timeout=10, what="the quick call to queue")
            slow = threading.Thread(target=submit, args=(futures, "slow", time.sleep, 3))
            slow.start()
            wait_until(lambda: len(conn._outq) >= 2, timeout=10, what="the slow call to queue")
        quick.join(10)
        slow.join(10)
        t0 = time.monotonic()
        assert futures["quick"].fetch(timeout=30) == w
        assert time.monotonic() - t0 < 1.5, "the quick call's reply waited for the slow call"
        assert futures["slow"].fetch(timeout=30) is None


@pytest.mark.slow
def test_a_call_that_runs_several_answers_each_as_it_ends(fresh_workers):
    """A pmap lane: one call runs the elements queued behind it, and each reply leaves as its
    element ends, also when the calls were read together (their replies may then wait to
    leave together, but not behind a long element) and the first one computes (so the
    lane's own thread sends its reply)."""
    lanes = sys.modules["pydist.pmap"]  # `pydist.pmap` is the function
    w = fresh_workers(1)[0]
    conn = connection(w)
    futures: dict[int, pydist.Future] = {}

    def submit(seq, seconds):
        futures[seq] = pydist.remotecall(lanes._lane_run, w, "held-lane", seq, spin,
                                         (seconds,))

    with conn._send_lock:  # both leave in one write: the worker reads them together
        first = threading.Thread(target=submit, args=(0, 0.2))
        first.start()
        wait_until(lambda: len(conn._outq) >= 1, timeout=10, what="the first call to queue")
        second = threading.Thread(target=submit, args=(1, 4.0))
        second.start()
        wait_until(lambda: len(conn._outq) >= 2, timeout=10, what="the second call to queue")
    first.join(10)
    second.join(10)
    t0 = time.monotonic()
    assert futures[0].fetch(timeout=30) is None
    assert time.monotonic() - t0 < 2.5, "the first reply waited for the second element"
    assert futures[1].fetch(timeout=30) is None
    pydist.remote_do(lanes._lane_close, w, "held-lane")


def spin(seconds):
    """Computes (holding the GIL) for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def answers_later(value, delay):
    """Takes over its reply and answers from another thread after `delay`."""
    from pydist.calls import take_reply

    reply = take_reply()
    threading.Thread(target=lambda: (time.sleep(delay), reply(True, value))).start()
    return "not the reply"


def takes_its_reply_then_fails():
    from pydist.calls import take_reply

    reply = take_reply()
    reply(True, "answered")
    raise ValueError("after the reply was taken")


@pytest.mark.parametrize("how", ["fetch", "future", "here"])
def test_a_call_can_take_over_its_reply_and_answer_from_another_thread(two_workers, how):
    w = pydist.myid() if how == "here" else two_workers[0]
    t0 = time.monotonic()
    if how == "fetch":
        assert pydist.remotecall_fetch(answers_later, w, 42, 0.3) == 42
    else:
        assert pydist.remotecall(answers_later, w, 42, 0.3).fetch(timeout=30) == 42
    assert time.monotonic() - t0 >= 0.3


def test_what_a_call_does_after_giving_its_reply_away_is_not_its_reply(two_workers):
    assert pydist.remotecall_fetch(takes_its_reply_then_fails, two_workers[0]) == "answered"


def test_take_reply_outside_a_remote_call_is_a_runtime_error():
    from pydist.calls import take_reply

    with pytest.raises(RuntimeError, match="take_reply"):
        take_reply()


# ==================================================================== 7b. calls sent in a burst
_RECORDS: dict = {}


def record(key, item, payload=b"") -> None:
    """Runs on a worker: note `item` under `key` (calls run concurrently: in any order)."""
    _RECORDS.setdefault(key, []).append(item)


def recorded(key) -> list:
    return _RECORDS.get(key, [])


def note_arrivals() -> None:
    """Runs on a worker: from now on, note the (key, item) of every `record` call as its frame
    arrives (in the reading thread, in frame order, before any of them runs): calls keep
    their order on the way, though Julia's rule holds here too: they may run in any order."""
    from pydist import protocol, serialization
    from pydist.dispatch import HANDLERS

    def noting(handle):
        def on_frame(conn, msg):
            f, args, _ = serialization.loads(msg.body, msg.buffers)
            if f is record:
                _RECORDS.setdefault(("arrived", args[0]), []).append(args[1])
            return handle(conn, msg)
        return on_frame

    for kind in (protocol.CALL, protocol.REMOTE_DO):
        HANDLERS[kind] = noting(HANDLERS[kind])


def touch(path: str) -> None:
    open(path, "w").close()


def _burst_until_one_waits(conn, first, second) -> int:
    """Call `first()` then `second(k)` (try k) until the second call is left waiting in
    `conn`'s queue (it is, unless this thread was descheduled for BURST_GAP between the two:
    then try again); returns k."""
    for k in range(200):
        first()
        second(k)
        if conn._soon:
            return k
        time.sleep(0.01)
    raise AssertionError("no call was left waiting in 200 bursts")


def test_calls_sent_in_a_burst_leave_together_and_in_order(fresh_workers):
    """remotecall and remote_do sent in a tight loop wait in the queue to leave together (up
    to MAX_SOON per connection); a large one (never held) leaves behind those before it."""
    from pydist.transport import MAX_SOON

    w = fresh_workers(1)[0]
    pydist.remotecall_fetch(note_arrivals, w)
    conn = connection(w)
    most = 0
    futures = []
    for i in range(600):
        payload = bytes(300_000) if i % 100 == 50 else b""
        if i % 2:
            pydist.remote_do(record, w, "burst", i, payload)
        else:
            futures.append(pydist.remotecall(record, w, "burst", i, payload))
        most = max(most, conn._soon)
    for f in futures:
        assert f.fetch(timeout=60) is None
    assert pydist.remotecall_fetch(recorded, w, ("arrived", "burst")) == list(range(600))
    assert sorted(pydist.remotecall_fetch(recorded, w, "burst")) == list(range(600))
    assert 2 <= most <= MAX_SOON, f"at most {most} calls waited together"


@pytest.mark.timeout(120)
def test_a_call_left_waiting_leaves_on_the_tick_though_nobody_here_waits(fresh_workers, tmp_path):
    """remote_do expects no answer, so no reply makes anyone read (and write) here: the call
    left waiting is written by the poller's tick, though this thread never waits on pydist."""
    w = fresh_workers(1)[0]
    conn = connection(w)
    paths = [tmp_path / f"arrived-{k}" for k in range(200)]
    k = _burst_until_one_waits(conn, lambda: pydist.remote_do(len, w, b""),
                               lambda k: pydist.remote_do(touch, w, str(paths[k])))
    deadline = time.monotonic() + 30
    while not paths[k].exists():  # (a plain sleep: nothing of pydist's runs in this thread)
        assert time.monotonic() < deadline, "the call left waiting never left"
        time.sleep(0.005)
    assert conn._soon == 0


@pytest.mark.timeout(120)
def test_waiting_for_a_reply_first_sends_the_calls_left_waiting(fresh_workers, monkeypatch):
    """With the tick held off, a call left waiting leaves when this thread waits for a reply,
    from that worker or any other. (The first call of each burst is a remote_do: it gets no
    answer, whose reading would send what waits behind it.)"""
    from pydist import transport

    w, v = fresh_workers(2)
    conn = connection(w)
    wait_until(lambda: not transport._SOON._ticking, timeout=30, what="the tick to stop")
    monkeypatch.setattr(transport._SOON, "_ticking", True)  # no tick is set while this holds
    # a reply from another worker
    sent = itertools.count()
    _burst_until_one_waits(conn, lambda: pydist.remote_do(record, w, "wait", next(sent)),
                           lambda k: pydist.remote_do(record, w, "wait", next(sent)))
    assert pydist.remotecall_fetch(identity, v, 1) == 1
    assert conn._soon == 0
    n = next(sent)
    assert sorted(pydist.remotecall_fetch(recorded, w, "wait")) == list(range(n))
    # the Future's own fetch
    futures: dict = {}
    k = _burst_until_one_waits(conn, lambda: pydist.remote_do(len, w, b""),
                               lambda k: futures.__setitem__(k, pydist.remotecall(identity, w, k)))
    assert futures[k].fetch(timeout=30) == k
    assert conn._soon == 0


@pytest.mark.timeout(120)
def test_a_call_left_waiting_for_a_worker_that_died_fails_its_future(fresh_workers):
    """Calls sent in a burst to a worker just killed (some left waiting, as the loss is not
    known yet) all fail with ProcessExitedException; none hangs."""
    w = fresh_workers(1)[0]
    conn = connection(w)
    os.kill(worker_ospid(w), signal.SIGKILL)
    futures: list = []
    for _ in range(50):
        try:
            futures.append(pydist.remotecall(identity, w, 1))
        except pydist.ProcessExitedException:
            break
    for f in futures:
        with pytest.raises(pydist.ProcessExitedException):
            f.fetch(timeout=60)
    assert conn.closed


@pytest.mark.timeout(300)
def test_bursts_from_many_threads_both_ways_keep_each_threads_order(fresh_workers):
    """Eight threads send bursts of small and large calls to two workers (whose calls to
    each other go the other way meanwhile); each thread's calls arrive in order. With
    PYDIST_SOCKET_BUFFER=4096 (CI), the large ones fill the socket: a call sent then is
    queued behind them, never left waiting."""
    a, b = fresh_workers(2)
    for w in (a, b):
        pydist.remotecall_fetch(note_arrivals, w)

    def burst(k: int) -> Callable[[], None]:
        def run() -> None:
            futures = []
            for i in range(150):
                payload = bytes(200_000) if i % 25 == 7 else b""
                for w in (a, b):
                    if i % 3:
                        pydist.remote_do(record, w, ("threads", k), i, payload)
                    else:
                        futures.append(pydist.remotecall(record, w, ("threads", k), i, payload))
            for f in futures:
                assert f.fetch(timeout=120) is None
            for w in (a, b):
                assert pydist.remotecall_fetch(recorded, w, ("arrived", ("threads", k))) == list(range(150))
                assert sorted(pydist.remotecall_fetch(recorded, w, ("threads", k))) == list(range(150))
        return run

    def across(src: int, dst: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(20):
                assert pydist.remotecall_fetch(call_on, src, dst, len, bytes(100_000)) == 100_000
        return run

    assert run_threads([burst(k) for k in range(8)] + [across(a, b), across(b, a)], bound=240) == []


# ==================================================================== 8. many round trips
def test_ten_thousand_sequential_round_trips(two_workers):
    w = two_workers[1]
    t0 = time.monotonic()
    bad = [r for r in (pydist.remotecall_fetch(pydist.myid, w) for _ in range(10_000)) if r != w]
    elapsed = time.monotonic() - t0
    assert bad == []
    assert elapsed < 30.0, f"10,000 round trips took {elapsed:.1f}s"


# ==================================================================== 9. topologies (keep last)
def _unreachable_pairs(ws):
    """(src, dst, what happened) for every ordered pair of workers where src cannot call dst."""
    failures = []
    for src in ws:
        for dst in ws:
            if src != dst:
                try:
                    got = pydist.remotecall_fetch(call_on, src, dst, pydist.myid)
                except pydist.RemoteException as e:
                    got = repr(e)
                if got != dst:
                    failures.append((src, dst, got))
    return failures


@pytest.fixture
def empty_cluster():
    """Remove every worker (the shared ones included): the topology is cluster-wide."""
    others = [p for p in pydist.workers() if p != 1]
    if others:
        pydist.rmprocs(others, waitfor=30)
    assert pydist.workers() == [1]
    yield


@pytest.mark.usefixtures("empty_cluster")
class TestTopologies:
    def test_all_to_all_lazy_worker_to_worker_both_directions(self, fresh_workers):
        # workers started by one addprocs call must all be able to reach each other
        ws = fresh_workers(4)
        assert ws == sorted(ws)
        assert _unreachable_pairs(ws) == []  # lower calls higher and higher calls lower
        a, b = ws[0], ws[1]
        # a call that goes a -> b -> a, with arguments and keywords
        assert pydist.remotecall_fetch(call_on, a, b, call_on, a, pydist.myid) == a
        assert pydist.remotecall_fetch(call_on, b, a, f_args, 1, kw1=2) == 3

    @pytest.mark.parametrize("method", ["spawn", "forkserver"])
    def test_all_to_all_lazy_workers_join_together_and_learn_every_address(self, method,
                                                                           fresh_workers):
        # lazy workers of one addprocs join in parallel (none waits for the lower pids):
        # each learns every member's address by the time addprocs returns
        ws = fresh_workers(6, start_method=method)
        unknown = [(w, o) for w in ws for o in ws
                   if o != w and not pydist.remotecall_fetch(knows_address_of, w, o)]
        assert unknown == []
        assert _unreachable_pairs(ws) == []

    def test_a_worker_that_lacks_a_peers_address_gets_it_from_the_master(self, fresh_workers):
        lo, hi = fresh_workers(2)
        pydist.remotecall_fetch(forget_address_of, hi, lo)
        # higher calls lower: the higher pid dials, and first asks the master where to
        assert pydist.remotecall_fetch(call_on, hi, lo, pydist.myid) == lo
        lo2, hi2 = fresh_workers(2)
        pydist.remotecall_fetch(forget_address_of, hi2, lo2)
        # lower calls higher: the master tells the higher pid where to dial
        assert pydist.remotecall_fetch(call_on, lo2, hi2, pydist.myid) == hi2
        assert pydist.remotecall_fetch(has_live_connection, hi2, lo2)

    def test_all_to_all_lazy_across_separate_addprocs(self, fresh_workers):
        (a,) = fresh_workers(1)
        (b,) = fresh_workers(1)
        assert pydist.remotecall_fetch(call_on, a, b, pydist.myid) == b  # lower calls higher
        assert pydist.remotecall_fetch(call_on, b, a, pydist.myid) == a  # higher calls lower
        assert pydist.remotecall_fetch(call_on, a, b, call_on, a, pydist.myid) == a

    def test_all_to_all_not_lazy_connects_at_addprocs(self, fresh_workers):
        ws = fresh_workers(3, lazy=False)
        # each higher pid dialled every lower one during addprocs, before any call between them
        not_connected = [(hi, lo) for hi in ws for lo in ws
                         if lo < hi and not pydist.remotecall_fetch(has_live_connection, hi, lo)]
        assert not_connected == []
        a, b = ws[0], ws[1]
        wait_until(lambda: pydist.remotecall_fetch(has_live_connection, a, b),
                   timeout=10, what="the lower worker to see the higher one's connection")
        assert _unreachable_pairs(ws) == []

    def test_master_worker_forbids_worker_to_worker_calls(self, fresh_workers):
        a, b = fresh_workers(2, topology="master_worker")
        assert pydist.remotecall_fetch(pydist.myid, a) == a
        assert pydist.remotecall_fetch(pydist.myid, b) == b
        for src, dst in ((a, b), (b, a)):
            with pytest.raises(pydist.RemoteException) as info:
                pydist.remotecall_fetch(call_on, src, dst, pydist.myid)
            assert info.value.pid == src
            assert "master_worker" in str(info.value)
        # master-to-worker calls still work afterwards
        assert pydist.remotecall(f_args, a, 1, 2).fetch(timeout=30) == 3
        assert pydist.remotecall_fetch(pydist.myid, b) == b

    def test_changing_topology_while_workers_exist_is_refused(self, fresh_workers):
        (a,) = fresh_workers(1, topology="master_worker")
        before = pydist.procs()
        with pytest.raises((RuntimeError, ValueError)) as info:
            pydist.addprocs(1)  # default topology: all_to_all
        assert "opology" in str(info.value)
        assert pydist.procs() == before
        with pytest.raises((RuntimeError, ValueError)):
            pydist.addprocs(1, topology="all_to_all")
        assert pydist.procs() == before
        assert pydist.remotecall_fetch(pydist.myid, a) == a

    def test_changing_lazy_while_workers_exist_is_refused(self, fresh_workers):
        fresh_workers(1)  # all_to_all, lazy
        before = pydist.procs()
        with pytest.raises((RuntimeError, ValueError)):
            pydist.addprocs(1, lazy=False)
        assert pydist.procs() == before

    def test_invalid_topology_is_a_value_error(self):
        before = pydist.procs()
        with pytest.raises(ValueError, match="not_a_topology"):
            pydist.addprocs(1, topology="not_a_topology")
        assert pydist.procs() == before

    def test_unknown_addprocs_keyword_is_a_type_error_naming_it(self):
        before = pydist.procs()
        with pytest.raises(TypeError, match="bogus_keyword"):
            pydist.addprocs(1, bogus_keyword=1)
        assert pydist.procs() == before



def test_topology_tests_left_no_workers_behind():
    # runs after TestTopologies: it removed the shared workers, and each test its own
    assert pydist.workers() == [1]
    assert pydist.nprocs() == 1


def _raise_memory_error():
    raise MemoryError("pretend the worker ran out of memory")


def _raise_unicode_decode_error():
    return b"\xff".decode("utf-8")


@pytest.mark.timeout(60)
def test_remote_errors_whose_type_guards_its_constructor_are_caught_by_that_type(two_workers):
    """MemoryError's __new__ refuses foreign subclasses, UnicodeDecodeError's __init__ takes
    five arguments: both still arrive as their own type (and as RemoteException)."""
    w = two_workers[0]
    with pytest.raises(MemoryError) as err:
        pydist.remotecall_fetch(_raise_memory_error, w)
    assert isinstance(err.value, pydist.RemoteException) and err.value.pid == w
    assert "pretend the worker ran out of memory" in str(err.value)
    with pytest.raises(UnicodeDecodeError) as err:
        pydist.remotecall_fetch(_raise_unicode_decode_error, w)
    assert isinstance(err.value, pydist.RemoteException)
    assert "can't decode byte 0xff" in str(err.value)
