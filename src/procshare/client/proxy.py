"""Proxies: `BaseProxy`, `AutoProxy`, `MakeProxyType` and the proxy types of
`SyncManager`.

Owns: how a method call on a proxy becomes a request (`_callmethod`), how a
reply becomes a value or an exception, how proxies are pickled to other
processes, and when a proxy gives its reference back.

Rules it keeps:
- The stdlib's constructor signature, attributes (`_token`, `_id`,
  `_manager`, `_serializer`, `_authkey`, `_exposed_`, `_isauto`) and
  `__reduce__`/`RebuildProxy` shape, so user subclasses keep working; the
  private names procshare adds are `_procshare_*` (but the documented
  `_set_timeout`), so a subclass's own `_session` or `_track` stays its own.
- A proxy holds one reference for its process.  It never opens a connection
  for incref/decref: references travel on the session's control connection,
  and the reference a `create` or a method returning a proxy made is adopted
  as is.
- A pickled proxy carries a *loan*: a reference taken for it by the sender,
  which the receiver adopts.  So the object cannot die in transit.  The
  exceptions hold no reference: a proxy in a manager's journal (pickled
  with no loan, `_procshare_journal_reduce_`; a proxy to another manager
  comes back from it without a reference), and a proxy a manager's server
  inherited from the client that forked it (its reference is the client's).
- The deadline of a call is, in order: the `timeout=` of the call, the
  innermost `procshare.timeout()` block, the proxy's own
  (`_set_timeout`, kept as `_procshare_timeout`: a user's proxy type may
  have a `_timeout` of its own), the manager's `call_timeout`; `None` waits
  forever.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import types
import weakref
from multiprocessing import process, util
from multiprocessing.context import get_spawning_popen
from typing import Any

from ..errors import ObjectLost, object_lost
from ..inprocess import local_server, recovering
from ..wire.kinds import Kind
from ..wire.records import DURABLE_PREFIX, Token
from . import loans, scope
from .replies import call_timeout, convert_to_error, raise_reply
from .session import Client, Session, authkey_for, get_session, inherited_by_server

__all__ = [
    "BaseProxy", "RebuildProxy", "MakeProxyType", "AutoProxy", "IteratorProxy",
    "AcquirerProxy", "ConditionProxy", "EventProxy", "BarrierProxy", "NamespaceProxy",
    "ValueProxy", "BaseListProxy", "ListProxy", "DictProxy", "BaseSetProxy", "SetProxy",
    "ArrayProxy", "BasePoolProxy", "PoolProxy", "raise_reply", "convert_to_error",
]

_UNSET = scope.UNSET
#: how many restarts in a row a call on a durable object is re-sent across
RESEND_LIMIT = 8
_scope = scope._scope
_RETURN = Kind.RETURN


def _release(session: Session, ident: str, local: bool, pid: int) -> None:
    """Finalizer of a proxy (tracked in process `pid`): give its reference back."""
    if inherited_by_server(pid):
        return
    session.live -= 1
    if ident.startswith(DURABLE_PREFIX):
        session.durable_dropped(ident)
    if local:
        server = local_server()
        if server is not None:
            server.local_decref(ident)
        return
    session.control_send("decref", ident)


class _ClientOf:
    """`proxy._Client`: the function that opens a connection of its own to the
    manager, `_Client(address, authkey=...)`, for `dispatch` (the stdlib's
    attribute; a subclass may set its own, as the stdlib's `__init__` does)."""

    def __get__(self, proxy: Any, owner: Any = None) -> Any:
        if proxy is None:
            return self
        return functools.partial(Client, serializer=proxy._serializer)


class BaseProxy:
    """A proxy for a shared object: method calls go to the manager."""

    _Client = _ClientOf()

    _address_to_local: dict = {}
    _mutex = threading.Lock()
    _procshare_proxy_ = True     # how the wire layer recognises proxies (records.is_proxy)

    def __init__(self, token: Token, serializer: Any, manager: Any = None, authkey: Any = None,
                 exposed: Any = None, incref: bool = True, manager_owned: bool = False) -> None:
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        self._owned_by_manager = manager_owned
        if authkey is not None:
            self._authkey = process.AuthenticationString(authkey)
        elif manager is not None:
            self._authkey = manager._authkey
        else:
            self._authkey = process.current_process().authkey
        self._procshare_session = get_session(token.address, bytes(self._authkey), serializer)
        self._tls = self._procshare_session.tls
        # the manager's life this proxy belongs to
        self._procshare_epoch = self._procshare_session.epoch
        self._procshare_timeout = getattr(manager, "_call_timeout", _UNSET) if manager is not None \
            else _UNSET
        self._close = None
        if incref:
            self._incref()

    # -- references -------------------------------------------------------------
    def _procshare_is_local(self) -> bool:
        server = local_server()
        return server is not None and server.address == self._token.address

    def _procshare_track(self, local: bool) -> None:
        """This proxy now owns one reference: give it back when the proxy dies,
        the way it was taken: `local` (the server's own, `local_incref`), or
        this process's client's, through the session (a create, a reply that
        made a proxy, an incref sent).  Each reference is given back on its own:
        a proxy that `_incref()`s again holds one more (as the stdlib's, which
        registers a decref per incref)."""
        self._procshare_session.live += 1
        if self._id.startswith(DURABLE_PREFIX):
            self._procshare_session.durable_held(self._id)
        close = weakref.finalize(self, _release, self._procshare_session, self._id, local,
                                 os.getpid())
        close.atexit = False
        if self._close is None:
            self._close = close

    def _incref(self) -> None:
        local = self._procshare_is_local()
        if local:
            local_server().local_incref(self._id)
        else:
            self._procshare_session.control_call("incref", self._id)
        self._procshare_track(local)

    def _procshare_adopt(self, loan: str) -> None:
        local = self._procshare_is_local()
        if local:
            local_server().local_adopt(loan, self._id)
        else:
            self._procshare_session.control_call("adopt", loan, self._id)
        self._procshare_track(local)

    def _procshare_local_referent(self) -> Any:
        """Inside the manager that holds it: the referent itself."""
        server = local_server()
        if server is None or server.address != self._token.address:
            return self
        return server.objects.get(self._id).obj

    def _after_fork(self) -> None:
        """What the stdlib runs in a forked child for each proxy, for code that
        calls it itself: forget the manager object, take a reference of its
        own (procshare's children need neither: their proxies work as they
        are, through the fork's loan)."""
        self._manager = None
        try:
            self._incref()
        except Exception as e:
            util.info("incref failed: %s", e)

    def _connect(self) -> None:
        """Open this thread's connection to the manager now, if it has none
        that works (the stdlib's name; calls do it themselves)."""
        self._procshare_session.thread_conn()


    # -- calls --------------------------------------------------------------------
    def _callmethod(self, methodname: str, args: tuple = (), kwds: dict = {},  # noqa: B006
                    timeout: Any = _UNSET) -> Any:
        """Call a method of the referent and return a copy of the result.

        `timeout` (seconds, or None for no limit) bounds this call; without it
        the scoped, per-proxy and per-manager defaults apply.
        """
        conn = getattr(self._tls, "conn", None)
        if conn is None or conn.pending:
            conn = self._procshare_session.thread_conn()
        if timeout is _UNSET:
            timeout = self._procshare_deadline_for(timeout)
        try:
            kind, result = conn.call(self._id, methodname, args, kwds, timeout,
                                     self._token.typeid)
        except TimeoutError:
            raise call_timeout(self, _shown(methodname, args), timeout, False) from None
        except ObjectLost as e:
            if self._id.startswith(DURABLE_PREFIX):
                return self._procshare_resend(conn, methodname, args, kwds, timeout,
                                              getattr(e, "deadline", None))
            if self._procshare_epoch != self._procshare_session.epoch:
                raise self._procshare_lost(_shown(methodname, args)) from None
            # made after the restart, called on a connection from before it: the
            # call never reached the new manager; send it again there
            kind, result = self._procshare_session.thread_conn().call(
                self._id, methodname, args, kwds, timeout, self._token.typeid)
        if kind == _RETURN:
            return result
        try:
            return self._procshare_outcome(kind, result, _shown(methodname, args), timeout)
        finally:
            result = None   # an exception raised from here must not keep itself (a cycle)

    def _procshare_resend(self, conn: Any, methodname: str, args: tuple, kwds: dict,
                          timeout: float | None, deadline: float | None) -> Any:
        """A call on a durable object whose manager crashed while it was in
        flight: send it again to the restarted manager under the key of its
        first sending, so that it takes effect exactly once (the manager
        answers from its journal if it had already run).  The re-sends share
        the first sending's deadline."""
        first = (conn.no, conn.rid)
        shown = _shown(methodname, args)
        for _ in range(RESEND_LIMIT):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise call_timeout(self, shown, timeout, False)
            try:
                kind, result = self._procshare_session.thread_conn().call(
                    self._id, "#RETRY", (*first, methodname, args, kwds), {}, left,
                    self._token.typeid)
            except TimeoutError:
                raise call_timeout(self, shown, timeout, False) from None
            except ObjectLost:
                continue        # it crashed again: the supervisor gives up in the end
            if kind == _RETURN:
                return result
            try:
                return self._procshare_outcome(kind, result, shown, timeout)
            finally:
                result = None   # (as in _callmethod)
        raise self._procshare_lost(shown)

    def _procshare_lost(self, methodname: str) -> ObjectLost:
        s = self._procshare_session
        return object_lost(self._token.typeid, self._id, self._token.address,
                           s.incarnation or 0, None, methodname)

    def _procshare_deadline_for(self, timeout: Any) -> float | None:
        """The timeout a call gets: its own, else the innermost
        `procshare.timeout()` block, the proxy's, the manager's; None: forever."""
        if timeout is _UNSET:
            timeout = _scope.value
            if timeout is _UNSET:
                timeout = self._procshare_timeout
                if timeout is _UNSET:
                    timeout = None
        return timeout

    def _procshare_outcome(self, kind: int, result: Any, methodname: str,
                           timeout: float | None) -> Any:
        """What a reply that is not a plain RETURN means: a new proxy, or the
        error it stands for (raised)."""
        if kind == _RETURN:
            return result
        if kind == Kind.PROXY:
            return self._procshare_rebuild_returned(result)
        if kind == Kind.TRACEBACK and self._procshare_epoch != self._procshare_session.epoch:
            raise self._procshare_lost(methodname)    # made before the manager restarted
        try:
            return raise_reply(kind, result, self, methodname, timeout)
        finally:
            result = None   # (as in _callmethod)

    def _procshare_rebuild_returned(self, result: tuple) -> BaseProxy:
        proxytype, exposed, token, attrs = result
        token.address = self._token.address
        # the type this process's manager registered, as the stdlib takes it;
        # else the one the manager named; else AutoProxy
        spec = getattr(self._manager, "_registry", {}).get(token.typeid)
        if spec is not None and spec[-1] is not None:
            proxytype = spec[-1]
        elif proxytype is None:
            proxytype = AutoProxy
        # (the manager counted the reference for this process's client)
        proxy = adopting_proxy(proxytype, token, self._serializer, manager=self._manager,
                               authkey=self._authkey, exposed=exposed)
        if isinstance(proxy, BaseProxy):    # (not a factory's wrapper)
            _set_attributes(proxy, attrs)
            proxy._procshare_timeout = self._procshare_timeout
        return proxy

    def _set_timeout(self, seconds: float | None) -> None:
        """Set this proxy's default deadline for calls (None: wait forever)."""
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"timeout must be a non-negative number of seconds or None, "
                             f"not {seconds!r}")
        self._procshare_timeout = seconds

    def _getvalue(self) -> Any:
        """Get a copy of the value of the referent."""
        return self._callmethod("#GETVALUE")

    # -- pickling -------------------------------------------------------------------
    def _procshare_journal_reduce_(self) -> tuple:
        """How a manager's journal pickles this proxy (`server.durables`): with
        no loan (the record outlives any), and a proxy to that manager also
        with no address, so that the manager that loads the record binds it
        to itself (RebuildProxy), wherever it listens then."""
        if self._procshare_is_local():
            return self._procshare_reduced(Token(self._token.typeid, None, self._id), {"own": True})
        return self._procshare_reduced(self._token, {"foreign": True})

    def __reduce__(self) -> tuple:
        kwds: dict[str, Any] = {}
        if get_spawning_popen() is not None:
            kwds["authkey"] = bytes(self._authkey)
        if self._procshare_is_local():
            try:
                loan = local_server().local_loan(self._id)
            except KeyError:
                # its object is gone (a stored reply sent again): the copy refers to
                # nothing, and calls on it say so
                kwds["incref"] = False
                return self._procshare_reduced(self._token, kwds)
            loans.record(loan, None)
        else:
            try:
                loan = self._procshare_session.control_call("loan", self._id)
            except Exception:
                # the manager cannot lend (it is gone, say): pickled as the stdlib
                # pickles a proxy, talking to no one; the copy takes its reference
                # when it is rebuilt, and says there what is wrong, if anything is
                return self._procshare_reduced(self._token, kwds)
            loans.record(loan, self._procshare_session)
        kwds["loan"] = loan
        return self._procshare_reduced(self._token, kwds)

    def _procshare_reduced(self, token: Token, kwds: dict) -> tuple:
        if self._procshare_timeout is not _UNSET:
            kwds["timeout"] = self._procshare_timeout
        if getattr(self, "_isauto", False):
            kwds["exposed"] = self._exposed_
            attrs = getattr(self, "_attributes_", ())
            if attrs:
                kwds["attributes"] = attrs
            return (RebuildProxy, (AutoProxy, token, self._serializer, kwds))
        return (RebuildProxy, (type(self), token, self._serializer, kwds))

    def __deepcopy__(self, memo: dict) -> Any:
        return self._getvalue()

    def __repr__(self) -> str:
        return "<%s object, typeid %r at %#x>" % (
            type(self).__name__, self._token.typeid, id(self))

    def __str__(self) -> str:
        """The representation of the referent (or a fall-back if that fails)."""
        try:
            return self._callmethod("__repr__")
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


