"""Host actors: the Ray actors that hold shared objects and run calls on them.

One generic host class constructs the object from its registered callable and
dispatches calls by method name, with the local manager's rules: exposed
methods only, `#GETVALUE`, `__str__`/`__repr__`, `#UPDATE_ITEM`, data
attributes, `method_to_typeid` results.  A result that `method_to_typeid`
maps to a type becomes a *sub-object* hosted by the same actor (a dict's
iterator, a Parent's Child), named `<root id>/<n>`, so an iterator does not
cost a Ray worker process.

Owns: the host actor classes (`ProcshareHost` for sync code, one call at a
time or threaded; `ProcshareAsyncHost` for coroutines), the object table of
one actor, how a reply is made (`(kind, payload)` as on the wire), the remote
traceback, and durable objects' snapshots and reply dedupe.

Rules it keeps:
- A reply is `(Kind, payload)` exactly as the local server sends it, so the
  same `raise_reply` turns it into a value or an exception.  The referent's
  exception is returned as a value (with its traceback text), never raised
  into Ray, so Ray does not wrap it.
- Serial objects run in a sync actor with `max_concurrency=1`, in submission
  order per caller.  A call that waited in the actor's queue past its
  deadline does not run (TIMEOUT: "no effect").
- Objects made by a factory with `serial=None` run in a threaded actor and,
  unless the object turns out thread-safe, under one lock per object, decided
  after construction as the local server does.
- A durable object's host checks the (client id, request id) of every call
  against the replies it kept, runs it, and, if the object changed, writes a
  snapshot with the reply before it replies.  On a restart (`max_restarts`)
  the constructor loads the snapshot instead of building a new object.
- Blocking primitives run in the async host; a `ray.cancel()` reaches their
  wait as `CancelledError`, which the host lets through so Ray reports the
  call cancelled.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import secrets
import threading
import time
import traceback
import warnings
from typing import Any

import ray
from ray import cloudpickle

from ..client.session import client_id
from ..errors import NotExposedError, missing_method
from ..stdtypes import data_attributes, is_thread_safe, public_methods, update_item
from ..wire.kinds import Kind
from ..wire.records import Token
from .durable import Replies, SnapshotStore
from .primitives import CALLER, DeadlineExpired

__all__ = ["ProcshareHost", "ProcshareAsyncHost", "REGISTRY_NAME", "actor_name",
           "public_methods", "is_thread_safe", "MODES"]

REGISTRY_NAME = "procshare:registry"
# plain ints on the wire (an IntEnum member would pickle by reference, slower)
RETURN, ERROR, PROXY, TIMEOUT, TRACEBACK, WARNED = (
    int(Kind.RETURN), int(Kind.ERROR), int(Kind.PROXY), int(Kind.TIMEOUT),
    int(Kind.TRACEBACK), int(Kind.WARNED))
_SUB = -1   # internal: a method_to_typeid result, made into a sub-object by the caller

#: how objects of a type are hosted (chosen by the manager before creation)
MODES = ("serial", "threads", "auto", "async")

_VIEWS = (collections.abc.KeysView, collections.abc.ValuesView, collections.abc.ItemsView)
_BUILTIN_CONTAINERS = (dict, list, set)
#: methods of dict, list and set that never change them (a durable container
#: skips its snapshot for these)
_READ_ONLY = frozenset({
    "__getitem__", "__len__", "__contains__", "get", "keys", "values", "items", "copy",
    "count", "index", "__iter__", "__reversed__", "__or__", "__ror__", "__add__", "__mul__",
    "__rmul__", "__and__", "__rand__", "__sub__", "__rsub__", "__xor__", "__rxor__",
    "__ge__", "__gt__", "__le__", "__lt__", "difference", "intersection", "isdisjoint",
    "issubset", "issuperset", "symmetric_difference", "union", "fromkeys",
    "#GETVALUE", "__str__", "__repr__", "#INFO",
})


def actor_name(oid: str) -> str:
    """The name (in the manager's namespace) of the actor hosting object `oid`."""
    return "procshare:" + oid.partition("/")[0]


_initialized: set = set()


def _run_initializer(spec: dict) -> None:
    init = spec.get("initializer")
    if init is None:
        return
    key = (spec.get("address"), getattr(init, "__qualname__", repr(init)))
    if key not in _initialized:
        _initialized.add(key)
        init(*spec.get("initargs", ()))


class _Entry:
    __slots__ = ("obj", "typeid", "names", "exposed", "m2t", "attrs")

    def __init__(self, obj: Any, typeid: str, exposed: tuple, m2t: dict | None,
                 attrs: frozenset) -> None:
        self.obj, self.typeid, self.names, self.exposed, self.m2t, self.attrs = (
            obj, typeid, tuple(exposed), frozenset(exposed), m2t, attrs)


def _exposed_of(obj: Any, exposed: Any, m2t: dict | None) -> tuple:
    names = list(exposed) if exposed is not None else public_methods(obj)
    if m2t:
        if not isinstance(m2t, dict):
            raise TypeError("Method_to_typeid {!r}: type {!s}, not dict".format(m2t, type(m2t)))
        names += [m for m in m2t if m not in names]
    return tuple(names)


def _attrs_of(obj: Any, exposed: tuple) -> frozenset:
    return frozenset(data_attributes(obj, exposed))     # (running none of its code)


class _HostCore:
    """What both host classes share: construction, lookup, replies, durability."""

    def __init__(self, spec: dict) -> None:
        self.root: str = spec["oid"]
        self.typeid: str = spec["typeid"]
        self.address: str = spec["address"]
        self.namespace: str = spec["namespace"]
        self.specs: dict = spec.get("specs") or {}
        self.objects: dict[str, _Entry] = {}
        self.error: str | None = None
        self.lock: threading.Lock | None = None
        self.running: str | None = None
        self.incarnation = secrets.token_hex(2)     # new after a restart
        self.sub_ids = 0
        self.store: SnapshotStore | None = None
        self.replies: Replies | None = None
        self.last_body: bytes | None = None
        self._registry: Any = None
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():     # some Ray versions deprecate a helper it uses
            warnings.simplefilter("ignore")
            self.restarted = bool(getattr(ctx, "was_current_actor_reconstructed", False))
        self.node = ctx.get_node_id()
        try:
            _run_initializer(spec)
            obj, loaded = None, False
            durable = spec.get("durable")
            if durable:
                self.store = SnapshotStore(durable["dir"], self.root, durable["key"],
                                           durable.get("fsync", False))
                state = self.store.load()
                if state is not None:
                    self.last_body = state["obj"]
                    obj = cloudpickle.loads(self.last_body)
                    self.replies = Replies(state.get("replies"))
                    loaded = True
                else:
                    self.replies = Replies()
            if not loaded:
                callable_ = spec["callable"]
                obj = callable_(*spec.get("args", ()), **spec.get("kwds", {}))
            exposed = _exposed_of(obj, spec.get("exposed"), spec.get("m2t"))
            self.objects[self.root] = _Entry(obj, self.typeid, exposed, spec.get("m2t"),
                                             _attrs_of(obj, exposed))
            if spec.get("mode") == "auto" and not is_thread_safe(obj):
                self.lock = threading.Lock()
            if self.store is not None and not loaded:
                self.last_body = cloudpickle.dumps(obj)
                self.store.save({"obj": self.last_body, "replies": {}})
        except Exception:
            # like the stdlib: a constructor that raises is a RemoteError with the
            # traceback (the manager reports it and kills this actor)
            self.error = traceback.format_exc()

    # -- introspection (the manager and the session ask) --------------------------
    def describe(self) -> dict:
        root = self.objects.get(self.root)
        return {
            "error": self.error,
            "exposed": root.names if root is not None else (),
            "attrs": tuple(sorted(root.attrs)) if root is not None else (),
            "client": client_id(), "pid": os.getpid(), "node": self.node,
            "serial": self.lock is not None or self._mode_serial(),
            "restarted": self.restarted,
        }

    def _mode_serial(self) -> bool:
        return False

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": self.node, "actor": actor_name(self.root),
                "objects": len(self.objects), "running": self.running,
                "restarted": self.restarted, "durable": self.store is not None,
                "snapshot": self.store.path if self.store is not None else None}

    def drop(self, oid: str) -> None:
        """The registry released sub-object `oid`."""
        if oid != self.root:
            self.objects.pop(oid, None)

    # -- calls --------------------------------------------------------------------
    def _late(self, oid: str, meth: str) -> tuple:
        return (TIMEOUT, f"{self.typeid!r} object {oid} was still busy with other calls at the "
                         f"deadline: calls on it run one at a time, and {meth}() waited "
                         "behind them, so it did not run")

    def _begin(self, oid: str, meth: str, args: tuple, kwds: dict) -> tuple:
        """(reply, None, entry) when the call is answered here, or (None, fn, entry)
        when `fn(*args, **kwds)` is the call to make."""
        e = self.objects.get(oid)
        if e is None:
            return (TRACEBACK, self._gone_text(oid, meth)), None, None
        if meth in e.exposed:
            try:
                return None, getattr(e.obj, meth), e
            except Exception as exc:    # a RemoteError, as the stdlib's: one it lacks,
                # or one whose lookup failed (a property's getter): its traceback
                missing = missing_method(exc, e.obj, e.typeid, oid, meth, "its Ray actor")
                if missing is not None:
                    return (ERROR, missing), None, e
                return (TRACEBACK, "".join(traceback.format_exception(
                    type(exc), exc, exc.__traceback__))), None, e
        if meth == "#UPDATE_ITEM" and "__setitem__" in e.exposed:
            return None, _update_item_of(e.obj), e
        if meth == "#ATTR" and len(args) == 1 and not kwds and type(args[0]) is str \
                and args[0] in e.exposed:
            # a proxy reads exposed data: (True, value), or (False, None) if it is
            # callable (the proxy calls it as a method: see the server's `_attribute`)
            reply, fn, e = self._begin(oid, args[0], (), {})
            if reply is not None:
                return reply, None, e
            return (RETURN, (False, None) if callable(fn) else (True, fn)), None, e
        if meth in ("#GETVALUE", "__str__", "__repr__"):
            try:
                obj = e.obj
                value = obj if meth == "#GETVALUE" else str(obj) if meth == "__str__" \
                    else repr(obj)
            except Exception as exc:
                return (ERROR, self._with_tb(exc, oid)), None, e
            return (RETURN, value), None, e
        if meth == "#INFO":
            return (RETURN, self.info()), None, e
        if meth in getattr(e.obj, "_procshare_internal_", ()):
            return None, getattr(e.obj, meth), e
        exposed = ", ".join(sorted(e.exposed)) or "(none)"
        return (ERROR, NotExposedError(
            f"method {meth!r} of {type(e.obj).__name__} object (typeid {e.typeid!r}, "
            f"id {oid}) is not exposed; the exposed ones are: {exposed}. Add it to "
            f"exposed= when registering {e.typeid!r}, or call one of those.",
            typeid=e.typeid, method=meth, exposed=tuple(sorted(e.exposed)))), None, e

    def _finish(self, e: _Entry, meth: str, result: Any) -> tuple:
        m2t = e.m2t
        typeid = m2t.get(meth) if m2t else None
        if typeid:
            return (_SUB, (typeid, result))
        if isinstance(result, _VIEWS):      # like the stdlib: dict views travel as lists
            result = list(result)
        return (RETURN, result)

    def _failed(self, e: _Entry | None, fn: Any, oid: str, meth: str, args: tuple,
                kwds: dict, exc: Exception) -> tuple:
        if isinstance(exc, DeadlineExpired):
            return (TIMEOUT, str(exc))
        if (isinstance(exc, TypeError) and e is not None and not callable(fn)
                and meth in e.attrs and not args and not kwds):
            return (RETURN, fn)
        return (ERROR, self._with_tb(exc, oid))

    def _new_sub(self, typeid: str, value: Any) -> tuple:
        """Host `value` as a new object of type `typeid`: (oid, exposed, attrs, proxytype)."""
        spec = self.specs.get(typeid)
        if spec is None:
            raise KeyError(f"typeid {typeid!r} is not registered with this manager; "
                           f"known here: {sorted(self.specs)}")
        callable_, exposed, m2t, proxytype = spec
        obj = value if callable_ is None else callable_(value)
        exposed = _exposed_of(obj, exposed, m2t)
        self.sub_ids += 1
        oid = f"{self.root}/{self.incarnation}{self.sub_ids:x}"
        attrs = _attrs_of(obj, exposed)
        self.objects[oid] = _Entry(obj, typeid, exposed, m2t, attrs)
        return oid, exposed, tuple(sorted(attrs)), proxytype

    def _sub_reply(self, oid: str, exposed: tuple, attrs: tuple, proxytype: Any,
                   typeid: str) -> tuple:
        return (PROXY, (proxytype, exposed, Token(typeid, self.address, oid), attrs))

    def registry(self) -> Any:
        if self._registry is None:
            self._registry = ray.get_actor(REGISTRY_NAME, namespace=self.namespace)
        return self._registry

    def _gone_text(self, oid: str, meth: str) -> str:
        return (f"KeyError: {oid!r}: {meth}() found no object with this id in the actor "
                f"{actor_name(oid)!r} of the manager at {self.address!r} (pid {os.getpid()}). "
                "It was released when no process held a proxy to it any more (a proxy "
                "rebuilt from a bare Token does not keep its object alive), or its actor "
                "restarted. Keep a proxy for as long as the object is used, or create the "
                "object again.\n")

    def _with_tb(self, exc: BaseException, oid: str) -> BaseException:
        tb = exc.__traceback__
        if tb is not None:
            tb = tb.tb_next     # drop the dispatcher's own frame
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        e = self.objects.get(oid)
        what = f"{e.typeid!r} object {oid}" if e is not None else f"object {oid}"
        try:
            exc._procshare_remote_tb = (   # type: ignore[attr-defined]
                f'\n"""\nIn the Ray actor of {what} (pid {os.getpid()}, node '
                f'{self.node[:12]}):\n{text}"""')
        except Exception:
            pass
        exc.__traceback__ = None
        exc.__context__ = None
        return exc

    # -- durability ------------------------------------------------------------------
    def _dedupe(self, client: str, rid: int) -> tuple | None:
        if self.replies is None or not rid:
            return None
        return self.replies.get(client, rid)

    def _persist(self, oid: str, meth: str, client: str, rid: int, reply: tuple) -> tuple:
        """After a call on a durable object: snapshot it (with the reply) if it
        changed.  Returns the reply to send."""
        store = self.store
        assert store is not None and self.replies is not None
        root = self.objects[self.root].obj
        if meth in _READ_ONLY and isinstance(root, _BUILTIN_CONTAINERS):
            return reply
        try:
            body = cloudpickle.dumps(root)
            if body == self.last_body:
                return reply
            kept = reply
            try:
                cloudpickle.dumps(reply)
            except Exception:
                kept = (TRACEBACK, f"{meth}() ran before the actor restarted, but its reply "
                                   "could not be kept to send again\n")
            self.replies.put(client, rid, kept)
            store.save({"obj": body, "replies": self.replies.dump()})
            self.last_body = body
        except Exception as exc:
            note = (f"{meth}() on durable {self.typeid!r} object {oid} ran, but its snapshot "
                    f"could not be written ({type(exc).__name__}: {exc}): a restart of its "
                    "actor would lose this change")
            if reply[0] == RETURN:
                return (WARNED, (reply[1], [(RuntimeWarning, note)]))
        return reply


