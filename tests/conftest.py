"""Shared fixtures for the procshare test suite.

Parity tests run one scenario against the stdlib (``multiprocessing.managers``)
and against ``procshare.managers``, under real ``fork``, ``spawn`` and
``forkserver`` processes:

* ``impl``    -- the managers module under test, ids ``stdlib`` / ``procshare``;
                 procshare is imported lazily, so a missing or broken
                 implementation fails only the procshare cases.
* ``ctx``     -- ``multiprocessing.get_context(method)``: every method in
                 ``START_METHODS`` for the parity tests (``test_parity_*.py``),
                 ``OTHER_START_METHODS`` for the other test files that use it
                 (see ``pytest_generate_tests`` below).
* ``manager`` -- a started ``impl.SyncManager(ctx=ctx)``, shut down afterwards.

Every test is also checked for leaks by an autouse fixture: no child process,
no new ``/dev/shm`` entry and no unix socket file may outlive the test.

Rules for test authors: every function a child process runs lives in
``tests/_workers.py`` (importable under spawn: pytest's default "prepend"
import mode puts tests/ on sys.path and spawn children inherit sys.path);
every wait is bounded (``join(timeout=...)``, ``get(timeout=...)``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _helpers import FAULT_START_METHODS

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"

# Test the working tree: make ``import procshare`` find src/ even when the
# package is not installed.  Spawned children inherit sys.path; plain
# subprocesses get it through PYTHONPATH (see ``_workers.subprocess_env``).
if SRC_DIR.is_dir() and str(SRC_DIR) not in sys.path:
    sys.path.insert(0, str(SRC_DIR))
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# A private temp dir for the whole run.  Unix sockets, pymp-* directories and
# pytest's own tmp_path all land here, so the leak check below sees only what
# this run created (other test runs on the same machine cannot disturb it),
# and everything is removed at exit.  Children inherit TMPDIR.
_REAL_TMP = tempfile.gettempdir()
PRIVATE_TMP = tempfile.mkdtemp(prefix="pst-", dir=_REAL_TMP)
os.environ["TMPDIR"] = PRIVATE_TMP
tempfile.tempdir = None  # recompute from TMPDIR
assert tempfile.gettempdir() == PRIVATE_TMP
# Create this process's multiprocessing scratch dir (pymp-*) now, so that it
# exists before the first test and is not mistaken for a leak.
multiprocessing.util.get_temp_dir()
# Remove the private dir after multiprocessing removed its pymp-* dir
# (exitpriority -100), i.e. as the very last exit finalizer.
multiprocessing.util.Finalize(
    None, shutil.rmtree, args=(PRIVATE_TMP,), kwargs={"ignore_errors": True}, exitpriority=-200
)

# Tests interrupt processes with SIGINT (Ctrl-C).  A run a shell started in the
# background (`cmd &` without job control) begins with SIGINT ignored, and
# every child, forked or exec'd, would inherit that: handle it as an
# interactive run does (exec'd children then get the default disposition).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The implementations the ``impl`` fixture runs.  CI's runs on the other Pythons
# set PROCSHARE_TEST_IMPLS=procshare: the stdlib side of each parity scenario
# (which checks the scenario itself) runs on the main Python, and the minutes
# go to procshare under every start method on every Python.
IMPL_IDS = tuple(i for i in os.environ.get("PROCSHARE_TEST_IMPLS", "stdlib,procshare").split(",")
                 if i in ("stdlib", "procshare")) or ("stdlib", "procshare")
# Parity tests run under every start method Linux has.
# CI's runs on the other Pythons may narrow them (PROCSHARE_TEST_START_METHODS).
START_METHODS = tuple(m for m in os.environ.get(
    "PROCSHARE_TEST_START_METHODS", "fork,spawn,forkserver").split(",")
    if m in ("fork", "spawn", "forkserver")) or ("fork", "spawn", "forkserver")
# Other test files that use the ``ctx`` fixture (e.g. test_locks.py), and the
# fault, restart and lifetime tests, run under ``_helpers.FAULT_START_METHODS``:
# all three here; CI's runs on the other Pythons narrow it to fork and spawn
# (PROCSHARE_TEST_OTHER_START_METHODS), to stay under 20 minutes.
OTHER_START_METHODS = FAULT_START_METHODS
PARITY_PREFIX = "test_parity_"
LEAK_WAIT = 3.0  # seconds: bounded wait for children / files to go away


def load_impl(name: str):
    """Return the managers module for ``name`` ('stdlib' or 'procshare')."""
    if name == "stdlib":
        import multiprocessing.managers as managers
    else:
        import procshare.managers as managers  # lazy: only procshare cases fail
    return managers


@pytest.fixture(params=IMPL_IDS)
def impl(request):
    return load_impl(request.param)


@pytest.fixture
def ctx(request):
    """``multiprocessing.get_context(method)``; parametrised by
    ``pytest_generate_tests`` (the methods depend on the test file)."""
    return multiprocessing.get_context(request.param)


def start_methods_for(path: Path) -> tuple[str, ...]:
    """The start methods the ``ctx`` fixture runs for tests in ``path``."""
    return START_METHODS if path.name.startswith(PARITY_PREFIX) else OTHER_START_METHODS


def pytest_generate_tests(metafunc):
    """Parametrise this conftest's ``ctx`` fixture (used directly or through
    ``manager``) by test file.  A module or class that defines its own ``ctx``
    fixture (e.g. test_timeouts.py) parametrises it itself; a test that
    parametrises ``ctx`` with a mark keeps its own values."""
    if "ctx" not in metafunc.fixturenames:
        return
    if "ctx" in vars(metafunc.module) or (
        metafunc.cls is not None and hasattr(metafunc.cls, "ctx")
    ):
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = names.split(",")
        if "ctx" in {name.strip() for name in names}:
            return
    metafunc.parametrize("ctx", start_methods_for(metafunc.definition.path), indirect=True)


def _started_manager(impl, ctx):
    m = impl.SyncManager(ctx=ctx)
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


@pytest.fixture
def manager(impl, ctx):
    yield from _started_manager(impl, ctx)


@pytest.fixture
def other_manager(impl, ctx):
    """A second manager (whose lock a Condition of `manager` is made over, say)."""
    yield from _started_manager(impl, ctx)


# ---------------------------------------------------------------------------
# Leak checks
# ---------------------------------------------------------------------------


def _child_pids() -> set[int]:
    """Live (non-zombie) children of this process, from /proc."""
    me = os.getpid()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces/parens.
        fields = data[data.rfind(")") + 2 :].split()
        if len(fields) >= 2 and int(fields[1]) == me and fields[0] not in ("Z", "X"):
            pids.add(int(entry))
    return pids


def _helper_pids() -> set[int]:
    """Long-lived helpers the stdlib starts once per run (not leaks)."""
    pids = set()
    try:
        from multiprocessing import resource_tracker

        pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if pid:
            pids.add(pid)
    except Exception:
        pass
    try:
        from multiprocessing import forkserver

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    except Exception:
        pass
    return pids


def _helper_paths() -> set[str]:
    paths = set()
    try:
        from multiprocessing import forkserver

        addr = getattr(forkserver._forkserver, "_forkserver_address", None)
        if isinstance(addr, str):
            paths.add(addr)
    except Exception:
        pass
    return paths


def _bound_unix_paths() -> set[str]:
    """Paths of the unix sockets some process has bound, from /proc/net/unix."""
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            return {parts[7] for parts in (line.split() for line in f) if len(parts) >= 8}
    except OSError:
        return set()


def _stale_forkserver_listeners(paths: set[str]) -> set[str]:
    """Under forkserver, a manager server that starts processes itself (a Pool)
    starts a stdlib forkserver of its own.  Its ``listener-*`` socket lands in
    this process's pymp-* dir (children inherit the tempdir setting), and the
    stdlib unlinks it only in ``forkserver._stop`` or with that dir at this
    process's exit -- for the stdlib and procshare alike, so it is no leak of
    the code under test.  Returned: such sockets that no process still binds."""
    own = multiprocessing.util.get_temp_dir()
    bound = _bound_unix_paths()
    return {
        p for p in paths
        if os.path.dirname(p) == own
        and os.path.basename(p).startswith("listener-")
        and p not in bound
    }


_PATTERNS = ("pymp-", "procshare")


def _tmp_snapshot() -> tuple[set[str], set[str]]:
    """(top-level pymp-*/procshare* entries that are not directories,
    every unix socket file anywhere under the temp dir)."""
    root = tempfile.gettempdir()
    top = set()
    try:
        for name in os.listdir(root):
            if name.startswith(_PATTERNS):
                path = os.path.join(root, name)
                if not os.path.isdir(path):
                    top.add(path)
    except OSError:
        pass
    socks = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    socks.add(path)
            except OSError:
                pass
    return top, socks


def _shm_snapshot() -> set[str]:
    """/dev/shm's entries, less multiprocessing's named semaphores (`sem.mp-*`):
    procshare makes none, a spawn Event or Lock of a test keeps its own until
    it is collected, and CI runs two test runs at once, whose semaphores
    would show up in the other run's checks."""
    try:
        return {n for n in os.listdir("/dev/shm") if not n.startswith("sem.mp-")}
    except OSError:
        return set()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.fixture(autouse=True)
