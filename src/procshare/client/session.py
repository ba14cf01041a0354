"""Client: this process's connections to managers, one session per address.

Owns: the client identity of this process, opening and authenticating
connections, the request/reply exchange with request ids and deadlines, and
what happens to connections across `fork()`.

Rules it keeps:
- Each process has one client id (new after fork).  Every connection says it
  in its hello, so the manager counts references per process.
- A session has one *control* connection, opened first and kept for the life
  of the process, that carries reference traffic (decref, loans, goodbye,
  cancel) from any thread; and one connection per thread for calls.
- A drop is ordered before the next request on any other connection of the
  session (`sync_frame`): the request after a decref carries a one-way
  `sync` frame, in the same write, and the manager runs it once the control
  connection has handled that decref (as with the stdlib's round trip, a
  dropped proxy's referent is gone when the next call runs).
- A connection that calls durable objects polls longer for replies
  (`SpinPolicy.long`): theirs wait for a journal commit, just past the short
  cap, and a wakeup after it cost more than the commit; and it sleeps for
  them in poll(), so that the manager reading its request does not wake it
  for nothing (`Channel.slow_replies`).
- A call over what the manager accepts in one message (its limits, from its
  hello) raises `MessageTooLarge` before anything is sent; so does a
  pipelined one (`pipeline`).  A call not sent, for that or because its
  arguments could not be serialized, gives back the loans its pickling took
  (`check_size`, `unsendable`: shared with `pipeline`).
- Replies are matched by request id.  A call abandoned at its deadline leaves
  its connection *pending*; the connection is set aside and reused once its
  late reply (even one that had started to arrive) has been read and dropped.
  A call connection interrupted inside a receive (Ctrl-C) is closed and
  replaced, because bytes may be lost between the kernel and the reader.
- A process that exits says goodbye (`say_goodbye`): the manager releases its
  references at once and treats it as exited, not dead.  Saying it waits for
  no restart of a manager that is gone.  A control connection that breaks
  without a goodbye is replaced under the same client id; the manager keeps
  everything of a live process.
- A broken connection to a supervised manager waits for its restart once,
  for at most `RECONNECT` seconds in all (the connect and handshake retries
  share that deadline); not if the manager said it stopped for good (a
  STOPPING frame, read on any connection of the session, the broken one's
  last bytes and the control connection's included: `read_last`, which reads
  past late replies while their bytes are there, if the manager could write
  its STOPPING frame behind them; or the answer to a new connection's hello).
  Such a frame notes the address as shut down for the whole process, until a
  new manager (another boot) answers there.
- A connection dropped unclosed (its thread ended) closes its socket then,
  quietly, as the stdlib's does.
- Reference traffic can start inside a garbage collection (a proxy's
  finalizer), so it never opens a connection while this thread is opening
  one (the transport's mutex may be held), nor waits for a session's lock
  then: such a decref waits and goes first on the next use of the control
  connection (`control_send`, `_control_conn`).  And no frame here keeps an
  exception whose traceback leads back to it (`_died_in_handshake`; a
  reply's error is dropped from the locals once raised, as `replies` says):
  the cycle would keep the frames a finalizer interrupted, and their proxies.
- A call abandoned by an exception inside its wait (Ctrl-C) is cancelled in
  the manager by request id (`Connection.abandon`), so it takes nothing.
- At a call's deadline the client asks the manager to cancel it (`_settle`):
  a call that finished, or that gave up in a blocking wait, is answered and
  that answer is returned, so a call whose effect happened is never reported
  as failed; only a call still running uncancellable code (a user method)
  raises CallTimeout saying it may still complete.  A reply that has started
  to arrive is always read to the end.
- An address that starts with a prefix registered with
  `register_session_factory` (procshare.ray's `ray://`) gets that transport's
  session from `get_session`; nothing else here sees it.
- A proxy that arrives without an authkey (nested in a value a manager
  returned) uses the one this process already uses with that manager, when
  it uses exactly one and it is not the process's default (`authkey_for`).
- After fork, the child never touches the parent's sockets: the parent lends
  its references to the child before forking, and the child adopts the loan
  on its first connection; a loan the child never adopts (it exited or
  exec'd first) goes back once the child is gone, at the parent's next
  control call or fork (`loans.check_fork_loans`).  A child that forks before
  it adopted adopts first, so that it can lend its child its references.
  Two threads may fork at once: what each lends is kept per forking
  thread (`_forming`).  The fork that starts a manager's server (or its
  supervisor) lends nothing, and the proxies that child inherits give
  nothing back (`inherited_by_server`): their references are the parent's.
- File descriptors (a shared array's memory) arrive only as the reply to a
  control call made with `control_call_fds`, read with `recvmsg` from an
  empty reader, so none is dropped; they are the caller's to close.  Those of
  shared-memory arenas (large payloads) travel on side connections of their
  own (`bulk`): the hello of a Unix-socket connection asks for shared memory,
  and a connection the manager agreed on carries large buffers in slots.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing import process
from multiprocessing import util as mp_util
from typing import Any

from ..errors import (
    AuthenticationError,
    ManagerCrashed,
    MessageTooLarge,
    ObjectLost,
    RemoteError,
    SerializationError,
    manager_crashed,
    note_shut_down,
    serializer_mismatch,
    shut_down_managers,
)
from ..inprocess import local_server
from ..transport import channel as transport
from ..transport import shm
from ..transport.processes import host_identity
from ..wire.diagnose import arguments_error, check_message
from ..wire.frames import DEFAULT_LIMITS, NO_DEADLINE, Limits, pack_frame
from ..wire.kinds import Kind, kind_name
from ..wire.records import DURABLE_PREFIX
from ..wire.serializers import Serializer, decode_hello, encode_hello, get_serializer
from . import bulk, loans
from .loans import check_fork_loans
from .loans import mark as loan_mark
from .loans import release_since as release_loans_since
from .replies import call_timeout, raise_reply

__all__ = ["Connection", "Client", "Session", "get_session", "client_id"]

log = logging.getLogger("procshare.client")

#: control operations sent again to a manager that restarted while they were in
#: flight: each is harmless if the first one had arrived
_RESENDABLE = frozenset({"loan", "incref", "adopt", "cancel", "dummy", "object_state",
                         "number_of_objects", "list_objects", "clients", "locks",
                         "debug_info", "server_info", "get_methods"})
#: how long a client keeps reconnecting to a supervised manager that restarts
RECONNECT = 5.0
#: how long the client waits for the manager to answer a cancel at a deadline,
#: and then for the reply that answer promised
SETTLE = 2.0
LATE_REPLY = 30.0
_NAN = NO_DEADLINE
_CALL = Kind.CALL
_monotonic = time.monotonic
_MAX_STALE = 8      # abandoned connections kept for reuse, per session


def _is_socket_file(address: Any) -> bool:
    """Is `address` a Unix socket path whose file exists?"""
    if not isinstance(address, str) or address[:1] in ("", "\0"):
        return False
    try:
        return stat.S_ISSOCK(os.stat(address).st_mode)
    except OSError:
        return False


def _new_client_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


_client_id = _new_client_id()
_HOST = host_identity()


def client_id() -> str:
    """This process's identity as a client of managers."""
    return _client_id


