"""The manager server running in this process, if any: the one meeting point
of `client/` and `server/`.

Owns: the reference to the in-process server, and the proxies rebuilt while
it recovers its durable objects (`begin_recovery`, `recovering`).

Rules it keeps:
- It imports nothing from procshare.  `server/` registers its server here when
  it starts serving; `client/` asks here, so that a proxy used inside the
  manager process (a nested proxy, a proxy handed to a hosted object) takes
  and gives back its references directly in the registry, and a Condition
  finds the real lock behind a proxy.  Method calls still go through a socket.
- The client uses only the server's `address`, `authkey`, `objects` and
  `local_*` reference methods.
"""

from __future__ import annotations

from typing import Any

__all__ = ["local_server", "set_local_server", "recovering", "begin_recovery",
           "end_recovery"]

_server: Any = None
_recovering: list | None = None     # proxies rebuilt while the server recovers


def recovering() -> list | None:
    """While the server in this process rebuilds its durable objects: the
    list where a proxy unpickled then (a proxy stored in a durable object)
    puts itself, to take its reference once every object is back."""
    return _recovering


def begin_recovery(server: Any) -> Any:
    """The server starts recovering: it counts as this process's server (its
    proxies are local ones); returns what `end_recovery` restores."""
    global _server, _recovering
    before = (_server, _recovering)
    _server, _recovering = server, []
    return before


def end_recovery(before: Any) -> list:
    """Recovery ended: the proxies rebuilt during it (weak references)."""
    global _server, _recovering
    got = _recovering or []
    _server, _recovering = before
    return got


def local_server() -> Any:
    """The server running in this process, or None."""
    return _server


def set_local_server(server: Any) -> None:
    global _server
    _server = server
