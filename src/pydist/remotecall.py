"""The remote-call API: remotecall, remotecall_fetch, remotecall_wait, remote_do.

`remotecall` sends a CALL carrying the RRID of the Future it returns; the worker stores the
outcome under that RRID (so anybody holding the Future can fetch it from there) and pushes it
straight back to the caller: the value itself when it pickles small, else just "done".
A call whose target is this process runs here with no serialization at all.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, ParamSpec, Protocol, TypeVar, Union

from . import protocol, serialization
from .calls import call_fetch, connection, exited, pack, remote_do_internal, run_user_call, unpack_call
from .group import PGRP
from .refs import _ERROR, _PH_SENT, _VALUE, RRID, STORE, Future, _Cell, _unstarted, new_call_future, not_cancellable
from .transport import Connection, ConnectionClosed

__all__ = ["remotecall", "remotecall_fetch", "remotecall_wait", "remote_do"]

T = TypeVar("T")
P = ParamSpec("P")


class WorkerPoolLike(Protocol):
    """What the remote-call functions need of a worker pool (any `AbstractWorkerPool`)."""

    def _remotecall_fetch(self, f: Callable, args: tuple, kwargs: dict) -> Any: ...


#: Where a call runs: a process id, or a pool (then on one of its free workers).
Target = Union[int, WorkerPoolLike]

# A result whose pickle is at most this large (and has no out-of-band buffers) is pushed to
# the caller with the completion notice; a larger one waits on the worker for a fetch.
PUSH_LIMIT = 64 * 1024


def _target(id: Any) -> int:
    if isinstance(id, int) and not isinstance(id, bool):
        return id
    raise TypeError(f"expected a process id or a worker pool, got {id!r}")


def _pool(id: Any) -> Any:
    """`id` if it is a worker pool (anything with the pool call methods), else None."""
    return None if isinstance(id, int) else (id if hasattr(id, "_remotecall_fetch") else None)


def remotecall(f: Callable[P, T], id: Target, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Run `f(*args, **kwargs)` on process `id` (or a worker of pool `id`) and return a Future
    of its result at once.

    The call runs in its own thread on the worker; its outcome stays there until fetched
    (small results are pushed back at once). `f`, the arguments and the result are pickled
    (functions defined in `__main__` or interactively travel by value). Calls made in a
    quick loop may leave together (about 2 ms later at most, or as soon as this process
    waits for a result); calls to one worker start in the order they were made. Example::

        fut = remotecall(pow, 2, 3, 4)   # Future[int], on worker 2
        fut.fetch()                      # 81
    """
    pool = _pool(id)
    if pool is not None:
        return pool._remotecall(f, args, kwargs)
    pid = _target(id)
    if pid == PGRP.id:
        fut: Future[T] = Future(pid)
        fut._phase, fut._cancel_hook = _PH_SENT, not_cancellable  # it starts at once
        cell = STORE.lookup(fut.rrid, _Cell)
        threading.Thread(target=_run_here, args=(cell, f, args, kwargs),
                         name="pydist-local-call", daemon=True).start()
        return fut
    conn = connection(pid)
    fut = new_call_future(pid)
    chunks = pack(pid, protocol.CALL, (f, args, kwargs), a=fut.whence, b=fut.id, what=f)
    try:
        conn.send_soon(chunks)
    except ConnectionClosed:
        raise exited(pid) from None
    return fut


def run_into_future(fut: Future, f: Callable, args: tuple, kwargs: dict) -> None:
    """Run `f(*args, **kwargs)` here, in its own thread, as the call of `fut` (a Future owned
    here whose call was queued: see `refs.new_queued_future`)."""
    cell = STORE.lookup(fut.rrid, _Cell)

    def reply(ok: bool, value: Any) -> None:
        cell.set(ok, value)
        fut._complete(_VALUE if ok else _ERROR, value)

    threading.Thread(target=_run_here_into, args=(reply, f, args, kwargs),
                     name="pydist-local-call", daemon=True).start()


