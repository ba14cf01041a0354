"""Durable effects: what a call on a durable object changed, as records that replay exactly.

Built-in containers (`dict`, `list`, `set`, `Queue`/`JoinableQueue`,
`Namespace`, `Value`, `Array`) journal the *effects* of each mutating call;
user classes are kept either as pickled snapshots (`mode="snapshot"`) or as a
log of their mutating calls (`mode="journal"`, for classes the user declares
deterministic).  `durable_apply(obj, typeid, method, args, kwds)` returns
`(result, effects)` and `replay(obj, typeid, effects)` applies them again;
`journal.py` stores them.

Owns: the *kinds* of durable object (`kind_for`) and, for each, which methods
mutate, how a mutating call is applied so that its effects come out as small
records (`Kind.apply`), how those records are replayed (`Kind.replay`), and
the whole state of an object for snapshots (`Kind.state` / `Kind.restore`).
Storage, HMACs and commits are `journal.py`'s job; nothing here touches a file.

Rules it keeps:
- Effects, not calls (Redis's rule): a record says what changed (`set k v`,
  `del i`, `take item n`), never what was asked, whenever the call's outcome
  could depend on something replay does not reproduce (arbitrary `set.pop`,
  `dict.popitem`, the function of `update_item`, a sort key).
- A call that fails before changing anything emits nothing.  A call that can
  fail half-way emits what it did change (`dict.update`: the pairs set before
  the bad one) or the object's whole state (`list.sort`, the multi-element
  `set` and `Array` operations), so replay never has to fail the same way.
- `update_item` (`#UPDATE_ITEM`) is journaled as the value it stored.
- Replaying the effects of a sequence of calls on a copy of the starting state
  gives an object equal to the live one (tested with random call sequences).
- A `Queue` journals every item as `("put", n, item)` and every removal as
  `("take", n)`, emitted by hooks on the queue instance while it holds the
  queue's own mutex, so records come out in the order items really moved.
  Only FIFO queues (a `deque` in `.queue`) are supported.
- `durable_apply` and `replay` are pure functions of the object: no lock is
  taken here except a queue's own mutex; callers serialize calls on one object
  (the server's serial lock).
"""

from __future__ import annotations

import array
import itertools
import operator
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..stdtypes import update_item

__all__ = ["Kind", "SNAPSHOT", "SAME_OBJECT", "BUILTIN_KINDS", "ReplayError", "kind_for",
           "durable_apply", "replay", "state_of", "restore"]

Emit = Callable[..., None]


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return self.name    # pickles as a reference to this module's constant


#: emitted by `mode="snapshot"` kinds: "store the object's whole state now"
SNAPSHOT = _Marker("SNAPSHOT")
#: stands for "the object itself" in a stored reply (`d |= x` returns `d`)
SAME_OBJECT = _Marker("SAME_OBJECT")


class ReplayError(Exception):
    """Replaying a stored record did not do what the original call did."""


def _native(obj: Any, method: str, args: tuple, kwds: dict) -> Any:
    return getattr(obj, method)(*args, **kwds)


class Kind:
    """How one kind of durable object is applied, replayed and snapshotted.

    `mutators` are the methods that may change the object; any other method is
    a read and is called as is.  `immediate` kinds emit `(effect, reply)` from
    inside the object's own critical section (queues); the others emit effects
    only, and the caller stages them with the reply once the call returns."""

    name = "?"
    mode = "effects"
    immediate = False
    all = False                         # every method is a mutator
    mutators: frozenset[str] = frozenset()

    def is_mutator(self, method: str) -> bool:
        return method in self.mutators

    def apply(self, obj: Any, method: str, args: tuple, kwds: dict, emit: Emit) -> Any:
        """Run a mutating call on `obj`; `emit` each effect, in order."""
        raise NotImplementedError

    def replay(self, obj: Any, effect: tuple) -> None:
        raise NotImplementedError

    def state(self, obj: Any) -> Any:
        """The whole state of `obj`, picklable."""
        raise NotImplementedError

    def restore(self, obj: Any, state: Any) -> Any:
        """Put `state` into `obj` (a fresh object from the factory, or None for
        user kinds) and return the object to use."""
        raise NotImplementedError

    def spec_args(self, args: tuple, kwds: dict) -> tuple[tuple, dict]:
        """The creation arguments worth storing: what `restore` needs a fresh
        object to have (a typecode, a maxsize), not the initial contents."""
        return (), {}

    def prepare(self, obj: Any, sink: Any) -> None:
        """Get `obj` ready to emit its effects into `sink` (queues only)."""


