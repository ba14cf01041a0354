"""Wire protocol, sans-IO: frames, message kinds, request ids and deadlines.

Owns: the byte layout of every message between a proxy and a manager server, and
the `Token` that names a shared object. It never touches a socket, so it can be
tested with bytes alone; `transport` does the I/O.

Rules it keeps:
- A frame is one fixed header, a table of out-of-band buffer lengths, the body and
  then the buffers.  Everything needed to route a frame (kind, request id, time
  budget) is in the header, so a body that cannot be deserialized can still be
  answered by request id.
- Request id 0 means "no reply wanted" (fire-and-forget: decref).
- The time budget travels as *remaining seconds* rather than an absolute clock
  reading, so that it stays meaningful between machines whose clocks differ; the
  server turns it into its own monotonic deadline on receipt.  NaN means no deadline.
- Frame sizes are bounded; a frame over the limit is a `FrameError` and the
  connection that sent it is closed by the caller.
"""

from __future__ import annotations

import math
import struct
from typing import Any

__all__ = [
    "Token", "FrameError", "encode_frame", "decode_frame", "split_header", "buffer_lengths",
    "HEADER", "BUFLEN_SIZE",
    "CALL", "RETURN", "ERROR", "TRACEBACK", "PROXY", "UNSERIALIZABLE", "TIMEOUT", "WARNED",
    "HELLO", "NO_DEADLINE", "MAX_FRAME",
]

# message kinds (one byte in the header)
CALL = 1            # body: (object id or None, method name, args, kwds)
HELLO = 2           # body: dict describing the client; first frame after auth
RETURN = 10         # body: the result
ERROR = 11          # body: the exception raised by the referent
TRACEBACK = 12      # body: str, a formatted traceback (server-side failure)
PROXY = 13          # body: (proxytype or None, exposed, token, attributes)
UNSERIALIZABLE = 14  # body: (message, facts): why the result could not be serialized
TIMEOUT = 15        # body: str, the server gave up at the deadline; nothing happened
WARNED = 16         # body: (result, [(warning category, message), ...])

NO_DEADLINE = math.nan

#: body length, kind, flags, number of out-of-band buffers, request id, seconds left
HEADER = struct.Struct("!IBBHQd")
_BUFLEN = struct.Struct("!Q")

#: the largest in-band body, and the largest frame including its buffers
MAX_BODY = 1 << 30
MAX_FRAME = 1 << 40


class FrameError(ValueError):
    """A peer sent bytes that are not a valid frame."""


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


def encode_frame(kind: int, rid: int, body: bytes, buffers: list | tuple = (),
                 budget: float = NO_DEADLINE, flags: int = 0) -> list:
    """Return the frame as a list of bytes-like pieces, ready for one `sendmsg`.

    With no buffers the list has a single `bytes` (header and body joined), so
    the common small call is one contiguous write.
    """
    if len(body) > MAX_BODY:
        raise FrameError(f"message body of {len(body)} bytes is over the {MAX_BODY}-byte limit")
    if not buffers:
        return [HEADER.pack(len(body), kind, flags, 0, rid, budget) + body]
    views = [memoryview(b).cast("B") for b in buffers]
    head = HEADER.pack(len(body), kind, flags, len(views), rid, budget)
    lengths = b"".join(_BUFLEN.pack(v.nbytes) for v in views)
    return [head + lengths + body, *views]


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[tuple, int] | None:
    """Decode one whole frame from the start of `data`.

    Returns `((kind, rid, budget, body, buffers), consumed)`, or None when `data`
    does not hold a whole frame yet.  `budget` is the seconds left (NaN for
    none); `body` and `buffers` are copies.
    """
    if len(data) < HEADER.size:
        return None
    blen, kind, nbufs, rid, budget = split_header(data)
    pos = HEADER.size
    if len(data) < pos + nbufs * _BUFLEN.size:
        return None
    lengths = buffer_lengths(memoryview(data)[pos:], nbufs)
    pos += nbufs * _BUFLEN.size
    if len(data) < pos + blen + sum(lengths):
        return None
    body = bytes(data[pos:pos + blen])
    pos += blen
    buffers = []
    for n in lengths:
        buffers.append(bytearray(data[pos:pos + n]))
        pos += n
    return (kind, rid, budget, body, buffers), pos


def split_header(head: bytes | bytearray | memoryview) -> tuple[int, int, int, int, float]:
    """Parse a header: `(body_len, kind, nbufs, rid, budget)`. The transport uses
    it to receive large bodies and buffers straight into place."""
    blen, kind, _flags, nbufs, rid, budget = HEADER.unpack_from(head, 0)
    if blen > MAX_BODY:
        raise FrameError(f"frame body of {blen} bytes is over the {MAX_BODY}-byte limit")
    return blen, kind, nbufs, rid, budget


def buffer_lengths(table: bytes | bytearray | memoryview, nbufs: int) -> list[int]:
    """Parse the table of out-of-band buffer lengths that follows the header."""
    lengths = [_BUFLEN.unpack_from(table, i * _BUFLEN.size)[0] for i in range(nbufs)]
    if HEADER.size + sum(lengths) > MAX_FRAME:
        raise FrameError(f"frame buffers of {sum(lengths)} bytes are over the {MAX_FRAME}-byte limit")
    return lengths



BUFLEN_SIZE = _BUFLEN.size
