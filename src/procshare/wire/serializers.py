"""Serializers: the registry of named serializers and out-of-band buffers.

Owns: turning a message object into `(body, buffers)` and back, for every
serializer procshare offers: `pickle` (protocol 5, the default), `cloudpickle`
and `dill` (functions, lambdas, closures and local classes by value, when
installed), `msgpack` (plain data only, safe with untrusted peers) and
user-supplied dumps/loads pairs.  Also the hello's encoding, which every
serializer shares, and per-type serializers (`register(..., serializer=...)`).

Rules it keeps:
- The small-message path is one C-level pickling (`pickle` reuses a Pickler
  whose sink keeps the pickle's one chunk: within about 0.1 us of
  `pickle.dumps`);
  large values cost no second copy: pickle-5 buffers (ndarrays) of at least
  `OOB_THRESHOLD` go out of band as they are met, and a large `bytes` or
  `bytearray` reaches the sink as itself, uncopied (the C pickler writes
  values of 64 KiB or more straight to its file), after which the message is
  pickled again with such values lifted out of band, unless the whole pickle
  is at most `IN_BAND_MAX` bytes: then it stays one body (for a frame of that
  size the socket costs less than the out-of-band path: measured, 64 KiB set
  and got back in 128-160 us against 217-257 us, 176 KiB in 185-233 us against
  265-319 us; at 200-256 KiB it varied either way.  `IN_BAND_MAX` stays below
  that, with room under the 208 KiB a Unix socket buffers by default).  Pickle-5 buffers
  (ndarrays) go out of band from `OOB_THRESHOLD` whatever the size: in band
  they are copied into the pickle, and that costs more.  So the transport can
  write them with one `sendmsg`, or copy each once into shared memory, and
  the receiver can take them straight into place.
- A serializer is an object with `name`, `safe`, `dumps(obj) -> (body, buffers)`
  and `loads(body, buffers) -> obj`.  `safe` means loads never runs code chosen
  by the data (msgpack); the pickle family is not safe.
- Both ends name their serializer in the hello, which is JSON whatever the
  serializer, so that a mismatch can always be read and reported by name.
- A per-type serializer never changes the envelope: a value the manager's
  serializer cannot carry is packed by the type's serializer into a `Packed`
  value inside it.  A safe envelope (msgpack) only carries values packed by a
  safe serializer, so a msgpack manager never runs code on load.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import pickle
import sys
from collections.abc import Callable
from typing import Any

from .records import Token, is_proxy, is_proxy_type

__all__ = ["Serializer", "PickleSerializer", "CloudpickleSerializer", "DillSerializer",
           "MsgpackSerializer", "FunctionSerializer", "TypedSerializer", "Packed",
           "get_serializer", "register_serializer", "available_serializers", "UnknownSerializer",
           "typed_serializer", "encode_hello", "decode_hello", "hello_problem",
           "OOB_THRESHOLD", "IN_BAND_MAX"]

#: values at least this large go out of band
OOB_THRESHOLD = 64 * 1024
#: ... except `bytes` and `bytearray` values in a pickle of at most this many
#: bytes, which stay in it (measured: below this, a frame that fits the
#: socket's buffer in one write costs less than the out-of-band path)
IN_BAND_MAX = 160 * 1024
#: how many bodies of calls without arguments a serializer keeps
_BARE_CALLS = 4096


class Serializer:
    """Base class and interface of a serializer."""

    name = "abstract"
    #: True when `loads` never runs code chosen by the data
    safe = False

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        raise NotImplementedError

    def loads(self, body: bytes, buffers: list) -> Any:
        raise NotImplementedError

    #: True when `dumps` of the same plain data always gives the same bytes
    #: (procshare's own serializers): then the bodies of calls without
    #: arguments are made once.  A user's serializer may not be (a nonce, a
    #: counter, a reused buffer), so it is asked every time
    stable_calls = False
    #: CALL bodies of calls without arguments, by (object id, method)
    _bare_calls: dict | None = None

    def dumps_call(self, oid: Any, meth: str, args: tuple, kwds: dict) -> tuple[bytes, Any]:
        """`dumps((oid, meth, args, kwds))`, the body of a CALL.  With a
        `stable_calls` serializer, the body of a call without arguments never
        changes, so it is made once per (object, method) and kept (at most
        `_BARE_CALLS` of them)."""
        if args or kwds or args is None or kwds is None or not self.stable_calls:
            return self.dumps((oid, meth, args, kwds))     # (None fails in the manager)
        cache = self._bare_calls
        if cache is None:
            cache = self._bare_calls = {}
        key = (oid, meth)
        got = cache.get(key)
        if got is None:
            got = self.dumps((oid, meth, (), {}))
            if type(got[0]) is bytes and not got[1]:    # immutable, whole
                if len(cache) >= _BARE_CALLS:
                    cache.clear()
                cache[key] = got
        return got

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _rebuild_bytes(buf: Any) -> bytes:
    return bytes(buf)


def _rebuild_bytearray(buf: Any) -> bytearray:
    return buf if type(buf) is bytearray else bytearray(buf)


def _rebuild_memoryview(buf: Any, fmt: str, shape: tuple) -> memoryview:
    view = memoryview(buf).cast("B")
    if not view.nbytes:     # cast() refuses a zero in the shape
        return view if fmt == "B" else view.cast(fmt)
    return view.cast(fmt, shape)


class _OutOfBand:
    """Wraps one large contiguous buffer so that pickle-5 sends it out of band."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: int) -> tuple:
        v = self.value
        if type(v) is bytes:
            return _rebuild_bytes, (pickle.PickleBuffer(v),)
        if type(v) is bytearray:
            return _rebuild_bytearray, (pickle.PickleBuffer(v),)
        return _rebuild_memoryview, (pickle.PickleBuffer(v), v.format, v.shape)


