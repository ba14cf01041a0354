"""Shared memory: anonymous segments, arenas of leased slots, and passing fds.

A *segment* is an anonymous shared-memory file (Linux: `memfd_create`; macOS,
or where memfd is refused: `shm_open` of a random name, unlinked at once)
mapped into this process.  An *arena* is one segment carved into
power-of-two slots by a buddy allocator; an `ArenaPool` keeps several, warm
(pre-faulted) and reused, and leases every slot to one owner (a client id).
Descriptors travel to other processes over Unix sockets (`send_fds`,
`recv_fds`), or riding on the first bytes of a reply frame
(`send_frame_fds`, `recv_frame_fds`).

Owns: creating, sizing, mapping and pre-faulting segments
(`Segment`, `map_fd`, `populate`); the slot allocator and its leases
(`Arena`, `ArenaPool`, `Slot`); checking a peer's claim to a slot
(`SlotClaimError`); the SCM_RIGHTS helpers; and `available()`, whether this
machine can do any of it.

Rules it keeps:
- Nothing is named in /dev/shm: memfd has no name there, and the `shm_open`
  fallback unlinks its random name before `create` returns.  No resource
  tracker is involved: the kernel frees a segment's memory when its last
  descriptor is closed and its last mapping unmapped.
- A memfd segment is sealed at its size (`F_SEAL_SHRINK | F_SEAL_GROW`, where
  the kernel has seals), so a process that receives its descriptor cannot
  truncate it under the others (which would make their next access a
  SIGBUS).  `map_fd` refuses a descriptor smaller than the size it is asked
  to map.
- Fresh segments are pre-faulted when created, unless asked not to
  (`MADV_POPULATE_WRITE`, else one write of zero per page, which a fresh
  segment holds anyway); a segment received from another process is only
  ever populated with `madvise`, never written, since others may be using it.
- Slots are powers of two from `min_slot` up to the arena size, aligned to
  their size (buddy allocation: split on alloc, merge with the free buddy on
  free).  Every live slot is leased to exactly one owner; `free_owner` frees
  them all at once when that owner dies.
- A claim `(arena, offset, length)` is honoured only if it names the start of
  a live slot leased to the claimant and fits inside that slot; anything else
  raises `SlotClaimError` (a `FrameError`, so the server closes that peer's
  connection with the reason in its log).  Arena ids are never reused, so a
  claim on a retired arena fails too.
- Empty arenas are kept warm up to `keep_bytes`; an arena that empties beyond
  that budget is unmapped and closed at once (`on_retire` is told), so memory
  taken for a burst, or by a client that died, goes back to the system;
  `shrink` retires empty arenas down to any budget (an idle manager: 0).
- Descriptors received here are close-on-exec, and a truncated batch
  (`MSG_CTRUNC`) is an error, never a silent partial list.
"""

from __future__ import annotations

import array
import functools
import mmap
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ..wire.frames import FrameError

__all__ = [
    "Availability", "available", "Segment", "map_fd", "populate", "create_fd",
    "Slot", "Arena", "ArenaPool", "ArenaFull", "SlotClaimError",
    "send_fds", "recv_fds", "can_pass_fds", "WithFds", "send_frame_fds", "recv_frame_fds",
    "PAGE", "MIN_SLOT", "ARENA_SIZE",
]

PAGE = mmap.PAGESIZE
#: the smallest slot: the size above which payloads are worth a slot at all
MIN_SLOT = 64 * 1024
#: the size of a standard arena (a larger request gets an arena of its own)
ARENA_SIZE = 64 * 1024 * 1024

#: `madvise` advice that faults every page in for writing without touching data
#: (Linux 5.14; Python names it only from 3.13)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE",
                              23 if sys.platform.startswith("linux") else None)

#: environment override, for tests and odd machines: "memfd" or "shm_open" (only
#: that method), or "none" (as if neither worked)
ENV = "PROCSHARE_SHM"

_RECV_CHUNK = 64 * 1024


# -- segments ------------------------------------------------------------------------------

def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _memfd(size: int, name: str) -> int:
    flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
    fd = os.memfd_create(name, flags)
    try:
        os.ftruncate(fd, size)
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(fd: int) -> None:
    import fcntl
    seals = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
    add = getattr(fcntl, "F_ADD_SEALS", None)
    if add is None or not seals:
        return
    try:
        fcntl.fcntl(fd, add, seals | getattr(fcntl, "F_SEAL_SEAL", 0))
    except OSError:
        pass    # a kernel or filesystem without seals: the segment works unsealed


