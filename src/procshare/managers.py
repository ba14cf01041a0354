"""Managers: the drop-in replacement for `multiprocessing.managers`.

Owns: `BaseManager` (start, connect, register, shutdown), `SyncManager` and
its registered types, `SharedMemoryManager`, and every other public name of
the stdlib module, so that `import procshare.managers as managers` works
wherever `multiprocessing.managers` did.

Rules it keeps:
- Same signatures, states and error types as the stdlib.  New behaviour comes
  as new keyword-only arguments (`call_timeout=`, `serial=`) and new members
  (`pid`).
- `start()` makes one child process with `ctx.Process`: the supervisor
  (`supervisor`), which forks the server and restarts it; the starting process
  runs no thread for it.  Or the server runs in the caller's process with
  `get_server().serve_forever()`.
- A subclass may override `_run_server` and `_finalize_manager` with the
  stdlib's signatures: they get the stdlib's arguments, and procshare's own
  shutdown steps run around such a finalizer (`_finalize_overridden`).
"""

from __future__ import annotations

import array
import functools
import logging
import operator
import os
import queue  # noqa: F401  (the stdlib module has this name, and the next few)
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import types  # noqa: F401
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from multiprocessing import (
    get_all_start_methods,
    get_context,
    pool,  # noqa: F401
    process,
    reduction,
    util,
)
from multiprocessing.context import ProcessError, get_spawning_popen  # noqa: F401
from os import getpid  # noqa: F401
from traceback import format_exc  # noqa: F401
from typing import Any

from . import errors
from .client import session as client
from .client import sharedarray as shared_arrays
from .client.proxy import (  # noqa: F401  (the stdlib module has all these names)
    AcquirerProxy,
    ArrayProxy,
    AutoProxy,
    BarrierProxy,
    BaseListProxy,
    BasePoolProxy,
    BaseProxy,
    BaseSetProxy,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    MakeProxyType,
    NamespaceProxy,
    PoolProxy,
    RebuildProxy,
    SetProxy,
    ValueProxy,
    _BaseDictProxy,
    convert_to_error,
    raise_reply,
    takes_attributes,
)
from .client.proxy import adopting_proxy as _adopting_proxy
from .errors import RemoteError  # noqa: F401  (re-exported, as in the stdlib)
from .server import primitives
from .server.durables import UNNAMED_KEY, durable_option
from .server.journal import JournalError, check_state_dir
from .server.leases import GRACE as LEASE_GRACE
from .server.server import (  # noqa: F401
    FRAME_TIMEOUT,
    Server,
    TypeSpec,
    all_methods,
    public_methods,
)
from .server.sharedarray import SharedBlock
from .stdtypes import Array, Namespace, Value, create_takes_durable
from .supervisor import (
    SHUT_DOWN_EXIT,
    StateFile,
    Supervisor,
    SupervisorView,
    check_policy,
    describe_exit,
    leave_shut_down_mark,
)
from .transport import channel as transport
from .transport.addresses import cleanup_address
from .transport.processes import ProcessHandle
from .wire import serializers
from .wire.frames import DEFAULT_LIMITS, Limits
from .wire.kinds import Kind
from .wire.records import Token

try:
    from multiprocessing import shared_memory
except ImportError:  # pragma: no cover
    HAS_SHMEM = False
else:
    HAS_SHMEM = True

__all__ = ["BaseManager", "SyncManager", "BaseProxy", "Token"]   # (+ SharedMemoryManager)

# names the stdlib's module has (its imports), for code that reaches them through it
connection = mp_connection
if sys.version_info < (3, 11):
    view_type = type({}.values())       # (a loop variable the 3.10 module leaves behind)

def reduce_array(a: array.array) -> tuple:
    return array.array, (a.typecode, a.tobytes())


def rebuild_as_list(obj: Any) -> tuple:
    return list, (list(obj),)


# like the stdlib: dict views travel as lists
#: Python 3.10's multiprocessing.managers has this public name (3.11 deleted it)
view_types = [type(getattr({}, name)()) for name in ("items", "keys", "values")]
for _view_type in view_types:
    reduction.register(_view_type, rebuild_as_list)
reduction.register(array.array, reduce_array)
del _view_type
if sys.version_info >= (3, 11):
    del view_types


#: serializer name -> (listener type, connect function), as in the stdlib
listener_client = {name: (transport.Listener, functools.partial(client.Client, serializer=name))
                   for name in ("pickle", "xmlrpclib")}


def dispatch(c: Any, id: Any, methodname: str, args: tuple = (),
             kwds: dict = {}) -> Any:  # noqa: B006
    """Send a request on connection `c` and return the result (stdlib-compatible).
    `c` is a procshare connection, or any object with the stdlib's `send()` and
    `recv()` (a `multiprocessing.connection.Connection`, say), which gets the
    stdlib's messages: `(id, methodname, args, kwds)`, then `(kind, result)`."""
    if not hasattr(c, "call"):
        c.send((id, methodname, args, kwds))
        kind, result = c.recv()
        if kind == "#RETURN":
            return result
        try:
            raise convert_to_error(kind, result)
        finally:
            result = None   # the exception raised must not keep itself through this frame
    kind, result = c.call(id, methodname, args, kwds, None)
    if kind == Kind.RETURN:
        return result
    try:
        return raise_reply(kind, result, None, methodname, None)
    finally:
        result = None   # the exception raised must not keep itself through this frame


class State:
    __slots__ = ["value"]
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2


class ProcessLocalSet(set):
    """A set that is emptied in a forked child."""

    def __init__(self) -> None:
        util.register_after_fork(self, lambda obj: obj.clear())

    def __reduce__(self) -> tuple:
        return type(self), ()


