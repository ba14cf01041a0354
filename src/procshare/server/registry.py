"""Registry: the manager's shared objects, who holds references to them, and loans.

Owns: the one place where references are counted.  Every reference belongs to
a *holder*: a client (one per process, named by its client id), the server
itself (for proxies rebuilt inside the manager), or a *loan* (a reference in
transit inside a pickled proxy or a forked child, waiting to be adopted).

Rules it keeps:
- An object lives while its total count is above zero; counts per holder are
  kept so that a holder that goes away (a dead client, an expired loan) can be
  released in one step.
- An object added again while it lives here (`add_or_share`: the same
  object, by identity, under the same typeid) is one entry with one more
  reference, as the stdlib's ids (`id(obj)`) make it: one id, one serial lock.
- Adopting a loan moves its reference to the adopter atomically, so a proxy
  handed to another process stays valid even if the sender drops its own proxy
  at once.
- Objects are dropped outside the mutex: dropping one may release nested
  proxies, which come back here.  So do the drop hooks (`add(on_drop=)`,
  how a durable object leaves the journal).
- `watch(prefix, fn)`: `fn(client)` runs, under the mutex and before the
  reference is counted, the first time a client (not `@...`, not a loan)
  takes a reference to an object whose id starts with `prefix` (how the
  durable objects record who may hold one across a crash); `unwatch(client)`
  forgets it.
- The stdlib's counts (`number_of_objects`, `debug_info`) leave out the
  references of proxies inside the manager, as the stdlib's do: an object
  held only by such proxies (a managed list inside another, or inside
  itself) is not counted, though it lives here while they do.  A managed
  container holding a proxy to itself is never dropped (no cycle collection
  across objects: the stdlib keeps it too).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from typing import Any

__all__ = ["Entry", "Registry", "SERVER_HOLDER", "NoSuchObject"]

log = logging.getLogger("procshare.server")

SERVER_HOLDER = "@server"
LOAN_PREFIX = "loan:"


class NoSuchObject(KeyError):
    """The id names no live object in this manager."""


class Entry:
    """One shared object and how it may be called.  (Not a dataclass: see
    `wire.frames.Limits`.)"""

    def __init__(self, obj: Any, typeid: str, exposed: frozenset,
                 method_to_typeid: dict | None, lock: threading.Lock | None,
                 attributes: frozenset = frozenset(), created: float | None = None,
                 running: str | None = None, owner: int = 0, durable: Any = None) -> None:
        self.obj = obj
        self.typeid = typeid
        self.exposed = exposed
        self.method_to_typeid = method_to_typeid
        self.lock = lock                # held while a method runs (serial objects)
        self.attributes = attributes    # exposed names that are data, not methods
        self.created = time.time() if created is None else created
        #: the method holding `lock` now (serial objects); with turns (see
        #: `patience`), the oldest call still running
        self.running = running
        self.owner = owner              # the server thread that runs it
        self.durable = durable          # its journal handle (`durables`), if durable
        #: how long a call waits for `lock` before it runs beside the call that
        #: holds it (serial by default: `server.SERIAL_PATIENCE`); None: until
        #: the call's deadline
        self.patience: float | None = None
        #: how many calls took the current `lock` (written by its holder only): a
        #: waiter starts a new turn only if the same call held it all along
        self.calls = 0
        #: the holder of `lock` lets no new turn start beside it (update_item, a
        #: copy of the whole object)
        self.exclusive = False

    def __repr__(self) -> str:
        return (f"Entry(typeid={self.typeid!r}, obj={type(self.obj).__name__}, "
                f"serial={self.lock is not None}, running={self.running!r}, "
                f"durable={self.durable is not None})")


class _Hook:
    """`hook(entry)`, to run once the mutex is released (`Registry.add`'s
    `on_drop`)."""
    __slots__ = ("hook", "entry")

    def __init__(self, hook: Any, entry: Any) -> None:
        self.hook, self.entry = hook, entry


def _let_go(dropped: list) -> int:
    """Outside the mutex: run the drop hooks and let the dropped objects go;
    returns how many objects were dropped."""
    count = 0
    for item in dropped:
        if type(item) is _Hook:
            try:
                item.hook(item.entry)
            except Exception:
                log.warning("a drop hook failed", exc_info=True)
        else:
            count += 1
    dropped.clear()
    return count


class Registry:
    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.objects: dict[str, Entry] = {}
        self.refcount: dict[str, int] = {}
        self.holders: dict[str, dict[str, int]] = {}
        self.loan_expiry: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(2)
        self.on_drop: dict[str, Any] = {}     # id -> called when its last reference goes
        self._watch: tuple[str, Any] | None = None  # (id prefix, fn(client))
        self._watched: set[str] = set()             # clients fn was called for
        #: id(obj) -> the id of its entry, for objects added with `add_or_share`
        self._by_obj: dict[int, str] = {}

    def watch(self, prefix: str, fn: Any) -> None:
        with self.mutex:
            self._watch = (prefix, fn)

    def unwatch(self, client: str) -> None:
        with self.mutex:
            self._watched.discard(client)

    # -- objects -------------------------------------------------------------
    def add(self, entry: Entry, holder: str, ident: str | None = None,
            on_drop: Any = None) -> str:
        """Store a new object with one reference owned by `holder`; return its id
        (`ident`, if given: a durable object's lasting id).  `on_drop(entry)` is
        called, outside the mutex, when its last reference goes."""
        with self.mutex:
            if ident is None:
                ident = f"{self._prefix}{next(self._ids):x}"
            elif ident in self.objects:
                raise ValueError(f"object id {ident!r} is taken")
            if on_drop is not None:
                self.on_drop[ident] = on_drop
            self.objects[ident] = entry
            self.refcount[ident] = 0
            self._incref(holder, ident)
        return ident

    def add_or_share(self, entry: Entry, holder: str) -> tuple[str, Entry]:
        """`add`, unless the same object (identity) lives here already under
        the same typeid: then `holder` takes one more reference to that entry
        (as the stdlib names objects by `id()`: a callable that returns one
        object each time gives one object, one id, one serial lock).  Returns
        the id and the entry used."""
        key = id(entry.obj)
        with self.mutex:
            ident = self._by_obj.get(key)
            if ident is not None:
                have = self.objects.get(ident)
                if have is not None and have.obj is entry.obj and have.typeid == entry.typeid:
                    self._incref(holder, ident)
                    return ident, have
            ident = self.add(entry, holder)
            self._by_obj.setdefault(key, ident)
            return ident, entry

    def get(self, ident: str) -> Entry:
        try:
            return self.objects[ident]
        except KeyError:
            raise NoSuchObject(ident) from None

    def __len__(self) -> int:
        return len(self.refcount)

    # -- counting ------------------------------------------------------------
    def _incref(self, holder: str, ident: str, n: int = 1) -> None:
        if ident not in self.refcount:
            raise NoSuchObject(ident)
        watch = self._watch
        if (watch is not None and holder not in self._watched and ident.startswith(watch[0])
                and not holder.startswith(("@", LOAN_PREFIX))):
            watch[1](holder)        # first: if it raises, nothing is counted
            self._watched.add(holder)
        self.refcount[ident] += n
        held = self.holders.setdefault(holder, {})
        held[ident] = held.get(ident, 0) + n

    def _decref(self, holder: str, ident: str, n: int, dropped: list) -> None:
        held = self.holders.get(holder)
        have = held.get(ident, 0) if held else 0
        if have <= 0 or ident not in self.refcount:
            return  # nothing held: a duplicate or late decref is harmless
        n = min(n, have)
        if have == n:
            del held[ident]
            if not held:
                del self.holders[holder]
        else:
            held[ident] = have - n
        left = self.refcount[ident] - n
        if left > 0:
            self.refcount[ident] = left
        else:
            del self.refcount[ident]
            entry = self.objects.pop(ident, None)
            if entry is not None and self._by_obj.get(id(entry.obj)) == ident:
                del self._by_obj[id(entry.obj)]
            dropped.append(entry)
            hook = self.on_drop.pop(ident, None)
            if hook is not None:
                dropped.append(_Hook(hook, entry))

    def incref(self, holder: str, ident: str) -> None:
        with self.mutex:
            self._incref(holder, ident)

    def decref(self, holder: str, ident: str) -> None:
        dropped: list = []
        with self.mutex:
            self._decref(holder, ident, 1, dropped)
        _let_go(dropped)  # drop the objects outside the mutex

    def release_holder(self, holder: str) -> int:
        """Drop every reference `holder` has; return how many objects died."""
        dropped: list = []
        with self.mutex:
            for ident, n in list(self.holders.get(holder, {}).items()):
                self._decref(holder, ident, n, dropped)
            self.loan_expiry.pop(holder, None)
        return _let_go(dropped)

    def held_by(self, holder: str) -> dict[str, int]:
        with self.mutex:
            return dict(self.holders.get(holder, {}))

    # -- loans ---------------------------------------------------------------
    def loan(self, holder: str, ident: str, ttl: float) -> str:
        """Take a reference to `ident` for a proxy in transit; return the loan id.
        (`holder` is recorded only for introspection.)"""
        loan = f"{LOAN_PREFIX}{secrets.token_hex(8)}"
        with self.mutex:
            self._incref(loan, ident)
            self.loan_expiry[loan] = time.monotonic() + ttl
        return loan

    def fork_loan(self, holder: str, ttl: float) -> str | None:
        """Copy every reference of `holder` into a loan for a forked child."""
        with self.mutex:
            held = self.holders.get(holder)
            if not held:
                return None
            loan = f"{LOAN_PREFIX}{secrets.token_hex(8)}"
            for ident, n in held.items():
                self._incref(loan, ident, n)
            self.loan_expiry[loan] = time.monotonic() + ttl
        return loan

    def adopt(self, holder: str, loan: str, ident: str | None = None) -> bool:
        """Move a loan's references (or just its reference to `ident`) to `holder`.

        Returns False if the loan is gone (adopted already, or expired); then,
        when `ident` is given, a plain incref is attempted instead.
        """
        dropped: list = []
        with self.mutex:
            held = self.holders.get(loan)
            if held is None or (ident is not None and ident not in held):
                if ident is not None:
                    self._incref(holder, ident)
                return False
            items = [(ident, 1)] if ident is not None else list(held.items())
            for oid, n in items:
                self._incref(holder, oid, n)
                self._decref(loan, oid, n, dropped)
            if loan not in self.holders:
                self.loan_expiry.pop(loan, None)
        _let_go(dropped)
        return True

    def expire_loans(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self.mutex:
            expired = [loan for loan, t in self.loan_expiry.items() if t <= now]
        return sum(self.release_holder(loan) for loan in expired)

    # -- introspection ---------------------------------------------------------
    def _held_outside(self) -> dict[str, int]:
        """(mutex held) Each object something other than the manager's own
        proxies holds, with the references of those others: the stdlib's
        counts, where a proxy rebuilt inside the manager takes none
        (`manager_owned`).  An object only such proxies hold (kept by a
        container that holds it, or by itself) is not counted."""
        inside = self.holders.get(SERVER_HOLDER, {})
        out = {}
        for ident, n in self.refcount.items():
            n -= inside.get(ident, 0)
            if n > 0:
                out[ident] = n
        return out

    def number_of_objects(self) -> int:
        """The stdlib's `_number_of_objects()`: see `_held_outside`."""
        with self.mutex:
            return len(self._held_outside())

    def debug_info(self) -> str:
        """The stdlib's `_debug_info()`: the objects `number_of_objects` counts."""
        with self.mutex:
            lines = []
            held = self._held_outside()
            for ident in sorted(held):
                entry = self.objects.get(ident)
                lines.append("  %s:       refcount=%s\n    %s" % (
                    ident, held[ident], str(entry.obj if entry else None)[:75]))
            return "\n".join(lines)

    def snapshot(self) -> list[dict]:
        """Every object with its type and its holders, for `manager.objects()`."""
        with self.mutex:
            out = []
            for ident, count in self.refcount.items():
                entry = self.objects[ident]
                holders = {h: held[ident] for h, held in self.holders.items() if ident in held}
                out.append({"id": ident, "typeid": entry.typeid, "refcount": count,
                            "holders": holders, "serial": entry.lock is not None})
            return out
