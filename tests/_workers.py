"""Everything a child process runs, at module level so spawn can pickle it.

This module is imported by name (``import _workers``) in the pytest process,
in spawned children and in the manager server processes, so it must import
cleanly everywhere and must not import procshare at import time: the stdlib
cases have to work even while procshare is missing.

Contents:
* a small child-process harness (``start_child`` / ``run_child``) that runs a
  function here in a real child process and returns its result, or raises
  ``ChildFailed`` naming the exception the child saw;
* referent classes registered on custom managers (Counter, Sleeper, ...);
* manager/proxy classes built lazily per implementation: the attribute
  ``_workers.stdlib__CounterManager`` is a ``multiprocessing.managers``
  BaseManager subclass, ``_workers.procshare__CounterManager`` the procshare
  one.  They are created on first access (PEP 562 module ``__getattr__``), so
  pickle finds them by name in every process;
* the functions the tests run in child processes.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
import queue
import sys
import threading
import time
import traceback

GATE_TIMEOUT = 15.0

# ---------------------------------------------------------------------------
# Child-process harness
# ---------------------------------------------------------------------------


class ChildFailed(Exception):
    """The function run in a child process raised, or the child died."""

    def __init__(self, exc_type: str, message: str, tb: str = "", exitcode=None):
        super().__init__(f"{exc_type}: {message}\n{tb}")
        self.exc_type = exc_type  # e.g. 'AttributeError' or 'queue.Empty'
        self.message = message
        self.tb = tb
        self.exitcode = exitcode


def _exc_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _child_main(conn, func, args, kwargs, gated):
    try:
        if gated:
            conn.send(("ready",))
            if not conn.poll(GATE_TIMEOUT):
                raise TimeoutError("gate was never opened by the parent")
            conn.recv()
        result = func(*args, **kwargs)
        msg = ("ok", result)
    except BaseException as exc:  # report everything to the parent
        msg = ("err", _exc_name(exc), str(exc), traceback.format_exc())
    try:
        conn.send(msg)
    except Exception as exc:  # result not picklable
        conn.send(("err", _exc_name(exc), f"cannot send result: {exc}", traceback.format_exc()))
    finally:
        conn.close()


class ChildHandle:
    def __init__(self, ctx, func, args, kwargs, gate):
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_child_main, args=(child_conn, func, args, kwargs, gate), daemon=True
        )
        self.process.start()
        child_conn.close()
        self._done = False
        self._value = None

    def wait_ready(self, timeout: float = 15.0):
        """Wait until a child started with ``gate=True`` sits at its gate."""
        if not self._conn.poll(timeout):
            self.kill()
            raise TimeoutError(f"child {self.process.pid} not ready within {timeout}s")
        msg = self._conn.recv()
        if msg != ("ready",):
            self.kill()
            raise RuntimeError(f"unexpected message from gated child: {msg!r}")

    def go(self):
        """Open the gate of a child started with ``gate=True``."""
        self._conn.send("go")

    def finished(self) -> bool:
        """True once the child has sent its result (not read yet) or it was read."""
        return self._done or self._conn.poll(0)

    def result(self, timeout: float = 15.0):
        """Return the function's result; raise ChildFailed if it raised.
        Bounded: a child silent for ``timeout`` seconds is killed."""
        if self._done:
            return self._value
        try:
            if not self._conn.poll(timeout):
                self.process.kill()
                self.process.join(2)
                raise TimeoutError(f"child {self.process.pid} gave no result within {timeout}s")
            try:
                msg = self._conn.recv()
            except EOFError:
                self.process.join(2)
                raise ChildFailed(
                    "EOFError", "child died without a result", exitcode=self.process.exitcode
                ) from None
        finally:
            self._conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self._done = True
        if msg[0] == "ok":
            self._value = msg[1]
            return self._value
        _, exc_type, message, tb = msg
        raise ChildFailed(exc_type, message, tb, self.process.exitcode)

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join(2)


def start_child(ctx, func, *args, gate=False, **kwargs) -> ChildHandle:
    """Run ``func(*args, **kwargs)`` in a child process of context ``ctx``.
    With ``gate=True`` the child waits for ``handle.go()`` before calling."""
    return ChildHandle(ctx, func, args, kwargs, gate)


def run_child(ctx, func, *args, timeout=15.0, **kwargs):
    """Run ``func`` in a child process and return its result."""
    return start_child(ctx, func, *args, **kwargs).result(timeout)


def call_a(proxy):
    """(a child) A proxy's `a()`, as the child sees it."""
    return proxy.a()


def subprocess_env(**extra: str) -> dict:
    """Environment for ``subprocess.run([sys.executable, ...])`` children that
    must import ``procshare`` and ``_workers`` as this process does."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# Referent classes and callables registered on custom managers
# ---------------------------------------------------------------------------


class Counter:
    """The seed document's example."""

    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1

    def get_count(self):
        return self.count


class SlowCounter:
    """Read-modify-write with a pause in between: concurrent calls on one
    object lose updates almost surely, serial calls never do."""

    def __init__(self):
        self.count = 0

    def increment(self):
        current = self.count
        time.sleep(0.001)
        self.count = current + 1

    def get_count(self):
        return self.count

    def hold(self, seconds):
        """A call that outlasts procshare's patience (the turns test)."""
        time.sleep(seconds)


