"""How pmap spreads elements (issue 13, item 3): no element is held back while a worker of the
pool is idle; `distributed=False` runs elements concurrently on the caller; the elements of a
batch do not wait behind a blocking one on the worker. And `progress=True` without tqdm
(item 12).

Each test records where and when its elements ran (pid, start, end) and asserts on which
workers ran them and on which elements overlapped, never on tight durations."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading

import pytest

import pydist
from pydist import WorkerPool, pmap

SRC = os.path.dirname(os.path.dirname(os.path.abspath(pydist.__file__)))  # the pydist tested


@pytest.fixture(scope="module")
def four_workers():
    """Four workers of this module's own, removed at its end (other modules map over all
    workers and expect the shared two)."""
    pids = pydist.addprocs(4)
    yield pids
    alive = [p for p in pids if p in pydist.procs()]
    if alive:
        pydist.rmprocs(alive, waitfor=30)


def span(seconds):
    """(pid, start, end): sleeps `seconds`."""
    import time

    start = time.time()
    time.sleep(seconds)
    return pydist.myid(), start, time.time()


def overlap(spans) -> bool:
    """Every one of `spans` ((pid, start, end)) ran at some common moment."""
    return max(s for _, s, _ in spans) < min(e for _, _, e in spans)


# ==================================================================== distributed maps
@pytest.mark.timeout(120)
def test_as_many_elements_as_workers_run_on_every_worker_at_once(four_workers):
    out = pmap(span, [0.5] * 4, pool=WorkerPool(four_workers))
    assert sorted(pid for pid, _, _ in out) == sorted(four_workers)
    assert overlap(out)


@pytest.mark.timeout(120)
def test_no_element_waits_behind_another_while_a_worker_is_idle(four_workers):
    """Six elements on four workers, the first long: the first four start at once, one per
    worker; the two left over queue behind running ones, and the one behind the long element
    moves to the first worker that becomes idle."""
    out = pmap(span, [3.0] + [0.5] * 5, pool=WorkerPool(four_workers))
    assert sorted(pid for pid, _, _ in out[:4]) == sorted(four_workers)
    assert overlap(out[1:4]), "an element waited for a short one although a worker was idle"
    long_pid, _, long_end = out[0]
    for pid, _, end in out[1:]:
        assert pid != long_pid and end < long_end - 1.0


@pytest.mark.timeout(120)
def test_many_short_elements_never_wait_behind_a_long_one(four_workers):
    out = pmap(span, [2.5] + [0.05] * 30, pool=WorkerPool(four_workers))
    long_pid, _, long_end = out[0]
    assert {pid for pid, _, _ in out} == set(four_workers)
    for pid, _, end in out[1:]:
        assert pid != long_pid and end < long_end - 1.0


@pytest.fixture
def move_after(monkeypatch):
    """Set how much longer a running call must be expected to run for the call queued
    behind it to move to an idle worker (pmap's _MOVE_AFTER)."""
    lanes = importlib.import_module("pydist.pmap")  # (pydist.pmap is the function)
    return lambda seconds: monkeypatch.setattr(lanes, "_MOVE_AFTER", seconds)


@pytest.mark.timeout(120)
def test_a_queued_element_stays_behind_a_call_not_expected_to_run_long(four_workers, move_after):
    """A call queued behind a running one moves only if the running one will likely run
    _MOVE_AFTER longer (the move costs a round trip): with _MOVE_AFTER far beyond the map,
    the element queued behind the long one waits for it on its worker."""
    move_after(600.0)
    out = pmap(span, [3.0] + [0.5] * 5, pool=WorkerPool(four_workers))
    long_pid, _, long_end = out[0]
    behind = [(start, end) for pid, start, end in out[1:] if pid == long_pid]
    assert len(behind) == 1, f"expected one element queued behind the long one: {out}"
    assert behind[0][0] >= long_end - 0.05, "the element behind the long one moved"


@pytest.mark.timeout(120)
def test_a_queued_element_moves_once_the_call_ahead_outlives_move_after(four_workers, move_after):
    """The 0.5 s elements end first, the long one has run as long as they did, not yet
    _MOVE_AFTER (1 s): the element behind it stays; once the long one has run 1 s, it moves
    to an idle worker."""
    move_after(1.0)
    pool = WorkerPool(four_workers)
    pmap(span, [0.0] * 8, pool=pool)  # the workers have imported this module: calls start at once
    out = pmap(span, [3.0] + [0.5] * 5, pool=pool)
    long_pid, long_start, long_end = out[0]
    assert all(pid != long_pid for pid, _, _ in out[1:]), out
    last_start = max(start for _, start, _ in out[1:])
    assert long_start + 0.7 <= last_start, f"moved before the long call ran _MOVE_AFTER: {out}"
    assert all(end < long_end - 1.0 for _, _, end in out[1:]), out


@pytest.mark.timeout(120)
def test_workers_given_back_to_a_shared_pool_take_over_queued_elements(four_workers):
    """Two workers of the pool are busy elsewhere as the map starts, so it queues two
    elements on each of the others; when the two are given back, the queued elements move
    to them instead of waiting."""
    pool = WorkerPool(four_workers)
    held = [pool.take(), pool.take()]
    timer = threading.Timer(0.3, lambda: [pool.put(w) for w in held])
    timer.start()
    try:
        out = pmap(span, [1.5] * 4, pool=pool)
    finally:
        timer.join()
    assert sorted(pid for pid, _, _ in out) == sorted(four_workers)
    assert overlap(out)


# ==================================================================== distributed=False
@pytest.mark.timeout(120)
def test_a_local_map_runs_its_elements_concurrently(four_workers):
    out = pmap(span, [0.5] * 4, pool=WorkerPool(four_workers), distributed=False)
    assert {pid for pid, _, _ in out} == {pydist.myid()}
    assert overlap(out)


def fails_on_two(x):
    import time

    time.sleep(0.2)
    if x == 2:
        raise ValueError(f"element {x} fails")
    return x


@pytest.mark.timeout(120)
def test_a_local_map_keeps_order_and_error_semantics(four_workers):
    pool = WorkerPool(four_workers)
    xs = list(range(10))
    assert pmap(lambda x: x * x, xs, pool=pool, distributed=False) == [x * x for x in xs]
    assert pmap(fails_on_two, range(6), pool=pool, distributed=False,
                on_error=lambda e: str(e)) == [0, 1, "element 2 fails", 3, 4, 5]
    with pytest.raises(ValueError, match="element 2 fails"):
        pmap(fails_on_two, range(6), pool=pool, distributed=False)
    assert not [t for t in threading.enumerate() if t.name == "pydist-pmap"]


# ==================================================================== batches
@pytest.mark.timeout(120)
def test_the_elements_of_a_batch_run_concurrently_on_its_worker(four_workers):
    out = pmap(span, [0.5] * 8, pool=WorkerPool(four_workers[:2]), batch_size=4)
    by_worker: dict[int, list] = {}
    for r in out:
        by_worker.setdefault(r[0], []).append(r)
    assert len(by_worker) == 2
    for spans in by_worker.values():
        assert len(spans) == 4 and overlap(spans)


def tiny_or_blocking(x):
    """(pid, start, end, x): element 0 blocks for 2 s, the others compute a little."""
    import time

    start = time.time()
    if x == 0:
        time.sleep(2.0)
    else:
        sum(range(100))
    return pydist.myid(), start, time.time(), x


@pytest.mark.timeout(120)
def test_a_blocking_element_does_not_hold_back_the_rest_of_its_batch(four_workers):
    out = pmap(tiny_or_blocking, range(200), pool=WorkerPool(four_workers[:1]),
               batch_size=200)
    assert [r[3] for r in out] == list(range(200))
    blocking_end = out[0][2]
    assert all(end < blocking_end - 1.0 for _, _, end, _ in out[1:])


def fails_blocks_or_computes(x):
    """(x, end): elements 0 and 150 fail at once, element 1 blocks for 2 s, the others
    compute a little."""
    import time

    if x in (0, 150):
        raise ValueError(f"element {x} fails")
    if x == 1:
        time.sleep(2.0)
    else:
        sum(range(100))
    return x, time.time()


@pytest.mark.timeout(120)
def test_a_batch_split_at_a_blocking_element_keeps_order_and_failures(four_workers):
    """The elements before a blocking one run in one go; those after it are split off and
    run while it blocks. Every element runs once, failures before and after the split land
    at their own places, and the results keep the input's order."""
    out = pmap(fails_blocks_or_computes, range(200), pool=WorkerPool(four_workers[:1]),
               batch_size=200, on_error=lambda e: str(e))
    assert out[0] == "element 0 fails" and out[150] == "element 150 fails"
    assert [r[0] for i, r in enumerate(out) if i not in (0, 150)] == [
        x for x in range(200) if x not in (0, 150)]
    blocking_end = out[1][1]
    assert all(r[1] < blocking_end - 1.0 for i, r in enumerate(out) if i > 1 and i != 150)


def busy(x):
    """(thread ident, x): computes for about 30 ms, never blocking."""
    import threading
    import time

    end = time.thread_time() + 0.03
    while time.thread_time() < end:
        pass
    return threading.get_ident(), x


@pytest.mark.timeout(120)
def test_computing_elements_of_a_batch_stay_in_one_thread(four_workers):
    """Only a blocked element lets the next ones start in other threads: elements that
    compute would only share the GIL among more threads (and 100 of them)."""
    out = pmap(busy, range(12), pool=WorkerPool(four_workers[:1]), batch_size=12)
    assert [x for _, x in out] == list(range(12))
    assert len({ident for ident, _ in out}) == 1, out


def batch_element(x):
    import time

    time.sleep(0.3)
    if x % 4 == 2:
        raise ValueError(f"element {x} fails")
    return x


@pytest.mark.timeout(120)
def test_failures_in_concurrent_batch_elements(four_workers):
    pool = WorkerPool(four_workers[:2])
    out = pmap(batch_element, range(8), pool=pool, batch_size=4, on_error=lambda e: str(e))
    assert out == [0, 1, "element 2 fails", 3, 4, 5, "element 6 fails", 7]
    with pytest.raises(ValueError, match=r"element [26] fails"):
        pmap(batch_element, range(8), pool=pool, batch_size=4)
    assert pmap(batch_element, [0, 1, 3], pool=pool, batch_size=3) == [0, 1, 3]


# ==================================================================== progress
PROGRESS_SCRIPT = """
import sys
{block}
import pydist
pydist.addprocs(1)
try:
    assert pydist.pmap(lambda x: x + 1, range(57), progress=True) == list(range(1, 58))
    assert pydist.pmap(lambda x: x + 1, range(9), progress=True, batch_size=4) == list(range(1, 10))
    print("tqdm" in sys.modules and sys.modules["tqdm"] is not None)
finally:
    pydist.shutdown()
"""


def run_progress_script(block: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT.format(block=block)],
                          capture_output=True, text=True, timeout=100, env=env)


@pytest.mark.timeout(120)
def test_progress_without_tqdm_draws_its_own_bar_on_stderr():
    done = run_progress_script("sys.modules['tqdm'] = None  # tqdm cannot be imported")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert "57/57" in done.stderr and "9/9" in done.stderr
    assert "it/s" not in done.stderr  # not tqdm's


@pytest.mark.timeout(120)
def test_progress_uses_tqdm_when_it_is_there():
    pytest.importorskip("tqdm")
    done = run_progress_script("")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "57/57" in done.stderr and "it/s" in done.stderr
