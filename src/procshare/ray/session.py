"""Ray transport: the session and connection that proxies use for `ray://` addresses.

`get_session()` in the core hands a `ray://` address to `session_for()` here,
which returns a `RaySession`.  It has what `BaseProxy` uses of a `Session`
(`tls`, `thread_conn()`, `control_call()`, `control_send()`, `live`,
`server_pid`, `crashed()`), so the proxy classes of `procshare.managers` work
unchanged: a call becomes a task on the object's host actor, and reference
traffic goes to the manager's registry actor.

Owns: this process's view of a Ray manager: actor handles by object id,
request ids, the call with its deadline, retries and cancellation
(`RayConnection.call`), the futures of `call_async`, the mapping of Ray's
errors onto procshare's, batched decrefs, and the goodbye at exit.

Rules it keeps:
- A call carries (client id, thread, request id, deadline); the host answers
  `(kind, payload)` as the local server does, and `raise_reply` does the rest.
- At a deadline the call is cancelled (`ray.cancel`): a call that finished
  meanwhile is answered with its result; one that was cancelled before it
  took effect is a TIMEOUT reply ("no effect"); one still running user code
  raises TimeoutError, which the proxy turns into CallTimeout ("may still
  complete").  A wait interrupted by Ctrl-C cancels the call too, as does
  cancelling a pipelined call's future (or the asyncio task awaiting it);
  both return once the call has ended (at most `CANCEL_WAIT`, and not on
  Ray's own threads), since Ray does not order a cancel with later calls.
  (A call re-sent after an actor restart is not cancelled by its future.)
- An actor that is temporarily unavailable (restarting) is retried with the
  same request id until the deadline (a call without one: `RESTART_WAIT`; an
  object that is not durable: at most `TRANSIENT_WAIT`), so a durable
  object's dedupe makes the re-send exactly-once.  An actor dead for
  good is `ObjectLost` (ManagerCrashed where errors has no ObjectLost); an
  object released by its last proxy gives the local manager's "no object with
  this id" RemoteError; a manager that was shut down gives its ManagerCrashed.
- Decrefs are queued and sent in batches from one thread (never from inside
  a garbage-collector callback), in order with every other registry call of
  this process; a control call sends the queued ones first.
- A process says goodbye to each manager it used when it exits (before Ray's
  own exit handler disconnects it), so its references are released at once.
- An exception a future keeps has no traceback, nor has any exception chained
  to it (`_bare`), and none is kept in a local past its except block: a
  traceback leads back to the frames that hold the future, the call's
  arguments and the proxy, a cycle only a full collection would free.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import heapq
import itertools
import logging
import os
import platform
import threading
import time
import weakref
from multiprocessing import util as mp_util
from typing import Any

import ray
from ray import exceptions as rex

from .. import errors
from ..client import session as core_session
from ..client.loans import mark as _loan_mark
from ..client.loans import release_since as release_loans_since
from ..client.replies import call_timeout, raise_reply
from ..client.session import client_id
from ..wire.kinds import Kind
from . import cluster
from .cluster import PREFIX, RayAddress
from .host import REGISTRY_NAME, RemoteAsyncHost, RemoteHost, actor_name

__all__ = ["RaySession", "RayConnection", "session_for", "drop_sessions", "RESTART_WAIT",
           "SETTLE"]

log = logging.getLogger("procshare.ray")

RETURN, ERROR, TIMEOUT, TRACEBACK = Kind.RETURN, Kind.ERROR, Kind.TIMEOUT, Kind.TRACEBACK
#: after a deadline: how long to wait for the cancelled call to settle
SETTLE = 0.25
#: how long a caller who gave up on a call waits for it to end: an async host's
#: call ends within milliseconds; a sync host's running call cannot be stopped, so
#: this is what cancelling one costs its caller (an event loop's, for `aio`)
CANCEL_WAIT = SETTLE
#: how long a call without a deadline waits for a restarting actor
RESTART_WAIT = 60.0
#: how long an actor that is not durable may be unavailable before it counts as lost
TRANSIENT_WAIT = 10.0
#: registry calls without a timeout of their own
CONTROL_TIMEOUT = 60.0
#: actor creation (a new worker process) and its first answer
CREATE_TIMEOUT = 120.0
#: threads of a host that runs calls concurrently (serial=False)
HOST_THREADS = 32
_monotonic = time.monotonic
_RETRYABLE = (rex.ActorUnavailableError, rex.ActorDiedError)
_rids = itertools.count(1)


class _NoActor(Exception):
    """The actor of an object cannot be found by name."""


class RayConnection:
    """What `BaseProxy._callmethod` calls: one per thread, never pending."""

    __slots__ = ("session", "pending", "thread")

    def __init__(self, session: RaySession) -> None:
        self.session = session
        self.pending: frozenset = frozenset()     # never has abandoned replies to drain
        self.thread = threading.get_ident()

    def call(self, oid: Any, meth: str, args: tuple, kwds: dict,
             timeout: float | None, typeid: str | None = None) -> tuple[int, Any]:
        """Run `meth` on object `oid`: `(kind, payload)`, or TimeoutError when the
        deadline passed while the call may still complete (`typeid`: as the
        socket connection's; the session knows each object's own)."""
        s = self.session
        s.ensure()
        if oid is None:
            return (RETURN, s.control_call(meth, *args, timeout=timeout))
        rid = next(s.rids)
        wall = None if timeout is None else time.time() + timeout
        return s.call_ctx(oid, meth, args, kwds, timeout,
                          (s.client, threading.get_ident(), rid, wall))

    def call_async(self, oid: Any, meth: str, args: tuple, kwds: dict,
                   timeout: float | None) -> concurrent.futures.Future:
        """Start the call and return a Future of its `(kind, payload)` (built on
        `ObjectRef.future()`): calls are pipelined, and those to one serial
        object still run in the order they were started."""
        return self.session.call_async(oid, meth, args, kwds, timeout)

    def close(self) -> None:
        """Nothing to close: the transport is Ray's."""

    def __enter__(self) -> RayConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RaySession:
    """This process's link to one Ray manager (one namespace of one cluster)."""

    def __init__(self, address: Any, authkey: bytes, serializer: Any = "pickle") -> None:
        self.address = RayAddress(str(address))
        self.namespace = self.address.namespace
        self.authkey = bytes(authkey)
        self.serializer = serializer
        self.tls = threading.local()
        self.live = 0
        self.server_pid: int | None = None       # there is no one manager process
        self.server_version = 3     # what its hosts answer (`#ATTR`), as a manager's hello
        self.epoch = 0              # a Ray manager never comes back as a new incarnation:
        self.incarnation: int | None = None     # lost objects are reported here, per object
        self.closed = False
        self.control: Any = None                  # set once connected (core compatibility)
        self.lock = threading.RLock()
        self.rids = _rids           # request ids are unique in the process (the dedupe key)
        self._pid = os.getpid()
        self._connected = False
        self._handles: dict[str, Any] = {}
        self._registry: Any = None
        self._info: dict[str, dict] = {}          # oid -> {"durable", "serial", "typeid"}
        self._running: dict[str, tuple] = {}      # oid -> (method, ref) of a call past its deadline
        self._decrefs: collections.deque = collections.deque()
        self._loans_back: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._watch: list = []                    # heap of (deadline, n, action)
        self._watch_cv = threading.Condition()
        self._watcher: threading.Thread | None = None
        self._n = itertools.count()

    @property
    def client(self) -> str:
        return client_id()

    # -- connecting ------------------------------------------------------------------------
    def ensure(self) -> None:
        if self._pid != os.getpid():
            cluster.check_fork()
            self._after_fork()
        if self._connected:
            return
        with self.lock:
            if self._connected:
                return
            try:
                cluster.ensure_connected(self.address)
            except errors.ProcshareError:
                raise
            except Exception as e:
                raise self.crashed(e) from None
            _goodbye_at_exit()
            self._connected = True
            self.control = "ray"
            try:
                ctx = ray.get_runtime_context()
                actor = ctx.get_actor_id()     # None in a driver or a task
                info = {"pid": os.getpid(), "host": platform.node(),
                        "job": ctx.get_job_id(), "actor": actor}
                self.registry().hello.remote(self.client, info)
            except Exception as e:
                log.debug("no hello to %s: %r", self.address, e)

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        self._connected = False
        self._handles.clear()
        self._registry = None
        self._decrefs.clear()
        self._flusher = None
        self._watcher = None
        self.lock = threading.RLock()

    def registry(self) -> Any:
        reg = self._registry
        if reg is None:
            try:
                reg = self._registry = ray.get_actor(REGISTRY_NAME, namespace=self.namespace)
            except ValueError as e:
                raise self.crashed(ConnectionRefusedError(str(e).partition(".")[0])) from None
        return reg

    def handle(self, oid: str) -> Any:
        name = actor_name(oid)
        h = self._handles.get(name)
        if h is None:
            try:
                h = ray.get_actor(name, namespace=self.namespace)
            except ValueError as e:
                raise _NoActor(str(e)) from None
            self._handles[name] = h
        return h

    def forget_handle(self, oid: str) -> None:
        self._handles.pop(actor_name(oid), None)

    def thread_conn(self) -> RayConnection:
        c = getattr(self.tls, "conn", None)
        if c is None:
            c = self.tls.conn = RayConnection(self)
        return c

    # -- calls -----------------------------------------------------------------------------------
    def call_ctx(self, oid: str, meth: str, args: tuple, kwds: dict, timeout: float | None,
                 ctx: tuple) -> tuple[int, Any]:
        start = _monotonic()
        deadline = None if timeout is None else start + timeout
        retry_until = deadline if deadline is not None else start + RESTART_WAIT
        delay = 0.02
        while True:
            try:
                handle = self.handle(oid)
            except _NoActor as e:
                return self.failure(oid, meth, e)
            ref = self._submit(handle, oid, meth, args, kwds, ctx)
            try:
                reply = ray.get(ref, timeout=None if deadline is None
                                else max(0.0, deadline - _monotonic()))
            except rex.GetTimeoutError:
                return self._settle(ref, oid, meth)
            except rex.TaskCancelledError:
                return (TIMEOUT, f"{meth}() was cancelled before it took effect")
            except _RETRYABLE as e:
                self.forget_handle(oid)
                if self._may_retry(oid, e, start) and _monotonic() < retry_until:
                    time.sleep(min(delay, max(0.0, retry_until - _monotonic())))
                    delay = min(delay * 2, 0.5)
                    continue
                if deadline is not None and _monotonic() >= deadline and \
                        self._may_retry(oid, e, start):
                    raise TimeoutError from None   # re-sent until the deadline
                return self.failure(oid, meth, e)
            except rex.RayTaskError as e:
                return self.task_failed(oid, meth, e)
            except BaseException:
                # Ctrl-C or another interruption: have the call cancelled, so a
                # blocked get or acquire takes nothing
                _cancel_and_wait(ref)
                raise
            return reply

    def _submit(self, handle: Any, oid: str, meth: str, args: tuple, kwds: dict,
                ctx: tuple) -> Any:
        since = _loan_mark()
        try:
            return handle.call.remote((oid, meth, args, kwds, ctx))
        except Exception as e:      # not sent: the loans of proxies pickled for it go back
            raise release_loans_since(since, _arguments_error(
                e, oid, meth, args, kwds, self._info.get(oid, {}).get("typeid"))) from None

    def _settle(self, ref: Any, oid: str, meth: str) -> tuple[int, Any]:
        """The deadline passed: cancel the call, and answer with what happened."""
        _cancel(ref)
        try:
            return ray.get(ref, timeout=SETTLE)
        except rex.TaskCancelledError:
            return (TIMEOUT, f"{meth}() was cancelled at the deadline before it took effect")
        except rex.RayTaskError as e:
            return self.task_failed(oid, meth, e)
        except (rex.GetTimeoutError, *_RETRYABLE):
            self._running[oid] = (meth, ref)
            raise TimeoutError from None

    def _may_retry(self, oid: str, e: BaseException, since: float | None = None) -> bool:
        """Is the actor coming back?  A durable object's restarts; any actor's
        short unavailability (`TRANSIENT_WAIT` after the call began)."""
        info = self.object_info(oid)
        if info and info.get("durable") and info.get("state") == "live":
            return True
        return isinstance(e, rex.ActorUnavailableError) and (
            since is None or _monotonic() - since < TRANSIENT_WAIT)

    def object_info(self, oid: str, fresh: bool = False) -> dict | None:
        """What the registry says of `oid` (None if it cannot be asked)."""
        info = self._info.get(oid)
        if not fresh and info is not None and info.get("state") == "live":
            return info
        try:
            info = ray.get(self.registry().status.remote(oid), timeout=5.0)
        except Exception:
            return None
        self._info[oid] = info
        return info

    def failure(self, oid: str, meth: str, cause: BaseException) -> tuple[int, Any]:
        """The reply (or error) for a call whose actor is gone."""
        if self.address in errors.shut_down_managers:
            raise self.crashed(cause)
        info = self.object_info(oid, fresh=True)
        if info is None:
            raise self.crashed(cause)
        if info["state"] != "live":
            return (TRACEBACK, _gone_text(oid, meth, self.address))
        raise self.lost(oid, meth, info, cause)

    def lost(self, oid: str, meth: str, info: dict, cause: BaseException) -> errors.ProcshareError:
        cls = getattr(errors, "ObjectLost", None) or errors.ManagerCrashed
        typeid = info.get("typeid", "?")
        why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
        if info.get("durable"):
            what = ("It was durable, but Ray did not bring its actor back in time; its last "
                    "snapshot stays in the manager's state_dir.")
        else:
            what = ("Its state is lost: it was not durable (register its type with "
                    "durable=True and give the manager a state_dir= to keep its state across "
                    "a crash of its worker process).")
        facts = {"address": str(self.address), "typeid": typeid, "id": oid, "cause": why}
        text = (f"the Ray actor of {typeid!r} object {oid} (manager at {self.address!r}) "
                f"died and will not come back ({why}), so {meth}() cannot run. {what} "
                "Create the object again.")
        try:
            return cls(text, **facts)
        except TypeError:
            return cls(text)

    def task_failed(self, oid: str, meth: str, e: rex.RayTaskError) -> tuple[int, Any]:
        """The host task itself failed (not the referent: its exceptions are replies)."""
        cause = getattr(e, "cause", None)
        text = str(e)
        if isinstance(cause, (TypeError, AttributeError)) and "serializ" in text.lower():
            return (Kind.UNSERIALIZABLE, (
                f"the result of {meth}() on object {oid} could not be serialized by Ray in its "
                f"actor ({type(cause).__name__}: {cause}). The method did run; the proxy stays "
                "usable. Return plain data from the method.",
                {"direction": "result", "method": meth, "serializer": "ray"}))
        return (TRACEBACK, text + "\n")

    def crashed(self, cause: BaseException) -> errors.ManagerCrashed:
        return errors.manager_crashed(self.address, cause)

    # -- pipelined calls ------------------------------------------------------------------------
    def submit_pipelined(self, proxy: Any, methodname: str, args: tuple, kwds: dict,
                         timeout: float | None,
                         want_reply: bool = True) -> concurrent.futures.Future | None:
        """`procshare.async_(proxy).method(...)` (and `call_async`) on a proxy of a
        Ray manager: a Future that resolves exactly as `proxy._callmethod` would
        return or raise.  `want_reply=False` (`procshare.oneway`): None."""
        raw = self.call_async(proxy._id, methodname, args, kwds, timeout)
        if not want_reply:
            return None
        out: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:
            try:
                settle(f)
            except concurrent.futures.InvalidStateError:
                pass        # cancelled by its caller meanwhile: nobody wants the outcome

        def settle(f: concurrent.futures.Future) -> None:
            if out.done():              # cancelled by its caller: nobody wants the outcome
                return
            failed = f.exception()      # not raised here (see call_async)
            if isinstance(failed, TimeoutError):    # the deadline passed; it may still complete
                out.set_exception(call_timeout(proxy, methodname, timeout, False))
                return
            if failed is not None:
                out.set_exception(failed)
                return
            kind, payload = f.result()
            try:
                if kind == RETURN:
                    out.set_result(payload)
                elif kind == Kind.PROXY:
                    out.set_result(proxy._procshare_rebuild_returned(payload))
                else:
                    out.set_result(raise_reply(kind, payload, proxy, methodname, timeout))
            except concurrent.futures.InvalidStateError:
                raise
            except BaseException as e:
                # without this callback's frames: they hold the proxy (and the future)
                out.set_exception(_bare(e))

        raw.add_done_callback(done)

        pending = weakref.ref(raw)     # alive while Ray still runs the call

        def cancelled(f: concurrent.futures.Future) -> None:
            # an asyncio task that awaited it was cancelled: so is the actor's call
            call = pending()
            ref = getattr(call, "ray_ref", None)
            if f.cancelled() and ref is not None and not call.done():
                _cancel_and_wait(ref)

        out.add_done_callback(cancelled)
        return out

    def call_async(self, oid: str, meth: str, args: tuple, kwds: dict,
                   timeout: float | None) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.ensure()
            rid = next(self.rids)
            wall = None if timeout is None else time.time() + timeout
            ctx = (self.client, threading.get_ident(), rid, wall)
            ref = self._submit(self.handle(oid), oid, meth, args, kwds, ctx)
        except _NoActor as e:
            # (no local keeps `e` past this block: its traceback holds this frame)
            _resolve(fut, functools.partial(self.failure, oid, meth, e))
            return fut
        except BaseException as e:
            fut.set_exception(_bare(e))
            return fut

        def done(rf: concurrent.futures.Future) -> None:
            # looked at, never raised here: a raised error would keep this frame
            # (and the proxy its future's callbacks hold) alive in a cycle
            failed = rf.exception()
            if fut.done():
                return
            if failed is None:
                _set(fut, rf.result())
            elif isinstance(failed, rex.TaskCancelledError):
                _set(fut, (TIMEOUT, f"{meth}() was cancelled at the deadline before it took "
                                    "effect"))
            elif isinstance(failed, rex.RayTaskError):
                _set(fut, self.task_failed(oid, meth, failed))
            else:
                left = None if wall is None else wall - time.time()
                # a restarting actor, or a lost one: decided off Ray's callback thread
                _background(lambda: _resolve(fut, lambda: self._retry_or_fail(
                    oid, meth, args, kwds, left, ctx, failed)))

        fut.ray_ref = ref       # so that cancelling the caller's future can cancel it
        ref.future().add_done_callback(done)
        if timeout is not None:
            self._at(_monotonic() + timeout, lambda: self._async_deadline(fut, ref, meth))
        return fut

    def _retry_or_fail(self, oid: str, meth: str, args: tuple, kwds: dict, left: float | None,
                       ctx: tuple, failed: BaseException) -> tuple[int, Any]:
        if isinstance(failed, _RETRYABLE) and self._may_retry(oid, failed):
            if left is not None and left <= 0:
                raise TimeoutError
            self.forget_handle(oid)
            return self.call_ctx(oid, meth, args, kwds, left, ctx)
        if isinstance(failed, _RETRYABLE):
            return self.failure(oid, meth, failed)
        raise failed

    def _async_deadline(self, fut: concurrent.futures.Future, ref: Any, meth: str) -> None:
        if fut.done():
            return
        _cancel(ref)

        def give_up() -> None:
            if not fut.done():
                _set_exc(fut, TimeoutError(f"{meth}() did not finish by its deadline"))
        self._at(_monotonic() + SETTLE, give_up)

    def _at(self, when: float, action: Any) -> None:
        with self._watch_cv:
            heapq.heappush(self._watch, (when, next(self._n), action))
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_loop, daemon=True,
                                                 name="procshare-ray-deadlines")
                self._watcher.start()
            self._watch_cv.notify()

    def _watch_loop(self) -> None:
        while True:
            with self._watch_cv:
                while not self._watch or self._watch[0][0] > _monotonic():
                    if self.closed:
                        return
                    wait = None if not self._watch else self._watch[0][0] - _monotonic()
                    self._watch_cv.wait(wait if wait is None else max(wait, 0.0))
                _when, _n, action = heapq.heappop(self._watch)
            try:
                action()
            except Exception as e:
                log.debug("deadline action failed: %r", e)
            del action      # it holds a future, whose callbacks hold a proxy

    # -- calls from inside an actor (a Condition over another object's lock) ---------------------
    def actor_call(self, oid: str, meth: str, args: tuple, kwds: dict, ctx: tuple) -> Any:
        """Start a call as the caller in `ctx` (client, thread, deadline): an ObjectRef."""
        self.ensure()
        client, thread, deadline = ctx
        return self.handle(oid).call.remote((oid, meth, args, kwds,
                                             (client, thread, 0, deadline)))

    # -- creating objects (for RayManager) ------------------------------------------------------------
    def create(self, oid: str, typeid: str, spec: dict, mode: str, durable: bool,
               state_file: str | None) -> tuple[tuple, tuple]:
        """Start the host actor of a new object and register it (its one reference
        belongs to this process): returns (exposed, attributes)."""
        self.ensure()
        name = actor_name(oid)
        opts: dict[str, Any] = {"name": name, "namespace": self.namespace,
                                "lifetime": "detached", "num_cpus": 0,
                                "max_restarts": -1 if durable else 0, "max_task_retries": 0}
        if mode == "async":
            cls = RemoteAsyncHost
            opts["max_concurrency"] = 1000
        else:
            cls = RemoteHost
            opts["max_concurrency"] = 1 if mode == "serial" else HOST_THREADS
        since = _loan_mark()
        try:
            handle = cls.options(**opts).remote(spec)
        except ValueError as e:
            raise release_loans_since(since, errors.ProcshareError(
                f"could not create the actor of {typeid!r}: {e}")) from None
        except Exception as e:      # not created: the loans of proxies in its arguments go back
            raise release_loans_since(since, _arguments_error(
                e, None, "create", (typeid, *spec.get("args", ())),
                spec.get("kwds", {}))) from None
        try:
            desc = ray.get(handle.describe.remote(), timeout=CREATE_TIMEOUT)
        except rex.RayActorError as e:
            raise errors.RemoteError(f"the actor of a new {typeid!r} object failed to start: "
                                     f"{e}\n") from None
        except BaseException:
            _kill(handle)
            raise
        if desc["error"]:
            _kill(handle)
            raise_reply(TRACEBACK, desc["error"], None, "create", None)
        exposed, attrs = tuple(desc["exposed"]), tuple(desc["attrs"])
        try:
            ray.get(self.registry().add.remote(
                oid, typeid, exposed, self.client, name, handle, desc["client"], state_file,
                durable, bool(desc["serial"])), timeout=CONTROL_TIMEOUT)
        except BaseException:
            _kill(handle)
            raise
        self._handles[name] = handle
        self._info[oid] = {"state": "live", "durable": durable, "serial": bool(desc["serial"]),
                           "typeid": typeid}
        return exposed, attrs

    # -- reference traffic -------------------------------------------------------------------------
    def control_call(self, meth: str, *args: Any, timeout: float | None = None) -> Any:
        """A manager operation (`incref`, `loan`, `adopt`, `get_methods`, ...)."""
        self.ensure()
        if meth == "object_state":
            return self._object_state(*args)
        if meth == "cancel":
            return "done"           # calls are cancelled through Ray, by their refs
        if meth == "fork_loan":
            return None
        if meth in ("decref", "release_loan"):
            self.control_send(meth, *args)
            return None
        op = _REGISTRY_OPS.get(meth)
        if op is None:
            raise errors.RemoteError(f"{meth!r} is not an operation of a Ray manager; the known "
                                     f"ones are {sorted(_REGISTRY_OPS)}\n")
        self.flush()
        reg = self.registry()
        try:
            return ray.get(op(reg, self.client, *args),
                           timeout=CONTROL_TIMEOUT if timeout is None else timeout)
        except rex.GetTimeoutError:
            from ..client.replies import call_timeout
            raise call_timeout(None, meth, timeout, False, session=self) from None
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(e)
            raise errors.RemoteError(f"{text}\n") from None
        except (rex.RayActorError, ValueError) as e:
            raise self.crashed(e) from None

    def _object_state(self, oid: str) -> dict:
        info = self.object_info(oid) or {}
        running = self._running.get(oid)
        meth = None
        if running is not None:
            ready, _ = ray.wait([running[1]], timeout=0)
            if ready:
                self._running.pop(oid, None)
            else:
                meth = running[0]
        return {"typeid": info.get("typeid"), "serial": info.get("serial", True),
                "running": meth}

    def control_send(self, meth: str, *args: Any) -> None:
        """Fire-and-forget: decrefs and returned loans are batched."""
        if self._pid != os.getpid() or self.closed:
            return
        if meth == "decref":
            self._decrefs.append(args[0])
        elif meth == "release_loan":
            self._loans_back.append(args[0])
        else:
            try:
                self.control_call(meth, *args)
            except Exception as e:
                log.debug("%s%r not delivered: %r", meth, args, e)
            return
        if self._flusher is None:
            with self.lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                     name="procshare-ray-decref")
                    self._flusher.start()
        self._wake.set()

    def _flush_loop(self) -> None:
        while not self.closed:
            self._wake.wait()
            self._wake.clear()
            time.sleep(0.01)        # gather a batch
            self.flush()

    def flush(self) -> None:
        """Send the queued decrefs and returned loans (in order, before what follows)."""
        if not (self._decrefs or self._loans_back) or not ray.is_initialized():
            return
        oids = []
        while self._decrefs:
            oids.append(self._decrefs.popleft())
        loans = []
        while self._loans_back:
            loans.append(self._loans_back.popleft())
        try:
            reg = self.registry()
            for loan in loans:
                reg.release_loan.remote(loan)
            if oids:
                reg.decref_many.remote(self.client, oids)
        except Exception as e:      # the manager may be gone: nothing to release then
            log.debug("decrefs not delivered to %s: %r", self.address, e)

    def goodbye(self) -> None:
        if not self._connected or self.closed or self._pid != os.getpid():
            return
        if not ray.is_initialized():
            return
        try:
            self.flush()
            ray.get(self.registry().goodbye.remote(self.client), timeout=2.0)
        except Exception as e:
            log.debug("no goodbye to %s: %r", self.address, e)

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        with self._watch_cv:
            self._watch_cv.notify_all()
        self.tls.__dict__.clear()
        self._handles.clear()