def unsendable(cause: BaseException, since: int, ser: Any, oid: Any, meth: str, args: tuple,
               kwds: dict, typeid: str | None) -> BaseException:
    """The error to raise for a call whose arguments could not be serialized
    (nothing is sent); the loans its pickling took (proxies in the arguments,
    since `loan_mark()` was `since`) go back."""
    return release_loans_since(since, arguments_error(cause, ser, oid, meth, args, kwds, typeid))


def check_size(limits: Limits, body: bytes, bufs: Any, since: int, ser: Any, oid: Any,
               meth: str, args: tuple, kwds: dict, address: Any, typeid: str | None) -> None:
    """MessageTooLarge for a call over the manager's `limits` (nothing is
    sent), the loans its pickling took given back; else nothing."""
    try:
        check_message(limits, body, bufs, ser, oid, meth, args, kwds, address, typeid)
    except MessageTooLarge:
        release_loans_since(since)
        raise


class Connection:
    """One authenticated channel to a manager, used by one thread at a time."""

    __slots__ = ("ch", "ser", "rid", "pending", "session", "thread", "none_body", "no",
                 "epoch", "limits", "sent", "synced", "control", "__weakref__")

    def __init__(self, ch: transport.Channel, ser: Serializer, session: Session,
                 no: int = 0) -> None:
        self.ch = ch
        self.no = no                     # this connection's number in its session
        self.epoch = session.epoch       # which incarnation of the manager it talks to
        self.ser = ser
        self.rid = 0
        self.pending: set[int] = set()   # request ids whose replies were abandoned
        self.session = session
        # the manager knows a connection's calls as this thread's (lock owners)
        self.thread = threading.get_ident()
        self.none_body = ser.dumps(None)[0]     # the common reply, decoded without loads
        self.limits = session.limits    # what the manager accepts (its hello said)
        self.sent = 0       # requests sent on it (the manager counts a control one's)
        #: the session's `drops` this connection's calls are ordered after
        self.synced = 0
        #: a control connection (its requests follow the drops it carries already)
        self.control = False

    def send_request(self, oid: Any, meth: str, args: tuple, kwds: dict,
                     timeout: float | None, want_reply: bool = True,
                     typeid: str | None = None) -> int:
        rid = 0
        if want_reply:
            rid = self.rid = self.rid + 1
        since = loan_mark()
        try:
            body, bufs = self.ser.dumps_call(oid, meth, args, kwds)   # nothing sent if this fails
        except Exception as e:
            raise unsendable(e, since, self.ser, oid, meth, args, kwds, typeid) from None
        limits = self.limits
        if bufs or len(body) > limits.max_body:     # (nothing sent if this raises)
            check_size(limits, body, bufs, since, self.ser, oid, meth, args, kwds,
                       self.session.address, typeid)
        budget = _NAN if timeout is None else timeout
        if oid and oid.startswith(DURABLE_PREFIX):
            self.ch.slow_replies()  # its reply waits for a commit
        self.sent += 1
        session = self.session
        sync = session.sync_frame(self) if self.synced != session.drops else b""
        try:
            if bufs:    # through shared-memory slots where the connection has them
                if sync:
                    self.ch.send_frames(sync)
                self.ch.send_buffers(_CALL, rid, body, bufs, budget, limits)
            elif sync:
                self.ch.send_frames(sync + pack_frame(_CALL, rid, body, budget))
            else:
                self.ch.send_bytes(pack_frame(_CALL, rid, body, budget))
        except OSError:
            self.read_last()    # (the peer closed: did it say it stopped?)
            self.close()        # a frame may be half-written
            raise
        except BaseException:
            self.close()    # a frame may be half-written (Ctrl-C)
            raise
        return rid

    def wait_reply(self, rid: int, deadline: float | None) -> tuple[int, Any]:
        recv = self.ch.recv_frame
        while True:
            try:
                kind, got, _budget, body, bufs = recv(deadline)
            except TimeoutError:
                if self.ch.reader.started_rid == rid:
                    # the reply is arriving: the call happened, so read all of it
                    deadline = None
                    continue
                self.pending.add(rid)   # the reader keeps any partial reply: drain() ends it
                raise
            except (EOFError, OSError):
                raise               # the connection broke: nothing to cancel on it
            except BaseException:
                self.abandon(rid)
                raise
            if got == rid:
                if body == self.none_body:
                    return kind, None
                try:
                    return kind, self.ser.loads(body, bufs)
                except Exception as e:   # the frame was read whole: the connection is fine
                    if hasattr(e, "add_note"):
                        e.add_note(
                            f"procshare: this process (pid {os.getpid()}) could not deserialize "
                            f"a reply with {self.ser.name!r}. Classes of objects the manager "
                            "returns must be importable here by the same name.")
                    raise
            self._drop_late(got, kind, body)

    def abandon(self, rid: int) -> None:
        """The wait for request `rid` was interrupted (Ctrl-C, an exception): have
        the manager cancel it, so a blocked get or acquire takes nothing.  Bytes
        may be lost between the kernel and the reader, so a call connection is
        closed (the next call opens another)."""
        session = self.session
        if self is session.control:
            self.pending.add(rid)   # replaced only once broken (see control_call)
            return
        self.close()
        try:    # a round trip, so that the cancel is in force before the next call
            session.control_call("cancel", self.no, rid, timeout=1.0)
        except Exception as e:
            log.debug("cancel of request %d not delivered: %r", rid, e)

    def read_last(self) -> None:
        """The connection broke (or is about to be given up): read what the
        manager wrote before it closed, without waiting, for a STOPPING frame
        (`Session.on_stopping`); late replies are dropped.  It reads on while
        the socket has bytes: one receive takes 64 KiB at most, and may end
        inside a large reply or after a frame the reader keeps to itself (slot
        notices), with the STOPPING frame behind it."""
        ch = self.ch
        try:
            while not ch.closed:
                frame = ch.recv_ready()
                if frame is None:
                    if transport.readable_within(ch.sock, 0.0):
                        continue    # more is there already (at its end: EOFError)
                    return
                self._drop_late(frame[1], frame[0], frame[3])
        except Exception:   # (its end, a broken frame, the STOPPING itself): done
            return

    def _drop_late(self, rid: int, kind: int, body: Any = b"") -> None:
        if kind == Kind.STOPPING:
            raise self.session.on_stopping(body)
        if rid in self.pending:
            self.pending.discard(rid)
            log.info("dropped the late reply (%s) to abandoned request %d",
                     kind_name(kind), rid)
        else:
            log.warning("dropped a reply to unknown request %d (%s)", rid, kind_name(kind))

    def call(self, oid: Any, meth: str, args: tuple, kwds: dict,
             timeout: float | None, typeid: str | None = None) -> tuple[int, Any]:
        """Send one request and wait for its reply: `(kind, payload)`
        (`typeid`: the object's, named by an error about the arguments)."""
        deadline = None if timeout is None else _monotonic() + timeout
        try:
            rid = self.send_request(oid, meth, args, kwds, timeout, True, typeid)
        except SerializationError:
            raise       # (an OSError a __reduce__ raised, say) nothing was sent
        except (EOFError, OSError) as e:
            raise self._broken(e, deadline) from None
        try:
            try:
                reply = self.wait_reply(rid, deadline)
            except TimeoutError:
                if not self._settle(rid):
                    raise           # the caller says which call timed out
                # the manager finished the call or gave it up: its reply is coming
                self.pending.discard(rid)
                reply = self.wait_reply(rid, _monotonic() + LATE_REPLY)
        except TimeoutError:
            _leave_quietly(self.session)
            raise                   # the caller says which call timed out
        except (EOFError, OSError) as e:
            _leave_quietly(self.session)
            self.close()
            raise self._broken(e, deadline) from None
        if self.session.leaving and reply[0] != Kind.RETURN:
            _leave_quietly(self.session)
        return reply

    def _broken(self, cause: BaseException, deadline: float | None = None) -> ManagerCrashed:
        """The error for a call whose connection broke: ObjectLost (without the
        object's details, which the proxy adds; its `deadline` is the call's,
        for a re-send) if a supervised manager came back as a new incarnation,
        else ManagerCrashed."""
        if self.epoch != self.session.epoch or self.session.recover(self.epoch):
            lost = ObjectLost("the manager restarted; the call's object did not survive")
            lost.deadline = deadline
            return lost
        return self.session.crashed(cause)

    def _settle(self, rid: int) -> bool:
        """The deadline of request `rid` passed with no reply: ask the manager to
        cancel it.  True if a reply is now certain to come at once (the call had
        finished, or it was waiting and gave up having taken nothing); False if
        it is still running code that cannot be interrupted, or the manager
        does not answer."""
        if self is self.session.control:
            return False
        try:
            state = self.session.control_call("cancel", self.no, rid, timeout=SETTLE)
        except Exception as e:
            log.debug("could not settle request %d: %r", rid, e)
            return False
        return state in ("done", "cancelled", "not started")

    def drain(self, block: bool = False) -> bool:
        """Read and drop late replies (waiting for them if `block`); True when
        none is pending any more and the connection can be used again."""
        if self.ch.closed:
            return False
        while self.pending and (block or self.ch.readable()):
            try:
                kind, got, _b, _body, _bufs = self.ch.recv_frame(
                    None if block else time.monotonic() + 1.0)
            except (OSError, EOFError, TimeoutError):
                self.close()
                return False
            try:
                self._drop_late(got, kind, _body)
            except EOFError:    # the manager stopped for good
                self.close()
                return False
        return not self.pending

    def close(self) -> None:
        self.ch.close()
        self.pending.add(0)     # never usable again: thread_conn() replaces it

    def __del__(self) -> None:
        # as the stdlib's Connection: one dropped unclosed (the thread that used
        # it ended) closes its socket now, quietly.  Its channel can sit in a
        # reference cycle (a reader's slot callback) until a collection, which
        # would then warn of an unclosed socket, and the fd stayed open till then
        try:
            self.ch.close()
        except Exception:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _limits_of(said: Any) -> Limits:
    """The limits a manager's hello gives (`[max_body, max_frame,
    max_buffers]`), with `max_body` no more than `max_frame`; the defaults
    from a manager that gives none."""
    try:
        max_body, max_frame, max_buffers = said
        return Limits(min(max_body, max_frame), max_frame, max_buffers)
    except (TypeError, ValueError):
        return DEFAULT_LIMITS


