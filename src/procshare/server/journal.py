"""Journal: the SQLite file that keeps a manager's durable objects across crashes.

One `Journal` per manager keeps every durable object in one SQLite file
(stdlib `sqlite3`, WAL mode) inside a private state directory.  A call on a
durable object goes through its `Durable` handle: `call()` applies it and
stages one log row holding its effects and its `(client, request) -> reply`
record, and `Journal.wait(ticket)` returns once that row is committed;
concurrent callers share one commit (leader/follower group commit).  After a
crash, `recover()` rebuilds each object from its latest snapshot plus the
effects after it, and a re-sent call is answered from its stored reply instead
of running again.

Owns: the state directory's safety checks (`check_state_dir`), the journal
file and its schema (`objects`, `snapshots`, and the append-only `log`), the
HMAC of every record, staging and group commit (`Journal.wait`), exactly-once
replies (`Durable.call`, `lookup_reply`), compaction, recovery (`load_all`,
`recover`), private temporary state directories (`private_state_dir`,
`remove_private_state_dir`) and the `benchmark`.  Which methods mutate and
what their effects are is `durable.py`'s job.

Rules it keeps:
- The state directory is created with mode 0700; a directory, symlink or
  journal file owned by another user, or writable by group or others, is
  refused with `UnsafeStateDir` before anything is read.  The journal file is
  created with mode 0600.
- Every record (object, snapshot, log row) carries an HMAC-SHA256 over its
  kind, its place (object id and sequence number, client and request) and its
  bytes, keyed by a key derived from the authkey and the file's random id.  A
  record is unpickled only after its HMAC is verified; one that fails is
  refused with `JournalTampered`, and a journal written under another authkey
  is refused at open.  No message contains the key.
- A call's effects and its reply are one log row, so after a crash either
  both exist or neither.  A call without effect stores no reply (run again
  when re-sent, it is still applied at most once).
- The log rows of one object get consecutive sequence numbers and are staged
  while the caller holds the object's lock (the server's serial lock; a
  queue's own mutex for queues), so the journal's order is the order the
  effects were applied.  Recovery refuses a gap in a sequence.
- `wait(ticket)` returns only when everything staged up to `ticket` is
  committed.  The first waiter to find no commit running commits everything
  staged so far; the others wait for it, each on a lock of its own: a commit
  wakes the waiters it covers and the first of the rest (who leads next),
  never all of them.  A failed commit breaks the journal
  (`JournalBroken`) for good: memory may then be ahead of the file, so the
  server must restart and recover from the file.
- A read on a durable object returns the ticket of the object's last staged
  row, so a reply never shows a value that a crash could still take back.
- Replies kept: for each client, the replies of its last `keep_replies`
  mutating calls that had an effect, until `forget_client` (remembered in
  the `forgotten` table while rows of that client remain; `has_replies`).  A re-sent call
  that is still running waits for the first one and gets its reply.  With a
  client's first stored reply, the commit stores who the client is (the
  `identify` callback's answer, in the `clients` table, until it is
  forgotten; `client_ident`), so that a later manager can tell that a client
  which never came back is dead, and forget its replies.
- A log row is deleted once it holds nothing needed (its effects are covered
  by a snapshot, its reply was evicted or it had none), in batches of
  `GC_ROWS` or with the next snapshot; recovery ignores such rows.
- Compaction: once an object's effects since its snapshot exceed
  `max(compact_bytes, size of that snapshot)` (counting 64 bytes a row), a
  new snapshot is staged under the same lock; the commit that stores it
  deletes the rows it covers.  Snapshot-mode objects keep one snapshot.
- One process at a time: the file is opened in SQLite's exclusive locking
  mode, and a second opener gets `JournalInUse`.

API (everything else is internal):
- `Journal(state_dir, authkey, fsync="normal", keep_replies=256,
  compact_bytes=1 MiB)`; `.close()` (commits, checkpoints).
- `.create(name, typeid, obj, args=, kwds=, mode=, mutators=) -> Durable`: a
  new durable object (mode "effects" for built-ins, else "snapshot"; or
  "journal").  `.recover(factory) -> {name: Durable}` rebuilds the stored
  ones, `factory(typeid, args, kwds)` making fresh objects; `.load_all()`
  is the same data unbuilt.  `.get(name)`, `.names()`, `.drop(name)`.
- `Durable.call(method, args, kwds, client, request) -> Done(ticket, ok,
  value)` under the object's serial lock (queues: no lock); then
  `Journal.wait(ticket)` outside it; then reply `value` (raise it if not
  `ok`).  `.lookup_reply(client, request)`, `.forget_client(client)`,
  `.flush()`.
- `check_state_dir`, `private_state_dir`, `remove_private_state_dir`,
  `benchmark`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
import shutil
import stat
import struct
import tempfile
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from operator import itemgetter
from typing import Any, NamedTuple

try:
    import sqlite3
except ImportError:     # a Python built without it: durable objects say so when made
    sqlite3 = None  # type: ignore[assignment]

from ..errors import method_raised_exit
from .durable import SAME_OBJECT, SNAPSHOT, Kind, kind_for

__all__ = ["Journal", "Durable", "Done", "Stored", "JournalError", "UnsafeStateDir",
           "JournalTampered", "JournalInUse", "JournalBroken", "NotJournalable",
           "check_state_dir",
           "private_state_dir", "remove_private_state_dir", "benchmark", "FILENAME"]

FILENAME = "journal.sqlite3"
FORMAT = b"1"
PRIVATE_PREFIX = "procshare-state-"
RECORD_OVERHEAD = 64            # bytes a row counts for, on top of its data, for compaction
LOCK_WAIT = 1.0                 # seconds to wait for another opener's lock before JournalInUse
_SUFFIXES = ("", "-wal", "-shm", "-journal")
_PACK_ROW = struct.Struct(">QqIII").pack       # oid, seq, len(client), len(request), len(effects)
_PACK_SNAP = struct.Struct(">Qq").pack
#: WAL pages between automatic checkpoints (SQLite's default is 1000).  A checkpoint
#: syncs the WAL and the file (two fsyncs even with synchronous=NORMAL), and durable
#: sets dirty about two pages a commit, so with the default a checkpoint came every
#: ~500 commits; here one every ~4,000.  The WAL then grows to about 8 MiB with this
#: journal's 1 KiB pages (a file made before they were set: 32 MiB with 4 KiB pages).
#: Measured at 10000 pages against 1000, `benchmark()`-style sets, five alternating
#: pairs: 0.3-1.3 us less a commit (12.6-13.2 us against 13.3-14.2).
WAL_CHECKPOINT_PAGES = 8192
GC_ROWS = 256                   # rows no longer needed are deleted this many at a time
_NO_SEQ = -1
_first = itemgetter(0)
_MAX_INSERT = 16                # rows one INSERT statement takes (see Journal._write)
_INSERTS = [""] + ["INSERT INTO log VALUES " + ",".join(["(?,?,?,?,?,?,?,?)"] * _n)
                   for _n in range(1, _MAX_INSERT + 1)]
_NO_KWDS: dict = {}
_DELETE_RUN = "DELETE FROM log WHERE id BETWEEN ? AND ?"


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Row ids as `(first, last)` runs of consecutive ids, for `_DELETE_RUN`:
    a compaction deletes thousands of rows, mostly consecutive ones, and one
    statement a row cost 1.4 us a durable set (and two GIL releases a row)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i <= out[-1][1] + 1:
            if i > out[-1][1]:
                out[-1][1] = i
        else:
            out.append([i, i])
    return [(a, b) for a, b in out]


class _HmacSha256:
    """HMAC-SHA256 (RFC 2104) with the key's inner and outer hash states made
    once: a record's MAC costs two `sha256.copy()`s instead of a key schedule
    (3x faster than `hmac.digest` for small records; equal to it, see the
    tests)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def __repr__(self) -> str:
        return "<HMAC-SHA256 key hidden>"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS objects(name TEXT PRIMARY KEY, oid INTEGER NOT NULL,
    typeid TEXT NOT NULL, mode TEXT NOT NULL, spec BLOB NOT NULL, mac BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots(oid INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
    data BLOB NOT NULL, mac BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log(id INTEGER PRIMARY KEY, oid INTEGER, seq INTEGER,
    client TEXT, request, effects BLOB, reply BLOB, mac BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten(client TEXT PRIMARY KEY, upto INTEGER NOT NULL,
    mac BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS clients(client TEXT PRIMARY KEY, ident TEXT NOT NULL,
    mac BLOB NOT NULL);
"""


# -- errors --------------------------------------------------------------------------------

class JournalError(Exception):
    """Something is wrong with a manager's durable-object journal."""


class UnsafeStateDir(JournalError, PermissionError):
    """The state directory or a file in it could be changed by another user."""


class JournalTampered(JournalError):
    """A journal record failed its integrity check, so it was not loaded."""


class JournalInUse(JournalError):
    """Another process has the journal open."""


class JournalBroken(JournalError):
    """A commit failed; the journal takes no more writes."""


class NotJournalable(JournalError):
    """A call's effect (or a snapshot-mode object) could not be pickled: the
    object is no longer durable, and refuses further calls."""


# -- the state directory -------------------------------------------------------------------

def _who(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _refuse(path: str, problem: str, fix: str) -> UnsafeStateDir:
    return UnsafeStateDir(
        f"procshare refuses the durable-object state at {path}: {problem}. A journal holds "
        f"pickles, which run code when they are loaded, so nobody else may be able to change "
        f"it. {fix}")


def _check_owned(path: str, st: os.stat_result, what: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise _refuse(path, f"the {what} is owned by {_who(st.st_uid)}, not by you "
                      f"({_who(uid)})",
                      "Use a state_dir you own with mode 0700, or leave state_dir unset for a "
                      "private temporary one.")
    if st.st_mode & 0o022:
        whom = " and ".join(w for bit, w in ((0o020, "its group"), (0o002, "all users"))
                            if st.st_mode & bit)
        raise _refuse(path, f"the {what} is writable by {whom} "
                      f"(mode {stat.S_IMODE(st.st_mode):04o})",
                      f"Run `chmod go-w {path}` (procshare creates state directories with "
                      "mode 0700).")


def check_state_dir(path: str | os.PathLike, create: bool = True) -> str:
    """Check (and with `create`, make, mode 0700) a state directory; return its
    absolute path.  Raises `UnsafeStateDir` for a directory, symlink or
    journal file owned by another user or writable by group or others."""
    path = os.path.abspath(os.fspath(path))
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise JournalError(f"the state directory {path} does not exist") from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)
        except FileExistsError:
            pass
        lst = os.lstat(path)
    if stat.S_ISLNK(lst.st_mode):
        _check_owned(path, lst, "symbolic link")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _refuse(path, "it is a symbolic link to nothing",
                      "Point state_dir at a directory.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "it is not a directory", "Point state_dir at a directory.")
    _check_owned(path, st, "directory")
    for suffix in _SUFFIXES:
        f = os.path.join(path, FILENAME + suffix)
        try:
            fst = os.lstat(f)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(fst.st_mode):
            raise _refuse(f, "it is not a regular file (a symbolic link?)",
                          "Remove it; procshare creates its journal files itself.")
        _check_owned(f, fst, "journal file")
    return path


def private_state_dir(base: str | None = None) -> str:
    """A new private state directory (mode 0700) for a manager without
    `state_dir=`; remove it with `remove_private_state_dir` at clean shutdown."""
    return tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=base)


def remove_private_state_dir(path: str) -> None:
    """Remove a directory made by `private_state_dir` (only such a directory)."""
    if not os.path.basename(os.path.normpath(path)).startswith(PRIVATE_PREFIX):
        raise ValueError(f"{path} was not made by private_state_dir(); not removing it")
    shutil.rmtree(path, ignore_errors=True)


# -- records -------------------------------------------------------------------------------

class Done(NamedTuple):
    """The outcome of `Durable.call`: wait for `ticket`, then reply `value`
    (the result if `ok`, else the exception to raise in the caller)."""
    ticket: int
    ok: bool
    value: Any


class Stored(NamedTuple):
    """One durable object as read back from the journal (HMACs verified)."""
    name: str
    oid: int
    typeid: str
    mode: str
    mutators: tuple | None
    args: tuple
    kwds: dict
    has_snapshot: bool
    snapshot: Any           # the state after row `snap_seq`
    snap_seq: int
    effects: list           # the effects of the rows after it, in order
    last_seq: int
    snap_bytes: int
    since_bytes: int


def _req_bytes(request: Hashable) -> bytes:
    if type(request) is int:
        return b"i%d" % request
    if type(request) is str:
        return b"s" + request.encode()
    raise TypeError(f"a request id must be an int or a str, not {type(request).__name__}")


# -- the handle of one durable object -----------------------------------------------------

class Durable:
    """One durable object: its live `obj`, its kind and its place in the journal.

    Call `call()` while holding the object's serial lock (queues: no lock;
    their effects are staged under the queue's own mutex), release the lock,
    then `journal.wait(done.ticket)` before replying."""

    def __init__(self, journal: Journal, name: str, oid: int, typeid: str, kind: Kind,
                 obj: Any, seq: int = 0, snap_bytes: int = 0, since_bytes: int = 0) -> None:
        self.journal = journal
        self.name = name
        self.oid = oid
        self.typeid = typeid
        self.kind = kind
        self.obj = obj
        self.seq = seq                  # the last sequence number staged
        self.last_ticket = 0            # the ticket of the last row staged
        self.dropped = False
        self.broken: NotJournalable | None = None
        self._snap_bytes = snap_bytes
        self._since = since_bytes       # effect bytes (+ overhead) since the last snapshot
        self._compactable = kind.mode != "snapshot"     # snapshot mode: one snapshot
        self._snapshots = kind.mode == "snapshot"

    def __repr__(self) -> str:
        return f"<Durable {self.typeid} {self.name!r} mode={self.kind.mode} seq={self.seq}>"

    def call(self, method: str, args: tuple = (), kwds: dict | None = None,
             client: str | None = None, request: Hashable | None = None,
             timeout: float | None = None) -> Done:
        """Run `obj.<method>(*args, **kwds)` for `(client, request)`, stage its
        effects and reply, and return a `Done`; exceptions of the method come
        back as `Done(ok=False)`.  A call whose `(client, request)` already has
        a reply is not run: that reply comes back.  `timeout` bounds only the
        wait for the same call still running in another thread."""
        if kwds is None:
            kwds = _NO_KWDS
        kind = self.kind
        if self.dropped or self.broken:
            return Done(0, False, self.broken or JournalError(
                f"durable object {self.name!r} was dropped"))
        if not (kind.all or method in kind.mutators):
            try:
                return Done(self.last_ticket, True, getattr(self.obj, method)(*args, **kwds))
            except Exception as e:
                return Done(self.last_ticket, False, e)
        j = self.journal
        key = None if client is None or request is None or request == 0 else (client, request)
        if key is not None:
            if type(request) is not str and type(request) is not int:
                _req_bytes(request)     # raises TypeError
            hit = j._begin(key, timeout)
            if hit is not None:
                return hit._replace(value=self.obj) if hit.value is SAME_OBJECT else hit
        try:
            if kind.immediate:
                tickets: list[int] = []

                def emit(effect: tuple, reply: Any) -> None:    # under the queue's mutex
                    tickets.append(self._stage((effect,), key, True, reply))

                try:
                    value, ok = kind.apply(self.obj, method, args, kwds, emit), True
                except Exception as e:
                    value, ok = self.broken or e, False
                ticket = tickets[-1] if tickets else self.last_ticket
                if self._due():
                    with self.obj.mutex:
                        self._compact()
            else:
                effects: list = []
                try:
                    value, ok = kind.apply(self.obj, method, args, kwds, effects.append), True
                except Exception as e:
                    value, ok = e, False
                except (SystemExit, KeyboardInterrupt) as e:
                    # the method's own: a failed call, journaled with what it did
                    # (its reply an EOFError, as the stdlib's caller would get)
                    value, ok = method_raised_exit(
                        f"{method}() on durable {self.typeid!r} object {self.name!r}", e,
                        "what it changed before is journaled, and the object stays usable"
                    ), False
                if effects:
                    try:
                        ticket = self._stage(effects, key, ok, value, True)
                    except NotJournalable as e:
                        return Done(self.last_ticket, False, e)
                    key = None                  # no longer running: _stage said so
                    if self._since > self._bound and self._compactable:
                        self._compact()
                else:
                    ticket = self.last_ticket
        finally:
            if key is not None:
                j._end(key)
        return Done(ticket, ok, value)

    def sync(self, timeout: float | None = None) -> None:
        """Wait until everything staged for this object is committed."""
        self.journal.wait(self.last_ticket, timeout)

    # -- internals (called under the object's lock) --

    def _sink(self, effect: tuple, reply: Any) -> None:
        """Effects of a queue operation that did not come through `call()`."""
        if not self.dropped:
            self._stage((effect,), None, True, reply)

    def _stage(self, effects: list | tuple, key: tuple | None, ok: bool, value: Any,
               end: bool = False) -> int:
        try:
            ops, replied = self._ops(effects, key, ok, value)
        except Exception as e:
            self.broken = NotJournalable(
                f"durable object {self.name!r} ({self.typeid}) could not journal a change "
                f"({type(e).__name__}: {e}); the change is in memory only, so the object "
                "refuses further calls. Its durable state is the one before that call: "
                "restart the manager to get it back.")
            raise self.broken from e
        t = self.journal._stage(ops, key if replied else None, (ok, value),
                                key if end else None)
        self.last_ticket = t
        return t

    def _ops(self, effects: list | tuple, key: tuple | None, ok: bool,
             value: Any) -> tuple[list, bool]:
        """The ops for a call's effects and reply, and whether they hold the
        reply; the handle's counters change only if nothing raised."""
        j = self.journal
        dumps = j._dumps
        snapshot = self._snapshots and SNAPSHOT in effects
        if snapshot:
            effects = [e for e in effects if e is not SNAPSHOT]
        if effects:
            seq = self.seq + 1
            eff = dumps(effects)
        else:
            seq, eff = _NO_SEQ, None
        if key is not None:
            client, request = key
            try:
                rep = (j._rep_none if value is None and ok is True
                       else dumps((ok, SAME_OBJECT if value is self.obj else value)))
            except Exception as e:
                rep = dumps((False, JournalError(
                    f"the reply of this call could not be stored ({type(e).__name__}: {e}); "
                    "the call did take effect")))
        else:
            client = request = rep = None
        ops = [("L", self.oid, seq, client, request, eff, rep,
                j._mac_row(self.oid, seq, client, request, eff, rep))] \
            if eff is not None or rep is not None else []
        if eff is not None:
            self.seq = seq
            self._since += len(eff) + RECORD_OVERHEAD
        if snapshot:
            ops.append(self._snapshot_op())     # covers this call's row too
        return ops, rep is not None

    def _snapshot_op(self) -> tuple:
        j = self.journal
        data = j._dumps(self.kind.state(self.obj))
        self._snap_bytes = len(data)
        self._since = 0
        return ("S", self.oid, self.seq, data, j._mac_snapshot(self.oid, self.seq, data))

    @property
    def _bound(self) -> int:
        return max(self.journal.compact_bytes, self._snap_bytes)

    def _due(self) -> bool:
        return self._compactable and self._since > self._bound

    def _compact(self) -> None:
        try:
            op = self._snapshot_op()
        except Exception:
            self._compactable = False       # e.g. an unpicklable journal-mode object
            return
        self.last_ticket = self.journal._stage([op], None, None)


# -- the journal ---------------------------------------------------------------------------

class Journal:
    """The durable-object journal of one manager (see the module docstring).

    `Journal(state_dir, authkey, fsync="normal")` opens or creates
    `state_dir/journal.sqlite3`.  `fsync="full"` makes commits survive power
    loss (SQLite `synchronous=FULL`); "normal" survives crashes of the process.
    `dumps`/`loads` replace `pickle` for records (the server may need its own
    pickler for proxies inside values)."""

    def __init__(self, state_dir: str | os.PathLike, authkey: bytes, *, fsync: str = "normal",
                 keep_replies: int = 256, compact_bytes: int = 1 << 20,
                 dumps: Callable[[Any], bytes] | None = None,
                 loads: Callable[[bytes], Any] | None = None,
                 identify: Callable[[str], str | None] | None = None) -> None:
        if fsync not in ("normal", "full"):
            raise ValueError(f"fsync must be 'normal' or 'full', not {fsync!r}")
        if not isinstance(authkey, (bytes, bytearray)) or not authkey:
            raise TypeError("authkey must be non-empty bytes")
        if keep_replies < 1:
            raise ValueError("keep_replies must be at least 1")
        self.fsync = fsync
        self.keep_replies = keep_replies
        self.compact_bytes = compact_bytes
        self._dumps = dumps or (lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        self._loads = loads or pickle.loads
        #: who a client is (None: unknown), asked at its first stored reply
        self._identify = identify
        self._rep_none = self._dumps((True, None))     # the reply of most mutating calls
        self.state_dir = check_state_dir(state_dir)
        self.path = os.path.join(self.state_dir, FILENAME)
        # staging and group commit
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)            # a commit finished
        self._running_cv = threading.Condition(self._mu)    # a deduplicated call finished
        self._db_lock = threading.Lock()                    # the connection
        self._pending: list[tuple[int, list]] = []          # (ticket, ops)
        self._pending_replies: dict[tuple, tuple] = {}      # key -> (ticket, ok, value)
        self._running: dict[tuple, object] = {}         # calls running now (see _begin)
        self._running_waiters = 0
        self._next_ticket = 1
        self._done = 0
        self._leading = False
        #: calls (tickets) in the last commit: more than one means several
        #: writers at once (the server's durable loop looks)
        self.last_batch = 0
        self._nwait = 0                 # threads in close() waiting for a commit to end
        self._waiters: list[tuple[int, Any]] = []           # (ticket, lock) asleep in wait()
        self._broken: BaseException | None = None
        self._closed = False
        self._handles: dict[str, Durable] = {}
        self.stats = {"commits": 0, "rows": 0, "snapshots": 0, "deleted": 0}
        # the index of the log: changed only by the committing thread (see _lead)
        self._stored: dict[str, tuple[int, str]] = {}       # name -> (oid, typeid)
        self._obj_rows: dict[int, deque] = {}               # oid -> (seq, row id) not compacted
        self._reply_row: dict[tuple, int] = {}              # (client, request) -> row id
        self._order: dict[str, deque] = {}                  # client -> requests, oldest first
        self._refs: dict[int, int] = {}                     # row id -> what still needs it
        self._idents: dict[str, str] = {}                   # client -> identify()'s answer
        self._next_row = 1
        self._garbage: list[int] = []                       # rows to delete in a later commit
        self._create_file()
        self._db = self._connect()
        self._cur = self._db.cursor()       # commits: a cursor made once (0.7 us a commit)
        try:
            self._mac = _HmacSha256(self._open_meta(bytes(authkey)))
            self._load_index()
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"<Journal {self.path} fsync={self.fsync}>"

    # -- opening --

    def _create_file(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            return
        os.close(fd)
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)           # the new name survives a power loss too
        finally:
            os.close(dfd)

    def _connect(self) -> sqlite3.Connection:
        if sqlite3 is None:
            raise JournalError(
                "durable objects keep their journal in SQLite, and this Python was built "
                "without the sqlite3 module (install SQLite's headers, e.g. libsqlite3-dev, "
                "and rebuild Python), so it cannot make durable objects; the other objects "
                "work")
        db = sqlite3.connect(self.path, timeout=LOCK_WAIT, isolation_level=None,
                             check_same_thread=False, cached_statements=64)
        try:
            db.execute("PRAGMA page_size=1024")    # a new file only: fewer bytes a commit
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync == 'full' else 'NORMAL'}")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.execute("BEGIN EXCLUSIVE")      # take the lock now, and keep it
            db.execute("COMMIT")
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError as e:
            db.close()
            if "locked" in str(e) or "busy" in str(e):
                raise JournalInUse(
                    f"the journal {self.path} is in use by another process (another manager "
                    f"with state_dir={self.state_dir}?). Stop that manager first, or use "
                    "another state_dir.") from None
            raise JournalError(f"cannot open the journal {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            db.close()
            raise JournalError(f"{self.path} is not a procshare journal ({e}). Move it away, "
                               "or use another state_dir.") from None
        return db

    def _open_meta(self, authkey: bytes) -> bytes:
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if not meta:
            file_id = secrets.token_bytes(16)
            key = self._derive(authkey, file_id)
            db.execute("BEGIN")
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("format", FORMAT), ("id", file_id),
                            ("keycheck", hmac.digest(key, b"keycheck", "sha256"))])
            db.execute("COMMIT")
            return key
        if meta.get("format") != FORMAT or "id" not in meta or "keycheck" not in meta:
            raise JournalError(f"{self.path} is not a journal this version of procshare can "
                               f"read (format {meta.get('format')!r}). Move it away, or use "
                               "another state_dir.")
        key = self._derive(authkey, bytes(meta["id"]))
        if not hmac.compare_digest(hmac.digest(key, b"keycheck", "sha256"), meta["keycheck"]):
            raise JournalTampered(
                f"the journal {self.path} was written by a manager with a different authkey "
                "(or its key record was changed). procshare does not load it: its records "
                "cannot be verified, and a journal holds pickles, which run code when loaded. "
                "Start the manager with the authkey that wrote it, or use another state_dir.")
        return key

    @staticmethod
    def _derive(authkey: bytes, file_id: bytes) -> bytes:
        return hmac.digest(authkey, b"procshare journal v1\0" + file_id, "sha256")

    def _load_index(self) -> None:
        """Index the stored objects and log rows (no record is unpickled here)."""
        db = self._db
        for name, oid, typeid, mode, spec, mac in db.execute(
                "SELECT name, oid, typeid, mode, spec, mac FROM objects"):
            self._verify(mac, self._mac_object(name, oid, typeid, mode, spec),
                         f"the object record of {name!r}")
            self._stored[name] = (oid, typeid)
        live = {oid for oid, _ in self._stored.values()}
        snap_seq = dict(db.execute("SELECT oid, seq FROM snapshots"))
        forgotten = {}
        for client, upto, mac in db.execute("SELECT client, upto, mac FROM forgotten"):
            self._verify(mac, self._mac_forgotten(client, upto),
                         f"the forgotten-client record of {client!r}")
            forgotten[client] = upto
        garbage = []
        for rid, oid, seq, client, request in db.execute(
                "SELECT id, oid, seq, client, request FROM log ORDER BY id"):
            refs = 0
            if oid in live and seq is not None and seq > snap_seq.get(oid, _NO_SEQ):
                self._obj_rows.setdefault(oid, deque()).append((seq, rid))
                refs += 1
            if client is not None and rid > forgotten.get(client, 0):
                key = (client, request)
                old = self._reply_row.get(key)
                if old is not None:
                    self._unref(old, garbage)
                else:
                    self._order.setdefault(client, deque()).append(request)
                self._reply_row[key] = rid
                refs += 1
            if refs:
                self._refs[rid] = refs
            else:
                garbage.append(rid)
            self._next_row = rid + 1
        for client, order in self._order.items():
            while len(order) > self.keep_replies:
                self._unref(self._reply_row.pop((client, order.popleft())), garbage)
        gone_idents = []
        for client, ident, mac in db.execute("SELECT client, ident, mac FROM clients"):
            self._verify(mac, self._mac_ident(client, ident),
                         f"the identity record of client {client!r}")
            if client in self._order:
                self._idents[client] = ident
            else:       # (its replies went in a commit that a crash cut short)
                gone_idents.append((client,))
        dead_snaps = [(oid,) for oid in snap_seq if oid not in live]
        if garbage or dead_snaps or forgotten or gone_idents:
            db.execute("BEGIN")
            db.executemany(_DELETE_RUN, _runs(garbage))
            db.executemany("DELETE FROM snapshots WHERE oid=?", dead_snaps)
            db.executemany("DELETE FROM clients WHERE client=?", gone_idents)
            db.execute("DELETE FROM forgotten WHERE NOT EXISTS (SELECT 1 FROM log WHERE "
                       "log.client = forgotten.client AND log.id <= forgotten.upto)")
            db.execute("COMMIT")

    # -- MACs --

    def _mac_row(self, oid: int, seq: int, client: str | None, request: Hashable | None,
                 eff: bytes | None, rep: bytes | None) -> bytes:
        c = b"" if client is None else client.encode()
        if request is None:
            r = b""
        elif type(request) is int:
            r = b"i%d" % request
        else:
            r = _req_bytes(request)
        e = eff or b""
        return self._mac(b"".join((
            b"L", _PACK_ROW(oid, _NO_SEQ if seq is None else seq, len(c), len(r), len(e)),
            c, r, e, rep or b"")))

    def _mac_forgotten(self, client: str, upto: int) -> bytes:
        return self._mac(b"F" + struct.pack(">Q", upto) + client.encode())

    def _mac_ident(self, client: str, ident: str) -> bytes:
        c = client.encode()
        return self._mac(b"C" + struct.pack(">I", len(c)) + c + ident.encode())

    def _mac_snapshot(self, oid: int, seq: int, data: bytes) -> bytes:
        return self._mac(b"S" + _PACK_SNAP(oid, seq) + data)

    def _mac_object(self, name: str, oid: int, typeid: str, mode: str, spec: bytes) -> bytes:
        parts = [name.encode(), typeid.encode(), mode.encode()]
        return self._mac(b"O" + struct.pack(">Q", oid)
                         + b"".join(struct.pack(">I", len(p)) + p for p in parts) + spec)

    def _verify(self, mac: bytes, expected: bytes, what: str) -> None:
        if not hmac.compare_digest(bytes(mac), expected):
            raise JournalTampered(
                f"{what} in the journal {self.path} failed its integrity check (HMAC): it was "
                "changed outside procshare, or written under another authkey. procshare "
                "refuses to load it, because a journal holds pickles, which run code when "
                "loaded. Restore the file from a backup, or move it away to start empty.")

    # -- objects --

    def create(self, name: str, typeid: str, obj: Any, *, args: tuple = (),
               kwds: dict | None = None, mode: str | None = None,
               mutators: Iterable[str] | None = None) -> Durable:
        """Make `obj` (just created from `typeid` with `args`/`kwds`) durable
        under `name`, and stage its record and first snapshot; wait for the
        handle's `last_ticket` before answering the create."""
        kind = kind_for(typeid, mode, mutators)
        kwds = kwds or {}
        oid = secrets.randbits(62) + 1
        with self._mu:
            self._check_open()
            if name in self._handles or name in self._stored:
                raise ValueError(f"a durable object named {name!r} exists already in "
                                 f"{self.path}; attach to it (recover()) or drop it first")
            self._stored[name] = (oid, typeid)
        h = Durable(self, name, oid, typeid, kind, obj)
        try:
            sargs, skwds = kind.spec_args(args, kwds)
            spec = self._dumps({"args": sargs, "kwds": skwds,
                                "mutators": None if mutators is None else tuple(mutators)})
            ops: list = [("O", name, oid, typeid, kind.mode, spec,
                          self._mac_object(name, oid, typeid, kind.mode, spec))]
            if kind.immediate:
                kind.prepare(obj, h._sink)
                with obj.mutex:
                    ops.append(h._snapshot_op())
                    h.last_ticket = self._stage(ops, None, None)
            else:
                try:
                    ops.append(h._snapshot_op())
                except Exception as e:
                    if kind.mode != "journal":
                        raise TypeError(f"durable object {name!r} ({typeid}) cannot be "
                                        f"pickled for its snapshots: {type(e).__name__}: {e}"
                                        ) from e
                    h._compactable = False   # replayed from its creation arguments
                h.last_ticket = self._stage(ops, None, None)
        except BaseException:
            h.dropped = True                # a queue's hooks stage nothing more
            with self._mu:
                self._stored.pop(name, None)
            raise
        with self._mu:
            self._handles[name] = h
        return h

    def get(self, name: str) -> Durable | None:
        """The live handle of durable object `name` (created or recovered)."""
        return self._handles.get(name)

    def names(self) -> list[str]:
        """The names of every durable object in the journal."""
        with self._mu:
            return sorted(self._stored)

    def drop(self, name: str) -> int:
        """Forget durable object `name` (its records go in the next commit);
        returns the ticket to wait for."""
        with self._mu:
            h = self._handles.pop(name, None)
            got = self._stored.pop(name, None)
        if got is None:
            raise KeyError(f"no durable object named {name!r} in {self.path}")
        if h is not None:
            h.dropped = True
        return self._stage([("D", name, got[0])], None, None)

    def load_all(self, on_error: Callable[[str, Exception], bool] | None = None
                 ) -> list[Stored]:
        """Every stored object, with its latest snapshot and the effects after
        it; every record's HMAC is verified before it is unpickled.  An object
        that cannot be loaded (a class that is gone) raises JournalError, or
        is left out if `on_error(name, error)` says so; a record that fails
        its HMAC always raises."""
        with self._db_lock:
            self._check_open()
            objs = self._db.execute(
                "SELECT name, oid, typeid, mode, spec, mac FROM objects ORDER BY name"
            ).fetchall()
            snaps = {r[0]: r[1:] for r in self._db.execute(
                "SELECT oid, seq, data, mac FROM snapshots")}
            rows: dict[int, list] = {}
            for r in self._db.execute("SELECT oid, seq, client, request, effects, reply, mac "
                                      "FROM log WHERE effects IS NOT NULL ORDER BY id"):
                rows.setdefault(r[0], []).append(r)
        out = []
        for name, oid, typeid, mode, spec, mac in objs:
            try:
                out.append(self._load_one(name, oid, typeid, mode, spec, mac, snaps, rows))
            except JournalTampered:
                raise
            except Exception as e:
                if on_error is not None and on_error(name, e):
                    continue
                raise JournalError(f"cannot load durable object {name!r} (typeid {typeid!r}) "
                                   f"from {self.path}: {type(e).__name__}: {e}. Make the "
                                   "classes its records name importable in the manager "
                                   "(the same module and name) and start it again.") from e
        return out

    def _load_one(self, name: str, oid: int, typeid: str, mode: str, spec: bytes, mac: bytes,
                  snaps: dict, rows: dict) -> Stored:
        """One stored object (see `load_all`)."""
        self._verify(mac, self._mac_object(name, oid, typeid, mode, spec),
                     f"the object record of {name!r}")
        info = self._loads(spec)
        has_snap, state, snap_seq, snap_bytes = False, None, 0, 0
        if oid in snaps:
            snap_seq, data, mac = snaps[oid]
            self._verify(mac, self._mac_snapshot(oid, snap_seq, data),
                         f"the snapshot of {name!r} (after row {snap_seq})")
            has_snap, state, snap_bytes = True, self._loads(data), len(data)
        effects: list = []
        since, last = 0, snap_seq
        for _, seq, client, request, eff, rep, mac in sorted(rows.get(oid, ()),
                                                              key=lambda r: r[1]):
            if seq <= snap_seq:
                continue        # covered by the snapshot; kept for its reply
            self._verify(mac, self._mac_row(oid, seq, client, request, eff, rep),
                         f"log row {seq} of {name!r}")
            if seq != last + 1:
                raise JournalTampered(
                    f"the log of durable object {name!r} in the journal {self.path} jumps "
                    f"from row {last} to row {seq}: rows are missing. procshare refuses "
                    "to rebuild it from an incomplete history. Restore the file from a "
                    "backup, or drop the object.")
            effects.extend(self._loads(eff))
            since += len(eff) + RECORD_OVERHEAD
            last = seq
        return Stored(name, oid, typeid, mode, info.get("mutators"), tuple(info["args"]),
                      dict(info["kwds"]), has_snap, state, snap_seq, effects, last,
                      snap_bytes, since)

    def recover(self, factory: Callable[[str, tuple, dict], Any],
                on_error: Callable[[str, Exception], bool] | None = None
                ) -> dict[str, Durable]:
        """Rebuild every stored object not yet live and return their handles by
        name.  `factory(typeid, args, kwds)` makes a fresh object of a typeid
        (the manager's registered callable); snapshot-mode objects come back
        from their pickles without it.  An object that cannot be rebuilt
        raises JournalError, or is left out if `on_error(name, error)` says so."""
        out: dict[str, Durable] = {}
        for st in self.load_all(on_error):
            if st.name in self._handles:
                continue
            kind = kind_for(st.typeid, st.mode, st.mutators)
            try:
                if kind.mode != "effects" and st.has_snapshot:
                    obj = kind.restore(None, st.snapshot)
                else:
                    obj = factory(st.typeid, st.args, st.kwds)
                    if kind.immediate:
                        kind.prepare(obj, None)
                    if st.has_snapshot:
                        obj = kind.restore(obj, st.snapshot)
                for e in st.effects:
                    kind.replay(obj, e)
            except Exception as e:
                if on_error is not None and on_error(st.name, e):
                    continue
                raise JournalError(f"cannot rebuild durable object {st.name!r} (typeid "
                                   f"{st.typeid!r}) from {self.path}: {type(e).__name__}: {e}"
                                   ) from e
            h = Durable(self, st.name, st.oid, st.typeid, kind, obj, st.last_seq,
                        st.snap_bytes, st.since_bytes)
            if kind.immediate:
                kind.prepare(obj, h._sink)
            if kind.mode == "journal" and not st.has_snapshot:
                h._compactable = False
            with self._mu:
                self._handles[st.name] = h
            out[st.name] = h
        return out

    # -- replies --

    def lookup_reply(self, client: str, request: Hashable,
                     timeout: float | None = None) -> tuple[bool, Any] | None:
        """The stored `(ok, value)` reply of call `(client, request)`, or None
        if it has none (it never ran, had no effect, or was evicted).  A reply
        not yet committed is returned once it is."""
        key = (client, request)
        with self._mu:
            pending = self._pending_replies.get(key)
            rid = self._reply_row.get(key)
        if pending is not None:
            self.wait(pending[0], timeout)
            return pending[1], pending[2]
        if rid is None:
            return None
        got = self._read_reply(key, rid)
        if got is not None and got[1] is SAME_OBJECT:
            h = next((h for h in list(self._handles.values()) if h.oid == got[2]), None)
            return got[0], None if h is None else h.obj
        return None if got is None else (got[0], got[1])

    def _read_reply(self, key: tuple, rid: int) -> tuple[bool, Any, int] | None:
        with self._db_lock:
            self._check_open()
            row = self._db.execute("SELECT oid, seq, client, request, effects, reply, mac "
                                   "FROM log WHERE id=?", (rid,)).fetchone()
        if row is None:
            return None
        oid, seq, client, request, eff, rep, mac = row
        what = f"the stored reply of request {key[1]!r} of client {key[0]!r}"
        self._verify(mac, self._mac_row(oid, seq, client, request, eff, rep), what)
        if (client, request) != key or rep is None:
            raise JournalTampered(f"{what} in the journal {self.path} is not where the index "
                                  "says: the file was changed outside procshare.")
        ok, value = self._loads(rep)
        return ok, value, oid

    def _begin(self, key: tuple, timeout: float | None) -> Done | None:
        """Before running call `key`: its stored reply as a Done, or None (and
        the call is marked running until `_end`).  The common case takes no
        lock: claiming `key` in `_running` is one atomic `setdefault`, and a
        finished call's reply is in `_pending_replies` or `_reply_row` before
        its key leaves `_running`."""
        me = object()
        if self._running.setdefault(key, me) is not me:
            return self._begin_slow(key, timeout)
        pending = self._pending_replies.get(key)
        if pending is not None:
            self._end(key)
            return Done(*pending)
        rid = self._reply_row.get(key)
        if rid is not None:
            try:
                got = self._read_reply(key, rid)
            except BaseException:
                self._end(key)
                raise
            if got is not None:
                self._end(key)
                return Done(0, got[0], got[1])
        return None

    def _begin_slow(self, key: tuple, timeout: float | None) -> Done | None:
        """`key` was running already: wait for it to end, then look again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mu:
            self._running_waiters += 1
            try:
                while key in self._running:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return Done(0, False, TimeoutError(
                            f"request {key[1]!r} of client {key[0]!r} is still running in "
                            "the manager (this is a re-sent copy of it)"))
                    self._running_cv.wait(left)
            finally:
                self._running_waiters -= 1
        return self._begin(key, timeout)

    def _end(self, key: tuple) -> None:
        self._running.pop(key, None)
        if self._running_waiters:
            with self._mu:
                self._running_cv.notify_all()

    def has_replies(self, client: str) -> bool:
        """Does the journal keep (or is about to keep) replies of `client`?"""
        if client in self._order:
            return True
        with self._mu:
            return any(k[0] == client for k in self._pending_replies)

    def forget_client(self, client: str) -> None:
        """Drop the stored replies of a client that is gone for good (in the
        next commit)."""
        self._stage([("F", client)], None, None)

    def clients(self) -> list[str]:
        """The clients whose replies the journal keeps (committed ones)."""
        return list(self._order)

    def client_ident(self, client: str) -> str | None:
        """What `identify` said of `client` when its first reply was stored
        (None: nothing, or it has no replies kept)."""
        return self._idents.get(client)

    # -- staging and group commit --

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed")

    def _stage(self, ops: list, key: tuple | None, outcome: tuple | None,
               end: tuple | None = None) -> int:
        """Queue `ops` for the next commit; `key`'s reply is `outcome` until
        then.  `end`: the call `end` is no longer running (see `_begin`)."""
        with self._mu:
            if self._broken is not None or self._closed:
                if end is not None:
                    self._end_locked(end)
                self._check_open()
                raise JournalBroken(f"the journal {self.path} failed to commit earlier "
                                    f"({self._broken!r}); it takes no more writes") from None
            t = self._next_ticket
            self._next_ticket = t + 1
            self._pending.append((t, ops))
            if key is not None:
                self._pending_replies[key] = (t, outcome[0], outcome[1])
            if end is not None:
                self._end_locked(end)       # after its reply is visible: see _begin
            return t

    def _end_locked(self, key: tuple) -> None:
        self._running.pop(key, None)
        if self._running_waiters:
            self._running_cv.notify_all()

    def wait(self, ticket: int, timeout: float | None = None) -> None:
        """Return once everything staged up to `ticket` is committed; commit
        it here if no other thread is committing.  TimeoutError after
        `timeout` seconds (the rows stay staged for the next commit)."""
        if ticket <= self._done:
            return
        if ticket >= self._next_ticket:
            raise ValueError(f"ticket {ticket} was never issued")
        deadline = None if timeout is None else time.monotonic() + timeout
        mu = self._mu
        with mu:
            while self._done < ticket:
                if self._broken is not None:
                    raise JournalBroken(
                        f"the journal {self.path} could not commit: {self._broken!r}. The "
                        "call's effect is not durable; the manager must restart to recover "
                        "from the journal.") from self._broken
                if not self._leading:
                    self._lead()
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the journal {self.path} did not commit within "
                                       f"{timeout} s")
                # sleep on a lock of our own: the leader wakes only the waiters its
                # commit covers, and the one waiter that is to lead next (_wake)
                me = (ticket, _allocate_lock())
                me[1].acquire()
                released = returned = False
                try:
                    self._waiters.append(me)
                    mu.release()
                    released = True
                    me[1].acquire(True, -1 if left is None else left)
                    returned = True
                finally:
                    if released:
                        mu.acquire()
                    try:
                        self._waiters.remove(me)    # still there: timed out or interrupted
                    except ValueError:
                        if not returned:    # woken, maybe to lead, and interrupted:
                            self._wake()    # another waiter leads instead

    def flush(self, timeout: float | None = None) -> None:
        """Commit everything staged so far."""
        with self._mu:
            last = self._next_ticket - 1
        self.wait(last, timeout)

    def _lead(self) -> None:
        """Commit everything pending; called with `_mu` held, returns with it
        held.  The index (`_plan`) and the file change only here, by the one
        thread that set `_leading`, and without `_mu`: stagers never wait
        for a commit to be planned or written."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._leading = True
        self._mu.release()
        err = None
        try:
            self._write(*self._plan(batch))
        except BaseException as e:
            err = e
        finally:
            self._mu.acquire()
            self._leading = False
        if err is not None:
            self._broken = err
            self._wake()
            return
        self._done = batch[-1][0]
        self.last_batch = len(batch)
        pending = self._pending_replies
        if pending:
            for _, ops in batch:
                for op in ops:
                    if op[0] == "L" and op[3] is not None:
                        pending.pop((op[3], op[4]), None)
        self._wake()

    def _wake(self) -> None:
        """With `_mu` held, after a commit (or a failure): wake each waiter the
        commit covers, and the first of the others, which leads the next
        commit; the rest sleep on.  (A notify_all woke every waiter after every
        commit, most of them only to sleep again: four writer threads in one
        process took 61-77 us a write that way, against 57-78 now, median 71
        against 60.)"""
        if self._nwait:
            self._cv.notify_all()
        waiters = self._waiters
        if not waiters:
            return
        done = self._done
        rest = []
        for w in waiters:
            if w[0] <= done or self._broken is not None:
                w[1].release()
            else:
                rest.append(w)
        if rest and not self._leading:
            nxt = min(rest, key=_first)
            rest.remove(nxt)
            nxt[1].release()
        self._waiters = rest

    def _unref(self, rid: int, deletes: list) -> None:
        n = self._refs.get(rid, 1) - 1
        if n > 0:
            self._refs[rid] = n
        else:
            self._refs.pop(rid, None)
            deletes.append(rid)

    def _plan(self, batch: list) -> tuple:
        """Turn staged ops into SQL parameters and update the index (by the
        leader only; readers elsewhere make single dict reads)."""
        rows: list[tuple] = []
        snaps: dict[int, tuple] = {}
        objs: dict[str, tuple] = {}
        drops: list[tuple] = []
        deletes: list[int] = []
        forgets: list[tuple] = []
        idents: dict[str, tuple] = {}       # client -> its clients row, this commit
        keep = self.keep_replies
        obj_rows, reply_row, orders = self._obj_rows, self._reply_row, self._order
        rid = self._next_row
        for _, ops in batch:
            for op in ops:
                tag = op[0]
                if tag == "L":
                    _, oid, seq, client, request = op[:5]
                    refs = 0
                    if seq != _NO_SEQ:
                        q = obj_rows.get(oid)
                        if q is None:
                            q = obj_rows[oid] = deque()
                        q.append((seq, rid))
                        refs = 1
                    else:
                        seq = None
                    if client is not None:
                        key = (client, request)
                        old = reply_row.get(key)
                        if old is not None:
                            self._unref(old, deletes)
                        else:
                            order = orders.get(client)
                            if order is None:
                                order = orders[client] = deque()
                                self._new_client(client, idents)
                            order.append(request)
                            if len(order) > keep:
                                gone = (client, order.popleft())
                                self._unref(reply_row.pop(gone), deletes)
                        reply_row[key] = rid
                        refs += 1
                    self._refs[rid] = refs
                    rows.append((rid, oid, seq, client, request, op[5], op[6], op[7]))
                    rid += 1
                    self._next_row = rid
                elif tag == "S":
                    oid, seq = op[1], op[2]
                    snaps[oid] = op[1:]
                    q = self._obj_rows.get(oid)
                    while q and q[0][0] <= seq:
                        self._unref(q.popleft()[1], deletes)
                elif tag == "O":
                    objs[op[1]] = op[1:]
                elif tag == "D":
                    name, oid = op[1], op[2]
                    drops.append((name, oid))
                    if objs.get(name, (None, None))[1] == oid:
                        del objs[name]
                    snaps.pop(oid, None)
                    for _, gone_row in self._obj_rows.pop(oid, ()):     # (not `rid`:
                        self._unref(gone_row, deletes)      # the next new row's id)
                elif tag == "F":
                    client = op[1]
                    for request in self._order.pop(client, ()):
                        self._unref(self._reply_row.pop((client, request)), deletes)
                    self._idents.pop(client, None)
                    idents.pop(client, None)
                    upto = self._next_row - 1
                    forgets.append((client, upto, self._mac_forgotten(client, upto)))
        garbage = self._garbage
        garbage.extend(deletes)
        if len(garbage) >= GC_ROWS or snaps or drops or forgets:
            self._garbage = []
        else:
            garbage = []
        return rows, snaps, objs, drops, garbage, forgets, list(idents.values())

    def _new_client(self, client: str, idents: dict) -> None:
        """(planning) `client`'s first stored reply: who it is goes in the same
        commit (a failing `identify` only leaves it unknown)."""
        if self._identify is None:
            return
        try:
            ident = self._identify(client)
        except Exception:
            ident = None
        if ident is not None:
            self._idents[client] = ident
            idents[client] = (client, ident, self._mac_ident(client, ident))

    def _write(self, rows: list, snaps: dict, objs: dict, drops: list, deletes: list,
               forgets: list, idents: list) -> None:
        with self._db_lock:
            db = self._db
            if rows and len(rows) <= _MAX_INSERT and not (snaps or objs or drops or deletes
                                                           or forgets or idents):
                # the common case: rows only, committed by one statement in SQLite's
                # autocommit.  Each statement releases the GIL twice (step, reset), and
                # with several connection threads each release hands the GIL to one
                # of them: BEGIN, one INSERT a row and COMMIT cost four writers 82 us
                # a set, one statement 60.
                n = len(rows)
                self._cur.execute(_INSERTS[n], rows[0] if n == 1
                                  else [v for r in rows for v in r])
                self.stats["commits"] += 1
                self.stats["rows"] += n
                return
            db.execute("BEGIN")
            try:
                for name, oid in drops:
                    db.execute("DELETE FROM objects WHERE name=? AND oid=?", (name, oid))
                    db.execute("DELETE FROM snapshots WHERE oid=?", (oid,))
                if objs:
                    db.executemany("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                                   list(objs.values()))
                if snaps:
                    db.executemany("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?)",
                                   list(snaps.values()))
                if rows:
                    db.executemany("INSERT INTO log VALUES (?,?,?,?,?,?,?,?)", rows)
                if deletes:
                    db.executemany(_DELETE_RUN, _runs(deletes))
                if forgets:
                    db.executemany("INSERT OR REPLACE INTO forgotten VALUES (?,?,?)", forgets)
                    db.executemany("DELETE FROM clients WHERE client=?",
                                   [(f[0],) for f in forgets])
                if idents:
                    db.executemany("INSERT OR REPLACE INTO clients VALUES (?,?,?)", idents)
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
        s = self.stats
        s["commits"] += 1
        s["rows"] += len(rows)
        s["snapshots"] += len(snaps)
        s["deleted"] += len(deletes)

    # -- closing --

    def close(self) -> None:
        """Commit what is staged, checkpoint the WAL into the file, and close."""
        if self._closed:
            return
        try:
            if self._broken is None:
                self.flush()
                with self._cv:                  # lead, so that the index holds still
                    while self._leading:
                        self._nwait += 1
                        try:
                            self._cv.wait(1.0)
                        finally:
                            self._nwait -= 1
                    self._leading = True
                try:
                    garbage, self._garbage = self._garbage, []
                    if garbage:
                        self._write([], {}, {}, [], garbage, [], [])
                finally:
                    with self._mu:
                        self._leading = False
                        self._wake()
        finally:
            with self._mu:
                self._closed = True
            with self._db_lock:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
                self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- benchmark -----------------------------------------------------------------------------

def benchmark(fsync: str = "normal", writers: int = 1, writes: int = 2000,
              base: str | None = None) -> dict:
    """Measure durable dict sets the way the server makes them: each of
    `writers` threads takes the dict's serial lock, `call`s `__setitem__`,
    releases the lock and waits for its commit.  Returns microseconds per
    committed write, per write with no journal, and the number of commits."""
    d = private_state_dir(base)
    try:
        j = Journal(d, b"benchmark-key", fsync=fsync)
        try:
            h = j.create("bench", "dict", {})
            h.sync()
            lock = threading.Lock()
            per = max(1, writes // writers)

            def work(w: int) -> None:
                for i in range(per):
                    with lock:
                        done = h.call("__setitem__", (f"k{w}-{i % 100}", i),
                                      client=f"client-{w}", request=i + 1)
                    j.wait(done.ticket)

            c0 = j.stats["commits"]
            threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            commits = j.stats["commits"] - c0
        finally:
            j.close()
        plain: dict = {}
        t0 = time.perf_counter()
        for i in range(per * writers):
            with lock:
                plain.__setitem__(f"k-{i % 100}", i)
        dt_plain = time.perf_counter() - t0
        n = per * writers
        return {"fsync": fsync, "writers": writers, "writes": n, "commits": commits,
                "us_per_write": dt / n * 1e6, "us_per_write_plain": dt_plain / n * 1e6,
                "writes_per_commit": n / max(1, commits)}
    finally:
        remove_private_state_dir(d)


if __name__ == "__main__":      # python -m procshare.server.journal: print the benchmark
    for _fsync in ("normal", "full"):
        for _w in (1, 4):
            _r = benchmark(_fsync, _w, 4000 if _fsync == "normal" else 1000)
            print(f"fsync={_fsync:6} writers={_w}: {_r['us_per_write']:7.1f} us/write, "
                  f"{_r['writes_per_commit']:.2f} writes/commit")