class Flag:
    """Waits on a module-level condition, which procshare's concurrency rule
    cannot see: the object is serial by default, and its wait_for() runs until
    another call's set()."""

    def __init__(self):
        self.value = False
        self.waiters = 0

    def set(self):
        with _FLAG_COND:
            self.value = True
            _FLAG_COND.notify_all()

    def waiting(self):
        return self.waiters > 0

    def wait_for(self, timeout):
        with _FLAG_COND:
            self.waiters += 1
            try:
                return _FLAG_COND.wait_for(lambda: self.value, timeout)
            finally:
                self.waiters -= 1


_FLAG_COND = threading.Condition()


class Exiter:
    def exit(self, code):
        raise SystemExit(code)

    def interrupt(self):
        raise KeyboardInterrupt

    def ok(self):
        return "ok"


class Sleeper:
    def nap(self, seconds):
        """Sleep in the server; return (start, end) on the server's clock."""
        start = time.monotonic()
        time.sleep(seconds)
        return (start, time.monotonic())


class DictGate:
    """Keeps its events in a dict: wait() blocks until another call opens it."""

    def __init__(self):
        self.state = {"opened": threading.Event(), "waiting": threading.Event()}

    def wait(self, timeout):
        self.state["waiting"].set()
        return self.state["opened"].wait(timeout)

    def is_waiting(self):
        return self.state["waiting"].is_set()

    def open(self):
        self.state["opened"].set()


class SlotGate:
    """The same, with a private slot holding a Condition."""

    __slots__ = ("__cond", "_opened", "_waiting")

    def __init__(self):
        self.__cond = threading.Condition()
        self._opened = self._waiting = False

    def wait(self, timeout):
        with self.__cond:
            self._waiting = True
            return self.__cond.wait_for(lambda: self._opened, timeout)

    def is_waiting(self):
        return self._waiting

    def open(self):
        with self.__cond:
            self._opened = True
            self.__cond.notify_all()


class CustomError(Exception):
    pass


class Thrower:
    def boom(self, msg):
        raise CustomError(msg)

    def ok(self):
        return "fine"

    def secret(self):
        return "should not be reachable"


class Child:
    def __init__(self, n):
        self.n = n

    def value(self):
        return self.n

    def bump(self):
        self.n += 1
        return self.n


class Parent:
    """``make_child`` is mapped to the typeid 'Child' by method_to_typeid."""

    def __init__(self):
        self._children = []

    def make_child(self, n):
        c = Child(n)
        self._children.append(c)
        return c

    def plain(self):
        return "plain"


class WithAttr:
    """A referent with a non-callable attribute exposed (cpython#118231)."""

    def __init__(self):
        self.attr = 42

    def method(self):
        return "method"


class Info:
    """Facts about the server process."""

    def pid(self):
        return os.getpid()

    def env(self, name):
        return os.environ.get(name)

    def init_value(self):
        return INIT_VALUE


INIT_VALUE = None


def init_server(value):
    """Manager initializer: runs in the server process."""
    global INIT_VALUE
    INIT_VALUE = value
    os.environ["PROCSHARE_TEST_INIT"] = value


SHARED_QUEUE = queue.Queue()


def get_queue():
    """The stdlib docs' remote-manager example returns one module-level queue."""
    return SHARED_QUEUE


class Box:
    """Exposed data beside a method: a plain attribute and two properties."""

    def __init__(self):
        self.size = 0
        self.items = []

    def add(self, x):
        self.items.append(x)
        self.size += 1

    @property
    def count(self):
        return len(self.items)

    @property
    def broken(self):
        raise LookupError("not ready")


class Obj:
    def a(self):
        return "a"

    def b(self, x):
        return ("b", x)

    def hidden(self):
        return "hidden"


# ---------------------------------------------------------------------------
# Manager and proxy classes, built lazily per implementation
# ---------------------------------------------------------------------------

IMPL_MODULES = {"stdlib": "multiprocessing.managers", "procshare": "procshare.managers"}
_BUILDERS = {}


def impl_name(managers) -> str:
    for name, modname in IMPL_MODULES.items():
        if managers.__name__ == modname:
            return name
    raise ValueError(f"unknown managers module {managers.__name__!r}")


def _builder(func):
    _BUILDERS[func.__name__] = func
    return func


def get_class(managers, kind: str):
    """``get_class(impl, 'CounterManager')`` -> that impl's class."""
    return getattr(sys.modules[__name__], f"{impl_name(managers)}__{kind}")


def __getattr__(name):  # PEP 562: build 'stdlib__X' / 'procshare__X' on demand
    impl, sep, kind = name.partition("__")
    if not sep or impl not in IMPL_MODULES or kind not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    managers = importlib.import_module(IMPL_MODULES[impl])
    cls = _BUILDERS[kind](managers)
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