_BUFFER_TYPES = (bytes, bytearray, memoryview)


def _lift_buffers(obj: Any, depth: int = 0, views: bool = False) -> Any:
    """Return `obj` with large buffers in it (a few container levels deep)
    wrapped in `_OutOfBand` (with `views`, every contiguous memoryview, which
    pickle cannot write in band).  Containers are copied only where something
    changed."""
    t = type(obj)
    if t in _BUFFER_TYPES:
        if t is memoryview and not (obj.contiguous and (views or obj.nbytes >= OOB_THRESHOLD)):
            return obj
        if t is not memoryview and len(obj) < OOB_THRESHOLD:
            return obj
        return _OutOfBand(obj)
    if depth >= 4:
        return obj
    if t is tuple or t is list:
        items = [_lift_buffers(x, depth + 1, views) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return t(items)
    if t is dict:
        changed = False
        out = {}
        for k, v in obj.items():
            nv = _lift_buffers(v, depth + 1, views)
            changed = changed or nv is not v
            out[k] = nv
        return out if changed else obj
    return obj


#: a pickle at most this long has a small memo, cheap to clear in place
_SMALL_MEMO = 256
#: opcodes of large bytes-like values and the size of the length after them
#: (BINBYTES, BINBYTES8, BYTEARRAY8); str (BINUNICODE) cannot go out of band
_BYTES_HEADS = ((0x42, 4), (0x8E, 8), (0x96, 8))


class _Sink:
    """What a reusable Pickler writes to (`chunks.append`: no Python call per
    write).  The C pickler writes a value of 64 KiB or more (its frame size)
    not into the pickle but as a separate write *of the value itself*, right
    after a chunk that ends with the value's opcode and length: so a large
    `bytes` or `bytearray` costs nothing here, and is found afterwards
    (`has_large`).  Large pickle-5 buffers (ndarrays) go out of band as they
    are met (`buffer`)."""

    __slots__ = ("chunks", "bufs", "write", "pickler", "dump", "clear_memo")

    def __init__(self) -> None:
        self.chunks: list = []
        self.bufs: list = []
        self.write = self.chunks.append     # what the Pickler calls: C, no frame
        self.pickler = pickle.Pickler(self, 5, buffer_callback=self.buffer)
        self.dump = self.pickler.dump
        self.clear_memo = self.pickler.clear_memo

    def buffer(self, pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True         # small: in band
        self.bufs.append(raw)
        return False

    def split(self) -> tuple[list, bool]:
        """`(the pickler's own chunks, whether a large bytes or bytearray value
        was written in band)`: such a value follows a chunk ending in its
        opcode and length, or is not a bytes object at all."""
        own: list = []
        large = False
        last = b""
        for chunk in self.chunks:
            if type(chunk) is not bytes:
                large = True    # a bytearray or an in-band buffer, written as itself
                continue
            n = len(chunk)
            if n >= OOB_THRESHOLD and any(
                    len(last) > size and last[-size - 1] == op
                    and int.from_bytes(last[-size:], "little") == n
                    for op, size in _BYTES_HEADS):
                large = True
            else:
                own.append(chunk)
            last = chunk
        return own, large

    def reset(self) -> None:
        """Ready for the next dump, with a new memo: `clear_memo` costs as much
        as the largest memo the pickler ever had, so after a large pickle the
        table is replaced instead."""
        self.chunks.clear()
        self.bufs = []
        self.pickler.memo = {}


def _forking_dumps(obj: Any) -> bytes:
    from multiprocessing.reduction import ForkingPickler
    return bytes(ForkingPickler.dumps(obj, 5))


#: called with a pickle that was made and then thrown away (proxies in it took
#: reference loans that must be given back); `client.proxy` registers the hook
discarded_body_hooks: list[Callable[[bytes], None]] = []


# -- the pickle family ------------------------------------------------------------

class PickleSerializer(Serializer):
    """pickle protocol 5 with out-of-band buffers for large values."""

    name = "pickle"
    stable_calls = True

    def __init__(self, pickler_dumps: Callable[..., bytes] = pickle.dumps,
                 loads: Callable[..., Any] = pickle.loads) -> None:
        self._dumps = pickler_dumps
        self._loads = loads
        #: idle sinks (each with its Pickler), for the plain pickle module only;
        #: taken and given back whole, so threads and nested dumps never share one
        self._sinks: list[_Sink] | None = [] if pickler_dumps is pickle.dumps else None

    def dumps(self, obj: Any) -> tuple[bytes, tuple | list]:
        sinks = self._sinks
        if sinks is not None:
            try:
                sink = sinks.pop()
            except IndexError:
                sink = _Sink()
            try:
                sink.dump(obj)
            except (TypeError, pickle.PicklingError, AttributeError):
                sink.reset()
                sinks.append(sink)
                return self._fallback(obj)
            chunks = sink.chunks
            if len(chunks) == 1 and not sink.bufs:     # the common case: small
                body = chunks.pop()
                if len(body) <= _SMALL_MEMO:
                    sink.clear_memo()
                else:
                    sink.reset()
                sinks.append(sink)
                return body, ()
            return self._large(sink, obj)
        try:
            body = self._dumps(obj, 5)
        except (TypeError, pickle.PicklingError, AttributeError):
            return self._fallback(obj)
        if len(body) < OOB_THRESHOLD:
            return body, ()
        # large: pickle again, with big buffers out of band
        result = self._out_of_band(_lift_buffers(obj))
        for hook in discarded_body_hooks:
            hook(body)
        return result

    def _large(self, sink: _Sink, obj: Any) -> tuple[bytes, tuple | list]:
        """A pickle made in more than one chunk, or with buffers out of band."""
        sinks = self._sinks
        assert sinks is not None
        own, large = sink.split()
        if not large or (not sink.bufs and sum(
                memoryview(c).nbytes for c in sink.chunks) <= IN_BAND_MAX):
            body = b"".join(sink.chunks)
            bufs = sink.bufs
            sink.reset()
            sinks.append(sink)
            return body, bufs
        # a large bytes or bytearray in band (not copied: the sink holds the
        # value itself): pickle again with such values lifted out of band
        sink.reset()
        sinks.append(sink)
        result = self._out_of_band(_lift_buffers(obj))
        for chunk in own:
            for hook in discarded_body_hooks:
                hook(chunk)     # proxies in the first pickle took loans too
        return result

    def _fallback(self, obj: Any) -> tuple[bytes, tuple | list]:
        """For what plain pickling refused: memoryviews (only out of band), then
        what multiprocessing's own pickler can do."""
        lifted = _lift_buffers(obj, views=True)
        if lifted is not obj:       # memoryviews: they only travel out of band
            try:
                return self._out_of_band(lifted)
            except (TypeError, pickle.PicklingError, AttributeError):
                pass
        # what multiprocessing itself can pickle (dict views, sockets,
        # connections, types registered with multiprocessing.reduction)
        return _forking_dumps(obj), ()

    def _out_of_band(self, lifted: Any) -> tuple[bytes, list]:
        """Pickle with buffers of `OOB_THRESHOLD` bytes or more out of band
        (small ones stay in the body: each buffer out of band costs a slot)."""
        buffers: list = []
        keep = buffers.append

        def callback(b: pickle.PickleBuffer) -> bool:
            raw = b.raw()
            if raw.nbytes < OOB_THRESHOLD:
                return True
            keep(raw)
            return False
        body = self._dumps(lifted, 5, buffer_callback=callback)
        return body, buffers

    def loads(self, body: bytes, buffers: list) -> Any:
        if buffers:
            return self._loads(body, buffers=buffers)
        return self._loads(body)


def _need(module: str, serializer: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"serializer {serializer!r} needs the {module} package, which is not installed: "
            f"pip install {module} (in every process that uses the manager)") from None


class CloudpickleSerializer(PickleSerializer):
    """cloudpickle: like pickle, plus lambdas, closures, local and `__main__`
    functions and classes, sent by value.  Loads with plain `pickle.loads`."""

    name = "cloudpickle"

    def __init__(self) -> None:
        super().__init__(_need("cloudpickle", self.name).dumps, pickle.loads)

    def __reduce__(self) -> tuple:
        return get_serializer, (self.name,)


class DillSerializer(PickleSerializer):
    """dill: like pickle, plus lambdas, closures, local classes, generators' code..."""

    name = "dill"

    def __init__(self) -> None:
        dill = _need("dill", self.name)
        super().__init__(dill.dumps, dill.loads)

    def __reduce__(self) -> tuple:
        return get_serializer, (self.name,)


# -- msgpack: plain data only -------------------------------------------------------

(_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET, _EXT_BIGINT, _EXT_COMPLEX, _EXT_TOKEN, _EXT_EXCEPTION,
 _EXT_CLASS, _EXT_PROXYTYPE, _EXT_BUFFER, _EXT_PACKED) = range(1, 12)
_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_PLAIN = ("plain data only: None, bool, int, float, complex, str, bytes, list, tuple, dict, "
          "set, frozenset, plus procshare's tokens and exceptions")
_exception_table: dict[str, type] | None = None


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _exceptions() -> dict[str, type]:
    """The exception and warning classes msgpack rebuilds by name: builtins,
    procshare's own and a few stdlib ones.  Nothing is imported to find them."""
    global _exception_table
    if _exception_table is None:
        import multiprocessing.context as mpc
        import queue
        import threading

        from .. import errors
        classes = [v for v in vars(builtins).values()
                   if isinstance(v, type) and issubclass(v, BaseException)]
        classes += [v for v in vars(errors).values() if isinstance(v, type)
                    and issubclass(v, (BaseException,)) and v.__module__ == errors.__name__]
        classes += [queue.Empty, queue.Full, threading.BrokenBarrierError, mpc.ProcessError,
                    mpc.BufferTooShort, mpc.TimeoutError, mpc.AuthenticationError,
                    pickle.PickleError, pickle.PicklingError, pickle.UnpicklingError]
        _exception_table = {_class_ref(c): c for c in classes}
    return _exception_table


def _rebuild_exception(ref: str, args: list, remote_tb: str | None, facts: dict) -> BaseException:
    from ..errors import ProcshareError, RemoteError
    cls = _exceptions().get(ref)
    args = tuple(args)
    e: BaseException
    if cls is None:
        text = args[0] if len(args) == 1 else ", ".join(map(str, args))
        e = RemoteError(f"{ref.replace(':', '.')}: {text}\n")
        e.remote_type = ref  # type: ignore[attr-defined]
    elif issubclass(cls, ProcshareError):
        e = cls(args[0] if args else "", **facts)
    else:
        try:
            e = cls(*args)
        except Exception:
            e = cls.__new__(cls)
            e.args = args
    if remote_tb:
        e._procshare_remote_tb = remote_tb  # type: ignore[attr-defined]
    return e


def _proxytype(ref: str) -> type | None:
    """A proxy class named by the manager, if this process has it (nothing is
    imported; anything else gives None and the caller uses AutoProxy)."""
    modname, _, qualname = ref.partition(":")
    obj: Any = sys.modules.get(modname)
    for part in qualname.split("."):
        obj = vars(obj).get(part) if obj is not None and hasattr(obj, "__dict__") else None
    return obj if is_proxy_type(obj) else None


def _describe_type(o: Any) -> str:
    t = type(o)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class MsgpackSerializer(Serializer):
    """msgpack: plain data only, and loading never runs code.  The choice for
    peers that must not be trusted with pickle.

    Tuples, sets, big ints and complex numbers keep their type (extension
    types); bytearray and memoryview arrive as bytes; dict views as lists.
    Exceptions travel as (class name, arguments, server traceback) and are
    rebuilt only for builtin, procshare and a few stdlib classes (anything
    else arrives as a RemoteError naming the class).  Proxies, functions and
    instances of other classes are refused with an error naming them.
    """

    name = "msgpack"
    stable_calls = True
    safe = True

    def __init__(self) -> None:
        self._m = _need("msgpack", self.name)

    def __reduce__(self) -> tuple:
        return get_serializer, (self.name,)

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        body = self._pack(obj, None)
        if len(body) < OOB_THRESHOLD:
            return body, []
        lifted = _lift_buffers(obj)
        if lifted is obj:
            return body, []
        buffers: list = []
        return self._pack(lifted, buffers), buffers

    def _pack(self, obj: Any, buffers: list | None) -> bytes:
        m = self._m
        ExtType = m.ExtType

        def pack(o: Any) -> bytes:
            return m.packb(o, default=default, strict_types=True, use_bin_type=True)

        def default(o: Any) -> Any:
            t = type(o)
            if t is tuple:
                return ExtType(_EXT_TUPLE, pack(list(o)))
            if t is set or t is frozenset:
                return ExtType(_EXT_SET if t is set else _EXT_FROZENSET, pack(list(o)))
            if t is int:
                return ExtType(_EXT_BIGINT, o.to_bytes((o.bit_length() + 8) // 8, "little",
                                                       signed=True))
            if t is complex:
                return ExtType(_EXT_COMPLEX, pack([o.real, o.imag]))
            if t in _DICT_VIEWS:
                return list(o)
            if t is Token:
                return ExtType(_EXT_TOKEN, pack([o.typeid, o.address, o.id]))
            if t is _OutOfBand and buffers is not None:
                v = o.value
                kind = 0 if type(v) is bytes else 1 if type(v) is bytearray else 2
                buffers.append(pickle.PickleBuffer(v).raw())
                meta = [len(buffers) - 1, kind, getattr(v, "format", "B"),
                        list(getattr(v, "shape", ()) or ())]
                return ExtType(_EXT_BUFFER, pack(meta))
            if t is Packed:
                if not o.serializer.safe:
                    raise TypeError(
                        f"msgpack never runs code on load, so it cannot carry a value packed "
                        f"by {o.serializer.name!r}; use a pickle-family serializer for the "
                        "manager, or a safe one for the type")
                return ExtType(_EXT_PACKED, pack([o.serializer.name, o.body,
                                                  [bytes(b) for b in o.buffers]]))
            if isinstance(o, BaseException):
                return ExtType(_EXT_EXCEPTION, pack(self._exception_state(o, pack)))
            if isinstance(o, type):
                if is_proxy_type(o):
                    return ExtType(_EXT_PROXYTYPE, pack(_class_ref(o)))
                if issubclass(o, BaseException):
                    return ExtType(_EXT_CLASS, pack(_class_ref(o)))
            raise TypeError(self._refusal(o))

        return pack(obj)

    @staticmethod
    def _exception_state(e: BaseException, pack: Callable[[Any], bytes]) -> list:
        args: list = list(e.args)
        try:
            pack(args)
        except Exception:
            args = [str(e)]
        facts = getattr(e, "facts", None)
        if not isinstance(facts, dict):
            facts = {}
        try:
            pack(facts)
        except Exception:
            facts = {k: v for k, v in facts.items() if isinstance(v, (str, int, float, bool))}
        return [_class_ref(type(e)), args, getattr(e, "_procshare_remote_tb", None), facts]

    @staticmethod
    def _refusal(o: Any) -> str:
        if is_proxy(o):
            return (f"msgpack carries {_PLAIN}; it cannot carry a proxy "
                    f"({type(o).__name__}): nested managed objects need a pickle-family "
                    "serializer (pickle, cloudpickle, dill)")
        what = "functions" if callable(o) and not isinstance(o, type) else (
            "classes" if isinstance(o, type) else f"values of type {_describe_type(o)}")
        return f"msgpack carries {_PLAIN}; it cannot carry {what}"

    def loads(self, body: bytes, buffers: list) -> Any:
        m = self._m

        def unpack(data: Any) -> Any:
            return m.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)

        def ext_hook(code: int, data: bytes) -> Any:
            if code == _EXT_TUPLE:
                return tuple(unpack(data))
            if code == _EXT_SET:
                return set(unpack(data))
            if code == _EXT_FROZENSET:
                return frozenset(unpack(data))
            if code == _EXT_BIGINT:
                return int.from_bytes(data, "little", signed=True)
            if code == _EXT_COMPLEX:
                return complex(*unpack(data))
            if code == _EXT_TOKEN:
                return Token(*unpack(data))
            if code == _EXT_BUFFER:
                index, kind, fmt, shape = unpack(data)
                buf = buffers[index]
                if kind == 0:
                    return bytes(buf)
                if kind == 1:
                    return _rebuild_bytearray(buf)
                return _rebuild_memoryview(buf, fmt, tuple(shape))
            if code == _EXT_EXCEPTION:
                return _rebuild_exception(*unpack(data))
            if code == _EXT_CLASS:
                ref = unpack(data)
                cls = _exceptions().get(ref)
                if cls is None:
                    raise ValueError(f"msgpack: refusing to load class {ref!r} (only builtin, "
                                     "procshare and a few stdlib exception classes are known)")
                return cls
            if code == _EXT_PROXYTYPE:
                return _proxytype(unpack(data))
            if code == _EXT_PACKED:
                name, inner_body, inner_buffers = unpack(data)
                inner = get_serializer(name)
                if not inner.safe:
                    raise ValueError(f"msgpack: refusing a value packed by {name!r}, which "
                                     "may run code on load")
                return inner.loads(inner_body, inner_buffers)
            raise ValueError(f"msgpack: unknown extension type {code}")

        return unpack(body)


# -- xmlrpclib, for code written for multiprocessing.managers ---------------------------

class XmlrpcSerializer(Serializer):
    """The stdlib managers' `serializer='xmlrpclib'`: XML-RPC marshalling.

    Plain data only, as in the stdlib: tuples arrive as lists, and proxies,
    exceptions (they arrive as RemoteError text) and other objects cannot travel.
    Loading never runs code.  msgpack does the same job faster and keeps tuples.
    """

    name = "xmlrpclib"
    stable_calls = True
    safe = True

    def __init__(self) -> None:
        import xmlrpc.client
        self._x = xmlrpc.client

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        return self._x.dumps((obj,), allow_none=True).encode(), []

    def loads(self, body: bytes, buffers: list) -> Any:
        # as the stdlib's: bytes arrive as xmlrpc.client.Binary, datetimes as DateTime
        return self._x.loads(bytes(body).decode())[0][0]


# -- user-supplied dumps/loads pairs ------------------------------------------------

class FunctionSerializer(Serializer):
    """Adapts a `dumps(obj) -> bytes` / `loads(bytes) -> obj` pair (a module
    such as `json`, or any object with those two methods).

    It gets whole messages: tuples `(object id, method, args, kwds)` for calls,
    the results, and `Token`s and exceptions in replies, so it must handle
    those (or the values a program actually sends).  Declare `safe=True` only
    if its loads never runs code chosen by the data.
    """

    def __init__(self, name: str, dumps: Callable[[Any], Any], loads: Callable[[Any], Any],
                 safe: bool = False) -> None:
        self.name = name
        self._dumps = dumps
        self._loads = loads
        self.safe = bool(safe)

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        data = self._dumps(obj)
        if isinstance(data, str):
            data = data.encode("utf-8")
        return data, []

    def loads(self, body: bytes, buffers: list) -> Any:
        return self._loads(body)


def _as_serializer(obj: Any, name: str | None = None) -> Serializer:
    if isinstance(obj, Serializer):
        if name is not None and obj.name != name:
            obj.name = name
        return obj
    if callable(getattr(obj, "dumps", None)) and callable(getattr(obj, "loads", None)):
        label = name or getattr(obj, "name", None) or getattr(obj, "__name__", None) \
            or type(obj).__name__
        return FunctionSerializer(str(label), obj.dumps, obj.loads, getattr(obj, "safe", False))
    raise TypeError(f"{obj!r} is not a serializer: pass a name, a Serializer, or an object "
                    "with dumps(obj) -> bytes and loads(bytes) -> obj")


# -- per-type serializers ---------------------------------------------------------

class Packed:
    """A value serialized by `serializer` and carried, as bytes, inside another
    serializer's message.  Pickle-family envelopes rebuild it on load by
    calling `_unpack`; msgpack carries it as an extension type (safe ones only)."""

    __slots__ = ("serializer", "body", "buffers")

    def __init__(self, serializer: Serializer, value: Any) -> None:
        self.serializer = serializer
        self.body, self.buffers = serializer.dumps(value)

    def __reduce__(self) -> tuple:
        return _unpack, (self.serializer.name, self.body,
                         [pickle.PickleBuffer(b) for b in self.buffers])


def _unpack(name: str, body: bytes, buffers: list = ()) -> Any:  # noqa: B006
    return get_serializer(name).loads(body, list(buffers))


def _can_carry(outer: Serializer, inner: Serializer) -> bool:
    if isinstance(outer, PickleSerializer):
        return True
    return isinstance(outer, MsgpackSerializer) and inner.safe


def _is_call(obj: Any) -> bool:
    return (type(obj) is tuple and len(obj) == 4 and type(obj[1]) is str
            and type(obj[2]) is tuple and type(obj[3]) is dict)


class TypedSerializer(Serializer):
    """The serializer of proxies of a type registered with `serializer=`: the
    manager's serializer (`outer`) for everything, and for call arguments it
    cannot carry, the type's serializer (`inner`) packed inside it.  Its name,
    "outer+inner", is what the hello says; the manager accepts it when its own
    serializer is `outer` and it knows `inner`.
    """

    def __init__(self, outer: Serializer, inner: Serializer) -> None:
        if isinstance(outer, TypedSerializer):
            outer = outer.outer
        if not _can_carry(outer, inner):
            raise ValueError(
                f"a manager using {outer.name!r} cannot carry values serialized by "
                f"{inner.name!r}" + (": msgpack never runs code on load, so per-type "
                                     "serializers must be safe ones too"
                                     if isinstance(outer, MsgpackSerializer) else
                                     ": per-type serializers need a pickle-family or msgpack "
                                     "manager serializer"))
        self.outer = outer
        self.inner = inner
        self.name = f"{outer.name}+{inner.name}"
        self.safe = outer.safe
        self.stable_calls = outer.stable_calls     # a call without arguments is outer's

    def __reduce__(self) -> tuple:
        return get_serializer, (self.name,)

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        try:
            return self.outer.dumps(obj)
        except Exception:
            if not _is_call(obj):
                raise
        oid, meth, args, kwds = obj
        return self.outer.dumps((oid, meth, Packed(self.inner, args),
                                 Packed(self.inner, kwds) if kwds else kwds))

    def loads(self, body: bytes, buffers: list) -> Any:
        return self.outer.loads(body, buffers)


def typed_serializer(outer: Any, inner: Any) -> Serializer:
    """The serializer for proxies of a type registered with `serializer=inner`
    on a manager whose serializer is `outer` (`outer` itself if they agree)."""
    o, i = get_serializer(outer), get_serializer(inner)
    if isinstance(o, TypedSerializer):
        o = o.outer
    if i.name == o.name:
        return o
    return get_serializer(f"{o.name}+{i.name}")


def pack_for_type(value: Any, inner: Any) -> Packed:
    """In the manager: `value` packed by a registered type's serializer."""
    return Packed(get_serializer(inner), value)


# -- the registry -------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], Any]] = {
    "pickle": PickleSerializer,
    "cloudpickle": CloudpickleSerializer,
    "dill": DillSerializer,
    "msgpack": MsgpackSerializer,
    "xmlrpclib": XmlrpcSerializer,
}
_PACKAGES = {"cloudpickle": "cloudpickle", "dill": "dill", "msgpack": "msgpack"}
_INSTANCES: dict[str, Serializer] = {}
_ADAPTED: dict[int, tuple[Any, Serializer]] = {}


