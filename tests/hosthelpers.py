"""Helpers of the tests that start workers on other "hosts" (SSH, Slurm): which host a
worker runs on, its WorkerConfig, and a call a worker makes to another worker."""

from __future__ import annotations

import socket

import pydist
from pydist.group import PGRP


def hostname_of(pid: int) -> str:
    return pydist.remotecall_fetch(socket.gethostname, pid)


def config_of(pid: int) -> pydist.WorkerConfig:
    return PGRP.workers[pid].config


def call_other(target: int) -> str:
    """Run on a worker: call `target` (another worker) directly."""
    return pydist.remotecall_fetch(socket.gethostname, target)
