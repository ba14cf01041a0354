"""Fuzzing the wire: FrameReader and a live manager fed random and mutated bytes.

The reader may only return frames, return None or raise FrameError, whatever it
is fed and however the bytes are cut.  A live manager (unix and TCP) fed random
bytes instead of the handshake, or random and mutated frames after it, must
answer exactly what the protocol says, close only the offending connection,
keep serving, keep its memory and write nothing to its stderr.

Hypothesis settings keep the file well under a minute on a slow 2-core machine;
the live-manager tests use a fixed seed (the same examples every run) and do
not shrink (shrinking would reconnect hundreds of times).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import os
import pickle
import pickletools
import queue
import selectors
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, assume, configuration, given, seed, settings
from hypothesis import strategies as st

import _workers
import procshare
from procshare.transport import channel as transport
from procshare.wire.frames import (
    DEFAULT_LIMITS,
    GROW_FROM,
    HEADER,
    MAX_BUDGET,
    FrameError,
    FrameReader,
    Limits,
    encode_frame,
)
from procshare.wire.handshake import MAGIC
from procshare.wire.kinds import Kind

# hypothesis' caches go to this run's private temp dir (see conftest), not the work tree
configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hypothesis"))

MiB = 1 << 20
_BUFLEN = struct.Struct("!Q")

READER_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))
LIVE_SETTINGS = settings(deadline=None, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))


# -- building and breaking byte streams ------------------------------------------------------


def wire(kind, rid, body, buffers=(), budget=math.nan):
    return b"".join(bytes(p) for p in encode_frame(kind, rid, body, buffers, budget))


budgets = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -1.0, 0.0, MAX_BUDGET, MAX_BUDGET * 2])
rids = st.integers(0, 2**64 - 1) | st.integers(0, 3)
kinds = st.sampled_from(list(Kind)) | st.integers(0, 255)


@st.composite
def valid_frames(draw, kind=kinds, body=st.binary(max_size=300)):
    """(bytes, (kind, rid, budget, body, buffers)) of one well-formed frame."""
    k, rid, b = draw(kind), draw(rids), draw(body)
    bufs = draw(st.lists(st.binary(max_size=200), max_size=4))
    budget = draw(budgets)
    return wire(k, rid, b, bufs, budget), (k, rid, budget, b, bufs)


@st.composite
def absurd_headers(draw, kind=kinds):
    """A header claiming too much, or far more than follows, maybe with a buffer table."""
    blen = draw(st.sampled_from([2**32 - 1, 2**31, GROW_FROM + 1, 3 * GROW_FROM, 1 << 30])
                | st.integers(0, 2**32 - 1))
    nbufs = draw(st.sampled_from([0, 0, 1, 3, 0xFFFF]) | st.integers(0, 0xFFFF))
    head = HEADER.pack(blen, draw(kind), draw(st.integers(0, 255)), nbufs, draw(rids),
                       draw(budgets))
    lengths = draw(st.lists(st.sampled_from([0, 1, GROW_FROM, 2**34, 2**63, 2**64 - 1])
                            | st.integers(0, 2**64 - 1), max_size=min(nbufs, 4)))
    return head + b"".join(_BUFLEN.pack(n) for n in lengths)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**32), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**32), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**32)),
    st.tuples(st.just("dup"), st.integers(0, 2**32), st.integers(1, 64), st.integers(0, 2**32)),
    st.tuples(st.just("delete"), st.integers(0, 2**32), st.integers(1, 16)),
    st.tuples(st.just("u32"), st.integers(0, 2**32),
              st.sampled_from([2**32 - 1, 2**31, GROW_FROM + 1, 0])),
    st.tuples(st.just("u16"), st.integers(0, 2**32), st.sampled_from([0xFFFF, 0x8000, 7, 0])),
)


def mutate(data: bytes, ops) -> bytes:
    """Apply bit flips, byte changes, truncations, duplicated and deleted slices."""
    out = bytearray(data)
    for op in ops:
        if not out:
            break
        name, where = op[0], op[1] % len(out)
        if name == "flip":
            out[where] ^= 1 << op[2]
        elif name == "set":
            out[where] = op[2]
        elif name == "truncate":
            del out[where:]
        elif name == "dup":
            piece = out[where:where + op[2]]
            at = op[3] % (len(out) + 1)
            out[at:at] = piece
        elif name == "delete":
            del out[where:where + op[2]]
        elif name == "u32":
            out[where:where + 4] = struct.pack("!I", op[2])
        elif name == "u16":
            out[where:where + 2] = struct.pack("!H", op[2])
    return bytes(out)



def cut_points(data_len, fractions):
    return sorted({int(f * data_len) for f in fractions})


# -- FrameReader: never anything but frames, None or FrameError ---------------------------------


def check_frame(frame, limits):
    assert isinstance(frame, tuple) and len(frame) == 5
    kind, rid, budget, body, buffers = frame
    assert 0 <= kind <= 255 and 0 <= rid < 2**64
    assert math.isnan(budget) or 0.0 <= budget <= MAX_BUDGET
    assert isinstance(body, (bytes, bytearray))
    assert isinstance(buffers, tuple) and all(type(b) is bytearray for b in buffers)
    assert len(body) <= limits.max_body and len(buffers) <= limits.max_buffers
    assert len(body) + sum(map(len, buffers)) <= limits.max_frame


def run_reader(data, cuts, limits=DEFAULT_LIMITS, use_room=()):
    """Feed `data` cut at `cuts`; at the k-th chunk write through room()/commit()
    when `use_room[k]` and the reader offers a view.  Returns (frames, error?)."""
    reader = FrameReader(limits)
    got = []
    start = 0
    bound = 4 * MiB + len(data) + 0xFFFF
    try:
        for k, end in enumerate([*cuts, len(data)]):
            chunk = data[start:end]
            start = end
            while chunk:
                room = reader.room() if k < len(use_room) and use_room[k] else None
                if room is None:
                    reader.feed(chunk)
                    chunk = b""
                else:
                    n = min(len(room), len(chunk))
                    room[:n] = chunk[:n]
                    reader.commit(n)
                    chunk = chunk[n:]
                while (frame := reader.next_frame()) is not None:
                    check_frame(frame, limits)
                    got.append((frame[0], frame[1], repr(frame[2]), bytes(frame[3]),
                                tuple(bytes(b) for b in frame[4])))
                assert 0 <= reader.buffered <= bound
    except FrameError:
        for _ in range(2):
            with pytest.raises(FrameError):
                reader.next_frame()
        return got, True
    if not reader.in_frame:     # every byte fed is in a frame returned
        assert reader.buffered == 0
        assert len(data) == sum(HEADER.size + 8 * len(f[4]) + len(f[3]) + sum(map(len, f[4]))
                                for f in got)
    return got, False


@st.composite
def streams(draw):
    """Valid frames, absurd headers and random bytes, concatenated, maybe mutated."""
    pieces = draw(st.lists(st.one_of(valid_frames().map(lambda f: f[0]), absurd_headers(),
                                     st.binary(max_size=200)), max_size=6))
    data = mutate(b"".join(pieces), draw(st.lists(mutation, max_size=4)))
    return data


small_limits = st.builds(Limits, max_body=st.integers(0, 400), max_frame=st.integers(0, 800),
                         max_buffers=st.integers(0, 5))


@READER_SETTINGS
@given(data=streams(), fractions=st.lists(st.floats(0, 1), max_size=12),
       use_room=st.lists(st.booleans(), max_size=13),
       limits=st.sampled_from([DEFAULT_LIMITS]) | small_limits)
def test_reader_only_returns_frames_none_or_frame_error(data, fractions, use_room, limits):
    run_reader(data, cut_points(len(data), fractions), limits, use_room)


@READER_SETTINGS
@given(data=st.binary(max_size=4096), fractions=st.lists(st.floats(0, 1), max_size=8))
def test_reader_fed_random_bytes(data, fractions):
    run_reader(data, cut_points(len(data), fractions))


@READER_SETTINGS
@given(frames=st.lists(valid_frames(), min_size=1, max_size=5),
       fractions=st.lists(st.floats(0, 1), max_size=12),
       use_room=st.lists(st.booleans(), max_size=13),
       cut=st.floats(0, 1))
def test_reader_roundtrips_valid_frames_and_truncations(frames, fractions, use_room, cut):
    data = b"".join(f[0] for f in frames)
    want = [(k, rid, repr(budget if math.isnan(budget) or 0.0 <= budget <= MAX_BUDGET
                          else (0.0 if budget < 0 else math.nan)),
             bytes(body), tuple(bytes(b) for b in bufs))
            for _, (k, rid, budget, body, bufs) in frames]
    got, error = run_reader(data, cut_points(len(data), fractions), use_room=use_room)
    assert (got, error) == (want, False)
    # a truncated stream gives exactly the frames that are whole in it
    end = int(cut * len(data))
    whole = 0
    pos = 0
    for f, _ in frames:
        pos += len(f)
        if pos <= end:
            whole += 1
    got, error = run_reader(data[:end], cut_points(end, fractions), use_room=use_room)
    assert (got, error) == (want[:whole], False)


@READER_SETTINGS
@given(data=streams(), fractions=st.lists(st.floats(0, 1), min_size=1, max_size=12),
       use_room=st.lists(st.booleans(), max_size=13))
def test_reader_result_does_not_depend_on_how_the_bytes_are_cut(data, fractions, use_room):
    """Whole, cut at random points, byte by byte: the same frames and the same error."""
    whole = run_reader(data, [])
    assert run_reader(data, cut_points(len(data), fractions), use_room=use_room) == whole
    if len(data) <= 600:
        assert run_reader(data, list(range(1, len(data)))) == whole


# -- a live manager, in a subprocess whose stderr we read -------------------------------------

SERVER_SCRIPT = r"""
import json, sys
import procshare
key = bytes.fromhex(sys.argv[1])
address = json.loads(sys.argv[2])
if isinstance(address, list):
    address = tuple(address)
