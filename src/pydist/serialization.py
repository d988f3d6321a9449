"""Pickle protocol 5 with out-of-band buffers, and code by value where it must be.

Every message is first pickled by the C pickler, which sends module-level functions and
classes by reference (fast: ~3 µs for a small call). If it meets code that cannot be found
by name on the other side (a lambda, a closure, anything defined in `__main__`), it starts
over with cloudpickle, which ships that code by value; cloudpickle is imported only then.

Large buffers (NumPy arrays, `PickleBuffer`s) are returned separately so that the transport
writes them to the socket without copying them into the pickle stream.

Types that must know where they are going (Futures and RemoteChannels update the distributed
reference count) register a reducer with `register_reducer`; it may queue work in
`pickler.context["after"]`, run only once the whole message has pickled and is certain to be
sent, and undo it in `pickler.context["discard"]`, run instead when it will not be (`discard`).

Code sent by value keeps its file name and takes its source lines along (see
`_reduce_code`), so that a remote traceback shows where the code came from and what it says.
A function sent by value is pickled once while nothing it sees changes, and the receiver
unpickles those bytes once (`_function_by_value`): calling it again costs what a call of a
module function costs, as in dask and Ray.
"""

from __future__ import annotations

import functools
import io
import linecache
import marshal
import os
import pickle
import sys
import threading
import types
import weakref
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


def ships_by_name(obj: Any) -> bool:
    """Pickling `obj` sends only its name: a function, builtin or class that the other side
    finds again by module and qualified name (nothing sent by value). Caching such a thing on a
    worker saves nothing."""
    if type(obj) in (types.FunctionType, types.BuiltinFunctionType) or isinstance(obj, type):
        return _is_importable(obj)
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


# ---------------------------------------------------------------- functions sent by value
# Pickling a function by value costs ~35 µs, ten times a call by reference. When nothing the
# function can see has changed (its code, defaults, closure, and the globals it names are
# modules, importable code or immutable scalars, all unchanged), the bytes cloudpickle made
# last time are reused: the receiver unpickles exactly what a fresh pickling would give.
_UNSTABLE = object()
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
_by_value_cache: "weakref.WeakKeyDictionary[types.FunctionType, tuple]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _stable(value: Any, depth: int) -> Any:
    """A fingerprint of `value` that changes whenever its pickle could, or _UNSTABLE."""
    t = type(value)
    if t in _SCALARS:
        return (t, value)
    if t is tuple:
        parts = tuple(_stable(v, depth) for v in value)
        return _UNSTABLE if _UNSTABLE in parts else parts
    if t is types.ModuleType:
        return ("module", id(value))
    if t is types.FunctionType:
        if _is_importable(value):
            return ("ref", id(value))
        return _fingerprint(value, depth - 1) if depth > 0 else _UNSTABLE
    if (t is types.BuiltinFunctionType or isinstance(value, type)) and _is_importable(value):
        return ("ref", id(value))
    return _UNSTABLE


def _fingerprint(f: types.FunctionType, depth: int = 2) -> Any:
    if f.__dict__:
        return _UNSTABLE
    parts: list = [id(f.__code__), f.__qualname__, f.__module__, f.__doc__]
    g = f.__globals__
    for name in _global_names(f.__code__):
        if name in g:
            parts.append((name, _stable(g[name], depth)))
    for cell in f.__closure__ or ():
        try:
            parts.append(_stable(cell.cell_contents, depth))
        except ValueError:
            parts.append("<empty cell>")
    parts.append(_stable(f.__defaults__, depth))
    kw = f.__kwdefaults__
    parts.append(_stable(tuple(sorted(kw.items())), depth) if kw else None)
    for part in parts:
        if part is _UNSTABLE or (type(part) is tuple and _UNSTABLE in part):
            return _UNSTABLE
    return tuple(parts)


def _pickled_by_value(f: types.FunctionType) -> bytes | None:
    """cloudpickle's bytes for `f`, reused while its fingerprint holds; None if `f` sees
    something mutable (then the whole message goes through cloudpickle, as before)."""
    fp = _fingerprint(f)
    if fp is _UNSTABLE:
        return None
    cached = _by_value_cache.get(f)
    if cached is not None and cached[0] == fp:
        return cached[1]
    file = io.BytesIO()  # a pickler of its own: cloudpickle's state is per pickler
    _cloud_pickler_class()(file, None).dump(f)
    data = file.getvalue()
    _by_value_cache[f] = (fp, data)
    return data


# How many functions received by value a process keeps, and the largest pickle it keeps one
# for (a closure over a large constant is unpickled each time rather than held).
LOADED_BY_VALUE = 256
LOADED_BY_VALUE_MAX_BYTES = 64 * 1024


@functools.lru_cache(maxsize=LOADED_BY_VALUE)
def _load_function(data: bytes) -> Any:
    return pickle.loads(data)


