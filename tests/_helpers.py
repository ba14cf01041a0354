"""Assertion helpers shared by the test modules (parent process only)."""

from __future__ import annotations

import os
import signal
import time

import pytest

#: start methods of the scenarios outside the parity tests that take one (fault,
#: lifetime, restart, error and transport tests): all three Linux has.  Python 3.14
#: makes forkserver the default there, and a forkserver child differs from a fork
#: (a fresh interpreter) and from a spawn (started by a server process, not by the
#: test).  CI's runs on the other Pythons narrow this to fork and spawn
#: (PROCSHARE_TEST_OTHER_START_METHODS) to stay under 20 minutes.
FAULT_START_METHODS = tuple(m for m in os.environ.get(
    "PROCSHARE_TEST_OTHER_START_METHODS", "fork,spawn,forkserver").split(",")
    if m in ("fork", "spawn", "forkserver")) or ("fork", "spawn", "forkserver")


def is_stdlib(impl) -> bool:
    return impl.__name__ == "multiprocessing.managers"


def process_gone(pid: int) -> bool:
    """The process `pid` has exited (a zombie counts as gone), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


#: where a thread sleeps while a call of it waits for its reply: a Unix socket's
#: read, poll(), a TCP socket's read; with a Ray manager, Ray's core worker (a futex,
#: as a wait for the GIL is: hence the steady sleep `blocked_in_call` asks for)
_SOCKET_WAITS = ("unix_stream_read_generic", "unix_stream_data_wait",
                 "poll_schedule_timeout", "do_sys_poll", "wait_woken", "sk_wait_data")
_RAY_WAITS = ("futex_",)
_STEADY = 0.05      # seconds a sleep must last, not woken once, to count


def blocked_in_call(pid: int, tid: int | None = None, manager=None,
                    timeout: float = 10.0) -> bool:
    """Bounded wait until thread `tid` of process `pid` (its main thread by
    default) sleeps where a call waits for its reply, from /proc: asleep
    there (state and wchan) in two looks `_STEADY` seconds apart, with no
    context switch between them (a thread waiting for the GIL or a lock
    that is handed around wakes).  Once the thread said it is about to make
    the call, with its connection opened before, that sleep is the call:
    its request is sent and its reply awaited (a get() or wait() that the
    manager holds, or is about to).  `manager`: the one the call goes to (a
    Ray manager's calls wait elsewhere).  Where the kernel shows no wchan,
    the steady sleep alone counts."""
    task = f"/proc/{pid}/task/{pid if tid is None else tid}"
    on_ray = any(c.__module__.startswith("procshare.ray") for c in type(manager).__mro__)
    waits = _RAY_WAITS if on_ray else _SOCKET_WAITS

    def look():
        """The thread's context switch counts if it sleeps in such a wait, else None."""
        try:
            with open(f"{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"{task}/wchan") as f:
                wchan = f.read().strip()
            with open(f"{task}/status") as f:
                switches = [line for line in f if "ctxt_switches" in line]
        except OSError:
            return None
        if state != "S" or not (wchan in ("", "0") or wchan.startswith(waits)):
            return None
        return switches

    def steady() -> bool:
        first = look()
        if first is None:
            return False
        time.sleep(_STEADY)
        return look() == first

    return poll(steady, timeout, 0.005)


def poll(predicate, timeout: float = 3.0, interval: float = 0.02) -> bool:
    """Bounded wait for ``predicate()`` to become true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def assert_not_exposed(impl, proxy, name):
    """Calling a method outside ``exposed`` fails.  The stdlib raises a
    RemoteError whose text holds "AttributeError: method ... is not in
    exposed" (its fallback lookup masks the AttributeError); procshare must
    raise an AttributeError (it may also subclass RemoteError)."""
    if is_stdlib(impl):
        with pytest.raises(impl.RemoteError) as info:
            proxy._callmethod(name)
        assert f"AttributeError: method {name!r} of" in str(info.value)
        assert "is not in exposed" in str(info.value)
    else:
        with pytest.raises(AttributeError) as info:
            proxy._callmethod(name)
        assert name in str(info.value)


def interrupt_after(seconds: float, fn, *args):
    """Call `fn(*args)` and raise KeyboardInterrupt in it after `seconds`
    (a real signal, as Ctrl-C delivers one); return its result or the interrupt."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    armed, t0 = signal.getitimer(signal.ITIMER_REAL)[0], time.monotonic()   # pytest-timeout's
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            result = fn(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            return result
        except KeyboardInterrupt as e:
            return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if armed:
            signal.setitimer(signal.ITIMER_REAL, max(armed - (time.monotonic() - t0), 0.001))