m = procshare.SyncManager(address=address, authkey=key)
m.start()
lst = m.list([1])
print(json.dumps({"address": m.address, "pid": m.pid}), flush=True)
for line in sys.stdin:
    if line.strip() != "check":
        break
    lst.append(len(lst) + 1)
    d = m.dict(a=1)
    d["b"] = [2]
    print(json.dumps({"list": lst[:], "dict": d.copy(),
                      "log": m._control("server_info")["log"]}), flush=True)
    del d
del lst
m.shutdown()
print(json.dumps("stopped"), flush=True)
"""

FORBIDDEN_IN_STDERR = ("Traceback", "SystemError", "MemoryError", "Exception in thread",
                       "unexpected error")


class LiveManager:
    """A procshare manager started by a helper process whose stdout and stderr
    (inherited by the manager) this test reads; driven through stdin."""

    def __init__(self, address):
        self.key = os.urandom(32)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, self.key.hex(), json.dumps(address)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_workers.subprocess_env())
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append),
                             daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.pid = None
        try:
            info = self._line(30)
        except BaseException:
            self.close_after_failure()
            raise
        self.address = tuple(info["address"]) if isinstance(info["address"], list) \
            else info["address"]
        self.pid = info["pid"]

    @staticmethod
    def _pump(stream, put):
        for line in stream:
            put(line)

    def _line(self, timeout):
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"the manager script said nothing for {timeout} s; "
                                 f"stderr: {''.join(self.err)}") from None

    def check(self):
        """A normal proxy call (list.append, a new dict) and the server's log."""
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self._line(20)

    def rss(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout=20):
        """Shut the manager down; return what it and its starter wrote to stderr."""
        if not self.proc.stdin.closed:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        assert self._line(timeout) == "stopped"
        assert self.proc.wait(timeout) == 0
        for t in self._threads:
            t.join(5)
        return "".join(self.err)

    def close_after_failure(self):
        """Stop the manager if it still answers; else kill it and its starter (by
        their pids) and remove its socket file."""
        try:
            self.stop(timeout=5)
            return
        except BaseException:
            pass
        for pid in (self.pid, self.proc.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        address = getattr(self, "address", None)
        if isinstance(address, str) and not address.startswith("\0"):
            try:
                os.unlink(address)
            except OSError:
                pass


def connect(address, timeout=5.0):
    ch = transport.connect(address, timeout=timeout)
    ch.sock.settimeout(timeout)
    return ch


def recv_exactly(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def exchange(sock, data, timeout=10.0):
    """Send `data` then half-close, while reading until the server closes.
    Returns everything the server sent.  A server that closes before taking
    all of `data` is fine (it refused the stream); one that does not close
    within `timeout` seconds fails the test."""
    sock.setblocking(False)
    view = memoryview(data)
    out = bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        def done_sending():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sel.modify(sock, selectors.EVENT_READ)

        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        if not view:
            done_sending()
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server did not close the connection in {timeout} s"
            for _key, events in sel.select(left):
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 16)
                    except BlockingIOError:
                        chunk = None
                    except ConnectionResetError:    # closed with our bytes unread
                        return bytes(out)
                    if chunk == b"":
                        return bytes(out)
                    if chunk:
                        out += chunk
                if events & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view[:1 << 16]):]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        view = view[:0]
                    if not view:
                        done_sending()


