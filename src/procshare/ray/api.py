"""Helpers on proxies of Ray managers: pipelined calls and actor facts.

Owns: `call_async(proxy, method, *args)` (a `concurrent.futures.Future` of
the result, on top of Ray object refs) and `actor_info(proxy)`.

Rules it keeps:
- A future resolves exactly as `proxy._callmethod` would return or raise:
  the same reply handling (`raise_reply`), the same CallTimeout text, the same
  deadline precedence (`timeout=`, `procshare.timeout()`, the proxy's, the
  manager's).
- Nothing here blocks Ray's callback thread: futures resolve from it with
  values only.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from ..client import scope
from ..client.replies import call_timeout, raise_reply
from ..wire.kinds import Kind
from .session import RaySession

__all__ = ["call_async", "actor_info"]

_UNSET = scope.UNSET


def _session_of(proxy: Any) -> RaySession:
    session = getattr(proxy, "_session", None)
    if not isinstance(session, RaySession):
        raise TypeError(f"{type(proxy).__name__} is not a proxy of a Ray manager "
                        "(procshare.ray.RayManager)")
    return session


def call_async(proxy: Any, methodname: str, /, *args: Any, timeout: Any = _UNSET,
               **kwds: Any) -> concurrent.futures.Future:
    """Start `proxy.<methodname>(*args, **kwds)` and return a Future of its result.

    Calls started one after another on one serial object run in that order, so
    `[call_async(counter, "increment") for _ in range(1000)]` pipelines them.
    """
    session = _session_of(proxy)
    if timeout is _UNSET:
        timeout = scope.scoped_timeout()
        if timeout is _UNSET:
            timeout = proxy._timeout if proxy._timeout is not _UNSET else None
    raw = session.call_async(proxy._id, methodname, args, kwds, timeout)
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        failed = f.exception()      # not raised here (see RaySession.call_async)
        if isinstance(failed, TimeoutError):    # the deadline passed; it may still complete
            out.set_exception(call_timeout(proxy, methodname, timeout, False))
            return
        if failed is not None:
            out.set_exception(failed)
            return
        kind, payload = f.result()
        try:
            if kind == Kind.RETURN:
                out.set_result(payload)
            elif kind == Kind.PROXY:
                out.set_result(proxy._rebuild_returned(payload))
            else:
                out.set_result(raise_reply(kind, payload, proxy, methodname, timeout))
        except BaseException as e:
            # without this callback's frames: they hold the proxy (and the future)
            out.set_exception(e.with_traceback(None))

    raw.add_done_callback(done)
    return out


def actor_info(proxy: Any) -> dict:
    """Facts about the actor hosting `proxy`'s object: pid, node, actor name,
    whether it restarted, whether it is durable and its snapshot file."""
    _session_of(proxy)
    return proxy._callmethod("#INFO")
