"""Helpers importable on workers (tests/ is on their sys.path): a callable that counts how
many times it has been unpickled in this process."""

UNPICKLED = 0


def _rebuild(tag):
    global UNPICKLED
    UNPICKLED += 1
    return Counted(tag)


class Counted:
    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return (_rebuild, (self.tag,))

    def __call__(self, x):
        return (self.tag, x)


def unpickled():
    return UNPICKLED
