"""Errors and warnings: every failure procshare reports, in one place.

Owns: the exception hierarchy and the text of its messages (the facts are
gathered elsewhere: `diagnose` finds the unserializable piece, `managers`
reports on the manager processes it started).

Rules it keeps:
- Each new error also subclasses what `multiprocessing.managers` raises today in
  the same situation, so existing `except` clauses keep working.  Where the
  stdlib's exception depends on the cause (TypeError or PicklingError or
  AttributeError for an unpicklable argument; ConnectionRefusedError or
  FileNotFoundError for a dead manager), the error is the subclass that matches
  the cause: `ManagerCrashed` raised for a refused connection is also a
  ConnectionRefusedError, and only then.
- Each message says what happened, where (object, method, argument, process) and
  what the user can do about it.
- Errors cross the wire as ordinary pickled exceptions; they must pickle with
  their arguments (hence the plain `__init__(self, message, **facts)` shape, and
  facts that are plain data).
"""

from __future__ import annotations

import collections
import errno
import multiprocessing
import multiprocessing.managers as _std_managers
import os
import pickle
import time
from typing import Any

__all__ = [
    "ProcshareError", "RemoteError", "NotExposedError", "MissingMethodError", "CallTimeout",
    "ObjectLost",
    "ManagerCrashed", "ManagerConnectionRefused", "ManagerSocketMissing",
    "ManagerConnectionReset", "ManagerBrokenPipe",
    "SerializationError", "ArgumentsNotSerializable", "LocalObjectNotSerializable",
    "ProcessLocalNotSerializable", "RemoteSerializationError", "ResultNotSerializable",
    "ArgumentsNotDeserializable", "SerializerMismatch", "MessageTooLarge",
    "BootstrapError", "DeadlockError", "OwnerDiedWarning", "AuthenticationError",
    "ManagerNotRunning", "ManagerStartFailed",
]


class ProcshareError(Exception):
    """Base class of every error procshare raises itself."""

    def __init__(self, message: str = "", **facts: Any) -> None:
        super().__init__(message)
        self.facts = facts
        for key, value in facts.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple:
        # facts are rebuilt from the arguments; anything else set on the error
        # (such as the manager-side traceback) travels as state
        extra = {k: v for k, v in self.__dict__.items() if k not in self.facts and k != "facts"}
        return (_rebuild_error, (type(self), self.args[0] if self.args else "", self.facts),
                extra or None)


def _rebuild_error(cls: type, message: str, facts: dict) -> ProcshareError:
    return cls(message, **facts)


class RemoteError(_std_managers.RemoteError):
    """A failure inside the manager that is not an exception of the referent:
    also the stdlib's `multiprocessing.managers.RemoteError`, so that code
    catching that one (a module that kept the stdlib's import) catches it."""

    def __str__(self) -> str:
        return "\n" + "-" * 75 + "\n" + str(self.args[0]) + "-" * 75


class NotExposedError(ProcshareError, RemoteError, AttributeError):
    """A proxy called a method its referent's type does not expose.

    The stdlib raises RemoteError here; this is also an AttributeError, which is
    what the mistake is."""

    __str__ = Exception.__str__


class MissingMethodError(ProcshareError, RemoteError, AttributeError):
    """A proxy called an exposed method that its referent does not have.

    The stdlib raises RemoteError here (the manager's AttributeError, as a
    traceback); this is also an AttributeError, which is what it is."""

    __str__ = Exception.__str__


def missing_method(error: BaseException, obj: Any, typeid: str, oid: str, meth: str,
                   where: str = "the manager") -> MissingMethodError | None:
    """The error for `meth`, exposed on `typeid`, if `error` (from calling it
    on `obj`) says `obj` has no such attribute; None for any other error (an
    AttributeError from inside a property or the method itself)."""
    if not (isinstance(error, AttributeError) and getattr(error, "name", None) == meth
            and getattr(error, "obj", None) is obj):
        return None
    return MissingMethodError(
        f"method {meth!r} of {type(obj).__name__} object (typeid {typeid!r}, id {oid}) is "
        f"exposed, but the object has no such attribute in {where} "
        f"({type(error).__name__}: {error}). Register {typeid!r} with exposed= naming only "
        "methods its objects have, or give them that method.",
        typeid=typeid, method=meth)


