"""Spinning: whether a receive should busy-poll before it sleeps, and for how long.

Owns: the per-channel spin budget (`SpinPolicy`), the per-process allowance
for polls that catch nothing (`WASTE`, `BUCKET`), and the machine-wide check
that a core is free (`core_free`).  The channel does the polling; this module
only decides.

Rules it keeps:
- On a virtual machine a wakeup costs more than a whole small call, so a
  receive that expects its data within microseconds polls for it first.
  Polling only pays when the peer has a core to run on: with more runnable
  threads than cores (`/proc/loadavg`, read at most every `LOAD_EVERY`
  seconds) nobody spins, so a busy machine's CPU goes to the work.
- A channel spins for about three times the wait it usually sees, or twice
  the longest wait it caught lately, never more than its cap: `SPIN_SECONDS`
  (`PROCSHARE_SPIN_US`, 0 disables), or `LONG_SPIN_SECONDS` once it carried
  payloads in shared memory or called a durable object (`long()`), whose
  waits include copying the payloads (about 50 us per MiB here) or a journal
  commit.  A poll that catches nothing doubles the next one (up to the cap).
- Polls that catch nothing are paid from one allowance per process: it grows
  by `WASTE` of the time that passes and holds at most `BUCKET`.  A receive
  polls only while the allowance is above zero; its budget is charged when
  it starts and given back if the poll catches its data, so a miss may
  overdraw it by one budget per thread, paid back before the next poll.  So
  over time a process wastes no more than about `WASTE` of a core on polls,
  however many channels it has and whatever their peers do (threads update
  the allowance without a lock, so a race can lose a charge: the bound is
  approximate), and an idle connection costs one missed poll a receive at
  most.
  There is no rest period to fall into: with one per channel (64 receives
  after four misses in a row), two peers that had both stopped polling
  could stay out of step for good (each one's polls missed because the
  other slept), and a client sending 1 MiB payloads never polled at all.
- A poll that misses may have been what kept its data away: the kernel
  often wakes the peer's thread on the waker's CPU, expecting the waker to
  sleep, and a poll that does not sleep keeps it there until the poll ends;
  the peer's own poll for the next message then does the same to us (after
  5 ms idle, here, the second and third small calls took 80-130 us, and
  25-40 with what follows).  So after a miss the channel's next `CROWDED_POLLS`
  polls that catch their data hand the CPU over between two attempts
  (`crowded`, `sched_yield`), which costs a system call when nobody else
  wants the CPU and lets the peer run at once when it does.  A channel
  whose polls keep hitting never yields: a yield slows every catch a
  little (about 1 us a call, measured here on back-to-back calls).
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

__all__ = ["SpinPolicy", "core_free", "SPIN_SECONDS", "LONG_SPIN_SECONDS", "WASTE", "BUCKET",
           "CROWDED_POLLS"]

_NCPU = os.cpu_count() or 1
#: the longest a receive busy-polls (PROCSHARE_SPIN_US, microseconds; 0 disables)
SPIN_SECONDS = float(os.environ.get("PROCSHARE_SPIN_US", "50")) / 1e6 if _NCPU > 1 else 0.0
#: the cap of a channel that carries large payloads
LONG_SPIN_SECONDS = 4 * SPIN_SECONDS
LOAD_EVERY = 0.01       # seconds between readings of the run queue
_FLOOR = 5e-6           # the shortest spin worth starting
REACH_DECAY = 0.95      # how fast a long wait caught stops counting, per hit
#: polls that yield between attempts after one that caught nothing
CROWDED_POLLS = 16
#: the share of a core a process may spend in polls that catch nothing
WASTE = 0.02
#: the most of that allowance a process saves up (seconds)
BUCKET = 1e-3

_perf = time.perf_counter
_load_at = -1.0
_free = True
_allowance = BUCKET     # seconds of missed polls this process may still spend
_allowance_at = 0.0     # when it was last topped up


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

    __slots__ = ("typical", "reach", "last", "cap", "crowded")

    def __init__(self) -> None:
        self.typical = 0.0      # EWMA of the waits that polling caught (seconds)
        self.reach = 0.0        # twice the longest recent wait caught (decaying), or
        #                         twice a budget that caught nothing
        self.last = 0.0         # the budget given last
        self.cap = SPIN_SECONDS
        self.crowded = 0        # hits left that yield between attempts (after a miss)

    def long(self) -> None:
        """This channel carries large payloads: its waits may be longer."""
        self.cap = LONG_SPIN_SECONDS

    def budget(self) -> float:
        """Seconds to poll before sleeping (0: sleep at once).  The budget is
        charged to the process's allowance now, and given back by `hit`."""
        global _allowance, _allowance_at
        if not SPIN_SECONDS or not core_free():
            return 0.0
        now = _perf()
        allowance = _allowance + (now - _allowance_at) * WASTE
        if allowance > BUCKET:
            allowance = BUCKET
        if allowance <= 0.0:
            _allowance, _allowance_at = allowance, now
            return 0.0
        typical = self.typical
        b = min(self.cap, max(3.0 * typical if typical else SPIN_SECONDS, self.reach, _FLOOR))
        _allowance, _allowance_at = allowance - b, now
        self.last = b
        return b

    def hit(self, waited: float) -> None:
        """The poll caught its data after `waited` seconds: it costs nothing."""
        global _allowance
        _allowance += self.last
        if self.crowded:
            self.crowded -= 1
        self.typical = waited if not self.typical else 0.8 * self.typical + 0.2 * waited
        reach = self.reach * REACH_DECAY
        self.reach = 2.0 * waited if 2.0 * waited > reach else reach

    def miss(self) -> None:
        """The poll caught nothing (its budget stays spent): poll longer next
        time, and give the CPU away between attempts for a while."""
        self.reach = min(self.cap, 2.0 * self.last)
        self.crowded = CROWDED_POLLS
