"""Addresses: which socket family an address means, and choosing one.

Owns: the rules of `multiprocessing.connection` addresses for procshare, and
the fall-back for Unix socket paths that are too long.

Rules it keeps:
- A `(host, port)` tuple is TCP, a string is a Unix socket path (a leading NUL
  is Linux's abstract namespace).
- An automatically chosen Unix path that would be too long for AF_UNIX falls
  back to a short one under /tmp, then to the abstract namespace.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from typing import Any

__all__ = ["address_family", "arbitrary_address", "cleanup_address", "UNIX_PATH_MAX",
           "AddressTypeError"]

UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL


class AddressTypeError(ValueError, TypeError):
    """An address that is neither a (host, port) tuple nor a socket path (the
    stdlib raises ValueError, or TypeError for one it cannot index)."""


def address_family(address: Any) -> int:
    if isinstance(address, tuple):
        return socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
    if isinstance(address, (str, bytes)):
        return socket.AF_UNIX
    raise AddressTypeError(f"address type of {address!r} unrecognized: an address is a "
                           "(host, port) tuple or a Unix socket path")


def arbitrary_address() -> str:
    """A fresh Unix socket path that fits AF_UNIX's length limit."""
    name = f"procshare-{os.getpid()}-{secrets.token_hex(4)}.sock"
    for base in (tempfile.gettempdir(), "/tmp"):
        path = os.path.join(base, name)
        if len(os.fsencode(path)) <= UNIX_PATH_MAX and os.access(base, os.W_OK):
            return path
    return "\0" + name  # Linux abstract namespace: no file at all


def cleanup_address(address: Any) -> None:
    """Remove the socket file of a Unix address, if there is one."""
    if isinstance(address, str) and address and address[0] != "\0":
        try:
            os.unlink(address)
        except OSError:
            pass
