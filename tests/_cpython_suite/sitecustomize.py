"""Runs `shim` in every Python process that has this directory on its path
(`test_parity_cpython.py` puts it on PYTHONPATH for its run only)."""

import shim  # noqa: F401
