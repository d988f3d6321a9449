"""The exceptions pydist raises, and how a remote failure is captured and rebuilt.

A failure inside a remote call travels back as a `CapturedException`: the exception object
itself (pickled on its own, so that an unpicklable or unimportable exception degrades to a
stand-in instead of breaking the reply) plus the remote traceback as text. The caller raises it
as a `RemoteException`, which is, where Python allows, also an instance of the original type.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import sys
import traceback

if sys.version_info >= (3, 11):
    ExceptionGroup = ExceptionGroup  # noqa: A001,F821 - re-exported builtin
    BaseExceptionGroup = BaseExceptionGroup  # noqa: A001,F821
else:  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup  # type: ignore[no-redef]


def error_group(message: str, errors: list[BaseException]) -> BaseException:
    """Several errors as one: an `ExceptionGroup` when all are `Exception`s (what `except
    Exception` catches), else a `BaseExceptionGroup` (`ExceptionGroup` itself refuses a
    `KeyboardInterrupt` or `SystemExit`)."""
    return BaseExceptionGroup(message, errors)

__all__ = [
    "PydistError",
    "RemoteException",
    "CapturedException",
    "RemoteError",
    "ProcessExitedException",
    "LaunchWorkerError",
    "InvalidStateError",
    "ProtocolError",
    "AuthenticationError",
    "SerializationError",
    "ExceptionGroup",
]


class PydistError(Exception):
    """Base class of the errors pydist raises itself."""


class SerializationError(PydistError, pickle.PicklingError):
    """A value could not be pickled for sending (an argument, a result, a function)."""


class ProtocolError(PydistError):
    """Bytes from a peer do not form a valid pydist frame or handshake."""


class AuthenticationError(ProtocolError):
    """A peer failed the cluster-cookie handshake (wrong cookie or wrong protocol version)."""


class LaunchWorkerError(PydistError):
    """A worker process could not be started or did not report its address."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg


class InvalidStateError(PydistError, concurrent.futures.InvalidStateError):
    """An operation that the object's state forbids: a second put on a Future, a put on a closed
    channel, a take from a closed empty channel. Also a `concurrent.futures.InvalidStateError`."""


class ProcessExitedException(PydistError):
    """The target process has exited or was removed; raised (never wrapped) to every waiter.

    `reason`, when known, says why, as the end of a sentence about the worker: "exited with
    code 3", "was killed by signal 9 (SIGKILL) ...", "was silent for 31.0 s ...".
    """

    def __init__(self, worker_id: int = -1, reason: str | None = None):
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.reason = reason

    def __str__(self) -> str:
        what = self.reason or "has exited"
        return f"ProcessExitedException({self.worker_id}): worker {self.worker_id} {what}"

    def __reduce__(self):
        return (ProcessExitedException, (self.worker_id, self.reason))


class RemoteError(Exception):
    """Stand-in for a remote exception that could not be rebuilt here (its type cannot be
    pickled or imported on this side). Carries the type's qualified name and the message."""

    def __init__(self, type_name: str, message: str):
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    mod = cls.__module__
    return cls.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{cls.__qualname__}"


class CapturedException:
    """An exception caught on some process, with its traceback text.

    `ex` is the original exception object when it can be rebuilt on this side, otherwise a
    `RemoteError` stand-in with its type name and message; `traceback` is the formatted remote
    traceback.
    """

    __slots__ = ("ex", "traceback", "type_name")

    def __init__(self, ex: BaseException, traceback_text: str | None = None):
        self.ex = ex
        self.type_name = ex.type_name if isinstance(ex, RemoteError) else _type_name(ex)
        if traceback_text is None:
            traceback_text = "".join(traceback.format_exception(type(ex), ex, ex.__traceback__))
        self.traceback = traceback_text

    def __repr__(self) -> str:
        return f"CapturedException({self.ex!r})"

    def __str__(self) -> str:
        return self.traceback.rstrip("\n")

    def __reduce__(self):
        try:
            ex_bytes = _dumps_exception(self.ex)
        except Exception:
            ex_bytes = None
        return (_rebuild_captured, (self.type_name, str(self.ex), self.traceback, ex_bytes))


def _dumps_exception(ex: BaseException) -> bytes:
    from .serialization import dumps_inline

    ex = ex.with_traceback(None)
    return dumps_inline(ex)


def _rebuild_captured(type_name: str, message: str, tb: str, ex_bytes: bytes | None):
    ex: BaseException | None = None
    if ex_bytes is not None:
        try:
            ex = pickle.loads(ex_bytes)
            if not isinstance(ex, BaseException):
                ex = None
        except Exception:
            ex = None
    if ex is None:
        ex = RemoteError(type_name, message)
    return CapturedException(ex, tb)


class RemoteException(PydistError):
    """An exception raised by the function of a remote call, captured on process `pid`.

    `str(e)` starts with ``"On worker <pid>:"`` followed by the remote traceback. When the
    original exception type allows it, the raised object is also an instance of that type,
    so ``except ZeroDivisionError`` catches a remote division by zero.
    """

    def __init__(self, pid: int, captured: CapturedException):
        # Not super(): in a dual class the next __init__ is the original type's, which may
        # take other arguments (ProcessExitedException does).
        Exception.__init__(self, pid, captured)
        self.pid = pid
        self.captured = captured

    def __str__(self) -> str:
        return f"On worker {self.pid}:\n{self.captured}"

    def __repr__(self) -> str:
        return f"RemoteException({self.pid}, {self.captured!r})"

    def __reduce__(self):
        return (make_remote_exception, (self.pid, self.captured))


_dual_classes: dict[type, type] = {}


def _dual_class(orig: type) -> type | None:
    """A class deriving from both RemoteException and `orig`, or None where Python forbids it."""
    if orig in _dual_classes:
        return _dual_classes[orig]
    cls: type | None = None
    if (
        isinstance(orig, type)
        and issubclass(orig, Exception)
        and not issubclass(orig, (RemoteException, RemoteError))
    ):
        try:
            cls = type(
                f"RemoteException[{orig.__name__}]",
                (RemoteException, orig),
                {
                    "__module__": __name__,
                    "__init__": RemoteException.__init__,
                    "__str__": RemoteException.__str__,
                    "__repr__": RemoteException.__repr__,
                    "__reduce__": RemoteException.__reduce__,
                },
            )
        except TypeError:  # incompatible instance layouts
            cls = None
    _dual_classes[orig] = cls  # type: ignore[assignment]
    return cls


def make_remote_exception(pid: int, captured: CapturedException) -> RemoteException:
    """Build the RemoteException for `captured`, as an instance of the original type too when
    possible."""
    cls = _dual_class(type(captured.ex))
    if cls is not None:
        try:
            try:
                exc = cls.__new__(cls, pid, captured)  # type: ignore[call-overload]
            except TypeError:
                # MemoryError's own __new__ refuses classes whose static base is not its own
                # ("is not safe"); BaseException's, which it uses for subclasses, does not.
                exc = Exception.__new__(cls, pid, captured)
            RemoteException.__init__(exc, pid, captured)
            # The original's own attributes too (`e.worker_id` of a ProcessExitedException).
            for name, value in getattr(captured.ex, "__dict__", {}).items():
                exc.__dict__.setdefault(name, value)
            return exc
        except Exception:
            pass
    return RemoteException(pid, captured)
