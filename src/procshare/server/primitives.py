"""Manager-hosted synchronization primitives and queues.

Owns: the objects behind `SyncManager.Lock()`, `RLock`, `Semaphore`,
`BoundedSemaphore`, `Condition`, `Event`, `Barrier`, `Queue`,
`JoinableQueue`, which behave like their `threading`/`queue` namesakes, and in
addition (`Pool` is the stdlib's, with a termination that cannot hang on an idle
pool; a Condition over a lock of another manager, `ForeignCondition`, calls
that lock as the stdlib's `threading.Condition` would, with the rules below for
its own waits):
- every blocking operation honours the call's deadline (`callctx.wait_limit`):
  when the deadline passes it raises `DeadlineExpired` *without* having done
  anything, so a timed-out `get` loses no item and a timed-out `acquire` leaves
  the lock free;
- acquirers know their owner, as (client, thread) from `callctx.caller()`, so
  an RLock is re-entrant per client thread (like the stdlib's server, which
  runs each client thread on its own server thread), and a non-owner cannot
  release it;
- locks know who holds them and since when, and who waits (see `locktable`):
  an acquire that would deadlock raises `DeadlockError`, and what a client
  held when it went away is released (`_client_gone`), the next acquirer
  getting `OwnerDiedWarning`; a Barrier with a dead party breaks.

Rules it keeps:
- All state of one primitive is guarded by its own mutex; waits use
  `threading.Condition` on that mutex, so no server thread spins.
- The uncontended acquire and release touch nothing but the primitive; the
  lock table is entered only to wait (see `locktable` for the lock order).
- A server thread acting for a client that is gone never ends up owning a
  lock: it checks after every wakeup, under the primitive's mutex.
- Objects of this module run concurrently in the server (`_procshare_concurrent_`,
  or as a thread-safe stdlib type); `Pool` keeps the stdlib's methods and
  only makes its termination safe.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from multiprocessing import pool as mp_pool
from multiprocessing import util as mp_util
from typing import Any

from ..errors import OwnerDiedWarning
from ..stdtypes import check_acquire_args, check_wait_timeout
from . import locktable
from .callctx import (
    Cancelled,
    DeadlineExpired,
    caller,
    check_cancelled,
    current_call,
    wait_limit,
    warn,
)
from .locktable import Wait, current_table

__all__ = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "ForeignCondition",
           "make_condition", "Event", "Barrier", "Queue", "JoinableQueue"]

Owner = tuple  # (client id, thread ident)

_monotonic = time.monotonic


def _owner() -> Owner:
    c = caller()
    return (c.client, c.thread)


def _gone(table: locktable.LockTable, client: str) -> bool:
    """Has `client` exited or died (see LockTable.is_gone)?"""
    return table.is_gone(client)




class _Acquirer:
    """A counted lock with owners: the common core of Lock, RLock and Semaphore.

    `owners` maps each holding thread to how many times it holds the lock,
    `since` to (its Caller, when it took it); `waiters` maps each waiting
    thread to its `locktable.Wait`.  `_strict` says the holders are the only
    ones who release it (so its waits may deadlock); `_died` describes an owner
    that went away, until the next acquirer is told.
    """

    _procshare_concurrent_ = True
    _reentrant = False
    _lock_style = True   # threading.Lock-style acquire(blocking, timeout=-1) arguments

    def __init__(self, value: int = 1) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._value = value
        self._initial = value
        self._strict = value > 0
        self.owners: dict[Owner, int] = {}
        self.since: dict[Owner, tuple] = {}
        self.waiters: dict[Owner, Wait] = {}
        self._died: dict | None = None        # an owner died; the next acquirer is told
        self._last_died: dict | None = None   # the last owner that died (introspection)
        self._table = current_table()
        self._table.track(self)

    # -- acquiring ------------------------------------------------------------
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        timeout = check_acquire_args(blocking, timeout, self._lock_style)
        c = caller()
        return self._acquire_as((c.client, c.thread), c, blocking, timeout)

    __enter__ = acquire

    def _acquire_as(self, me: Owner, who: Any, blocking: bool, timeout: float | None,
                    count: int = 1, restore: bool = False) -> bool:
        """Take the lock for thread `me` (`count` times when restoring a
        Condition's lock, which ignores the call's deadline and cancellation,
        as threading does); False if not taken."""
        with self._mutex:
            owners = self.owners
            if self._reentrant:
                n = owners.get(me)
                if n:
                    owners[me] = n + 1
                    return True
            if self._value <= 0 and self._table.dead:
                self._take_over(who)
            if self._value > 0:
                if self._table.dead and _gone(self._table, me[0]):
                    return False
                self._take(me, who, count)
                return True
            if not blocking:
                return False
            return self._wait(me, who, timeout, count, restore)

    def _take(self, me: Owner, who: Any, count: int) -> None:
        """(mutex held, a permit free) `me` takes it."""
        self._value -= 1
        n = self.owners.get(me)
        if n:
            self.owners[me] = n + count
        else:
            self.owners[me] = count
            self.since[me] = (who, _monotonic())
        if self._died is not None:
            self._tell_owner_died(who)

    def _take_over(self, who: Any) -> None:
        """(mutex held, no permit free) Free what exited or dead owners hold, so
        that an acquire that would wait forever gets it (with OwnerDiedWarning)."""
        table = self._table
        gone = [k for k in self.owners if table.is_gone(k[0])]
        if not gone or (not self._lock_style and not self._restore):
            return
        if self._lock_style and len(gone) < len(self.owners):
            return      # a live holder remains: it can still release the lock
        count, threads, holder = 0, [], None
        for k in gone:
            count += self.owners.pop(k)
            who_k, _t = self.since.pop(k, (None, 0.0))
            holder = holder or who_k
            threads.append(getattr(who_k, "thread_name", "?"))
        if self._lock_style:
            self._value = 1
        else:
            self._value = min(self._value + count, self._initial)
        self._died = self._last_died = {
            "pid": getattr(holder, "pid", None), "client": gone[0][0], "threads": threads,
            "count": count, "how": table.how_gone(gone[0][0]), "at": time.time(),
            "told": None}

    def _wait(self, me: Owner, who: Any, timeout: float | None, count: int,
              restore: bool = False) -> bool:
        """The slow path of `_acquire_as` (called with the mutex held)."""
        limit, by_deadline = (None, False) if restore else wait_limit(timeout)
        call = None if restore else current_call()
        w = self._table.begin_wait(me, who, self, timeout is not None)  # may raise DeadlockError
        self.waiters[me] = w
        endtime = None if limit is None else _monotonic() + limit
        if call is not None:
            call.waker = self._wake
        try:
            while True:
                if self._table.dead:
                    if _gone(self._table, me[0]):
                        self._cond.notify()     # whatever woke it goes to another
                        return False    # the client went away while it waited
                    if self._value <= 0:
                        self._take_over(who)
                if call is not None and call.cancelled:
                    self._cond.notify()
                    check_cancelled(call, f"acquire of {self._table.lock_name(self)}")
                if self._value > 0:
                    break
                if endtime is None:
                    self._cond.wait()
                    continue
                left = endtime - _monotonic()
                if left <= 0:
                    if by_deadline:
                        raise DeadlineExpired(f"still waiting for {self._table.lock_name(self)}")
                    return False
                self._cond.wait(left)
        finally:
            if call is not None:
                call.waker = None
            if self.waiters.get(me) is w:
                del self.waiters[me]
            self._table.end_wait(w)
        self._take(me, who, count)
        return True

    def _wake(self) -> None:
        with self._mutex:
            self._cond.notify_all()

    def _tell_owner_died(self, who: Any) -> None:
        died, self._died = self._died, None
        died["told"] = {"pid": getattr(who, "pid", None),
                        "thread_name": getattr(who, "thread_name", None)}
        warn(self._table.owner_died_message(self, died), OwnerDiedWarning)

    # -- releasing ------------------------------------------------------------
    def _release_as(self, me: Owner, n: int = 1) -> None:
        raise NotImplementedError

    def release(self) -> None:
        self._release_as(_owner())

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _drop(self, key: Owner, n: int) -> None:
        """`key` gives back `n` of its holds (mutex held)."""
        left = self.owners[key] - n
        if left > 0:
            self.owners[key] = left
        else:
            del self.owners[key]
            self.since.pop(key, None)

    def _not_strict(self) -> None:
        """A thread that did not take it released it: it is a signal, not a mutex."""
        if self._strict:
            with self._table.mutex:
                self._strict = False

    def locked(self) -> bool:
        return self._value <= 0

    # -- for Condition --------------------------------------------------------
    def _is_owned_by(self, me: Owner) -> bool:
        return bool(self.owners.get(me))

    def _release_save(self, me: Owner) -> int:
        with self._mutex:
            count = self.owners.pop(me, 0)
            self.since.pop(me, None)
            self._value += 1
            if self.waiters:
                self._cond.notify()
        return count

    def _acquire_restore(self, me: Owner, who: Any, count: int) -> bool:
        return self._acquire_as(me, who, True, None, max(count, 1), restore=True)

    def holders(self) -> dict[Owner, int]:
        with self._mutex:
            return dict(self.owners)

    # -- owners that go away ------------------------------------------------------------
    def _client_gone(self, client: str, pid: int, how: str) -> int:
        """`client` exited or died.  What it holds stays held (another process may
        release it, as with threading); its waits give up, and an acquirer
        that would wait forever takes over (`_take_over`)."""
        with self._mutex:
            involved = any(k[0] == client for k in self.owners) or \
                any(k[0] == client for k in self.waiters)
            if involved:
                self._cond.notify_all()
        return 1 if involved else 0

    # -- introspection ----------------------------------------------------------------
    def _procshare_lock_info(self) -> dict:
        now, wall = _monotonic(), time.time()
        with self._mutex:
            holders = [locktable.holder_info(k, *self.since.get(k, (None, now)), n, now, wall)
                       for k, n in self.owners.items()]
            waiters = [locktable.waiter_info(w, now, wall) for w in self.waiters.values()]
            died = self._last_died
            info = {"kind": type(self).__name__, "locked": self._value <= 0,
                    "value": self._value, "initial": self._initial,
                    "deadlock_checked": self._strict, "holders": holders,
                    "waiters": waiters,
                    "owner_died": None if died is None else
                    {"pid": died["pid"], "threads": list(died["threads"]),
                     "count": died["count"], "at": died["at"],
                     "pending": self._died is not None, "told": died["told"]}}
        return info

    def __repr__(self) -> str:
        state = "locked" if self._value <= 0 else "unlocked"
        return f"<{type(self).__name__} {state} at {id(self):#x}>"


class Lock(_Acquirer):
    """A mutex any client may release (like threading.Lock).

    Its holder is the thread that acquired it; a release by any other thread
    is allowed, and from then on the lock counts as a signal (its waits are
    never reported as deadlocks)."""

    def __init__(self) -> None:       # (threading.Lock() takes no argument)
        super().__init__(1)

    def __repr__(self) -> str:
        state = "locked" if self._value <= 0 else "unlocked"
        return f"<{state} _thread.lock object at {id(self):#x}>"

    def _release_as(self, me: Owner, n: int = 1) -> None:
        with self._mutex:
            if self._value > 0:
                raise RuntimeError("release unlocked lock")
            if me not in self.owners:
                self._not_strict()
            self.owners.clear()
            self.since.clear()
            self._value = 1
            if self.waiters:
                self._cond.notify()


class RLock(_Acquirer):
    """A re-entrant lock owned by one client thread (like threading.RLock)."""

    _reentrant = True

    def __init__(self, *args: Any, **kwds: Any) -> None:
        super().__init__(1)     # threading.RLock ignores its arguments (3.13: warns)

    def _release_as(self, me: Owner, n: int = 1) -> None:
        with self._mutex:
            held = self.owners.get(me)
            if not held:
                raise RuntimeError("cannot release un-acquired lock")
            if held > 1:
                self.owners[me] = held - 1
                return
            del self.owners[me]
            self.since.pop(me, None)
            self._value = 1
            if self.waiters:
                self._cond.notify()

    def _is_owned(self) -> bool:
        return self._is_owned_by(_owner())

    def __repr__(self) -> str:
        with self._mutex:
            owner, count = next(iter(self.owners.items()), ((None, 0), 0))
        state = "locked" if count else "unlocked"
        return (f"<{state} _thread.RLock object owner={owner[1] or 0} count={count} "
                f"at {id(self):#x}>")


class Semaphore(_Acquirer):
    """A counting semaphore (like threading.Semaphore).

    Used as a lock (each permit released by the thread that took it), a dead
    owner's permits are given back and its waits are deadlock-checked.  Used as
    a signal (created at 0, or released by other threads) it is left alone:
    a permit taken is consumed."""

    _lock_style = False

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(value)
        self._restore = value > 0   # give a dead owner's permits back

    def _check_release(self, me: Owner, n: int) -> None:
        pass

    def release(self, n: int = 1) -> None:  # type: ignore[override]
        if n < 1:
            raise ValueError("n must be one or more")
        self._release_as(_owner(), n)

    def _release_as(self, me: Owner, n: int = 1) -> None:
        with self._mutex:
            self._check_release(me, n)
            owners = self.owners
            held = owners.get(me, 0)
            if held:
                self._drop(me, min(held, n))
            if held < n:
                # permits given back by a thread that did not take them
                self._not_strict()
                rest = n - held
                mine = [k for k in owners if k[0] == me[0]]
                if sum(owners[k] for k in mine) < rest:
                    self._restore = False   # ... nor another thread of its process
                for k in mine + [k for k in owners if k[0] != me[0]]:
                    if rest <= 0:
                        break
                    take = min(owners[k], rest)
                    self._drop(k, take)
                    rest -= take
            self._value += n
            if self.waiters:
                self._cond.notify(n)

    def __repr__(self) -> str:     # threading's, of this Python
        if sys.version_info < (3, 11):
            return f"<threading.{type(self).__name__} object at {id(self):#x}>"
        return f"<threading.{type(self).__name__} at {id(self):#x}: value={self._value}>"


class BoundedSemaphore(Semaphore):
    """A semaphore that refuses to be released above its initial value."""

    def __repr__(self) -> str:
        if sys.version_info < (3, 11):
            return super().__repr__()
        return (f"<threading.BoundedSemaphore at {id(self):#x}: "
                f"value={self._value}/{self._initial}>")

    def _check_release(self, me: Owner, n: int) -> None:
        if self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")


def _local_referent(lock: Any) -> Any:
    """A proxy of this very manager's object stands for the object itself."""
    get = getattr(lock, "_procshare_local_referent", None)
    return get() if get is not None else lock


