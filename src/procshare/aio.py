"""asyncio access to proxies: `p = procshare.aio.wrap(proxy)`, then `await p.method(...)`.

Owns: `wrap` and `AioProxy`, a thin asyncio face on pipelined calls
(`client.pipeline`).

Rules it keeps:
- Awaiting never blocks the event loop: the call is sent at once and its
  reply resolves a future that the loop awaits (`asyncio.wrap_future`).
  Cancelling does, briefly: it waits for the manager's confirmation (one
  round trip; on Ray, for the call to end, at most `ray.session.CANCEL_WAIT`).  Many
  calls can be in flight, from one task or from many.
- Cancelling the awaiting task cancels the call in the manager by request id,
  as Ctrl-C does for a plain call: a blocked `get()` or `acquire()` takes
  nothing.
- Errors, deadlines and ordering are those of `procshare.async_`.  It works on
  any event loop, uvloop included.
- The first call from a thread opens that thread's pipelined connection (a
  short blocking connect).
- Importing procshare does not import asyncio (with ssl, in every spawned
  child): a call imports it, when an event loop runs, so asyncio is loaded
  already.
"""

from __future__ import annotations

from typing import Any

from .client.pipeline import async_
from .client.scope import UNSET

__all__ = ["wrap", "AioProxy"]


class AioProxy:
    """An awaitable face of a proxy: `await p.method(*args, **kwds)`."""

    __slots__ = ("_calls", "proxy")

    def __init__(self, proxy: Any, timeout: Any = UNSET) -> None:
        self.proxy = proxy
        self._calls = async_(proxy, timeout)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._calls, name)

        async def call(*args: Any, **kwds: Any) -> Any:
            import asyncio  # (loaded: this runs in its event loop)
            return await asyncio.wrap_future(method(*args, **kwds))
        call.__name__ = name
        return call

    def __repr__(self) -> str:
        return f"procshare.aio.wrap({self.proxy!r})"


def wrap(proxy: Any, timeout: Any = UNSET) -> AioProxy:
    """An asyncio face of `proxy`.  `timeout=` (seconds, or None for no limit)
    bounds each call; by default the proxy's usual timeouts apply."""
    return AioProxy(proxy, timeout)
