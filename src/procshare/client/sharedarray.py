"""Shared arrays, client side: `manager.SharedArray(...)` and `manager.ndarray(...)`.

A shared array is a manager object (typeid "SharedArray", a `SharedBlock`
in the manager) whose memory every process maps: reads and writes go
straight to memory, with no round trip.  `SharedArrayProxy` has the interface
of `multiprocessing.Array` (indexing, slicing, `len`, iteration,
`get_lock()`, `get_obj()`, `.value`/`.raw` for typecode 'c'); `ndarray()`
returns a numpy array (`SharedNdarray`) on such memory.  Both travel like any
proxy: through managed containers, queues, pipes and process arguments,
under fork, spawn and forkserver, and to processes that `connect()`.

Owns: the proxy and its mapping in this process (made on first use of the
data), the standalone `SharedArrayView` (the same interface over a mapping
this process already has), the numpy view and its pickling, and the two
creation functions that `SyncManager` exposes as methods.

Rules it keeps:
- A proxy maps the memory lazily, once per process: a forked child inherits
  the mapping; any other process asks the manager for the descriptor on its
  control connection (`Session.control_call_fds("shm_fd", id)`) after it
  has adopted its reference, maps it and closes the descriptor; inside the
  manager process the block's own descriptor is mapped.  Nothing else
  crosses a socket for data.
- Element access does not take the lock (as with `multiprocessing.Array(...,
  lock=False)`): `get_lock()` (a manager RLock proxy by default, as the
  stdlib's Array uses an RLock) guards compound updates, also as a context
  manager on the array.
- A pickled array carries its reference (a loan, like every proxy), its
  description and its lock, never its data; a pickled `SharedNdarray` view
  carries its offset, shape and strides into the segment.  An array computed
  from one (`a + 1`) lives in private memory and pickles by value.
- The memory stays mapped while the proxy (or a numpy view made from it)
  lives in this process; the manager releases the segment when the last
  reference anywhere goes, and the kernel frees it with the last mapping.
- numpy is optional: only `ndarray()` and unpickling a `SharedNdarray` import
  it, with an ImportError that says so.
"""

from __future__ import annotations

import math
import operator
import os
import threading
import weakref
from typing import Any

try:
    import ctypes
    from multiprocessing import sharedctypes
except ImportError:     # a Python built without _ctypes (libffi): no shared arrays
    ctypes = sharedctypes = None  # type: ignore[assignment]

from ..inprocess import local_server
from ..transport import shm
from .proxy import BaseProxy
from .scope import UNSET

__all__ = ["SharedArrayProxy", "SharedArrayView", "shared_array", "ndarray", "TYPEID"]

#: the typeid the manager registers `SharedBlock` under
TYPEID = "SharedArray"

_UNKNOWN: Any = object()        # "not asked yet" (a lock may legitimately be None)
_map_mutex = threading.Lock()


def _after_fork_in_child() -> None:
    global _map_mutex
    _map_mutex = threading.Lock()   # a thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- what the bytes mean ---------------------------------------------------------------------

def _ctype(type_: Any) -> Any:
    return sharedctypes.typecode_to_type.get(type_, type_) if isinstance(type_, str) else type_


def _ctypes_array(meta: dict, mm: Any, nbytes: int) -> Any:
    """The ctypes array that `meta` describes, on the mapping `mm`."""
    if meta.get("kind") == "array":
        array_type = _ctype(meta["type"]) * meta["length"]
    else:       # an ndarray's memory, seen as bytes
        array_type = ctypes.c_char * nbytes
    return array_type.from_buffer(mm)


#: ctypes item codes a memoryview can be cast to (and returns as ctypes does)
_MV_CODES = frozenset("bBhHiIlLqQfd?c")


def _fast_view(obj: Any, mm: Any) -> Any:
    """A memoryview of the ctypes array `obj` (which starts the mapping `mm`),
    with the item type as format; or `obj` itself when memoryview cannot
    express the type."""
    item = getattr(obj, "_type_", None)
    code = getattr(item, "_type_", None)
    if not (isinstance(code, str) and code in _MV_CODES and len(obj)):
        return obj
    try:
        mv = memoryview(mm)[:ctypes.sizeof(obj)].cast(code)
    except (TypeError, ValueError):
        return obj
    return mv if mv.itemsize == ctypes.sizeof(item) and len(mv) == len(obj) else obj


def _address(mm: Any) -> int:
    """Where the mapping `mm` starts in this process."""
    probe = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


# -- the interface of multiprocessing.Array ----------------------------------------------------

