"""Loans this process took for the proxies it pickled, and giving back the
ones no message will carry.

Owns: the table of recent loans (`record`, by `BaseProxy.__reduce__`), the
sequence that orders them (`mark`), and the two ways a loan goes back
unused: a pickle thrown away and made again (`release_discarded`, a
serializer's hook) and a call that was never sent (`release_since`: its
arguments could not be serialized, or its message was over the manager's
limits).

Rules it keeps:
- A loan is a reference the manager keeps for a proxy in transit until the
  receiver adopts it, or for `LOAN_TTL` (10 minutes).  One that no message
  carries would keep its object alive that long after the last proxy went:
  each is given back at once, on the session's control connection (or to
  the manager running in this process), never waiting for a reply.
- `release_since(mark)` gives back only the loans that this thread took
  after `mark`: a thread pickles and sends its own calls, so these are the
  ones of the pickling that failed (and of its diagnosis); another
  thread's loans, in messages on their way, are never touched.
- The table holds the last `RECENT` loans; an older one is no longer given
  back here (the manager's `LOAN_TTL` ends it).
"""

from __future__ import annotations

import collections
import itertools
import re
import threading
from typing import Any

from ..inprocess import local_server
from ..wire import serializers

__all__ = ["record", "mark", "release_discarded", "release_since", "RECENT"]

#: how many recent loans are remembered
RECENT = 4096
_LOAN_ID = re.compile(rb"loan:[0-9a-f]{16}")

#: loan -> (session it came from, or None for the manager in this process;
#: the thread that took it; its place in `_seq`)
_recent: collections.OrderedDict[str, tuple[Any, int, int]] = collections.OrderedDict()
_seq = itertools.count(1)      # (next() is atomic: one count for all threads)
#: a number above every loan taken so far (take one before pickling a call)
mark = _seq.__next__


def record(loan: str, session: Any) -> None:
    """A proxy was pickled with `loan`, from `session` (None: the manager
    that runs in this process)."""
    _recent[loan] = (session, threading.get_ident(), next(_seq))
    while len(_recent) > RECENT:
        try:
            _recent.popitem(last=False)
        except KeyError:    # (another thread emptied it meanwhile)
            break


def release_discarded(body: bytes) -> None:
    """A serializer pickled a message, threw that pickle away and made another
    (to send large buffers out of band): give back the loans the discarded one
    took, which nobody will adopt."""
    if not _recent or b"loan:" not in body:
        return
    for match in _LOAN_ID.finditer(body):
        _give_back(match.group().decode())


def release_since(since: int, error: BaseException | None = None) -> Any:
    """A call was not sent: give back the loans this thread took after
    `since` (a `mark()` made before its arguments were pickled).  Returns
    `error`, to raise (`raise release_since(mark, error) from None` keeps no
    reference to it in the raising frame, which its traceback holds: a cycle
    that would keep the call's arguments, and their proxies, until a
    garbage collection)."""
    if not _recent:
        return error
    me = threading.get_ident()
    mine = [loan for loan, (_s, ident, seq) in list(_recent.items())
            if seq > since and ident == me]
    for loan in mine:
        _give_back(loan)
    return error


def _give_back(loan: str) -> None:
    try:
        session = _recent.pop(loan)[0]
    except KeyError:
        return      # not ours, or given back already
    if session is None:
        server = local_server()
        if server is not None:
            server.objects.release_holder(loan)
    else:
        session.control_send("release_loan", loan)


serializers.discarded_body_hooks.append(release_discarded)
