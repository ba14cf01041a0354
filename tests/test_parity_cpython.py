"""CPython's own tests of managers, run against procshare.

`Lib/test/_test_multiprocessing.py` is the stdlib's own definition of how
managers behave: its manager test classes (every class whose name says
Manager: queues, locks, conditions, events, values, arrays, containers,
namespaces, pools, barriers, custom and remote managers, restarts, the
SyncManager types, manager exceptions), its SharedMemoryManager tests and its
initializer tests run here, on this Python and under each start method, with
`multiprocessing.managers` replaced by procshare's in every process of the
run (`_cpython_suite/`).  A test CPython skips on this machine is skipped
here too; any failure or error fails this test, with CPython's report."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).parent / "_cpython_suite"
#: unittest -k patterns: the test classes that use managers
PATTERNS = ("Manager", "SharedMemory", "Initializers")


def test_cpythons_own_manager_tests_pass_against_procshare(ctx):
    if importlib.util.find_spec("test._test_multiprocessing") is None:
        pytest.skip(f"this Python ({sys.executable}) was built without its test package")
    method = ctx.get_start_method()
    env = dict(os.environ, PROCSHARE_CPYTHON_START_METHOD=method,
               PYTHONPATH=os.pathsep.join(filter(None, [str(SUITE),
                                                        os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "-m", "unittest"]
    for pattern in PATTERNS:
        args += ["-k", pattern]
    proc = subprocess.run([*args, "cpython_tests"], cwd=SUITE, env=env, timeout=400,
                          capture_output=True, text=True)
    report = proc.stderr.strip()
    assert proc.returncode == 0, f"CPython's tests failed under {method}:\n{report[-6000:]}"
    ran = report.splitlines()
    assert any(line.startswith("Ran ") and int(line.split()[1]) > 80 for line in ran), report