def _registry_op(name: str) -> Any:
    def op(reg: Any, client: str, *args: Any) -> Any:
        return getattr(reg, name).remote(client, *args)
    return op


def _registry_query(name: str, convert: Any = None) -> Any:
    def op(reg: Any, client: str, *args: Any) -> Any:
        if convert is not None:
            args = convert(*args)
        return getattr(reg, name).remote(*args)
    return op


_REGISTRY_OPS: dict[str, Any] = {
    "incref": _registry_op("incref"),
    "loan": _registry_op("loan"),
    "adopt": _registry_op("adopt"),
    "goodbye": _registry_op("goodbye"),
    "get_methods": _registry_query("get_methods", lambda token: (token.id,)),
    "dummy": _registry_query("ping"),
    "number_of_objects": _registry_query("number_of_objects"),
    "list_objects": _registry_query("list_objects"),
    "clients": _registry_query("list_clients"),
    "debug_info": _registry_query("debug_info"),
}


def _gone_text(oid: str, meth: str, address: str) -> str:
    return (f"KeyError: {oid!r}: {meth}() found no object with this id in the manager at "
            f"{address!r}. It was released when no process held a proxy to it any more (a "
            "proxy rebuilt from a bare Token does not keep its object alive). Keep a proxy "
            "for as long as the object is used, or create the object again.\n")


