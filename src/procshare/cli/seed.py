"""The seed document's Counter, shared by the demo scenes.

Owns: `Counter` (unchanged from the seed) and `SlowCounter` (the same with a
yield inside increment), importable by name in every process (workers,
manager servers, Ray actors).

Rules it keeps:
- Imports nothing of procshare: any scene module may import it.
"""

from __future__ import annotations

import time


class Counter:
    """The seed document's Counter, unchanged."""

    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1

    def get_count(self):
        return self.count


class SlowCounter(Counter):
    """The same Counter, with an increment that lets other threads run in the middle.

    Real methods do this all the time: they log, take a lock, touch a file. Each one is a
    moment where another call on the same object can slip in.
    """

    def increment(self):
        value = self.count
        time.sleep(0)  # yield to other threads, as any I/O would
        self.count = value + 1
