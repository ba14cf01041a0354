"""Diagnostics: find the first piece of a value that cannot be serialized.

Owns: turning "cannot pickle '_thread.lock' object" into *where*: the path to
the piece (``args[1]['cfg'][1] -> <_thread.lock object>``), what it is, and
which installed serializer would carry the value instead.  `client` calls
`arguments_error` when a request cannot be serialized, `server` calls
`result_text` when a result cannot.  Also which argument makes a call's
message too large for the manager (`check_message`).

Rules it keeps:
- Only runs after a serialization has failed, so it may be slow-ish; the hot
  path never comes here.  (`check_message` is the exception: it is asked
  of every message with out-of-band buffers or a body over the limit, costs
  a sum of buffer sizes, and searches for the largest argument only once a
  message is over.)
- It descends the way pickle does: into containers, then into the state and
  arguments an object's `__reduce_ex__` gives, and stops at the deepest piece
  that still fails on its own.  Long sequences are bisected, so a list of a
  million items costs about twenty trial serializations, not a million.
- It never serializes a proxy (that would take a reference for nothing), is
  bounded in depth and time, and never raises: in doubt it reports the whole
  value.
"""

from __future__ import annotations

import copyreg
import importlib.util
import io
import pickle
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from .. import errors
from .frames import frame_problem
from .records import is_proxy
from .serializers import PickleSerializer, Serializer, TypedSerializer, get_serializer

__all__ = ["Finding", "find_unserializable", "describe", "alternatives", "hint_for",
           "arguments_error", "check_message", "result_text"]

MAX_DEPTH = 64
TIME_BUDGET = 2.0      # seconds
_LINEAR = 8            # sequences up to this long are tried item by item


class Finding:
    """Where a value stops being serializable."""

    __slots__ = ("path", "obj", "error")

    def __init__(self, path: str, obj: Any, error: str) -> None:
        self.path = path
        self.obj = obj
        self.error = error

    @property
    def culprit(self) -> str:
        return describe(self.obj)

    def __repr__(self) -> str:
        return f"{self.path} -> {self.culprit}"


def describe(obj: Any) -> str:
    """A short, address-free description: ``<_thread.lock object>``."""
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"<function {getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}>"
    if isinstance(obj, type):
        mod = obj.__module__
        return f"<class {obj.__qualname__ if mod == 'builtins' else mod + '.' + obj.__qualname__}>"
    if isinstance(obj, types.ModuleType):
        return f"<module {obj.__name__!r}>"
    t = type(obj)
    mod = t.__module__
    name = t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"
    return f"<{name} object>"


