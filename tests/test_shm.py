"""Shared memory: memfd arenas and their leases, passing descriptors, the
manager-side SharedBlock with a test server, SharedArray side by side with
multiprocessing.Array, and (once SyncManager has them) the manager's
SharedArray and ndarray across processes.

Timings are printed (run with -s to see them), never asserted."""

from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import _shm_workers as sw
import _workers
from _helpers import poll
from procshare.client import sharedarray as sa
from procshare.transport import shm
from procshare.wire.frames import FrameError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memfd tests read /proc (Linux)")

MiB = 1 << 20
WAIT = 15.0


def report(*parts) -> None:
    print("\n[shm]", *parts, flush=True)


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.fixture
def fresh_availability():
    shm.available.cache_clear()
    yield
    shm.available.cache_clear()


# -- segments ----------------------------------------------------------------------------

def test_memfd_is_available_here():
    ok = shm.available()
    assert ok and ok.reason == "memfd", ok


def test_segments_are_memfds_sealed_and_nowhere_in_dev_shm():
    before = shm_entries()
    seg = shm.Segment.create(3 * shm.PAGE + 1, "procshare-test")
    try:
        assert seg.size == 4 * shm.PAGE and seg.method == "memfd"
        assert os.readlink(f"/proc/self/fd/{seg.fd}").startswith("/memfd:procshare-test")
        assert not os.get_inheritable(seg.fd)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 0)        # sealed: nobody can shrink it under the others
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 1 << 30)
        seg.view()[:5] = b"hello"
        mm = shm.map_fd(seg.fd, seg.size)   # a second mapping sees the same bytes
        assert mm[:5] == b"hello"
        mm.close()
        with pytest.raises(ValueError, match="cannot map"):
            shm.map_fd(seg.fd, seg.size + shm.PAGE)
        assert shm_entries() == before
    finally:
        fd = seg.fd
        seg.close()
    assert seg.closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_shm_open_fallback_leaves_no_name(monkeypatch, fresh_availability):
    monkeypatch.setenv(shm.ENV, "shm_open")
    before = shm_entries()
    assert shm.available() == (True, "shm_open")
    seg = shm.Segment.create(MiB)
    try:
        assert seg.method == "shm_open"
        assert "/dev/shm/procshare" in os.readlink(f"/proc/self/fd/{seg.fd}")
        assert "(deleted)" in os.readlink(f"/proc/self/fd/{seg.fd}")
        assert shm_entries() == before
        seg.view()[-1] = 5
    finally:
        seg.close()


def test_no_shared_memory_means_a_one_line_reason(monkeypatch, fresh_availability):
    from procshare.server.sharedarray import SharedBlock
    monkeypatch.setenv(shm.ENV, "none")
    ok = shm.available()
    assert not ok and "\n" not in ok.reason and "socket" in ok.reason
    with pytest.raises(OSError):
        shm.create_fd(shm.PAGE)
    with pytest.raises(OSError, match="SharedArray needs shared memory"):
        SharedBlock(100)


# -- arenas --------------------------------------------------------------------------------

def test_buddy_slots_split_merge_and_are_reused():
    arena = shm.Arena(1, 1 * MiB, 64 * 1024)
    try:
        a = arena.alloc(100, "c1")                  # 64 KiB
        b = arena.alloc(64 * 1024 + 1, "c1")        # 128 KiB, aligned to 128 KiB
        c = arena.alloc(64 * 1024, "c2")            # the buddy of a
        assert (a.offset, b.offset, c.offset) == (0, 128 * 1024, 64 * 1024)
        assert a.length == 100 and arena.used == 256 * 1024
        with pytest.raises(shm.ArenaFull):
            arena.alloc(1 * MiB, "c3")
        assert arena.free(a, "c1") == 64 * 1024
        assert arena.alloc(10, "c3").offset == 0     # reused at once
        assert arena.free_owner("c1") == 128 * 1024
        assert arena.free_owner("c3") == 64 * 1024
        assert arena.free_owner("c2") == 64 * 1024
        assert arena.empty and arena.used == 0
        whole = arena.alloc(1 * MiB, "c4")           # everything merged back
        assert whole == shm.Slot(1, 0, 1 * MiB)
    finally:
        arena.close()