class CallTimeout(ProcshareError, TimeoutError):
    """A call did not finish by its deadline."""


# -- the manager cannot be reached ------------------------------------------------

class ManagerCrashed(ProcshareError, ConnectionError, EOFError):
    """The manager process has died or cannot be reached.

    Subclasses ConnectionError (BrokenPipeError, ConnectionResetError,
    ConnectionRefusedError) and EOFError, which is what the stdlib raises in
    these cases.  When the cause was one of the specific OSErrors below, the
    error raised is the matching subclass, so that `except
    ConnectionRefusedError:` (the usual "wait until the server is up" loop) and
    `except FileNotFoundError:` (a Unix socket that is gone) keep working.
    """

    def __str__(self) -> str:
        # an OSError with errno set would print "[Errno N] strerror": the message
        # is the explanation, and e.errno is there for code that checks it
        return str(self.args[0]) if self.args else ""


class ObjectLost(ManagerCrashed):
    """The manager restarted after a crash, and this object did not survive it
    (it was not durable).  A ManagerCrashed, so a ConnectionError and an
    EOFError: what the stdlib raises when its manager has gone away."""


class MethodRaisedExit(ProcshareError, EOFError):
    """A method raised SystemExit or KeyboardInterrupt in the manager.  The
    stdlib's connection thread dies of it and the caller gets EOFError (and a
    BrokenPipeError on its next call); procshare answers with this error, also
    an EOFError, and the connection and the object stay usable."""


def method_raised_exit(what: str, e: BaseException, outcome: str) -> MethodRaisedExit:
    """The error for user code that raised SystemExit or KeyboardInterrupt `e`
    in the manager during `what` (`outcome`: what became of the call)."""
    return MethodRaisedExit(
        f"{what} raised {type(e).__name__}{f'({e})' if str(e) else ''} in the manager "
        f"(pid {os.getpid()}); {outcome}. To get an error back as itself, raise an "
        "Exception there, not SystemExit or KeyboardInterrupt.", raised=type(e).__name__)


class ManagerConnectionRefused(ManagerCrashed, ConnectionRefusedError):
    """ManagerCrashed where the stdlib raises ConnectionRefusedError: nothing
    listens at the address (the manager died, or never ran there)."""


class ManagerSocketMissing(ManagerCrashed, FileNotFoundError):
    """ManagerCrashed where the stdlib raises FileNotFoundError: the manager's
    Unix socket file is gone (it shut down, or the address is wrong).

    Only this subclass is a FileNotFoundError, not every ManagerCrashed: a
    FileNotFoundError handler around file I/O must not swallow a dead manager
    that was reached over TCP or died mid-call."""


class ManagerConnectionReset(ManagerCrashed, ConnectionResetError):
    """ManagerCrashed where the stdlib raises ConnectionResetError."""


class ManagerBrokenPipe(ManagerCrashed, BrokenPipeError):
    """ManagerCrashed where the stdlib raises BrokenPipeError."""


class ManagerShutDownSocketMissing(ManagerSocketMissing, BrokenPipeError):
    """A manager shut down (its socket file is gone): where the stdlib raises
    FileNotFoundError (a new connection) or BrokenPipeError (the thread's
    connection from before)."""


class ManagerShutDownRefused(ManagerConnectionRefused, BrokenPipeError):
    """A manager shut down (nobody listens): where the stdlib raises
    ConnectionRefusedError (a new connection) or BrokenPipeError (the
    thread's connection from before)."""