class _Sleeper:
    """A thread inside Condition.wait, waiting to be notified."""

    __slots__ = ("gate", "wait", "dropped")

    def __init__(self, wait: Wait) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.wait = wait
        self.dropped = False    # taken off the list without a notify


class _Sleepers:
    """The threads inside a Condition's wait(), waiting to be notified (both
    Conditions: `_sleepers_mutex` guards `_waiters`).  A sleeper whose client
    goes away is woken and dropped, so it cannot swallow a notify meant for a
    live one."""

    _waiters: list[_Sleeper]
    _table: locktable.LockTable
    _lock: Any

    @property
    def _sleepers_mutex(self) -> Any:
        raise NotImplementedError

    def _drop_sleeper(self, sleeper: _Sleeper, release: bool = True) -> None:
        """Take `sleeper` off the list without a notify (cancelled, or its client
        went away), and wake it if `release`."""
        with self._sleepers_mutex:
            try:
                self._waiters.remove(sleeper)
            except ValueError:
                return      # already notified
            sleeper.dropped = True
        if release:
            sleeper.gate.release()

    def _add_sleeper(self, me: Owner, c: Any, timed: bool) -> _Sleeper:
        sleeper = _Sleeper(Wait(me, c, self, timed, "notify"))
        with self._sleepers_mutex:
            self._waiters.append(sleeper)
        return sleeper

    def _sleep(self, sleeper: _Sleeper, limit: float | None, call: Any) -> bool:
        """Sleep until notified or `limit` (a cancel and a gone client's drop
        wake it too, `sleeper.dropped`): whether it was woken.  A sleeper that
        was not is off the list when this returns or raises."""
        if call is not None:
            call.waker = lambda: self._drop_sleeper(sleeper)
            if call.cancelled:      # before the waker was there
                self._drop_sleeper(sleeper)
        got = False
        try:
            got = sleeper.gate.acquire(True, -1 if limit is None else limit)
        finally:
            if call is not None:
                call.waker = None
            if not got:
                self._drop_sleeper(sleeper, release=False)
        return got

    def _pass_on(self) -> None:
        with self._sleepers_mutex:
            if not self._waiters:
                return
            s = self._waiters.pop(0)
        s.gate.release()

    def _wake_sleepers(self, n: int) -> None:
        """Wake `n` live sleepers (for notify(), whose caller holds the lock; or
        to pass on a notify), and every sleeper whose client is gone, which
        gives up and does not count."""
        table = self._table
        woken = []
        with self._sleepers_mutex:
            keep = []
            for s in self._waiters:
                if table.dead and _gone(table, s.wait.key[0]):
                    s.dropped = True
                    woken.append(s)
                elif n > 0:
                    woken.append(s)
                    n -= 1
                else:
                    keep.append(s)
            self._waiters[:] = keep
        for s in woken:
            s.gate.release()

    def notify_all(self) -> None:
        self.notify(len(self._waiters))     # type: ignore[attr-defined]

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        endtime = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            wait = None if endtime is None else endtime - time.monotonic()
            if wait is not None and wait <= 0:
                break
            self.wait(wait)                 # type: ignore[attr-defined]
            result = predicate()
        return result

    def _client_gone(self, client: str, pid: int, how: str) -> int:
        with self._sleepers_mutex:
            gone = [s for s in self._waiters if s.wait.key[0] == client]
        for s in gone:
            self._drop_sleeper(s)
        return 1 if gone else 0

    def __repr__(self) -> str:
        return f"<Condition({self._lock!r}, {len(self._waiters)})>"


