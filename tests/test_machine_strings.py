"""Machine strings and the remote command line of SSHManager (no ssh needed): Julia's parsing
rules, and the command for each login shell, run by a real `sh` and a real `tcsh`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pydist.managers.ssh import MachineSpec, _aggregate, parse_machine, remote_command


@pytest.mark.parametrize("text, expected", [
    ("host", ("host", None)),
    ("host:22", ("host", 22)),
    ("10.0.0.1:2222", ("10.0.0.1", 2222)),
    ("[::1]", ("::1", None)),
    ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
    ("host:1", ("host", 1)),
    ("host:65535", ("host", 65535)),
])
def test_parse_machine(text, expected):
    assert parse_machine(text) == expected


@pytest.mark.parametrize("text, message", [
    ("host:0", "invalid port number"),
    ("host:65536", "invalid port number"),
    ("host:-1", "invalid port number"),
    ("host:ssh", "invalid port format"),
    ("host:22:33", "invalid port format"),
    ("::1", "invalid port format"),          # IPv6 needs brackets
    ("[::1", "invalid port format"),
    ("[::1]:x", "invalid port format"),
    ("", "empty host"),
    (":22", "empty host"),
])
def test_bad_machines_raise_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_machine(text)


def test_machine_spec_every_part():
    spec = MachineSpec("3*alice@node7:2200 10.1.1.7:[9000]")
    assert (spec.count, spec.user, spec.host, spec.port, spec.bind_to) == (
        3, "alice", "node7", 2200, "10.1.1.7:[9000]")
    assert spec.target == "alice@node7"
    spec = MachineSpec("auto*[::1]:22")
    assert (spec.count, spec.host, spec.port, spec.target) == ("auto", "::1", 22, "::1")
    spec = MachineSpec("bob@host")
    assert (spec.count, spec.user, spec.host, spec.port, spec.bind_to) == (1, "bob", "host", None, None)


@pytest.mark.parametrize("text", ["0*host", "x*host", "host a b", "", "host bind:99999"])
def test_bad_machine_specs(text):
    with pytest.raises(ValueError):
        MachineSpec(text)


def test_aggregation_adds_counts_and_auto_wins():
    specs = {s.key: s.count for s in _aggregate(["a", ("a", 2), "b", "2*b", ("c", 1), ("c", "auto")])}
    assert specs == {"a": 3, "b": 3, "c": "auto"}
    with pytest.raises(TypeError):
        _aggregate([42])
    with pytest.raises(ValueError):
        _aggregate([("a", 1, 2)])


PROBE = "import os, sys; print(os.getcwd()); print(os.environ['V1']); print(os.environ['V2']); print(sys.argv[1:])"
TRICKY = "it's \"quoted\" $HOME `date` !bang \\ end"


def run_remote(shell_cmd: list[str], tmp_path) -> list[str]:
    done = subprocess.run(shell_cmd, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_posix_command_runs_in_a_real_sh(tmp_path):
    work = tmp_path / "dir with 'quotes' and spaces"
    work.mkdir()
    cmd = remote_command("posix", sys.executable, ["-c", PROBE, TRICKY], str(work),
                         {"V1": TRICKY, "V2": "plain"})
    assert cmd.startswith("sh -l -c ")
    # ssh hands the string to the remote user's shell: so do we.
    out = run_remote(["sh", "-c", cmd], tmp_path)
    assert out == [str(work), TRICKY, "plain", repr([TRICKY])]


@pytest.mark.skipif(shutil.which("tcsh") is None, reason="tcsh is not installed (apt-get install tcsh)")
def test_csh_command_runs_in_a_real_tcsh(tmp_path):
    work = tmp_path / "dir with 'quotes' and spaces"
    work.mkdir()
    cmd = remote_command("csh", sys.executable, ["-c", PROBE, TRICKY], str(work),
                         {"V1": TRICKY, "V2": "plain"})
    assert "setenv V1 " in cmd and cmd.splitlines()[-1].startswith("exec ")
    out = run_remote(["tcsh", "-f", "-c", cmd], tmp_path)
    assert out == [str(work), TRICKY, "plain", repr([TRICKY])]


def test_wincmd_command_form():
    # No Windows here: the string is checked against Julia's form only.
    cmd = remote_command("wincmd", r"C:\Python\python.exe", ["-m", "pydist.worker"],
                         r"C:\work", {"V1": "a"})
    assert cmd == r'set V1=a&& pushd "C:\work" && "C:\Python\python.exe" -m pydist.worker'
    with pytest.raises(ValueError, match="invalid exename"):
        remote_command("wincmd", 'C:\\a"b', [], None, {})
    with pytest.raises(ValueError, match="invalid dir"):
        remote_command("wincmd", "python", [], 'C:\\"', {})


@pytest.mark.parametrize("shell, key", [("posix", "1BAD"), ("posix", "A-B"), ("csh", "A B"),
                                        ("wincmd", "A B")])
def test_invalid_env_keys(shell, key):
    with pytest.raises(ValueError, match="invalid env key"):
        remote_command(shell, "python", [], None, {key: "v"})


def test_invalid_shell():
    with pytest.raises(ValueError, match="invalid shell"):
        remote_command("fish", "python", [], None, {})
