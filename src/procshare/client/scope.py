"""Scoped timeouts: `procshare.timeout(seconds)` for every call in a block.

Owns: the per-thread default deadline that `procshare.timeout()` sets, and
`UNSET`, the marker for "no timeout chosen here".

Rules it keeps:
- The innermost block wins; `None` means wait forever even inside an outer
  block with a limit.  Blocks are per thread.
- A proxy call reads `_scope.value` once (see `BaseProxy._procshare_deadline_for`); it
  is always set (UNSET by default), so the read is a plain attribute read.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["timeout", "scoped_timeout", "UNSET"]

class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


class _Scope(threading.local):
    #: a class default: reading it in a thread that never set one is a plain
    #: attribute read (a missing attribute of a local costs about 1 µs a call)
    value: Any = UNSET


_scope = _Scope()


def scoped_timeout() -> Any:
    """The timeout set by the innermost `timeout()` block in this thread, or
    UNSET when none is set."""
    return _scope.value


@contextlib.contextmanager
def timeout(seconds: float | None) -> Iterator[None]:
    """Bound every proxy call made in this thread inside the block.

    `seconds=None` means wait forever, even if an outer block or the proxy sets
    a limit.
    """
    if seconds is not None and (not isinstance(seconds, (int, float)) or math.isnan(seconds)
                                or seconds < 0):
        raise ValueError(f"timeout must be a non-negative number of seconds or None, "
                         f"not {seconds!r}")
    old = _scope.value
    _scope.value = seconds
    try:
        yield
    finally:
        _scope.value = old
