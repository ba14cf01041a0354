"""Server: accepts connections and runs calls on the shared objects.

Owns: the manager process's side of every connection: the hello, the
dispatch of calls to objects and to the server's own control methods, the
replies, and what happens when a client goes away.

Rules it keeps:
- One thread per connection; a call runs on the thread of the connection it
  came on, so the common call costs one read and one write and no hand-off.
  A connection's receive busy-polls only while no other connection's thread
  is running a call (`working`): they share one GIL.  On a busy machine a
  call connection's thread sleeps, now and then, on its client thread's CPU
  (`transport.placement`), never while it runs a call.
- Pipelined calls (the client's next request is here already) share writes:
  a small reply waits for the ones after it (`Channel.send_reply`), up to 32
  of them, and never for a call that waits (the wait writes what the socket
  takes, the channel's watch the rest, about 2 ms later); a connection that
  ends, and a server that stops, first write what the socket takes of them.
- Calls on one object run one at a time when the object is *serial* (the
  default for registered classes), and concurrently for thread-safe objects:
  the built-in primitives, `queue`/`threading` objects, pools, and objects that
  carry their own threading primitive (`stdtypes.is_thread_safe`).
  `register(..., serial=...)` decides per type.  A call on an object that is
  serial by that default waits at most `SERIAL_PATIENCE` behind the one
  running, then starts a new turn beside it, as the stdlib runs every call (a
  method that waits for another call on its object must not deadlock); the
  calls after it wait for that turn, so only a call that outlasts the
  patience is overlapped.  `serial=True` objects, the SyncManager's
  containers (`stdtypes.never_waits`), durable objects and `update_item`
  wait until the call's deadline.
- The reply is serialized completely before anything is written, so a result
  that cannot be serialized is reported and the connection stays usable.
- When the last connection of a client closes, the client is gone: its
  references are released (and its locks, see `locktable`).
- A call on a durable object (`durables`) leaves the hot path: it is
  journaled and its reply waits for the commit; `create(..., durable=...)`
  and registered durable types make such objects.  Other calls never touch
  the journal (a client's end drops its stored replies, if it has any).
  While several clients write durable objects at once, a connection whose
  thread just made such a call may be parked, and the durable loop
  (`durableloop`) serves its next calls; whatever the loop does not serve
  comes back to the connection's thread in order (`park`, `handed`).
- A control connection counts the requests it has handled (`ConnInfo.done`);
  a one-way `sync` on another connection of its client waits for that count
  (the decrefs sent before that connection's next request), at most
  `SYNC_PATIENCE`, and never once the control connection has closed.
- Manager operations (`create`, `decref`, ...) are dispatched through
  `control_table()`, built once per class from `public`, never by `getattr`
  on a name a peer sent.
- File descriptors leave the manager only on the reply to `shm_fd` (a shared
  array's memory, for a client holding a reference, on a Unix socket): the
  reply frame's first byte carries them; the duplicates sent are closed at once.
  Arena descriptors for large payloads come and go only on shared-memory side
  connections (hello role "shm", `transport.slots.ManagerSlots.exchange`);
  the descriptors any other hello carries are closed unread.
- Large out-of-band buffers travel in shared-memory slots on the Unix-socket
  connections whose hello asked for it (`_shm_agree`); the client's slots
  are freed when its lease ends.
- A peer that breaks a frame limit (`limits`, which its hello tells clients,
  so theirs check before sending), stalls inside a frame for
  `frame_timeout` seconds, sends a malformed hello, or exhausts memory loses
  its own connection, with the reason in the log (`note`); the server and its
  other connections go on.  Replies are bounded by `REPLY_LIMITS` (what every
  client accepts), not `limits`: one over it is an UNSERIALIZABLE reply
  (`_fit`), and the connection stays.
- A server that stops for good (a `shutdown` from any process it serves, as
  the stdlib's; its starting process or supervisor gone; an
  unsupervised `serve_forever()` ended, Ctrl-C included) says so: every
  connection whose thread is not running a call gets a STOPPING frame as its
  last (`stop_for_good`, `_end_connections`), so a client knows at once not
  to wait for a restart, even where no socket file tells it (TCP).  A crash says
  nothing: it is not final.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import secrets
import sys
import threading
import time
import traceback
from typing import Any

from ..errors import (
    AuthenticationError,
    NotExposedError,
    ProcshareError,
    arguments_not_deserializable_text,
    method_raised_exit,
    missing_method,
    result_too_large_text,
)
from ..inprocess import local_server, set_local_server
from ..stdtypes import (
    all_methods,
    create_takes_durable,
    data_attributes,
    is_thread_safe,
    never_waits,
    public_methods,
    update_item,
)
from ..transport import channel as transport
from ..transport import placement
from ..transport.processes import host_identity
from ..transport.shm import (
    SlotClaimError,
    WithFds,
    can_pass_fds,
    recv_frame_fds,
    send_frame_fds,
)
from ..transport.slots import ManagerSlots, unavailable_reason
from ..wire.diagnose import result_text
from ..wire.frames import (
    DEFAULT_LIMITS,
    NO_DEADLINE,
    FrameError,
    Limits,
    encode_frame,
    frame_problem,
    pack_frame,
)
from ..wire.kinds import Kind, kind_name
from ..wire.records import Token
from ..wire.serializers import (
    decode_hello,
    encode_hello,
    get_serializer,
    hello_problem,
    pack_for_type,
)
from . import callctx, sharedarray
from .callctx import Caller, CallState, DeadlineExpired
from .durableloop import DurableLoop, loopable
from .durables import RETURN_NONE, UNNAMED_KEY, DurableObjects, durable_option
from .leases import GRACE as LEASE_GRACE
from .leases import Leases
from .locktable import LockTable, snapshot
from .registry import LOAN_PREFIX, SERVER_HOLDER, Entry, NoSuchObject, Registry

__all__ = ["Server", "TypeSpec", "public_methods", "all_methods", "local_server"]

log = logging.getLogger("procshare.server")

#: how long a peer may stall in the middle of a frame before its connection is
#: closed (`frame_timeout=` on the manager)
FRAME_TIMEOUT = 30.0

#: what one reply may carry: what every client accepts (`limits`, the manager's
#: `max_message_bytes=`, bounds what it accepts, not what it answers)
REPLY_LIMITS = DEFAULT_LIMITS

#: how long a reference in transit (a pickled proxy, a forked child's
#: inheritance) waits to be adopted before it is released
LOAN_TTL = 600.0

#: how long a call on an object that is serial by default (`register(...,
#: serial=None)`) waits behind the call running on it before it runs beside it:
#: far longer than a method that does not wait takes, so such methods keep
#: running one at a time, and short enough that one that waits for another call
#: on its object (as stdlib code may: a flag another process sets) is not stuck
SERIAL_PATIENCE = 0.1

#: how long a call waits for its client's decrefs sent before it (`sync`): a
#: referent's `__del__` that takes longer lets the call go ahead of it
SYNC_PATIENCE = 5.0

#: a closed control connection's count of requests handled: any number
_ALL_DONE = 1 << 62

#: how long a server that stops waits for the threads of its idle connections
#: to end (each writes its last frame; they wake at once)
STOP_WAIT = 0.5
#: which processes can see each other's pids (a hello from elsewhere names a pid of
#: another host or pid namespace)
_HOST = host_identity()

# what the call loop does with a reply it made: send the packed value, send None,
# or nothing (a call that wants no reply)
_PACKED, _NONE, _ONEWAY = object(), object(), object()


class _GetattrFailed(Exception):
    """(serve_client) Looking up an exposed method raised (a property, say)."""


def _getattr_failed(entry: Entry, oid: str, meth: str, error: Exception) -> tuple:
    """The reply when looking up exposed method `meth` raised `error`, a
    RemoteError as in the stdlib: MissingMethodError (an AttributeError too)
    if the object has no such attribute; else (a property or `__getattr__`
    that failed inside) the manager's traceback, which shows where."""
    if isinstance(error, AttributeError):
        missing = missing_method(error, entry.obj, entry.typeid, oid, meth)
        if missing is not None:
            return (Kind.ERROR, missing)
    return (Kind.TRACEBACK, "".join(traceback.format_exception(
        type(error), error, error.__traceback__)))


