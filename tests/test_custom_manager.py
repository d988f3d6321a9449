"""Cluster managers written by a third party, against the public interface only: the pipe
transport of examples/custom_manager.py, and a manager with its own launch command over the
default TCP transport."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import pydist
from pydist import ClusterManager, LaunchWorkerError, WorkerConfig
from pydist.managers import worker_env

from conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from custom_manager import PipeManager  # noqa: E402


@pytest.fixture
def no_workers():
    """These tests choose their own topology: start and end with no workers at all."""
    if pydist.workers() != [1]:
        pydist.rmprocs(pydist.workers(), waitfor=60)
    yield
    if pydist.workers() != [1]:
        pydist.rmprocs(pydist.workers(), waitfor=60)


def test_the_documented_example_runs():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "custom_manager.py")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in done.stdout
    assert "removed; workers left: [1]" in done.stdout


def chatty(x):
    print("this line must not reach the transport", x)
    return x + 1


def test_pipe_transport_calls_interrupt_and_removal(no_workers):
    manager = PipeManager(2)
    pids = pydist.addprocs(manager, topology="master_worker")
    assert len(pids) == 2
    procs = {p: pydist.group.PGRP.workers[p].config.process for p in pids}
    assert [pydist.remotecall_fetch(os.getpid, p) for p in pids] == [procs[p].pid for p in pids]
    # A print() on the worker goes to its stderr, not into the pipe carrying the protocol.
    assert pydist.remotecall_fetch(chatty, pids[0], 41) == 42
    assert pydist.remotecall_fetch(chatty, pids[0], 1) == 2
    # Large values cross the pipes intact.
    blob = os.urandom(3_000_000)
    assert pydist.remotecall_fetch(len, pids[1], blob) == len(blob)
    # interrupt goes through manage(..., "interrupt") (the default: SIGINT to config.ospid).
    fut = pydist.remotecall(time.sleep, pids[1], 60)
    time.sleep(0.5)
    pydist.interrupt(pids[1])
    with pytest.raises(pydist.RemoteException, match="KeyboardInterrupt"):
        fut.fetch()
    pydist.rmprocs(pids, waitfor=60)
    wait_until(lambda: all(p.poll() is not None for p in procs.values()), timeout=30,
               what="the pipe workers to exit and be reaped")
    assert all(p.returncode == 0 for p in procs.values())


class ShellManager(ClusterManager):
    """Its own launch command (through `sh -c`), the default TCP transport, kill and manage."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []
        self.registered: list[int] = []
        self.ops: list[tuple[int, str]] = []

    def launch(self, params, launched, launch_ntfy):
        cmd = f"exec {params['exename']} -m pydist.worker --bind-to 127.0.0.1"
        env = worker_env(params)  # ours + PYDIST_WORKER_TIMEOUT from addprocs(timeout=...)
        env["PYTHONPATH"] = os.path.join(ROOT, "src")
        for _ in range(self.n):
            proc = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            proc.stdin.write(pydist.cluster_cookie().encode() + b"\n")
            proc.stdin.close()
            self.procs.append(proc)
            with launch_ntfy:
                launched.append(WorkerConfig(io=proc.stdout, process=proc, userdata="mine"))
                launch_ntfy.notify_all()

    def manage(self, pid, config, op):
        if op == "register":
            self.registered.append(pid)
        else:
            self.ops.append((pid, op))
        super().manage(pid, config, op)

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_own_launch_command_over_the_default_tcp_transport(no_workers, capsys):
    manager = ShellManager(2)
    pids = pydist.addprocs(manager)
    wait_until(lambda: sorted(manager.registered) == pids, timeout=10, what="register calls")
    config = pydist.group.PGRP.workers[pids[0]].config
    assert config.userdata == "mine" and config.ospid == pydist.remotecall_fetch(os.getpid, pids[0])
    assert config.connect_at[0] == "127.0.0.1"
    # Worker to worker works over the addresses the default connect recorded.
    assert pydist.remotecall_fetch(pydist.remotecall_fetch, pids[1], pydist.myid, pids[0]) == pids[0]
    pydist.remotecall_fetch(print, pids[1], "relayed line")
    wait_until(lambda: f"From worker {pids[1]}:\trelayed line" in capsys.readouterr().out,
               timeout=10, what="the relayed output")
    pydist.rmprocs(pids, waitfor=60)
    # Each removed worker is deregistered, then finalized, once.
    for pid in pids:
        assert [op for p, op in manager.ops if p == pid] == ["deregister", "finalize"]
    wait_until(lambda: all(p.poll() is not None for p in manager.procs), timeout=30,
               what="the shell-launched workers to exit")
    manager.cleanup()


