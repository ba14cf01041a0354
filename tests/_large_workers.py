"""Module-level pieces for test_large.py: the values that must round-trip, the
exact comparison, and what child processes run (importable under spawn).

procshare and numpy are imported inside functions only (as in ``_workers``)."""

from __future__ import annotations

import os
import time

KiB, MiB = 1 << 10, 1 << 20
#: sizes around the out-of-band / shared-memory threshold (64 KiB) and the
#: lending threshold (1 MiB), plus one above the huge-page threshold (32 MiB)
SIZES = (0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 128 * KiB + 3, MiB - 8, MiB, MiB + 8,
         3 * MiB + 5, 33 * MiB)


def pattern(n: int, seed: int = 0) -> bytes:
    """`n` bytes that differ from position to position and from seed to seed."""
    block = bytes((i * 7 + seed * 13) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def values(sizes=SIZES, seed: int = 0) -> list:
    """(label, value) pairs: bytes, bytearray, memoryview and ndarrays of each size."""
    out = []
    for n in sizes:
        data = pattern(n, seed)
        out.append((f"bytes-{n}", data))
        out.append((f"bytearray-{n}", bytearray(data)))
        out.append((f"memoryview-{n}", memoryview(data)))
        try:
            import numpy as np
        except ImportError:
            continue
        u8 = np.frombuffer(data, dtype=np.uint8).copy()
        out.append((f"ndarray-u8-{n}", u8))
        if n >= 8:
            f64 = np.frombuffer(data[: n - n % 8], dtype=np.float64).copy()
            out.append((f"ndarray-f64-{n}", f64))
            if f64.size >= 4 and f64.size % 2 == 0:
                out.append((f"ndarray-fortran-{n}", np.asfortranarray(f64.reshape(2, -1))))
    return out


def same(a, b) -> bool:
    """Equal in type, value and (for arrays) dtype, shape and memory order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, memoryview):
        return a.format == b.format and a.shape == b.shape and a.tobytes() == b.tobytes()
    if type(a).__module__ == "numpy":
        return (a.dtype == b.dtype and a.shape == b.shape
                and a.flags.f_contiguous == b.flags.f_contiguous
                and a.tobytes() == b.tobytes() and b.flags.writeable)
    return a == b


def roundtrip(d, sizes=SIZES, seed: int = 0) -> list:
    """Set every value into the managed dict `d` and read it back, both ways:
    the labels of those that did not come back the same (empty: all did)."""
    bad = []
    for label, v in values(sizes, seed):
        d[label] = v
        if not same(v, d[label]):
            bad.append(f"{label} (get)")
        if not same(v, d.pop(label)):
            bad.append(f"{label} (pop)")
    return bad


def child_roundtrip(address, authkey, sizes, seed) -> list:
    """In a child that connects to the manager: `roundtrip` on a dict of its own."""
    from procshare.managers import SyncManager
    m = SyncManager(address=address, authkey=authkey)
    m.connect()
    return roundtrip(m.dict(), sizes, seed)


def inherited_roundtrip(d, sizes, seed) -> list:
    """In a child that got the proxy as an argument (fork or spawn)."""
    return roundtrip(d, sizes, seed)


def status(pid: int) -> dict:
    """VmRSS and RssShmem of process `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def upload(address, authkey, count, size, progress) -> None:
    """Upload `count` payloads of `size` bytes into a dict of this client's,
    reporting each to `progress` (a Queue); meant to be SIGKILLed midway."""
    from procshare.managers import SyncManager
    m = SyncManager(address=address, authkey=authkey)
    m.connect()
    d = m.dict()
    base = pattern(size)
    for i in range(count):
        d[i] = base[:-1] + bytes([i & 0xFF])
        progress.put(i)
    progress.put("done")
    time.sleep(600)


def hold_from(box, count, key, progress) -> None:
    """Like `hold`, with the dict proxy as an argument."""
    held = []
    for i in range(count):
        held.append(box[key])
        progress.put(i)
    progress.put(("done", os.getpid()))
    time.sleep(600)


def check_inherited(arr, seed) -> tuple:
    """In a forked child: is the inherited array (lent from the manager's
    arena in the parent) still what it was, after the parent dropped it and
    the manager reused its slot?  Then write into it (the parent must not see)."""
    import numpy as np
    expected = np.frombuffer(pattern(arr.nbytes, seed), dtype=arr.dtype)
    ok = bool((arr == expected).all())
    arr[:] = 0
    return ok, os.getpid()


def shared_in_range(arr, seed, lo, hi) -> tuple:
    """In a forked child: is the inherited array (lent from a manager arena
    the parent mapped at [lo, hi)) intact, and which of the child's mappings
    in that range still share a memfd with the parent?"""
    import numpy as np
    expected = np.frombuffer(pattern(arr.nbytes, seed), dtype=arr.dtype)
    shared = []
    with open("/proc/self/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a < hi and b > lo and "memfd:" in line:
                shared.append(line.strip())
    return bool((arr == expected).all()), shared


def store_array(box, key, size, seed, progress) -> None:
    """Store an ndarray of `size` bytes in `box[key]` (it travels through this
    client's own arena), report it, and wait to be SIGKILLed."""
    import numpy as np
    box[key] = np.frombuffer(pattern(size, seed), dtype=np.uint8).copy()
    progress.put(("stored", os.getpid()))
    time.sleep(600)


def store_after_big(box, big, small, seed, progress) -> None:
    """Upload an ndarray of `big` bytes and drop it, then store one of `small`
    bytes (it may land in the big one's arena), report, and wait to be killed."""
    import numpy as np
    box["big"] = np.zeros(big, dtype=np.uint8)
    del box["big"]
    box["a"] = np.frombuffer(pattern(small, seed), dtype=np.uint8).copy()
    progress.put(("stored", os.getpid()))
    time.sleep(600)


def memfd_bytes(pid: int, name: str) -> int:
    """Bytes of memory behind the memfd mappings of process `pid` whose name
    contains `name` (each file counted once)."""
    seen, total = set(), 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "memfd:" not in line or name not in line:
                continue
            st = os.stat(f"/proc/{pid}/map_files/{line.split()[0]}")
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class ForkingKeeper:
    """Lives in a manager: keeps arrays, and forks a child of the manager (as a
    Pool in a managed object would) that reads one of them when told."""

    def __init__(self) -> None:
        self.arrays: dict = {}
        self.child = None

    def put(self, key, arr) -> None:
        self.arrays[key] = arr

    def drop(self, key) -> None:
        del self.arrays[key]

    def keys(self) -> list:
        return sorted(self.arrays)

    def fork_reader(self, key, seed) -> int:
        import multiprocessing
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=read_when_told, args=(self.arrays[key], seed, theirs, mine))
        p.start()
        theirs.close()
        self.child = (p, mine)
        return p.pid

    def reader_result(self, timeout: float):
        p, conn = self.child
        self.child = None
        try:
            conn.send("go")
            if not conn.poll(timeout):
                raise TimeoutError("the reader forked by the manager did not answer")
            return conn.recv()
        finally:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(5)
            conn.close()


def read_when_told(arr, seed, conn, parents_end) -> None:
    """In a child forked by the manager: when told, is the inherited array
    still what it was when the child was forked?  (Gone within a minute,
    told or not, and at once when the manager goes.)"""
    import numpy as np
    parents_end.close()
    if not conn.poll(60):
        return
    conn.recv()
    expected = np.frombuffer(pattern(arr.nbytes, seed), dtype=arr.dtype)
    conn.send((bool((arr == expected).all()), float(arr[0]), float(expected[0])))


class BigReply:
    """Lives in a manager: `big(n)` returns n bytes (through shared-memory
    slots) once the test releases it, so a client can give up on it first."""

    def __init__(self) -> None:
        import threading
        self.started, self.go = threading.Event(), threading.Event()
        self.gave_up, self.fin = threading.Event(), threading.Event()

    def big(self, n: int) -> bytes:
        self.started.set()
        self.go.wait(60)
        return bytes(n)

    def running(self) -> bool:
        return self.started.is_set()

    def release(self) -> None:
        self.go.set()

    def give_up(self) -> None:
        self.gave_up.set()

    def has_given_up(self) -> bool:
        return self.gave_up.is_set()

    def wait_finish(self, timeout: float) -> bool:
        return self.fin.wait(timeout)

    def finish(self) -> None:
        self.fin.set()

    def slots_used(self) -> int:
        """Bytes of the manager's own arenas leased to clients (test introspection)."""
        from procshare.inprocess import local_server
        slots = local_server().__dict__.get("_slots_")
        pool = None if slots is None else slots._pool
        return 0 if pool is None else pool.used


def interrupt_big_call(s, n: int) -> str:
    """Call `s.big(n)` until Ctrl-C (the test sends SIGINT), then say so and
    stay connected (alive, so the lease lives) until told to finish."""
    try:
        s.big(n)
        return "not interrupted"
    except KeyboardInterrupt:
        pass
    s.give_up()
    s.wait_finish(30)
    return "interrupted"
