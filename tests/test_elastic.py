"""ElasticManager: workers that dial in with `python -m pydist.worker --join HOST:PORT`, as
real processes -- on this machine, and (when the infrastructure is up) from the namespace
hosts h1..h3 over ssh. Kubernetes is not tested: there is none on these machines.

Every worker process a test starts is checked to be gone at its end.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pydist
from pydist.group import PGRP

from conftest import pid_alive, wait_until

SRC = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))
INFRA = os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra")
SSH_CONFIG = os.path.join(INFRA, "ssh-client", "config")
HOSTS = ["h1", "h2", "h3"]
MASTER_ON_BRIDGE = "10.200.0.254"  # the master's side of the namespace hosts' bridge


# ---------------------------------------------------------------- functions run on workers
CALLS = 0  # on a worker: how many calls of sleepy_id / marked_sleep have started there


def sleepy_id(x: int, seconds: float = 0.1) -> int:
    global CALLS
    CALLS += 1
    time.sleep(seconds)
    return pydist.myid()


def marked_sleep(seconds: float) -> None:
    global CALLS
    CALLS += 1
    time.sleep(seconds)


def calls_started() -> int:
    return CALLS


def wait_for_calls(pid: int, what: str) -> None:
    """Wait until worker `pid` has started running one of our calls."""
    wait_until(lambda: pydist.remotecall_fetch(calls_started, pid) > 0, timeout=60,
               interval=0.05, what=what)


def call_peer(target: int) -> tuple[int, int]:
    """Run on a worker: call worker `target` directly (a worker-to-worker link)."""
    return pydist.myid(), pydist.remotecall_fetch(pydist.myid, target)


def hostname_and_peer(target: int) -> tuple[str, str]:
    return socket.gethostname(), pydist.remotecall_fetch(socket.gethostname, target)


# ---------------------------------------------------------------- fixtures
class Dialler:
    """Starts dial-in worker processes and owns them: at the end every one must be gone."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        # Every worker started here carries this mark in its environment, so that the check
        # at the end finds this test's workers only (not another test run's on this machine
        # that dialled a port number this process once used).
        self.mark = f"{os.getpid()}-{id(self)}"

    def start(self, em_or_spec, *, cookie: str | None = None, via: str = "stdin",
              env: dict | None = None, args: tuple = ()) -> subprocess.Popen:
        """`python -m pydist.worker --join ...` here, the cookie on stdin or in PYDIST_COOKIE."""
        spec = em_or_spec if isinstance(em_or_spec, str) else f"{em_or_spec.address[0]}:{em_or_spec.port}"
        cookie = pydist.cluster_cookie() if cookie is None else cookie
        full_env = dict(os.environ, PYTHONPATH=SRC, **{MARK: self.mark}, **(env or {}))
        full_env.pop("PYDIST_COOKIE", None)
        if via == "env":
            full_env["PYDIST_COOKIE"] = cookie
        err = open(self.tmp_path / f"worker-{len(self.procs)}.err", "w+b")
        proc = subprocess.Popen([sys.executable, "-m", "pydist.worker", "--join", spec, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                env=full_env, start_new_session=True)
        proc.err_file = err  # type: ignore[attr-defined]
        if via == "stdin":
            proc.stdin.write(cookie.encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def start_ssh(self, host: str, em) -> subprocess.Popen:
        """A dial-in worker on namespace host `host`, started over ssh (cookie on stdin)."""
        remote = (f"cd {os.getcwd()} && {MARK}={self.mark} PYTHONPATH={SRC} "
                  f"exec {sys.executable} -m pydist.worker --join {MASTER_ON_BRIDGE}:{em.port}")
        err = open(self.tmp_path / f"ssh-{host}-{len(self.procs)}.err", "w+b")
        proc = subprocess.Popen(["ssh", "-F", SSH_CONFIG, host, remote], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        proc.err_file = err  # type: ignore[attr-defined]
        proc.stdin.write(pydist.cluster_cookie().encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        # (stdin stays open: closing it could end the ssh session before the cookie is read)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stderr(proc: subprocess.Popen) -> str:
        proc.err_file.seek(0)  # type: ignore[attr-defined]
        return proc.err_file.read().decode(errors="replace")  # type: ignore[attr-defined]

    def finish(self) -> None:
        left = []
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                left.append(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            proc.err_file.close()  # type: ignore[attr-defined]
        assert not left, f"dial-in worker processes left running: {left}"
        running = join_worker_processes(self.mark)
        assert not running, f"dial-in worker processes still running: {running}"


MARK = "PYDIST_TEST_DIALLER"  # the environment variable that names a worker's Dialler


def join_worker_processes(mark: str) -> list[str]:
    """The running `pydist.worker --join` processes that carry `mark` (a Dialler's) in their
    environment, local or on a namespace host (they share our PID namespace): pid, state,
    parent and command line of each."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            if not ("pydist.worker" in args and "--join" in args):
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rpartition(")")[2].split()[:2]
        except OSError:
            continue  # gone meanwhile
        if pid_alive(int(entry)):
            found.append(f"pid {entry} state {state} parent {ppid}: {' '.join(args).strip()}")
    return found


@pytest.fixture
def dialler(tmp_path):
    d = Dialler(tmp_path)
    yield d
    d.finish()


@pytest.fixture
def em(dialler):
    """An ElasticManager on a free port of 127.0.0.1; its workers are removed at the end
    (before `dialler` checks that their processes are gone)."""
    manager = pydist.ElasticManager(port=0)
    yield manager
    mine = [p for p in manager.active if p in pydist.procs()]
    if mine:
        pydist.rmprocs(mine, waitfor=30)
    manager.close()


def infra_hosts() -> list[str]:
    """h1..h3 reachable over ssh, or skip (fail under PYDIST_REQUIRE_INFRA=1)."""
    def missing(reason: str):
        if os.environ.get("PYDIST_REQUIRE_INFRA") == "1":
            pytest.fail(f"required infrastructure is missing: {reason}")
        pytest.skip(reason)

    if not os.path.exists(SSH_CONFIG):
        missing(f"no ssh client config at {SSH_CONFIG}")
    for h in HOSTS:
        try:
            done = subprocess.run(["ssh", "-F", SSH_CONFIG, h, "true"], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            missing(f"namespace host {h} not reachable over ssh")
        if done.returncode != 0:
            missing(f"namespace host {h} not reachable over ssh")
    return list(HOSTS)


# ---------------------------------------------------------------- tests
def test_dial_in_with_cookie_on_stdin_and_in_environment(em, dialler):
    started: list[int] = []
    managed: list[tuple[int, str]] = []
    em.manage_callback = lambda manager, pid, op: managed.append((pid, op))
    key = pydist.add_worker_started_callback(started.append)
    try:
        a = dialler.start(em, via="stdin")
        b = dialler.start(em, via="env")
        pids = em.wait_for_workers(2, timeout=60)
    finally:
        pydist.remove_worker_started_callback(key)
    assert len(pids) == 2 and set(pids) <= set(pydist.workers())
    assert sorted(started) == pids  # the started callbacks fired for each
    assert sorted(managed) == [(p, "register") for p in pids]
    assert sorted(pydist.remotecall_fetch(os.getpid, p) for p in pids) == sorted([a.pid, b.pid])
    assert set(pids) <= set(pydist.default_worker_pool().workers())
    # The connection each dialled is its connection to the master; it listens for peers.
    for p in pids:
        assert PGRP.workers[p].config.connect_at[0] == "127.0.0.1"
    # Worker to worker, both ways (the higher pid dials; the lower asks the master).
    lo, hi = pids
    assert pydist.remotecall_fetch(call_peer, hi, lo) == (hi, lo)
    assert pydist.remotecall_fetch(call_peer, lo, hi) == (lo, hi)
    text = str(em)
    assert f"--join 127.0.0.1:{em.port}" in text and f"Active workers : {pids}" in text
    assert em.worker_command(absolute_exename=False) == f"python3 -m pydist.worker --join 127.0.0.1:{em.port}"
    em.printing_kwargs = {"cookie": True}
    assert f"PYDIST_COOKIE={pydist.cluster_cookie()} " in str(em)
    # rmprocs makes them exit (cleanly), and the manager hears of it.
    pydist.rmprocs(pids, waitfor=30)
    assert a.wait(20) == 0 and b.wait(20) == 0
    assert em.active == {} and em.terminated >= set(pids)
    assert sorted(managed) == sorted([(p, "register") for p in pids]
                                     + [(p, "deregister") for p in pids])
    assert "joined the cluster" in dialler.stderr(a)


def test_wrong_cookie_is_refused_and_spends_no_id(em, dialler, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    next_pid = PGRP.next_pid
    expected = min(PGRP.unused_pids, default=next_pid)  # the id the next worker gets
    bad = dialler.start(em, cookie="not-the-cookie")
    assert bad.wait(30) == 1
    err = dialler.stderr(bad)
    assert "refused this worker" in err and "wrong cluster cookie" in err, err
    assert any("refused connection" in r.getMessage() and "wrong cluster cookie" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert PGRP.next_pid == next_pid and not em.active and em.pending == 0
    # The manager still admits a worker that knows the cookie.
    dialler.start(em)
    (pid,) = em.wait_for_workers(1, timeout=60)
    assert pid == expected


def test_garbage_on_the_port_does_not_break_it(em, dialler, caplog):
    caplog.set_level(logging.WARNING, logger="pydist")
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b""):
        with socket.create_connection(("127.0.0.1", em.port), timeout=10) as s:
            if junk:
                s.sendall(junk)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the manager refused the junk already and reset the connection
                continue
            s.settimeout(10)
            try:
                while s.recv(4096):  # the manager closes it (after at most a CHALLENGE)
                    pass
            except ConnectionResetError:
                pass
    silent = socket.create_connection(("127.0.0.1", em.port), timeout=10)  # says nothing
    try:
        dialler.start(em)
        (pid,) = em.wait_for_workers(1, timeout=60)
        assert pydist.remotecall_fetch(pydist.myid, pid) == pid
    finally:
        silent.close()
    assert any("refused connection" in r.getMessage() for r in caplog.records)
    assert em.pending == 0


@pytest.mark.parametrize("mode", ["no pool", "default pool", "with retries"])
def test_running_pmap_uses_workers_that_dial_in(em, dialler, mode):
    dialler.start(em)
    (first,) = em.wait_for_workers(1, timeout=60)
    out: dict = {}

    def run() -> None:
        try:
            if mode == "no pool":
                out["r"] = pydist.pmap(sleepy_id, range(80))
            elif mode == "default pool":
                out["r"] = pydist.pmap(sleepy_id, pydist.default_worker_pool(), range(80))
            else:
                out["r"] = pydist.pmap(sleepy_id, range(80), retry_delays=[0.1])
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for_calls(first, "the map to start on the first worker")
    dialler.start(em)
    dialler.start(em)
    pids = em.wait_for_workers(3, timeout=60)
    assert t.is_alive(), "the map ended before the new workers joined: make it longer"
    t.join(120)
    assert not t.is_alive()
    assert "e" not in out, out.get("e")
    new = set(pids) - {first}
    ran_on = set(out["r"])
    assert new <= ran_on, f"not every worker that joined ({new}) ran elements: {ran_on}"


def test_dialled_in_worker_killed_mid_map(em, dialler):
    a = dialler.start(em)
    b = dialler.start(em)
    pids = em.wait_for_workers(2, timeout=60)
    victim = pids[0]
    victim_proc = a if pydist.remotecall_fetch(os.getpid, victim) == a.pid else b
    out: dict = {}

    def run() -> None:
        try:
            # (on these two only: workers other tests share may also be running)
            out["r"] = pydist.pmap(sleepy_id, range(30), pool=pydist.WorkerPool(pids),
                                   retry_delays=pydist.ExponentialBackOff(n=3))
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for_calls(victim, "the map to reach the worker to kill")
    os.kill(victim_proc.pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive() and "e" not in out, out.get("e")
    assert len(out["r"]) == 30 and set(out["r"]) <= set(pids)
    wait_until(lambda: victim not in pydist.procs(), timeout=30, what="the killed worker's removal")
    assert victim not in em.active and victim in em.terminated
    assert victim_proc.wait(10) == -signal.SIGKILL


def test_interrupt_a_dialled_in_worker(em, dialler):
    dialler.start(em)
    (pid,) = em.wait_for_workers(1, timeout=60)
    fut = pydist.remotecall(marked_sleep, pid, 60)
    wait_for_calls(pid, "the call to start")
    pydist.interrupt(pid)
    with pytest.raises(pydist.RemoteException, match="KeyboardInterrupt"):
        fut.fetch(timeout=30)
    assert pydist.remotecall_fetch(pydist.myid, pid) == pid  # still usable


MASTER_SCRIPT = textwrap.dedent("""
    import sys, time, pydist
    em = pydist.ElasticManager(port=0, cookie="elastic-test-cookie")
    print(em.port, flush=True)
    em.wait_for_workers(1, timeout=60)
    print("joined", flush=True)
    if sys.argv[1] == "wait":
        time.sleep(120)
    elif sys.argv[1] == "exit":
        pass  # the exit hook removes the worker and closes the manager
    elif sys.argv[1] == "shutdown":
        pydist.shutdown()
        import threading
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith("pydist-elastic")
                       or t.name == "pydist-listener")
        print("threads", names, flush=True)
        import socket
        try:
            socket.create_connection(("127.0.0.1", em.port), timeout=5).close()
            print("still listening", flush=True)
        except OSError:
            print("port closed", flush=True)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "shutdown", "exit"])
def test_workers_exit_when_the_master_goes_away(dialler, tmp_path, how):
    script = tmp_path / "master.py"
    script.write_text(MASTER_SCRIPT)
    master = subprocess.Popen([sys.executable, str(script), "wait" if how == "SIGKILL" else how],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=dict(os.environ, PYTHONPATH=SRC), start_new_session=True)
    try:
        port = int(master.stdout.readline())  # type: ignore[union-attr]
        worker = dialler.start(f"127.0.0.1:{port}", cookie="elastic-test-cookie")
        assert master.stdout.readline().strip() == "joined"  # type: ignore[union-attr]
        if how == "SIGKILL":
            master.kill()
            assert worker.wait(30) == 1
            assert "the master is gone" in dialler.stderr(worker), dialler.stderr(worker)
        else:
            rest = master.stdout.read()  # type: ignore[union-attr]
            if how == "shutdown":
                assert "threads []" in rest and "port closed" in rest, rest
            assert master.wait(30) == 0
            assert worker.wait(30) == 0  # asked to exit
    finally:
        if master.poll() is None:
            master.kill()
        master.wait(10)
        master.stdout.close()  # type: ignore[union-attr]


def test_close_stops_listening_and_refused_workers_exit(dialler):
    manager = pydist.ElasticManager(port=0)
    port = manager.port
    manager.close()
    assert not manager._thread.is_alive() and not manager._listener._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # A worker keeps trying to reach the master for PYDIST_WORKER_TIMEOUT, then says so.
    late = dialler.start(f"127.0.0.1:{port}", env={"PYDIST_WORKER_TIMEOUT": "1.5"})
    assert late.wait(30) == 1
    assert "could not join the master" in dialler.stderr(late)


def test_a_worker_the_master_cannot_add_is_told_so(dialler, fresh_workers, caplog):
    """addprocs fails for it (here: a topology other than the running workers'): the master
    logs why and closes the connection; the worker exits saying it was not admitted."""
    caplog.set_level(logging.WARNING, logger="pydist")
    fresh_workers(1)  # all_to_all
    manager = pydist.ElasticManager(port=0, topology="master_worker")
    try:
        refused = dialler.start(manager)
        assert refused.wait(60) == 1
        assert "did not admit this worker" in dialler.stderr(refused), dialler.stderr(refused)
        assert any("could not add dialled-in workers" in r.getMessage() and "Topology" in
                   r.getMessage() for r in caplog.records)
        assert not manager.active and manager.pending == 0
    finally:
        manager.close()


def test_bad_arguments(dialler):
    with pytest.raises(ValueError, match="port"):
        pydist.ElasticManager(port=70000)
    with pytest.raises(ValueError, match="topology"):
        pydist.ElasticManager(port=0, topology="ring")
    with pytest.raises(TypeError, match="exename"):
        pydist.ElasticManager(port=0, exename="python")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            pydist.ElasticManager(port=taken.getsockname()[1])
    bad_spec = dialler.start("no-port-here")
    assert bad_spec.wait(30) == 2
    assert "--join expects HOST:PORT" in dialler.stderr(bad_spec)
    no_cookie = dialler.start("127.0.0.1:9", cookie="")
    assert no_cookie.wait(30) == 2
    assert "no cluster cookie" in dialler.stderr(no_cookie)


def test_workers_dial_in_from_other_hosts_during_a_pmap(dialler):
    hosts = infra_hosts()
    manager = pydist.ElasticManager(addr=MASTER_ON_BRIDGE, port=0)
    try:
        dialler.start(manager)  # a local one first, on the bridge too
        (first,) = manager.wait_for_workers(1, timeout=60)
        out: dict = {}

        def run() -> None:
            try:
                out["r"] = pydist.pmap(sleepy_id, range(200))
            except BaseException as e:
                out["e"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for_calls(first, "the map to start on the first worker")
        for h in hosts:  # 3 hosts x 2 workers, while the map runs
            dialler.start_ssh(h, manager)
            dialler.start_ssh(h, manager)
        pids = manager.wait_for_workers(7, timeout=90)
        assert t.is_alive(), "the map ended before the remote workers joined"
        t.join(120)
        assert "e" not in out, out.get("e")
        remote = [p for p in pids if p != first]
        names = {p: pydist.remotecall_fetch(socket.gethostname, p) for p in remote}
        assert sorted(names.values()) == sorted(hosts * 2)
        assert set(remote) <= set(out["r"]), "not every worker that dialled in ran elements"
        # Worker to worker across hosts, between two dialled-in workers.
        h1 = next(p for p in remote if names[p] == "h1")
        h3 = next(p for p in remote if names[p] == "h3")
        assert pydist.remotecall_fetch(hostname_and_peer, h1, h3) == ("h1", "h3")
        assert pydist.remotecall_fetch(hostname_and_peer, h3, h1) == ("h3", "h1")
        pydist.rmprocs(pids, waitfor=30)
        for proc in dialler.procs:
            assert proc.wait(30) == 0, dialler.stderr(proc)
    finally:
        mine = [p for p in manager.active if p in pydist.procs()]
        if mine:
            pydist.rmprocs(mine, waitfor=30)
        manager.close()
