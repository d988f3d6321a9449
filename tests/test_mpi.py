"""`python -m pydist.mpi` under real launchers: Open MPI's `mpiexec` (on this machine, and
across the namespace hosts h1..h3 over ssh) and Slurm's `srun --mpi=pmix` (the local node,
and the `hosts` partition). Rank 0 is the master, rank r is worker r+1. Each test runs
tests/mpi_script.py in a fresh job. Without mpiexec + mpi4py (or ssh hosts, or Slurm) these
tests skip; PYDIST_REQUIRE_INFRA=1 turns the skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest

import pydist
from pydist.managers.mpi import _choose_binds

from conftest import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))
INFRA = os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra")
SSH_CONFIG = os.path.join(INFRA, "ssh-client", "config")
HOSTS = ["h1", "h2", "h3"]
ACROSS = ["--mca", "plm_rsh_args", f"-F {SSH_CONFIG}",
          "--mca", "oob_tcp_if_include", "10.200.0.0/24",
          "--mca", "btl_tcp_if_include", "10.200.0.0/24"]
JOB_TIMEOUT = 120  # seconds for one whole job; a hang fails the test, never the suite
SCRIPT = "mpi_script.py"


def _missing(reason: str):
    if os.environ.get("PYDIST_REQUIRE_INFRA") == "1":
        pytest.fail(f"required MPI/Slurm infrastructure is missing: {reason}")
    pytest.skip(f"{reason} (run `.ci/infra/up.sh` as root to create it)")


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """Open MPI's mpiexec, with mpi4py importable by this Python."""
    path = shutil.which("mpiexec")
    if path is None:
        _missing("no mpiexec on PATH")
    if not _works([sys.executable, "-c", "import mpi4py"]):
        _missing(f"mpi4py is not installed for {sys.executable}")
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def hosts(mpiexec) -> list[str]:
    """The namespace hosts h1..h3, reachable over ssh (mpiexec starts its orted there)."""
    for h in HOSTS:
        if not os.path.exists(SSH_CONFIG) or not _works(["ssh", "-F", SSH_CONFIG, h, "true"]):
            _missing(f"namespace host {h} is not reachable over ssh")
    return list(HOSTS)


@pytest.fixture(scope="session")
def srun(mpiexec) -> str:
    path = shutil.which("srun")
    if path is None or not _works(["sinfo", "-h"]):
        _missing("no Slurm (srun, sinfo)")
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def slurm_hosts(srun) -> None:
    done = subprocess.run(["sinfo", "-h", "-p", "hosts", "-o", "%D"], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0 or not done.stdout.strip().isdigit() or int(done.stdout) < 3:
        _missing("no Slurm partition 'hosts' with 3 nodes")


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    env["PYDIST_WORKER_TIMEOUT"] = "30"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"  # more ranks than the 2 cores
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra)
    return env