class TypeSpec(tuple):
    """A registry value: `(callable, exposed, method_to_typeid, proxytype)` like
    the stdlib's, plus procshare's per-type options as attributes."""

    serial: bool | None
    serializer: str | None
    durable: str | bool | None
    mutators: tuple | None

    def __new__(cls, items: tuple, serial: bool | None = None,
                serializer: str | None = None, durable: str | bool | None = None,
                mutators: tuple | None = None) -> TypeSpec:
        self = super().__new__(cls, items)
        self.serial = serial
        self.serializer = serializer
        self.durable = durable
        self.mutators = mutators
        return self

    def __reduce__(self) -> tuple:
        return TypeSpec, (tuple(self), self.serial, self.serializer, self.durable,
                          self.mutators)


class ConnInfo:
    """What the server knows about one connection."""

    __slots__ = ("client", "pid", "caller", "channel", "opened", "role", "conn", "call",
                 "session", "local", "version", "done", "waiting")

    def __init__(self, hello: dict, channel: transport.Channel) -> None:
        self.client = str(hello["client"])
        self.pid = int(hello.get("pid", 0))
        self.caller = Caller(self.client, self.pid, int(hello.get("thread", 0)),
                             str(hello.get("thread_name", "?")))
        self.channel = channel
        self.opened = time.time()
        self.role = hello.get("role", "call")
        self.conn = int(hello.get("conn", 0))
        self.session = str(hello.get("session", ""))[:32]   # one of the client's sessions
        self.call = CallState()
        #: its pid is one this host's processes share (not another host's or pid
        #: namespace's, where the same number is another process)
        self.local = (hello.get("host"), hello.get("pidns")) == _HOST and self.pid > 0
        #: the client's protocol version (1: procshare before 2026-11-29, whose
        #: `create` wants three values)
        self.version = hello.get("version", 1)
        #: (a control connection) the requests it has handled, and how many
        #: calls of other connections wait for that to grow (`Server.sync`)
        self.done = -1
        self.waiting = 0


