"""Large payloads through shared memory (transport/slots.py, client/bulk.py).

Values of many sizes around the thresholds round-trip exactly, both ways,
under fork and spawn, and through TCP (the socket path); ndarrays are lent
the slot's memory, and a forked child keeps a private copy; a client killed
while uploading or holding 100 payloads of 8 MiB gives the manager's memory
back; bad slot claims close that connection with a logged reason;
PROCSHARE_SHM=none falls back to the socket with one warning.

Timings and memory figures are printed (run with -s), only memory is asserted."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import _large_workers as lw
import _workers
from _helpers import poll
from procshare.transport import shm, slots
from procshare.wire import frames

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memfd and /proc (Linux)")

MiB = 1 << 20
WAIT = 30.0


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


needs_numpy = pytest.mark.skipif(not _has_numpy(), reason="numpy is not installed")


def report(*parts) -> None:
    print("\n[large]", *parts, flush=True)


def dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def link_of(proxy):
    """The slot link of this thread's connection to the proxy's manager (None: socket)."""
    return proxy._procshare_session.thread_conn().ch.slots


@pytest.fixture
def fmgr():
    from procshare.managers import SyncManager
    with SyncManager(ctx=multiprocessing.get_context("fork")) as m:
        yield m


@pytest.fixture
def smgr(ctx):
    from procshare.managers import SyncManager
    with SyncManager(ctx=ctx) as m:
        yield m


# -- the frame format ----------------------------------------------------------------------

def test_slot_frames_parse_and_are_refused_without_the_hook():
    entries = [(frames.OP_BUFFER, frames.TYPE_BYTES, 1, 0, 70000),
               (frames.OP_RELEASE, 0, 3, 65536, 65536)]
    data = frames.encode_slot_frame(10, 7, b"body", entries, 1.5)
    seen = []

    def hook(kind, rid, budget, body, buffers, notices):
        seen.append((kind, rid, budget, bytes(body), buffers, notices))
        return kind, rid, budget, body, ("taken",)

    r = frames.FrameReader()
    r.on_slots = hook
    for i in range(len(data)):          # byte by byte: never misread
        r.feed(data[i:i + 1])
        frame = r.next_frame()
        assert (frame is None) == (i < len(data) - 1)
    assert frame[4] == ("taken",)
    kind, rid, budget, body, buffers, notices = seen[0]
    assert (kind, rid, budget, body) == (10, 7, 1.5, b"body")
    assert buffers == (frames.SlotRef(1, 0, 70000, frames.TYPE_BYTES),)
    assert notices == ((frames.OP_RELEASE, frames.SlotRef(3, 65536, 65536)),)
    plain = frames.FrameReader()        # no shared memory agreed: refused
    with pytest.raises(frames.FrameError, match="did not agree to use shared memory"):
        plain.parse(data)


def test_notice_only_frames_are_taken_and_the_next_frame_follows():
    notice = frames.encode_slot_frame(3, 0, b"", [(frames.OP_RELEASE, 0, 1, 0, 65536)])
    call = frames.pack_frame(1, 5, b"xyz")
    merged = frames.add_slot_entries(call, [(frames.OP_RELEASE, 0, 1, 65536, 65536)])
    got = []
    r = frames.FrameReader()
    r.on_slots = lambda k, rid, b, body, bufs, notes: (
        got.append(notes) or (None if k == 3 else (k, rid, b, body, bufs)))
    first = r.parse(notice + call + merged)      # the notice frame is taken on the way
    assert first[1] == 5 and bytes(first[3]) == b"xyz" and len(got) == 1
    second = r.next_frame()                      # the call, with a notice riding on it
    assert second[1] == 5 and bytes(second[3]) == b"xyz" and len(got) == 2
    assert r.next_frame() is None and not r.in_frame


@pytest.mark.parametrize("entry, words", [
    ((9, 0, 1, 0, 1), "malformed"),                      # unknown op
    ((frames.OP_BUFFER, 7, 1, 0, 1), "malformed"),       # unknown type
    ((frames.OP_RELEASE, 1, 1, 0, 1), "a notice has no type"),
    ((frames.OP_BUFFER, 0, 1, (1 << 64) - 1, 2), "overflows"),
    ((frames.OP_BUFFER, 0, 1, 0, 1 << 40), "over the"),  # over max_frame
])
def test_malformed_slot_entries_are_frame_errors(entry, words):
    lim = frames.Limits(max_frame=1 << 30)
    data = frames.encode_slot_frame(1, 1, b"", [(frames.OP_RELEASE, 0, 1, 0, 1)])
    head, table = data[:frames.HEADER.size], bytearray(data[frames.HEADER.size:])
    table[:] = frames.SLOT.pack(*entry[:2], 0, *entry[2:])
    r = frames.FrameReader(lim)
    r.on_slots = lambda *a: pytest.fail("a malformed frame reached the hook")
    with pytest.raises(frames.FrameError, match=words):
        r.parse(head + bytes(table))


# -- round trips ---------------------------------------------------------------------------

def test_values_round_trip_exactly_through_slots(fmgr):
    d = fmgr.dict()
    assert link_of(d) is not None, "a Unix-socket connection uses shared memory"
    t0 = time.perf_counter()
    assert lw.roundtrip(d) == []
    report(f"{len(lw.values())} values, both ways, in {time.perf_counter() - t0:.2f} s")
    link = link_of(d)
    assert link.pool.stats()["arenas"] >= 1 and link.peer_arenas, "slots were used"
    # nested in containers, several buffers in one frame
    big = [lw.pattern(70_000, 1), {"k": bytearray(lw.pattern(200_000, 2))},
           (memoryview(lw.pattern(3 * MiB, 3)), b"small")]
    d["nested"] = big
    got = d["nested"]
    assert got[0] == big[0] and got[1] == big[1] and got[2][1] == b"small"
    assert got[2][0].tobytes() == big[2][0].tobytes()


@pytest.mark.parametrize("how", ["inherited", "connect"])
def test_round_trips_in_child_processes(smgr, ctx, how):
    sizes = (64 * 1024 - 1, 64 * 1024, 200_000, MiB, 5 * MiB + 1)
    if how == "inherited":
        bad = _workers.run_child(ctx, lw.inherited_roundtrip, smgr.dict(), sizes, 5,
                                 timeout=120)
    else:
        bad = _workers.run_child(ctx, lw.child_roundtrip, smgr.address,
                                 bytes(smgr._authkey), sizes, 6, timeout=120)
    assert bad == []


def test_tcp_keeps_the_socket_path():
    from procshare.managers import SyncManager
    with SyncManager(address=("127.0.0.1", 0)) as m:
        d = m.dict()
        assert link_of(d) is None
        assert lw.roundtrip(d, sizes=(0, 65536, 65537, 2 * MiB + 1)) == []


def test_pipelined_calls_get_large_replies(fmgr):
    import procshare
    d = fmgr.dict()
    values = [lw.pattern(n, i) for i, n in enumerate((70_000, MiB, 3 * MiB, 100))]
    futures = [procshare.async_(d).__setitem__(i, v) for i, v in enumerate(values)]
    for f in futures:
        f.result(WAIT)
    gets = [procshare.async_(d).__getitem__(i) for i in range(len(values))] * 3
    assert [f.result(WAIT) for f in gets] == values * 3


def test_pipelined_calls_and_slot_releases_never_mix(fmgr):
    """Releases of slots ride in frames of their own between the pipeline's
    requests (never inside a batch of them), and a pipeline alone sends them."""
    import procshare
    d = fmgr.dict()
    big = lw.pattern(200_000, 7)
    d["big"] = big
    link = link_of(d)
    futures = []
    for i in range(300):
        futures.append(("big", procshare.async_(d).get("big")))
        futures += [(None, procshare.async_(d).__setitem__(i * 5 + j, j)) for j in range(5)]
    for what, f in futures:
        got = f.result(WAIT)
        if what == "big":
            assert got == big
    assert len(d) == 1 + 1500
    # a pipeline on its own, one call at a time (the idle path): releases go too
    for _ in range(50):
        assert procshare.async_(d).get("big").result(WAIT) == big
    assert len(link.notices) <= 1


def test_two_sessions_of_one_process_keep_their_slots_apart(fmgr):
    """A process may hold two sessions with one manager (per-type serializers,
    `Client()`): each has its own arenas, numbered from 1, and its own releases."""
    from procshare.client.session import Session
    from procshare.wire.kinds import Kind
    from procshare.wire.serializers import get_serializer
    d = fmgr.dict()
    other = Session(fmgr.address, bytes(fmgr._authkey), get_serializer("pickle"))
    try:
        conn = other.thread_conn()
        for i in range(20):
            mine, theirs = lw.pattern(300_000, i), lw.pattern(400_000, 100 + i)
            d["mine"] = mine
            assert conn.call(d._id, "__setitem__", ("theirs", theirs), {}, WAIT)[0] == Kind.RETURN
            assert d["theirs"] == theirs
            assert conn.call(d._id, "__getitem__", ("mine",), {}, WAIT) == (Kind.RETURN, mine)
        assert conn.ch.slots is not None and conn.ch.slots is not link_of(d)
    finally:
        other.close()
    d["after"] = lw.pattern(300_000, 99)
    assert d["after"] == lw.pattern(300_000, 99)


# -- lending -------------------------------------------------------------------------------

def _exporter(a):
    """What finally owns the memory of array `a`."""
    while True:
        nxt = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
        if nxt is None:
            return a
        a = nxt


@needs_numpy
def test_ndarrays_are_lent_and_their_slot_released_when_they_go(fmgr):
    import numpy
    d = fmgr.dict()
    d["a"] = numpy.arange(MiB, dtype=numpy.float64)      # 8 MiB
    a = d["a"]
    assert isinstance(_exporter(a), mmap.mmap), "the array is the slot's memory"
    assert a.flags.writeable and a[123] == 123.0
    link = link_of(d)
    before = len(link.notices)
    del a
    assert len(link.notices) == before + 1, "its release is queued when it goes"
    d["x"] = 1                                          # and travels on the next frame
    assert len(link.notices) == 0


@pytest.mark.parametrize("kind", ["ndarray view", "mapping"])
def test_a_lent_buffer_is_the_slots_memory_until_it_goes(kind):
    """What `SlotLink._take` lends: with numpy, a uint8 array over the peer's
    arena mapped once (from `LEND_VIEW_MIN`); without, a mapping of the slot
    alone (from `LEND_MIN`).  Either is writable, shares the slot's memory,
    and queues the slot's release when its last view goes, not before."""
    numpy = pytest.importorskip("numpy") if kind == "ndarray view" else None
    size = slots.LEND_VIEW_MIN if numpy is not None else slots.LEND_MIN
    owner = shm.ArenaPool(arena_size=2 * slots.LEND_MIN)
    link = slots.SlotLink(shm.ArenaPool(arena_size=2 * slots.LEND_MIN), "me", lend=True)
    try:
        slot = owner.alloc(size, "me")
        owner.write(slot, lw.pattern(size, 3))
        m = link.peer_arenas[slot.arena] = slots._Mapped(
            os.dup(owner.fd(slot.arena)), owner.arena_size_of(slot.arena), keep_fd=True)
        got = link._take((slot.arena, slot.offset, size, frames.TYPE_OTHER), numpy)
        assert isinstance(got, numpy.ndarray if numpy is not None else mmap.mmap)
        view = memoryview(got)
        assert not view.readonly and view.nbytes == size
        assert view[:64].tobytes() == lw.pattern(size, 3)[:64]
        view[0] = 0x77                                  # the slot's own memory
        assert owner.view(slot)[0] == 0x77
        if numpy is not None:                           # made from numpy's pickle, it
            arr = numpy.frombuffer(got, dtype=numpy.int64)  # keeps the view alive
            del got
            view.release()
            assert not link.notices, "released while an array still uses the slot"
            assert arr[:4].tobytes() == owner.view(slot)[:32].tobytes()
            del arr
        else:
            view.release()
            del got
        assert list(link.notices) == [(frames.OP_RELEASE, 0, slot.arena, slot.offset, size)]
        assert not link.lent_ranges
        del m
    finally:
        link.close()
        owner.shrink(0)
        link.pool.shrink(0)


