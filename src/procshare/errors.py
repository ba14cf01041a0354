"""Errors and warnings: every failure procshare reports, in one place.

Owns: the exception hierarchy and the text of its messages.

Rules it keeps:
- Each new error also subclasses what `multiprocessing.managers` raises today in
  the same situation, so existing `except` clauses keep working.
- Each message says what happened, where (object, method, argument, process) and
  what the user can do about it.
- Errors cross the wire as ordinary pickled exceptions; they must pickle with
  their arguments (hence the plain `__init__(self, message, **facts)` shape).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

__all__ = [
    "ProcshareError", "RemoteError", "NotExposedError", "CallTimeout", "ManagerCrashed",
    "SerializationError", "DeadlockError", "OwnerDiedWarning", "AuthenticationError",
]


class ProcshareError(Exception):
    """Base class of every error procshare raises itself."""

    def __init__(self, message: str = "", **facts: Any) -> None:
        super().__init__(message)
        self.facts = facts
        for key, value in facts.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple:
        return _rebuild_error, (type(self), self.args[0] if self.args else "", self.facts)


def _rebuild_error(cls: type, message: str, facts: dict) -> ProcshareError:
    return cls(message, **facts)


class RemoteError(Exception):
    """A failure inside the manager that is not an exception of the referent
    (kept for compatibility with `multiprocessing.managers.RemoteError`)."""

    def __str__(self) -> str:
        return "\n" + "-" * 75 + "\n" + str(self.args[0]) + "-" * 75


class NotExposedError(ProcshareError, RemoteError, AttributeError):
    """A proxy called a method its referent's type does not expose.

    The stdlib raises RemoteError here; this is also an AttributeError, which is
    what the mistake is."""

    __str__ = Exception.__str__


class CallTimeout(ProcshareError, TimeoutError):
    """A call did not finish by its deadline."""


class ManagerCrashed(ProcshareError, ConnectionError, EOFError):
    """The manager process has died or cannot be reached.

    Subclasses ConnectionError (BrokenPipeError, ConnectionRefusedError) and
    EOFError, which is what the stdlib raises in these cases.
    """


class SerializationError(ProcshareError, TypeError):
    """A value could not be serialized or deserialized."""


class DeadlockError(ProcshareError, RuntimeError):
    """Acquiring a manager-hosted lock would close a wait-for cycle."""


class AuthenticationError(ProcshareError, multiprocessing.AuthenticationError):
    """The two ends of a connection do not share the authkey
    (a `multiprocessing.AuthenticationError`, as the stdlib raises)."""


class OwnerDiedWarning(RuntimeWarning):
    """A lock was acquired after its previous owner died while holding it."""


#: address -> callable giving facts about a manager this process started
#: (exit code, signal, last log lines); filled in by `managers`
crash_reporters: dict[Any, Any] = {}


def manager_crashed(address: Any, cause: BaseException | None) -> ManagerCrashed:
    """Build the error for a manager at `address` that cannot be reached."""
    facts: dict[str, Any] = {"address": address}
    report = crash_reporters.get(address)
    detail = ""
    if report is not None:
        try:
            facts.update(report())
        except Exception:
            pass
    if facts.get("exitcode") is not None:
        code = facts["exitcode"]
        if code < 0:
            import signal
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            facts["signal"] = name
            detail = f" The manager process (pid {facts.get('pid')}) was killed by {name}."
        else:
            detail = f" The manager process (pid {facts.get('pid')}) exited with code {code}."
    elif facts.get("pid"):
        detail = f" The manager process has pid {facts['pid']}."
    lines = facts.get("log") or []
    tail = ("\nLast lines of the manager's log:\n  " + "\n  ".join(lines[-10:])) if lines else ""
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ManagerCrashed(
        f"the manager at {address!r} cannot be reached{why}.{detail} Objects it held are "
        "gone unless it is restarted; start a new manager (or reconnect once it is back) "
        "and create the objects again." + tail, **facts)
