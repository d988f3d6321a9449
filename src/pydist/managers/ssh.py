"""SSHManager: workers on other machines, started through the system `ssh` binary (imported
on first use: `pydist.SSHManager` and `addprocs(machines)` load it, `import pydist` does not).

One ssh connection per machine starts the first worker there (`python -m pydist.worker
--exit-on-eof`, the cookie on its stdin); more workers on the same machine (`count > 1` or
"auto") are started by that first worker, as in Julia. The master then connects to each
worker directly over TCP, or through an ssh tunnel (`tunnel=True`, optionally over one
multiplexed connection per host, `multiplex=True`).

A worker exits when its master connection drops, and also when its ssh session ends (its
stdin closes), so killing the master or its ssh clients leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Iterable

from ..exceptions import LaunchWorkerError, error_group
from ..group import PGRP
from . import (
    Authenticated,
    ClusterManager,
    WorkerConfig,
    connect_tcp,
    read_worker_address,
    reap,
    worker_env,
    worker_timeout,
)

log = logging.getLogger(__name__)

__all__ = ["SSHManager", "parse_machine", "parse_machine_spec", "remote_command"]

SHELLS = ("posix", "csh", "wincmd")
_ENV_KEY = {
    "posix": re.compile(r"[a-zA-Z_][a-zA-Z_0-9]*\Z"),
    "csh": re.compile(r"[a-zA-Z_][a-zA-Z_0-9]*\Z"),
    "wincmd": re.compile(r"[a-zA-Z0-9_()\[\]{}$\\/#',;.@!?*+-]+\Z"),
}


# ==================================================================== machine strings
def parse_machine(machine: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[ipv6]', '[ipv6]:port' -> (host, port or None), as Julia does;
    a bad port raises ValueError."""
    if not machine:
        raise ValueError("invalid machine definition format string: empty host")
    if machine.startswith("["):
        end = machine.rfind("]")
        if end < 0:
            raise ValueError(f'invalid machine definition format string: invalid port format "{machine}"')
        host = machine[1:end]
        parts = machine[end:].split(":")
    else:
        parts = machine.split(":")
        host = parts[0]
    if len(parts) > 2:
        raise ValueError(f'invalid machine definition format string: invalid port format "{machine}"')
    port = None
    if len(parts) == 2:
        text = parts[1].strip("[]")  # "addr:[port]" is a port hint; the port is the same
        try:
            port = int(text)
        except ValueError:
            raise ValueError(
                f'invalid machine definition format string: invalid port format "{machine}"'
            ) from None
        if not 1 <= port <= 65535:
            raise ValueError(
                f'invalid machine definition format string: invalid port number "{machine}"'
            )
    if not host:
        raise ValueError(f'invalid machine definition format string: empty host in "{machine}"')
    return host, port


class MachineSpec:
    """One parsed machine string: `[count*][user@]host[:port] [bind_addr[:port]]`."""

    def __init__(self, text: str, count: int | str = 1):
        self.text = text
        words = text.split()
        if not words or len(words) > 2:
            raise ValueError(f"invalid machine definition format string: {text!r}")
        target = words[0]
        if "*" in target:
            n, _, target = target.partition("*")
            count = _parse_count(n, text)
        self.count = count
        self.user, _, hostport = target.rpartition("@")
        self.user = self.user or None  # type: ignore[assignment]
        self.host, self.port = parse_machine(hostport)
        self.bind_to = words[1] if len(words) == 2 else None
        if self.bind_to is not None:
            parse_machine(self.bind_to)  # validate
        self.key = " ".join(words).partition("*")[2] if "*" in words[0] else " ".join(words)

    @property
    def target(self) -> str:
        """What ssh is given: `user@host` or `host`."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __repr__(self) -> str:
        return f"MachineSpec({self.text!r}, count={self.count!r})"


def _parse_count(n: Any, text: str) -> int | str:
    if n == "auto":
        return "auto"
    try:
        count = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"invalid worker count {n!r} for machine {text!r}: a number or 'auto'") from None
    if count < 1:
        raise ValueError(f"invalid worker count {count} for machine {text!r}: must be >= 1")
    return count


def parse_machine_spec(text: str) -> MachineSpec:
    """Parse one machine string (the `--machine-file` line format)."""
    return MachineSpec(text.strip())


def _aggregate(machines: Iterable) -> list[MachineSpec]:
    """Julia's aggregation: one entry per distinct machine string, counts added ('auto' wins)."""
    if isinstance(machines, (str, tuple)):
        machines = [machines]
    specs: dict[str, MachineSpec] = {}
    for m in machines:
        if isinstance(m, tuple):
            if len(m) != 2:
                raise ValueError(f"a machine is 'spec' or ('spec', count), got {m!r}")
            spec = MachineSpec(m[0])
            spec.count = _parse_count(m[1], m[0])
        elif isinstance(m, str):
            spec = MachineSpec(m)
        else:
            raise TypeError(f"a machine is a str or a (str, count) tuple, got {m!r}")
        old = specs.get(spec.key)
        if old is None:
            specs[spec.key] = spec
        elif "auto" in (old.count, spec.count):
            old.count = "auto"
        else:
            old.count += spec.count  # type: ignore[operator]
    return list(specs.values())


