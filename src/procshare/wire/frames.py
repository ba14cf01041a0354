"""Frames, sans-IO: the byte layout of every message, and the one parser of it.

Owns: the frame header (`HEADER`, packed only here: `pack_frame`,
`encode_frame`), the size limits a peer must keep (`Limits`), and
`FrameReader`, the parser both ends use.  It never touches a socket: the
transport feeds it bytes (or lets it choose where `recv_into` writes) and asks
for whole frames.

Rules it keeps:
- A frame is one fixed header, a table of out-of-band buffer lengths, the body
  and then the buffers.  Everything needed to route a frame (kind, request id,
  time budget) is in the header, so a body that cannot be deserialized can
  still be answered by request id.
- One header flag changes the layout (`FLAG_SLOTS`, shared memory): the table
  then holds slot entries (`SLOT`: op, type, arena, offset, length) and no
  buffer bytes follow the body.  An entry is a buffer of the frame, in the
  sender's arena (`OP_BUFFER`), or a notice about the receiver's memory
  (`OP_RELEASE`: the sender is done with that slot; `OP_RETIRE`: the sender
  closed that arena).  Such a frame is handed to the reader's `on_slots`
  hook, set by the transport once shared memory is negotiated; without the
  hook, or with an unknown flag, op, type or a nonzero reserved field, it is a
  FrameError.  Flags are read only in frames that have a table (nbufs > 0),
  so frames without one are parsed exactly as before.  The reader checks the
  entries' form and sizes; whether a slot is really the peer's is the hook's
  business (`transport.shm.SlotClaimError`).
- Request id 0 means "no reply wanted" (fire-and-forget: decref).
- The time budget travels as *remaining seconds*, so it stays meaningful
  between machines whose clocks differ; NaN means no deadline.  The reader
  hands out only NaN or a finite budget in [0, MAX_BUDGET]: negative budgets
  become 0 and absurd ones (inf, > MAX_BUDGET) mean no deadline.
- The reader keeps every byte it was given until it is part of a frame it has
  returned: a frame interrupted at any byte resumes where it stopped, and is
  never misread.  After a `FrameError` the reader is unusable (the stream is
  out of step by definition) and the connection must be closed.
- Memory follows the data, not the header's claim: a part allocates nothing
  until its first byte arrives, then `GROW_FROM` (or less), and at most
  doubles as it fills, so a peer that claims gigabytes, in one part or in
  thousands of buffers, and sends nothing costs about a megabyte.
- Limits are checked as soon as the header (or the buffer table) arrives.
"""

from __future__ import annotations

import collections
import math
import struct
from typing import Any

__all__ = [
    "FrameError", "Limits", "DEFAULT_LIMITS", "frame_problem", "FrameReader", "pack_frame",
    "encode_frame", "HEADER", "NO_DEADLINE", "MAX_BUDGET", "FLAG_SLOTS", "SLOT", "SlotRef",
    "OP_BUFFER", "OP_RELEASE", "OP_RETIRE", "TYPE_OTHER", "TYPE_BYTES", "TYPE_BYTEARRAY",
    "encode_slot_frame", "add_slot_entries", "unsent_slot_entries",
]

NO_DEADLINE = math.nan
#: budgets above this (about 31 years) mean "no deadline"
MAX_BUDGET = 1e9

#: body length, kind, flags, number of out-of-band buffers, request id, seconds left
HEADER = struct.Struct("!IBBHQd")
_BUFLEN = struct.Struct("!Q")
_HSIZE = HEADER.size
_unpack = HEADER.unpack_from
_pack = HEADER.pack

#: parts up to this size are received whole; larger ones grow from it
GROW_FROM = 1 << 20

