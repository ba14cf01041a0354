"""Manager-hosted synchronization primitives and queues.

Owns: the objects behind `SyncManager.Lock()`, `RLock`, `Semaphore`,
`BoundedSemaphore`, `Condition`, `Event`, `Barrier`, `Queue` and
`JoinableQueue`.  They behave like their `threading`/`queue` namesakes, and in
addition:
- every blocking operation honours the call's deadline (`callctx.wait_limit`):
  when the deadline passes it raises `DeadlineExpired` *without* having done
  anything, so a timed-out `get` loses no item and a timed-out `acquire` leaves
  the lock free;
- acquirers know their owner, as (client, thread) from `callctx.caller()`, so
  an RLock is re-entrant per client thread (like the stdlib's server, which
  runs each client thread on its own server thread), and a non-owner cannot
  release it.

Rules it keeps:
- All state of one primitive is guarded by its own mutex; waits use
  `threading.Condition` on that mutex, so no server thread spins.
- Objects of this module run concurrently in the server (`_procshare_concurrent_`).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from .callctx import DeadlineExpired, caller, wait_limit

__all__ = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event",
           "Barrier", "Queue", "JoinableQueue"]

Owner = tuple  # (client id, thread ident)


def _owner() -> Owner:
    c = caller()
    return (c.client, c.thread)


def _check_timeout(blocking: bool, timeout: float | None, lock_style: bool) -> float | None:
    """Validate acquire() arguments like threading does; None means forever."""
    if lock_style:
        if timeout is None:
            timeout = -1
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        return None if timeout == -1 else float(timeout)
    if not blocking and timeout is not None:
        raise ValueError("can't specify timeout for non-blocking acquire")
    return timeout


class _Acquirer:
    """A counted lock with owners: the common core of Lock, RLock and Semaphore."""

    _procshare_concurrent_ = True
    _reentrant = False
    _lock_style = True   # threading.Lock-style acquire(blocking, timeout=-1) arguments

    def __init__(self, value: int = 1) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._value = value
        self._initial = value
        self.owners: dict[Owner, int] = {}      # owner -> times acquired
        self.waiters: dict[Owner, float] = {}   # owner -> monotonic time it started waiting

    # -- acquiring ------------------------------------------------------------
    def _take(self, me: Owner) -> None:
        self._value -= 1
        self.owners[me] = self.owners.get(me, 0) + 1

    def _acquire_as(self, me: Owner, blocking: bool, timeout: float | None) -> bool:
        with self._cond:
            if self._reentrant and self.owners.get(me):
                self.owners[me] += 1
                return True
            if self._value > 0:
                self._take(me)
                return True
            if not blocking:
                return False
            limit, by_deadline = wait_limit(timeout)
            endtime = None if limit is None else time.monotonic() + limit
            self.waiters[me] = time.monotonic()
            try:
                while self._value <= 0:
                    if endtime is None:
                        self._cond.wait()
                        continue
                    left = endtime - time.monotonic()
                    if left <= 0:
                        if by_deadline:
                            raise DeadlineExpired(f"still waiting for {self!r}")
                        return False
                    self._cond.wait(left)
            finally:
                del self.waiters[me]
            self._take(me)
            return True

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        timeout = _check_timeout(blocking, timeout, self._lock_style)
        return self._acquire_as(_owner(), blocking, timeout)

    __enter__ = acquire

    # -- releasing ------------------------------------------------------------
    def _release_as(self, me: Owner | None, n: int = 1) -> None:
        """Give back `n` permits; `me` is the releasing owner (None: anyone's)."""
        with self._cond:
            self._check_release(me, n)
            for _ in range(n):
                holder = me if me in self.owners else next(iter(self.owners), None)
                if holder is not None:
                    left = self.owners[holder] - 1
                    if left:
                        self.owners[holder] = left
                    else:
                        del self.owners[holder]
                    if self._reentrant and left:
                        continue
                self._value += 1
            self._cond.notify(n)

    def _check_release(self, me: Owner | None, n: int) -> None:
        if self._value >= self._initial and not self.owners:
            raise RuntimeError("release unlocked lock")

    def release(self) -> None:
        self._release_as(_owner())

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def locked(self) -> bool:
        with self._mutex:
            return self._value <= 0

    # -- for Condition --------------------------------------------------------
    def _is_owned_by(self, me: Owner) -> bool:
        return bool(self.owners.get(me))

    def _release_save(self, me: Owner) -> int:
        with self._cond:
            count = self.owners.pop(me, 0)
            self._value += 1
            self._cond.notify()
        return count

    def _acquire_restore(self, me: Owner, count: int) -> None:
        self._acquire_as(me, True, None)
        with self._mutex:
            self.owners[me] = count

    def holders(self) -> dict[Owner, int]:
        with self._mutex:
            return dict(self.owners)

    def __repr__(self) -> str:
        state = "locked" if self._value <= 0 else "unlocked"
        return f"<{type(self).__name__} {state} at {id(self):#x}>"


class Lock(_Acquirer):
    """A mutex any client may release (like threading.Lock)."""

    def __repr__(self) -> str:
        state = "locked" if self._value <= 0 else "unlocked"
        return f"<{state} _thread.lock object at {id(self):#x}>"

    def _release_as(self, me: Owner | None, n: int = 1) -> None:
        # a plain Lock has no owner for release purposes: anyone may release it
        with self._cond:
            if self._value > 0:
                raise RuntimeError("release unlocked lock")
            self.owners.clear()
            self._value = 1
            self._cond.notify()


class RLock(_Acquirer):
    """A re-entrant lock owned by one client thread (like threading.RLock)."""

    _reentrant = True

    def _check_release(self, me: Owner | None, n: int) -> None:
        if not self.owners.get(me):
            raise RuntimeError("cannot release un-acquired lock")

    def _release_save(self, me: Owner) -> int:
        return super()._release_save(me)

    def _is_owned(self) -> bool:
        return self._is_owned_by(_owner())

    def __repr__(self) -> str:
        with self._mutex:
            owner, count = next(iter(self.owners.items()), ((None, 0), 0))
        state = "locked" if count else "unlocked"
        return (f"<{state} _thread.RLock object owner={owner[1] or 0} count={count} "
                f"at {id(self):#x}>")


class Semaphore(_Acquirer):
    """A counting semaphore (like threading.Semaphore)."""

    _lock_style = False

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(value)

    def _check_release(self, me: Owner | None, n: int) -> None:
        pass

    def release(self, n: int = 1) -> None:  # type: ignore[override]
        if n < 1:
            raise ValueError("n must be one or more")
        self._release_as(_owner(), n)

    def __repr__(self) -> str:
        return f"<threading.{type(self).__name__} at {id(self):#x}: value={self._value}>"


class BoundedSemaphore(Semaphore):
    """A semaphore that refuses to be released above its initial value."""

    def _check_release(self, me: Owner | None, n: int) -> None:
        if self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")


def _local_referent(lock: Any) -> Any:
    """A proxy of this very manager's object stands for the object itself."""
    get = getattr(lock, "_procshare_local_referent", None)
    return get() if get is not None else lock


class Condition:
    """A condition variable over a manager-hosted lock (like threading.Condition)."""

    _procshare_concurrent_ = True

    def __init__(self, lock: Any = None) -> None:
        lock = RLock() if lock is None else _local_referent(lock)
        if not isinstance(lock, _Acquirer):
            raise TypeError(f"Condition needs a lock made by this manager, not {lock!r}")
        self._lock = lock
        self._waiters: list[threading.Lock] = []

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
        me = _owner()
        if not self._lock._is_owned_by(me):
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = threading.Lock()
        waiter.acquire()
        with self._lock._mutex:
            self._waiters.append(waiter)
        saved = self._lock._release_save(me)
        limit, by_deadline = wait_limit(timeout)
        got = False
        try:
            got = waiter.acquire(True, -1 if limit is None else limit)
        finally:
            if not got:
                with self._lock._mutex:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
            self._lock._acquire_restore(me, saved)
        if not got and by_deadline:
            raise DeadlineExpired("condition not notified before the deadline")
        return got

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        endtime = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            wait = None if endtime is None else endtime - time.monotonic()
            if wait is not None and wait <= 0:
                break
            self.wait(wait)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned_by(_owner()):
            raise RuntimeError("cannot notify on un-acquired lock")
        with self._lock._mutex:
            woken, self._waiters[:] = self._waiters[:n], self._waiters[n:]
        for w in woken:
            w.release()

    def notify_all(self) -> None:
        self.notify(len(self._waiters))

    def __repr__(self) -> str:
        return f"<Condition({self._lock!r}, {len(self._waiters)})>"


def _threading_repr(obj: Any) -> str:
    """The repr of the threading class `obj` stands in for."""
    text = super(type(obj), obj).__repr__()
    return text.replace(f"{type(obj).__module__}.", "threading.", 1)


class Event(threading.Event):
    """threading.Event whose wait honours the call's deadline."""

    _procshare_concurrent_ = True
    __repr__ = _threading_repr

    def wait(self, timeout: float | None = None) -> bool:
        limit, by_deadline = wait_limit(timeout)
        if super().wait(limit):
            return True
        if by_deadline:
            raise DeadlineExpired("event not set before the deadline")
        return False


class Barrier(threading.Barrier):
    """threading.Barrier whose wait honours the call's deadline."""

    _procshare_concurrent_ = True
    __repr__ = _threading_repr

    def wait(self, timeout: float | None = None) -> int:
        limit, by_deadline = wait_limit(timeout)
        if not by_deadline:
            return super().wait(timeout)
        try:
            return super().wait(limit)
        except threading.BrokenBarrierError:
            if limit is not None and by_deadline and self.broken:
                raise DeadlineExpired(
                    "barrier not passed before the deadline; like a timed-out "
                    "threading.Barrier.wait, this broke the barrier") from None
            raise


def _queue_limit(block: bool, timeout: float | None) -> tuple[float | None, bool]:
    if block and timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return wait_limit(timeout)


class Queue(queue.Queue):
    """queue.Queue whose blocking get/put/join honour the call's deadline."""

    _procshare_concurrent_ = True

    def __repr__(self) -> str:
        return f"<queue.Queue object at {id(self):#x}>"

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(False)
        limit, by_deadline = _queue_limit(block, timeout)
        try:
            return super().get(True, limit)
        except queue.Empty:
            if by_deadline:
                raise DeadlineExpired("queue still empty at the deadline") from None
            raise

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if not block:
            return super().put(item, False)
        limit, by_deadline = _queue_limit(block, timeout)
        try:
            return super().put(item, True, limit)
        except queue.Full:
            if by_deadline:
                raise DeadlineExpired("queue still full at the deadline") from None
            raise

    def join(self) -> None:
        limit, by_deadline = wait_limit(None)
        endtime = None if limit is None else time.monotonic() + limit
        with self.all_tasks_done:
            while self.unfinished_tasks:
                if endtime is None:
                    self.all_tasks_done.wait()
                    continue
                left = endtime - time.monotonic()
                if left <= 0:
                    raise DeadlineExpired(
                        f"{self.unfinished_tasks} task(s) still unfinished at the deadline")
                self.all_tasks_done.wait(left)


JoinableQueue = Queue
