"""Issue 4: locks that survive their owners (owner-died recovery) and
deadlock detection, with real processes under fork and spawn.

Owners really die (SIGKILL) and processes really deadlock.  Every wait is
bounded: the untimed acquires under test run in children that the harness
kills when they overrun, so a broken feature fails a test instead of hanging.
"""

from __future__ import annotations

import io
import json
import threading
import time
import warnings

import pytest

import _lock_workers as lw
import _workers
from _helpers import blocked_in_call, poll

WAIT = 15.0


@pytest.fixture
def impl():
    """These features are procshare's own: conftest's `manager` runs on procshare only."""
    import procshare.managers as managers

    return managers


def entry(manager, proxy):
    """The `manager.locks()` entry of ``proxy``."""
    for d in manager.locks():
        if d["id"] == proxy._id:
            return d
    raise AssertionError(f"{proxy._id} not in manager.locks()")


def wait_for_waiter(manager, proxy, pid, what="acquire"):
    """Bounded wait until process ``pid`` waits on ``proxy`` in the manager."""
    assert poll(lambda: any(w["pid"] == pid and w["for"] == what
                            for w in entry(manager, proxy)["waiters"]), WAIT), \
        f"pid {pid} never started waiting on {proxy._id}"


def kill(child):
    child.process.kill()
    child.process.join(5)
    child._conn.close()


