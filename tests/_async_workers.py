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