def test_freed_blocks_merge_so_larger_slots_still_fit():
    """A freed block merges with its free buddy at once, so what is free stays
    in the largest blocks it can: a larger slot fits wherever the free memory
    allows, and a pool grows no arena for it.  (A lazy merge, tried as a
    speed-up, failed the two placements below: taking a block whose buddy was
    free, or splitting a larger block while two free buddies waited.)"""
    import random
    K64 = 64 * 1024
    arena = shm.Arena(1, 16 * K64, K64)
    try:
        slots = [arena.alloc(K64, "c") for _ in range(16)]
        for i in (0, 1, 5):
            arena.free(slots[i], "c")
        assert arena.alloc(K64, "c").offset == 5 * K64      # not 0, whose buddy is free
        assert arena.alloc(2 * K64, "c").offset == 0
    finally:
        arena.close()
    arena = shm.Arena(2, 8 * K64, K64)
    try:
        slots = [arena.alloc(K64, "c") for _ in range(4)]
        for s in slots[:2]:
            arena.free(s, "c")
        assert arena.alloc(2 * K64, "c").offset == 0        # the two free buddies
        assert arena.alloc(4 * K64, "c").offset == 4 * K64  # the upper half, whole
    finally:
        arena.close()
    rng = random.Random(7)
    pool = shm.ArenaPool(arena_size=1 * MiB, min_slot=K64)
    try:
        small = [pool.alloc(K64, "c") for _ in range(16)]     # the arena, full
        assert {s.arena for s in small} == {1}
        for s in small[::2] + small[1::2]:                    # freed apart
            pool.free(s, "c")
        assert pool.alloc(512 * 1024, "c") == shm.Slot(1, 0, 512 * 1024)
        assert list(pool.arenas) == [1]
        pool.free_owner("c")
        for _ in range(200):
            live = []
            for _ in range(rng.randint(1, 12)):
                try:
                    live.append(pool.alloc(rng.choice((1, K64 + 1, 200_000)), "c"))
                except MemoryError:
                    break
            spans = sorted((s.arena, s.offset, s.offset + (K64 << pool.arenas[
                s.arena].order_for(s.length))) for s in live)
            assert all(a[0] != b[0] or a[2] <= b[1]                        # no overlap
                       for a, b in zip(spans, spans[1:]))
            for s in rng.sample(live, len(live)):
                pool.free(s, "c")
        (kept,) = pool.arenas
        assert pool.alloc(1 * MiB, "c") == shm.Slot(kept, 0, 1 * MiB)    # whole again
        assert list(pool.arenas) == [kept]
    finally:
        pool.close()


def test_pool_leases_grows_and_retires_arenas():
    retired = []
    pool = shm.ArenaPool(arena_size=1 * MiB, min_slot=64 * 1024, on_retire=retired.append)
    try:
        slots = [pool.alloc(512 * 1024, f"c{i % 2}") for i in range(4)]   # two arenas
        big = pool.alloc(3 * MiB, "c0")                                  # one of its own
        assert pool.stats() == {"arenas": 3, "mapped": 6 * MiB, "used": 6 * MiB,
                                "slots": 5, "owners": 2}
        assert big.arena == 3 and pool.arena_size_of(3) == 4 * MiB
        assert {s.arena for s in slots} == {1, 2}
        assert pool.held_by("c1") == [slots[1], slots[3]]
        assert pool.free_owner("c0") == 5 * MiB
        # arena 3 emptied beyond keep_bytes (one arena): retired; arenas 1, 2 hold c1
        assert retired == [3] and pool.stats()["arenas"] == 2
        assert pool.free_owner("c1") == 1 * MiB
        # arena 1 empty and kept warm; arena 2 empty beyond the budget: retired
        assert pool.stats() == {"arenas": 1, "mapped": 1 * MiB, "used": 0, "slots": 0,
                                "owners": 0}
        assert retired == [3, 2]
        again = pool.alloc(100, "c2")
        assert again.arena not in retired            # ids are never reused
        with pytest.raises(MemoryError):
            shm.ArenaPool(arena_size=1 * MiB, max_bytes=1 * MiB).alloc(2 * MiB, "x")
    finally:
        pool.close()


def test_transfer_moves_a_lease():
    pool = shm.ArenaPool(arena_size=1 * MiB)
    try:
        s = pool.alloc(1000, "client")
        pool.check(s, "client")[:4] = b"data"
        pool.transfer(s, "client", "@server")
        with pytest.raises(shm.SlotClaimError):
            pool.check(s, "client")
        assert bytes(pool.check(s, "@server")[:4]) == b"data"
        assert pool.free_owner("client") == 0
        assert pool.free(s, "@server") == shm.MIN_SLOT
    finally:
        pool.close()


@pytest.mark.parametrize(("claim", "owner", "words"), [
    ((9, 0, 10), "me", "no arena 9"),
    ((1, 0, 10), "other", "leased to another client"),
    ((1, 4096, 10), "me", "not the start of a leased slot"),
    ((1, 128 * 1024, 10), "me", "not the start"),                   # free space
    ((1, 0, 64 * 1024 + 1), "me", "overrun the slot"),
    ((1, 1 * MiB - 10, 20), "me", "outside arena"),
    ((1, -1, 10), "me", "outside arena"),
    ((1, 0, -1), "me", "outside arena"),
    ((1, 0.0, 10), "me", "must be ints"),
    (("1", 0, 10), "me", "no arena"),
    ((1, 0), "me", r"must be \(arena, offset, length\)"),
    (None, "me", r"must be \(arena, offset, length\)"),
])
def test_bad_claims_are_refused_with_a_reason(claim, owner, words):
    pool = shm.ArenaPool(arena_size=1 * MiB)
    try:
        mine = pool.alloc(100, "me")
        assert mine == (1, 0, 100)
        pool.alloc(100, "other")
        with pytest.raises(shm.SlotClaimError, match=words) as info:
            pool.check(claim, owner)
        assert isinstance(info.value, FrameError)   # the server closes such a connection
        assert len(pool.check(mine, "me")) == 100
        assert len(pool.check((1, 0, 64 * 1024), "me")) == 64 * 1024
    finally:
        pool.close()


