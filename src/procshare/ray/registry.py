"""Registry actor: reference counts of a Ray manager's objects, and their end.

Every object of a Ray manager lives in a detached actor, which Ray would keep
forever.  The registry (one named actor per manager namespace) counts the
references to each object per holder, as the local manager's registry does,
and kills an object's actor when its last reference is gone.

Owns: holders and counts, loans (references in transit inside a pickled
proxy), the clients it has heard from, which objects were released, and the
end of everything: at `shutdown()`, and when the job that started the manager
is dead (no orphans, as a local manager exits with its parent).

Rules it keeps:
- An object lives while its count is above zero; an actor lives while one of
  its objects (the root or a sub-object such as an iterator) does.  Then it is
  killed with `ray.kill`, its snapshot file (durable objects) removed, and the
  references that its own process held are released in turn.
- Adopting a loan moves its reference to the adopter in one step, so a proxy
  in transit keeps its object alive; a loan nobody adopts expires after
  `LOAN_TTL`.
- A client that said goodbye, whose Ray job is dead, or (a user's actor
  holding proxies) whose actor is dead, holds nothing any more.  Host actors
  are clients too, but they are ended only with their actor, never because
  the job that created them ended.
- It is a sync actor with one call at a time, so the calls of one process
  arrive in the order it sent them (an `add` before any `decref` of the same
  object); the reaper thread takes the same mutex.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import threading
import time
from typing import Any

import ray

from .durable import remove_file

__all__ = ["Registry", "LOAN_TTL", "REAP_INTERVAL"]

log = logging.getLogger("procshare.ray.registry")

LOAN_TTL = 600.0
REAP_INTERVAL = 2.0
_RELEASED_KEEP = 4096


class _Ref:
    __slots__ = ("typeid", "actor", "exposed", "holders", "count", "durable", "serial")

    def __init__(self, typeid: str, actor: str, exposed: tuple, durable: bool,
                 serial: bool) -> None:
        self.typeid, self.actor, self.exposed = typeid, actor, exposed
        self.durable, self.serial = durable, serial
        self.holders: dict[str, int] = {}
        self.count = 0


class _Actor:
    __slots__ = ("handle", "live", "client", "state_file", "root")

    def __init__(self, handle: Any, root: str, client: str | None,
                 state_file: str | None) -> None:
        self.handle, self.root, self.client, self.state_file = handle, root, client, state_file
        self.live: set[str] = set()


class Registry:
    """One manager's reference counts (a detached, named Ray actor)."""

    def __init__(self, address: str, owner_job: str | None, connect_digest: bytes,
                 reap_interval: float = REAP_INTERVAL) -> None:
        self.address = address
        self.owner_job = owner_job
        self.connect_digest = connect_digest
        self.mutex = threading.RLock()
        self.objects: dict[str, _Ref] = {}
        self.actors: dict[str, _Actor] = {}
        self.loans: dict[str, tuple[str, float]] = {}
        self.clients: dict[str, dict] = {}
        self.released: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.closed = False
        self._stop = threading.Event()
        if reap_interval:
            threading.Thread(target=self._reaper, args=(reap_interval,), daemon=True,
                             name="procshare-reaper").start()

    # -- clients ------------------------------------------------------------------------
    def ping(self) -> int:
        return os.getpid()

    def check_auth(self, digest: bytes) -> bool:
        return hmac.compare_digest(bytes(digest), self.connect_digest)

    def hello(self, client: str, info: dict) -> None:
        with self.mutex:
            self.clients.setdefault(client, dict(info, since=time.time()))

    def goodbye(self, client: str) -> None:
        """`client` exits (or is gone): release every reference it holds."""
        with self.mutex:
            self.clients.pop(client, None)
            held = [(oid, ref.holders[client]) for oid, ref in self.objects.items()
                    if client in ref.holders]
            for oid, n in held:
                self._drop(client, oid, n)

    # -- objects ---------------------------------------------------------------------------
    def add(self, oid: str, typeid: str, exposed: tuple, holder: str, actor: str,
            handle: Any, host_client: str | None, state_file: str | None,
            durable: bool = False, serial: bool = True) -> None:
        with self.mutex:
            self.actors[actor] = _Actor(handle, oid, host_client, state_file)
            if host_client:
                info = self.clients.setdefault(host_client, {"since": time.time()})
                info.update(hosting=True, actor=actor)
            self._add(oid, typeid, exposed, holder, actor, durable, serial)

    def add_sub(self, oid: str, typeid: str, exposed: tuple, holder: str) -> None:
        """A method_to_typeid result, hosted by its parent's actor."""
        with self.mutex:
            actor = "procshare:" + oid.partition("/")[0]
            if actor not in self.actors:
                raise KeyError(f"no actor {actor!r} for sub-object {oid!r}")
            root = self.objects.get(self.actors[actor].root)
            self._add(oid, typeid, exposed, holder, actor, False,
                      root.serial if root is not None else True)

    def _add(self, oid: str, typeid: str, exposed: tuple, holder: str, actor: str,
             durable: bool, serial: bool) -> None:
        ref = self.objects[oid] = _Ref(typeid, actor, tuple(exposed), durable, serial)
        self.actors[actor].live.add(oid)
        ref.holders[holder] = 1
        ref.count = 1

    def incref(self, holder: str, oid: str) -> bool:
        with self.mutex:
            ref = self.objects.get(oid)
            if ref is None:
                raise KeyError(self._gone(oid, "incref"))
            ref.holders[holder] = ref.holders.get(holder, 0) + 1
            ref.count += 1
            return True

    def decref_many(self, holder: str, oids: list) -> None:
        with self.mutex:
            for oid in oids:
                self._drop(holder, oid, 1)

    def loan(self, holder: str, oid: str) -> str:
        """Take a reference for a proxy being pickled: the receiver adopts it."""
        with self.mutex:
            ref = self.objects.get(oid)
            if ref is None:
                raise KeyError(self._gone(oid, "loan"))
            loan = "loan:" + secrets.token_hex(8)
            self.loans[loan] = (oid, time.monotonic() + LOAN_TTL)
            ref.holders[loan] = 1
            ref.count += 1
            return loan

    def adopt(self, holder: str, loan: str, oid: str) -> bool:
        """Move the loan's reference to `holder`; False (and a new reference)
        if the loan was adopted already or expired."""
        with self.mutex:
            entry = self.loans.pop(loan, None)
            ref = self.objects.get(oid)
            if ref is None:
                raise KeyError(self._gone(oid, "adopt"))
            if entry is not None and entry[0] == oid and ref.holders.pop(loan, 0):
                ref.holders[holder] = ref.holders.get(holder, 0) + 1
                return True
            ref.holders[holder] = ref.holders.get(holder, 0) + 1
            ref.count += 1
            return False

    def release_loan(self, loan: str) -> None:
        with self.mutex:
            entry = self.loans.pop(loan, None)
            if entry is not None:
                self._drop(loan, entry[0], 1)

    def _drop(self, holder: str, oid: str, n: int) -> None:
        ref = self.objects.get(oid)
        if ref is None or holder not in ref.holders:
            return
        n = min(n, ref.holders[holder])
        ref.holders[holder] -= n
        if ref.holders[holder] <= 0:
            del ref.holders[holder]
        ref.count -= n
        if ref.count <= 0:
            self._release(oid, ref)

    def _release(self, oid: str, ref: _Ref) -> None:
        del self.objects[oid]
        self.released[oid] = ref.typeid
        while len(self.released) > _RELEASED_KEEP:
            self.released.popitem(last=False)
        actor = self.actors.get(ref.actor)
        if actor is None:
            return
        actor.live.discard(oid)
        if actor.live:
            if oid != actor.root:
                try:
                    actor.handle.drop.remote(oid)
                except Exception as e:
                    log.debug("could not drop %s: %r", oid, e)
            return
        self._end_actor(ref.actor, actor)

    def _end_actor(self, name: str, actor: _Actor) -> None:
        self.actors.pop(name, None)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception as e:
            log.debug("could not kill %s: %r", name, e)
        remove_file(actor.state_file)
        if actor.client:
            self.goodbye(actor.client)    # what its process held (nested proxies)

    # -- questions ----------------------------------------------------------------------------
    def status(self, oid: str) -> dict:
        """{"state": "live" | "released" | "unknown", "typeid", "durable", "serial"}."""
        with self.mutex:
            ref = self.objects.get(oid)
            if ref is not None:
                return {"state": "live", "typeid": ref.typeid, "durable": ref.durable,
                        "serial": ref.serial}
            if oid in self.released:
                return {"state": "released", "typeid": self.released[oid]}
            return {"state": "unknown"}

    def get_methods(self, oid: str) -> tuple:
        with self.mutex:
            ref = self.objects.get(oid)
            if ref is None:
                raise KeyError(self._gone(oid, "get_methods"))
            return ref.exposed

    def _held_outside(self) -> dict[str, int]:
        """(mutex held) Each object that something other than the manager's own
        host actors holds, with the references of those others: the stdlib's
        counts, where a proxy rebuilt inside the manager takes none.  An
        object only proxies inside host actors hold (kept by a container
        that holds it, or by itself) is not counted, as the local manager's
        registry does not count one only its own proxies hold."""
        inside = {c for c, info in self.clients.items() if info.get("hosting")}
        out = {}
        for oid, ref in self.objects.items():
            n = ref.count - sum(k for h, k in ref.holders.items() if h in inside)
            if n > 0:
                out[oid] = n
        return out

    def number_of_objects(self) -> int:
        """The stdlib's `_number_of_objects()`: see `_held_outside`."""
        with self.mutex:
            return len(self._held_outside())

    def list_objects(self) -> list[dict]:
        with self.mutex:
            return [{"id": oid, "typeid": ref.typeid, "refcount": ref.count,
                     "holders": dict(ref.holders), "actor": ref.actor}
                    for oid, ref in self.objects.items()]

    def list_clients(self) -> list[dict]:
        with self.mutex:
            return [dict(info, client=c) for c, info in self.clients.items()]

    def debug_info(self) -> str:
        """The stdlib's `_debug_info()`: the objects `number_of_objects` counts."""
        with self.mutex:
            held = self._held_outside()
            lines = [f"  {oid}:       refcount={held[oid]}\n    {ref.typeid} in {ref.actor}"
                     for oid, ref in self.objects.items() if oid in held]
        return "\n".join(lines)

    def _gone(self, oid: str, op: str) -> str:
        typeid = self.released.get(oid)
        if typeid is not None:
            return (f"{op}: {typeid!r} object {oid} was released when no process held a "
                    "proxy to it any more")
        return f"{op}: no object {oid!r} in the manager at {self.address!r}"

    # -- the end --------------------------------------------------------------------------------
    def shutdown(self) -> list[str]:
        """Kill every host actor (the caller then kills this one)."""
        with self.mutex:
            self.closed = True
            self._stop.set()
            names = list(self.actors)
            for name in names:
                actor = self.actors.pop(name)
                try:
                    ray.kill(actor.handle, no_restart=True)
                except Exception as e:
                    log.debug("could not kill %s: %r", name, e)
                remove_file(actor.state_file)
            self.objects.clear()
            self.loans.clear()
            return names

    def _reaper(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._reap()
            except Exception as e:      # never let the reaper die
                log.debug("reaper: %r", e)

    def _reap(self) -> None:
        now = time.monotonic()
        with self.mutex:
            for loan, (oid, expiry) in list(self.loans.items()):
                if expiry < now:
                    del self.loans[loan]
                    self._drop(loan, oid, 1)
        dead = _dead_jobs()
        if self.owner_job is not None and self.owner_job in dead:
            log.info("the job that started manager %s is gone: shutting it down",
                     self.address)
            self.shutdown()
            os._exit(0)
        with self.mutex:
            clients = list(self.clients.items())
        gone = []
        for client, info in clients:
            if info.get("hosting"):
                continue        # ended with its actor, never by its creator's job
            if info.get("job") in dead or (info.get("actor") and _actor_dead(info["actor"])):
                gone.append(client)
        with self.mutex:
            for client in gone:
                self.goodbye(client)


def _actor_dead(actor_id: str) -> bool:
    try:
        from ray._private.state import state
        info = state.actor_table(actor_id)
    except Exception:
        return False
    return bool(info) and info.get("State") == "DEAD"


def _dead_jobs() -> set:
    try:
        from ray._private.state import state
        return {j["JobID"] for j in state.job_table() if j.get("IsDead")}
    except Exception:
        return set()
