"""What the child processes of tests/test_locks.py run (module level, for spawn).

Every wait here is bounded, except the untimed acquires that the tests are
about: those run in children that the harness kills if they overrun
(``ChildHandle.result(timeout)``), so a broken deadlock detector fails a test
instead of hanging the run.  procshare is imported inside the functions, as
in ``_workers``.
"""

from __future__ import annotations

import threading
import time

WAIT = 15.0  # seconds: the bound on every wait that is not under test


def hold(lock, ready, times=1, seconds=60.0):
    """Acquire ``lock`` ``times`` times, say so, then sleep until killed."""
    for _ in range(times):
        lock.acquire()
    ready.set()
    time.sleep(seconds)


def hold_condition(cond, ready, seconds=60.0):
    """Hold a Condition's lock until killed."""
    with cond:
        ready.set()
        time.sleep(seconds)


def acquire_untimed(lock):
    """Wait for ``lock`` with no timeout (the test kills this child)."""
    lock.acquire()
    return "acquired"


def hold_until(lock, ready, go):
    """Hold ``lock`` until ``go`` is set, then release it."""
    lock.acquire()
    ready.set()
    go.wait(WAIT)
    lock.release()
    return "released"


def release_later(lock, delay):
    """Release a plain Lock this process did not acquire."""
    time.sleep(delay)
    lock.release()
    return "released"


def hold_then_take(first, second, ready, timeout=None):
    """Take ``first``, say so, then take ``second`` (with no timeout unless
    given).  Returns ("ok", seconds waited), ("timeout", seconds waited) or
    ("deadlock", message)."""
    from procshare import DeadlockError

    with first:
        ready.set()
        t0 = time.monotonic()
        try:
            if not second.acquire(timeout=timeout):
                return ("timeout", time.monotonic() - t0)
        except DeadlockError as exc:
            return ("deadlock", str(exc))
        second.release()
        return ("ok", time.monotonic() - t0)


def sem_then_lock(sem, lock, ready, go):
    """Take a permit of ``sem``; when told, take ``lock`` with no timeout.
    A victim backs off: it gives the permit back."""
    from procshare import DeadlockError

    sem.acquire()
    ready.set()
    go.wait(WAIT)
    try:
        lock.acquire()
    except DeadlockError as exc:
        sem.release()
        return ("deadlock", str(exc))
    lock.release()
    sem.release()
    return ("ok", "")


def opposite_order_rounds(first, second, barrier, rounds):
    """Each round: take ``first``, meet the other process, take ``second``.
    Returns per round "ok" (got both) or "victim" (DeadlockError, backed off)."""
    from procshare import DeadlockError

    out = []
    for _ in range(rounds):
        first.acquire()
        barrier.wait(WAIT)
        try:
            second.acquire()
        except DeadlockError:
            first.release()
            out.append("victim")
        else:
            second.release()
            first.release()
            out.append("ok")
        barrier.wait(WAIT)
    return out


def thread_cycle(a, b):
    """Two threads of this process take ``a`` and ``b`` in opposite order.
    Returns {thread name: "ok" | ("deadlock", message)}."""
    from procshare import DeadlockError

    results = {}
    has = {"A": threading.Event(), "B": threading.Event()}

    def run(mine, other, me, them, pause):
        try:
            with mine:
                has[me].set()
                has[them].wait(WAIT)
                time.sleep(pause)  # let the other one start waiting first
                try:
                    with other:
                        results[threading.current_thread().name] = "ok"
                except DeadlockError as exc:
                    results[threading.current_thread().name] = ("deadlock", str(exc))
        except BaseException as exc:  # report, never hang the child
            results[threading.current_thread().name] = ("error", repr(exc))

    threads = [threading.Thread(target=run, args=(a, b, "A", "B", 0.0), name="worker-A"),
               threading.Thread(target=run, args=(b, a, "B", "A", 0.4), name="worker-B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    return results


def condition_wait_one(cond, ready, timeout):
    """Wait on ``cond`` once; return what wait() returned."""
    with cond:
        ready.set()
        return cond.wait(timeout)


def lock_then_condition(lock, cond, ready):
    """Hold ``lock``, then take ``cond``'s lock and notify."""
    with lock:
        ready.set()
        with cond:
            cond.notify()
    return "notified"


def barrier_rounds(barrier, ready, rounds, pause):
    """Pass ``rounds`` rounds of ``barrier``, then say so and work (sleep)."""
    for _ in range(rounds):
        barrier.wait(WAIT)
    ready.set()
    time.sleep(pause)
    return "done"


def barrier_wait_report(barrier, timeout):
    """Wait at ``barrier``; return ("passed", index) or ("broken", message, seconds)."""
    t0 = time.monotonic()
    try:
        return ("passed", barrier.wait(timeout))
    except threading.BrokenBarrierError as exc:
        return ("broken", str(exc), time.monotonic() - t0)
