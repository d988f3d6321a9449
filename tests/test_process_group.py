"""Process group: addprocs keywords, ids, membership, output relay, launch failures,
rmprocs/interrupt, and that no worker ever outlives its master."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import pid_alive, stop_process, wait_until, worker_ospid

import pydist
import pydist.transport
from pydist import RemoteException

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------- membership
def test_membership_functions(two_workers):
    w2, w3 = two_workers
    assert pydist.myid() == 1
    assert pydist.myrole() == "master"
    assert pydist.procs()[0] == 1
    assert set(two_workers) <= set(pydist.workers())
    assert pydist.nprocs() == len(pydist.procs()) == pydist.nworkers() + 1
    assert pydist.other_workers() == pydist.workers()
    assert pydist.other_procs() == [p for p in pydist.procs() if p != 1]
    assert set(pydist.procs(w2)) == set(pydist.procs())  # all local: one host
    assert pydist.remotecall_fetch(pydist.myid, w2) == w2
    assert pydist.remotecall_fetch(pydist.myrole, w3) == "worker"
    assert w3 not in pydist.remotecall_fetch(pydist.other_workers, w3)
    assert pydist.remotecall_fetch(pydist.workers, w2) == pydist.workers()
    assert pydist.remotecall_fetch(pydist.procs, w2, w3) == pydist.procs(w3)


def test_only_master_adds_and_removes(two_workers):
    w = two_workers[0]
    with pytest.raises(RemoteException, match="Only process 1 can add and remove workers") as info:
        pydist.remotecall_fetch(pydist.addprocs, w, 1)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(RuntimeError, match="Only process 1"):
        pydist.remotecall_fetch(pydist.rmprocs, w, two_workers[1])


def test_ids_are_monotonic_and_never_reused(fresh_workers):
    (a,) = fresh_workers(1)
    pydist.rmprocs(a, waitfor=30)
    assert a not in pydist.procs()
    (b,) = fresh_workers(1)
    assert b > a
    with pytest.raises(pydist.ProcessExitedException) as info:
        pydist.remotecall_fetch(pydist.myid, a)
    assert info.value.worker_id == a


def test_no_workers_means_master_is_the_worker(fresh_workers):
    pydist.rmprocs(pydist.workers(), waitfor=30)
    assert pydist.workers() == [1]
    assert pydist.nworkers() == 1
    assert pydist.nprocs() == 1
    assert pydist.procs() == [1]
    assert pydist.other_workers() == []


# ---------------------------------------------------------------- keywords
def test_addprocs_keywords_reach_the_worker(fresh_workers, tmp_path):
    (w,) = fresh_workers(1, env={"PYDIST_TEST_VAR": "hello"}, dir=str(tmp_path), exeflags="-O")
    assert pydist.remotecall_fetch(os.getenv, w, "PYDIST_TEST_VAR") == "hello"
    assert pydist.remotecall_fetch(os.getcwd, w) == str(tmp_path)
    assert pydist.remotecall_fetch(lambda: sys.flags.optimize, w) == 1
    # the master's sys.path (with tests/ on it) is inherited
    assert HERE in pydist.remotecall_fetch(lambda: sys.path, w)
    assert pydist.remotecall_fetch(os.getenv, w, "OMP_NUM_THREADS") == "1"
    assert pydist.remotecall_fetch(os.getenv, w, "OPENBLAS_NUM_THREADS") == "1"


def test_threaded_blas_is_left_alone_when_enabled(fresh_workers):
    (w,) = fresh_workers(1, enable_threaded_blas=True, env={"OMP_NUM_THREADS": "3"})
    assert pydist.remotecall_fetch(os.getenv, w, "OMP_NUM_THREADS") == "3"


def test_exeflags_as_list(fresh_workers):
    (w,) = fresh_workers(1, exeflags=["-X", "dev"])
    assert pydist.remotecall_fetch(lambda: sys.flags.dev_mode, w) is True


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"bogus": 1}, TypeError, "bogus"),
        ({"topology": "ring"}, ValueError, "topology"),
        ({"exeflags": [1, 2]}, TypeError, "exeflags"),
        ({"env": {"A": 1}}, TypeError, "env"),
    ],
)
def test_invalid_keywords_are_refused(kwargs, error, text):
    before = pydist.procs()
    with pytest.raises(error, match=text):
        pydist.addprocs(1, **kwargs)
    assert pydist.procs() == before


def test_default_addprocs_params():
    params = pydist.default_addprocs_params()
    assert params["topology"] == "all_to_all"
    assert params["lazy"] is True
    assert params["exename"] == sys.executable
    assert params["enable_threaded_blas"] is False


# ---------------------------------------------------------------- output relay
def test_worker_output_is_relayed_with_prefix(two_workers, capsys):
    w = two_workers[0]
    pydist.remote_do(print, w, "hello from the worker")
    pydist.remote_do(lambda: print("to stderr", file=sys.stderr), w)
    seen = []

    def relayed():
        seen.append(capsys.readouterr().out)
        text = "".join(seen)
        return f"      From worker {w}:\thello from the worker" in text and \
            f"      From worker {w}:\tto stderr" in text

    wait_until(relayed, what="the worker's output on the master's stdout")


def test_remote_do_error_is_printed_on_the_worker(two_workers, capsys):
    w = two_workers[0]
    pydist.remote_do(lambda: 1 / 0, w)
    seen = []

    def relayed():
        seen.append(capsys.readouterr().out)
        return "ZeroDivisionError" in "".join(seen)

    wait_until(relayed, what="the remote_do error to be printed")
    assert pydist.remotecall_fetch(pydist.myid, w) == w


# ---------------------------------------------------------------- launch failures
def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_worker_that_exits_at_once(tmp_path):
    exe = _script(tmp_path, "dies.sh", "echo 'boom: cannot start'\nexit 3\n")
    with pytest.raises(pydist.LaunchWorkerError) as info:
        pydist.addprocs(1, exename=exe, timeout=30)
    msg = str(info.value)
    assert "Unable to read host:port string from worker" in msg
    assert "exit code 3" in msg
    assert "boom: cannot start" in msg


def test_worker_that_never_reports_its_address(tmp_path):
    exe = _script(tmp_path, "silent.sh", "echo waiting\nexec sleep 60\n")
    before = pydist.procs()
    t0 = time.monotonic()
    with pytest.raises(pydist.LaunchWorkerError, match="Timed out waiting to read host:port") as info:
        pydist.addprocs(1, exename=exe, timeout=1)
    assert time.monotonic() - t0 < 20
    assert "waiting" in str(info.value)
    assert pydist.procs() == before


def test_startup_output_is_shown(tmp_path, fresh_workers, capsys):
    exe = _script(tmp_path, "chatty.sh", f'echo "starting up"\nexec {sys.executable} "$@"\n')
    (w,) = fresh_workers(1, exename=exe)
    assert pydist.remotecall_fetch(pydist.myid, w) == w
    assert "From worker startup:\tstarting up" in capsys.readouterr().out


def test_a_failed_launch_uses_up_no_worker_id_and_says_its_output_once(tmp_path, fresh_workers,
                                                                        capfd):
    """Ids are given to workers that join: those of launches that failed before joining are
    used by the next workers, and calls to them say no such process exists. The failed
    worker's output is in the error, not printed as well."""
    from pydist.group import PGRP

    exe = _script(tmp_path, "dies.sh", "echo 'boom: cannot start'\nexit 3\n")
    next_before = PGRP.next_pid
    with pytest.raises(pydist.ExceptionGroup) as info:
        pydist.addprocs(2, exename=exe)
    assert all("boom: cannot start" in str(e) for e in info.value.exceptions)
    assert "boom" not in capfd.readouterr().out
    assert set(range(next_before, PGRP.next_pid)) <= PGRP.unused_pids  # all given back
    free = sorted(PGRP.unused_pids) + [PGRP.next_pid, PGRP.next_pid + 1]
    with pytest.raises(ValueError, match=f"no process with id {free[0]} exists"):
        pydist.remotecall_fetch(pydist.myid, free[0])
    assert sorted(fresh_workers(2)) == free[:2]