def _died_in_handshake(e: BaseException) -> bool:
    """Did the manager die (or vanish) while `e`'s connection was being opened?
    (A function of its own, so that no frame of the caller's keeps the cause:
    the cause's traceback leads back to that frame, and the cycle would keep
    every frame below it alive until a full collection, among them a frame a
    proxy's finalizer ran in, and with it the proxies that frame held.)"""
    cause = e.__cause__ or e.__context__
    return getattr(e, "no_answer", False) or isinstance(cause, (EOFError, ConnectionError))


def Client(address: Any, authkey: bytes | None = None,
           serializer: str | Serializer = "pickle") -> Connection:
    """An authenticated connection of its own to the manager at `address`, for
    `dispatch(conn, None, "dummy")`-style code written for the stdlib
    (`listener_client[serializer][1]`, `manager._Client`).  Close it after use."""
    if authkey is None:
        from multiprocessing import process
        authkey = process.current_process().authkey
    return Session(address, bytes(authkey), get_serializer(serializer))._open("call")


def _process_name(t: threading.Thread) -> str:
    """Who calls, as the stdlib names the manager's thread that serves it
    (`BaseProxy._connect`): the process's name, and the thread's unless it
    is the main thread."""
    name = process.current_process().name
    if t.name != "MainThread":
        name += "|" + t.name
    return name