class Condition(_Sleepers):
    """A condition variable over a manager-hosted lock (like threading.Condition).

    While a thread waits it does not hold the lock; when it is woken it takes
    the lock again like any acquirer (so that re-acquire is deadlock-checked).
    A sleeper whose client goes away is woken and dropped, so it cannot swallow
    a notify meant for a live one."""

    _procshare_concurrent_ = True

    def __init__(self, lock: Any = None) -> None:
        lock = RLock() if lock is None else _local_referent(lock)
        if not isinstance(lock, _Acquirer):
            raise TypeError(f"Condition needs a lock made by this manager, not {lock!r}")
        self._lock = lock
        self._waiters: list[_Sleeper] = []   # guarded by the lock's mutex
        self._table = current_table()
        self._table.track(self)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        c = caller()
        me = (c.client, c.thread)
        lock = self._lock
        if not lock._is_owned_by(me):
            raise RuntimeError("cannot wait on un-acquired lock")
        check_wait_timeout(timeout)                 # (a bad timeout: nothing changed)
        limit, by_deadline = wait_limit(timeout)
        sleeper = self._add_sleeper(me, c, timeout is not None)
        saved = lock._release_save(me)
        call = current_call()
        got = False
        try:
            got = self._sleep(sleeper, limit, call)
        finally:
            # like threading: the lock is taken again before wait() returns or
            # raises, whatever ended the wait (the deadline included)
            lock._acquire_restore(me, c, saved)
        gone = call is not None and call.cancelled or self._table.dead and \
            _gone(self._table, me[0])
        if gone:
            if got and not sleeper.dropped:
                self._pass_on()     # a notify meant for a live waiter: hand it on
            check_cancelled(call, "Condition.wait")
        if not got and by_deadline:
            raise DeadlineExpired("condition not notified before the deadline")
        return got

    @property
    def _sleepers_mutex(self) -> Any:
        return self._lock._mutex

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned_by(_owner()):
            raise RuntimeError("cannot notify on un-acquired lock")
        self._wake_sleepers(n)

    def _procshare_lock_info(self) -> dict:
        info = self._lock._procshare_lock_info()
        now, wall = _monotonic(), time.time()
        with self._lock._mutex:
            sleepers = [locktable.waiter_info(s.wait, now, wall) for s in self._waiters]
        info.update(kind="Condition", lock=self._table.lock_name(self._lock),
                    lock_kind=type(self._lock).__name__,
                    waiters=info["waiters"] + sleepers)
        return info



