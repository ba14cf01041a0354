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
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

__all__ = ["Supervisor", "RESTART_POLICIES"]

log = logging.getLogger("procshare.supervisor")

RESTART_POLICIES = ("on-failure", "never")
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0


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
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="procshare-supervisor")
        self._thread.start()

    # -- what the manager asks ----------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """The manager is shutting down: its server's exit is not a crash.  Waits
        for a restart under way to finish (and stops what it started)."""
        self._stopping.set()
        try:
            self._wake_w.send(b"")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def exit_report(self) -> list[str]:
        return [f"{time.strftime('%H:%M:%S', time.localtime(t))} {text}"
                for t, text in self.exits]

    # -- the watch ----------------------------------------------------------------------
    def _watch(self) -> None:
        backoff = FIRST_BACKOFF
        recent: collections.deque[float] = collections.deque()
        while not self._stopping.is_set():
            proc = self.process
            try:
                connection.wait([proc.sentinel, self._wake_r])
            except (OSError, ValueError):
                return
            if self._stopping.is_set():
                return
            proc.join(1.0)
            now = time.time()
            self.exits.append((now, _describe_exit(proc.pid, proc.exitcode)))
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
                backoff = FIRST_BACKOFF
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)
            try:
                new = self.launch(self.restarts + 1)
            except Exception as e:      # it could not even start: counts as an exit
                self.exits.append((time.time(), f"restart failed: {e!r}"))
                log.warning("restarting the manager server failed: %r", e)
                fake = _Failed()
                self.process = fake
                continue
            if self._stopping.is_set():     # shut down while it started: stop it too
                new.terminate()
                new.join(5)
                return
            self.restarts += 1
            self.process = new
            if self.on_restart is not None:
                self.on_restart(new)


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
