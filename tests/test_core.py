"""procshare's own machinery: the sans-IO protocol, the registry's reference
counting and loans, references across fork and process death, bad frames."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import pickle
import signal
import socket
import textwrap
import time

import pytest

import _workers
import procshare
from _helpers import FAULT_START_METHODS, poll
from procshare.server.registry import Entry, NoSuchObject, Registry
from procshare.transport import channel as transport
from procshare.wire import frames
from procshare.wire.frames import FrameReader, Limits
from procshare.wire.kinds import Kind
from procshare.wire.records import Token

#: a small in-band body limit, so a header can claim more than it (the u32 field
#: cannot exceed the default)
SMALL = Limits(max_body=1 << 30)


def decode_frame(data, limits=frames.DEFAULT_LIMITS):
    """One frame from the start of `data` through a fresh FrameReader:
    `((kind, rid, budget, body, buffers), consumed)`, or None if incomplete."""
    reader = FrameReader(limits)
    reader.feed(bytes(data))
    frame = reader.next_frame()
    if frame is None:
        return None
    kind, rid, budget, body, bufs = frame
    return (kind, rid, budget, bytes(body), list(bufs)), len(data) - reader.buffered

# -- protocol: bytes in, bytes out ---------------------------------------------------------


def test_frame_roundtrip_small_and_with_buffers():
    body = pickle.dumps(("id", "m", (1,), {}), 5)
    (frame,) = frames.encode_frame(Kind.CALL, 7, body, budget=1.5)
    (kind, rid, budget, got, bufs), used = decode_frame(frame)
    assert (kind, rid, budget, got, bufs, used) == (Kind.CALL, 7, 1.5, body, [], len(frame))

    pieces = frames.encode_frame(Kind.RETURN, 9, b"body", [b"abc", bytearray(b"xy")])
    data = b"".join(bytes(p) for p in pieces)
    (kind, rid, budget, got, bufs), used = decode_frame(data + b"next")
    assert (kind, rid, got, used) == (Kind.RETURN, 9, b"body", len(data))
    assert math.isnan(budget) and bufs == [bytearray(b"abc"), bytearray(b"xy")]


def test_partial_frames_are_not_decoded():
    pieces = frames.encode_frame(Kind.RETURN, 1, b"x" * 100, [b"y" * 50])
    data = b"".join(bytes(p) for p in pieces)
    for cut in (0, 5, frames.HEADER.size, frames.HEADER.size + 8, len(data) - 1):
        assert decode_frame(data[:cut]) is None


def test_oversized_frame_is_refused():
    head = frames.HEADER.pack(SMALL.max_body + 1, Kind.CALL, 0, 0, 1, math.nan)
    with pytest.raises(frames.FrameError, match="over the"):
        decode_frame(head, SMALL)


def test_token_pickles_and_reprs_like_the_stdlib():
    t = Token("dict", "/tmp/x.sock", "a1")
    assert repr(t) == "Token(typeid='dict', address='/tmp/x.sock', id='a1')"
    u = pickle.loads(pickle.dumps(t))
    assert (u.typeid, u.address, u.id) == ("dict", "/tmp/x.sock", "a1")


# -- registry: one place where references are counted ---------------------------------------


def _entry(obj=None):
    return Entry(obj if obj is not None else [], "list", frozenset({"append"}), None, None)


def test_refcounts_per_holder_and_release():
    r = Registry()
    a = r.add(_entry(), "client-a")
    r.incref("client-b", a)
    r.incref("client-b", a)
    assert r.refcount[a] == 3 and r.held_by("client-b") == {a: 2}
    assert r.release_holder("client-b") == 0      # a still holds one
    assert r.refcount[a] == 1
    r.decref("client-b", a)                       # a late decref from b changes nothing
    assert r.refcount[a] == 1
    assert r.release_holder("client-a") == 1
    assert len(r) == 0 and a not in r.objects
    with pytest.raises(NoSuchObject):
        r.incref("client-a", a)


def test_loans_keep_objects_alive_until_adopted_or_expired():
    r = Registry()
    a = r.add(_entry(), "sender")
    loan = r.loan("sender", a, ttl=60)
    r.decref("sender", a)                         # the sender drops its proxy at once
    assert len(r) == 1                            # ...the loan keeps the object
    assert r.adopt("receiver", loan, a) is True
    assert r.held_by("receiver") == {a: 1} and loan not in r.holders
    assert r.adopt("other", loan, a) is False     # a second unpickling increfs instead
    assert r.refcount[a] == 2
    b = r.add(_entry(), "x")
    r.loan("x", b, ttl=0)
    r.decref("x", b)
    assert r.expire_loans() == 1 and len(r) == 1  # an unadopted loan expires


def test_fork_loan_copies_every_reference():
    r = Registry()
    a = r.add(_entry(), "parent")
    b = r.add(_entry(), "parent")
    r.incref("parent", b)
    loan = r.fork_loan("parent", ttl=60)
    r.release_holder("parent")
    assert len(r) == 2
    assert r.adopt("child", loan) is True
    assert r.held_by("child") == {a: 1, b: 2}


# -- references across processes -----------------------------------------------------------


def _count_after(manager, expected, limit=3.0):
    gc.collect()    # a dropped proxy caught in a reference cycle goes only with it
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        n = manager._number_of_objects()
        if n == expected:
            return n
        time.sleep(0.02)
    return manager._number_of_objects()


def _use_list_after_parent_dropped(lst, ready, go):
    ready.set()
    go.wait(10)
    lst.append("child")
    return list(lst)


@pytest.mark.parametrize("method", FAULT_START_METHODS)
def test_dead_client_references_are_reclaimed(method):
    ctx = multiprocessing.get_context(method)
    with procshare.Manager(ctx=ctx) as m:
        ready, go = m.Event(), m.Event()
        base = m._number_of_objects()
        child = _workers.start_child(ctx, _workers.make_lists_and_hang, m.address, 3, ready)
        assert ready.wait(10)
        assert _count_after(m, base + 3) == base + 3
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(5)
        assert _count_after(m, base) == base       # the dead client's 3 lists are gone
        del go


def test_plain_os_fork_child_adopts_inherited_references():
    with procshare.Manager() as m:
        lst = m.list([1])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait until the parent dropped its proxy, then use ours
            try:
                os.read(r, 1)
                lst.append(2)
                os._exit(0 if list(lst) == [1, 2] else 1)
            except BaseException:
                os._exit(2)
        ident = lst._id
        del lst                                   # the parent lets go at once
        # objects() goes on the connection that carried that decref, after it
        assert ident in {o["id"] for o in m.objects()}   # the fork loan keeps it
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.close(r)
        os.close(w)
        assert _count_after(m, 0) == 0, m.objects()   # the child's exit released it


def test_update_item_is_atomic_across_processes():
    ctx = multiprocessing.get_context("fork")
    with procshare.Manager(ctx=ctx) as m:
        d = m.dict({"n": 0, "items": []})
        kids = [_workers.start_child(ctx, _workers.update_item_many, d, 200) for _ in range(3)]
        for k in kids:
            k.result(30)
        assert d["n"] == 600
        assert d.update_item("items", _workers.append_x, []) == ["x"]
        assert d.update_item("new", _workers.add_one, 41) == 42
        with pytest.raises(KeyError):
            d.update_item("missing", _workers.add_one)
        lst = m.list([1, 2])
        assert lst.update_item(-1, _workers.add_one) == 3 and list(lst) == [1, 3]


# -- a bad peer closes one connection, not the server ------------------------------------------


def _raw_connect(address):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(address)
    return s


def _recv_all(s):
    out = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread
            return out
        if not chunk:
            return out
        out += chunk


def test_bad_peers_close_only_their_connection():
    with procshare.Manager() as m:
        lst = m.list([1])
        # not our protocol at all
        s = _raw_connect(m.address)
        assert len(s.recv(38)) == 38              # the magic and the challenge
        s.sendall(b"GET / HTTP/1.0\r\n" * 8)
        assert _recv_all(s) == b""                # closed by the server, nothing said
        s.close()
        # our protocol, wrong digest: told NO, then closed
        s = _raw_connect(m.address)
        s.recv(38)
        s.sendall(b"PSHR1\x00" + bytes(64))
        assert _recv_all(s).startswith(b"NO")
        s.close()
        # authenticated, then a frame of a kind a client never sends
        ch = transport.connect(m.address)
        transport.client_handshake(ch, bytes(multiprocessing.current_process().authkey),
                                   m.address)
        hello = {"client": "test", "pid": os.getpid(), "serializer": "pickle"}
        ch.send(frames.encode_frame(Kind.HELLO, 1, pickle.dumps(hello)))
        assert ch.recv_frame(time.monotonic() + 5)[0] == Kind.RETURN
        ch.send(frames.encode_frame(Kind.RETURN, 2, b"junk"))
        with pytest.raises(EOFError):
            ch.recv_frame(time.monotonic() + 5)
        ch.close()
        assert list(lst) == [1]                   # the server still serves everyone else
        log = "\n".join(m._control("server_info")["log"])
        assert "refused a connection" in log and "bad frame" in log


def test_wrong_authkey_is_refused_and_says_so():
    with procshare.Manager() as m:
        other = procshare.SyncManager(address=m.address, authkey=b"not the key")
        with pytest.raises(multiprocessing.AuthenticationError, match="rejected"):
            other.connect()


def test_frame_over_the_limit_closes_the_connection():
    ch_a, ch_b = (transport.Channel(s, limits=SMALL) for s in socket.socketpair())
    ch_a.send_bytes(frames.HEADER.pack(SMALL.max_body + 10, Kind.CALL, 0, 0, 1,
                                         math.nan) + b"x" * 10)
    with pytest.raises(frames.FrameError):
        ch_b.recv_frame(time.monotonic() + 2)
    ch_a.close()
    ch_b.close()


@pytest.mark.parametrize("method", FAULT_START_METHODS)
def test_dead_clients_blocked_get_does_not_swallow_an_item(method):
    ctx = multiprocessing.get_context(method)
    with procshare.Manager(ctx=ctx) as m:
        q, ready = m.Queue(), m.Event()
        child = _workers.start_child(ctx, _workers.block_in_get_sent, q, ready)
        assert ready.wait(10)                  # the child's get() request has been sent
        pid = child.process.pid
        os.kill(pid, signal.SIGKILL)
        child.process.join(5)
        # the manager noticed the death: it lists none of the child's connections,
        # so the one that carried the get() is closed, which it is only once that
        # get() has given up (its connection runs one call at a time)
        assert poll(lambda: all(c["pid"] != pid for c in m.clients()), 10), m.clients()
        q.put("precious")
        assert q.get(timeout=5) == "precious"  # not taken by the dead client's get


def test_reply_the_client_cannot_deserialize_leaves_the_connection_usable(tmp_path):
    """The manager returns an instance of a class this process cannot import."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "undeserializable.py"
    script.write_text(textwrap.dedent("""
        import sys, types, pickle
        import procshare
        mod = types.ModuleType("only_in_manager")
        exec("class Thing:\\n    pass\\n", mod.__dict__)
        sys.modules["only_in_manager"] = mod
        def make():
            return {"thing": mod.Thing(), "n": 1}
        class M(procshare.BaseManager):
            pass
        M.register("make_holder", make)
        if __name__ == "__main__":
            import multiprocessing as mp
            with M(ctx=mp.get_context("fork")) as m:
                h = m.make_holder()
                del sys.modules["only_in_manager"]     # this process forgets the class
                try:
                    h._getvalue()
                except Exception as e:
                    notes = " ".join(getattr(e, "__notes__", []))
                    print("ERR", type(e).__name__,
                          "could not deserialize" in notes or sys.version_info < (3, 11))
                print("NEXT", h.get("n"))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env=_workers.subprocess_env())
    assert "ERR ModuleNotFoundError True" in out.stdout, out.stdout + out.stderr
    assert "NEXT 1" in out.stdout, out.stdout + out.stderr


def test_large_message_with_a_proxy_leaves_no_loan_behind():
    """A message with large buffers is pickled twice (the second time with the
    buffers out of band); the loans the first pickle took must be given back."""
    with procshare.Manager() as m:
        d = m.dict()
        lst = m.list([1])
        d["k"] = (lst, b"x" * (1 << 20))          # ~1 MiB: the out-of-band path
        assert d["k"][1] == b"x" * (1 << 20)
        del lst
        # the dict, and the list stored in it (which the stdlib's count leaves out)
        assert _count_after(m, 1) == 1
        assert poll(lambda: len(m.objects()) == 2, 3), m.objects()
        del d["k"]
        assert poll(lambda: len(m.objects()) == 1, 3), m.objects()     # the list went
        assert _count_after(m, 1) == 1                                  # with its holder
        held = {h for o in m.objects() for h in o["holders"]}
        assert not any(h.startswith("loan:") for h in held)


def test_an_idle_pool_ends_cleanly_by_terminate_and_by_its_last_proxy():
    """The manager's Pool lets idle workers exit before the stdlib's terminate
    (cpython#78178: it can hang when it SIGTERMs a worker holding a queue lock),
    both through terminate() and when its last proxy is dropped."""
    from _helpers import poll

    with procshare.SyncManager() as m:
        for _ in range(3):
            with m.Pool(2) as pool:
                assert pool.map(_workers.square, range(6)) == [x * x for x in range(6)]
            pool = m.Pool(2)
            assert pool.apply(_workers.square, (7,)) == 49
            del pool
            gc.collect()            # a proxy in a reference cycle goes only with it
            assert poll(lambda: not m.objects(), 10), m.objects()


def test_the_concurrency_rule_looks_without_running_the_objects_code():
    """`is_thread_safe` finds a primitive in a slot or a container attribute,
    never calls a property or __getattr__ of the object, and survives another
    thread changing a container it looks into."""
    import threading as th

    from procshare.stdtypes import is_thread_safe

    ran = []

    class Slotted:
        __slots__ = ("__gate", "n")

        def __init__(self):
            self.__gate = th.Event()

    class Shadowed(Slotted):
        @property
        def n(self):
            ran.append("property")
            return th.Lock()

    class Lazy:
        def __getattr__(self, name):
            ran.append(name)
            raise AttributeError(name)

    class Holder:
        def __init__(self):
            self.parts = {"ready": th.Condition()}
            self.many = [0] * 100 + [th.Lock()]       # beyond the first 16: not seen

    class Flagged:
        _procshare_concurrent_ = True

    assert is_thread_safe(Slotted()) and is_thread_safe(Shadowed())
    assert not is_thread_safe(Lazy()) and is_thread_safe(Holder()) and is_thread_safe(Flagged())
    h = Holder()
    del h.parts
    assert not is_thread_safe(h)
    assert ran == []
    shared = {"gate": th.Event()}      # first in order, so always among those looked at
    busy = Holder()
    busy.parts = shared
    busy.many = []
    stop = th.Event()

    def churn():
        i = 0
        while not stop.is_set():
            shared[i % 50] = i
            shared.pop((i + 25) % 50, None)
            i += 1

    t = th.Thread(target=churn)
    t.start()
    try:
        assert all(is_thread_safe(busy) for _ in range(5000))
    finally:
        stop.set()
        t.join(10)


def test_importing_procshare_leaves_heavy_modules_unloaded():
    """`import procshare` runs in every spawned child that receives a proxy:
    asyncio (with ssl), inspect and dataclasses load only when used (about
    18 ms of a 74 ms import here)."""
    import subprocess
    import sys

    code = ("import sys, procshare, procshare.managers; "
            "print(sorted({'asyncio', 'ssl', 'inspect', 'dataclasses'} & sys.modules.keys()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("method", FAULT_START_METHODS)
def test_a_failing_finalize_override_still_stops_the_server(method):
    """A subclass's `_finalize_manager` (the stdlib's signature) that raises:
    the error reaches `shutdown()`'s caller, and the server is stopped and its
    socket file removed all the same (the stdlib's would keep running)."""
    import procshare.managers as ps

    cls = _workers.get_class(ps, "RaisingFinalizeManager")
    m = cls(ctx=multiprocessing.get_context(method))
    m.start()
    proc, address = m._process, m.address
    c = m.Counter()
    c.increment()
    del c
    with pytest.raises(RuntimeError, match="the override failed"):
        m.shutdown()
    assert poll(lambda: not proc.is_alive(), 15)
    assert m._state.value == ps.State.SHUTDOWN
    assert not os.path.exists(address)


def test_a_python_built_without_sqlite3_or_ctypes():
    """Pythons built without SQLite's or libffi's headers have no `sqlite3` or
    `ctypes`, and `multiprocessing.managers` works there: so does procshare,
    but for durable objects (which say why) and shared arrays (ditto); large
    data goes through the socket, with one warning (`import procshare`
    failed)."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys, warnings
        for name in ("_ctypes", "ctypes", "ctypes.util", "_sqlite3", "sqlite3"):
            sys.modules[name] = None
        import procshare
        with procshare.SyncManager() as m:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                d = m.dict()
                d["big"] = b"x" * (1 << 20)
                assert len(d["big"]) == 1 << 20
            assert any("ctypes" in str(w.message) for w in caught), caught
            try:
                m.dict(durable=True)
            except Exception as e:
                assert "sqlite3" in str(e), e
            else:
                raise AssertionError("a durable dict without sqlite3")
            try:
                m.SharedArray("i", 3)
            except ImportError as e:
                assert "ctypes" in str(e), e
            else:
                raise AssertionError("a SharedArray without ctypes")
            assert list(m.Array("i", [1, 2])) == [1, 2]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=_workers.subprocess_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_which_exposed_names_are_data_runs_no_property_or_method():
    """`stdtypes.data_attributes`: properties count as data without running,
    methods as methods; values in the instance (also one whose `__dict__` is
    itself, a dict subclass, whose methods do not run) and in slots as what
    they hold; a `cached_property` is read (as before)."""
    import functools

    from procshare.stdtypes import data_attributes

    ran = []

    class Thing:
        __slots__ = ("slot", "unset", "__dict__")
        klass = 5

        def __init__(self):
            self.slot = 1
            self.value = 2
            self.func = print

        @property
        def prop(self):
            ran.append("prop")
            raise RuntimeError("not ready")

        @functools.cached_property
        def cached(self):
            return 3

        def method(self):
            ran.append("method")

    class AttrDict(dict):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.__dict__ = self

        def __getitem__(self, key):
            ran.append("getitem")
            return dict.__getitem__(self, key)

    names = ("slot", "unset", "klass", "value", "func", "prop", "cached", "method", "nope")
    assert data_attributes(Thing(), names) == ("slot", "klass", "value", "prop", "cached")
    assert data_attributes(AttrDict(size=3, call=len), ("size", "call", "keys")) == ("size",)
    assert ran == []
