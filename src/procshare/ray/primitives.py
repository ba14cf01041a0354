"""Primitives for async host actors: Lock, RLock, Semaphore, BoundedSemaphore,
Condition, Event, Barrier, Queue and JoinableQueue on asyncio.

They behave like their `threading`/`queue` namesakes as seen through a
manager's proxies, but every blocking operation is a coroutine: one actor
(one event loop) serves many blocked callers at once, and `ray.cancel()` of an
abandoned call raises `CancelledError` inside the wait, so it takes nothing.

Owns: the asyncio implementations, the caller of the running call (`CALLER`:
client id, thread, deadline) and `DeadlineExpired`.

Rules it keeps:
- Everything runs on the actor's one event loop thread, so state changes
  between two `await`s are atomic; a wait re-checks its condition after every
  wake-up and takes (an item, a permit) in the same step as the check.
- A wait that ends at the call's deadline raises `DeadlineExpired` having
  taken nothing (the host replies TIMEOUT: "the call had no effect"); a wait
  that ends at the user's own `timeout=` returns or raises as threading and
  queue do (False, `queue.Empty`, `BrokenBarrierError`).
- A cancelled wait (CancelledError) takes nothing and leaves no waiter behind.
- Owners are (client id, thread ident) of the caller: an RLock is re-entrant
  per client thread and only its owner releases it; a plain Lock, like
  `threading.Lock`, may be released by anyone.
- A Condition over a lock of another object calls that object's actor as the
  original caller, so ownership is the caller's, not the Condition actor's.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import queue
import threading
import time
from typing import Any

from ..stdtypes import check_acquire_args, check_wait_timeout
from ..wire.kinds import Kind
from ..wire.records import is_proxy

__all__ = ["CALLER", "DeadlineExpired", "Lock", "RLock", "Semaphore", "BoundedSemaphore",
           "Condition", "Event", "Barrier", "Queue", "JoinableQueue"]

#: (client id, thread ident, deadline as time.time() or None) of the running call
CALLER: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "procshare_ray_caller", default=("?", 0, None))

Owner = tuple


class DeadlineExpired(Exception):
    """The call's deadline passed while it waited; it did nothing."""


def caller() -> Owner:
    c = CALLER.get()
    return (c[0], c[1])


def limit_for(timeout: float | None) -> tuple[float | None, bool]:
    """How long a wait may last: the user's `timeout` or what is left until the
    call's deadline, whichever is shorter; and whether the deadline is the limit."""
    deadline = CALLER.get()[2]
    if deadline is None:
        return timeout, False
    left = max(0.0, deadline - time.time())
    if timeout is None or left < timeout:
        return left, True
    return timeout, False


async def _maybe(value: Any) -> Any:
    return (await value) if inspect.isawaitable(value) else value


class _Waiters:
    """Futures of the calls waiting for a change."""

    __slots__ = ("_futs",)

    def __init__(self) -> None:
        self._futs: collections.deque = collections.deque()

    async def wait(self, limit: float | None) -> bool:
        if limit is not None and limit <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._futs.append(fut)
        try:
            if limit is None:
                await fut
            else:
                await asyncio.wait_for(fut, limit)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            try:
                self._futs.remove(fut)
            except ValueError:
                pass

    def wake(self) -> None:
        for fut in self._futs:
            if not fut.done():
                fut.set_result(None)


async def _until(pred: Any, limit: float | None, waiters: _Waiters) -> bool:
    """Wait until `pred()` holds (True) or `limit` seconds pass (False)."""
    if pred():
        return True
    loop = asyncio.get_running_loop()
    end = None if limit is None else loop.time() + limit
    while not pred():
        left = None if end is None else end - loop.time()
        if left is not None and left <= 0:
            return False
        await waiters.wait(left)
    return True




def _gave_up(what: str) -> DeadlineExpired:
    return DeadlineExpired(f"{what} was still waiting at the call's deadline; it gave up and "
                           "took nothing")


# -- locks and semaphores ----------------------------------------------------------