def test_a_bare_string_is_not_taken_for_a_machine_list():
    with pytest.raises(TypeError, match=r"addprocs\(\['node1'\]\)"):
        pydist.addprocs("node1")


def test_several_failures_are_grouped(tmp_path):
    exe = _script(tmp_path, "dies.sh", "exit 1\n")
    with pytest.raises(pydist.ExceptionGroup) as info:
        pydist.addprocs(2, exename=exe, timeout=30)
    assert len(info.value.exceptions) == 2
    assert all(isinstance(e, pydist.LaunchWorkerError) for e in info.value.exceptions)


def test_bad_executable(tmp_path):
    with pytest.raises(pydist.LaunchWorkerError, match="could not start worker process"):
        pydist.addprocs(1, exename=str(tmp_path / "no-such-python"))


# ---------------------------------------------------------------- rmprocs
def test_rmprocs_stops_the_process(fresh_workers):
    a, b = fresh_workers(2)
    ospids = [worker_ospid(a), worker_ospid(b)]
    assert pydist.rmprocs([a], b, waitfor=30) is None
    assert a not in pydist.procs() and b not in pydist.procs()
    wait_until(lambda: not any(pid_alive(p) for p in ospids), what="worker processes to exit")


def test_rmprocs_waitfor_zero_returns_a_handle(fresh_workers):
    (a,) = fresh_workers(1)
    handle = pydist.rmprocs(a, waitfor=0)
    handle.wait(30)
    assert handle.done()
    assert a not in pydist.procs()


