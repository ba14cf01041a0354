"""Channels: a connected socket that carries frames, and the handshake drivers.

Owns: every byte that crosses a socket after connecting (replies held back
to go out together included), and the wait for a descriptor to be readable
(`readable_within`: poll(), since select() refuses descriptors from 1024 on;
`readable_now` for many at once, never waiting),
and the wait for many channels at once (`ChannelSet`).  Nothing else in
procshare calls `send`/`recv`.
Frames are laid out and parsed by `wire.frames`; the handshake's bytes come
from `wire.handshake`; this module only moves them.

Rules it keeps:
- All frame parsing goes through the channel's `FrameReader`: the bytes a
  receive brings are handed to it, or written straight into the part it is
  filling (`recv_into`), never parsed here.
- A deadline (TimeoutError) is only ever raised *before* a receive, so no
  received byte is lost: a frame interrupted by a deadline resumes at the next
  `recv_frame`.  Any other exception inside a receive (Ctrl-C, a signal
  handler's error) may fall between the kernel returning bytes and the reader
  taking them, so the owner of the channel must close it (`Connection` does).
- On the server, a frame that has started must keep coming: a peer silent for
  `frame_timeout` seconds in the middle of a frame gets a FrameError.
- One write per frame (`sendall` for a small frame, `sendmsg` with the
  out-of-band buffers for a large one, or, on a connection that agreed to
  use shared memory (`attach_slots`), `sendall` of a frame whose buffers
  were copied into slots: `send_buffers`).  A write of frames with slot
  entries that fails with a ConnectionError gives the link back the slots
  and notices of the frames it did not finish (`_send_owning`, `unsent`);
  after any other exception the peer may have the whole frame.
- A server's channel may hold small replies back (`send_reply`) while
  bytes of the peer's next request are here already, to write them in one
  go: at most `HOLD_MAX`, written before the channel waits for the peer or
  writes anything else, and, whatever its thread is running, about
  `HOLD_LIMIT` later (plus the GIL's switch interval, at worst) by the
  process's reply watch (`_HoldWatch`, one thread, asleep while nothing is
  held), or, if the peer reads nothing, each `HOLD_RETRY` once it reads.
  Only the channel's own thread adds to the held list (or, while that
  thread is parked, the thread serving it: `send_from_loop`); whoever writes it
  holds `_out` and empties the list only once written (or once the write
  failed for good), so an empty list means nobody else is writing.  The
  watch, and a call about to wait (`flush_nowait`), never wait for the
  socket or for `_out`; a forked child forgets the replies its parent's
  channels held.
- Notices owed to the peer (slot releases, `transport.slots`) ride only on
  whole frames this channel writes with `send_bytes` or `send_buffers`, or
  in a NOTICE frame of their own put in front of frames written together
  (`send_frames`, `notice_prefix`: at a frame boundary only), never inside
  another frame; a channel without slots checks one slot.
- A receive with no deadline sleeps in `recv`, except on a Unix-socket
  channel whose replies wait for the peer's own work (`slow_replies`): it
  sleeps in poll(), which the peer's reads of what it sent do not wake.
- A server that stops wakes its channels' idle threads by shutting their
  reading side (`stop_reading`); a channel's last frame (`send_last`) goes
  at once, behind nothing held, and only if the socket polls writable (room
  for a small frame whole).
- A `ChannelSet` thread reads and writes a channel only while the channel's
  own thread is parked (the server's durable loop), never waiting for a
  socket (`recv_ready`, `send_from_loop`); what the reader holds stays for
  the channel's thread.
- A Listener's socket file goes with it: `close(unlink=True)` removes it, and
  one never closed (a `get_server()` that never served) is removed when the
  listener is collected or its process exits (if the path is still its
  socket, and only by the process that bound it); `close(unlink=False)`
  leaves it to a successor.
- Authenticate before deserializing anything: the handshake is fixed-size raw
  bytes, read exactly (never past its end), before the first frame.
- A receive that must sleep asks the channel's `place` (a manager's call
  connection, `transport.placement`) for a CPU to sleep on, and narrows its
  thread's mask to it only for that sleep (`_recv_placed`): the mask the
  thread had is back before the receive returns or raises (a mask someone
  else set during the sleep stays).
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import stat
import threading
import time
import weakref
from typing import Any

from ..wire.frames import (
    DEFAULT_LIMITS,
    NO_DEADLINE,
    FrameError,
    FrameReader,
    Limits,
    encode_frame,
)
from ..wire.handshake import ClientHandshake, ServerHandshake
from .addresses import UNIX_PATH_MAX, address_family, arbitrary_address, cleanup_address
from .spin import SpinPolicy

__all__ = ["Channel", "Listener", "connect", "HostUnknown", "server_handshake", "client_handshake",
           "close_inherited", "remove_stale_socket", "readable_within", "readable_now",
           "FrameTail",
           "HOLD_MAX", "HOLD_LIMIT"]

log = logging.getLogger("procshare.channel")

_RECV_CHUNK = 64 * 1024
_HAS_POLL = hasattr(select, "poll")


def readable_within(fd: Any, timeout: float, poller: Any = None) -> bool:
    """Can `fd` (a socket or a descriptor) be read, or is it at EOF, within
    `timeout` seconds?  poll() where there is one: select() refuses descriptors
    from 1024 on, which a process with many files open reaches.  `poller`: a
    `select.poll` object with `fd` registered already (`Channel` keeps one)."""
    if poller is None:
        if not _HAS_POLL:
            return bool(select.select([fd], [], [], timeout)[0])
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000.0))


def readable_now(fds: list[int]) -> list[int]:
    """The descriptors among `fds` that can be read, or are at EOF (or are
    not open), now: one poll() for all of them, never waiting."""
    if not fds:
        return []
    if not _HAS_POLL:
        return select.select(fds, [], [], 0)[0]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ev in poller.poll(0)]


_DONTWAIT = socket.MSG_DONTWAIT
_perf = time.perf_counter
_monotonic = time.monotonic
#: hands the CPU to another runnable thread, if any (`transport.spin`: crowded polls)
_sched_yield = getattr(os, "sched_yield", None)
_setaffinity = getattr(os, "sched_setaffinity", None)
_getaffinity = getattr(os, "sched_getaffinity", None)

_open_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

#: replies a channel holds back at most (`Channel.send_reply`), the largest it
#: holds (bytes), and the longest it holds one (s) whatever its thread runs
HOLD_MAX = 32
HOLD_FRAME = 16 * 1024
HOLD_LIMIT = 0.002
#: how long the watch waits before it tries again to write replies the socket
#: did not take (a peer that reads nothing)
HOLD_RETRY = 0.05
_BUSY, _FULL = 1, 2     # what `Channel._try_write_held` left


class FrameTail(bytes):
    """The rest of a frame a write began: nothing may go before it (no notice
    frame in front)."""


class _HoldWatch:
    """Writes the replies a channel held back once they have waited
    `HOLD_LIMIT` s: its thread may be running a call that waits for something
    (a user method that sleeps or blocks), and the replies before that call
    must not wait with it.  One thread per process, started on first use,
    asleep while no channel holds anything; woken whenever a channel is due
    before the time it sleeps until."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.due: dict[Channel, float] = {}     # channels holding, and when to write
        self.until: float | None = None         # the thread sleeps until then (None: asleep)
        self.thread: threading.Thread | None = None

    def add(self, ch: Channel, left: int = _BUSY) -> None:
        """Write what `ch` holds soon: after `HOLD_LIMIT`, or, if the socket
        was full (`left` is `_FULL`), after `HOLD_RETRY`."""
        at = self._at(left)
        with self.cond:
            self._due_by(ch, at)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="procshare-reply-watch")
                self.thread.start()
            elif self.until is None or at < self.until:
                self.cond.notify()

    @staticmethod
    def _at(left: int) -> float:
        return _monotonic() + (HOLD_RETRY if left == _FULL else HOLD_LIMIT)

    def _due_by(self, ch: Channel, at: float) -> None:
        """(cond held) `ch` is due at `at`, or earlier if it was already."""
        if self.due.get(ch, at) >= at:
            self.due[ch] = at

    def _run(self) -> None:
        cond, due = self.cond, self.due
        with cond:
            while True:
                if not due:
                    self.until = None
                    cond.wait()
                    continue
                now = _monotonic()
                ready = [ch for ch, t in due.items() if t <= now]
                if not ready:
                    self.until = min(due.values())
                    cond.wait(self.until - now)
                    continue
                self.until = now        # (busy: an add need not wake it)
                for ch in ready:
                    del due[ch]
                cond.release()
                later = []
                try:
                    for ch in ready:
                        left = ch._try_write_held()
                        if left:
                            later.append((ch, left))
                finally:
                    cond.acquire()
                # its own thread was writing them: look again soon; a peer that
                # reads nothing: try again later
                for ch, left in later:
                    self._due_by(ch, self._at(left))


