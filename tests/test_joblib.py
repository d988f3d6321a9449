"""The joblib backend (`pydist.joblib`) against real workers: joblib.Parallel and
scikit-learn's `n_jobs` run there, with joblib's semantics (results in order, generators,
errors of their own type, `n_jobs` bounds), and a lost worker is an error, not a hang.

joblib and scikit-learn are optional (the `sklearn` extra): without them these tests skip,
but fail instead when PYDIST_REQUIRE_EXTRAS=1 (CI's Python 3.11 pass installs the extra).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

import pydist
from conftest import ensure_workers, wait_until, worker_ospid
from pydist import ProcessExitedException, RemoteException, SerializationError, WorkerPool


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} is not installed (pip install -e '.[sklearn]')"
        if os.environ.get("PYDIST_REQUIRE_EXTRAS") == "1":
            raise ImportError(msg + "; PYDIST_REQUIRE_EXTRAS=1 requires it") from None
        pytest.skip(msg, allow_module_level=True)


joblib = _need("joblib")
import pydist.joblib  # noqa: E402  (registers the "pydist" backend)
from joblib import Parallel, delayed, parallel_config  # noqa: E402

JOBLIB = tuple(int(p) for p in joblib.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def three():
    """Three workers: the session's shared ones, plus what this module adds, which it
    removes at its end (other modules count on the shared workers only)."""
    before = set(pydist.workers())
    pids = ensure_workers(3)
    yield pids
    added = [p for p in pydist.workers() if p not in before and p != 1]
    if added:
        pydist.rmprocs(added, waitfor=30)


@pytest.fixture
def sklearn():
    return _need("sklearn")


# --------------------------------------------------------------- task functions
def square(x):
    return x * x


def whoami(_=None):
    return pydist.myid(), os.getpid()


class Oops(Exception):
    pass


def fail_at(x, bad):
    if x == bad:
        raise Oops(f"bad element {x}")
    return x


def span(x, seconds):
    """(start, end) of a sleep: all workers are on this host, so clocks agree."""
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def die_at(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return x


def nested(n):
    """A Parallel inside a task: where its calls run and with which backend."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    inner = Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(n))
    return os.getpid(), type(backend).__name__, inner


def max_overlap(spans):
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