class _ThreadState(threading.local):
    """A session's per-thread state (`Session.tls`, a proxy's `_tls`): `conn`,
    the thread's call connection, also readable as `connection`, the stdlib's
    name, for code that closes or deletes it (`proxy._tls.connection.close()`,
    `del proxy._tls.connection`: the next call opens another)."""

    @property
    def connection(self) -> Connection:
        conn = self.__dict__.get("conn")
        if conn is None:    # (as the stdlib's before the thread's first call)
            raise AttributeError("'_ThreadState' object has no attribute 'connection'")
        return conn

    @connection.setter
    def connection(self, conn: Connection) -> None:
        self.conn = conn

    @connection.deleter
    def connection(self) -> None:   # (the next call opens another)
        if self.__dict__.pop("conn", None) is None:
            raise AttributeError("'_ThreadState' object has no attribute 'connection' "
                                 "(this thread has no connection to the manager yet)")


class Session:
    """This process's link to the manager at one address."""

    def __init__(self, address: Any, authkey: bytes, serializer: Serializer) -> None:
        self.address = address
        self.authkey = bytes(authkey)
        self.serializer = serializer
        #: in a forked child, the write end of the pipe of the fork loan to
        #: adopt (-1: none), and what `os.fstat` said of it: closed once the
        #: manager answered the adopting hello, which tells the parent it may
        #: give the loan back (`loans`)
        self.adopt_w = -1
        self.adopt_id: tuple | None = None
        self._reset()

    def _reset(self, adopt: str | None = None) -> None:
        # proxies keep a reference to `tls`: empty it in place rather than replace it
        tls = self.__dict__.get("tls")
        if tls is None:
            tls = self.tls = _ThreadState()
        tls.__dict__.clear()
        self.lock = threading.RLock()
        self.control: Connection | None = None
        self.adopt = adopt                    # a fork loan to adopt on first connect
        self.stale: list[Connection] = []     # connections with abandoned requests
        self.live = 0                         # proxies of this process using the session
        self.server_pid: int | None = None
        #: the manager's protocol version, from its hello (None: not known yet;
        #: 1: before 2026-11-29, no `create_full`; 2: before 2026-11-30, no `#ATTR`)
        self.server_version: int | None = None
        self.incarnation: int | None = None   # the manager's restart count, from its hello
        # the server process's own id, from its hello (a forked child keeps its parent's)
        self.boot: str | None = getattr(self, "boot", None)
        # it will be restarted if it dies (a forked child keeps what its parent knew)
        self.supervised = getattr(self, "supervised", False)
        #: what the manager accepts in one message, from its hello
        self.limits: Limits = getattr(self, "limits", DEFAULT_LIMITS)
        self.epoch = getattr(self, "epoch", 0)   # +1 each time the manager came back
        self.closed = False
        self.leaving = False        # this process is saying goodbye (`say_goodbye`)
        #: why the manager stopped for good, from its STOPPING frame (a forked
        #: child knows it too); None while it may come back
        self.stopped: str | None = getattr(self, "stopped", None)
        self._numbers = itertools.count(1)    # connection numbers (the manager's cancel key)
        self.token = secrets.token_hex(4)     # with them, the key of a durable call
        self.pipes: weakref.WeakSet = weakref.WeakSet()   # pipelined connections
        #: durable object id -> proxies of this process holding it (re-attached
        #: to a restarted manager); and whether that is due
        self.durable: dict[str, int] = getattr(self, "durable", {})
        self.reattach_due = False
        #: decrefs a finalizer ran while this thread opened a connection could
        #: not send then, without opening another or waiting for `lock`
        #: (`control_send`); they go first on the control connection's next use
        self.deferred: list[tuple[str, tuple]] = []
        #: one-way messages (decrefs) sent or put off on the control connection so
        #: far, and (that connection's number, its requests sent) at the last one
        #: sent: what a call connection's next request is ordered after (`sync_frame`)
        self.drops = 0
        self.drop_mark: tuple[int, int] | None = None

    # -- connecting -------------------------------------------------------------
    def _open(self, role: str, thread: threading.Thread | None = None,
              waits: bool = True) -> Connection:
        """A new connection for `role`; its calls are `thread`'s (default: this
        one).  `waits`: that thread sleeps for each reply (not so for a
        pipeline's), so the manager may follow its CPU (`transport.placement`)."""
        _opening.depth = getattr(_opening, "depth", 0) + 1
        try:
            return self._open_retrying(role, thread, waits)
        finally:
            _opening.depth -= 1

    def _open_retrying(self, role: str, thread: threading.Thread | None,
                       waits: bool = True) -> Connection:
        end: list = [None]      # one wait of RECONNECT seconds, shared with _connect
        while True:
            try:
                return self._open_once(role, thread, waits, end)
            except (ManagerCrashed, AuthenticationError) as e:
                # the manager died during the handshake: a supervised one comes back
                if not self.supervised or getattr(_no_recover, "on", False) \
                        or not _died_in_handshake(e) or self.stopped is not None \
                        or self.address in shut_down_managers:
                    raise       # (a manager shut down or stopped for good: no waiting)
                now = time.monotonic()
                if end[0] is None:
                    end[0] = now + RECONNECT
                if now >= end[0]:
                    raise
                time.sleep(0.02)

    def _adopted(self) -> None:
        """The manager adopted this child's fork loan: the parent may give
        it back now (a no-op for the manager; `loans.watch_fork_loan`).  The
        descriptor is closed only if it is still that pipe: a child that
        closed what it inherited may have reused the number (for the control
        connection being opened, say)."""
        w, self.adopt_w = self.adopt_w, -1
        if w >= 0:
            try:
                st = os.fstat(w)
                if (st.st_dev, st.st_ino) == self.adopt_id:
                    os.close(w)
            except OSError:
                pass
        self.adopt_id = None

    def _lend_to_child(self, w: int) -> None:
        """(a forked child) `w` is the write end of the fork loan to adopt."""
        self.adopt_w = w
        try:
            st = os.fstat(w)
            self.adopt_id = (st.st_dev, st.st_ino)
        except OSError:
            self.adopt_w, self.adopt_id = -1, None

    def _open_once(self, role: str, thread: threading.Thread | None = None,
                   waits: bool = True, end: list | None = None) -> Connection:
        ch = self._connect(end)
        try:
            transport.client_handshake(ch, self.authkey, self.address)
            t = thread or threading.current_thread()
            no = next(self._numbers)
            hello = {"client": _client_id, "pid": os.getpid(), "thread": t.ident,
                     "tid": (t.native_id or 0) if waits else 0,
                     "thread_name": t.name, "process_name": _process_name(t),
                     "serializer": self.serializer.name,
                     "role": role, "version": 3, "conn": no, "session": self.token,
                     "host": _HOST[0], "pidns": _HOST[1]}
            adopting = role == "control" and bool(self.adopt)
            if adopting:
                hello["adopt"], self.adopt = self.adopt, None
            bulk.ask(ch, hello)
            ch.send_bytes(pack_frame(Kind.HELLO, 1, encode_hello(hello)))
            kind, _rid, _b, body, bufs = ch.recv_frame(time.monotonic() + 20.0)
            info = decode_hello(body, bufs, self.serializer)
        except (EOFError, ConnectionError, TimeoutError) as e:
            ch.close()
            raise self.crashed(e) from None
        except BaseException:
            ch.close()
            raise
        if kind == Kind.STOPPING:      # it stopped for good as this connection came
            ch.close()
            raise self.crashed(self.on_stopping(body)) from None
        if kind != Kind.RETURN:
            ch.close()
            if isinstance(info, dict) and info.get("error") == "serializer":
                raise serializer_mismatch(self.address, self.serializer.name,
                                          info.get("manager_serializer"), info.get("reason"))
            raise RemoteError(info.get("message", info) if isinstance(info, dict) else info)
        if adopting:
            self._adopted()
        self.server_pid = info.get("pid")
        self.server_version = info.get("version", 1)
        self.supervised = bool(info.get("supervised"))
        self.limits = _limits_of(info.get("limits"))
        incarnation = info.get("incarnation", 0)
        boot = info.get("boot")
        with self.lock:                 # one thread notices a restart, once
            if boot != self.boot:       # another server process: it restarted
                if self.boot is not None:
                    self._restarted(incarnation)
                self.boot = boot
                self.stopped = None     # a new manager on the address: whatever was
                shut_down_managers.pop(self.address, None)  # said of the old one is moot
            self.incarnation = incarnation
        if role == "control":
            _goodbye_at_exit()
        bulk.agree(self, ch, info, client_id)
        conn = Connection(ch, self.serializer, self, no)
        conn.control = role == "control"
        if role == "control" and self.reattach_due:
            self._reattach(conn)
        return conn

    def _reattach(self, conn: Connection) -> None:
        """On the first control connection to a restarted manager: take back
        the references of this process's proxies to durable objects (also
        when there are none: the manager then knows that this process holds
        nothing it kept for it)."""
        self.reattach_due = False
        idents = [(i, n) for i, n in list(self.durable.items()) if n > 0]
        try:
            kind, missing = conn.call(None, "reattach", (idents,), {}, 20.0)
        except Exception as e:
            log.warning("could not re-attach %d durable object(s) to the restarted manager "
                        "at %r: %r", len(idents), self.address, e)
            return
        if kind == Kind.RETURN and missing:
            log.warning("the restarted manager at %r no longer has %d durable object(s) "
                        "this process holds: %s", self.address, len(missing), missing[:5])

    def durable_held(self, ident: str) -> None:
        self.durable[ident] = self.durable.get(ident, 0) + 1

    def durable_dropped(self, ident: str) -> None:
        n = self.durable.get(ident, 0) - 1
        if n > 0:
            self.durable[ident] = n
        else:
            self.durable.pop(ident, None)

    def _connect(self, end: list | None = None) -> transport.Channel:
        """A socket to the manager.  While a supervised manager restarts, nothing
        listens for a moment: keep trying for RECONNECT seconds (until `end[0]`,
        a monotonic time shared with the caller's retries, set here if None).
        A manager that was shut down is not waited for: this process shut it
        down, or its socket file is gone (a restarting server keeps the file in
        place)."""
        if end is None:
            end = [None]
        pause = 0.01
        while True:
            try:
                return transport.connect(self.address, timeout=20.0)
            except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError) as e:
                # never connected yet (a spawned child, say): a socket file that
                # refuses is a server that died there, and it may be restarting
                may_return = self.supervised or (self.boot is None and _is_socket_file(
                    self.address))
                if (not may_return or getattr(_no_recover, "on", False)
                        or isinstance(e, FileNotFoundError)
                        or self.address in shut_down_managers or self._said_stopped()):
                    raise self.crashed(e) from None
                now = time.monotonic()
                if end[0] is None:
                    end[0] = now + RECONNECT
                if now >= end[0]:
                    raise self.crashed(e) from None
                time.sleep(min(pause, end[0] - now))
                pause = min(pause * 2, 0.1)
            except transport.HostUnknown:
                raise       # a wrong address, not a manager gone (as in the stdlib)
            except OSError as e:
                raise self.crashed(e) from None

    def _said_stopped(self) -> bool:
        """Did the manager say it stopped for good?  Reads the control
        connection's last frames for it, if no other thread uses it now."""
        if self.stopped is None and self.control is not None \
                and self.lock.acquire(blocking=False):
            try:
                if self.control is not None:
                    self.control.read_last()
            finally:
                self.lock.release()
        return self.stopped is not None

    def on_stopping(self, body: bytes) -> EOFError:
        """A STOPPING frame came: the manager stopped for good, so nothing waits
        for a restart.  Returns the error that ends the connection it came on."""
        try:
            info = decode_hello(body, [], self.serializer)
            why = str(info.get("why") or "it stopped")
            by = info.get("by")
        except Exception:       # (a frame from a newer manager, say)
            info, why, by = {}, "it stopped", None
        self.stopped = why
        if self.address not in shut_down_managers:
            # (the process that shut it down noted it already, with its class);
            # a stop with no process behind it is noted with its reason
            by = by if isinstance(by, int) else None
            note_shut_down(self.address, str(info.get("manager") or "manager"),
                           info.get("pid") or self.server_pid, by=by,
                           when=info.get("when"), why=why if by is None else None)
        return EOFError(f"the manager stopped for good: {why}")

    def _restarted(self, incarnation: int) -> None:
        """The manager came back after a crash: every connection made to the
        dead one is closed, so each thread opens a new one at its next call."""
        log.warning("the manager at %r was restarted (restart %d): objects that were "
                    "not durable are lost", self.address, incarnation)
        old = [self.control, *self.stale]
        self.control = None
        self.stale = []
        self.reattach_due = True
        for c in old:
            if c is not None:
                c.close()
        self.epoch += 1     # per-thread connections from before are stale

    def recover(self, epoch: int | None = None) -> bool:
        """A connection (made in `epoch`) to a supervised manager broke: wait (up
        to RECONNECT seconds, once) for it to come back.  True if it did, as a
        new incarnation (maybe noticed by another thread meanwhile).  Not while
        this process says goodbye: it is exiting, and waits for nothing."""
        if not self.supervised or self.leaving or getattr(_no_recover, "on", False):
            return False        # (a process saying goodbye waits for no restart)
        with self.lock:
            if epoch is not None and epoch != self.epoch:
                return True         # another thread saw the restart already
            before = self.boot
            stopped = self._said_stopped()
            if self.control is not None:
                self.control.close()
                self.control = None
            if stopped:
                return False
            try:
                self._control_conn()
            except ManagerCrashed:
                return False
        return self.boot != before

    def _control_conn(self) -> Connection:
        """(with `lock` held) The control connection, opened if need be; the
        messages `control_send` put off go first."""
        c = self.control
        if c is None:
            c = self.control = self._open("control")
        if self.deferred:
            self._send_deferred(c)
        return c

    def _send_deferred(self, c: Connection) -> None:
        """(with `lock` held) Send the decrefs `control_send` put off."""
        try:
            while self.deferred:
                meth, args = self.deferred[0]
                c.send_request(None, meth, args, {}, None, want_reply=False)
                self.drop_mark = (c.no, c.sent)
                del self.deferred[0]
        except Exception as e:  # the manager may be gone; nothing to release then
            log.debug("put-off %s not delivered: %r", meth, e)
            self.deferred.clear()

    def sync_frame(self, conn: Connection) -> bytes:
        """The frame that orders `conn`'s next request after the one-way
        messages (decrefs) this process sent on the control connection, empty
        if none is needed: the manager handles that request once its control
        connection has handled them.  So a proxy dropped before a call is gone
        when the call runs, on any connection, as with the stdlib, whose
        decref is a round trip (a `__del__`'s effects are there to see).  The
        decrefs still cost no round trip: one small frame goes with the next
        call, and only after a drop.  Put-off decrefs are sent first, unless
        this thread is opening a connection (then they stay unordered)."""
        drops = self.drops
        conn.synced = drops
        if conn.control:
            # its own requests come after them already (and one not yet the
            # session's, sending its reattach, must send only what it counts)
            return b""
        if self.deferred and not getattr(_opening, "depth", 0):
            with self.lock:
                try:
                    with no_recover():
                        self._control_conn()
                except Exception as e:
                    log.debug("put-off decrefs not delivered: %r", e)
        mark = self.drop_mark
        if mark is None:
            return b""
        body, _bufs = conn.ser.dumps_call(None, "sync", mark, {})
        return pack_frame(_CALL, 0, body, _NAN)

    def thread_conn(self) -> Connection:
        """This thread's call connection, opening or recycling one if needed."""
        c = getattr(self.tls, "conn", None)
        if c is not None and not c.pending and c.epoch == self.epoch:
            return c
        if c is not None and c.epoch != self.epoch:
            c.close()       # made to a manager that has since restarted
        with self.lock:
            self._control_conn()           # the control connection always comes first
            if c is not None:
                self.stale.append(c)
            self.tls.conn = None
            me = threading.get_ident()
            for old in list(self.stale):
                if old.thread != me:
                    continue        # its calls would run as another thread's
                if old.drain():
                    self.stale.remove(old)
                    self.tls.conn = old
                    return old
                if old.ch.closed:
                    self.stale.remove(old)
            while len(self.stale) > _MAX_STALE:     # a manager that keeps hanging
                self.stale.pop(0).close()
        c = self.tls.conn = self._open("call")
        return c

    # -- reference traffic on the control connection ------------------------------
    def control_call(self, meth: str, *args: Any, timeout: float | None = None) -> Any:
        check_fork_loans()      # (fork loans whose children are gone go back: `loans`)
        with self.lock:
            c = self._control_conn()
            if c.pending and not c.drain(block=True):
                # closing the control connection tells the manager this process
                # is gone, so it is only replaced once it is already broken
                c = self.control = self._open("control")
            try:
                try:
                    kind, result = c.call(None, meth, args, {}, timeout)
                except ObjectLost:
                    # the manager restarted under the old control connection, and
                    # recover() opened one to the new server: an operation that is
                    # harmless twice (a loan of a durable object, say) is sent again
                    if meth not in _RESENDABLE:
                        raise
                    kind, result = self._control_conn().call(None, meth, args, {}, timeout)
            except TimeoutError:
                raise call_timeout(None, meth, timeout, False, session=self) from None
        if kind == Kind.RETURN:
            return result
        try:
            return raise_reply(kind, result, None, meth, timeout)
        finally:
            result = None   # the exception raised must not keep itself (see the header)

    def control_call_fds(self, meth: str, *args: Any, timeout: float | None = None,
                         maxfds: int = 4) -> tuple[Any, list[int]]:
        """A control call whose reply carries file descriptors (SCM_RIGHTS on its
        first byte): `(result, fds)`.  The fds are the caller's to close."""
        with self.lock:
            c = self._control_conn()
            if c.pending and not c.drain(block=True):
                c = self.control = self._open("control")
            try:
                rid = c.send_request(None, meth, args, {}, timeout)
            except (EOFError, OSError) as e:
                raise self.crashed(e) from None
            deadline = None if timeout is None else _monotonic() + timeout
            try:
                kind, got, _b, body, bufs, fds = shm.recv_frame_fds(c.ch, deadline, maxfds)
            except TimeoutError:
                c.pending.add(rid)      # its descriptors, if any, are dropped with it
                raise call_timeout(None, meth, timeout, False, session=self) from None
            except (EOFError, OSError) as e:
                c.close()
                raise self.crashed(e) from None
            except BaseException:
                c.close()   # bytes (and descriptors) may be lost: the next call replaces it
                raise
            try:
                if kind == Kind.STOPPING:
                    c.close()
                    raise self.crashed(self.on_stopping(body))
                if got != rid:
                    c.close()
                    raise RuntimeError(f"a reply to request {got} came for {meth} "
                                       f"(request {rid}) on the control connection")
                result = None if body == c.none_body else c.ser.loads(body, bufs)
                if kind != Kind.RETURN:
                    try:
                        raise_reply(kind, result, None, meth, timeout)
                    finally:
                        result = None   # (as in control_call)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        return result, fds

    def control_send(self, meth: str, *args: Any) -> None:
        """Fire-and-forget (no reply); errors are ignored: used for decref, often
        from a finalizer, so it never waits for a manager to come back (a
        restarted one lost the references of other objects anyway, and holds
        durable ones until its clean shutdown)."""
        check_fork_loans()
        opening = getattr(_opening, "depth", 0)
        # A finalizer that a garbage collection ran while this thread opens a
        # connection (with the transport's mutex, maybe) neither opens another
        # nor waits for the session of a thread that may wait for that mutex:
        # its message waits, and goes first on the next use of the connection
        if not self.lock.acquire(blocking=not opening):
            self.deferred.append((meth, args))
            self.drops += 1     # (racing another thread's +1 at worst loses one sync)
            return
        try:
            with no_recover():
                if self.control is None and opening:
                    self.deferred.append((meth, args))
                    self.drops += 1
                    return
                c = self._control_conn()
                c.send_request(None, meth, args, {}, None, want_reply=False)
                self.drop_mark = (c.no, c.sent)
                self.drops += 1
        except Exception as e:  # the manager may be gone; nothing to release then
            log.debug("%s%r not delivered: %r", meth, args, e)
        finally:
            self.lock.release()

    # -- failures -------------------------------------------------------------------
    def crashed(self, cause: BaseException) -> ManagerCrashed:
        """The error for a manager that cannot be reached (see `errors`)."""
        return manager_crashed(self.address, cause, reached_before=self.boot is not None)

    def close(self) -> None:
        for pipe in list(self.pipes):
            pipe.close()
        with self.lock:
            conns = [self.control, getattr(self.tls, "conn", None), *self.stale]
            self.control = None
            self.tls.__dict__.clear()
            self.stale = []
            self.closed = True
        for c in conns:
            if c is not None:
                c.close()
        bulk.session_closed(self)


