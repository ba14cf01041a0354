"""Shared arrays, manager side: the segment behind a `SharedArray` or `ndarray`.

The manager holds one `SharedBlock` per shared array, as an ordinary object
in its registry (typeid "SharedArray"), so it is counted like any other
object: it lives while some process holds a reference, and its memory is
released when the last reference is dropped or the last holder dies.  The
data never passes through the manager: a process that holds a reference asks
for the segment's descriptor (`fd_reply`, the `shm_fd` control operation) and
maps it.

Owns: `SharedBlock` (one pre-faulted memfd segment, the array's description
and its lock) and `fd_reply`, the check made before a descriptor leaves the
manager.

Rules it keeps:
- The manager never interprets the array: the client says how many bytes it
  needs and what the bytes mean (`meta`, returned verbatim by `describe`);
  the manager checks only that the size is a sane int.  No numpy here.
- A descriptor goes only to a client that holds a reference to the object
  (`Registry.held_by`), over a Unix socket; a forked child already has the
  mapping.  What is sent is a duplicate, closed once sent, so a block dropped
  meanwhile cannot turn the number into another file.
- The block unmaps its pages as soon as they are pre-faulted (the manager
  never touches the data) and closes its descriptor when it is dropped
  (`close`, also run by a finalizer); processes that mapped it keep their
  mappings, and the kernel frees the memory when the last one goes.
- The lock (a manager lock proxy, or None) belongs to the block, so it lives
  exactly as long as the array and travels with it.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..transport import shm

__all__ = ["SharedBlock", "fd_reply", "MAX_BYTES"]

#: the largest array the manager makes (the frame limit's order of magnitude)
MAX_BYTES = 1 << 40


class SharedBlock:
    """The memory of one shared array, held by the manager."""

    #: calls on it need no per-object lock (they only read fixed fields)
    _procshare_concurrent_ = True
    #: what `fd_reply` and in-process proxies look for
    _procshare_shm_ = True

    def __init__(self, nbytes: int, meta: Any = None, lock: Any = None) -> None:
        if type(nbytes) is not int or not 0 <= nbytes <= MAX_BYTES:
            raise ValueError(f"a shared array takes 0 to {MAX_BYTES} bytes, not {nbytes!r:.40}")
        ok = shm.available()
        if not ok:
            raise OSError(f"SharedArray needs shared memory: {ok.reason}")
        self.nbytes = nbytes
        self.meta = meta
        self.lock = lock
        self.segment = shm.Segment.create(nbytes, "procshare-array", prefault=True,
                                          keep_mapped=False)
        self._finalizer = weakref.finalize(self, self.segment.close)

    def describe(self) -> dict:
        """What a process needs to use the array: its size, the size of the
        mapping, the client's description (`meta`) and the lock proxy."""
        return {"nbytes": self.nbytes, "size": self.segment.size, "meta": self.meta,
                "lock": self.lock}

    def mapping_info(self) -> dict:
        """What goes with the descriptor: the sizes only (no proxies)."""
        return {"nbytes": self.nbytes, "size": self.segment.size}

    def fileno(self) -> int:
        """The segment's descriptor (the manager's own; duplicate it to send it)."""
        if self.segment.closed:
            raise ValueError("this shared array's memory has been released")
        return self.segment.fd

    def close(self) -> None:
        """Release the manager's hold on the memory (mappings elsewhere stay valid)."""
        self._finalizer()

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"<SharedBlock {self.nbytes} bytes, meta={self.meta!r:.60}>"


def fd_reply(objects: Any, client: str, ident: str, channel: Any) -> shm.WithFds:
    """The `shm_fd` control operation: the descriptor of shared array `ident`
    for `client`, riding on the reply.  `objects` is the server's Registry;
    `channel` the connection the request came on."""
    entry = objects.get(ident)      # NoSuchObject: the usual "object gone" reply
    block = entry.obj
    if not getattr(block, "_procshare_shm_", False):
        raise TypeError(f"object {ident} ({entry.typeid!r}) has no shared memory to map")
    if objects.held_by(client).get(ident, 0) <= 0:
        raise PermissionError(f"client {client!r} holds no reference to shared array "
                              f"{ident}; a process gets its memory only while it holds one")
    if not shm.can_pass_fds(channel):
        raise OSError("a shared array can be mapped only by processes on the manager's "
                      "host, connected through its Unix socket (this connection is not one)")
    return shm.WithFds(block.mapping_info(), [block.fileno()])
