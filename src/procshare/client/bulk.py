"""Client: large data through shared memory, the session's part.

Owns: asking for shared memory in a connection's hello (`ask`), attaching
the session's slot link to a connection the manager agreed on (`agree`), and
the side connections that carry arena descriptors (`_side`).

Rules it keeps:
- Only Unix-socket connections ask; TCP keeps the socket path.  Where this
  machine has no shared memory (or `PROCSHARE_SHM=none`), or the manager
  has none, one warning per process and the socket path.
- One link per session and manager instance (`transport.slots.client_link`):
  a forked child or a restarted manager gets a new one; a closed session
  closes its link (`session_closed`).
- Descriptors travel only on side connections: a connection of its own,
  authenticated like any other, whose hello carries our descriptors and
  whose one answer carries the manager's.  A call connection never carries
  one, so its plain receives can drop nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..transport import channel as transport
from ..transport import shm, slots
from ..wire.frames import pack_frame
from ..wire.kinds import Kind
from ..wire.serializers import decode_hello, encode_hello

__all__ = ["ask", "agree", "session_closed"]

_SIDE_TIMEOUT = 20.0


def ask(ch: transport.Channel, hello: dict) -> None:
    """Add the request for shared memory to a connection's hello, if it can be had."""
    if not shm.can_pass_fds(ch):
        return
    reason = slots.unavailable_reason()
    if reason is not None:
        slots.warn_unavailable(reason)
        return
    hello["shm"] = 1


def agree(session: Any, ch: transport.Channel, answer: dict, client_id: Callable[[], str]
          ) -> None:
    """The manager answered the hello: use shared memory on `ch` if it agreed."""
    got = answer.get("shm")
    if not isinstance(got, dict):
        return
    if got.get("refused"):
        slots.warn_unavailable(f"the manager has no shared memory ({got['refused']})")
        return
    server = got.get("server")
    if not isinstance(server, str):
        return

    def announce(arenas: list, fds: list) -> None:
        _side(session, client_id, {"op": "announce", "server": server, "arenas": arenas}, fds)

    def fetch(want: list) -> tuple[list, list]:
        info, fds = _side(session, client_id, {"op": "fetch", "server": server, "want": want},
                          [])
        return info.get("arenas") or [], fds

    ch.attach_slots(slots.client_link(session, server, announce, fetch))


def session_closed(session: Any) -> None:
    slots.drop_client_link(session)


def _side(session: Any, client_id: Callable[[], str], request: dict, fds: list
          ) -> tuple[dict, list]:
    """One request on a side connection: `(answer, descriptors that came)`."""
    ch = transport.connect(session.address, timeout=_SIDE_TIMEOUT)
    got: list = []
    try:
        transport.client_handshake(ch, session.authkey, session.address)
        hello = {"client": client_id(), "pid": os.getpid(), "role": "shm", "version": 1,
                 "session": session.token, "serializer": session.serializer.name,
                 **request}
        shm.send_frame_fds(ch, [pack_frame(Kind.HELLO, 1, encode_hello(hello))], fds)
        kind, _rid, _b, body, bufs, got = shm.recv_frame_fds(
            ch, time.monotonic() + _SIDE_TIMEOUT, maxfds=16)
        info = decode_hello(body, bufs, session.serializer)
    except BaseException:
        for fd in got:
            os.close(fd)
        raise
    finally:
        ch.close()
    if kind != Kind.RETURN or not isinstance(info, dict):
        for fd in got:
            os.close(fd)
        message = info.get("message") if isinstance(info, dict) else info
        raise shm.SlotClaimError(f"the manager refused a shared-memory request: {message}")
    return info, got