# ==================================================================== remote command
def remote_command(shell: str, exename: str, args: list[str], dir: str | None,
                   env: dict[str, str]) -> str:
    """The command line ssh runs on the remote host, for its login `shell` (Julia's forms)."""
    if shell not in SHELLS:
        raise ValueError(f"invalid shell {shell!r}: one of {SHELLS}")
    for key in env:
        if not _ENV_KEY[shell].match(key):
            raise ValueError(f"invalid env key {key!r}")
    if shell == "posix":
        lines = [f"cd -- {shlex.quote(dir)}"] if dir else []
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines.append("exec " + " ".join(shlex.quote(a) for a in [exename, *args]))
        return "sh -l -c " + shlex.quote("\n".join(lines))
    if shell == "csh":
        lines = [f"cd {_csh_quote(dir)}"] if dir else []
        lines += [f"setenv {k} {_csh_quote(v)}" for k, v in env.items()]
        lines.append("exec " + " ".join(_csh_quote(a) for a in [exename, *args]))
        return "\n".join(lines)
    # wincmd
    for what, value in (("exename", exename), ("dir", dir or "")):
        if '"' in value:
            raise ValueError(f"invalid {what} {value!r}: must not contain '\"'")
    parts = [f"set {k}={v}&& " for k, v in env.items()]
    if dir:
        parts.append(f'pushd "{dir}" && ')
    parts.append(" ".join([f'"{exename}"', *args]))
    return "".join(parts)


def _csh_quote(text: str) -> str:
    """Quote for csh: single quotes, with ' and ! escaped (csh has no '' escape inside)."""
    return "'" + text.replace("'", "'\\''").replace("!", "\\!") + "'"


