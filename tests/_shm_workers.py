"""Module-level pieces for test_shm.py: what child processes run (importable
under spawn), the side-by-side transcript of array operations, and a small
test server speaking frames over a socket.

procshare is imported inside functions only (as in ``_workers``)."""

from __future__ import annotations

import os
import pickle
import struct
import time

SLOT_REPLY = struct.Struct("!QQQQ")      # arena, offset, length, arena size
ALLOC = struct.Struct("!cQ")             # b"A", bytes wanted


def memfd_links(pid: int | str = "self") -> list[tuple[int, str]]:
    """(fd, target) of each open procshare memfd descriptor of a process (its
    shared-memory segments), in fd order."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("/memfd:procshare"):
            out.append((int(name), link))
    return sorted(out)


def memfd_count(pid: int | str = "self") -> int:
    """How many procshare memfd descriptors a process has open."""
    return len(memfd_links(pid))


def rss_shmem_kib() -> int:
    """Shared memory this process has mapped and touched (RssShmem, KiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def recv_exact(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError("peer closed")
        out += data
    return out


# -- fd passing ---------------------------------------------------------------------

PATTERN = bytes(range(1, 256))


def pattern(n: int, salt: int = 0) -> bytes:
    p = bytes((b + salt) % 256 for b in PATTERN)
    return (p * (n // len(p) + 1))[:n]


def fd_child(sock, size: int) -> str:
    """Receive a segment's descriptor, check the parent's half, write ours."""
    from procshare.transport import shm
    with sock:
        data, fds = shm.recv_fds(sock, maxfds=2, bufsize=8)
        assert data == b"segment!", data
        assert len(fds) == 1, fds
        mm = shm.map_fd(fds[0], size)
        os.close(fds[0])
        half = size // 2
        ok = mm[:half] == pattern(half)
        mm[half:] = pattern(size - half, salt=7)
        sock.sendall(b"Y" if ok else b"N")
        mm.close()
    return "mapped"


# -- a client that holds slots and is killed ---------------------------------------------

def slot_holder(sock, count: int, size: int) -> None:
    """Lease `count` slots of `size` bytes from the arena server on `sock`,
    fill them, say "H" (holding), then wait to be killed."""
    from procshare.transport import shm
    maps = []
    for i in range(count):
        sock.sendall(ALLOC.pack(b"A", size))
        data, fds = shm.recv_fds(sock, maxfds=1, bufsize=SLOT_REPLY.size)
        data += recv_exact(sock, SLOT_REPLY.size - len(data))
        arena, offset, length, arena_size = SLOT_REPLY.unpack(data)
        mm = shm.map_fd(fds[0], arena_size)
        os.close(fds[0])
        mm[offset:offset + length] = bytes([i % 256]) * length
        maps.append(mm)
    sock.sendall(b"H")
    time.sleep(60)


# -- a test server: frames, a Registry of SharedBlocks, fd_reply ---------------------------

def serve_blocks(sock) -> str:
    """Serve ("create" | "fd" | "decref" | "memfds" | "read") requests, one
    frame each, until "stop" or the peer closes: the manager's side of shared arrays,
    with procshare's own frames, registry and helpers."""
    from procshare.server.registry import Registry
    from procshare.transport import shm
    from procshare.transport.channel import Channel
    from procshare.wire.frames import encode_frame
    from procshare.wire.kinds import Kind

    ch = Channel(sock)
    reg = Registry()
    served = 0
    try:
        while True:
            try:
                _kind, rid, _b, body, _bufs = ch.recv_frame()
            except EOFError:
                return f"served {served}"
            served += 1
            if pickle.loads(body) == ("stop",):   # (a forked child holds our peer's end too)
                ch.send(encode_frame(Kind.RETURN, rid, pickle.dumps(None)))
                return f"served {served}"
            try:
                kind, result = Kind.RETURN, _block_op(reg, ch, *pickle.loads(body))
            except Exception as e:
                kind, result = Kind.ERROR, e
            if isinstance(result, shm.WithFds):
                try:
                    shm.send_frame_fds(ch, encode_frame(Kind.RETURN, rid,
                                                        pickle.dumps(result.value)), result.fds)
                finally:
                    result.close()
            else:
                ch.send(encode_frame(kind, rid, pickle.dumps(result)))
            del result
    finally:
        ch.close()


def _block_op(reg, ch, op: str, *args):
    from procshare.server.registry import Entry
    from procshare.server.sharedarray import SharedBlock, fd_reply
    from procshare.transport import shm
    if op == "create":
        nbytes, meta, holder = args
        return reg.add(Entry(SharedBlock(nbytes, meta), "SharedArray", frozenset(), None, None),
                       holder)
    if op == "fd":
        ident, client = args
        return fd_reply(reg, client, ident, ch)
    if op == "decref":
        ident, client = args
        reg.decref(client, ident)
        return None
    if op == "memfds":
        return memfd_count()
    if op == "read":      # the manager maps its own descriptor
        ident, n = args
        block = reg.get(ident).obj
        mm = shm.map_fd(block.fileno(), block.describe()["size"])
        try:
            return bytes(mm[:n])
        finally:
            mm.close()
    raise ValueError(f"unknown op {op!r}")


# -- write loops (timed) ------------------------------------------------------------------

def view_write_loop(sock, size: int, meta: dict, n: int) -> float:
    """Map the array whose descriptor comes on `sock`; time `n` writes."""
    from procshare.client.sharedarray import SharedArrayView
    from procshare.transport import shm
    with sock:
        _data, fds = shm.recv_fds(sock, maxfds=1)
    a = SharedArrayView.from_fd(fds[0], size, meta)
    os.close(fds[0])
    t = time.perf_counter()
    for i in range(n):
        a[i] = i
    return time.perf_counter() - t


def write_loop(a, n: int, modulo: int | None = None) -> float:
    """Time `n` item writes `a[i] = i` (indexes modulo `modulo`)."""
    if modulo is None:
        a[0]            # map it first: the loop measures writes only
        t = time.perf_counter()
        for i in range(n):
            a[i] = i
    else:
        a[0]
        t = time.perf_counter()
        for i in range(n):
            a[i % modulo] = i
    return time.perf_counter() - t


def obj_write_loop(a, n: int) -> float:
    """Time `n` writes through `get_obj()` (the ctypes array itself)."""
    obj = a.get_obj()
    t = time.perf_counter()
    for i in range(n):
        obj[i] = i
    return time.perf_counter() - t


# -- side by side with multiprocessing.Array -----------------------------------------------

def _step(out: list, fn) -> None:
    try:
        value = fn()
    except Exception as e:
        out.append(("raises", type(e).__name__))
        return
    if hasattr(value, "_type_") and hasattr(value, "_length_"):   # a ctypes array
        value = ("ctypes array", type(value).__name__, value[:])
    out.append(("ok", value))


def transcript(a, typecode: str) -> list:
    """Run the same operations on an array and record what each returned or
    raised.  For typecodes 'i', 'd' and 'c' (length 11)."""
    out: list = []

    def step(fn):
        _step(out, fn)

    def setitem(i, v):
        def fn():
            a[i] = v
        return fn

    step(lambda: len(a))
    step(lambda: bool(a))
    step(lambda: a[:])
    if typecode == "c":
        step(lambda: a.value)
        step(lambda: a.raw)
        step(setitem(0, b"x"))
        step(setitem(1, 66))
        step(setitem(2, b"yz"))
        step(setitem(3, "s"))
        step(setitem(slice(4, 7), b"abc"))
        step(setitem(slice(4, 7), b"ab"))
        step(lambda: setattr(a, "value", b"hey"))
        step(lambda: a.value)
        step(lambda: setattr(a, "raw", b"0123456789A"))
        step(lambda: setattr(a, "raw", b"0123456789AB"))
        step(lambda: a.raw)
        step(lambda: a[0])
        step(lambda: a[-1])
        step(lambda: a[2:5])
        step(lambda: a[::-2])
        step(lambda: list(a))
        step(lambda: b"5" in a)
    else:
        one = 1.5 if typecode == "d" else 7
        step(setitem(0, one))
        step(lambda: a[0])
        step(setitem(-1, 3))
        step(lambda: (a[-1], a[10]))
        step(setitem(1, 1.5))
        step(setitem(1, "x"))
        step(setitem(1, None))
        step(setitem(1, True))
        step(lambda: a[1])
        step(setitem(2, 2 ** 40))
        step(lambda: a[2])
        step(setitem(3, -5))
        step(lambda: a[3])
        step(setitem(slice(4, 7), [1, 2, 3]))
        step(setitem(slice(4, 7), (4, 5)))
        step(setitem(slice(1, 10, 4), [9, 8, 7]))
        step(setitem(slice(None), list(range(11))))
        step(setitem(slice(0, 3), range(3)))
        step(lambda: a[2:5])
        step(lambda: a[::3])
        step(lambda: a[::-1])
        step(lambda: a[-3:])
        step(lambda: a[100:])
        step(lambda: list(a))
        step(lambda: sum(a))
        step(lambda: 5 in a)
        step(lambda: max(a))
        step(lambda: sorted(a, reverse=True))
    step(lambda: a[11])
    step(lambda: a[-12])
    step(setitem(11, b"q" if typecode == "c" else 1))
    step(lambda: a["0"])
    step(lambda: a[1.0])
    step(lambda: a.get_obj())
    step(lambda: a.get_obj()[:] == a[:])

    def locked():
        lock = a.get_lock()
        got = lock.acquire()
        lock.release()
        with a:
            a[0] = a[0]
        return got
    step(locked)
    step(lambda: (a.acquire(), a.release()))
    if typecode != "c":
        step(lambda: a.value)
    return out


# -- manager-level children ---------------------------------------------------------------

def negate(a) -> list:
    """The seed's example: the child negates every item."""
    for i in range(len(a)):
        a[i] = -a[i]
    return a[:]


def negate_from_queue(q) -> list:
    a = q.get(timeout=10)
    return negate(a)


def negate_from_pipe(conn) -> list:
    a = conn.recv()
    conn.close()
    return negate(a)


def squares_with_lock(a, start: int, step: int) -> None:
    for i in range(start, len(a), step):
        with a.get_lock():
            a[i] = i * i


def bump_in_containers(d, lst, ns) -> str:
    """Write through arrays found in a managed dict, list and Namespace."""
    d["a"][0] = 11
    lst[0][1] = 12
    ns.a[2] = 13
    return "ok"


def hold_array_until_killed(manager_address, authkey: bytes, ready) -> None:
    """Create a shared array as its only holder (a connect()ed client), fill
    it, say so, then wait to be killed."""
    from procshare.managers import SyncManager
    m = SyncManager(address=manager_address, authkey=authkey)
    m.connect()
    a = m.SharedArray("b", 8 << 20, lock=False)
    a[0] = 1
    ready.set()
    time.sleep(60)
    a[1] = 1


def ndarray_child(x, col) -> float:
    """Write through a whole ndarray and through a strided view of it."""
    x[3, :] = 7.0
    col[:] = -1.0           # a column of x, pickled as a view into the segment
    return float(x.sum())


def ndarray_from_dict(d) -> tuple:
    y = d["x"]
    y[0, 0] = 42.0
    return type(y).__name__, y.shape


CONNECT_SCRIPT = r"""
import os, pickle, sys
import multiprocessing
multiprocessing.current_process().authkey = bytes.fromhex(os.environ["PST_AUTHKEY"])
from procshare.managers import SyncManager
m = SyncManager(address=os.environ["PST_ADDRESS"],
                authkey=bytes.fromhex(os.environ["PST_AUTHKEY"]))
m.connect()
a = pickle.loads(bytes.fromhex(sys.stdin.read().strip()))
a[0] = 99
a[len(a) - 1] = a[1] + 1
print("ok", a[:3], type(a).__name__)
"""
