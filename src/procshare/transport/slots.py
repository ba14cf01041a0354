"""Large payloads through shared memory: the slot side of a connection.

A frame's out-of-band buffers (pickle-5 buffers of large bytes, bytearrays,
memoryviews, ndarrays) can travel in shared memory instead of the socket: the
sender copies each into a slot of an arena it owns and the frame carries
slot entries (`wire.frames.FLAG_SLOTS`); the receiver takes each buffer out
of the sender's arena, which it mapped once, and tells the sender when it is
done with the slot (an `OP_RELEASE` notice, riding on its next frame).

Owns: `SlotLink`, what one process knows about the other of a pair (a client
session and its manager; the manager and one client): the pool it writes
into, the peer's arenas it mapped, the notices it owes the peer, and the
per-frame work (`encode`, `on_slots`, `with_notices`); `ManagerSlots`, the
manager's pool and its links by client, with the exchange of arena
descriptors; the copies a receiver makes (`fresh_bytes`, `fresh_buffer`:
huge pages for large ones); in a forked child, replacing lent memory by
a private copy; and, in the manager, the holds its forked children keep on
the slots lent to it (`_ForkHolds`).

Rules it keeps:
- A process writes only into arenas it owns; every slot it fills for the
  peer stays leased to the peer (`ArenaPool` owner) until the peer releases
  it, or the link goes (the manager: when the client's lease ends; a client:
  when its session closes or the manager restarted).
- Descriptors never ride on call frames (a plain `recv` would drop them):
  arena descriptors travel on short side connections whose first frame is
  read with `recvmsg` (`ManagerSlots.exchange`).  A client announces an arena
  before the first frame that uses it; it fetches a manager arena when a
  frame first names it, and gets it only while it holds a slot there.
- A claim is checked before use: a buffer must lie inside an arena the peer
  announced (manager) or that the manager gave (client), and a release must
  name a slot leased to the peer (`ArenaPool.free`); anything else is a
  `SlotClaimError` (a FrameError): the connection is closed, with the reason
  in the log.  A manager maps a client's arena only if it is sealed against
  shrinking where the platform has seals, so a client cannot fault it.
- Both ends copy bytes and bytearray buffers (their rebuild would copy
  anyway) and lend the slot's memory to any other buffer (an ndarray, a
  memoryview, a user type's PickleBuffer: the wire does not tell them
  apart): where numpy is loaded (or the frame's pickle names it, so that
  unpickling will load it; not while another thread is still importing
  it), from `LEND_VIEW_MIN` bytes, as a uint8 array over the peer's arena
  mapped writable once per arena; elsewhere, from `LEND_MIN` bytes, as a
  mapping of that slot alone.  Either is an object that every view made
  from it keeps alive (a memoryview slice would not be: pickle's read-only
  buffers share its managed buffer, not it; the one object that points into
  the slot without holding the lent array is that array's own `.base`, a
  memoryview of the whole arena), and a lent slot's pages past its buffer
  are punched (the slot is a power of two).  Lending that fails for any
  reason copies instead.  The slot is released when the last view
  goes, by a notice that rides on the next frame to the peer (a manager
  whose client stays silent punches such a slot's pages after a second or
  two, `punch_unheard`: the release stays owed).  A copied
  buffer's release is queued at once (on the manager, before the call runs,
  so it rides on the call's reply).  So an ndarray the manager stores lives
  in the uploading client's arena until the manager drops it: the client
  never writes into a slot leased to the manager, and the mapping outlives
  the client.  When the client's lease ends, the rest of its arenas is given
  back (`fallocate` punches holes around the lent slots), once no copy out of
  them is under way.  Descriptors are bounded: at most `_LENT_CAP` mappings
  made for lending (lent slots' own and arenas mapped writable, which
  outlive their link while an array lent from them lives; each holds a
  descriptor before Python 3.13) and `_KEPT_CAP` kept arena descriptors per
  process, a quarter and an eighth of RLIMIT_NOFILE; beyond either, buffers
  are copied.  (An arena's read-only mapping holds one more, before 3.13,
  while its link has it.)
- In a forked child of a client, lent memory is replaced by a private copy
  at the same address (the child's arrays stay valid and its own, as after
  any fork), the rest of an arena mapped writable for them is made
  inaccessible (reserved address space, so nothing of the parent's memory
  stays shared through it; before Python 3.13 that mapping's descriptor
  still keeps the arena's memory from being freed until those arrays go),
  and the parent's arenas are closed: the child makes links of its own.  A forked child of the manager (a Pool worker) leaves the
  manager's lent memory shared: a private copy of every stored array in
  every worker would cost far more than the copy-on-write fork it replaces,
  and such a child does not write into the manager's objects.  Such a child
  holds what was lent when it was forked, as its copy-on-write pages would:
  a slot the manager drops meanwhile is released only once every child
  forked while it was lent, and every process such a child forked in turn,
  has exited or exec'd (`_ForkHolds`: a pipe per fork, whose write end only
  they hold; checked by the trimmer about once a second), so the client
  neither reuses nor punches memory a child still reads.
- A client's allocator is left alone: a large copy is a mapping of its own
  that asks for huge pages, because its cost is page faults.  The manager,
  once it carries large data, pins glibc's mmap and trim thresholds
  (`pin_malloc`): left to move, the trim threshold (inherited from a forked
  parent, or raised by glibc itself) let thread arenas keep a dead client's
  payloads (measured: 20 MiB of 110 kept after a kill).  It also gives free
  heap memory back (`malloc_trim`) when a client's lease ends and when large
  traffic stops.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..wire.frames import (
    OP_BUFFER,
    OP_RELEASE,
    OP_RETIRE,
    TYPE_BYTEARRAY,
    TYPE_BYTES,
    TYPE_OTHER,
    add_slot_entries,
    encode_slot_frame,
    frame_problem,
    unsent_slot_entries,
)
from ..wire.kinds import Kind
from . import shm
from .channel import readable_within
from .shm import ArenaPool, Slot, SlotClaimError

try:
    import ctypes
    import ctypes.util
except ImportError:     # a Python built without _ctypes (libffi): large data goes through
    ctypes = None  # type: ignore[assignment]     # the socket (`unavailable_reason`)

__all__ = ["SlotLink", "ManagerSlots", "client_link", "fresh_bytes", "fresh_buffer",
           "SLOT_MIN", "LEND_MIN", "LEND_VIEW_MIN", "unavailable_reason"]

log = logging.getLogger("procshare.slots")

#: frames whose out-of-band buffers total at least this go through slots
SLOT_MIN = 64 * 1024
#: where numpy is loaded, the receiver lends the slot's memory to a buffer (an
#: ndarray's, or any other but bytes and bytearray) at least this large, as a
#: uint8 array over the peer's arena mapped writable, once per arena
#: (`SlotLink._lend`: about 5 us, release included); smaller ones are copied.
#: An ndarray's round trip through a managed dict, median of 300, lent against
#: copied: 128 KiB 125 us against 146-151, 1 MiB 167 against 209-213, 2 MiB
#: 216-239 against 339-347.  Below this a copy is cheap, and a lent value
#: would hold a whole slot of the peer's arena (at least `shm.MIN_SLOT`) as
#: long as it lives.
LEND_VIEW_MIN = 128 << 10
#: where numpy is not loaded, a buffer is lent from this size: it needs a
#: mapping of its own, whose mmap, page table and munmap cost about 280 us a
#: MiB here, where a copy into heap memory costs about 70 (a round trip: 1 MiB
#: 0.17 ms copied, 0.47 lent; 3 MiB 0.44 against 0.86).  From the manager's
#: trim threshold (`TRIM_PIN`) up, a copy is fresh memory, page faults
#: included, and lending wins (4 MiB: 1.1 ms lent, 1.8 copied).
LEND_MIN = 4 << 20
#: a lent slot's pages past its buffer are given back when at least this much
#: (the slot is a power of two: a lent 1.1 MiB array holds a 2 MiB slot)
PUNCH_TAIL_MIN = 64 << 10
#: bytes objects at least this large are made with huge pages (`fresh_bytes`)
HUGE_MIN = 32 << 20
#: the smallest arena (a larger buffer gets an arena of the next power of two)
ARENA_MIN = 4 << 20
#: empty arenas a pool keeps mapped and warm
KEEP_WARM = 64 << 20
#: notices carried by one frame at most (the rest ride on the next)
MAX_NOTICES = 1024
#: lent mappings a process keeps at most (before Python 3.13 each holds a
#: descriptor); beyond, copy
MAX_LENT = 512
#: descriptors of peer arenas a process keeps for lending at most (beyond, copy);
#: both caps shrink to fit a low RLIMIT_NOFILE (`_LENT_CAP`, `_KEPT_CAP`)
MAX_KEPT_FDS = 256
#: the manager gives memory back after this long without slot traffic, and
#: punches the slots of releases a silent client has not heard for about as long
IDLE_TRIM = 2.0
#: releases of slots at least this large are punched while the client is silent
PUNCH_MIN = 1 << 20
#: the manager's glibc thresholds (`pin_malloc`): allocations this large are
#: mappings of their own (glibc's own ceiling for its moving threshold) ...
MMAP_PIN = 32 << 20
#: ... and the free memory a heap keeps at its top, beyond which it is given back
TRIM_PIN = 4 << 20

_PROT_R = mmap.PROT_READ
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)
_MAP_FIXED = 0x10       # (Linux and macOS; Python's mmap does not name it)
#: a lent mapping needs no descriptor of its own where mmap can do without one
_NO_FD: dict = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_kept_mutex = threading.Lock()


def _fd_budget() -> int:
    """The descriptors this process may open (RLIMIT_NOFILE's soft limit)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    return soft if soft > 0 else 1 << 20


#: lent mappings at most, and arena descriptors kept at most: a quarter and an
#: eighth of the descriptors this process may open, the rest for its connections
_LENT_CAP = MAX_LENT if _NO_FD else min(MAX_LENT, _fd_budget() // 4)
_KEPT_CAP = min(MAX_KEPT_FDS, _fd_budget() // 8)
_TYPES = {bytes: TYPE_BYTES, bytearray: TYPE_BYTEARRAY}
_NOTICE = Kind.NOTICE


# -- process-wide facts ----------------------------------------------------------------------

_libc: Any = None
_warned = False


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def unavailable_reason() -> str | None:
    """Why this process cannot move large data through shared memory (None: it can)."""
    if ctypes is None:
        return "this Python has no ctypes module (it was built without libffi)"
    ok = shm.available()
    return None if ok else ok.reason


def warn_unavailable(reason: str) -> None:
    """One warning per process: large data goes through the socket."""
    global _warned
    if not _warned:
        _warned = True
        import warnings
        warnings.warn(f"procshare: {reason}", RuntimeWarning, stacklevel=3)


def _thp_usable() -> bool:
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


_THP = _thp_usable()
_BYTES_DATA = bytes.__basicsize__ - 1       # where a bytes object's data starts (CPython)
_HUGE = 2 << 20


if ctypes is not None:
    class _PyBuffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                    ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                    ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_void_p), ("shape", ctypes.c_void_p),
                    ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                    ("internal", ctypes.c_void_p)]


_api: Any = None


def _address(view: memoryview) -> int:
    """Where the (contiguous) bytes of `view` are; valid while `view` is."""
    global _api
    api = _api
    if api is None:
        api = ctypes.PyDLL(None)        # our own handle: argtypes set here stay here
        api.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer),
                                           ctypes.c_int]
        api.PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
        _api = api
    pb = _PyBuffer()
    if api.PyObject_GetBuffer(view, ctypes.byref(pb), 0) != 0:
        raise BufferError("no address for this buffer")
    try:
        return pb.buf or 0
    finally:
        api.PyBuffer_Release(ctypes.byref(pb))