_sessions: dict[Any, Session] = {}
_sessions_mutex = threading.Lock()


#: address prefix -> factory(address, authkey, serializer) of a session of another
#: transport; procshare.ray registers "ray://" when it is imported
_session_factories: dict[str, Any] = {}


def register_session_factory(prefix: str, factory: Any) -> None:
    """Route string addresses that start with `prefix` to `factory(address, authkey,
    serializer)`, which returns (and caches) a session-like object for them."""
    _session_factories[prefix] = factory


def get_session(address: Any, authkey: bytes, serializer: str | Serializer = "pickle") -> Session:
    """The session for `address`, created on first use."""
    if _session_factories and isinstance(address, str):
        for prefix, factory in _session_factories.items():
            if address.startswith(prefix):
                return factory(address, authkey, serializer)
    ser = get_serializer(serializer)
    key = (address, bytes(authkey), ser.name)
    s = _sessions.get(key)
    if s is not None and not s.closed:
        return s
    with _sessions_mutex:
        s = _sessions.get(key)
        if s is None or s.closed:
            s = _sessions[key] = Session(address, authkey, ser)
        return s


def authkey_for(address: Any) -> bytes | None:
    """The authkey this process uses with the manager at `address`, when it
    is not this process's own and is the only one: for a proxy that arrives
    without one (nested in a value the manager returned), which would
    otherwise try this process's default key, as the stdlib does, and be
    refused by a manager started with `authkey=`."""
    keys = {k[1] for k, s in list(_sessions.items()) if k[0] == address and not s.closed}
    if len(keys) != 1 or bytes(process.current_process().authkey) in keys:
        return None
    return keys.pop()