def _shm_open(size: int, name: str) -> int:
    import _posixshmem
    # a random name, unlinked at once: the descriptor is the only way in
    path = f"/{name}-{os.getpid()}-{secrets.token_hex(8)}"
    fd = _posixshmem.shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        _posixshmem.shm_unlink(path)
        os.set_inheritable(fd, False)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _methods() -> list[tuple[str, Callable[[int, str], int]]]:
    choice = os.environ.get(ENV, "").strip().lower()
    methods: list[tuple[str, Callable[[int, str], int]]] = []
    if choice in ("", "memfd") and hasattr(os, "memfd_create"):
        methods.append(("memfd", _memfd))
    if choice in ("", "shm_open"):
        methods.append(("shm_open", _shm_open))
    return methods


class Availability(NamedTuple):
    """Whether shared memory works here (`ok`), and how or why not (`reason`)."""
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@functools.lru_cache(maxsize=1)
def available() -> Availability:
    """Try each way to make a segment once (cached): `(True, "memfd")`,
    `(True, "shm_open")`, or `(False, "<one line: why>")`, so that the caller
    can warn once and use the socket path."""
    problems = []
    if os.environ.get(ENV, "").strip().lower() == "none":
        problems.append(f"disabled by {ENV}=none")
    for name, make in _methods():
        try:
            fd = make(PAGE, "procshare-probe")
        except (OSError, ImportError, AttributeError) as e:
            problems.append(f"{name}: {e}")
            continue
        try:
            with mmap.mmap(fd, PAGE) as mm:
                mm[0] = 1
        except (OSError, ValueError) as e:
            problems.append(f"{name} then mmap: {e}")
            continue
        finally:
            os.close(fd)
        return Availability(True, name)
    reason = "; ".join(problems) or "no shared-memory method on this platform"
    return Availability(False, f"no shared memory ({reason}); large data goes through "
                               "the socket")


def create_fd(size: int, name: str = "procshare") -> tuple[int, str]:
    """A new anonymous shared-memory file of `size` bytes: `(fd, method)`.
    The fd is close-on-exec and owned by the caller."""
    if size < 0:
        raise ValueError(f"a segment cannot have {size} bytes")
    if os.environ.get(ENV, "").strip().lower() == "none":
        raise OSError(available().reason)
    errors = []
    for method, make in _methods():
        try:
            return make(size, name), method
        except (OSError, ImportError, AttributeError) as e:
            errors.append(f"{method}: {e}")
    raise OSError("cannot create shared memory: " + ("; ".join(errors) or "no method"))


def populate(mm: mmap.mmap) -> bool:
    """Fault every page of `mm` in for writing without changing any byte
    (`MADV_POPULATE_WRITE`); False where the kernel or platform cannot."""
    if MADV_POPULATE_WRITE is None or len(mm) == 0:
        return False
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _prefault_fresh(mm: mmap.mmap) -> None:
    """Pre-fault a segment nobody else uses yet: `populate`, else one write per
    page (of zero, which a fresh segment holds)."""
    if populate(mm):
        return
    for off in range(0, len(mm), PAGE):
        mm[off] = 0


def map_fd(fd: int, size: int, *, prefault: bool = True) -> mmap.mmap:
    """Map `size` bytes of the shared-memory file `fd` (read-write, shared).
    The mapping keeps its own reference: the caller may close `fd` after.
    Refuses a file smaller than `size`, which would fault on access."""
    actual = os.fstat(fd).st_size
    if size <= 0 or actual < size:
        raise ValueError(f"cannot map {size} bytes of a shared-memory file of {actual} bytes")
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if prefault:
        populate(mm)    # never writes: other processes may be using the segment
    return mm