def no_leaks(request):
    """After each test: no child process, no /dev/shm entry and no unix socket
    file created by the test may remain.  Waits are bounded (LEAK_WAIT)."""
    children_before = _child_pids()
    shm_before = _shm_snapshot()
    top_before, socks_before = _tmp_snapshot()
    yield
    problems = []
    deadline = time.monotonic() + LEAK_WAIT

    # 1. multiprocessing children: bounded join, then kill.
    for p in multiprocessing.active_children():
        p.join(max(0.0, deadline - time.monotonic()))
    stray = multiprocessing.active_children()
    if stray:
        problems.append(f"stray multiprocessing children: {stray!r}")
        for p in stray:
            p.kill()
            p.join(1)

    # 2. any other child process (e.g. started with subprocess/os.fork).
    helpers = _helper_pids()
    while True:
        extra = _child_pids() - children_before - helpers
        if not extra or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if extra:
        problems.append(f"stray child processes (pids): {sorted(extra)}")
        for pid in extra:
            _kill(pid)

    # 3. /dev/shm entries and unix socket files: allow a short bounded grace
    #    period for finalizers that run at process exit.
    ignore_paths = _helper_paths()
    while True:
        new_shm = _shm_snapshot() - shm_before
        top_after, socks_after = _tmp_snapshot()
        new_files = (top_after - top_before) | (socks_after - socks_before)
        new_files -= ignore_paths
        if "forkserver" in getattr(getattr(request.node, "callspec", None), "params", {}).values():
            stale = _stale_forkserver_listeners(new_files)
            for path in stale:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            new_files -= stale
        if not (new_shm or new_files) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if new_shm:
        problems.append(f"new /dev/shm entries: {sorted(new_shm)}")
    if new_files:
        problems.append(
            f"unix sockets / files left in {tempfile.gettempdir()}: {sorted(new_files)}"
        )
        for path in new_files:  # clean up so later tests start clean
            try:
                os.unlink(path)
            except OSError:
                pass

    if problems:
        pytest.fail("resource leak after test:\n  " + "\n  ".join(problems), pytrace=False)
