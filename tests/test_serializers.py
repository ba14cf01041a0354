"""Serializers: pickle-5 with out-of-band buffers, cloudpickle, dill, msgpack,
user-supplied pairs and per-type serializers; the hello that makes both ends
agree; and msgpack's promise never to run code on load.

Real manager processes under fork and spawn; bounded waits.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import pickle
import queue
import time

import pytest

import _error_workers as ew
import _workers
import procshare
from _helpers import FAULT_START_METHODS
from _workers import run_child
from procshare.errors import (
    ArgumentsNotDeserializable,
    ArgumentsNotSerializable,
    RemoteError,
    SerializationError,
    SerializerMismatch,
)
from procshare.transport import channel as transport
from procshare.wire import frames, serializers
from procshare.wire.kinds import Kind
from procshare.wire.serializers import (
    IN_BAND_MAX,
    OOB_THRESHOLD,
    FunctionSerializer,
    MsgpackSerializer,
    PickleSerializer,
    get_serializer,
    register_serializer,
)

START_METHODS = FAULT_START_METHODS
INSTALLED = serializers.available_serializers()
needs = {name: pytest.mark.skipif(name not in INSTALLED, reason=f"{name} is not installed")
         for name in ("cloudpickle", "dill", "msgpack")}


def started(ctx_name: str, **kwargs):
    m = procshare.SyncManager(ctx=multiprocessing.get_context(ctx_name), **kwargs)
    m.start()
    return m


# -- pickle and out-of-band buffers -----------------------------------------------------------

def test_small_messages_are_one_plain_pickle():
    ser = get_serializer("pickle")
    msg = ("id", "meth", (1, "two", [3.0]), {"k": None})
    body, bufs = ser.dumps(msg)
    assert body == pickle.dumps(msg, 5) and not bufs
    assert ser.loads(body, bufs) == msg


def test_large_buffers_go_out_of_band_without_copies():
    ser = get_serializer("pickle")
    big = bytes(OOB_THRESHOLD * 4)
    arr = bytearray(b"y" * OOB_THRESHOLD)
    view = memoryview(bytearray(OOB_THRESHOLD * 2)).cast("I")
    body, bufs = ser.dumps(("id", "set", (big, arr, view), {}))
    assert len(body) < 1024 and len(bufs) == 3
    assert bufs[0].obj is big and bufs[1].obj is arr       # views of the originals
    out = ser.loads(body, [bytearray(b) for b in bufs])
    assert out[2][0] == big and out[2][1] == arr and type(out[2][1]) is bytearray
    assert out[2][2].format == "I" and out[2][2].tolist() == view.tolist()


def test_a_pickle_of_at_most_IN_BAND_MAX_keeps_its_bytes_in_band():
    """Below IN_BAND_MAX the whole message is one body (cheaper through the
    socket than out of band); above it, large bytes values go out of band, also
    when each of them is small enough and only their sum is large."""
    ser = get_serializer("pickle")
    one = ("id", "set", ("k", b"a" * (OOB_THRESHOLD + 1)), {})
    body, bufs = ser.dumps(one)
    assert not bufs and OOB_THRESHOLD < len(body) <= IN_BAND_MAX
    assert ser.loads(body, bufs) == one
    arr = ("id", "set", ("k", bytearray(b"b" * OOB_THRESHOLD)), {})
    body, bufs = ser.dumps(arr)
    assert not bufs and type(ser.loads(body, bufs)[2][1]) is bytearray
    big = ("id", "set", ("k", b"c" * (IN_BAND_MAX + 1)), {})
    body, bufs = ser.dumps(big)
    assert len(body) < 1024 and len(bufs) == 1 and bufs[0].obj is big[2][1]
    many = ("id", "set", ("k", [bytes([i]) * OOB_THRESHOLD for i in range(3)]), {})
    body, bufs = ser.dumps(many)
    assert len(body) < 1024 and len(bufs) == 3
    assert ser.loads(body, [bytearray(b) for b in bufs]) == many


def test_numpy_arrays_go_out_of_band_and_through_a_manager():
    np = pytest.importorskip("numpy")
    ser = get_serializer("pickle")
    a = np.arange(200_000, dtype=np.float64)
    body, bufs = ser.dumps(a)
    assert len(body) < 1024 and len(bufs) == 1
    assert np.shares_memory(np.frombuffer(bufs[0], dtype=np.float64), a)  # no copy
    with procshare.Manager() as m:
        d = m.dict()
        d["a"] = a
        back = d["a"]
        assert back.dtype == a.dtype and np.array_equal(back, a)


@pytest.mark.parametrize("name", ["pickle", "cloudpickle", "dill", "msgpack"])
def test_every_serializer_round_trips_plain_messages(name):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed")
    ser = get_serializer(name)
    msg = (None, "m", (1, -2**70, 1.5, math.inf, "s", b"b", None, True, [1, (2, 3)],
                       {"k": {4, 5}}, frozenset([6]), 1 + 2j), {"kw": (7,)})
    body, bufs = ser.dumps(msg)
    assert ser.loads(body, bufs) == msg
    big = ("x", b"z" * (OOB_THRESHOLD * 2))
    body, bufs = ser.dumps(big)
    assert ser.loads(body, [bytearray(b) for b in bufs]) == big



@pytest.mark.parametrize("name", ["pickle", "cloudpickle", "dill", "msgpack"])
def test_call_bodies_without_arguments_are_made_once(name):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed")
    from procshare.wire import serializers
    ser = get_serializer(name)
    body, bufs = ser.dumps_call("o1", "get", (), {})
    assert body == ser.dumps(("o1", "get", (), {}))[0] and not bufs
    assert ser.dumps_call("o1", "get", (), {})[0] is body      # kept, not made again
    assert ser.dumps_call("o2", "get", (), {})[0] is not body
    # calls with arguments are serialized each time, as they are
    args = [1]
    first = ser.dumps_call("o1", "get", tuple(args), {})
    args.append(2)
    second = ser.dumps_call("o1", "get", tuple(args), {"k": 3})
    assert first[0] == ser.dumps(("o1", "get", (1,), {}))[0]
    assert second[0] == ser.dumps(("o1", "get", (1, 2), {"k": 3}))[0]
    # the cache is bounded
    for i in range(serializers._BARE_CALLS + 10):
        ser.dumps_call(f"x{i}", "m", (), {})
    assert len(ser._bare_calls) <= serializers._BARE_CALLS


def test_a_users_serializer_is_asked_for_every_call_body():
    # a user's dumps may put a counter or a nonce in each message, or reuse
    # one buffer: its bodies are never kept
    out = bytearray()
    seen = []

    def dumps(obj):
        seen.append(obj)
        out[:] = pickle.dumps((len(seen), obj))
        return out

    ser = FunctionSerializer("counting", dumps, pickle.loads)
    first = bytes(ser.dumps_call("o1", "get", (), {})[0])
    ser.dumps_call("o2", "size", (1,), {})
    again = bytes(ser.dumps_call("o1", "get", (), {})[0])
    assert len(seen) == 3 and first != again
    assert pickle.loads(again) == (3, ("o1", "get", (), {}))


# -- cloudpickle and dill ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cloudpickle", "dill"])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_code_carrying_serializers_move_lambdas_and_local_classes(name, start_method):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed")
    m = started(start_method, serializer=name)
    try:
        d = m.dict()
        factor = 3
        d["f"] = lambda x: x * factor                  # a closure

        class Local:
            def __init__(self, v):
                self.v = v
        d["obj"] = Local(5)
        assert d["f"](2) == 6 and d["obj"].v == 5
        assert run_child(multiprocessing.get_context(start_method), ew.lambdas_in_child,
                         d, 21) == 42
    finally:
        m.shutdown()


# -- msgpack --------------------------------------------------------------------------------

@needs["msgpack"]
@pytest.mark.parametrize("start_method", START_METHODS)
def test_msgpack_manager_serves_plain_data(start_method):
    m = started(start_method, serializer="msgpack")
    try:
        d = m.dict()
        d["t"] = (1, [2, (3,)], {"x": {4}}, b"bytes", 2**80)
        assert d["t"] == (1, [2, (3,)], {"x": {4}}, b"bytes", 2**80)
        assert sorted(d.keys()) == ["t"] and list(d) == ["t"]      # dict views, iterators
        with pytest.raises(KeyError) as info:                       # exceptions keep their type
            d["missing"]
        assert "In the manager process" in str(info.value.__cause__)
        q = m.Queue()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        q.put({"job": 1})
        assert q.get(timeout=5) == {"job": 1}
        assert run_child(multiprocessing.get_context(start_method), ew.plain_in_child, d) == \
            (1, {2, 3}, b"x")
    finally:
        m.shutdown()


@needs["msgpack"]
def test_msgpack_refuses_objects_with_a_clear_error():
    with procshare.Manager(serializer="msgpack") as m:
        d = m.dict()
        with pytest.raises(ArgumentsNotSerializable) as info:
            d["box"] = ew.Box()
        text = str(info.value)
        assert "'msgpack'" in text and "args[1] -> <_error_workers.Box object>" in text
        assert "plain data only" in text and "serializer='pickle'" in text
        with pytest.raises(SerializationError) as info:
            d["proxy"] = m.list()                       # nested managed objects need pickle
        assert "proxy" in str(info.value) and "pickle-family" in str(info.value)
        d["ok"] = 1
        assert d["ok"] == 1


@needs["msgpack"]
def test_msgpack_rebuilds_only_known_exception_classes():
    ser = MsgpackSerializer()
    known = ser.loads(*ser.dumps(ValueError("bad", 1)))
    assert type(known) is ValueError and known.args == ("bad", 1)
    unknown = ser.loads(*ser.dumps(_Custom("x")))
    assert type(unknown) is RemoteError and "_Custom" in str(unknown)
    # exception classes travel by name (warning categories); unknown ones are refused
    assert ser.loads(*ser.dumps(RuntimeWarning)) is RuntimeWarning
    with pytest.raises(ValueError, match="refusing to load class"):
        ser.loads(*ser.dumps(_Custom))
    with pytest.raises(TypeError, match="cannot carry classes"):
        ser.dumps(ew.Box)                        # other classes are not data
    crashed = procshare.errors.manager_crashed("addr", None)
    again = ser.loads(*ser.dumps(crashed))
    assert type(again) is type(crashed) and again.address == "addr"


class _Custom(Exception):
    pass


@needs["msgpack"]
def test_msgpack_never_runs_code_on_load(tmp_path):
    mark = tmp_path / "executed"
    payload = pickle.dumps((None, "dummy", (ew.Evil(str(mark)),), {}), 5)
    ser = MsgpackSerializer()
    with pytest.raises(ValueError):           # msgpack's ExtraData / FormatError
        ser.loads(payload, [])
    # a value packed by pickle inside msgpack is refused too
    packed = serializers.Packed(get_serializer("pickle"), ew.Evil(str(mark)))
    m = pytest.importorskip("msgpack")
    body = m.packb(m.ExtType(11, m.packb(["pickle", packed.body, []])))
    with pytest.raises(ValueError, match="refusing"):
        ser.loads(body, [])
    # and a msgpack manager does not unpickle a request: it says it cannot read it
    with procshare.Manager(serializer="msgpack") as mgr:
        ch = transport.connect(mgr.address)
        try:
            transport.client_handshake(ch, bytes(multiprocessing.current_process().authkey),
                                       mgr.address)
            hello = {"client": "evil", "pid": os.getpid(), "serializer": "msgpack",
                     "role": "call"}
            ch.send(frames.encode_frame(Kind.HELLO, 1, serializers.encode_hello(hello)))
            assert ch.recv_frame(time.monotonic() + 5)[0] == Kind.RETURN
            ch.send(frames.encode_frame(Kind.CALL, 2, payload))
            kind, rid, _b, body, bufs = ch.recv_frame(time.monotonic() + 5)
        finally:
            ch.close()
        assert (kind, rid) == (Kind.UNSERIALIZABLE, 2)
        message, facts = ser.loads(body, bufs)
        assert facts["direction"] == "arguments" and "did not run" in message
    assert not mark.exists()


# -- agreeing on the serializer ----------------------------------------------------------------

@needs["msgpack"]
def test_serializer_mismatch_names_both_ends():
    with procshare.Manager(serializer="msgpack") as m:
        other = procshare.SyncManager(address=m.address)          # pickle, the default
        with pytest.raises(SerializerMismatch) as info:
            other.connect()
        e = info.value
        assert isinstance(e, SerializationError) and isinstance(e, TypeError)
        assert "'msgpack'" in str(e) and "'pickle'" in str(e)
        assert (e.manager_serializer, e.client_serializer) == ("msgpack", "pickle")
        log = "\n".join(m._control("server_info")["log"])
        assert "refused a client that uses serializer 'pickle'" in log


def test_the_hello_is_json_whatever_the_serializer():
    hello = {"client": "c", "pid": 1, "serializer": "msgpack", "address": ("h", 2)}
    body = serializers.encode_hello(hello)
    assert body.startswith(b"{")
    assert serializers.decode_hello(body, [], get_serializer("pickle"))["serializer"] == \
        "msgpack"
    # a peer that pickles its hello is still understood by a pickle manager
    assert serializers.decode_hello(pickle.dumps(hello), [], get_serializer("pickle")) == hello
    with pytest.raises(frames.FrameError):
        serializers.decode_hello(b"\x93garbage", [], get_serializer("pickle"))


def test_unknown_serializer_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_serializer("yaml")
    assert "'pickle'" in str(info.value) and "msgpack" in str(info.value)
    with pytest.raises(ValueError, match="'\\+'"):
        register_serializer("a+b", PickleSerializer)


# -- user-supplied serializers ------------------------------------------------------------------

@pytest.mark.parametrize("start_method", START_METHODS)
def test_user_supplied_dumps_loads_object(start_method):
    ew.CALLS.update(dumps=0, loads=0)
    m = started(start_method, serializer=ew.ZlibPickle())
    try:
        d = m.dict()
        d["k"] = (1, [2], {"x": 3})
        assert d["k"] == (1, [2], {"x": 3})
        assert ew.CALLS["dumps"] >= 2 and ew.CALLS["loads"] >= 2   # it was really used
        assert m._control("server_info")["serializer"] == "zlib-pickle"
    finally:
        m.shutdown()


def test_user_serializer_registered_by_name():
    ser = get_serializer("zlib-pickle-by-name")
    assert isinstance(ser, FunctionSerializer) and ser.name == "zlib-pickle-by-name"
    with procshare.Manager(serializer="zlib-pickle-by-name") as m:
        lst = m.list([1, 2])
        lst.append((3,))
        assert lst[:] == [1, 2, (3,)]


# -- per-type serializers -----------------------------------------------------------------------

@needs["cloudpickle"]
@pytest.mark.parametrize("start_method", START_METHODS)
def test_per_type_serializer_carries_what_the_manager_serializer_cannot(start_method):
    m = ew.BoxManager(ctx=multiprocessing.get_context(start_method))
    m.start()
    try:
        cbox = m.CBox(lambda: "made with a lambda")          # constructor arguments too
        assert cbox.call(0) == "made with a lambda"
        n = 10
        cbox.put(lambda x: x + n)
        assert cbox.call(1, 5) == 15
        assert cbox.a_lambda(4)() == 4                       # results too
        assert cbox.put(3) == 3 and cbox.get(2) == 3         # plain values as usual
        # the proxy travels to a child process and keeps its serializer
        ctx = multiprocessing.get_context(start_method)
        assert run_child(ctx, ew.typed_box_in_child, cbox, 6) == 42
        # other types of the same manager still use plain pickle
        box = m.Box()
        with pytest.raises(ArgumentsNotSerializable):
            box.put(lambda: 1)
        with pytest.raises(SerializationError):
            box.a_lambda(1)
    finally:
        m.shutdown()


@needs["cloudpickle"]
@needs["msgpack"]
def test_msgpack_manager_refuses_unsafe_per_type_serializers():
    m = ew.BoxManager(serializer="msgpack")
    m.start()
    try:
        with pytest.raises(ValueError, match="never runs code on load"):
            m.CBox()
        box = m.Box()
        assert box.put("plain") == 1
    finally:
        m.shutdown()


def test_undecodable_request_is_reported_not_fatal():
    with procshare.Manager() as m:
        d = m.dict()
        ghost = type("Ghost2", (), {"__module__": "_error_workers"})
        ew.Ghost2 = ghost
        try:
            with pytest.raises(ArgumentsNotDeserializable):
                d["g"] = ghost()
        finally:
            del ew.Ghost2
        d["g"] = 1
        assert dict(d) == {"g": 1}


# -- the stdlib's 'xmlrpclib' serializer, scenario of CPython's test_remote ------------------

XMLRPC_VALUES = ["hello world", None, True, 2.25, "hall\xe5 v\xe4rld",
                 "\u043f\u0440\u0438\u0432\u0456\u0442 \u0441\u0432\u0456\u0442",
                 b"hall\xe5 v\xe4rld"]


@pytest.mark.parametrize("impl", ["stdlib", "procshare"])
def test_xmlrpclib_serializer_parity(impl):
    import os
    import time

    mod = importlib.import_module(
        "multiprocessing.managers" if impl == "stdlib" else "procshare.managers")
    server_cls = _workers.get_class(mod, "QueueManager")
    authkey = os.urandom(32)
    m = server_cls(address=("127.0.0.1", 0), authkey=authkey, serializer="xmlrpclib")
    m.start()
    try:
        client = server_cls(address=m.address, authkey=authkey, serializer="xmlrpclib")
        client.connect()
        q = client.get_queue()
        q.put(tuple(XMLRPC_VALUES))
        got = q.get()
        assert got == XMLRPC_VALUES                 # tuples arrive as lists, as in the stdlib
        assert type(got[-1]).__name__ == "Binary"   # and bytes as xmlrpc.client.Binary
        with pytest.raises(Exception):             # noqa: B017  (the stdlib's test says so)
            q.put(time.sleep)
        del q
    finally:
        m.shutdown()