_watch = _HoldWatch()


#: channels that may hold replies (`hold_replies`)
_holding: weakref.WeakSet[Channel] = weakref.WeakSet()


def _new_watch() -> None:
    """In a forked child: replies the parent's connections held are the
    parent's to write (and a lock of theirs may have been held at the fork)."""
    global _watch
    _watch = _HoldWatch()
    for ch in list(_holding):
        ch.held = ch._out = None
    _holding.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_watch)


def close_inherited() -> None:
    """In a forked child: close this process's copies of every procshare socket
    (without unlinking socket files or shutting connections down)."""
    for sock in list(_open_sockets):
        try:
            sock.close()
        except OSError:
            pass
    _open_sockets.clear()


def _unplace(ch: Channel, cpu: int, own: set[int]) -> None:
    """Give a placed thread its mask `own` back (see `Channel._recv_placed`)."""
    try:
        if _getaffinity(0) != {cpu}:
            return              # set by someone else during the sleep: theirs stays
        _setaffinity(0, own)
    except OSError:
        ch.place = None         # no more placement; and never stay narrowed:
        try:                    # every CPU (the kernel keeps to the cpuset)
            _setaffinity(0, range(os.cpu_count() or 1))
        except OSError:
            pass


class Channel:
    """One connected socket carrying frames in both directions."""

    __slots__ = ("sock", "reader", "peer", "frame_timeout", "spin", "slots", "notices",
                 "working", "_poll_obj", "held", "_out", "place", "sleep_in_poll",
                 "__weakref__")

    def __init__(self, sock: socket.socket, peer: Any = None, limits: Limits = DEFAULT_LIMITS,
                 frame_timeout: float | None = None) -> None:
        self.sock = sock
        _open_sockets.add(sock)
        self.reader = FrameReader(limits)
        self.peer = peer
        self.frame_timeout = frame_timeout
        self.spin = SpinPolicy()   # how long recv_frame busy-polls before sleeping
        self.slots: Any = None     # the transport.slots.SlotLink, once agreed on
        self.notices: Any = None   # its queue of notices for the peer (checked per frame)
        #: the channels of this process whose threads are working now, not
        #: waiting for a frame (see `spin`); None: not counted
        self.working: set | None = None
        self._poll_obj: Any = None     # select.poll with this socket, made on first wait
        #: replies held back to go out together (`send_reply`); None: this channel
        #: never holds any (`hold_replies` turns it on)
        self.held: list[bytes] | None = None
        self._out: threading.Lock | None = None     # `held`, and writing it
        #: where this thread sleeps in a receive on a busy machine (a manager's
        #: call connection: `transport.placement`); None: anywhere
        self.place: Any = None
        #: a receive with no deadline sleeps in poll(), not in recv (`slow_replies`)
        self.sleep_in_poll = False

    def slow_replies(self) -> None:
        """The peer's replies on this channel wait for work of its own (a
        journal commit): poll longer for them (`SpinPolicy.long`), and on a
        Unix socket sleep for them in poll().  A thread asleep in a Unix
        socket's recv is woken each time the peer reads what it sent (the
        kernel's write-space wakeup reaches readers too), and goes back to
        sleep: a wakeup and a switch for nothing, paid by the peer's thread,
        which must wake this one's CPU.  poll() waits for data only."""
        self.spin.long()
        if not self.sleep_in_poll and self.sock.family == socket.AF_UNIX and _HAS_POLL:
            self.sleep_in_poll = True

    def _poller(self) -> Any:
        """This channel's `select.poll` object (None where there is no poll())."""
        p = self._poll_obj
        if p is None and _HAS_POLL:
            p = self._poll_obj = select.poll()
            p.register(self.sock, select.POLLIN)
        return p

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        out = self._out
        if out is not None:     # not while the watch writes on it (its fd could be reused)
            got = out.acquire(timeout=1.0)
            self.held = None
            try:
                self.sock.close()
            except OSError:
                pass
            finally:
                if got:
                    out.release()
            return
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def stop_reading(self) -> None:
        """Shut the socket's reading side: a thread asleep in a receive on it
        wakes at once with the end of the stream (a server that stops)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass    # (closed, or never connected)

    def send_last(self, frame: bytes) -> bool:
        """Write one small whole frame as the last thing this channel writes,
        only if nothing is held back and the socket says it has room (never
        waiting for the peer, which may read nothing any more).  A socket that
        polls writable has a third of its buffer free or more (TCP; Unix: three
        quarters), so a frame of a few hundred bytes goes whole.  True if it
        went."""
        if self.held or self.closed:
            return False
        try:
            if _HAS_POLL:
                poller = select.poll()
                poller.register(self.sock, select.POLLOUT)
                writable = bool(poller.poll(0))
            else:
                writable = bool(select.select([], [self.sock], [], 0)[1])
            return writable and self.sock.send(frame, _DONTWAIT) == len(frame)
        except (OSError, ValueError):
            return False

    # -- writing -----------------------------------------------------------
    def send_bytes(self, frame: bytes) -> None:
        """Write one whole frame that is a single bytes object."""
        if self.held:
            self.flush()
        if self.notices:
            frame = self.slots.with_notices(frame)
            self._send_owning(frame)
        else:
            self.sock.sendall(frame)

    def send_frames(self, data: bytes, boundary: bool = True) -> None:
        """Write whole frames joined together (`boundary`: the stream is between
        frames here; False: `data` starts with the rest of a frame already
        partly written).  Notices owed to the peer go in a frame of their own
        in front, only at a boundary: never inside another frame."""
        if self.held:
            self.flush()
        self._write_frames(data, boundary)

    def _write_frames(self, data: bytes, boundary: bool) -> None:
        """`send_frames` without looking at held replies (it writes them too)."""
        if boundary and self.notices:
            front = self.slots.notice_frame()
            if front is not None:
                self._send_owning(front + data)
                return
        self.sock.sendall(data)

    def _send_owning(self, data: bytes) -> None:
        """`sendall` of whole frames that may hold slot entries: if a write fails
        with a ConnectionError (the peer is gone: EPIPE, ECONNRESET), the frames
        it did not finish never reach the peer, so their slots and notices are
        the link's again (`SlotLink.unsent`).  Any other exception leaves them:
        it may come from a signal handler after the kernel took the whole
        frame (Ctrl-C, an alarm), and the peer would then use slots freed here
        and refuse releases owed twice."""
        sent = 0
        send = self.sock.send
        try:
            sent = send(data)
            if sent < len(data):
                with memoryview(data) as view:
                    while sent < len(data):
                        sent += send(view[sent:])
        except ConnectionError:
            self.unsent(data, sent)
            raise

    def unsent(self, data: bytes, sent: int) -> None:
        """Whole frames of `data`, of which a failed write sent `sent` bytes:
        the link takes back the slots and notices of the frames not finished."""
        if self.slots is not None:
            self.slots.unsent(data, sent)

    def notice_prefix(self) -> bytes:
        """A frame of the notices owed to the peer, to send at a frame
        boundary by a caller that writes raw (b"" if none)."""
        if self.notices:
            return self.slots.notice_frame() or b""
        return b""

    def send_buffers(self, kind: int, rid: int, body: bytes, bufs: Any,
                     budget: float = NO_DEADLINE, limits: Limits = DEFAULT_LIMITS) -> None:
        """Write one frame with out-of-band buffers: through shared-memory slots
        on a channel that has them (and buffers worth it), else with the
        buffers on the socket."""
        if self.held:
            self.flush()
        link = self.slots
        if link is not None and bufs:
            frame = link.encode(kind, rid, body, bufs, budget, limits)
            if frame is not None:
                self.spin.long()
                self._send_owning(frame)
                return
        pieces = encode_frame(kind, rid, body, bufs, budget, limits)
        if len(pieces) == 1:
            self.send_bytes(pieces[0])
        else:
            self.send(pieces)

    def attach_slots(self, link: Any) -> None:
        """From now on, buffers may travel in shared memory (both ends agreed)."""
        self.slots = link
        self.notices = link.notices
        self.reader.on_slots = self._on_slots

    def _on_slots(self, kind: int, rid: int, budget: float, body: Any, buffers: tuple,
                  notices: tuple) -> tuple | None:
        if buffers:
            self.spin.long()
        return self.slots.on_slots(kind, rid, budget, body, buffers, notices)

    def send_nowait(self, data: bytes) -> int:
        """Write as much of `data` as the socket takes without blocking; return
        how many bytes that was (the caller sends the rest later, in order)."""
        if self.held:
            self.flush()
        try:
            return self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return 0

    def send(self, pieces: list) -> None:
        """Write one encoded frame (the list `frames.encode_frame` returns)."""
        if self.held:
            self.flush()
        if len(pieces) == 1:
            self.sock.sendall(pieces[0])
            return
        views = [v for v in (memoryview(p).cast("B") for p in pieces) if v.nbytes]
        while views:
            sent = self.sock.sendmsg(views[:512])
            while sent:
                n = views[0].nbytes
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # -- replies held back while the peer pipelines ----------------------------
    def hold_replies(self) -> None:
        """Let `send_reply` hold replies back (a server's connection)."""
        self.held = []
        self._out = threading.Lock()
        _holding.add(self)

    def send_reply(self, frame: bytes) -> None:
        """Write one small whole frame (a reply), or, if the peer's next frame
        is here already (it pipelines its requests), hold it back to go out in
        one write with the replies after it: at most `HOLD_MAX` of them, and
        only until this channel next waits for the peer, writes anything else,
        or a call runs into a wait (`flush_nowait`); else the watch writes
        them about `HOLD_LIMIT` s later, whatever runs meanwhile (`_HoldWatch`)."""
        held = self.held
        if held is None or len(frame) > HOLD_FRAME or not self.reader.in_frame:
            self.send_bytes(frame)
            return
        with self._out:     # (the watch may be writing them)
            held.append(frame)
            n = len(held)
        if n == 1:
            _watch.add(self)
        elif n >= HOLD_MAX:
            self.flush()

    def send_from_loop(self, frame: bytes) -> None:
        """Write one small whole frame (a reply) from a thread that serves many
        channels (`ChannelSet`), while the channel's own thread is parked:
        behind the replies held back, never waiting for the socket; what it
        does not take stays held, for the watch or the channel's thread to
        write.  Nothing on a closed channel."""
        out = self._out
        with out:
            held = self.held
            if held is None:
                return
            held.append(frame)
            self._write_held(False)
            left = _FULL if held else 0
        if left:
            _watch.add(self, left)

    def flush(self) -> None:
        """Write the replies held back, now (blocking until the socket takes them)."""
        out = self._out
        if out is None:
            return
        with out:
            self._write_held(True)

    def flush_nowait(self) -> None:
        """Write what the socket takes at once of the replies held back, never
        waiting for the peer or for another writer (for a caller that holds
        some other lock: a primitive about to wait); the watch writes the rest."""
        left = self._try_write_held()
        if left:
            _watch.add(self, left)

    def _try_write_held(self) -> int:
        """`flush_nowait` without the watch: 0 if nothing is left held, else
        `_BUSY` (another thread is writing them) or `_FULL` (the socket
        took only part, or nothing)."""
        out = self._out
        if out is None or not self.held:
            return 0
        if not out.acquire(False):
            return _BUSY
        try:
            self._write_held(False)
        except Exception:   # a bug: never the watch's end (nor the call's)
            log.warning("could not write the replies held for %r; dropped", self.peer,
                        exc_info=True)
            self.held.clear()
        finally:
            out.release()
        return _FULL if self.held else 0

    def _write_held(self, block: bool) -> None:
        """(`_out` held) Write the held replies: all of them (`block`), or what
        the socket takes at once, keeping the rest (the watch, which must not
        wait for one slow peer)."""
        held = self.held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        if block:
            try:
                self._write_frames(data, type(held[0]) is not FrameTail)
            finally:
                held.clear()
            return
        try:
            sent = self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            if isinstance(e, ConnectionError) or self.sock.fileno() == -1:
                held.clear()    # closed or gone: nobody reads them
            return              # else: its own thread's next write says what it is
        if sent == len(data):
            held.clear()
        elif sent:
            held[:] = [FrameTail(data[sent:])]

    # -- reading -----------------------------------------------------------
    def readable(self) -> bool:
        """True when part of a frame (or EOF) can be read without blocking."""
        if self.reader.in_frame:
            return True
        return readable_within(self.sock, 0.0, self._poller())

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            return
        left = deadline - _monotonic()
        if left <= 0 or not readable_within(self.sock, left, self._poller()):
            raise TimeoutError("no frame before the deadline")

    def recv_frame(self, deadline: float | None = None) -> tuple:
        """Read one frame: `(kind, rid, budget, body, buffers)`.

        `deadline` is a `time.monotonic()` value; TimeoutError if no whole frame
        arrived by then (what did arrive stays with the reader for the next call).
        """
        reader = self.reader
        if not reader.in_frame:
            # the common case: nothing buffered, one small frame in one read
            if self.held:
                self.flush()        # the peer may be waiting for them
            working = self.working
            if working is None:
                spin = self.spin.budget()
            else:
                # threads of one process share a GIL: spinning while another of
                # them works (or spins) only takes turns from it.  A spinning
                # channel counts as working; it leaves the set when it sleeps
                working.add(self)
                spin = self.spin.budget() if len(working) == 1 else 0.0
            data = self._poll(spin) if spin else None
            if data is None:
                if working is not None:
                    working.discard(self)
                place = self.place
                cpu = place.target(bool(working)) if place is not None else None
                if cpu is not None:
                    data = self._recv_placed(cpu, deadline)
                else:
                    if deadline is not None:
                        self._wait(deadline)
                    elif self.sleep_in_poll:
                        self._poller().poll()
                    data = self.sock.recv(_RECV_CHUNK)
                if not data:
                    raise EOFError("connection closed by peer")
                if working is not None:
                    working.add(self)
            frame = reader.parse(data)
        else:
            frame = reader.next_frame()
        if frame is not None:
            return frame
        if self.held:
            self.flush()
        return self._recv_rest(deadline)

    def _recv_placed(self, cpu: int, deadline: float | None) -> bytes:
        """Sleep for data on CPU `cpu` only (see `transport.placement`): the
        thread's own mask is back before this returns or raises, unless
        someone else set another one meanwhile (`taskset`), which stays."""
        try:
            own = _getaffinity(0)
            if cpu in own and len(own) > 1:
                _setaffinity(0, (cpu,))
            else:
                own = None
        except OSError:
            self.place = own = None     # (a cpuset changed under us): no placement
        try:
            if deadline is not None:
                self._wait(deadline)
            return self.sock.recv(_RECV_CHUNK)
        finally:
            if own is not None:
                _unplace(self, cpu, own)

    def recv_ready(self) -> tuple | None:
        """The next frame if it is here whole, reading only what the socket
        has now, never waiting (a thread that serves many channels,
        `ChannelSet`, while the channel's own thread is parked); None if no
        whole frame is here (what came stays with the reader).  EOFError at
        the end of the stream."""
        reader = self.reader
        if reader.in_frame:
            frame = reader.next_frame()
            if frame is not None:
                return frame
        try:
            data = self.sock.recv(_RECV_CHUNK, _DONTWAIT)
        except BlockingIOError:
            return None
        if not data:
            raise EOFError("connection closed by peer")
        return reader.parse(data)

    def buffered_frame(self) -> tuple | None:
        """The next frame if it is here whole already (no I/O), else None: a
        reader that got many frames in one receive takes them without a
        receive each.  A frame begun but not whole stays for `recv_frame`."""
        reader = self.reader
        return reader.next_frame() if reader.in_frame else None

    def _recv_rest(self, deadline: float | None) -> tuple:
        """Receive until the frame the reader has started is whole.  Bytes that
        are already there are taken at once; only an empty socket is waited on
        (up to the deadline, and on a server up to `frame_timeout`)."""
        reader = self.reader
        sock = self.sock
        while True:
            room = reader.room()
            try:
                got = sock.recv(_RECV_CHUNK, _DONTWAIT) if room is None \
                    else sock.recv_into(room, 0, _DONTWAIT)
            except BlockingIOError:
                self._wait_in_frame(deadline)
                got = sock.recv(_RECV_CHUNK) if room is None else sock.recv_into(room)
            if not got:
                raise EOFError("connection closed by peer in the middle of a frame")
            if room is None:
                reader.feed(got)
            else:
                reader.commit(got)
            frame = reader.next_frame()
            if frame is not None:
                return frame

    def _wait_in_frame(self, deadline: float | None) -> None:
        """Wait for more of a frame: TimeoutError at the deadline; FrameError on a
        server whose peer stalls for `frame_timeout` in the middle of a frame."""
        limit, stalled = deadline, False
        if self.frame_timeout is not None:
            stall = _monotonic() + self.frame_timeout
            if limit is None or stall < limit:
                limit, stalled = stall, True
        try:
            self._wait(limit)
        except TimeoutError:
            if stalled:
                raise FrameError(
                    f"the peer sent part of a frame ({self.reader.buffered} bytes) and then "
                    f"nothing for {self.frame_timeout} s") from None
            raise

    def _poll(self, spin: float) -> bytes | None:
        """Busy-poll for up to `spin` seconds before sleeping in recv (see
        `transport.spin` for when and how long)."""
        start = _perf()
        end = start + spin
        recv = self.sock.recv
        give_way = _sched_yield if self.spin.crowded else None
        while True:
            try:
                data = recv(_RECV_CHUNK, _DONTWAIT)
            except BlockingIOError:
                if _perf() < end:
                    if give_way is not None:
                        give_way()      # the peer may be waiting for this CPU
                    continue
                self.spin.miss()
                return None
            if not data:
                raise EOFError("connection closed by peer")
            self.spin.hit(_perf() - start)
            return data

    # -- handshake ---------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int, deadline: float | None) -> bytes:
        """Exactly `n` raw bytes (never more: frames follow), or fewer at EOF."""
        out = b""
        while len(out) < n:
            self._wait(deadline)
            data = self.sock.recv(n - len(out))
            if not data:
                break
            out += data
        return out


class ChannelSet:
    """Channels one thread waits on at once (poll()), for their next frames,
    and a socket pair by which other threads wake it.  Only the waiting
    thread adds and removes channels (a poll object must not change while
    it polls); `wake` may be called from any thread."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
            _open_sockets.add(sock)     # (a forked child closes them: close_inherited)
        self._poll.register(self._wake_r, select.POLLIN)
        self._values: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._values)

    def add(self, ch: Channel, value: Any) -> None:
        """Wait on `ch` too; `wait` returns `value` when it is readable."""
        fd = ch.fileno()
        self._values[fd] = value
        self._poll.register(fd, select.POLLIN)

    def remove(self, ch: Channel) -> None:
        fd = ch.fileno()
        if self._values.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def values(self) -> list:
        return list(self._values.values())

    def wait(self, timeout: float | None) -> tuple[list, bool]:
        """`(values of the readable channels, woken)`, after at most `timeout`
        seconds (None: no limit).  A channel at its end or in error counts as
        readable: its next receive says what it is."""
        events = self._poll.poll(None if timeout is None else timeout * 1000.0)
        woken = False
        ready = []
        values = self._values
        for fd, _ in events:
            value = values.get(fd)
            if value is not None:
                ready.append(value)
            elif fd == self._wake_r.fileno():
                woken = True
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
        return ready, woken

    def wake(self) -> None:
        """(any thread) Make `wait` return now."""
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):
            pass        # full: it will wake anyway; closed: nobody waits

    def close(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass


def server_handshake(ch: Channel, authkey: bytes, timeout: float = 20.0) -> None:
    """Challenge the client; on success prove our own knowledge of the key."""
    deadline = _monotonic() + timeout
    hs = ServerHandshake(authkey, ch.peer)
    ch.send_raw(hs.start())
    reply = ch.recv_raw(hs.need, deadline)
    if len(reply) < hs.need:
        raise EOFError("the peer closed the connection during the handshake")
    answer, error = hs.receive(reply)
    if answer:
        ch.send_raw(answer)
    if error is not None:
        raise error


def client_handshake(ch: Channel, authkey: bytes, address: Any, timeout: float = 20.0) -> None:
    deadline = _monotonic() + timeout
    hs = ClientHandshake(authkey, address)
    try:
        head = ch.recv_raw(hs.need, deadline)
    except TimeoutError:
        head = b""
    if len(head) < hs.need:
        raise hs.no_answer()
    ch.send_raw(hs.challenge(head))
    try:
        answer = ch.recv_raw(hs.answer_size, deadline)
    except (TimeoutError, ConnectionError):
        answer = b""
    if not answer:
        raise hs.no_answer()        # gone before answering (a "NO" is never empty)
    hs.answer(answer)


class Listener:
    """A listening socket bound to a Unix or TCP address."""

    def __init__(self, address: Any = None, backlog: int = 128, limits: Limits = DEFAULT_LIMITS,
                 frame_timeout: float | None = None, replace_stale: bool = False) -> None:
        """`replace_stale=True` (a restarted server): a socket file at `address`
        that no process listens on is replaced atomically (bind beside it, then
        rename over it), so a client never finds the path missing while the
        server comes back; a missing path means a manager that was shut down."""
        self.limits = limits
        self.frame_timeout = frame_timeout
        if address is None:
            address = arbitrary_address()
        family = address_family(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        beside = None
        if (replace_stale and family == socket.AF_UNIX and isinstance(address, str)
                and address[:1] != "\0" and _is_stale_socket(address)):
            beside = os.path.join(os.path.dirname(address) or ".",
                                  f".ps-{os.getpid()}-{secrets.token_hex(3)}")
            if len(os.fsencode(beside)) > UNIX_PATH_MAX:
                beside = None       # no room for a name beside it: a moment without one
                cleanup_address(address)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if beside is not None:
                cleanup_address(beside)
                sock.bind(beside)
                sock.listen(backlog)
                os.rename(beside, address)
            else:
                sock.bind(address)
                sock.listen(backlog)
        except OSError as e:
            sock.close()
            if beside is not None:
                cleanup_address(beside)
            if family == socket.AF_UNIX and "too long" in str(e):
                raise OSError(e.errno, f"AF_UNIX path too long: {address!r} is "
                              f"{len(os.fsencode(address))} bytes, the limit is "
                              f"{UNIX_PATH_MAX}. Pass a shorter address, or address=None "
                              "to let procshare choose one.") from None
            raise
        self._sock = sock
        _open_sockets.add(sock)
        self._family = family
        self._left: Any = None
        if family == socket.AF_UNIX:
            name = sock.getsockname()
            self.address = name.decode() if isinstance(name, bytes) else name
            if isinstance(address, str) and (address.startswith("\0") or beside is not None):
                self.address = address
            path = self.address
            if isinstance(path, str) and path[:1] not in ("", "\0"):
                try:
                    ino = os.lstat(path).st_ino
                except OSError:
                    pass
                else:   # never closed: its file goes when it does, or at exit
                    self._left = weakref.finalize(self, _unlink_own, path, os.getpid(), ino)
        else:
            self.address = sock.getsockname()[:2]

    def accept(self) -> Channel:
        sock, peer = self._sock.accept()
        if self._family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Channel(sock, peer, self.limits, self.frame_timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self, unlink: bool = True) -> None:
        """Stop listening; `unlink`: remove a Unix socket's file too.  A thread
        blocked in `accept` wakes with an OSError (a close alone leaves it
        blocked for good: the stdlib's accepter thread stays so)."""
        try:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass    # (not listening, or closed already)
            self._sock.close()
        finally:
            if self._left is not None:
                self._left.detach()
            if unlink:
                cleanup_address(self.address)


def _unlink_own(path: str, pid: int, ino: int) -> None:
    """Remove the socket file of a listener that was never closed, if this is
    the process that bound it and `path` is still that socket."""
    if os.getpid() != pid:
        return
    try:
        st = os.lstat(path)
        if st.st_ino == ino and stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    except OSError:
        pass


def _is_stale_socket(path: str) -> bool:
    """True if `path` is a Unix socket file that no process listens on (a
    server that died left it)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def remove_stale_socket(path: str) -> bool:
    """Remove the Unix socket file at `path` if no process listens on it (a
    server that died left it); True if it was removed."""
    if _is_stale_socket(path):
        cleanup_address(path)
        return True
    return False


class HostUnknown(socket.gaierror):
    """The host of a manager's (host, port) address does not resolve: no
    manager crashed (the stdlib raises socket.gaierror)."""


def connect(address: Any, timeout: float | None = None) -> Channel:
    """Open a socket to `address` (no handshake yet)."""
    family = address_family(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if timeout is not None:
            sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except socket.gaierror as e:
        sock.close()
        raise HostUnknown(e.errno, f"{e.strerror}: the host {address[0]!r} of the manager "
                                   f"address {address!r} does not resolve; check its "
                                   "spelling, or use an IP address") from None
    except BaseException:
        sock.close()
        raise
    return Channel(sock, address)
