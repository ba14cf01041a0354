"""Placement: on a loaded machine, a manager connection's thread waits on its client's CPU.

Owns: `Placement`, made per manager connection by `for_peer`, which a
channel's blocking receive asks where to wait (`target`); the channel
narrows and restores its thread's mask (`Channel._recv_placed`).

On a busy machine (more runnable threads than cores, `spin.core_free`) a
synchronous call's two wakeups cost little when the client's thread and the
manager's connection thread share a CPU (the waker hands its CPU over as it
goes to sleep), and a lot when they do not: the wakee waits for another CPU
to preempt its busy process.  Measured here, a small call under four
busy-loop processes on 2 CPUs took 27-40 us with both on one CPU and
128-203 us on two (the stdlib: 34-52 and 197-233), and which of the two a
run gets is luck: a whole run stays in one or moves between them.  So while
the machine is busy, the connection's thread restricts itself to the CPU its
client's thread last ran on for as long as it sleeps in `recv`, and to every
CPU it was allowed before as soon as it wakes, before it runs anything.

Rules it keeps:
- Only for peers on this machine, in this pid namespace, on a Unix socket:
  the peer's pid comes from the socket (`SO_PEERCRED`), its thread id from
  the hello and must be a thread of that pid (`/proc/<pid>/task/<tid>`).
  Anything else, or any error reading or setting, turns placement off for
  the connection: it only ever saves time, it never fails a call.
- A thread is pinned only while it sleeps in a receive: no call runs under
  the narrowed mask (nor a fork or subprocess it makes), and the thread's own
  mask is restored before the receive returns or raises; a mask someone else
  set meanwhile (`taskset -p`) stays.  (Only what the interpreter itself may
  run between two C calls, a collection's finalizers or a profile hook, could
  run in that window.)
- A connection whose client thread does not sleep for each reply (a
  pipeline's, which sends its thread id as 0) is never placed.
- A wait is narrowed only to a CPU of the thread's own mask as it is then
  (cpusets, `taskset` and a call's own `sched_setaffinity` stay in force),
  and only from a mask of two CPUs or more; an idle machine, one CPU, or
  `PROCSHARE_PLACEMENT=0` means no placement at all (`always`: also on an
  idle machine).
- Only a connection whose last `LOOK_EVERY` waits all began while no other
  connection of the manager was working is placed.  Where several clients
  keep the manager busy, the manager is what they wait for and its threads
  must run wherever a CPU frees up: placing them cost four processes
  calling one counter 17-37% of their throughput here.
- One wait in `LOOK_EVERY` is placed, after reading the client's CPU; the
  others sleep anywhere.  Once the two threads share a CPU, the kernel's
  wakeups keep them there (the waker's CPU is free as it goes to sleep), so
  one placed wait in 16 is enough to undo a split, for about 1 us a call
  (a read of `/proc`, 13 us, and three affinity calls every 16 waits)
  where placing every wait would cost about 4 (two affinity calls).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any

from .processes import host_identity, thread_cpu
from .spin import core_free

__all__ = ["Placement", "for_peer", "ENABLED"]

_NCPU = os.cpu_count() or 1
_MODE = os.environ.get("PROCSHARE_PLACEMENT", "busy").strip().lower()
#: placement at all: Linux, more than one CPU, affinity calls, not turned off
#: (`PROCSHARE_PLACEMENT=0`, or off, false, no)
ENABLED = (sys.platform.startswith("linux") and _NCPU > 1
           and _MODE not in ("0", "off", "false", "no")
           and hasattr(os, "sched_setaffinity") and hasattr(socket, "SO_PEERCRED"))
#: `PROCSHARE_PLACEMENT=always`: place even when the machine looks idle (for a
#: machine whose run queue `/proc/loadavg` misreports, and for tests)
ALWAYS = _MODE == "always"
LOOK_EVERY = 16         # waits between readings of the client's CPU
_CRED = struct.Struct("3i")      # struct ucred: pid, uid, gid
_HOST = host_identity()


class Placement:
    """Where one connection's thread should sleep (see the module docstring)."""

    __slots__ = ("pid", "tid", "cpu", "left")

    def __init__(self, pid: int, tid: int) -> None:
        self.pid, self.tid = pid, tid   # the client's thread
        self.cpu: int | None = None     # the CPU it was last seen on
        self.left = LOOK_EVERY          # waits until the next look

    def target(self, others: bool = False) -> int | None:
        """The CPU to sleep on in this wait (the client's), or None: anywhere.
        `others`: another connection of this process is working now."""
        if others:
            self.left = LOOK_EVERY      # a manager its clients queue for: see above
            return None
        self.left -= 1
        if self.left > 0:
            return None
        self.left = LOOK_EVERY
        if not ALWAYS and core_free():
            self.cpu = None
        else:
            self.cpu = thread_cpu(self.pid, self.tid)
            if self.cpu is None:
                self.left = 1 << 62     # the client's thread is gone: look no more
        return self.cpu

    def __repr__(self) -> str:
        return f"<Placement of client thread {self.pid}/{self.tid}: {self.cpu}>"


def for_peer(sock: Any, hello: dict) -> Placement | None:
    """A `Placement` for a connection whose hello is `hello`, or None."""
    if not ENABLED or sock.family != socket.AF_UNIX:
        return None
    try:
        pid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                           _CRED.size))[0]
        tid = int(hello.get("tid", 0))
        # the hello's thread id names a thread in the client's pid namespace:
        # only ours makes it a name we can look up
        if (pid <= 0 or tid <= 0 or hello.get("pid") != pid
                or hello.get("pidns") != _HOST[1] or thread_cpu(pid, tid) is None):
            return None
    except (OSError, ValueError, TypeError):
        return None
    return Placement(pid, tid)