class _Acquirer:
    """A counted lock with owners: the common core of Lock, RLock and Semaphore."""

    _reentrant = False
    _lock_style = True
    _bounded = False
    #: methods the host lets another actor call (a Condition over this lock)
    _procshare_internal_ = ("_is_owned_by", "_release_save", "_acquire_restore")

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._value = value
        self._initial = value
        self.owners: dict[Owner, int] = {}
        self._waiters = _Waiters()

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        timeout = check_acquire_args(blocking, timeout, self._lock_style)
        return await self._acquire_as(caller(), blocking, timeout)

    async def _acquire_as(self, me: Owner, blocking: bool, timeout: float | None,
                          count: int = 1) -> bool:
        if self._reentrant and me in self.owners:
            self.owners[me] += count
            return True
        if self._value > 0:
            self._take(me, count)
            return True
        if not blocking:
            return False
        limit, by_deadline = limit_for(timeout)
        if await _until(lambda: self._value > 0, limit, self._waiters):
            self._take(me, count)
            return True
        if by_deadline:
            raise _gave_up(f"acquire() of this {type(self).__name__}")
        return False

    def _take(self, me: Owner, count: int) -> None:
        self._value -= 1
        self.owners[me] = self.owners.get(me, 0) + count

    def _drop(self, me: Owner) -> None:
        """One hold ends: the caller's if it has one, else the oldest."""
        key = me if me in self.owners else next(iter(self.owners), None)
        if key is not None:
            self.owners[key] -= 1
            if self.owners[key] <= 0:
                del self.owners[key]

    async def release(self) -> None:
        me = caller()
        if self._value > 0 and not self.owners:
            raise RuntimeError("release unlocked lock")
        self._drop(me)
        self._value += 1
        self._waiters.wake()

    def locked(self) -> bool:
        return self._value == 0

    def _is_owned_by(self, me: Owner) -> bool:
        return me in self.owners

    def _release_save(self, me: Owner) -> int:
        count = self.owners.pop(me, 0)
        self._value += 1
        self._waiters.wake()
        return count

    async def _acquire_restore(self, me: Owner, count: int) -> bool:
        await _until(lambda: self._value > 0, None, self._waiters)
        self._value -= 1
        self.owners[me] = self.owners.get(me, 0) + max(count, 1)
        return True

    def _try_restore(self, me: Owner, count: int) -> None:
        if self._value > 0:
            self._value -= 1
            self.owners[me] = self.owners.get(me, 0) + max(count, 1)

    def __repr__(self) -> str:
        state = "locked" if self.locked() else "unlocked"
        return f"<{state} procshare.ray {type(self).__name__} (value={self._value})>"


class Lock(_Acquirer):
    """`threading.Lock`: any process or thread may release it."""

    def __init__(self) -> None:       # (threading.Lock() takes no argument)
        super().__init__(1)


class RLock(_Acquirer):
    """`threading.RLock`: re-entrant per client thread; only the owner releases it."""

    _reentrant = True

    def __init__(self, *args: Any, **kwds: Any) -> None:
        super().__init__(1)     # threading.RLock ignores its arguments (3.13: warns)

    async def release(self) -> None:
        me = caller()
        if me not in self.owners:
            raise RuntimeError("cannot release un-acquired lock")
        self.owners[me] -= 1
        if self.owners[me] == 0:
            del self.owners[me]
            self._value += 1
            self._waiters.wake()


class Semaphore(_Acquirer):
    """`threading.Semaphore`: release() may raise the value above its start."""

    _lock_style = False

    async def release(self, n: int = 1) -> None:  # type: ignore[override]
        if n < 1:
            raise ValueError("n must be one or more")
        if self._bounded and self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")
        me = caller()
        for _ in range(n):
            if self.owners:
                self._drop(me)
        self._value += n
        self._waiters.wake()


class BoundedSemaphore(Semaphore):
    """`threading.BoundedSemaphore`: release() above the start raises ValueError."""

    _bounded = True


# -- Condition ----------------------------------------------------------------------