def register_serializer(name: str, factory: Any) -> None:
    """Make a serializer available by name to managers and proxies.

    `factory` is a zero-argument callable returning a `Serializer` (or an object
    with `dumps`/`loads`), or such an object itself.  Register it at module
    level, so that processes started with spawn (and the manager's server) have
    it too.
    """
    if "+" in name:
        raise ValueError(f"serializer names cannot contain '+': {name!r}")
    if isinstance(factory, Serializer) or (
            not isinstance(factory, type) and callable(getattr(factory, "dumps", None))):
        inst = _as_serializer(factory, name)
        _REGISTRY[name] = lambda: inst
    else:
        _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)
    for key in [k for k in _INSTANCES if "+" in k]:
        _INSTANCES.pop(key, None)


def available_serializers() -> list[str]:
    """Names of the serializers that can be used in this process."""
    return [name for name in _REGISTRY
            if name not in _PACKAGES or importlib.util.find_spec(_PACKAGES[name]) is not None]


def _remember(inst: Serializer) -> Serializer:
    if inst.name not in _INSTANCES and inst.name not in _REGISTRY:
        _INSTANCES[inst.name] = inst
    return inst


class UnknownSerializer(ValueError, KeyError):
    """No serializer has that name (the stdlib's managers raise KeyError)."""

    __str__ = ValueError.__str__