class Server:
    """The manager's server: holds the objects and serves the proxies."""

    public = ["shutdown", "create", "create_full", "accept_connection", "get_methods", "debug_info",
              "number_of_objects", "dummy", "incref", "decref", "loan", "adopt",
              "fork_loan", "release_loan", "list_objects", "clients", "server_info", "locks",
              "goodbye", "cancel", "object_state", "shm_fd", "reattach", "sync"]
    PACKED = _PACKED    # a reply kind: the value serialized already

    def __init__(self, registry: dict, address: Any, authkey: bytes, serializer: Any = "pickle",
                 *, loan_ttl: float = LOAN_TTL, limits: Limits = DEFAULT_LIMITS,
                 frame_timeout: float | None = FRAME_TIMEOUT,
                 lease_grace: float = LEASE_GRACE, replace_stale: bool = False,
                 state_dir: str | None = None, fsync: str = "normal",
                 incarnation: int = 0, resume: bool = False) -> None:
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        self.registry = registry
        self.authkey = bytes(authkey)
        self.serializer = get_serializer(serializer)
        #: None, serialized: the reply of most mutating calls, sent as is
        self.none_body: bytes = self.serializer.dumps(None)[0]
        self.limits = limits
        self.frame_timeout = frame_timeout
        self.locks = LockTable(self)
        self.control_ops = self.control_table()
        self.listener = transport.Listener(address=address, backlog=128, limits=limits,
                                           frame_timeout=frame_timeout,
                                           replace_stale=replace_stale)
        self.address = self.listener.address
        self.objects = Registry()
        self.mutex = self.objects.mutex
        self.loan_ttl = loan_ttl
        self.stop_event = threading.Event()
        self.connections: dict[int, ConnInfo] = {}
        self.conn_mutex = threading.Lock()
        #: notified when the last connection closes (a server that stops waits)
        self.conns_closed = threading.Condition(self.conn_mutex)
        #: set when this server stops for good: the STOPPING frame it sends
        self.final_stop: bytes | None = None
        #: the class name of the manager it serves, for messages (set by its runner)
        self.manager_name = "manager"
        #: the channels whose thread runs a call now (not waiting for a frame or
        #: blocked in a primitive): a receive spins only while this is empty
        self.working: set[transport.Channel] = set()
        self.leases = Leases(self._lease_ended, grace=lease_grace)
        #: how many times a supervisor restarted this manager before this server,
        #: and when (set by the process that runs it)
        self.restarted_at: float | None = None
        self.supervised = False         # a supervisor restarts it if it dies
        #: a `shutdown` request stopped it (its process then exits with
        #: `supervisor.SHUT_DOWN_EXIT`, and leaves its mark: no supervisor
        #: restarts it, whether or not the starting process told it first)
        self.shut_down = False
        #: (client, connection number) -> the call that connection runs, to cancel it
        self.calls: dict[tuple[str, int], CallState] = {}
        #: (client, session, connection number) -> a control connection (`sync`)
        self.control_conns: dict[tuple[str, str, int], ConnInfo] = {}
        #: notified when a control connection that calls wait for (`sync`) has
        #: handled a request, or closed
        self.control_progress = threading.Condition()
        self._update_lock = threading.Lock()
        self.recent_log: collections.deque[str] = collections.deque(maxlen=50)
        self.incarnation = incarnation
        self.boot = secrets.token_hex(8)     # clients see a restart by its change
        #: one thread for the durable calls of several clients at once (started
        #: when first needed)
        self.durable_loop: DurableLoop | None = None
        #: durable objects: recovered now if the state directory holds a journal; as
        #: after a crash (clients of before may come back) for a restart, and for a
        #: standalone server run again (`resume`: `python -m procshare serve`)
        try:
            self.durables = DurableObjects(self, state_dir, fsync,
                                           fresh=not incarnation and not resume)
        except BaseException:
            # (the journal is in use, broken...): no socket of ours stays behind; a
            # restart leaves the path, which the next attempt replaces (a missing
            # path tells clients the manager was shut down)
            self.listener.close(unlink=not replace_stale)
            raise

    # -- running ---------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the server until `shutdown` is called."""
        set_local_server(self)
        try:
            accepter = threading.Thread(target=self.accepter, name="procshare-accepter",
                                        daemon=True)
            accepter.start()
            try:
                while not self.stop_event.wait(1.0):
                    self.objects.expire_loans()
                    self.durables.settle_recovered()
            except (KeyboardInterrupt, SystemExit):
                pass
        finally:
            # the final frame first: a connection thread that sees the stop event
            # writes it only if it is there already (it may be between two calls,
            # and the main thread gives up the GIL in what follows)
            if self.final_stop is None and not self.supervised:
                self.stop_for_good(None, "its serve_forever() ended")
            self.stop_event.set()   # (also when Ctrl-C or an error ended the loop)
            self.listener.close()
            try:
                with self.conn_mutex:
                    conns = list(self.connections.values())
                for info in conns:      # replies held back on busy connections: what fits
                    info.channel.flush_nowait()
            finally:
                if self.durable_loop is not None:
                    self.durable_loop.stop()    # its connections back to their threads
                self._end_connections(STOP_WAIT)
                self.durables.close()
                if local_server() is self:  # a process that goes on (serve_forever in a
                    set_local_server(None)  # thread) runs no server any more
            if sys.stdout != sys.__stdout__:
                sys.stdout = sys.__stdout__
                sys.stderr = sys.__stderr__
            sys.exit(0)

    def stop_for_good(self, by: int | None, why: str) -> None:
        """This server stops and nothing brings it back: its connections are
        told so (a STOPPING frame each) as they end.  `by`: the pid of the
        process that shut it down, if one did."""
        self.final_stop = pack_frame(Kind.STOPPING, 0, encode_hello(
            {"by": by, "why": why, "when": time.strftime("%H:%M:%S"), "pid": os.getpid(),
             "manager": self.manager_name}))

    def _end_connections(self, wait: float) -> None:
        """(stopping) Wake the threads of connections waiting for their client's
        next call, so that each ends now (writing STOPPING if this stop is
        final), and give them up to `wait` seconds; a thread running a call
        (blocked in user code, say) is not waited for."""
        with self.conn_mutex:
            idle = [info for info in self.connections.values()
                    if info.call.done_rid >= info.call.rid]
        if not idle:
            return
        for info in idle:
            info.channel.stop_reading()
        deadline = time.monotonic() + wait
        with self.conns_closed:
            while any(id(i.channel) in self.connections for i in idle):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.conns_closed.wait(left)

    def accepter(self) -> None:
        pause = 0.0
        while not self.stop_event.is_set():
            try:
                ch = self.listener.accept()
            except OSError as e:
                if self.stop_event.is_set() or self.listener.fileno() == -1:
                    return
                # out of descriptors (EMFILE, ENFILE) or memory: back off, up to a
                # second, instead of spinning; connections wait in the backlog
                pause = min(max(pause * 2, 0.01), 1.0)
                if pause >= 1.0 or e.errno in (errno.EMFILE, errno.ENFILE):
                    self.note(f"cannot accept connections ({e}); retrying in {pause:.2f} s")
                self.stop_event.wait(pause)
                continue
            pause = 0.0
            threading.Thread(target=self.handle_connection, args=(ch,), daemon=True,
                             name="procshare-conn").start()

    def note(self, message: str) -> None:
        """Keep a line for the crash report and the log."""
        self.recent_log.append(f"{time.strftime('%H:%M:%S')} {message}")
        log.info(message)

    def handle_connection(self, ch: transport.Channel) -> None:
        info = None
        fds: list[int] = []
        try:
            transport.server_handshake(ch, self.authkey)
            kind, rid, _b, body, bufs, fds = recv_frame_fds(ch, time.monotonic() + 20, 16)
            if kind != Kind.HELLO:
                raise FrameError(f"expected a HELLO frame, got {kind_name(kind)}")
            hello = decode_hello(body, bufs, self.serializer)    # JSON, whatever the serializer
            theirs = hello.get("serializer") if isinstance(hello, dict) else None
            problem = hello_problem(self.serializer, theirs)
            if problem is not None:
                self.note(f"refused a client that uses serializer {theirs!r} (this manager "
                          f"uses {self.serializer.name!r}): {problem}")
                ch.send(encode_frame(Kind.TRACEBACK, rid, encode_hello({
                    "error": "serializer", "manager_serializer": self.serializer.name,
                    "client_serializer": theirs,
                    "reason": None if problem == "different serializers" else problem})))
                return
            if hello.get("role") == "shm":      # arena descriptors, then nothing else
                fds, side = [], fds
                self._shm_side(ch, rid, hello, side)
                return
            fds, extra = [], fds
            for fd in extra:
                os.close(fd)
            try:
                info = ConnInfo(hello, ch)
            except (AttributeError, TypeError, KeyError, ValueError, OverflowError) as e:
                raise FrameError(f"a hello that does not describe a client ({e!r})") from None
            with self.conn_mutex:
                self.connections[id(ch)] = info
                self.calls[(info.client, info.conn)] = info.call
                if info.role == "control":
                    self.control_conns[(info.client, info.session, info.conn)] = info
            if info.role == "control":
                self.leases.control_opened(info.client, info.pid, hello)
            if hello.get("adopt") and not isinstance(hello["adopt"], str):
                raise FrameError(f"a hello whose loan is a {type(hello['adopt']).__name__}")
            if hello.get("adopt"):
                self.objects.adopt(info.client, hello["adopt"])
            if info.role == "control":
                log.info("client pid %d connected (%s)", info.pid, info.client)
            ch.send(encode_frame(Kind.RETURN, rid, encode_hello(
                {"pid": os.getpid(), "version": 3, "address": self.address,
                 "incarnation": self.incarnation,
                 "supervised": self.supervised, "boot": self.boot, "limits": list(self.limits),
                 **self._shm_agree(ch, info, hello)})))
            ch.working = self.working
            if info.role == "call":
                ch.place = placement.for_peer(ch.sock, hello)
                name = hello.get("process_name")
                if type(name) is str:   # the stdlib's name for it (`accept_connection`)
                    threading.current_thread().name = name[:200]
            self.serve_client(ch, info)
        except (EOFError, ConnectionError, TimeoutError):
            pass
        except AuthenticationError as e:
            self.note(f"refused a connection from {ch.peer!r}: {e}")
        except FrameError as e:
            self.note(f"closed a connection that sent a bad frame: {e}")
        except OSError as e:
            if not self.stop_event.is_set():
                self.note(f"connection error: {e!r}")
        except MemoryError:
            self.note(f"closed the connection from {ch.peer!r}: out of memory while receiving "
                      f"a frame (limits: {self.limits})")
        except Exception as e:   # a bug here must cost one connection, not the server
            log.warning("closed a connection after an unexpected error", exc_info=True)
            self.note(f"closed a connection after an unexpected error: {e!r}")
        finally:
            for fd in fds:
                os.close(fd)
            self.working.discard(ch)
            ch.flush_nowait()   # replies held when a bad frame or an error ended it
            final = self.final_stop
            if final is not None and info is not None and self.stop_event.is_set():
                ch.send_last(final)     # the client waits for no restart
            ch.close()
            if info is not None:
                self._connection_closed(info)

    def _connection_closed(self, info: ConnInfo) -> None:
        """A connection closed.  Only a control connection matters for the
        client's lease (see `leases`); any call still running on this
        connection is abandoned, so it is cancelled."""
        with self.conn_mutex:
            self.connections.pop(id(info.channel), None)
            self.calls.pop((info.client, info.conn), None)
            if info.role == "control":
                key = (info.client, info.session, info.conn)
                if self.control_conns.get(key) is info:
                    del self.control_conns[key]
            if self.stop_event.is_set():
                self.conns_closed.notify_all()
        if info.role == "control":
            info.done = _ALL_DONE       # nothing more comes: no call waits for it
            if info.waiting:
                with self.control_progress:
                    self.control_progress.notify_all()
        info.call.cancel()
        if info.role == "control" and not self.stop_event.is_set():
            self.leases.control_closed(info.client)

    def _lease_ended(self, client: str, pid: int, how: str) -> None:
        """`client` (process `pid`) exited (said goodbye) or died: release its
        references, cancel its calls, and let its locks be taken over."""
        locks = self.locks.client_gone(client, pid, how)   # first: it says why
        with self.conn_mutex:
            calls = [c for k, c in self.calls.items() if k[0] == client]
        for call in calls:
            call.cancel()
        freed = self.objects.release_holder(client)
        self.durables.forget_client(client)
        if "_slots_" in self.__dict__:
            self._slots.client_gone(client)     # its shared-memory slots and arenas
        verb = "exited" if how == "exited" else "died"
        self.note(f"client pid {pid} {verb}; released {freed} object(s) it held"
                  + (f"; it held or waited for {locks} lock(s)" if locks else ""))

    # -- the call loop -----------------------------------------------------------
    def serve_client(self, ch: transport.Channel, info: ConnInfo) -> None:
        recv = ch.recv_frame
        send_buffers = ch.send_buffers
        send_bytes = ch.send_bytes
        # a reply to a request with more of them buffered behind it (pipelined
        # calls) goes out with theirs, in one write (see Channel.send_reply)
        ch.hold_replies()
        send_reply = ch.send_reply
        none_body = self.none_body
        loads = self.serializer.loads
        dumps = self.serializer.dumps
        max_body = min(REPLY_LIMITS.max_body, REPLY_LIMITS.max_frame)
        objects = self.objects.objects
        st = callctx.server_state
        st.caller = info.caller
        st.locks = self.locks
        st.call = call = info.call
        st.working, st.channel = self.working, ch
        st.deadline = None
        me = threading.get_ident()
        warns: list = []
        st.warnings = warns
        monotonic = time.monotonic
        RETURN, CALL = Kind.RETURN, Kind.CALL
        stop = self.stop_event
        durables = self.durables
        handed = None   # what the durable loop gave back with the connection (`park`)
        decoded = None  # the call of a frame the loop gave back, decoded
        park = False    # after this call's reply: park the connection (durable loop)
        counting = info.role == "control"   # (calls may wait for its progress: `sync`)
        progress = self.control_progress
        while not stop.is_set():
            if counting:
                # every request read before is handled: say so to a call that waits
                info.done += 1
                if info.waiting:
                    with progress:
                        progress.notify_all()
            if park:
                park = False
                # (the loop waits for the socket only, and hands back at once a
                # connection that owes its client notices)
                if not ch.reader.in_frame and not ch.notices:
                    ch.flush()
                    self.working.discard(ch)
                    handed = self._durable_loop().park(info)
            if handed is None:
                kind, rid, budget, body, bufs = recv()
            elif type(handed) is tuple:     # a frame the loop read and left to us
                (kind, rid, budget, body, bufs), decoded = handed
                handed = None
            else:                           # what the loop's receive raised
                raise handed
            call.rid = rid
            if kind != CALL:
                raise FrameError(f"unexpected frame {kind_name(kind)} from a client")
            if rid == call.cancel_rid:      # cancelled before it was read: it does not run
                call.done_rid = rid
                decoded = None
                self._reply(ch, rid, Kind.TIMEOUT, "the client cancelled the call before "
                            "it started; it had no effect")
                continue
            st.deadline = None if budget != budget else monotonic() + budget
            try:
                if decoded is None:
                    oid, meth, args, kwds = loads(body, bufs)
                else:       # (decoded by the loop: unpickled once only)
                    call_, decoded = decoded, None
                    if isinstance(call_, Exception):
                        raise call_
                    oid, meth, args, kwds = call_
                if type(meth) is not str or (oid is not None and type(oid) is not str):
                    raise TypeError(f"a call names object {oid!r:.40} and method {meth!r:.40}; "
                                    "both must be str (the object id may be None)")
            except Exception as e:
                reply = self._request_undecodable(e)
            else:
                entry = objects.get(oid) if oid is not None else None
                if entry is not None and meth in entry.exposed and entry.durable is None:
                    # the hot path: a call on an exposed method.  On a serial object
                    # the reply is made (serialized) before its lock is released, so
                    # a returned internal value cannot change while it is pickled
                    # (unless the call outlasts the patience of one: see _enter).
                    fn = None
                    lock = entry.lock
                    held = False
                    try:
                        try:
                            fn = getattr(entry.obj, meth)
                        except Exception as e:      # (the stdlib: a RemoteError)
                            raise _GetattrFailed(e) from None
                        if lock is not None:
                            if not lock.acquire(False):
                                lock = self._enter(entry, info, st.deadline, oid, meth)
                            elif entry.lock is lock:
                                entry.calls += 1
                            else:       # an old turn's lock: wait for the current one
                                lock.release()
                                lock = self._enter(entry, info, st.deadline, oid, meth)
                            if lock is not None:
                                held = True
                                if entry.running is None:   # (else an older turn's
                                    entry.running = meth    # call still runs: it is
                                    entry.owner = me        # the one to name)
                        result = fn(*args, **kwds)
                        call.done_rid = rid     # it happened: a cancel is too late now
                        m2t = entry.method_to_typeid
                        typeid = m2t.get(meth) if m2t else None
                        if typeid:
                            reply = self._proxy_reply(info, typeid, result)
                        elif warns:
                            reply = (Kind.WARNED, (result, list(warns)))
                        elif not rid:
                            reply = _ONEWAY
                        elif result is None:
                            reply = _NONE
                        else:
                            try:
                                packed = dumps(result)
                                reply = _PACKED
                            except Exception as e:
                                reply = self._unserializable(e, oid, meth, result)
                    except DeadlineExpired as e:
                        reply = (Kind.TIMEOUT, str(e))
                    except _GetattrFailed as e:
                        reply = _getattr_failed(entry, oid, meth, e.args[0])
                    except TypeError as e:
                        if not callable(fn) and meth in entry.attributes and not args and not kwds:
                            reply = (RETURN, fn)
                        else:
                            reply = (Kind.ERROR, _with_traceback(e))
                    except Exception as e:
                        reply = (Kind.ERROR, _with_traceback(e))
                    except (SystemExit, KeyboardInterrupt) as e:   # the method's own
                        reply = _method_exited(e, f"{meth}() on {entry.typeid!r} object {oid}")
                    finally:
                        if held:
                            if entry.owner == me:   # (not another turn's: see _enter)
                                entry.running = None
                            lock.release()
                    call.done_rid = rid         # the reply is made: a cancel is too late
                    # hold no argument or result while waiting for the next call: the
                    # memory of a large one may be lent, released only when it goes;
                    # nor the object: dropped by its last proxy, it goes now
                    result = args = kwds = bufs = fn = entry = None
                    if reply is _PACKED:
                        body, bufs = packed
                        packed = None
                        if bufs or len(body) > max_body:
                            kind, body, bufs = self._fit(RETURN, body, bufs, oid, meth)
                            send_buffers(kind, rid, body, bufs, NO_DEADLINE, REPLY_LIMITS)
                            bufs = None
                        else:
                            send_reply(pack_frame(RETURN, rid, body))
                        continue
                    if reply is _NONE:
                        send_reply(pack_frame(RETURN, rid, none_body))
                        continue
                    if reply is _ONEWAY:
                        warns.clear()
                        continue
                elif oid is None:
                    if meth == "shutdown":
                        # final, whoever asks (as the stdlib's): a supervisor
                        # restarts no server a shutdown stopped (`shut_down`)
                        reply = self._control(info, meth, args, kwds)
                        self.stop_for_good(info.pid, "shut down")
                        self.shut_down = True
                        self._reply(ch, rid, *reply)
                        self.stop_event.set()
                        return
                    try:
                        reply = self._control(info, meth, args, kwds)
                    except (SystemExit, KeyboardInterrupt) as e:    # (a constructor's)
                        reply = _method_exited(e, f"manager operation {meth!r}")
                elif entry is not None and entry.durable is not None:
                    try:
                        reply = durables.call(entry, info, oid, meth, args, kwds)
                    except (SystemExit, KeyboardInterrupt) as e:    # the method's own
                        reply = _method_exited(e, f"{meth}() on {entry.typeid!r} object {oid}")
                    if reply is RETURN_NONE and rid:    # a set, an append: no value
                        warns.clear()
                        call.done_rid = rid
                        park = durables.contended() and loopable(entry)
                        args = kwds = bufs = entry = None
                        send_bytes(pack_frame(RETURN, rid, none_body))
                        continue
                    park = rid != 0 and durables.contended() and loopable(entry)
                else:
                    try:
                        reply = self._slow_call(info, oid, meth, args, kwds)
                    except (SystemExit, KeyboardInterrupt) as e:    # a __repr__'s, say
                        name = args[0] if meth == "#ATTR" and args else \
                            _SLOW_NAMES.get(meth, meth)
                        reply = _method_exited(e, f"{name}() on object {oid}")
            warns.clear()
            call.done_rid = rid
            args = kwds = bufs = entry = None
            if rid:
                if reply[0] is _PACKED:     # (a call on an object: decoded, so named)
                    self._reply(ch, rid, *reply, oid, meth)
                else:
                    self._reply(ch, rid, *reply)
            reply = None
        ch.flush()      # (stopping) the replies held back go all the same

    def _durable_loop(self) -> DurableLoop:
        """The server's durable loop (started at the first park)."""
        with self.conn_mutex:
            loop = self.durable_loop
            if loop is None:
                loop = self.durable_loop = DurableLoop(self)
            return loop

    # -- large data through shared memory ----------------------------------------
    @property
    def _slots(self) -> ManagerSlots:
        """The manager's shared-memory slots (made on first use)."""
        slots = self.__dict__.get("_slots_")
        if slots is None:
            slots = self.__dict__.setdefault("_slots_", ManagerSlots(self.note))
        return slots

    def _shm_agree(self, ch: transport.Channel, info: ConnInfo, hello: dict) -> dict:
        """The hello answer's part about shared memory, and the link attached to
        `ch` if the client asked, on a Unix socket, and this machine has it."""
        if not hello.get("shm") or not can_pass_fds(ch):
            return {}
        reason = unavailable_reason()
        if reason is not None:
            if not getattr(self, "_shm_refused", False):
                self._shm_refused = True
                self.note(f"large data goes through the socket: {reason}")
            return {"shm": {"refused": reason}}
        ch.attach_slots(self._slots.link(info.client, info.session))
        return {"shm": {"server": self._slots.nonce}}

    def _shm_side(self, ch: transport.Channel, rid: int, hello: dict, fds: list[int]) -> None:
        """A side connection: a client announces arenas or fetches ours."""
        client = hello.get("client")
        try:
            if not isinstance(client, str):
                for fd in fds:
                    os.close(fd)
                raise SlotClaimError("a shared-memory request without a client id")
            answer, out = self._slots.exchange(client, hello, fds)    # it closes fds
        except SlotClaimError as e:
            self.note(f"refused a shared-memory request of client {client!r:.60}: {e}")
            ch.send(encode_frame(Kind.TRACEBACK, rid, encode_hello({"message": str(e)})))
            return
        try:
            send_frame_fds(ch, encode_frame(Kind.RETURN, rid, encode_hello(answer)), out)
        finally:
            for fd in out:
                os.close(fd)

    def _enter(self, entry: Entry, info: ConnInfo, deadline: float | None, oid: str,
               meth: str, strict: bool = False,
               exclusive: bool = False) -> threading.Lock | None:
        """Take a busy serial object's lock, waiting until the call's deadline;
        return the lock taken, to be released by the caller (after clearing
        `entry.exclusive` if it asked for `exclusive`).

        With patience (`entry.patience`, unless `strict`): a call that waited
        that long while one call held the lock all along starts a new turn, a
        fresh `entry.lock` taken at once, and runs beside that call (as the
        stdlib would have run it); the calls after it wait for the new turn,
        and one that gets an old turn's lock gives it back and waits for the
        current one, so only a call that outlasts the patience is ever
        overlapped.  `exclusive`: once it holds the lock, no turn starts beside
        it.  None (run without the lock): a call its own running method made
        from inside the manager (through a proxy to itself): waiting would
        deadlock, and that method is waiting for this call anyway."""
        if info.pid == os.getpid() and info.caller.thread == entry.owner and entry.running:
            return None
        self.working.discard(info.channel)      # it waits: others may spin meanwhile
        info.channel.flush_nowait()             # and replies held back go now
        patience = None if strict else entry.patience
        while True:
            lock = entry.lock
            assert lock is not None
            seen = entry.calls
            if patience is None or (deadline is not None
                                    and deadline - time.monotonic() <= patience):
                got = _acquire_until(lock, deadline)
            else:
                got = lock.acquire(True, patience)
                if not got:
                    with _TURNS:
                        if entry.lock is lock and entry.calls == seen and not entry.exclusive:
                            # one call held it all along, past the patience: a new
                            # turn beside it
                            lock = entry.lock = threading.Lock()
                            lock.acquire()
                            entry.calls = 0
                            break
                    continue        # it changed hands, or a turn began: wait again
            if not got:
                running = entry.running
                raise DeadlineExpired(
                    f"{entry.typeid!r} object {oid} was still busy with another call at "
                    "the deadline" + (f" (running {running}())" if running else "")
                    + ": calls on it run one at a time, and this one waited behind it")
            if entry.lock is lock:
                entry.calls += 1
                break
            lock.release()          # an old turn's lock: wait for the current turn
        if exclusive:
            entry.exclusive = True
        return lock

    def _reply(self, ch: transport.Channel, rid: int, kind: Any, payload: Any,
               oid: Any = None, meth: Any = None) -> None:
        """Send a reply (`oid`, `meth`: the call's, named if its result is too
        large for one message)."""
        if kind is _PACKED:     # a value serialized already (under its object's lock)
            kind, body, bufs = self._fit(Kind.RETURN, *payload, oid, meth)
            ch.send_buffers(kind, rid, body, bufs, NO_DEADLINE, REPLY_LIMITS)
            return
        fds = None
        if type(payload) is WithFds:    # descriptors ride on the frame (shm_fd)
            fds, payload = payload, payload.value
        try:
            kind, body, bufs = self._serialize_reply(kind, payload)
            if fds is not None and kind == Kind.RETURN:
                send_frame_fds(ch, encode_frame(kind, rid, body, bufs), fds.fds)
            else:
                ch.send_buffers(kind, rid, body, bufs)
        finally:
            if fds is not None:
                fds.close()

    def _serialize_reply(self, kind: Any, payload: Any) -> tuple:
        """`(kind, body, buffers)` of a reply; one that cannot be serialized
        becomes a text of it (an error) or says why (a value)."""
        try:
            body, bufs = self.serializer.dumps(payload)
        except Exception as e:
            if kind == Kind.ERROR:
                kind, payload = Kind.TRACEBACK, "".join(
                    traceback.format_exception(type(payload), payload, payload.__traceback__))
            else:
                kind, payload = self._unserializable(e, None, None, payload)
            body, bufs = self.serializer.dumps(payload)
        finally:
            if kind == Kind.ERROR:      # sent: the exception is as its method left it
                _forget_traceback(payload)
        return self._fit(kind, body, bufs)

    def _fit(self, kind: Any, body: bytes, bufs: Any, oid: Any = None,
             meth: Any = None) -> tuple:
        """`(kind, body, buffers)` of a reply that one frame can carry: the
        reply itself, or an UNSERIALIZABLE one saying that it is too large."""
        total = len(body) + sum(memoryview(b).nbytes for b in bufs)
        problem = frame_problem(REPLY_LIMITS, len(body), total, len(bufs))
        if problem is None:
            return kind, body, bufs
        entry = self.objects.objects.get(oid) if oid is not None else None
        if entry is not None:
            what = f"{meth}() on {entry.typeid!r} object {oid}"
        elif meth is not None:
            what = f"{meth}() on object {oid}" if oid is not None else f"{meth}()"
        else:
            what = "a call"
        text = result_too_large_text(what, total, problem, os.getpid())
        log.info("%s", text)
        body, bufs = self.serializer.dumps((text, {"direction": "result", "size": total,
                                                   "error": problem}))
        return Kind.UNSERIALIZABLE, body, bufs

    def encode_reply(self, rid: int, kind: Any, payload: Any, oid: Any = None,
                     meth: Any = None) -> bytes:
        """One whole reply frame (no descriptors), for a writer that is not the
        connection's thread (the durable loop); `oid`, `meth` as for `_reply`."""
        if kind is _PACKED:
            kind, body, bufs = self._fit(Kind.RETURN, *payload, oid, meth)
        else:
            kind, body, bufs = self._serialize_reply(kind, payload)
        return b"".join(encode_frame(kind, rid, body, bufs))

    def _unserializable(self, e: Exception, oid: Any, meth: Any, value: Any) -> tuple:
        """The reply for a value the manager's serializer cannot carry: packed by
        the type's own serializer if it was registered with one, else an
        UNSERIALIZABLE reply saying where in the value the problem is."""
        entry = self.objects.objects.get(oid) if oid is not None else None
        ser: Any = self.serializer
        what = "a reply"
        if entry is not None:
            what = f"{meth}() on {entry.typeid!r} object {oid}"
            inner = getattr(self.registry.get(entry.typeid), "serializer", None)
            if inner is not None:
                try:
                    packed = pack_for_type(value, inner)
                    self.serializer.dumps(packed)
                    return (Kind.RETURN, packed)
                except Exception as e2:
                    e, ser = e2, inner
        text, facts = result_text(e, ser, what, value)
        log.info("%s", text)
        return (Kind.UNSERIALIZABLE, (text, facts))

    def _request_undecodable(self, e: Exception) -> tuple:
        error = f"{type(e).__name__}: {e}"
        text = arguments_not_deserializable_text(self.serializer.name, error, os.getpid())
        log.info("%s", text)
        return (Kind.UNSERIALIZABLE, (text, {
            "direction": "arguments", "serializer": self.serializer.name, "error": error}))

    def _gone_text(self, oid: Any, meth: str) -> str:
        return (f"KeyError: {oid!r}: {meth}() found no object with this id in the manager at "
                f"{self.address!r} (pid {os.getpid()}). It was released when no process held "
                "a proxy to it any more (a proxy rebuilt from a bare Token does not keep its "
                "object alive), or the manager restarted. Keep a proxy for as long as the "
                "object is used, or create the object again.\n")

    def _slow_call(self, info: ConnInfo, oid: Any, meth: str, args: tuple, kwds: dict,
                   durable: bool = True) -> tuple:
        """Calls that are not an exposed method (fallbacks and errors), and
        calls on a durable object that did not come through `serve_client`'s
        own dispatch (`durables`)."""
        entry = self.objects.objects.get(oid)
        if entry is None:
            return (Kind.TRACEBACK, self._gone_text(oid, meth))
        if durable and entry.durable is not None:
            return self.durables.call(entry, info, oid, meth, args, kwds)
        obj = entry.obj
        if meth == "#ATTR":
            return self._attribute(entry, info, oid, args, kwds)
        if meth == "#UPDATE_ITEM" and "__setitem__" in entry.exposed:
            try:
                return (Kind.RETURN, self._update_item(entry, info, *args))
            except DeadlineExpired as e:
                return (Kind.TIMEOUT, str(e))
            except Exception as e:
                return (Kind.ERROR, _with_traceback(e))
        if meth not in ("#GETVALUE", "__str__", "__repr__"):
            exposed = ", ".join(sorted(entry.exposed)) or "(none)"
            return (Kind.ERROR, NotExposedError(
                f"method {meth!r} of {type(obj).__name__} object (typeid {entry.typeid!r}, "
                f"id {oid}) is not exposed; the exposed ones are: {exposed}. Add it to "
                f"exposed= when registering {entry.typeid!r}, or call one of those.",
                typeid=entry.typeid, method=meth, exposed=tuple(sorted(entry.exposed))))
        # a copy or a text of the whole object: under its lock, like any call on it,
        # and serialized before the lock is released
        lock = None
        try:
            if entry.lock is not None:
                lock = self._enter(entry, info, callctx.server_state.deadline, oid, meth,
                                   exclusive=True)
            value = obj if meth == "#GETVALUE" else str(obj) if meth == "__str__" else repr(obj)
            try:
                return (_PACKED, self.serializer.dumps(value))
            except Exception as e:
                return self._unserializable(e, oid, meth, value)
        except DeadlineExpired as e:
            return (Kind.TIMEOUT, str(e))
        except Exception as e:
            return (Kind.ERROR, _with_traceback(e))
        finally:
            if lock is not None:
                entry.exclusive = False
                lock.release()

    def _attribute(self, entry: Entry, info: ConnInfo, oid: str, args: tuple,
                   kwds: dict) -> tuple:
        """`#ATTR`: a proxy reads exposed data attribute `args[0]` (a property's
        getter runs then; one that raises is a RemoteError): `(True, value)`, or
        `(False, None)` if the value is callable, which the proxy then calls as
        a method, as the stdlib's proxies call every exposed name (reading it
        here would call it, with no arguments)."""
        name = args[0] if len(args) == 1 and not kwds and type(args[0]) is str else None
        if name is None or name not in entry.exposed:
            return (Kind.ERROR, TypeError(
                f"#ATTR on {entry.typeid!r} object {oid} takes the name of one of its exposed "
                f"attributes, not {args!r:.80} {kwds!r:.40}"))
        reply = self._read_exposed(entry, info, oid, name, True)
        return (Kind.RETURN, (False, None)) if reply is None else reply

    def read_attribute(self, entry: Entry, info: ConnInfo, oid: str, meth: str) -> tuple | None:
        """The reply to a read of exposed data attribute `meth` of a durable
        object by a proxy from before `#ATTR` (version 2), which reads it as a
        call with no arguments (a property's getter runs then; if it raises, a
        RemoteError as on any object); None if the value is callable: the read
        is a call of it, which the journal must see."""
        return self._read_exposed(entry, info, oid, meth, False)

    def _read_exposed(self, entry: Entry, info: ConnInfo, oid: str, name: str,
                      tagged: bool) -> tuple | None:
        """Read exposed name `name` under the object's lock, taken as a call of
        `name` takes it (so a getter that calls back into its object through a
        proxy runs, as from a running method), serialized before the lock is
        released: the reply, its value as `(True, value)` if `tagged`; None if
        the value is callable."""
        lock = entry.lock
        me = threading.get_ident()
        held = False
        try:
            if lock is not None:
                if not lock.acquire(False):
                    lock = self._enter(entry, info, callctx.server_state.deadline, oid, name)
                elif entry.lock is lock:
                    entry.calls += 1
                else:       # an old turn's lock: wait for the current one
                    lock.release()
                    lock = self._enter(entry, info, callctx.server_state.deadline, oid, name)
                if lock is not None:
                    held = True
                    if entry.running is None:
                        entry.running, entry.owner = name, me
            try:
                value = getattr(entry.obj, name)
            except Exception as e:
                return _getattr_failed(entry, oid, name, e)
            if callable(value):
                return None
            try:
                return (_PACKED, self.serializer.dumps((True, value) if tagged else value))
            except Exception as e:
                return self._unserializable(e, oid, name, value)
        except DeadlineExpired as e:
            return (Kind.TIMEOUT, str(e))
        finally:
            if held:
                if entry.owner == me:
                    entry.running = None
                lock.release()

    def _update_item(self, entry: Entry, info: ConnInfo, key: Any, func: Any, default: Any,
                     use_default: bool) -> Any:
        """`obj[key] = func(obj[key])` as one step (the helper behind
        `DictProxy.update_item`): no other call on a serial object runs in
        between; on a concurrent object, no other update_item does."""
        obj = entry.obj
        deadline = callctx.server_state.deadline
        lock: Any
        if entry.lock is not None:     # (strict: it waits its own turn, however long, and
            lock = self._enter(entry, info, deadline, "?", "update_item",  # none starts
                               strict=True, exclusive=True)                # beside it)
        else:
            lock = self._update_lock
            if not _acquire_until(lock, deadline):
                raise DeadlineExpired("another update_item() on this object was still "
                                      "running at the deadline")
        try:
            return update_item(obj, key, func, default, use_default)
        finally:
            if lock is not None:
                entry.exclusive = False     # (never set on a concurrent object)
                lock.release()

    @classmethod
    def control_table(cls) -> dict[str, Any]:
        """The manager operations of this server class: name -> function, built
        once per class from `public` (the stdlib's list, which subclasses extend),
        and procshare's own, which a subclass that lists the stdlib's names only
        (`multiprocessing.managers.Server.public + [...]`) keeps."""
        table = cls.__dict__.get("_control_table")
        if table is None:
            names = dict.fromkeys([*Server.public, *cls.public])
            table = {name: getattr(cls, name) for name in names}
            cls._control_table = table
        return table

    def _control(self, info: ConnInfo, meth: str, args: tuple, kwds: dict) -> tuple:
        op = self.control_ops.get(meth)
        if op is None:
            return (Kind.TRACEBACK, f"{meth!r} is not a manager operation; the known "
                                    f"ones are {sorted(self.control_ops)}\n")
        try:
            return (Kind.RETURN, op(self, info, *args, **kwds))
        except NoSuchObject as e:
            return (Kind.TRACEBACK, self._gone_text(e.args[0], meth))
        except ProcshareError as e:
            return (Kind.ERROR, _with_traceback(e))
        except Exception:
            # like the stdlib: a manager operation that fails (a constructor that
            # raises, an unknown typeid) is a RemoteError carrying the traceback
            return (Kind.TRACEBACK, traceback.format_exc())

    def _proxy_reply(self, info: ConnInfo, typeid: str, value: Any) -> tuple:
        try:
            ident, exposed, attrs = self._new_object(info.client, typeid, (value,), {})
        except Exception:       # the stdlib: a RemoteError, with the manager's traceback
            return (Kind.TRACEBACK, traceback.format_exc())
        token = Token(typeid, self.address, ident)
        return (Kind.PROXY, (self._proxytype_to_send(typeid), exposed, token, attrs))

    def _proxytype_to_send(self, typeid: str) -> Any:
        """The proxy type a reply that made a `typeid` object names, for a
        client without a manager that knows it (an unpickled proxy); None if
        it cannot travel (a class defined in a function): the client then
        takes its manager's, as the stdlib's clients always do."""
        cache = self.__dict__.setdefault("_proxytypes", {})
        try:
            return cache[typeid]
        except KeyError:
            pass
        spec = self.registry.get(typeid)
        proxytype = spec[3] if spec is not None else None
        if proxytype is not None:
            try:
                self.serializer.dumps(proxytype)
            except Exception:
                proxytype = None
        cache[typeid] = proxytype
        return proxytype

    # -- objects -----------------------------------------------------------------
    def _new_object(self, holder: str, typeid: str, args: tuple, kwds: dict) -> tuple:
        try:
            spec = self.registry[typeid]
        except KeyError:
            raise KeyError(f"typeid {typeid!r} is not registered with this manager; "
                           f"registered: {sorted(self.registry)}") from None
        callable_ = spec[0]
        if callable_ is None:
            if kwds or len(args) != 1:
                raise ValueError("Without callable, must have one non-keyword argument")
            obj = args[0]
        else:
            obj = callable_(*args, **kwds)
        exposed, attrs, method_to_typeid = self.describe(typeid, spec, obj)
        serial = chosen = getattr(spec, "serial", None)
        if serial is None:
            serial = not is_thread_safe(obj)
        entry = Entry(obj, typeid, frozenset(exposed), method_to_typeid,
                      threading.Lock() if serial else None, frozenset(attrs))
        if serial and chosen is None and not never_waits(obj):
            entry.patience = SERIAL_PATIENCE
        ident, used = self.objects.add_or_share(entry, holder)
        if used is not entry and (used.exposed != entry.exposed
                                  or used.attributes != entry.attributes):
            # this object lives here already, and changed since: what its entry allows
            exposed, attrs = tuple(sorted(used.exposed)), tuple(sorted(used.attributes))
        return ident, exposed, attrs

    def describe(self, typeid: str, spec: Any, obj: Any) -> tuple[tuple, tuple, Any]:
        """`(exposed, attributes, method_to_typeid)` of a new object of `typeid`."""
        _callable, exposed, method_to_typeid = spec[:3]
        if exposed is None:
            exposed = public_methods(obj)   # (all callable: no data attributes)
            attrs: tuple = ()
        else:
            attrs = data_attributes(obj, exposed)
        if method_to_typeid is not None:
            if not isinstance(method_to_typeid, dict):
                raise TypeError("Method_to_typeid {!r}: type {!s}, not dict".format(
                    method_to_typeid, type(method_to_typeid)))
            exposed = list(exposed) + list(method_to_typeid)
        return tuple(exposed), attrs, method_to_typeid

    # -- control operations (called as `dispatch(conn, None, name, args)`) -------
    def create_full(self, c: ConnInfo, typeid: str, /, *args: Any, **kwds: Any) -> tuple:
        """`create` (a subclass's too), and the names of the exposed data
        attributes: `(id, exposed, attributes)`, what procshare's client asks."""
        made = self.create(c, typeid, *args, **kwds)
        if len(made) >= 3:
            return tuple(made[:3])
        ident, exposed = made
        entry = self.objects.objects.get(ident)
        attrs = entry.attributes if entry is not None else ()
        return ident, exposed, tuple(n for n in exposed if n in attrs)     # (in their order)

    def create(self, c: ConnInfo, typeid: str, /, *args: Any, **kwds: Any) -> tuple:
        """Create a new shared object; return `(id, exposed)`, as the stdlib's
        (whose `_create` unpacks two; `create_full` tells the data attributes
        too).

        `durable=True` (or a mode, `"snapshot"`/`"journal"`) with an optional
        `name=` makes it durable (`durables`); a typeid registered with
        `durable=` is durable unless the call says `durable=False`.  A
        `durable=` that is not one of those values, `durable=False` for a
        typeid not registered durable (as the stdlib, `dict(durable=False)`
        is `{'durable': False}`), and `name=` without a true `durable=`, are
        the constructor's own keywords; so are both for a typeid of the user's
        not registered `durable=` (`stdtypes.create_takes_durable`)."""
        made = self._create_full(c, typeid, args, kwds)
        return made if c.version < 2 else made[:2]     # (older procshare clients: three)

    def _create_full(self, c: ConnInfo, typeid: str, args: tuple, kwds: dict) -> tuple:
        unnamed = None
        if UNNAMED_KEY in kwds:     # procshare's own, never the constructor's
            kwds = dict(kwds)
            unnamed = kwds.pop(UNNAMED_KEY)
        registered = getattr(self.registry.get(typeid), "durable", None)
        mode = durable_option(kwds["durable"]) if "durable" in kwds and \
            create_takes_durable(typeid, registered) else None
        if mode is False and not registered:
            mode = None
        if mode is not None:
            kwds = dict(kwds)
            del kwds["durable"]
            if mode:
                name = kwds.pop("name", None)
                return self.durables.create(c.client, typeid, mode, name, args, kwds, unnamed)
        elif registered:
            return self.durables.create(c.client, typeid, True, None, args, kwds, unnamed)
        return self._new_object(c.client, typeid, args, kwds)

    def reattach(self, c: ConnInfo, idents: list) -> list:
        """After a restart: this client's proxies to durable objects take their
        references back; returns the ids that are not here."""
        return self.durables.reattach(c.client, idents)

    def error_reply(self, e: BaseException) -> tuple:
        """The reply for an exception a method raised."""
        return (Kind.ERROR, _with_traceback(e))

    def get_methods(self, c: ConnInfo, token: Token) -> tuple:
        return tuple(self.objects.get(token.id).exposed)

    def accept_connection(self, c: ConnInfo, name: str) -> None:
        return None

    def dummy(self, c: ConnInfo) -> None:
        return None

    def debug_info(self, c: ConnInfo) -> str:
        return self.objects.debug_info()

    def number_of_objects(self, c: ConnInfo) -> int:
        return self.objects.number_of_objects()

    def incref(self, c: ConnInfo, ident: str) -> None:
        self.objects.incref(c.client, ident)

    def decref(self, c: ConnInfo, ident: str) -> None:
        self.objects.decref(c.client, ident)

    def loan(self, c: ConnInfo, ident: str) -> str:
        return self.objects.loan(c.client, ident, self.loan_ttl)

    def release_loan(self, c: ConnInfo, loan: str) -> None:
        """A loan nobody will adopt: its pickle was thrown away or never sent,
        or it was a fork loan whose child is gone (an adopted one: nothing)."""
        if loan.startswith(LOAN_PREFIX):
            self.objects.release_holder(loan)

    def adopt(self, c: ConnInfo, loan: str, ident: str) -> bool:
        return self.objects.adopt(c.client, loan, ident)

    def fork_loan(self, c: ConnInfo) -> str | None:
        return self.objects.fork_loan(c.client, self.loan_ttl)

    def locks(self, c: ConnInfo) -> list[dict]:
        """Every lock-like object with its holders and waiters (see locktable)."""
        return snapshot(self.objects)

    def list_objects(self, c: ConnInfo) -> list[dict]:
        return self.objects.snapshot()

    def clients(self, c: ConnInfo) -> list[dict]:
        """The client processes whose lease runs: connected ones with their
        connections and threads (and the state of their lease: "dead" or
        "exited" while a connection's thread still runs a call of theirs), and
        disconnected ones not yet known dead."""
        with self.conn_mutex:
            conns = list(self.connections.values())
        leases = self.leases.snapshot()
        # a client whose lease ended may still have a connection whose thread is
        # busy in a call (it ends when the call returns): its state says so
        states = {rec["client"]: rec["state"] for rec in leases}
        out: dict[str, dict] = {}
        for ci in conns:
            d = out.setdefault(ci.client, {"client": ci.client, "pid": ci.pid,
                                           "state": states.get(ci.client, "live"),
                                           "connections": 0, "threads": []})
            d["connections"] += 1
            d["threads"].append(ci.caller.thread_name)
        for rec in leases:
            if rec["state"] == "disconnected" and rec["client"] not in out:
                out[rec["client"]] = {"client": rec["client"], "pid": rec["pid"],
                                      "state": "disconnected", "connections": 0, "threads": []}
        return list(out.values())

    def goodbye(self, c: ConnInfo) -> None:
        """The client process is exiting: its references are released; its locks
        and permits stay held (another process may release them)."""
        self.leases.goodbye(c.client)

    def cancel(self, c: ConnInfo, conn: int, rid: int) -> str:
        """The client abandoned request `rid` on its connection number `conn`
        (see `CallState.cancel` for the answer)."""
        with self.conn_mutex:
            call = self.calls.get((c.client, conn))
        if call is None:
            return "done"       # the connection is closed: nothing runs for it
        return call.cancel(rid)

    def sync(self, c: ConnInfo, conn: int, n: int) -> None:
        """(one-way, before a call) Wait until this client's control connection
        `conn` has handled its first `n` requests: the decrefs its process sent
        before that call, so that what a dropped proxy held is gone when the
        call runs, as with the stdlib's round-trip decref (the client's
        `Session.sync_frame`).  Not past `SYNC_PATIENCE` (a referent's slow
        `__del__`), nor once that connection is closed."""
        ctl = self.control_conns.get((c.client, c.session, int(conn)))
        n = int(n)
        if ctl is None or ctl.done >= n:
            return
        progress = self.control_progress
        end = time.monotonic() + SYNC_PATIENCE
        with progress:
            ctl.waiting += 1
            try:
                while ctl.done < n:
                    left = end - time.monotonic()
                    if left <= 0:
                        log.info("a call of client pid %d (%s) went ahead of %d request(s) "
                                 "of its control connection still being handled after %.0f "
                                 "s: a dropped object's __del__ is slow or stuck (its effects "
                                 "may not be seen yet); keep __del__ short",
                                 c.pid, c.caller.thread_name, n - ctl.done, SYNC_PATIENCE)
                        return
                    progress.wait(left)
            finally:
                ctl.waiting -= 1

    def shm_fd(self, c: ConnInfo, ident: str) -> WithFds:
        """The memory of shared array `ident` (`SharedArray`, `ndarray`): its
        sizes, with its descriptor on the reply.  Only for a client that holds
        a reference to it, on a Unix socket (see `sharedarray.fd_reply`)."""
        return sharedarray.fd_reply(self.objects, c.client, ident, c.channel)

    def object_state(self, c: ConnInfo, ident: str) -> dict:
        """Whether an object runs calls one at a time (and how long a call
        waits behind another: None, until its deadline), and what it runs now."""
        entry = self.objects.get(ident)
        return {"typeid": entry.typeid, "serial": entry.lock is not None,
                "running": entry.running, "patience": entry.patience}

    def server_info(self, c: ConnInfo) -> dict:
        j = self.durables.journal
        return {"pid": os.getpid(), "address": self.address,
                "serializer": self.serializer.name, "log": list(self.recent_log),
                "journal": None if j is None else dict(j.stats),
                "durable_loop": None if self.durable_loop is None else dict(
                    self.durable_loop.stats),
                "idle_trims": getattr(self.__dict__.get("_slots_"), "idle_trims", 0)}

    def shutdown(self, c: ConnInfo) -> None:
        """Release resources before the server stops (subclasses extend this)."""

    # -- local (in-process) reference operations for proxies inside the server --
    def local_incref(self, ident: str) -> None:
        self.objects.incref(SERVER_HOLDER, ident)

    def local_decref(self, ident: str) -> None:
        self.objects.decref(SERVER_HOLDER, ident)

    def local_loan(self, ident: str) -> str:
        return self.objects.loan(SERVER_HOLDER, ident, self.loan_ttl)

    def local_adopt(self, loan: str, ident: str) -> bool:
        return self.objects.adopt(SERVER_HOLDER, loan, ident)


