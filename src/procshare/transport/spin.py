"""Spinning: whether a receive should busy-poll before it sleeps, and for how long.

Owns: the per-channel spin budget (`SpinPolicy`) and the machine-wide check
that a core is free (`core_free`).  The channel does the polling; this module
only decides.

Rules it keeps:
- On a virtual machine a wakeup costs more than a whole small call, so a
  receive that expects its data within microseconds polls for it first.
  Polling only pays when the peer has a core to run on: with more runnable
  threads than cores (`/proc/loadavg`, read at most every `LOAD_EVERY`
  seconds) nobody spins, so a busy machine's CPU goes to the work.
- A channel spins for about three times the wait it usually sees, never more
  than its cap: `SPIN_SECONDS` (`PROCSHARE_SPIN_US`, 0 disables), or
  `LONG_SPIN_SECONDS` once it carried payloads in shared memory or called a
  durable object (`long()`), whose waits include copying the payloads (about
  50 us per MiB here) or a journal commit.  A channel whose waits
  are longer than that stops spinning for `REST` receives, then tries again,
  so idle connections cost nothing.
- Single-CPU machines never spin.
- Threads of one process share a GIL, so a receive that spins while another
  thread of its process works only takes turns from that thread (two clients
  of one manager: 27k calls/s with the manager's connections spinning, 37k
  without).  A channel that belongs to a set of `working` channels (the
  manager's connections) spins only while no other channel of the set is
  working (a spinning channel counts as working, so one spins at a time).
"""

from __future__ import annotations

import os
import time

__all__ = ["SpinPolicy", "core_free", "SPIN_SECONDS", "LONG_SPIN_SECONDS"]

_NCPU = os.cpu_count() or 1
#: the longest a receive busy-polls (PROCSHARE_SPIN_US, microseconds; 0 disables)
SPIN_SECONDS = float(os.environ.get("PROCSHARE_SPIN_US", "50")) / 1e6 if _NCPU > 1 else 0.0
#: the cap of a channel that carries large payloads
LONG_SPIN_SECONDS = 4 * SPIN_SECONDS
LOAD_EVERY = 0.01       # seconds between readings of the run queue
MISSES = 4              # consecutive misses before a channel rests...
REST = 64               # ...for this many receives
_FLOOR = 5e-6           # the shortest spin worth starting

_perf = time.perf_counter
_load_at = -1.0
_free = True


def _runnable() -> int:
    """Threads running or ready to run now (Linux); 0 where unknown."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return 0


def core_free() -> bool:
    """Is there a core for the peer while we spin?  (Cached for LOAD_EVERY.)"""
    global _load_at, _free
    now = _perf()
    if now - _load_at > LOAD_EVERY:
        _load_at = now
        _free = _runnable() <= _NCPU
    return _free


class SpinPolicy:
    """How long one channel's next receive should poll."""

    __slots__ = ("typical", "misses", "cap")

    def __init__(self) -> None:
        self.typical = 0.0      # EWMA of the waits that polling caught (seconds)
        self.misses = 0         # > 0: consecutive misses; < 0: receives left to rest
        self.cap = SPIN_SECONDS

    def long(self) -> None:
        """This channel carries large payloads: its waits may be longer."""
        self.cap = LONG_SPIN_SECONDS

    def budget(self) -> float:
        """Seconds to poll before sleeping (0: sleep at once)."""
        if self.misses < 0:
            self.misses += 1
            return 0.0
        if not SPIN_SECONDS or not core_free():
            return 0.0
        typical = self.typical
        if not typical:
            return SPIN_SECONDS
        return min(self.cap, max(3.0 * typical, _FLOOR))

    def hit(self, waited: float) -> None:
        self.misses = 0
        self.typical = waited if not self.typical else 0.8 * self.typical + 0.2 * waited

    def miss(self) -> None:
        self.misses += 1
        if self.misses >= MISSES:
            self.misses = -REST
            self.typical = 0.0