class _RemoteLock:
    """The lock of a Condition that lives in another actor (a lock proxy passed
    to `manager.Condition(lock)`): called as the Condition's caller."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    async def _call(self, meth: str, *args: Any) -> Any:
        ref = self._proxy._procshare_session.actor_call(self._proxy._id, meth, args, {}, CALLER.get())
        kind, payload = await ref
        if kind == Kind.RETURN:
            return payload
        if kind == Kind.ERROR:
            raise payload
        if kind == Kind.TIMEOUT:
            raise DeadlineExpired(payload)
        raise RuntimeError(f"the Condition's lock failed: {payload}")

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return await self._call("acquire", blocking, timeout)

    async def release(self) -> None:
        return await self._call("release")

    async def locked(self) -> bool:
        return await self._call("locked")

    async def _is_owned_by(self, me: Owner) -> bool:
        return await self._call("_is_owned_by", me)

    async def _release_save(self, me: Owner) -> int:
        return await self._call("_release_save", me)

    async def _acquire_restore(self, me: Owner, count: int) -> bool:
        return await self._call("_acquire_restore", me, count)

    def _try_restore(self, me: Owner, count: int) -> None:
        """After a cancel the caller is gone: nothing to restore across actors."""


class Condition:
    """`threading.Condition`; its lock is an RLock unless one is given."""

    def __init__(self, lock: Any = None) -> None:
        if lock is None:
            self._lock: Any = RLock()
        elif isinstance(lock, _Acquirer):
            self._lock = lock
        elif is_proxy(lock):
            self._lock = _RemoteLock(lock)
        else:
            raise TypeError(f"a Condition's lock must be a manager Lock or RLock, not "
                            f"{type(lock).__name__}")
        self._sleepers: collections.deque = collections.deque()

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return await self._lock.acquire(blocking, timeout)

    async def release(self) -> None:
        return await self._lock.release()

    async def locked(self) -> bool:
        return await _maybe(self._lock.locked())

    async def wait(self, timeout: float | None = None) -> bool:
        me = caller()
        if not await _maybe(self._lock._is_owned_by(me)):
            raise RuntimeError("cannot wait on un-acquired lock")
        check_wait_timeout(timeout)     # threading's errors, before anything changes
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append(fut)
        saved = await _maybe(self._lock._release_save(me))
        limit, by_deadline = limit_for(timeout)
        notified = False
        try:
            if limit is None:
                await fut
                notified = True
            elif limit > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), limit)
                    notified = True
                except asyncio.TimeoutError:
                    notified = fut.done()
            else:
                notified = fut.done()
        except asyncio.CancelledError:
            self._forget(fut)
            self._lock._try_restore(me, saved)
            raise
        self._forget(fut)
        await self._lock._acquire_restore(me, saved)
        if not notified and by_deadline:
            raise DeadlineExpired("wait() on this Condition was not notified by the call's "
                                  "deadline; the lock is held again, as after a timeout")
        return notified

    def _forget(self, fut: asyncio.Future) -> None:
        try:
            self._sleepers.remove(fut)
        except ValueError:
            pass

    async def notify(self, n: int = 1) -> None:
        if not await _maybe(self._lock._is_owned_by(caller())):
            raise RuntimeError("cannot notify on un-acquired lock")
        woken = 0
        for fut in list(self._sleepers):
            if woken >= n:
                break
            if not fut.done():
                fut.set_result(True)
                woken += 1
            self._forget(fut)

    async def notify_all(self) -> None:
        await self.notify(len(self._sleepers))

    def __repr__(self) -> str:
        return f"<procshare.ray Condition ({len(self._sleepers)} waiting)>"


# -- Event ----------------------------------------------------------------------------

class Event:
    """`threading.Event`."""

    def __init__(self) -> None:
        self._flag = False
        self._sets = 0
        self._waiters = _Waiters()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        self._sets += 1
        self._waiters.wake()

    def clear(self) -> None:
        self._flag = False

    async def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        check_wait_timeout(timeout)
        sets = self._sets
        limit, by_deadline = limit_for(timeout)
        if await _until(lambda: self._flag or self._sets != sets, limit, self._waiters):
            return True
        if by_deadline:
            raise _gave_up("wait() on this Event")
        return False

    def __repr__(self) -> str:     # as threading.Event's (str() of a proxy shows it)
        ev = threading.Event()
        if self._flag:
            ev.set()
        return repr(ev).replace(f"{id(ev):#x}", f"{id(self):#x}")


# -- Barrier ----------------------------------------------------------------------------

class _Generation:
    __slots__ = ("passed", "broken")

    def __init__(self) -> None:
        self.passed = False
        self.broken = False


class Barrier:
    """`threading.Barrier`: a wait that times out breaks it; a wait abandoned at
    the call's deadline (or cancelled) leaves it, without breaking it."""

    def __init__(self, parties: int, action: Any = None, timeout: float | None = None) -> None:
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self._parties = parties
        self._action = action
        self._timeout = timeout
        self._count = 0
        self._gen = _Generation()
        self._waiters = _Waiters()

    async def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            timeout = self._timeout
        gen = self._gen
        if gen.broken:
            raise threading.BrokenBarrierError
        index = self._count
        self._count += 1
        if self._count == self._parties:
            try:
                if self._action is not None:
                    self._action()
            except BaseException:
                self._break()
                raise
            gen.passed = True
            self._gen = _Generation()
            self._count = 0
            self._waiters.wake()
            return index
        limit, by_deadline = limit_for(timeout)
        try:
            await _until(lambda: gen.passed or gen.broken, limit, self._waiters)
        except asyncio.CancelledError:
            if not (gen.passed or gen.broken):
                self._count -= 1
            raise
        if gen.passed:
            return index
        if gen.broken:
            raise threading.BrokenBarrierError
        if by_deadline:
            self._count -= 1
            raise _gave_up("wait() at this Barrier")
        self._break()
        raise threading.BrokenBarrierError

    def _break(self) -> None:
        self._gen.broken = True
        self._count = 0
        self._waiters.wake()

    def abort(self) -> None:
        self._break()

    def reset(self) -> None:
        if self._count > 0:
            self._gen.broken = True
        self._gen = _Generation()
        self._count = 0
        self._waiters.wake()

    @property
    def parties(self) -> int:
        return self._parties

    @property
    def n_waiting(self) -> int:
        return 0 if self._gen.broken else self._count

    @property
    def broken(self) -> bool:
        return self._gen.broken

    def __repr__(self) -> str:
        return (f"<procshare.ray Barrier (parties={self._parties}, waiting={self.n_waiting}, "
                f"broken={self.broken})>")


