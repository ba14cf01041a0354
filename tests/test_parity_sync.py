"""Scenario 6: Event, Lock, RLock, Semaphore, BoundedSemaphore, Condition and
Barrier through the manager, across real processes."""

from __future__ import annotations

import threading
import time

import pytest

import _workers
from _helpers import poll

# -- Event -------------------------------------------------------------------


def test_event(manager, ctx):
    ev = manager.Event()
    assert ev.is_set() is False
    t0 = time.monotonic()
    assert ev.wait(0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 2.0
    child = _workers.start_child(ctx, _workers.event_wait, ev, 10)
    time.sleep(0.3)
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
    child = _workers.start_child(ctx, _workers.condition_wait_for, cond, flag, 10)
    time.sleep(0.3)
    assert cond.acquire(timeout=10) is True
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