def _arguments_error(e: BaseException, oid: Any, meth: str, args: tuple,
                     kwds: dict, typeid: str | None = None) -> BaseException:
    from ..wire.diagnose import arguments_error
    if isinstance(e, (OSError, EOFError)):
        return e        # (submitting may fail on Ray's own connections, not the arguments)
    try:
        import cloudpickle  # noqa: F401  (the diagnosis tries values with Ray's pickler)
        ser = "cloudpickle"
    except ImportError:
        ser = "pickle"
    return arguments_error(e, ser, oid, meth, args, kwds, typeid)


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception as e:
        log.debug("cancel failed: %r", e)


def _cancel_and_wait(ref: Any) -> None:
    """Cancel a call its caller gave up on (Ctrl-C, a cancelled future or
    asyncio task), and return once it has ended, or after `CANCEL_WAIT`: Ray
    does not order a cancel with the calls sent after it, so a blocked get
    could otherwise take the item of a put made right after (as the local
    backend's cancel waits for the manager's confirmation).  Not on a thread
    Python did not start (Ray's own, running a future's callbacks): blocking
    there would stall the reply it waits for."""
    _cancel(ref)
    if isinstance(threading.current_thread(), threading._DummyThread):
        return
    try:
        ray.wait([ref], timeout=CANCEL_WAIT, fetch_local=False)
    except Exception as e:
        log.debug("waiting for a cancelled call failed: %r", e)


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception as e:
        log.debug("kill failed: %r", e)