def drop_session(address: Any) -> None:
    """Forget the session for a manager that has shut down."""
    with _sessions_mutex:
        gone = [_sessions.pop(k) for k in list(_sessions) if k[0] == address]
    for s in gone:
        s.close()


# -- exit -------------------------------------------------------------------------
_goodbye_pid: int | None = None


def _goodbye_at_exit() -> None:
    """Make sure this process says goodbye to its managers when it exits."""
    global _goodbye_pid
    if _goodbye_pid != os.getpid():
        _goodbye_pid = os.getpid()
        # multiprocessing runs these at interpreter exit and at the end of a
        # child process (where atexit does not run); before managers shut down
        mp_util.Finalize(None, say_goodbye, exitpriority=10)


def say_goodbye() -> None:
    """This process is exiting: tell every manager it uses, so that its
    references are released and nothing it holds counts as an owner that
    died (its locks stay held, as with threading, for another to release).

    A multiprocessing child before Python 3.13 runs this before it waits for
    its threads: one that still runs (not a daemon) may still use the
    managers, and blocked calls would be cancelled under it.  The goodbye
    then waits for those threads, in a thread of its own that the process
    waits for too."""
    me = threading.current_thread()
    busy = [t for t in threading.enumerate()
            if t is not me and not t.daemon and t.is_alive() and t is not threading.main_thread()]
    if busy:
        try:
            threading.Thread(target=_goodbye_after, args=(busy,),
                             name="procshare-goodbye").start()
            return
        except RuntimeError:    # (no new thread at interpreter shutdown): say it now
            pass
    _goodbye()