class Segment:
    """One anonymous shared-memory file and (optionally) its mapping here."""

    __slots__ = ("fd", "size", "mm", "method", "__weakref__")

    def __init__(self, fd: int, size: int, mm: mmap.mmap | None, method: str) -> None:
        self.fd = fd
        self.size = size
        self.mm = mm
        self.method = method

    @classmethod
    def create(cls, size: int, name: str = "procshare", *, prefault: bool = True,
               keep_mapped: bool = True) -> Segment:
        """A new segment of `size` bytes, rounded up to whole pages (at least
        one), pre-faulted; unmapped again unless `keep_mapped` (its pages stay
        in the file)."""
        size = max(_round_up(size, PAGE), PAGE)
        fd, method = create_fd(size, name)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if prefault:
                _prefault_fresh(mm)
            if not keep_mapped:
                mm.close()
                mm = None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, mm, method)

    def view(self) -> memoryview:
        if self.mm is None:
            raise ValueError("this segment is not mapped in this process")
        return memoryview(self.mm)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Unmap (if no buffer still uses the mapping) and close the descriptor."""
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass    # a view still uses it: it is unmapped when that goes
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # the descriptor only: a mapping still in use closes itself when it goes
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self.fd}"
        return f"<Segment {self.size} bytes ({self.method}), {state}>"


# -- arenas --------------------------------------------------------------------------------

class Slot(NamedTuple):
    """A piece of an arena: `length` bytes at `offset` of arena number `arena`."""
    arena: int
    offset: int
    length: int


class SlotClaimError(FrameError):
    """A peer named memory that is not a slot it holds (or holds no more)."""


class ArenaFull(MemoryError):
    """No free slot is large enough in this arena."""


class _Lease:
    __slots__ = ("owner", "order", "length")

    def __init__(self, owner: str, order: int, length: int) -> None:
        self.owner = owner
        self.order = order
        self.length = length


class Arena:
    """One segment carved into power-of-two slots (a buddy allocator).

    A slot of order k is `min_slot << k` bytes at an offset that is a multiple
    of its size.  `alloc` takes the smallest free block that fits and splits
    it; `free` merges a block with its buddy while the buddy is free."""

    def __init__(self, arena_id: int, size: int, min_slot: int = MIN_SLOT, *,
                 name: str = "procshare-arena", prefault: bool = True) -> None:
        if min_slot < PAGE or min_slot & (min_slot - 1):
            raise ValueError(f"min_slot must be a power of two of at least {PAGE}, "
                             f"not {min_slot}")
        if size < min_slot or size & (size - 1):
            raise ValueError(f"an arena's size must be a power of two of at least "
                             f"{min_slot}, not {size}")
        self.id = arena_id
        self.size = size
        self.min_slot = min_slot
        self.top = (size // min_slot).bit_length() - 1     # the order of the whole arena
        self.segment = Segment.create(size, f"{name}-{arena_id}", prefault=prefault)
        self.whole = self.segment.view()                  # sliced for every slot
        self._free: list[set[int]] = [set() for _ in range(self.top + 1)]
        self._free[self.top].add(0)
        self.leases: dict[int, _Lease] = {}                # offset -> lease
        self.owners: dict[str, set[int]] = {}              # owner -> offsets
        self.used = 0                                      # bytes in leased slots

    @property
    def fd(self) -> int:
        return self.segment.fd

    def order_for(self, nbytes: int) -> int:
        """The order of the smallest slot that holds `nbytes`."""
        blocks = max(-(-nbytes // self.min_slot), 1)
        return (blocks - 1).bit_length()

    def alloc(self, nbytes: int, owner: str) -> Slot:
        """Lease a slot of at least `nbytes` to `owner`; ArenaFull if none fits."""
        order = self.order_for(nbytes)
        if order > self.top:
            raise ArenaFull(f"{nbytes} bytes do not fit an arena of {self.size}")
        j = order
        while j <= self.top and not self._free[j]:
            j += 1
        if j > self.top:
            raise ArenaFull(f"no free slot of {self.min_slot << order} bytes in arena {self.id}")
        offset = min(self._free[j])
        self._free[j].discard(offset)
        while j > order:       # split: keep the lower half, free the upper
            j -= 1
            self._free[j].add(offset + (self.min_slot << j))
        self.leases[offset] = _Lease(owner, order, nbytes)
        self.owners.setdefault(owner, set()).add(offset)
        self.used += self.min_slot << order
        return Slot(self.id, offset, nbytes)

    def lease(self, slot: Slot, owner: str) -> _Lease:
        """The lease behind a claim, checked (see `SlotClaimError`)."""
        arena, offset, length = slot
        if arena != self.id:
            raise SlotClaimError(f"slot {tuple(slot)} is not in arena {self.id}")
        if not (isinstance(offset, int) and isinstance(length, int)):
            raise SlotClaimError(f"slot {tuple(slot)!r}: offset and length must be ints")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SlotClaimError(f"slot {tuple(slot)} is outside arena {self.id} "
                                 f"({self.size} bytes)")
        lease = self.leases.get(offset)
        if lease is None:
            raise SlotClaimError(f"slot {tuple(slot)}: offset {offset} of arena {self.id} "
                                 "is not the start of a leased slot")
        if lease.owner != owner:
            raise SlotClaimError(f"slot {tuple(slot)} is leased to another client, "
                                 f"not {owner!r}")
        if length > self.min_slot << lease.order:
            raise SlotClaimError(f"slot {tuple(slot)}: {length} bytes overrun the slot "
                                 f"of {self.min_slot << lease.order}")
        return lease

    def free(self, slot: Slot, owner: str) -> int:
        """Give a slot back (its owner must say so); return the bytes freed."""
        self.lease(slot, owner)
        return self._release(slot.offset)

    def _release(self, offset: int) -> int:
        lease = self.leases.pop(offset)
        offsets = self.owners[lease.owner]
        offsets.discard(offset)
        if not offsets:
            del self.owners[lease.owner]
        order = lease.order
        freed = self.min_slot << order
        self.used -= freed
        while order < self.top:        # merge with the buddy while it is free
            buddy = offset ^ (self.min_slot << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)
            offset = min(offset, buddy)
            order += 1
        self._free[order].add(offset)
        return freed

    def free_owner(self, owner: str) -> int:
        """Free every slot leased to `owner`; return the bytes freed."""
        return sum(self._release(off) for off in sorted(self.owners.get(owner, ())))

    def transfer(self, slot: Slot, owner: str, new_owner: str) -> None:
        """Move a slot's lease from `owner` to `new_owner` (e.g. to the server,
        once a payload is stored)."""
        lease = self.lease(slot, owner)
        offsets = self.owners[owner]
        offsets.discard(slot.offset)
        if not offsets:
            del self.owners[owner]
        lease.owner = new_owner
        self.owners.setdefault(new_owner, set()).add(slot.offset)

    def view(self, slot: Slot) -> memoryview:
        """The `slot.length` bytes of a slot (no ownership check)."""
        return self.whole[slot.offset:slot.offset + slot.length]

    @property
    def empty(self) -> bool:
        return not self.leases

    def close(self) -> None:
        self.whole.release()
        self.segment.close()

    def __repr__(self) -> str:
        return (f"<Arena {self.id}: {self.size} bytes, {self.used} leased in "
                f"{len(self.leases)} slots>")


class ArenaPool:
    """The arenas of one process (a manager): slots for any owner, arenas
    created on demand, kept warm, and retired when idle beyond `keep_bytes`.

    A request larger than `arena_size` gets an arena of its own (the next
    power of two).  `max_bytes` caps the total mapped (MemoryError beyond)."""

    def __init__(self, arena_size: int = ARENA_SIZE, min_slot: int = MIN_SLOT, *,
                 keep_bytes: int | None = None, max_bytes: int | None = None,
                 name: str = "procshare-arena", prefault: bool = True,
                 on_retire: Callable[[int], None] | None = None) -> None:
        if arena_size < min_slot or arena_size & (arena_size - 1):
            raise ValueError(f"arena_size must be a power of two of at least {min_slot}")
        self.arena_size = arena_size
        self.min_slot = min_slot
        self.keep_bytes = arena_size if keep_bytes is None else keep_bytes
        self.max_bytes = max_bytes
        self.name = name
        self.prefault = prefault
        self.on_retire = on_retire
        self.arenas: dict[int, Arena] = {}
        self.mutex = threading.Lock()
        self._next_id = 1

    # -- allocation --------------------------------------------------------------------
    def alloc(self, nbytes: int, owner: str) -> Slot:
        """Lease a slot of at least `nbytes` bytes to `owner`."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes!r} bytes")
        with self.mutex:
            for arena in self.arenas.values():
                try:
                    return arena.alloc(nbytes, owner)
                except ArenaFull:
                    continue
            arena = self._new_arena(nbytes)
            return arena.alloc(nbytes, owner)

    def _new_arena(self, nbytes: int) -> Arena:
        size = self.arena_size
        while size < nbytes:
            size <<= 1
        if self.max_bytes is not None and self.mapped + size > self.max_bytes:
            raise MemoryError(f"shared-memory arenas would exceed {self.max_bytes} bytes "
                              f"({self.mapped} mapped, {size} more needed)")
        arena = Arena(self._next_id, size, self.min_slot, name=self.name,
                      prefault=self.prefault)
        self._next_id += 1
        self.arenas[arena.id] = arena
        return arena

    def free(self, slot: Slot, owner: str) -> int:
        """Give back a slot `owner` holds (SlotClaimError if it holds no such slot)."""
        with self.mutex:
            arena = self._arena(slot)
            freed = arena.free(slot, owner)
            retired = self._maybe_retire(arena)
        self._tell(retired)
        return freed

    def free_owner(self, owner: str) -> int:
        """Free every slot of `owner` (a client that died or is done): the bytes freed."""
        retired: list[int] = []
        freed = 0
        with self.mutex:
            for arena in list(self.arenas.values()):
                if owner in arena.owners:
                    freed += arena.free_owner(owner)
                    retired += self._maybe_retire(arena)
        self._tell(retired)
        return freed

    def transfer(self, slot: Slot, owner: str, new_owner: str) -> None:
        with self.mutex:
            self._arena(slot).transfer(slot, owner, new_owner)

    # -- claims ------------------------------------------------------------------------
    def _arena(self, slot: Any) -> Arena:
        try:
            arena_id = slot[0]
            if len(slot) != 3:
                raise ValueError
        except (TypeError, ValueError, IndexError):
            raise SlotClaimError(f"a slot claim must be (arena, offset, length), "
                                 f"not {slot!r:.80}") from None
        arena = self.arenas.get(arena_id) if isinstance(arena_id, int) else None
        if arena is None:
            raise SlotClaimError(f"slot {slot!r:.80}: there is no arena {arena_id!r:.20}")
        return arena

    def check(self, slot: Any, owner: str) -> memoryview:
        """The bytes of a slot `owner` claims, after checking the claim: it must
        name the start of a live slot leased to `owner`, and fit inside it."""
        with self.mutex:
            arena = self._arena(slot)
            arena.lease(Slot(*slot), owner)
            return arena.view(Slot(*slot))

    def view(self, slot: Slot) -> memoryview:
        """A slot's bytes, without an ownership check (the server's own slots)."""
        with self.mutex:
            return self._arena(slot).view(slot)

    def write(self, slot: Slot, data: Any) -> None:
        """Copy `data` into a slot this process holds leased (no lock: an arena
        with a leased slot is never retired)."""
        self.arenas[slot.arena].whole[slot.offset:slot.offset + slot.length] = data

    def fd(self, arena_id: int) -> int:
        with self.mutex:
            return self.arenas[arena_id].fd

    def arena_size_of(self, arena_id: int) -> int:
        with self.mutex:
            return self.arenas[arena_id].size

    # -- retiring ----------------------------------------------------------------------
    def _maybe_retire(self, arena: Arena) -> list[int]:
        if not arena.empty:
            return []
        if len(self.arenas) == 1 and arena.size <= self.keep_bytes:
            return []       # the common case, without a sum over the arenas
        idle = sum(a.size for a in self.arenas.values() if a.empty)
        if idle <= self.keep_bytes:
            return []
        del self.arenas[arena.id]
        arena.close()
        return [arena.id]

    def shrink(self, keep_bytes: int = 0) -> list[int]:
        """Retire empty arenas until at most `keep_bytes` of them stay (the
        largest go first); return the ids retired."""
        retired = []
        with self.mutex:
            empty = sorted((a for a in self.arenas.values() if a.empty),
                           key=lambda a: a.size, reverse=True)
            idle = sum(a.size for a in empty)
            for arena in empty:
                if idle <= keep_bytes:
                    break
                del self.arenas[arena.id]
                arena.close()
                idle -= arena.size
                retired.append(arena.id)
        self._tell(retired)
        return retired

    def abandon_after_fork(self) -> None:
        """In a forked child: close this process's copies of the parent's
        arenas (descriptors and mappings) without touching its leases."""
        arenas, self.arenas = list(self.arenas.values()), {}
        self.mutex = threading.Lock()       # another thread may have held it at the fork
        self.on_retire = None
        for arena in arenas:
            arena.close()

    def _tell(self, retired: Iterable[int]) -> None:
        if self.on_retire is not None:
            for arena_id in retired:
                self.on_retire(arena_id)

    # -- accounting ----------------------------------------------------------------------
    @property
    def mapped(self) -> int:
        """Bytes of all arenas (what this pool holds of the machine's memory)."""
        return sum(a.size for a in self.arenas.values())

    @property
    def used(self) -> int:
        """Bytes in leased slots."""
        return sum(a.used for a in self.arenas.values())

    def held_by(self, owner: str) -> list[Slot]:
        with self.mutex:
            return [Slot(a.id, off, a.leases[off].length)
                    for a in self.arenas.values() for off in sorted(a.owners.get(owner, ()))]

    def stats(self) -> dict:
        with self.mutex:
            return {"arenas": len(self.arenas), "mapped": self.mapped, "used": self.used,
                    "slots": sum(len(a.leases) for a in self.arenas.values()),
                    "owners": len({o for a in self.arenas.values() for o in a.owners})}

    def close(self) -> None:
        with self.mutex:
            arenas, self.arenas = list(self.arenas.values()), {}
        for arena in arenas:
            arena.close()