#: after a shutdown: the cause's class, and the one of the connection from before
_SHUT_DOWN_CLASSES: dict = {ManagerSocketMissing: ManagerShutDownSocketMissing,
                            ManagerConnectionRefused: ManagerShutDownRefused}


_CRASH_CLASSES: tuple = (
    (ConnectionRefusedError, ManagerConnectionRefused),
    (FileNotFoundError, ManagerSocketMissing),
    (ConnectionResetError, ManagerConnectionReset),
    (BrokenPipeError, ManagerBrokenPipe),
)


# -- serialization ------------------------------------------------------------------

class SerializationError(ProcshareError, TypeError):
    """A value could not be serialized or deserialized.

    Facts (attributes): `method`, `direction` ("arguments" or "result"), `path`
    (e.g. ``args[1]['cfg'][1]``), `culprit` (a short description of the piece
    that failed), `serializer` and `alternatives` (installed serializers that
    would carry the value)."""


class ArgumentsNotSerializable(SerializationError, pickle.PicklingError):
    """The arguments of a call could not be serialized; nothing was sent and the
    connection stays usable.  Also a `pickle.PicklingError`, as pickle raises
    for functions and classes it cannot find by name."""


class LocalObjectNotSerializable(ArgumentsNotSerializable, AttributeError):
    """ArgumentsNotSerializable that is also an AttributeError: what pickle
    raises (before Python 3.14) for local functions and classes ("Can't pickle
    local object")."""


class ProcessLocalNotSerializable(ArgumentsNotSerializable, RuntimeError):
    """ArgumentsNotSerializable that is also a RuntimeError: what
    multiprocessing's own Lock, Semaphore, Queue, ... raise when pickled other
    than to a starting child process."""


class RemoteSerializationError(SerializationError, RemoteError):
    """The manager reported a serialization failure on its side (a
    `RemoteError`, as the stdlib raises there)."""

    __str__ = Exception.__str__


class ResultNotSerializable(RemoteSerializationError):
    """The result of a call could not be serialized in the manager.  The method
    did run there; the connection stays usable and the next call works."""


class ArgumentsNotDeserializable(RemoteSerializationError):
    """The manager could not deserialize the arguments of a call (typically a
    class or function it cannot import).  The method did not run."""


class SerializerMismatch(SerializationError):
    """The manager and this process use different serializers."""


class MessageTooLarge(ProcshareError, ValueError):
    """A call's message is over what the manager accepts (its
    `max_message_bytes=`).  Nothing was sent and the connection stays usable.

    Facts: `method`, `size` (bytes, with out-of-band buffers), `address` (the
    manager's), `path` and `culprit` (the largest argument, when one is)."""


def message_too_large(what: str, address: Any, size: int, problem: str, path: str,
                      culprit: str, method: Any = None, buffers: bool = False
                      ) -> MessageTooLarge:
    """The error for a call (`what`) whose message breaks the manager's limits
    (`buffers`: only its count of out-of-band buffers)."""
    largest = f"; the largest argument is {path} ({culprit})" if path else ""
    if buffers:
        advice = ("Send fewer, larger buffers (join small arrays into one), or the data "
                  "in several calls.")
    else:
        advice = ("Raise max_message_bytes= where the manager is created, or send the data "
                  "in smaller parts (a manager.SharedArray or manager.ndarray is not sent "
                  "at all: every process maps it).")
    return MessageTooLarge(
        f"{what} was not sent: its message to the manager at {address!r} is {size} bytes, "
        f"{problem}{largest}. The connection stays usable. {advice}",
        method=method, size=size, address=address, path=path, culprit=culprit)


class BootstrapError(ProcshareError, RuntimeError):
    """A manager was started while a child process was still importing its
    parent's main module (start methods spawn and forkserver).  The stdlib
    raises RuntimeError ("...bootstrapping phase...") here."""


class ManagerStartFailed(ProcshareError, EOFError):
    """The server of a manager being started failed before it served (the
    stdlib's start() raises EOFError then); `__cause__` is its error."""