# ==================================================================== the manager
class SSHManager(ClusterManager):
    """Workers on the machines in `machines`, each `"[count*][user@]host[:port]
    [bind_addr[:port]]"` or `("spec", count)` with count a number or "auto"."""

    def __init__(self, machines: Iterable, exit_timeout: float = 5.0, term_timeout: float = 5.0):
        self.machines = _aggregate(machines)
        self.exit_timeout = exit_timeout
        self.term_timeout = term_timeout
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()  # launch sshs and tunnels not yet reaped
        self._gone: dict[int, threading.Event] = {}  # pid -> set when deregistered
        self._control_dir: str | None = None

    def __repr__(self) -> str:
        return f"SSHManager(machines={[(m.key, m.count) for m in self.machines]!r})"

    def default_addprocs_params(self) -> dict:
        return dict(super().default_addprocs_params(), tunnel=False, multiplex=False,
                    sshflags=shlex.split(os.environ.get("PYDIST_SSHFLAGS", "")),
                    max_parallel=10, shell="posix", ssh="ssh", cmdline_cookie=False)

    # ---------------------------------------------------------------- launch
    def launch(self, params: dict, launched: list, launch_ntfy: threading.Condition) -> None:
        ssh = params.get("ssh") or "ssh"
        if (params.get("shell") or "posix") not in SHELLS:
            raise ValueError(f"invalid shell {params.get('shell')!r}: one of {SHELLS}")
        if shutil.which(ssh) is None:
            raise LaunchWorkerError(f"SSHManager: ssh binary {ssh!r} not found")
        gate = threading.Semaphore(max(1, int(params.get("max_parallel") or 10)))
        errors: list[BaseException] = []

        def one(machine: MachineSpec) -> None:
            try:
                with gate:
                    config = self._launch_on(machine, params)
                with launch_ntfy:
                    launched.append(config)
                    launch_ntfy.notify_all()
            except BaseException as e:
                log.error("exception launching on machine %s: %s", machine.key, e)
                errors.append(e)

        threads = [threading.Thread(target=one, args=(m,), daemon=True,
                                    name=f"pydist-ssh-launch-{m.host}") for m in self.machines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0] if len(errors) == 1 else _group(errors)

    def _launch_on(self, machine: MachineSpec, params: dict) -> WorkerConfig:
        ssh = params.get("ssh") or "ssh"
        sshflags = _as_list(params.get("sshflags"))
        if machine.port is not None:
            sshflags += ["-p", str(machine.port)]
        tunnel = bool(params.get("tunnel"))
        multiplex = bool(params.get("multiplex"))
        if tunnel or multiplex:
            check = subprocess.run([ssh, *sshflags, "-O", "check", machine.target],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=30)
            if check.returncode == 0:
                multiplex = True  # the user already runs a master connection to this host
            elif multiplex:
                sshflags += ["-o", "ControlMaster=auto", "-o",
                             f"ControlPath={self._control_path()}", "-o", "ControlPersist=no"]
        args = [*_as_list(params.get("exeflags")), "-m", "pydist.worker", "--exit-on-eof"]
        if machine.bind_to:
            args += ["--bind-to", machine.bind_to]
        cmdline_cookie = bool(params.get("cmdline_cookie"))
        if cmdline_cookie:
            args += ["--cookie", PGRP.cookie]
        env = worker_env(params, base={k: v for k, v in os.environ.items()
                                       if k.startswith("PYDIST_")})
        exename = params.get("exename") or "python3"
        remote = remote_command(params.get("shell") or "posix", exename, args,
                                params.get("dir"), env)
        cmd = [ssh, "-T", "-a", "-x", "-o", "ClearAllForwardings=yes", *sshflags,
               machine.target, remote]
        log.info("starting a worker on %s over ssh", machine.target)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ssh command: %s", _redact(shlex.join(cmd)))
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise LaunchWorkerError(f"on host {machine.host}: could not run {ssh}: {e}") from e
        with self._lock:
            self._procs.add(proc)
        try:
            # The stdin pipe stays open: the worker exits when it closes (--exit-on-eof).
            proc.stdin.write(b"\n" if cmdline_cookie else PGRP.cookie.encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            pass  # ssh failed at once; reading the address line will say why
        return WorkerConfig(
            io=proc.stdout, process=proc, host=machine.target, count=machine.count,
            exename=exename, exeflags=_as_list(params.get("exeflags")), tunnel=tunnel,
            multiplex=multiplex, sshflags=sshflags, max_parallel=params.get("max_parallel"),
            enable_threaded_blas=bool(params.get("enable_threaded_blas", False)),
            userdata={"ssh": ssh},
        )

    def _control_path(self) -> str:
        with self._lock:
            if self._control_dir is None:
                self._control_dir = tempfile.mkdtemp(prefix="pydist-ssh-")
            return os.path.join(self._control_dir, "cm-%C")

    # ---------------------------------------------------------------- connect
    def connect(self, pid: int, config: WorkerConfig) -> "socket.socket | tuple[Any, Any] | Authenticated":
        if config.host is None:  # worker to worker: plain TCP (the default)
            return super().connect(pid, config)
        target = config.host
        host = target.rpartition("@")[2]
        try:
            connect_host, port = read_worker_address(pid, config)
        except LaunchWorkerError as e:
            raise LaunchWorkerError(f"on host {host}: {e}") from e
        self._gone.setdefault(pid, threading.Event())
        if not config.tunnel:
            try:
                return connect_tcp(pid, connect_host, port)
            except LaunchWorkerError as e:
                raise LaunchWorkerError(f"on host {host}: {e}") from e
        return self._connect_through_tunnel(pid, config, target, config.bind_addr, port)  # type: ignore[arg-type]

    def _connect_through_tunnel(self, pid: int, config: WorkerConfig, target: str,
                                bind_addr: str, port: int) -> socket.socket:
        if "@" not in target:
            target = f"{getpass.getuser()}@{target}"  # USER is often unset (cron, CI, containers)
        if config.multiplex:  # through the host's master connection: no new ssh connection
            return self._open_tunnel(pid, config, target, bind_addr, port)
        with _tunnel_gate(target, config):
            return self._open_tunnel(pid, config, target, bind_addr, port)

    def _open_tunnel(self, pid: int, config: WorkerConfig, target: str, bind_addr: str,
                     port: int) -> socket.socket:
        ssh = (config.userdata or {}).get("ssh", "ssh")
        deadline = time.monotonic() + worker_timeout()
        last_error = ""
        for _ in range(20):  # a free local port may be taken before ssh binds it: retry
            lport = _free_local_port()
            forward = f"{lport}:{bind_addr}:{port}"
            log.debug("worker %d: ssh tunnel -L 127.0.0.1:%s through %s%s", pid, forward, target,
                      " (multiplexed)" if config.multiplex else "")
            if config.multiplex:
                done = subprocess.run([ssh, *config.sshflags, "-O", "forward", "-L", forward, target],  # type: ignore[misc]
                                      stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
                if done.returncode != 0:
                    last_error = done.stderr.decode(errors="replace").strip()
                    continue
                tunnel_proc = None
            else:
                # Our own foreground ssh (not Julia's `-f`, whose background process nobody
                # owns): it ends when we close its stdin or the forwarded connection closes.
                tunnel_proc = subprocess.Popen(
                    [ssh, "-T", "-a", "-x", "-o", "ExitOnForwardFailure=yes", *config.sshflags,  # type: ignore[misc]
                     "-L", f"127.0.0.1:{forward}", target, "cat >/dev/null"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    start_new_session=True)
                with self._lock:
                    self._procs.add(tunnel_proc)
            sock = _connect_when_listening("127.0.0.1", lport, tunnel_proc, deadline)
            if sock is not None:
                config.forward = forward
                config.userdata = dict(config.userdata or {}, tunnel_proc=tunnel_proc)
                return sock
            if tunnel_proc is not None:
                last_error = _stop(tunnel_proc)
                with self._lock:
                    self._procs.discard(tunnel_proc)
            if time.monotonic() > deadline:
                break
        raise LaunchWorkerError(
            f"on host {target.rpartition('@')[2]}: unable to create SSH tunnel to "
            f"{bind_addr}:{port} for worker {pid}: {last_error or 'timed out'}"
        )

    # ---------------------------------------------------------------- manage / kill
    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "interrupt":
            if config.ospid is None:
                log.error("Worker %d cannot be presently interrupted.", pid)
                return
            self._remote_kill(config, "-2")
        elif op == "deregister":
            self._gone.setdefault(pid, threading.Event()).set()
            self._close_tunnel(config)
            proc = config.process
            if proc is not None:
                threading.Thread(target=self._finish_launch_ssh, args=(proc,), daemon=True,
                                 name="pydist-ssh-reaper").start()

    def exit_reason(self, pid: int, config: WorkerConfig) -> str | None:
        """ssh's exit status (the remote worker's, or 255 for ssh's own errors and remote
        deaths by a signal) and the worker's last lines of output."""
        proc = config.process
        if proc is None:
            return None
        try:
            code = proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return None
        host = (config.host or "?").rpartition("@")[2]
        if code < 0:
            return (f"lost its ssh session: the ssh client to {host} was killed by signal "
                    f"{-code}")
        text = f"exited: ssh to {host} ended with status {code}"
        if code == 255:
            text += " (an ssh error, or the remote process was killed by a signal)"
        tail = list(config.output.tail) if config.output is not None else []
        if tail:
            text += "; its last output:\n    " + "\n    ".join(tail[-5:])
        return text

    def _remote_kill(self, config: WorkerConfig, signal_flag: str) -> None:
        ssh = (config.userdata or {}).get("ssh", "ssh")
        cmd = [ssh, "-n", *(config.sshflags or []), config.host, f"kill {signal_flag} {config.ospid}"]
        log.debug("signalling a worker over ssh: %s", shlex.join(cmd))
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("could not signal worker on %s: %s", config.host, e)
            return
        if done.returncode != 0:
            log.error("kill %s %s on %s failed: %s", signal_flag, config.ospid, config.host,
                      done.stderr.decode(errors="replace").strip())

    def kill(self, pid: int, config: WorkerConfig) -> None:
        with contextlib.suppress(Exception):
            super().kill(pid, config)  # ask politely
        with contextlib.suppress(RuntimeError):  # at interpreter exit `cleanup` reaps
            threading.Thread(target=self._escalate, args=(pid, config), daemon=True,
                             name="pydist-ssh-escalate").start()

    def _escalate(self, pid: int, config: WorkerConfig) -> None:
        """If the worker is still there after `exit_timeout`: close its ssh session's stdin
        (it exits on EOF), then SIGTERM it over ssh, then SIGKILL. A worker that never
        joined (its launch failed half-way) ends here too."""
        gone = self._gone.setdefault(pid, threading.Event())
        if gone.wait(self.exit_timeout):
            return  # deregistered: `manage` cleans up
        joined = config.ospid is not None
        if joined:
            log.warning("Failed to gracefully kill worker %d within %g s, closing its ssh "
                        "session", pid, self.exit_timeout)
        self._close_tunnel(config)
        if config.process is not None:
            with contextlib.suppress(OSError, ValueError):
                config.process.stdin.close()
        if joined and not gone.wait(self.term_timeout):
            log.warning("Worker %d is still running, sending SIGTERM", pid)
            self._remote_kill(config, "-TERM")
            if not gone.wait(self.term_timeout):
                log.warning("Worker %d ignored SIGTERM, sending SIGKILL", pid)
                self._remote_kill(config, "-KILL")
        if config.process is not None:
            self._finish_launch_ssh(config.process)

    def _close_tunnel(self, config: WorkerConfig) -> None:
        if not config.tunnel or not config.forward:
            return
        tunnel_proc = (config.userdata or {}).get("tunnel_proc")
        if tunnel_proc is not None:
            _stop(tunnel_proc)
            with self._lock:
                self._procs.discard(tunnel_proc)
        elif config.multiplex:
            ssh = (config.userdata or {}).get("ssh", "ssh")
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([ssh, *config.sshflags, "-O", "cancel", "-L", config.forward,  # type: ignore[misc]
                                config.host], stdin=subprocess.DEVNULL,  # type: ignore[list-item]
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)

    def _finish_launch_ssh(self, proc: subprocess.Popen) -> None:
        """The worker is gone: its ssh ends by itself; close its stdin and reap it."""
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(self.exit_timeout + self.term_timeout + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with self._lock:
            self._procs.discard(proc)

    def cleanup(self, grace: float = 3.0) -> None:
        """At exit: close every ssh's stdin (remote workers then exit), give them `grace`
        seconds, kill what is left, and remove the multiplexing sockets' directory."""
        with self._lock:
            procs = list(self._procs)
            self._procs.clear()
            control_dir, self._control_dir = self._control_dir, None
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()  # type: ignore[union-attr]
        reap(procs, grace)
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)


# ==================================================================== helpers
def _redact(text: str) -> str:
    """`text` without the cluster cookie (for log records: `cmdline_cookie` puts it in the
    command line)."""
    cookie = PGRP.cookie
    return text.replace(cookie, "<cookie>") if cookie else text


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _group(errors: list[BaseException]) -> BaseException:
    return error_group(f"SSHManager: {len(errors)} machines failed to launch", errors)


# The ssh connections being opened to each sshd at once, at most `max_parallel` (as Julia's
# `tunnel_hosts_map`): sshd drops unauthenticated connections beyond its `MaxStartups`
# (stock 10:30:100), so many tunnelled workers on one host must not all connect at once.
# A tunnel's ssh holds its host's gate until its local end listens (it has authenticated).
_tunnel_gates: dict[tuple, threading.BoundedSemaphore] = {}
_tunnel_gates_lock = threading.Lock()


def _tunnel_gate(target: str, config: WorkerConfig) -> threading.BoundedSemaphore:
    """The gate of the sshd that `target` with `config.sshflags` reaches (shared by every
    addprocs of this process), admitting `config.max_parallel` tunnels at once."""
    limit = max(1, int(config.max_parallel or 10))
    key = (target.rpartition("@")[2], tuple(config.sshflags or ()), limit)
    with _tunnel_gates_lock:
        gate = _tunnel_gates.get(key)
        if gate is None:
            gate = _tunnel_gates[key] = threading.BoundedSemaphore(limit)
        return gate


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect_when_listening(host: str, port: int, proc: subprocess.Popen | None,
                            deadline: float) -> socket.socket | None:
    """Connect to the tunnel's local end once ssh listens; None if ssh exits first."""
    delay = 0.01
    while time.monotonic() < deadline:
        try:
            return socket.create_connection((host, port), timeout=worker_timeout())
        except ConnectionRefusedError:
            if proc is not None and proc.poll() is not None:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        except OSError:
            return None
    return None


def _stop(proc: subprocess.Popen) -> str:
    """Stop an ssh we started; return what it said on stderr (else its exit status, if it
    had exited by itself)."""
    code = proc.poll()
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()  # type: ignore[union-attr]
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
    try:
        _, err = proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError):
        proc.kill()
        err = b""
        with contextlib.suppress(Exception):
            proc.wait(5)
    text = (err or b"").decode(errors="replace").strip()
    if not text and code is not None:
        text = f"ssh exited with status {code}"
    return text