@_builder
def CounterManager(m):
    class CounterManager(m.BaseManager):
        pass

    CounterManager.register("Counter", Counter)
    CounterManager.register("SlowCounter", SlowCounter)
    CounterManager.register("TheCounter", the_counter)     # one object, every time
    CounterManager.register("Sleeper", Sleeper)
    CounterManager.register("Flag", Flag)
    CounterManager.register("Exiter", Exiter)
    CounterManager.register("DictGate", DictGate)
    CounterManager.register("SlotGate", SlotGate)
    return CounterManager


#: what the stdlib-signature `_finalize_manager` below saw, per call: (the number of
#: arguments, whether `_Client` was callable, what `dispatch` of 'shutdown' did)
FINALIZED: list = []


@_builder
def OwnFinalizeManager(m):
    """`_finalize_manager` overridden with the stdlib's own signature and body
    (3.10's has no shutdown_timeout), as a subclass copied from the stdlib has it."""

    def finalize(process, address, authkey, state, _Client, *rest):
        outcome = "not alive"
        if process.is_alive():
            try:
                conn = _Client(address, authkey=authkey)
                try:
                    m.dispatch(conn, None, "shutdown")
                    outcome = "sent"
                finally:
                    conn.close()
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
            process.join(timeout=rest[0] if rest else 1.0)
            if process.is_alive() and hasattr(process, "terminate"):
                process.terminate()
                process.join(timeout=1.0)
        state.value = m.State.SHUTDOWN
        FINALIZED.append((5 + len(rest), callable(_Client), outcome))

    if sys.version_info >= (3, 11):
        def _finalize_manager(process, address, authkey, state, _Client, shutdown_timeout):
            finalize(process, address, authkey, state, _Client, shutdown_timeout)
    else:
        def _finalize_manager(process, address, authkey, state, _Client):
            finalize(process, address, authkey, state, _Client)

    class OwnFinalizeManager(m.BaseManager):
        pass

    OwnFinalizeManager._finalize_manager = staticmethod(_finalize_manager)
    OwnFinalizeManager.register("Counter", Counter)
    return OwnFinalizeManager


@_builder
def RaisingFinalizeManager(m):
    """`_finalize_manager` overridden with the stdlib's signature by a subclass
    whose override fails before it stops anything."""

    class RaisingFinalizeManager(m.BaseManager):
        @staticmethod
        def _finalize_manager(process, address, authkey, state, _Client, *rest):
            raise RuntimeError("the override failed")

    RaisingFinalizeManager.register("Counter", Counter)
    return RaisingFinalizeManager


@_builder
def ParallelSleeperManager(m):
    # procshare only.  `serial=False` is procshare's per-type opt-out of the
    # "one call at a time per object" default for registered classes.
    class ParallelSleeperManager(m.BaseManager):
        pass

    ParallelSleeperManager.register("Sleeper", Sleeper, serial=False)
    return ParallelSleeperManager


@_builder
def StrictSleeperManager(m):
    # procshare only.  `serial=True`: calls queue behind a running one until it
    # returns, however long it takes (the default lets them start beside it
    # after `server.SERIAL_PATIENCE`).
    class StrictSleeperManager(m.BaseManager):
        pass

    StrictSleeperManager.register("Sleeper", Sleeper, serial=True)
    return StrictSleeperManager


@_builder
def QueueManager(m):
    class QueueManager(m.BaseManager):
        pass

    QueueManager.register("get_queue", callable=get_queue)
    return QueueManager


@_builder
def ParentManager(m):
    class ParentManager(m.BaseManager):
        pass

    ParentManager.register("Parent", Parent, method_to_typeid={"make_child": "Child"})
    # The result of make_child is wrapped by typeid 'Child'; no callable and
    # no manager method of its own.
    ParentManager.register("Child", create_method=False)
    return ParentManager


@_builder
def ObjProxy(m):
    class ObjProxy(m.BaseProxy):
        _exposed_ = ("a", "b")

        def a(self):
            return self._callmethod("a")

        def b(self, x):
            return self._callmethod("b", (x,))

    return ObjProxy


@_builder
def ApiManager(m):
    class ApiManager(m.BaseManager):
        pass

    ApiManager.register("Obj", Obj, exposed=("a", "b"))
    ApiManager.register("ObjP", Obj, proxytype=get_class(m, "ObjProxy"))
    ApiManager.register("Hidden", Obj, create_method=False)
    ApiManager.register("Thrower", Thrower, exposed=("boom", "ok"))
    ApiManager.register("Info", Info)
    ApiManager.register("WithAttr", WithAttr, exposed=("attr", "method"))
    ApiManager.register("Lacking", Obj, exposed=("a", "nosuch"))
    ApiManager.register("BrokenProp", BrokenProp, exposed=("a", "size"))
    # method_to_typeid results that cannot be made into objects
    ApiManager.register("ToNowhere", Obj, exposed=("a",), method_to_typeid={"a": "nowhere"})
    ApiManager.register("ToObj", Obj, exposed=("a",), method_to_typeid={"a": "Obj"})
    ApiManager.register("ListIter", _list_iterator, proxytype=m.IteratorProxy)
    return ApiManager


def _list_iterator():
    return iter([1, 2])


# -- registered types the way projects customise them (a parity hunt's findings) --

class TaskQueue:
    """A class whose constructor takes `name` and `durable` of its own."""

    def __init__(self, name="default", durable=False):
        self.name, self.durable = name, durable

    def info(self):
        return self.name, self.durable