def test_rmprocs_timeout_names_the_pids(fresh_workers):
    (a,) = fresh_workers(1)
    ospid = worker_ospid(a)
    stop_process(ospid)  # a worker that cannot answer (all its threads stopped)
    try:
        with pytest.raises(TimeoutError, match=rf"rmprocs: pids \[{a}\] not terminated after 0.5 seconds."):
            pydist.rmprocs(a, waitfor=0.5)
    finally:
        os.kill(ospid, signal.SIGCONT)
    wait_until(lambda: a not in pydist.procs(), what="the worker to go once resumed")


def test_rmprocs_ignores_master_and_unknown(two_workers):
    before = pydist.procs()
    pydist.rmprocs(1, 999, waitfor=5)
    assert pydist.procs() == before


def test_rmprocs_escalates_to_kill(fresh_workers, tmp_path):
    # A worker that cannot read the exit request and ignores SIGTERM (a worker stuck in C
    # code looks the same): the manager must end up with SIGKILL.
    exe = _script(tmp_path, "stubborn.sh", f"trap '' TERM\nexec {sys.executable} \"$@\"\n")
    (a,) = fresh_workers(1, exename=exe)
    w = pydist.group.PGRP.workers[a]
    w.manager.exit_timeout = 0.5
    w.manager.term_timeout = 0.5
    ospid = worker_ospid(a)
    stop_process(ospid)
    pydist.rmprocs(a, waitfor=0)
    wait_until(lambda: not pid_alive(ospid), timeout=30, what="SIGKILL escalation")
    wait_until(lambda: a not in pydist.procs(), what="deregistration after kill")


# ---------------------------------------------------------------- interrupt
def test_interrupt_stops_sleep_and_busy_loop(fresh_workers):
    (a,) = fresh_workers(1)
    started = pydist.RemoteChannel(lambda: pydist.Channel(10), a)

    def sleeper(ch):
        ch.put("sleeping")
        time.sleep(60)

    def spinner(ch):
        ch.put("spinning")
        while True:
            pass

    f1 = pydist.remotecall(sleeper, a, started)
    f2 = pydist.remotecall(spinner, a, started)
    assert {started.take(timeout=30), started.take(timeout=30)} == {"sleeping", "spinning"}
    t0 = time.monotonic()
    pydist.interrupt(a)
    for f in (f1, f2):
        with pytest.raises(RemoteException) as info:
            f.fetch(timeout=30)
        assert isinstance(info.value.captured.ex, KeyboardInterrupt)
        assert not isinstance(info.value, KeyboardInterrupt)
    assert time.monotonic() - t0 < 20
    assert pydist.remotecall_fetch(pydist.myid, a) == a  # still usable