def _goodbye_after(threads: list) -> None:
    for t in threads:
        t.join()
    _goodbye()


def _goodbye() -> None:
    server = local_server()
    for s in list(_sessions.values()):
        if s.closed or s.control is None or (server is not None and
                                             server.address == s.address):
            continue
        s.leaving = True
        try:
            with no_recover():      # (an exiting process waits for no restart, also
                s.control_call("goodbye", timeout=1.0)  # when it must reconnect)
        except Exception as e:
            log.debug("no goodbye to %r: %r", s.address, e)
        s.close()


def _leave_quietly(session: Session) -> None:
    """A call failed while this process says goodbye (its manager cancels what
    it waited for): a daemon thread waits until the process exits instead of
    raising, as it would have if nothing had woken it (the stdlib's would
    still be waiting: daemon threads end silently)."""
    if session.leaving and threading.current_thread().daemon:
        threading.Event().wait()


# -- fork -------------------------------------------------------------------------
#: forking thread -> {session key: (a loan of every reference this process
#: holds at that manager, the loan's pipe or None: `loans.watch_fork_loan`)},
#: from before its fork until the fork returned (per thread: two threads may
#: fork at once)
_forming: dict[int, dict[Any, tuple[str, tuple[int, int] | None]]] = {}


#: set in a thread that must not wait for a manager to come back (fork hooks)
_no_recover = threading.local()
#: how many connections this thread is opening (`Session._open`)
_opening = threading.local()