class Job:
    """An exposed property that fails until `run()`, and counts its reads."""

    def __init__(self):
        self._result = None
        self._reads = 0

    def run(self):
        self._result = 42

    def reads(self):
        return self._reads

    @property
    def result(self):
        self._reads += 1
        if self._result is None:
            raise ValueError("not ready")
        return self._result


class Keeper:
    """Keeps the exception one of its methods raised, and returns it later."""

    def __init__(self):
        self.kept = None

    def fail(self):
        try:
            raise ValueError("kept")
        except ValueError as e:
            self.kept = e
            raise

    def kept_error(self):
        return self.kept


class ThreadNamer:
    def name(self):
        return threading.current_thread().name


class Handlers:
    """An exposed property whose value is callable: a method, for a proxy."""

    def __init__(self):
        self.n = 0

    def bump(self, k=1):
        self.n += k
        return self.n

    def get(self):
        return self.n

    @property
    def handler(self):
        return self.bump


class SelfCaller:
    """A property whose getter calls back into its own object, through a proxy."""

    def __init__(self):
        self.me = None

    def set_me(self, proxy):
        self.me = proxy

    def get(self):
        return 5

    @property
    def via_me(self):
        return self.me.get() * 2


#: (in the manager) the names of the `Finalized` objects whose `__del__` ran
_FINALIZED: list = []


class Finalized:
    """An object whose destruction is seen: `Finalizations().names()`."""

    def __init__(self, name):
        self.name = name

    def ping(self):
        return self.name

    def __del__(self):
        _FINALIZED.append(self.name)


class Finalizations:
    def names(self):
        return list(_FINALIZED)


class Poller:
    def poll(self, timeout):
        time.sleep(timeout + 0.3)     # waits up to `timeout`, then some work
        return "done"


class Handle:
    """A user-facing wrapper that a `proxytype=` factory returns."""

    def __init__(self, proxy):
        self._p = proxy

    def value(self):
        return self._p.a()


@_builder
def make_handle(m):
    def make_handle(token, serializer, manager=None, authkey=None, exposed=None,
                    incref=True, manager_owned=False):
        return Handle(m.AutoProxy(token, serializer, manager=manager, authkey=authkey,
                                  exposed=exposed, incref=incref, manager_owned=manager_owned))
    return make_handle


@_builder
def stdlib_style_autoproxy(m):
    original = m.AutoProxy      # (before the patch: built before it is applied)

    def stdlib_style_autoproxy(token, serializer, manager=None, authkey=None, exposed=None,
                               incref=True, manager_owned=True):
        """A widely copied patch of `managers.AutoProxy` (its `manager_owned`
        defaults to True), with the stdlib's signature."""
        return original(token, serializer, manager=manager, authkey=authkey,
                        exposed=exposed, incref=incref, manager_owned=manager_owned)
    return stdlib_style_autoproxy


@_builder
def PollerProxy(m):
    class PollerProxy(m.BaseProxy):
        """A proxy type with a `_timeout` attribute of its own."""

        _exposed_ = ("poll",)

        def __init__(self, *args, **kwds):
            super().__init__(*args, **kwds)
            self._timeout = 0.05

        def poll(self):
            return self._callmethod("poll", (self._timeout,))

    return PollerProxy


class Totals:
    """Exposed data that is neither a property nor a plain value."""

    plain = 1

    @functools.cached_property
    def total(self):
        return 42


Point = collections.namedtuple("Point", "x y")


def make_point():
    return Point(1, 2)


@_builder
def WrapperClass(m):
    class WrapperClass:
        """A proxytype that is a class of the user's, not a proxy type: it
        wraps the AutoProxy it makes (the stdlib's signature, `incref` too)."""

        def __init__(self, token, serializer, manager=None, authkey=None, exposed=None,
                     incref=True, manager_owned=False):
            self._p = m.AutoProxy(token, serializer, manager=manager, authkey=authkey,
                                  exposed=exposed, incref=incref, manager_owned=manager_owned)

        def value(self):
            return self._p.a()

    return WrapperClass


@_builder
def ClientSettingProxy(m):
    class ClientSettingProxy(m.BaseProxy):
        """Sets `_Client` in `__init__`, as the stdlib's BaseProxy does."""

        _exposed_ = ("a",)

        def __init__(self, token, serializer, *args, **kwds):
            super().__init__(token, serializer, *args, **kwds)
            self._Client = m.listener_client[serializer][1]

        def a(self):
            return self._callmethod("a")

    return ClientSettingProxy


@_builder
def OwnNamesProxy(m):
    class OwnNamesProxy(m.BaseProxy):
        """A proxy type that uses, for its own ends, private names procshare's
        BaseProxy once used too (`_session`, `_epoch`, `_track`, ...)."""

        _exposed_ = ("a",)

        def __init__(self, *args, **kwds):
            super().__init__(*args, **kwds)
            self._session = {"user": "data"}
            self._epoch = "mine"

        def _mine(self, *args):
            return "mine"

        _track = _outcome = _lost = _reduced = _is_local = _deadline_for = _adopt = _mine

        def a(self):
            return self._callmethod("a")

    return OwnNamesProxy


