"""Lock table: who holds and who waits for the manager's locks; deadlocks; dead owners.

Owns: `LockTable`, one per server: the wait-for graph over the manager-hosted
Lock, RLock, Semaphore, BoundedSemaphore and Condition locks
(`begin_wait`/`end_wait`), the clients that are gone (`client_gone`), the text
of `DeadlockError`,
`OwnerDiedWarning` and the BrokenBarrierError of a dead party, and the
`manager.locks()` snapshot.  Holders themselves live in each primitive
(`primitives._Acquirer.owners`), under the primitive's own mutex.

Rules it keeps:
- The hot path never comes here: an uncontended acquire or release touches
  only its primitive.  The table is entered when an acquire must wait, when a
  lock is released by a thread that did not take it, when a client goes away,
  and for introspection.
- Lock order: a primitive's mutex first, then the table's `mutex`; never the
  reverse.
- A primitive belongs to the table of the server that created it
  (`current_table()` while that server runs a call).
- A thread is `(client id, thread ident)`; a client is one process.
- A deadlock is reported only where the stdlib would hang forever: every wait
  in it has no timeout (a call deadline does not count: hitting it is an error
  too), every lock in it can be released only by its holders, and no holder
  can make progress (for a semaphore: *every* holder is stuck).  A lock whose
  waiter holds it itself, a Lock or Semaphore ever released by a thread that
  did not take it, and a Semaphore that started at 0 are signals, not
  mutexes: their waits never count.
- Only the acquire that closes the cycle is refused, atomically with the
  check, so exactly one thread of a cycle gets DeadlockError.
- A client is gone once `client_gone` ran and it has no control connection:
  a server thread still acting for it gives up instead of taking a lock.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from ..errors import DeadlockError
from .callctx import server_state

__all__ = ["Wait", "LockTable", "current_table", "holder_info", "waiter_info", "snapshot"]

log = logging.getLogger("procshare.locktable")

Owner = tuple  # (client id, thread ident)


class Wait:
    """One thread waiting for one primitive."""

    __slots__ = ("key", "who", "prim", "since", "timed", "what")

    def __init__(self, key: Owner, who: Any, prim: Any, timed: bool, what: str = "acquire"):
        self.key = key
        self.who = who          # callctx.Caller
        self.prim = prim
        self.since = time.monotonic()
        self.timed = timed      # the wait has its own timeout (it ends by itself)
        self.what = what        # "acquire", "notify" (Condition.wait) or "barrier"




# -- clients that go away --------------------------------------------------------------




# -- the wait-for graph ---------------------------------------------------------------------




def _holders_waited_on(key: Owner, prim: Any) -> list | None:
    """The holders that `key`, waiting for `prim`, depends on; None if its wait
    may end without any of them (so `key` counts as able to progress)."""
    if not prim._strict or prim._value > 0:
        return None
    holders = [k for k, n in dict(prim.owners).items() if n > 0]
    if not holders or key in holders:
        return None
    return holders




def _describe(key: Owner, who: Any) -> str:
    if who is None:
        return f"client {key[0]} thread {key[1]}"
    return f"pid {who.pid} thread {who.thread_name!r}"






# -- names and messages ------------------------------------------------------------------





class LockTable:
    """The locks of one server: who waits for what, and which clients are gone."""

    def __init__(self, server: Any = None) -> None:
        self.server = server     # for names of objects and live connections (or None)
        #: guards `waiting` and the strictness of locks; taken after a primitive's mutex
        self.mutex = threading.Lock()
        #: True once any client of this server has exited or died (a cheap guard
        #: before asking `is_gone` on the hot path)
        self.dead = False
        #: client id -> how it went ("exited" or "died"), for a table without a
        #: server (a server's leases know it)
        self._gone: dict[str, str] = {}
        #: thread -> what it is waiting to acquire
        self.waiting: dict[Owner, Wait] = {}
        self._tracked: weakref.WeakSet = weakref.WeakSet()
        self._tracked_mutex = threading.Lock()

    def track(self, obj: Any) -> None:
        """Have `obj._client_gone(client, pid)` called when a client goes away."""
        with self._tracked_mutex:
            self._tracked.add(obj)

    def client_gone(self, client: str, pid: int, how: str = "died") -> int:
        """`client` (process `pid`) exited or died (`how`): wake what it waits
        for (its waits give up), and let acquirers take over what it holds.
        Returns how many primitives it held or waited in."""
        self.dead = True
        leases = getattr(self.server, "leases", None)
        if leases is None:
            self._gone[client] = how
        with self._tracked_mutex:
            objs = list(self._tracked)
        n = 0
        for obj in objs:
            try:
                n += obj._client_gone(client, pid, how) or 0
            except Exception:  # one broken primitive must not stop the others
                log.exception("releasing %r for gone client pid %s failed", obj, pid)
        return n

    def is_gone(self, client: str) -> bool:
        """True if `client` exited or died and has not come back."""
        leases = getattr(self.server, "leases", None)
        if leases is not None:
            return leases.is_gone(client)
        return client in self._gone

    def how_gone(self, client: str) -> str:
        leases = getattr(self.server, "leases", None)
        how = leases.how_gone(client) if leases is not None else self._gone.get(client)
        return "exited" if how == "exited" else "died"

    def begin_wait(self, key: Owner, who: Any, prim: Any, timed: bool) -> Wait:
        """Record that `key` starts waiting for `prim` (the caller holds prim's mutex).

        Raises DeadlockError instead, changing nothing, if this untimed wait
        could never end."""
        w = Wait(key, who, prim, timed)
        with self.mutex:
            if not timed:
                stuck = self._find_deadlock(key, prim)
                if stuck is not None:
                    raise self._deadlock_error(key, who, prim, stuck)
            self.waiting[key] = w    # newest first: an older call of this thread was abandoned
        return w

    def end_wait(self, w: Wait) -> None:
        with self.mutex:
            if self.waiting.get(w.key) is w:
                del self.waiting[w.key]

    def _find_deadlock(self, me: Owner, prim: Any) -> dict | None:
        """If `me` waiting for `prim` can never proceed, return the stuck threads
        as {thread: (lock it waits for, holders of that lock)}; else None.

        Holt's graph reduction for single-request, multi-unit resources: a thread
        can progress if it waits for nothing (or for a signal, or with a timeout),
        or if some holder of what it waits for can progress."""
        first = _holders_waited_on(me, prim)
        if first is None:
            return None
        deps: dict[Owner, tuple] = {me: (prim, first)}
        free: set[Owner] = set()
        stack = list(first)
        while stack:
            k = stack.pop()
            if k in deps or k in free:
                continue
            w = self.waiting.get(k)
            if w is None or w.timed or (self.dead and self.is_gone(k[0])):
                free.add(k)
                continue
            hs = _holders_waited_on(k, w.prim)
            if hs is None:
                free.add(k)
                continue
            deps[k] = (w.prim, hs)
            stack.extend(hs)
        changed = True
        while changed and me in deps:
            changed = False
            for k, (_p, hs) in list(deps.items()):
                if any(h in free for h in hs):
                    free.add(k)
                    del deps[k]
                    changed = True
        return deps if me in deps else None

    def _who(self, key: Owner, prim: Any, me: Owner, my_who: Any) -> Any:
        if key == me:
            return my_who
        w = self.waiting.get(key)
        if w is not None:
            return w.who
        got = prim.since.get(key)
        return got[0] if got else None

    def _deadlock_error(self, me: Owner, who: Any, prim: Any, stuck: dict) -> DeadlockError:
        now = time.monotonic()
        order: list[Owner] = []     # breadth first from `me`, each stuck thread once
        queue = [me]
        while queue:
            k = queue.pop(0)
            if k not in order and k in stuck:
                order.append(k)
                queue.extend(stuck[k][1])
        lines, cycle = [], []
        for k in order:
            lock, hs = stuck[k]
            kwho = self._who(k, lock, me, who)
            held, held_by = [], []
            for h in hs:
                hwho = self._who(h, lock, me, who)
                n = lock.owners.get(h, 0)
                held.append(_describe(h, hwho) + (f" ({n} times)" if n > 1 else ""))
                held_by.append({"pid": getattr(hwho, "pid", None),
                                "thread_name": getattr(hwho, "thread_name", None), "count": n})
            cycle.append({"pid": getattr(kwho, "pid", None),
                          "thread_name": getattr(kwho, "thread_name", None),
                          "waits_for": self.lock_name(lock), "held_by": held_by})
            if k == me:
                since = " (this call)"
            else:
                w = self.waiting.get(k)
                since = f" (waiting for {now - w.since:.2f} s)" if w is not None else ""
            lines.append(f"  {_describe(k, kwho)}{since} waits for {self.lock_name(lock)}, "
                         f"held by {' and '.join(held)}")
        text = (
            f"acquiring {self.lock_name(prim)} would deadlock: {_describe(me, who)} would wait "
            f"forever, closing a cycle of {len(order)} threads that each wait for a lock "
            "another one holds:\n"
            + "\n".join(lines)
            + f"\n  ...and round again to {_describe(me, who)}.\n"
            "The manager refused this acquire, and nothing else changed: this thread did not "
            "get the lock and still holds what it held; the other threads keep waiting and "
            "go on once this one releases its locks. To fix it, acquire these locks in one "
            "consistent order in every process and thread, or acquire with a timeout "
            "(acquire(timeout=...)) and back off (release, then retry) when it fails."
        )
        return DeadlockError(text, lock=self.lock_name(prim), cycle=cycle)

    def lock_name(self, prim: Any) -> str:
        """How messages name a primitive: its typeid and id in the manager."""
        name = getattr(prim, "_ps_name", None)
        if name:
            return name
        srv = self.server
        found = via = None
        if srv is not None:
            for ident, entry in list(srv.objects.objects.items()):
                obj = entry.obj
                if obj is prim:
                    found = f"{entry.typeid} {ident}"
                    break
                if via is None and getattr(type(obj), "_procshare_lock_info", None) is not None \
                        and obj.__dict__.get("_lock") is prim:
                    via = f"the lock of {entry.typeid} {ident}"
        name = found or via
        if name is None:
            return f"{type(prim).__name__} at {id(prim):#x}"
        try:
            prim._ps_name = name
        except AttributeError:
            pass
        return name

    def owner_died_message(self, prim: Any, died: dict) -> str:
        threads = ", ".join(repr(t) for t in died["threads"]) or "?"
        count = died["count"]
        if getattr(prim, "_reentrant", False):
            held = f"held it (recursion count {count})"
        elif getattr(prim, "_lock_style", True):
            held = "held it"
        else:
            held = f"held {count} permit{'s' if count != 1 else ''} of it"
        if died["how"] == "exited":
            end = "exited without releasing it"
        else:
            end = "died (killed, crashed, or lost without a goodbye)"
        return (
            f"{self.lock_name(prim)} was taken over from an owner that is gone: pid "
            f"{died['pid']} (thread {threads}) {held} and its process {end}, so this "
            "acquire would have waited forever. The data this lock protects may be "
            "half-updated: check and repair it before relying on it (like EOWNERDEAD "
            "from a robust mutex). To hand a lock over on purpose, release it from the "
            "other process instead of acquiring it.")

    def barrier_broken_message(self, barrier: Any, died: dict) -> str:
        return (
            f"{self.lock_name(barrier)} is broken: pid {died['pid']}, one of its parties, "
            "died while waiting at it, so the barrier can never fill up. The work of that "
            "party's round may be missing; call reset() (with a replacement party) to use "
            "it again.")


_default = LockTable()


def current_table() -> LockTable:
    """The table of the server running the current call (a process-wide one
    for primitives made outside a server)."""
    return getattr(server_state, "locks", None) or _default



# -- introspection -----------------------------------------------------------------------
def holder_info(key: Owner, who: Any, since: float, count: int, now: float,
                wall: float) -> dict:
    return {"client": key[0], "pid": getattr(who, "pid", None), "thread": key[1],
            "thread_name": getattr(who, "thread_name", None), "count": count,
            "since": round(wall - (now - since), 6), "held_for": round(now - since, 6)}


def waiter_info(w: Wait, now: float, wall: float) -> dict:
    return {"client": w.key[0], "pid": getattr(w.who, "pid", None), "thread": w.key[1],
            "thread_name": getattr(w.who, "thread_name", None), "for": w.what,
            "timed": w.timed, "since": round(wall - (now - w.since), 6),
            "waited": round(now - w.since, 6)}


def snapshot(registry: Any) -> list[dict]:
    """One JSON-friendly dict per lock-like object in `registry`."""
    out = []
    for ident, entry in sorted(list(registry.objects.items())):
        obj = entry.obj
        info = getattr(type(obj), "_procshare_lock_info", None)
        if info is None:
            continue
        d = {"id": ident, "typeid": entry.typeid}
        d.update(info(obj))
        out.append(d)
    return out