#: header flag: the table holds slot entries and the buffers are in shared memory
FLAG_SLOTS = 0x01
#: one slot entry: op, type, reserved (0), arena, offset, length
SLOT = struct.Struct("!BBHIQQ")
#: entry ops: a buffer of this frame (in the sender's arena); a slot of the
#: receiver's that the sender is done with; an arena of the sender's it closed
OP_BUFFER, OP_RELEASE, OP_RETIRE = 1, 2, 3
#: what a buffer will become (its rebuild copies bytes and bytearray anyway;
#: anything else, such as an ndarray, may be lent the memory)
TYPE_OTHER, TYPE_BYTES, TYPE_BYTEARRAY = 0, 1, 2
_MAX_U64 = (1 << 64) - 1


class FrameError(ValueError):
    """A peer sent bytes that are not a valid frame, or broke a limit."""


class Limits(collections.namedtuple("Limits", ("max_body", "max_frame", "max_buffers"))):
    """What one frame may hold.  A peer that breaks a limit loses its connection;
    a client learns the manager's from its hello and checks before it sends.

    - `max_body`: the in-band (pickled) body; the header's u32;
    - `max_frame`: body plus every out-of-band buffer;
    - `max_buffers`: out-of-band buffers in one frame.

    The defaults carry payloads of several GiB; a manager's `max_message_bytes=`
    sets `max_frame` (and `max_body`, if lower).  Immutable, compared by value.
    (A named tuple, not a dataclass: `dataclasses` imports `inspect`, about
    10 ms of every process's `import procshare`.)
    """

    __slots__ = ()

    def __new__(cls, max_body: int = (1 << 32) - 1, max_frame: int = 16 << 30,
                max_buffers: int = 0xFFFF) -> Limits:
        for name, value in (("max_body", max_body), ("max_frame", max_frame),
                            ("max_buffers", max_buffers)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"frame limit {name} must be a non-negative int, not {value!r}")
        return super().__new__(cls, max_body, max_frame, max_buffers)


DEFAULT_LIMITS = Limits()


def frame_problem(limits: Limits, body: int, total: int, nbufs: int) -> str | None:
    """Which of `limits` a frame of `body` in-band bytes, `total` bytes with
    its buffers and `nbufs` buffers breaks, as words to follow "the message is
    `total` bytes, "; None if none.  A sender asks before it encodes, so that
    nothing is sent."""
    max_body = min(limits.max_body, limits.max_frame)
    if total > limits.max_frame:
        return f"over the {limits.max_frame}-byte limit"
    if body > max_body:
        return f"and its pickled part alone ({body} bytes) is over the {max_body}-byte limit"
    if nbufs > limits.max_buffers:
        return f"in {nbufs} out-of-band buffers, over the limit of {limits.max_buffers}"
    return None


def pack_frame(kind: int, rid: int, body: bytes, budget: float = NO_DEADLINE) -> bytes:
    """A frame without out-of-band buffers, as one `bytes` (one write)."""
    return _pack(len(body), kind, 0, 0, rid, budget) + body


def encode_frame(kind: int, rid: int, body: bytes, buffers: list | tuple = (),
                 budget: float = NO_DEADLINE, limits: Limits = DEFAULT_LIMITS) -> list:
    """The frame as a list of bytes-like pieces, ready for one `sendmsg`.

    Without buffers the list has one `bytes` (header and body joined).  Raises
    FrameError, before anything is sent, for a frame over `limits`.
    """
    if len(body) > min(limits.max_body, limits.max_frame):
        raise FrameError(f"a message body of {len(body)} bytes is over the "
                         f"{min(limits.max_body, limits.max_frame)}-byte limit")
    if not buffers:
        return [_pack(len(body), kind, 0, 0, rid, budget) + body]
    views = [memoryview(b).cast("B") for b in buffers]
    total = len(body) + sum(v.nbytes for v in views)
    if len(views) > limits.max_buffers or total > limits.max_frame:
        raise FrameError(f"a message of {total} bytes in {len(views)} buffers is over the "
                         f"limit ({limits.max_frame} bytes, {limits.max_buffers} buffers); "
                         "raise max_message_bytes= on the manager")
    head = _pack(len(body), kind, 0, len(views), rid, budget)
    lengths = b"".join(_BUFLEN.pack(v.nbytes) for v in views)
    return [head + lengths + body, *views]