@_builder
def CustomizedManager(m):
    class CustomizedManager(m.BaseManager):
        pass

    CustomizedManager.register("WrappedByClass", Obj, exposed=("a",),
                               proxytype=get_class(m, "WrapperClass"))
    CustomizedManager.register("Totals", Totals, exposed=("plain", "total"))
    CustomizedManager.register("Point", make_point, exposed=("x", "y"))
    CustomizedManager.register("ClientSetting", Obj, proxytype=get_class(m, "ClientSettingProxy"))

    CustomizedManager.register("TaskQueue", TaskQueue)
    CustomizedManager.register("Job", Job, exposed=("run", "reads", "result"))
    CustomizedManager.register("Keeper", Keeper)
    CustomizedManager.register("ThreadNamer", ThreadNamer)
    CustomizedManager.register("Finalized", Finalized)
    CustomizedManager.register("Handlers", Handlers, exposed=("handler", "bump", "get"))
    CustomizedManager.register("SelfCaller", SelfCaller, exposed=("set_me", "get", "via_me"))
    CustomizedManager.register("OwnNames", Obj, proxytype=get_class(m, "OwnNamesProxy"))
    CustomizedManager.register("Finalizations", Finalizations)
    CustomizedManager.register("Poller", Poller, proxytype=get_class(m, "PollerProxy"))
    CustomizedManager.register("Wrapped", Obj, exposed=("a",),
                               proxytype=get_class(m, "make_handle"))
    return CustomizedManager


class HardExiter:
    def exit(self, code):
        os._exit(code)


@_builder
def ExitingManager(m):
    class ExitingManager(m.SyncManager):
        pass

    ExitingManager.register("HardExiter", HardExiter)
    return ExitingManager


@_builder
def PublicListServer(m):
    import multiprocessing.managers as stdlib_managers

    class PublicListServer(m.Server):
        public = list(stdlib_managers.Server.public) + ["hello"]

        def hello(self, c):
            return "hello"

    return PublicListServer


@_builder
def PublicListManager(m):
    class PublicListManager(m.SyncManager):
        _Server = get_class(m, "PublicListServer")

    return PublicListManager


#: the typeids `CreateRecordingManager._create` was asked for
CREATED = []


@_builder
def CreateRecordingManager(m):
    class CreateRecordingManager(m.SyncManager):
        def _create(self, typeid, /, *args, **kwds):
            CREATED.append(typeid)
            return super()._create(typeid, *args, **kwds)

    CreateRecordingManager.register("WithAttr", WithAttr, exposed=("attr", "method"))
    return CreateRecordingManager


class BrokenProp(Obj):
    """An exposed property whose getter fails with AttributeError."""

    _data = None

    @property
    def size(self):
        return self._data.size


# ---------------------------------------------------------------------------
# Functions run in child processes
# ---------------------------------------------------------------------------


def increment_counter(counter, n):
    for _ in range(n):
        counter.increment()


def nap(sleeper, seconds):
    return sleeper.nap(seconds)


def _say_calling(calling, warm_up) -> None:
    """Before a call that blocks in the manager: `warm_up()` (a call that opens
    this thread's connection), then set Event `calling` (if any), so that the
    test's `blocked_in_call` sees the blocking call and not the connect."""
    if calling is not None:
        warm_up()
        calling.set()


def queue_get_timed(q, timeout, calling=None):
    """Return (item, seconds the get took); `calling`: see `_say_calling`."""
    _say_calling(calling, q.qsize)
    t0 = time.monotonic()
    item = q.get(timeout=timeout)
    return item, time.monotonic() - t0


def queue_put(q, item):
    q.put(item)


def joinable_consume(q, n):
    items = []
    for _ in range(n):
        items.append(q.get(timeout=10))
        q.task_done()
    return items


def remote_queue_server(impl, conn, authkey):
    """The stdlib docs' remote manager: serve forever over TCP, on a port the
    system picks (sent back on `conn` once it listens)."""
    cls = getattr(sys.modules[__name__], f"{impl}__QueueManager")
    m = cls(address=("127.0.0.1", 0), authkey=authkey)
    server = m.get_server()
    conn.send(server.address)
    conn.close()
    server.serve_forever()


def remote_queue_client_get(impl, address, authkey, timeout, calling=None):
    cls = getattr(sys.modules[__name__], f"{impl}__QueueManager")
    m = cls(address=address, authkey=authkey)
    m.connect()
    q = m.get_queue()
    _say_calling(calling, q.qsize)
    t0 = time.monotonic()
    item = q.get(timeout=timeout)
    return item, time.monotonic() - t0


def event_wait(ev, timeout, calling=None):
    _say_calling(calling, ev.is_set)
    return ev.wait(timeout)


def event_set(ev):
    ev.set()


def lock_try(lock, timeout):
    """acquire(blocking=False) and acquire(timeout=...) on a lock held elsewhere."""
    nb = lock.acquire(blocking=False)
    if nb:
        lock.release()
    t0 = time.monotonic()
    timed = lock.acquire(timeout=timeout)
    elapsed = time.monotonic() - t0
    if timed:
        lock.release()
    return nb, timed, elapsed


def lock_release(lock):
    lock.release()
    return True


