"""Durable objects in a running manager: the journal wired into the server.

Owns: `DurableObjects`, one per server: the journal (opened at the first
durable object, or at start when the state directory already holds one),
recovery at start, the record of the clients that may hold unnamed durable
objects (`holders.json`) and the end of `@recovered` after a crash, creating
a durable object or attaching to one by name, the call path of a durable
object (`apply`: run and stage under its lock; `finish`: the reply once
committed; `call` waits for the commit between them, the durable loop waits
once for many calls; exactly once per `(client, request)`), re-sent calls (`#RETRY`),
re-attaching proxies after a restart, forgetting a client's stored replies
when its lease ends, closing the journal, and how its records are pickled
(`JournalDumps`: with the manager's serializer's pickler, and proxies inside
them).  What a call
changes and how it replays is `durable.py`'s job; storage is `journal.py`'s.

Rules it keeps:
- A durable object's id is `D:` + its name, the same in every incarnation of
  the manager, so a proxy made before a crash finds its object again.
- A reply leaves the manager only after the call's effect is committed
  (`Journal.wait`); a read waits for the object's last staged change.
- A call's key is `(client id, "<session>:<connection>:<request>")`.  A call re-sent
  after a restart (`#RETRY`) carries the key of its first sending, so it is
  answered from the stored reply and never applied twice.
- Holders: a named object is held by the journal (`@durable`) for good, so
  a later program attaches to it by name (and waits for its creation to be
  committed); an unnamed one lives while proxies hold it, like any object,
  and leaves the journal with its last reference.  After a crash, every
  recovered object is also held by `@recovered`: its clients come back one
  by one and re-attach under their own ids, one reference per proxy
  (`reattach`).  `@recovered` lets go once every client that could hold an
  unnamed durable object before the crash has re-attached or is dead, and
  `loan_ttl` has passed (a proxy in transit at the crash is adopted within
  it): so the objects only dead clients held go.  Who could hold one is the
  `holders.json` file in the state directory (client id, pid, start time;
  with an HMAC), written before a client's first reference to an unnamed
  durable object counts; a client on another host, or one that stays away
  without dying, keeps `@recovered` in place, as does a missing or
  unverifiable file (after which no file is written until a fresh start:
  a record made then would omit the holders of before).
- A proxy stored in a durable object (a durable list of durable dicts) is
  journaled without a loan, and without this server's address
  (`JournalDumps`), so a later program's manager, listening elsewhere,
  binds it to itself.  It is
  rebuilt during recovery as the server's own (`inprocess.begin_recovery`),
  without a reference, and takes it once every object is back
  (`_hold_rebuilt`): its object may be recovered after the one holding it.
  A stored proxy to another manager is rebuilt without a reference (its
  loan ended long ago).
- A journal that fails (`JournalError`) costs the call, never the
  connection; a broken one (`JournalBroken`) makes a supervised manager exit,
  so that its successor recovers from the file.
- A fresh start (not a restart) keeps an unnamed object an earlier program
  left in the state directory only while a proxy stored in a kept object
  refers to it (a named list of unnamed dicts): no client proxy can name
  one any more.  The others are dropped (`FRESH_HOLDER`, let go once the
  stored proxies hold their references, with this server as the process's
  own so that a dropped object's stored proxies give theirs back), as is
  one that cannot be rebuilt (its type is no longer registered): that costs
  the object, not the start.  Unnamed objects that only refer to each
  other, in a cycle, stay.  The stored replies of the earlier program's
  clients go too, so a call re-sent to a manager that started afresh fails
  instead of running (it cannot tell whether the call took effect).  A
  standalone server run again (`resume`) is no fresh start: its clients
  may come back.
- After a crash (or a `resume`), the stored replies of a client of an
  earlier server that never came back go once it is known dead: the journal
  keeps who each client with replies is (pid, start time, host: `_identify`),
  and a client whose pid is gone or names another process now, on this host
  and pid namespace, can re-send nothing (`_forget_dead_repliers`).  One
  that is alive but silent, or on another host, keeps them.
- The record of who may hold unnamed objects is written when the journal is
  first opened by a fresh server, or is new; it is read once per
  incarnation, from the journal it belongs to (a clean shutdown that closes
  the journal meanwhile leaves the file as it was).
"""