_takes_incref: dict = {}


def adopting_proxy(proxytype: Any, token: Token, serializer: Any, **kwds: Any) -> Any:
    """A new proxy of `proxytype` for a reference the manager already counted
    for this process (a create, a method that returns a proxy), tracked so
    that it is given back when the proxy goes.  A proxy type or factory that
    takes no `incref` (a user's `__init__` with the stdlib's first five
    parameters, which the stdlib only ever calls that way) takes a reference
    of its own as well, given back the same way.  A factory's object that is
    no proxy (a wrapper) gets none: the reference goes back at once."""
    if not (isinstance(proxytype, type) and issubclass(proxytype, BaseProxy)) \
            and not takes_attributes(proxytype):
        # a factory (or class) of the user's that is no proxy type: called as the
        # stdlib calls it (what it returns may wrap a proxy it makes, which then
        # holds a reference of its own)
        proxy = proxytype(token, serializer, **kwds)
    else:
        takes = _takes_incref.get(proxytype)
        if takes is None:
            takes = _takes_incref[proxytype] = _accepts(proxytype, "incref")
        proxy = (proxytype(token, serializer, incref=False, **kwds) if takes
                 else proxytype(token, serializer, **kwds))
    if isinstance(proxy, BaseProxy):
        proxy._procshare_track(False)
    else:
        # not a proxy: the create's reference goes back now, as the stdlib's
        # does (the object lives as long as the proxies inside hold theirs)
        holder = BaseProxy(token, serializer, incref=False, manager=kwds.get("manager"),
                           authkey=kwds.get("authkey"))
        holder._procshare_track(False)
        del holder
    return proxy


