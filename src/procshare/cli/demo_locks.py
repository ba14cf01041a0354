"""Demo scenes for issue 4: a deadlock detected, a lock recovered from a killed owner.

Owns: the ``deadlock`` and ``owner-died`` scenes of ``python -m procshare
demo`` (registered with ``procshare.cli.scenes.scene``) and the workers they start.

Rules it keeps (those of ``procshare.cli.demo``): only the stdlib-compatible API plus
procshare's two new names (DeadlockError, OwnerDiedWarning); every worker is module-level, so
fork, spawn and forkserver all work; every wait is bounded, workers that overrun are killed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers as std_managers
import os
import signal
import textwrap
import time
import warnings

import procshare

from .scenes import WIDTH, Demo, run_workers, scene

WAIT = 20.0  # seconds any one wait of a scene may take


# --------------------------------------------------------------------------------------------
# Scene: deadlock
# --------------------------------------------------------------------------------------------


def transfer(name, first, second, barrier, results, patience) -> None:
    """Take `first`, meet the other worker, then take `second` (the classic lock-order bug).

    `patience` None waits like plain code does (forever); a number bounds the wait, which
    the stdlib run uses so that the demo itself cannot hang."""
    with first:
        barrier.wait(WAIT)
        try:
            if patience is None:
                got = second.acquire()
            else:
                got = second.acquire(timeout=patience)
        except procshare.DeadlockError as exc:
            results.put((name, "DeadlockError", str(exc)))
            return  # leaving the with-block releases `first`: this worker backs off
        if got:
            try:
                results.put((name, "done", "took both locks"))
            finally:
                second.release()
        else:
            results.put((name, "stuck", f"still waiting after {patience} s"))


def _quote(demo: Demo, text: str) -> None:
    """Print a message indented, wrapped to the demo's width."""
    for line in text.splitlines():
        lead = "    " + " " * (len(line) - len(line.lstrip()))
        demo.line(textwrap.fill(line.strip(), WIDTH, initial_indent=lead,
                                subsequent_indent=lead + "    "))


def _show(demo: Demo, results, n: int) -> list:
    seen = []
    for _ in range(n):
        try:
            name, outcome, text = results.get(timeout=WAIT)
        except Exception:
            break
        seen.append(outcome)
        demo.result(name, outcome if outcome == "DeadlockError" else f"{outcome}: {text}")
        if outcome == "DeadlockError":
            demo.line()
            _quote(demo, text)
            demo.line()
    return seen


@scene(
    "deadlock",
    "Deadlock: two processes take two locks in opposite order",
    "one process gets DeadlockError naming the cycle; the other completes",
)
def deadlock_scene(demo: Demo) -> bool:
    demo.say(
        """
        Two workers move money between two accounts, each guarded by a manager Lock. Worker
        "left" takes lock A then lock B; worker "right" takes B then A. A barrier makes sure
        both hold their first lock before they reach for the second: the textbook deadlock.
        """
    )
    demo.code(
        """
        def transfer(first, second):
            with first:
                barrier.wait()
                with second:              # the other worker holds it, and waits for ours
                    ...
        Process(target=transfer, args=(a, b)).start()
        Process(target=transfer, args=(b, a)).start()
        """
    )
    ok = True
    if demo.compare_stdlib:
        demo.say(
            """
            With the stdlib's multiprocessing.managers both workers would wait forever, and
            nothing would say why. (Here they give up after 2 s, so that the demo goes on.)
            """
        )
        demo.flush()
        with std_managers.SyncManager() as m:
            a, b, barrier, results = m.Lock(), m.Lock(), m.Barrier(2), m.Queue()
            run_workers(transfer, [("left", a, b, barrier, results, 2.0),
                                   ("right", b, a, barrier, results, 2.0)], timeout=WAIT)
            _show(demo, results, 2)
        demo.line()
    demo.say(
        """
        With procshare the manager sees both waits. The acquire that would close the cycle
        raises DeadlockError at once, and its message names every process, thread and lock
        in the cycle. That worker backs off (leaving its with-block releases its lock), and
        the other one completes:
        """
    )
    demo.flush()
    with procshare.Manager() as m:
        a, b, barrier, results = m.Lock(), m.Lock(), m.Barrier(2), m.Queue()
        codes = run_workers(transfer, [("left", a, b, barrier, results, None),
                                       ("right", b, a, barrier, results, None)], timeout=WAIT)
        seen = _show(demo, results, 2)
    ok = sorted(seen) == ["DeadlockError", "done"] and codes == [0, 0]
    demo.result("procshare", "one DeadlockError, one worker done" if ok
                else f"outcomes {seen}, exit codes {codes}", ok)
    demo.line()
    demo.say(
        """
        Only the acquire that closes the cycle fails, and nothing else changes. Detection
        never guesses: a wait with a timeout ends by itself, so it is never reported, and a
        semaphore wait counts only when every holder of a permit is stuck too. To fix the
        bug itself, take locks in one order everywhere.
        """
    )
    return ok


