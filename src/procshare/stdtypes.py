"""What the stdlib's manager types and threading primitives do, shared by every backend.

Owns: `Namespace`, `Value` and `Array` (the plain SyncManager types, as
`multiprocessing.managers` defines them), `update_item` (the one-step update
behind `DictProxy.update_item`), `check_acquire_args` and
`check_wait_timeout` (threading's validation of `acquire(blocking,
timeout)` and of a wait's timeout), which create keywords are procshare's (`create_takes_durable`), the
concurrency rule's tests (`is_thread_safe`: which objects synchronize themselves; `never_waits`:
which serial ones keep strict turns) and the method
listings of a referent (`all_methods`, `public_methods`, and
`data_attributes`: which exposed names are data).

Rules it keeps:
- It imports nothing from procshare, so the local manager (`managers`,
  `server/`) and the Ray backend (`ray/`) share it without depending on each
  other.
- Behaviour, reprs and error texts are the stdlib's.
- `is_thread_safe` and `data_attributes` run no code of the object they look
  at (no property, no `__getattr__`) and copies what it reads in C, so another thread changing
  the object cannot break it; what it cannot read counts as no primitive.
"""

from __future__ import annotations

import array
import queue
import threading
import types
from _thread import allocate_lock as _allocate_lock
from itertools import islice
from multiprocessing import pool as mp_pool
from typing import Any

__all__ = ["Namespace", "Value", "Array", "update_item", "check_acquire_args", "check_wait_timeout",
           "is_thread_safe", "all_methods", "public_methods", "PRIMITIVE_TYPES",
           "THREAD_SAFE_TYPES"]


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


def update_item(obj: Any, key: Any, func: Any, default: Any, use_default: bool,
                missing: tuple = (KeyError, IndexError)) -> Any:
    """`obj[key] = func(obj[key])` (with `default` for a missing key when
    `use_default`); return the new value.  The caller makes it one step."""
    if use_default:
        try:
            old = obj[key]
        except missing:
            old = default
    else:
        old = obj[key]
    new = func(old)
    obj[key] = new
    return new


def check_acquire_args(blocking: bool, timeout: float | None, lock_style: bool) -> float | None:
    """Validate acquire() arguments like threading does; None means forever.
    `lock_style`: Lock/RLock's (blocking, timeout=-1); else Semaphore's.

    A lock's checks are its own: a fresh lock, which is free and so never
    waits, takes the same arguments, so every error (its type, its order,
    its words) is this Python's: `blocking` must be an int before 3.12, a
    NaN timeout is a ValueError, one the lock cannot wait for (inf, 1e10) an
    OverflowError, and a timeout that rounds to -1 (-0.9999999999) means
    forever."""
    if lock_style:
        if timeout is None:
            timeout = -1
        probe = _allocate_lock()
        probe.acquire(blocking, timeout)
        # (valid: a negative timeout is -1, or rounds to it)
        return None if timeout < 0 else float(timeout)
    if not blocking and timeout is not None:
        raise ValueError("can't specify timeout for non-blocking acquire")
    return timeout


def check_wait_timeout(timeout: Any) -> None:
    """Raise what `threading.Condition.wait(timeout)` raises for a timeout
    it cannot use, before it waits: what cannot be compared with 0 (a
    TypeError), and a positive one its lock cannot wait for (inf, 2**64: an
    OverflowError), checked by a fresh lock, which never waits.  NaN and
    negative timeouts are fine: such a wait returns at once."""
    if timeout is not None and timeout > 0:
        _allocate_lock().acquire(True, timeout)


# -- the concurrency rule ------------------------------------------------------------

#: threading primitives: an object holding one synchronizes itself
PRIMITIVE_TYPES: tuple = (
    threading.Event, threading.Condition, threading.Semaphore, threading.Barrier,
    type(threading.Lock()), type(threading.RLock()),
)
#: thread-safe stdlib types
THREAD_SAFE_TYPES: tuple = (
    queue.Queue, queue.SimpleQueue, mp_pool.Pool, mp_pool.ApplyResult, *PRIMITIVE_TYPES,
)
#: the SyncManager's containers, as their server holds them (`never_waits`)
_NEVER_WAITING = frozenset({dict, list, set, array.array, Namespace, Value})
#: how many items of a container attribute `is_thread_safe` looks at
_LOOK_INTO = 16
_MEMBER = type(type("_Slotted", (), {"__slots__": ("x",)}).__dict__["x"])


#: the SyncManager's typeids whose objects can be durable by a create's keyword:
#: `m.dict(durable=True, name=...)` (`create_takes_durable`)
DURABLE_TYPEIDS = frozenset({"dict", "list", "set", "Queue", "JoinableQueue", "Namespace",
                             "Value", "Array"})


def create_takes_durable(typeid: str, registered_durable: Any) -> bool:
    """Are a create's `durable=` and `name=` keywords procshare's options?
    Only for the typeids that can be durable by keyword (`DURABLE_TYPEIDS`)
    and those registered with `durable=`: any other typeid's callable gets
    them, as the stdlib's would (a class of yours may take a `durable` or
    `name` argument)."""
    return bool(registered_durable) or typeid in DURABLE_TYPEIDS


def never_waits(obj: Any) -> bool:
    """Is `obj` one of the SyncManager's containers (dict, list, set, Value,
    Array, Namespace), whose methods neither wait nor run long?  Their calls
    keep strict turns: the patience of serial objects (`server.SERIAL_PATIENCE`)
    is for methods that may wait for another call."""
    return type(obj) in _NEVER_WAITING