def parse_replies(data):
    """The frames a manager sent: whole frames only, nothing left over."""
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    assert not reader.in_frame, f"a partial frame at the end of {data[-80:]!r}"
    return out


REPLY_KINDS = {Kind.RETURN, Kind.ERROR, Kind.TRACEBACK, Kind.PROXY, Kind.UNSERIALIZABLE,
               Kind.TIMEOUT, Kind.WARNED}


# -- what the fuzzing client sends after the handshake --------------------------------------

_ALNUM = string.ascii_letters + string.digits + "_#"
#: never the name of a real object, module or manager operation
names = st.text(_ALNUM, max_size=10).map(lambda s: "zz" + s)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | names
           | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.lists(inner, max_size=3).map(tuple)
                      | st.dictionaries(names, inner, max_size=2), max_leaves=6)
#: manager operations (and object methods) that neither stop the manager nor start
#: processes; `harmless` keeps "shutdown" and "Pool" out of mutated bodies too
SAFE_OPS = ["dummy", "number_of_objects", "debug_info", "server_info", "clients",
            "list_objects", "locks", "get_methods", "incref", "decref", "create", "adopt",
            "accept_connection", "release_loan", "fork_loan", "#GETVALUE", "__repr__",
            "__str__", "#UPDATE_ITEM", "append", "get"]