def _short(value: Any, limit: int = 40) -> str:
    try:
        text = repr(value)
    except Exception:
        text = "<?>"
    if text.startswith("<") or " at 0x" in text:
        text = describe(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Search:
    def __init__(self, dumps: Callable[[Any], Any], objects: bool) -> None:
        self.dumps = dumps
        self.objects = objects      # descend into objects (the pickle family)
        self.deadline = time.monotonic() + TIME_BUDGET

    def error(self, obj: Any) -> str | None:
        """Why `obj` cannot be serialized, or None if it can."""
        if self.objects and is_proxy(obj):
            return None     # pickling a proxy takes a reference; proxies pickle anyway
        try:
            self.dumps(obj)
        except RecursionError:
            return "RecursionError: too deeply nested"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def children(self, obj: Any) -> Iterator[tuple[str, Any]]:
        t = type(obj)
        if isinstance(obj, (str, bytes, bytearray, int, float, complex, type(None))):
            return
        if isinstance(obj, (tuple, list)):
            yield from ((f"[{i}]", x) for i, x in enumerate(obj))
            return
        if isinstance(obj, dict):
            items = list(obj.items())
            yield from ((f"[{_short(k)}]", v) for k, v in items)
            yield from ((" (a key)", k) for k, _ in items)
            return
        if isinstance(obj, (set, frozenset)):
            yield from ((" (a set item)", x) for x in obj)
            return
        if not self.objects or is_proxy(obj) or \
                isinstance(obj, (type, types.FunctionType, types.ModuleType)):
            return
        reduce = getattr(obj, "__reduce_ex__", None)
        if reduce is None:
            return
        try:
            rv = reduce(5)
        except Exception:
            return
        if not isinstance(rv, tuple):
            return
        rv = rv + (None,) * (6 - len(rv))
        func, args, state, listitems, dictitems = rv[:5]
        if isinstance(args, tuple):
            for i, a in enumerate(args):
                if i == 0 and func in (copyreg.__newobj__, copyreg.__newobj_ex__) \
                        and a is t:
                    yield ".__class__", a
                elif i == 0 and func is copyreg._reconstructor:
                    continue
                else:
                    yield f".__reduce_ex__(5)[1][{i}]", a
        for part in (state if isinstance(state, tuple) else (state,)):
            if isinstance(part, dict):
                for k, v in part.items():
                    yield (f".{k}" if isinstance(k, str) else f"[{_short(k)}]"), v
            elif part is not None:
                yield ".__getstate__()", part
        if listitems is not None:
            try:
                yield from ((f"[{i}]", x) for i, x in enumerate(listitems))
            except Exception:
                pass
        if dictitems is not None:
            try:
                yield from ((f"[{_short(k)}]", v) for k, v in dictitems)
            except Exception:
                pass

    def first_failing(self, pairs: list[tuple[str, Any]]) -> tuple[str, Any, str] | None:
        """The first (step, child, error) whose child fails on its own."""
        lo, hi = 0, len(pairs)
        while hi - lo > _LINEAR and time.monotonic() < self.deadline:
            mid = (lo + hi) // 2
            if self.error([c for _, c in pairs[lo:mid]]) is not None:
                hi = mid
            elif self.error([c for _, c in pairs[mid:hi]]) is not None:
                lo = mid
            else:
                break      # only fails together: try them one by one
        for step, child in pairs[lo:hi]:
            err = self.error(child)
            if err is not None:
                return step, child, err
            if time.monotonic() > self.deadline:
                break
        return None


def _placeholder() -> None:
    return None


def trial_dumps(ser: Serializer) -> Callable[[Any], Any]:
    """`ser`'s dumps for trials: pickle-family serializers get a pickler that
    writes proxies as a placeholder, because pickling a real proxy takes a
    reference for the receiver (which would then be held until it expires)."""
    if not isinstance(ser, PickleSerializer):
        return ser.dumps
    from .serializers import CloudpickleSerializer, DillSerializer
    base: Any
    if isinstance(ser, CloudpickleSerializer):
        import cloudpickle
        base = getattr(cloudpickle, "CloudPickler", None) or cloudpickle.Pickler
    elif isinstance(ser, DillSerializer):
        import dill
        base = dill.Pickler
    elif type(ser) is PickleSerializer:
        from multiprocessing.reduction import ForkingPickler as base
    else:
        return ser.dumps

    class TrialPickler(base):  # type: ignore[misc, valid-type]
        def reducer_override(self, obj: Any) -> Any:
            if is_proxy(obj):
                return _placeholder, ()
            parent = getattr(super(), "reducer_override", None)
            return parent(obj) if parent is not None else NotImplemented

    def dumps(obj: Any) -> None:
        TrialPickler(io.BytesIO(), 5).dump(obj)
    return dumps


def find_unserializable(value: Any, serializer: Any, root: str = "value") -> Finding | None:
    """The deepest piece of `value` that `serializer` cannot serialize, with its
    path from `root`; None if `value` serializes after all."""
    ser = get_serializer(serializer)
    if isinstance(ser, TypedSerializer):
        ser = ser.inner
    search = _Search(trial_dumps(ser), isinstance(ser, PickleSerializer))
    err = search.error(value)
    if err is None:
        return None
    path, node, seen = root, value, {id(value)}
    try:
        for _ in range(MAX_DEPTH):
            if time.monotonic() > search.deadline:
                break
            pairs = [(s, c) for s, c in search.children(node) if id(c) not in seen]
            found = search.first_failing(pairs)
            if found is None:
                break
            step, node, err = found
            seen.add(id(node))
            path += step
    except Exception:
        pass
    return Finding(path, node, err)


def alternatives(value: Any, in_use: Serializer) -> list[str]:
    """Installed serializers, other than `in_use`, that can serialize `value`."""
    names = ["cloudpickle", "dill"]
    if not isinstance(get_serializer(in_use), TypedSerializer) and \
            get_serializer(in_use).name not in ("pickle", "cloudpickle", "dill"):
        names.insert(0, "pickle")
    out = []
    used = get_serializer(in_use)
    used_names = {used.name, getattr(getattr(used, "inner", None), "name", None)}
    for name in names:
        if name in used_names:
            continue
        if name != "pickle" and importlib.util.find_spec(name) is None:
            continue
        try:
            trial_dumps(get_serializer(name))(value)
        except Exception:
            continue
        out.append(name)
    return out


def _handle_types() -> tuple:
    """Files and sockets (without importing `socket`: an object can only be a
    socket if its module was imported already)."""
    sock = sys.modules.get("socket")
    return (io.IOBase, sock.socket) if sock is not None else (io.IOBase,)


def process_local(obj: Any) -> bool:
    """Objects that mean something in one process only: a copy would be a
    different, unrelated object (dill can copy a lock, but never usefully)."""
    import threading
    t = type(obj)
    return (t in (type(threading.Lock()), type(threading.RLock()), threading.Condition,
                  threading.Event, threading.Semaphore, threading.BoundedSemaphore)
            or getattr(t, "__module__", "").startswith(("multiprocessing.synchronize",
                                                         "multiprocessing.queues"))
            or isinstance(obj, _handle_types()))


def hint_for(obj: Any) -> str:
    """Advice for the classic unshareable objects."""
    import threading
    t = type(obj)
    if t in (type(threading.Lock()), type(threading.RLock()), threading.Condition,
             threading.Event, threading.Semaphore, threading.BoundedSemaphore):
        return ("A threading lock only works inside one process: share a manager's Lock "
                "instead (manager.Lock(), manager.RLock(), ...), or keep the lock inside the "
                "shared object.")
    mod = getattr(t, "__module__", "")
    if mod.startswith("multiprocessing.synchronize") or mod.startswith("multiprocessing.queues"):
        return ("multiprocessing's own locks and queues can only be handed to a child "
                "process when it starts (Process(args=...)); through a manager, use the "
                "manager's versions: manager.Lock(), manager.Queue(), ...")
    if isinstance(obj, _handle_types()):
        return ("Open files and sockets belong to one process: send the path or address "
                "and open it on the other side.")
    if isinstance(obj, types.GeneratorType):
        return "Generators cannot be sent: send list(generator) instead."
    if isinstance(obj, (types.FunctionType, type)) and not alternatives_possible():
        return ("Functions and classes travel by name with pickle, so they must be defined "
                "at module level; cloudpickle or dill (not installed here: pip install "
                "cloudpickle) would send lambdas, closures and local classes by value.")
    if isinstance(obj, (types.FunctionType, type)):
        return ("pickle sends functions and classes by name: define them at module level "
                "of an importable module.")
    return ""


def alternatives_possible() -> bool:
    return any(importlib.util.find_spec(n) is not None for n in ("cloudpickle", "dill"))


def _call_label(oid: Any, meth: str, args: tuple,
                typeid: str | None = None) -> tuple[str, Any, str]:
    """(what the call is, the arguments to diagnose, their root name)."""
    if oid is None and meth in ("create", "create_full") and args:
        return f"{args[0]}() (creating a shared object)", tuple(args[1:]), "args"
    if oid is None:
        return f"manager operation {meth!r}", args, "args"
    if typeid:
        return f"{meth}() on {typeid!r} object {oid}", args, "args"
    return f"{meth}() on object {oid}", args, "args"


def arguments_error(cause: BaseException, serializer: Any, oid: Any, meth: str, args: tuple,
                    kwds: dict, typeid: str | None = None) -> BaseException:
    """The error to raise when `(oid, meth, args, kwds)` could not be serialized
    (`typeid`: the object's, to name it, where the caller knows it).

    procshare's own errors (a proxy in the arguments whose manager is gone,
    say) are returned as they are; anything else a pickler raised, an OSError
    from a `__reduce__` too, is about the arguments (nothing was sent)."""
    if isinstance(cause, errors.ProcshareError):
        return cause
    try:
        ser = get_serializer(serializer)
        what, args, root = _call_label(oid, meth, args, typeid)
        finding = find_unserializable(args, ser, root)
        if finding is None and kwds:
            finding = find_unserializable(kwds, ser, "kwds")
        if finding is None:
            finding = Finding("(the call message)", (oid, meth, args, kwds),
                              f"{type(cause).__name__}: {cause}")
        alts = [] if process_local(finding.obj) else alternatives((args, kwds), ser)
        return errors.arguments_not_serializable(
            cause, what, ser.name, finding.path, finding.culprit, alts,
            hint_for(finding.obj), method=meth, error=finding.error)
    except Exception:   # never hide the original error behind a broken diagnosis
        return cause


class _Tally:
    """A file that keeps only the count of the bytes written to it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.n += n
        return n


class _SizePickler(pickle.Pickler):
    """Pickles into a `_Tally`: buffers are counted, not copied, and a proxy is
    not pickled (that would lend the manager a reference)."""

    def persistent_id(self, obj: Any) -> Any:
        return 0 if is_proxy(obj) else None


def _message_size(value: Any) -> int:
    """About the bytes `value` adds to a message: a buffer's size, or what
    pickle (protocol 5) writes for it."""
    if is_proxy(value):
        return 0
    try:
        return memoryview(value).nbytes
    except TypeError:
        pass
    tally = _Tally()

    def count(buf: pickle.PickleBuffer) -> bool:
        tally.n += buf.raw().nbytes
        return False        # out of band: counted, not written

    _SizePickler(tally, 5, buffer_callback=count).dump(value)
    return tally.n


def check_message(limits: Any, body: bytes, bufs: Any, serializer: Any, oid: Any, meth: str,
                  args: tuple, kwds: dict, address: Any, typeid: str | None = None) -> None:
    """Raise MessageTooLarge for a call message `(body, bufs)` over the
    manager's `limits` (a `frames.Limits`), before anything is sent; naming
    the largest argument, found within the time budget (measured with plain
    pickle, whatever the serializer: a value it cannot pickle is skipped)."""
    total = len(body) + sum(memoryview(b).nbytes for b in bufs)
    problem = frame_problem(limits, len(body), total, len(bufs))
    if problem is None:
        return
    if meth == "#RETRY" and len(args) == 5:     # a durable call sent again: name the call
        meth, args, kwds = args[2], tuple(args[3]), dict(args[4])
    what, cargs, root = _call_label(oid, meth, args, typeid)
    path = culprit = ""
    items = [(f"{root}[{i}]", a) for i, a in enumerate(cargs)]
    items += [(f"kwds[{k!r}]", v) for k, v in kwds.items()]
    end = time.monotonic() + TIME_BUDGET
    largest = 0
    for name, value in items:
        try:
            size = _message_size(value)
        except Exception:   # never hide the limit behind a failed measurement
            continue
        if size > largest:
            largest, path, culprit = size, name, f"{describe(value)}, {size} bytes"
        if time.monotonic() > end:
            break
    many = (len(bufs) > limits.max_buffers and total <= limits.max_frame
            and len(body) <= min(limits.max_body, limits.max_frame))
    raise errors.message_too_large(what, address, total, problem, path, culprit,
                                   method=meth, buffers=many)


def result_text(cause: BaseException, serializer: Any, what: str, value: Any,
                root: str = "result") -> tuple[str, dict]:
    """In the manager: the message and facts for a result that could not be
    serialized (sent back in an UNSERIALIZABLE reply)."""
    ser = get_serializer(serializer)
    error = f"{type(cause).__name__}: {cause}"
    try:
        finding = find_unserializable(value, ser, root) or Finding(root, value, error)
        alts = [] if process_local(finding.obj) else alternatives(value, ser)
        hint = hint_for(finding.obj)
    except Exception:
        finding, alts, hint = Finding(root, value, error), [], ""
    error = finding.error or error
    text = errors.result_not_serializable_text(what, ser.name, finding.path, finding.culprit,
                                               error, alts, hint)
    return text, {"direction": "result", "path": finding.path, "culprit": finding.culprit,
                  "serializer": ser.name, "alternatives": alts, "error": error}