class SlotRef(tuple):
    """`(arena, offset, length)` of shared memory named by a frame, with `type`
    (one of the TYPE_ values; 0 for notices)."""

    __slots__ = ()

    def __new__(cls, arena: int, offset: int, length: int, type: int = TYPE_OTHER) -> SlotRef:
        return tuple.__new__(cls, (arena, offset, length, type))

    arena = property(lambda self: self[0])
    offset = property(lambda self: self[1])
    length = property(lambda self: self[2])
    type = property(lambda self: self[3])

    def __repr__(self) -> str:
        return f"SlotRef(arena={self[0]}, offset={self[1]}, length={self[2]}, type={self[3]})"


def encode_slot_frame(kind: int, rid: int, body: bytes, entries: list | tuple,
                      budget: float = NO_DEADLINE, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A frame whose table holds slot entries `(op, type, arena, offset, length)`,
    as one `bytes`.  FrameError, before anything is sent, for a frame over
    `limits` (the buffers in slots count towards `max_frame`)."""
    if not entries:
        raise ValueError("a slot frame needs at least one entry")
    total = len(body) + sum(e[4] for e in entries if e[0] == OP_BUFFER)
    if (len(body) > min(limits.max_body, limits.max_frame) or total > limits.max_frame
            or len(entries) > limits.max_buffers):
        raise FrameError(f"a message of {total} bytes in {len(entries)} slots is over the "
                         f"limit ({limits.max_frame} bytes, {limits.max_buffers} buffers); "
                         "raise max_message_bytes= on the manager")
    pack = SLOT.pack
    table = b"".join([pack(op, typ, 0, arena, offset, length)
                      for op, typ, arena, offset, length in entries])
    return _pack(len(body), kind, FLAG_SLOTS, len(entries), rid, budget) + table + body


def add_slot_entries(frame: bytes, entries: list | tuple) -> bytes:
    """A frame made by `pack_frame` (no table), with slot entries (notices) added."""
    blen, kind, flags, nbufs, rid, budget = _unpack(frame, 0)
    if flags or nbufs:
        raise ValueError("only a frame without a table can take slot entries")
    return encode_slot_frame(kind, rid, frame[_HSIZE:], entries, budget)


def unsent_slot_entries(data: bytes, sent: int) -> list[tuple]:
    """The slot entries `(op, type, arena, offset, length)` of the frames in
    `data` that a write which stopped after `sent` bytes did not finish: the
    peer cannot have read them.  Frames written whole are not counted: the
    peer may have them.  `data` is whole frames as this process encoded
    them, from a frame boundary on; a frame cut short ends the walk."""
    out: list[tuple] = []
    pos, end = 0, len(data)
    unpack = SLOT.unpack_from
    while pos + _HSIZE <= end:
        blen, _kind, flags, nbufs, _rid, _budget_ = _unpack(data, pos)
        head = pos + _HSIZE
        if flags & FLAG_SLOTS:
            table_end = head + nbufs * SLOT.size
            if table_end > end:
                break
            if table_end + blen > sent:
                for i in range(nbufs):
                    op, typ, _zero, arena, offset, length = unpack(data, head + i * SLOT.size)
                    out.append((op, typ, arena, offset, length))
            pos = table_end + blen
        else:
            if head + 8 * nbufs > end:
                break
            pos = head + 8 * nbufs + blen + sum(
                _BUFLEN.unpack_from(data, head + 8 * i)[0] for i in range(nbufs))
    return out


def _budget(budget: float) -> float:
    if budget != budget:
        return budget
    if budget < 0.0:
        return 0.0
    return budget if budget <= MAX_BUDGET else NO_DEADLINE


class _Part:
    """One part of a frame being received: grows as its bytes arrive."""

    __slots__ = ("size", "buf", "filled")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray()      # nothing until its first byte arrives
        self.filled = 0

    def room(self) -> memoryview:
        """Where the next bytes go (growing the part if it is full)."""
        buf = self.buf
        if self.filled == len(buf):
            if not buf:         # its first bytes: allocate as much as may come at once
                buf = self.buf = bytearray(min(self.size, GROW_FROM))
            else:
                grow = min(self.size, 2 * len(buf)) - len(buf)
                buf += bytes(grow)          # realloc: no copy of what is there
        return memoryview(buf)[self.filled:]

    def take(self, data: memoryview) -> int:
        """Copy as much of `data` as fits; return how much was taken."""
        taken = 0
        while self.filled < self.size and taken < len(data):
            with self.room() as room:
                n = min(len(room), len(data) - taken)
                room[:n] = data[taken:taken + n]
            self.filled += n
            taken += n
        return taken


class FrameReader:
    """Parse a byte stream into frames: `(kind, rid, budget, body, buffers)`.

    Two ways in: `feed(data)` with bytes already received, or, for large
    parts, `room()` (a writable view to `recv_into`) followed by
    `commit(n)`.  Then `next_frame()` returns a frame, or None when more data
    is needed.  `body` is bytes-like; `buffers` is a tuple of bytearrays.

    A frame with slot entries (`FLAG_SLOTS`) is given, once whole, to
    `on_slots(kind, rid, budget, body, buffers, notices)` (`buffers`: a tuple
    of `SlotRef`; `notices`: a tuple of `(op, SlotRef)`), whose result is
    returned instead; a result of None means the frame only carried notices,
    and the reader goes on to the next frame.
    """

    __slots__ = ("limits", "_fast_max", "_data", "_pos", "_head", "_parts", "_done",
                 "_view", "_broken", "on_slots", "_slots")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        #: the largest body the fast path may return without the limit checks
        self._fast_max = min(GROW_FROM, limits.max_body, limits.max_frame)
        self._data: bytes = b""         # bytes not yet part of a frame in progress
        #: where the unread bytes of `_data` begin: the fast path of `next_frame`
        #: moves it on instead of slicing `_data` for each small frame (slicing a
        #: chunk of many frames copied what was left of it, frame by frame);
        #: nonzero only between frames, with unread bytes left
        self._pos = 0
        self._head: tuple | None = None  # (blen, kind, nbufs, rid, budget) of that frame
        self._parts: list[_Part] = []    # its parts still to fill, in order
        self._done: list[Any] = []       # its filled parts
        self._view: memoryview | None = None
        self._broken: str | None = None
        #: the transport's handler of frames with slot entries (None: refused)
        self.on_slots: Any = None
        self._slots: tuple | None = None  # (buffers, notices) of the frame in progress

    # -- state ---------------------------------------------------------------
    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self._head is not None or bool(self._data)

    @property
    def started_rid(self) -> int | None:
        """The request id of the frame being received (None between frames)."""
        return self._head[3] if self._head is not None else None

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet returned."""
        done = self._done
        table = 8 * len(done[0]) if done and isinstance(done[0], list) else 0
        if self._slots is not None:
            table = SLOT.size * (len(self._slots[0]) + len(self._slots[1]))
        return len(self._data) - self._pos + sum(p.filled for p in self._parts) + table + sum(
            len(p) for p in done if not isinstance(p, list))

    # -- input ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._release()
        if not data:
            return
        if self._head is None or not self._parts:
            if self._pos:
                self._data, self._pos = self._data[self._pos:], 0
            self._data = self._data + data if self._data else data
            return
        view = memoryview(data)
        taken = self._fill(view)
        if taken < len(data):
            rest = bytes(view[taken:])
            self._data = self._data + rest if self._data else rest

    def parse(self, data: bytes) -> tuple | None:
        """`feed(data)` then `next_frame()`, in one call (the receive path)."""
        if self._head is None and not self._data and self._view is None:
            self._data = data
        else:
            self.feed(data)
        return self.next_frame()

    def room(self) -> memoryview | None:
        """A writable view for the next bytes of a large part, or None when the
        next bytes are better received as a chunk and given to `feed`."""
        self._release()
        if self._data or not self._parts:
            return None
        part = self._parts[0]
        if part.size - part.filled < GROW_FROM // 16:
            return None
        self._view = part.room()
        return self._view

    def commit(self, n: int) -> None:
        """`n` bytes were written into the view `room()` returned."""
        self._release()
        self._parts[0].filled += n
        self._settle()

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    # -- output --------------------------------------------------------------
    def next_frame(self) -> tuple | None:
        """The next whole frame, or None if more bytes are needed."""
        if self._broken is not None:
            raise FrameError(self._broken)
        if self._head is None:
            data = self._data
            pos = self._pos
            if len(data) - pos < _HSIZE:
                if pos:
                    self._data, self._pos = data[pos:], 0
                return None
            blen, kind, flags, nbufs, rid, budget = _unpack(data, pos)
            end = pos + _HSIZE + blen
            if not nbufs and len(data) >= end and blen <= self._fast_max:
                # the common case: a small frame, whole
                if len(data) > end:
                    self._pos = end
                else:
                    self._data, self._pos = b"", 0
                if not (0.0 <= budget <= MAX_BUDGET) and budget == budget:
                    budget = _budget(budget)
                return kind, rid, budget, data[pos + _HSIZE:end], ()
            if pos:
                self._data, self._pos = data[pos:], 0
            if flags == FLAG_SLOTS and self.on_slots is not None:
                return self._slot_frames()
            self._start(blen, kind, nbufs, rid, budget, flags)
        return self._rest()

    def _slot_frames(self) -> tuple | None:
        """Frames with slot entries that are here whole (the common case: a
        header, a short table and a small body), without the parts machinery;
        anything else goes the general way."""
        hook = self.on_slots
        while True:
            data = self._data
            if len(data) < _HSIZE:
                return None
            blen, kind, flags, nbufs, rid, budget = _unpack(data, 0)
            table_end = _HSIZE + nbufs * SLOT.size
            end = table_end + blen
            if (flags != FLAG_SLOTS or not nbufs or nbufs > self.limits.max_buffers
                    or blen > self._fast_max or len(data) < end):
                self._start(blen, kind, nbufs, rid, budget, flags)
                return self._rest()
            self._data = data[end:] if len(data) > end else b""
            buffers, notices = self._slot_table(data[_HSIZE:table_end], nbufs, blen)
            try:
                frame = hook(kind, rid, _budget(budget), data[table_end:end], buffers, notices)
            except FrameError as e:
                self._broken = str(e)
                self._data = b""
                raise
            if frame is not None:
                return frame

    def _rest(self) -> tuple | None:
        """Fill the frame in progress; return it once whole (going on to the
        next frame after one that `on_slots` took)."""
        while True:
            if self._parts and self._data:
                data, self._data = self._data, b""
                with memoryview(data) as view:
                    taken = self._fill(view)
                    if taken < len(data):
                        self._data = bytes(view[taken:])
            if self._parts:
                return None
            frame = self._finish()
            if frame is not None:
                return frame
            data = self._data       # a frame of notices only: on to the next one
            if len(data) < _HSIZE:
                return None
            blen, kind, flags, nbufs, rid, budget = _unpack(data, 0)
            self._start(blen, kind, nbufs, rid, budget, flags)

    # -- internals -----------------------------------------------------------
    def _fail(self, message: str) -> None:
        self._broken = message
        self._data, self._pos = b"", 0
        self._parts = []
        self._done = []
        self._slots = None
        raise FrameError(message)

    def _start(self, blen: int, kind: int, nbufs: int, rid: int, budget: float,
               flags: int = 0) -> None:
        lim = self.limits
        if blen > lim.max_body:
            self._fail(f"a frame body of {blen} bytes is over the {lim.max_body}-byte limit")
        if nbufs > lim.max_buffers:
            self._fail(f"a frame with {nbufs} out-of-band buffers is over the limit of "
                       f"{lim.max_buffers}")
        if blen > lim.max_frame:
            self._fail(f"a frame of {blen} bytes is over the {lim.max_frame}-byte limit")
        slots = False
        if nbufs and flags:
            if flags != FLAG_SLOTS:
                self._fail(f"a frame with unknown flags {flags:#04x}")
            if self.on_slots is None:
                self._fail("a frame whose buffers are in shared memory, on a connection "
                           "that did not agree to use shared memory")
            slots = True
        self._head = (blen, kind, nbufs, rid, _budget(budget))
        self._data = self._data[_HSIZE:]
        self._done = []
        self._slots = None
        self._parts = [_Part(nbufs * (SLOT.size if slots else _BUFLEN.size))] if nbufs else []
        if slots:
            self._slots = ((), ())      # the table is read when it is whole
        self._parts.append(_Part(blen))
        self._settle()

    def _settle(self) -> None:
        """Close every part that is complete (empty parts are complete at once)."""
        parts = self._parts
        while parts and parts[0].filled == parts[0].size:
            self._part_done()

    def _fill(self, view: memoryview) -> int:
        taken = 0
        while self._parts and taken < len(view):
            taken += self._parts[0].take(view[taken:])
            self._settle()
        return taken

    def _part_done(self) -> None:
        part = self._parts.pop(0)
        head = self._head
        assert head is not None
        if head[2] and not self._done and self._slots is not None:
            self._slots = self._slot_table(part.buf, head[2], head[0])
            self._done.append([])
            return
        if head[2] and not self._done:
            # the buffer table: now the sizes of the buffers are known
            table = part.buf
            lengths = [_BUFLEN.unpack_from(table, i * _BUFLEN.size)[0] for i in range(head[2])]
            total = head[0] + sum(lengths)
            if total > self.limits.max_frame:
                self._fail(f"a frame of {total} bytes (with its buffers) is over the "
                           f"{self.limits.max_frame}-byte limit")
            self._done.append(lengths)
            self._parts.extend(_Part(n) for n in lengths)
            return
        self._done.append(part.buf)

    def _slot_table(self, table: bytearray, n: int, blen: int) -> tuple:
        """Check and split a table of slot entries: `(buffers, notices)`."""
        buffers: list = []
        notices: list = []
        total = blen
        unpack = SLOT.unpack_from
        for i in range(n):
            op, typ, zero, arena, offset, length = unpack(table, i * SLOT.size)
            if zero or op not in (OP_BUFFER, OP_RELEASE, OP_RETIRE) or typ > TYPE_BYTEARRAY:
                self._fail(f"slot entry {i} is malformed (op {op}, type {typ}, reserved {zero})")
            if op != OP_BUFFER and typ:
                self._fail(f"slot entry {i}: a notice has no type (got {typ})")
            if offset + length > _MAX_U64:
                self._fail(f"slot entry {i}: offset {offset} + length {length} overflows")
            if op == OP_BUFFER:
                total += length
                buffers.append(SlotRef(arena, offset, length, typ))
            else:
                notices.append((op, SlotRef(arena, offset, length)))
        if total > self.limits.max_frame:
            self._fail(f"a frame of {total} bytes (with its buffers in shared memory) is over "
                       f"the {self.limits.max_frame}-byte limit")
        return tuple(buffers), tuple(notices)

    def _finish(self) -> tuple | None:
        head = self._head
        assert head is not None
        _blen, kind, nbufs, rid, budget = head
        done = self._done
        slots = self._slots
        if nbufs:
            body, buffers = done[1], tuple(done[2:])
        else:
            body, buffers = done[0], ()
        self._head = None
        self._done = []
        if slots is not None:
            self._slots = None
            try:
                return self.on_slots(kind, rid, budget, body, *slots)
            except FrameError as e:    # a bad claim: the stream is no longer trusted
                self._broken = str(e)
                self._data = b""
                raise
        return kind, rid, budget, body, buffers