create_args = st.tuples(st.sampled_from(["dict", "list", "Namespace", "Lock", "Event", "zznope"])
                        | names | st.integers(), values)
# hashable object ids only: an unhashable one is a known bug
# (test_call_with_an_unhashable_object_id_is_answered)
oids = st.one_of(st.none(), st.none(), st.none(), names, st.integers(),
                 st.tuples(st.integers(), names))


@st.composite
def call_bodies(draw):
    meth = draw(st.sampled_from(SAFE_OPS) | names)
    args = draw(st.one_of(create_args, st.lists(values, max_size=3).map(tuple), values))
    kwds = draw(st.dictionaries(names, values, max_size=2) | values)
    msg = (draw(oids), meth, args, kwds) if draw(st.integers(0, 5)) else draw(values)
    return pickle.dumps(msg, protocol=draw(st.integers(0, 5)))


@st.composite
def call_frames(draw):
    body = draw(st.one_of(
        call_bodies(), call_bodies(),
        call_bodies().flatmap(lambda b: st.lists(mutation, min_size=1, max_size=3)
                              .map(lambda ops: mutate(b, ops))),
        st.binary(max_size=200),                                # garbage "pickles"
    ))
    bufs = draw(st.lists(st.binary(max_size=50), max_size=2) | st.just([]))
    return wire(Kind.CALL, draw(rids), body, bufs, draw(budgets))


@st.composite
def call_streams(draw):
    """What a broken or hostile client sends after its hello: mostly CALL frames
    (valid calls, mutated ones, garbage bodies), sometimes frames of other kinds,
    absurd headers or random bytes; the whole maybe mutated."""
    pieces = draw(st.lists(st.one_of(
        call_frames(), call_frames(), call_frames(),
        valid_frames().map(lambda f: f[0]),
        absurd_headers(kind=st.just(Kind.CALL) | kinds),
        st.binary(max_size=100)), max_size=6))
    data = b"".join(pieces)
    if draw(st.integers(0, 3)) == 0:
        data = mutate(data, draw(st.lists(mutation, min_size=1, max_size=3)))
    return data


def harmless(body) -> bool:
    """A body the manager may unpickle while fuzzing: it names no global (nothing
    is imported or called) and puts nothing in the memo at an absurd index (the
    unpickler would allocate the whole memo up to it).  Read statically, up to
    where the real unpickler would stop too."""
    if b"shutdown" in body or b"Pool" in body:
        return False
    try:
        for op, arg, _pos in pickletools.genops(bytes(body)):
            if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"):
                return False
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg < 10_000:
                return False
    except Exception:
        pass
    return True


