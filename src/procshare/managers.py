"""Managers: the drop-in replacement for `multiprocessing.managers`.

Owns: `BaseManager` (start, connect, register, shutdown), `SyncManager` and
its registered types, `SharedMemoryManager`, and every other public name of
the stdlib module, so that `import procshare.managers as managers` works
wherever `multiprocessing.managers` did.

Rules it keeps:
- Same signatures, states and error types as the stdlib.  New behaviour comes
  as new keyword-only arguments (`call_timeout=`, `serial=`) and new members
  (`pid`).
- The manager's server runs in a child process made by `ctx.Process`, or in
  the caller's process with `get_server().serve_forever()`.
"""

from __future__ import annotations

import array
import os
import signal
import threading
from multiprocessing import get_context, process, reduction, util
from multiprocessing import pool as mp_pool
from multiprocessing.context import ProcessError
from typing import Any

from . import client, errors, primitives, protocol, transport
from .errors import RemoteError  # noqa: F401  (re-exported, as in the stdlib)
from .protocol import Token
from .proxy import (  # noqa: F401  (the stdlib module has all these names)
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
    convert_to_error,
    raise_reply,
)
from .server import Server, TypeSpec, all_methods, public_methods  # noqa: F401

try:
    from multiprocessing import shared_memory
except ImportError:  # pragma: no cover
    HAS_SHMEM = False
else:
    HAS_SHMEM = True

__all__ = ["BaseManager", "SyncManager", "BaseProxy", "Token", "SharedMemoryManager"]

def reduce_array(a: array.array) -> tuple:
    return array.array, (a.typecode, a.tobytes())


def rebuild_as_list(obj: Any) -> tuple:
    return list, (list(obj),)


# like the stdlib: dict views travel as lists
for _view_type in (type({}.keys()), type({}.values()), type({}.items())):
    reduction.register(_view_type, rebuild_as_list)
reduction.register(array.array, reduce_array)
del _view_type


#: serializer name -> (listener type, connect function), as in the stdlib
listener_client = {"pickle": (transport.Listener, transport.connect)}


def dispatch(c: client.Connection, id: Any, methodname: str, args: tuple = (),
             kwds: dict = {}) -> Any:  # noqa: B006
    """Send a request on connection `c` and return the result (stdlib-compatible)."""
    kind, result = c.call(id, methodname, args, kwds, None)
    if kind == protocol.RETURN:
        return result
    return raise_reply(kind, result, None, methodname, None)


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


def _state_error(state: State, what: str = "server") -> ProcessError:
    if state.value == State.STARTED:
        return ProcessError(f"Already started {what}")
    if state.value == State.SHUTDOWN:
        return ProcessError("Manager has shut down")
    return ProcessError(f"Unknown state {state.value!r}")