def rlock_release_foreign(lock):
    try:
        lock.release()
    except RuntimeError as exc:
        return ("RuntimeError", str(exc))
    return ("released", "")


def condition_wait(cond, ready, timeout):
    with cond:
        ready.set()
        return cond.wait(timeout)


def condition_wait_for(cond, flag, timeout, holding=None):
    """`holding`: an Event set once this process holds the condition's lock,
    which its wait releases."""
    with cond:
        if holding is not None:
            holding.set()
        return cond.wait_for(lambda: flag.value == 1, timeout)


def barrier_wait(barrier, timeout):
    return barrier.wait(timeout)


def barrier_wait_broken(barrier, timeout):
    try:
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        return "BrokenBarrierError"
    return "passed"


def square(x):
    return x * x


def add(x, y):
    return x + y


def use_nested(d, outer):
    """A Queue proxy stored in a managed dict, a managed list in a managed list."""
    d["q"].put("from-child")
    outer[0].append("child")
    return (d["q"].qsize(), outer[0][:], len(outer))


def dict_iter(d):
    return sorted(d)


def make_child_in_child(parent, n):
    c = parent.make_child(n)
    return (c.value(), c.bump())


def pool_async_square(pool, x):
    return pool.apply_async(square, (x,)).get(timeout=10)


def list_snapshot(lst):
    return lst[:]


def get_list_from_queue(q, timeout):
    lst = q.get(timeout=timeout)
    lst.append(99)
    return lst[:]


def recv_list_proxy(conn, timeout):
    if not conn.poll(timeout):
        raise TimeoutError("no proxy received")
    lst = conn.recv()
    lst.append(99)
    return lst[:]


def use_proxies(lst, d, ns, q):
    lst.append("child")
    d["child"] = os.getpid()
    ns.x = ns.x + 1
    q.put("child")
    return (lst[:], sorted(d.keys()), ns.x)


def attr_read(proxy):
    v = proxy._callmethod("attr")
    return v


def thread_release(lock):
    """Release ``lock`` from another thread of this process; report the result."""
    out = []

    def run():
        try:
            lock.release()
            out.append(("released", ""))
        except RuntimeError as exc:
            out.append(("RuntimeError", str(exc)))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out[0] if out else ("hung", "")


# -- used by test_core.py ---------------------------------------------------------------


def make_lists_and_hang(address, n, ready):
    """Hold `n` managed lists, say so, then wait to be killed."""
    import procshare

    m = procshare.SyncManager(address=address)
    m.connect()
    held = [m.list([i]) for i in range(n)]
    ready.set()
    time.sleep(60)
    return len(held)


def add_one(value):
    return value + 1


def append_x(value):
    return value + ["x"]


def update_item_many(d, n):
    for _ in range(n):
        d.update_item("n", add_one)
    return True


def call_sent(thread, meth):
    """Has ``thread`` sent the request of its procshare call ``meth`` (it now
    waits for the reply)?  Read from the thread's stack: ``rid`` is bound in
    `Connection.call` once the request is written.  (The manager reports no
    waiter of a Queue's get, and an event set before a call does not prove
    the call was made.)"""
    from procshare.client.session import Connection

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code is Connection.call.__code__:
            local = frame.f_locals
            return local.get("meth") == meth and "rid" in local
        frame = frame.f_back
    return False


def block_in_get_sent(q, ready):
    """``q.get()`` in a thread of its own; ``ready`` is set once that get's
    request has gone to the manager (`call_sent`).  Then wait with it."""
    getter = threading.Thread(target=q.get, name="getter", daemon=True)
    getter.start()
    deadline = time.monotonic() + GATE_TIMEOUT
    while not call_sent(getter, "get"):
        if time.monotonic() > deadline or not getter.is_alive():
            raise TimeoutError("the get() was never sent to the manager")
        time.sleep(0.005)
    ready.set()
    getter.join()


def call_after_manager_shutdown(d, conn):
    """Use `d`, say so on `conn`, wait until the parent has shut the manager
    down, then time one more call: (the exception's class name, seconds)."""
    len(d)
    conn.send("ready")
    if not conn.poll(10):
        raise TimeoutError("the parent never shut the manager down")
    conn.recv()
    t0 = time.monotonic()
    try:
        d["a"]
    except Exception as e:
        return type(e).__name__, time.monotonic() - t0
    finally:
        conn.close()
    return None, time.monotonic() - t0


def calls_after_manager_shutdown(d, conn):
    """Use `d` (and a pipelined call on it), say so on `conn`, wait until the
    parent has shut the manager down, then time three calls: on this thread's
    connection, from a new thread, and pipelined.  [(what, the exception's
    class names (its MRO), seconds, its message)]."""
    import procshare

    len(d)
    pipelined = procshare.async_(d)
    pipelined.get("a").result(10)
    conn.send("ready")
    if not conn.poll(10):
        raise TimeoutError("the parent never shut the manager down")
    conn.recv()
    conn.close()

    def in_thread():
        box = []

        def run():
            try:
                d["a"]
            except Exception as e:
                box.append(e)
        t = threading.Thread(target=run)
        t.start()
        t.join(15)
        if box:
            raise box[0]

    out = []
    for what, call in (("call", lambda: d["a"]), ("thread", in_thread),
                       ("pipelined", lambda: pipelined.get("a").result(10))):
        t0 = time.monotonic()
        try:
            call()
        except Exception as e:
            out.append((what, [c.__name__ for c in type(e).__mro__],
                        time.monotonic() - t0, str(e)))
        else:
            out.append((what, [], time.monotonic() - t0, "no error"))
    return out


