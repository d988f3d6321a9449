"""Pickle protocol 5 with out-of-band buffers, and code by value where it must be.

Every message is first pickled by the C pickler, which sends module-level functions and
classes by reference (fast: ~3 µs for a small call). If it meets code that cannot be found
by name on the other side (a lambda, a closure, anything defined in `__main__`), it starts
over with cloudpickle, which ships that code by value; cloudpickle is imported only then.

Large buffers (NumPy arrays, `PickleBuffer`s) are returned separately so that the transport
writes them to the socket without copying them into the pickle stream.

Types that must know where they are going (Futures and RemoteChannels update the distributed
reference count) register a reducer with `register_reducer`; it may queue work in
`pickler.context["after"]`, run only once the whole message has pickled.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from typing import Any, Callable

PROTOCOL = 5
# Buffers at least this large go out of band, as their own frames; smaller ones stay in-band
# (a frame per tiny array would cost more than the copy).
OOB_THRESHOLD = 64 * 1024

Reducer = Callable[[Any, Any], Any]
_reducers: dict[type, Reducer] = {}
_by_value_modules: set[str] = {"__main__"}


def register_reducer(cls: type, reducer: Reducer) -> None:
    """Pickle instances of exactly `cls` with `reducer(obj, pickler)`. The pickler carries
    `dest` (the receiving pid, or None) and `context` (a dict the reducer may fill)."""
    _reducers[cls] = reducer


_known_importable: set = set()  # module-level code lives as long as its module, no leak


def _is_importable(obj: Any) -> bool:
    """True if `obj` can be found again as `obj.__module__` + `obj.__qualname__`."""
    if obj in _known_importable:
        return True
    if _find_by_name(obj):
        _known_importable.add(obj)
        return True
    return False


def _find_by_name(obj: Any) -> bool:
    mod_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if mod_name is None or qualname is None or mod_name in _by_value_modules:
        return False
    if "<" in qualname:  # <lambda>, <locals>
        return False
    module = sys.modules.get(mod_name)
    if module is None:
        return False
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


class _NeedsCloudpickle(Exception):
    pass


class _FastPickler(pickle.Pickler):
    def __init__(self, file, dest: int | None, buffer_callback=None):
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.dest = dest
        self.context: dict[str, Any] = {}

    def reducer_override(self, obj: Any):
        reducer = _reducers.get(type(obj))
        if reducer is not None:
            return reducer(obj, self)
        if (type(obj) is types.FunctionType or isinstance(obj, type)) and not _is_importable(obj):
            raise _NeedsCloudpickle
        return NotImplemented


_CloudPickler: Any = None


def _cloud_pickler_class() -> Any:
    global _CloudPickler
    if _CloudPickler is None:
        import cloudpickle

        class CloudPickler(cloudpickle.Pickler):
            def __init__(self, file, dest: int | None, buffer_callback=None):
                super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
                self.dest = dest
                self.context: dict[str, Any] = {}

            def reducer_override(self, obj: Any):
                reducer = _reducers.get(type(obj))
                if reducer is not None:
                    return reducer(obj, self)
                return super().reducer_override(obj)

        _CloudPickler = CloudPickler
    return _CloudPickler


def _dump(pickler_cls: Any, obj: Any, dest: int | None, oob: bool):
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in-band
        buffers.append(raw)
        return False

    f = io.BytesIO()
    p = pickler_cls(f, dest, buffer_callback=keep if oob else None)
    p.dump(obj)
    return f.getvalue(), buffers, p.context


def dumps(obj: Any, dest: int | None = None, oob: bool = True) -> tuple[bytes, list[memoryview], dict]:
    """Pickle `obj` for process `dest`: (in-band bytes, out-of-band buffers, reducer context).
    Run `run_after(context)` once the message is certain to be sent."""
    try:
        return _dump(_FastPickler, obj, dest, oob)
    except _NeedsCloudpickle:
        return _dump(_cloud_pickler_class(), obj, dest, oob)


def run_after(context: dict) -> None:
    """Run what the reducers queued for after a successful pickling."""
    for fn in context.get("after", ()):
        fn()


def dumps_inline(obj: Any, dest: int | None = None) -> bytes:
    """Pickle `obj` into one bytes object (no out-of-band buffers, no reducer side effects)."""
    body, _, context = dumps(obj, dest, oob=False)
    run_after(context)
    return body


def loads(data: Any, buffers: list | None = None) -> Any:
    """Unpickle a body produced by `dumps`, with its out-of-band buffers."""
    return pickle.loads(data, buffers=buffers or ())