def _update_item_of(obj: Any) -> Any:
    return functools.partial(update_item, obj)


class ProcshareHost(_HostCore):
    """The host for sync code: `max_concurrency=1` (serial), or threaded."""

    def __init__(self, spec: dict) -> None:
        self._serial = spec.get("mode") == "serial"
        super().__init__(spec)

    def _mode_serial(self) -> bool:
        return self._serial

    def call(self, req: tuple) -> tuple:
        """Run one request `(oid, method, args, kwds, (client, thread, rid, deadline))`."""
        oid, meth, args, kwds, (client, _thread, rid, deadline) = req
        if deadline is not None and time.time() > deadline:
            return self._late(oid, meth)
        if self.replies is not None:
            hit = self._dedupe(client, rid)
            if hit is not None:
                return hit
        lock = self.lock
        if lock is not None:
            if deadline is None:
                lock.acquire()
            elif not lock.acquire(True, max(0.0, deadline - time.time())):
                return self._late(oid, meth)
        try:
            self.running = meth
            reply, fn, e = self._begin(oid, meth, args, kwds)
            if reply is None:
                try:
                    reply = self._finish(e, meth, fn(*args, **kwds))
                except Exception as exc:
                    reply = self._failed(e, fn, oid, meth, args, kwds, exc)
        finally:
            self.running = None
            if lock is not None:
                lock.release()
        if reply[0] == _SUB:
            reply = self._make_sub(client, *reply[1])
        if self.store is not None and oid == self.root:
            reply = self._persist(oid, meth, client, rid, reply)
        return reply

    def _make_sub(self, client: str, typeid: str, value: Any) -> tuple:
        try:
            oid, exposed, attrs, proxytype = self._new_sub(typeid, value)
            ray.get(self.registry().add_sub.remote(oid, typeid, exposed, client))
        except Exception as exc:
            return (ERROR, self._with_tb(exc, self.root))
        return self._sub_reply(oid, exposed, attrs, proxytype, typeid)


