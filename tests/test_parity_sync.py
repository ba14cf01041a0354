"""Scenario 6: Event, Lock, RLock, Semaphore, BoundedSemaphore, Condition and
Barrier through the manager, across real processes."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest

import _workers
from _helpers import blocked_in_call, poll

# -- Event -------------------------------------------------------------------


def test_event(manager, ctx):
    ev = manager.Event()
    assert ev.is_set() is False
    t0 = time.monotonic()
    assert ev.wait(0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 2.0
    calling = ctx.Event()
    child = _workers.start_child(ctx, _workers.event_wait, ev, 10, calling)
    assert calling.wait(15)
    assert blocked_in_call(child.process.pid, manager=manager)      # blocked in wait()
    ev.set()
    assert child.result(15) is True
    assert ev.is_set() is True
    assert ev.wait(0) is True
    ev.clear()
    assert ev.is_set() is False
    _workers.run_child(ctx, _workers.event_set, ev)
    assert ev.wait(5) is True


# -- Lock, RLock, Semaphore, BoundedSemaphore ----------------------------------

LOCK_KINDS = {
    "Lock": lambda m: m.Lock(),
    "RLock": lambda m: m.RLock(),
    "Semaphore": lambda m: m.Semaphore(1),
    "BoundedSemaphore": lambda m: m.BoundedSemaphore(1),
}


@pytest.mark.parametrize("kind", list(LOCK_KINDS))
def test_acquire_fails_while_held_elsewhere(manager, ctx, kind):
    lock = LOCK_KINDS[kind](manager)
    assert lock.acquire() is True
    nonblocking, timed, elapsed = _workers.run_child(ctx, _workers.lock_try, lock, 0.1)
    assert nonblocking is False
    assert timed is False
    assert 0.08 <= elapsed < 2.0
    lock.release()
    # Free again: another process gets it at once.
    nonblocking, timed, _ = _workers.run_child(ctx, _workers.lock_try, lock, 0.1)
    assert (nonblocking, timed) == (True, True)


@pytest.mark.parametrize("kind", list(LOCK_KINDS))
def test_context_manager(manager, kind):
    lock = LOCK_KINDS[kind](manager)
    with lock as entered:
        assert entered is True
        again = lock.acquire(blocking=False)
        # Only the RLock is re-entrant.
        assert again is (kind == "RLock")
        if again:
            lock.release()
    assert lock.acquire(timeout=1) is True
    lock.release()


def test_lock_acquire_timeout_same_process(manager):
    lock = manager.Lock()
    assert lock.acquire(blocking=True, timeout=1) is True
    t0 = time.monotonic()
    assert lock.acquire(True, 0.1) is False
    assert time.monotonic() - t0 >= 0.08
    lock.release()


def test_plain_lock_released_by_another_process(manager, ctx):
    lock = manager.Lock()
    assert lock.acquire() is True
    assert _workers.run_child(ctx, _workers.lock_release, lock) is True
    assert lock.acquire(blocking=False) is True
    lock.release()


def test_plain_lock_released_by_another_thread(manager):
    lock = manager.Lock()
    lock.acquire()
    assert _workers.thread_release(lock) == ("released", "")
    assert lock.acquire(blocking=False) is True
    lock.release()


def test_rlock_release_by_non_owner(manager, ctx):
    rlock = manager.RLock()
    rlock.acquire()
    rlock.acquire()  # re-entrant
    kind, _msg = _workers.run_child(ctx, _workers.rlock_release_foreign, rlock)
    assert kind == "RuntimeError"
    kind, _msg = _workers.thread_release(rlock)
    assert kind == "RuntimeError"
    rlock.release()
    rlock.release()
    with pytest.raises(RuntimeError):
        rlock.release()  # not held any more
    assert _workers.run_child(ctx, _workers.lock_try, rlock, 0.1)[:2] == (True, True)


def test_semaphore_counts(manager, ctx):
    sem = manager.Semaphore(2)
    assert sem.acquire() is True
    assert sem.acquire() is True
    assert sem.acquire(blocking=False) is False
    nonblocking, timed, _ = _workers.run_child(ctx, _workers.lock_try, sem, 0.1)
    assert (nonblocking, timed) == (False, False)
    sem.release()
    sem.release()
    sem.release()  # a plain Semaphore may go above its initial value
    assert [sem.acquire(blocking=False) for _ in range(4)] == [True, True, True, False]


def test_bounded_semaphore_over_release(manager):
    sem = manager.BoundedSemaphore(2)
    with pytest.raises(ValueError):
        sem.release()
    sem.acquire()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()


# -- Condition ---------------------------------------------------------------


def test_condition_wait_notify_across_processes(manager, ctx):
    cond = manager.Condition()
    ready = manager.Event()
    child = _workers.start_child(ctx, _workers.condition_wait, cond, ready, 10)
    assert ready.wait(10) is True
    # The child holds the condition's lock until it is inside wait().
    assert cond.acquire(timeout=10) is True
    try:
        cond.notify()
    finally:
        cond.release()
    assert child.result(15) is True


def test_condition_wait_for_across_processes(manager, ctx):
    cond = manager.Condition()
    flag = manager.Value("i", 0)
    holding = ctx.Event()
    child = _workers.start_child(ctx, _workers.condition_wait_for, cond, flag, 10, holding)
    assert holding.wait(15)
    assert cond.acquire(timeout=10) is True         # once the child's wait released it
    try:
        flag.value = 1
        cond.notify_all()
    finally:
        cond.release()
    assert child.result(15) is True


def test_condition_timeouts_and_errors(manager):
    cond = manager.Condition(manager.Lock())
    with cond:
        t0 = time.monotonic()
        assert cond.wait(0.1) is False
        assert time.monotonic() - t0 >= 0.08
        assert cond.wait_for(lambda: False, 0.1) is False
        assert cond.wait_for(lambda: "truthy", 0.1) == "truthy"
    with pytest.raises(RuntimeError):
        cond.notify()  # lock not held
    with pytest.raises(RuntimeError):
        cond.wait(0.1)  # lock not held


def test_condition_over_a_lock_of_another_manager(manager, other_manager):
    """The lock travels to the manager as a proxy of the other manager's lock,
    as in the stdlib: acquire takes that lock; a waiter in another thread is
    woken by notify; the release frees it."""
    lk = other_manager.Lock()
    cond = manager.Condition(lk)
    assert cond.acquire() is True
    try:
        assert lk.acquire(False) is False       # taken, in the other manager
        assert cond.wait(0.1) is False
    finally:
        cond.release()
    assert lk.acquire(False) is True
    lk.release()
    woke = []

    def waiter(c):
        with c:
            woke.append(c.wait(15))

    t = threading.Thread(target=waiter, args=(cond,))
    t.start()
    deadline = time.monotonic() + 15
    while t.is_alive() and time.monotonic() < deadline:
        with cond:      # a notify before the waiter waits is lost: until one lands
            cond.notify()
        t.join(0.05)
    t.join(15)
    assert woke == [True]


def test_condition_over_something_that_is_no_lock(manager, impl):
    with pytest.raises(impl.RemoteError) as info:
        manager.Condition(5)
    assert "AttributeError" in str(info.value) and "acquire" in str(info.value)


# -- Barrier -----------------------------------------------------------------


def test_barrier(manager, ctx):
    b = manager.Barrier(2)
    assert b.parties == 2
    assert b.n_waiting == 0
    assert b.broken is False
    child = _workers.start_child(ctx, _workers.barrier_wait, b, 10)
    assert poll(lambda: b.n_waiting == 1, 10), "child never reached the barrier"
    mine = b.wait(10)
    theirs = child.result(15)
    assert {mine, theirs} == {0, 1}
    assert b.n_waiting == 0
    assert b.broken is False


def test_barrier_abort(manager, ctx):
    b = manager.Barrier(2)
    child = _workers.start_child(ctx, _workers.barrier_wait_broken, b, 10)
    assert poll(lambda: b.n_waiting == 1, 10), "child never reached the barrier"
    b.abort()
    assert child.result(15) == "BrokenBarrierError"
    assert b.broken is True
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(1)
    b.reset()
    assert b.broken is False


def test_barrier_timeout_breaks(manager):
    b = manager.Barrier(2)
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(0.2)
    assert time.monotonic() - t0 < 3.0
    assert b.broken is True


# -- odd arguments, checked as threading checks them ----------------------------

def _outcome(func, *args):
    """What `func(*args)` returns, or the type of what it raises."""
    try:
        return func(*args)
    except Exception as e:  # noqa: BLE001 - the type is the outcome
        return type(e)


def _same_outcome(want, got, what):
    if isinstance(want, type):      # an error: the same type (or a subclass of it)
        assert isinstance(got, type) and issubclass(got, want), (what, want, got)
    else:
        assert got == want, (what, want, got)


#: (blocking, timeout) calls that never wait on a free lock.  Before 3.12
#: `blocking` must be an int; NaN is a ValueError; a timeout the lock cannot
#: wait for (inf, 1e10, 2**64) an OverflowError, also for a non-blocking call
ODD_ACQUIRES = [
    (True, math.nan), (True, math.inf), (True, -math.inf), (True, "x"), (True, 2**64),
    (True, 1e10), (True, -0.5), (True, -1), (True, 0), (True, 0.01), (True, True),
    (False, "x"), (False, math.inf), (False, math.nan), (False, 0.5), (False, -1), (False,),
    (0.5,), (None,), ("x",), (2**64,), ([],), (None, 1), (0.0, 1),
]


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_acquire_arguments_are_checked_as_threading_checks_them(manager, kind):
    """Each odd acquire() on a free lock returns or raises what a threading
    lock of this Python does (procshare accepted `acquire(0.5)` and then
    waited forever on a held lock, and took NaN and inf as timeouts)."""
    for args in ODD_ACQUIRES:
        want = _outcome(getattr(threading, kind)().acquire, *args)
        lock = getattr(manager, kind)()
        _same_outcome(want, _outcome(lock.acquire, *args), (kind, args))


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_acquire_arguments_on_a_held_lock(manager, kind):
    """A held lock checks its arguments first, and a NaN timeout is an error,
    not a failed acquire."""
    lock = getattr(manager, kind)()
    assert lock.acquire()
    old = sys.version_info < (3, 12)        # blocking is parsed as an int
    cases = [((True, math.nan), ValueError), ((True, "x"), TypeError),
             ((None,), TypeError if old else False), ((True, 0.05), False), ((False,), False)]
    if old:     # (on 3.12 and later it waits forever, as threading's does)
        cases.append(((0.5,), TypeError))
    other: list = []
    t = threading.Thread(target=lambda: other.extend(
        _outcome(lock.acquire, *args) for args, _ in cases))
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert other == [want for _, want in cases]
    lock.release()


def test_lock_takes_no_argument_and_rlock_ignores_them(impl, manager):
    """`Lock(0)` is refused, as `threading.Lock(0)` is; `RLock(0)` is a plain
    RLock (procshare took the count of a semaphore: `Lock(0)` was created held
    and `RLock(2)` had two owners at once)."""
    with pytest.raises(impl.RemoteError):
        manager.Lock(0)
    for count in (0, 2):
        lock = manager.RLock(count)
        assert lock.acquire(True, 1) is True
        got: list = []
        t = threading.Thread(target=lambda g=got, lk=lock: g.append(lk.acquire(True, 0.05)))
        t.start()
        t.join(30)
        assert got == [False]       # held by this thread: one owner at a time
        lock.release()


@pytest.mark.parametrize("flag", [True, False])
def test_event_wait_timeouts_as_threading(manager, flag):
    """A set event returns True whatever the timeout (threading never looks at
    it); an unset one raises what threading raises, and returns at once for a
    NaN or negative timeout."""
    for timeout in ("x", [1], math.nan, -1, 0, 2**64, math.inf, 1e10, 0.01):
        local = threading.Event()
        ev = manager.Event()
        if flag:
            local.set()
            ev.set()
        _same_outcome(_outcome(local.wait, timeout), _outcome(ev.wait, timeout),
                      (flag, timeout))


def test_condition_wait_timeouts_as_threading(manager):
    """Condition.wait raises what threading raises for a timeout it cannot
    use, and keeps its lock; a NaN or negative one returns False at once."""
    local = threading.Condition()
    cond = manager.Condition()
    with local, cond:
        for timeout in ("x", 2**64, math.inf, math.nan, -1, 0):
            _same_outcome(_outcome(local.wait, timeout), _outcome(cond.wait, timeout),
                          timeout)
    with pytest.raises(RuntimeError):
        cond.release()      # released once, by the with: it was held all along
