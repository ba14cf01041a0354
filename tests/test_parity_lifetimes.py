"""Parity: what the stdlib allows around a process's exit must work the same.

A child that takes a Lock or BoundedSemaphore and exits normally leaves it
held; another process may release it (threading allows any thread to release
a Lock).  Barrier parties that pass the barrier and exit break nothing.  An
error raised while the manager creates an object is a RemoteError."""

from __future__ import annotations

import gc
import threading

import pytest

import _lifetime_workers as lw
import _workers


@pytest.mark.parametrize("kind", ["Lock", "BoundedSemaphore"])
def test_lock_handed_off_by_a_child_that_exits(manager, ctx, kind):
    lock = getattr(manager, kind)()
    assert _workers.run_child(ctx, lw.acquire_and_exit, lock) == "held"
    # the child exited normally, holding it; this process may release it, as
    # with threading (procshare must not have released it behind its back)
    lock.release()
    assert lock.acquire(timeout=5)
    lock.release()
    if kind == "BoundedSemaphore":
        with pytest.raises(ValueError):
            lock.release()
    else:
        with pytest.raises(RuntimeError):
            lock.release()


def test_barrier_parties_that_exit_break_nothing(manager, ctx):
    rounds = 40 if ctx.get_start_method() == "fork" else 6
    barrier = manager.Barrier(5)
    broken = 0
    for _ in range(rounds):
        children = [_workers.start_child(ctx, lw.barrier_once, barrier) for _ in range(4)]
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            broken += 1
            barrier.reset()
        for c in children:
            try:
                c.result(30)
            except _workers.ChildFailed:
                broken += 1
    assert broken == 0
    assert barrier.broken is False


def test_error_while_creating_an_object_is_a_remote_error(manager, impl):
    with pytest.raises(impl.RemoteError) as info:
        manager.Pool(0)
    assert "Number of processes must be at least 1" in str(info.value)


def test_the_stdlibs_except_remote_error_catches_it(manager, impl):
    """Code that kept `from multiprocessing.managers import RemoteError` (a
    library, say) still catches the manager's RemoteErrors."""
    import multiprocessing.managers as std

    assert issubclass(impl.RemoteError, std.RemoteError)
    d = manager.dict()
    with pytest.raises(std.RemoteError):
        d._callmethod("no_such_method_exposed")
    with pytest.raises(std.RemoteError):
        manager.Pool(0)


def test_each_explicit_incref_is_given_back_when_the_proxy_goes(manager):
    """`proxy._incref()` takes one more reference, which goes with the proxy."""
    import gc
    import time

    before = manager._number_of_objects()
    p = manager.list([1, 2])
    p._incref()
    p._incref()
    assert manager._number_of_objects() == before + 1
    del p
    gc.collect()
    end = time.monotonic() + 10
    while manager._number_of_objects() != before and time.monotonic() < end:
        time.sleep(0.01)
    assert manager._number_of_objects() == before


def test_a_bad_timeout_to_condition_wait_changes_nothing(manager):
    cond = manager.Condition()
    with cond:
        with pytest.raises(TypeError):
            cond.wait("1")
        assert cond.wait(0.01) is False      # still its owner
    with pytest.raises(RuntimeError):
        cond.release()                      # released once, by the with block


def test_waits_with_a_nan_timeout_return_at_once(manager):
    import math

    ev, cond = manager.Event(), manager.Condition()
    got = {}

    def waits():
        got["event"] = ev.wait(math.nan)
        with cond:
            got["cond"] = cond.wait(math.nan)

    t = threading.Thread(target=waits, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and got == {"event": False, "cond": False}


def test_a_thread_that_outlives_its_process_target_keeps_its_calls(manager, ctx):
    """A child's target returns while a thread it started (not a daemon) waits
    in the manager: the process waits for that thread, and its call goes on
    (procshare said goodbye at the target's end, before Python 3.13, and the
    manager cancelled the call: ClientGone)."""
    q = manager.Queue()
    out = manager.list()
    ready, finalized = ctx.Event(), ctx.Event()
    p = ctx.Process(target=lw.thread_outlives_target, args=(q, out, ready, finalized))
    p.start()
    try:
        assert finalized.wait(15), "the child's target never returned"
        q.put("item")
        p.join(20)
        assert p.exitcode == 0
        assert list(out) == ["item"]
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        ready = finalized = p = None    # (their named semaphores go with them)
        gc.collect()


def test_daemon_threads_blocked_in_the_manager_end_silently(manager, ctx, tmp_path):
    """Daemon threads still waiting in the manager when their process exits
    end silently, as the stdlib's (procshare's goodbye cancelled their calls,
    and each printed a traceback on the way out)."""
    q = manager.Queue()
    ev = manager.Event()
    ready = ctx.Event()
    err = tmp_path / "stderr.txt"
    p = ctx.Process(target=lw.daemon_threads_blocked_at_exit, args=(q, ev, str(err), ready))
    p.start()
    p.join(20)
    assert ready.is_set() and p.exitcode == 0
    assert err.read_text() == ""
    ready = p = None    # (their named semaphores go with them)
    gc.collect()


def test_calls_after_another_process_shut_the_manager_down_are_broken_pipes(impl, ctx):
    """A process whose manager another process shut down gets BrokenPipeError
    from its proxies, every time, as with the stdlib (procshare's second call
    reconnected and raised a FileNotFoundError that `except BrokenPipeError:`
    missed)."""
    m = impl.SyncManager(ctx=ctx)
    m.start()
    used, shut = ctx.Event(), ctx.Event()
    try:
        lst = m.list()
        child = _workers.start_child(ctx, lw.calls_after_shutdown, lst, used, shut)
        assert used.wait(15)
        m.shutdown()
        shut.set()
        assert child.result(20) == [True, True, True]
    finally:
        m.shutdown()
        used = shut = child = lst = None    # (their named semaphores go with them)
        gc.collect()
