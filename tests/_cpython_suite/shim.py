"""Makes `multiprocessing.managers` procshare's managers in this process.

Owns: the one substitution CPython's own tests need to test procshare: the
test module, `multiprocessing.Manager()` and every `from multiprocessing
import managers` get procshare's.
Rules it keeps: imported before anything imports `multiprocessing.managers`
(`sitecustomize`), in every process of the run (the forkserver and spawned
children start from it too)."""

import multiprocessing
import sys

import procshare.managers

sys.modules["multiprocessing.managers"] = procshare.managers
multiprocessing.managers = procshare.managers