def run_job(cmd: list[str], *args: str, env: dict | None = None, job_name: str | None = None,
            entry: tuple[str, ...] = ("-m", "pydist.mpi", SCRIPT)) -> subprocess.CompletedProcess:
    """Run `cmd python -m pydist.mpi mpi_script.py args` in tests/, bounded by JOB_TIMEOUT
    (then the launcher's process group is killed, and its Slurm job cancelled)."""
    full = [*cmd, sys.executable, *entry, *args]
    proc = subprocess.Popen(full, cwd=HERE, env=env or _env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        if job_name:
            subprocess.run(["scancel", "--name", job_name], capture_output=True, timeout=60)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{full} hung for {JOB_TIMEOUT} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(full, proc.returncode, out, err)


def result_of(done: subprocess.CompletedProcess) -> dict:
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT line (exit status {done.returncode})\n"
                         f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")


def srun_cmd(*options: str) -> tuple[list[str], str]:
    name = f"pydist-test-mpi-{uuid.uuid4().hex[:8]}"
    return ["srun", "--mpi=pmix", f"--job-name={name}", "--time=5", *options], name


def check_cluster(done: subprocess.CompletedProcess, worker_hosts: list[str] | None) -> dict:
    """What `mpi_script.py check a b` must have seen: ids 2..4 for ranks 1..3 on the
    expected hosts, the script's argv/__name__/folder, pmap, a RemoteChannel, a call from
    worker to worker, relayed output, rmprocs; and a clean exit."""
    res = result_of(done)
    assert done.returncode == 0, done.stderr
    assert res["argv"] == [SCRIPT, "check", "a", "b"]
    assert res["name"] == "__main__"
    assert res["path0"] == HERE
    assert res["workers"] == [2, 3, 4]
    assert {int(p): r for p, (r, _) in res["ranks"].items()} == {2: 1, 3: 2, 4: 3}
    if worker_hosts is not None:
        assert [res["ranks"][str(p)][1] for p in (2, 3, 4)] == worker_hosts
    assert res["imports"] == ["mpi_script"] * 3
    assert res["pmap"] == [x * x for x in range(30)]
    assert res["channel"] == [2, 3, 4]
    assert res["w2w"] == res["ranks"]["4"]
    assert "      From worker 3:\tmarker from 3" in done.stdout.splitlines()
    assert "KeyboardInterrupt" in res["interrupted"]  # interrupt(3): SIGINT reached the rank
    assert res["after_rmprocs"] == [2, 3] and res["pmap_after"] == [x * x for x in range(6)]
    assert "script done" in done.stdout
    return res


def check_lost_worker(done: subprocess.CompletedProcess, host: str | None) -> dict:
    """What `mpi_script.py kill` must have seen: worker 3 (rank 2) died by SIGKILL during a
    pmap with retries; the master reported it, the map finished on the others."""
    res = result_of(done)
    where = f"MPI rank 2 on {host}" if host else "MPI rank 2 on "
    assert f"Worker 3 terminated: it ended ({where}" in done.stderr, done.stderr
    assert res["workers"] == [2, 3, 4] and res["after"] == [2, 4]
    assert res["pmap"] == [x * x for x in range(12)]
    assert res["error"].startswith("ProcessExitedException(3)") and where in res["error"]
    return res


# ---------------------------------------------------------------- mpiexec on this machine
def test_mpiexec_local(mpiexec):
    done = run_job([mpiexec, "-n", "4"], "check", "a", "b")
    check_cluster(done, [socket.gethostname()] * 3)


@pytest.mark.parametrize("mode,status", [("raise", None), ("3", 3), ("0", 0)])
def test_mpiexec_exit_status_is_the_scripts(mpiexec, mode, status):
    done = run_job([mpiexec, "-n", "3"], mode)
    if status is None:
        assert done.returncode != 0
        assert "ValueError: the script failed on purpose" in done.stderr
    else:
        assert done.returncode == status, done.stderr


def test_mpiexec_usage_error_ends_every_rank(mpiexec):
    full = [mpiexec, "-n", "3", sys.executable, "-m", "pydist.mpi", "no_such_script.py"]
    done = subprocess.run(full, cwd=HERE, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)
    assert done.returncode == 2
    assert "no such script: no_such_script.py" in done.stderr


def test_mpiexec_killed_worker_ends_the_job_after_the_report(mpiexec):
    """Open MPI's default: a rank killed by a signal makes mpiexec stop the whole job. The
    master reports the lost worker first (and says why it is stopped)."""
    done = run_job([mpiexec, "-n", "4"], "kill", env=_env(MPI_SCRIPT_LINGER="30"))
    assert done.returncode != 0
    report = done.stderr.find("Worker 3 terminated: it ended (MPI rank 2 on ")
    assert report >= 0, done.stderr
    assert "script done" not in done.stdout  # mpiexec ended it (it lingers 30 s)
    stopped = done.stderr.find("pydist.mpi: the MPI launcher is stopping this job")
    assert stopped == -1 or stopped > report


def test_mpiexec_enable_recovery_keeps_the_job(mpiexec):
    """With --enable-recovery the job survives: the map finishes on the other workers."""
    done = run_job([mpiexec, "--enable-recovery", "-n", "4"], "kill")
    check_lost_worker(done, socket.gethostname())
    assert "script done" in done.stdout
    assert done.returncode == 0  # (Open MPI 4.1 then returns 0 whatever the ranks did)


@pytest.mark.parametrize("entry", [(), ("-m", "pydist.mpi")], ids=["python", "pydist.mpi"])
def test_start_from_inside_a_script(mpiexec, tmp_path, entry):
    """`pydist.mpi.start()` in a script run by mpiexec directly: rank 0 gets the workers,
    the other ranks serve and never run the rest of the script. Under `python -m
    pydist.mpi` the cluster exists already: start() returns its workers."""
    script = tmp_path / "started.py"
    script.write_text(
        "import sys\n"
        "import pydist, pydist.mpi\n"
        "pids = pydist.mpi.start()\n"
        "print('ONLY MASTER', pids, pydist.pmap(abs, range(-3, 3)), sys.argv[1:], flush=True)\n")
    done = run_job([mpiexec, "-n", "3"], "q", entry=(*entry, str(script)))
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if "ONLY MASTER" in line] == [
        "ONLY MASTER [2, 3] [3, 2, 1, 0, 1, 2] ['q']"]


