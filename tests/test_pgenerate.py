"""pgenerate against real workers: results in order (or as completed), a lazy input (an
infinite one), the bound on elements pulled and not yet yielded, closing or dropping the
iterator stops the work, errors at their position, on_error, retries, batches, and a worker
killed mid-stream."""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time

import pytest

import pydist
from conftest import wait_until
from maphelpers import DiesOnce, FlakyOnOdd
from pydist import (
    ExponentialBackOff,
    ProcessExitedException,
    RemoteException,
    WorkerPool,
    pgenerate,
)
from pydist.pgenerate import WINDOW_PER_THREAD


def square(x):
    return x * x


class Marking:
    """Leaves a file per element run (in `directory`, shared by every process), then returns
    `10 * x`; element `slow` first waits (at most 60 s) for a file named `release`."""

    def __init__(self, directory: str, slow: int | None = None):
        self.directory = directory
        self.slow = slow

    def __call__(self, x):
        open(os.path.join(self.directory, f"ran-{x}"), "w").close()
        if x == self.slow:
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(self.directory, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError("never released")
                time.sleep(0.01)
        return 10 * x


def ran(directory) -> int:
    return len([n for n in os.listdir(directory) if n.startswith("ran-")])


def release(directory) -> None:
    open(os.path.join(directory, "release"), "w").close()


class Counting:
    """An iterator over 0, 1, 2... (infinite, or `n` elements) that counts what was pulled."""

    def __init__(self, n: int | None = None):
        self.source = itertools.count() if n is None else iter(range(n))
        self.pulled = 0

    def __iter__(self):
        return self

    def __next__(self):
        x = next(self.source)
        self.pulled += 1
        return x


def runners() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pydist-pgenerate"]


def assert_work_stopped(directory) -> None:
    """The runner threads end, and no element starts afterwards."""
    wait_until(lambda: not runners(), what="pgenerate's runner threads to end")
    count = ran(directory)
    time.sleep(0.3)
    assert ran(directory) == count


@pytest.mark.timeout(120)
def test_results_in_order_and_forms(two_workers):
    assert list(pgenerate(square, range(20))) == [x * x for x in range(20)]
    assert list(pgenerate(lambda a, b: a * b, [1, 2, 3], (4, 5, 6))) == [4, 10, 18]
    assert list(pgenerate(square, [])) == []
    pool = WorkerPool(two_workers)
    assert list(pgenerate(square, pool, range(6))) == [0, 1, 4, 9, 16, 25]
    assert list(pgenerate(square, range(6), pool=pool)) == [0, 1, 4, 9, 16, 25]
    assert list(pgenerate(square, range(6), distributed=False)) == [0, 1, 4, 9, 16, 25]
    assert set(pgenerate(lambda _: pydist.myid(), range(20), pool=pool)) == set(two_workers)
    with pytest.raises(TypeError):
        pgenerate(square, pool, range(3), pool=pool)
    with pytest.raises(ValueError, match="batch_size"):
        pgenerate(square, range(3), batch_size=0)


@pytest.mark.timeout(120)
def test_nothing_runs_before_the_first_next(two_workers, tmp_path):
    xs = Counting(5)
    gen = pgenerate(Marking(str(tmp_path)), xs)
    time.sleep(0.3)
    assert xs.pulled == 0 and ran(tmp_path) == 0
    assert next(gen) == 0
    assert list(gen) == [10, 20, 30, 40]


@pytest.mark.timeout(120)
def test_unordered_yields_a_fast_element_before_a_slow_one_started_first(two_workers,
                                                                         tmp_path):
    # Element 0 runs until the consumer has had a later one: in order, this would never end.
    gen = pgenerate(Marking(str(tmp_path), slow=0), range(6), pool=WorkerPool(two_workers),
                    ordered=False)
    first = next(gen)
    assert first != 0
    release(tmp_path)
    assert sorted([first, *gen]) == [10 * x for x in range(6)]


@pytest.mark.timeout(120)
def test_infinite_input_take_ten_then_close_stops_the_work(two_workers, tmp_path):
    xs = Counting()
    gen = pgenerate(Marking(str(tmp_path)), xs, pool=WorkerPool(two_workers))
    assert list(itertools.islice(gen, 10)) == [10 * x for x in range(10)]
    gen.close()
    window = WINDOW_PER_THREAD * len(two_workers)
    assert 10 <= xs.pulled <= 10 + window
    assert_work_stopped(tmp_path)
    assert ran(tmp_path) <= xs.pulled


@pytest.mark.timeout(120)
def test_unordered_infinite_input(two_workers, tmp_path):
    xs = Counting()
    gen = pgenerate(Marking(str(tmp_path)), xs, ordered=False)
    got = list(itertools.islice(gen, 10))
    gen.close()
    assert len(set(got)) == 10 and all(v % 10 == 0 for v in got)
    assert xs.pulled <= 10 + WINDOW_PER_THREAD * pydist.nworkers()
    assert_work_stopped(tmp_path)


@pytest.mark.timeout(120)
def test_elements_pulled_and_not_yielded_stay_bounded(two_workers, tmp_path):
    # Element 0 is held: the others finish, but no more than the window is pulled.
    xs = Counting()
    gen = pgenerate(Marking(str(tmp_path), slow=0), xs, pool=WorkerPool(two_workers))
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(next(gen)))
    consumer.start()
    window = WINDOW_PER_THREAD * len(two_workers)
    wait_until(lambda: ran(tmp_path) >= window, what="the window to fill")
    time.sleep(0.5)  # a chance to go beyond it
    assert xs.pulled == window and ran(tmp_path) == window
    release(tmp_path)
    consumer.join(60)
    assert got == [0]
    assert next(gen) == 10
    assert xs.pulled <= 2 + window
    gen.close()


