"""Transport: sockets, addresses, the authentication handshake and frame I/O.

Owns: every byte that crosses a socket.  Nothing else in procshare calls
`send`/`recv`.  Frames are laid out by `protocol`; this module only moves them.

Rules it keeps:
- Addresses follow `multiprocessing.connection`: a `(host, port)` tuple is TCP,
  a string is a Unix socket path (a leading NUL is Linux's abstract namespace).
  An automatically chosen Unix path that would be too long for AF_UNIX falls
  back to a short one under /tmp, then to the abstract namespace.
- Authenticate before deserializing anything: a mutual HMAC-SHA256 challenge
  over fixed-size raw bytes.  The hello frame that follows is only read by the
  server after the client's digest has been checked.
- One write per frame (`sendall` for a small frame, `sendmsg` with the
  out-of-band buffers for a large one); large bodies and buffers are received
  straight into preallocated memory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import select
import socket
import sys
import tempfile
import time
import weakref
from typing import Any

from . import protocol
from .errors import AuthenticationError

__all__ = ["Channel", "Listener", "connect", "address_family", "arbitrary_address",
           "cleanup_address"]

_MAGIC = b"PSHR1\x00"
_CHALLENGE = 32
_DIGEST = hashlib.sha256().digest_size
_OK = b"OK"
_NO = b"NO"
_RECV_CHUNK = 64 * 1024
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL
_HSIZE = protocol.HEADER.size
_unpack_header = protocol.HEADER.unpack_from
_DONTWAIT = socket.MSG_DONTWAIT
_perf = time.perf_counter

#: how long a receive busy-polls before it sleeps (PROCSHARE_SPIN_US, 0 disables;
#: off on single-CPU machines, where polling would only steal the peer's CPU)
SPIN_SECONDS = (float(os.environ.get("PROCSHARE_SPIN_US", "50")) / 1e6
                if (os.cpu_count() or 1) > 1 else 0.0)
_SPIN_MISSES = 4     # consecutive misses before a channel stops polling...
_SPIN_REST = 64      # ...for this many receives


def address_family(address: Any) -> int:
    if isinstance(address, tuple):
        return socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
    if isinstance(address, (str, bytes)):
        return socket.AF_UNIX
    raise ValueError(f"address {address!r} is neither a (host, port) tuple nor a socket path")


def arbitrary_address() -> str:
    """A fresh Unix socket path that fits AF_UNIX's length limit."""
    name = f"procshare-{os.getpid()}-{secrets.token_hex(4)}.sock"
    for base in (tempfile.gettempdir(), "/tmp"):
        path = os.path.join(base, name)
        if len(os.fsencode(path)) <= _UNIX_PATH_MAX and os.access(base, os.W_OK):
            return path
    return "\0" + name  # Linux abstract namespace: no file at all


def cleanup_address(address: Any) -> None:
    """Remove the socket file of a Unix address, if there is one."""
    if isinstance(address, str) and address and address[0] != "\0":
        try:
            os.unlink(address)
        except OSError:
            pass


_open_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def close_inherited() -> None:
    """In a forked child: close this process's copies of every procshare socket
    (without unlinking socket files or shutting connections down)."""
    for sock in list(_open_sockets):
        try:
            sock.close()
        except OSError:
            pass
    _open_sockets.clear()


