"""The durable loop: one thread that serves the durable calls of many
connections while their own threads are parked.

With a thread per connection, several clients writing durable objects at
once make the GIL change hands at every commit's `sqlite3_step` and at every
socket call, between as many threads as there are clients: four clients'
durable sets took 55-63 us each against 13.5 for plain ones.  Here one thread
reads the calls of every parked connection that are there, applies them all,
waits for one commit and writes all their replies (docs/design.md, *Durable
writes when several clients write at once*).

Owns: `DurableLoop` (one per server, its thread started at the first park):
which connections are parked, which frames the loop serves itself
(`loopable`), and the hand-back of a connection to its own thread.

Rules it keeps:
- A connection is parked only by its own thread (`park`), right after a
  durable call of its own on an object the loop can serve, with nothing of
  the next frame received yet (the loop waits for the socket, not for
  bytes a reader holds), and only while several clients write at once (the
  journal's last commit held more than one call: `Journal.last_batch`); its
  thread then sleeps until the loop hands the connection back, with the
  frame the loop did not serve, if any.
- The loop serves a frame only if it is a call that wants a reply, with no
  out-of-band buffers and not cancelled (its request id is the call's
  before the cancel check, as on the thread's path), holding no proxy (its
  pickle names `RebuildProxy`: unpickling one may adopt a loan or ask
  another manager), of an exposed method that returns no proxy, on a
  durable object of a built-in effects kind (dict, list, set, Namespace,
  Value, Array: not queues, whose calls may wait), whose lock is free at
  once (`DurableObjects.apply(wait=False)`).  So it never waits but for a
  commit.
- Anything else goes back to the connection's thread, which meets it as it
  would have: a frame the loop does not serve (with its call, if the loop
  unpickled it, so that no argument is unpickled twice), part of a frame or
  more frames than `ROUND_FRAMES` (a channel's reader keeps what came), and
  what a receive raised (the end of the stream, a bad frame: the thread
  raises it).
- Replies keep their order: the loop writes the replies of the calls it
  served on a connection (after their commit), in order, before it hands
  the connection back.  It writes them without ever waiting for a socket
  (`Channel.send_from_loop`): what a socket does not take is written by the
  reply watch, or by the connection's thread before its own next write.  A
  connection with replies still held goes back to its thread, whose next
  write waits for the client (back-pressure: the loop reads nothing more
  from a client that does not read its replies).  So does a connection whose
  session owes its client notices (`Channel.notices`, the session's queue:
  slots released, which the loop's writes do not carry), so that its
  thread's next frame carries them; a thread does not park while any are
  owed.
- One round: read every readable parked connection (at most `ROUND_FRAMES`
  frames each), apply what it can, wait for one commit covering those calls
  (the journal's group commit, shared with other threads), write the
  replies, hand back what it must.  If that commit fails, each call's reply
  says whether its own commit happened (an earlier commit by another thread
  may have taken it).
- A connection that was the only one with calls for `SOLO_ROUNDS` rounds in
  a row goes back to its thread: a lone client is served faster by its own
  thread, which polls for the next call on an idle machine.
- When the server stops, every connection goes back to its thread.  If the
  loop fails (a bug), each call it applied and did not answer gets an error
  that says so and names the method and the object (a call that had failed
  at once gets its own reply), every connection goes back with what it was
  to get, and no more are parked.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..transport.channel import ChannelSet
from ..wire.frames import pack_frame
from ..wire.kinds import Kind
from . import callctx, journal
from .durable import Kind as DurableKind
from .durables import Applied

__all__ = ["DurableLoop", "loopable", "ENABLED"]

log = logging.getLogger("procshare.server")

#: the loop at all (`PROCSHARE_DURABLE_LOOP=0`, or off, false, no: every
#: connection keeps its own thread)
ENABLED = os.environ.get("PROCSHARE_DURABLE_LOOP", "1").strip().lower() not in (
    "0", "off", "false", "no")
#: rounds in a row in which only one connection had calls before it goes back
SOLO_ROUNDS = 16
#: frames the loop takes from one connection in one round at most
ROUND_FRAMES = 64
#: the longest the loop sleeps without looking at the server's stop event (s)
STOP_POLL = 0.5
#: in a call's pickle: a proxy (`RebuildProxy`), which the loop leaves to the
#: connection's thread (unpickling one may adopt a loan, or ask another manager)
_PROXY = b"RebuildProxy"


def loopable(entry: Any) -> bool:
    """Can the loop serve calls on `entry` (a durable object of a built-in
    effects kind, whose calls never wait)?"""
    h = entry.durable
    if h is None or not ENABLED:
        return False
    kind: DurableKind = h.kind
    return kind.mode == "effects" and not kind.immediate


class _Back:
    """`_serve`'s answer for a frame its connection's thread must serve:
    `call` as `DurableLoop.park` describes it."""

    __slots__ = ("call",)

    def __init__(self, call: Any = None) -> None:
        self.call = call


class _Parked:
    """A parked connection: its thread sleeps on `lock` until `hand_back`."""

    __slots__ = ("info", "lock", "back", "out")

    def __init__(self, info: Any) -> None:
        self.info = info
        self.lock = threading.Lock()
        self.lock.acquire()
        self.back: Any = None       # what the thread gets (see `DurableLoop.park`)
        self.out = False            # handed back already

    def hand_back(self, back: Any) -> None:
        if not self.out:
            self.out = True
            self.back = back
            self.lock.release()


class DurableLoop:
    """See the module docstring.  `park(info)` from a connection's thread."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.mu = threading.Lock()
        self.incoming: list[_Parked] = []
        self.stopped = False
        self.channels = ChannelSet()
        #: calls served, rounds, connections parked and handed back (for tests
        #: and `server_info`)
        self.stats = {"calls": 0, "rounds": 0, "parked": 0, "handed_back": 0}
        # this round's work, where `_run` finds it if the loop fails midway:
        # parks taken from `incoming`, calls applied and not yet answered
        # ((parked, rid, Applied or reply)), and connections to hand back
        self._new: list[_Parked] = []
        self._served: list[tuple] = []
        self._back: list[tuple] = []
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="procshare-durable-loop")
        self.thread.start()

    def park(self, info: Any) -> Any:
        """(the connection's thread) Sleep until the loop hands the connection
        back.  Returns None (read the next frame), `(frame, call)` (serve this
        frame, which the loop read but did not serve; `call` is its decoded
        `(oid, method, args, kwds)`, the exception decoding it raised, or None
        if it was not decoded), or an exception to raise (a receive failed:
        the end of the stream, a bad frame)."""
        p = _Parked(info)
        with self.mu:
            if self.stopped:
                return None
            self.incoming.append(p)
            self.stats["parked"] += 1
        self.channels.wake()
        p.lock.acquire()
        return p.back

    def stop(self, timeout: float = 2.0) -> None:
        """Hand every connection back and end the loop's thread."""
        with self.mu:
            self.stopped = True
        self.channels.wake()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # -- the loop's thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the durable loop failed; connections go back to their threads")
            self._fail_round()
        finally:
            with self.mu:
                self.stopped = True
                left, self.incoming = self.incoming, []
            for p in self._new + left + self.channels.values():
                self._hand_back(p, None)
            self.channels.close()

    def _fail_round(self) -> None:
        """(the loop failed: a bug) Answer the calls applied this round with
        an error naming each one (a call that failed at once gets its own
        reply), and hand back what was to go back, with its frames."""
        server = self.server
        for p, rid, got in self._served:
            try:
                if type(got) is Applied:
                    reply = server.error_reply(RuntimeError(
                        f"procshare: the durable loop of the manager (pid {os.getpid()}) "
                        f"failed while serving {got.meth}() on the durable "
                        f"{got.entry.typeid} object {got.oid} (a bug: see the manager's "
                        "log). The call was applied, and may or may not be durable: "
                        "check the object before calling again."))
                else:
                    reply = got     # (it failed at once: nothing was applied)
                p.info.channel.send_from_loop(server.encode_reply(rid, *reply))
            except Exception:   # (best effort: the loop is failing already)
                log.debug("could not answer request %d after the failure", rid, exc_info=True)
        # a connection may be in both lists (a call served, then a frame left to
        # its thread): it goes back with that frame, after all the replies above
        for p, back in self._back:
            self._hand_back(p, back)
        for p, _rid, _got in self._served:
            self._hand_back(p, None)

    def _loop(self) -> None:
        server = self.server
        stop = server.stop_event
        channels = self.channels
        stats = self.stats
        callctx.server_state.deadline = None
        solo: _Parked | None = None
        solo_rounds = 0
        while True:
            ready, woken = channels.wait(STOP_POLL)
            if woken:
                with self.mu:
                    self._new, self.incoming = self.incoming, []
                while self._new:
                    p = self._new[-1]
                    channels.add(p.info.channel, p)
                    self._new.pop()
            if stop.is_set() or self.stopped:
                return
            if not ready:
                continue
            served, back = self._served, self._back
            active = []
            for p in ready:
                n = len(served)
                self._read(p, served, back)
                if len(served) > n:
                    active.append(p)
            if served:
                stats["rounds"] += 1
                stats["calls"] += len(served)
                self._reply(served)
            while back:
                self._hand_back(*back[-1])
                back.pop()
            # a lone client goes back to its own thread
            if len(active) == 1 and not active[0].out:
                p = active[0]
                solo_rounds = solo_rounds + 1 if p is solo else 1
                solo = p
                if solo_rounds >= SOLO_ROUNDS:
                    self._hand_back(p, None)
                    solo, solo_rounds = None, 0
            elif active:
                solo, solo_rounds = None, 0

    def _read(self, p: _Parked, served: list, back: list) -> None:
        """Serve what connection `p` sent; what the loop must not serve goes
        to `back` with the connection (after the replies to what it served)."""
        ch = p.info.channel
        if ch.held or ch.notices:
            # replies the socket did not take yet: its thread writes them, waiting
            # for the client (back-pressure); or notices owed to the client (slots
            # it may use again): its thread's next frame carries them
            back.append((p, None))
            return
        reader = ch.reader
        for _ in range(ROUND_FRAMES):
            try:
                frame = ch.recv_ready()
            except Exception as e:      # the end, an error, a bad frame: its thread
                back.append((p, e))     # raises it, as its own receive would have
                return
            if frame is None:
                if reader.in_frame:         # part of a frame: its thread waits for the rest
                    back.append((p, None))
                return
            got = self._serve(p, frame)
            if type(got) is _Back:
                back.append((p, (frame, got.call)))
                return
            served.append((p, frame[1], got))
            if not reader.in_frame:     # nothing more came with it: the next round
                return
        # more is buffered, which poll() would not report: its thread takes it
        back.append((p, None))

    def _serve(self, p: _Parked, frame: tuple) -> Any:
        """Apply one call if the loop may: an `Applied`, or a reply tuple (it
        failed at once); else a `_Back`: its thread serves it."""
        kind, rid, _budget, body, bufs = frame
        if kind != Kind.CALL or not rid or bufs:
            return _Back()
        info = p.info
        call = info.call
        call.rid = rid          # (before the cancel check, as the thread does)
        if rid == call.cancel_rid:
            return _Back()
        raw = body if type(body) is bytes else bytes(body)
        if _PROXY in raw:       # unpickling a proxy may adopt it, or ask another manager
            return _Back()
        server = self.server
        try:
            decoded = oid, meth, args, kwds = server.serializer.loads(body, bufs)
        except Exception as e:
            return _Back(e)
        if type(oid) is not str or type(meth) is not str:
            return _Back(decoded)
        entry = server.objects.objects.get(oid)
        if entry is None or meth not in entry.exposed or not loopable(entry):
            return _Back(decoded)
        m2t = entry.method_to_typeid
        if m2t and m2t.get(meth):
            return _Back(decoded)
        got = server.durables.apply(entry, info, oid, meth, args, kwds,
                                    f"{info.session}:{info.conn}:{rid}", wait=False)
        return _Back(decoded) if got is None else got

    def _reply(self, served: list) -> None:
        """Wait for the commit of every call served this round, then write
        their replies (each call's own outcome if a commit failed: an earlier
        one may have taken some of them)."""
        server = self.server
        durables = server.durables
        j = durables.journal
        ticket = max((got.done.ticket for _, _, got in served if type(got) is Applied),
                     default=0)
        failed = None
        if ticket:
            try:
                j.wait(ticket)
            except journal.JournalError as e:
                failed = e
        broken = None
        none_body = server.none_body
        while served:       # in order (a connection's replies keep their order)
            p, rid, got = served[0]
            info = p.info
            if type(got) is Applied:
                if failed is not None:
                    try:
                        j.wait(got.done.ticket, 0)
                    except (journal.JournalError, TimeoutError):
                        if broken is None:
                            broken = durables._broken(failed)
                        reply = broken
                    else:
                        reply = durables.finish(got, info)
                else:
                    reply = durables.finish(got, info)
            else:
                reply = got
            if reply[0] == Kind.RETURN and reply[1] is None:
                data = pack_frame(Kind.RETURN, rid, none_body)
            elif type(got) is Applied:
                data = server.encode_reply(rid, *reply, got.oid, got.meth)
            else:
                data = server.encode_reply(rid, *reply)
            info.call.done_rid = rid
            info.channel.send_from_loop(data)
            del served[0]       # (answered: `_fail_round` leaves it)

    def _hand_back(self, p: _Parked, back: Any) -> None:
        if p.out:
            return
        try:
            self.channels.remove(p.info.channel)
        except (KeyError, ValueError, OSError):
            pass
        self.stats["handed_back"] += 1
        p.hand_back(back)