#: control operations the stdlib makes on a connection of their own, with no
#: state check first: used before start or after shutdown, they fail to connect
_CONNECTING_OPS = frozenset({"number_of_objects", "debug_info", "track_segment",
                             "list_objects", "clients", "locks", "server_info"})


def _state_error(state: State, what: str = "server") -> ProcessError:
    if state.value == State.STARTED:
        return ProcessError(f"Already started {what}")
    if state.value == State.SHUTDOWN:
        return ProcessError("Manager has shut down")
    return ProcessError(f"Unknown state {state.value!r}")


class BaseManager:
    """Base class for managers.

    The stdlib's arguments, plus procshare's keyword-only options:
    `shutdown_timeout`, `call_timeout` (the default deadline of every call),
    `max_message_bytes` and `frame_timeout` (what a peer may send, and how
    long it may stall inside a frame), `lease_grace` (how long a client on
    another host may stay disconnected before it counts as dead), and
    `restart="on-failure"|"never"`, `max_restarts`, `restart_window` (what the
    supervisor does when the server process of a started manager dies), and
    `state_dir` / `fsync` (where durable objects keep their journal, and
    whether its commits survive power loss, `"full"`, or only crashes of the
    process, `"normal"`).  Without `state_dir`, durable objects live in a
    private directory removed at shutdown: they survive crashes of the manager
    process, not of the program.
    """

    _registry: dict = {}
    _Server = Server

    def __init__(self, address: Any = None, authkey: bytes | None = None,
                 serializer: str = "pickle", ctx: Any = None, *,
                 shutdown_timeout: float = 1.0, call_timeout: float | None = None,
                 max_message_bytes: int | None = None,
                 frame_timeout: float | None = FRAME_TIMEOUT,
                 lease_grace: float = LEASE_GRACE, restart: str = "on-failure",
                 max_restarts: int = 5, restart_window: float = 60.0,
                 state_dir: str | os.PathLike | None = None, fsync: str = "normal") -> None:
        if authkey is None:
            authkey = process.current_process().authkey
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        client.get_serializer(serializer)   # an unknown one fails here, as in the stdlib
        self._serializer = serializer
        self._Listener = transport.Listener
        self._Client = functools.partial(client.Client, serializer=serializer)
        self._ctx = ctx or get_context()
        self._shutdown_timeout = shutdown_timeout
        self._call_timeout = call_timeout
        self._process: Any = None
        self._start_called = False      # (join() before start() is an AttributeError)
        check_policy(restart, max_restarts, restart_window)
        self._restart, self._max_restarts = restart, max_restarts
        self._restart_window = restart_window
        limits = DEFAULT_LIMITS if max_message_bytes is None else Limits(
            max_body=min(max_message_bytes, DEFAULT_LIMITS.max_body), max_frame=max_message_bytes)
        #: what the server process is built with, besides the stdlib's arguments
        if fsync not in ("normal", "full"):
            raise ValueError(f"fsync must be 'normal' or 'full', not {fsync!r}")
        self._server_options = {"limits": limits, "frame_timeout": frame_timeout,
                                "lease_grace": lease_grace, "fsync": fsync}
        if state_dir is not None:
            self._server_options["state_dir"] = os.fspath(state_dir)

    # -- server lifecycle ---------------------------------------------------------------
    def get_server(self) -> Server:
        """Return a server with `serve_forever()` and `address`, to run in this process."""
        if self._state.value != State.INITIAL:
            raise _state_error(self._state)
        server = self._Server(self._registry, self._address, bytes(self._authkey),
                              self._serializer, **self._server_options)
        server.manager_name = type(self).__name__
        return server

    def connect(self) -> None:
        """Connect this manager object to a running server."""
        client.get_session(self._address, bytes(self._authkey), self._serializer) \
            .control_call("dummy")
        self._state.value = State.STARTED

    def start(self, initializer: Any = None, initargs: tuple = ()) -> None:
        """Spawn a server process for this manager object, supervised by this process
        (see `restart=`): a server that dies is restarted on the same address."""
        if self._state.value != State.INITIAL:
            raise _state_error(self._state)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._start_called = True
        if getattr(process.current_process(), "_inheriting", False):
            # a spawned child importing its parent's main module, which starts a
            # manager at import time (the stdlib's "bootstrapping phase" error)
            raise errors.bootstrap_error(type(self).__name__)
        name = type(self).__name__
        state_dir = self._server_options.get("state_dir")
        if state_dir is not None:
            check_state_dir(state_dir)      # refused here, before a server starts
        # the server's log (for crash reports), in a private dir removed at shutdown
        try:
            logdir: str | None = tempfile.mkdtemp(prefix="procshare-log-",
                                                  dir=util.get_temp_dir())
        except OSError:
            logdir = None      # no log: crash reports just lack its last lines
        if state_dir is None and logdir is not None:
            # durable objects outlive a crashed server, not the program
            self._server_options["state_dir"] = os.path.join(logdir, "state")
        start_method = self._ctx.get_start_method()
        state_path = os.path.join(logdir, _STATE_FILE) if logdir is not None else None
        status_r, status_w = self._ctx.Pipe(duplex=False)
        control_r, control_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_supervise,
            args=(type(self), self._registry, self._address, bytes(self._authkey),
                  self._serializer, dict(self._server_options), initializer, initargs,
                  logdir, name, start_method,
                  {"restart": self._restart, "max_restarts": self._max_restarts,
                   "restart_window": self._restart_window},
                  os.getpid(), status_w, control_r, state_path,
                  (status_r.fileno(), control_w.fileno())),
        )
        ident = ":".join(str(i) for i in proc._identity)
        proc.name = name + "-" + ident
        try:
            try:
                with client.forking_server():
                    proc.start()
            finally:
                status_w.close()
                control_r.close()
            result = _first_word(status_r, proc, self._address, name, start_method, logdir)
            if result[0] != "up":
                proc.join(self._shutdown_timeout)
                error = result[1]
                if isinstance(error, (EOFError, errors.ProcshareError, JournalError)):
                    raise error     # it died (ManagerCrashed), or procshare's own say
                # the stdlib's start() raises EOFError when its server fails
                raise errors.start_failed(name, self._address, error,
                                          initializer is not None) from error
        except BaseException:
            control_w.close()       # (a supervisor still running then stops its server)
            if proc.is_alive():     # interrupted: nothing of it stays behind
                proc.terminate()
                proc.join(self._shutdown_timeout)
            if logdir is not None:
                shutil.rmtree(logdir, ignore_errors=True)
            raise
        finally:
            status_r.close()
        _, self._address, state = result
        self._state.value = State.STARTED
        self._supervisor = SupervisorView(
            proc, StateFile(state_path) if state_path is not None else None, control_w, state)
        self._process = _ServerProcess(self._supervisor)
        errors.shut_down_managers.pop(self._address, None)
        errors.crash_reporters[self._address] = functools.partial(
            _process_facts, self._process, logdir, name)
        finalize = type(self)._finalize_manager
        args = (self._process, self._address, self._authkey, self._state, self._Client,
                self._shutdown_timeout)
        if _accepts(finalize, "logdir"):
            kwargs = {"logdir": logdir, "manager": name}
            if _accepts(finalize, "serializer"):
                kwargs["serializer"] = self._serializer
            self.shutdown = util.Finalize(self, finalize, args=args, kwargs=kwargs,
                                          exitpriority=0)
        else:
            # overridden with the stdlib's signature (3.10's takes no
            # shutdown_timeout; `_Client` is what its code calls to connect):
            # procshare's own steps go around it
            n = max(5, min(6, _positional_room(finalize)))
            self.shutdown = util.Finalize(
                self, _finalize_overridden,
                args=(finalize, args, n, self._serializer, logdir, name), exitpriority=0)

    @property
    def restarts(self) -> int:
        """How many times the supervisor restarted this manager's server."""
        sup = getattr(self, "_supervisor", None)
        return sup.restarts if sup is not None else 0

    @classmethod
    def _run_server(cls, registry: dict, address: Any, authkey: bytes, serializer: Any,
                    writer: Any, initializer: Any = None, initargs: tuple = (),
                    logdir: str | None = None, options: dict | None = None) -> None:
        """Create a server, report its address and run it (in the child).

        With `logdir`, the server's log (procshare's records, uncaught exceptions
        in its threads, fatal signals) goes to files there, for crash reports."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if logdir is not None:
            _start_server_log(logdir)
        options = dict(options or {})
        supervisor_pid = options.pop("supervisor_pid", None)
        will_restart = options.pop("will_restart", False)
        incarnation = options.get("incarnation", 0)
        restarted_at = options.pop("restarted_at", None)
        try:
            if initializer is not None:
                initializer(*initargs)
            for spec in registry.values():     # per-type serializers, known by name here
                if getattr(spec, "serializer", None) is not None:
                    serializers.get_serializer(spec.serializer)
            if incarnation:     # the dead server's socket file is replaced, never missing
                options["replace_stale"] = True
            server = cls._Server(registry, address, authkey, serializer, **options)
            server.restarted_at = restarted_at
            server.supervised = will_restart
            server.manager_name = cls.__name__
            if supervisor_pid is not None:
                _watch_supervisor(server, supervisor_pid)
        except BaseException as e:
            _log.info("the manager failed to start: %r", e, exc_info=True)  # file only
            try:
                writer.send((False, e))
            except Exception:
                writer.send((False, RuntimeError(f"manager failed to start: {e!r}")))
            writer.close()
            raise
        writer.send((True, server.address))
        writer.close()
        util.info("manager serving at %r", server.address)
        _log.info("manager pid %d serving at %r (serializer %r)", os.getpid(), server.address,
                  server.serializer.name)
        try:
            server.serve_forever()
        except SystemExit:
            _log.info("manager pid %d stopped", os.getpid())
            if server.shut_down and will_restart:
                # a shutdown request (from any client): its supervisor restarts nothing
                leave_shut_down_mark(logdir)
                raise SystemExit(SHUT_DOWN_EXIT) from None
            raise
        except BaseException:
            _log.info("the manager's main loop failed", exc_info=True)  # file only
            raise

    @property
    def pid(self) -> int | None:
        """The process id of the server running now, or None when this object did
        not start it."""
        return self._process.pid if self._process is not None else None

    @property
    def address(self) -> Any:
        return self._address

    def join(self, timeout: float | None = None) -> None:
        """Join the manager process (if it has been spawned)."""
        if not self._start_called:
            # as the stdlib's, whose manager has no process attribute until start()
            raise AttributeError(
                f"{type(self).__name__}.join(): this manager object did not start a server "
                "process (start() was not called; connect() joins nothing), so there is "
                "no process to join")
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def __enter__(self) -> BaseManager:
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            if self._state.value == State.INITIAL:
                raise ProcessError("Unable to start server")
            raise _state_error(self._state)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.shutdown()

    @staticmethod
    def _finalize_manager(proc: Any, address: Any, authkey: Any, state: State,
                          _Client: Any, shutdown_timeout: float = 1.0, *,
                          logdir: str | None = None, manager: str = "manager",
                          serializer: Any = None) -> None:
        """Shut the manager process down; registered as a finalizer.  The
        stdlib's arguments (`_Client`: the manager's `_Client`), then
        procshare's keywords (`serializer`: the manager's, for the shutdown
        call; else the one `_Client` was made with)."""
        if serializer is None:
            serializer = _serializer_of(_Client)
        _shutdown_begins(proc)
        _stop_server(proc, address, authkey, serializer, shutdown_timeout)
        _shutdown_ends(proc, address, state, manager, logdir)

    # -- objects -----------------------------------------------------------------------------
    def _session(self) -> client.Session:
        return client.get_session(self._address, bytes(self._authkey), self._serializer)

    def _control(self, name: str, /, *args: Any, **kwds: Any) -> Any:
        if self._state.value != State.STARTED and not (
                # the stdlib just connects: to whoever serves there, if anyone
                self._state.value == State.INITIAL and self._address is not None
                and name in _CONNECTING_OPS):
            raise errors.not_running(type(self).__name__, self._state.value == State.SHUTDOWN,
                                     self._address, name in _CONNECTING_OPS)
        try:
            kind, result = self._session().thread_conn().call(
                None, name, args, kwds, self._call_timeout)
        except errors.ObjectLost:
            # the manager restarted under this thread's connection; the operation
            # never reached the new one: send it again there
            kind, result = self._session().thread_conn().call(
                None, name, args, kwds, self._call_timeout)
        if kind == Kind.RETURN:
            return result
        try:
            return raise_reply(kind, result, None, name, self._call_timeout)
        finally:
            result = None   # (as in `dispatch`)

    def _inspect(self, name: str) -> Any:
        """An introspection call, sent on the connection that carries this process's
        decrefs: so it sees every proxy this process has already dropped."""
        if self._state.value != State.STARTED:
            return self._control(name)      # raises the state error
        return self._session().control_call(name, timeout=self._call_timeout)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple]:
        """Create a shared object; return its token and exposed names (a pair that
        also tells the exposed data attributes: `attributes`).  The reference the
        server made for it belongs to this process (adopt it with `_procshare_track`).  A
        type registered with its own serializer sends its arguments with it; an
        unnamed durable object gets a key made here, so that a create sent again
        after a crash finds the object the first one made, if it did."""
        if self._unnamed_durable(typeid, kwds):
            kwds = {**kwds, UNNAMED_KEY: secrets.token_hex(8)}
        inner = getattr(self._registry.get(typeid), "serializer", None)
        if inner is None:
            session = self._session()
            if session.server_version is None and self._state.value == State.STARTED:
                session.thread_conn()   # (its hello tells which create the manager knows)
            op = "create" if session.server_version == 1 else "create_full"
            ident, exposed, *attrs = self._control(op, typeid, *args, **kwds)
        else:
            ser = serializers.typed_serializer(self._serializer, inner)
            ident, exposed, *attrs = _create_typed(self, ser, typeid, args, kwds)
        # (a manager from before 2026-11-29 may answer `create` with two values)
        attrs = attrs[0] if attrs else ()
        made = _Created((Token(typeid, self._address, ident), exposed))
        made.attributes = tuple(attrs)
        return made

    def _unnamed_durable(self, typeid: str, kwds: dict) -> bool:
        """Does this create make a durable object without a name (see `Server.create`)?"""
        registered = getattr(self._registry.get(typeid), "durable", None)
        mode = durable_option(kwds["durable"]) if "durable" in kwds and \
            create_takes_durable(typeid, registered) else None
        if mode is not None:        # as the server reads it (`Server.create`)
            return bool(mode) and kwds.get("name") is None
        return bool(registered)

    def _debug_info(self) -> str:
        """Some info about the server's shared objects."""
        return self._inspect("debug_info")

    def _number_of_objects(self) -> int:
        """The number of shared objects."""
        return self._inspect("number_of_objects")

    def objects(self) -> list[dict]:
        """Every shared object with its type, refcount and which clients hold it."""
        return self._inspect("list_objects")

    def clients(self) -> list[dict]:
        """The processes connected to the manager, with their connections."""
        return self._inspect("clients")

    def locks(self) -> list[dict]:
        """Every manager-hosted Lock, RLock, Semaphore, BoundedSemaphore,
        Condition and Barrier: who holds it, who waits and for how long, and
        whether an owner died holding it (JSON-friendly dicts)."""
        return self._inspect("locks")

    @classmethod
    def register(cls, typeid: str, callable: Any = None, proxytype: Any = None,
                 exposed: Any = None, method_to_typeid: dict | None = None,
                 create_method: bool = True, *, serial: bool | None = None,
                 serializer: Any = None, durable: bool | str | None = None,
                 mutators: Any = None) -> None:
        """Register a type (or callable) with the manager class.

        `serial` (procshare): True runs calls on one object one at a time, False
        runs them concurrently, None (default) decides per object: concurrent for
        thread-safe types (queues, locks, pools, objects carrying their own lock),
        serial otherwise, except that a call waits at most 0.1 s behind a
        running one before it runs beside it (as the stdlib runs every call).

        `serializer` (procshare): a serializer (name or object) for the arguments
        and results of this type's calls that the manager's own serializer cannot
        carry, e.g. "cloudpickle" for a type whose methods take lambdas.  Such a
        value is packed by it inside the manager's message, so the manager's
        serializer stays in charge (a msgpack manager accepts only safe ones).

        `durable` (procshare): every object of this type survives crashes of
        the manager (see `state_dir`).  `"snapshot"` (or True) stores the
        pickled object after each call of a method in `mutators` (default:
        every exposed method); `"journal"` stores those calls and replays
        them, for a class whose methods are deterministic.
        """
        if durable not in (None, False, True, "snapshot", "journal"):
            raise ValueError(f"durable must be True, 'snapshot' or 'journal', not {durable!r}")
        if mutators is not None:
            mutators = tuple(mutators)
        if "_registry" not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, "_exposed_", None)
        method_to_typeid = method_to_typeid or getattr(proxytype, "_method_to_typeid_", None)
        if method_to_typeid:
            for key, value in list(method_to_typeid.items()):
                assert type(key) is str, "%r is not a string" % key
                assert type(value) is str, "%r is not a string" % value
        cls._registry[typeid] = TypeSpec((callable, exposed, method_to_typeid, proxytype),
                                         serial=serial, serializer=serializer,
                                         durable=durable or None, mutators=mutators)
        if create_method:
            def temp(self: BaseManager, /, *args: Any, **kwds: Any) -> Any:
                util.debug("requesting creation of a shared %r object", typeid)
                made = self._create(typeid, *args, **kwds)     # (a subclass's too)
                token, exp = made
                attrs = getattr(made, "attributes", ())
                ser = self._serializer
                if serializer is not None:
                    ser = serializers.typed_serializer(ser, serializer)
                extra = {"attributes": attrs} if takes_attributes(proxytype) else {}
                # (created for this process's client)
                return _adopting_proxy(proxytype, token, ser, manager=self,
                                       authkey=self._authkey, exposed=exp, **extra)
            temp.__name__ = typeid
            setattr(cls, typeid, temp)