# --------------------------------------------------------------- joblib.Parallel
def test_import_pydist_does_not_import_joblib():
    code = ("import sys, pydist; "
            "assert 'joblib' not in sys.modules and 'pydist.joblib' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
         os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr


def test_module_registers_the_backend_and_imports_the_real_joblib():
    from joblib.parallel import BACKENDS

    assert pydist.joblib.joblib is joblib  # absolute import: not pydist.joblib itself
    assert BACKENDS["pydist"] is pydist.joblib.PydistBackend
    pydist.joblib.register("pydist-again")
    assert BACKENDS["pydist-again"] is pydist.joblib.PydistBackend


@pytest.mark.timeout(180)
def test_parallel_matches_sequential_and_runs_on_the_workers(three):
    xs = list(range(40))
    with parallel_config(backend="pydist"):
        assert Parallel(n_jobs=-1)(delayed(square)(x) for x in xs) == [x * x for x in xs]
        where = Parallel(n_jobs=-1, batch_size=1)(delayed(whoami)() for _ in range(12))
    live = [w for w in pydist.workers() if w != 1]
    ospids = {worker_ospid(w) for w in live}
    assert {pid for pid, _ in where} <= set(live)
    assert len({pid for pid, _ in where}) >= 2  # the first batches go to different workers
    assert {ospid for _, ospid in where} <= ospids
    assert os.getpid() not in {ospid for _, ospid in where}


@pytest.mark.timeout(180)
def test_backend_named_in_parallel_and_lambdas_from_main_travel(three):
    out = Parallel(n_jobs=-1, backend="pydist")(delayed(lambda x: x + 1)(x) for x in range(10))
    assert out == list(range(1, 11))


@pytest.mark.timeout(180)
def test_generators(three):
    with parallel_config(backend="pydist"):
        gen = Parallel(n_jobs=-1, return_as="generator")(delayed(square)(x) for x in range(20))
        assert not isinstance(gen, list)
        assert list(gen) == [x * x for x in range(20)]
        if JOBLIB >= (1, 4):
            gen = Parallel(n_jobs=-1, return_as="generator_unordered")(
                delayed(square)(x) for x in range(20))
            assert sorted(gen) == [x * x for x in range(20)]


@pytest.mark.timeout(180)
def test_errors_keep_their_type_and_the_backend_stays_usable(three):
    with parallel_config(backend="pydist"):
        with pytest.raises(Oops, match="bad element 7") as info:
            Parallel(n_jobs=-1, batch_size=1)(delayed(fail_at)(x, 7) for x in range(30))
        assert isinstance(info.value, RemoteException)
        # The failure gave every worker back: the same backend runs the next Parallel.
        where = Parallel(n_jobs=-1, batch_size=1)(delayed(whoami)() for _ in range(12))
    assert len(where) == 12


@pytest.mark.timeout(180)
def test_unpicklable_arguments_raise_instead_of_hanging(three):
    import threading

    with parallel_config(backend="pydist"):
        with pytest.raises(SerializationError):
            Parallel(n_jobs=-1)(delayed(square)(threading.Lock()) for _ in range(4))
        assert Parallel(n_jobs=-1)(delayed(square)(x) for x in range(6)) == [0, 1, 4, 9, 16, 25]


@pytest.mark.timeout(180)
def test_n_jobs_bounds_how_many_batches_run_at_once(three):
    with parallel_config(backend="pydist", n_jobs=2):
        par = Parallel(batch_size=1)
        spans = par(delayed(span)(x, 0.4) for x in range(8))
        assert par._effective_n_jobs() == 2
    assert max_overlap(spans) <= 2
    backend = pydist.joblib.PydistBackend()
    n = len([w for w in pydist.workers() if w != 1])
    assert backend.effective_n_jobs(-1) == n
    assert backend.effective_n_jobs(-2) == n - 1
    assert backend.effective_n_jobs(None) == n
    assert backend.effective_n_jobs(100) == n
    assert backend.effective_n_jobs(2) == 2
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)


@pytest.mark.timeout(180)
def test_pool_argument_picks_the_workers(three):
    pool = WorkerPool(three[:2])
    with parallel_config(backend="pydist", pool=pool):
        where = Parallel(n_jobs=-1, batch_size=1)(delayed(whoami)() for _ in range(10))
    assert {pid for pid, _ in where} <= set(three[:2])


def test_no_workers_is_a_typed_error_naming_addprocs():
    with parallel_config(backend="pydist", pool=WorkerPool()):
        with pytest.raises(pydist.joblib.NoWorkersError, match="addprocs"):
            Parallel(n_jobs=-1)(delayed(square)(x) for x in range(3))
    with pytest.raises(TypeError, match="worker pool"):
        pydist.joblib.PydistBackend(pool=[2, 3])


@pytest.mark.timeout(180)
def test_nested_parallel_runs_in_threads_on_its_worker(three):
    with parallel_config(backend="pydist"):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(nested)(4) for _ in range(3))
    for outer, backend, inner in out:
        assert backend == "ThreadingBackend"
        assert inner == [outer] * 4
        assert outer != os.getpid()


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_run_is_an_error_not_a_hang(fresh_workers):
    pids = fresh_workers(2)
    pool = WorkerPool(pids)
    with parallel_config(backend="pydist", pool=pool):
        with pytest.raises(ProcessExitedException):
            Parallel(n_jobs=-1, batch_size=1)(delayed(die_at)(x, 5) for x in range(20))
    # The pool dropped the dead worker and kept the live one.
    wait_until(lambda: len(pool.workers()) == 1, what="the pool to drop the dead worker")


