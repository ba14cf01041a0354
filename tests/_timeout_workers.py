"""Module-level pieces for test_timeouts.py (importable under spawn)."""

from __future__ import annotations

import time

import procshare
from procshare.managers import BaseManager


class Slow:
    """A registered class whose calls can take long."""

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def echo(self, value):
        return value


class SlowManager(BaseManager):
    pass


# concurrent, so a hung call does not hold up the next one on the same object
SlowManager.register("Slow", Slow, serial=False)
SlowManager.register("SerialSlow", Slow, serial=True)


def hold_lock(lock, held, release):
    """Take `lock`, say so, and keep it until `release` is set."""
    lock.acquire()
    held.set()
    release.wait(15)
    lock.release()
    return True


def get_with_timeout_in_child(q, seconds):
    """A timed-out get in a child process: the error type and how long it took."""
    t0 = time.monotonic()
    try:
        q._callmethod("get", (), {}, timeout=seconds)
    except procshare.CallTimeout as e:
        return type(e).__name__, time.monotonic() - t0, e.may_complete
    return "no timeout", time.monotonic() - t0, None