_NAMES_NUMPY = re.compile(rb"numpy").search
_no_numpy = False       # importing it failed here once: never again


def _numpy(body: Any) -> Any:
    """numpy, if this process has it, or if the frame's pickle names it (its
    unpickling imports it anyway; a body whose data holds the word does too);
    else None, also while another thread is still importing it (a partly made
    module: this frame's buffers are copied)."""
    global _no_numpy
    np = sys.modules.get("numpy")
    if np is None:
        if _no_numpy or _NAMES_NUMPY(body) is None:     # (no copy of a memoryview)
            return None
        try:
            import numpy as np
        except Exception:       # (broken or absent: buffers are copied)
            _no_numpy = True
            return None
    if getattr(getattr(np, "__spec__", None), "_initializing", False):
        return None
    return np


def fresh_bytes(view: memoryview) -> bytes:
    """`bytes(view)`, with huge pages for a large one.

    The cost of a large fresh object is its page faults, not the copy (here,
    64 MiB: about 45 ms, of which the copy is 12).  `bytes(n)` is calloc'd, so
    its pages are untouched; asking for huge pages on them before the copy
    makes the faults 512 times fewer (about 19 ms in all).  Only for objects
    above glibc's largest mmap threshold, so the memory is a mapping of its
    own and unmapped when the object goes, and on CPython (which lays bytes
    out this way); nothing else about the process's memory changes."""
    n = view.nbytes
    if n < HUGE_MIN or not _THP:
        return bytes(view)
    out = bytes(n)
    addr = id(out) + _BYTES_DATA
    lo = (addr + _HUGE - 1) & ~(_HUGE - 1)
    hi = (addr + n) & ~(_HUGE - 1)
    libc = _c()
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 14)   # MADV_HUGEPAGE
    ctypes.memmove(addr, _address(view), n)
    return out


