"""Serializers: the registry of named serializers and out-of-band buffers.

Owns: turning a message object into `(body, buffers)` and back.  The default is
pickle protocol 5; large `bytes`, `bytearray`, `memoryview` and ndarray values
travel as out-of-band buffers, so the transport can write them with one
`sendmsg` and receive them straight into place, with no copy through the body.

Rules it keeps:
- The small-message path is a single C-level `pickle.dumps`; out-of-band work is
  only done when the pickled body turns out to be large.
- Both ends name their serializer in the hello; a mismatch is refused there.
- A serializer is an object with `name`, `dumps(obj) -> (body, buffers)` and
  `loads(body, buffers) -> obj`.  `register_serializer` adds one.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

__all__ = ["Serializer", "PickleSerializer", "get_serializer", "register_serializer",
           "OOB_THRESHOLD"]

#: values at least this large go out of band
OOB_THRESHOLD = 64 * 1024


class Serializer:
    """Base class and interface of a serializer."""

    name = "abstract"

    def dumps(self, obj: Any) -> tuple[bytes, list]:
        raise NotImplementedError

    def loads(self, body: bytes, buffers: list) -> Any:
        raise NotImplementedError


def _rebuild_bytes(buf: Any) -> bytes:
    return bytes(buf)


def _rebuild_bytearray(buf: Any) -> bytearray:
    return buf if type(buf) is bytearray else bytearray(buf)


def _rebuild_memoryview(buf: Any, fmt: str, shape: tuple) -> memoryview:
    return memoryview(buf).cast("B").cast(fmt, shape)


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


def _lift_buffers(obj: Any, depth: int = 0) -> Any:
    """Return `obj` with large buffers in it (a few container levels deep)
    wrapped in `_OutOfBand`.  Containers are copied only where something changed."""
    t = type(obj)
    if t in _BUFFER_TYPES:
        if t is memoryview and not (obj.contiguous and obj.nbytes >= OOB_THRESHOLD):
            return obj
        if t is not memoryview and len(obj) < OOB_THRESHOLD:
            return obj
        return _OutOfBand(obj)
    if depth >= 4:
        return obj
    if t is tuple or t is list:
        items = [_lift_buffers(x, depth + 1) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return t(items)
    if t is dict:
        changed = False
        out = {}
        for k, v in obj.items():
            nv = _lift_buffers(v, depth + 1)
            changed = changed or nv is not v
            out[k] = nv
        return out if changed else obj
    return obj


def _forking_dumps(obj: Any) -> bytes:
    from multiprocessing.reduction import ForkingPickler
    return bytes(ForkingPickler.dumps(obj, 5))


class PickleSerializer(Serializer):
    """pickle protocol 5 with out-of-band buffers for large values."""

    name = "pickle"

    def __init__(self, pickler_dumps: Callable[..., bytes] = pickle.dumps,
                 loads: Callable[..., Any] = pickle.loads) -> None:
        self._dumps = pickler_dumps
        self._loads = loads

    def dumps(self, obj: Any) -> tuple[bytes, tuple | list]:
        try:
            body = self._dumps(obj, 5)
        except (TypeError, pickle.PicklingError, AttributeError):
            # what multiprocessing itself can pickle (dict views, sockets,
            # connections, types registered with multiprocessing.reduction)
            return _forking_dumps(obj), ()
        if len(body) < OOB_THRESHOLD:
            return body, ()
        # large: pickle again, with big buffers out of band
        buffers: list = []
        keep = buffers.append
        body = self._dumps(_lift_buffers(obj), 5, buffer_callback=lambda b: keep(b.raw()))
        return body, buffers

    def loads(self, body: bytes, buffers: list) -> Any:
        if buffers:
            return self._loads(body, buffers=buffers)
        return self._loads(body)


_REGISTRY: dict[str, Callable[[], Serializer]] = {
    "pickle": PickleSerializer,
}
_INSTANCES: dict[str, Serializer] = {}


def register_serializer(name: str, factory: Callable[[], Serializer]) -> None:
    """Make a serializer available by name to managers and proxies."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def get_serializer(name: str | Serializer) -> Serializer:
    """Return the serializer called `name` (or `name` itself if it is one)."""
    if isinstance(name, Serializer):
        return name
    try:
        return _INSTANCES[name]
    except KeyError:
        pass
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown serializer {name!r}; the registered ones are "
            f"{sorted(_REGISTRY)}. Register your own with "
            "procshare.serializers.register_serializer(name, factory).") from None
    inst = _INSTANCES[name] = factory()
    return inst
