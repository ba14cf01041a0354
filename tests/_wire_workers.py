"""Module-level pieces for test_wire_faults.py (importable under spawn)."""

from __future__ import annotations

import time

from procshare.managers import BaseManager

_PATTERN = bytes(range(1, 256))     # no zero bytes: a misread shows


def blob_bytes(n: int) -> bytes:
    return (_PATTERN * (n // len(_PATTERN) + 1))[:n]


class Blob:
    """Returns large values, after an optional delay."""

    def blob(self, n: int, delay: float = 0.0) -> bytes:
        if delay:
            time.sleep(delay)
        return blob_bytes(n)

    def echo(self, value):
        return value


class BlobManager(BaseManager):
    pass


BlobManager.register("Blob", Blob, serial=False)