def start_failed(manager: str, address: Any, error: BaseException,
                 initializer: bool = False) -> ManagerStartFailed:
    """The error for a server that raised `error` while starting (`initializer`:
    start() was given one, which may have raised it)."""
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        what = (f"another process listens at {address!r}: stop it, or give the manager "
                "another address (or none, for a fresh one)")
    elif (isinstance(error, OSError) and address is not None
          and error.errno in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.EACCES, errno.EPERM,
                              errno.ENAMETOOLONG)):
        what = f"check the address {address!r} (its host, its directory, its permissions)"
    elif initializer:
        what = ("its traceback is printed above (the server's stderr); if it came from the "
                "initializer given to start(), fix that function or its arguments")
    else:
        what = "its traceback is printed above (the server's stderr)"
    return ManagerStartFailed(
        f"the {manager} server could not start ({type(error).__name__}: {error}): {what}.",
        manager=manager, address=address)


class ManagerNotRunning(ProcshareError, multiprocessing.ProcessError):
    """The manager object was not started (or connected), or was shut down.

    What is raised is a subclass that is also what the stdlib raises for the
    same use: an AssertionError to make an object, a ValueError (no address
    yet), FileNotFoundError or ConnectionRefusedError (nobody listens there)
    to inspect the manager."""

    __str__ = Exception.__str__


class ManagerNotRunningAssertion(ManagerNotRunning, AssertionError):
    """To make an object: the stdlib's `assert` fails (AssertionError)."""


class ManagerNotRunningNoAddress(ManagerNotRunning, ValueError):
    """To inspect a manager that has no address yet: the stdlib's ValueError."""


class ManagerNotRunningNoSocket(ManagerNotRunning, FileNotFoundError):
    """To inspect it at a Unix socket nobody serves: the stdlib's FileNotFoundError."""


class ManagerNotRunningRefused(ManagerNotRunning, ConnectionRefusedError):
    """To inspect it at a TCP address nobody serves: the stdlib's ConnectionRefusedError."""


def not_running(manager: str, shut_down: bool, address: Any, inspect: bool = False
                ) -> ManagerNotRunning:
    """The error for using manager `manager` (a class name) at `address`
    before start()/connect() or after shutdown(): to make an object (the
    stdlib's AssertionError), or for an operation the stdlib sends on a
    connection of its own (`inspect`: its error to connect, since it just
    tries)."""
    if shut_down:
        message = (f"{manager} at {address!r} has shut down: objects can no longer be made "
                   "or inspected through it. Make a new manager (a manager object starts "
                   "once).")
    else:
        message = (f"{manager} is not running: call start(), or connect() to a running "
                   "manager, before making or inspecting objects through it.")
    if not inspect:
        cls: type[ManagerNotRunning] = ManagerNotRunningAssertion
    elif address is None:
        cls = ManagerNotRunningNoAddress
    elif isinstance(address, str) and not address.startswith("\0"):
        cls = ManagerNotRunningNoSocket     # (a socket file: gone)
    else:
        cls = ManagerNotRunningRefused
    return cls(message, manager=manager, address=address)


class DeadlockError(ProcshareError, RuntimeError):
    """Acquiring a manager-hosted lock would close a wait-for cycle."""


class AuthenticationError(ProcshareError, multiprocessing.AuthenticationError):
    """The two ends of a connection do not share the authkey
    (a `multiprocessing.AuthenticationError`, as the stdlib raises)."""


class OwnerDiedWarning(RuntimeWarning):
    """A lock was acquired after its previous owner died while holding it."""


# -- serialization messages ---------------------------------------------------------

