"""The worker output relay (`managers.WorkerOutput`) over real pipes: one thread reads
every pipe, lines keep their order and their prefixes, a last line without a newline is
relayed, what a stream had buffered before is not lost, and the thread ends with the last
pipe. (The relay of real workers' output: test_process_group, test_forkserver.)"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from pydist.managers import WorkerOutput

TIMEOUT = 30.0
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _pipe() -> tuple[io.BufferedReader, int]:
    r, w = os.pipe()
    return os.fdopen(r, "rb"), w


def test_a_worker_output_relay_finds_the_address_then_prefixes_every_line(capsys):
    stream, w = _pipe()
    relay = WorkerOutput(stream, pid=7)
    os.write(w, b"starting up\npydist_worker:4242#127.0.0.1\n")
    assert relay.found.wait(TIMEOUT)
    assert relay.address == ("127.0.0.1", 4242)
    os.write(w, b"hello\nhalf a li")  # a line in two writes
    os.write(w, b"ne\nno newline at the end")
    os.close(w)
    assert relay.done.wait(TIMEOUT)
    assert relay.eof
    stream.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["\tFrom worker startup:\tstarting up",
                   "      From worker 7:\thello",
                   "      From worker 7:\thalf a line",
                   "      From worker 7:\tno newline at the end"]
    assert list(relay.tail) == ["hello", "half a line", "no newline at the end"]


def test_what_a_stream_buffered_before_the_relay_came_is_relayed_first(capsys):
    stream, w = _pipe()
    os.write(w, b"read by the launcher\npydist_worker:1#h\nfirst\n")
    assert stream.readline() == b"read by the launcher\n"  # the rest is in its buffer now
    relay = WorkerOutput(stream, pid=3)
    os.write(w, b"second\n")
    os.close(w)
    assert relay.done.wait(TIMEOUT)
    stream.close()
    assert relay.address == ("h", 1)
    assert capsys.readouterr().out.splitlines() == ["      From worker 3:\tfirst",
                                                    "      From worker 3:\tsecond"]


MANY_PIPES = r"""
import os, sys, threading
from pydist.managers import WorkerOutput

TIMEOUT = 30.0

def relay_threads():
    return [t for t in threading.enumerate() if t.name == "pydist-output"]

def wait_gone():
    for t in relay_threads():
        t.join(TIMEOUT)
    assert not relay_threads(), "the relay thread outlived its last pipe"

pipes = []
for _ in range(40):
    r, w = os.pipe()
    pipes.append((os.fdopen(r, "rb"), w))
relays = [WorkerOutput(stream, pid=i) for i, (stream, _) in enumerate(pipes)]
for i, (_, w) in enumerate(pipes):
    os.write(w, f"pydist_worker:{1000 + i}#a\n".encode())
for relay in relays:
    assert relay.found.wait(TIMEOUT)
assert [r.address for r in relays] == [("a", 1000 + i) for i in range(40)]
assert len(relay_threads()) == 1, relay_threads()
for k in range(3):  # interleaved lines of every pipe
    for _, w in pipes:
        os.write(w, f"line {k}\n".encode())
for _, w in pipes[:-1]:
    os.close(w)
for relay in relays[:-1]:
    assert relay.done.wait(TIMEOUT)
assert len(relay_threads()) == 1 and not relays[-1].done.is_set()  # one pipe is left
os.close(pipes[-1][1])
assert relays[-1].done.wait(TIMEOUT)
wait_gone()
for stream, _ in pipes:
    stream.close()
# a relay made after the thread ended starts it again
r, w = os.pipe()
stream = os.fdopen(r, "rb")
relay = WorkerOutput(stream, pid=99)
os.write(w, b"pydist_worker:5#b\n")
assert relay.found.wait(TIMEOUT) and relay.address == ("b", 5)
os.close(w)
assert relay.done.wait(TIMEOUT)
wait_gone()
stream.close()
print("ok", flush=True)
"""


def _run_fresh(script: str) -> list[str]:
    """Run `script` in a fresh interpreter (here, the shared workers' relays keep the relay
    thread running); the lines it printed, checked to end with "ok"."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ok"
    return lines


def test_one_thread_relays_many_pipes_and_ends_with_the_last():
    lines = _run_fresh(MANY_PIPES)
    for i in range(40):  # each pipe's lines in its order, with its prefix
        assert [x for x in lines if x.startswith(f"      From worker {i}:\t")] == \
            [f"      From worker {i}:\tline {k}" for k in range(3)]


def test_a_stream_that_is_not_a_pipe_gets_a_thread_of_its_own(capsys):
    relay = WorkerOutput(io.BytesIO(b"pydist_worker:9#c\nbye\n"), pid=4)  # type: ignore[arg-type]
    assert relay.done.wait(TIMEOUT)
    assert relay.address == ("c", 9) and relay.eof
    assert capsys.readouterr().out.splitlines() == ["      From worker 4:\tbye"]


def test_drain_all_waits_for_the_last_lines():
    stream, w = _pipe()
    relay = WorkerOutput(stream, pid=5)
    os.write(w, b"pydist_worker:2#d\n")
    timer = threading.Timer(0.2, os.close, (w,))
    timer.start()
    WorkerOutput.drain_all(TIMEOUT)
    assert relay.done.is_set()
    timer.join()
    stream.close()


STRAY_CLOSE = r"""
import os, threading
from pydist import managers
from pydist.managers import WorkerOutput

TIMEOUT = 30.0

def relay_thread():
    return next((t for t in threading.enumerate() if t.name == "pydist-output"), None)

r, w = os.pipe()
stream = os.fdopen(r, "rb")
first = WorkerOutput(stream, pid=1)
os.write(w, b"pydist_worker:1#a\n")
assert first.found.wait(TIMEOUT)
thread = relay_thread()
os.close(managers._RELAY._wake_r)  # someone else's bug closes the loop's wake pipe
os.close(w)  # the last pipe ends: the loop ends and closes its wake pipe, which fails
assert first.done.wait(TIMEOUT)
thread.join(TIMEOUT)
assert not thread.is_alive()
stream.close()
r, w = os.pipe()  # a worker started later is relayed all the same
stream = os.fdopen(r, "rb")
second = WorkerOutput(stream, pid=2)
os.write(w, b"pydist_worker:2#b\n")
assert second.found.wait(TIMEOUT), "no relay thread for a worker started later"
os.close(w)
assert second.done.wait(TIMEOUT)
stream.close()
print("ok", flush=True)
"""


def test_a_relay_loop_that_failed_to_close_its_wake_pipe_starts_again():
    _run_fresh(STRAY_CLOSE)
