"""Records: what the bodies of frames hold, and the `Token` that names an object.

Owns: `Token`, and the shapes of call and reply bodies (documented here, built
as plain tuples on the hot path so they pickle small and fast).

Rules it keeps:
- A CALL body is `(object id or None, method name, args, kwds)`; object id
  None is a manager operation (`create`, `decref`, ...).
- A reply's kind says how to read its body (see `kinds.Kind`): RETURN a
  value; ERROR an exception; PROXY `(proxytype, exposed, token, attributes)`;
  WARNED `(value, [(category, message), ...])`; TIMEOUT, TRACEBACK a str;
  UNSERIALIZABLE `(message, facts)`.
- Proxy classes carry the marker `_procshare_proxy_ = True`; the wire layer
  recognises proxies by it (`is_proxy`), never by importing them.
- `Token` pickles as a plain tuple of its three fields, like the stdlib's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Token", "is_proxy", "is_proxy_type", "DURABLE_PREFIX"]

#: the id prefix of durable objects: their ids stay the same across restarts of
#: the manager (`server.durables`), and the client re-attaches and re-sends by it
DURABLE_PREFIX = "D:"


class Token:
    """Names one shared object: its type id, the manager's address and its id."""

    __slots__ = ("typeid", "address", "id")

    def __init__(self, typeid: str, address: Any, id: str) -> None:
        (self.typeid, self.address, self.id) = (typeid, address, id)

    def __getstate__(self) -> tuple:
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state: tuple) -> None:
        (self.typeid, self.address, self.id) = state

    def __repr__(self) -> str:
        return "%s(typeid=%r, address=%r, id=%r)" % (
            self.__class__.__name__, self.typeid, self.address, self.id)



def is_proxy_type(cls: Any) -> bool:
    """Is `cls` a proxy class?  (Proxies live in `client/`, which the wire layer
    does not import: `BaseProxy` says so with the `_procshare_proxy_` marker.)"""
    return isinstance(cls, type) and getattr(cls, "_procshare_proxy_", False) is True


def is_proxy(obj: Any) -> bool:
    """Is `obj` a proxy?"""
    return is_proxy_type(type(obj))