def _names(items: list) -> str:
    quoted = [repr(a) for a in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _advice(alternatives: list, serializer: str, culprit: str, hint: str) -> str:
    if alternatives:
        first = alternatives[0]
        plural = "s" if len(alternatives) > 1 else ""
        text = f" The installed serializer{plural} {_names(alternatives)} would carry it: "
        if first == "pickle":
            text += (f"create the manager with serializer='pickle' instead of {serializer!r} "
                     "(but pickle runs code when it loads: use it between trusted processes "
                     "only).")
        else:
            text += (f"create the manager with serializer={first!r} (both ends need it "
                     f"installed), or register this type with serializer={first!r}.")
        return text + (f" {hint}" if hint else "")
    if hint:
        return " " + hint
    return (f" No installed serializer can carry {culprit}: send plain data that describes "
            "it instead, or keep it in the manager and share a proxy to it.")


def arguments_not_serializable(cause: BaseException, what: str, serializer: str, path: str,
                               culprit: str, alternatives: list, hint: str = "",
                               method: str | None = None,
                               error: str | None = None) -> ArgumentsNotSerializable:
    """The error for arguments that could not be serialized (nothing was sent).
    It is also an instance of the serializer's own error's type (what the
    stdlib lets through): an `except ValueError` or `except RecursionError`
    around a call still catches it."""
    cls: type = ArgumentsNotSerializable
    if isinstance(cause, AttributeError):
        cls = LocalObjectNotSerializable
    elif type(cause) is RuntimeError:
        cls = ProcessLocalNotSerializable
    cls = _also_a(cls, type(cause))
    error = error or f"{type(cause).__name__}: {cause}"
    err = cls(
        f"the arguments of {what} could not be serialized with {serializer!r}: "
        f"{path} -> {culprit} ({error}). Nothing was sent; the proxy stays usable."
        + _advice(alternatives, serializer, culprit, hint),
        method=method, direction="arguments", path=path, culprit=culprit,
        serializer=serializer, alternatives=list(alternatives), error=error)
    if cls is not ArgumentsNotSerializable:
        # the cause's own plain attributes (an error code, say) for code that
        # reads them; plain values only, so the error still pickles
        for name, value in getattr(cause, "__dict__", {}).items():
            if type(value) in _PLAIN and not hasattr(err, name):
                setattr(err, name, value)
        if isinstance(cause, OSError):      # (its fields live outside __dict__)
            err.errno, err.strerror, err.filename = cause.errno, cause.strerror, cause.filename
    return err


#: the attribute values `arguments_not_serializable` copies from its cause
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


#: (error class, the cause's type) -> a class that is both (`_also_a`)
_ALSO: dict[tuple[type, type], type] = {}


def _also_a(cls: type, cause: type) -> type:
    """`cls`, or a subclass of `cls` that is also a `cause` (made once per
    pair; `cls` itself if `cause` cannot be a base beside it)."""
    if issubclass(cls, cause) or not issubclass(cause, Exception):
        return cls
    both = _ALSO.get((cls, cause))
    if both is None:
        try:
            both = type(cls.__name__, (cls, cause), {
                "__module__": cls.__module__, "__doc__": cls.__doc__,
                # the message as written (KeyError's own str() would quote it, a
                # cause's own repr may read attributes this one does not have)
                "__str__": Exception.__str__, "__repr__": Exception.__repr__,
                "__reduce__": _reduce_also})
        except TypeError:       # (two incompatible layouts, a final class)
            both = cls
        both = _ALSO.setdefault((cls, cause), both)
    return both


def _reduce_also(self: ProcshareError) -> tuple:
    """Pickle a `_also_a` class as the pair it was made from: its own class
    has no name to import."""
    _fn, (_cls, message, facts), extra = ProcshareError.__reduce__(self)
    cls, cause = type(self).__bases__
    return (_rebuild_also, (cls, cause, message, facts), extra)


def _rebuild_also(cls: type, cause: type, message: str, facts: dict) -> ProcshareError:
    return _also_a(cls, cause)(message, **facts)


def result_not_serializable_text(what: str, serializer: str, path: str, culprit: str,
                                 error: str, alternatives: list, hint: str = "") -> str:
    """The text the manager sends back for a result it could not serialize."""
    return (f"the result of {what} could not be serialized with {serializer!r} in the "
            f"manager: {path} -> {culprit} ({error}). The method did run; the connection "
            "stays usable." + _advice(alternatives, serializer, culprit, hint)
            + " Or return plain data from the method.")


def result_too_large_text(what: str, size: int, problem: str, pid: int) -> str:
    """The text of an UNSERIALIZABLE reply for a result too large for one message."""
    return (f"the result of {what} in the manager (pid {pid}) is {size} bytes, {problem}: "
            "one message cannot carry it. The method did run; the connection stays usable. "
            "Return the data in smaller parts, or keep it in a manager.SharedArray or "
            "manager.ndarray, which every process maps without a message.")


def arguments_not_deserializable_text(serializer: str, error: str, pid: int) -> str:
    """The text the manager sends back for a request it could not deserialize."""
    return (f"the manager (pid {pid}) could not deserialize the arguments with "
            f"{serializer!r} ({error}), so the method did not run. Classes and functions "
            "sent to the manager must be importable there by the same name: define them "
            "at module level in a module the manager process can import (not in a "
            "script's __main__ that the manager did not run), or use "
            "serializer='cloudpickle', which sends them by value.")


def remote_serialization_error(payload: Any, method: str | None) -> RemoteSerializationError:
    """The error for an UNSERIALIZABLE reply: `payload` is `(message, facts)`
    (or, from older managers, the message alone)."""
    if isinstance(payload, (tuple, list)) and len(payload) == 2:
        message, facts = payload
        facts = dict(facts or {})
    else:
        message, facts = str(payload), {}
    direction = facts.setdefault("direction", "result")
    if method and not facts.get("method"):
        facts["method"] = method
    cls = ArgumentsNotDeserializable if direction == "arguments" else ResultNotSerializable
    if direction == "arguments" and method:
        message = f"{method}(): {message}"
    return cls(message, **facts)


def serializer_mismatch(address: Any, mine: str, theirs: str, reason: str = "") -> SerializerMismatch:
    return SerializerMismatch(
        f"serializer mismatch: the manager at {address!r} uses {theirs!r} but this process "
        f"connects with {mine!r}{' (' + reason + ')' if reason else ''}. Both ends must use "
        "the same serializer: pass the same serializer= to the manager that starts the "
        "server and to the one that connects (and register the same custom serializers "
        "in both processes).",
        address=address, client_serializer=mine, manager_serializer=theirs)


# -- the manager cannot be reached --------------------------------------------------

#: address -> callable giving facts about a manager this process started
#: (pid, exit code, manager class, last log lines); filled in by `managers`
crash_reporters: dict[Any, Any] = {}

#: address -> facts about a manager shut down: by this process, or by another as
#: its STOPPING frame said (newest last; forgotten when a new manager answers there)
shut_down_managers: collections.OrderedDict = collections.OrderedDict()
_SHUT_DOWN_KEEP = 256


def note_shut_down(address: Any, manager: str, pid: int | None, by: int | None = None,
                   when: str | None = None, why: str | None = None) -> None:
    """Remember that process `by` (default: this one) shut down the manager at
    `address` (at `when`, default now), or, with `why`, that the manager said
    it stopped for good for that reason.  Told by another process (the
    manager's STOPPING frame), it is said whatever this process knew of it;
    a stop for a reason is not said where this process can tell more (it
    started the manager: `crash_reporters`)."""
    shut_down_managers.pop(address, None)
    if by is not None and by != os.getpid():
        crash_reporters.pop(address, None)     # (inherited from the starting process)
    shut_down_managers[address] = {"manager": manager, "pid": pid,
                                   "here": by is None and why is None,
                                   "by": os.getpid() if by is None else by, "why": why,
                                   "when": when or time.strftime("%H:%M:%S")}
    while len(shut_down_managers) > _SHUT_DOWN_KEEP:
        shut_down_managers.popitem(last=False)


def _signal_name(number: int) -> str:
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_SIGNAL_CAUSES = {
    "SIGKILL": ("Something outside procshare killed it: the kernel's OOM killer (check "
                "`dmesg`), a `kill -9`, or a process supervisor."),
    "SIGTERM": "Something asked it to stop: a `kill`, a process supervisor, or a shutdown.",
    "SIGSEGV": ("It crashed in native code (a C extension used by a shared object?); "
                "the log below ends with the Python traceback of the crash."),
    "SIGBUS": "It crashed in native code; the log below ends with the traceback.",
    "SIGABRT": ("It aborted (a failed assertion in native code?); the log below ends with "
                "the traceback."),
}


def manager_crashed(address: Any, cause: BaseException | None,
                    reached_before: bool = False) -> ManagerCrashed:
    """Build the error for a manager at `address` that cannot be reached.

    The class matches the cause (see `ManagerCrashed`); the message says whether
    the manager was shut down by this process, killed by a signal or exited, and
    ends with the last lines of its log when this process started it.  A
    manager this process `reached_before` that is not there any more is also
    a BrokenPipeError (`_SHUT_DOWN_CLASSES`), as the stdlib's calls on their
    connections from before raise, whoever shut it down."""
    cls: type = ManagerCrashed
    for base, sub in _CRASH_CLASSES:
        if isinstance(cause, base):
            cls = sub
            break
    if reached_before:
        cls = _SHUT_DOWN_CLASSES.get(cls, cls)
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    facts: dict[str, Any] = {"address": address}
    if cause is not None:
        facts["cause"] = f"{type(cause).__name__}: {cause}"
    if isinstance(cause, OSError) and cause.errno is not None:
        # code written for the stdlib checks e.errno (ECONNREFUSED, ENOENT, ...)
        facts["errno"], facts["strerror"] = cause.errno, cause.strerror

    gone = shut_down_managers.get(address)
    if gone is not None and address not in crash_reporters:
        by = ("by this process" if gone.get("here")
              else f"by process {gone['by']}")
        facts.update(shut_down=True, pid=gone["pid"])
        cls = _SHUT_DOWN_CLASSES.get(cls, cls)
        if gone.get("why"):
            return cls(
                f"the {gone['manager']} at {address!r} stopped for good at {gone['when']}: "
                f"{gone['why']}, so this proxy cannot be used any more. Its objects are gone "
                "and nothing restarts it: start a manager there again and create the objects "
                "again.", **facts)
        return cls(
            f"the {gone['manager']} at {address!r} was shut down {by} at {gone['when']} "
            f"(manager.shutdown(), or the end of its `with` block), so this proxy cannot be "
            f"used any more{why}. Its objects are gone. Keep the manager running until "
            "every process is done with its proxies, or create the objects again on a "
            "running manager.", **facts)

    report = crash_reporters.get(address)
    if report is not None:
        try:
            facts.update(report())
        except Exception:
            pass
    who = f"the {facts['manager']}" if facts.get("manager") else "the manager"
    pid = f" (pid {facts['pid']})" if facts.get("pid") else ""
    code = facts.get("exitcode")
    if facts.get("shut_down_request"):
        what = (f"{who} at {address!r}{pid} was shut down by a client's `shutdown` request "
                f"(`dispatch(conn, None, 'shutdown')`){why}, and nothing restarts it.")
    elif code is not None and code < 0:
        facts["signal"] = _signal_name(-code)
        what = (f"{who} at {address!r}{pid} was killed by {facts['signal']}{why}. "
                + _SIGNAL_CAUSES.get(facts["signal"], ""))
    elif code is not None:
        what = f"{who} at {address!r}{pid} exited with code {code}{why}."
    elif facts.get("supervisor_exit"):
        what = (f"{who} at {address!r}{pid} cannot be reached{why}: its supervisor "
                f"process ({facts['supervisor_exit']}) is gone, so the server stopped and "
                "nothing restarts it.")
    elif report is not None and facts.get("alive"):
        what = (f"{who} at {address!r}{pid} is still running but cannot be reached{why}; "
                "it may be overloaded, or it closed this connection.")
    elif report is None and isinstance(cause, (ConnectionRefusedError, FileNotFoundError)):
        # not a manager this process started, and nothing listens there: it may
        # never have run, so say nothing about lost objects
        return cls(
            f"no manager is listening at {address!r}, so it cannot be reached{why}. "
            "Check the address (and, for "
            "TCP, the port), and that the manager was started (manager.start(), or "
            "get_server().serve_forever()) before this process connects; if it was "
            "running, it has exited.", **facts)
    else:
        what = (f"{who} at {address!r} cannot be reached{why}: it has crashed or shut "
                "down, or nothing ever listened at this address.")
    lines = facts.get("log") or []
    tail = ("\nLast lines of the manager's log:\n  " + "\n  ".join(lines[-10:])) if lines \
        else ""
    if facts.get("shut_down_request"):
        return cls(f"{what} Its objects are gone: start a manager again and create the "
                   "objects again." + tail, **facts)
    return cls(
        f"{what} Objects it held are gone unless it is restarted; start a new manager (or "
        "reconnect once it is back) and create the objects again." + tail, **facts)


def bootstrap_error(manager: str) -> BootstrapError:
    """A manager started while a spawned child imports the main module."""
    return BootstrapError(
        f"{manager}.start() was called while this process was still starting up: it is a "
        "child process (start method 'spawn' or 'forkserver') that imports its parent's "
        "main module, and that module starts a manager at import time. This is the "
        "stdlib's \"bootstrapping phase\" error: every child would start yet another "
        "manager. Move the code that starts managers and processes under\n\n"
        "    if __name__ == \"__main__\":\n        main()\n\n"
        "and keep only definitions (classes, functions, register() calls) at module level.",
        manager=manager)


def manager_died_starting(manager: str, pid: int | None, exitcode: int, start_method: str,
                          log: list) -> ManagerCrashed:
    """The manager's server process died before it reported its address."""
    how = (f"was killed by {_signal_name(-exitcode)}" if exitcode < 0
           else f"exited with code {exitcode}")
    hint = ""
    if start_method in ("spawn", "forkserver") and exitcode == 1:
        hint = (f" With the {start_method!r} start method the most common cause is a manager "
                "(or a Process) started at import time: the server process imports the main "
                "module, which starts another one (a BootstrapError, the stdlib's "
                "\"bootstrapping phase\" error). Put that code under "
                "`if __name__ == \"__main__\":`.")
    tail = ("\nLast lines of the manager's log:\n  " + "\n  ".join(log[-10:])) if log else ""
    return ManagerCrashed(
        f"the {manager} server process (pid {pid}) {how} before it was ready; its error "
        f"is printed above (on its stderr).{hint}" + tail,
        manager=manager, pid=pid, exitcode=exitcode, log=list(log))


def object_lost(typeid: str, ident: str, address: Any, incarnation: int,
                restarted_at: float | None, method: str) -> ObjectLost:
    """The error for a call on an object the manager lost when it restarted."""
    when = (time.strftime("%H:%M:%S", time.localtime(restarted_at))
            if restarted_at else "since")
    how = ""
    report = crash_reporters.get(address)
    if report is not None:
        try:
            last = report().get("last_exit")
        except Exception:
            last = None
        if last:
            how = f" (its server {last})"
    return ObjectLost(
        f"{method}() on {typeid!r} object {ident} failed: the manager at {address!r} "
        f"crashed{how} and was restarted {when} (restart {incarnation}), and this object "
        "was lost with it (only durable objects survive a restart). Create it again on "
        "the restarted manager, which is serving, or make it durable "
        f"(manager.{typeid}(..., durable=True), or register(..., durable=...)) so that "
        "it survives the next crash.", typeid=typeid, id=ident, address=address,
        restart=incarnation)