class BaseManager:
    """Base class for managers."""

    _registry: dict = {}
    _Server = Server

    def __init__(self, address: Any = None, authkey: bytes | None = None,
                 serializer: str = "pickle", ctx: Any = None, *,
                 shutdown_timeout: float = 1.0, call_timeout: float | None = None) -> None:
        if authkey is None:
            authkey = process.current_process().authkey
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        self._serializer = serializer
        self._ctx = ctx or get_context()
        self._shutdown_timeout = shutdown_timeout
        self._call_timeout = call_timeout
        self._process: Any = None

    # -- server lifecycle ---------------------------------------------------------------
    def get_server(self) -> Server:
        """Return a server with `serve_forever()` and `address`, to run in this process."""
        if self._state.value != State.INITIAL:
            raise _state_error(self._state)
        return self._Server(self._registry, self._address, bytes(self._authkey),
                            self._serializer)

    def connect(self) -> None:
        """Connect this manager object to a running server."""
        client.get_session(self._address, bytes(self._authkey), self._serializer) \
            .control_call("dummy")
        self._state.value = State.STARTED

    def start(self, initializer: Any = None, initargs: tuple = ()) -> None:
        """Spawn a server process for this manager object."""
        if self._state.value != State.INITIAL:
            raise _state_error(self._state)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        reader, writer = self._ctx.Pipe(duplex=False)
        self._process = self._ctx.Process(
            target=type(self)._run_server,
            args=(self._registry, self._address, bytes(self._authkey), self._serializer,
                  writer, initializer, initargs),
        )
        ident = ":".join(str(i) for i in self._process._identity)
        self._process.name = type(self).__name__ + "-" + ident
        self._process.start()
        writer.close()
        try:
            ok, value = reader.recv()
        except EOFError:
            self._process.join(1.0)
            raise errors.manager_crashed(self._address, None) if self._process.exitcode is None \
                else errors.ManagerCrashed(
                    f"the {type(self).__name__} server process (pid {self._process.pid}) "
                    f"exited with code {self._process.exitcode} before it was ready; see "
                    "its output above for the reason.", exitcode=self._process.exitcode,
                    pid=self._process.pid) from None
        finally:
            reader.close()
        if not ok:
            self._process.join(self._shutdown_timeout)
            raise value
        self._address = value
        self._state.value = State.STARTED
        proc = self._process
        errors.crash_reporters[self._address] = lambda: _process_facts(proc)
        self.shutdown = util.Finalize(
            self, type(self)._finalize_manager,
            args=(self._process, self._address, self._authkey, self._state,
                  self._serializer, self._shutdown_timeout),
            exitpriority=0,
        )

    @classmethod
    def _run_server(cls, registry: dict, address: Any, authkey: bytes, serializer: Any,
                    writer: Any, initializer: Any = None, initargs: tuple = ()) -> None:
        """Create a server, report its address and run it (in the child)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if initializer is not None:
                initializer(*initargs)
            server = cls._Server(registry, address, authkey, serializer)
        except BaseException as e:
            try:
                writer.send((False, e))
            except Exception:
                writer.send((False, RuntimeError(f"manager failed to start: {e!r}")))
            writer.close()
            raise
        writer.send((True, server.address))
        writer.close()
        util.info("manager serving at %r", server.address)
        server.serve_forever()

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when this object did not start it."""
        return self._process.pid if self._process is not None else None

    @property
    def address(self) -> Any:
        return self._address

    def join(self, timeout: float | None = None) -> None:
        """Join the manager process (if it has been spawned)."""
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
                          serializer: Any, shutdown_timeout: float) -> None:
        """Shut the manager process down; registered as a finalizer."""
        if proc.is_alive():
            util.info("sending shutdown message to manager")
            try:
                s = client.Session(address, bytes(authkey), client.get_serializer(serializer))
                try:
                    s.control_call("shutdown", timeout=shutdown_timeout)
                finally:
                    s.close()
            except Exception:
                pass
            proc.join(timeout=shutdown_timeout)
            if proc.is_alive():
                util.info("manager still alive")
                if hasattr(proc, "terminate"):
                    proc.terminate()
                    proc.join(timeout=shutdown_timeout)
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
        state.value = State.SHUTDOWN
        client.drop_session(address)
        errors.crash_reporters.pop(address, None)
        transport.cleanup_address(address)

    # -- objects -----------------------------------------------------------------------------
    def _session(self) -> client.Session:
        return client.get_session(self._address, bytes(self._authkey), self._serializer)

    def _control(self, name: str, *args: Any, **kwds: Any) -> Any:
        if self._state.value != State.STARTED:
            raise _state_error(self._state) if self._state.value == State.SHUTDOWN \
                else ProcessError("server not yet started")
        conn = self._session().thread_conn()
        kind, result = conn.call(None, name, args, kwds, self._call_timeout)
        if kind == protocol.RETURN:
            return result
        return raise_reply(kind, result, None, name, self._call_timeout)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple]:
        """Create a shared object; return its token and exposed names.  The reference
        the server made for it belongs to this process (adopt it with `_track`)."""
        ident, exposed, attrs = self._control("create", typeid, *args, **kwds)
        self._last_attributes = attrs
        return Token(typeid, self._address, ident), exposed

    def _debug_info(self) -> str:
        """Some info about the server's shared objects."""
        return self._control("debug_info")

    def _number_of_objects(self) -> int:
        """The number of shared objects."""
        return self._control("number_of_objects")

    def objects(self) -> list[dict]:
        """Every shared object with its type, refcount and which clients hold it."""
        return self._control("list_objects")

    def clients(self) -> list[dict]:
        """The processes connected to the manager, with their connections."""
        return self._control("clients")

    @classmethod
    def register(cls, typeid: str, callable: Any = None, proxytype: Any = None,
                 exposed: Any = None, method_to_typeid: dict | None = None,
                 create_method: bool = True, *, serial: bool | None = None) -> None:
        """Register a type (or callable) with the manager class.

        `serial` (procshare): True runs calls on one object one at a time, False
        runs them concurrently, None (default) decides per object: concurrent for
        thread-safe types (queues, locks, pools, objects carrying their own lock),
        serial otherwise.
        """
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
                                         serial=serial)
        if create_method:
            def temp(self: BaseManager, /, *args: Any, **kwds: Any) -> Any:
                util.debug("requesting creation of a shared %r object", typeid)
                token, exp = self._create(typeid, *args, **kwds)
                extra = {"attributes": self._last_attributes} if proxytype is AutoProxy else {}
                proxy = proxytype(token, self._serializer, manager=self,
                                  authkey=self._authkey, exposed=exp, incref=False, **extra)
                proxy._track()
                return proxy
            temp.__name__ = typeid
            setattr(cls, typeid, temp)