def _function_by_value(data: bytes) -> Any:
    """Receiver of `_pickled_by_value`'s bytes: the function they make, unpickled once (the
    same bytes come with every call of that function while nothing it sees has changed).
    Unpickling one cost ~12 µs a call (code, globals, function rebuilt), a look-up ~0.3 µs.
    So, as in dask and Ray, it is one function object on the receiver, with one globals
    dict, while the sender's function is unchanged: a global it rebinds there (`global n;
    n += 1`) keeps its value from call to call, until the sender changes what the function
    sees or the function drops out of the LOADED_BY_VALUE most recent."""
    if len(data) > LOADED_BY_VALUE_MAX_BYTES:
        return pickle.loads(data)
    f = _load_function(data)
    code = getattr(f, "__code__", None)
    if code is not None and code.co_filename not in linecache.cache:
        _restore_source(code.co_filename)  # (what `_load_code` did for it, if linecache lost it)
    return f


# ---------------------------------------------------------------- code objects sent by value
# See _reduce_code. A source span is (filename, first line number, tuple of lines).
_SourceSpan = tuple


def _line_span(code: types.CodeType) -> tuple[int, int]:
    """First and last line numbers that `code` or code nested in it can show in a traceback."""
    first = last = code.co_firstlineno
    stack = [code]
    while stack:
        c = stack.pop()
        if hasattr(c, "co_positions"):  # 3.11+: also the end lines of multi-line expressions
            lines = [n for pos in c.co_positions() for n in pos[:2] if n]
        else:
            lines = [n for _, _, n in c.co_lines() if n]
        if lines:
            first, last = min(first, *lines), max(last, *lines)
        stack.extend(k for k in c.co_consts if type(k) is types.CodeType)
    return first, last


def _source_span(code: types.CodeType) -> _SourceSpan | None:
    filename = code.co_filename
    lines = linecache.getlines(filename)
    if not lines:
        return None
    first, last = _line_span(code)
    first = max(first, 1)
    span = tuple(lines[first - 1:last])
    return (filename, first, span) if span else None


def _reduce_code(code: types.CodeType):
    """How the cloudpickle pickler pickles a code object: its `marshal` form (what a .pyc
    holds: every field, co_filename included, nested code too) with the source lines it spans,
    read from this side's `linecache`; `_load_code` rebuilds it on the other side.

    Why not cloudpickle's own reducer: cloudpickle 3.1.3 names every code object
    "<dynamic-code>" (for deterministic payloads), so the remote traceback of a lambda, a
    closure or a `__main__` function would show neither its file nor its source line; and no
    version ships the source, which the worker lacks where the file is not on its machine (a
    script only on the master, a notebook cell, another host). Marshal needs the same Python
    on both sides, as cloudpickle's code pickling does. NotImplemented (cloudpickle's reducer
    after all) for code that cannot be marshalled (hand-made constants).

    Cheap: by-value functions are pickled once (`_pickled_by_value`) and this is cached for
    messages pickled anew; loading costs a dict look-up when the lines are known already."""
    # Code objects compare equal whatever their file: the file name is part of the key.
    return _reduce_code_cached(code, code.co_filename)


@functools.lru_cache(maxsize=1024)  # a message with unstable globals is pickled anew each time
def _reduce_code_cached(code: types.CodeType, filename: str):
    try:
        data = marshal.dumps(code)
    except ValueError:
        return NotImplemented
    return _load_code, (data, _source_span(code))


_shipped: dict[tuple[str, int], tuple] = {}  # (filename, first line) -> lines received
_shipped_files: dict[str, dict[int, str]] = {}  # filename -> {line number: text}
_our_entries: dict[str, list] = {}  # filename -> the lines we put in linecache for it
_shipped_lock = threading.Lock()


def _load_code(data: bytes, source: _SourceSpan | None = None) -> types.CodeType:
    """Unpickle what `_reduce_code` made: register the source lines, rebuild the code."""
    if source is not None:
        filename, first, lines = source
        if _shipped.get((filename, first)) != lines or filename not in linecache.cache:
            _register_source(filename, first, lines)
    return marshal.loads(data)


def _register_source(filename: str, first: int, lines: tuple) -> None:
    """Make `lines` (from line `first` on) what `linecache` shows for `filename`, with the
    other lines received for that file, unless the file exists here (then linecache reads it)
    or a source not backed by a file (a loader's, IPython's) is already registered for it."""
    with _shipped_lock:
        _shipped[(filename, first)] = lines
        known = _shipped_files.setdefault(filename, {})
        known.update(zip(range(first, first + len(lines)), lines))
        _install_source(filename, known)


def _install_source(filename: str, known: dict[int, str]) -> None:
    """(_shipped_lock held) See `_register_source`."""
    if os.path.exists(filename):
        linecache.getlines(filename)  # cached now: later loads take the fast path
        return
    entry = linecache.cache.get(filename)
    if entry is not None and (len(entry) == 1 or (
            entry[1] is None and entry[2] is not _our_entries.get(filename))):
        return  # a lazy or file-less entry that is not ours: someone else's source
    text = ["\n"] * max(known)
    for n, line in known.items():
        text[n - 1] = line
    # mtime None: linecache.checkcache keeps the entry although no such file exists.
    linecache.cache[filename] = (sum(map(len, text)), None, text, filename)
    _our_entries[filename] = text


