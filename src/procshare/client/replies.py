"""Replies: turning a reply that is not a plain value into what it means.

Owns: `CallTimeout` texts for a call, the exception a reply stands for
(`raise_reply`), the manager-side traceback attached as `__cause__`, and the
stdlib's `convert_to_error`.

Rules it keeps:
- A referent's exception keeps its type; the manager's traceback becomes its
  `__cause__` (a `RemoteTraceback`).
- A WARNED reply issues its warnings in the caller, then gives the value.
- A TIMEOUT reply means the manager gave up and nothing happened; a deadline
  that passed in the client means the call may still complete.
- The exception a reply stands for is raised without staying in a local of
  any frame it passes through: `raise_reply` drops its own, and every caller
  that holds the payload drops it in a `finally`.  Otherwise exception,
  traceback and frame make a cycle that keeps the caller's proxy and
  arguments alive until a full collection (test_lifetimes checks all the
  failures a caller can catch for procshare frames left in cycles).
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import CallTimeout, RemoteError, remote_serialization_error
from ..wire.kinds import Kind

__all__ = ["RemoteTraceback", "call_timeout", "raise_reply", "convert_to_error"]


class RemoteTraceback(Exception):
    """The manager-side traceback of an exception raised by a referent."""

    def __str__(self) -> str:
        return self.args[0]


def call_timeout(proxy: Any, meth: str, timeout: float | None, server_gave_up: bool,
                 detail: str = "", session: Any = None) -> CallTimeout:
    """The CallTimeout for `meth` on `proxy` (None for a manager operation)."""
    if session is None and proxy is not None:
        session = proxy._procshare_session
    pid = session.server_pid if session is not None else None
    where = f"the manager (pid {pid})" if pid else "the manager"
    what = f"manager operation {meth!r}" if proxy is None else (
        f"{meth}() on {proxy._token.typeid!r} object {proxy._id}")
    if server_gave_up:
        outcome = (f"{where} gave up at the deadline, so the call had no effect"
                   + (f" ({detail})" if detail else ""))
    else:
        outcome = (f"no reply came from {where} in time; the call may still complete "
                   "there. The proxy stays usable")
        state = _object_state(proxy)
        if state is not None and state.get("serial") and state.get("running"):
            patience = state.get("patience")
            outcome += (
                f". {state['running']}() is still running in the manager, and calls on "
                f"this {proxy._token.typeid!r} object run one at a time: " + (
                    f"the next ones wait up to {patience:g} s behind it, then run beside "
                    "it, as the stdlib runs every call (register the type with "
                    "serial=True to queue them until it returns)" if patience else
                    "the next ones queue behind it until it returns (each waits at most "
                    "until its own deadline)"))
    return CallTimeout(
        f"{what} did not finish within {timeout} s: {outcome}. Raise the limit "
        "(timeout=..., procshare.timeout(...), or call_timeout= on the manager), or find "
        "what blocks the call.", method=meth, timeout=timeout,
        may_complete=not server_gave_up, server_pid=pid)


def _object_state(proxy: Any) -> dict | None:
    """What the manager says the proxy's object is doing (None if it cannot say
    at once): asked only after a call timed out in the client."""
    if proxy is None:
        return None
    try:
        return proxy._procshare_session.control_call("object_state", proxy._id, timeout=0.5)
    except Exception:
        return None


def raise_reply(kind: int, payload: Any, proxy: Any, meth: str, timeout: float | None) -> Any:
    """Turn a non-RETURN reply into the exception it stands for and raise it
    (or, for a WARNED reply, issue the warnings and return the result)."""
    if kind == Kind.ERROR:
        remote_tb = getattr(payload, "_procshare_remote_tb", None)
        if remote_tb is not None:
            try:
                del payload._procshare_remote_tb
            except AttributeError:
                pass
            payload.__cause__ = RemoteTraceback(remote_tb)
        try:
            raise payload
        finally:
            del payload
    if kind == Kind.WARNED:
        result, issued = payload
        for category, message in issued:
            warnings.warn(message, category, stacklevel=4)
        return result
    if kind == Kind.TIMEOUT:
        raise call_timeout(proxy, meth, timeout, True, payload)
    if kind == Kind.UNSERIALIZABLE:
        raise remote_serialization_error(payload, meth)
    if kind == Kind.TRACEBACK:
        raise RemoteError(payload)
    raise ValueError(f"Unrecognized message type {kind!r}")


def convert_to_error(kind: str, result: Any) -> Exception:
    """stdlib-compatible: the exception for a `('#ERROR'|'#TRACEBACK'|...)` reply."""
    if kind == "#ERROR":
        return result
    if kind in ("#TRACEBACK", "#UNSERIALIZABLE"):
        if not isinstance(result, str):
            raise TypeError("Result {!r} (kind '{}') type is {}, not str".format(
                result, kind, type(result)))
        if kind == "#UNSERIALIZABLE":
            return RemoteError("Unserializable message: %s\n" % result)
        return RemoteError(result)
    return ValueError(f"Unrecognized message type {kind!r}")