def get_serializer(name: Any) -> Serializer:
    """Return the serializer called `name` (or `name` itself if it is one; an
    object with `dumps`/`loads` is adapted)."""
    if isinstance(name, Serializer):
        return _remember(name)
    if not isinstance(name, str):
        if name is None:
            return get_serializer("pickle")
        hit = _ADAPTED.get(id(name))
        if hit is not None and hit[0] is name:
            return hit[1]
        inst = _remember(_as_serializer(name))
        _ADAPTED[id(name)] = (name, inst)
        return inst
    try:
        return _INSTANCES[name]
    except KeyError:
        pass
    if "+" in name:
        outer, _, inner = name.partition("+")
        inst: Serializer = TypedSerializer(get_serializer(outer), get_serializer(inner))
    else:
        try:
            factory = _REGISTRY[name]
        except KeyError:
            raise UnknownSerializer(
                f"unknown serializer {name!r}; the registered ones are {sorted(_REGISTRY)}"
                ". Register your own with "
                "procshare.serializers.register_serializer(name, factory).") from None
        inst = _as_serializer(factory(), name)
    _INSTANCES[name] = inst
    return inst


# -- the hello ----------------------------------------------------------------------

def encode_hello(info: Any) -> bytes:
    """The hello (and the manager's answer to it): JSON, whatever the serializer."""
    return json.dumps(info, separators=(",", ":")).encode()


def decode_hello(body: bytes, buffers: list, fallback: Serializer) -> Any:
    """Read a hello (or its answer).  JSON; a body that is not JSON is read with
    `fallback` (a peer that encodes its hello with the connection's serializer)."""
    from .frames import FrameError
    try:
        if body[:1] in (b"{", b"[", b'"'):
            return json.loads(body)
        return fallback.loads(body, buffers)
    except Exception as e:
        raise FrameError(f"a hello that could not be decoded ({type(e).__name__}: {e}); "
                         "the peer may use another serializer or another protocol "
                         "version") from None


def hello_problem(manager: Serializer, theirs: Any) -> str | None:
    """Why a client naming serializer `theirs` cannot talk to a manager using
    `manager` (None when it can)."""
    mine = manager.name
    if theirs == mine:
        return None
    if isinstance(theirs, str) and theirs.startswith(mine + "+"):
        try:
            get_serializer(theirs)
        except Exception as e:
            return (f"the client's per-type serializer {theirs.partition('+')[2]!r} is not "
                    f"usable in the manager process: {e}")
        return None
    return "different serializers"
