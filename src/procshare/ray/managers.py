"""RayManager: the `BaseManager`/`SyncManager` API with Ray actors as the engine.

`class MyManager(RayManager)` instead of `class MyManager(BaseManager)`: the
same `register()`, `start()`/`connect()`/`shutdown()`, `with` block and
SyncManager types, and the same proxy classes.  Each shared object is a
detached Ray actor named in the manager's Ray namespace; the manager's
address (`ray://<cluster>/<namespace>`) is all another process needs.

Owns: `RayBaseManager` and `RayManager`, the registry of types (`RaySpec`,
with `durable=` and how each type is hosted), creating objects, the
manager's lifecycle (the registry actor, and the cluster when the manager
started it), and the SyncManager types that are not the primitives
(Namespace, Value, Array).

Rules it keeps:
- Same signatures, states and error types as `BaseManager`; the new options
  are keyword-only (`call_timeout`, `state_dir`, `durable`, `state_fsync`,
  `ray_init`, `shutdown_timeout`).  `register(..., durable=...)` is the only
  new register option; a create method of a type that can be durable (the
  SyncManager's built-ins, a type registered durable) takes
  `durable=True|False` (a bool) for that one object, as the local backend's
  do; any other type's constructor gets the keyword (`create_takes_durable`).
- How a type is hosted is decided before its object exists: `durable` and
  `serial=True` types (and plain classes) in a one-call-at-a-time sync
  actor; classes with coroutine methods (the primitives) in an async actor;
  `serial=False` and thread-safe classes in a threaded actor; a factory
  function with `serial=None` in a threaded actor that serializes the object's
  calls unless it turns out thread-safe.
- `start()` uses this process's Ray connection, or joins a running cluster, or
  starts a local one (no dashboard); `shutdown()` kills the manager's actors
  and stops only a cluster that `start()` started.
"""

from __future__ import annotations

import atexit
import inspect
import os
import queue
import secrets
import threading
import weakref
from multiprocessing import pool as mp_pool
from multiprocessing import process, util
from multiprocessing.context import ProcessError
from typing import Any

import ray

from .. import errors
from ..client.proxy import (
    AcquirerProxy,
    ArrayProxy,
    AutoProxy,
    BarrierProxy,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    NamespaceProxy,
    SetProxy,
    ValueProxy,
    adopting_proxy,
    takes_attributes,
)
from ..stdtypes import Array, Namespace, Value, create_takes_durable
from ..wire.records import Token
from . import cluster, primitives
from .cluster import RayAddress
from .durable import SnapshotStore, derive_key, prepare_dir
from .host import REGISTRY_NAME
from .registry import Registry
from .session import drop_sessions, session_for

__all__ = ["RayBaseManager", "RayManager", "RaySpec", "Namespace", "Value", "Array"]

RemoteRegistry = ray.remote(Registry)


class State:
    __slots__ = ["value"]
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2


def _state_error(state: State) -> ProcessError:
    if state.value == State.STARTED:
        return ProcessError("Already started server")
    if state.value == State.SHUTDOWN:
        return ProcessError("Manager has shut down")
    return ProcessError(f"Unknown state {state.value!r}")


class RaySpec(tuple):
    """A registry value: `(callable, exposed, method_to_typeid, proxytype)` like the
    stdlib's, plus `serial`, `serializer`, `durable` and the hosting `mode`."""

    serial: bool | None
    serializer: Any
    durable: bool
    mode: str

    def __new__(cls, items: tuple, serial: bool | None = None, serializer: Any = None,
                durable: bool = False, mode: str = "serial") -> RaySpec:
        self = super().__new__(cls, items)
        self.serial, self.serializer, self.durable, self.mode = serial, serializer, durable, mode
        return self

    def __reduce__(self) -> tuple:
        return RaySpec, (tuple(self), self.serial, self.serializer, self.durable, self.mode)


_THREAD_SAFE_CLASSES: tuple = (queue.Queue, queue.SimpleQueue, mp_pool.Pool,
                               mp_pool.ApplyResult, threading.Event, threading.Condition,
                               threading.Semaphore, threading.Barrier)


def _has_coroutines(cls: type) -> bool:
    for name in dir(cls):
        try:
            if inspect.iscoroutinefunction(getattr(cls, name)):
                return True
        except Exception:
            continue
    return False