class FailingLaunch(ClusterManager):
    def launch(self, params, launched, launch_ntfy):
        raise RuntimeError("the scheduler said no")


class BadConnect(ShellManager):
    def connect(self, pid, config):
        super().connect(pid, config).close()
        return "not a transport"


def test_errors_of_a_custom_manager_reach_the_caller(no_workers):
    with pytest.raises(RuntimeError, match="the scheduler said no"):
        pydist.addprocs(FailingLaunch())
    manager = BadConnect(1)
    with pytest.raises(LaunchWorkerError, match="must return a socket or a \\(reader, writer\\) pair"):
        pydist.addprocs(manager, timeout=3)
    assert pydist.workers() == [1]
    # The half-launched worker gives up waiting for its master and exits.
    wait_until(lambda: all(p.poll() is not None for p in manager.procs), timeout=60,
               what="the unconnected worker to give up")
    manager.cleanup()


class WrongCookiePipes(PipeManager):
    def launch(self, params, launched, launch_ntfy):
        old = pydist.cluster_cookie()
        pydist.cluster_cookie("not-the-cluster-cookie")
        try:
            super().launch(params, launched, launch_ntfy)
        finally:
            pydist.cluster_cookie(old)


def test_a_pipe_worker_with_the_wrong_cookie_is_refused(no_workers):
    manager = WrongCookiePipes(1)
    launched_procs: list = []
    original = manager.connect

    def connect(pid, config):
        launched_procs.append(config.process)
        return original(pid, config)

    manager.connect = connect
    with pytest.raises(LaunchWorkerError, match="refused"):
        pydist.addprocs(manager, topology="master_worker")
    assert pydist.workers() == [1]
    wait_until(lambda: launched_procs[0].poll() is not None, timeout=30,
               what="the refused worker to exit")


class Recorder(ClusterManager):
    def __init__(self):
        self.calls = []

    def launch(self, params, launched, launch_ntfy):
        self.calls.append(("launch", params["x"]))

    def manage(self, pid, config, op):
        self.calls.append(("manage", pid, op))

    def kill(self, pid, config):
        self.calls.append(("kill", pid))

    def connect(self, pid, config):
        self.calls.append(("connect", pid))
        return "endpoint"

    def default_addprocs_params(self):
        return {"x": 1}


def test_module_level_functions_call_the_manager():
    m = Recorder()
    cond = threading.Condition()
    pydist.launch(m, {"x": 5}, [], cond)
    pydist.manage(m, 7, WorkerConfig(), "interrupt")
    pydist.kill(m, 7, WorkerConfig())
    assert pydist.connect(m, 7, WorkerConfig()) == "endpoint"
    assert pydist.default_addprocs_params(m) == {"x": 1}
    assert m.calls == [("launch", 5), ("manage", 7, "interrupt"), ("kill", 7), ("connect", 7)]
    # The defaults a manager inherits.
    params = pydist.default_addprocs_params()
    assert params["topology"] == "all_to_all" and params["exename"] == sys.executable


def test_worker_config_has_julias_fields():
    fields = ["io", "host", "port", "count", "exename", "exeflags", "userdata", "tunnel",
              "multiplex", "forward", "bind_addr", "sshflags", "max_parallel", "connect_at",
              "process", "ospid", "environ", "ident", "connect_idents", "enable_threaded_blas"]
    config = WorkerConfig()
    assert all(getattr(config, f) is None for f in fields)
