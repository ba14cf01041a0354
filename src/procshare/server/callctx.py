"""The current call inside the manager: its deadline and its caller.

Owns: the thread-local state that says, inside the manager, which client and
thread a method is running for, when its deadline expires, and which lock
table its primitives belong to.

Rules it keeps:
- Server side: the dispatcher sets `server.caller` and `server.deadline` before
  running a method; manager-hosted primitives read them through `caller()` and
  `wait_limit()` so that a blocking operation gives up at the deadline and
  raises `DeadlineExpired`, which the dispatcher turns into a TIMEOUT reply.
- Server-side code can `warn()`; the warning is raised in the client when the
  call returns (it travels in a WARNED reply).
- Deadlines are `time.monotonic()` values local to the process that holds them.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

__all__ = ["Caller", "DeadlineExpired", "caller", "wait_limit", "warn", "server_state"]


class Caller(NamedTuple):
    """Who a server-side call runs for."""
    client: str        # the client's identity (unique per process)
    pid: int           # the client's process id
    thread: int        # the client thread's ident
    thread_name: str   # the client thread's name

    def describe(self) -> str:
        return f"pid {self.pid} thread {self.thread_name!r}"


class DeadlineExpired(Exception):
    """Raised inside the manager when a call's deadline passes while it blocks."""


#: set by the server dispatcher for each call (per server thread)
server_state = threading.local()
_LOCAL_CALLER = Caller("local", 0, 0, "local")


def caller() -> Caller:
    """The client a server-side call runs for (a placeholder outside the server)."""
    c = getattr(server_state, "caller", None)
    if c is None:
        t = threading.current_thread()
        import os
        return Caller(f"local:{os.getpid()}", os.getpid(), t.ident or 0, t.name)
    return c


def warn(message: str, category: type[Warning]) -> None:
    """Inside the manager: have the client that made the current call see
    `warnings.warn(message, category)` when the call returns."""
    pending = getattr(server_state, "warnings", None)
    if pending is None:
        import warnings
        warnings.warn(message, category, stacklevel=2)
        return
    pending.append((category, message))


def wait_limit(timeout: float | None) -> tuple[float | None, bool]:
    """Combine a method's own `timeout` with the call's deadline.

    Returns `(seconds, by_deadline)`: how long the method may block (None for
    forever), and whether that limit comes from the call deadline.
    """
    deadline = getattr(server_state, "deadline", None)
    if deadline is None:
        return (None if timeout is None else max(timeout, 0.0)), False
    left = max(deadline - time.monotonic(), 0.0)
    if timeout is None or left < timeout:
        return left, True
    return max(timeout, 0.0), False
