"""The manager server running in this process, if any: the one meeting point
of `client/` and `server/`.

Owns: the reference to the in-process server.

Rules it keeps:
- It imports nothing from procshare.  `server/` registers its server here when
  it starts serving; `client/` asks here, so that a proxy used inside the
  manager process (a nested proxy, a proxy handed to a hosted object) takes
  and gives back its references directly in the registry, and a Condition
  finds the real lock behind a proxy.  Method calls still go through a socket.
- The client uses only the server's `address`, `objects` and `local_*`
  reference methods.
"""

from __future__ import annotations

from typing import Any

__all__ = ["local_server", "set_local_server"]

_server: Any = None


def local_server() -> Any:
    """The server running in this process, or None."""
    return _server


def set_local_server(server: Any) -> None:
    global _server
    _server = server
