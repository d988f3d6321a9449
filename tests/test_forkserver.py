"""Local workers started both ways, `start_method="spawn"` (fresh interpreters) and
`"forkserver"` (forked from a template process): the same behaviour, real processes."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pydist
from pydist import RemoteException
from pydist.group import PGRP
from pydist.managers.local import LocalManager

from conftest import autogroup_of, pid_alive, stop_process, wait_until

METHODS = ["spawn", "forkserver"]


def _cmdline(ospid: int) -> str:
    try:
        with open(f"/proc/{ospid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _facts(_=None) -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "sid": os.getsid(0), "cwd": os.getcwd(), "env": os.environ.get("PYDIST_FS_TEST"),
            "random": random.random(), "id": pydist.myid(), "autogroup": autogroup_of()[0]}


def _started_by(method: str, facts: dict) -> None:
    """Spawned workers are our children, in our session; forked ones the fork server's, in
    its session. Each leads its own process group."""
    if method == "spawn":
        assert facts["ppid"] == os.getpid()
        if sys.version_info >= (3, 11):  # (3.10's Popen has no process_group: a new session)
            assert facts["sid"] == os.getsid(0)
    else:
        assert "pydist.forkserver" in _cmdline(facts["ppid"]), facts
        assert facts["sid"] == facts["ppid"] != os.getsid(0)
    assert facts["pgid"] == facts["pid"]


@pytest.mark.parametrize("method", METHODS)
def test_workers_share_one_scheduling_group(method, fresh_workers):
    """Not a session (so a scheduling group, with autogroup) per worker: forked workers share
    the fork server's, spawned ones the master's. A group per worker would give each a full
    share against the master, which a woken worker would then preempt for every call."""
    if method == "spawn" and sys.version_info < (3, 11):
        pytest.skip("Python 3.10's Popen cannot start a process group in our session")
    ws = fresh_workers(4, start_method=method)
    facts = [pydist.remotecall_fetch(_facts, w) for w in ws]
    assert len({f["sid"] for f in facts}) == 1, facts
    groups = {f["autogroup"] for f in facts}
    if None in groups:
        pytest.skip("no autogroup here (/proc/self/autogroup missing or empty)")
    assert len(groups) == 1, facts
    if method == "spawn":
        assert groups == {autogroup_of()[0]}
    else:
        assert groups != {autogroup_of()[0]}


def test_the_fork_servers_group_yields_to_the_master(fresh_workers):
    """The forked workers' scheduling group (the fork server's session) gets nice
    GROUP_NICE, so that all of them together weigh less than the master when both want a
    CPU; the master's own group keeps its nice. (An unprivileged user may change a group's
    nice once per 0.1 s on the machine: the test needs root, as CI runs.)"""
    from pydist.forkserver import GROUP_NICE

    if os.geteuid() != 0:
        pytest.skip("the kernel rate-limits this change for users other than root")
    before = autogroup_of()[1]
    ws = fresh_workers(2, start_method="forkserver")
    facts = [pydist.remotecall_fetch(_facts, w) for w in ws]
    nices = {autogroup_of(f["pid"])[1] for f in facts}
    if None in nices:
        pytest.skip("no autogroup here (/proc/<pid>/autogroup missing or empty)")
    assert nices == {GROUP_NICE} != {before}
    assert len({f["autogroup"] for f in facts}) == 1
    assert autogroup_of(facts[0]["ppid"])[1] == GROUP_NICE  # (the template itself)
    assert "--yield-to-master" in _cmdline(facts[0]["ppid"])
    assert autogroup_of()[1] == before


@pytest.mark.parametrize("method", METHODS)
def test_ids_dir_env_and_distinct_processes(method, fresh_workers, tmp_path):
    ws = fresh_workers(3, start_method=method, dir=str(tmp_path), env={"PYDIST_FS_TEST": "yes"})
    facts = [pydist.remotecall_fetch(_facts, w, w) for w in ws]  # (other workers may exist)
    assert [f["id"] for f in facts] == ws
    for f in facts:
        _started_by(method, f)
        assert f["cwd"] == str(tmp_path)
        assert f["env"] == "yes"
    assert len({f["pid"] for f in facts}) == 3
    assert len({f["random"] for f in facts}) == 3  # re-seeded in each child
    assert pydist.remotecall_fetch(lambda a, b: a * b, ws[1], 6, 7) == 42


@pytest.mark.parametrize("method", METHODS)
def test_output_relay(method, fresh_workers, capsys):
    (w,) = fresh_workers(1, start_method=method)
    pydist.remotecall_fetch(lambda: print("hello from the worker") or
                            print("and its stderr", file=sys.stderr), w)
    seen = []

    def relayed() -> bool:
        seen.append(capsys.readouterr().out)
        text = "".join(seen)
        return (f"From worker {w}:\thello from the worker" in text
                and f"From worker {w}:\tand its stderr" in text)

    wait_until(relayed, timeout=30, what="the worker's output relayed")


def _sleeper(started):
    started.put("sleeping")
    time.sleep(60)


@pytest.mark.parametrize("method", METHODS)
def test_interrupt(method, fresh_workers):
    (w,) = fresh_workers(1, start_method=method)
    started = pydist.RemoteChannel(lambda: pydist.Channel(1), w)
    fut = pydist.remotecall(_sleeper, w, started)
    assert started.take(timeout=30) == "sleeping"
    pydist.interrupt(w)
    with pytest.raises(RemoteException) as info:
        fut.fetch(timeout=30)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert pydist.remotecall_fetch(pydist.myid, w) == w


@pytest.mark.parametrize("method", METHODS)
def test_rmprocs_escalates_to_sigkill(method, request):
    manager = LocalManager(1, exit_timeout=0.5, term_timeout=0.5, start_method=method)
    (w,) = pydist.addprocs(manager)
    proc = PGRP.workers[w].config.process
    ospid = proc.pid
    request.addfinalizer(lambda: pid_alive(ospid) and os.kill(ospid, signal.SIGKILL))
    stop_process(ospid)  # it will not obey EXIT; SIGTERM stays pending
    pydist.rmprocs(w, waitfor=30)
    assert proc.wait(30) == -signal.SIGKILL
    assert proc.poll() == proc.returncode == -signal.SIGKILL
    wait_until(lambda: not pid_alive(ospid), timeout=10, what="the stopped worker gone")


SLOW_SHUTDOWN = 10.0  # (rmprocs must return well before: a margin for a slow machine)


def _slow_listener_close() -> None:
    """On a worker: its main thread's shutdown (which joins the listener thread) takes
    SLOW_SHUTDOWN seconds."""
    from pydist.group import PGRP as group

    close = group.listener.close

    def slow(*args, **kwargs):
        time.sleep(SLOW_SHUTDOWN)
        return close(*args, **kwargs)

    group.listener.close = slow


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_counts_as_gone_once_it_has_read_exit_not_after_its_shutdown(method,
                                                                            fresh_workers):
    """The exit request closes the worker's connections in the thread that reads it: the
    removal does not wait for the main thread's shutdown (here made 10 s slow), which then
    still runs to its end: the process exits with code 0."""
    (w,) = fresh_workers(LocalManager(1, exit_timeout=30, start_method=method))
    pydist.remotecall_fetch(_slow_listener_close, w)
    proc = PGRP.workers[w].config.process
    t0 = time.monotonic()
    pydist.rmprocs(w, waitfor=30)
    assert time.monotonic() - t0 < SLOW_SHUTDOWN * 0.8
    assert w not in pydist.procs()
    assert proc.poll() is None  # still in its shutdown
    assert proc.wait(30) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_rmprocs_of_many_workers_escalates_for_each_in_one_thread(method, request):
    """Four workers removed at once, two of them stopped (they obey neither the exit request
    nor SIGTERM): one reaper thread waits for all four, each stopped one gets SIGKILL, not
    before exit_timeout + term_timeout, and the reaper ends once all are gone."""
    manager = LocalManager(4, exit_timeout=1.0, term_timeout=1.0, start_method=method)
    ws = pydist.addprocs(manager)
    procs = [PGRP.workers[w].config.process for w in ws]
    stuck = procs[:2]
    for proc in stuck:
        request.addfinalizer(lambda p=proc.pid: pid_alive(p) and os.kill(p, signal.SIGKILL))
        stop_process(proc.pid)
    before = _reapers()
    t0 = time.monotonic()
    pydist.rmprocs(ws, waitfor=0)
    reapers = _reapers() - before  # (another manager's may still be ending)
    assert len(reapers) == 1, reapers
    (reaper,) = reapers
    for proc in stuck:
        assert proc.wait(30) == -signal.SIGKILL
    took = time.monotonic() - t0
    assert 2.0 <= took < 30, took
    for proc in procs[2:]:
        assert proc.wait(30) == 0
    wait_until(lambda: not reaper.is_alive(), timeout=10, what="the reaper thread to end")
    wait_until(lambda: not set(ws) & set(pydist.procs()), timeout=30, what="the workers removed")


def _reapers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "pydist-reaper"}


def _imported(name: str) -> bool:
    return name in sys.modules


def test_every_forked_worker_shares_the_templates_cloudpickle(fresh_workers):
    """The template imports cloudpickle before its first fork: even the first workers forked
    have it (a worker importing it at its first user function paid ~4.4 ms and ~1.7 MB)."""
    from pydist.managers import forkserver

    forkserver.stop()  # a fresh template: its first request comes at once
    ws = fresh_workers(2, start_method="forkserver")
    assert [pydist.remotecall_fetch(_imported, w, "cloudpickle") for w in ws] == [True, True]
    assert pydist.remotecall_fetch(lambda: 7 * 6, ws[0]) == 42  # a closure, unpickled with it


def _fillers() -> int:
    """Runs on a worker: how many fillers the template left (its module ran as `__main__`,
    which a worker keeps as `__mp_main__`)."""
    return sum(len(m._FILLERS) for m in list(sys.modules.values())
               if isinstance(getattr(m, "_FILLERS", None), list))


_FILL_SCRIPT = textwrap.dedent("""
    import gc, sys
    import cloudpickle
    from pydist import forkserver as template, worker

    gc.collect()
    if sys.argv[1] == "fill":
        template._fill_pools()
    # What a worker might allocate: 20 objects of each size class from 48 to 512 bytes, 200
    # of 32; how many 4 KiB pages they land on is how many it would copy or fault in.
    objs = [bytes(size - 33) for size in range(48, 513, 16) for _ in range(20)]
    objs += [10**9 + i for i in range(200)]
    print(len({id(o) // 4096 for o in objs}), len(template._FILLERS))
""")


def _pages_touched(how: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", _FILL_SCRIPT, how], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pages, fillers = map(int, done.stdout.split())
    return pages, fillers


@pytest.mark.skipif(not hasattr(sys, "_debugmallocstats"), reason="no allocator report here")
def test_the_template_fills_its_pools_free_blocks_before_it_forks(fresh_workers):
    """The template fills the free blocks of its partly used small-object pools before its
    first fork, so that what a worker allocates lands packed in fresh pools instead of in
    free blocks scattered over pages it shares with the template (each of which it then
    copies): in a fresh interpreter that has imported what the template imports, 820 small
    objects land on far fewer pages after the fill (~64 against ~114 here). Every forked
    worker has the template's fillers."""
    scattered, none = _pages_touched("as is")
    packed, fillers = _pages_touched("fill")
    assert none == 0 and fillers > 0
    assert packed < 0.75 * scattered, f"{scattered} pages without the fill, {packed} with it"
    ws = fresh_workers(2, start_method="forkserver")
    assert all(pydist.remotecall_fetch(_fillers, w) > 0 for w in ws)


def test_preloaded_modules_are_shared_by_every_forked_worker(fresh_workers, capfd):
    """PYDIST_PRELOAD: the template imports those modules before its first fork, so every
    worker has them; one that cannot be imported is reported and left to the workers."""
    from pydist.managers import forkserver

    forkserver.stop()  # a template started with the variable
    env = {"PYDIST_PRELOAD": "colorsys, no_such_module_for_pydist"}
    ws = fresh_workers(2, start_method="forkserver", env=env)
    for w in ws:
        _started_by("forkserver", pydist.remotecall_fetch(_facts, w))
        assert pydist.remotecall_fetch(_imported, w, "colorsys")
    err = capfd.readouterr().err
    assert "cannot preload 'no_such_module_for_pydist' (ModuleNotFoundError" in err, err
    pydist.rmprocs(ws, waitfor=30)
    forkserver.stop()  # (the next tests' template without it)


def test_a_preload_that_starts_a_thread_makes_fresh_interpreters(fresh_workers, tmp_path, capfd):
    """A process with a second thread cannot fork safely: a template whose preloaded module
    started one says so, once, and workers needing it start as fresh interpreters."""
    from pydist.managers import forkserver

    (tmp_path / "starts_a_thread.py").write_text(
        "import threading\nimport time\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    forkserver.stop()
    env = {"PYDIST_PRELOAD": "starts_a_thread", "PYTHONPATH": str(tmp_path)}
    for _ in range(2):
        (w,) = fresh_workers(1, start_method="forkserver", env=env)
        _started_by("spawn", pydist.remotecall_fetch(_facts, w))
    err = capfd.readouterr().err
    assert err.count("preloading 'starts_a_thread' started 1 thread(s)") == 1, err
    refused = forkserver._server
    assert refused is not None and refused.refused is not None
    wait_until(lambda: refused.proc.returncode == 3, timeout=30, what="the template reaped")
    (w,) = fresh_workers(1, start_method="forkserver")  # without it: forked as usual
    _started_by("forkserver", pydist.remotecall_fetch(_facts, w))


def test_the_template_runs_its_preloaded_modules_exit_hooks_when_it_stops(fresh_workers,
                                                                          tmp_path):
    """The template skips the interpreter's teardown at its exit (the master waits for it),
    but not the exit hooks a preloaded module registered; it exits with code 0."""
    from pydist.managers import forkserver

    out = tmp_path / "hooks.txt"
    (tmp_path / "exit_hook_for_pydist.py").write_text(textwrap.dedent(f"""\
        import atexit, os
        TEMPLATE = os.getpid()
        def said():
            if os.getpid() == TEMPLATE:
                with open({str(out)!r}, "a") as f:
                    f.write("template %d\\n" % TEMPLATE)
        atexit.register(said)
        """))
    forkserver.stop()
    env = {"PYDIST_PRELOAD": "exit_hook_for_pydist", "PYTHONPATH": str(tmp_path)}
    ws = fresh_workers(1, start_method="forkserver", env=env)
    _started_by("forkserver", pydist.remotecall_fetch(_facts, ws[0]))
    server = forkserver._server
    pydist.rmprocs(ws, waitfor=30)
    forkserver.stop()
    assert server.proc.returncode == 0
    assert out.read_text() == f"template {server.proc.pid}\n"


def _leave_words_for_the_exit(path: str) -> None:
    """On a worker: an exit hook that writes `path` and prints, and words left in stdout's
    buffer (no newline, no flush): the exit must run the one and flush the others."""
    import atexit

    def said() -> None:
        with open(path, "w") as f:
            f.write("the hook ran")
        print(" and the hook's words", end="")

    atexit.register(said)
    sys.stdout.write("words left in the buffer")


@pytest.mark.parametrize("method", METHODS)
def test_a_removed_worker_runs_its_exit_hooks_flushes_its_output_and_exits_0(
        method, fresh_workers, tmp_path, capsys):
    """A worker skips the interpreter's teardown at its exit (most of a spawned worker's exit
    CPU, which it gets only when nobody else wants it: nice 19), not its exit hooks, and not
    the output still in its buffers."""
    (w,) = fresh_workers(LocalManager(1, start_method=method))
    proc = PGRP.workers[w].config.process
    path = tmp_path / "hook"
    pydist.remotecall_fetch(_leave_words_for_the_exit, w, str(path))
    pydist.rmprocs(w, waitfor=60)
    assert proc.wait(60) == 0
    assert path.read_text() == "the hook ran"
    out: list[str] = []

    def relayed() -> str:
        out.append(capsys.readouterr().out)
        return "".join(out)

    words = f"From worker {w}:\twords left in the buffer and the hook's words"
    wait_until(lambda: words in relayed(), timeout=30, what="the worker's last words relayed")


def test_wait_process_wakes_at_the_exit_and_keeps_its_bound():
    """`managers.wait_process` (how the template is reaped): the exit code once the process
    ends, again once reaped, and TimeoutExpired after its timeout, not twice that."""
    from pydist.managers import wait_process

    quick = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.3); "
                                                    "sys.exit(7)"])
    assert wait_process(quick, 60) == 7
    assert wait_process(quick, 60) == 7
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            wait_process(sleeper, 3.0)
        assert time.monotonic() - t0 < 5.5  # (a second full wait would make it 6)
    finally:
        sleeper.kill()
        assert wait_process(sleeper, 60) == -signal.SIGKILL


def test_forked_process_handle_reports_exit_codes(fresh_workers):
    (w,) = fresh_workers(1, start_method="forkserver")
    proc = PGRP.workers[w].config.process
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.1)
    assert proc.poll() is None
    pydist.remote_do(os._exit, w, 7)
    assert proc.wait(30) == 7
    wait_until(lambda: w not in pydist.procs(), timeout=30, what="the worker removed")