def _accepts(func: Any, name: str) -> bool:
    """Does `func` take a keyword argument `name` (True if it cannot be told)?"""
    import inspect
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _set_attributes(proxy: BaseProxy, attrs: Any) -> None:
    if attrs:
        object.__setattr__(proxy, "_attributes_", tuple(attrs))


def RebuildProxy(func: Any, token: Token, serializer: Any, kwds: dict) -> Any:
    """Function used for unpickling proxy objects."""
    loan = kwds.pop("loan", None)
    timeout = kwds.pop("timeout", _UNSET)
    attrs = kwds.pop("attributes", None)
    server = local_server()
    own = kwds.pop("own", False)            # from a manager's journal (see
    foreign = kwds.pop("foreign", False)    # BaseProxy._procshare_journal_reduce_)
    if own:
        # a proxy to the manager that loads it
        if server is None:
            raise RuntimeError(f"a proxy to {token.typeid} object {token.id!r} stored in a "
                               f"manager's journal was unpickled in process {os.getpid()}, "
                               "which runs no manager: only the manager that recovers the "
                               "journal can bind it. Read the journal through a manager "
                               "started with that state_dir=")
        token = Token(token.typeid, server.address, token.id)
        kwds["authkey"] = server.authkey
    if server is not None and server.address == token.address:
        kwds["manager_owned"] = True
        if kwds.get("authkey") is None:     # the server's key, not this process's
            kwds["authkey"] = server.authkey
    elif kwds.get("authkey") is None:
        key = authkey_for(token.address)    # the manager's key, if we use another one
        if key is not None:
            kwds["authkey"] = key
    incref = kwds.pop("incref", True)
    if attrs is not None and func is AutoProxy:
        kwds["attributes"] = attrs
    rebuilt = recovering()
    if rebuilt is not None and kwds.get("manager_owned"):
        # a proxy stored in a durable object, rebuilt while the manager recovers:
        # its object may not be back yet, so its reference is taken after
        proxy = func(token, serializer, incref=False, **kwds)
        proxy._procshare_track(True)      # (`_hold_rebuilt` takes its reference as the server's)
        rebuilt.append(weakref.ref(proxy))
        loan = None
    elif foreign or (rebuilt is not None and loan is not None):
        # a proxy to another manager, stored in a durable object: it refers to
        # its object without a reference of its own (an old record's loan ended
        # long ago, and that manager may be gone); calls on it work while that
        # manager keeps the object
        proxy = func(token, serializer, incref=False, **kwds)
        loan = None
    elif own:
        # a stored reply read again (a re-sent call): its object may be gone;
        # then calls on the proxy say so
        proxy = func(token, serializer, incref=False, **kwds)
        try:
            proxy._incref()
        except KeyError:
            pass
    else:
        proxy = func(token, serializer, incref=incref and loan is None, **kwds)
    if loan is not None:
        proxy._procshare_adopt(loan)
    if timeout is not _UNSET:
        proxy._procshare_timeout = timeout
    return proxy


