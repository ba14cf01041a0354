"""Loans this process took for the proxies it pickled, and giving back the
ones no message will carry.

Owns: the table of recent loans (`record`, by `BaseProxy.__reduce__`), the
sequence that orders them (`mark`), and the ways a loan goes back unused: a
pickle thrown away and made again (`release_discarded`, a serializer's
hook), a call that was never sent (`release_since`: its arguments could not
be serialized, or its message was over the manager's limits), and a fork
loan that the child never adopted (the child exited or exec'd without
using the manager: `watch_fork_loan`, `check_fork_loans`).

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
- A fork loan (every reference of the parent, lent to the child before a
  fork: `session._lend_before_fork`) comes with a pipe whose write end only
  the child keeps (close-on-exec).  The child closes it once the manager
  answered the hello that adopted the loan; a child that never adopts it
  closes it by exiting or by an exec.  The parent gives the loan back once
  that end is closed (a no-op if it was adopted; else the references it
  held go, which a raw `os.fork()` child that never used the manager kept
  for 10 minutes): it looks (one poll() of the pipes, never waiting for
  them; skipped while another thread looks) before each fork and at each
  control call or control message it sends (`check_fork_loans`: a decref,
  when a proxy goes), not from a thread of its own (a thread would make
  every later fork a fork of a multi-threaded process).  So a loan whose
  child is gone goes back at the parent's next control traffic, at the
  latest after `LOAN_TTL`.  A read end that is no longer its pipe (closed
  and reused under us) is forgotten: its loan ends at `LOAN_TTL`.
- A child that closes the descriptors it inherited (`os.closerange`) before
  it adopts ends its loan as an exit would: objects its parent let go
  meanwhile are gone.  The child closes its write end only if the
  descriptor is still that pipe (a number closed and reused is left alone).
  A child that forks before it adopted adopts first, so that its own
  children get a loan of their own (`session._lend_before_fork`).
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import threading
from typing import Any

from ..inprocess import local_server
from ..transport.channel import readable_now
from ..wire import serializers

__all__ = ["record", "mark", "release_discarded", "release_since", "RECENT", "fork_pipe",
           "watch_fork_loan", "check_fork_loans", "after_fork_in_child"]

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


# -- fork loans never adopted -------------------------------------------------------

_watch_mu = threading.Lock()
#: read end of a fork loan's pipe -> (the session it came from, the loan, the
#: pipe's (st_dev, st_ino): a number closed and reused under us is not it)
_watched: dict[int, tuple[Any, str, tuple[int, int]]] = {}
_checking = threading.local()


def fork_pipe() -> tuple[int, int] | None:
    """A pipe for a fork loan (both ends close-on-exec); None if none can be
    made (the loan then lasts until the manager's `LOAN_TTL`)."""
    try:
        return os.pipe()
    except OSError:
        return None


def watch_fork_loan(session: Any, loan: str, read_end: int) -> None:
    """(the parent, after the fork) Give `loan` back to `session`'s manager
    once every write end of the pipe is closed (`check_fork_loans`);
    `read_end` is closed then."""
    try:
        st = os.fstat(read_end)
    except OSError:
        return
    entry = (session, loan, (st.st_dev, st.st_ino))
    with _watch_mu:
        _watched[read_end] = entry


def check_fork_loans() -> None:
    """Give back the fork loans whose children adopted them or are gone: one
    poll() of their pipes, never waiting for one.  Called where this process
    talks to its managers anyway: before each fork, and at each control call
    or control message (a decref when a proxy goes)."""
    if not _watched or getattr(_checking, "on", False):
        return
    if not _watch_mu.acquire(blocking=False):
        return      # another thread looks now (or this one, from a finalizer)
    _checking.on = True     # (the give-back is a control message: no recursion)
    try:
        ended = []
        try:
            try:
                ready = readable_now(list(_watched))
            except (OSError, ValueError):
                ready = []      # (look again next time)
            for fd in ready:
                session, loan, ident = _watched.pop(fd)
                try:
                    st = os.fstat(fd)
                    ours = (st.st_dev, st.st_ino) == ident
                except OSError:
                    ours = False
                if not ours:
                    continue    # closed (and maybe reused) under us: LOAN_TTL ends it
                try:
                    os.close(fd)
                except OSError:
                    pass
                if not getattr(session, "closed", False):
                    ended.append((session, loan))
        finally:
            _watch_mu.release()
        for session, loan in ended:
            session.control_send("release_loan", loan)      # (never raises)
    finally:
        _checking.on = False


def after_fork_in_child() -> None:
    """The parent's watch is not this process's: forget it (its read ends
    closed here), with a new lock (the parent's may have been held)."""
    global _watch_mu
    _watch_mu = threading.Lock()
    for fd in _watched:
        try:
            os.close(fd)
        except OSError:
            pass
    _watched.clear()


serializers.discarded_body_hooks.append(release_discarded)
