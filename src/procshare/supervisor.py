"""The supervisor: a small process that keeps a started manager's server running.

Owns: `Supervisor`, the watch loop of the supervisor process (started by
`BaseManager.start()` with the manager's context; it forks each server), and
`SupervisorView`, what the starting process knows of it: the server's pid, the
restarts, the exits and whether it gave up, read from the state file
(`StateFile`) the supervisor last wrote; and `check_policy`, the check of the
restart options.

Rules it keeps:
- The starting process runs no thread for its manager.  A thread there would
  make every later `fork()` of that process a fork of a multi-threaded process
  (Python 3.12+ warns; a lock held by another thread stays held in the child),
  and a restart would fork the user's program from that thread at any moment.
  The supervisor runs no thread of its own, so the servers it forks for
  restarts are forks of a single-threaded process, all from the same state.
- A death is seen at once (the process sentinel).  The first restart comes
  after `FIRST_BACKOFF` seconds; each restart of a crash loop waits twice as
  long as the one before, up to `MAX_BACKOFF` (like Erlang/OTP supervisors and
  systemd's `Restart=on-failure`).
- More than `max_restarts` exits within `restart_window` seconds is a crash
  loop: the supervisor gives up, and the error every caller then gets names
  each exit (pid, exit code or signal) and the log's tail.
- `restart="never"` restarts nothing; after a `stop` from the starting
  process, the server's exit is no crash: the supervisor exits 0 with it.
  Nor is the exit of a server that a `shutdown` request stopped, from any
  client (it exits with `SHUT_DOWN_EXIT` and leaves its mark in the manager's
  log directory, `leave_shut_down_mark`): that
  stop is final, as the stdlib's.  A
  supervisor that gave up exits as its last server did (`manager._process`
  is the supervisor: its `exitcode` says how the server ended, as the
  stdlib's says of its server).
- No orphans: the supervisor exits as soon as the starting process is gone,
  and each server watches both (`managers._watch_supervisor`), stopping and
  removing its socket file when either goes.  A SIGTERM to the supervisor
  terminates its server (and one it is starting) too.
- The supervisor writes its whole state to a file in the manager's private
  log directory each time it changes (a new file renamed over the old one), so
  a reader never sees half of it, nothing waits for the starting process to
  read, and the last state outlives the supervisor.  The view reads the file
  when asked.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

from .transport.files import replace_file

__all__ = ["Supervisor", "SupervisorView", "RESTART_POLICIES", "describe_exit",
           "check_policy", "StateFile", "SHUT_DOWN_EXIT", "leave_shut_down_mark"]

log = logging.getLogger("procshare.supervisor")

RESTART_POLICIES = ("on-failure", "never")
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
#: exits a report keeps (the newest)
KEEP_EXITS = 32
#: the longest exit description kept (a failed restart's error may be long)
EXIT_TEXT_MAX = 500
_STOP = b"stop"
#: the exit code of a supervised server that a `shutdown` request stopped (it
#: also leaves its mark, `leave_shut_down_mark`, so that user code's own exit
#: with this code is still a crash)
SHUT_DOWN_EXIT = 86


def _shut_down_mark(logdir: str, pid: int | None) -> str:
    """The file a server that a `shutdown` request stopped leaves in the
    manager's log directory."""
    return os.path.join(logdir, f"shut-down.{pid}")


def leave_shut_down_mark(logdir: str | None) -> None:
    """(a supervised server that a `shutdown` request stopped, as it exits
    with `SHUT_DOWN_EXIT`) Tell its supervisor that the exit is no crash."""
    if logdir is not None:
        try:
            with open(_shut_down_mark(logdir, os.getpid()), "w"):
                pass
        except OSError:
            pass


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


def check_policy(restart: str, max_restarts: int, restart_window: float) -> None:
    """ValueError for restart options that cannot work."""
    if restart not in RESTART_POLICIES:
        raise ValueError(f"restart must be one of {RESTART_POLICIES}, not {restart!r}")
    if max_restarts < 0 or restart_window <= 0:
        raise ValueError(f"max_restarts must be >= 0 and restart_window > 0, not "
                         f"{max_restarts!r} and {restart_window!r}")