@contextlib.contextmanager
def no_recover() -> Iterator[None]:
    """`with no_recover():` calls in this thread fail at once on a manager
    that is down, instead of waiting for a supervised one to come back (fork
    hooks, decrefs, a shutdown's last message)."""
    was = getattr(_no_recover, "on", False)
    _no_recover.on = True
    try:
        yield
    finally:
        _no_recover.on = was


def _before_fork() -> None:
    """Lend the child our references, once per manager address (a loan covers
    every reference of this process there, whichever session made it).  A
    manager that is down is skipped at once: the fork may be the one that
    restarts it."""
    if getattr(_no_recover, "forking_server", False):
        return      # the child is a manager's server: it holds no proxies
    with no_recover():
        _lend_before_fork()


class forking_server:
    """`with forking_server():` around starting a manager's server process: the
    fork lends no references (and waits for no manager), whatever this
    process's other sessions are doing."""

    def __enter__(self) -> None:
        _no_recover.forking_server = True

    def __exit__(self, *exc: Any) -> None:
        _no_recover.forking_server = False


def _lend_before_fork() -> None:
    _close_fork_pipes(_forming.pop(threading.get_ident(), {}))     # (a fork that never ran)
    mine: dict[Any, tuple[str, tuple[int, int] | None]] = {}
    _forming[threading.get_ident()] = mine
    lent: set = set()
    for key, s in list(_sessions.items()):
        if s.adopt and s.live > 0 and not s.closed:
            # a child that forks before it adopted its own loan: adopt it now, so
            # that its child gets a loan of this process's references (the one
            # this process was lent ends with this process: `loans`)
            try:
                with s.lock:
                    s._control_conn()
            except Exception as e:
                log.debug("could not adopt references from %r before a fork: %r",
                          s.address, e)
        if s.live > 0 and s.control is not None and not s.closed and s.address not in lent:
            try:
                loan = s.control_call("fork_loan", timeout=5.0)
            except Exception as e:
                log.debug("no fork loan from %r: %r", s.address, e)
                continue
            lent.add(s.address)
            if loan:
                mine[key] = (loan, loans.fork_pipe())


#: None: this process owns the references of every proxy it tracks.  In a
#: manager's server (or supervisor) forked from a client, and in processes forked
#: from it in turn: the pids whose tracked proxies' references are this
#: process's own.  The others were inherited from the client the server was
#: forked from (that fork lends nothing): their references are the client's
_owned_pids: frozenset[int] | None = None


def inherited_by_server(pid: int) -> bool:
    """Was a proxy tracked in process `pid` inherited through the fork of a
    manager's server?  Its reference belongs to the client that forked it:
    giving it back from here would at best be a wasted connection (to a
    manager that may be gone, during a garbage collection)."""
    return _owned_pids is not None and pid not in _owned_pids


def _after_fork_in_child() -> None:
    global _client_id, _sessions_mutex, _owned_pids
    _client_id = _new_client_id()
    if getattr(_no_recover, "forking_server", False):
        _no_recover.forking_server = False      # this process's own forks are its own
        _owned_pids = frozenset((os.getpid(),))
    elif _owned_pids is not None:
        _owned_pids = _owned_pids | {os.getpid()}
    _sessions_mutex = threading.Lock()
    # every socket inherited from the parent, including ones only other
    # (now gone) threads referenced: close our copies now, so that a late
    # garbage collection cannot close a reused descriptor number later
    transport.close_inherited()
    loans.after_fork_in_child()
    mine = _forming.pop(threading.get_ident(), {})
    for other in _forming.values():     # forks other threads of the parent were making
        _close_fork_pipes(other)
    _forming.clear()
    for key, s in list(_sessions.items()):
        live = s.live
        s._adopted()    # (the write end of our parent's fork loan: not ours to hold)
        loan, pipe = mine.pop(key, (None, None))
        s._reset(adopt=loan)
        s.live = live
        if pipe is not None:
            os.close(pipe[0])
            s._lend_to_child(pipe[1])
    _close_fork_pipes(mine)


def _after_fork_in_parent() -> None:
    for key, (loan, pipe) in _forming.pop(threading.get_ident(), {}).items():
        if pipe is None:
            continue
        r, w = pipe
        os.close(w)     # the child's copy (if the fork worked) is the one that counts
        s = _sessions.get(key)
        if s is not None:
            loans.watch_fork_loan(s, loan, r)
        else:
            os.close(r)


def _close_fork_pipes(loans_of_a_fork: dict) -> None:
    for _loan, pipe in loans_of_a_fork.values():
        for fd in pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass


def _adopt_eagerly(_: object) -> None:
    """In a multiprocessing child: take over the inherited references now."""
    for s in list(_sessions.values()):
        if s.adopt:
            try:
                with s.lock:
                    s._control_conn()
            except Exception as e:
                log.info("could not adopt references from %r: %r", s.address, e)


class _Anchor:
    pass


_anchor = _Anchor()
os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child,
                    after_in_parent=_after_fork_in_parent)
mp_util.register_after_fork(_anchor, _adopt_eagerly)