class ProcshareAsyncHost(_HostCore):
    """The host for coroutines (the blocking primitives): one event loop serves
    every waiting caller; `ray.cancel()` cancels a wait."""

    async def call(self, req: tuple) -> tuple:
        """Run one request `(oid, method, args, kwds, (client, thread, rid, deadline))`."""
        oid, meth, args, kwds, (client, thread, _rid, deadline) = req
        if deadline is not None and time.time() > deadline:
            return self._late(oid, meth)
        token = CALLER.set((client, thread, deadline))
        try:
            reply, fn, e = self._begin(oid, meth, args, kwds)
            if reply is None:
                try:
                    result = fn(*args, **kwds)
                    if inspect.isawaitable(result):
                        result = await result
                    reply = self._finish(e, meth, result)
                except Exception as exc:
                    reply = self._failed(e, fn, oid, meth, args, kwds, exc)
        finally:
            CALLER.reset(token)
        if reply[0] == _SUB:
            typeid, value = reply[1]
            try:
                sub, exposed, attrs, proxytype = self._new_sub(typeid, value)
                await self.registry().add_sub.remote(sub, typeid, exposed, client)
            except Exception as exc:
                return (ERROR, self._with_tb(exc, self.root))
            reply = self._sub_reply(sub, exposed, attrs, proxytype, typeid)
        return reply

    async def ping(self) -> int:
        return os.getpid()


RemoteHost = ray.remote(ProcshareHost)
RemoteAsyncHost = ray.remote(ProcshareAsyncHost)
