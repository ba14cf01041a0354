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


def start_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


from procshare.managers import BaseManager  # noqa: E402


class LifetimeManager(BaseManager):
    pass


LifetimeManager.register("Stateful", Stateful)                   # serial
LifetimeManager.register("Attrs1", Attrs1, exposed=("m", "kind"))
LifetimeManager.register("Attrs2", Attrs2, exposed=("m", "size", "other"))


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