def _restore_source(filename: str) -> None:
    """Put the source lines received for `filename` back in `linecache` (cleared since a
    function from that file was loaded)."""
    known = _shipped_files.get(filename)
    if known:
        with _shipped_lock:
            _install_source(filename, known)


class _FastPickler(pickle.Pickler):
    def __init__(self, file, dest: int | None, buffer_callback=None):
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.dest = dest
        self.context: dict[str, Any] = {}

    def reducer_override(self, obj: Any):
        reducer = _reducers.get(type(obj))
        if reducer is not None:
            return reducer(obj, self)
        if type(obj) is types.FunctionType and not _is_importable(obj):
            data = _pickled_by_value(obj)
            if data is None:
                raise _NeedsCloudpickle
            return _function_by_value, (data,)
        if isinstance(obj, type) and not _is_importable(obj):
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
                t = type(obj)
                if t is types.CodeType:
                    return _reduce_code(obj)
                reducer = _reducers.get(t)
                if reducer is not None:
                    return reducer(obj, self)
                return super().reducer_override(obj)

        _CloudPickler = CloudPickler
    return _CloudPickler


class _Slot:
    """A pickler with its output stream, reused across `dumps` calls (building a pickler
    costs more than pickling a small call)."""

    __slots__ = ("file", "pickler", "buffers")

    def __init__(self, pickler_cls: Any, oob: bool) -> None:
        self.file = io.BytesIO()
        self.buffers: list[memoryview] = []
        self.pickler = pickler_cls(self.file, None, buffer_callback=self.keep if oob else None)

    def keep(self, buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in-band
        self.buffers.append(raw)
        return False


_free_slots: dict[tuple[Any, bool], list[_Slot]] = {}
_MAX_FREE_SLOTS = 8
_MAX_KEPT_OUTPUT = 1 << 20  # a slot that wrote more than this is not kept (its buffer is large)


def _dump(pickler_cls: Any, obj: Any, dest: int | None, oob: bool):
    free = _free_slots.setdefault((pickler_cls, oob), [])
    try:
        slot = free.pop()
    except IndexError:
        slot = _Slot(pickler_cls, oob)
    p = slot.pickler
    p.dest = dest
    context: dict[str, Any] = {}
    p.context = context
    try:
        p.dump(obj)
        body = slot.file.getvalue()
        buffers = slot.buffers
    except BaseException:
        discard(context)  # (also before the retry with cloudpickle: its reducers run again)
        raise
    finally:
        p.clear_memo()
        globals_ref = getattr(p, "globals_ref", None)  # cloudpickle's, keyed by id(): per pickle
        if globals_ref:
            globals_ref.clear()
        slot.buffers = []
        p.context = None
        if slot.file.tell() <= _MAX_KEPT_OUTPUT and len(free) < _MAX_FREE_SLOTS:
            slot.file.seek(0)
            slot.file.truncate()
            free.append(slot)
    return body, buffers, context


# Values that pickle to a few bytes with no reducer of ours involved: `dumps` pickles them
# directly (most results of small tasks), skipping the pickler slots.
_SCALARS = frozenset({int, float, bool, type(None), complex})


def dumps(obj: Any, dest: int | None = None, oob: bool = True) -> tuple[bytes, list[memoryview], dict]:
    """Pickle `obj` for process `dest`: (in-band bytes, out-of-band buffers, reducer context).
    Run `run_after(context)` once the message is certain to be sent."""
    if type(obj) in _SCALARS:
        return pickle.dumps(obj, PROTOCOL), [], {}
    try:
        return _dump(_FastPickler, obj, dest, oob)
    except _NeedsCloudpickle:
        return _dump(_cloud_pickler_class(), obj, dest, oob)


def run_after(context: dict) -> None:
    """Run what the reducers queued for after a successful pickling (for a message that is
    certain to be sent; else call `discard`)."""
    context.pop("discard", None)
    for fn in context.get("after", ()):
        fn()


def discard(context: dict) -> None:
    """Undo what the reducers did for a pickling whose message will not be sent (run by
    `dumps` itself when pickling fails)."""
    for fn in context.pop("discard", ()):
        fn()


def dumps_inline(obj: Any, dest: int | None = None) -> bytes:
    """Pickle `obj` into one bytes object (no out-of-band buffers, no reducer side effects)."""
    body, _, context = dumps(obj, dest, oob=False)
    run_after(context)
    return body


def loads(data: Any, buffers: list | None = None) -> Any:
    """Unpickle a body produced by `dumps`, with its out-of-band buffers."""
    return pickle.loads(data, buffers=buffers or ())
