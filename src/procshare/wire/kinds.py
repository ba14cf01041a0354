"""Message kinds: the one-byte tag in every frame header.

Owns: the numbering of message kinds, as an `IntEnum`, so logs and errors say
`RETURN` rather than `10`.

Rules it keeps:
- The numbers are the wire format: never renumber a kind, only add new ones.
- Members are ints, so code on the hot path compares the raw header byte with
  them directly; `Kind(n)` (or `kind_name(n)`) is only for messages and logs.
"""

from __future__ import annotations

import enum

__all__ = ["Kind", "kind_name"]


class Kind(enum.IntEnum):
    CALL = 1            # body: (object id or None, method name, args, kwds)
    HELLO = 2           # body: JSON dict describing the client; first frame after auth
    NOTICE = 3          # body: empty; only slot entries (releases): taken by the transport
    STOPPING = 4        # body: JSON {"by": pid or null, "why", "when", "pid", "manager"}:
    #                     the manager stopped for good; the last frame a connection gets
    RETURN = 10         # body: the result
    ERROR = 11          # body: the exception raised by the referent
    TRACEBACK = 12      # body: str, a formatted traceback (server-side failure)
    PROXY = 13          # body: (proxytype or None, exposed, token, attributes)
    UNSERIALIZABLE = 14  # body: (message, facts): why the result could not be serialized
    TIMEOUT = 15        # body: str, the server gave up at the deadline; nothing happened
    WARNED = 16         # body: (result, [(warning category, message), ...])


_NAMES = {k.value: k.name for k in Kind}


def kind_name(kind: int) -> str:
    """`RETURN` for 10; `kind 99` for a number that is not a kind."""
    return _NAMES.get(kind, f"kind {kind}")