def _process_facts(proc: Any) -> dict:
    alive = proc.is_alive()
    return {"pid": proc.pid, "exitcode": None if alive else proc.exitcode}


# -- types registered with SyncManager ---------------------------------------------------

class Namespace:
    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = list(self.__dict__.items())
        temp = []
        for name, value in items:
            if not name.startswith("_"):
                temp.append("%s=%r" % (name, value))
        temp.sort()
        return "%s(%s)" % (self.__class__.__name__, ", ".join(temp))


class Value:
    def __init__(self, typecode: Any, value: Any, lock: bool = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> Any:
        return self._value

    def set(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "%s(%r, %r)" % (type(self).__name__, self._typecode, self._value)

    value = property(get, set)


def Array(typecode: Any, sequence: Any, lock: bool = True) -> array.array:
    return array.array(typecode, sequence)


class SyncManager(BaseManager):
    """A manager with the types used to synchronize processes, plus `dict`,
    `list`, `set` and `Namespace`.  `procshare.Manager()` returns a started one."""


SyncManager.register("Queue", primitives.Queue)
SyncManager.register("JoinableQueue", primitives.JoinableQueue)
SyncManager.register("Event", primitives.Event, EventProxy)
SyncManager.register("Lock", primitives.Lock, AcquirerProxy)
SyncManager.register("RLock", primitives.RLock, AcquirerProxy)
SyncManager.register("Semaphore", primitives.Semaphore, AcquirerProxy)
SyncManager.register("BoundedSemaphore", primitives.BoundedSemaphore, AcquirerProxy)
SyncManager.register("Condition", primitives.Condition, ConditionProxy)
SyncManager.register("Barrier", primitives.Barrier, BarrierProxy)
SyncManager.register("Pool", mp_pool.Pool, PoolProxy)
SyncManager.register("list", list, ListProxy)
SyncManager.register("dict", dict, DictProxy)
SyncManager.register("set", set, SetProxy)
SyncManager.register("Value", Value, ValueProxy)
SyncManager.register("Array", Array, ArrayProxy)
SyncManager.register("Namespace", Namespace, NamespaceProxy)
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
            return self._Server(self._registry, self._address, bytes(self._authkey),
                                self._serializer)

        def SharedMemory(self, size: int) -> shared_memory.SharedMemory:
            """A new SharedMemory block of `size` bytes, tracked by the manager."""
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