# --------------------------------------------------------------- scikit-learn
def pid_scorer(estimator, X, y):
    """A scorer that reports where it ran."""
    return os.getpid()


try:
    from sklearn.base import BaseEstimator, ClassifierMixin
except ImportError:  # the scikit-learn tests skip
    BaseEstimator = ClassifierMixin = object  # type: ignore[misc,assignment]


class FailsOnC(ClassifierMixin, BaseEstimator):
    """A classifier that fails to fit for one value of C (for error_score)."""

    def __init__(self, C=1.0, bad=None):
        self.C = C
        self.bad = bad

    def fit(self, X, y):
        if self.C == self.bad:
            raise ValueError(f"cannot fit with C={self.C}")
        self.classes_ = sorted(set(y))
        return self

    def predict(self, X):
        return [self.classes_[0]] * len(X)

    def score(self, X, y):
        return 0.5


@pytest.mark.timeout(300)
def test_grid_search_cv_runs_on_the_workers_and_matches_n_jobs_1(three, sklearn):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0]}
    scoring = {"acc": "accuracy", "pid": pid_scorer}
    here = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, scoring=scoring,
                        refit="acc", n_jobs=1).fit(X, y)
    with parallel_config(backend="pydist"):
        there = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, scoring=scoring,
                             refit="acc", n_jobs=-1).fit(X, y)
    assert there.best_params_ == here.best_params_
    assert list(there.cv_results_["mean_test_acc"]) == list(here.cv_results_["mean_test_acc"])
    ran = {int(there.cv_results_[f"split{i}_test_pid"][j]) for i in range(3) for j in range(3)}
    assert ran <= {worker_ospid(w) for w in pydist.workers() if w != 1} and len(ran) >= 2
    assert {int(p) for p in here.cv_results_["split0_test_pid"]} == {os.getpid()}


@pytest.mark.timeout(300)
def test_cross_val_score_matches_n_jobs_1(three, sklearn):
    from sklearn.datasets import make_classification
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    X, y = make_classification(n_samples=200, random_state=0)
    est = DecisionTreeClassifier(random_state=0)
    here = cross_val_score(est, X, y, cv=5, n_jobs=1)
    with parallel_config(backend="pydist"):
        there = cross_val_score(est, X, y, cv=5, n_jobs=-1, scoring=None)
        pids = cross_val_score(est, X, y, cv=5, n_jobs=-1, scoring=pid_scorer)
        # scikit-learn's default n_jobs=None means every worker under this backend
        default = cross_val_score(est, X, y, cv=5, scoring=pid_scorer)
    assert list(there) == list(here)
    ospids = {worker_ospid(w) for w in pydist.workers() if w != 1}
    assert {int(p) for p in pids} <= ospids
    assert {int(p) for p in default} <= ospids


@pytest.mark.timeout(300)
def test_error_score_sees_the_original_exception_type(three, sklearn):
    import warnings

    from sklearn.datasets import load_iris
    from sklearn.exceptions import FitFailedWarning
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = load_iris(return_X_y=True)
    with parallel_config(backend="pydist"):
        with pytest.raises(ValueError, match="cannot fit with C=2"):
            cross_val_score(FailsOnC(C=2, bad=2), X, y, cv=3, n_jobs=-1, error_score="raise")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitFailedWarning)
            # (the failed fit's nan score is the point, not news)
            warnings.filterwarnings("ignore", "One or more of the test scores are non-finite")
            search = GridSearchCV(FailsOnC(bad=2), {"C": [1, 2, 3]}, cv=3, n_jobs=-1,
                                  error_score=float("nan")).fit(X, y)
    scores = list(search.cv_results_["mean_test_score"])
    assert scores[0] == 0.5 and scores[2] == 0.5 and scores[1] != scores[1]  # nan