def _threading_repr(obj: Any) -> str:
    """The repr of the threading class `obj` stands in for."""
    text = super(type(obj), obj).__repr__()
    return text.replace(f"{type(obj).__module__}.", "threading.", 1)


class ForeignCondition(_Sleepers):
    """A Condition over a lock this manager did not make (a proxy of another
    manager's lock, say), which the stdlib's manager also accepts: its lock
    calls go to that object, and "owned" means what threading.Condition makes
    of a lock without `_is_owned` (a non-blocking acquire fails).  As with this
    manager's own Condition, waits and acquires honour the call's deadline, a
    cancelled wait ends, and a sleeper whose client is gone gives up and passes
    on a notify it got.  The lock is the other manager's: this one neither
    checks it for deadlocks nor lists it in `locks()`, and the other one sees
    this manager's server thread as its holder, so a client that dies holding
    it through this Condition (but for one waiting in wait(), which gives up
    without taking it again) leaves it held, as the stdlib's would."""

    _procshare_concurrent_ = True

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._acquire = lock.acquire    # a non-lock fails here, as threading's does
        self._release = lock.release
        self._mutex = threading.Lock()
        self._waiters: list[_Sleeper] = []     # guarded by _mutex
        self._table = current_table()
        self._table.track(self)

    @property
    def _sleepers_mutex(self) -> Any:
        return self._mutex

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        limit, by_deadline = (wait_limit(None if timeout is None or timeout == -1 else timeout)
                              if blocking else (None, False))
        if by_deadline:
            got = self._acquire(True, limit)
        else:       # the lock's own arguments, as threading.Condition passes them on
            got = self._acquire(blocking) if timeout is None else self._acquire(blocking, timeout)
        if got:
            self._keep_for_caller("Condition.acquire")
        elif by_deadline:
            raise DeadlineExpired("the condition's lock was not free before the deadline")
        return got

    __enter__ = acquire

    def _caller_gone(self) -> bool:
        return self._table.dead and _gone(self._table, caller().client)

    def _keep_for_caller(self, what: str) -> None:
        """The lock was just taken for the running call: give it back if that call
        was cancelled meanwhile (Cancelled) or its client is gone (it can take
        nothing), so that nobody holds the other manager's lock for nobody."""
        call = current_call()
        if call is not None and call.cancelled or self._caller_gone():
            self._release()
            check_cancelled(call, what)
            raise Cancelled(f"{what}: the client is gone")

    def release(self) -> None:
        self._release()

    def __exit__(self, *exc: Any) -> None:
        self._release()

    def locked(self) -> bool:
        return self._lock.locked()

    def _is_owned(self) -> bool:
        if self._acquire(False):
            self._release()
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        check_wait_timeout(timeout)
        limit, by_deadline = wait_limit(timeout)
        c = caller()
        me = (c.client, c.thread)
        sleeper = self._add_sleeper(me, c, timeout is not None)
        try:
            self._release()
        except BaseException:
            self._drop_sleeper(sleeper, release=False)
            if not sleeper.dropped:     # a notify took it meanwhile: hand it on
                self._wake_sleepers(1)
            raise
        call = current_call()
        got = False
        try:
            got = self._sleep(sleeper, limit, call)
        finally:
            # held again before wait() returns or raises; never for a client that
            # is gone (also if it went while this waited to take it again)
            dead = self._caller_gone()
            if not dead:
                try:
                    self._acquire(True)
                except BaseException:
                    if got and not sleeper.dropped:
                        self._wake_sleepers(1)
                    raise
                if self._caller_gone():
                    self._release()
                    dead = True
        got = got and not sleeper.dropped
        if dead or call is not None and call.cancelled:
            if got:     # a notify meant for a live waiter: hand it on
                self._wake_sleepers(1)
            if dead:
                return False
            check_cancelled(call, "Condition.wait")
        if not got and by_deadline:
            raise DeadlineExpired("condition not notified before the deadline")
        return got

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        self._wake_sleepers(n)


