"""SSHManager against real OpenSSH servers: sshd on 127.0.0.1:2222 and three "hosts" h1..h3
(network namespaces with their own address, hostname and sshd), as `.ci/infra/up.sh` makes
them. Without that infrastructure these tests skip (CI sets PYDIST_REQUIRE_INFRA=1, which
turns the skip into a failure).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import pydist
from pydist.calls import connection
from pydist.group import PGRP
from pydist.exceptions import LaunchWorkerError, RemoteException

from conftest import autogroup_of, pid_alive, wait_until
from hosthelpers import call_other, config_of, hostname_of

INFRA = os.environ.get("PYDIST_INFRA_DIR", "/tmp/infra")
SSH_CONFIG = os.path.join(INFRA, "ssh-client", "config")
SSHFLAGS = ["-F", SSH_CONFIG]
HOSTS = ["h1", "h2", "h3"]
HOST_ADDR = {"h1": "10.200.0.1", "h2": "10.200.0.2", "h3": "10.200.0.3"}


def _missing(reason: str):
    if os.environ.get("PYDIST_REQUIRE_INFRA") == "1":
        pytest.fail(f"required SSH infrastructure is missing: {reason}")
    pytest.skip(f"{reason} (run `.ci/infra/up.sh` as root to create it)")


def _ssh_ok(*target: str) -> bool:
    try:
        done = subprocess.run(["ssh", *SSHFLAGS, *target, "true"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def loopback_sshd():
    """sshd on 127.0.0.1:2222."""
    if not os.path.exists(SSH_CONFIG):
        _missing(f"no ssh client config at {SSH_CONFIG}")
    if not _ssh_ok("-p", "2222", "127.0.0.1"):
        _missing("no sshd answering on 127.0.0.1:2222")
    return "127.0.0.1:2222"


@pytest.fixture(scope="session")
def hosts(loopback_sshd):
    """The namespace hosts h1..h3, each with its own sshd."""
    for h in HOSTS:
        if not _ssh_ok(h):
            _missing(f"namespace host {h} is not reachable over ssh (network namespaces "
                     "cannot be created here, or netns-up.sh was not run)")
    return list(HOSTS)


@pytest.fixture
def ssh_workers(fresh_workers):
    """addprocs over ssh with the test client config; removes what it added at the end."""

    def add(machines, **kw) -> list[int]:
        kw.setdefault("sshflags", SSHFLAGS)
        return fresh_workers(machines, **kw)

    return add


def ssh_worker_processes() -> list[int]:
    """OS pids of SSH-launched workers (all namespace hosts share our PID namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"pydist.worker" in args and b"--exit-on-eof" in args and pid_alive(int(entry)):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module", autouse=True)
def no_ssh_worker_left_behind():
    """After this module, every SSH worker it started -- including those whose launch
    failed half-way -- is gone."""
    before = set(ssh_worker_processes())
    yield
    wait_until(lambda: not set(ssh_worker_processes()) - before, timeout=60,
               what="every SSH worker started by these tests to exit")


def put_into(channel, value) -> None:
    channel.put(value)


def all_gone(ospids, procs=()) -> bool:
    return not any(pid_alive(p) for p in ospids) and all(p.poll() is not None for p in procs)


# ==================================================================== modes
MODES = {
    "plain": {},
    "tunnel": {"tunnel": True},
    "tunnel+multiplex": {"tunnel": True, "multiplex": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_workers_on_three_hosts(hosts, ssh_workers, mode):
    pids = ssh_workers(hosts, **MODES[mode])
    assert len(pids) == 3
    by_host = {hostname_of(p): p for p in pids}
    assert sorted(by_host) == HOSTS
    for h, p in by_host.items():
        config = config_of(p)
        # Each worker listens on the address ssh reached its host at; others use it.
        assert config.connect_at[0] == HOST_ADDR[h]
        if mode == "plain":
            assert config.forward is None
        else:
            lport, addr, port = config.forward.split(":")
            assert (addr, int(port)) == config.connect_at
            assert PGRP.workers[p].conn.sock.getpeername() == ("127.0.0.1", int(lport))
    # Worker to worker, across hosts, without the master in the middle.
    assert pydist.remotecall_fetch(call_other, by_host["h1"], by_host["h3"]) == "h3"
    assert pydist.remotecall_fetch(call_other, by_host["h3"], by_host["h2"]) == "h2"
    ch = pydist.RemoteChannel(lambda: pydist.Channel(4), by_host["h2"])
    pydist.remotecall_fetch(put_into, by_host["h1"], ch, "from h1")
    assert ch.take() == "from h1"

    ospids = [config_of(p).ospid for p in pids]
    sshs = [config_of(p).process for p in pids]
    tunnels = [(config_of(p).userdata or {}).get("tunnel_proc") for p in pids]
    assert all(pid_alive(o) for o in ospids)
    pydist.rmprocs(pids, waitfor=60)
    # Workers, their ssh sessions and our tunnels are all gone.
    wait_until(lambda: all_gone(ospids, sshs + [t for t in tunnels if t]), timeout=30,
               what="ssh workers, ssh clients and tunnels to exit")
    if mode == "tunnel":
        assert all(t is not None for t in tunnels)
    else:
        assert all(t is None for t in tunnels)


def test_tunnel_reaches_a_worker_listening_on_its_hosts_loopback(hosts, ssh_workers):
    # The worker listens on h1's own 127.0.0.1: only a tunnel reaches it.
    [pid] = ssh_workers(["h1 127.0.0.1"], tunnel=True)
    assert hostname_of(pid) == "h1"
    assert config_of(pid).connect_at[0] == "127.0.0.1"
    with pytest.raises(LaunchWorkerError, match="on host h1: could not connect to worker"):
        ssh_workers(["h1 127.0.0.1"], timeout=20)


# ==================================================================== several workers per host
def lineage() -> tuple[int, str, int]:
    """(os pid of our parent, its command line, os pid of its parent)."""
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode()
    with open(f"/proc/{ppid}/stat") as f:
        grandparent = int(f.read().rsplit(")", 1)[1].split()[1])
    return ppid, cmdline, grandparent


def family_to(pid: int) -> str:
    """The address family of this process's connection to `pid`."""
    return connection(pid).sock.family.name


def test_count_and_auto_start_siblings_through_the_first_worker(hosts, ssh_workers, capsys):
    pids = ssh_workers([("h1", 2), "auto*h2"])
    hostnames = sorted(hostname_of(p) for p in pids)
    ncpu = pydist.remotecall_fetch(os.cpu_count, pids[0])
    assert hostnames == ["h1", "h1"] + ["h2"] * ncpu
    on_h1 = sorted((p for p in pids if hostname_of(p) == "h1"),
                   key=lambda p: config_of(p).process is None)
    first, sibling = on_h1
    assert config_of(first).process is not None and config_of(sibling).process is None
    # The sibling was started by the first worker on its host, not by its own ssh: forked
    # by a fork server that the first worker started there.
    parent, cmdline, grandparent = pydist.remotecall_fetch(lineage, sibling)
    assert "pydist.forkserver" in cmdline and grandparent == config_of(first).ospid, \
        (parent, cmdline, grandparent, config_of(first).ospid)
    # That fork server does not lower its group's priority as the master's does: no master
    # runs on that host for its workers to yield to.
    assert "--yield-to-master" not in cmdline
    assert pydist.remotecall_fetch(autogroup_of, sibling)[1] in (None, 0)
    # Its output reaches us through the first worker, prefixed with its own id.
    pydist.remotecall_fetch(print, sibling, "hello from the sibling")
    wait_until(lambda: f"From worker {sibling}:\thello from the sibling"
               in capsys.readouterr().out, timeout=30, what="the sibling's output")
    assert pydist.remotecall_fetch(call_other, sibling, first) == "h1"
    # Workers in one network namespace talk over their local Unix sockets; across hosts,
    # and from the master (in another namespace), over TCP.
    on_h2 = next(p for p in pids if hostname_of(p) == "h2")
    assert pydist.remotecall_fetch(call_other, sibling, on_h2) == "h2"
    assert pydist.remotecall_fetch(family_to, sibling, first) == "AF_UNIX"
    assert pydist.remotecall_fetch(family_to, sibling, on_h2) == "AF_INET"
    assert family_to(sibling) == family_to(first) == "AF_INET"
    # procs(pid) groups processes by host.
    assert pydist.procs(sibling) == sorted(on_h1)


def test_siblings_are_fresh_interpreters_where_the_host_says_spawn(hosts, ssh_workers):
    pids = ssh_workers([("h1", 2)], env={"PYDIST_START_METHOD": "spawn"})
    first, sibling = sorted(pids, key=lambda p: config_of(p).process is None)
    parent, cmdline, _ = pydist.remotecall_fetch(lineage, sibling)
    assert parent == config_of(first).ospid and "pydist.worker" in cmdline, (parent, cmdline)
    assert pydist.remotecall_fetch(call_other, sibling, first) == "h1"


# ==================================================================== failures
def test_a_missing_host_does_not_abort_the_others(hosts, ssh_workers):
    with pytest.raises(LaunchWorkerError) as info:
        ssh_workers(["h1", "nohost.invalid", "h2"])
    message = str(info.value)
    assert "on host nohost.invalid" in message
    assert "Could not resolve hostname" in message  # what ssh said
    added = info.value.added_pids
    assert sorted(hostname_of(p) for p in added) == ["h1", "h2"]
    assert all(p in pydist.workers() for p in added)


def test_bad_machine_strings_and_keywords_are_refused_before_launching(loopback_sshd):
    n = pydist.nprocs()
    with pytest.raises(ValueError, match="invalid port number"):
        pydist.addprocs(["h1:99999"])
    with pytest.raises(ValueError, match="invalid port format"):
        pydist.addprocs(["h1:ssh"])
    with pytest.raises(ValueError, match="invalid shell"):
        pydist.addprocs(["h1"], shell="fish", sshflags=SSHFLAGS)
    with pytest.raises(TypeError, match="unexpected keyword argument 'restrict'"):
        pydist.addprocs(["h1"], restrict=False)
    assert pydist.nprocs() == n


# ==================================================================== interrupt, removal, death
def test_interrupt_over_ssh(hosts, ssh_workers):
    [pid] = ssh_workers(["h3"])
    fut = pydist.remotecall(time.sleep, pid, 60)
    wait_until(lambda: not fut.isready(), timeout=5)
    time.sleep(0.5)  # let the call start sleeping
    t0 = time.monotonic()
    pydist.interrupt(pid)
    with pytest.raises(RemoteException) as info:
        fut.fetch()
    assert time.monotonic() - t0 < 20
    assert "KeyboardInterrupt" in str(info.value)
    assert hostname_of(pid) == "h3"  # the worker lives on


MASTER = textwrap.dedent(
    """
    import json, sys, time
    import pydist
    from pydist.group import PGRP
    pids = pydist.addprocs(sys.argv[1:], sshflags={sshflags!r})
    info = {{"ospids": [PGRP.workers[p].config.ospid for p in pids],
             "sshs": [PGRP.workers[p].config.process.pid for p in pids]}}
    print(json.dumps(info), flush=True)
    time.sleep(600)
    """
)


def test_master_killed_remote_workers_exit(hosts, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(MASTER.format(sshflags=SSHFLAGS))
    master = subprocess.Popen([sys.executable, str(script), "h1", "h2", "h3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        # The workers' output is relayed to the master's stdout too (a line of its own, a tab
        # first: a remote shell may say something as a worker starts): the script's is JSON.
        line = master.stdout.readline()
        while line.startswith("\t"):
            line = master.stdout.readline()
        info = json.loads(line)
        assert len(info["ospids"]) == 3 and all(pid_alive(p) for p in info["ospids"])
    finally:
        master.kill()
        master.wait()
    wait_until(lambda: not any(pid_alive(p) for p in info["ospids"] + info["sshs"]),
               timeout=30, what="remote workers and ssh clients to exit after the master died")


def test_worker_exits_when_its_ssh_client_is_killed(hosts, ssh_workers, capfd):
    [pid] = ssh_workers(["h2"])
    config = config_of(pid)
    config.process.kill()
    wait_until(lambda: not pid_alive(config.ospid), timeout=30,
               what="the worker to exit after its ssh client was killed")
    wait_until(lambda: pid not in pydist.procs(), timeout=30, what="the master to notice")
    assert f"Worker {pid} terminated: it lost its ssh session" in capfd.readouterr().err


# ==================================================================== machine strings, keywords
def test_every_machine_string_form_over_real_ssh(hosts, ssh_workers):
    user = getpass.getuser()
    pids = ssh_workers([
        "127.0.0.1:2222",                   # host:port
        f"{user}@127.0.0.1:2222",           # user@host:port (same machine: counts add up)
        "h3 10.200.0.3",                    # bind address
        "h2 10.200.0.2:[9300]",             # bind address with a port hint
        "2*h1",                             # count prefix
    ])
    names = sorted(hostname_of(p) for p in pids)
    assert names == sorted([socket.gethostname()] * 2 + ["h3", "h2", "h1", "h1"])
    ports = {hostname_of(p): config_of(p).connect_at for p in pids}
    assert ports["h3"][0] == "10.200.0.3"
    assert ports["h2"][0] == "10.200.0.2" and ports["h2"][1] >= 9300


def worker_facts() -> dict:
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    return {"cwd": os.getcwd(), "env": dict(os.environ), "exe": sys.executable,
            "cookie_arg": b"--cookie" in cmdline}


def test_dir_env_exename_and_cmdline_cookie(hosts, ssh_workers, monkeypatch, tmp_path):
    monkeypatch.setenv("PYDIST_TEST_FORWARDED", "from the master")
    monkeypatch.setenv("NOT_FORWARDED", "x")
    [pid] = ssh_workers(["h1"], dir=str(tmp_path), env={"MY_VAR": "it's a \"value\" $HOME"},
                        exename=sys.executable, cmdline_cookie=True)
    facts = pydist.remotecall_fetch(worker_facts, pid)
    assert facts["cwd"] == str(tmp_path)
    assert facts["env"]["MY_VAR"] == "it's a \"value\" $HOME"
    assert facts["env"]["PYDIST_TEST_FORWARDED"] == "from the master"
    assert "NOT_FORWARDED" not in facts["env"]
    assert facts["exe"] == sys.executable
    assert facts["cookie_arg"] is True


def test_max_parallel_one_and_the_ssh_keyword(hosts, ssh_workers):
    import shutil

    pids = ssh_workers(hosts, max_parallel=1, ssh=shutil.which("ssh"))
    assert sorted(hostname_of(p) for p in pids) == HOSTS


def test_sshmanager_object_and_its_repr(hosts, ssh_workers):
    manager = pydist.SSHManager(["h1", ("h1", 2), "h2"])
    assert "('h1', 3)" in repr(manager)  # counts of one machine add up, as in Julia
    pids = ssh_workers(manager)
    assert sorted(hostname_of(p) for p in pids) == ["h1", "h1", "h1", "h2"]


def test_machine_file_on_the_command_line(hosts, tmp_path):
    machines = tmp_path / "machines"
    machines.write_text("# two hosts\nh1\n2*h2 10.200.0.2\n\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        """
        import socket
        import pydist
        names = [pydist.remotecall_fetch(socket.gethostname, p) for p in pydist.workers()]
        print("HOSTS", ",".join(sorted(names)))
        """))
    env = dict(os.environ, PYDIST_SSHFLAGS=" ".join(SSHFLAGS))
    done = subprocess.run([sys.executable, "-m", "pydist", "-p", "1", "--machine-file",
                           str(machines), str(script)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = ",".join(sorted([socket.gethostname(), "h1", "h2", "h2"]))
    assert f"HOSTS {expected}" in done.stdout


# ==================================================================== faults
def _host_link(host: str, state: str) -> None:
    """Take the namespace host's link on our bridge down or up: a silent partition (packets
    are dropped, nobody is told)."""
    subprocess.run(["ip", "link", "set", f"v{host}", state], check=True, timeout=30)


def _slow_hostname(x: int) -> str:
    time.sleep(0.1)
    return socket.gethostname()


@pytest.mark.timeout(240)
def test_a_partitioned_host_is_declared_dead_and_pmap_retries_elsewhere(hosts, ssh_workers):
    hb = 3.0
    pids = ssh_workers(["h1", "h2"], heartbeat_timeout=hb)
    names = {p: hostname_of(p) for p in pids}
    [cut] = [p for p in pids if names[p] == "h1"]
    ospid = config_of(cut).ospid
    _host_link("h1", "down")
    try:
        start = time.monotonic()
        results = pydist.pmap(_slow_hostname, range(30), pool=pydist.WorkerPool(pids),
                              retry_delays=pydist.ExponentialBackOff(n=3))
        assert len(results) == 30 and set(results) <= {"h1", "h2"}
        with pytest.raises(pydist.ProcessExitedException, match="silent for"):
            pydist.remotecall_fetch(socket.gethostname, cut)
        assert time.monotonic() - start < hb + 60
        assert cut not in pydist.workers()
        # The cut-off worker finds its master silent and exits by itself.
        wait_until(lambda: not pid_alive(ospid), timeout=hb + 30,
                   what="the partitioned worker to exit by itself")
    finally:
        _host_link("h1", "up")
    assert hostname_of([p for p in pids if p != cut][0]) == "h2"


def _say_and_exit(code: int) -> None:
    print("last words before exiting", file=sys.stderr, flush=True)
    time.sleep(0.5)  # so that the line is relayed before the connection drops
    os._exit(code)


def test_an_ssh_worker_that_exits_says_ssh_status_and_its_last_output(hosts, ssh_workers):
    [pid] = ssh_workers(["h3"])
    with pytest.raises(pydist.ProcessExitedException,
                       match=r"ssh to h3 ended with status 3; its last output:\n.*last words"):
        pydist.remotecall_fetch(_say_and_exit, pid, 3)


# ==================================================================== sshd's MaxStartups
@pytest.fixture
def strict_sshd(tmp_path):
    """A private sshd on a free loopback port that drops unauthenticated connections beyond
    two at a time (`MaxStartups 2`), as a stock sshd does beyond 10 under load."""
    import shutil

    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    authorized = os.path.join(INFRA, "authorized_keys")
    if not (os.path.exists(SSH_CONFIG) and os.path.exists(authorized)
            and os.access(sshd, os.X_OK)):
        _missing("no sshd, or no client key set up by .ci/infra/ssh-up.sh")
    hostkey = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                   check=True, capture_output=True, timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {hostkey}
        PidFile {tmp_path / "sshd.pid"}
        AuthorizedKeysFile {authorized}
        StrictModes no
        PermitRootLogin prohibit-password
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        AcceptEnv PYTHON* PYDIST_*
        AllowTcpForwarding yes
        MaxStartups 2
        """))
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    with open(tmp_path / "sshd.log", "wb") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    try:
        wait_until(lambda: proc.poll() is not None or _ssh_ok("-p", str(port), "127.0.0.1"),
                   timeout=30, what="the private sshd to answer")
        if proc.poll() is not None:
            _missing(f"the private sshd did not start: {(tmp_path / 'sshd.log').read_text()}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(300)
def test_max_parallel_bounds_the_tunnels_opened_to_one_host(strict_sshd, ssh_workers):
    """Six tunnelled workers on one host whose sshd admits two unauthenticated connections
    at a time: with max_parallel=2 at most two tunnels to it are being opened at once (as
    Julia's per-host tunnel semaphore), so sshd drops none and every worker joins."""
    src = os.path.dirname(os.path.dirname(pydist.__file__))  # the pydist under test
    pids = ssh_workers([(strict_sshd, 6)], tunnel=True, max_parallel=2,
                       exename=sys.executable, env={"PYTHONPATH": src})
    assert len(pids) == 6
    assert all(config_of(p).tunnel and config_of(p).forward for p in pids)
    assert len({pydist.remotecall_fetch(os.getpid, p) for p in pids}) == 6


def _extra(module: str):
    """An optional extra for one test: skip without it, fail under PYDIST_REQUIRE_EXTRAS=1."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("PYDIST_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"{module} is not installed; PYDIST_REQUIRE_EXTRAS=1 requires it")
        pytest.skip(f"{module} is not installed (pip install -e '.[sklearn]')")


def host_number(estimator, X, y) -> float:
    """A scikit-learn scorer that says where it ran: 1.0 on h1, 2.0 on h2, 0.0 elsewhere."""
    return {"h1": 1.0, "h2": 2.0}.get(socket.gethostname(), 0.0)


@pytest.mark.timeout(300)
def test_joblib_and_scikit_learn_run_on_ssh_workers(hosts, ssh_workers):
    """The "pydist" joblib backend on workers of other hosts: joblib.Parallel and a
    GridSearchCV with n_jobs=-1 run there, with the results of n_jobs=1."""
    _extra("joblib")
    _extra("sklearn")
    import pydist.joblib  # noqa: F401  (registers the backend)
    from joblib import Parallel, delayed, parallel_config
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    pids = ssh_workers(["h1", "h2"])
    pool = pydist.WorkerPool(pids)
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0]}
    scoring = {"acc": "accuracy", "host": host_number}
    here = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, scoring=scoring,
                        refit="acc", n_jobs=1).fit(X, y)
    with parallel_config(backend="pydist", pool=pool):
        names = Parallel(n_jobs=-1, batch_size=1)(delayed(socket.gethostname)() for _ in range(8))
        there = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, scoring=scoring,
                             refit="acc", n_jobs=-1).fit(X, y)
    # The first two batches go to two different workers (each runs one at a time).
    assert set(names) == {"h1", "h2"} and len(names) == 8
    assert there.best_params_ == here.best_params_
    assert list(there.cv_results_["mean_test_acc"]) == list(here.cv_results_["mean_test_acc"])
    ran = {there.cv_results_[f"split{i}_test_host"][j] for i in range(3) for j in range(3)}
    assert ran == {1.0, 2.0}
    assert set(here.cv_results_["split0_test_host"]) == {0.0}