def calls_across_a_new_manager_at_the_address(address, authkey, conn):
    """Connect to the manager at `address`; once the parent has shut it down
    (this process then reads its STOPPING frame) and started another at the
    same address, use that one through its crash and restart.  Talks with the
    parent on `conn`; returns [what happened at each step]."""
    import procshare

    def step(say):
        conn.send(say)
        if not conn.poll(30):
            raise TimeoutError(f"the parent never answered {say!r}")
        return conn.recv()

    first = procshare.SyncManager(address=address, authkey=authkey)
    first.connect()
    d = first.dict(a=1)
    step("connected")                   # the parent shuts the first manager down
    out = []
    try:
        d["a"]
        out.append("no error")
    except Exception as e:
        out.append(str(e))
    step("saw the shutdown")            # the parent starts another manager there
    second = procshare.SyncManager(address=address, authkey=authkey)
    second.connect()
    d2 = second.dict(durable=True)
    d2["b"] = 1
    step("used the new one")            # the parent SIGKILLs its server
    t0 = time.monotonic()
    try:
        d2["b"] = 2
        out.append(("after the crash", d2["b"], time.monotonic() - t0))
    except Exception as e:
        out.append(("after the crash", f"{type(e).__name__}: {e}", time.monotonic() - t0))
    conn.close()
    return out


def exit_after_manager_shutdown(d, conn, stuck_control=False):
    """Use `d` (this process now has connections to its manager), say so on
    `conn`, and return once the parent has shut the manager down: the
    process then exits, saying goodbye to a manager that is gone.
    `stuck_control`: its control connection has a request abandoned (as a
    Ctrl-C during a control call leaves it), so the goodbye must reconnect."""
    len(d)
    if stuck_control:
        d._procshare_session.control.pending.add(999)     # (this manager's session: a forked
    conn.send("ready")                          # child has its parent's others too)
    if not conn.poll(10):
        raise TimeoutError("the parent never shut the manager down")
    conn.recv()
    conn.close()


def durable_manager_class():
    """A procshare SyncManager with the seed's Counter registered as durable
    (snapshot mode: `get_count` is a read, `increment` a mutator)."""
    cls = globals().get("DurableCounterManager")
    if cls is None:
        import procshare

        class DurableCounterManager(procshare.SyncManager):
            pass

        DurableCounterManager.register("Counter", Counter, durable="snapshot",
                                       mutators=("increment",))
        DurableCounterManager.__module__ = __name__
        globals()["DurableCounterManager"] = cls = DurableCounterManager
    return cls


def chaos_worker(w, counter, lst, q, d, stop, ops_done):
    """Until `stop` is set: increment, append, put+get and set, recording
    what each acknowledged call did.  Any error is recorded too: the test
    expects none (calls in flight at a crash are re-sent)."""
    acked = {"inc": 0, "append": [], "put": [], "got": [], "set": [], "errors": []}
    i = 0
    while not stop.is_set() and i < 100000:
        i += 1
        try:
            counter.increment()
            acked["inc"] += 1
            lst.append((w, i))
            acked["append"].append((w, i))
            q.put((w, i))
            acked["put"].append((w, i))
            acked["got"].append(q.get(timeout=10))
            d[f"{w}:{i}"] = i
            acked["set"].append(f"{w}:{i}")
        except Exception as e:
            acked["errors"].append(f"op {i}: {type(e).__name__}: {e}"[:300])
            if len(acked["errors"]) > 5:
                break
        with ops_done.get_lock():
            ops_done.value += 1
    return acked


def durable_mixed_writer(w, d, plain, n, go):
    """After `go`: n durable sets, each read back at once, with a plain call
    between them; then n pipelined durable sets, each followed by a pipelined
    plain call and a pipelined read of the set.  Returns what came back
    wrong (nothing, if every reply was its call's, in order)."""
    import procshare
    go.wait(30)
    wrong = []
    for i in range(n):
        d[f"k{w}"] = i
        plain[f"p{w}"] = i
        got = d[f"k{w}"]
        if got != i:
            wrong.append(f"set {i}: read back {got!r}")
    futures = []
    for i in range(n):
        futures.append((None, procshare.async_(d).__setitem__(f"a{w}", i)))
        futures.append((i - 1 if i else n - 1, procshare.async_(plain).get(f"p{w}")))
        futures.append((i, procshare.async_(d).get(f"a{w}")))
        plain_next = procshare.async_(plain).__setitem__(f"p{w}", i)
        futures.append((None, plain_next))
    for k, (want, f) in enumerate(futures):
        got = f.result(30)
        if got != want:
            wrong.append(f"pipelined call {k}: {got!r}, not {want!r}")
    return wrong