def make_condition(lock: Any = None) -> Condition | ForeignCondition:
    """`manager.Condition(lock)`: over a lock of this manager (or a new RLock),
    a `Condition`; over any other object, what the stdlib's manager makes, so
    that a lock of another manager works and anything else fails as there."""
    if lock is None or isinstance(_local_referent(lock), _Acquirer):
        return Condition(lock)
    return ForeignCondition(lock)


class Event(threading.Event):
    """threading.Event whose wait honours the call's deadline."""

    _procshare_concurrent_ = True
    __repr__ = _threading_repr

    def __init__(self) -> None:
        super().__init__()
        self._sets = 0      # set() calls: a waiter woken by one returns True

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._sets += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:      # as threading's: the timeout is not even looked at
            return True
        check_wait_timeout(timeout)
        limit, by_deadline = wait_limit(timeout)
        call = current_call()
        if call is None:
            got = super().wait(limit)
        else:
            got = self._wait_cancellable(call, limit)
        if got:
            return True
        if by_deadline:
            raise DeadlineExpired("event not set before the deadline")
        return False

    def _wait_cancellable(self, call: Any, limit: float | None) -> bool:
        cond = self._cond
        endtime = None if limit is None else _monotonic() + limit

        def wake() -> None:
            with cond:
                cond.notify_all()
        call.waker = wake
        try:
            with cond:
                # a set() while it waits wakes it with True, as threading's, even
                # if a clear() came before it looks again (a set-clear pulse)
                sets = self._sets
                while not self._flag and self._sets == sets:
                    check_cancelled(call, "Event.wait")
                    if endtime is None:
                        cond.wait()
                        continue
                    left = endtime - _monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                return self._flag or self._sets != sets
        finally:
            call.waker = None