class _Created(tuple):
    """`BaseManager._create`'s `(token, exposed)`, and `attributes`: the
    exposed data attributes (a subclass's `_create` may return a plain pair)."""

    attributes: tuple = ()


def _create_typed(manager: BaseManager, ser: Any, typeid: str, args: tuple,
                  kwds: dict) -> tuple:
    """`manager._create` for a type with its own serializer: the constructor's
    arguments go through that type's connection, so they may use it too."""
    if manager._state.value != State.STARTED:
        raise errors.not_running(type(manager).__name__,
                                 manager._state.value == State.SHUTDOWN, manager._address)
    session = client.get_session(manager._address, bytes(manager._authkey), ser)
    conn = session.thread_conn()
    op = "create" if session.server_version == 1 else "create_full"
    kind, result = conn.call(None, op, (typeid, *args), kwds, manager._call_timeout)
    if kind != Kind.RETURN:
        try:
            raise_reply(kind, result, None, op, manager._call_timeout)
        finally:
            result = None   # (as in `dispatch`)
    return result   # (id, exposed, attributes)


def _shutdown_begins(proc: Any) -> None:
    """Before a started manager's shutdown: its server's exit is no crash."""
    supervisor = getattr(proc, "supervisor", None)
    if supervisor is not None:
        supervisor.stop()


