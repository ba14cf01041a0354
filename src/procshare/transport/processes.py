"""Processes: is a client process on this host still alive, and waiting until it is not.

Owns: `host_identity()` (which processes can see each other's pids),
`start_time()` (with a pid, a name for one process that survives this one),
`thread_cpu()` (the CPU a thread last ran on), and `ProcessHandle`, the one
place that watches another process: a pidfd where the kernel has them, else
`kill(pid, 0)` and `/proc`.

Rules it keeps:
- A handle is opened while the process is known to be alive (it just
  connected), so a pid reused later cannot fool a pidfd.
- A zombie (exited, not yet reaped by its parent) counts as dead.
- Waiting is bounded by the caller's timeout; nothing here blocks forever.
"""

from __future__ import annotations

import os
import select
import socket

from .channel import readable_within

__all__ = ["host_identity", "ProcessHandle", "start_time", "is_other_process", "thread_cpu"]


def host_identity() -> tuple[str, str | None]:
    """(hostname, pid namespace): processes that share both can see each other's pids."""
    try:
        ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = None
    return socket.gethostname(), ns


def _stat(pid: int, tid: int | None = None) -> list[bytes]:
    """The fields of /proc/<pid>/stat (with `tid`: of that thread of `pid`)
    after the command name (the state letter first); [] if unknown or gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def thread_cpu(pid: int, tid: int) -> int | None:
    """The CPU that thread `tid` of process `pid` last ran on (None: gone or
    unknown; Linux)."""
    fields = _stat(pid, tid)
    try:
        return int(fields[36])      # field 39 of stat, "processor"
    except (IndexError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    """The state letter of `pid` from /proc (None if unknown or gone)."""
    fields = _stat(pid)
    return fields[0].decode() if fields else None


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None
    if it is gone, a zombie, or unknown here: with its pid, it names one
    process for good (a pid reused later has another start time)."""
    fields = _stat(pid)
    if len(fields) < 20 or fields[0] in (b"Z", b"X") or not fields[19].isdigit():
        return None
    return int(fields[19])


def is_other_process(pid: int, start: int) -> bool:
    """Is the process that had pid `pid` and start time `start` known to be
    gone (no such pid, a zombie, or a pid reused by a later process)?  False
    when it may still run, or /proc cannot tell (out of file descriptors)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:     # (EPERM: it exists, someone else's)
        pass
    fields = _stat(pid)
    if len(fields) < 20:
        return not os.path.exists(f"/proc/{pid}") and os.path.isdir("/proc/self")
    if fields[0] in (b"Z", b"X"):
        return True
    return fields[19].isdigit() and int(fields[19]) != start


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _proc_state(pid) not in ("Z", "X")


class ProcessHandle:
    """Another process on this host, by pid."""

    __slots__ = ("pid", "_fd")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self._fd = os.pidfd_open(pid)
            except OSError:
                self._fd = None

    @property
    def fd(self) -> int | None:
        """The pidfd (readable once the process ended), or None where there is none."""
        return self._fd

    def alive(self) -> bool:
        return not self.wait(0.0)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True if it has."""
        fd = self._fd
        if fd is not None:
            try:
                return readable_within(fd, timeout)
            except (OSError, ValueError):
                pass
        if not _pid_alive(self.pid):
            return True
        if timeout > 0:
            select.select([], [], [], min(timeout, 0.1))
            return not _pid_alive(self.pid)
        return False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