def expected_rids(stream, first_kind=Kind.CALL):
    """What the manager must do with `stream`: the request ids it answers, in
    order, and whether the stream ends with a whole frame it serves (so it keeps
    the connection until we close).  `assume`s the stream is safe to send."""
    reader = FrameReader()
    reader.feed(stream)
    rids, kind_wanted, served_all = [], first_kind, False
    try:
        while (frame := reader.next_frame()) is not None:
            kind, rid, _budget, body, bufs = frame
            if kind != kind_wanted:
                return rids, False
            assume(harmless(body))
            if kind == Kind.CALL and rid:
                rids.append(rid)
            kind_wanted = Kind.CALL
        served_all = not reader.in_frame
    except FrameError:
        pass
    return rids, served_all


# -- the live-manager fuzzers ---------------------------------------------------------------


def fuzz_before_auth(m, examples, seed_value):
    seen = set()

    @seed(seed_value)
    @settings(LIVE_SETTINGS, max_examples=examples)
    @given(data=st.data())
    def one(data):
        mode = data.draw(st.sampled_from(["garbage", "short", "mutated", "mutated", "valid"]))
        theirs = data.draw(st.binary(min_size=32, max_size=32))
        garbage = data.draw(st.binary(max_size=300))
        ops = data.draw(st.lists(mutation, min_size=1, max_size=3))
        cut = data.draw(st.integers(0, 69))
        sock = connect(m.address).sock
        try:
            challenge = recv_exactly(sock, len(MAGIC) + 32)
            assert challenge[:len(MAGIC)] == MAGIC and len(challenge) == 38
            right = MAGIC + hmac.new(m.key, challenge[6:], hashlib.sha256).digest() + theirs
            payload = {"garbage": garbage, "short": right[:cut], "valid": right,
                       "mutated": mutate(right + garbage[:40], ops)}[mode]
            got = exchange(sock, payload)
        finally:
            sock.close()
        if len(payload) < 70:
            assert got == b""                              # EOF before the handshake ended
            seen.add("eof")
        elif payload[:6] != MAGIC:
            assert got == b""                              # not our protocol: closed
            seen.add("foreign")
        elif payload[6:38] == right[6:38]:                 # the right digest: proven;
            # the manager proves itself on the challenge we sent, whatever it is
            assert got[:34] == b"OK" + hmac.new(m.key, payload[38:70], hashlib.sha256).digest()
            seen.add("ok")
        else:
            assert got == b"NO" + bytes(32)                # wrong digest: told so
            seen.add("no")

    one()
    assert seen == {"eof", "ok", "foreign", "no"}


HELLO = json.dumps({"client": "test", "pid": os.getpid(), "serializer": "pickle"}).encode()
_clients = itertools.count()


def hello():
    """A valid hello from a new client (each connection is its own client, so that
    closing it releases whatever it created)."""
    return json.dumps({"client": f"fuzz-{os.getpid()}-{next(_clients)}", "pid": os.getpid(),
                       "serializer": "pickle"}).encode()


DUMMY_RID = 2**64 - 2
DUMMY = wire(Kind.CALL, DUMMY_RID, pickle.dumps((None, "dummy", (), {})))

hello_dicts = st.fixed_dictionaries(
    {"client": names | st.integers()},
    optional={"pid": st.integers(-2**70, 2**70) | st.floats(allow_infinity=False) | names,
              "serializer": st.sampled_from(["pickle", "pickle+zz", "json", "zz"])
              | st.integers(),
              "thread": st.integers(0, 2**64) | names,
              "thread_name": names, "role": st.sampled_from(["call", "control", "zz"])})


@st.composite
def fuzzed_hellos(draw):
    value = draw(hello_dicts | values)
    body = json.dumps(value, default=repr).encode() if draw(st.booleans()) \
        else pickle.dumps(value)
    if draw(st.booleans()):
        body = mutate(body, draw(st.lists(mutation, min_size=1, max_size=2)))
    return wire(draw(st.sampled_from([Kind.HELLO] * 4 + [Kind.CALL]) | kinds), draw(rids),
                body, [], draw(budgets))