def _shutdown_ends(proc: Any, address: Any, state: State, manager: str,
                   logdir: str | None) -> None:
    """After a started manager's shutdown (each step may run twice)."""
    supervisor = getattr(proc, "supervisor", None)
    if supervisor is not None:
        supervisor.close()
    state.value = State.SHUTDOWN
    client.drop_session(address)
    errors.crash_reporters.pop(address, None)
    errors.note_shut_down(address, manager, proc.pid)
    cleanup_address(address)
    if logdir is not None:
        shutil.rmtree(logdir, ignore_errors=True)


def _serializer_of(client_factory: Any) -> Any:
    """The serializer a manager's `_Client` was made with (pickle if unknown)."""
    return getattr(client_factory, "keywords", {}).get("serializer", "pickle")


def _stop_server(proc: Any, address: Any, authkey: Any, serializer: Any,
                 timeout: float) -> None:
    """Ask a started manager's server to shut down; terminate it, then kill it,
    if it is still alive `timeout` seconds later."""
    if not proc.is_alive():
        return
    util.info("sending shutdown message to manager")
    try:
        with client.no_recover():   # a server that just died is not waited for
            s = client.Session(address, bytes(authkey), client.get_serializer(serializer))
            try:
                s.control_call("shutdown", timeout=timeout)
            finally:
                s.close()
    except Exception:
        pass
    proc.join(timeout=timeout)
    if proc.is_alive():
        util.info("manager still alive")
        if hasattr(proc, "terminate"):
            proc.terminate()
            proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _finalize_overridden(finalize: Any, args: tuple, n: int, serializer: Any,
                         logdir: str | None, manager: str) -> None:
    """The finalizer of a manager whose `_finalize_manager` a subclass overrode
    with the stdlib's signature (called with the first `n` of `args`): it runs
    between procshare's own steps, and a server it left running (it raised, or
    did not stop it) is stopped as procshare's own finalizer stops it: after
    shutdown() the manager is shut down, whatever the override did."""
    proc, address, authkey, state = args[:4]
    _shutdown_begins(proc)
    try:
        finalize(*args[:n])
    finally:
        try:
            _stop_server(proc, address, authkey, serializer, args[5])
        finally:
            _shutdown_ends(proc, address, state, manager, logdir)