def MakeProxyType(name: str, exposed: Any, _cache: dict = {}) -> type:  # noqa: B006
    """Return a proxy type whose methods are given by `exposed`."""
    exposed = tuple(exposed)
    try:
        return _cache[(name, exposed)]
    except KeyError:
        pass
    dic: dict[str, Any] = {}
    for meth in exposed:
        dic[meth] = _make_method(meth)
    ProxyType = type(name, (BaseProxy,), dic)
    ProxyType._exposed_ = exposed
    _cache[(name, exposed)] = ProxyType
    return ProxyType


def _make_method(meth: str) -> Any:
    def method(self: BaseProxy, /, *args: Any, **kwds: Any) -> Any:
        return self._callmethod(meth, args, kwds)
    method.__name__ = method.__qualname__ = meth
    return method


def _shown(methodname: str, args: tuple) -> str:
    """The name a message gives a call: a read of exposed data (`#ATTR`) is
    named after the attribute, as the stdlib would name that call."""
    if methodname == "#ATTR" and args and type(args[0]) is str:
        return args[0]
    return methodname


def _attribute_property(name: str) -> property:
    def get(self: BaseProxy) -> Any:
        session = self._procshare_session
        if session.server_version is None:
            session.thread_conn()   # (its hello tells whether the manager reads `#ATTR`)
        if session.server_version < 3:
            return self._callmethod(name)   # (calls a callable value in the manager)
        is_data, value = self._callmethod("#ATTR", (name,))
        if is_data:
            return value
        # its value is callable (a property that returns a function, say): as the
        # stdlib's proxies treat every exposed name, a method, called in the manager
        return types.MethodType(_make_method(name), self)
    return property(get, doc=f"the referent's {name!r} attribute (read from the manager)")