def is_thread_safe(obj: Any) -> bool:
    """The rule for `serial=None`: run calls concurrently if the object is a
    thread-safe stdlib type, one of procshare's primitives, its class declares
    `_procshare_concurrent_ = True`, or it carries its own threading
    primitive: as an attribute (in `__dict__` or a slot), or inside a dict,
    list, tuple or set attribute (its first `_LOOK_INTO` items): it
    synchronizes itself."""
    try:
        if getattr(type(obj), "_procshare_concurrent_", False) is True or \
                isinstance(obj, THREAD_SAFE_TYPES):
            return True
        try:
            attrs = object.__getattribute__(obj, "__dict__")    # (no __getattr__)
        except AttributeError:
            attrs = None
        # copied in C (atomic under the GIL): another thread may change them
        values = list(attrs.values()) if type(attrs) is dict else []
        if values and attrs.get("_procshare_concurrent_") is True:
            return True
        for cls in type(obj).__mro__:
            for slot in list(cls.__dict__.values()):
                if type(slot) is _MEMBER:       # a __slots__ member, read as stored
                    try:
                        values.append(slot.__get__(obj, cls))
                    except AttributeError:      # (unset)
                        pass
        for value in values:
            if isinstance(value, PRIMITIVE_TYPES):
                return True
            if isinstance(value, dict):
                items = list(islice(value.values(), _LOOK_INTO))
            elif isinstance(value, (list, tuple, set, frozenset)):
                items = list(islice(value, _LOOK_INTO))
            else:
                continue
            if any(isinstance(item, PRIMITIVE_TYPES) for item in items):
                return True
    except Exception:       # an object this cannot look into: no primitive seen
        return False
    return False


_DESCRIBED_IN_C = (types.MemberDescriptorType, types.GetSetDescriptorType)
#: what a class holds for its methods: reading one gives a method
_METHOD_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                 types.WrapperDescriptorType, types.ClassMethodDescriptorType, classmethod,
                 staticmethod)
_MISSING = object()


def data_attributes(obj: Any, names: Any) -> tuple[str, ...]:
    """Those of `names` that are data attributes of `obj`, not methods.  What
    the stdlib never does when it makes an object is run a property of it (one
    may fail, or act, before the object is ready): a property counts as data
    without running, as do a slot's or a plain value (read as stored);
    functions and the like are methods.  Only what nothing else tells is read
    (a `cached_property`, a namedtuple's field or another descriptor, a name
    only `__getattr__` gives, an attribute of a class), and counts as data if
    its value is not callable."""
    names = tuple(names)
    if isinstance(obj, type):   # (a class: its attributes, read as such)
        return tuple(name for name in names if _reads_as_data(obj, name))
    try:
        inst = object.__getattribute__(obj, "__dict__")     # (no __getattr__)
    except Exception:
        inst = None
    if not isinstance(inst, dict):
        inst = None
    elif type(inst) is not dict:    # (`self.__dict__ = self` in a dict subclass): read
        inst = dict(dict.items(inst))   # as stored, running none of its methods
    key = (type(obj), names)
    if inst is None:        # (a dict, a list...: the answer is its type's)
        got = _DATA_BY_TYPE.get(key)
        if got is not None:
            return got
    mro = type(obj).__mro__
    per_object: list = []
    got = tuple(name for name in names if _is_data(obj, name, inst, mro, per_object))
    if inst is None and not per_object and len(_DATA_BY_TYPE) < 1024:
        _DATA_BY_TYPE[key] = got
    return got


#: `data_attributes` of objects whose answer is their type's: (type, names) -> names
_DATA_BY_TYPE: dict[tuple, tuple] = {}


def _reads_as_data(obj: Any, name: str) -> bool:
    try:
        return not callable(getattr(obj, name))
    except Exception:
        return False


def _is_data(obj: Any, name: str, inst: dict | None, mro: tuple, per_object: list) -> bool:
    found = _MISSING
    for cls in mro:
        d = cls.__dict__
        if name in d:
            found = d[name]
            break
    try:
        if found is not _MISSING:
            kind = type(found)
            if isinstance(found, property):
                return True
            if kind in _DESCRIBED_IN_C:     # read in C: no code of the object runs
                per_object.append(name)
                return not callable(found.__get__(obj, mro[0]))
            overrides = hasattr(kind, "__set__") or hasattr(kind, "__delete__")
            if not overrides and inst is not None and name in inst:
                return not callable(inst[name])     # (the instance's own value wins)
            if isinstance(found, _METHOD_TYPES):
                return False
            if hasattr(kind, "__get__"):    # another descriptor: what it gives
                per_object.append(name)
                return _reads_as_data(obj, name)
            return not callable(found)
        if inst is not None and name in inst:
            return not callable(inst[name])
        if any("__getattr__" in cls.__dict__ for cls in mro):   # only it knows
            per_object.append(name)
            return _reads_as_data(obj, name)
        return False
    except Exception:           # (an unset slot, say)
        return False


def all_methods(obj: Any) -> list[str]:
    """Names of the methods of `obj`."""
    return [name for name in dir(obj) if callable(getattr(obj, name, None))]


def public_methods(obj: Any) -> list[str]:
    """Names of the methods of `obj` that do not start with '_'."""
    return [name for name in all_methods(obj) if name[0] != "_"]
