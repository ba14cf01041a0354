"""Module-level pieces for the lifetime tests (importable under spawn)."""

from __future__ import annotations

import os
import threading
import time


def acquire_and_exit(lock):
    """Take `lock` (a Lock or BoundedSemaphore) and exit normally, holding it."""
    assert lock.acquire(timeout=10)
    return "held"


def barrier_once(barrier):
    """Wait at `barrier` once, then exit."""
    return barrier.wait(30)


class Stateful:
    """A registered class for the serial-object defects."""

    def __init__(self):
        self.d = {}
        self.busy = False

    def grow(self, n):
        for i in range(n):
            self.d[len(self.d)] = i
        return len(self.d)

    def get_d(self):
        return self.d

    def work(self, seconds):
        self.busy = True
        time.sleep(seconds)
        self.busy = False
        return True

    def hang(self, seconds):
        time.sleep(seconds)
        return seconds

    def echo(self, value):
        return value

    def call_me(self, proxy, value):
        """A method that calls back into its own object through a proxy."""
        return proxy.echo(value)

    def is_busy(self):
        return self.busy


class Attrs1:
    kind = "one"

    def m(self):
        return 1


class Attrs2:
    size = 2
    other = "two"

    def m(self):
        return 2


def slow_increment(mark, value):
    """update_item's func, in the manager: says it started (a file), then
    takes half a second."""
    with open(mark, "w"):
        pass
    time.sleep(0.5)
    return value + 1


def make_many(manager, typeid, n, out):
    try:
        for _ in range(n):
            out.append(getattr(manager, typeid)())
    except BaseException as e:  # reported by the test
        out.append(e)


def interrupted_then_wait(target, method, args, ready):
    """Call `method` on `target` in a thread that is interrupted (a
    KeyboardInterrupt raised in it by the test through `ready`)."""
    ready.set()
    return getattr(target, method)(*args)


class Finalizing:
    """Objects whose `__del__` waits: for `seconds`, or until `release()` (at
    most 30 s); `done()` lists the names whose `__del__` finished."""

    gate = threading.Event()
    finished: list = []

    def __init__(self, name="", seconds=None):
        self.name, self.seconds = name, seconds

    def release(self):
        Finalizing.gate.set()

    def done(self):
        return list(Finalizing.finished)

    def __del__(self):
        if self.name:
            if self.seconds is not None:
                time.sleep(self.seconds)
            else:
                Finalizing.gate.wait(30)
            Finalizing.finished.append(self.name)


def start_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


from procshare.managers import BaseManager  # noqa: E402


class LifetimeManager(BaseManager):
    pass


LifetimeManager.register("Stateful", Stateful)                   # serial (by default)
LifetimeManager.register("StrictStateful", Stateful, serial=True)
LifetimeManager.register("Attrs1", Attrs1, exposed=("m", "kind"))
LifetimeManager.register("Attrs2", Attrs2, exposed=("m", "size", "other"))
LifetimeManager.register("Finalizing", Finalizing)


def inherited_flags(parent: int) -> dict:
    """In a child forked as a manager's server: whose proxies it owns, here
    and in a child it forks in turn."""
    import multiprocessing

    from procshare.client import session
    me = os.getpid()
    got = {"parent": session.inherited_by_server(parent),
           "own": session.inherited_by_server(me),
           "flag_cleared": not getattr(session._no_recover, "forking_server", False)}
    r, w = multiprocessing.get_context("fork").Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:
        try:
            w.send({"grand_parent": session.inherited_by_server(parent),
                    "grand_server": session.inherited_by_server(me),
                    "grand_own": session.inherited_by_server(os.getpid())})
        finally:
            os._exit(0)
    w.close()
    got.update(r.recv())
    os.waitpid(pid, 0)
    return got


def thread_outlives_target(q, out, ready, finalized):
    """Start a thread (not a daemon, never joined) that waits for an item of
    `q` and appends it to `out`, then return: the process waits for it."""
    import multiprocessing.util
    import sys

    q.qsize()       # this process uses the manager (its goodbye is due at exit)

    def consume():
        ready.set()
        out.append(q.get(timeout=30))

    threading.Thread(target=consume).start()
    assert ready.wait(10)
    if sys.version_info < (3, 13):
        # before 3.13 a child runs its finalizers before it waits for its threads;
        # this one runs after procshare's goodbye (exitpriority 10)
        multiprocessing.util.Finalize(None, finalized.set, exitpriority=9)
    else:
        finalized.set()


def daemon_threads_blocked_at_exit(q, ev, stderr_path, ready):
    """Leave daemon threads blocked on the manager and exit; what they print
    goes to `stderr_path`."""
    import sys

    sys.stderr = open(stderr_path, "w")     # noqa: SIM115 (the process ends)
    started = [threading.Event(), threading.Event()]

    def blocked(i, call):
        started[i].set()
        call()

    threads = [threading.Thread(target=blocked, args=(0, q.get), daemon=True),
               threading.Thread(target=blocked, args=(1, ev.wait), daemon=True)]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(10)
    ready.set()

    def last():     # the last finalizer: a thread whose call failed has printed by now
        for t in threads:
            t.join(0.5)
        sys.stderr.flush()

    import multiprocessing.util
    multiprocessing.util.Finalize(None, last, exitpriority=-100)


def calls_after_shutdown(lst, used, shut):
    """Use `lst`, wait until another process shut its manager down, then call
    three times: is each error a BrokenPipeError?"""
    lst.append(1)
    used.set()
    assert shut.wait(20)
    out = []
    for _ in range(3):
        try:
            lst.append(1)
            out.append("ok")
        except Exception as e:  # noqa: BLE001 - its type is the answer
            out.append(isinstance(e, BrokenPipeError))
    return out


def collect_while_opening(q):
    """(a forked child, its collector on) Report whether it got this far, and
    the decrefs still put off after its first call: the after-fork hook has
    opened its control connection, with a collection in the middle."""
    import gc

    from procshare.client import session
    gc.enable()
    q.put("ran")
    q.put(sum(len(s.deferred) for s in list(session._sessions.values())))
