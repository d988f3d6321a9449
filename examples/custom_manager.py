"""A custom ClusterManager in about 40 lines: workers that talk to the master over their
stdin/stdout pipes instead of TCP, written against pydist's public interface only.

    python examples/custom_manager.py
"""

import os
import subprocess
import sys

import pydist
from pydist.worker import wait_for_shutdown


class PipeManager(pydist.ClusterManager):
    """Starts `np` workers; each one's transport is the pair of pipes to it."""

    def __init__(self, np: int):
        self.np = np

    def launch(self, params, launched, launch_ntfy):
        env = dict(os.environ, PIPE_COOKIE=pydist.cluster_cookie())  # not on the command line
        for _ in range(self.np):
            proc = subprocess.Popen([params["exename"], __file__, "--worker"], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            with launch_ntfy:
                launched.append(pydist.WorkerConfig(process=proc, ospid=proc.pid))
                launch_ntfy.notify_all()

    def connect(self, pid, config):
        return config.process.stdout, config.process.stdin  # (reader, writer): the transport

    def manage(self, pid, config, op):
        if op == "deregister":
            config.process.wait(10)  # reap the worker once it has left
        else:
            super().manage(pid, config, op)  # "interrupt": SIGINT to config.ospid


def worker_main():
    reader = os.fdopen(os.dup(0), "rb", buffering=0)
    writer = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # print() must not write into the transport
    pydist.init_worker(os.environ["PIPE_COOKIE"])
    pydist.process_messages(reader, writer, incoming=True)
    sys.exit(wait_for_shutdown())


def square(x):
    return x * x


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    pids = pydist.addprocs(PipeManager(2), topology="master_worker")
    print("workers over pipes:", pids, [pydist.remotecall_fetch(os.getpid, p) for p in pids])
    print("squares:", pydist.pmap(square, range(10)))
    pydist.rmprocs(pids)
    print("removed; workers left:", pydist.workers())