def fuzz_after_auth(m, examples, seed_value):
    seen = {"served": 0, "closed": 0, "hello": 0}

    @seed(seed_value)
    @settings(LIVE_SETTINGS, max_examples=examples)
    @given(data=st.data())
    def one(data):
        if data.draw(st.integers(0, 5)) == 0:
            fuzz_hello(data)
            return
        stream = data.draw(call_streams()) + DUMMY
        rids, served_all = expected_rids(stream)
        ch = connect(m.address)
        try:
            transport.client_handshake(ch, m.key, m.address, timeout=5)
            ch.send(encode_frame(Kind.HELLO, 1, hello()))
            kind, rid, _b, body, _bufs = ch.recv_frame(time.monotonic() + 5)
            assert (kind, rid) == (Kind.RETURN, 1) and json.loads(body)["pid"] == m.pid
            assert not ch.reader.in_frame
            replies = parse_replies(exchange(ch.sock, stream))
        finally:
            ch.close()
        assert [r[1] for r in replies] == rids
        assert {r[0] for r in replies} <= REPLY_KINDS
        if served_all and stream.endswith(DUMMY) and rids and rids[-1] == DUMMY_RID:
            assert replies[-1][0] == Kind.RETURN and pickle.loads(replies[-1][3]) is None
            seen["served"] += 1
        else:
            seen["closed"] += 1

    def fuzz_hello(data):
        stream = data.draw(fuzzed_hellos()) + data.draw(call_streams())
        expected_rids(stream, first_kind=Kind.HELLO)     # only for its assumes
        ch = connect(m.address)
        try:
            transport.client_handshake(ch, m.key, m.address, timeout=5)
            replies = parse_replies(exchange(ch.sock, stream))
        finally:
            ch.close()
        assert {r[0] for r in replies} <= REPLY_KINDS
        seen["hello"] += 1

    one()
    assert min(seen.values()) > 0, seen


def check_server(m, before_rss, must_log):
    state = m.check()
    log = state["log"]
    assert state["dict"] == {"a": 1, "b": [2]}
    assert all(any(text in line for line in log) for text in must_log), log
    assert not any("unexpected error" in line or "out of memory" in line for line in log), log
    grown = m.rss() - before_rss
    assert grown < 100 * MiB, f"the manager's RSS grew by {grown / MiB:.1f} MiB"
    return state["list"]


@pytest.mark.parametrize("family, seed_value", [("unix", 1), ("tcp", 2)])
def test_live_manager_survives_random_and_mutated_bytes(family, seed_value):
    m = LiveManager(None if family == "unix" else ["127.0.0.1", 0])
    try:
        if family == "tcp":
            assert isinstance(m.address, tuple) and m.address[0] == "127.0.0.1"
        assert m.check()["list"] == [1, 2]
        before = m.rss()
        fuzz_before_auth(m, examples=100 if family == "unix" else 40, seed_value=seed_value)
        assert check_server(m, before, ["refused a connection"]) == [1, 2, 3]
        fuzz_after_auth(m, examples=220, seed_value=seed_value)
        assert check_server(m, before, ["bad frame"]) == [1, 2, 3, 4]
        stderr = m.stop()
    except BaseException:
        m.close_after_failure()
        raise
    for text in FORBIDDEN_IN_STDERR:
        assert text not in stderr, stderr


# -- server bugs the fuzzer found (the fuzzers above steer clear of them) -----------------------


def _session(m, hello_body=HELLO):
    ch = connect(m.address)
    transport.client_handshake(ch, bytes(m._authkey), m.address, timeout=5)
    ch.send(encode_frame(Kind.HELLO, 1, hello_body))
    return ch


def test_call_with_an_unhashable_object_id_is_answered():
    with procshare.Manager() as m:
        ch = _session(m)
        try:
            assert ch.recv_frame(time.monotonic() + 5)[0] == Kind.RETURN
            ch.send(encode_frame(Kind.CALL, 5, pickle.dumps((["x"], "m", (), {}))))
            kind, rid = ch.recv_frame(time.monotonic() + 5)[:2]
            assert rid == 5 and kind in (Kind.ERROR, Kind.TRACEBACK, Kind.UNSERIALIZABLE)
        finally:
            ch.close()


def test_hello_with_values_of_the_wrong_type_is_a_bad_frame():
    hellos = [{"client": "x", "serializer": "pickle", "pid": math.inf},
              {"client": "x", "serializer": "pickle", "thread": -math.inf},
              {"client": "x", "serializer": "pickle", "adopt": ["x"]}]
    with procshare.Manager() as m:
        for hello in hellos:
            ch = _session(m, json.dumps(hello).encode())
            try:
                with pytest.raises(EOFError):
                    ch.recv_frame(time.monotonic() + 5)
            finally:
                ch.close()
        log = m._control("server_info")["log"]
        assert sum("bad frame" in line for line in log) == len(hellos), log
        assert not any("unexpected error" in line for line in log), log
