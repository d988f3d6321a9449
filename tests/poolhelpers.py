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


# Frames this process has read, by kind name, while `count_frames` is on (a spy on the
# message dispatch: it counts and passes each frame on unchanged).
FRAMES: dict = {}


def count_frames(on: bool) -> None:
    """Start (on, from zero) or stop (off) counting the frames read here."""
    from pydist import dispatch, protocol

    handler = dispatch._Handler
    real = handler.__dict__.get("_real_on_message") or handler.on_message
    handler._real_on_message = real

    def counted(self, conn, msg):
        name = protocol.KIND_NAMES.get(msg.kind, str(msg.kind))
        FRAMES[name] = FRAMES.get(name, 0) + 1
        return real(self, conn, msg)

    FRAMES.clear()
    handler.on_message = counted if on else real


def frames_counted() -> dict:
    return dict(FRAMES)


def blob(n: int) -> bytes:
    return bytes(n)