class Barrier(threading.Barrier):
    """threading.Barrier whose wait honours the call's deadline, and which
    breaks when a party dies while waiting at it.

    Only death breaks it: a process that passed the barrier and exited (with
    or without a goodbye) is no reason to break the next round, and a
    process that dies before it reaches the barrier is not known as a party
    (use a timeout for that).  A cancelled wait (Ctrl-C in the client) breaks
    it too, as a timed-out threading.Barrier.wait does."""

    _procshare_concurrent_ = True
    __repr__ = _threading_repr

    def __init__(self, parties: int, action: Any = None, timeout: float | None = None) -> None:
        super().__init__(parties, action, timeout)
        self._ps_mutex = threading.Lock()
        self._ps_waiters: dict[Owner, Wait] = {}
        self._ps_parties: dict[str, int] = {}    # client -> pid, clients that waited here
        self._ps_died: dict | None = None         # the party whose death broke it
        self._table = current_table()
        self._table.track(self)

    def wait(self, timeout: float | None = None) -> int:
        c = caller()
        me = (c.client, c.thread)
        limit, by_deadline = wait_limit(timeout)    # (a bad timeout: nothing changed)
        w = Wait(me, c, self, timeout is not None, "barrier")
        with self._ps_mutex:
            self._ps_waiters[me] = w
            self._ps_parties[c.client] = c.pid
        call = current_call()
        if call is not None:
            call.waker = self.abort
        try:
            return super().wait(limit if by_deadline else timeout)
        except threading.BrokenBarrierError:
            if call is not None and call.cancel_rid == call.rid:
                raise Cancelled("Barrier.wait: the client abandoned the call; like a "
                                "timed-out threading.Barrier.wait, this broke the barrier"
                                ) from None
            died = self._ps_died
            if died is not None:
                raise threading.BrokenBarrierError(
                    self._table.barrier_broken_message(self, died)) from None
            if limit is not None and by_deadline and self.broken:
                raise DeadlineExpired(
                    "barrier not passed before the deadline; like a timed-out "
                    "threading.Barrier.wait, this broke the barrier") from None
            raise
        finally:
            if call is not None:
                call.waker = None
            with self._ps_mutex:
                if self._ps_waiters.get(me) is w:
                    del self._ps_waiters[me]

    def reset(self) -> None:
        with self._ps_mutex:
            self._ps_died = None
        super().reset()

    def _client_gone(self, client: str, pid: int, how: str) -> int:
        with self._ps_mutex:
            self._ps_parties.pop(client, None)
            waiting = any(k[0] == client for k in self._ps_waiters)
            if not waiting or how != "died":
                return 0
            if self._ps_died is None and not self.broken:
                self._ps_died = {"pid": pid, "client": client, "waiting": True,
                                 "at": time.time()}
        self.abort()
        return 1

    def _procshare_lock_info(self) -> dict:
        now, wall = _monotonic(), time.time()
        with self._ps_mutex:
            waiters = [locktable.waiter_info(w, now, wall) for w in self._ps_waiters.values()]
            parties = sorted(set(self._ps_parties.values()))
            died = self._ps_died
        return {"kind": "Barrier", "parties": self.parties, "n_waiting": self.n_waiting,
                "broken": self.broken, "party_pids": parties, "holders": [],
                "waiters": waiters,
                "owner_died": None if died is None else
                {"pid": died["pid"], "waiting": died["waiting"], "at": died["at"]}}