def fresh_buffer(view: memoryview) -> Any:
    """A private, writable copy of `view`: a bytearray, or for a large one an
    anonymous mapping with huge pages (unmapped when its last user goes)."""
    n = view.nbytes
    if n < HUGE_MIN or not _THP or _MADV_HUGEPAGE is None:
        return bytearray(view)
    out = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=_PROT_RW)
    try:
        out.madvise(_MADV_HUGEPAGE)
    except OSError:
        pass
    with memoryview(out) as dst:
        dst[:] = view
    return out


def pin_malloc() -> None:
    """Fix glibc's mmap and trim thresholds (`MMAP_PIN`, `TRIM_PIN`) instead
    of letting them move: glibc raises the trim threshold to twice the
    largest block it ever unmapped, and a thread arena's top is trimmed only
    down to it (`malloc_trim` does not touch that top), so a client's
    payloads could leave up to 64 MiB per connection thread behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = _c()
        libc.mallopt(-3, MMAP_PIN)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_PIN)      # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def malloc_trim() -> None:
    """Give the heap's free memory back to the system (glibc; the manager
    calls it when a client's lease ended and when large traffic stopped)."""
    try:
        _c().malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- mappings of the peer's arenas -----------------------------------------------------------

class _Mapped:
    """A peer's arena mapped here, read-only (`fd` kept only where slots are
    lent from it; at most `MAX_KEPT_FDS` kept per process, after which the
    arena's buffers are copied).  `rw`: the same arena mapped writable, made
    at the first ndarray lent from it (`SlotLink._lend`); each lent view holds
    it.  The caller closes `fd` unless `self.fd` is it."""

    __slots__ = ("size", "mm", "view", "fd", "rw")
    kept = 0        # descriptors kept by all mappings of this process

    def __init__(self, fd: int, size: int, keep_fd: bool) -> None:
        actual = os.fstat(fd).st_size
        if size <= 0 or actual < size:
            raise SlotClaimError(f"an arena of {size} bytes whose file has {actual}")
        self.size = size
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_PROT_R)
        if _MADV_POPULATE_READ is not None:
            try:
                self.mm.madvise(_MADV_POPULATE_READ)
            except OSError:
                pass
        self.view = memoryview(self.mm)
        self.rw: memoryview | None = None
        self.fd = -1
        if keep_fd:
            with _kept_mutex:
                if _Mapped.kept < _KEPT_CAP:
                    _Mapped.kept += 1
                    self.fd = fd

    def writable(self) -> memoryview:
        """(the link's lock held, `fd` kept) The arena, mapped writable: a
        mapping counted among the lent ones (`_LENT_CAP`: before Python 3.13
        it holds a descriptor of its own, until the last array lent from it
        goes, however long the link lasts)."""
        rw = self.rw
        if rw is None:
            whole = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=_PROT_RW,
                              **_NO_FD)
            _arena_maps.add(whole)
            rw = self.rw = memoryview(whole)
        return rw

    def close(self) -> None:
        mm, self.mm = self.mm, None
        if mm is not None:
            _unmap(self.view)   # (a view still being read: unmapped when it goes)
        rw, self.rw = self.rw, None
        if rw is not None:
            _unmap(rw)          # (arrays lent from it: unmapped when the last goes)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with _kept_mutex:
                _Mapped.kept -= 1
            os.close(fd)


def _unmap(view: memoryview) -> None:
    """Release `view` of a whole mapping and close the mapping, unless other
    views of it live on (it is unmapped when the last one goes)."""
    mm = view.obj
    view.release()
    try:
        mm.close()
    except BufferError:
        pass


def _sealed(fd: int) -> bool:
    """True if the file cannot shrink (or this platform has no seals to check)."""
    import fcntl
    get = getattr(fcntl, "F_GET_SEALS", None)
    shrink = getattr(fcntl, "F_SEAL_SHRINK", None)
    if get is None or shrink is None:
        return True
    try:
        return bool(fcntl.fcntl(fd, get) & shrink)
    except OSError:
        return False


# -- one link --------------------------------------------------------------------------------

_links: weakref.WeakSet[SlotLink] = weakref.WeakSet()
#: slots lent to this process's own buffers, by (link serial, arena, offset):
#: a client's (made private in a forked child) and the manager's (left shared
#: there; `_ForkHolds` keeps their keys).  Each lent buffer is a mapping of its
#: own or an ndarray (unhashable: it cannot be a key); its entry goes with it.
_lent: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
_lent_by_manager: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
#: mappings made for lending, at most `_LENT_CAP` together: lent slots' own,
#: and arenas mapped writable for the ndarrays lent from them
_lent_maps: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
_arena_maps: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def _room_to_map() -> bool:
    """May this process make one more mapping for lending (`_LENT_CAP`)?"""
    return len(_lent_maps) + len(_arena_maps) < _LENT_CAP

_link_serials = itertools.count(1)


