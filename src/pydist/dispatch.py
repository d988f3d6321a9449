"""Message dispatch: every connection's frames go to the handler registered for their kind
(one dict lookup per frame), and a connection's loss to the process group.

The handlers live in the layers that own the messages (joining, calls, refs, remotecall);
`runtime` registers them, so that no module is wired by being imported.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from . import protocol
from .exceptions import ProtocolError
from .group import PGRP

log = logging.getLogger(__name__)

__all__ = ["HANDLER", "HANDLERS", "register_handler"]

# kind -> fn(conn, msg), run in the reading thread; it returns a callable to run
# concurrently (in the thread that gives up the reading role), or None.
HANDLERS: dict[int, Callable] = {}


class _Handler:
    """Dispatches each incoming frame to the handler registered for its kind."""

    def on_message(self, conn, msg: protocol.Message):
        handler = HANDLERS.get(msg.kind)
        if handler is None:
            log.warning("pydist: no handler for %s message", protocol.KIND_NAMES.get(msg.kind))
            return None
        return handler(conn, msg)

    def on_close(self, conn, exc: BaseException | None) -> None:
        pid = conn.peer_pid
        if isinstance(exc, ProtocolError):
            log.warning("process %d: dropped the connection to %s: %s", PGRP.id, conn.name, exc)
        else:
            log.debug("process %d: connection to %s closed%s", PGRP.id, conn.name,
                      f": {conn.lost_reason or exc}" if conn.lost_reason or exc else "")
        if pid is None:
            return
        if pid == 1 and not PGRP.is_master():
            # Our master is gone: a worker never outlives it.
            if not PGRP.shutdown.is_set():  # (with a reason, the print below says it)
                log.log(logging.INFO if conn.lost_reason else logging.WARNING,
                        "worker %d: the master is gone%s; exiting", PGRP.id,
                        f" (it {conn.lost_reason})" if conn.lost_reason else "")
            if conn.lost_reason and not PGRP.shutdown.is_set():
                print(f"pydist worker {PGRP.id}: the master {conn.lost_reason}; exiting",
                      file=sys.stderr, flush=True)
            PGRP.exit_code = 0 if PGRP.shutdown.is_set() else 1
            PGRP.shutdown.set()
            return
        w = PGRP.workers.get(pid)
        if w is not None and w.conn is conn:
            PGRP.deregister(pid, conn.lost_reason)


HANDLER = _Handler()


def register_handler(kind: int, fn: Callable) -> None:
    """Handle frames of `kind` with `fn(conn, msg)`, run in the reading thread; it returns a
    callable to run concurrently (in the thread that gives up the reading role), or None."""
    HANDLERS[kind] = fn