# ---------------------------------------------------------------- mpiexec across hosts
def test_mpiexec_master_here_workers_on_hosts(mpiexec, hosts):
    me = socket.gethostname()
    done = run_job([mpiexec, *ACROSS, "-x", "PYTHONPATH", "-x", "PYDIST_WORKER_TIMEOUT",
                    "--host", f"{me}:1,h1:1,h2:1,h3:1"], "check", "a", "b")
    res = check_cluster(done, hosts)
    assert res["master_host"] == me


def test_mpiexec_all_ranks_on_hosts(mpiexec, hosts):
    done = run_job([mpiexec, *ACROSS, "-x", "PYTHONPATH", "-x", "PYDIST_WORKER_TIMEOUT",
                    "--host", "h1:2,h2:1,h3:1"], "check", "a", "b")
    res = check_cluster(done, ["h1", "h2", "h3"])
    assert res["master_host"] == "h1"


# ---------------------------------------------------------------- srun --mpi=pmix
def test_srun_local(srun):
    cmd, name = srun_cmd("-n", "4")
    done = run_job(cmd, "check", "a", "b", job_name=name)
    check_cluster(done, None)  # the node's hostname as Slurm sees it


def test_srun_across_hosts(slurm_hosts):
    cmd, name = srun_cmd("-p", "hosts", "-N3", "-n4")
    done = run_job(cmd, "check", "a", "b", job_name=name)
    res = check_cluster(done, None)
    assert {host for _, host in res["ranks"].values()} == set(HOSTS)


def test_srun_killed_worker_job_goes_on(srun):
    """Under srun a dead rank does not stop the others (MPI is finalized): the master is
    told, the map finishes, the script ends; srun's status is the killed task's."""
    cmd, name = srun_cmd("-n", "4")
    done = run_job(cmd, "kill", job_name=name)
    check_lost_worker(done, None)
    assert "script done" in done.stdout
    assert done.returncode != 0


def test_srun_dead_master_ends_every_rank(srun):
    """The master SIGKILLed: the workers see their connection to it close and exit, so
    srun returns (nothing is left behind)."""
    cmd, name = srun_cmd("-n", "3")
    done = run_job(cmd, "die", job_name=name)
    assert result_of(done)["workers"] == [2, 3]
    assert done.returncode != 0
    for pid in (2, 3):
        assert f"From worker {pid}:\tWARNING pydist.dispatch: worker {pid}: the master is gone" \
            in done.stderr, done.stdout + done.stderr
    killed = [line for line in done.stderr.splitlines() if line.endswith("Killed")]
    assert len(killed) == 1 and killed[0].endswith("task 0: Killed")  # workers: exited

    def job_gone() -> bool:  # (it may show as completing, CG, for a moment)
        left = subprocess.run(["squeue", "-h", "--name", name], capture_output=True,
                              text=True, timeout=60)
        return left.stdout.strip() == ""

    wait_until(job_gone, timeout=30, interval=0.2, what=f"job {name} gone from squeue")