#: what the user called, for the internal names of `_slow_call`'s calls
_SLOW_NAMES = {"#UPDATE_ITEM": "update_item", "#GETVALUE": "_getvalue"}

#: held while a serial object's `Entry.lock` is replaced by a new turn's (`_enter`)
_TURNS = threading.Lock()


def _acquire_until(lock: threading.Lock, deadline: float | None) -> bool:
    """Acquire `lock`, waiting at most until `deadline` (monotonic; None: forever)."""
    if deadline is None:
        return lock.acquire()
    return lock.acquire(True, max(deadline - time.monotonic(), 0.0))


def _method_exited(e: BaseException, what: str) -> tuple:
    """The reply for user code (a method, a constructor, a `__repr__`) that
    raised SystemExit or KeyboardInterrupt in call `what`: an EOFError, as the
    stdlib's caller gets when its connection thread dies of it, that says so
    (this connection serves on)."""
    err = method_raised_exit(what, e, "with the stdlib that ends the connection "
                             "(EOFError); procshare keeps the connection (and any object), "
                             "so the next call works")
    return (Kind.ERROR, _with_traceback(err.with_traceback(e.__traceback__)))


def _forget_traceback(e: Any) -> None:
    """Take back what `_with_traceback` attached, once `e` is serialized (the
    object may be the referent's own, kept and returned later)."""
    try:
        e.__dict__.pop("_procshare_remote_tb", None)
    except Exception:
        pass


def _with_traceback(e: BaseException) -> BaseException:
    """Attach the formatted server-side traceback to `e`, which pickles with it
    (`_forget_traceback` takes it back once sent: the object may be the
    method's own, kept and returned later).  Not a copy: copying an exception
    runs its `__init__` again, which may change its message."""
    tb = e.__traceback__
    if tb is not None:
        tb = tb.tb_next  # drop the dispatcher's own frame
    text = "".join(traceback.format_exception(type(e), e, tb))
    try:
        e._procshare_remote_tb = f'\n"""\nIn the manager process (pid {os.getpid()}):\n{text}"""'
    except Exception:
        pass
    e.__traceback__ = None
    e.__context__ = None
    return e