def hosting_mode(callable_: Any, serial: bool | None, durable: bool) -> str:
    """How objects made by `callable_` are hosted (see the module's rules)."""
    if isinstance(callable_, type) and _has_coroutines(callable_):
        if durable:
            raise ValueError(f"durable=True is not supported for {callable_.__name__}: its "
                             "methods are coroutines (a primitive's waiters cannot be saved)")
        return "async"
    if durable or serial is True or callable_ is None:
        return "serial"
    if serial is False:
        return "threads"
    if isinstance(callable_, type):
        if getattr(callable_, "_procshare_concurrent_", False) or issubclass(
                callable_, _THREAD_SAFE_CLASSES):
            return "threads"
        return "serial"
    return "auto"


class RayBaseManager:
    """A manager whose shared objects are Ray actors (see the module docstring).

    `address`: `ray://<cluster>/<namespace>` of a running Ray manager (for
    `connect()`), or for `start()` None (a new namespace on the cluster this
    process is connected to, a running one, or a new local one) or an address
    to start at.  `authkey` authenticates `connect()` and keys the HMAC of
    durable snapshots.  `serializer` is accepted for compatibility: Ray
    serializes calls itself (cloudpickle).  Keyword-only: `call_timeout` (the
    default deadline of calls), `state_dir` (where durable objects keep their
    snapshots: storage every node sees), `durable` (True, or typeids: durable
    objects in addition to those registered with `durable=True`),
    `state_fsync` (fsync each snapshot) and `ray_init` (keyword arguments for
    `ray.init()` when `start()` starts a local cluster).
    """

    _registry: dict = {}

    def __init__(self, address: Any = None, authkey: bytes | None = None,
                 serializer: str = "pickle", ctx: Any = None, *,
                 call_timeout: float | None = None, state_dir: str | None = None,
                 durable: bool | tuple | list = False, state_fsync: bool = False,
                 ray_init: dict | None = None, shutdown_timeout: float = 10.0) -> None:
        if authkey is None:
            authkey = process.current_process().authkey
        if address is not None and not isinstance(address, RayAddress):
            if not (isinstance(address, str) and address.startswith(cluster.PREFIX)):
                raise ValueError("the address of a Ray manager is 'ray://<cluster>/<namespace>' "
                                 f"(cluster: host:port of its GCS, or 'auto'), not {address!r}")
            try:
                address = RayAddress(address)
            except ValueError:
                pass        # 'ray://<cluster>': start() picks the namespace
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        self._serializer = serializer
        self._ctx = ctx
        self._call_timeout = call_timeout
        self._state_dir = state_dir
        self._durable = durable
        self._state_fsync = state_fsync
        self._ray_init = dict(ray_init or {})
        self._shutdown_timeout = shutdown_timeout
        self._started_ray = False
        self._initializer: tuple = (None, ())

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, initializer: Any = None, initargs: tuple = ()) -> None:
        """Create the manager's registry actor in a new namespace (joining or
        starting a Ray cluster if this process is not connected to one).
        `initializer(*initargs)` runs once in each actor process, before the
        first object it hosts is made."""
        if self._state.value != State.INITIAL:
            raise _state_error(self._state)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if getattr(process.current_process(), "_inheriting", False):
            raise errors.bootstrap_error(type(self).__name__)
        want_cluster, namespace = None, None
        if self._address:
            rest = str(self._address)[len(cluster.PREFIX):]
            if "/" in rest:
                want_cluster, _, namespace = rest.rpartition("/")
            else:
                want_cluster = rest
            want_cluster = want_cluster or None
            namespace = namespace or None
        gcs, started = cluster.start_or_join(want_cluster, self._ray_init)
        namespace = namespace or f"procshare-{secrets.token_hex(6)}"
        address = RayAddress.make(gcs, namespace)
        try:
            reg = RemoteRegistry.options(
                name=REGISTRY_NAME, namespace=namespace, lifetime="detached", num_cpus=0,
                max_restarts=0, max_concurrency=1).remote(
                    str(address), cluster.current_job(),
                    derive_key(self._authkey, "connect", namespace))
            ray.get(reg.ping.remote(), timeout=120)
        except ValueError as e:
            if started:
                cluster.stop_if_started()
            raise ProcessError(f"a Ray manager already runs at {str(address)!r} ({e})") from None
        except BaseException:
            if started:
                cluster.stop_if_started()
            raise
        self._address = address
        self._started_ray = started
        self._initializer = (initializer, tuple(initargs))
        self._state.value = State.STARTED
        errors.shut_down_managers.pop(address, None)
        self.shutdown = util.Finalize(
            self, type(self)._finalize_manager,
            args=(address, self._state, started, self._shutdown_timeout, type(self).__name__),
            exitpriority=0)
        # Ray's own exit handler disconnects this process: shut down before it
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def connect(self) -> None:
        """Connect this manager object to a running Ray manager at `address`."""
        if not isinstance(self._address, RayAddress):
            raise ValueError("connect() needs the address of a running Ray manager, "
                             "'ray://<cluster>/<namespace>' (manager.address where it started)")
        address = self._address
        cluster.ensure_connected(address)
        try:
            reg = ray.get_actor(REGISTRY_NAME, namespace=address.namespace)
        except ValueError as e:
            raise errors.manager_crashed(address, ConnectionRefusedError(
                f"no Ray manager in namespace {address.namespace!r} ({str(e)[:60]}...)")) \
                from None
        ok = ray.get(reg.check_auth.remote(derive_key(self._authkey, "connect",
                                                      address.namespace)), timeout=60)
        if not ok:
            raise errors.AuthenticationError(
                f"the Ray manager at {str(address)!r} uses another authkey: pass the authkey "
                "of the manager that started it (authkey=...)", address=str(address))
        self._state.value = State.STARTED

    def shutdown(self) -> None:   # replaced by a Finalize in start()
        """Shut the manager down (kill its actors); a no-op if it was not started here."""
        self._state.value = State.SHUTDOWN

    @staticmethod
    def _finalize_manager(address: RayAddress, state: State, started: bool, timeout: float,
                          name: str = "RayManager") -> None:
        if ray.is_initialized():
            try:
                reg = ray.get_actor(REGISTRY_NAME, namespace=address.namespace)
                try:
                    ray.get(reg.shutdown.remote(), timeout=timeout)
                finally:
                    ray.kill(reg, no_restart=True)
            except Exception as e:
                util.debug("Ray manager %s: %r at shutdown", address, e)
        state.value = State.SHUTDOWN
        drop_sessions(address)
        errors.note_shut_down(address, name, None)
        if started:
            cluster.stop_if_started()

    def __enter__(self) -> RayBaseManager:
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            raise _state_error(self._state)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.shutdown()

    def get_server(self) -> Any:
        raise NotImplementedError(
            "a Ray manager has no server process to serve_forever(): its objects are Ray "
            "actors. Call start() (or connect() to a running one).")

    def join(self, timeout: float | None = None) -> None:
        """Nothing to join: there is no manager process."""

    @property
    def address(self) -> RayAddress | None:
        return self._address

    @property
    def pid(self) -> None:
        """None: a Ray manager has no server process."""
        return None

    @property
    def started_ray(self) -> bool:
        """True if `start()` started the local Ray cluster (and shutdown stops it)."""
        return self._started_ray

    # -- objects ----------------------------------------------------------------------------------
    def _session(self) -> Any:
        return session_for(self._address, bytes(self._authkey), self._serializer)

    def _check_started(self, inspect: bool = False) -> None:
        """ManagerNotRunning (what the stdlib raises for the use: `inspect`, or
        to make an object) unless started or connected."""
        if self._state.value != State.STARTED:
            raise errors.not_running(type(self).__name__, self._state.value == State.SHUTDOWN,
                                     self._address, inspect)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple]:
        token, exposed, _attrs = self._create_full(typeid, args, kwds)
        return token, exposed

    def _create_full(self, typeid: str, args: tuple, kwds: dict,
                     durable: bool | None = None) -> tuple[Token, tuple, tuple]:
        """Create an object (durable: None decides from the registration and the
        manager's `durable=`); returns its token, exposed names and attributes."""
        self._check_started()
        spec = self._registry.get(typeid)
        if spec is None:
            raise errors.RemoteError(f"KeyError: typeid {typeid!r} is not registered with "
                                     f"this manager; registered: {sorted(self._registry)}\n")
        callable_, exposed, m2t, _proxytype = spec[:4]
        if durable is None:
            durable = bool(spec.durable or self._durable is True
                           or (isinstance(self._durable, (tuple, list, set, frozenset))
                               and typeid in self._durable))
        mode = spec.mode if not durable else hosting_mode(callable_, spec.serial, True)
        address = self._address
        oid = secrets.token_hex(6)
        host_spec: dict[str, Any] = {
            "oid": oid, "typeid": typeid, "address": address, "namespace": address.namespace,
            "callable": callable_, "args": args, "kwds": kwds, "exposed": exposed,
            "m2t": m2t, "specs": self._sub_specs(typeid), "mode": mode,
            "initializer": self._initializer[0], "initargs": self._initializer[1],
        }
        state_file = None
        if durable:
            if not self._state_dir:
                raise ValueError(f"{typeid!r} objects are durable: give the manager a "
                                 "state_dir= (a directory every node of the cluster sees)")
            prepare_dir(self._state_dir)
            directory = prepare_dir(os.path.join(self._state_dir, address.namespace))
            key = derive_key(self._authkey, "state", address.namespace)
            host_spec["durable"] = {"dir": directory, "key": key, "fsync": self._state_fsync}
            state_file = SnapshotStore(directory, oid, key).path
        exposed_, attrs = self._session().create(oid, typeid, host_spec, mode, durable,
                                                 state_file)
        return Token(typeid, address, oid), exposed_, attrs

    def _sub_specs(self, typeid: str) -> dict:
        """The specs of every type a method of `typeid` can return (transitively):
        those objects are hosted by the same actor."""
        out: dict = {}
        todo = [typeid]
        while todo:
            spec = self._registry.get(todo.pop())
            m2t = spec[2] if spec is not None else None
            for target in (m2t or {}).values():
                if target not in out and target in self._registry:
                    t = self._registry[target]
                    out[target] = (t[0], t[1], t[2], t[3])
                    todo.append(target)
        return out

    def _control(self, name: str, *args: Any) -> Any:
        self._check_started(inspect=True)
        return self._session().control_call(name, *args, timeout=self._call_timeout)

    def _debug_info(self) -> str:
        return self._control("debug_info")

    def _number_of_objects(self) -> int:
        return self._control("number_of_objects")

    def objects(self) -> list[dict]:
        """Every shared object with its type, refcount, holders and actor."""
        return self._control("list_objects")

    def clients(self) -> list[dict]:
        """The processes that used the manager and have not said goodbye."""
        return self._control("clients")

    # -- types ------------------------------------------------------------------------------------
    @classmethod
    def register(cls, typeid: str, callable: Any = None, proxytype: Any = None,
                 exposed: Any = None, method_to_typeid: dict | None = None,
                 create_method: bool = True, *, serial: bool | None = None,
                 serializer: Any = None, durable: bool = False) -> None:
        """Register a type (or callable) with the manager class, as
        `BaseManager.register`; `durable=True` keeps each object's state across
        a crash of its actor's worker process (the manager needs `state_dir=`).
        `serializer` is accepted and not needed: Ray carries lambdas and local
        classes itself."""
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
        mode = hosting_mode(callable, serial, durable)
        cls._registry[typeid] = RaySpec((callable, exposed, method_to_typeid, proxytype),
                                        serial=serial, serializer=serializer,
                                        durable=durable, mode=mode)
        if create_method:
            def temp(self: RayBaseManager, /, *args: Any, **kwds: Any) -> Any:
                util.debug("requesting creation of a shared %r object", typeid)
                # durable=True, or False for a typeid registered durable; any other
                # durable= is the constructor's (as in the stdlib)
                asked = kwds.get("durable") if create_takes_durable(typeid, durable) else None
                durable_ = kwds.pop("durable") if asked is True or (
                    asked is False and durable) else None
                token, exp, attrs = self._create_full(typeid, args, kwds, durable_)
                extra = {"attributes": attrs} if takes_attributes(proxytype) else {}
                # (created for this process's client)
                return adopting_proxy(proxytype, token, self._serializer, manager=self,
                                      authkey=self._authkey, exposed=exp, **extra)
            temp.__name__ = typeid
            setattr(cls, typeid, temp)