def _run_here_into(reply: Callable[[bool, Any], None], f: Callable, args: tuple,
                   kwargs: dict) -> None:
    outcome = run_user_call(f, args, kwargs, reply)
    if outcome is not None:
        reply(*outcome)


def _run_here(cell: _Cell, f: Callable, args: tuple, kwargs: dict) -> None:
    """A `remotecall` to this process, in its own thread: the outcome goes to the cell."""
    outcome = run_user_call(f, args, kwargs, cell.set)
    if outcome is not None:
        cell.set(*outcome)


def remotecall_fetch(f: Callable[P, T], id: Target, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `f(*args, **kwargs)` on process `id` (or a worker of pool `id`) and return its
    value: one round trip, the fastest way to call and wait.

    A failure raises a `RemoteException` (also an instance of the original exception type
    where Python allows, so ``except ZeroDivisionError`` works) with the remote traceback; a
    lost worker raises `ProcessExitedException`. Example::

        remotecall_fetch(os.getpid, 2)       # worker 2's OS pid
        remotecall_fetch(divmod, 3, 7, 2)    # (3, 1)
    """
    pool = _pool(id)
    if pool is not None:
        return pool._remotecall_fetch(f, args, kwargs)
    return call_fetch(_target(id), f, args, kwargs)


def remotecall_wait(f: Callable[P, T], id: Target, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Like `remotecall`, but return the Future only once the call has finished (raising
    its RemoteException if it failed)."""
    pool = _pool(id)
    if pool is not None:
        return pool._remotecall_wait(f, args, kwargs)
    return remotecall(f, id, *args, **kwargs).wait()


def remote_do(f: Callable[P, Any], id: Target, *args: P.args, **kwargs: P.kwargs) -> None:
    """Run `f(*args, **kwargs)` on process `id` and return at once, with no Future: nothing
    comes back, errors are printed (logged) on the worker. Calls from one process to one
    worker start in the order they were sent."""
    pool = _pool(id)
    if pool is not None:
        return pool._remote_do(f, args, kwargs)
    remote_do_internal(_target(id), f, args, kwargs)


# ==================================================================== worker side
def on_call(conn: Connection, msg: protocol.Message):
    rrid = RRID(msg.a, msg.b)
    cell = STORE.lookup(rrid, _Cell)  # in frame order: a later fetch or count finds it
    ok, call = unpack_call(msg)
    if not ok:
        return lambda: _finish(conn, rrid, cell, False, call)
    _unstarted[rrid] = cell  # until it starts, the caller may cancel it
    box = [call]

    def task() -> None:
        f, args, kwargs = box.pop()
        if _unstarted.pop(rrid, None) is None:
            return  # cancelled before it started (the cell says so)
        outcome = run_user_call(f, args, kwargs, functools.partial(_finish, conn, rrid, cell))
        del f, args, kwargs  # freed before the reply leaves (as in `calls.on_call_fetch`)
        if outcome is not None:
            _finish(conn, rrid, cell, *outcome)

    return task


def _finish(conn: Connection, rrid: RRID, cell: _Cell, ok: bool, value: Any) -> None:
    cell.set(ok, value)
    if conn.closed:
        return
    dest = conn.peer_pid if conn.peer_pid is not None else 0
    flags = 0 if ok else protocol.FLAG_ERROR
    body: bytes = b""
    try:
        body, buffers, context = serialization.dumps(value, dest=dest)
        if buffers or len(body) > PUSH_LIMIT:
            serialization.discard(context)  # kept here: references in it are not sent
            flags, body = protocol.FLAG_NOVALUE, b""
        elif context:
            serialization.run_after(context)
    except Exception:
        # Not picklable: say "done"; a fetch will then report why it cannot be sent.
        flags, body = protocol.FLAG_NOVALUE, b""
    try:
        conn.send_reply(protocol.encode_frame(protocol.PUSH, body, a=rrid.whence, b=rrid.id, flags=flags))
    except ConnectionClosed:
        pass

