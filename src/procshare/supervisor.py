"""The supervisor: a small process that keeps a started manager's server running.

Owns: `Supervisor`, the watch loop of the supervisor process (started by
`BaseManager.start()` with the manager's context; it forks each server), and
`SupervisorView`, what the starting process knows of it: the server's pid, the
restarts, the exits and whether it gave up, read from the state the
supervisor last reported.

Rules it keeps:
- The starting process runs no thread for its manager.  A thread there would
  make every later `fork()` of that process a fork of a multi-threaded process
  (Python 3.12+ warns; a lock held by another thread stays held in the child),
  and a restart would fork the user's process from that thread at any moment.
  The supervisor process is single-threaded, so its forks are clean, and every
  server incarnation starts from the same state.
- A death is seen at once (the process sentinel).  The first restart comes
  after `FIRST_BACKOFF` seconds; each restart of a crash loop waits twice as
  long as the one before, up to `MAX_BACKOFF` (like Erlang/OTP supervisors and
  systemd's `Restart=on-failure`).
- More than `max_restarts` exits within `restart_window` seconds is a crash
  loop: the supervisor gives up, and the error every caller then gets names
  each exit (pid, exit code or signal) and the log's tail.
- `restart="never"` restarts nothing; after a `stop` from the starting
  process, the server's exit is no crash: the supervisor exits 0 with it.
- No orphans: the supervisor exits as soon as the starting process is gone,
  and each server watches both (`managers._watch_supervisor`), stopping and
  removing its socket file when either goes.  A SIGTERM to the supervisor
  terminates its server too.
- The supervisor reports its whole state each time it changes, as one pickle
  of at most `PIPE_BUF` bytes written without blocking (so a starting process
  that never looks cannot stall it); one that did not fit is written again
  on its next wake-up.  The view keeps the last state read.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

__all__ = ["Supervisor", "SupervisorView", "RESTART_POLICIES", "describe_exit"]

log = logging.getLogger("procshare.supervisor")

RESTART_POLICIES = ("on-failure", "never")
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
#: exits a report keeps (the newest)
KEEP_EXITS = 32
#: the largest state report: a pipe write of at most this many bytes is atomic
_REPORT_MAX = 4000
_STOP = b"stop"


def describe_exit(pid: int | None, code: int | None) -> str:
    if code is None:
        return f"pid {pid}: still running"
    if code < 0:
        try:
            return f"pid {pid}: killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"pid {pid}: killed by signal {-code}"
    return f"pid {pid}: exited with code {code}"


def _stamp(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class Supervisor:
    """The watch loop, run by the supervisor process's main thread (see the
    module docstring).  `launch(incarnation)` starts a server and returns it
    once it serves; `report(state)` sends the state to the starting process."""

    def __init__(self, process: Any, launch: Callable[[int], Any], *,
                 restart: str = "on-failure", max_restarts: int = 5,
                 restart_window: float = 60.0, control: Any = None,
                 watched: Any = None, report: Callable[[dict], bool] | None = None) -> None:
        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {RESTART_POLICIES}, not {restart!r}")
        if max_restarts < 0 or restart_window <= 0:
            raise ValueError("max_restarts must be >= 0 and restart_window > 0")
        self.process = process
        self.launch = launch
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.control = control          # a Connection: the starting process's b"stop"
        self.watched = watched          # a ProcessHandle of the starting process
        self._report = report
        self.restarts = 0
        self.exits: collections.deque[tuple[float, str]] = collections.deque(maxlen=KEEP_EXITS)
        self.codes: dict[int, int] = {}     # exit codes of the last servers, by pid
        self.gave_up: str | None = None
        self.stopping = False
        self._dirty = False

    # -- reports ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"pid": self.process.pid, "restarts": self.restarts, "exits": list(self.exits),
                "codes": dict(self.codes), "gave_up": self.gave_up}

    def _send_state(self) -> None:
        self._dirty = self._report is not None and not self._report(self.state())

    # -- the loop -----------------------------------------------------------------------
    def _sources(self) -> list:
        out = [self.process.sentinel]
        if self.control is not None:
            out.append(self.control)
        fd = None if self.watched is None else self.watched.fd
        if fd is not None:
            out.append(fd)
        return out

    def _check_control(self) -> None:
        """Read what the starting process sent (a stop), and notice it gone."""
        c = self.control
        try:
            while c is not None and c.poll(0):
                if c.recv_bytes() == _STOP:
                    self.stopping = True
        except (EOFError, OSError):
            self.control = None     # it closed its end: it may be gone (watched says)
        if self.watched is not None and self.watched.wait(0.0):
            log.warning("the process that started the manager (pid %d) is gone: the "
                        "supervisor stops", self.watched.pid)
            self.stopping = True

    def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` unless told to stop; True if told to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            srcs = self._sources()[1:]
            try:
                connection.wait(srcs, left) if srcs else time.sleep(left)
            except (OSError, ValueError):
                time.sleep(min(left, 0.1))
            self._check_control()
        return True

    def run(self) -> None:
        """Watch the server until told to stop (then wait for its exit), the
        starting process is gone, or a crash loop; restart it when it dies."""
        backoff = FIRST_BACKOFF
        recent: collections.deque[float] = collections.deque()
        self._send_state()
        while True:
            proc = self.process
            try:
                polled = self.watched is not None and self.watched.fd is None
                connection.wait(self._sources(), 1.0 if self._dirty or polled else None)
            except (OSError, ValueError):
                time.sleep(0.1)
            self._check_control()
            if self._dirty:
                self._send_state()
            if proc.exitcode is None and proc.is_alive():
                if self.stopping and self.watched is not None and self.watched.wait(0.0):
                    return          # the starting process is gone: the server stops itself
                continue
            proc.join(1.0)
            now = time.time()
            self.codes[proc.pid] = proc.exitcode
            while len(self.codes) > KEEP_EXITS:
                del self.codes[next(iter(self.codes))]
            if self.stopping:
                self._send_state()
                return
            self.exits.append((now, describe_exit(proc.pid, proc.exitcode)))
            log.warning("manager server %s", self.exits[-1][1])
            if self.restart == "never":
                self.gave_up = "restart='never'"
                self._send_state()
                return
            recent.append(time.monotonic())
            while recent and time.monotonic() - recent[0] > self.restart_window:
                recent.popleft()
            if len(recent) > self.max_restarts:
                self.gave_up = (f"{len(recent)} exits within {self.restart_window:g} s is "
                                f"more than max_restarts={self.max_restarts}")
                log.error("manager server crash loop: giving up (%s)", self.gave_up)
                self._send_state()
                return
            self._send_state()
            if len(recent) == 1:
                backoff = FIRST_BACKOFF
            if self._pause(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)
            try:
                new = self.launch(self.restarts + 1)
            except Exception as e:      # it could not even start: counts as an exit
                self.exits.append((time.time(), f"restart failed: {e!r}"))
                log.warning("restarting the manager server failed: %r", e)
                self.process = _Failed()
                continue
            self.restarts += 1
            self.process = new
            self._check_control()
            if self.stopping:       # told to stop while it started: stop it too
                new.terminate()
                new.join(5)
                self._send_state()
                return
            self._send_state()


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


def report_to(conn: Any) -> Callable[[dict], bool]:
    """`report(state)` for the supervisor: one atomic, non-blocking pipe write
    of the state (exits trimmed to fit); False if the pipe was full."""
    try:
        os.set_blocking(conn.fileno(), False)
    except OSError:
        pass

    def report(state: dict) -> bool:
        data = pickle.dumps(state)
        while len(data) > _REPORT_MAX and state["exits"]:
            state = dict(state, exits=state["exits"][1:])
            data = pickle.dumps(state)
        try:
            conn.send_bytes(data)
        except BlockingIOError:
            return False
        except OSError:
            return True         # nobody reads any more: nothing to retry
        return True
    return report


# -- in the starting process ------------------------------------------------------------

class SupervisorView:
    """The starting process's view of its manager's supervisor process (no
    thread: the state is read from the supervisor's reports when asked)."""

    def __init__(self, process: Any, status: Any, control: Any, state: dict) -> None:
        self.process = process          # the supervisor process
        self._status = status
        self._control = control
        self._state = state
        self._mutex = threading.Lock()
        self._pid = os.getpid()

    def _refresh(self, timeout: float = 0.0) -> dict:
        """Read every report waiting (waiting up to `timeout` for one).  A
        forked child of the starting process keeps the state it inherited: it
        must not take the reports meant for its parent."""
        with self._mutex:
            status = self._status
            if status is None or os.getpid() != self._pid:
                return self._state
            try:
                while status.poll(timeout):
                    timeout = 0.0
                    self._state = pickle.loads(status.recv_bytes())
            except (EOFError, OSError):
                self._status = None
                status.close()
            except Exception as e:      # a report that does not load: keep the last
                log.debug("an unreadable supervisor report: %r", e)
            return self._state

    @property
    def pid(self) -> int | None:
        return self._refresh()["pid"]

    @property
    def restarts(self) -> int:
        return self._refresh()["restarts"]

    @property
    def gave_up(self) -> str | None:
        return self._refresh()["gave_up"]

    @property
    def exits(self) -> list[tuple[float, str]]:
        return self._refresh()["exits"]

    def exit_report(self) -> list[str]:
        return [f"{_stamp(t)} {text}" for t, text in self.exits]

    def exitcode_of(self, pid: int | None, wait: float = 0.0) -> int | None:
        """The exit code of server `pid`, waiting up to `wait` seconds for the
        supervisor to see it exit; None while it runs (or if unknown)."""
        deadline = time.monotonic() + wait
        while True:
            state = self._refresh()
            code = state["codes"].get(pid)
            left = deadline - time.monotonic()
            if code is not None or left <= 0 or self._status is None \
                    or os.getpid() != self._pid:
                return code
            self._refresh(min(left, 0.05))

    def stop(self) -> None:
        """The manager is shutting down: its server's exit is no crash."""
        if os.getpid() != self._pid:
            return
        control, self._control = self._control, None
        if control is not None:
            try:
                control.send_bytes(_STOP)
            except OSError:
                pass
            control.close()

    def close(self) -> None:
        self.stop()
        with self._mutex:
            status, self._status = self._status, None
        if status is not None:
            status.close()