def _positional_room(func: Any) -> int:
    """How many positional arguments `func` takes (a large number for *args;
    6 if its signature cannot be read)."""
    try:
        import inspect
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 6
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 1 << 16
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY,
                     inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def _accepts(func: Any, name: str) -> bool:
    """True if `func` takes a parameter `name` (a subclass may override
    `_run_server`/`_finalize_manager` with the stdlib's signature)."""
    try:
        import inspect  # (not at import: about 5 ms of every process's start)
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


# -- the manager process's log, for crash reports ------------------------------------

_log = logging.getLogger("procshare.manager")
_LOG_FILE = "server.log"
_STATE_FILE = "supervisor.state"
_FAULT_FILE = "fault.log"
_fault_file: Any = None


class _LikeBefore(logging.Handler):
    """Passes records on as if the procshare logger still propagated (to the
    root logger's handlers, or Python's last-resort stderr handler)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().callHandlers(record)


def _start_server_log(logdir: str) -> None:
    """In the manager process: write procshare's log records, uncaught exceptions
    of server threads and fatal signals to files in `logdir`."""
    global _fault_file
    import faulthandler
    import logging.handlers
    logger = logging.getLogger("procshare")
    before = logger.getEffectiveLevel()
    handler = logging.handlers.RotatingFileHandler(
        os.path.join(logdir, _LOG_FILE), maxBytes=1 << 20, backupCount=1)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    forward = _LikeBefore(max(before, logging.WARNING))
    logger.addHandler(forward)
    logger.propagate = False       # INFO goes to the file only; the rest as before
    logger.setLevel(logging.INFO)

    def excepthook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("procshare.server").error(
            "uncaught exception in manager thread %s", name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    threading.excepthook = excepthook
    try:
        _fault_file = open(os.path.join(logdir, _FAULT_FILE), "w")  # noqa: SIM115
        faulthandler.enable(file=_fault_file)
    except (OSError, RuntimeError, ValueError):
        pass

    manager_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() == manager_pid:      # not in a forked child (a Pool's worker)
            _log.info("manager pid %d received SIGTERM: stopping", manager_pid)  # (the log only)
        os.kill(os.getpid(), signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
        os.register_at_fork(before=_hold_sigterm, after_in_parent=_restore_sigterm,
                            after_in_child=lambda: _restore_sigterm(on_sigterm))


#: the forking thread's signal mask before `_hold_sigterm`
_mask_before_fork = threading.local()


def _hold_sigterm() -> None:
    """(before a fork in the manager) The child (a Pool's worker) must die of
    SIGTERM at once, as the stdlib's workers do, so it must not inherit the
    manager's Python handler: a SIGTERM that reached a new child before Python
    had set itself up there was dropped (CPython clears the signals it caught
    after a fork), and Pool.terminate() waited for that worker forever.  So
    the forking thread holds SIGTERM back until the child has SIG_DFL."""
    _mask_before_fork.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _restore_sigterm(handler: Any = None) -> None:
    """(after a fork) In the child, SIG_DFL instead of `handler`; then the
    mask from before the fork, which delivers a SIGTERM held meanwhile."""
    if handler is not None and signal.getsignal(signal.SIGTERM) is handler:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    mask = getattr(_mask_before_fork, "mask", None)
    if mask is not None:
        _mask_before_fork.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _log_tail(logdir: str | None, n: int = 10) -> list[str]:
    """The last `n` lines of the manager's log (fatal-signal tracebacks last)."""
    if not logdir:
        return []
    lines: list[str] = []
    for name in (_LOG_FILE, _FAULT_FILE):
        try:
            with open(os.path.join(logdir, name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        lines += [line for line in text.splitlines() if line.strip()]
    return lines[-n:]


class _ServerProcess:
    """The manager's server as the starting process sees it: `pid` is the
    server running now (a restart replaces it); everything else (`join`,
    `is_alive`, `exitcode`, `terminate`) is the supervisor process's, which
    ends with the server at shutdown."""

    def __init__(self, supervisor: SupervisorView) -> None:
        self.supervisor = supervisor

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.supervisor.process, name)


def _first_word(reader: Any, proc: Any, address: Any, name: str, start_method: str,
                logdir: str | None) -> Any:
    """What a process just started sends first on `reader` (a server: whether it
    serves; the supervisor: its first server's); ManagerCrashed, naming how it
    ended, if it died before it said anything."""
    try:
        return reader.recv()
    except EOFError:
        proc.join(1.0)
        code = proc.exitcode
        if code is None:
            raise errors.manager_crashed(address, None) from None
        raise errors.manager_died_starting(name, proc.pid, code, start_method,
                                           _log_tail(logdir)) from None


def _close_fds(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _server_main(cls: type, inherited: tuple, *args: Any, **kwds: Any) -> None:
    """A server forked by the supervisor: drop what it inherited from the
    supervisor (its pipe ends, its SIGTERM handler), then run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _close_fds(inherited)
    cls._run_server(*args, **kwds)


def _launch_server(cls: type, ctx: Any, registry: dict, address: Any, authkey: bytes,
                   serializer: Any, options: dict, initializer: Any, initargs: tuple,
                   logdir: str | None, name: str, incarnation: int,
                   watch: list[int], will_restart: bool, inherited: tuple = (),
                   started: Callable[[Any], None] | None = None) -> tuple[Any, Any]:
    """In the supervisor process: start one server (the first, or a restart on
    the same address) and wait until it serves; return it and its address.
    `started(process)` is told of it as soon as it runs."""
    extra: dict[str, Any] = {}
    if logdir and _accepts(cls._run_server, "logdir"):
        extra["logdir"] = logdir
    if _accepts(cls._run_server, "options"):
        extra["options"] = dict(options, supervisor_pid=watch, will_restart=will_restart,
                                incarnation=incarnation,
                                restarted_at=time.time() if incarnation else None)
    reader, writer = ctx.Pipe(duplex=False)
    forked = ctx.get_start_method() == "fork"
    proc = ctx.Process(target=_server_main,
                       args=(cls, inherited if forked else (), registry, address, authkey,
                             serializer, writer, initializer, initargs),
                       kwargs=extra)
    proc.name = process.current_process().name
    try:
        with client.forking_server():
            proc.start()
        if started is not None:
            started(proc)
    finally:
        writer.close()
    try:
        ok, value = _first_word(reader, proc, address, name, ctx.get_start_method(), logdir)
    finally:
        reader.close()
    if not ok:
        proc.join(1.0)
        raise value
    return proc, value


def _supervise(cls: type, registry: dict, address: Any, authkey: bytes, serializer: Any,
               options: dict, initializer: Any, initargs: tuple, logdir: str | None,
               name: str, start_method: str, policy: dict, starter: int, status: Any,
               control: Any, state_path: str | None, parent_ends: tuple) -> None:
    """The supervisor process (see `supervisor`): start the server, report
    ("up", address, state) or ("failed", error) on `status`, then keep the
    server running until told to stop, or the starting process is gone.  It
    exits as the last server did if it gave up (0 after a stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # it waits for its servers' exits: a SIGCHLD ignored in the starting process
    # (inherited) would reap them first, and their exit codes would be lost
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if start_method == "fork":      # the starting process's own pipe ends: not ours
        _close_fds(parent_ends)
    watched = ProcessHandle(starter)
    # each server is forked from here: this process runs no thread, so the fork
    # is clean, and every incarnation starts from the same state
    ctx = get_context("fork") if "fork" in get_all_start_methods() \
        else get_context(start_method)
    where: dict[str, Any] = {"address": address, "launching": None}
    will_restart = policy["restart"] != "never"

    def inherited() -> tuple:
        """Our pipe ends that are still open (a forked server closes its copies,
        so that only this process holds them); asked at each launch, since a
        closed one's number may be reused by then."""
        return tuple(c.fileno() for c in (status, control) if not c.closed)

    def started(proc: Any) -> None:
        where["launching"] = proc

    def launch(incarnation: int) -> Any:
        proc, where["address"] = _launch_server(
            cls, ctx, registry, where["address"], authkey, serializer, options,
            initializer, initargs, logdir, name, incarnation, [starter, os.getpid()],
            will_restart, inherited(), started)
        return proc     # (still "launching" too: until run() has it, a SIGTERM finds it)

    def on_sigterm(signum: int, frame: Any) -> None:
        # the starting process terminates us (a shutdown that did not finish):
        # the server goes too, and one being started
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for p in (where["launching"], getattr(sup, "process", None)):
            try:
                p.terminate()
                p.join(1.0)
                if p.exitcode is None:
                    p.kill()
                    p.join(1.0)
            except Exception:
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    sup: Any = None
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        check_policy(policy["restart"], policy["max_restarts"], policy["restart_window"])
        first = launch(0)
    except BaseException as e:
        try:
            status.send(("failed", e))
        except Exception:
            status.send(("failed", RuntimeError(f"manager failed to start: {e!r}")))
        return
    try:
        report = StateFile(state_path).write if state_path is not None else None
        sup = Supervisor(first, launch, control=control, watched=watched, report=report,
                         logdir=logdir, **policy)
        status.send(("up", where["address"], sup.state()))
        status.close()
        sup.run()
    except BaseException:
        _log.exception("the manager's supervisor failed; its server stops")
        try:
            (first if sup is None else sup.process).terminate()
        except Exception:
            pass
        os._exit(1)
    proc = sup.process
    if sup.stopping or sup.gave_up is None:
        if getattr(proc, "exitcode", 1) is None:
            proc.join(5.0)      # a stop: the server is on its way out
        code = 0
    else:
        code = sup.last_exitcode or 0
    _exit_as(code)


def _exit_as(code: int) -> None:
    """End this process as a process with exit code `code` ended (negative: by
    that signal), without multiprocessing's exit, which would wait for a
    server still stopping after its starting process died (it stops by
    itself)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    if code < 0:
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))    # no core of this process
            signal.signal(-code, signal.SIG_DFL)
        except (ImportError, OSError, ValueError):
            pass
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _watch_supervisor(server: Server, pids: list[int]) -> None:
    """In the server: stop serving (and remove the socket file) as soon as the
    process that started the manager, or its supervisor process, is gone, so a
    killed program leaves no orphan."""
    handles = [ProcessHandle(p) for p in pids]
    fds = [h.fd for h in handles]
    pollable = all(fd is not None for fd in fds)

    def watch() -> None:
        while not server.stop_event.is_set():
            if pollable:
                try:
                    mp_connection.wait(fds, 1.0)
                except (OSError, ValueError):
                    time.sleep(0.1)
            else:
                time.sleep(0.1)
            for h in handles:
                if h.wait(0.0):
                    _log.info("the supervising process (pid %d) is gone: stopping", h.pid)
                    server.stop_for_good(None, f"process {h.pid}, which started or "
                                         "supervised it, is gone")
                    server.stop_event.set()
                    server.listener.close()
                    return

    threading.Thread(target=watch, daemon=True, name="procshare-supervised").start()


def _process_facts(proc: _ServerProcess, logdir: str | None = None,
                   manager: str = "manager") -> dict:
    """What `errors.manager_crashed` says about a manager this process started:
    its server's pid, its exit code (waiting briefly for a dying one), the
    restarts, its log's tail."""
    supervisor = proc.supervisor
    pid = supervisor.pid
    facts: dict[str, Any] = {"pid": pid, "manager": manager}
    try:
        # its sockets close just before it exits: give the supervisor a moment
        code = supervisor.exitcode_of(pid, wait=0.5)
        if code == SHUT_DOWN_EXIT and supervisor.shut_down_pid == pid:
            facts["shut_down_request"] = True   # (a client's `shutdown` request: no crash)
        else:
            facts["exitcode"] = code
        facts["alive"] = code is None
        gone = supervisor.supervisor_exitcode()
        if code is None and gone is not None:     # the supervisor died: no code to tell
            facts["alive"] = False
            facts["supervisor_exit"] = describe_exit(supervisor.process.pid, gone)
    except Exception:
        pass
    facts["restarts"] = supervisor.restarts
    exits = supervisor.exits
    if exits:
        facts["last_exit"] = exits[-1][1]
    if supervisor.gave_up:
        facts["gave_up"] = supervisor.gave_up
        facts["exits"] = supervisor.exit_report()
    facts["log"] = _log_tail(logdir)
    if logdir:
        facts["logfile"] = os.path.join(logdir, _LOG_FILE)
    return facts


# -- types registered with SyncManager ---------------------------------------------------

class SyncManager(BaseManager):
    """A manager with the types used to synchronize processes, plus `dict`,
    `list`, `set` and `Namespace`.  `procshare.Manager()` returns a started one.

    procshare adds `SharedArray(typecode_or_type, size_or_initializer, lock=True)`
    (the interface of `multiprocessing.Array`) and `ndarray(shape, dtype=float)`
    (a numpy array): memory that every process maps, whose lifetime the manager
    counts like any other object's."""

    SharedArray = shared_arrays.shared_array
    ndarray = shared_arrays.ndarray


SyncManager.register("Queue", primitives.Queue)
SyncManager.register("JoinableQueue", primitives.JoinableQueue)
SyncManager.register("Event", primitives.Event, EventProxy)
SyncManager.register("Lock", primitives.Lock, AcquirerProxy)
SyncManager.register("RLock", primitives.RLock, AcquirerProxy)
SyncManager.register("Semaphore", primitives.Semaphore, AcquirerProxy)
SyncManager.register("BoundedSemaphore", primitives.BoundedSemaphore, AcquirerProxy)
SyncManager.register("Condition", primitives.make_condition, ConditionProxy)
SyncManager.register("Barrier", primitives.Barrier, BarrierProxy)
SyncManager.register("Pool", primitives.Pool, PoolProxy)
SyncManager.register("list", list, ListProxy)
SyncManager.register("dict", dict, DictProxy)
SyncManager.register("set", set, SetProxy)
SyncManager.register("Value", Value, ValueProxy)
SyncManager.register("Array", Array, ArrayProxy)
SyncManager.register("Namespace", Namespace, NamespaceProxy)
SyncManager.register(shared_arrays.TYPEID, SharedBlock, shared_arrays.SharedArrayProxy,
                     create_method=False)
# types returned by methods of PoolProxy and DictProxy
SyncManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
SyncManager.register("AsyncResult", create_method=False)


# -- SharedMemoryManager ------------------------------------------------------------------

if HAS_SHMEM:
    class _SharedMemoryTracker:
        """Manages one or more shared memory segments."""

        def __init__(self, name: str, segment_names: list | None = None) -> None:
            self.shared_memory_context_name = name
            self.segment_names = list(segment_names or [])
            self._mutex = threading.Lock()

        def register_segment(self, segment_name: str) -> None:
            with self._mutex:
                self.segment_names.append(segment_name)

        def destroy_segment(self, segment_name: str) -> None:
            with self._mutex:
                self.segment_names.remove(segment_name)
            segment = shared_memory.SharedMemory(segment_name)
            segment.close()
            segment.unlink()

        def unlink(self) -> None:
            for segment_name in self.segment_names[:]:
                try:
                    self.destroy_segment(segment_name)
                except FileNotFoundError:
                    pass

        def __del__(self) -> None:
            self.unlink()

        def __getstate__(self) -> tuple:
            return (self.shared_memory_context_name, self.segment_names)

        def __setstate__(self, state: tuple) -> None:
            self.__init__(*state)

    class SharedMemoryServer(Server):
        public = Server.public + ["track_segment", "release_segment", "list_segments"]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            Server.__init__(self, *args, **kwargs)
            address = self.address
            if isinstance(address, bytes):
                address = os.fsdecode(address)
            self.shared_memory_context = _SharedMemoryTracker(f"shm_{address}_{os.getpid()}")

        def create(self, c: Any, typeid: str, /, *args: Any, **kwargs: Any) -> tuple:
            if hasattr(self.registry[typeid][-1], "_shared_memory_proxy"):
                kwargs["shared_memory_context"] = self.shared_memory_context
            return Server.create(self, c, typeid, *args, **kwargs)

        def shutdown(self, c: Any) -> None:
            self.shared_memory_context.unlink()
            return Server.shutdown(self, c)

        def track_segment(self, c: Any, segment_name: str) -> None:
            self.shared_memory_context.register_segment(segment_name)

        def release_segment(self, c: Any, segment_name: str) -> None:
            self.shared_memory_context.destroy_segment(segment_name)

        def list_segments(self, c: Any) -> list:
            return self.shared_memory_context.segment_names

    class SharedMemoryManager(BaseManager):
        """Like SyncManager but creates and tracks shared memory segments, which
        are unlinked when the manager shuts down."""

        _Server = SharedMemoryServer

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if os.name == "posix":
                from multiprocessing import resource_tracker
                resource_tracker.ensure_running()
            BaseManager.__init__(self, *args, **kwargs)

        def get_server(self) -> Server:
            if self._state.value != State.INITIAL:
                if self._state.value == State.STARTED:
                    raise ProcessError("Already started SharedMemoryServer")
                if self._state.value == State.SHUTDOWN:
                    raise ProcessError("SharedMemoryManager has shut down")
                raise ProcessError(f"Unknown state {self._state.value!r}")
            return super().get_server()     # (its messages above are the stdlib's)

        def SharedMemory(self, size: int) -> shared_memory.SharedMemory:
            """A new SharedMemory block of `size` bytes, tracked by the manager."""
            # an int, checked before anything is made: the stdlib's SharedMemory
            # makes the segment first, and leaves it behind if the size is a float
            try:
                size = operator.index(size)
            except TypeError:
                raise TypeError(
                    f"SharedMemoryManager.SharedMemory(size) needs a whole number of bytes, "
                    f"not {type(size).__name__} {size!r:.40}: pass int(size). Nothing was "
                    "created.") from None
            sms = shared_memory.SharedMemory(None, create=True, size=size)
            try:
                self._control("track_segment", sms.name)
            except BaseException:
                sms.unlink()
                raise
            return sms

        def ShareableList(self, sequence: Any) -> shared_memory.ShareableList:
            """A new ShareableList backed by shared memory tracked by the manager."""
            sl = shared_memory.ShareableList(sequence)
            try:
                self._control("track_segment", sl.shm.name)
            except BaseException:
                sl.shm.unlink()
                raise
            return sl

    __all__.append("SharedMemoryManager")