class _ArrayInterface:
    """`multiprocessing.Array`'s interface over `self._obj` (a ctypes array on
    shared memory) and the lock `_lock_object()` returns."""

    def __len__(self) -> int:
        return len(self._obj)

    # `_mv` is a memoryview of the same memory where the type allows (else the
    # ctypes array): faster for single items.  Anything it refuses or would
    # treat differently (slices, other types, overflow) goes to ctypes, whose
    # behaviour (multiprocessing's) is the reference.
    def __getitem__(self, i: Any) -> Any:
        if type(i) is int:
            try:
                return self._mv[i]
            except IndexError:
                pass
        return self._obj[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        try:
            self._mv[i] = value
            return
        except (TypeError, ValueError, IndexError, NotImplementedError):
            pass
        self._obj[i] = value

    def __iter__(self) -> Any:
        return iter(self._obj)

    def get_obj(self) -> Any:
        """The ctypes array itself (writes to it are writes to shared memory)."""
        return self._obj

    def get_lock(self) -> Any:
        """The array's lock: a manager lock proxy shared by every process."""
        lock = self._lock_object()
        if lock is None:
            raise AttributeError("this shared array was created with lock=False: it has "
                                 "no lock (like the stdlib's RawArray)")
        return lock

    def acquire(self, *args: Any) -> Any:
        return self.get_lock().acquire(*args)

    def release(self) -> Any:
        return self.get_lock().release()

    def __enter__(self) -> Any:
        return self.get_lock().__enter__()

    def __exit__(self, *args: Any) -> Any:
        return self.get_lock().__exit__(*args)

    # typecode 'c' (like the stdlib's SynchronizedString); AttributeError otherwise
    @property
    def value(self) -> Any:
        return self._obj.value

    @value.setter
    def value(self, v: Any) -> None:
        self._obj.value = v

    @property
    def raw(self) -> Any:
        return self._obj.raw

    @raw.setter
    def raw(self, v: Any) -> None:
        self._obj.raw = v

    def _lock_object(self) -> Any:
        return self._shm_lock

    def _describe_type(self) -> str:
        meta = self._shm_meta
        if not meta:
            return "?"
        if meta.get("kind") == "array":
            t = meta["type"]
            return f"{t if isinstance(t, str) else t.__name__!r}[{meta['length']}]"
        return f"ndarray{tuple(meta['shape'])} {meta['descr']!r}"


class SharedArrayView(_ArrayInterface):
    """A shared array over a mapping this process already has (no manager):
    `SharedArrayView.from_fd(fd, size, meta)`.  For forked children and tools
    that pass descriptors themselves; share `SharedArrayProxy` otherwise."""

    def __init__(self, mm: Any, meta: dict, lock: Any = None, nbytes: int | None = None) -> None:
        self._mm = mm
        self._shm_meta = meta
        self._shm_lock = lock
        self._obj = _ctypes_array(meta, mm, len(mm) if nbytes is None else nbytes)
        self._mv = _fast_view(self._obj, mm)

    @classmethod
    def from_fd(cls, fd: int, size: int, meta: dict, lock: Any = None) -> SharedArrayView:
        """Map `size` bytes of descriptor `fd` (which the caller may then close)."""
        return cls(shm.map_fd(fd, size), meta, lock)

    def __reduce__(self) -> tuple:
        raise TypeError("a SharedArrayView is bound to this process's mapping; share the "
                        "manager's SharedArray proxy instead (or pass the descriptor)")

    def __repr__(self) -> str:
        return f"<SharedArrayView {self._describe_type()}>"


class SharedArrayProxy(_ArrayInterface, BaseProxy):
    """A manager's shared array: a proxy whose data is mapped into this process.

    Element access, slicing, `len` and iteration act on the mapped memory;
    the manager is asked only for the descriptor, once per process."""

    _exposed_ = ("describe",)

    def __init__(self, token: Any, serializer: Any, manager: Any = None, authkey: Any = None,
                 exposed: Any = None, incref: bool = True, manager_owned: bool = False,
                 shm_info: tuple | None = None) -> None:
        BaseProxy.__init__(self, token, serializer, manager=manager, authkey=authkey,
                           exposed=exposed, incref=incref, manager_owned=manager_owned)
        if shm_info is None:
            self._shm_meta, self._shm_lock = None, _UNKNOWN
        else:
            self._shm_meta, self._shm_lock = shm_info
        self._shm_map: tuple | None = None
        self._mv = _Unmapped(self)

    # -- mapping, on first use ----------------------------------------------------------
    # No __getattr__ and no use of __dict__ (either slows every attribute access):
    # `_mv` starts as a stand-in that maps on first use; `_shm_map` is None until
    # then, and `(ctypes array, mmap, address, nbytes)` after.
    @property
    def _obj(self) -> Any:
        return (self._shm_map or self._mapped())[0]

    @property
    def _mm(self) -> Any:
        return (self._shm_map or self._mapped())[1]

    def _mapped(self) -> tuple:
        if self._shm_map is None:
            self._map()
        return self._shm_map

    def _describe(self) -> None:
        """Learn what the bytes mean (a proxy made from a bare token, or returned
        by a method) and the lock, from the manager."""
        info = self._callmethod("describe")
        self._shm_meta = info["meta"]
        if self._shm_lock is _UNKNOWN:
            self._shm_lock = info["lock"]

    def _map(self) -> None:
        _need_ctypes()      # (one received by a process without it)
        with _map_mutex:
            if self._shm_map is not None:
                return
            if self._shm_meta is None or self._shm_lock is _UNKNOWN:
                self._describe()
            server = local_server()
            if server is not None and server.address == self._token.address:
                block = server.objects.get(self._id).obj     # in the manager itself
                info = block.mapping_info()
                mm = shm.map_fd(block.fileno(), info["size"])
            else:
                info, fds = _fetch_fds(self)
                try:
                    if not fds:
                        raise OSError("the manager sent no descriptor for shared array "
                                      f"{self._id}")
                    mm = shm.map_fd(fds[0], info["size"])
                finally:
                    _close(fds)
            obj = _ctypes_array(self._shm_meta, mm, info["nbytes"])
            self._mv = _fast_view(obj, mm)
            self._shm_map = (obj, mm, _address(mm), info["nbytes"])

    def _lock_object(self) -> Any:
        if self._shm_lock is _UNKNOWN:
            self._describe()
        return self._shm_lock

    # -- values, pickling, text -----------------------------------------------------------
    def _getvalue(self) -> Any:
        """A copy of the contents (a list; bytes for typecode 'c'), read locally."""
        return self._obj[:]

    def __reduce__(self) -> tuple:
        func, (cls, token, serializer, kwds) = BaseProxy.__reduce__(self)
        if self._shm_meta is not None and self._shm_lock is not _UNKNOWN:
            kwds["shm_info"] = (self._shm_meta, self._shm_lock)
        return func, (cls, token, serializer, kwds)

    def __repr__(self) -> str:
        return f"<SharedArray {self._describe_type()}, id {self._id} at {id(self):#x}>"

    def __str__(self) -> str:
        return repr(self)


class _Unmapped:
    """A proxy's `_mv` until the memory is mapped: maps it, then steps aside.
    It refers to its proxy weakly, so that an unused proxy is freed (and gives
    its reference back) at once, not at the next garbage collection."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: SharedArrayProxy) -> None:
        self.proxy = weakref.ref(proxy)

    def _mapped(self) -> SharedArrayProxy:
        proxy = self.proxy()
        if proxy is None:       # pragma: no cover (the caller holds it)
            raise ReferenceError("the shared array's proxy is gone")
        proxy._mapped()
        return proxy

    def __getitem__(self, i: Any) -> Any:
        return self._mapped()._mv[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        self._mapped()._mv[i] = value


def _fetch_fds(proxy: SharedArrayProxy) -> tuple[dict, list[int]]:
    """Ask the manager for the array's descriptor over this process's control
    connection; `(sizes, fds)`."""
    session = proxy._procshare_session
    call = getattr(session, "control_call_fds", None)
    if call is None:
        raise RuntimeError("this procshare client cannot receive file descriptors "
                           "(Session.control_call_fds is missing), so it cannot map "
                           "shared arrays")
    timeout = proxy._procshare_timeout
    return call("shm_fd", proxy._id, timeout=None if timeout is UNSET else timeout)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- creation (SyncManager.SharedArray, SyncManager.ndarray) ------------------------------------

def _create(manager: Any, nbytes: int, meta: dict, lock: Any) -> SharedArrayProxy:
    token, exposed = manager._create(TYPEID, nbytes, meta, lock)
    proxy = SharedArrayProxy(token, manager._serializer, manager=manager,
                             authkey=manager._authkey, exposed=exposed, incref=False,
                             shm_info=(meta, lock))
    proxy._procshare_track(False)     # created for this process's client
    return proxy


def shared_array(manager: Any, typecode_or_type: Any, size_or_initializer: Any,
                 lock: Any = True) -> SharedArrayProxy:
    """`manager.SharedArray(typecode_or_type, size_or_initializer, lock=True)`:
    `multiprocessing.Array`'s arguments and interface, on memory every process
    can map.  `lock`: True or None for a new manager RLock, False for none, or
    a lock proxy of a manager to use."""
    _need_ctypes()
    array_type = _ctype(typecode_or_type)
    if isinstance(size_or_initializer, int):
        length, init = size_or_initializer, None
    else:
        init = size_or_initializer
        length = len(init)
    array_type = array_type * length          # ValueError for a negative length
    if lock is False:
        lock = None
    elif lock is True or lock is None:
        lock = manager.RLock()
    elif not hasattr(lock, "acquire"):
        raise AttributeError("%r has no method 'acquire'" % lock)
    elif not isinstance(lock, BaseProxy):
        raise TypeError(f"lock= must be True, False or a lock proxy from a manager (every "
                        f"process must reach it), not {type(lock).__name__}")
    meta = {"kind": "array", "type": typecode_or_type, "length": length}
    proxy = _create(manager, ctypes.sizeof(array_type), meta, lock)
    if init is not None:
        proxy._obj.__init__(*init)            # as multiprocessing.RawArray does
    return proxy


def _need_ctypes() -> None:
    if ctypes is None:
        raise ImportError("shared arrays (manager.SharedArray(), manager.ndarray()) need "
                          "the ctypes module, and this Python was built without it (install "
                          "libffi's headers, e.g. libffi-dev, and rebuild Python); "
                          "manager.Array() works without it")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as e:
        raise ImportError("manager.ndarray() needs numpy, which is not installed in this "
                          "environment (pip install numpy, or procshare[numpy]); "
                          "manager.SharedArray() works without it") from e
    return numpy


def ndarray(manager: Any, shape: Any, dtype: Any = float) -> Any:
    """`manager.ndarray(shape, dtype=float)`: a zero-filled numpy array on memory
    every process can map (a `SharedNdarray`; needs numpy)."""
    _need_ctypes()
    np = _numpy()
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"a shared ndarray cannot hold Python objects (dtype {dt})")
    try:
        dims = (operator.index(shape),)
    except TypeError:
        dims = tuple(operator.index(n) for n in shape)
    if any(n < 0 for n in dims):
        raise ValueError("negative dimensions are not allowed")
    meta = {"kind": "ndarray", "shape": dims, "descr": np.lib.format.dtype_to_descr(dt)}
    handle = _create(manager, math.prod(dims) * dt.itemsize, meta, None)
    return _ndarray_on(handle, dims, dt, None, 0)


# -- the numpy view ------------------------------------------------------------------------------

_ndarray_cls: Any = None


def _ndarray_class() -> Any:
    global _ndarray_cls
    if _ndarray_cls is None:
        np = _numpy()

        class SharedNdarray(np.ndarray):
            """A numpy array on a manager's shared memory.  Pickled, it carries
            its reference and place in the segment, not its data."""

            def __array_finalize__(self, obj: Any) -> None:
                self._procshare_handle = getattr(obj, "_procshare_handle", None)

            def __reduce_ex__(self, protocol: Any) -> Any:
                handle = getattr(self, "_procshare_handle", None)
                place = _place(handle, self) if handle is not None else None
                if place is None:     # private memory (a result computed from a view)
                    return np.ndarray.__reduce_ex__(self.view(np.ndarray), protocol)
                return (_rebuild_ndarray, (handle, self.shape, self.strides,
                                           np.lib.format.dtype_to_descr(self.dtype), place))

            def __reduce__(self) -> Any:
                return self.__reduce_ex__(2)

        SharedNdarray.__module__ = __name__
        SharedNdarray.__qualname__ = "SharedNdarray"
        _ndarray_cls = SharedNdarray
    return _ndarray_cls


def __getattr__(name: str) -> Any:
    if name == "SharedNdarray":
        return _ndarray_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _byte_bounds(np: Any, a: Any) -> tuple[int, int]:
    utils = getattr(getattr(np, "lib", None), "array_utils", None)
    fn = getattr(utils, "byte_bounds", None) or np.byte_bounds
    return fn(a)


def _place(handle: SharedArrayProxy, a: Any) -> int | None:
    """The offset of `a`'s data in its handle's segment, or None if `a` is not
    (entirely) in it."""
    if a.size == 0:
        return 0
    if handle._shm_map is None:
        return None
    np = _numpy()
    lo, hi = _byte_bounds(np, a)
    _obj, _mm, start, nbytes = handle._shm_map
    if not (start <= lo and hi <= start + nbytes):
        return None
    return a.__array_interface__["data"][0] - start


def _ndarray_on(handle: SharedArrayProxy, shape: tuple, dtype: Any, strides: Any,
                offset: int) -> Any:
    np = _numpy()
    a = np.ndarray(shape, dtype, buffer=handle._mm, offset=offset, strides=strides)
    a = a.view(_ndarray_class())
    a._procshare_handle = handle
    return a


def _rebuild_ndarray(handle: SharedArrayProxy, shape: tuple, strides: tuple, descr: Any,
                     offset: int) -> Any:
    """Unpickle a `SharedNdarray`: map the segment here and view it."""
    np = _numpy()
    return _ndarray_on(handle, shape, np.lib.format.descr_to_dtype(descr), strides, offset)
