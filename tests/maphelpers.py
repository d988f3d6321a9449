"""Map functions that fail on purpose, importable on workers (tests/ is on their sys.path):
used by the pmap and pgenerate tests of retries and of dead workers."""

import os
import signal


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