@pytest.mark.parametrize("kw, why", [
    ({"exeflags": ["-X", "dev"]}, "exeflags"),
    ({"env": {"PYTHONHASHSEED": "3"}}, "PYTHONHASHSEED"),
    ({"exename": os.path.join(os.path.dirname(sys.executable), "python3.11-missing")},
     "exename"),
])
def test_fallback_to_spawn(kw, why, fresh_workers, caplog):
    caplog.set_level(logging.DEBUG, logger="pydist.managers.local")
    if "exename" in kw:
        with pytest.raises(pydist.LaunchWorkerError):
            fresh_workers(1, start_method="forkserver", **kw)  # spawned: the file is not there
    else:
        (w,) = fresh_workers(1, start_method="forkserver", **kw)
        _started_by("spawn", pydist.remotecall_fetch(_facts, w))
    assert any("not forking" in r.getMessage() and why in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_fallback_when_the_fork_server_fails(fresh_workers, tmp_path, monkeypatch, caplog):
    """A template that dies at start: the workers are spawned, with a DEBUG log saying why."""
    from pydist.managers import forkserver

    forkserver.stop()  # (a running template would be used)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$2" = pydist.forkserver ] && exit 3\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    caplog.set_level(logging.DEBUG, logger="pydist.managers.local")
    (w,) = fresh_workers(1, start_method="forkserver")
    _started_by("spawn", pydist.remotecall_fetch(_facts, w))
    assert any("not forking: the fork server exited" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    monkeypatch.undo()
    forkserver.stop()


def _env_of(*names: str) -> dict:
    return {n: os.environ.get(n) for n in names}


def test_each_forked_worker_has_the_environment_of_its_addprocs(fresh_workers, monkeypatch):
    """The template keeps the environment it started with; a child changes only what its
    `addprocs` wants otherwise: variables removed, changed or added since."""
    from pydist.managers import forkserver

    forkserver.stop()  # the template starts with PYDIST_FS_GONE and PYDIST_FS_CHANGED
    monkeypatch.setenv("PYDIST_FS_GONE", "1")
    monkeypatch.setenv("PYDIST_FS_CHANGED", "before")
    names = ("PYDIST_FS_GONE", "PYDIST_FS_CHANGED", "PYDIST_FS_NEW")
    (a,) = fresh_workers(1, start_method="forkserver")
    monkeypatch.delenv("PYDIST_FS_GONE")
    monkeypatch.setenv("PYDIST_FS_CHANGED", "after")
    monkeypatch.setenv("PYDIST_FS_NEW", "new")
    (b,) = fresh_workers(1, start_method="forkserver")
    assert pydist.remotecall_fetch(os.getppid, a) == pydist.remotecall_fetch(os.getppid, b)
    _started_by("forkserver", pydist.remotecall_fetch(_facts, b))
    assert pydist.remotecall_fetch(_env_of, a, *names) == {
        "PYDIST_FS_GONE": "1", "PYDIST_FS_CHANGED": "before", "PYDIST_FS_NEW": None}
    assert pydist.remotecall_fetch(_env_of, b, *names) == {
        "PYDIST_FS_GONE": None, "PYDIST_FS_CHANGED": "after", "PYDIST_FS_NEW": "new"}


def test_fork_server_death_is_survived(fresh_workers):
    """Killing the template leaves its workers serving; the next addprocs starts a new one,
    and removing the orphaned workers still ends in bounded time."""
    old = fresh_workers(2, start_method="forkserver")
    server = pydist.remotecall_fetch(os.getppid, old[0])
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), timeout=10, what="the fork server killed")
    assert [pydist.remotecall_fetch(pydist.myid, w) for w in old] == old
    (new,) = fresh_workers(1, start_method="forkserver")
    facts = pydist.remotecall_fetch(_facts, new)
    _started_by("forkserver", facts)
    assert facts["ppid"] != server
    procs = [PGRP.workers[w].config.process for w in old]
    t0 = time.monotonic()
    pydist.rmprocs(old, waitfor=30)
    for proc in procs:
        proc.wait(20)
        wait_until(lambda: not pid_alive(proc.pid), timeout=10, what="orphaned worker gone")
    assert time.monotonic() - t0 < 20