# -- passing descriptors -------------------------------------------------------------------

def can_pass_fds(sock_or_channel: Any) -> bool:
    """True if descriptors can travel on this socket (a Unix socket)."""
    sock = getattr(sock_or_channel, "sock", sock_or_channel)
    return getattr(sock, "family", None) == socket.AF_UNIX


def send_fds(sock: socket.socket, fds: Iterable[int], data: bytes = b"F") -> None:
    """Send `data` (at least one byte) with the descriptors `fds` attached."""
    if not data:
        raise ValueError("descriptors must ride on at least one byte")
    socket.send_fds(sock, [data], list(fds))


def recv_fds(sock: socket.socket, maxfds: int, bufsize: int = 1) -> tuple[bytes, list[int]]:
    """Receive up to `bufsize` bytes and the descriptors attached to them:
    `(data, fds)`.  The fds are close-on-exec and the caller's to close.
    EOFError at end of stream; OSError if more than `maxfds` came."""
    data, fds, flags, _addr = socket.recv_fds(sock, bufsize, maxfds)
    for fd in fds:
        os.set_inheritable(fd, False)
    if flags & getattr(socket, "MSG_CTRUNC", 0):
        _close_all(fds)
        raise OSError(f"more than {maxfds} file descriptors arrived; they were refused")
    if not data:
        _close_all(fds)
        raise EOFError("connection closed by peer")
    return data, fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class WithFds:
    """A reply value with descriptors to send along (the server sends the
    frame with `send_frame_fds`, then `close()`s these, its own duplicates)."""

    __slots__ = ("value", "fds")

    def __init__(self, value: Any, fds: Iterable[int], *, dup: bool = True) -> None:
        self.value = value
        self.fds = [os.dup(fd) for fd in fds] if dup else list(fds)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        _close_all(fds)

    def __del__(self) -> None:     # a reply never sent (e.g. to a oneway request)
        self.close()

    def __repr__(self) -> str:
        return f"WithFds({self.value!r}, {len(self.fds)} fds)"