def test_a_half_imported_numpy_is_not_used(monkeypatch):
    """Another thread still importing numpy: sys.modules holds a module that
    has no frombuffer yet.  That frame's buffers are copied, not lent."""
    import types
    half = types.ModuleType("numpy")
    half.__spec__ = types.SimpleNamespace(_initializing=True)
    monkeypatch.setitem(sys.modules, "numpy", half)
    assert slots._numpy(b"...numpy._core.numeric...") is None
    half.__spec__ = types.SimpleNamespace(_initializing=False)
    assert slots._numpy(b"") is half


@pytest.mark.parametrize("writeable", [True, False])
@needs_numpy
def test_a_lent_array_holds_its_slot_even_read_only(fmgr, writeable):
    """An array that was read-only when pickled comes back read-only: pickle
    makes a read-only memoryview of the buffer it was given, which must keep
    the lent memory alive (a memoryview slice of the arena would not)."""
    import gc

    import numpy
    d = fmgr.dict()
    value = numpy.arange(MiB // 8, dtype=numpy.float64)     # 1 MiB
    value.flags.writeable = writeable
    d["a"] = value
    got = d["a"]
    assert got.flags.writeable == writeable
    link = link_of(d)
    before = len(link.notices)
    gc.collect()
    assert len(link.notices) == before, "released while the array lives"
    assert got[-1] == MiB // 8 - 1
    del got
    assert len(link.notices) == before + 1


@needs_numpy
def test_a_closed_link_keeps_no_descriptor_for_arrays_still_lent():
    """The writable mapping of an arena outlives the link while arrays lent
    from it live: it holds no descriptor where mmap can do without (Python
    3.13), and counts against the lent-mapping cap where it cannot."""
    import numpy
    owner = shm.ArenaPool(arena_size=4 * MiB)
    link = slots.SlotLink(shm.ArenaPool(arena_size=4 * MiB), "me", lend=True)
    try:
        slot = owner.alloc(MiB, "me")
        fds = len(os.listdir("/proc/self/fd"))
        link.peer_arenas[slot.arena] = slots._Mapped(
            os.dup(owner.fd(slot.arena)), owner.arena_size_of(slot.arena), keep_fd=True)
        maps = len(slots._arena_maps)
        got = link._take((slot.arena, slot.offset, MiB, frames.TYPE_OTHER), numpy)
        assert isinstance(got, numpy.ndarray)
        assert len(slots._arena_maps) == maps + 1, "the writable mapping is not counted"
        link.close()
        extra = len(os.listdir("/proc/self/fd")) - fds
        assert extra == (0 if sys.version_info >= (3, 13) else 1), extra
        del got
        assert len(os.listdir("/proc/self/fd")) == fds
        assert len(slots._arena_maps) == maps
    finally:
        link.close()
        owner.shrink(0)
        link.pool.shrink(0)


@needs_numpy
def test_a_forked_child_shares_no_arena_with_its_parent_through_a_lent_array(fmgr):
    """The array lent to this client is a view of the manager's arena, mapped
    whole.  A forked child gets a private copy of the array, and the rest of
    that mapping is made inaccessible in the child: nothing of the manager's
    arena stays shared with it, however long it keeps the array."""
    import numpy
    d = fmgr.dict()
    d["a"] = numpy.frombuffer(lw.pattern(MiB, 4), dtype=numpy.int64).copy()
    a = d["a"]
    link = link_of(d)
    (m,) = [m for m in link.peer_arenas.values() if m.rw is not None]
    lo = slots._address(m.rw)
    fork = multiprocessing.get_context("fork")
    ok, shared = _workers.run_child(fork, lw.shared_in_range, a, 4, lo, lo + m.size,
                                    timeout=WAIT)
    assert ok, "the child's inherited array is not what was lent"
    assert shared == [], shared


@needs_numpy
def test_a_lent_arrays_slot_gives_back_its_pages_past_the_array(fmgr):
    """Slots are powers of two: a 1.25 MiB array takes a 2 MiB slot of the
    uploader's arena, which the manager then holds for as long as it keeps
    the value.  The 0.75 MiB past the array is given back at once."""
    import numpy
    d = fmgr.dict()
    link = link_of(d)
    d["a"] = numpy.ones(2 * MiB // 8)                   # a 2 MiB slot, every page used
    del d["a"]
    d["x"] = 1                                          # its release comes back
    before = _arena_bytes(link)
    value = numpy.ones(5 * MiB // 32)                   # 1.25 MiB: that slot again
    d["a"] = value
    got = d["a"]
    assert (got == value).all()
    freed = before - _arena_bytes(link)
    report(f"a lent 1.25 MiB array's 2 MiB slot: {freed >> 10} KiB of it given back")
    assert freed >= 3 * MiB // 4 - 4096, (before, _arena_bytes(link))


@needs_numpy
def test_a_manager_without_numpy_lends_the_first_array_it_receives():
    """A spawned manager has not imported numpy; the first frame whose pickle
    names numpy makes it import numpy before taking the buffers, so even the
    first array is lent, not copied."""
    import numpy

    from procshare.managers import SyncManager
    with SyncManager(ctx=multiprocessing.get_context("spawn")) as m:
        d = m.dict()
        link = link_of(d)
        held = _leased_to_manager(link)
        d["a"] = numpy.arange(MiB // 8, dtype=numpy.float64)       # 1 MiB
        assert _leased_to_manager(link) == held + MiB, "copied, not lent"
        assert d["a"][-1] == MiB // 8 - 1


def _leased_to_manager(link) -> int:
    """Bytes of this client's arenas that the manager holds (slots not yet released)."""
    pool = link.pool
    with pool.mutex:
        return sum(lease.length for arena in pool.arenas.values()
                   for lease in arena.leases.values() if lease.owner == "manager")


@needs_numpy
def test_the_manager_keeps_an_uploaded_ndarray_in_the_senders_slot(fmgr):
    import numpy
    d = fmgr.dict()
    link = link_of(d)
    held = _leased_to_manager(link)
    mine = numpy.arange(MiB, dtype=numpy.float64)      # 8 MiB
    d["a"] = mine
    assert _leased_to_manager(link) == held + 8 * MiB, "the manager did not copy it"
    mine[:] = -1                                        # my own array, not the slot
    got = d["a"]
    assert got[123] == 123.0 and got[-1] == MiB - 1
    del got
    d["small"] = numpy.arange(1000)                     # copied: released at once
    assert _leased_to_manager(link) == held + 8 * MiB
    del d["a"]                                          # the manager lets go ...
    d["x"] = 1                                          # ... its release rides on a reply
    assert _leased_to_manager(link) == held


@needs_numpy
def test_a_value_dropped_through_another_connection_is_released(fmgr):
    """The connection that stored the array keeps no reference to it between
    calls, so when another connection drops it, its slot goes back at once."""
    import threading

    import numpy
    d = fmgr.dict()
    link = link_of(d)
    held = _leased_to_manager(link)
    t = threading.Thread(target=d.__setitem__, args=("a", numpy.ones(MiB)))  # its own conn
    t.start()
    t.join(WAIT)
    assert _leased_to_manager(link) == held + 8 * MiB
    del d["a"]
    d["x"] = 1                                          # the release rides on this reply
    assert _leased_to_manager(link) == held


def _arena_bytes(link) -> int:
    """Bytes of memory behind this client's own arenas."""
    pool = link.pool
    with pool.mutex:
        ids = list(pool.arenas)
    return sum(os.fstat(pool.fd(a)).st_blocks * 512 for a in ids)


def _drop_key(d, key):
    del d[key]


@needs_numpy
def test_a_silent_uploaders_released_slot_gives_its_memory_back(fmgr):
    """Another process drops an array this client stored, and this client
    makes no call, so it does not hear the release: the manager punches the
    slot's pages within seconds anyway.  The release still comes with the
    next reply, and the slot is then reused, intact."""
    import numpy
    ctx = multiprocessing.get_context("fork")
    d = fmgr.dict()
    link = link_of(d)
    held = _leased_to_manager(link)
    d["a"] = numpy.ones(2 * MiB)                        # 16 MiB, lent from our arena
    assert _leased_to_manager(link) == held + 16 * MiB
    before = _arena_bytes(link)
    assert before >= 16 * MiB, before
    _workers.run_child(ctx, _drop_key, d, "a")
    t0 = time.monotonic()
    assert poll(lambda: _arena_bytes(link) <= before - 15 * MiB, 10, 0.05), \
        (before, _arena_bytes(link))
    report(f"a dropped 16 MiB array: its slot's memory back after "
           f"{time.monotonic() - t0:.1f} s, with its uploader silent")
    assert _leased_to_manager(link) == held + 16 * MiB     # the release is still owed
    d["x"] = 1                                          # ... and rides on this reply
    assert _leased_to_manager(link) == held
    d["b"] = numpy.arange(2 * MiB, dtype=numpy.float64)     # the slot again
    got = d["b"]
    assert got[0] == 0.0 and got[12345] == 12345.0 and got[-1] == 2 * MiB - 1


@needs_numpy
def test_an_uploaded_ndarray_outlives_the_client_that_sent_it(fmgr):
    import numpy
    ctx = multiprocessing.get_context("fork")
    box = fmgr.dict()
    progress = ctx.Queue()
    child = _workers.start_child(ctx, lw.store_array, box, "a", 8 * MiB, 5, progress)
    try:
        what, pid = progress.get(timeout=WAIT)
        assert what == "stored"
        os.kill(pid, signal.SIGKILL)
        child.process.join(WAIT)
        assert _wait_gone(fmgr, pid)
        got = box["a"]
        assert (got == numpy.frombuffer(lw.pattern(8 * MiB, 5), dtype=numpy.uint8)).all()
        box["b"] = got                                  # and it travels on, intact
        assert (box["b"] == got).all()
    finally:
        child.kill()
        progress.close()


@needs_numpy
def test_a_dead_uploaders_arenas_shrink_to_the_values_stored(fmgr):
    """An array a client stored stays in that client's arena after it dies;
    the rest of the arena is given back (here 60 of 64 MiB)."""
    import numpy
    ctx = multiprocessing.get_context("fork")
    small = slots.LEND_MIN          # the smallest array the manager maps instead of copying
    box = fmgr.dict()
    base = lw.memfd_bytes(fmgr.pid, "procshare-slots")     # the manager's own arenas
    progress = ctx.Queue()
    child = _workers.start_child(ctx, lw.store_after_big, box, 48 * MiB, small, 6, progress)
    try:
        what, pid = progress.get(timeout=WAIT)
        assert what == "stored"
        held = lw.memfd_bytes(fmgr.pid, "procshare-slots") - base   # and the child's
        assert held >= 48 * MiB, held
        os.kill(pid, signal.SIGKILL)
        child.process.join(WAIT)
        assert _wait_gone(fmgr, pid)
        # the lease ends (and the arenas shrink) once the manager sees it gone
        poll(lambda: lw.memfd_bytes(fmgr.pid, "procshare-slots") - base <= small + MiB, WAIT,
             0.05)
        after = lw.memfd_bytes(fmgr.pid, "procshare-slots") - base
        report(f"a dead uploader's arenas in the manager: {held >> 20} MiB, then "
               f"{after >> 10} KiB for the {small >> 20} MiB array it stored")
        assert after <= small + MiB, after
        got = box["a"]
        assert (got == numpy.frombuffer(lw.pattern(small, 6), dtype=numpy.uint8)).all()
        assert any("gave back" in line for line in fmgr._control("server_info")["log"])
    finally:
        child.kill()
        progress.close()


@needs_numpy
def test_a_forked_child_keeps_a_private_copy_of_lent_memory(fmgr):
    import numpy
    d = fmgr.dict()
    first = numpy.frombuffer(lw.pattern(8 * MiB, 1), dtype=numpy.int64).copy()
    d["a"] = first
    a = d["a"]
    fork = multiprocessing.get_context("fork")
    child = _workers.start_child(fork, lw.check_inherited, a, 1, gate=True)
    child.wait_ready()
    del a           # the parent lets go: the manager may reuse the slot ...
    second = numpy.frombuffer(lw.pattern(8 * MiB, 2), dtype=numpy.int64).copy()
    d["a"] = second
    held = [d["a"] for _ in range(4)]                   # ... and it does, for new data
    child.go()
    ok, _pid = child.result(WAIT)
    assert ok, "the child's inherited array changed under it"
    assert all((h == second).all() for h in held), "the parent saw the child's writes"


@needs_numpy
def test_a_child_forked_by_the_manager_keeps_what_was_lent_when_it_forked():
    """A managed object forks a child (a Pool worker would be one) while an
    array lent from this client's arena is stored; the manager then drops
    the array.  The child still reads it as it was: the slot is not released
    (so neither reused for new data nor punched) until the child has exited,
    and then it is."""
    import numpy

    from procshare.managers import SyncManager

    class KeeperManager(SyncManager):
        pass

    KeeperManager.register("Keeper", lw.ForkingKeeper)
    with KeeperManager(ctx=multiprocessing.get_context("fork")) as m:
        k = m.Keeper()
        link = link_of(k)
        held = _leased_to_manager(link)
        k.put("a", numpy.frombuffer(lw.pattern(8 * MiB, 1), dtype=numpy.int64).copy())
        assert _leased_to_manager(link) == held + 8 * MiB, "not lent: nothing to test"
        k.fork_reader("a", 1)
        k.drop("a")                                     # the manager lets go ...
        k.put("b", numpy.frombuffer(lw.pattern(8 * MiB, 2), dtype=numpy.int64).copy())
        leased = _leased_to_manager(link)
        same, got, expected = k.reader_result(WAIT)     # ... and the child reads it
        assert same, f"the forked child's array changed under it ({got} for {expected})"
        assert leased == held + 16 * MiB, \
            "the slot was released while a child forked by the manager held it"
        t0 = time.monotonic()                           # the child is gone: released
        assert poll(lambda: k.keys() == ["b"] and _leased_to_manager(link) == held + 8 * MiB,
                    WAIT, 0.05)
        report(f"a slot held by a child the manager forked: released "
               f"{time.monotonic() - t0:.1f} s after the child exited")


# -- faults --------------------------------------------------------------------------------

def _connections(manager, pid: int) -> int:
    return sum(c["connections"] for c in manager.clients() if c["pid"] == pid)


def test_a_reply_to_a_client_that_gave_up_gives_its_slots_back():
    """A client gives up on a call (Ctrl-C: its connection closes) whose reply
    is 1 MiB in the manager's shared memory.  The reply cannot be written,
    and the slots it took are free again at once; before, they stayed leased
    to the client until its lease ended."""
    from procshare.managers import SyncManager

    class BigManager(SyncManager):
        pass

    BigManager.register("BigReply", lw.BigReply)
    fork = multiprocessing.get_context("fork")
    with BigManager(ctx=fork) as m:
        s = m.BigReply()
        base = s.slots_used()
        child = _workers.start_child(fork, lw.interrupt_big_call, s, MiB)
        try:
            assert poll(s.running, WAIT)
            os.kill(child.process.pid, signal.SIGINT)
            assert poll(s.has_given_up, WAIT)
            pid = child.process.pid
            conns = _connections(m, pid)                # the one it gave up on among them
            s.release()                                 # the reply now has nowhere to go
            assert poll(lambda: _connections(m, pid) == conns - 1, WAIT, 0.05)  # tried, gone
            assert s.slots_used() == base, "the unsent reply's slots are still leased"
            s.finish()
            assert child.result(WAIT) == "interrupted"
        finally:
            child.kill()


def _wait_gone(manager, pid: int) -> bool:
    return poll(lambda: all(c["pid"] != pid for c in manager.clients()), WAIT, 0.1)


def _settled(pid: int, limit: dict, seconds: float) -> dict:
    """The manager's memory once it stops falling (at most `seconds`)."""
    end = time.monotonic() + seconds
    now = lw.status(pid)
    while time.monotonic() < end:
        if now["VmRSS"] <= limit["VmRSS"] and now["RssShmem"] <= limit["RssShmem"]:
            break
        time.sleep(0.25)
        now = lw.status(pid)
    return now


def _idle_trimmed(manager) -> None:
    """Wait until the manager has given back the memory of the large traffic
    just made (it does so once that traffic has stopped for IDLE_TRIM seconds)."""
    def trims():
        return manager._control("server_info")["idle_trims"]
    done = trims()
    assert poll(lambda: trims() > done, slots.IDLE_TRIM * 3 + 5, 0.1), \
        "the manager did not give back idle memory"


def _limits(before: dict, peak: dict) -> dict:
    return {"VmRSS": int(before["VmRSS"] * 1.10),
            "RssShmem": before["RssShmem"] + int(0.10 * max(peak["RssShmem"] - before["RssShmem"],
                                                            0))}


@pytest.mark.parametrize("when", ["uploading", "done"])
def test_a_client_killed_while_uploading_gives_memory_back(fmgr, when):
    ctx = multiprocessing.get_context("fork")
    pid = fmgr.pid
    shm_before = dev_shm()
    mine = fmgr.dict()
    mine["warm"] = lw.pattern(8 * MiB, 9)           # this process's own traffic, first
    assert mine["warm"] == lw.pattern(8 * MiB, 9)
    _idle_trimmed(fmgr)
    before = lw.status(pid)
    progress = ctx.Queue()
    child = _workers.start_child(ctx, lw.upload, fmgr.address, bytes(fmgr._authkey), 100,
                                 8 * MiB, progress)
    try:
        target = 50 if when == "uploading" else "done"
        while True:
            got = progress.get(timeout=WAIT * 4)
            if got == target:
                break
        peak = lw.status(pid)
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(WAIT)
        assert _wait_gone(fmgr, child.process.pid)
        mine["after"] = lw.pattern(3 * MiB, 4)      # other clients are unaffected
        assert mine["after"] == lw.pattern(3 * MiB, 4) and mine["warm"] == lw.pattern(8 * MiB, 9)
        _idle_trimmed(fmgr)                         # as it was when `before` was read
        limit = _limits(before, peak)
        after = _settled(pid, limit, slots.IDLE_TRIM * 3 + 5)
    finally:
        child.kill()
        progress.close()
    report(f"killed while {when}: manager VmRSS {before['VmRSS'] >> 10} MiB before, "
           f"{peak['VmRSS'] >> 10} MiB at the kill, {after['VmRSS'] >> 10} MiB after; "
           f"RssShmem {before['RssShmem'] >> 10} / {peak['RssShmem'] >> 10} / "
           f"{after['RssShmem'] >> 10} MiB")
    assert peak["VmRSS"] - before["VmRSS"] > 100 * 1024, "the uploads reached the manager"
    assert after["VmRSS"] <= limit["VmRSS"], (before, peak, after)
    assert after["RssShmem"] <= limit["RssShmem"], (before, peak, after)
    assert dev_shm() == shm_before


@needs_numpy
def test_a_client_killed_while_holding_lent_payloads_gives_memory_back(fmgr):
    import numpy
    ctx = multiprocessing.get_context("fork")
    pid = fmgr.pid
    shm_before = dev_shm()
    box = fmgr.dict()
    box["a"] = numpy.frombuffer(lw.pattern(8 * MiB, 7), dtype=numpy.uint8).copy()
    mine = box["a"]                                  # this process holds one too
    _idle_trimmed(fmgr)
    before = lw.status(pid)
    progress = ctx.Queue()
    child = _workers.start_child(ctx, lw.hold_from, box, 100, "a", progress)
    try:
        while progress.get(timeout=WAIT * 4) != 99:
            pass
        assert progress.get(timeout=WAIT)[0] == "done"
        peak = lw.status(pid)
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(WAIT)
        assert _wait_gone(fmgr, child.process.pid)
        again = box["a"]                             # other clients are unaffected
        assert (again == mine).all() and mine[5] == lw.pattern(8, 7)[5]
        del again
        box.get("nothing")                           # its release rides on this call
        _idle_trimmed(fmgr)                         # as it was when `before` was read
        limit = _limits(before, peak)
        after = _settled(pid, limit, slots.IDLE_TRIM * 3 + 5)
    finally:
        child.kill()
        progress.close()
    report(f"killed holding 100 x 8 MiB lent arrays: manager RssShmem "
           f"{before['RssShmem'] >> 10} MiB before, {peak['RssShmem'] >> 10} MiB held, "
           f"{after['RssShmem'] >> 10} MiB after; VmRSS {before['VmRSS'] >> 10} / "
           f"{peak['VmRSS'] >> 10} / {after['VmRSS'] >> 10} MiB")
    assert peak["RssShmem"] - before["RssShmem"] >= 700 * 1024, "100 slots of 8 MiB were held"
    assert after["VmRSS"] <= limit["VmRSS"], (before, peak, after)
    assert after["RssShmem"] <= limit["RssShmem"], (before, peak, after)
    assert dev_shm() == shm_before


def _raw_connection(manager):
    """A connection of this process's own, with shared memory agreed."""
    from procshare.client.session import Session
    from procshare.wire.serializers import get_serializer
    s = Session(manager.address, bytes(manager._authkey), get_serializer("pickle"))
    conn = s._open("call")
    assert conn.ch.slots is not None
    return s, conn


def _closed_with(manager, conn, words: str) -> None:
    ch = conn.ch
    ch.sock.settimeout(WAIT)
    assert ch.sock.recv(1) == b"", "the manager closed the connection"
    log = manager._control("server_info")["log"]
    assert any(words in line for line in log), log[-5:]


@pytest.mark.parametrize("claim, words", [
    ("unknown-arena", "never announced"),
    ("past-the-end", "runs past the end"),
    ("release-not-held", "not the start of a leased slot"),
])
def test_bad_slot_claims_close_that_connection(fmgr, claim, words):
    import numpy
    d = fmgr.dict()
    d["a"] = numpy.zeros(2 * MiB // 8)
    held = d["a"]                                   # a slot leased to this process
    s, conn = _raw_connection(fmgr)
    try:
        if claim == "unknown-arena":
            entries = [(frames.OP_BUFFER, 0, 77, 0, 70000)]
        elif claim == "past-the-end":
            fd, _ = shm.create_fd(4 * MiB, "procshare-test-arena")
            try:
                conn.ch.slots.announce([[901, 4 * MiB]], [fd])
            finally:
                os.close(fd)
            entries = [(frames.OP_BUFFER, 0, 901, 4 * MiB - 4096, 70000)]
        else:
            arena = next(iter(link_of(d).peer_arenas))
            entries = [(frames.OP_RELEASE, 0, arena, 4096, 65536)]
        conn.ch.sock.sendall(frames.encode_slot_frame(1, 1, b"", entries))
        _closed_with(fmgr, conn, words)
        assert (d["a"] == held).all(), "this process's other connections are unaffected"
    finally:
        conn.close()
        s.close()


def _release_foreign_slot(address, authkey, arena, offset, length) -> str:
    """In another client: claim (release) a slot leased to the parent."""
    from procshare.client.session import Session
    from procshare.wire.serializers import get_serializer
    s = Session(address, authkey, get_serializer("pickle"))
    conn = s._open("call")
    conn.ch.sock.sendall(frames.encode_slot_frame(
        1, 1, b"", [(frames.OP_RELEASE, 0, arena, offset, length)]))
    conn.ch.sock.settimeout(WAIT)
    got = conn.ch.sock.recv(1)
    s.close()
    return "closed" if got == b"" else f"got {got!r}"


@needs_numpy
def test_another_client_cannot_release_my_slot(fmgr):
    import numpy
    d = fmgr.dict()
    value = numpy.arange(slots.LEND_MIN // 8, dtype=numpy.int64)    # lent
    d["a"] = value
    held = d["a"]
    arena, offset = next(iter(link_of(d).peer_arenas)), 0
    fork = multiprocessing.get_context("fork")
    assert _workers.run_child(fork, _release_foreign_slot, fmgr.address, bytes(fmgr._authkey),
                              arena, offset, slots.LEND_MIN, timeout=WAIT) == "closed"
    log = fmgr._control("server_info")["log"]
    assert any("leased to another client" in line for line in log), log[-5:]
    assert (held == value).all() and (d["a"] == value).all()


def _round_trips_with(tmp_path, shm_method: str, check_no_link: bool) -> tuple[str, str]:
    """Round trips around the thresholds in a fresh process whose
    PROCSHARE_SHM is `shm_method`: `(number of procshare warnings, the first)`."""
    script = tmp_path / "roundtrips.py"
    script.write_text(textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from procshare.managers import SyncManager
            with SyncManager() as m:
                d = m.dict()
                for n in (70_000, 2 << 20, 9 << 20):
                    for _ in range(2):
                        v = bytes(range(256)) * (n // 256)
                        d["k"] = v
                        assert d["k"] == v
                if {check_no_link!r}:
                    assert d._procshare_session.thread_conn().ch.slots is None
        mine = [str(w.message) for w in caught if "procshare" in str(w.message)]
        print(len(mine), mine[0] if mine else "")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=_workers.subprocess_env(PROCSHARE_SHM=shm_method))
    assert out.returncode == 0, out.stderr
    count, _, text = out.stdout.strip().partition(" ")
    return count, text


def test_no_shared_memory_means_the_socket_and_one_warning(tmp_path):
    count, text = _round_trips_with(tmp_path, "none", check_no_link=True)
    assert count == "1", text
    assert "PROCSHARE_SHM=none" in text and "through the socket" in text


def test_arenas_the_manager_cannot_seal_mean_uploads_through_the_socket(tmp_path):
    """shm_open segments cannot be sealed: the manager refuses to map a client's
    (a client could shrink it under a reader).  Uploads then go through the
    socket with one warning; nothing fails."""
    count, text = _round_trips_with(tmp_path, "shm_open", check_no_link=False)
    assert count == "1", text
    assert "through the socket" in text and "sealed" in text, text


def test_arenas_are_memfds_never_in_dev_shm(fmgr):
    """A small /dev/shm (a container's 64 MiB) cannot matter: memfd segments
    are not files there.  Here: every arena is a memfd, and /dev/shm is untouched."""
    before = dev_shm()
    d = fmgr.dict()
    d["k"] = lw.pattern(96 * MiB, 3)                 # more than a container's /dev/shm
    assert d["k"] == lw.pattern(96 * MiB, 3)
    link = link_of(d)
    for arena_id in list(link.pool.arenas):
        fd = link.pool.fd(arena_id)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:procshare-slots")
    assert dev_shm() == before


def test_demo_scene(ctx):
    import io

    from procshare.cli import demo
    out = io.StringIO()
    assert demo.run(["large"], start_method=ctx.get_start_method(), out=out) == 0, \
        out.getvalue()
    text = out.getvalue()
    assert "SharedArray" in text and "stdlib" in text and "procshare" in text