# --------------------------------------------------------------------------------------------
# Scene: owner died
# --------------------------------------------------------------------------------------------


def half_transfer(lock, accounts, ready) -> None:
    """Take the lock, move money out of one account, then hang before paying it in."""
    lock.acquire()
    accounts["alice"] = accounts["alice"] - 50      # debit done ...
    ready.set()
    time.sleep(WAIT)                                # ... killed before the credit


def _kill_holder(demo: Demo, manager_cls, label: str):
    """Run half_transfer in a process, SIGKILL it, then try the lock; return what we saw."""
    ctx = multiprocessing.get_context()
    with manager_cls() as m:
        lock, ready = m.Lock(), m.Event()
        accounts = m.dict(alice=100, bob=0)
        p = ctx.Process(target=half_transfer, args=(lock, accounts, ready))
        p.start()
        if not ready.wait(WAIT):
            p.kill()
            p.join(5)
            demo.result(label, "the worker never took the lock", False)
            return None
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        demo.result(label, f"worker pid {p.pid} killed (SIGKILL) while holding the lock")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            got = lock.acquire(timeout=2.0)
            took = time.monotonic() - t0
        if got:
            lock.release()
        return got, took, [w for w in caught if w.category is procshare.OwnerDiedWarning], \
            dict(accounts), p.pid


@scene(
    "owner-died",
    "Owner died: a process holding a lock is killed",
    "the next acquirer gets the lock, with OwnerDiedWarning about half-updated data",
)
def owner_died_scene(demo: Demo) -> bool:
    demo.say(
        """
        A worker takes a manager Lock, moves 50 out of Alice's account, and is killed with
        SIGKILL before it pays the 50 into Bob's. Then the main process asks for the lock.
        """
    )
    demo.code(
        """
        lock.acquire()
        accounts["alice"] -= 50      # ...killed here, before accounts["bob"] += 50
        """
    )
    demo.flush()
    if demo.compare_stdlib:
        seen = _kill_holder(demo, std_managers.SyncManager, "stdlib")
        if seen is not None:
            got, took, _w, _accounts, _pid = seen
            demo.result("stdlib", "acquired" if got else
                        f"lock.acquire(timeout=2) gave up after {took:.1f} s: the lock stays "
                        "held by the dead process forever")
        demo.line()
    seen = _kill_holder(demo, procshare.managers.SyncManager, "procshare")
    if seen is None:
        return False
    got, took, died, accounts, pid = seen
    ok = bool(got and died and f"pid {pid}" in str(died[0].message))
    demo.result("procshare", f"acquired after {took * 1000:.0f} ms" if got else "NOT acquired",
                ok)
    if died:
        demo.line()
        _quote(demo, "OwnerDiedWarning: " + str(died[0].message))
        demo.line()
    demo.result("accounts", f"{accounts}  (50 is missing: the data really is half-updated)")
    demo.line()
    demo.say(
        """
        The manager saw the worker's connection drop, released every lock it held (all
        levels of an RLock, every permit of a semaphore), and told the next acquirer, like
        EOWNERDEAD on a robust mutex: the lock is yours, but check what it protects.
        Barriers break instead (BrokenBarrierError) when a party dies, so nobody waits for
        a process that will never come.
        """
    )
    return ok
