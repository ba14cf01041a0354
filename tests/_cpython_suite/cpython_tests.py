"""CPython's own multiprocessing tests (`test._test_multiprocessing`),
installed for the start method in PROCSHARE_CPYTHON_START_METHOD, as
CPython's `test_multiprocessing_<method>` modules install them."""

import multiprocessing
import os

import shim  # noqa: F401  (before the test module imports the managers)
import test._test_multiprocessing as tests

import procshare.managers

if tests.BaseManager is not procshare.managers.BaseManager \
        or multiprocessing.managers is not procshare.managers:
    raise RuntimeError("CPython's tests would not test procshare's managers")

tests.install_tests_in_module_dict(globals(), os.environ["PROCSHARE_CPYTHON_START_METHOD"])