def AutoProxy(token: Token, serializer: Any, manager: Any = None, authkey: Any = None,
              exposed: Any = None, incref: bool = True, manager_owned: bool = False,
              attributes: Any = ()) -> BaseProxy:
    """Return an auto-proxy for `token`."""
    if authkey is None and manager is not None:
        authkey = manager._authkey
    if authkey is None:
        authkey = process.current_process().authkey
    if exposed is None:
        exposed = get_session(token.address, bytes(authkey), serializer).control_call(
            "get_methods", token)
    attributes = tuple(attributes or ())
    methods = tuple(m for m in exposed if m not in attributes)
    ProxyType = MakeProxyType("AutoProxy[%s]" % token.typeid, methods)
    if attributes:
        ProxyType = _with_attributes(ProxyType, attributes)
    proxy = ProxyType(token, serializer, manager=manager, authkey=authkey,
                      incref=incref, manager_owned=manager_owned)
    proxy._isauto = True
    proxy._exposed_ = tuple(exposed)
    _set_attributes(proxy, attributes)
    return proxy


def takes_attributes(proxytype: Any) -> bool:
    """Is `proxytype` procshare's own `AutoProxy` (which takes `attributes=`)?
    Not a function that replaced `managers.AutoProxy` (a known recipe patches
    it to default `manager_owned=True`): that one has the stdlib's signature."""
    return proxytype is AutoProxy


