"""What the stdlib's manager types and threading primitives do, shared by every backend.

Owns: `Namespace`, `Value` and `Array` (the plain SyncManager types, as
`multiprocessing.managers` defines them), `update_item` (the one-step update
behind `DictProxy.update_item`), and `check_acquire_args` (threading's
validation of `acquire(blocking, timeout)`).

Rules it keeps:
- It imports nothing from procshare, so the local manager (`managers`,
  `server/`) and the Ray backend (`ray/`) share it without depending on each
  other.
- Behaviour, reprs and error texts are the stdlib's.
"""

from __future__ import annotations

import array
from typing import Any

__all__ = ["Namespace", "Value", "Array", "update_item", "check_acquire_args"]


class Namespace:
    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = list(self.__dict__.items())
        temp = []
        for name, value in items:
            if not name.startswith("_"):
                temp.append("%s=%r" % (name, value))
        temp.sort()
        return "%s(%s)" % (self.__class__.__name__, ", ".join(temp))


class Value:
    def __init__(self, typecode: Any, value: Any, lock: bool = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> Any:
        return self._value

    def set(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "%s(%r, %r)" % (type(self).__name__, self._typecode, self._value)

    value = property(get, set)


def Array(typecode: Any, sequence: Any, lock: bool = True) -> array.array:
    return array.array(typecode, sequence)


def update_item(obj: Any, key: Any, func: Any, default: Any, use_default: bool,
                missing: tuple = (KeyError, IndexError)) -> Any:
    """`obj[key] = func(obj[key])` (with `default` for a missing key when
    `use_default`); return the new value.  The caller makes it one step."""
    if use_default:
        try:
            old = obj[key]
        except missing:
            old = default
    else:
        old = obj[key]
    new = func(old)
    obj[key] = new
    return new


def check_acquire_args(blocking: bool, timeout: float | None, lock_style: bool) -> float | None:
    """Validate acquire() arguments like threading does; None means forever.
    `lock_style`: Lock/RLock's (blocking, timeout=-1); else Semaphore's."""
    if lock_style:
        if timeout is None:
            timeout = -1
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        return None if timeout == -1 else float(timeout)
    if not blocking and timeout is not None:
        raise ValueError("can't specify timeout for non-blocking acquire")
    return timeout