class SlotLink:
    """What this process knows about one peer, shared by all the channels
    between the two.

    `pool`: the arenas this process writes into for the peer, whose slots are
    leased to `owner`.  `lend`: slot memory is lent to large non-bytes
    buffers instead of copied (both ends do this; False copies everything).  `announce(arenas, fds)`
    tells the peer about arenas of ours (client); `fetch(ids) -> (arenas, fds)`
    gets the peer's (client).  On the manager both are None: clients announce
    and fetch through `ManagerSlots.exchange`.
    """

    def __init__(self, pool: ArenaPool, owner: str, *, lend: bool,
                 announce: Callable[[list, list], None] | None = None,
                 fetch: Callable[[list], tuple[list, list]] | None = None,
                 name: str = "") -> None:
        self.pool = pool
        self.owner = owner
        self.lend = lend
        self.announce = announce
        self.fetch = fetch
        self.name = name
        self.peer_arenas: dict[int, _Mapped] = {}
        #: slots of the peer's arenas lent here: (arena, offset) -> length (a
        #: finalizer removes one without a lock: single dict operations)
        self.lent_ranges: dict[tuple[int, int], int] = {}
        self.announced: set[int] = set()
        self.notices: collections.deque = collections.deque()
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # no encode in progress (`busy`)
        self.busy = 0
        self.refused: str | None = None     # why the peer refused our arenas, if it did
        self.pid = os.getpid()
        self.closed = False
        self.last_used = time.monotonic()
        self._unheard: Any = None       # the first notice owed at the last look
        self._punched: dict[int, tuple] = {}    # owed notices whose slots are punched
        self.serial = next(_link_serials)
        _links.add(self)

    # -- sending ---------------------------------------------------------------------
    def encode(self, kind: int, rid: int, body: bytes, bufs: Any, budget: float,
               limits: Any) -> bytes | None:
        """The frame with its buffers copied into slots, and the notices owed to
        the peer; None when the buffers are better sent through the socket
        (small, or no room for them here)."""
        views = [memoryview(b) for b in bufs]
        size = sum(v.nbytes for v in views)
        if size < SLOT_MIN or self.closed or self.refused:
            return None
        if frame_problem(limits, len(body), len(body) + size, len(views)) is not None:
            return None     # (the socket's encoder says so, before anything is copied or sent)
        if not self._begin_copy():
            return None
        try:
            return self._encode(kind, rid, body, bufs, views, budget, limits)
        except SlotClaimError as e:
            if self.announce is None:
                raise
            # the manager refused our arena (one it cannot map safely): the socket
            self.refused = str(e)
            warn_unavailable(f"large data goes through the socket: {e}")
            return None
        finally:
            self._end_copy()

    def _begin_copy(self) -> bool:
        """A copy into our slots or out of the peer's arenas starts: False if the
        link is closed.  `close_and_wait` frees and punches nothing under one."""
        with self.lock:
            if self.closed:
                return False
            self.busy += 1
            return True

    def _end_copy(self) -> None:
        with self.lock:
            self.busy -= 1
            if not self.busy:
                self.idle.notify_all()

    def _encode(self, kind: int, rid: int, body: bytes, bufs: Any, views: list,
                budget: float, limits: Any) -> bytes | None:
        pool = self.pool
        taken: list[Slot] = []
        try:
            entries = []
            for b, v in zip(bufs, views):
                if v.ndim != 1 or v.format != "B":
                    v = v.cast("B")
                slot = pool.alloc(v.nbytes, self.owner)
                taken.append(slot)
                if self.announce is not None and slot.arena not in self.announced:
                    self._announce(slot.arena)
                pool.write(slot, v)
                entries.append((OP_BUFFER, _TYPES.get(type(getattr(b, "obj", None)), TYPE_OTHER),
                                slot.arena, slot.offset, slot.length))
            entries += self._take_notices()
            frame = encode_slot_frame(kind, rid, body, entries, budget, limits)
        except (MemoryError, OSError, ValueError) as e:
            for slot in taken:
                pool.free(slot, self.owner)
            if isinstance(e, (MemoryError, OSError)) and not isinstance(e, ConnectionError):
                log.info("large data through the socket: no shared memory for it (%s)", e)
                return None
            raise
        except BaseException:
            for slot in taken:
                pool.free(slot, self.owner)
            raise
        self.last_used = time.monotonic()
        return frame

    def _announce(self, arena_id: int) -> None:
        with self.lock:
            if arena_id in self.announced:
                return
            size = self.pool.arena_size_of(arena_id)
            fd = os.dup(self.pool.fd(arena_id))
            try:
                self.announce([[arena_id, size]], [fd])     # type: ignore[misc]
            finally:
                os.close(fd)
            self.announced.add(arena_id)

    def _take_notices(self) -> list:
        out = []
        notices = self.notices
        while notices and len(out) < MAX_NOTICES:
            try:
                out.append(notices.popleft())
            except IndexError:
                break
        return out

    def with_notices(self, frame: bytes) -> bytes:
        """A plain frame (from `pack_frame`) carrying the notices owed to the peer."""
        entries = self._take_notices()
        if not entries:
            return frame
        try:
            return add_slot_entries(frame, entries)
        except ValueError:      # a frame with a table: the notices go in a frame before it
            return encode_slot_frame(_NOTICE, 0, b"", entries) + frame

    def notice_frame(self) -> bytes | None:
        entries = self._take_notices()
        return encode_slot_frame(_NOTICE, 0, b"", entries) if entries else None

    def unsent(self, data: bytes, sent: int) -> None:
        """A write of `data` (whole frames made here) failed with a
        ConnectionError after `sent` bytes: the frames it did not finish never
        reach the peer.  Their buffers' slots are free again, and their notices are
        owed again (they ride on the next frame).  Before, those slots stayed
        leased to the peer, and its slots named in the notices stayed leased
        to us, until the link closed."""
        entries = unsent_slot_entries(data, sent)
        owed = []
        for op, _typ, arena, offset, length in entries:
            if op == OP_BUFFER:
                try:
                    self.pool.free(Slot(arena, offset, length), self.owner)
                except SlotClaimError as e:     # not ours to free: leave it
                    log.warning("a slot of an unsent frame was not leased to %s: %s",
                                self.owner, e)
            else:
                owed.append((op, 0, arena, offset, length))
        if owed:
            self.notices.extendleft(reversed(owed))

    # -- receiving -------------------------------------------------------------------
    def on_slots(self, kind: int, rid: int, budget: float, body: Any, buffers: tuple,
                 notices: tuple) -> tuple | None:
        """`FrameReader.on_slots`: apply the notices, take the buffers."""
        for op, ref in notices:
            if op == OP_RELEASE:
                self.pool.free(Slot(ref[0], ref[1], ref[2]), self.owner)
            elif op == OP_RETIRE:
                self._drop_peer_arena(ref[0])
        if not buffers:
            return None if kind == _NOTICE else (kind, rid, budget, body, ())
        self.last_used = time.monotonic()
        if not self._begin_copy():
            raise SlotClaimError(
                f"a frame with buffers in shared memory came on the closed link to "
                f"{self.name or self.owner!r} (its lease ended or its session closed); "
                "this connection closes, and the peer's next connection gets a new link")
        try:
            np = _numpy(body) if self.lend and any(
                ref[3] == TYPE_OTHER and ref[2] >= LEND_VIEW_MIN for ref in buffers) else None
            return kind, rid, budget, body, tuple([self._take(ref, np) for ref in buffers])
        finally:
            self._end_copy()

    def _mapped(self, arena_id: int) -> _Mapped:
        m = self.peer_arenas.get(arena_id)
        if m is not None:
            return m
        if self.fetch is None:
            raise SlotClaimError(f"slot claim in arena {arena_id}, which this client never "
                                 "announced")
        with self.lock:
            m = self.peer_arenas.get(arena_id)
            if m is None:
                arenas, fds = self.fetch([arena_id])
                try:
                    for (aid, size), fd in zip(arenas, fds):
                        if aid == arena_id and aid not in self.peer_arenas:
                            m = self.peer_arenas[aid] = _Mapped(fd, size, keep_fd=self.lend)
                            if m.fd == fd:
                                fds[fds.index(fd)] = -1     # kept by the mapping
                finally:
                    for fd in fds:
                        if fd >= 0:
                            os.close(fd)
                m = self.peer_arenas.get(arena_id)
                if m is None:
                    raise SlotClaimError(f"the manager did not give arena {arena_id}")
        return m

    def _take(self, ref: tuple, np: Any) -> Any:
        """One buffer of a frame: lent (a numpy view of the slot if `np` is
        numpy, else a mapping of the slot alone) or copied."""
        arena_id, offset, length, typ = ref
        m = self._mapped(arena_id)
        if offset + length > m.size:
            raise SlotClaimError(f"slot ({arena_id}, {offset}, {length}) runs past the end "
                                 f"of arena {arena_id} ({m.size} bytes)")
        if m.mm is None:
            raise SlotClaimError(f"slot claim in arena {arena_id}, which was retired")
        if self.lend and typ == TYPE_OTHER and m.fd >= 0 and offset % mmap.PAGESIZE == 0:
            lent = None
            if np is not None and length >= LEND_VIEW_MIN and (
                    m.rw is not None or _room_to_map()):
                lent = self._lend(m, arena_id, offset, length, np)
            elif (length >= LEND_MIN and offset % mmap.ALLOCATIONGRANULARITY == 0
                  and _room_to_map()):
                lent = self._lend(m, arena_id, offset, length, None)
            if lent is not None:
                return lent
        with m.view[offset:offset + length] as view:
            if typ == TYPE_BYTES:
                out: Any = fresh_bytes(view)
            elif typ == TYPE_BYTEARRAY:
                out = bytearray(view)
            else:
                out = fresh_buffer(view)
        self.notices.append((OP_RELEASE, 0, arena_id, offset, length))
        return out

    def _lend(self, m: _Mapped, arena_id: int, offset: int, length: int, np: Any) -> Any:
        """The slot's memory as a buffer of this process, released when the last
        view of it goes: with numpy, a uint8 array over the arena mapped
        writable (`_Mapped.writable`: once per arena); without, a mapping of
        the slot alone.  None: copy it instead."""
        with self.lock:     # the mapping's descriptor is closed under this lock only
            if m.fd < 0 or m.mm is None:
                return None
            try:
                if np is not None:
                    lent = np.frombuffer(m.writable()[offset:offset + length], dtype=np.uint8)
                else:
                    lent = mmap.mmap(m.fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                                     prot=_PROT_RW, offset=offset, **_NO_FD)
                    _lent_maps.add(lent)
            except Exception as e:      # out of descriptors or address space: copy it
                log.debug("copying a buffer instead of lending it: %r", e)
                return None
            self.lent_ranges[arena_id, offset] = length
            # the slot is a power of two at least `length` long: what lies past the
            # buffer's last page is nobody's while the buffer lives
            tail = -(-(offset + length) // mmap.PAGESIZE) * mmap.PAGESIZE
            end = offset + (1 << (length - 1).bit_length())
            if end - tail >= PUNCH_TAIL_MIN:
                _punch(m.fd, tail, end - tail)
        key = (self.serial, arena_id, offset)
        if self.announce is not None:
            _lent[key] = lent
        else:
            _lent_by_manager[key] = lent
            _fork_holds.lent(key)
        f = weakref.finalize(lent, _lent_gone, weakref.ref(self), self.pid, arena_id, offset,
                             length)
        f.atexit = False
        return lent

    def _drop_peer_arena(self, arena_id: int) -> None:
        with self.lock:
            m = self.peer_arenas.pop(arena_id, None)
            if m is not None:
                m.close()

    def _punch_unlent(self) -> int:
        """The peer is gone: give back the memory of its arenas outside the slots
        lent here (which stay: stored values live in them).  Returns the bytes.
        Called with the lock held and no copy under way."""
        by_arena: dict[int, list[tuple[int, int]]] = {}
        for (arena_id, off), length in list(self.lent_ranges.items()):
            by_arena.setdefault(arena_id, []).append((off, length))
        freed = 0
        for arena_id, lent in by_arena.items():
            m = self.peer_arenas.get(arena_id)
            if m is None or m.fd < 0:
                continue
            start = 0
            for off, length in sorted(lent):
                freed += _punch(m.fd, start, off - start)
                start = max(start, -(-(off + length) // mmap.PAGESIZE) * mmap.PAGESIZE)
            freed += _punch(m.fd, start, m.size - start)
        return freed

    def punch_unheard(self) -> int:
        """Manager side, called about once a second: a release the peer has not
        heard since the last call (it sent no call to carry it back) gives the
        memory of its slot back now, if its arena's descriptor is kept here (a
        slot that was lent) and the slot is at least `PUNCH_MIN`.  Nothing reads
        a released slot, and the peer reuses it only once it hears the
        release, which stays owed: the notices are off the queue, so no frame
        carries them, while their slots are punched.  Returns the bytes."""
        notices = self.notices
        try:
            head = notices[0]
        except IndexError:      # (a connection thread may take the last one meanwhile)
            head = None
        if head is None or head is not self._unheard:
            self._unheard = head
            if head is None:
                self._punched.clear()
            return 0
        freed = 0
        with self.lock:
            if self.closed:
                return 0
            owed = []
            while notices:
                try:
                    owed.append(notices.popleft())
                except IndexError:
                    break
            try:
                page = mmap.PAGESIZE
                for n in owed:
                    op, _, arena_id, offset, length = n
                    if op != OP_RELEASE or length < PUNCH_MIN or id(n) in self._punched:
                        continue
                    m = self.peer_arenas.get(arena_id)
                    if m is None or m.fd < 0:
                        continue
                    lo = -(-offset // page) * page
                    hi = (offset + length) // page * page
                    freed += _punch(m.fd, lo, hi - lo)
                    self._punched[id(n)] = n
            finally:
                notices.extendleft(reversed(owed))
            self._punched = {id(n): n for n in owed if id(n) in self._punched}
        return freed

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Forget the peer (its arenas are unmapped; lent slots stay mapped
        until their views go)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._unmap_peer_arenas()

    def _unmap_peer_arenas(self) -> None:
        """Forget every arena of the peer mapped here (with the lock held)."""
        arenas, self.peer_arenas = list(self.peer_arenas.values()), {}
        for m in arenas:
            m.close()

    def close_and_wait(self, timeout: float = 10.0, punch: bool = False) -> int:
        """Close once no copy is under way (bounded wait): no encode copying
        into a slot of ours, no take copying out of the peer's arenas.  With
        `punch` (the peer is gone), first give back the memory of its arenas
        that no value lent here uses; returns those bytes."""
        with self.lock:
            was_closed, self.closed = self.closed, True     # nothing new starts
            self.idle.wait_for(lambda: not self.busy, timeout)
            if was_closed:
                return 0
            punched = self._punch_unlent() if punch and not self.busy else 0
            self._unmap_peer_arenas()
        return punched

    def abandon_after_fork(self) -> None:
        """In a forked child: close what the parent's link held, touching
        nothing the parent uses (its slots stay its own)."""
        self.closed = True
        for m in self.peer_arenas.values():
            m.close()
        self.peer_arenas = {}

    def __repr__(self) -> str:
        return (f"<SlotLink {self.name or self.owner}: {len(self.peer_arenas)} peer arenas, "
                f"{len(self.notices)} notices>")


def _lent_gone(link_ref: Callable[[], SlotLink | None], pid: int, arena_id: int, offset: int,
               length: int) -> None:
    """The last view of a lent slot went: release it (not in a forked child)."""
    link = link_ref()
    if link is None or os.getpid() != pid:
        return
    if _fork_holds.defer(link, arena_id, offset, length):
        return          # a forked child of ours may still read it: later
    _release_lent(link, arena_id, offset, length)


def _release_lent(link: SlotLink, arena_id: int, offset: int, length: int) -> None:
    link.lent_ranges.pop((arena_id, offset), None)
    if not link.closed:
        link.notices.append((OP_RELEASE, 0, arena_id, offset, length))


class _Hold:
    """The slots one forked child (and the processes it forks in turn) may
    read: those lent when it was forked.  `alive` is the read end of a pipe
    whose write end only the child's side holds (close-on-exec), so the
    hold ends when the last process that inherited it exits or execs."""

    __slots__ = ("alive", "keys")

    def __init__(self, alive: int, keys: set) -> None:
        self.alive = alive
        self.keys = keys

    def ended(self) -> bool:
        """Every write end is closed (nothing ever writes to it)."""
        try:
            return readable_within(self.alive, 0.0)
        except (OSError, ValueError):
            return True


class _ForkHolds:
    """The manager's forked children (Pool workers, Processes started by a
    managed object) and the lent slots each holds: those lent when it was
    forked, which its copy of the manager's objects may still read.  A slot
    the manager drops while such a hold lasts is released when the last
    hold on it has ended (`release_ready`, from the trimmer).

    A hold is made before the fork and covers the fork itself: a slot lent
    while the fork is under way joins it, and one dropped meanwhile is
    already held.  Its pipe's write end is inherited by the child (and the
    child's own children) and closed by an exec, so a program a managed
    object runs holds nothing, and a Pool worker's own children hold on."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()      # a finalizer may run under it (gc)
        self.holds: list[_Hold] = []
        self.deferred: dict[tuple, tuple] = {}     # key -> (link ref, arena, offset, length)
        #: forking thread -> (hold, write end), until its fork returned: slots
        #: lent meanwhile join the hold, and it cannot have ended yet
        self.forming: dict[int, tuple[_Hold, int]] = {}

    def before_fork(self) -> None:
        if not _lent_by_manager:
            return
        try:
            r, w = os.pipe()        # close-on-exec, both
        except OSError as e:
            log.warning("a child forked now by the manager (pid %d) holds no lent slot, for "
                        "want of a pipe (%s): an array the manager drops may change under "
                        "it. Raise the open-files limit (ulimit -n) of the manager.",
                        os.getpid(), e)
            return
        hold = _Hold(r, set())
        with self.mutex:
            # forming first: a slot lent from now on joins the hold (`lent`); one
            # lent before is in the copy below (made in C: no thread runs meanwhile)
            self.forming[threading.get_ident()] = (hold, w)
            self.holds.append(hold)
            hold.keys.update([k for k, ref in list(_lent_by_manager.data.items())
                              if ref() is not None])

    def after_fork_in_parent(self) -> None:
        if not self.forming:
            return
        with self.mutex:
            got = self.forming.pop(threading.get_ident(), None)
        if got is not None:
            os.close(got[1])    # the child's copy (if the fork worked) keeps the hold

    def lent(self, key: tuple) -> None:
        """A slot was just lent: a fork under way may copy it into its child."""
        if self.forming:
            with self.mutex:
                for hold, _w in self.forming.values():
                    hold.keys.add(key)

    def defer(self, link: SlotLink, arena_id: int, offset: int, length: int) -> bool:
        """Is this dropped slot held by a forked child?  Then keep it lent
        (`lent_ranges`: not punched either) until `release_ready`."""
        if not self.holds:
            return False
        key = (link.serial, arena_id, offset)
        with self.mutex:
            if not any(key in h.keys for h in self.holds):
                return False
            self.deferred[key] = (weakref.ref(link), arena_id, offset, length)
        return True

    def release_ready(self) -> int:
        """End the holds whose children are all gone, and release the deferred
        slots no hold covers any more; returns how many."""
        if not self.holds:
            return 0
        with self.mutex:
            forming = [hold for hold, _w in self.forming.values()]
            gone = [h for h in self.holds if h not in forming and h.ended()]
            if not gone:
                return 0
            for h in gone:
                self.holds.remove(h)
                os.close(h.alive)
            held = set().union(*(h.keys for h in self.holds))
            ready = [self.deferred.pop(k) for k in list(self.deferred) if k not in held]
        for link_ref, arena_id, offset, length in ready:
            link = link_ref()
            if link is not None:
                _release_lent(link, arena_id, offset, length)
        return len(ready)

    def forget(self) -> None:
        """In a forked child: the parent's holds are not ours (the write end
        this child inherited stays open: it is what holds the slots)."""
        for h in self.holds:
            try:
                os.close(h.alive)
            except OSError:
                pass
        self.mutex = threading.RLock()
        self.holds = []
        self.deferred = {}
        self.forming = {}


_fork_holds = _ForkHolds()


def _punch(fd: int, offset: int, length: int) -> int:
    """Free the memory of part of a memfd (its size stays); the bytes freed."""
    if length <= 0 or not sys.platform.startswith("linux"):
        return 0
    try:
        ok = _c().fallocate(ctypes.c_int(fd), ctypes.c_int(0x03),   # PUNCH_HOLE | KEEP_SIZE
                            ctypes.c_long(offset), ctypes.c_long(length)) == 0
    except (OSError, AttributeError):
        return 0
    return length if ok else 0


# -- clients ---------------------------------------------------------------------------------

_client_links: dict[int, SlotLink] = {}
_client_mutex = threading.Lock()


def client_link(key: Any, server: str, announce: Callable, fetch: Callable) -> SlotLink:
    """The link of this process to the manager instance `server` (its nonce)
    for the session `key` (the session object, kept weakly): made on first use,
    again after a fork or when the manager restarted."""
    with _client_mutex:
        link = _client_links.get(id(key))
        if (link is not None and link.name == server and link.pid == os.getpid()
                and not link.closed):
            return link
        if link is not None and link.pid == os.getpid():
            link.close()
            link.pool.close()
        pool = ArenaPool(ARENA_MIN, keep_bytes=KEEP_WARM, name="procshare-slots")
        link = SlotLink(pool, "manager", lend=True, announce=announce, fetch=fetch,
                        name=server)
        pool.on_retire = _retired_by(link)
        _client_links[id(key)] = link
        weakref.finalize(key, _drop_client_link, id(key), link).atexit = False
        return link


def drop_client_link(key: Any) -> None:
    """The session `key` closed: its arenas are closed."""
    with _client_mutex:
        link = _client_links.get(id(key))
    if link is not None:
        _drop_client_link(id(key), link)


def _drop_client_link(k: int, link: SlotLink) -> None:
    with _client_mutex:
        if _client_links.get(k) is link:
            del _client_links[k]
    if link.pid == os.getpid():
        link.close()
        link.pool.close()


def _retired_by(link: SlotLink) -> Callable[[int], None]:
    ref = weakref.ref(link)

    def on_retire(arena_id: int) -> None:
        lk = ref()
        if lk is not None and arena_id in lk.announced:
            lk.announced.discard(arena_id)
            lk.notices.append((OP_RETIRE, 0, arena_id, 0, 0))
    return on_retire


# -- the manager -----------------------------------------------------------------------------

class ManagerSlots:
    """The manager's side: one pool whose slots are leased to clients, one
    link per client, and the exchange of arena descriptors."""

    def __init__(self, note: Callable[[str], None] | None = None) -> None:
        self.nonce = secrets.token_hex(8)       # this manager instance, for clients
        self.note = note or log.info
        #: one link per client session (a process may have several sessions with
        #: this manager: each has its own arenas and its own releases)
        self.links: dict[tuple[str, str], SlotLink] = {}
        self.mutex = threading.Lock()
        #: arena -> the sessions that mapped it (for retirement notices)
        self.fetched: dict[int, set[tuple[str, str]]] = {}
        self._pool: ArenaPool | None = None
        self._trimmer: threading.Thread | None = None
        self._idle_since: float | None = None
        #: times the memory of idle large traffic was given back (`server_info`)
        self.idle_trims = 0
        self.pid = os.getpid()
        _managers.add(self)
        pin_malloc()

    @property
    def pool(self) -> ArenaPool:
        pool = self._pool
        if pool is None:
            with self.mutex:
                if self._pool is None:
                    self._pool = ArenaPool(ARENA_MIN, keep_bytes=KEEP_WARM,
                                           name="procshare-slots", on_retire=self._retired)
                    self._start_trimmer()
                pool = self._pool
        return pool

    def link(self, client: str, session: str = "") -> SlotLink:
        """The link to one session of `client` (made on its first connection that
        asks for it).  Its slots are leased to the client: freed when its
        lease ends."""
        self.pool   # noqa: B018  (made first: the property takes the mutex)
        with self.mutex:
            link = self.links.get((client, session))
            if link is None:
                link = self.links[client, session] = SlotLink(self.pool, client, lend=True,
                                                              name=client)
            return link

    def exchange(self, client: str, hello: dict, fds: list[int]) -> tuple[dict, list[int]]:
        """A side connection's request: `announce` (the client's arenas, with
        their descriptors) or `fetch` (descriptors of arenas of ours in which
        the client holds a slot).  Returns `(answer, fds to send)`; SlotClaimError
        for a claim that does not hold.  Takes ownership of `fds`."""
        try:
            if hello.get("server") != self.nonce:
                raise SlotClaimError("a shared-memory request for another manager instance "
                                     "(this one restarted)")
            op = hello.get("op")
            session = str(hello.get("session", ""))[:32]
            if op == "announce":
                self._announce(client, session, hello.get("arenas"), fds)  # fds closed below
                return {"ok": True}, []
            if op == "fetch":
                return self._give(client, session, hello.get("want"))
            raise SlotClaimError(f"unknown shared-memory request {op!r:.40}")
        finally:
            for fd in fds:
                if fd >= 0:     # -1: kept by a mapping (`_announce`)
                    os.close(fd)

    def _announce(self, client: str, session: str, arenas: Any, fds: list[int]) -> None:
        if not isinstance(arenas, list) or len(arenas) != len(fds) or not fds:
            raise SlotClaimError(f"an arena announcement must pair each [id, size] with "
                                 f"one descriptor ({len(fds)} came)")
        link = self.link(client, session)
        for item, fd in zip(arenas, fds):
            if (not isinstance(item, list) or len(item) != 2
                    or not all(type(x) is int and x > 0 for x in item)):
                raise SlotClaimError(f"a bad arena announcement: {item!r:.60}")
            arena_id, size = item
            if not _sealed(fd):
                raise SlotClaimError(f"arena {arena_id} of client {client} is not sealed "
                                     "against shrinking")
            with link.lock:
                if arena_id in link.peer_arenas:
                    raise SlotClaimError(f"arena {arena_id} was announced twice")
                try:
                    m = link.peer_arenas[arena_id] = _Mapped(fd, size, keep_fd=link.lend)
                    if m.fd == fd:
                        fds[fds.index(fd)] = -1     # kept by the mapping
                except (OSError, ValueError) as e:
                    raise SlotClaimError(f"cannot map arena {arena_id}: {e}") from None

    def _give(self, client: str, session: str, want: Any) -> tuple[dict, list[int]]:
        if not isinstance(want, list) or not want or len(want) > 16:
            raise SlotClaimError(f"a bad request for arenas: {want!r:.60}")
        pool = self.pool
        arenas, fds = [], []
        try:
            with pool.mutex:
                for arena_id in want:
                    arena = pool.arenas.get(arena_id) if type(arena_id) is int else None
                    if arena is None or client not in arena.owners:
                        raise SlotClaimError(f"client {client} holds no slot in arena "
                                             f"{arena_id!r:.20}")
                    fds.append(os.dup(arena.fd))
                    arenas.append([arena_id, arena.size])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        with self.mutex:
            for arena_id, _size in arenas:
                self.fetched.setdefault(arena_id, set()).add((client, session))
        return {"ok": True, "arenas": arenas}, fds

    def _retired(self, arena_id: int) -> None:
        with self.mutex:
            keys = self.fetched.pop(arena_id, ())
            links = [self.links.get(k) for k in keys]
        for link in links:
            if link is not None:
                link.notices.append((OP_RETIRE, 0, arena_id, 0, 0))

    def client_gone(self, client: str) -> None:
        """The client's lease ended: free every slot it held, unmap its arenas,
        give the memory back."""
        with self.mutex:
            gone = [k for k in self.links if k[0] == client]
            links = [self.links.pop(k) for k in gone]
            for keys in self.fetched.values():
                keys.difference_update(gone)
        if not links:
            return
        punched = 0
        for link in links:
            # no copy is under way into a slot freed below, nor out of its arenas,
            # which outlive it only for the values stored here
            punched += link.close_and_wait(punch=True)
        if punched:
            self.note(f"gave back {punched / 2**20:.1f} MiB of client {client}'s arenas, "
                      "keeping the slots of values stored here")
        freed = self.pool.free_owner(client)
        if freed:
            self.note(f"freed {freed >> 20} MiB of shared memory client {client} held")
        malloc_trim()

    # -- giving memory back when idle ----------------------------------------------------
    def _start_trimmer(self) -> None:
        t = threading.Thread(target=self._trim_when_idle, name="procshare-trim", daemon=True)
        self._trimmer = t
        t.start()

    def _trim_when_idle(self) -> None:
        """Once large traffic stopped for `IDLE_TRIM` seconds: retire the empty
        arenas and give freed heap memory back."""
        trimmed = True
        while True:
            time.sleep(IDLE_TRIM / 2)
            if os.getpid() != self.pid:
                return
            try:
                trimmed = self._trim_once(trimmed)
            except Exception:       # this thread must go on: log, and look again later
                log.exception("giving back idle shared memory failed")

    def _trim_once(self, trimmed: bool) -> bool:
        released = _fork_holds.release_ready()
        if released:
            log.debug("released %d lent slots the forked children that held them "
                      "no longer do", released)
        with self.mutex:
            links = list(self.links.values())
        punched = sum(lk.punch_unheard() for lk in links)
        if punched:
            log.debug("gave back %.1f MiB of released slots that silent clients "
                      "have not heard of", punched / (1 << 20))
        last = max((lk.last_used for lk in links), default=0.0)
        if time.monotonic() - last < IDLE_TRIM:
            return False
        if not trimmed:
            pool = self._pool
            if pool is not None:
                pool.shrink(0)
            malloc_trim()
            self.idle_trims += 1
        return True

    def abandon_after_fork(self) -> None:
        for link in list(self.links.values()):
            link.abandon_after_fork()
        self.links = {}
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.abandon_after_fork()


_managers: weakref.WeakSet[ManagerSlots] = weakref.WeakSet()


# -- fork ------------------------------------------------------------------------------------

def _libc_mmap() -> Any:
    """libc, its `mmap` typed to take and return addresses."""
    libc = _c()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    return libc


def _privatize(mm: Any) -> tuple[int, int]:
    """Replace the shared pages under `mm` (a lent mapping or ndarray, which
    starts a page) by a private copy at the same address; returns that range
    of addresses, [start, end)."""
    n = memoryview(mm).nbytes
    size = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
    libc = _libc_mmap()
    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = _address(mm)         # (a lent array may have been made read-only since)
    tmp = libc.mmap(None, size, _PROT_RW, anon, -1, 0)
    if tmp in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    ctypes.memmove(tmp, addr, n)
    mremap = getattr(libc, "mremap", None)
    if mremap is not None:
        mremap.restype = ctypes.c_void_p
        mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_void_p]
        got = mremap(tmp, size, size, 1 | 2, addr)     # MREMAP_MAYMOVE | MREMAP_FIXED
        if got != addr:
            raise OSError(ctypes.get_errno(), "mremap")
    else:       # no mremap: fresh private pages in place, then the copy back
        got = libc.mmap(addr, size, _PROT_RW, anon | _MAP_FIXED, -1, 0)
        if got != addr:
            raise OSError(ctypes.get_errno(), "mmap")
        ctypes.memmove(addr, tmp, n)
        libc.munmap(ctypes.c_void_p(tmp), ctypes.c_size_t(size))
    return addr, addr + size


def _unshare_around(base: int, size: int, keep: list[tuple[int, int]]) -> None:
    """(a forked child) Replace the pages of the mapping at `base` outside the
    `keep` ranges (private copies already) by inaccessible anonymous ones: the
    child then shares none of the parent's memory through it.  Its address
    range stays reserved, and the mapping's object unmaps it all later."""
    libc = _libc_mmap()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
    start = base
    for lo, hi in sorted(keep) + [(base + size, base + size)]:
        if lo > start:
            if libc.mmap(start, lo - start, 0, flags, -1, 0) != start:     # PROT_NONE
                raise OSError(ctypes.get_errno(), "mmap")
        start = max(start, hi)


def _after_fork_in_child() -> None:
    kept: list[tuple[int, int]] = []
    for mm in list(_lent.values()):
        try:
            kept.append(_privatize(mm))
        except Exception as e:
            log.warning("a forked child (pid %d) could not make its own copy of an array "
                        "lent to its parent, so the two share it: a write by one is seen "
                        "by the other, and the manager may reuse the memory once the "
                        "parent drops it (%r). Copy such arrays (numpy.array(a)) before "
                        "forking.", os.getpid(), e)
    if kept:    # an arena mapped writable for them holds the rest of it: not shared either
        for whole in list(_arena_maps):
            try:
                base, size = _address(whole), len(whole)
            except (ValueError, BufferError):   # closed: nothing lent from it lives
                continue
            try:
                inside = [r for r in kept if base <= r[0] < base + size]
                if inside:
                    _unshare_around(base, size, inside)
            except Exception as e:
                log.warning("a forked child (pid %d) still maps an arena of %d bytes of "
                            "its parent's manager (%r): its arrays are its own, but that "
                            "memory is not freed until they go.", os.getpid(), size, e)
    _lent.clear()
    _lent_by_manager.clear()        # left shared (see the module's rules)
    _fork_holds.forget()
    global _client_mutex
    _client_mutex = threading.Lock()     # another thread may have held it at the fork
    global _kept_mutex
    _kept_mutex = threading.Lock()
    for link in list(_links):
        if link.pid != os.getpid():
            link.abandon_after_fork()
            if link.announce is not None:       # a client's own pool
                link.pool.abandon_after_fork()
    for ms in list(_managers):
        if ms.pid != os.getpid():
            ms.abandon_after_fork()
    _client_links.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_fork_holds.before_fork,
                        after_in_parent=_fork_holds.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