class Supervisor:
    """The watch loop, run by the supervisor process's main thread (see the
    module docstring).  `launch(incarnation)` starts a server and returns it
    once it serves; `report(state)` records the state for the starting process
    (False: try again later)."""

    def __init__(self, process: Any, launch: Callable[[int], Any], *,
                 restart: str = "on-failure", max_restarts: int = 5,
                 restart_window: float = 60.0, control: Any = None,
                 watched: Any = None, report: Callable[[dict], bool] | None = None,
                 logdir: str | None = None) -> None:
        check_policy(restart, max_restarts, restart_window)
        self.process = process
        self.launch = launch
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.control = control          # a Connection: the starting process's b"stop"
        self.watched = watched          # a ProcessHandle of the starting process
        self._report = report
        #: where a server that a `shutdown` request stopped leaves its mark
        #: (None: its exit code alone tells)
        self.logdir = logdir
        self.restarts = 0
        self.exits: collections.deque[tuple[float, str]] = collections.deque(maxlen=KEEP_EXITS)
        self.codes: dict[int, int] = {}     # exit codes of the last servers, by pid
        self.gave_up: str | None = None
        self.stopping = False
        #: the server a client's `shutdown` request stopped, if one did
        self.shut_down_pid: int | None = None
        self._dirty = False

    def _took_mark(self, pid: int | None) -> bool:
        """Did the server `pid` leave its `leave_shut_down_mark`?  (It goes.)"""
        if self.logdir is None:
            return True
        try:
            os.unlink(_shut_down_mark(self.logdir, pid))
        except OSError:
            return False
        return True

    def _exited(self, t: float, text: str) -> None:
        if len(text) > EXIT_TEXT_MAX:
            text = text[:EXIT_TEXT_MAX - 3] + "..."
        self.exits.append((t, text))

    @property
    def last_exitcode(self) -> int | None:
        """How the last server ended (None: it runs, or never started)."""
        return getattr(self.process, "exitcode", None)

    # -- reports ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"pid": self.process.pid, "restarts": self.restarts, "exits": list(self.exits),
                "codes": dict(self.codes), "gave_up": self.gave_up,
                "shut_down": self.shut_down_pid}

    def _send_state(self) -> None:
        self._dirty = self._report is not None and not self._report(self.state())

    # -- the loop -----------------------------------------------------------------------
    def _sources(self, server: bool = True) -> list:
        """What the loop waits on: the server's exit (unless `server` is false),
        the starting process's messages, and its end."""
        out = [self.process.sentinel] if server else []
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
            log.info("the process that started the manager (pid %d) is gone: the "
                     "supervisor stops", self.watched.pid)
            self.stopping = True

    def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` unless told to stop; True if told to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            srcs = self._sources(server=False)
            try:
                connection.wait(srcs, left) if srcs else time.sleep(left)
            except (OSError, ValueError):
                time.sleep(min(left, 0.1))
            self._check_control()
            if self._dirty:
                self._send_state()
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
            if proc.pid is not None:        # (not a restart that failed to start)
                self.codes[proc.pid] = proc.exitcode
                while len(self.codes) > KEEP_EXITS:
                    del self.codes[next(iter(self.codes))]
            if not self.stopping and proc.exitcode == SHUT_DOWN_EXIT and \
                    self._took_mark(proc.pid):
                self.shut_down_pid = proc.pid   # (a shutdown request: a stop, not a crash)
                self.stopping = True
            if self.stopping:
                self._send_state()
                return
            self._exited(now, describe_exit(proc.pid, proc.exitcode))
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
                self._exited(time.time(), f"restart failed: {e!r}")
                log.warning("restarting the manager server failed: %r", e)
                self.process = _Failed()
                continue
            self.restarts += 1
            self.process = new
            self._check_control()
            if self.stopping:       # told to stop while it started: it goes too (it
                new.join(0.1)       # has no clients yet; a shutdown may stop it first)
                if new.exitcode is None:
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


class StateFile:
    """The supervisor's state, in a file: written whole (a new file renamed
    over the old), read only when it changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._state: dict | None = None

    def write(self, state: dict) -> bool:
        try:
            replace_file(self.path, pickle.dumps(state))
        except OSError as e:
            log.debug("could not write the supervisor's state: %r", e)
            return False
        return True

    def read(self) -> dict | None:
        """The state last written (None if there is none yet; the last one read
        once the file is gone)."""
        try:
            with open(self.path, "rb") as f:
                self._state = pickle.loads(f.read())
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        return self._state


# -- in the starting process ------------------------------------------------------------

class SupervisorView:
    """The starting process's view of its manager's supervisor process (no
    thread: the state is read from the supervisor's state file when asked)."""

    def __init__(self, process: Any, state_file: StateFile | None, control: Any,
                 state: dict) -> None:
        self.process = process          # the supervisor process
        self._file = state_file
        self._control = control
        self._state = state
        self._pid = os.getpid()

    def _refresh(self) -> dict:
        f = self._file
        if f is not None:
            got = f.read()
            if got is not None:
                self._state = got
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

    @property
    def shut_down_pid(self) -> int | None:
        """The server a client's `shutdown` request stopped, if one did."""
        return self._refresh().get("shut_down")

    def exit_report(self) -> list[str]:
        return [f"{_stamp(t)} {text}" for t, text in self.exits]

    def exitcode_of(self, pid: int | None, wait: float = 0.0) -> int | None:
        """The exit code of server `pid`, waiting up to `wait` seconds for the
        supervisor to see it exit (only in the starting process: elsewhere the
        file may be gone with the manager); None while it runs (or if unknown)."""
        if os.getpid() != self._pid:
            wait = 0.0
        deadline = time.monotonic() + wait
        while True:
            code = self._refresh()["codes"].get(pid)
            if code is not None or time.monotonic() >= deadline \
                    or self.supervisor_exitcode() is not None:
                return code if code is not None else self._refresh()["codes"].get(pid)
            time.sleep(0.02)

    def supervisor_exitcode(self) -> int | None:
        """The supervisor process's exit code (None while it runs, or when asked
        in another process than the one that started it)."""
        if os.getpid() != self._pid:
            return None
        return self.process.exitcode

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
        """After the supervisor exited: its last state is read, and kept."""
        self.stop()
        self._refresh()
        self._file = None