# -- dict ----------------------------------------------------------------------------------

def _pairs_via(method: str, args: tuple, kwds: dict) -> tuple[list, BaseException | None]:
    """The (key, value) pairs `dict.<method>(*args, **kwds)` would set, in order,
    and the error it would stop with (after setting the pairs before it)."""
    tmp: dict = {}
    try:
        getattr(tmp, method)(*args, **kwds)
    except Exception as e:
        return list(tmp.items()), e
    return list(tmp.items()), None




class DictKind(Kind):
    name = "dict"
    mutators = frozenset({"__setitem__", "__delitem__", "clear", "pop", "popitem",
                          "setdefault", "update", "__ior__", "#UPDATE_ITEM"})

    def apply(self, d: dict, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "__setitem__":
            d.__setitem__(*a, **k)
            emit(("set", a[0], a[1]))
            return None
        if m == "__delitem__":
            d.__delitem__(*a, **k)
            emit(("del", a[0]))
            return None
        if m == "clear":
            d.clear(*a, **k)
            emit(("clear",))
            return None
        if m == "pop":
            present = bool(a) and not k and len(a) <= 2 and a[0] in d
            r = d.pop(*a, **k)
            if present:
                emit(("del", a[0]))
            return r
        if m == "popitem":
            r = d.popitem(*a, **k)
            emit(("del", r[0]))
            return r
        if m == "setdefault":
            present = bool(a) and not k and len(a) <= 2 and a[0] in d
            r = d.setdefault(*a, **k)
            if not present:
                emit(("set", a[0], r))
            return r
        if m in ("update", "__ior__"):
            pairs, err = _pairs_via(m, a, k)
            if pairs:
                d.update(pairs)
                emit(("update", pairs))
            if err is not None:
                raise err
            return None if m == "update" else d
        if m == "#UPDATE_ITEM":
            new = update_item(d, *a, missing=(KeyError,), **k)
            emit(("set", a[0], new))
            return new
        return _native(d, m, a, k)

    def replay(self, d: dict, e: tuple) -> None:
        op = e[0]
        if op == "set":
            d[e[1]] = e[2]
        elif op == "del":
            del d[e[1]]
        elif op == "clear":
            d.clear()
        elif op == "update":
            d.update(e[1])
        elif op == "state":
            d.clear()
            d.update(e[1])
        else:
            raise ReplayError(f"unknown dict effect {op!r}")

    def state(self, d: dict) -> Any:
        return list(d.items())

    def restore(self, d: dict, state: Any) -> dict:
        d.clear()
        d.update(state)
        return d


# -- list ----------------------------------------------------------------------------------

class ListKind(Kind):
    name = "list"
    mutators = frozenset({"__setitem__", "__delitem__", "append", "extend", "insert", "pop",
                          "remove", "reverse", "sort", "clear", "__iadd__", "__imul__",
                          "#UPDATE_ITEM"})

    def apply(self, x: list, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "append":
            x.append(*a, **k)
            emit(("append", a[0]))
            return None
        if m in ("extend", "__iadd__"):
            if len(a) != 1 or k:
                return _native(x, m, a, k)      # the native arity error, no effect
            try:
                items = list(a[0])
            except Exception:
                return _native(x, m, a, k)      # the native error, no effect
            x.extend(items)
            emit(("extend", items))
            return None if m == "extend" else x
        if m == "insert":
            x.insert(*a, **k)
            emit(("insert", a[0], a[1]))
            return None
        if m == "__setitem__":
            x.__setitem__(*a, **k)
            emit(("set", a[0], a[1]))
            return None
        if m == "__delitem__":
            x.__delitem__(*a, **k)
            emit(("del", a[0]))
            return None
        if m == "pop":
            n = len(x)
            r = x.pop(*a, **k)
            i = operator.index(a[0]) if a else -1
            emit(("del", i + n if i < 0 else i))
            return r
        if m == "remove":
            if len(a) != 1 or k:
                return _native(x, m, a, k)
            try:
                i = x.index(a[0])
            except ValueError:
                return x.remove(a[0])           # raises the native message
            del x[i]
            emit(("del", i))
            return None
        if m == "reverse":
            x.reverse(*a, **k)
            emit(("reverse",))
            return None
        if m == "clear":
            x.clear(*a, **k)
            emit(("clear",))
            return None
        if m == "sort":
            # a sort key may be anything, and a failed sort leaves a permutation
            try:
                x.sort(*a, **k)
            finally:
                emit(("state", list(x)))
            return None
        if m == "__imul__":
            r = x.__imul__(*a, **k)
            emit(("imul", a[0]))
            return r
        if m == "#UPDATE_ITEM":
            new = update_item(x, *a, missing=(IndexError,), **k)
            emit(("set", a[0], new))
            return new
        return _native(x, m, a, k)

    def replay(self, x: list, e: tuple) -> None:
        op = e[0]
        if op == "append":
            x.append(e[1])
        elif op == "extend":
            x.extend(e[1])
        elif op == "insert":
            x.insert(e[1], e[2])
        elif op == "set":
            x[e[1]] = e[2]
        elif op == "del":
            del x[e[1]]
        elif op == "reverse":
            x.reverse()
        elif op == "clear":
            x.clear()
        elif op == "imul":
            x *= e[1]
        elif op == "state":
            x[:] = e[1]
        else:
            raise ReplayError(f"unknown list effect {op!r}")

    def state(self, x: list) -> Any:
        return list(x)

    def restore(self, x: list, state: Any) -> list:
        x[:] = state
        return x


# -- set -----------------------------------------------------------------------------------

class SetKind(Kind):
    name = "set"
    mutators = frozenset({"add", "discard", "remove", "pop", "clear", "update",
                          "difference_update", "intersection_update",
                          "symmetric_difference_update", "__ior__", "__iand__", "__isub__",
                          "__ixor__"})

    def apply(self, s: set, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "add":
            s.add(*a, **k)
            emit(("add", a[0]))
            return None
        if m == "discard":
            present = len(a) == 1 and not k and a[0] in s
            s.discard(*a, **k)
            if present:
                emit(("discard", a[0]))
            return None
        if m == "remove":
            s.remove(*a, **k)
            emit(("discard", a[0]))
            return None
        if m == "pop":
            r = s.pop(*a, **k)
            emit(("discard", r))
            return r
        if m == "clear":
            s.clear(*a, **k)
            emit(("clear",))
            return None
        if m in ("update", "difference_update", "__ior__", "__isub__") and not k:
            try:
                items = list(itertools.chain.from_iterable(a))
            except Exception:
                items = None
            try:
                r = _native(s, m, a, k)
            except Exception:
                emit(("state", list(s)))     # may have stopped half-way
                raise
            if r is NotImplemented:
                return r
            if items is None:
                emit(("state", list(s)))
            else:
                emit(("update" if m in ("update", "__ior__") else "discard_all", items))
            return r
        # intersection_update, symmetric_difference_update, __iand__, __ixor__
        try:
            r = _native(s, m, a, k)
        except Exception:
            emit(("state", list(s)))
            raise
        if r is not NotImplemented:
            emit(("state", list(s)))
        return r

    def replay(self, s: set, e: tuple) -> None:
        op = e[0]
        if op == "add":
            s.add(e[1])
        elif op == "discard":
            s.discard(e[1])
        elif op == "clear":
            s.clear()
        elif op == "update":
            s.update(e[1])
        elif op == "discard_all":
            s.difference_update(e[1])
        elif op == "state":
            s.clear()
            s.update(e[1])
        else:
            raise ReplayError(f"unknown set effect {op!r}")

    def state(self, s: set) -> Any:
        return list(s)

    def restore(self, s: set, state: Any) -> set:
        s.clear()
        s.update(state)
        return s


# -- Namespace, Value, Array ---------------------------------------------------------------

class NamespaceKind(Kind):
    name = "Namespace"
    mutators = frozenset({"__setattr__", "__delattr__"})

    def apply(self, ns: Any, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "__setattr__":
            ns.__setattr__(*a, **k)
            emit(("set", a[0], a[1]))
            return None
        if m == "__delattr__":
            ns.__delattr__(*a, **k)
            emit(("del", a[0]))
            return None
        return _native(ns, m, a, k)

    def replay(self, ns: Any, e: tuple) -> None:
        if e[0] == "set":
            setattr(ns, e[1], e[2])
        elif e[0] == "del":
            delattr(ns, e[1])
        elif e[0] == "state":
            self.restore(ns, e[1])
        else:
            raise ReplayError(f"unknown Namespace effect {e[0]!r}")

    def state(self, ns: Any) -> Any:
        return dict(vars(ns))

    def restore(self, ns: Any, state: Any) -> Any:
        vars(ns).clear()
        vars(ns).update(state)
        return ns


class ValueKind(Kind):
    name = "Value"
    mutators = frozenset({"set"})

    def apply(self, v: Any, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "set":
            v.set(*a, **k)
            emit(("set", a[0] if a else k["value"]))
            return None
        return _native(v, m, a, k)

    def replay(self, v: Any, e: tuple) -> None:
        if e[0] != "set":
            raise ReplayError(f"unknown Value effect {e[0]!r}")
        v.set(e[1])

    def state(self, v: Any) -> Any:
        return v.get()

    def restore(self, v: Any, state: Any) -> Any:
        v.set(state)
        return v

    def spec_args(self, args: tuple, kwds: dict) -> tuple[tuple, dict]:
        typecode = args[0] if args else kwds.get("typecode")
        return (typecode, None), {}


class ArrayKind(Kind):
    name = "Array"
    mutators = frozenset({"__setitem__", "__delitem__", "append", "extend", "insert", "pop",
                          "remove", "reverse", "byteswap", "frombytes", "fromlist",
                          "fromunicode", "__iadd__", "__imul__", "#UPDATE_ITEM"})

    def apply(self, arr: array.array, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "__setitem__":
            arr.__setitem__(*a, **k)
            emit(("set", a[0], a[1]))
            return None
        if m == "__delitem__":
            arr.__delitem__(*a, **k)
            emit(("del", a[0]))
            return None
        if m == "#UPDATE_ITEM":
            new = update_item(arr, *a, missing=(IndexError,), **k)
            emit(("set", a[0], new))
            return new
        try:
            r = _native(arr, m, a, k)
        except Exception:
            emit(("state", arr.tobytes()))
            raise
        emit(("state", arr.tobytes()))
        return r

    def replay(self, arr: array.array, e: tuple) -> None:
        if e[0] == "set":
            arr[e[1]] = e[2]
        elif e[0] == "del":
            del arr[e[1]]
        elif e[0] == "state":
            self.restore(arr, e[1])
        else:
            raise ReplayError(f"unknown Array effect {e[0]!r}")

    def state(self, arr: array.array) -> Any:
        return arr.tobytes()

    def restore(self, arr: array.array, state: Any) -> array.array:
        del arr[:]
        arr.frombytes(state)
        return arr

    def spec_args(self, args: tuple, kwds: dict) -> tuple[tuple, dict]:
        typecode = args[0] if args else kwds.get("typecode")
        return (typecode, []), {}


# -- Queue ---------------------------------------------------------------------------------

_queue_call = threading.local()     # .emit: where the current call's queue effects go


class _QueueBook:
    """The ids of the items in one durable queue, parallel to its deque."""
    __slots__ = ("ids", "next_id", "sink", "put0", "get0")

    def __init__(self, sink: Any) -> None:
        self.ids: deque[int] = deque()
        self.next_id = 1
        self.sink = sink        # fallback emit(effect, reply) when no call is current


class QueueKind(Kind):
    """A FIFO `queue.Queue` (or procshare's server-side Queue).  Hooks installed
    on the instance (`prepare`) record each item that moves, while the queue's
    mutex is held: `("put", n, item)`, `("take", n)`, and `("done",)` for
    `task_done`, which `apply` performs itself under the same mutex."""

    name = "Queue"
    immediate = True
    mutators = frozenset({"put", "put_nowait", "get", "get_nowait", "task_done"})

    def prepare(self, q: Any, sink: Any) -> None:
        if not isinstance(getattr(q, "queue", None), deque) or not hasattr(q, "mutex"):
            raise TypeError(f"a durable queue must be a FIFO queue.Queue (a deque in .queue), "
                            f"not {type(q).__name__}")
        book = getattr(q, "_ps_book", None)
        if book is not None:
            book.sink = sink
            return
        book = _QueueBook(sink)
        book.ids.extend(range(1, len(q.queue) + 1))
        book.next_id = len(q.queue) + 1
        put0, get0 = q._put, q._get
        book.put0, book.get0 = put0, get0

        def _put(item: Any) -> None:            # called with q.mutex held
            put0(item)
            n = book.next_id
            book.next_id = n + 1
            book.ids.append(n)
            _emit_now(book, ("put", n, item), None)

        def _get() -> Any:                      # called with q.mutex held
            item = get0()
            n = book.ids.popleft()
            _emit_now(book, ("take", n), item)
            return item

        q._ps_book = book
        q._put = _put
        q._get = _get

    def apply(self, q: Any, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        if m == "task_done":
            if a or k:
                return _native(q, m, a, k)
            book = _book(q)
            with q.all_tasks_done:
                unfinished = q.unfinished_tasks - 1
                if unfinished <= 0:
                    if unfinished < 0:
                        raise ValueError("task_done() called too many times")
                    q.all_tasks_done.notify_all()
                q.unfinished_tasks = unfinished
                _emit_now(book, ("done",), None, emit)
            return None
        old = getattr(_queue_call, "emit", None)
        _queue_call.emit = emit
        try:
            return _native(q, m, a, k)
        finally:
            _queue_call.emit = old

    def replay(self, q: Any, e: tuple) -> None:
        book = _book(q)
        op = e[0]
        with q.mutex:
            if op == "put":
                book.put0(e[2])
                book.ids.append(e[1])
                book.next_id = max(book.next_id, e[1] + 1)
                q.unfinished_tasks += 1
            elif op == "take":
                n = e[1]
                if book.ids and book.ids[0] == n:
                    book.ids.popleft()
                    book.get0()
                else:
                    try:
                        i = book.ids.index(n)
                    except ValueError:
                        raise ReplayError(f"queue effect takes item {n}, which is not in the "
                                          "queue") from None
                    del book.ids[i]
                    del q.queue[i]
            elif op == "done":
                q.unfinished_tasks = max(0, q.unfinished_tasks - 1)
            else:
                raise ReplayError(f"unknown Queue effect {op!r}")

    def state(self, q: Any) -> Any:
        """Call with `q.mutex` held."""
        book = _book(q)
        return {"items": list(zip(book.ids, q.queue)), "next_id": book.next_id,
                "unfinished": q.unfinished_tasks}

    def restore(self, q: Any, state: Any) -> Any:
        book = _book(q)
        with q.mutex:
            q.queue.clear()
            book.ids.clear()
            for n, item in state["items"]:
                q.queue.append(item)
                book.ids.append(n)
            book.next_id = state["next_id"]
            q.unfinished_tasks = state["unfinished"]
        return q

    def spec_args(self, args: tuple, kwds: dict) -> tuple[tuple, dict]:
        return tuple(args), dict(kwds)      # maxsize


def _book(q: Any) -> _QueueBook:
    book = getattr(q, "_ps_book", None)
    if book is None:
        QueueKind().prepare(q, None)
        book = q._ps_book
    return book


def _emit_now(book: _QueueBook, effect: tuple, reply: Any, emit: Emit | None = None) -> None:
    emit = emit or getattr(_queue_call, "emit", None) or book.sink
    if emit is not None:
        emit(effect, reply)


# -- user classes --------------------------------------------------------------------------

class SnapshotKind(Kind):
    """A user object stored as a pickle of itself after each mutating call."""
    name = "snapshot"
    mode = "snapshot"

    def __init__(self, mutators: Iterable[str] | None = None) -> None:
        self.all = mutators is None
        self.mutators = frozenset(mutators or ())

    def is_mutator(self, method: str) -> bool:
        return self.all or method in self.mutators

    def apply(self, obj: Any, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        try:
            return _native(obj, m, a, k)
        finally:
            emit(SNAPSHOT)

    def replay(self, obj: Any, e: tuple) -> None:
        raise ReplayError("snapshot-mode objects have no effects to replay")

    def state(self, obj: Any) -> Any:
        return obj

    def restore(self, obj: Any, state: Any) -> Any:
        return state

    def spec_args(self, args: tuple, kwds: dict) -> tuple[tuple, dict]:
        return tuple(args), dict(kwds)


class JournalKind(SnapshotKind):
    """A user object whose mutating calls are logged and re-run at recovery;
    for classes declared deterministic."""
    name = "journal"
    mode = "journal"

    def apply(self, obj: Any, m: str, a: tuple, k: dict, emit: Emit) -> Any:
        try:
            r = _native(obj, m, a, k)
        except BaseException:   # (SystemExit too: what it changed before is journaled)
            emit(("call", m, a, k, True))
            raise
        emit(("call", m, a, k, False))
        return r

    def replay(self, obj: Any, e: tuple) -> None:
        _, m, a, k, raised = e
        try:
            _native(obj, m, a, k)
        except BaseException as err:
            if raised:      # (SystemExit too, as the original call raised)
                return
            if not isinstance(err, Exception):
                raise
            raise ReplayError(f"replaying {m}() raised {type(err).__name__}: {err}, but the "
                              "original call returned: the class is not deterministic; "
                              "register it with durable='snapshot'") from err


# -- lookup and the pure API ---------------------------------------------------------------

BUILTIN_KINDS: dict[str, Kind] = {
    "dict": DictKind(), "list": ListKind(), "set": SetKind(), "Queue": QueueKind(),
    "JoinableQueue": QueueKind(), "Namespace": NamespaceKind(), "Value": ValueKind(),
    "Array": ArrayKind(),
}
MODES = ("effects", "snapshot", "journal")


def kind_for(typeid: str, mode: str | None = None,
             mutators: Iterable[str] | None = None) -> Kind:
    """The kind for a durable object of `typeid`.  `mode` None means "effects"
    for the built-in typeids and "snapshot" for any other."""
    if mode is None:
        mode = "effects" if typeid in BUILTIN_KINDS else "snapshot"
    if mode == "effects":
        try:
            return BUILTIN_KINDS[typeid]
        except KeyError:
            raise ValueError(f"typeid {typeid!r} has no effect journal (only the built-ins "
                             f"{', '.join(sorted(BUILTIN_KINDS))} do); use durable='snapshot' "
                             "or durable='journal'") from None
    if mode == "snapshot":
        return SnapshotKind(mutators)
    if mode == "journal":
        return JournalKind(mutators)
    raise ValueError(f"durable mode must be one of {', '.join(MODES)}, not {mode!r}")


def durable_apply(obj: Any, typeid: str, method: str, args: tuple = (),
                  kwds: dict | None = None, mode: str | None = None,
                  effects: list | None = None) -> tuple[Any, list]:
    """Call `obj.<method>(*args, **kwds)` and return `(result, effects)`: the
    records whose `replay` on a copy of the old state gives the new one.  The
    method's exception propagates; pass your own `effects` list to keep the
    effects a failing call had (they are appended as they happen)."""
    kind = kind_for(typeid, mode)
    kwds = kwds or {}
    if effects is None:
        effects = []
    if not kind.is_mutator(method):
        return _native(obj, method, args, kwds), effects
    if kind.immediate:
        kind.prepare(obj, None)
        sink = effects.append
        return kind.apply(obj, method, args, kwds, lambda e, reply=None: sink(e)), effects
    return kind.apply(obj, method, args, kwds, effects.append), effects


def replay(obj: Any, typeid: str, effects: Iterable[tuple], mode: str | None = None) -> Any:
    """Apply stored `effects` to `obj`, in order; return `obj`."""
    kind = kind_for(typeid, mode)
    if kind.immediate:
        kind.prepare(obj, None)
    for e in effects:
        kind.replay(obj, e)
    return obj


def state_of(obj: Any, typeid: str, mode: str | None = None) -> Any:
    """The whole state of `obj`, as `restore` takes it back."""
    kind = kind_for(typeid, mode)
    if kind.immediate:
        kind.prepare(obj, None)
        with obj.mutex:
            return kind.state(obj)
    return kind.state(obj)


def restore(obj: Any, typeid: str, state: Any, mode: str | None = None) -> Any:
    """Put a `state_of` result into a fresh `obj`; return the object to use."""
    kind = kind_for(typeid, mode)
    if kind.immediate:
        kind.prepare(obj, None)
    return kind.restore(obj, state)