def test_a_template_that_died_unnoticed_is_replaced_not_spawned_around(fresh_workers):
    """The template died, and the thread reading its control socket has not seen the end
    yet (its flag is set back here, as it is in that window on a busy machine): the next
    addprocs still starts a new template rather than falling back to fresh interpreters."""
    from pydist.managers import forkserver

    (w,) = fresh_workers(1, start_method="forkserver")
    server = pydist.remotecall_fetch(os.getppid, w)
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), timeout=10, what="the fork server killed")
    wait_until(lambda: forkserver._server.closed, timeout=10, what="its socket's end read")
    forkserver._server.closed = False
    (new,) = fresh_workers(1, start_method="forkserver")
    facts = pydist.remotecall_fetch(_facts, new)
    _started_by("forkserver", facts)
    assert facts["ppid"] != server


def test_the_fork_server_is_the_default_and_spawn_an_opt_out(fresh_workers, monkeypatch):
    monkeypatch.delenv("PYDIST_START_METHOD", raising=False)
    assert LocalManager(1).start_method == "forkserver"
    (w,) = fresh_workers(1)
    _started_by("forkserver", pydist.remotecall_fetch(_facts, w))
    monkeypatch.setenv("PYDIST_START_METHOD", "spawn")
    assert LocalManager(1).start_method == "spawn"
    (w,) = fresh_workers(1)
    _started_by("spawn", pydist.remotecall_fetch(_facts, w))