def test_freed_slot_claims_are_refused():
    pool = shm.ArenaPool(arena_size=1 * MiB)
    try:
        s = pool.alloc(100, "me")
        pool.free(s, "me")
        with pytest.raises(shm.SlotClaimError):
            pool.check(s, "me")
        with pytest.raises(shm.SlotClaimError):
            pool.free(s, "me")
    finally:
        pool.close()


# -- passing descriptors ---------------------------------------------------------------------

def test_fd_passing_between_processes(ctx):
    size = 4 * MiB
    seg = shm.Segment.create(size)
    seg.view()[:size // 2] = sw.pattern(size // 2)
    mine, theirs = socket.socketpair()
    try:
        child = _workers.start_child(ctx, sw.fd_child, theirs, size)
        theirs.close()
        shm.send_fds(mine, [seg.fd], b"segment!")
        assert sw.recv_exact(mine, 1) == b"Y"
        assert child.result(WAIT) == "mapped"
        assert seg.mm[size // 2:] == sw.pattern(size - size // 2, salt=7)
    finally:
        mine.close()
        seg.close()


def test_descriptors_ride_on_a_frame():
    from procshare.transport.channel import Channel
    from procshare.wire.frames import encode_frame
    from procshare.wire.kinds import Kind
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    seg = shm.Segment.create(shm.PAGE)
    try:
        reply = shm.WithFds({"size": shm.PAGE}, [seg.fd])
        assert reply.fds[0] != seg.fd                      # a duplicate, closed after sending
        shm.send_frame_fds(sender, encode_frame(Kind.RETURN, 7, pickle.dumps(reply.value)),
                           reply.fds)
        reply.close()
        big = os.urandom(200_000)                          # a frame with buffers, fds on it
        shm.send_frame_fds(sender, encode_frame(Kind.RETURN, 8, b"body", [big]), [seg.fd])
        sender.send(encode_frame(Kind.RETURN, 9, b"plain"))
        kind, rid, _b, body, _bufs, fds = shm.recv_frame_fds(receiver, time.monotonic() + 5)
        assert (kind, rid, pickle.loads(body), len(fds)) == (Kind.RETURN, 7,
                                                             {"size": shm.PAGE}, 1)
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:procshare")
        os.close(fds[0])
        _k, rid, _b, body, bufs, fds = shm.recv_frame_fds(receiver, time.monotonic() + 5)
        assert (rid, bytes(body), bytes(bufs[0]) == big, len(fds)) == (8, b"body", True, 1)
        os.close(fds[0])
        _k, rid, _b, body, _bufs, fds = shm.recv_frame_fds(receiver, time.monotonic() + 5)
        assert (rid, bytes(body), fds) == (9, b"plain", [])
        sender.send(encode_frame(Kind.RETURN, 10, b"x") + encode_frame(Kind.RETURN, 11, b"y"))
        receiver.recv_frame(time.monotonic() + 5)
        if receiver.reader.in_frame:        # the second frame came in the same read
            with pytest.raises(RuntimeError, match="buffered"):
                shm.recv_frame_fds(receiver, time.monotonic() + 5)
        quiet, other = socket.socketpair()
        with pytest.raises(TimeoutError):
            shm.recv_frame_fds(Channel(quiet), time.monotonic() + 0.05)
        quiet.close()
        other.close()
    finally:
        seg.close()
        sender.close()
        receiver.close()


def test_too_many_descriptors_are_refused():
    a, b = socket.socketpair()
    with a, b:
        fds = [os.dup(0) for _ in range(3)]
        shm.send_fds(a, fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(OSError, match="more than 1"):
            shm.recv_fds(b, maxfds=1)
        a.close()
        with pytest.raises(EOFError):
            shm.recv_fds(b, maxfds=1)


# -- a frame that never left ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["buffers", "bytes", "frames"])
def test_a_frame_that_never_left_gives_its_slots_and_notices_back(path):
    """The peer's end closed (it gave up on the call, or died): the write of a
    frame with slot entries fails.  The slots its buffers took are free again
    and the releases it carried are owed again, for the next frame; before,
    they stayed leased until the link closed."""
    from procshare.transport import slots
    from procshare.transport.channel import Channel
    from procshare.wire.frames import OP_RELEASE, pack_frame

    pool = shm.ArenaPool(arena_size=4 * MiB)
    link = slots.SlotLink(pool, "peer", lend=True)
    mine, theirs = socket.socketpair()
    ch = Channel(mine)
    try:
        ch.attach_slots(link)
        owed = [(OP_RELEASE, 0, 7, 0, 65536), (OP_RELEASE, 0, 7, 65536, 65536)]
        link.notices.extend(owed)
        theirs.close()
        with pytest.raises(OSError):
            if path == "buffers":
                ch.send_buffers(1, 5, b"body", [bytes(200_000), bytearray(100_000)])
            elif path == "bytes":
                ch.send_bytes(pack_frame(1, 5, b"body"))
            else:
                ch.send_frames(pack_frame(1, 5, b"body") + pack_frame(1, 6, b"more"))
        assert pool.held_by("peer") == [] and pool.used == 0, "slots still leased"
        assert list(link.notices) == owed, "the releases it carried were lost"
    finally:
        ch.close()
        pool.shrink(0)


def test_a_frame_over_the_limits_is_declined_before_any_slot_is_taken():
    """The slot encoder declines a frame over the limits it is given (the
    socket's encoder then says why, naming the limit): no slot is taken and
    the releases owed to the peer stay owed, for the next frame."""
    from procshare.transport import slots
    from procshare.wire.frames import NO_DEADLINE, OP_RELEASE, Limits, frame_problem

    pool = shm.ArenaPool(arena_size=4 * MiB)
    link = slots.SlotLink(pool, "peer", lend=True)
    try:
        owed = [(OP_RELEASE, 0, 7, 0, 65536)]
        link.notices.extend(owed)
        bufs = [bytes(300_000), bytearray(300_000)]
        for limits in (Limits(512 * 1024, 512 * 1024),   # too many bytes in all
                       Limits(8 * MiB, 8 * MiB, 1)):     # too many buffers
            assert frame_problem(limits, 4, 600_004, 2) is not None
            assert link.encode(1, 5, b"body", bufs, NO_DEADLINE, limits) is None
            assert pool.used == 0 and pool.held_by("peer") == []
            assert list(link.notices) == owed
        # within the limits the same frame goes through slots, and carries the notice
        frame = link.encode(1, 5, b"body", bufs, NO_DEADLINE, Limits(8 * MiB, 8 * MiB))
        assert frame is not None and len(frame) < 1000
        assert len(pool.held_by("peer")) == 2 and not link.notices
    finally:
        link.close()
        pool.shrink(0)


# -- what a child the manager forks holds -------------------------------------------------

def _manager_lends(link, offset: int):
    """A mapping lent to the manager from slot (1, offset) of a client's arena,
    released through `link` when it goes (as `SlotLink._lend` makes them)."""
    import mmap
    import weakref

    from procshare.transport import slots
    m = mmap.mmap(-1, 4096)
    slots._lent_by_manager[link.serial, 1, offset] = m
    link.lent_ranges[1, offset] = 4096
    weakref.finalize(m, slots._lent_gone, weakref.ref(link), os.getpid(), 1, offset, 4096)
    return m


def test_a_fork_hold_lasts_while_a_grandchild_runs_and_ends_at_an_exec():
    """A manager's forked child that forks again and exits: its child still
    holds the slots lent when the first fork happened.  A program run with
    exec (a subprocess with preexec_fn runs the fork hooks) holds nothing."""
    from procshare.transport import slots

    pool = shm.ArenaPool(arena_size=4 * MiB)
    link = slots.SlotLink(pool, "client", lend=True)     # a manager's link
    holds = slots._fork_holds

    def released():
        holds.release_ready()
        return [n[3] for n in link.notices]

    go_r, go_w = os.pipe()
    m = _manager_lends(link, 4096)
    pid = os.fork()
    if pid == 0:                                    # the child: forks, then exits
        try:
            if os.fork() == 0:
                os.close(go_w)
                os.read(go_r, 1)                    # the grandchild waits for EOF
        finally:
            os._exit(0)
    os.close(go_r)
    proc = None
    try:
        os.waitpid(pid, 0)                          # the child is gone ...
        del m                                       # ... and the manager drops the slot
        assert released() == [], "released while a grandchild of the fork holds it"
        os.close(go_w)                              # the grandchild exits
        go_w = -1
        assert poll(lambda: released() == [4096], 10, 0.02), released()

        m = _manager_lends(link, 8192)
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE, close_fds=False,
                                preexec_fn=lambda: None)
        del m
        assert poll(lambda: released() == [4096, 8192], 10, 0.02), \
            "a program started with exec held a slot"
        assert proc.poll() is None                  # still running: it never held it
    finally:
        if go_w >= 0:
            os.close(go_w)                          # (never leave the grandchild waiting)
        if proc is not None:
            proc.stdin.close()
            proc.wait(10)
        pool.shrink(0)


# -- a client SIGKILLed while it holds slots -------------------------------------------------

def _serve_slots(pool: shm.ArenaPool, sock: socket.socket, owner: str, log: list) -> None:
    """The manager's side for one client: lease slots until it goes, then free them."""
    try:
        while True:
            try:
                op, n = sw.ALLOC.unpack(sw.recv_exact(sock, sw.ALLOC.size))
            except (EOFError, ConnectionError):
                break
            assert op == b"A", op
            slot = pool.alloc(n, owner)
            shm.send_fds(sock, [pool.fd(slot.arena)],
                         sw.SLOT_REPLY.pack(*slot, pool.arena_size_of(slot.arena)))
    finally:
        log.append(("gone", pool.free_owner(owner)))
        sock.close()


def test_a_killed_client_gives_its_slots_back(ctx):
    count, size = 12, 8 * MiB
    pool = shm.ArenaPool(arena_size=32 * MiB)
    pool.free(pool.alloc(1, "warm-up"), "warm-up")           # one warm arena, kept
    before = sw.rss_shmem_kib()
    shm_before = shm_entries()
    mine, theirs = socket.socketpair()
    log: list = []
    child = _workers.start_child(ctx, sw.slot_holder, theirs, count, size)
    theirs.close()
    server = threading.Thread(target=_serve_slots, args=(pool, mine, "victim", log))
    server.start()
    try:
        assert poll(lambda: pool.stats()["slots"] == count, WAIT)
        assert poll(lambda: pool.used == count * size, WAIT)
        peak = sw.rss_shmem_kib()
        assert pool.stats()["arenas"] == 3
        os.kill(child.process.pid, signal.SIGKILL)
        server.join(WAIT)
        assert not server.is_alive()
        assert log == [("gone", count * size)]
        after = sw.rss_shmem_kib()
        assert pool.stats() == {"arenas": 1, "mapped": 32 * MiB, "used": 0, "slots": 0,
                                "owners": 0}
        assert after - before <= 0.1 * max(peak - before, 1), (before, peak, after)
        assert shm_entries() == shm_before
        report(f"killed client held {count} x {size >> 20} MiB: RssShmem {before >> 10} MiB "
               f"before, {peak >> 10} MiB while held, {after >> 10} MiB after")
    finally:
        child.kill()
        pool.close()


# -- the manager-side object, behind a test server -------------------------------------------

class BlockClient:
    """The client half of `_shm_workers.serve_blocks`: frames over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        from procshare.transport.channel import Channel
        self.ch = Channel(sock)
        self.rid = 0

    def call(self, op: str, *args, fds: bool = False):
        from procshare.wire.frames import pack_frame
        from procshare.wire.kinds import Kind
        self.rid += 1
        self.ch.send_bytes(pack_frame(Kind.CALL, self.rid, pickle.dumps((op, *args))))
        deadline = time.monotonic() + WAIT
        if fds:
            kind, rid, _b, body, _bufs, got = shm.recv_frame_fds(self.ch, deadline)
        else:
            kind, rid, _b, body, _bufs = self.ch.recv_frame(deadline)
            got = []
        assert rid == self.rid
        value = pickle.loads(body)
        if kind != Kind.RETURN:
            assert not got
            raise value
        return (value, got) if fds else value


def test_shared_blocks_behind_a_test_server(ctx):
    mine, theirs = socket.socketpair()
    child = _workers.start_child(ctx, sw.serve_blocks, theirs)
    theirs.close()
    client = BlockClient(mine)
    try:
        meta = {"kind": "array", "type": "i", "length": 3000}
        ident = client.call("create", 12000, meta, "me")
        assert client.call("memfds") == 1
        info, fds = client.call("fd", ident, "me", fds=True)
        assert info == {"nbytes": 12000, "size": 3 * shm.PAGE} and len(fds) == 1
        view = sa.SharedArrayView.from_fd(fds[0], info["size"], meta)
        os.close(fds[0])
        view[:] = range(3000)
        assert client.call("read", ident, 8) == bytes([0, 0, 0, 0, 1, 0, 0, 0])
        with pytest.raises(PermissionError, match="holds no reference"):
            client.call("fd", ident, "intruder", fds=True)
        with pytest.raises(KeyError):
            client.call("fd", "nope", "me", fds=True)
        info2, fds2 = client.call("fd", ident, "me", fds=True)  # the stream stayed in step
        os.close(fds2[0])
        client.call("decref", ident, "me")
        assert client.call("memfds") == 0          # the manager let go of the memory...
        assert view[2999] == 2999                  # ...and our mapping still works
        with pytest.raises(ValueError):
            client.call("create", -1, meta, "me")
        client.call("stop")
    finally:
        mine.close()
    assert child.result(WAIT).startswith("served")


def test_fd_reply_checks_holder_kind_and_socket():
    from procshare.server.registry import Entry, NoSuchObject, Registry
    from procshare.server.sharedarray import SharedBlock, fd_reply
    from procshare.transport.channel import Channel
    reg = Registry()
    block = SharedBlock(10, {"kind": "array", "type": "b", "length": 10})
    ident = reg.add(Entry(block, "SharedArray", frozenset(), None, None), "me")
    other = reg.add(Entry([], "list", frozenset(), None, None), "me")
    a, b = socket.socketpair()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reply = fd_reply(reg, "me", ident, Channel(a))
        assert reply.value == {"nbytes": 10, "size": shm.PAGE} and reply.fds[0] != block.fileno()
        reply.close()
        with pytest.raises(PermissionError):
            fd_reply(reg, "you", ident, Channel(a))
        with pytest.raises(TypeError, match="no shared memory"):
            fd_reply(reg, "me", other, Channel(a))
        with pytest.raises(NoSuchObject):
            fd_reply(reg, "me", "missing", Channel(a))
        with pytest.raises(OSError, match="Unix socket"):
            fd_reply(reg, "me", ident, Channel(tcp))
        fd = block.fileno()
        reg.decref("me", ident)
        del block
        with pytest.raises(OSError) as info:     # dropped: the descriptor is closed
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    finally:
        a.close()
        b.close()
        tcp.close()


# -- the interface of multiprocessing.Array ----------------------------------------------------

def _view(typecode, init, lock):
    import ctypes
    n = len(init)
    ctype = sa._ctype(typecode)
    seg = shm.Segment.create(ctypes.sizeof(ctype) * n)
    meta = {"kind": "array", "type": typecode, "length": n}
    v = sa.SharedArrayView(seg.mm, meta, lock, nbytes=ctypes.sizeof(ctype) * n)
    v.get_obj().__init__(*init)
    return v


INITS = {"i": list(range(11)), "d": [0.5 * i for i in range(11)], "c": b"hello world"}


@pytest.mark.parametrize("typecode", ["i", "d", "c"])
def test_shared_array_view_behaves_like_multiprocessing_array(typecode):
    expected = sw.transcript(multiprocessing.Array(typecode, INITS[typecode]), typecode)
    got = sw.transcript(_view(typecode, INITS[typecode], threading.RLock()), typecode)
    assert got == expected
    assert ("raises", "IndexError") in got and ("raises", "TypeError") in got


def test_view_without_lock_and_not_picklable():
    v = _view("i", [1, 2], None)
    with pytest.raises(AttributeError, match="lock=False"):
        v.get_lock()
    with pytest.raises(TypeError, match="bound to this process"):
        pickle.dumps(v)
    assert repr(v) == "<SharedArrayView 'i'[2]>"


def test_numpy_missing_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError, match=r"manager.ndarray\(\) needs numpy.*SharedArray"):
        sa._numpy()


def test_a_million_writes_in_a_child_through_the_mapping(ctx):
    """10^6 writes through a mapped SharedArrayView in a child, against 10^4
    through a manager's Array proxy (timings reported, not asserted)."""
    import ctypes

    from procshare.managers import SyncManager
    n = 10 ** 6
    meta = {"kind": "array", "type": "i", "length": n}
    seg = shm.Segment.create(ctypes.sizeof(ctypes.c_int) * n)
    mine, theirs = socket.socketpair()
    try:
        child = _workers.start_child(ctx, sw.view_write_loop, theirs, seg.size, meta, n)
        theirs.close()
        shm.send_fds(mine, [seg.fd])
        t_shm = child.result(60)
        view = sa.SharedArrayView(seg.mm, meta)
        assert view[n - 1] == n - 1 and view[12345] == 12345
        del view
    finally:
        mine.close()
        seg.close()
    with SyncManager(ctx=multiprocessing.get_context("fork")) as m:
        arr = m.Array("i", [0] * 10)
        t_proxy = _workers.run_child(ctx, sw.write_loop, arr, 10 ** 4, 10, timeout=60)
        assert arr[9] == 9999
    per_shm, per_proxy = t_shm / n, t_proxy / 10 ** 4
    report(f"{ctx.get_start_method()}: 10^6 writes through the mapping {t_shm:.3f} s "
           f"({per_shm * 1e9:.0f} ns each); manager Array proxy {per_proxy * 1e6:.1f} us "
           f"each; ratio {per_proxy / per_shm:.0f}x")


# -- the manager's SharedArray and ndarray (needs the SyncManager hooks) ---------------------

def _has_hooks() -> bool:
    from procshare.client.session import Session
    from procshare.managers import SyncManager
    return hasattr(SyncManager, "SharedArray") and hasattr(Session, "control_call_fds")


hooks = pytest.mark.skipif(not _has_hooks(), reason="SyncManager.SharedArray and "
                           "Session.control_call_fds are not wired in yet")


@pytest.fixture
def smgr(ctx):
    from procshare.managers import SyncManager
    with SyncManager(ctx=ctx) as m:
        yield m


@pytest.fixture
def fmgr():
    from procshare.managers import SyncManager
    with SyncManager(ctx=multiprocessing.get_context("fork")) as m:
        yield m


@hooks
@pytest.mark.parametrize("typecode", ["i", "d", "c"])
def test_manager_shared_array_behaves_like_multiprocessing_array(fmgr, typecode):
    expected = sw.transcript(multiprocessing.Array(typecode, INITS[typecode]), typecode)
    a = fmgr.SharedArray(typecode, INITS[typecode])
    assert sw.transcript(a, typecode) == expected
    assert a._getvalue() == a[:]
    assert "SharedArray" in repr(a) and str(a) == repr(a)


@hooks
def test_a_proxy_from_a_bare_token_asks_what_it_is(fmgr):
    a = fmgr.SharedArray("d", [1.5, 2.5])
    b = sa.SharedArrayProxy(a._token, "pickle", authkey=fmgr._authkey)   # no description
    assert repr(b).startswith("<SharedArray ?")
    assert b[:] == [1.5, 2.5] and b.get_lock()._id == a.get_lock()._id
    assert repr(b).startswith("<SharedArray 'd'[2]")
    b[0] = 7.0
    assert a[0] == 7.0


@hooks
def test_lock_choices(fmgr):
    assert fmgr.SharedArray("i", 3, lock=True).get_lock()._token.typeid == "RLock"
    lock = fmgr.Lock()
    a = fmgr.SharedArray("i", 3, lock=lock)
    assert a.get_lock()._id == lock._id
    b = pickle.loads(pickle.dumps(a))
    assert b.get_lock()._id == lock._id        # the lock travels with the array
    with pytest.raises(AttributeError, match="lock=False"):
        fmgr.SharedArray("i", 3, lock=False).get_lock()
    with pytest.raises(AttributeError, match="has no method 'acquire'"):
        fmgr.SharedArray("i", 3, lock="nope")
    with pytest.raises(TypeError, match="lock proxy"):
        fmgr.SharedArray("i", 3, lock=threading.Lock())
    with pytest.raises(ValueError):
        fmgr.SharedArray("i", -1)


@hooks
def test_seed_example_with_a_shared_array(smgr, ctx):
    """The seed's example, `manager.SharedArray('i', 10)` in place of
    `multiprocessing.Array`: children change it in place."""
    a = smgr.SharedArray("i", range(10))
    assert _workers.run_child(ctx, sw.negate, a) == [-i for i in range(10)]
    assert a[:] == [-i for i in range(10)]
    b = smgr.SharedArray("i", 10)
    children = [_workers.start_child(ctx, sw.squares_with_lock, b, k, 2) for k in range(2)]
    for c in children:
        c.result(WAIT)
    assert b[:] == [i * i for i in range(10)]


@hooks
def test_seed_example_child_started_later_gets_it_through_a_queue(smgr, ctx):
    a = smgr.SharedArray("i", range(10))
    q = smgr.Queue()
    q.put(a)
    del a                                     # the queue holds the only reference now
    child = _workers.start_child(ctx, sw.negate_from_queue, q)
    assert child.result(WAIT) == [-i for i in range(10)]


@hooks
def test_arrays_travel_through_containers_and_pipes(fmgr):
    ctx = multiprocessing.get_context("spawn")
    a = fmgr.SharedArray("i", 5)
    d, lst, ns = fmgr.dict(), fmgr.list(), fmgr.Namespace()
    d["a"] = a
    lst.append(a)
    ns.a = a
    assert _workers.run_child(ctx, sw.bump_in_containers, d, lst, ns) == "ok"
    assert a[:3] == [11, 12, 13]
    r, w = ctx.Pipe(duplex=False)
    child = _workers.start_child(ctx, sw.negate_from_pipe, r)
    r.close()
    w.send(a)
    w.close()
    assert child.result(WAIT) == [-11, -12, -13, 0, 0]
    assert d["a"][:] == [-11, -12, -13, 0, 0]


@hooks
def test_a_process_that_connects_maps_the_array(fmgr):
    a = fmgr.SharedArray("i", [1, 2, 3, 4])
    blob = pickle.dumps(a).hex()
    env = _workers.subprocess_env(PST_ADDRESS=fmgr.address,
                                  PST_AUTHKEY=bytes(fmgr._authkey).hex())
    out = subprocess.run([sys.executable, "-c", sw.CONNECT_SCRIPT], input=blob, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ok"
    assert a[:] == [99, 2, 3, 3]


@hooks
def test_memory_is_released_with_the_last_reference(fmgr):
    base = sw.memfd_count(fmgr.pid)
    before = sw.memfd_links(fmgr.pid)
    a = fmgr.SharedArray("i", 1000)
    b = pickle.loads(pickle.dumps(a))          # a second reference in this process
    d = fmgr.dict()
    d["a"] = a                                 # and one held inside the manager
    assert sw.memfd_count(fmgr.pid) == base + 1
    a[0] = 5
    del a
    assert b[0] == 5
    del b

    def only_the_dict_holds_it():
        arrays = [o for o in fmgr.objects() if o["typeid"] == "SharedArray"]
        return len(arrays) == 1 and arrays[0]["holders"] == {"@server": 1}

    # both decrefs arrived (observable state, not a sleep), and the dict's keeps it
    assert poll(only_the_dict_holds_it, WAIT), fmgr.objects()
    assert sw.memfd_count(fmgr.pid) == base + 1
    held = sw.memfd_links(fmgr.pid)
    del d["a"]
    assert poll(lambda: sw.memfd_count(fmgr.pid) == base, WAIT), \
        (before, held, sw.memfd_links(fmgr.pid), fmgr.objects())


@hooks
def test_memory_is_released_when_its_only_holder_dies(fmgr):
    ctx = multiprocessing.get_context("spawn")
    base = sw.memfd_count(fmgr.pid)
    ready = fmgr.Event()
    child = _workers.start_child(ctx, sw.hold_array_until_killed, fmgr.address,
                                 bytes(fmgr._authkey), ready)
    try:
        assert ready.wait(WAIT)
        assert sw.memfd_count(fmgr.pid) == base + 1
        os.kill(child.process.pid, signal.SIGKILL)
        assert poll(lambda: sw.memfd_count(fmgr.pid) == base, WAIT), (base, sw.memfd_count(fmgr.pid), os.listdir(f"/proc/{fmgr.pid}/fd"))
        assert not [o for o in fmgr.objects() if o["typeid"] == "SharedArray"]
    finally:
        child.kill()


@hooks
def test_ndarray_shared_between_processes(smgr, ctx):
    np = pytest.importorskip("numpy")
    x = smgr.ndarray((6, 4), "f8")
    assert type(x).__name__ == "SharedNdarray" and x.shape == (6, 4) and not x.any()
    x[:] = np.arange(24).reshape(6, 4)
    col = x[:, 1]
    total = _workers.run_child(ctx, sw.ndarray_child, x, col)
    assert x[3].tolist() == [7.0, -1.0, 7.0, 7.0] and (x[:, 1] == -1.0).all()
    assert total == float(x.sum())
    # a pickled view maps the same memory; a computed array is a private copy
    view = pickle.loads(pickle.dumps(x[1:5:2, ::-1]))
    view[0, 0] = 123.0
    assert x[1, 3] == 123.0
    copy = pickle.loads(pickle.dumps(x + 1))
    copy[0, 0] = -5.0
    assert x[0, 0] == 0.0 and type(copy) is np.ndarray
    d = smgr.dict()
    d["x"] = x
    assert _workers.run_child(ctx, sw.ndarray_from_dict, d) == ("SharedNdarray", (6, 4))
    assert x[0, 0] == 42.0


@hooks
def test_ndarray_shapes_and_dtypes(fmgr):
    np = pytest.importorskip("numpy")
    assert fmgr.ndarray(0).shape == (0,)
    rec = fmgr.ndarray(3, [("a", "i4"), ("b", "f8")])
    rec["a"] = [1, 2, 3]
    again = pickle.loads(pickle.dumps(rec))
    assert again.dtype == rec.dtype and list(again["a"]) == [1, 2, 3]
    assert fmgr.ndarray((2, 3), np.uint8).nbytes == 6
    with pytest.raises(TypeError, match="Python objects"):
        fmgr.ndarray(3, object)
    with pytest.raises(ValueError, match="negative"):
        fmgr.ndarray((2, -1))


@hooks
def test_a_tcp_manager_says_why_it_cannot_share_memory():
    from procshare.managers import SyncManager
    with SyncManager(address=("127.0.0.1", 0),
                     ctx=multiprocessing.get_context("fork")) as m:
        a = m.SharedArray("i", 3, lock=False)
        with pytest.raises(Exception, match="Unix socket"):
            a[0]


@hooks
def test_a_million_writes_to_a_manager_shared_array(smgr, ctx):
    """The issue's target: in a child, 10^6 writes to a SharedArray against the
    manager's Array proxy (reported, not asserted)."""
    n = 10 ** 6
    a = smgr.SharedArray("i", n, lock=False)
    t_shm = _workers.run_child(ctx, sw.write_loop, a, n, timeout=60)
    t_obj = _workers.run_child(ctx, sw.obj_write_loop, a, n, timeout=60)
    assert a[n - 1] == n - 1
    arr = smgr.Array("i", [0] * 10)
    t_proxy = _workers.run_child(ctx, sw.write_loop, arr, 10 ** 4, 10, timeout=60)
    per_shm, per_obj, per_proxy = t_shm / n, t_obj / n, t_proxy / 10 ** 4
    report(f"{ctx.get_start_method()}: SharedArray 10^6 writes {t_shm:.3f} s "
           f"({per_shm * 1e9:.0f} ns each; get_obj() {per_obj * 1e9:.0f} ns); manager "
           f"Array proxy {per_proxy * 1e6:.1f} us each; ratio {per_proxy / per_shm:.0f}x "
           f"(get_obj() {per_proxy / per_obj:.0f}x)")
