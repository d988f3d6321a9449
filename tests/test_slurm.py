"""SlurmManager against a real Slurm: partition `hosts` has three nodes h1..h3 (network
namespaces with their own address and hostname, one slurmd each), as `.ci/infra/up.sh`
makes them. Without it these tests skip (PYDIST_REQUIRE_INFRA=1 turns the skip into a
failure). Every job these tests submit is named `pydist-test-*`; none may be left in
`squeue` afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pydist
from pydist.exceptions import LaunchWorkerError, RemoteException
from pydist.group import PGRP

from conftest import pid_alive, stop_process, wait_until
from hosthelpers import call_other, config_of, hostname_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra")
HOSTS = ["h1", "h2", "h3"]
HOST_ADDR = {"h1": "10.200.0.1", "h2": "10.200.0.2", "h3": "10.200.0.3"}
JOB = "pydist-test-slurm"  # the name of every job the manager submits here
BLOCKER = "pydist-test-blocker"
ALL_JOBS = [JOB, BLOCKER, "pydist-test-sbatch", "pydist-test-salloc"]


def _missing(reason: str):
    if os.environ.get("PYDIST_REQUIRE_INFRA") == "1":
        pytest.fail(f"required Slurm infrastructure is missing: {reason}")
    pytest.skip(f"{reason} (run `.ci/infra/up.sh` as root to create it)")


def run(*cmd: str, timeout: float = 30) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done.stdout


def node_states() -> dict[str, str]:
    out = run("sinfo", "-h", "-N", "-p", "hosts", "-o", "%N %t")
    return dict(line.split() for line in out.splitlines() if line.strip())


def usable(state: str) -> bool:
    return state.rstrip("*~#") in ("idle", "mix", "alloc")


@pytest.fixture(scope="session")
def slurm():
    """The `hosts` partition, its three nodes up."""
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        _missing("Slurm's srun/sinfo are not installed")
    try:
        states = node_states()
    except (AssertionError, OSError, subprocess.TimeoutExpired) as e:
        _missing(f"sinfo does not answer: {e}")
    if sorted(states) != HOSTS:
        _missing(f"partition 'hosts' does not have nodes h1..h3 (sinfo: {states})")
    wait_until(lambda: all(usable(s) for s in node_states().values()), timeout=60,
               what="the nodes of partition 'hosts' to be usable")
    return HOSTS


def our_jobs(*names: str) -> list[str]:
    """Ids of the jobs with these names still in squeue (pending, running, completing)."""
    out = run("squeue", "-h", "-n", ",".join(names or ALL_JOBS), "-o", "%i")
    return out.split()


def job_listed(job: str) -> bool:
    return job in run("squeue", "-h", "-o", "%i").split()


@pytest.fixture(scope="module", autouse=True)
def no_job_left_behind():
    yield
    if shutil.which("squeue") is None:
        return
    try:
        wait_until(lambda: not our_jobs(), timeout=60, what="every test job to leave squeue")
    finally:
        left = our_jobs()
        if left:
            subprocess.run(["scancel", *left], timeout=30)


def manager(ntasks: int = 3, **kw) -> pydist.SlurmManager:
    kw.setdefault("partition", "hosts")
    kw.setdefault("time", "00:05:00")
    kw.setdefault("job_name", JOB)
    if ntasks == 3:
        kw.setdefault("ntasks_per_node", 1)
    return pydist.SlurmManager(ntasks, **kw)


# ==================================================================== from outside
def test_outside_a_job_of_three_hosts_two_workers_each(slurm, fresh_workers):
    pids = fresh_workers(manager(6, ntasks_per_node=2))
    assert len(pids) == 6
    job = config_of(pids[0]).userdata["slurm_job"]
    assert job_listed(job) and our_jobs(JOB) == [job]
    names = {p: hostname_of(p) for p in pids}
    assert sorted(names.values()) == sorted(HOSTS * 2)
    for p, name in names.items():
        config = config_of(p)
        assert config.host == name == config.userdata["slurm_node"]
        assert config.userdata["slurm_job"] == job
        # Each listens on its node's own address, which the master and the others reach.
        assert config.connect_at[0] == HOST_ADDR[name]
        # procs(pid) groups the processes by node.
        assert pydist.procs(p) == sorted(q for q in pids if names[q] == name)
    by_host = {name: p for p, name in names.items()}
    assert pydist.remotecall_fetch(call_other, by_host["h1"], by_host["h3"]) == "h3"
    assert pydist.remotecall_fetch(call_other, by_host["h3"], by_host["h2"]) == "h2"

    # Removing some workers leaves the job to the others; removing the last ends it.
    ospids = [config_of(p).ospid for p in pids]
    pydist.rmprocs(pids[:3], waitfor=30)
    assert job_listed(job)
    assert sorted(hostname_of(p) for p in pids[3:]) == sorted(names[p] for p in pids[3:])
    pydist.rmprocs(pids[3:], waitfor=30)
    wait_until(lambda: not job_listed(job), timeout=30, what=f"job {job} to leave squeue")
    wait_until(lambda: not any(pid_alive(o) for o in ospids), timeout=30,
               what="the workers to exit")


def sleep_then_host(seconds: float) -> str:
    time.sleep(seconds)
    return socket.gethostname()


def test_interrupt_output_and_a_killed_worker(slurm, fresh_workers, capsys):
    [pid] = fresh_workers(manager(1, nodelist="h2"))
    assert hostname_of(pid) == "h2"
    job = config_of(pid).userdata["slurm_job"]
    # Its output comes back through srun, prefixed with its id.
    pydist.remotecall_fetch(print, pid, "hello from h2")
    wait_until(lambda: f"From worker {pid}:\thello from h2" in capsys.readouterr().out,
               timeout=30, what="the worker's output")
    fut = pydist.remotecall(sleep_then_host, pid, 60)
    wait_until(lambda: pydist.remotecall_fetch(lambda: 1, pid) == 1, timeout=10)
    time.sleep(0.3)  # let the call start sleeping
    t0 = time.monotonic()
    pydist.interrupt(pid)
    with pytest.raises(RemoteException, match="KeyboardInterrupt"):
        fut.fetch()
    assert time.monotonic() - t0 < 20
    assert hostname_of(pid) == "h2"  # the worker lives on
    # Killed on its node: srun's report of the task says why, with the job and the node.
    os.kill(config_of(pid).ospid, signal.SIGKILL)  # (the nodes share our pid namespace)
    wait_until(lambda: pid not in pydist.procs(), timeout=30, what="the master to notice")
    # (the reason comes from srun's report, learnt just after the worker is forgotten)
    wait_until(lambda: pid in PGRP.lost_reasons, timeout=30, what="the reason of the loss")
    assert PGRP.lost_reasons[pid] == f"ended (Killed) on node h2 (Slurm job {job}.0, task 0)"
    wait_until(lambda: not job_listed(job), timeout=30, what=f"job {job} to end")


# ==================================================================== the queue
def _sbatch_blocker() -> str:
    """A job that holds every node of `hosts` until cancelled."""
    job = run("sbatch", "--parsable", "-p", "hosts", "-N3", "--exclusive", "-t", "3",
              "-J", BLOCKER, "-o", "/dev/null", "--wrap", "sleep 170").strip()
    wait_until(lambda: run("squeue", "-h", "-j", job, "-o", "%t").strip() == "R", timeout=60,
               what="the blocking job to run")
    return job


@pytest.fixture
def blocker(slurm):
    job = _sbatch_blocker()
    yield job
    subprocess.run(["scancel", job], timeout=30)
    wait_until(lambda: not job_listed(job), timeout=60, what="the blocking job to end")


def test_a_queued_job_is_reported_and_cancelled_after_the_timeout(blocker, capfd, caplog):
    caplog.set_level("INFO", logger="pydist.managers.slurm")
    t0 = time.monotonic()
    with pytest.raises(LaunchWorkerError, match=r"Slurm job (\d+) was still waiting in the "
                                                r"queue after 4 s") as info:
        pydist.addprocs(manager(2), timeout=4)
    assert time.monotonic() - t0 < 20
    job = re.search(r"Slurm job (\d+)", str(info.value)).group(1)
    assert "cancelled" in str(info.value) and "timeout=" in str(info.value)
    err = capfd.readouterr().err
    assert f"Slurm job {job} is waiting in the queue (reason: " in err
    assert any(f"Slurm job {job} is waiting in the queue" in r.getMessage()
               for r in caplog.records)
    wait_until(lambda: not job_listed(job), timeout=20, what=f"job {job} to be cancelled")
    assert job_listed(blocker)


def test_a_queued_job_starts_when_the_nodes_free_up(slurm, fresh_workers, capfd):
    blocking = _sbatch_blocker()
    try:
        result: list = []
        adding = threading.Thread(target=lambda: result.append(
            fresh_workers(manager(3), timeout=120)))
        adding.start()
        wait_until(lambda: "is waiting in the queue" in capfd.readouterr().err, timeout=30,
                   what="the wait to be reported")
        assert adding.is_alive()
    finally:
        subprocess.run(["scancel", blocking], timeout=30)
    adding.join(120)
    assert not adding.is_alive()
    [pids] = result
    assert sorted(hostname_of(p) for p in pids) == HOSTS


MASTER = textwrap.dedent(
    """
    import json, sys
    import pydist
    from pydist.group import PGRP
    pids = pydist.addprocs(pydist.SlurmManager(3, partition="hosts", ntasks_per_node=1,
                                               time="00:05:00", job_name={job!r}))
    configs = [PGRP.workers[p].config for p in pids]
    print(json.dumps({{"job": configs[0].userdata["slurm_job"],
                      "srun": configs[0].userdata["_step"].proc.pid,
                      "ospids": [c.ospid for c in configs]}}), flush=True)
    sys.stdin.read()
    """
)


def _start_master(tmp_path) -> subprocess.Popen:
    script = tmp_path / "master.py"
    script.write_text(MASTER.format(job=JOB))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    return subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_master_killed_while_its_job_runs_ends_the_job(slurm, tmp_path):
    master = _start_master(tmp_path)
    try:
        line = master.stdout.readline()
        assert line, master.stderr.read()
        info = json.loads(line)
        assert job_listed(info["job"]) and all(pid_alive(p) for p in info["ospids"])
    finally:
        master.kill()
        master.wait()
    wait_until(lambda: not any(pid_alive(p) for p in info["ospids"] + [info["srun"]]),
               timeout=30, what="the workers and srun to exit after the master died")
    wait_until(lambda: not job_listed(info["job"]), timeout=30,
               what=f"job {info['job']} to leave squeue after the master died")


def test_master_killed_while_its_job_is_queued_cancels_the_job(blocker, tmp_path):
    master = _start_master(tmp_path)
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "is waiting in the queue" not in line and time.monotonic() < deadline:
            line = master.stderr.readline()
            assert line, "the master ended before reporting the wait"
        job = line.split("Slurm job ")[1].split()[0]
        assert job_listed(job)
    finally:
        master.kill()
        master.wait()
    wait_until(lambda: not job_listed(job), timeout=30,
               what=f"queued job {job} to be cancelled after the master died")
    assert job_listed(blocker)


# ==================================================================== inside an allocation
INSIDE = textwrap.dedent(
    """
    import os, socket, subprocess, time
    import pydist

    def steps():
        out = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"],
                              "-o", "%i"], capture_output=True, text=True).stdout.split()
        return [s for s in out if s.rpartition(".")[2].isdigit()]

    names = sorted(pydist.remotecall_fetch(socket.gethostname, p) for p in pydist.workers())
    print("MASTER", socket.gethostname())
    print("HOSTS", ",".join(names))
    print("STEPS", len(steps()))
    half = pydist.workers()[: len(names) // 2]
    pydist.rmprocs(half, waitfor=30)
    print("STEPS AFTER SOME", len(steps()))
    pydist.rmprocs(pydist.workers(), waitfor=30)
    deadline = time.monotonic() + 30
    while steps() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("STEPS AFTER ALL", len(steps()), flush=True)
    """
)


def _inside_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    for var in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[var]
    return env


def test_inside_an_sbatch_job_with_pydist_slurm(slurm, tmp_path):
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    out = tmp_path / "job.out"
    done = subprocess.run(
        ["sbatch", "--wait", "-p", "hosts", "-N3", "--ntasks-per-node=2", "-t", "5",
         "-J", "pydist-test-sbatch", "-o", str(out), "--wrap",
         f"exec {sys.executable} -m pydist --slurm {script}"],
        capture_output=True, text=True, env=_inside_env(), timeout=120, cwd=tmp_path)
    text = out.read_text() if out.exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + text
    assert "MASTER h1" in text  # the batch script runs on the allocation's first node
    assert f"HOSTS {','.join(sorted(HOSTS * 2))}" in text
    assert "STEPS 1" in text and "STEPS AFTER SOME 1" in text and "STEPS AFTER ALL 0" in text


def test_inside_an_salloc_allocation_with_pydist_slurm(slurm, tmp_path):
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    done = subprocess.run(
        ["salloc", "-p", "hosts", "-N2", "--ntasks-per-node=1", "-t", "5",
         "-J", "pydist-test-salloc", sys.executable, "-m", "pydist", "--slurm", str(script)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_inside_env(),
        timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"MASTER {socket.gethostname()}" in done.stdout  # salloc runs it here
    hosts = done.stdout.split("HOSTS ")[1].split()[0].split(",")
    assert len(hosts) == 2 and set(hosts) <= set(HOSTS) and hosts[0] != hosts[1]
    assert "STEPS 1" in done.stdout and "STEPS AFTER ALL 0" in done.stdout


def test_pydist_slurm_outside_an_allocation_is_refused():
    env = dict(_inside_env())
    done = subprocess.run([sys.executable, "-m", "pydist", "--slurm", "-c", "pass"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "--slurm runs inside a Slurm allocation" in done.stderr


# ==================================================================== failures
def test_bad_options_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="ntasks must be >= 1"):
        pydist.SlurmManager(0)
    with pytest.raises(TypeError, match="ntasks must be an int"):
        pydist.SlurmManager("4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="option gres= must be a str, a number or a bool"):
        pydist.SlurmManager(2, gres=["gpu:1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="option 'label' is set by SlurmManager itself"):
        pydist.SlurmManager(2, label=True)
    with pytest.raises(TypeError, match="partition must be a str"):
        pydist.SlurmManager(2, partition=3)  # type: ignore[arg-type]
    m = pydist.SlurmManager(4, partition="hosts", time="1:00", cpus_per_task=2, exclusive=True,
                            requeue=False)
    assert repr(m) == ("SlurmManager(ntasks=4, partition='hosts', time='1:00', "
                       "cpus_per_task=2, exclusive=True, requeue=False)")
    from pydist.managers.slurm import srun_options

    assert srun_options({"cpus_per_task": 2, "exclusive": True, "requeue": False,
                         "mem": None, "job_name": "x y"}) == [
        "--cpus-per-task=2", "--exclusive", "--job-name=x y"]


def test_srun_errors_name_the_job_and_what_srun_said(slurm):
    n = pydist.nprocs()
    with pytest.raises(LaunchWorkerError, match=r"(?s)Slurm job.*srun ended with status 1 "
                                                r"before starting 1 of 1 workers.*"
                                                r"invalid partition"):
        pydist.addprocs(manager(1, partition="nosuchpartition"))
    assert pydist.nprocs() == n


def test_a_worker_that_cannot_start_is_named_by_job_task_and_node(slurm):
    with pytest.raises(LaunchWorkerError) as info:
        pydist.addprocs(manager(1, nodelist="h3"), exename="/nonexistent/python")
    message = str(info.value)
    assert "task 0 on node h3" in message and "Slurm job " in message
    assert "/nonexistent/python" in message  # what the task said
    wait_until(lambda: not our_jobs(JOB), timeout=30, what="the job to end")


def test_a_stopped_worker_is_killed_on_its_node_when_removed(slurm, fresh_workers):
    [pid] = fresh_workers(pydist.SlurmManager(1, partition="hosts", job_name=JOB, time="5:00",
                                              nodelist="h1", exit_timeout=1, term_timeout=1))
    config = config_of(pid)
    job = config.userdata["slurm_job"]
    stop_process(config.ospid)  # it cannot hear the exit request, nor act on SIGTERM
    t0 = time.monotonic()
    pydist.rmprocs(pid, waitfor=30)
    assert time.monotonic() - t0 < 20
    wait_until(lambda: not pid_alive(config.ospid), timeout=10, what="the worker to die")
    wait_until(lambda: not job_listed(job), timeout=30, what=f"job {job} to end")


def test_a_silent_worker_is_declared_dead_and_killed_on_its_node(slurm, fresh_workers):
    pids = fresh_workers(manager(2, nodelist="h2,h3", ntasks_per_node=1), heartbeat_timeout=2)
    [pid] = [p for p in pids if hostname_of(p) == "h2"]
    config = config_of(pid)
    job = config.userdata["slurm_job"]
    stop_process(config.ospid)
    with pytest.raises(pydist.ProcessExitedException, match="silent for"):
        pydist.remotecall_fetch(socket.gethostname, pid)
    # Killed on its node, while the job goes on for the other worker.
    wait_until(lambda: not pid_alive(config.ospid), timeout=10,
               what="the silent worker to be killed on its node")
    assert job_listed(job)
    assert [hostname_of(p) for p in pids if p != pid] == ["h3"]


# ---------------------------------------------------------------- a node dies
def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _processes_in(node: str, marker: bytes) -> list[int]:
    """OS pids in node's network namespace whose command line starts with `marker`."""
    want = f"net:[{_netns_inode(node)}]"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") != want:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(marker):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _restart_slurmd(node: str) -> None:
    """As .ci/infra/slurm-up.sh starts it: its own network and UTS namespace."""
    subprocess.run(["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "--", "sh", "-c",
                    f"hostname {node} && exec /usr/sbin/slurmd -N {node}"],
                   check=True, timeout=60)

    def up() -> bool:
        state = node_states().get(node, "")
        if state.startswith(("drain", "down")) and not state.startswith("down*"):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"],
                           capture_output=True, timeout=30)
        return usable(state)

    wait_until(up, timeout=90, interval=0.5, what=f"node {node} to be usable again")