def test_srun_script_error_status(srun):
    cmd, name = srun_cmd("-n", "3")
    done = run_job(cmd, "raise", job_name=name)
    assert done.returncode != 0
    assert "ValueError: the script failed on purpose" in done.stderr


# ---------------------------------------------------------------- without a launcher
def test_singleton_runs_the_script_without_workers(mpiexec):
    """`python -m pydist.mpi` without mpiexec: one rank, the master, no workers."""
    done = subprocess.run([sys.executable, "-m", "pydist.mpi", "-c",
                           "import pydist, sys; print(pydist.workers(), sys.argv)", "x"],
                          cwd=HERE, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1] ['-c', 'x']"


def test_tasks_that_mpi_sees_apart_are_refused(mpiexec):
    """Slurm said the step has 2 tasks but MPI sees 1 rank (srun without --mpi=pmix, with an
    MPI that then starts alone): an error instead of one master per task."""
    done = subprocess.run([sys.executable, "-m", "pydist.mpi", "-c", "print('RAN')"],
                          cwd=HERE, env=_env(SLURM_STEP_NUM_TASKS="2"), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    assert done.returncode == 1
    assert "RAN" not in done.stdout
    assert "srun started 2 tasks but MPI sees a job of 1 rank" in done.stderr
    assert "srun --mpi=pmix" in done.stderr


def test_missing_mpi4py_is_a_clear_error(tmp_path):
    """Without mpi4py: one line saying what to install, exit status 1 (no MPI needed)."""
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, "-m", "pydist.mpi", "-c", "print(1)"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pydist.mpi needs mpi4py (pip install 'pydist[mpi]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_bind_addresses_follow_the_network_that_reaches_the_master():
    """Where worker ranks listen: loopback when all share the master's network namespace;
    else, on the first of the master's networks every worker reaches, their own address."""
    here = {"netns": "A", "routes": ["192.0.2.2", "10.200.0.254"]}
    h1 = {"netns": "B", "routes": [None, "10.200.0.1"]}
    h2 = {"netns": "C", "routes": [None, "10.200.0.2"]}
    masters = ["192.0.2.2", "10.200.0.254"]
    assert _choose_binds(masters, "A", [dict(here), dict(here)]) == ["127.0.0.1"] * 2
    assert _choose_binds(masters, "A", [here, h1, h2]) == ["10.200.0.254", "10.200.0.1",
                                                          "10.200.0.2"]
    lonely = {"netns": "D", "routes": ["198.51.100.7", None]}
    assert _choose_binds(masters, "A", [h1, lonely]) == ["10.200.0.1", "198.51.100.7"]
    assert _choose_binds([], "A", [h1 | {"routes": []}]) == [""]  # its own default


def test_line_prefix_writes_whole_lines():
    """A worker rank's stdout: whole lines, one write each, prefixed (no interleaving)."""
    from pydist.mpi import _LinePrefix

    class Recorder(io.StringIO):
        """A text stream that also keeps each write apart."""

        def __init__(self):
            super().__init__()
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return super().write(s)

    rec = Recorder()
    out = _LinePrefix(rec, lambda: "W: ")
    print("a", "b", file=out)
    print("one\ntwo", file=out)  # (print writes the text, then the newline)
    out.write("x\ny\n")
    out.write("part")
    out.flush()
    out.write("ial\n")
    assert rec.writes == ["W: a b\n", "W: one\n", "W: two\n", "W: x\nW: y\n", "W: part",
                          "ial\n"]