def _shutdown_at_exit(ref: weakref.ref) -> None:
    manager = ref()
    if manager is not None and manager._state.value == State.STARTED:
        try:
            manager.shutdown()
        except Exception as e:
            util.debug("Ray manager shutdown at exit: %r", e)


# -- the SyncManager types that are not primitives ----------------------------------------------

class RayManager(RayBaseManager):
    """`SyncManager` on Ray: dict, list, set, Namespace, Value, Array, Queue,
    JoinableQueue, Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and
    Barrier (no Pool: use Ray tasks)."""


RayManager.register("Queue", primitives.Queue)
RayManager.register("JoinableQueue", primitives.JoinableQueue)
RayManager.register("Event", primitives.Event, EventProxy)
RayManager.register("Lock", primitives.Lock, AcquirerProxy)
RayManager.register("RLock", primitives.RLock, AcquirerProxy)
RayManager.register("Semaphore", primitives.Semaphore, AcquirerProxy)
RayManager.register("BoundedSemaphore", primitives.BoundedSemaphore, AcquirerProxy)
RayManager.register("Condition", primitives.Condition, ConditionProxy)
RayManager.register("Barrier", primitives.Barrier, BarrierProxy)
RayManager.register("list", list, ListProxy)
RayManager.register("dict", dict, DictProxy)
RayManager.register("set", set, SetProxy)
RayManager.register("Value", Value, ValueProxy)
RayManager.register("Array", Array, ArrayProxy, serial=True)
RayManager.register("Namespace", Namespace, NamespaceProxy)
# the type DictProxy.__iter__ returns (hosted by the dict's actor)
RayManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
