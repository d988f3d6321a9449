"""Every example runs as a user would run it: `python -m pydist -p 2 examples/<name>.py`."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "pydist", "-p", "2",
                          os.path.join(ROOT, "examples", name), *args],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_estimate_pi():
    out = run_example("estimate_pi.py", "200000")
    pi = float(out.split("pi ~= ")[1].split()[0])
    assert abs(pi - 3.14159) < 0.05 and "on 2 worker(s) [2, 3]" in out


def test_pi_distributed():
    out = run_example("pi_distributed.py", "200000")
    pi = float(out.split("pi ~= ")[1].split()[0])
    assert abs(pi - 3.14159) < 0.05 and "[2, 3]" in out


def test_pmap_primes_survives_a_dying_worker():
    out = run_example("pmap_primes.py", "20")
    assert "9592 primes below 100,000" in out  # pi(10^5) = 9592, with one block retried
    assert "workers left: [" in out


def test_pipeline():
    assert "produced 100, squared 100, sum of squares 328350" in run_example("pipeline.py")


def test_setup_with_everywhere():
    out = run_example("setup_with_everywhere.py")
    assert out.count("10! = 3628800") == 2 and "on the master: 120" in out