def test_interrupt_idle_worker_is_harmless(fresh_workers):
    (a,) = fresh_workers(1)
    pydist.interrupt(a)
    pydist.interrupt()
    assert pydist.remotecall_fetch(lambda x: x + 1, a, 1) == 2


# ---------------------------------------------------------------- lifetimes
MASTER = textwrap.dedent(
    """
    import atexit, os, sys, time, pydist

    def say_bye():
        atexit.register(lambda: print("bye from", pydist.myid(), flush=True))

    pids = pydist.addprocs(2)
    print(" ".join(str(pydist.remotecall_fetch(os.getpid, p)) for p in pids), flush=True)
    for p in pids:
        pydist.remotecall_fetch(say_bye, p)
    if sys.argv[1] == "hang":
        time.sleep(600)
    """
)


def _start_master(tmp_path, mode: str):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            text=True, env=_env())
    line = proc.stdout.readline()
    ospids = [int(x) for x in line.split()]
    assert len(ospids) == 2, line
    return proc, ospids


def test_workers_exit_when_master_is_killed(tmp_path):
    proc, ospids = _start_master(tmp_path, "hang")
    assert all(pid_alive(p) for p in ospids)
    proc.kill()
    proc.wait(10)
    wait_until(lambda: not any(pid_alive(p) for p in ospids), timeout=30,
               what="workers to exit after their master was SIGKILLed")


def test_workers_exit_cleanly_when_master_exits(tmp_path):
    proc, ospids = _start_master(tmp_path, "exit")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    wait_until(lambda: not any(pid_alive(p) for p in ospids), timeout=30,
               what="workers to exit with their master")
    # A clean exit, not a kill: the workers' own atexit hooks ran and were relayed.
    assert "From worker 2:\tbye from 2" in out
    assert "From worker 3:\tbye from 3" in out


def test_worker_exits_if_no_master_connects():
    env = _env()
    env["PYDIST_WORKER_TIMEOUT"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "pydist.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, _ = proc.communicate("somecookie\n", timeout=30)
    assert proc.returncode == 1
    assert out.startswith("pydist_worker:")
    assert "could not connect within 1.0 seconds" in out


def test_worker_bind_to_parsing():
    from pydist.transport import default_bind_addr
    from pydist.worker import parse_bind_to

    assert parse_bind_to("127.0.0.1") == ("127.0.0.1", 0, False)
    assert parse_bind_to("127.0.0.1:9000") == ("127.0.0.1", 9000, False)
    assert parse_bind_to("127.0.0.1:[9000]") == ("127.0.0.1", 9000, True)
    assert parse_bind_to("[::1]:9000") == ("::1", 9000, False)
    assert parse_bind_to(None) == (default_bind_addr(), 0, False)
    with pytest.raises(ValueError):
        parse_bind_to("127.0.0.1:99999")
    with pytest.raises(ValueError):
        parse_bind_to("127.0.0.1:http")


# ---------------------------------------------------------------- command line
SCRIPT = textwrap.dedent(
    """
    import sys, pydist

    def square(x):  # defined in __main__: must travel by value
        return x * x

    print("argv", sys.argv[1:])
    print("workers", pydist.nworkers())
    print("squares", [pydist.remotecall_fetch(square, w, w) for w in pydist.workers()])
    """
)


@pytest.mark.parametrize("launcher", [["-m", "pydist"], ["-m", "pydist.cli"]])
def test_command_line(tmp_path, launcher):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, *launcher, "-p", "2", str(script), "a", "--b"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "argv ['a', '--b']" in out.stdout
    assert "workers 2" in out.stdout
    assert "squares [4, 9]" in out.stdout


def test_command_line_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pydist", "-p", "x", "nothing.py"],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode != 0 and "-p takes" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pydist", str(tmp_path / "missing.py")],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode != 0 and "no such script" in out.stderr