_attr_cache: dict = {}


def _with_attributes(base: type, attributes: tuple) -> type:
    key = (base, attributes)
    cls = _attr_cache.get(key)
    if cls is None:
        cls = _attr_cache[key] = type(base.__name__, (base,),
                                      {a: _attribute_property(a) for a in attributes})
    return cls


# -- proxy types used by SyncManager ---------------------------------------------------

class IteratorProxy(BaseProxy):
    _exposed_ = ("__next__", "send", "throw", "close")

    def __iter__(self) -> IteratorProxy:
        return self

    def __next__(self, *args: Any) -> Any:
        return self._callmethod("__next__", args)

    def send(self, *args: Any) -> Any:
        return self._callmethod("send", args)

    def throw(self, *args: Any) -> Any:
        return self._callmethod("throw", args)

    def close(self, *args: Any) -> Any:
        return self._callmethod("close", args)


class AcquirerProxy(BaseProxy):
    _exposed_ = ("acquire", "release", "locked")

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        args = (blocking,) if timeout is None else (blocking, timeout)
        return self._callmethod("acquire", args)

    def release(self) -> None:
        return self._callmethod("release")

    def locked(self) -> bool:
        return self._callmethod("locked")

    def __enter__(self) -> bool:
        return self._callmethod("acquire")

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        return self._callmethod("release")


class ConditionProxy(AcquirerProxy):
    _exposed_ = ("acquire", "release", "locked", "wait", "notify", "notify_all")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))

    def notify(self, n: int = 1) -> None:
        return self._callmethod("notify", (n,))

    def notify_all(self) -> None:
        return self._callmethod("notify_all")

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class EventProxy(BaseProxy):
    _exposed_ = ("is_set", "set", "clear", "wait")

    def is_set(self) -> bool:
        return self._callmethod("is_set")

    def set(self) -> None:
        return self._callmethod("set")

    def clear(self) -> None:
        return self._callmethod("clear")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod("wait", (timeout,))


class BarrierProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "wait", "abort", "reset")

    def wait(self, timeout: float | None = None) -> int:
        return self._callmethod("wait", (timeout,))

    def abort(self) -> None:
        return self._callmethod("abort")

    def reset(self) -> None:
        return self._callmethod("reset")

    @property
    def parties(self) -> int:
        return self._callmethod("__getattribute__", ("parties",))

    @property
    def n_waiting(self) -> int:
        return self._callmethod("__getattribute__", ("n_waiting",))

    @property
    def broken(self) -> bool:
        return self._callmethod("__getattribute__", ("broken",))


class NamespaceProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "__setattr__", "__delattr__")

    def __getattr__(self, key: str) -> Any:
        if key[0] == "_":
            return object.__getattribute__(self, key)
        callmethod = object.__getattribute__(self, "_callmethod")
        return callmethod("__getattribute__", (key,))

    def __setattr__(self, key: str, value: Any) -> None:
        if key[0] == "_":
            return object.__setattr__(self, key, value)
        callmethod = object.__getattribute__(self, "_callmethod")
        return callmethod("__setattr__", (key, value))

    def __delattr__(self, key: str) -> None:
        if key[0] == "_":
            return object.__delattr__(self, key)
        callmethod = object.__getattribute__(self, "_callmethod")
        return callmethod("__delattr__", (key,))


class ValueProxy(BaseProxy):
    _exposed_ = ("get", "set")

    def get(self) -> Any:
        return self._callmethod("get")

    def set(self, value: Any) -> None:
        return self._callmethod("set", (value,))

    value = property(get, set)

    __class_getitem__ = classmethod(types.GenericAlias)


BaseListProxy = MakeProxyType("BaseListProxy", (
    "__add__", "__contains__", "__delitem__", "__getitem__", "__len__",
    "__mul__", "__reversed__", "__rmul__", "__setitem__",
    "append", "clear", "copy", "count", "extend", "index", "insert", "pop",
    "remove", "reverse", "sort", "__imul__",
))