def _set(fut: concurrent.futures.Future, value: Any) -> None:
    if not fut.done():
        try:
            fut.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass


def _set_exc(fut: concurrent.futures.Future, exc: BaseException) -> None:
    if not fut.done():
        try:
            fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


def _resolve(fut: concurrent.futures.Future, compute: Any) -> None:
    try:
        _set(fut, compute())
    except BaseException as e:
        _set_exc(fut, _bare(e))


def _bare(exc: BaseException) -> BaseException:
    """`exc` without its traceback, nor any on the exceptions chained to it, to
    be kept in a future.  Each traceback leads back, frame by calling frame, to
    the frames that hold that future (and the call's arguments, and the proxy
    its callbacks hold): a cycle that keeps them all alive until a full
    collection.  The frames dropped are those of the call's machinery; the
    type, the message, `__cause__` and `__context__` stay."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += (e.__cause__, e.__context__)
    return exc


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _background(fn: Any) -> None:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="procshare-ray")
    _pool.submit(fn)


# -- the sessions of this process ---------------------------------------------------------------
_sessions: dict[tuple, RaySession] = {}
_sessions_mutex = threading.Lock()


def session_for(address: Any, authkey: bytes, serializer: Any = "pickle") -> RaySession:
    """The session for the Ray manager at `address` (the core's `get_session`
    calls this for addresses that start with `ray://`)."""
    key = (str(address), bytes(authkey))
    s = _sessions.get(key)
    if s is not None and not s.closed:
        return s
    with _sessions_mutex:
        s = _sessions.get(key)
        if s is None or s.closed:
            s = _sessions[key] = RaySession(address, authkey, serializer)
        return s


def drop_sessions(address: str) -> None:
    """Forget the sessions of a manager that has shut down."""
    with _sessions_mutex:
        gone = [_sessions.pop(k) for k in list(_sessions) if k[0] == str(address)]
    for s in gone:
        s.close()


_goodbye_pid: int | None = None


def _goodbye_at_exit() -> None:
    """Say goodbye to every Ray manager when this process exits: with atexit
    registered after `ray.init()` (so it runs before Ray's own exit handler) and
    as a multiprocessing finalizer (child processes do not run atexit)."""
    global _goodbye_pid
    if _goodbye_pid == os.getpid():
        return
    _goodbye_pid = os.getpid()
    atexit.register(_goodbye_all)
    mp_util.Finalize(None, _goodbye_all, exitpriority=10)


_said: set = set()


def _goodbye_all() -> None:
    if os.getpid() in _said:
        return
    _said.add(os.getpid())
    for s in list(_sessions.values()):
        s.goodbye()
    if cluster.connected_by_us() == "joined" and ray.is_initialized():
        # a process that joined the cluster only for its proxies leaves it
        # cleanly (its Ray job ends now, not when the cluster notices)
        try:
            ray.shutdown()
        except Exception as e:
            log.debug("ray.shutdown at exit: %r", e)


# -- the hook in the core ---------------------------------------------------------------------------
def _install() -> str:
    """Route `ray://` addresses to `session_for` (the core's session factory hook)."""
    core_session.register_session_factory(PREFIX, session_for)
    return "hook"


installed = _install()