def durable_writer_until(w, d, stop, errors_every=0):
    """Set d[f"k{w}"] = i for i = 0, 1, ... until `stop` is set; every
    `errors_every` sets also read a missing key (a KeyError that must come
    back as one).  Returns the number of sets, or what went wrong."""
    i = 0
    while not stop.is_set() and i < 1_000_000:
        try:
            d[f"k{w}"] = i
        except Exception as e:      # (the manager shut down under us: the test says)
            return f"set {i}: {type(e).__name__}: {e}"
        i += 1
        if errors_every and i % errors_every == 0:
            try:
                d[f"missing{w}"]
            except KeyError as e:
                if e.args != (f"missing{w}",):
                    return f"the KeyError said {e.args!r}"
            else:
                return "reading a missing key raised nothing"
    return i


def probe_loaded(i, path):
    """(in the manager, when a Probe is unpickled) Note it in `path`."""
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


class Probe:
    """Pickles to a call of `probe_loaded`: each unpickling leaves a line."""

    def __init__(self, i, path):
        self.i, self.path = i, path

    def __reduce__(self):
        return probe_loaded, (self.i, self.path)


def durable_writer_with_probes(w, d, plain, n, path, barrier=None):
    """n rounds of a few durable sets and an append of a Probe to a plain list
    (after `barrier`, if given: writers that start at once write at once)."""
    if barrier is not None:
        barrier.wait(20)        # (less than the tests' WAIT: a writer that never
                                # starts shows as a BrokenBarrierError)
    for i in range(n):
        for _ in range(4):
            d[f"k{w}"] = i
        plain.append(Probe(w * 100000 + i, path))
    return n


def durable_writer_then_blocking_get(w, d, q, started, n):
    """n durable sets, then a get on a plain queue that waits for the test's
    put (started says it is about to wait), then n more sets."""
    for i in range(n):
        d[f"k{w}"] = i
    started.set()
    item = q.get(timeout=30)
    for i in range(n, 2 * n):
        d[f"k{w}"] = i
    return item


def write_named_durable(address, authkey, conn) -> str:
    """Make three sets on the named durable dict "shared" (so the manager
    stores their replies), report this process's client id, and wait to be
    told to end."""
    import procshare
    from procshare.client import session
    m = procshare.SyncManager(address=address, authkey=authkey)
    m.connect()
    d = m.dict(durable=True, name="shared")
    for i in range(3):
        d[f"{os.getpid()}-{i}"] = i
    conn.send(session.client_id())
    if not conn.poll(60):
        return "never told to end"
    return "ended"


def hold_unnamed_durable(address, authkey, conn) -> str:
    """Make an unnamed durable dict, report its id, and keep it; when told
    ("go"), use it (after the manager restarted: re-attaching) and report its
    items; then wait to be told to end."""
    import procshare
    m = procshare.SyncManager(address=address, authkey=authkey)
    m.connect()
    d = m.dict(durable=True)
    d["x"] = 1
    conn.send(d._id)
    if not conn.poll(60):
        return "never told to go"
    conn.recv()
    d["y"] = 2
    conn.send(sorted(d.items()))
    if not conn.poll(60):
        return "never told to end"
    return "ended"


_THE_COUNTER = None


def the_counter():
    """A registered callable that returns one object every time (a singleton)."""
    global _THE_COUNTER
    if _THE_COUNTER is None:
        _THE_COUNTER = SlowCounter()
    return _THE_COUNTER



@_builder
def FivePartProxy(m):
    """A proxy whose __init__ has the stdlib's first five parameters only
    (no `incref`): the stdlib calls it that way."""
    class FivePartProxy(m.BaseProxy):
        _exposed_ = ("value", "bump", "make_child")

        def __init__(self, token, serializer, manager=None, authkey=None, exposed=None):
            super().__init__(token, serializer, manager, authkey, exposed)

        def value(self):
            return self._callmethod("value")

        def make_child(self, n):
            return self._callmethod("make_child", (n,))

    return FivePartProxy


@_builder
def FivePartManager(m):
    class FivePartManager(m.BaseManager):
        pass

    proxy = get_class(m, "FivePartProxy")
    FivePartManager.register("Child", Child, proxytype=proxy)
    FivePartManager.register("Parent", Parent, proxytype=proxy,
                             method_to_typeid={"make_child": "Made"})
    FivePartManager.register("Made", proxytype=proxy, create_method=False)
    return FivePartManager


# -- placement (test_placement.py) ------------------------------------------------

class AffinityReporter:
    """Reports the mask of the manager thread that runs the call, and of a
    child that thread forks: user code must never see a narrowed mask."""

    def mask(self):
        return sorted(os.sched_getaffinity(0))

    def forked_mask(self):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, repr(sorted(os.sched_getaffinity(0))).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            data = b""
            while chunk := os.read(r, 4096):
                data += chunk
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        return data.decode()

    def subprocess_mask(self):
        import subprocess
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()


def place_always():
    """(manager initializer) place every connection's waits, idle machine or not."""
    import procshare.transport.placement as placement
    placement.ALWAYS = True


@_builder
def AffinityManager(m):
    class AffinityManager(m.BaseManager):
        pass
    AffinityManager.register("AffinityReporter", AffinityReporter)
    return AffinityManager
