"""Module-level pieces for test_async.py (importable under spawn)."""

from __future__ import annotations

import asyncio

import procshare


def pipelined_appends(lst, n):
    """In a child: n appends through async_, then the list as the manager has it."""
    futs = [procshare.async_(lst).append(i) for i in range(n)]
    for f in futs:
        f.result(30)
    return procshare.async_(lst).__len__().result(30)


def aio_in_child(d, n):
    async def main():
        p = procshare.aio.wrap(d)
        await asyncio.gather(*(p.__setitem__(i, i * i) for i in range(n)))
        return await p.__len__()
    return asyncio.run(main())


class Boom:
    def fail(self, text):
        raise ValueError(text)

    def echo(self, value):
        return value


# -- a gate in the manager: one object waits at it, another opens it -------------------
_GATE = None
_ENTERED = None


def _gate_events():
    global _GATE, _ENTERED
    if _GATE is None:
        import threading
        _GATE, _ENTERED = threading.Event(), threading.Event()
    return _GATE, _ENTERED


class GateWaiter:
    """Waits in the manager until the gate opens: a method that blocks
    without any procshare primitive (a user class's own wait)."""

    def wait(self, timeout):
        gate, entered = _gate_events()
        entered.set()
        return gate.wait(timeout)

    def echo(self, value):
        return value


class GateOpener:
    def open(self):
        _gate_events()[0].set()

    def entered(self):
        return _gate_events()[1].is_set()
