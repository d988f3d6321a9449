"""pmap under faults (issue 12): a call that cannot be unpickled on its worker, and a worker
killed mid-map. Each must end in a typed error within a bound, or (with retries or on_error)
finish on the other workers with every element accounted for, in order."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

import pytest

import pydist
from conftest import wait_until, worker_ospid
from pydist import (
    CachingPool,
    ExponentialBackOff,
    ProcessExitedException,
    RemoteException,
    WorkerPool,
    pmap,
)


# ==================================================================== calls that cannot be unpickled
def late_module(tmp_path, monkeypatch, name: str):
    """A module only this process can import: its directory joins sys.path after the
    workers started (they copy the master's sys.path when they join)."""
    directory = tmp_path / "late"
    directory.mkdir()
    (directory / f"{name}.py").write_text("def f(x):\n    return 10 * x\n")
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setitem(sys.modules, name, None)  # so that teardown removes it
    del sys.modules[name]
    module = importlib.import_module(name)
    return module, str(directory)


def prepend_path(directory: str) -> None:
    sys.path.insert(0, directory)


POOLS = {
    "default": lambda ws: None,  # pmap's own pool of every worker (mod.f ships by name)
    "WorkerPool": WorkerPool,
    "CachingPool": CachingPool,
}


def assert_unpickling_error(info, bad: set[int]) -> None:
    err = info.value
    assert isinstance(err, RemoteException), repr(err)
    assert isinstance(err.captured.ex, ModuleNotFoundError)
    assert err.pid in bad
    assert "could not unpickle the call" in str(err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("pool_kind", list(POOLS))
def test_a_function_the_workers_cannot_import_raises_at_once(
        two_workers, tmp_path, monkeypatch, pool_kind, batch_size):
    """Issue 12, item 3: with the default pool this hung in `done.get()` (the lane of each
    worker waited for the first call, which never arrived, and the cached function was never
    stored). Several maps in a row, since it depended on which reply came first."""
    mod, _ = late_module(tmp_path, monkeypatch, f"late_{pool_kind}_{batch_size}")
    pool = POOLS[pool_kind](two_workers)
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(RemoteException) as info:
            pmap(mod.f, range(8), pool=pool, batch_size=batch_size)
        assert_unpickling_error(info, set(two_workers))
        assert time.monotonic() - start < 20
    assert pmap(mod.f, range(4), distributed=False) == [0, 10, 20, 30]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("pool_kind", list(POOLS))
def test_a_function_one_worker_cannot_import_raises_naming_it(
        fresh_workers, tmp_path, monkeypatch, pool_kind, batch_size):
    good, bad = fresh_workers(2)
    mod, directory = late_module(tmp_path, monkeypatch, f"half_{pool_kind}_{batch_size}")
    pydist.remotecall_fetch(prepend_path, good, directory)
    pool = POOLS[pool_kind]([good, bad])
    for _ in range(3):
        with pytest.raises(RemoteException) as info:
            pmap(mod.f, range(12), pool=pool, batch_size=batch_size)
        assert_unpickling_error(info, set(pydist.workers()) - {good})


@pytest.mark.timeout(60)
def test_a_caching_pool_does_not_wait_for_a_function_that_never_arrived(
        two_workers, tmp_path, monkeypatch):
    """The first call through a CachingPool carries the function; if it cannot be unpickled,
    the next call must carry it again (not wait on the worker for a cache never filled)."""
    mod, _ = late_module(tmp_path, monkeypatch, "late_cached")
    pool = CachingPool(two_workers[:1])
    for _ in range(3):
        with pytest.raises(RemoteException) as info:
            pydist.remotecall_fetch(mod.f, pool, 1)
        assert_unpickling_error(info, set(two_workers[:1]))
    for _ in range(2):
        with pytest.raises(RemoteException) as info:
            pydist.remotecall(mod.f, pool, 1).fetch()
        assert_unpickling_error(info, set(two_workers[:1]))


def _refuse_on_workers(tag):
    if pydist.myid() != 1:
        raise ValueError(f"{tag} cannot be unpickled on a worker")
    return BadArgument(tag)


class BadArgument:
    """An argument that unpickles on the master only."""

    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return (_refuse_on_workers, (self.tag,))


def tenfold(x):
    return 10 * x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_element_that_cannot_be_unpickled_raises_at_once(two_workers, batch_size):
    """One element's call fails before reaching its worker's lane: the elements queued
    behind it in that lane must not wait for it forever."""
    for pool in (None, WorkerPool(two_workers), CachingPool(two_workers)):
        for position in (0, 1, 2, 5):
            xs: list = list(range(10))
            xs[position] = BadArgument(position)
            with pytest.raises(RemoteException) as info:
                pmap(tenfold, xs, pool=pool, batch_size=batch_size)
            assert "cannot be unpickled on a worker" in str(info.value)
            assert "could not unpickle the call" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("position", [0, 1, 3, 4])
def test_on_error_handles_an_element_that_cannot_be_unpickled(two_workers, position):
    """Only the batch of the bad element fails, also when its call was the one bringing the
    function to its worker's cache: the batch queued behind it there is sent again (it
    failed with "the function never reached the cache" before)."""
    for _ in range(3):
        xs: list = list(range(10))
        xs[position] = BadArgument(position)
        out = pmap(tenfold, xs, pool=CachingPool(two_workers), batch_size=2,
                   on_error=lambda e: type(e).__name__)
        bad = position // 2 * 2
        assert out == [("ValueError" if i in (bad, bad + 1) else 10 * i) for i in range(10)]


# ==================================================================== a worker killed mid-map
class SlowTenfold:
    """10 x, after 0.2 s; records each element done in `directory`; returns the worker too."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, x):
        time.sleep(0.2)
        open(os.path.join(self.directory, f"done-{x}"), "w").close()
        return 10 * x, pydist.myid()


def map_and_kill(fresh_workers, tmp_path, pool_type, **kwargs):
    """pmap over 3 fresh workers, SIGKILL the first one once a few elements are done;
    returns (outcome, the killed worker, the survivors): outcome is the result list or the
    exception raised."""
    ws = fresh_workers(3)
    victim, survivors = ws[0], ws[1:]
    ospid = worker_ospid(victim)
    outcome: list = []
    n = 36

    def run() -> None:
        try:
            outcome.append(pmap(SlowTenfold(str(tmp_path)), range(n), pool=pool_type(ws),
                                **kwargs))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: len(os.listdir(tmp_path)) >= 4, timeout=60,
               what="the first elements to finish")
    assert len(os.listdir(tmp_path)) < n // 2, "the map ran too far before the kill"
    killed_at = time.monotonic()
    os.kill(ospid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "pmap hung after a worker was killed"
    assert time.monotonic() - killed_at < 40
    return outcome[0], victim, survivors


def check_all_results(out, victim, survivors):
    assert isinstance(out, list), repr(out)
    assert [v for v, _ in out] == [10 * x for x in range(36)]
    assert {w for _, w in out} <= {victim, *survivors}


RETRIES = {
    "delays": dict(retry_delays=ExponentialBackOff(n=3, first_delay=0.05)),
    "check": dict(retry_delays=ExponentialBackOff(n=3, first_delay=0.05),
                  retry_check=lambda s, e: (s, isinstance(e, ProcessExitedException))),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("retries", list(RETRIES))
def test_retries_survive_a_worker_killed_mid_map(fresh_workers, tmp_path, retries, batch_size):
    """Issue 12, item 4: batched, new batches went on to the dead worker and the map
    failed."""
    pool_type = CachingPool if batch_size > 1 else WorkerPool
    out, victim, survivors = map_and_kill(fresh_workers, tmp_path, pool_type,
                                          batch_size=batch_size, **RETRIES[retries])
    check_all_results(out, victim, survivors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_on_error_covers_the_elements_of_a_worker_killed_mid_map(fresh_workers, tmp_path,
                                                                 batch_size):
    out, victim, survivors = map_and_kill(fresh_workers, tmp_path, CachingPool,
                                          batch_size=batch_size,
                                          on_error=lambda e: type(e).__name__)
    assert isinstance(out, list), repr(out)
    lost = [x for x, r in enumerate(out) if r == "ProcessExitedException"]
    # What the killed worker held: the element running and those queued behind it (batches).
    lanes = sys.modules["pydist.pmap"]  # `pydist.pmap` is the function
    in_flight = lanes.PIPELINE_DEPTH if batch_size == 1 else lanes.BATCH_PIPELINE_DEPTH
    assert 1 <= len(lost) <= in_flight * batch_size, out
    for x, r in enumerate(out):
        if x not in lost:
            assert r[0] == 10 * x and r[1] in (victim, *survivors)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_worker_killed_mid_map_without_retries_raises_promptly(fresh_workers, tmp_path,
                                                                 batch_size):
    out, victim, _ = map_and_kill(fresh_workers, tmp_path, WorkerPool, batch_size=batch_size)
    assert isinstance(out, ProcessExitedException), repr(out)
    assert out.worker_id == victim


@pytest.mark.timeout(60)
def test_a_lane_runs_what_waits_behind_an_element_that_never_arrives(two_workers):
    """Element 0 of a lane never arrives (its call failed on the way): once the caller
    cancels it, element 1, queued behind it, runs."""
    lanes = sys.modules["pydist.pmap"]  # `pydist.pmap` is the function
    w = two_workers[0]
    queued = pydist.remotecall(lanes._lane_run, w, "gap-lane", 1, tenfold, (4,))
    time.sleep(0.5)
    assert not queued.isready()  # waiting for element 0
    pydist.remote_do(lanes._lane_cancel, w, "gap-lane", 0)
    assert queued.fetch(timeout=30) == 40
    pydist.remote_do(lanes._lane_close, w, "gap-lane")


class _Input:
    """A map input that can be watched with a weak reference."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, "auto"])
def test_a_failed_map_frees_its_inputs_without_the_garbage_collector(two_workers, batch_size):
    """Once the error of a failed pmap is dropped, the map's inputs are freed at once: no
    reference cycle through the error's traceback keeps them until a collection."""
    import gc
    import weakref

    inputs = [_Input() for _ in range(20)]
    watched = [weakref.ref(x) for x in inputs]
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(RemoteException):
            pydist.pmap(_fails_on_none, inputs + [None], batch_size=batch_size)
        del inputs
        alive = sum(ref() is not None for ref in watched)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of 20 inputs still alive"


def _fails_on_none(x):
    if x is None:
        raise ValueError("no input")
    return 0