def acquire_recording(lock, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        got = lock.acquire(**kw)
        elapsed = time.monotonic() - t0
    return got, elapsed, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def procshare_pid():
    import os

    return os.getpid()


def in_thread(func, *args):
    """Run ``func`` in a daemon thread; returns (thread, result list)."""
    out = []

    def run():
        try:
            out.append(("ok", func(*args)))
        except BaseException as exc:  # noqa: BLE001
            out.append(("error", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- owner died ------------------------------------------------------------------------------

KINDS = {
    "Lock": (lambda m: m.Lock(), 1),
    "RLock": (lambda m: m.RLock(), 3),               # held 3 levels deep
    "Semaphore": (lambda m: m.Semaphore(3), 2),      # 2 of 3 permits held
    "BoundedSemaphore": (lambda m: m.BoundedSemaphore(2), 2),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_owner_died_releases_within_1s_and_warns(manager, ctx, kind):
    import procshare

    make, times = KINDS[kind]
    lock = make(manager)
    ready = manager.Event()
    child = _workers.start_child(ctx, lw.hold, lock, ready, times)
    assert ready.wait(WAIT)
    pid = child.process.pid
    assert entry(manager, lock)["holders"][0]["count"] == times
    spare = kind == "Semaphore"
    if spare:
        assert lock.acquire(blocking=False)    # the last free permit: now we need theirs
    child.process.kill()                       # the owner dies holding the lock
    got, elapsed, caught = acquire_recording(lock, timeout=5)
    kill(child)
    assert got is True
    assert elapsed < 1.0, f"released after {elapsed:.2f} s"
    assert len(caught) == 1 and caught[0].category is procshare.OwnerDiedWarning
    assert issubclass(procshare.OwnerDiedWarning, RuntimeWarning)
    text = str(caught[0].message)
    assert f"pid {pid}" in text and lock._id in text and kind in text
    assert "half-updated" in text
    if kind == "RLock":
        assert "recursion count 3" in text
    if "Semaphore" in kind:
        assert "2 permits" in text
    # counts are consistent again: the dead owner's holds are all gone
    d = entry(manager, lock)
    assert [h["pid"] for h in d["holders"]] == [procshare_pid()]
    assert d["owner_died"]["pid"] == pid and d["owner_died"]["count"] == times
    assert d["owner_died"]["pending"] is False
    lock.release()
    if spare:
        lock.release()
    if kind == "Semaphore":
        assert [lock.acquire(blocking=False) for _ in range(4)] == [True] * 3 + [False]
        for _ in range(3):
            lock.release()
    elif kind == "BoundedSemaphore":
        assert [lock.acquire(blocking=False) for _ in range(3)] == [True, True, False]
        lock.release()
        lock.release()
        with pytest.raises(ValueError):
            lock.release()             # count restored to exactly its initial value
    else:
        assert entry(manager, lock)["locked"] is False
        assert lock.acquire(blocking=False) is True
        lock.release()
    # only the first acquirer after the death is warned
    assert acquire_recording(lock, timeout=1)[2] == []


def test_owner_died_condition(manager, ctx):
    import procshare

    cond = manager.Condition()
    ready = manager.Event()
    child = _workers.start_child(ctx, lw.hold_condition, cond, ready)
    assert ready.wait(WAIT)
    pid = child.process.pid
    kill(child)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cond:       # would hang forever if the lock stayed held
            assert cond.wait(0.05) is False
    died = [w for w in caught if w.category is procshare.OwnerDiedWarning]
    assert len(died) == 1
    text = str(died[0].message)
    assert f"pid {pid}" in text and f"Condition {cond._id}" in text


def test_dead_waiter_of_condition_does_not_swallow_notify(manager, ctx):
    cond = manager.Condition()
    ready1, ready2 = manager.Event(), manager.Event()
    doomed = _workers.start_child(ctx, lw.condition_wait_one, cond, ready1, 60)
    assert ready1.wait(WAIT)
    wait_for_waiter(manager, cond, doomed.process.pid, "notify")
    live = _workers.start_child(ctx, lw.condition_wait_one, cond, ready2, 10)
    assert ready2.wait(WAIT)
    wait_for_waiter(manager, cond, live.process.pid, "notify")
    kill(doomed)    # first in line: a plain notify() would go to it
    assert poll(lambda: all(w["pid"] != doomed.process.pid
                            for w in entry(manager, cond)["waiters"]), 2.0)
    with cond:
        cond.notify()
    assert live.result(WAIT) is True


def test_condition_over_another_managers_lock_keeps_deadlines(manager, other_manager):
    """Waits and acquires of a Condition over a lock of another manager end at
    the call's deadline (the stdlib's would block), and leave that lock as
    threading's would: held by the waiter after wait(), free after a failed
    acquire."""
    import procshare

    lk = other_manager.Lock()
    cond = manager.Condition(lk)
    with cond:
        t0 = time.monotonic()
        with pytest.raises(procshare.CallTimeout), procshare.timeout(0.3):
            cond.wait()
        assert time.monotonic() - t0 < WAIT
        assert lk.acquire(False) is False       # held again, by this waiter
    assert lk.acquire(False) is True            # and released by the with
    try:
        with pytest.raises(procshare.CallTimeout), procshare.timeout(0.3):
            cond.acquire()
    finally:
        lk.release()
    assert _free(lk)                            # the timed-out acquire took nothing
    assert cond.locked() is False


def _free(lock) -> bool:
    """Is `lock` free (taken and given back at once)?"""
    if lock.acquire(False):
        lock.release()
        return True
    return False


def test_a_cancelled_wait_on_a_condition_over_another_managers_lock(manager, other_manager):
    """cancel() ends the wait in the manager: the lock is taken again, as after
    any wait, and released by the with block; nothing is left held."""
    import procshare

    lk = other_manager.Lock()
    cond = manager.Condition(lk)
    with cond:
        fut = procshare.async_(cond).wait()
        # the wait gives the lock up once it sleeps: then it can be seen free
        assert poll(lambda: _free(lk), WAIT)
        assert fut.cancel()
        assert fut.cancelled()
    assert poll(lambda: _free(lk), WAIT)


def test_dead_waiter_of_a_condition_over_another_managers_lock(manager, other_manager, ctx):
    """Its sleepers are tracked as the manager's own Condition's are: one whose
    client died gives up, and a notify goes to a live one."""
    cond = manager.Condition(other_manager.Lock())
    ready1, ready2 = manager.Event(), manager.Event()
    doomed = _workers.start_child(ctx, lw.condition_wait_one, cond, ready1, 60)
    assert ready1.wait(WAIT)
    assert blocked_in_call(doomed.process.pid, manager=manager)
    live = _workers.start_child(ctx, lw.condition_wait_one, cond, ready2, 30)
    assert ready2.wait(WAIT)
    assert blocked_in_call(live.process.pid, manager=manager)
    kill(doomed)    # first in line: a plain notify() would go to it
    assert poll(lambda: all(c["pid"] != doomed.process.pid for c in manager.clients()), WAIT)
    with cond:
        cond.notify()
    assert live.result(WAIT) is True


def test_a_foreign_condition_waiter_that_dies_while_it_waits_for_the_lock(
        manager, other_manager, ctx):
    """Notified, it waits to take the other manager's lock again; its client dies
    meanwhile: once the notifier lets go, the lock is free (it is not kept for a
    client that is gone)."""
    lk = other_manager.Lock()
    cond = manager.Condition(lk)
    ready = manager.Event()
    child = _workers.start_child(ctx, lw.condition_wait_one, cond, ready, 60)
    assert ready.wait(WAIT)
    assert blocked_in_call(child.process.pid, manager=manager)
    with cond:      # taken once the child's wait let it go
        cond.notify()
        kill(child)     # its call's thread is busy: the manager lists it as dead
        assert poll(lambda: all(c["pid"] != child.process.pid or c["state"] == "dead"
                                for c in manager.clients()), WAIT)
    assert poll(lambda: _free(lk), WAIT)


def test_waiter_of_dead_client_never_owns_the_lock(manager, ctx):
    lock = manager.Lock()
    ready, go = manager.Event(), manager.Event()
    holder = _workers.start_child(ctx, lw.hold_until, lock, ready, go)
    assert ready.wait(WAIT)
    waiter = _workers.start_child(ctx, lw.acquire_untimed, lock)
    wait_for_waiter(manager, lock, waiter.process.pid)
    kill(waiter)      # its server thread is still blocked in acquire()
    assert poll(lambda: entry(manager, lock)["waiters"] == [], 2.0)
    go.set()          # the holder releases: nobody but us may get it now
    assert holder.result(WAIT) == "released"
    got, _elapsed, caught = acquire_recording(lock, timeout=2)
    assert got is True and caught == []
    assert [h["pid"] for h in entry(manager, lock)["holders"]] == [procshare_pid()]
    lock.release()


def test_barrier_party_dies_while_waiting(manager, ctx):
    barrier = manager.Barrier(3)
    live = _workers.start_child(ctx, lw.barrier_wait_report, barrier, WAIT)
    doomed = _workers.start_child(ctx, lw.barrier_wait_report, barrier, 60)
    assert poll(lambda: barrier.n_waiting == 2, WAIT)
    pid = doomed.process.pid
    kill(doomed)
    outcome = live.result(WAIT)
    assert outcome[0] == "broken" and f"pid {pid}" in outcome[1]
    assert outcome[2] < WAIT - 5        # broken by the death, not by its own timeout
    assert barrier.broken is True
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError, match=f"pid {pid}"):
        barrier.wait(5)
    assert time.monotonic() - t0 < 2.0
    assert entry(manager, barrier)["owner_died"]["pid"] == pid
    barrier.reset()
    assert barrier.broken is False
    assert entry(manager, barrier)["owner_died"] is None


def test_barrier_party_dying_between_rounds_does_not_break_it(manager, ctx):
    # only a death *while waiting at* the barrier breaks it: a party that passed
    # round 1 and died later is no different from one that exited (wave 2 rule)
    barrier = manager.Barrier(2)
    ready = manager.Event()
    worker = _workers.start_child(ctx, lw.barrier_rounds, barrier, ready, 1, 60)
    assert barrier.wait(WAIT) in (0, 1)          # round 1 with the worker
    assert ready.wait(WAIT)                       # it is now "working"
    pid = worker.process.pid
    t, out = in_thread(lw.barrier_wait_report, barrier, 3)
    assert poll(lambda: barrier.n_waiting == 1, WAIT)
    kill(worker)                                  # dies before round 2
    assert poll(lambda: all(c["pid"] != pid for c in manager.clients()), WAIT)
    assert barrier.broken is False and barrier.n_waiting == 1
    t.join(WAIT)
    assert out and out[0][0] == "ok"
    result = out[0][1]
    # the waiter's own timeout ended it, as with threading.Barrier
    assert result[0] == "broken" and f"pid {pid}" not in result[1] and result[2] >= 2.5
    barrier.reset()


# -- deadlocks ----------------------------------------------------------------------------


def test_two_process_deadlock(manager, ctx):
    import procshare

    a, b = manager.Lock(), manager.Lock()
    ready = manager.Event()
    assert a.acquire()
    child = _workers.start_child(ctx, lw.hold_then_take, b, a, ready)
    assert ready.wait(WAIT)
    wait_for_waiter(manager, a, child.process.pid)
    t0 = time.monotonic()
    with pytest.raises(procshare.DeadlockError) as info:
        b.acquire()
    # detection is immediate (the issue asks for 100 ms; one round trip on an idle
    # machine); the bound is loose so that a loaded CI machine does not flake
    assert time.monotonic() - t0 < 0.5
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, procshare.ProcshareError)
    text = str(err)
    me, other = procshare_pid(), child.process.pid
    assert f"pid {me} thread 'MainThread' (this call) waits for Lock {b._id}, " \
           f"held by pid {other} thread 'MainThread'" in text
    assert f"pid {other} thread 'MainThread' (waiting for " in text
    assert f"waits for Lock {a._id}, held by pid {me} thread 'MainThread'" in text
    assert "consistent order" in text and "timeout" in text
    assert [c["pid"] for c in err.cycle] == [me, other]
    # nothing changed: we still hold a, we did not get b, the child still waits
    assert [h["pid"] for h in entry(manager, a)["holders"]] == [me]
    assert [h["pid"] for h in entry(manager, b)["holders"]] == [other]
    assert [w["pid"] for w in entry(manager, a)["waiters"]] == [other]
    assert entry(manager, b)["waiters"] == []
    a.release()                         # the victim backs off; the other one goes on
    assert child.result(WAIT)[0] == "ok"
    assert b.acquire(timeout=5) is True
    b.release()


def test_three_process_deadlock(manager, ctx):
    import procshare

    l1, l2, l3 = manager.Lock(), manager.RLock(), manager.Lock()
    r1, r2 = manager.Event(), manager.Event()
    assert l1.acquire()
    c1 = _workers.start_child(ctx, lw.hold_then_take, l2, l1, r1)    # holds l2, wants l1
    assert r1.wait(WAIT)
    c2 = _workers.start_child(ctx, lw.hold_then_take, l3, l2, r2)    # holds l3, wants l2
    assert r2.wait(WAIT)
    wait_for_waiter(manager, l1, c1.process.pid)
    wait_for_waiter(manager, l2, c2.process.pid)
    with pytest.raises(procshare.DeadlockError) as info:
        l3.acquire()                     # closes l3 -> c2 -> l2 -> c1 -> l1 -> us
    text = str(info.value)
    pids = [procshare_pid(), c2.process.pid, c1.process.pid]
    assert [c["pid"] for c in info.value.cycle] == pids
    for lock in (l1, l2, l3):
        assert lock._id in text
    for pid in pids:
        assert f"pid {pid} thread 'MainThread'" in text
    assert "cycle of 3 threads" in text
    l1.release()
    assert c1.result(WAIT)[0] == "ok"
    assert c2.result(WAIT)[0] == "ok"


def test_thread_cycle_in_one_process(manager, ctx):
    a, b = manager.Lock(), manager.RLock()
    results = _workers.run_child(ctx, lw.thread_cycle, a, b, timeout=WAIT)
    assert sorted(results) == ["worker-A", "worker-B"]
    victims = [name for name, r in results.items() if r != "ok"]
    assert len(victims) == 1, results
    kind, text = results[victims[0]]
    assert kind == "deadlock"
    assert "thread 'worker-A'" in text and "thread 'worker-B'" in text
    assert a._id in text and b._id in text


def test_exactly_one_victim_per_round(manager, ctx):
    a, b = manager.Lock(), manager.Lock()
    barrier = manager.Barrier(2)
    rounds = 4
    c1 = _workers.start_child(ctx, lw.opposite_order_rounds, a, b, barrier, rounds)
    c2 = _workers.start_child(ctx, lw.opposite_order_rounds, b, a, barrier, rounds)
    r1, r2 = c1.result(WAIT * 2), c2.result(WAIT * 2)
    assert len(r1) == len(r2) == rounds
    for x, y in zip(r1, r2):
        assert sorted([x, y]) == ["ok", "victim"], (r1, r2)


def test_semaphore_count_2_no_false_deadlock(manager, ctx):
    sem, lock = manager.Semaphore(2), manager.Lock()
    ready1, go1, ready2 = manager.Event(), manager.Event(), manager.Event()
    got_sem, go_ours = threading.Event(), threading.Event()

    def ours():     # one thread of ours: holds permit 1, then waits for the lock
        assert sem.acquire()
        got_sem.set()
        assert go_ours.wait(WAIT)
        return lock.acquire()

    t, out = in_thread(ours)
    assert got_sem.wait(WAIT)
    c1 = _workers.start_child(ctx, lw.sem_then_lock, sem, lock, ready1, go1)  # permit 2
    assert ready1.wait(WAIT)
    c2 = _workers.start_child(ctx, lw.hold_then_take, lock, sem, ready2)  # holds lock, wants sem
    assert ready2.wait(WAIT)
    wait_for_waiter(manager, sem, c2.process.pid)
    # us -> lock -> c2 -> sem -> {us, c1}: c1 is free, so this is no deadlock
    go_ours.set()
    # a wait is listed only once its deadlock check passed (the check and the
    # listing are atomic): our acquire was not refused, and still waits for c2
    wait_for_waiter(manager, lock, procshare_pid())
    assert [h["pid"] for h in entry(manager, lock)["holders"]] == [c2.process.pid]
    assert out == [] and t.is_alive()
    # now c1 waits for the lock too: every holder of sem is stuck -> c1 is the victim
    go1.set()
    kind, text = c1.result(WAIT)
    assert kind == "deadlock"
    assert text.count(f"Semaphore {sem._id}, held by ") == 1
    assert text.count(f"Lock {lock._id}, held by ") == 2
    for pid in (c1.process.pid, c2.process.pid, procshare_pid()):
        assert f"pid {pid} thread " in text
    # c1 backed off (gave its permit back): c2 goes on, then we get the lock
    assert c2.result(WAIT)[0] == "ok"
    t.join(WAIT)
    assert out == [("ok", True)]
    lock.release()
    sem.release()


def test_timed_acquire_in_a_cycle_times_out_like_stdlib(manager, ctx):
    a, b = manager.Lock(), manager.Lock()
    ready = manager.Event()
    assert a.acquire()
    child = _workers.start_child(ctx, lw.hold_then_take, b, a, ready)
    assert ready.wait(WAIT)
    wait_for_waiter(manager, a, child.process.pid)
    t0 = time.monotonic()
    assert b.acquire(timeout=0.3) is False      # no DeadlockError: the timeout ends it
    assert 0.25 <= time.monotonic() - t0 < 2.0
    a.release()
    assert child.result(WAIT)[0] == "ok"
    # the other way round: the member that waits first has the timeout, so the
    # untimed acquire that closes the cycle just waits until that one gives up
    assert a.acquire()
    ready.clear()
    child = _workers.start_child(ctx, lw.hold_then_take, b, a, ready, 0.5)
    assert ready.wait(WAIT)
    wait_for_waiter(manager, a, child.process.pid)
    t0 = time.monotonic()
    assert b.acquire() is True
    assert 0.2 <= time.monotonic() - t0 < 5.0
    assert child.result(WAIT)[0] == "timeout"
    b.release()
    a.release()


def test_plain_lock_handoff_is_not_a_deadlock(manager, ctx):
    lock = manager.Lock()
    assert lock.acquire()
    child = _workers.start_child(ctx, lw.release_later, lock, 0.5)
    t0 = time.monotonic()
    assert lock.acquire() is True     # waits for itself; the child releases it
    assert time.monotonic() - t0 >= 0.3
    assert child.result(WAIT) == "released"
    lock.release()


def test_condition_wait_in_the_graph(manager, ctx):
    import procshare

    cond, lock = manager.Condition(), manager.Lock()
    ready = manager.Event()
    with cond:
        child = _workers.start_child(ctx, lw.lock_then_condition, lock, cond, ready)
        assert ready.wait(WAIT)
        wait_for_waiter(manager, cond, child.process.pid)
        # we hold cond's lock and the child waits for it while holding `lock`
        with pytest.raises(procshare.DeadlockError) as info:
            lock.acquire()
        assert f"the lock of Condition {cond._id}" in str(info.value)
        # wait() gives the lock up while waiting: the child gets it and notifies
        assert cond.wait(WAIT) is True
    assert child.result(WAIT) == "notified"
    assert lock.acquire(timeout=5) is True
    lock.release()


# -- introspection -------------------------------------------------------------------------


def test_locks_introspection(manager, ctx):
    lock, rlock, sem = manager.Lock(), manager.RLock(), manager.Semaphore(2)
    cond, barrier = manager.Condition(), manager.Barrier(2)
    ready = manager.Event()
    me = procshare_pid()
    rlock.acquire()
    rlock.acquire()
    sem.acquire()
    assert lock.acquire()
    child = _workers.start_child(ctx, lw.acquire_untimed, lock)
    wait_for_waiter(manager, lock, child.process.pid)
    waiter = _workers.start_child(ctx, lw.barrier_wait_report, barrier, WAIT)
    assert poll(lambda: barrier.n_waiting == 1, WAIT)
    # the durations checked below, as the manager counts them
    assert poll(lambda: [w["waited"] >= 0.2 for w in entry(manager, lock)["waiters"]] == [True],
                WAIT)
    snap = manager.locks()
    json.dumps(snap)                         # JSON-friendly, for the CLI
    by_id = {d["id"]: d for d in snap}
    assert {lock._id, rlock._id, sem._id, cond._id, barrier._id} <= set(by_id)
    assert ready._id not in by_id            # an Event is not lock-like
    d = by_id[lock._id]
    assert (d["typeid"], d["kind"], d["locked"]) == ("Lock", "Lock", True)
    (h,) = d["holders"]
    assert (h["pid"], h["thread_name"], h["count"]) == (me, "MainThread", 1)
    assert h["held_for"] >= 0.2 and abs(h["since"] - (time.time() - h["held_for"])) < 1
    (w,) = d["waiters"]
    assert (w["pid"], w["thread_name"], w["timed"]) == (child.process.pid, "MainThread", False)
    assert w["waited"] >= 0.2
    assert d["owner_died"] is None
    assert by_id[rlock._id]["holders"][0]["count"] == 2
    assert by_id[sem._id]["value"] == 1 and by_id[sem._id]["holders"][0]["count"] == 1
    assert by_id[cond._id]["kind"] == "Condition" and by_id[cond._id]["holders"] == []
    b = by_id[barrier._id]
    assert (b["kind"], b["parties"], b["n_waiting"], b["broken"]) == ("Barrier", 2, 1, False)
    assert [x["pid"] for x in b["waiters"]] == [waiter.process.pid]
    lock.release()
    assert child.result(WAIT) == "acquired"
    assert barrier.wait(WAIT) in (0, 1)
    assert waiter.result(WAIT)[0] == "passed"
    rlock.release()
    rlock.release()
    sem.release()


def test_demo_scenes(ctx):
    from procshare.cli import demo

    out = io.StringIO()
    assert demo.run(["deadlock", "owner-died"], start_method=ctx.get_start_method(), out=out) == 0, \
        out.getvalue()
    text = out.getvalue()
    assert "DeadlockError" in text and "OwnerDiedWarning" in text


def test_event_set_then_clear_wakes_every_waiter():
    """A set() then clear() pulse wakes every server call waiting on the event
    with True, as threading.Event's waiters (the wait re-checked the flag when
    woken, found it cleared again, and slept on to its timeout, or forever)."""
    from procshare.server import callctx, primitives

    ev = primitives.Event()
    ev._cond = threading.Condition(threading.RLock())   # (so the test can hold it)
    got: list = []

    def waiter() -> None:
        call = callctx.CallState()
        call.rid = 1
        callctx.server_state.call = call        # (this thread serves a call)
        try:
            got.append(ev.wait(30))
        finally:
            callctx.server_state.call = None

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    assert poll(lambda: len(ev._cond._waiters) == 3, WAIT), "the waiters never waited"
    with ev._cond:      # both before any waiter looks again
        ev.set()
        ev.clear()
    for t in threads:
        t.join(WAIT)
    assert got == [True, True, True]