from __future__ import annotations

import gc
import hmac
import importlib
import io
import json
import logging
import os
import pickle
import secrets
import threading
import time
from typing import Any, NamedTuple

from .. import inprocess
from ..errors import missing_method
from ..transport.files import replace_file
from ..transport.processes import host_identity, is_other_process, start_time
from ..wire.kinds import Kind
from ..wire.records import DURABLE_PREFIX, is_proxy_type
from . import callctx, journal
from .registry import Entry

__all__ = ["DurableObjects", "DURABLE_PREFIX", "durable_option", "MODES"]

log = logging.getLogger("procshare.durable")

NAMED_HOLDER = "@durable"
RECOVERED_HOLDER = "@recovered"
FRESH_HOLDER = "@starting"       # a fresh start: until the stored proxies hold theirs
#: in the state directory: the clients that may hold unnamed durable objects
HOLDERS_FILE = "holders.json"
MODES = ("snapshot", "journal")


#: the create keyword with the client's key for an unnamed durable object
#: (`managers.BaseManager._create`): a create sent again after a crash
#: finds the object the first one made
UNNAMED_KEY = "#unnamed"


class JournalDumps:
    """Pickles the journal's records with a pickler per thread, made once
    (0.44 us for a dict set's effect, against 0.36 for `pickle.dumps` and 0.84
    for a new pickler each time), of class `base` (the stdlib's, cloudpickle's
    or dill's: the manager's serializer's).  A proxy goes as its
    `_procshare_journal_reduce_` says: no loan, and a proxy to this manager
    without its address.  A pickle made while one is under way (a user's
    `__reduce__` calling back) gets a pickler of its own."""

    def __init__(self, base: type = pickle.Pickler) -> None:
        parent = getattr(base, "reducer_override", None)

        class JournalPickler(base):     # type: ignore[valid-type, misc]
            def reducer_override(self, obj: Any) -> Any:
                if is_proxy_type(type(obj)):
                    return obj._procshare_journal_reduce_()
                return NotImplemented if parent is None else parent(self, obj)

        self._pickler = JournalPickler
        self._idle = threading.local()
        #: cloudpickle's and dill's picklers keep state of their own across
        #: dumps (cloudpickle: the globals of the functions it pickled): a new
        #: one each time, as their own `dumps` makes
        self._reuse = base is pickle.Pickler

    def __call__(self, obj: Any) -> bytes:
        if not self._reuse:
            buf = io.BytesIO()
            self._pickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
            return buf.getvalue()
        idle = getattr(self._idle, "pickler", None)
        if idle is None:
            buf = io.BytesIO()
            idle = (buf, self._pickler(buf, pickle.HIGHEST_PROTOCOL))
        self._idle.pickler = None
        buf, p = idle
        try:
            p.dump(obj)
            return buf.getvalue()
        finally:
            keep = buf.tell() <= _PICKLER_KEEP
            buf.seek(0)
            buf.truncate()
            p.clear_memo()
            if keep:
                self._idle.pickler = idle


_PICKLER_KEEP = 1 << 20             # a buffer grown past this is not kept
#: the journal's pickling with the stdlib's pickle (the default serializer's)
journal_dumps = JournalDumps()


def _journal_codec(serializer_name: str) -> tuple[Any, Any]:
    """(dumps, loads) of the journal of a manager with this serializer: a value
    the manager's serializer carries (a lambda, with cloudpickle) can be
    journaled too."""
    for name in ("cloudpickle", "dill"):
        if name in serializer_name:
            try:
                module = importlib.import_module(name)
            except ImportError:
                break
            return JournalDumps(module.Pickler), getattr(module, "loads", pickle.loads)
    return journal_dumps, pickle.loads


#: `call`'s reply for a call that returned None (the server sends it without
#: serializing anything)
RETURN_NONE = (Kind.RETURN, None)


