"""The current call: its deadline and its caller, on both ends of the wire.

Owns: the thread-local state that says, inside the manager, which client and
thread a method is running for and when its deadline expires; and, inside a
client, the scoped default timeout set by `procshare.timeout(...)`.

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

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

__all__ = ["Caller", "DeadlineExpired", "caller", "wait_limit", "warn", "timeout",
           "scoped_timeout", "server_state"]


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


# -- client side ------------------------------------------------------------
_scope = threading.local()


def scoped_timeout() -> Any:
    """The timeout set by the innermost `timeout()` block in this thread, or a
    sentinel meaning none is set."""
    return getattr(_scope, "value", _UNSET)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


@contextlib.contextmanager
def timeout(seconds: float | None) -> Iterator[None]:
    """Bound every proxy call made in this thread inside the block.

    `seconds=None` means wait forever, even if an outer block or the proxy sets
    a limit.
    """
    if seconds is not None and (not isinstance(seconds, (int, float)) or math.isnan(seconds)
                                or seconds < 0):
        raise ValueError(f"timeout must be a non-negative number of seconds or None, "
                         f"not {seconds!r}")
    old = getattr(_scope, "value", _UNSET)
    _scope.value = seconds
    try:
        yield
    finally:
        _scope.value = old