# -- queues ---------------------------------------------------------------------------------

class Queue:
    """`queue.Queue` (with `task_done()` and `join()`, as the stdlib manager's)."""

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._unfinished = 0
        self._not_empty = _Waiters()
        self._not_full = _Waiters()
        self._all_done = _Waiters()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    async def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.full():
            if not block:
                raise queue.Full
            if timeout is not None and timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            limit, by_deadline = limit_for(timeout)
            if not await _until(lambda: not self.full(), limit, self._not_full):
                if by_deadline:
                    raise _gave_up("put() on this Queue (it was full)")
                raise queue.Full
        self._items.append(item)
        self._unfinished += 1
        self._not_empty.wake()

    async def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block and timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not self._items:
            if not block:
                raise queue.Empty
            limit, by_deadline = limit_for(timeout)
            if not await _until(lambda: bool(self._items), limit, self._not_empty):
                if by_deadline:
                    raise _gave_up("get() on this Queue")
                raise queue.Empty
        item = self._items.popleft()
        self._not_full.wake()
        return item

    async def put_nowait(self, item: Any) -> None:
        return await self.put(item, False)

    async def get_nowait(self) -> Any:
        return await self.get(False)

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0:
            self._all_done.wake()

    async def join(self) -> None:
        limit, by_deadline = limit_for(None)
        if not await _until(lambda: self._unfinished == 0, limit, self._all_done):
            raise _gave_up("join() on this Queue")

    def __repr__(self) -> str:     # as queue.Queue's (str() of a proxy shows it)
        return f"<queue.Queue object at {id(self):#x}>"


class JoinableQueue(Queue):
    """The same Queue (the stdlib manager's Queue has task_done/join too)."""