def send_frame_fds(ch: Any, pieces: list, fds: Iterable[int]) -> None:
    """Write one encoded frame (`frames.encode_frame`'s list) on channel `ch`
    with `fds` attached to its first bytes (one `sendmsg`, then the rest)."""
    fds = list(fds)
    sock = ch.sock
    ch.flush()          # replies it held back go first (and are not being written now)
    if not fds:
        ch.send(pieces)
        return
    first = memoryview(pieces[0]).cast("B")
    sent = sock.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < first.nbytes:
        sock.sendall(first[sent:])
    if len(pieces) > 1:
        ch.send(list(pieces[1:]))


def recv_frame_fds(ch: Any, deadline: float | None = None, maxfds: int = 4) -> tuple:
    """Read one frame from channel `ch` whose first bytes may carry descriptors:
    `(kind, rid, budget, body, buffers, fds)`.

    The channel must hold no buffered bytes (descriptors ride on the first byte
    of the frame, and a plain receive would have dropped them): a RuntimeError
    otherwise.  On any error the fds received so far are closed, and the
    channel must be closed too (the frame is out of step)."""
    reader = ch.reader
    if reader.in_frame:
        raise RuntimeError("bytes of an earlier frame are buffered: descriptors attached "
                           "to this one may have been dropped")
    ch._wait(deadline)
    fds: list[int] = []
    try:
        data, fds = recv_fds(ch.sock, maxfds, _RECV_CHUNK)
        reader.feed(data)
        frame = reader.next_frame()
        if frame is None:
            frame = ch._recv_rest(deadline)
    except BaseException:
        _close_all(fds)
        raise
    return (*frame, fds)