def test_bad_start_method(monkeypatch):
    with pytest.raises(ValueError, match="start_method"):
        LocalManager(1, start_method="fork")
    monkeypatch.setenv("PYDIST_START_METHOD", "threads")
    with pytest.raises(ValueError, match="PYDIST_START_METHOD"):
        pydist.addprocs(1)
    with pytest.raises(TypeError):
        pydist.addprocs(1, start_methods="spawn")  # type: ignore[call-overload]


MASTER = textwrap.dedent("""
    import json, os, sys, time, pydist
    ws = pydist.addprocs(3)
    pids = [pydist.remotecall_fetch(os.getpid, w) for w in ws]
    server = pydist.remotecall_fetch(os.getppid, ws[0])
    child = None
    if sys.argv[1] == "forked":  # user code forks the master: the child must not hold on
        child = os.fork()       # to the fork server
        if child == 0:  # (no import here: another thread may hold the import lock)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # (the test reads the master's output until its end)
                os.dup2(null, fd)
            time.sleep(30)
            os._exit(0)
    print(json.dumps({"workers": pids, "server": server, "child": child}), flush=True)
    sys.stdin.readline()  # until the test has looked at them (or kills this process)
    if sys.argv[1] == "shutdown":
        pydist.rmprocs(ws[0])
        pydist.shutdown()
        try:
            os.kill(server, 0)
            print("after shutdown: server", "alive" if server != os.getpid() else "none")
        except ProcessLookupError:
            print("after shutdown: server gone")
        print("shut down", flush=True)
""")


