"""Helpers on proxies of Ray managers: pipelined calls and actor facts.

Owns: `call_async(proxy, method, *args)` (a `concurrent.futures.Future` of
the result, on top of Ray object refs) and `actor_info(proxy)`.

Rules it keeps:
- A future resolves exactly as `proxy._callmethod` would return or raise
  (`RaySession.submit_pipelined`, which `procshare.async_` uses too), with
  the same deadline precedence (`timeout=`, `procshare.timeout()`, the
  proxy's, the manager's).
- Nothing here blocks Ray's callback thread: futures resolve from it with
  values only.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from ..client import scope
from .session import RaySession

__all__ = ["call_async", "actor_info"]

_UNSET = scope.UNSET


def _session_of(proxy: Any) -> RaySession:
    session = getattr(proxy, "_procshare_session", None)
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
            timeout = proxy._procshare_timeout if proxy._procshare_timeout is not _UNSET else None
    return session.submit_pipelined(proxy, methodname, args, kwds, timeout)


def actor_info(proxy: Any) -> dict:
    """Facts about the actor hosting `proxy`'s object: pid, node, actor name,
    whether it restarted, whether it is durable and its snapshot file."""
    _session_of(proxy)
    return proxy._callmethod("#INFO")
