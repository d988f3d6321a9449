"""Map functions that fail on purpose, importable on workers (tests/ is on their sys.path):
used by the pmap and pgenerate tests of retries and of dead workers."""

import os
import signal
import sys
import threading
import time


class FlakyOnOdd:
    """Fails the first attempt at each odd element (a marker file records the attempt), so a
    retry succeeds wherever it runs."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, x):
        if x % 2:
            marker = os.path.join(self.directory, f"tried-{x}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise ValueError(f"first try at {x}")
        return 10 * x


class DiesOnce:
    """Kills its own worker process the first time it meets `x == target`."""

    def __init__(self, directory: str, target: int):
        self.marker = os.path.join(directory, "died")
        self.target = target

    def __call__(self, x):
        if x == self.target and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return x + 1


_target_started = threading.Event()  # (on a worker) a DiesAfterTakingBack target began


class DiesAfterTakingBack:
    """Runs long at `x == target`, so that the map moves the element queued behind it to an
    idle worker; on a worker armed with `arm_take_back_then_die`, that take-back kills it."""

    def __init__(self, target: int, runs: float = 3.0):
        self.target = target
        self.runs = runs

    def __call__(self, x):
        if x == self.target:
            _target_started.set()
            time.sleep(self.runs)
        return x + 1


def arm_take_back_then_die(bound: float = 30.0) -> None:
    """On a worker, before the map: at the map's first take-back here once the target has
    begun (waiting for it, within `bound`), the worker answers the element taken back "not
    run" and then dies before its answer to the take-back can leave. (Fault injection on a
    real worker: the race the batched pmap of `DiesOnce` met in CI, made certain.)"""
    pmap_module = sys.modules["pydist.pmap"]  # (`pydist.pmap` is also the function)
    take_back = pmap_module._lane_cancel

    def take_back_then_die(key, seq):
        if not _target_started.wait(bound):  # (not the target's worker)
            return take_back(key, seq)
        taken = take_back(key, seq)
        time.sleep(0.3)  # the element's "not run" leaves first
        os.kill(os.getpid(), signal.SIGKILL)
        return taken

    pmap_module._lane_cancel = take_back_then_die


class ClosesItsLane:
    """At `x == target`, on its worker: ends the map's lane there, as if the map had ended,
    so the elements queued behind come back "not run" though the map never took them back
    (fault injection: no real path does this while the map runs)."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, x):
        if x == self.target:
            # (the element queued behind this one may not be here yet: it is answered
            # "not run" when it comes, as its lane is closed)
            pmap_module = sys.modules["pydist.pmap"]
            for key in list(pmap_module._lanes):
                pmap_module._lane_close(key)
        return x + 1