def _pydist(*args, cwd=None, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pydist", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout, cwd=cwd, input=stdin)


def test_command_line_script_in_another_folder_imports_its_neighbours_on_workers(tmp_path):
    """`pydist -p N dir/script.py` behaves like `python dir/script.py`: dir is on sys.path,
    on the workers too (they start after it is set)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "neighbour.py").write_text("def triple(x):\n    return 3 * x\n")
    (folder / "job.py").write_text(textwrap.dedent("""
        import pydist
        from neighbour import triple  # pickled by reference: workers must import it
        print("result", pydist.pmap(triple, range(4)))
        """))
    out = _pydist("-p", "2", "project/job.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "result [0, 3, 6, 9]" in out.stdout


def test_command_line_c_m_prompt_version_and_usage(tmp_path):
    out = _pydist("-p", "1", "-c", "import sys, pydist; f = lambda: 6 * 7; "
                  "print(sys.argv, pydist.remotecall_fetch(f, pydist.workers()[0]))", "a", "-b")
    assert out.returncode == 0, out.stderr
    assert "['-c', 'a', '-b'] 42" in out.stdout
    (tmp_path / "modjob.py").write_text(
        "import sys, pydist\nprint('argv', sys.argv[1:], pydist.nworkers())\n")
    out = _pydist("-p", "1", "-m", "modjob", "x", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "argv ['x'] 1" in out.stdout
    # No script: an interactive prompt with the workers started (here fed by a pipe).
    session = "def g(x):\n    return x + 1\n\nprint('got', pydist.remotecall_fetch(g, 2, 41))\n"
    out = _pydist("-p", "1", stdin=session)
    assert out.returncode == 0, out.stderr
    assert "got 42" in out.stdout and "with 1 worker" in out.stderr
    out = _pydist("--version")
    assert out.returncode == 0 and out.stdout.startswith("pydist ")
    out = _pydist()
    assert out.returncode == 2
    assert out.stderr.startswith("usage: pydist [-p N]") and "-c CODE | -m MODULE" in out.stderr


# ---------------------------------------------------------------- custom topology
class ChainManager(pydist.LocalManager):
    """Local workers in a chain: the worker with ident k connects to the one with ident k-1."""

    def launch(self, params, launched, launch_ntfy):
        mine: list = []
        super().launch(params, mine, __import__("threading").Condition())
        for k, config in enumerate(mine):
            config.ident = k
            config.connect_idents = [k - 1] if k else []
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()


def _call_peer(peer):
    return pydist.remotecall_fetch(pydist.myid, peer)


def test_custom_topology_connects_only_the_named_peers():
    pydist.rmprocs(pydist.workers(), waitfor=30)
    try:
        a, b, c = pydist.addprocs(ChainManager(3), topology="custom")
        assert pydist.remotecall_fetch(_call_peer, b, a) == a  # b -> a: connected at join
        assert pydist.remotecall_fetch(_call_peer, a, b) == b  # and usable both ways
        assert pydist.remotecall_fetch(_call_peer, c, b) == b
        with pytest.raises(RemoteException, match="Topology : custom"):
            pydist.remotecall_fetch(_call_peer, c, a)  # not in c's connect_idents
    finally:
        pydist.rmprocs(pydist.workers(), waitfor=30)


def test_worker_id_from_socket(two_workers):
    w = two_workers[0]
    sock = pydist.group.PGRP.workers[w].conn.sock
    assert pydist.worker_id_from_socket(sock) == w
    assert pydist.worker_id_from_socket(object()) == -1


def test_custom_cluster_cookie_is_used_by_new_workers(fresh_workers):
    old = pydist.cluster_cookie()
    try:
        assert pydist.cluster_cookie("my-own-cookie") == "my-own-cookie"
        (w,) = fresh_workers(1)
        assert pydist.remotecall_fetch(pydist.cluster_cookie, w) == "my-own-cookie"
        host, port = pydist.group.PGRP.workers[w].connect_at
        with pytest.raises(pydist.AuthenticationError):
            pydist.transport.connect(host, port, old.encode(), 5)
        pydist.transport.connect(host, port, b"my-own-cookie", 5).close()
    finally:
        pydist.cluster_cookie(old)
    with pytest.raises(TypeError):
        pydist.cluster_cookie(b"bytes")