_NO_DEFAULT = object()


def _update_item(self: BaseProxy, key: Any, func: Any, default: Any = _NO_DEFAULT) -> Any:
    """Replace `self[key]` with `func(self[key])` in one step in the manager, and
    return the new value.  No other call on the object runs in between, so
    `d.update_item("k", lambda v: v + [x], [])` is the safe way to change a
    plain value stored in a managed container (`d["k"].append(x)` changes a
    local copy only).  With `default`, a missing key starts from it.  `func`
    must be picklable by the manager's serializer (a module-level function, or
    a lambda with the cloudpickle serializer)."""
    return self._callmethod("#UPDATE_ITEM",
                            (key, func, None if default is _NO_DEFAULT else default,
                             default is not _NO_DEFAULT))


class ListProxy(BaseListProxy):  # type: ignore[misc, valid-type]
    update_item = _update_item
    def __iadd__(self, value: Any) -> ListProxy:
        self._callmethod("extend", (value,))
        return self

    def __imul__(self, value: Any) -> ListProxy:
        self._callmethod("__imul__", (value,))
        return self

    __class_getitem__ = classmethod(types.GenericAlias)


# `__reversed__` only where the stdlib's DictProxy has it (3.14): before that,
# reversed() on one falls back to `len` and `d[i]` (the values at keys n-1..0),
# and a proxy that answered with the keys would change what existing code gets.
# The other 3.14 additions (`|`, `|=`, `fromkeys`) only replace a TypeError.
_BaseDictProxy = MakeProxyType("DictProxy", (
    "__contains__", "__delitem__", "__getitem__", "__ior__", "__iter__", "__len__",
    "__or__", *(("__reversed__",) if sys.version_info >= (3, 14) else ()), "__ror__",
    "__setitem__", "clear", "copy", "fromkeys",
    "get", "items", "keys", "pop", "popitem", "setdefault", "update", "values",
))
_BaseDictProxy._method_to_typeid_ = {"__iter__": "Iterator"}


class DictProxy(_BaseDictProxy):  # type: ignore[misc, valid-type]
    update_item = _update_item
    def __ior__(self, value: Any) -> DictProxy:
        self._callmethod("__ior__", (value,))
        return self

    __class_getitem__ = classmethod(types.GenericAlias)


BaseSetProxy = MakeProxyType("BaseSetProxy", (
    "__and__", "__contains__", "__iand__", "__ior__", "__isub__", "__ixor__",
    "__len__", "__or__", "__rand__", "__ror__", "__rsub__", "__rxor__", "__sub__",
    "__xor__", "__ge__", "__gt__", "__le__", "__lt__", "add", "clear", "copy",
    "difference", "difference_update", "discard", "intersection",
    "intersection_update", "isdisjoint", "issubset", "issuperset", "pop", "remove",
    "symmetric_difference", "symmetric_difference_update", "union", "update",
))


class SetProxy(BaseSetProxy):  # type: ignore[misc, valid-type]
    def __ior__(self, value: Any) -> SetProxy:
        self._callmethod("__ior__", (value,))
        return self

    def __iand__(self, value: Any) -> SetProxy:
        self._callmethod("__iand__", (value,))
        return self

    def __ixor__(self, value: Any) -> SetProxy:
        self._callmethod("__ixor__", (value,))
        return self

    def __isub__(self, value: Any) -> SetProxy:
        self._callmethod("__isub__", (value,))
        return self

    __class_getitem__ = classmethod(types.GenericAlias)


ArrayProxy = MakeProxyType("ArrayProxy", ("__len__", "__getitem__", "__setitem__"))

BasePoolProxy = MakeProxyType("PoolProxy", (
    "apply", "apply_async", "close", "imap", "imap_unordered", "join",
    "map", "map_async", "starmap", "starmap_async", "terminate",
))
BasePoolProxy._method_to_typeid_ = {
    "apply_async": "AsyncResult",
    "map_async": "AsyncResult",
    "starmap_async": "AsyncResult",
    "imap": "Iterator",
    "imap_unordered": "Iterator",
}


class PoolProxy(BasePoolProxy):  # type: ignore[misc, valid-type]
    def __enter__(self) -> PoolProxy:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.terminate()