class Channel:
    """One connected socket carrying frames in both directions."""

    __slots__ = ("sock", "_rest", "peer", "_spin", "_misses", "__weakref__")

    def __init__(self, sock: socket.socket, peer: Any = None) -> None:
        self.sock = sock
        _open_sockets.add(sock)
        self._rest = b""          # bytes received past the last frame
        self.peer = peer
        self._spin = SPIN_SECONDS  # how long recv_frame busy-polls before sleeping
        self._misses = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    # -- writing -----------------------------------------------------------
    def send_bytes(self, frame: bytes) -> None:
        """Write one whole frame that is a single bytes object."""
        self.sock.sendall(frame)

    def send(self, pieces: list) -> None:
        """Write one encoded frame (the list `protocol.encode_frame` returns)."""
        if len(pieces) == 1:
            self.sock.sendall(pieces[0])
            return
        views = [memoryview(p).cast("B") for p in pieces]
        while views:
            sent = self.sock.sendmsg(views[:512])
            while sent:
                n = views[0].nbytes
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # -- reading -----------------------------------------------------------
    def readable(self) -> bool:
        """True when a frame (or EOF) can be read without blocking."""
        if self._rest:
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise TimeoutError("no frame before the deadline")

    def _recv_more(self, deadline: float | None) -> bytes:
        self._wait(deadline)
        data = self.sock.recv(_RECV_CHUNK)
        if not data:
            raise EOFError("connection closed by peer")
        return data

    def _recv_exact(self, n: int, deadline: float | None) -> bytearray:
        """Receive exactly n bytes, leftovers first, the rest straight into place."""
        out = bytearray(n)
        view = memoryview(out)
        rest = self._rest
        k = min(len(rest), n)
        view[:k] = rest[:k]
        self._rest = rest[k:]
        while k < n:
            self._wait(deadline)
            got = self.sock.recv_into(view[k:], n - k)
            if not got:
                raise EOFError("connection closed by peer")
            k += got
        return out

    def recv_frame(self, deadline: float | None = None) -> tuple:
        """Read one frame: `(kind, rid, budget, body, buffers)`.

        `deadline` is a `time.monotonic()` value; TimeoutError if no whole frame
        arrived by then (a partial frame stays buffered for the next read).
        """
        data = self._rest
        if not data:
            data = self._poll() if self._spin else None
            if data is None:
                if self._misses < 0:
                    self._misses += 1
                    if not self._misses:
                        self._spin = SPIN_SECONDS
                if deadline is not None:
                    self._wait(deadline)
                data = self.sock.recv(_RECV_CHUNK)
            if not data:
                raise EOFError("connection closed by peer")
        if len(data) >= _HSIZE:
            # the common case: one small frame, whole, in one read
            blen, kind, _flags, nbufs, rid, budget = _unpack_header(data, 0)
            end = _HSIZE + blen
            if not nbufs and len(data) >= end:
                self._rest = data[end:] if len(data) > end else b""
                return kind, rid, budget, data[_HSIZE:end], ()
        self._rest = data
        return self._recv_frame_slow(deadline)

    def _poll(self) -> bytes | None:
        """Busy-poll for a moment before sleeping in recv.

        Waking a sleeping process costs tens of microseconds on virtual machines,
        more than a whole small call, while the reply to a small call (or a
        client's next call) usually comes within a few.  A channel that keeps
        missing stops polling for a while, so idle connections cost nothing.
        """
        end = _perf() + self._spin
        recv = self.sock.recv
        while True:
            try:
                data = recv(_RECV_CHUNK, _DONTWAIT)
            except BlockingIOError:
                if _perf() < end:
                    continue
                self._misses += 1
                if self._misses >= _SPIN_MISSES:
                    self._spin = 0.0
                    self._misses = -_SPIN_REST   # sleep this many receives, then poll again
                return None
            self._misses = 0
            return data

    def _recv_frame_slow(self, deadline: float | None) -> tuple:
        data = self._rest
        while len(data) < _HSIZE:
            data += self._recv_more(deadline)
            self._rest = data
        blen, kind, nbufs, rid, budget = protocol.split_header(data)
        end = _HSIZE + blen
        if not nbufs and blen <= _RECV_CHUNK:
            while len(data) < end:
                data += self._recv_more(deadline)
                self._rest = data
            self._rest = data[end:]
            return kind, rid, budget, data[_HSIZE:end], ()
        self._rest = data[_HSIZE:]
        lengths = protocol.buffer_lengths(
            self._recv_exact(nbufs * protocol.BUFLEN_SIZE, deadline), nbufs) if nbufs else []
        body = bytes(self._recv_exact(blen, deadline))
        buffers = [self._recv_exact(n, deadline) for n in lengths]
        return kind, rid, budget, body, buffers

    # -- handshake ---------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int, deadline: float | None) -> bytes:
        return bytes(self._recv_exact(n, deadline))


def _digest(authkey: bytes, challenge: bytes) -> bytes:
    return hmac.new(authkey, challenge, hashlib.sha256).digest()