def _queue_limit(block: bool, timeout: float | None) -> tuple[float | None, bool]:
    if block and timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return wait_limit(timeout)


class ClientGone(Exception):
    """The client a blocked call was made for has died; nobody awaits the reply."""


class Queue(queue.Queue):
    """queue.Queue whose blocking get/put/join honour the call's deadline, and
    whose waits end when the waiting client dies, so that a dead client's
    `get()` never swallows an item put later."""

    _procshare_concurrent_ = True

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._table = current_table()
        self._table.track(self)

    def __repr__(self) -> str:
        return f"<queue.Queue object at {id(self):#x}>"

    def _client_gone(self, client: str, pid: int, how: str) -> int:
        self._wake()    # every waiter re-checks; the gone client's give up
        return 0

    def _wake(self) -> None:
        with self.mutex:
            self.not_empty.notify_all()
            self.not_full.notify_all()
            self.all_tasks_done.notify_all()

    def _wait(self, cond: threading.Condition, ready: Any, timeout: float | None,
              what: str) -> bool:
        """Wait on `cond` (whose lock is held) until `ready()`.  False when the
        method's own timeout ran out; DeadlineExpired at the call's deadline."""
        limit, by_deadline = _queue_limit(True, timeout)
        client = caller().client
        call = current_call()
        endtime = None if limit is None else time.monotonic() + limit
        if call is not None:
            call.waker = self._wake
        try:
            while True:
                # a waiter that gave up takes nothing, and hands on the wakeup
                if self._table.dead and self._table.is_gone(client):
                    cond.notify()
                    raise ClientGone(f"the client waiting in {what} has gone away")
                if call is not None and call.cancelled:
                    cond.notify()
                    check_cancelled(call, f"queue {what}")
                if ready():
                    break
                if endtime is None:
                    cond.wait()
                    continue
                left = endtime - time.monotonic()
                if left <= 0:
                    if by_deadline:
                        raise DeadlineExpired(f"queue {what}: still not possible at the deadline")
                    return False
                cond.wait(left)
        finally:
            if call is not None:
                call.waker = None
        return True

    def _shut_down(self) -> bool:   # Queue.shutdown() exists from Python 3.13
        return getattr(self, "is_shutdown", False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(False)
        with self.not_empty:
            if not self._wait(self.not_empty,
                              lambda: self._qsize() or self._shut_down(), timeout, "get"):
                raise queue.Empty
            if not self._qsize():   # woken by shutdown(), Python 3.13+
                raise queue.ShutDown  # type: ignore[attr-defined]
            item = self._get()
            self.not_full.notify()
            return item

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if not block or not self.maxsize > 0:     # (a bad maxsize fails as queue's does)
            return super().put(item, block, timeout)
        with self.not_full:
            if self._shut_down():
                raise queue.ShutDown  # type: ignore[attr-defined]
            if not self._wait(self.not_full,
                              lambda: self._qsize() < self.maxsize or self._shut_down(),
                              timeout, "put"):
                raise queue.Full
            if self._shut_down():
                raise queue.ShutDown  # type: ignore[attr-defined]
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def join(self) -> None:
        with self.all_tasks_done:
            self._wait(self.all_tasks_done, lambda: not self.unfinished_tasks, None, "join")


JoinableQueue = Queue


#: how long `Pool.terminate` waits for idle workers to exit at their sentinels
POOL_IDLE_EXIT = 5.0


class Pool(mp_pool.Pool):
    """multiprocessing.pool.Pool whose termination does not hang on an idle pool.

    The stdlib's terminate() SIGTERMs the workers while they may hold the
    pool's queue locks, and then it can wait forever for a lock a killed
    worker held (cpython#78178, cpython#96995): in a manager, a call that
    never returns (`with manager.Pool() as pool:` ends with terminate), or a
    connection thread stuck when the last proxy goes.  Here, termination of a
    pool with no task outstanding (terminate(), or the pool's finalizer when
    its last reference goes) first lets the workers exit at their sentinels,
    holding nothing, for up to `POOL_IDLE_EXIT` seconds; the stdlib's
    termination then only cleans up.  With tasks outstanding, or workers that
    do not exit, it is the stdlib's.  Unlike the other objects here, a Pool's
    methods do not watch the call's deadline: they are the stdlib's."""

    def __repr__(self) -> str:     # the stdlib's, naming its class
        cls = type(self)
        return super().__repr__().replace(f"{cls.__module__}.{cls.__qualname__}",
                                          "multiprocessing.pool.Pool", 1)

    def __init__(self, *args: Any, **kwds: Any) -> None:
        super().__init__(*args, **kwds)
        stdlib = self._terminate
        args = stdlib._args                 # cancel() forgets them
        stdlib.cancel()
        self._terminate = mp_util.Finalize(self, _terminate_idle_first, args=args,
                                           exitpriority=15)


def _terminate_idle_first(taskqueue: Any, inqueue: Any, outqueue: Any, pool: list,
                          change_notifier: Any, worker_handler: Any, task_handler: Any,
                          result_handler: Any, cache: Any) -> None:
    if not cache and worker_handler._state == mp_pool.RUN:
        worker_handler._state = mp_pool.CLOSE      # as close(): sentinels to the workers
        change_notifier.put(None)
        end = time.monotonic() + POOL_IDLE_EXIT
        for p in list(pool):
            p.join(max(0.0, end - time.monotonic()))
    done = threading.Event()
    if cache:
        threading.Thread(target=_give_back_dead_writers_lock,
                         args=(outqueue, pool, task_handler, done), daemon=True,
                         name="procshare-pool-terminate").start()
    try:
        mp_pool.Pool._terminate_pool(taskqueue, inqueue, outqueue, pool, change_notifier,
                                     worker_handler, task_handler, result_handler, cache)
    finally:
        done.set()


#: how long the result queue's write lock must stay taken, every worker dead,
#: before it counts as a killed worker's
DEAD_LOCK_WAIT = 1.0


def _give_back_dead_writers_lock(outqueue: Any, pool: list, task_handler: Any,
                                 done: threading.Event) -> None:
    """While the stdlib terminates a pool with tasks outstanding: a worker
    SIGTERMed while it wrote a result still holds the result queue's write
    lock, and the task handler, which writes a sentinel there, then waits for
    it forever, and terminate() with it (with a manager client that leaves
    `with manager.Pool()` just after an apply_async, 1 pool in 25 on 3.11 and
    in 2 on 3.12).  Once every worker is dead and the lock has stayed taken
    for `DEAD_LOCK_WAIT`, it was a dead worker's: it is released (a
    multiprocessing Lock may be released by any process)."""
    lock = getattr(outqueue, "_wlock", None)
    if lock is None:
        return
    while not done.wait(0.05):
        if not task_handler.is_alive():
            return
        if any(p.exitcode is None for p in list(pool)):
            continue
        if lock.acquire(timeout=DEAD_LOCK_WAIT):
            lock.release()
            continue
        if done.is_set() or not task_handler.is_alive():
            return
        try:
            lock.release()
        except ValueError:      # (released meanwhile)
            pass
        return