def progress_then_host(x: int, channel) -> str:
    channel.put(x)
    time.sleep(0.15)
    return socket.gethostname()


@pytest.mark.timeout(240)
def test_a_dead_node_loses_its_worker_and_pmap_finishes_on_the_others(slurm, fresh_workers):
    pids = fresh_workers(manager(3), heartbeat_timeout=10)
    names = {p: hostname_of(p) for p in pids}
    [victim] = [p for p in pids if names[p] == "h3"]
    config = config_of(victim)
    job = config.userdata["slurm_job"]
    progress = pydist.RemoteChannel(lambda: pydist.Channel(1000))
    results: list = []
    mapping = threading.Thread(target=lambda: results.append(pydist.pmap(
        progress_then_host, range(30), [progress] * 30, pool=pydist.WorkerPool(pids),
        retry_delays=pydist.ExponentialBackOff(n=3))))
    pidfile = os.path.join(INFRA, "slurm", "slurmd-h3.pid")
    with open(pidfile) as f:
        slurmd = int(f.read().split()[0])
    mapping.start()
    try:
        for _ in range(4):  # the map is under way on every node
            progress.take()
        # h3 dies: its slurmd, the job's slurmstepd there and the worker, all at once.
        stepds = _processes_in("h3", f"slurmstepd: [{job}.".encode())
        assert stepds, "no slurmstepd of the job found on h3"
        for ospid in [slurmd, config.ospid, *stepds]:
            os.kill(ospid, signal.SIGKILL)
        mapping.join(120)
        assert not mapping.is_alive()
        [mapped] = results
        assert len(mapped) == 30 and set(mapped) <= set(HOSTS)
        assert mapped.count("h1") + mapped.count("h2") >= 20
        wait_until(lambda: victim not in pydist.workers(), timeout=30,
                   what="the dead node's worker to be removed")
        with pytest.raises(pydist.ProcessExitedException):
            pydist.remotecall_fetch(socket.gethostname, victim)
        wait_until(lambda: victim in PGRP.lost_reasons, timeout=30, what="the reason of the loss")
        reason = PGRP.lost_reasons[victim]
        assert "on node h3" in reason and f"Slurm job {job}" in reason
        assert sorted(hostname_of(p) for p in pids if p != victim) == ["h1", "h2"]
        pydist.rmprocs([p for p in pids if p != victim], waitfor=30)
    finally:
        if not pid_alive(slurmd):
            _restart_slurmd("h3")
    wait_until(lambda: not job_listed(job), timeout=90, what=f"job {job} to end")
    wait_until(lambda: usable(node_states()["h3"]), timeout=60, what="h3 to be usable")
