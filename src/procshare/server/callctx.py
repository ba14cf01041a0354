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
- A primitive about to block calls `wait_limit()` first; that also takes its
  connection out of the server's `working` set, so that other connections
  may busy-poll while it waits, and writes the replies its connection holds
  back (`Channel.send_reply`), so that they do not wait with it: never
  blocking on the socket (its caller may hold the primitive's own lock), the
  channel's watch writes what the socket did not take.
- A cancelled call (`CallState.cancel`) makes a blocking primitive give up
  with `Cancelled` having taken nothing, and the cancel is answered once it
  has (up to `CANCEL_WAIT`): an interrupted `Condition.wait` holds its lock
  again before the client's next call can run; primitives check `check_cancelled`
  every time they wake, and register a `waker` while they block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Caller", "DeadlineExpired", "Cancelled", "CallState", "caller", "wait_limit", "warn",
           "server_state", "current_call", "check_cancelled"]


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
    working = getattr(server_state, "working", None)
    if working is not None:
        ch = server_state.channel
        if working:     # about to block: this thread is no longer working (see spin)
            working.discard(ch)
        if ch.held:     # replies held back (pipelined calls) go before it waits:
            ch.flush_nowait()   # what the socket takes; the watch writes the rest
    if timeout is not None and timeout != timeout:
        timeout = 0.0       # NaN: threading's waits return at once
    deadline = getattr(server_state, "deadline", None)
    if deadline is None:
        return (None if timeout is None else max(timeout, 0.0)), False
    left = max(deadline - time.monotonic(), 0.0)
    if timeout is None or left < timeout:
        return left, True
    return max(timeout, 0.0), False


# -- cancellation ---------------------------------------------------------------------
class Cancelled(DeadlineExpired):
    """Raised inside the manager when the client abandoned the call (Ctrl-C, an
    exception, an asyncio cancel) or its process went away: nobody awaits it.
    Like a deadline, it means the call gave up and took nothing."""


#: the longest `CallState.cancel` waits for a woken call to give up (it may wait
#: for a lock that another call holds)
CANCEL_WAIT = 1.0
#: how long a cancel waits for running code that cannot be woken to finish
FINISH_WAIT = 0.02


class CallState:
    """The calls of one server connection, for cancellation.

    One per connection, reused for each call: `rid` is the request running
    (or last run); `done_rid` the last one whose reply is made; `cancel_rid`
    the last one the client cancelled (a cancel can arrive before its call is
    read: that call then does not run); `waker`, set by a blocking primitive
    while it waits, wakes it so it sees the cancel at once."""

    __slots__ = ("rid", "done_rid", "cancel_rid", "waker")

    def __init__(self) -> None:
        self.rid = 0
        self.done_rid = 0
        self.cancel_rid = -1
        self.waker: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_rid == self.rid

    def cancel(self, rid: int | None = None) -> str:
        """Cancel request `rid` (None: whatever runs now).  Returns "done" (its
        reply is made), "cancelled" (it was waiting and gives up now), "not
        started" (it will not run) or "running" (running code that cannot be
        interrupted: it completes)."""
        if rid is None:
            rid = self.rid
        if self.done_rid >= rid:
            return "done"
        self.cancel_rid = rid
        if self.rid < rid:
            return "not started"
        waker = self.waker
        if waker is not None:
            waker()
            # answer once the call has given up (a condition's wait has taken its
            # lock back), so that the client's next call cannot overtake it
            self._wait_done(rid, CANCEL_WAIT)
            return "cancelled"
        # running code that does not wait: it may be about to finish
        return "done" if self._wait_done(rid, FINISH_WAIT) else "running"

    def _wait_done(self, rid: int, limit: float) -> bool:
        """Poll (at most `limit` s) while request `rid` runs without a reply;
        True once its reply is made."""
        end = time.monotonic() + limit
        while self.done_rid < rid and self.rid == rid and time.monotonic() < end:
            time.sleep(0.0005)
        return self.done_rid >= rid


def current_call() -> CallState | None:
    """The call this server thread runs (None outside a server call)."""
    return getattr(server_state, "call", None)


def check_cancelled(call: CallState | None, what: str) -> None:
    if call is not None and call.cancel_rid == call.rid:
        raise Cancelled(f"{what}: the client abandoned the call; it took nothing")
