"""The supervisor: the process that started a manager keeps it running.

Owns: `Supervisor`, which watches a manager's server process from the
process that started it, restarts it on the same address with the same
authkey when it dies, and gives up after a crash loop.

Rules it keeps:
- A death is seen at once (the process sentinel).  The first restart comes
  after `FIRST_BACKOFF` seconds; each restart of a crash loop waits twice as
  long as the one before, up to `MAX_BACKOFF` (like Erlang/OTP supervisors and
  systemd's `Restart=on-failure`).
- More than `max_restarts` exits within `restart_window` seconds is a crash
  loop: the supervisor gives up, and the error every caller then gets names
  each exit (pid, exit code or signal) and the log's tail.
- `restart="never"` restarts nothing; a shutdown (`stop()`) is never taken
  for a crash.
- The server watches its supervisor in turn (`managers._run_server`), so a
  killed supervisor leaves no orphan.
- A fork leaves the process single-threaded as far as procshare goes, as with
  the stdlib's manager: the watching thread ends before any fork made by
  another thread (`os.register_at_fork`), and a new one takes over in the
  parent right after, with the same state (a death meanwhile is seen at once:
  the sentinel stays ready).  So Python 3.12+ does not warn that the forking
  process is multi-threaded.  A restart's own fork, made by the watching
  thread, is kept from warning too.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

__all__ = ["Supervisor", "RESTART_POLICIES"]

log = logging.getLogger("procshare.supervisor")

RESTART_POLICIES = ("on-failure", "never")
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
#: how long a fork waits for the watching thread to end (it may be restarting
#: a server; past this, the fork goes ahead with it running)
PAUSE_WAIT = 5.0
#: the fork warning of Python 3.12+, which a restart's own fork must not raise
_FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)"


def _describe_exit(pid: int | None, code: int | None) -> str:
    import signal
    if code is None:
        return f"pid {pid}: still running"
    if code < 0:
        try:
            return f"pid {pid}: killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"pid {pid}: killed by signal {-code}"
    return f"pid {pid}: exited with code {code}"


class Supervisor:
    """Keeps one manager's server process running (see the module docstring)."""

    def __init__(self, process: Any, launch: Callable[[int], Any], *, restart: str = "on-failure",
                 max_restarts: int = 5, restart_window: float = 60.0,
                 on_restart: Callable[[Any], None] | None = None) -> None:
        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {RESTART_POLICIES}, not {restart!r}")
        if max_restarts < 0 or restart_window <= 0:
            raise ValueError("max_restarts must be >= 0 and restart_window > 0")
        self.process = process
        self.launch = launch            # launch(incarnation) -> a started server process
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.on_restart = on_restart
        self.restarts = 0
        self.exits: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
        self.gave_up: str | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = connection.Pipe(duplex=False)
        # the watch's state, kept across the threads that carry it (see `_pause`)
        self._backoff = FIRST_BACKOFF
        self._recent: collections.deque[float] = collections.deque()
        self._restart_at: float | None = None   # when a due restart starts (monotonic)
        self._finished = False          # gave up, or stopped: no thread takes over
        self._paused = False
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._start_thread()
        _live.add(self)

    def _start_thread(self) -> None:
        t = threading.Thread(target=self._watch, daemon=True, name="procshare-supervisor")
        self._thread = t
        t.start()

    # -- what the manager asks ----------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """The manager is shutting down: its server's exit is not a crash.  Waits
        for a restart under way to finish (and stops what it started)."""
        self._stopping.set()
        try:
            self._wake_w.send(b"")
        except OSError:
            pass
        t = self._thread
        if t is not None and threading.current_thread() is not t:
            t.join(timeout)

    def exit_report(self) -> list[str]:
        return [f"{time.strftime('%H:%M:%S', time.localtime(t))} {text}"
                for t, text in self.exits]

    # -- forks -------------------------------------------------------------------------
    def _pause(self) -> None:
        """Before a fork by another thread: end the watching thread, and wait
        until the system has no trace of it (what Python's fork warning counts)."""
        t = self._thread
        if (t is None or t is threading.current_thread() or os.getpid() != self._pid
                or not t.is_alive()):
            return
        self._paused = True
        try:
            self._wake_w.send(b"")
        except OSError:
            return
        t.join(PAUSE_WAIT)
        if not t.is_alive():
            _wait_thread_gone(t.native_id)

    def _resume(self) -> None:
        """After the fork, in the parent: a new thread goes on watching."""
        if not self._paused or os.getpid() != self._pid:
            return
        self._paused = False
        t = self._thread
        if t is not None and t.is_alive():
            return                  # it did not end in time (a restart under way)
        self._drain()               # the wakeup that ended it
        if not self._finished and self.gave_up is None and not self._stopping.is_set():
            self._start_thread()

    # -- the watch ----------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            self._watch_loop()
        finally:
            if not self._paused:
                self._finished = True

    def _watch_loop(self) -> None:
        recent = self._recent
        while not self._stopping.is_set():
            proc = self.process
            if self._restart_at is None:
                # watch the server: its sentinel, or a wakeup (stop, pause)
                try:
                    ready = connection.wait([proc.sentinel, self._wake_r])
                except (OSError, ValueError):
                    return
                if self._stopping.is_set() or self._paused:
                    return
                if proc.sentinel not in ready:  # a pause that came too late: no death
                    self._drain()
                    continue
                proc.join(1.0)
                self.exits.append((time.time(), _describe_exit(proc.pid, proc.exitcode)))
                log.warning("manager server %s", self.exits[-1][1])
                if self.restart == "never":
                    self.gave_up = "restart='never'"
                    return
                recent.append(time.monotonic())
                while recent and time.monotonic() - recent[0] > self.restart_window:
                    recent.popleft()
                if len(recent) > self.max_restarts:
                    self.gave_up = (f"{len(recent)} exits within {self.restart_window:g} s is "
                                    f"more than max_restarts={self.max_restarts}")
                    log.error("manager server crash loop: giving up (%s)", self.gave_up)
                    return
                if len(recent) == 1:
                    self._backoff = FIRST_BACKOFF
                self._restart_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            # a restart is due: wait out the backoff (a pause or stop may end it)
            left = self._restart_at - time.monotonic()
            if left > 0:
                try:
                    connection.wait([self._wake_r], left)
                except (OSError, ValueError):
                    return
                if self._stopping.is_set() or self._paused:
                    return
                if self._restart_at - time.monotonic() > 0:
                    self._drain()
                    continue
            self._restart_at = None
            try:
                with warnings.catch_warnings():     # this thread's own fork (see the rules)
                    warnings.filterwarnings("ignore", _FORK_WARNING, DeprecationWarning)
                    new = self.launch(self.restarts + 1)
            except Exception as e:      # it could not even start: counts as an exit
                self.exits.append((time.time(), f"restart failed: {e!r}"))
                log.warning("restarting the manager server failed: %r", e)
                self.process = _Failed()
                continue
            if self._stopping.is_set():     # shut down while it started: stop it too
                new.terminate()
                new.join(5)
                return
            self.restarts += 1
            self.process = new
            if self.on_restart is not None:
                self.on_restart(new)

    def _drain(self) -> None:
        while self._wake_r.poll():
            self._wake_r.recv_bytes()


def _wait_thread_gone(native_id: int | None, limit: float = 0.05) -> None:
    """A joined thread has released its Python state but may not have left the
    system yet: wait (at most `limit` s) until Linux lists it no more."""
    if native_id is None:
        return
    path = f"/proc/self/task/{native_id}"
    if not os.path.exists("/proc/self/task"):
        return
    end = time.monotonic() + limit
    while os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.0002)


_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def _pause_all() -> None:
    for sup in list(_live):
        sup._pause()


def _resume_all() -> None:
    for sup in list(_live):
        sup._resume()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_pause_all, after_in_parent=_resume_all)


class _Failed:
    """A restart that failed to start: "exited" at once, so the loop counts it."""

    pid = None
    exitcode = 1

    def __init__(self) -> None:
        r, w = connection.Pipe(duplex=False)
        w.close()
        self._r = r
        self.sentinel = r.fileno()

    def join(self, timeout: float | None = None) -> None:
        return None

    def is_alive(self) -> bool:
        return False