@pytest.mark.timeout(120)
def test_breaking_out_or_dropping_the_iterator_stops_the_work(two_workers, tmp_path):
    xs = Counting()
    for i, _ in enumerate(pgenerate(Marking(str(tmp_path)), xs)):
        if i == 4:
            break
    gc.collect()
    assert_work_stopped(tmp_path)
    before = xs.pulled
    gen = pgenerate(Marking(str(tmp_path)), xs, batch_size=3)
    assert next(gen) == 10 * before
    del gen
    gc.collect()
    assert_work_stopped(tmp_path)
    assert xs.pulled <= before + 3 * (1 + WINDOW_PER_THREAD * pydist.nworkers())


@pytest.mark.timeout(120)
def test_an_error_is_raised_at_its_position_and_ends_the_iterator(two_workers, tmp_path):
    gen = pgenerate(lambda x: 1 / (x - 3), range(10))
    assert [next(gen) for _ in range(3)] == [-1 / 3, -1 / 2, -1.0]
    with pytest.raises(RemoteException) as info:
        next(gen)
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    assert list(gen) == []
    # Batched: the elements before it in its batch come first.
    gen = pgenerate(lambda x: 1 / (x - 3), range(10), batch_size=2)
    assert [next(gen) for _ in range(3)] == [-1 / 3, -1 / 2, -1.0]
    with pytest.raises(ZeroDivisionError):
        next(gen)
    assert list(gen) == []


class FailsAt:
    def __init__(self, directory: str, bad: int):
        self.marking = Marking(directory)
        self.bad = bad

    def __call__(self, x):
        self.marking(x)
        if x == self.bad:
            raise ValueError(f"bad {x}")
        return x


@pytest.mark.timeout(120)
def test_an_error_stops_the_work_on_an_infinite_input(two_workers, tmp_path):
    xs = Counting()
    gen = pgenerate(FailsAt(str(tmp_path), 3), xs)
    with pytest.raises(RemoteException, match="bad 3"):
        list(gen)
    assert xs.pulled <= 4 + WINDOW_PER_THREAD * pydist.nworkers()
    assert_work_stopped(tmp_path)
    # Unordered too: raised as it comes.
    xs = Counting()
    with pytest.raises(RemoteException, match="bad 3"):
        list(pgenerate(FailsAt(str(tmp_path), 3), xs, ordered=False))
    assert_work_stopped(tmp_path)


@pytest.mark.timeout(120)
def test_an_error_raised_by_the_input_comes_after_the_elements_before_it(two_workers):
    def source():
        yield from range(3)
        raise KeyError("input broke")

    gen = pgenerate(square, source(), batch_size=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(KeyError, match="input broke"):
        next(gen)


@pytest.mark.timeout(120)
def test_on_error(two_workers):
    f = lambda x: (_ for _ in ()).throw(ValueError("foo")) if x % 2 == 0 else x  # noqa: E731
    assert list(pgenerate(f, range(1, 5), on_error=lambda e: 0)) == [1, 0, 3, 0]
    out = list(pgenerate(f, range(1, 5), on_error=lambda e: e, batch_size=2))
    assert out[0] == 1 and out[2] == 3 and isinstance(out[1], ValueError)
    assert list(pgenerate(f, range(1, 5), on_error=lambda e: 0, distributed=False)) == [1, 0, 3, 0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_retries(two_workers, tmp_path, batch_size):
    out = pgenerate(FlakyOnOdd(str(tmp_path)), range(12), batch_size=batch_size,
                    retry_delays=[0.01, 0.01])
    assert list(out) == [10 * x for x in range(12)]


@pytest.mark.timeout(120)
def test_batches_stream_in_order(two_workers, tmp_path):
    xs = Counting(100)
    out = pgenerate(Marking(str(tmp_path)), xs, batch_size=7)
    assert list(out) == [10 * x for x in range(100)]
    assert ran(tmp_path) == 100
    assert list(pgenerate(square, range(50), batch_size="auto")) == [x * x for x in range(50)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_worker_killed_mid_stream_with_retries(fresh_workers, tmp_path, batch_size):
    pool = WorkerPool(fresh_workers(2))
    out = pgenerate(DiesOnce(str(tmp_path), 5), range(12), pool=pool, batch_size=batch_size,
                    retry_delays=ExponentialBackOff(n=3, first_delay=0.01))
    assert list(out) == [x + 1 for x in range(12)]
    assert len(pool) == 1  # the dead worker left the pool


@pytest.mark.timeout(180)
def test_a_worker_killed_mid_stream_without_retries_raises_at_its_element(fresh_workers,
                                                                          tmp_path):
    pool = WorkerPool(fresh_workers(2))
    gen = pgenerate(DiesOnce(str(tmp_path), 5), range(12), pool=pool)
    assert [next(gen) for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(ProcessExitedException):
        next(gen)
    assert list(gen) == []


@pytest.mark.timeout(120)
def test_progress_counts_what_was_yielded(two_workers, capsys, monkeypatch):
    assert list(pgenerate(square, range(30), progress=True)) == [x * x for x in range(30)]
    err = capsys.readouterr().err
    assert "pgenerate" in err and "30" in err