def _auth_hint(address: Any) -> str:
    return ("This process and the manager do not share the authkey. Usual "
            "causes: (1) the manager was given authkey=... and this process passes a "
            "different one, or none (then it uses its current_process().authkey); (2) this "
            "process was not started by multiprocessing from the process that created the "
            "manager (a separate script, a subprocess, another machine), so its default "
            "authkey is a different random key: pass the same authkey= (bytes) on both "
            "ends; (3) another manager, with its own key, now listens at this address.")


def server_handshake(ch: Channel, authkey: bytes, timeout: float = 20.0) -> None:
    """Challenge the client; on success prove our own knowledge of the key."""
    deadline = time.monotonic() + timeout
    challenge = secrets.token_bytes(_CHALLENGE)
    ch.send_raw(_MAGIC + challenge)
    reply = ch.recv_raw(len(_MAGIC) + _DIGEST + _CHALLENGE, deadline)
    if reply[:len(_MAGIC)] != _MAGIC:
        raise AuthenticationError(
            "a peer connected that does not speak the procshare protocol "
            f"(first bytes {reply[:8]!r}); connection closed")
    digest = reply[len(_MAGIC):len(_MAGIC) + _DIGEST]
    if not hmac.compare_digest(digest, _digest(authkey, challenge)):
        ch.send_raw(_NO + bytes(_DIGEST))
        raise AuthenticationError(
            "the manager rejected a client's authkey (HMAC digest mismatch: the client uses "
            "a different authkey); connection refused, and the client was told so")
    ch.send_raw(_OK + _digest(authkey, reply[len(_MAGIC) + _DIGEST:]))


def client_handshake(ch: Channel, authkey: bytes, address: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        head = ch.recv_raw(len(_MAGIC) + _CHALLENGE, deadline)
    except (EOFError, TimeoutError):
        raise AuthenticationError(
            f"the server at {address!r} closed the connection or sent nothing before "
            "authenticating; is it a procshare manager?") from None
    if head[:len(_MAGIC)] != _MAGIC:
        raise AuthenticationError(
            f"the server at {address!r} is not a procshare manager (it sent {head[:8]!r}). "
            "A multiprocessing.managers server cannot be reached with procshare, or "
            "the other way round: use the same library on both ends.")
    mine = secrets.token_bytes(_CHALLENGE)
    ch.send_raw(_MAGIC + _digest(authkey, head[len(_MAGIC):]) + mine)
    try:
        answer = ch.recv_raw(2 + _DIGEST, deadline)
    except EOFError:
        answer = _NO
    if answer[:2] != _OK:
        raise AuthenticationError(
            f"the manager at {address!r} rejected the authkey of this process (pid "
            f"{os.getpid()}): the manager side refused the connection (HMAC digest "
            "mismatch). " + _auth_hint(address), address=address, rejected_by="manager")
    if not hmac.compare_digest(answer[2:], _digest(authkey, mine)):
        raise AuthenticationError(
            f"this process (pid {os.getpid()}) rejected the server at {address!r}: it "
            "accepted this process's digest but could not prove that it knows the authkey "
            "itself. Something other than the manager may be listening on that address "
            "(check the address), or it is not a procshare manager.",
            address=address, rejected_by="client")


class Listener:
    """A listening socket bound to a Unix or TCP address."""

    def __init__(self, address: Any = None, backlog: int = 128) -> None:
        if address is None:
            address = arbitrary_address()
        family = address_family(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            if family == socket.AF_UNIX and "too long" in str(e):
                raise OSError(e.errno, f"AF_UNIX path too long: {address!r} is "
                              f"{len(os.fsencode(address))} bytes, the limit is "
                              f"{_UNIX_PATH_MAX}. Pass a shorter address, or address=None "
                              "to let procshare choose one.") from None
            raise
        self._sock = sock
        _open_sockets.add(sock)
        self._family = family
        if family == socket.AF_UNIX:
            name = sock.getsockname()
            self.address = name.decode() if isinstance(name, bytes) else name
            if isinstance(address, str) and address.startswith("\0"):
                self.address = address
        else:
            self.address = sock.getsockname()[:2]

    def accept(self) -> Channel:
        sock, peer = self._sock.accept()
        if self._family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Channel(sock, peer)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            cleanup_address(self.address)


def connect(address: Any, timeout: float | None = None) -> Channel:
    """Open a socket to `address` (no handshake yet)."""
    family = address_family(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if timeout is not None:
            sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, address)


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("procshare supports POSIX systems (Linux, macOS) only")