class Applied(NamedTuple):
    """A call on a durable object run and staged (`DurableObjects.apply`),
    waiting for its commit: `reply` is its value serialized, or None."""
    entry: Entry
    oid: str
    meth: str
    done: journal.Done
    reply: tuple | None


def _parse_ident(ident: str | None) -> list | None:
    """`[pid, start, host]` from a stored client identity (None if unusable)."""
    try:
        pid, start, host = json.loads(ident) if ident is not None else (None, None, None)
    except (ValueError, TypeError):
        return None
    if type(pid) is not int or type(start) is not int or not isinstance(host, list):
        return None
    return [pid, start, host]


def durable_option(value: Any) -> str | bool | None:
    """What a `durable=` keyword means: False/None (not durable), True (the
    typeid's default mode) or a mode name; None for a value that is not a
    durability option (then the keyword belongs to the constructor)."""
    if value is True or value is False:
        return value
    if isinstance(value, str) and value in MODES:
        return value
    return None


class DurableObjects:
    """The durable objects of one server (see the module docstring)."""

    def __init__(self, server: Any, state_dir: str | None, fsync: str = "normal",
                 fresh: bool = True) -> None:
        self.server = server
        self.state_dir = state_dir
        self.fsync = fsync
        self.journal: journal.Journal | None = None
        self._private: str | None = None    # a directory of our own, removed at close
        self._mu = threading.Lock()
        #: clients that may hold an unnamed durable object: id -> [pid, start, local]
        self._holders: dict[str, list] = {}
        #: after a crash: those of the last server not yet back or known dead
        #: (None: unknown, so `@recovered` stays)
        self._pending: dict[str, list] | None = None
        self._recovered_at = 0.0
        self._told_waiting = False
        self._unknown = False       # a crash found no record: none is trusted again
        #: after a crash: clients of earlier servers with stored replies, not yet
        #: back, whose identity is known (client -> [pid, start, host]): see
        #: `_forget_dead_repliers`
        self._absent: dict[str, list] = {}
        self._holders_mu = threading.Lock()
        server.objects.watch(DURABLE_PREFIX + "~", self._first_hold)
        self._fresh = fresh
        if state_dir is not None and os.path.exists(os.path.join(state_dir, journal.FILENAME)):
            self._open()
            self._recover(fresh)
            if fresh:
                self._drop_unreferenced()   # (after _recover: its locals hold objects)
                self.journal.flush()        # (a crash before the next commit would keep them)

    # -- the journal ---------------------------------------------------------------
    def _open(self) -> journal.Journal:
        if self.journal is None:
            if self.state_dir is None:      # a server run by hand, without state_dir=
                self.state_dir = self._private = journal.private_state_dir()
            dumps, loads = _journal_codec(self.server.serializer.name)
            new = not os.path.exists(os.path.join(self.state_dir, journal.FILENAME))
            self.journal = journal.Journal(self.state_dir, self.server.authkey,
                                           fsync=self.fsync, dumps=dumps, loads=loads,
                                           identify=self._identify)
            if self._fresh or new:
                # the record of who may hold unnamed objects exists from the first
                # (a new journal has no earlier holders to leave out): a crash that
                # finds none trusts none again (see `_unknown`)
                with self._holders_mu:
                    self._save_holders()
        return self.journal

    def _factory(self, typeid: str, args: tuple, kwds: dict) -> Any:
        spec = self.server.registry.get(typeid)
        if spec is None or spec[0] is None:
            raise KeyError(f"typeid {typeid!r} is not registered with this manager (it "
                           "was when the object was made durable)")
        return spec[0](*args, **kwds)

    def _recover(self, fresh: bool) -> None:
        j = self._open()            # (fresh: it wrote a record that nobody holds any)
        if not fresh:
            self._pending = self._load_holders()
            self._holders = dict(self._pending or {})
            self._recovered_at = time.monotonic()
            # no record: who held what before is unknown, so it stays unknown (no file
            # is written again) until a fresh start; every crash keeps everything
            self._unknown = self._pending is None
        lost: list[tuple[str, Exception]] = []

        def tolerate(name: str, e: Exception) -> bool:
            # an earlier program's unnamed object that cannot be rebuilt (its type is
            # not registered any more, its class is gone) costs only that object
            if fresh and name.startswith("~"):
                lost.append((name, e))
                return True
            return False

        before = inprocess.begin_recovery(self.server)
        try:
            handles = j.recover(self._factory, tolerate)
        finally:
            rebuilt = inprocess.end_recovery(before)
        for name, h in handles.items():
            # an unnamed one from an earlier program (fresh) stays only while a
            # proxy stored in another object refers to it (see _hold_rebuilt)
            holders = [NAMED_HOLDER] if not name.startswith("~") else []
            holders.append(FRESH_HOLDER if fresh else RECOVERED_HOLDER)
            try:
                self._register(h, holders[0])
            except journal.JournalError as e:
                if not tolerate(name, e):       # (an unnamed one goes below)
                    self.server.note(str(e))
                continue
            for extra in holders[1:]:
                self.server.objects.incref(extra, DURABLE_PREFIX + name)
        for name, e in lost:
            j.drop(name)
            self.server.note(f"dropped unnamed durable object {name!r} of an earlier "
                             f"program: it cannot be rebuilt ({type(e).__name__}: {e})")
        if fresh:
            # no client of an earlier program re-sends a call to this one: their
            # stored replies go (each program left keep_replies rows per client)
            for client in j.clients():
                j.forget_client(client)
        else:
            for client in j.clients():
                ident = _parse_ident(j.client_ident(client))
                if ident is not None:
                    self._absent[client] = ident
        self._hold_rebuilt(rebuilt)
        if handles:
            self.server.note(f"recovered {len(handles)} durable object(s) from "
                             f"{j.path}")

    def _drop_unreferenced(self) -> None:
        """After a fresh start's recovery: the unnamed objects of the earlier
        program that no kept object refers to go.  The proxies stored in those
        give their references back as they go, so chains of them go too; for
        that this server must be the process's own meanwhile (it becomes so
        only when it serves)."""
        prev = inprocess.local_server()
        inprocess.set_local_server(self.server)
        try:
            dropped = self.server.objects.release_holder(FRESH_HOLDER)
        finally:
            inprocess.set_local_server(prev)
        if dropped:
            self.server.note(f"dropped {dropped} unnamed durable object(s) of an earlier "
                             "program that no kept one refers to")

    def _hold_rebuilt(self, rebuilt: list) -> None:
        """Proxies that recovered objects hold (a durable list of durable
        dicts, say) take their references now that every object is back; one
        whose object did not survive (it was not durable) refers to nothing.
        Garbage goes first: a proxy in a cycle left by the replay would take a
        reference here and give it back only once this process's server is
        set again, or never."""
        if not rebuilt:
            return
        gc.collect()
        lost = set()
        for ref in rebuilt:
            ident = getattr(ref(), "_id", None)     # no proxy kept in a local: see below
            if ident is None:
                continue
            try:
                self.server.local_incref(ident)
            except KeyError:
                lost.add(ident)
        # (a finalizer run by that collection may leave a cycle that holds this
        # frame, and with it the frame's last locals, until the next one: a
        # proxy kept here held its object for as long)
        if lost:
            self.server.note(f"{len(lost)} object(s) that recovered durable objects refer "
                             f"to are gone (they were not durable, so they did not outlive "
                             f"the server that held them): {sorted(lost)[:5]}")

    def _register(self, h: journal.Durable, holder: str) -> tuple:
        server = self.server
        spec = server.registry.get(h.typeid)
        if spec is None:
            raise journal.JournalError(
                f"durable object {h.name!r} is a {h.typeid!r}, which this manager does not "
                "register any more: register it again (it was skipped)")
        exposed, attrs, m2t = server.describe(h.typeid, spec, h.obj)
        lock = None if h.kind.immediate else threading.Lock()
        entry = Entry(h.obj, h.typeid, frozenset(exposed), m2t, lock, frozenset(attrs))
        entry.durable = h
        ident = server.objects.add(entry, holder, ident=DURABLE_PREFIX + h.name,
                                   on_drop=self._dropped)
        return ident, exposed, attrs

    def _dropped(self, entry: Entry) -> None:
        """The last reference to a durable object went: it leaves the journal."""
        h = entry.durable
        j = self.journal
        if j is None or h is None or h.dropped:
            return
        try:
            j.drop(h.name)
        except KeyError:
            pass

    # -- creating ------------------------------------------------------------------
    def create(self, holder: str, typeid: str, mode: str | bool, name: str | None,
               args: tuple, kwds: dict, unnamed: Any = None) -> tuple:
        """A new durable object, or the existing one called `name` (a new
        reference for `holder` either way): `(id, exposed, attributes)`.
        `unnamed`: the client's key for an object without a name; a second
        create with the same key (re-sent after a crash) gets the same object."""
        server = self.server
        spec = server.registry.get(typeid)
        if spec is None:
            raise KeyError(f"typeid {typeid!r} is not registered with this manager; "
                           f"registered: {sorted(server.registry)}")
        if spec[0] is None:
            raise ValueError(f"typeid {typeid!r} has no callable, so it cannot be durable")
        if mode is True:    # the typeid's own mode (register(durable=)), else its default
            mode = getattr(spec, "durable", None)
            mode = mode if isinstance(mode, str) else None
        if name is not None and (not isinstance(name, str) or not name or name[0] == "~"):
            raise ValueError(f"a durable object's name must be a non-empty str not starting "
                             f"with '~', not {name!r}")
        key = None
        if name is None and unnamed is not None:
            if not (isinstance(unnamed, str) and 0 < len(unnamed) <= 64
                    and all(ch in "0123456789abcdef" for ch in unnamed)):
                raise ValueError(f"the key of an unnamed durable object must be a short hex "
                                 f"str, not {unnamed!r:.80}")
            key = "~" + unnamed
        with self._mu:
            j = self._open()
            h = j.get(name if key is None else key) if name is not None or key else None
            if h is not None and key is not None:
                if h.typeid != typeid:
                    raise TypeError(f"the durable object with key {unnamed!r} is a "
                                    f"{h.typeid!r}, not a {typeid!r}")
                ident = DURABLE_PREFIX + key
                if ident not in server.objects.objects:     # its last holder let go already
                    got = self._register(h, holder)
                else:
                    server.objects.incref(holder, ident)
                    entry = server.objects.get(ident)
                    got = ident, tuple(entry.exposed), tuple(entry.attributes)
            elif h is not None:
                if h.typeid != typeid:
                    raise TypeError(f"the durable object named {name!r} is a {h.typeid!r}, "
                                    f"not a {typeid!r}")
                ident = DURABLE_PREFIX + name
                server.objects.incref(holder, ident)
                entry = server.objects.get(ident)
                got = ident, tuple(entry.exposed), tuple(entry.attributes)
            else:
                obj = spec[0](*args, **kwds)
                h = j.create(name if name is not None else key or "~" + secrets.token_hex(8),
                             typeid,
                             obj, args=args, kwds=kwds, mode=mode,
                             mutators=getattr(spec, "mutators", None))
                if name is not None:
                    got = self._register(h, NAMED_HOLDER)
                    server.objects.incref(holder, got[0])
                else:
                    got = self._register(h, holder)
        h.sync()        # the object exists for good before anyone hears of it
        return got

    # -- calls ---------------------------------------------------------------------
    def call(self, entry: Entry, info: Any, oid: str, meth: str, args: tuple,
             kwds: dict) -> tuple:
        """Run one call on a durable object: a reply `(kind, payload)` for the
        server to send, after the call's effect is committed."""
        server = self.server
        rid = info.call.rid
        request = f"{info.session}:{info.conn}:{rid}" if rid else None
        if meth == "#RETRY":    # (first connection, first request, method, args, kwds)
            try:
                conn, rid, meth, args, kwds = args
                request = f"{info.session}:{int(conn)}:{int(rid)}"
            except (TypeError, ValueError):
                return server.error_reply(TypeError(
                    f"a re-sent call on durable object {oid} must carry (connection, "
                    f"request, method, args, kwds), not {args!r:.80}"))
            if self._fresh:
                # a new program's manager keeps no replies of calls made to an
                # earlier one (see _recover): it cannot answer this one, and running
                # it could apply it twice
                return server.error_reply(RuntimeError(
                    f"{meth}() on durable object {oid} was sent again after its manager "
                    f"went away, but the manager at {server.address!r} (pid "
                    f"{os.getpid()}) started afresh on its state directory: it cannot "
                    "tell whether the call took effect before, so it did not run it "
                    "again. Look at the object's state before calling again (a "
                    "standalone manager run again for its clients, `python -m procshare "
                    "serve`, recovers instead)."))
        if meth not in entry.exposed and meth != "#UPDATE_ITEM":
            reply = server._slow_call(info, oid, meth, args, kwds, durable=False)
            try:
                self.sync(entry)    # what it read is committed before anyone sees it
            except journal.JournalError as e:
                return self._broken(e)
            return reply
        if meth in entry.attributes and not args and not kwds:
            # a read of exposed data (a property too): not a call, nothing to journal
            reply = server.read_attribute(entry, info, oid, meth)
            if reply is not None:
                try:
                    self.sync(entry)    # what it read is committed before anyone sees it
                except journal.JournalError as e:
                    return self._broken(e)
                return reply
        got = self.apply(entry, info, oid, meth, args, kwds, request)
        if type(got) is not Applied:
            return got
        try:
            self.journal.wait(got.done.ticket)
        except journal.JournalError as e:
            return self._broken(e)
        return self.finish(got, info)

    def apply(self, entry: Entry, info: Any, oid: str, meth: str, args: tuple, kwds: dict,
              request: str | None, wait: bool = True) -> Any:
        """The first half of `call` for an exposed method: run it under the
        object's lock and stage its effect; an `Applied` (reply with `finish`
        once `done.ticket` is committed), or a reply at once (it failed before
        anything was staged).  `wait=False` (the durable loop): None, having
        done nothing, if the object's lock is taken."""
        server = self.server
        lock = entry.lock
        held = False
        try:
            if lock is not None:
                held = lock.acquire(False)
                if not held:
                    if not wait:
                        return None
                    # (strict: a durable object's calls keep the journal's order)
                    lock = server._enter(entry, info, callctx.server_state.deadline, oid,
                                         meth, strict=True)
                    held = lock is not None
                if held:
                    entry.running = meth
                    entry.owner = threading.get_ident()
            try:
                done = entry.durable.call(meth, args, kwds, client=info.client, request=request)
            except journal.JournalError as e:
                return self._broken(e)
            except Exception as e:      # (reading a stored reply back, say): the call
                return server.error_reply(e)    # fails, never the connection
            reply = None
            if done.ok:
                m2t = entry.method_to_typeid
                if not (m2t and m2t.get(meth)) and done.value is not None:
                    try:    # serialized under the lock: a returned value cannot change
                        reply = (server.PACKED, server.serializer.dumps(done.value))
                    except Exception as e:
                        reply = server._unserializable(e, oid, meth, done.value)
        except callctx.DeadlineExpired as e:
            return (Kind.TIMEOUT, str(e))
        finally:
            if held:
                entry.running = None
                lock.release()
        return Applied(entry, oid, meth, done, reply)

    def finish(self, got: Applied, info: Any) -> tuple:
        """The second half of `call`, once `got.done.ticket` is committed: the
        reply `(kind, payload)`."""
        done, entry = got.done, got.entry
        if not done.ok:
            error = done.value
            if isinstance(error, callctx.DeadlineExpired):    # gave up, took nothing
                return (Kind.TIMEOUT, str(error))
            # an exposed method the object lacks: as a plain object's, a RemoteError
            missing = missing_method(error, entry.obj, entry.typeid, got.oid, got.meth)
            return self.server.error_reply(error) if missing is None else (Kind.ERROR, missing)
        m2t = entry.method_to_typeid
        if m2t and m2t.get(got.meth):
            return self.server._proxy_reply(info, m2t[got.meth], done.value)
        return RETURN_NONE if got.reply is None else got.reply

    def contended(self) -> bool:
        """Did the journal's last commit hold the calls of several writers?"""
        j = self.journal
        return j is not None and j.last_batch > 1

    def sync(self, entry: Entry) -> None:
        """Before a read of the whole object (`#GETVALUE`, repr): its last
        change is committed."""
        if self.journal is not None:
            entry.durable.sync()

    def _broken(self, e: BaseException) -> tuple:
        """The journal failed: memory may be ahead of the file.  A supervised
        manager exits so that its successor recovers from the file."""
        if isinstance(e, journal.JournalBroken) and self.server.supervised:
            self.server.note(f"the journal failed ({e}); the manager restarts to recover it")
            threading.Timer(0.05, os._exit, (70,)).start()
        else:
            self.server.note(f"a durable call failed in the journal: {e}")
        return self.server.error_reply(e)

    # -- clients -------------------------------------------------------------------
    def reattach(self, holder: str, held: list) -> list:
        """After a restart: `holder` has `n` proxies to each durable object of
        `held` (`[(id, n)]`); give it its references back.  Returns the ids
        that are not here."""
        missing = []
        for item in held:
            ident, n = item if isinstance(item, (tuple, list)) else (item, 1)
            if not isinstance(ident, str) or not ident.startswith(DURABLE_PREFIX):
                continue
            try:
                for _ in range(max(1, min(int(n), 1 << 20))):
                    self.server.objects.incref(holder, ident)
            except KeyError:
                missing.append(ident)
        with self._holders_mu:
            if self._pending is not None:
                self._pending.pop(holder, None)     # back: it holds what it holds
        return missing

    def forget_client(self, client: str) -> None:
        """`client` is gone for good: its stored replies go (if it has any), and
        it no longer counts as a holder."""
        if self.journal is not None and self.journal.has_replies(client):
            self.journal.forget_client(client)
        self.server.objects.unwatch(client)
        with self._holders_mu:
            if self._pending is not None:
                self._pending.pop(client, None)
            if self._holders.pop(client, None) is not None:
                self._save_holders()

    # -- the stored replies of clients that died while the manager was down ----------
    def _identify(self, client: str) -> str | None:
        """(the journal asks, at a client's first stored reply) Who `client`
        is, for a later server to tell whether it still runs: its pid, start
        time and host; None for a client on another host or pid namespace."""
        rec = self.server.leases.records.get(client)
        if rec is None or not rec.local or rec.pid <= 0:
            return None
        start = start_time(rec.pid)
        if start is None:
            return None
        return json.dumps([rec.pid, start, list(host_identity())])

    def _forget_dead_repliers(self) -> None:
        """(about once a second, after a crash) A client of an earlier server
        that has stored replies and never came back: once it is known dead
        (its pid is gone or is another process now, on this host and pid
        namespace), it can re-send nothing, so its replies go.  Without this
        they stayed in the journal for good (up to `keep_replies` rows each,
        their effects included), after every crash that a client did not
        outlive, and every run of `serve`.  One that is alive but silent, or
        elsewhere, keeps them: it may still re-send a call."""
        absent = self._absent
        if not absent:
            return
        host = list(host_identity())
        records = self.server.leases.records
        dead = []
        for client, (pid, start, where) in list(absent.items()):
            if client in records or where != host:
                del absent[client]      # it came back (its lease forgets it), or elsewhere
            elif is_other_process(pid, start):
                del absent[client]
                dead.append(client)
        for client in dead:
            self.forget_client(client)
        if dead:
            self.server.note(f"forgot the stored replies of {len(dead)} client(s) of an "
                             "earlier server that died while it was down (they can re-send "
                             "nothing)")

    # -- who may hold an unnamed durable object, across a crash -------------------
    def _first_hold(self, client: str) -> None:
        """(under the registry's mutex, before the reference counts) `client`
        takes its first reference to an unnamed durable object: record it."""
        rec = self.server.leases.records.get(client)
        pid = rec.pid if rec is not None else None
        local = bool(rec is not None and rec.local)
        start = start_time(pid) if local and pid else None
        with self._holders_mu:
            self._holders[client] = [pid, start, local]
            self._save_holders()

    def _holders_path(self) -> str | None:
        return None if self.state_dir is None else os.path.join(self.state_dir, HOLDERS_FILE)

    @staticmethod
    def _holders_mac(j: journal.Journal, body: bytes) -> str:
        return j._mac(b"holders\0" + body).hex()

    def _save_holders(self) -> None:
        """Replace the file whole (with `_holders_mu` held).  If it cannot be
        written, none is left: after a crash `@recovered` then stays."""
        path = self._holders_path()
        j = self.journal            # (once: a clean shutdown may close it meanwhile)
        if path is None or j is None:       # (closed: a late lease end)
            return
        if self._unknown:
            return
        body = json.dumps(self._holders, sort_keys=True).encode()
        try:
            replace_file(path, json.dumps({"clients": body.decode(),
                                           "mac": self._holders_mac(j, body)}).encode())
        except (OSError, journal.JournalError) as e:
            log.warning("could not record the holders of unnamed durable objects in %s "
                        "(%s): after a crash of this manager, every unnamed durable object "
                        "stays until the program ends, even those only dead clients held (a "
                        "standalone `serve` keeps them across its runs). "
                        "Free space or fix the permissions there.", path, e)
            try:                        # none left: a crash then keeps everything
                os.unlink(path)
            except OSError:
                pass

    def _load_holders(self) -> dict[str, list] | None:
        path = self._holders_path()
        try:
            with open(path, "rb") as f:        # type: ignore[arg-type]
                doc = json.loads(f.read())
            body = doc["clients"].encode()
            if not hmac.compare_digest(doc["mac"], self._holders_mac(self._open(), body)):
                raise ValueError("its HMAC does not match")
            got = json.loads(body)
            if not isinstance(got, dict) or not all(
                    isinstance(v, list) and len(v) == 3 for v in got.values()):
                raise ValueError("not a table of clients")
            return {str(c): list(v) for c, v in got.items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.server.note(f"the record of the clients that held unnamed durable objects "
                             f"({path}) is unreadable ({e}): the objects recovered now "
                             "stay until the program ends (a standalone `serve` keeps them "
                             "across its runs)")
            return None

    def settle_recovered(self) -> None:
        """(about once a second) After a crash: drop the clients of the last
        server that are dead now; once none is left and `loan_ttl` has passed,
        `@recovered` lets go, and what only it held goes."""
        if self._absent:
            try:
                self._forget_dead_repliers()
            except Exception:   # this runs in the server's main loop: never end it
                log.warning("forgetting the replies of dead clients failed", exc_info=True)
        pending = self._pending
        if pending is None:
            return
        try:
            dead = []
            with self._holders_mu:
                for client, (pid, start, local) in list(pending.items()):
                    if local and pid and start is not None and is_other_process(pid, start):
                        dead.append(client)
                        del pending[client]
                        self._holders.pop(client, None)
                if dead:
                    self._save_holders()
                if time.monotonic() - self._recovered_at < self.server.loan_ttl:
                    return
                if pending:
                    if not self._told_waiting:
                        self._told_waiting = True
                        pids = sorted(str(v[0]) for v in pending.values())
                        self.server.note(
                            f"{len(pending)} client(s) of the crashed server (pid "
                            f"{', '.join(pids[:5])}) are not back and not known dead: the "
                            "durable objects recovered stay until they are (or until the "
                            "program ends)")
                    return
                self._pending = None
            freed = self.server.objects.release_holder(RECOVERED_HOLDER)
            self.server.note(f"every client of the crashed server is back or gone: released "
                             f"{freed} recovered durable object(s) that nobody holds")
        except Exception:       # this runs in the server's main loop: never end it
            log.warning("settling the recovered durable objects failed", exc_info=True)

    def close(self) -> None:
        """At a clean shutdown: commit and close the journal (a private
        directory goes with it)."""
        j, self.journal = self.journal, None
        if j is not None:
            try:
                j.close()
            except Exception as e:
                log.warning("closing the journal failed: %r", e)
        if self._private is not None:
            journal.remove_private_state_dir(self._private)