def _run_master(tmp_path, method: str, how: str) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    env = dict(os.environ, PYDIST_START_METHOD=method)
    proc = subprocess.Popen([sys.executable, str(script), how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.wait(30)
        pytest.fail(f"the master failed: {proc.stderr.read()}")  # type: ignore[union-attr]
    return proc, json.loads(line)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["shutdown", "sigkill", "forked"])
def test_no_process_left_behind(method, how, tmp_path):
    if how == "forked" and method == "spawn":
        pytest.skip("about the fork server's control socket in a fork of the master")
    proc, pids = _run_master(tmp_path, method, how)
    try:
        if method == "forkserver":
            assert "pydist.forkserver" in _cmdline(pids["server"])
        if how in ("sigkill", "forked"):
            proc.kill()
        out, err = proc.communicate(timeout=60)
        if how == "shutdown":
            assert proc.returncode == 0, err
            assert "shut down" in out
            if method == "forkserver":  # stopped by shutdown(), not only at exit
                assert "after shutdown: server gone" in out, out
        if pids["child"]:  # the fork server ends while the master's fork still runs
            wait_until(lambda: not pid_alive(pids["server"]), timeout=10,
                       what="the fork server gone")
            assert pid_alive(pids["child"])
            # (the fork holds the master's connections: the workers end with it)
            os.kill(pids["child"], signal.SIGKILL)
        for ospid in pids["workers"] + ([pids["server"]] if method == "forkserver" else []):
            wait_until(lambda: not pid_alive(ospid), timeout=30,
                       what=f"process {ospid} ({_cmdline(ospid)}) gone")
    finally:
        if pids.get("child") and pid_alive(pids["child"]):
            os.kill(pids["child"], signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("method", METHODS)
def test_missing_dir_is_a_launch_error(method, fresh_workers, tmp_path):
    with pytest.raises(pydist.LaunchWorkerError, match="missing"):
        fresh_workers(1, start_method=method, dir=str(tmp_path / "missing"))


@pytest.mark.parametrize("method", METHODS)
def test_enable_threaded_blas(method, fresh_workers):
    def blas_env(_=None):
        return os.environ.get("OPENBLAS_NUM_THREADS")

    single, threaded = fresh_workers(1, start_method=method)[0], fresh_workers(
        1, start_method=method, enable_threaded_blas=True)[0]
    assert pydist.remotecall_fetch(blas_env, single) == "1"
    assert pydist.remotecall_fetch(blas_env, threaded) == os.environ.get("OPENBLAS_NUM_THREADS")
    if method == "forkserver":
        for w in (single, threaded):
            _started_by(method, pydist.remotecall_fetch(_facts, w))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_of_the_master_does_not_hold_the_fork_server(fresh_workers):
    """A child forked from the master (user code) drops its copy of the control socket, so
    the template still exits when the master closes it."""
    from pydist.managers import forkserver

    (w,) = fresh_workers(1, start_method="forkserver")
    server = pydist.remotecall_fetch(os.getppid, w)
    r, wr = os.pipe()
    child = os.fork()
    if child == 0:  # hold on until the test is done with us
        os.close(wr)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        pydist.rmprocs(w, waitfor=30)
        forkserver.stop()
        wait_until(lambda: not pid_alive(server), timeout=10, what="the fork server gone")
    finally:
        os.close(wr)
        os.waitpid(child, 0)


def test_many_workers_are_asked_for_in_one_message_per_batch(fresh_workers, monkeypatch):
    """One request carries the pipes and master sockets of up to MAX_FORKS_PER_REQUEST
    workers (a message per worker filled the control socket, and the master waited for the
    template to fork most of them before it could connect to the first); each worker still
    gets its own pipe."""
    from pydist.managers import forkserver

    monkeypatch.setattr(forkserver, "MAX_FORKS_PER_REQUEST", 3)
    sent = []
    real_send_fds = socket.send_fds

    def spy(sock, buffers, fds, *args):
        sent.append((json.loads(b"".join(buffers)), len(fds)))
        return real_send_fds(sock, buffers, fds, *args)

    monkeypatch.setattr(socket, "send_fds", spy)
    ws = fresh_workers(7, start_method="forkserver")
    assert [(m["count"], m["paired"], n) for m, n in sent] == [(3, True, 6), (3, True, 6),
                                                               (1, True, 2)]
    firsts = [m["req"] for m, _ in sent]
    assert firsts[1] == firsts[0] + 3 and firsts[2] == firsts[1] + 3
    facts = [pydist.remotecall_fetch(_facts, w) for w in ws]
    for f in facts:
        _started_by("forkserver", f)
    assert sorted(f["id"] for f in facts) == sorted(ws)
    assert len({f["pid"] for f in facts}) == 7
    # Each worker's output comes through its own pipe, named by its id.
    for w in ws:
        assert pydist.remotecall_fetch(_print_marker, w) is None
    wait_until(lambda: all(PGRP.workers[w].config.output.tail
                           and PGRP.workers[w].config.output.tail[-1] == f"marker {w}"
                           for w in ws), timeout=30, what="each worker's line on its pipe")


def test_the_template_takes_what_the_master_may_send():
    """The master's bounds on one request (descriptors attached: a pipe and a master socket
    per worker; bytes) are the template's: a request with more descriptors than the template
    receives would lose the rest in transit (truncated control data), and those workers
    would never start."""
    from pydist import forkserver as template
    from pydist.managers import forkserver as master_side

    assert 2 * master_side.MAX_FORKS_PER_REQUEST == template.MAX_FDS
    assert master_side.MAX_MESSAGE == template.MAX_MESSAGE


def _master_socket_facts() -> dict:
    conn = PGRP.workers[1].conn
    return {"family": conn.sock.family, "peer": conn.sock.getpeername(),
            "inheritable": os.get_inheritable(conn.sock.fileno())}


@pytest.mark.parametrize("method", METHODS)
def test_a_forked_workers_master_connection_is_the_pair_made_at_its_fork(method, fresh_workers):
    """A forked worker's master connection is the socket pair the master made and handed to
    it through the template (no connect, no handshake: nobody else holds it), on both ends;
    a spawned worker's is dialled to its listener. Either way calls, large ones too, work."""
    (w,) = fresh_workers(1, start_method=method)
    ours = PGRP.workers[w].conn.sock
    theirs = pydist.remotecall_fetch(_master_socket_facts, w)
    if method == "forkserver":
        assert ours.family == socket.AF_UNIX and ours.getpeername() == ""  # unnamed: a pair
        assert theirs["family"] == socket.AF_UNIX and theirs["peer"] == ""
        assert theirs["inheritable"] is False  # not passed on to what the worker starts
    else:
        assert ours.getpeername() != ""  # the listener's local socket, or TCP
    big = os.urandom(8 << 20)  # (larger than the kernel's socket buffers)
    assert pydist.remotecall_fetch(lambda b: b[::-1], w, big) == big[::-1]


def test_a_forked_worker_whose_master_socket_is_dropped_exits_at_once(fresh_workers):
    """A worker forked with its master connection exits as soon as that connection closes
    before the master's JOIN, saying why, not after the worker timeout (here 10 minutes)."""
    from pydist.managers import forkserver

    fresh_workers(1, start_method="forkserver")  # the template runs: ask it with its env
    env = dict(forkserver._server.env, PYDIST_WORKER_TIMEOUT="600")
    (proc,) = forkserver.fork_workers(1, PGRP.cookie, "127.0.0.1", os.getcwd(), env,
                                      yield_to_master=True, paired=True)
    try:
        assert proc.stdout.readline().startswith(b"pydist_worker:")  # it listens
        proc.close_master_socket()
        assert proc.take_master_socket() is None
        assert proc.wait(60) == 1
        assert b"closed its connection before it joined" in proc.stdout.read()
    finally:
        proc.kill()
        proc.stdout.close()


def _print_marker() -> None:
    print(f"marker {pydist.myid()}", flush=True)


def test_a_bad_fork_request_is_answered_with_errors_and_the_template_serves_on(fresh_workers):
    """A request whose descriptors do not match its count (a pipe and a master socket per
    worker) gets an error for each worker it asked for (nobody waits forever), its
    descriptors are closed, and the template forks the next."""
    from pydist.managers import forkserver

    fresh_workers(1, start_method="forkserver")  # the template runs
    server = forkserver._server
    pipes = [os.pipe(), os.pipe()]
    ours, theirs = socket.socketpair()
    with server.send_lock:
        first = server.next_req + 1
        server.next_req += 2
        socket.send_fds(server.sock, [json.dumps({"req": first, "count": 2, "paired": True}).encode()],
                        [pipes[0][1], pipes[1][1], theirs.fileno()])
    for _, w in pipes:
        os.close(w)
    theirs.close()
    for req in (first, first + 1):
        with pytest.raises(OSError, match="could not fork: ValueError: a request for 2 workers "
                                          "came with 3 descriptors, not 4"):
            server.result(req)
    for r, _ in pipes:
        with open(r, "rb") as f:
            assert f.read() == b""  # the template closed its end: no worker holds it
    ours.settimeout(30)
    assert ours.recv(1) == b""  # ... and its copy of the master socket
    ours.close()
    (w,) = fresh_workers(1, start_method="forkserver")
    _started_by("forkserver", pydist.remotecall_fetch(_facts, w))
