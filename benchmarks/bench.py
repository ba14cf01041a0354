#!/usr/bin/env python3
"""Side-by-side benchmarks: ``multiprocessing.managers`` (stdlib) against ``procshare.managers``.

Run from the repository root, with procshare installed (``pip install -e .``)::

    python benchmarks/bench.py              # every case, both implementations
    python benchmarks/bench.py --quick      # small N, about 20 s
    python benchmarks/bench.py --only call,dict --impl both --start-method spawn
    python benchmarks/bench.py --cpu        # also CPU time per call, client + manager
    python benchmarks/bench.py --loaded     # under a background CPU load it starts itself

``--cpu`` brackets every measured round with ``getrusage`` (``RUSAGE_SELF``, plus
``RUSAGE_CHILDREN`` for the worker processes a case starts and joins) and the manager server's
``utime + stime`` from ``/proc/<pid>/stat`` (Linux only; clock ticks, usually 10 ms, so each
figure is a sum over all the measured rounds). A second table shows CPU per unit of work, client
and manager together, with the ratio. Without ``--quick`` the small-call case covers at least
20,000 calls per implementation. In the contended case the client side includes the workers'
start-up (and under forkserver the workers are not our children, so their CPU is not seen).
When the call case runs without --loaded, the CPU table ends with a reference for calls that
do not poll: a bare blocking round trip of a few bytes between two Python processes, measured
the same way in the same run (also in --json). It is no floor: it moves with where the
scheduler puts the two processes (19.5-44 us of CPU in runs on one day, and a procshare call
without polling came in under it in one of them).

``--loaded`` starts two busy-loop Python processes per CPU (``os.cpu_count()``), at normal
priority, before the first case and SIGKILLs their process group after the last one, also on
errors, Ctrl-C and SIGTERM (they also quit on their own if this process dies).
``benchmarks/scale.py`` uses the same machinery to scale the client count from 1 to 16.

Rules this file keeps:

- Both implementations run in one process tree, in one run, round by round: a stdlib round,
  then a procshare round, then the other order, and so on. Each cell is the median of its
  rounds. Absolute times on shared 2-core machines are noise; the ratio is what we report.
- Every ``FRESH_EVERY`` (8) rounds a case stops both managers and starts new ones, so a run
  samples several placements of the processes on the CPUs instead of one per case.
- Each case runs in a process forked for it alone (``run_case_alone``), so that a case
  measures the same in a full run as with ``--only``, whatever ran before it.
- ``ratio`` is always procshare time / stdlib time for the same work: lower is better, and
  below 1.00 procshare is faster. Throughput cases show their rate beside the time.
- Only the stdlib-compatible API is used (``BaseManager.register``/``start``/``shutdown``,
  ``SyncManager`` and its types), so every case runs unchanged on both.
- Nothing here may hang: every setup, round and teardown runs under a wall-clock deadline, and
  an implementation that fails or times out in one case is reported as such and skipped for
  the rest of that case. If procshare cannot be imported, the stdlib still runs.
- Worker functions, the Counter class and the manager classes are module-level, so every start
  method (fork, spawn, forkserver) works.

Exit status: 0, or 1 if procshare raised, timed out or lost increments in a case it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import multiprocessing
import multiprocessing.managers as std_managers
import multiprocessing.util
import os
import pickle
import platform
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# The objects under test (module-level, so spawn children can import them by name)
# --------------------------------------------------------------------------------------------


class Counter:
    """The seed document's Counter."""

    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1

    def get_count(self):
        return self.count


class StdCounterManager(std_managers.BaseManager):
    pass


StdCounterManager.register("Counter", Counter)


def _import_procshare():
    """Return (procshare.managers or None, why not)."""
    try:
        import procshare.managers as ps

        return ps, None
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable yet"
        first = f"{type(exc).__name__}: {exc}"
    # Not installed? Fall back to the checkout's src/ (benchmarks/ sits beside it).
    src = Path(__file__).resolve().parent.parent / "src"
    if (src / "procshare").is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
        for name in [m for m in sys.modules if m == "procshare" or m.startswith("procshare.")]:
            del sys.modules[name]
        try:
            import procshare.managers as ps

            return ps, None
        except Exception as exc:  # noqa: BLE001
            return None, f"{type(exc).__name__}: {exc}"
    return None, first


ps_managers, PS_IMPORT_ERROR = _import_procshare()
PsCounterManager: Any = None
if ps_managers is not None:
    try:

        class PsCounterManager(ps_managers.BaseManager):  # type: ignore[no-redef]
            pass

        PsCounterManager.register("Counter", Counter)
    except Exception as exc:  # noqa: BLE001
        PS_IMPORT_ERROR = (
            f"procshare.managers.BaseManager is not usable: {type(exc).__name__}: {exc}"
        )
        ps_managers = None
        PsCounterManager = None


def _hammer(counter, n, barrier, results):
    """Worker of the contended case: n increments after all workers are ready."""
    try:
        barrier.wait(60)
        inc = counter.increment
        t0 = time.monotonic()
        for _ in range(n):
            inc()
        results.put((os.getpid(), t0, time.monotonic(), None))
    except BaseException as exc:  # noqa: BLE001 - report it to the parent, never hang it
        results.put((os.getpid(), 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def _write_elements(arr, n, barrier, results):
    """Worker of the array cases: n element writes (arr[i % len] = i) after all are ready,
    then a check that the last one landed."""
    try:
        barrier.wait(60)
        size = len(arr)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for i in range(n):
            arr[i % size] = i
        t1 = time.monotonic()
        cpu = time.process_time() - cpu0
        if arr[(n - 1) % size] != n - 1:
            raise AssertionError(f"element {(n - 1) % size} did not keep the last write")
        results.put((os.getpid(), t0, t1, None, cpu))
    except BaseException as exc:  # noqa: BLE001 - report it to the parent, never hang it
        results.put((os.getpid(), 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# Plumbing: implementations, deadlines, samples
# --------------------------------------------------------------------------------------------


@dataclass
class Impl:
    name: str  # "stdlib" or "procshare"
    managers: Any  # the module
    counter_manager: Any  # a BaseManager subclass with Counter registered


@dataclass
class Env:
    ctx: Any  # multiprocessing context
    quick: bool
    timeout: float  # seconds allowed for one setup, round or teardown
    cpu: bool = False  # also measure CPU time (client + manager) in every round


@dataclass
class Sample:
    seconds: float  # time per unit of work (one call, one pair, one round trip...)
    extra: dict = field(default_factory=dict)


class BenchTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise BenchTimeout in the main thread if the block runs longer than `seconds`.

    SIGALRM interrupts blocking socket reads too (PEP 475 retries only when the handler
    returns). Interval timers are not inherited by forked children.
    """

    def on_alarm(signum, frame):
        raise BenchTimeout(f"{what}: no result after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _manager_pid(manager) -> int | None:
    pid = getattr(manager, "pid", None)  # procshare
    if isinstance(pid, int):
        return pid
    proc = getattr(manager, "_process", None)  # stdlib
    return getattr(proc, "pid", None)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads) from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields 14 and 15 (1-based); split after the command name, which may hold spaces or ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields[0] is field 3, the state
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def client_cpu_seconds() -> float:
    """CPU of this process (all threads) plus its terminated and joined children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_snapshot(manager_pid: int | None) -> tuple[float, float]:
    """(client CPU seconds, manager server CPU seconds), both cumulative."""
    if manager_pid is None:
        raise RuntimeError("the manager's server pid is unknown: cannot read its CPU time")
    return client_cpu_seconds(), proc_cpu_seconds(manager_pid)


def start_manager(cls, env: Env):
    manager = cls(ctx=env.ctx)
    manager.start()
    return manager


def stop_manager(manager, env: Env) -> None:
    """shutdown() under a deadline; SIGKILL the server we started if that fails."""
    if manager is None:
        return
    try:
        with deadline(min(env.timeout, 20.0), "manager shutdown"):
            manager.shutdown()
        return
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        pid = _manager_pid(manager)
        print(f"  ! shutdown failed ({_describe(exc)}); killing server pid {pid}", file=sys.stderr)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# Busy loop of one load process: quits by itself once this process is gone (reparented).
_LOAD_LOOP = """\
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextlib.contextmanager
def background_load(n: int):
    """Run `n` CPU-bound busy-loop processes, at normal priority, for the duration of the block.

    They share one process group of their own (so a Ctrl-C at the terminal does not reach
    them), which is SIGKILLed on the way out whatever happened; SIGTERM is turned into
    SystemExit meanwhile so that it, too, gets here. Yields the list of Popen objects.
    """
    owner = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked child inherited this: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    procs: list[subprocess.Popen] = []
    old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for _ in range(n):
            group = procs[0].pid if procs else 0  # the first one leads a new group
            if sys.version_info >= (3, 11):
                grouping: dict = {"process_group": group}
            else:
                grouping = {"preexec_fn": functools.partial(os.setpgid, 0, group)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-S", "-c", _LOAD_LOOP, str(owner)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    **grouping,
                )
            )
        time.sleep(0.3)  # let them get going
        gone = [p for p in procs if p.poll() is not None]
        if gone:
            raise RuntimeError(f"a load process exited at once (exit code {gone[0].returncode})")
        yield procs
    finally:
        if procs and procs[0].poll() is None:  # the leader is alive, so the group is ours
            with contextlib.suppress(OSError):
                os.killpg(procs[0].pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()  # any that left the group; a no-op for those already reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        signal.signal(signal.SIGTERM, old_sigterm)


def load_size() -> int:
    """Load processes for --loaded: two per CPU."""
    return 2 * (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Cases. Each has start(impl, env) -> resources, measure(resources, env) -> Sample,
# stop(resources, env), and a way to show a sample.
# --------------------------------------------------------------------------------------------

MiB = 1 << 20


class Case:
    name = ""
    title = ""
    group = ""  # --only may name the group instead of the case
    rounds = (15, 31)  # (quick, full)
    ops = (500, 1000)  # operations per round (quick, full)
    unit = "call"
    uses_counter = False
    cpu_calls = 0  # with --cpu (not --quick): at least this many units over all rounds

    def n_ops(self, env: Env) -> int:
        if env.quick:
            return self.ops[0]
        if env.cpu and self.cpu_calls:
            return max(self.ops[1], -(-self.cpu_calls // self.n_rounds(env)))
        return self.ops[1]

    def units_per_round(self, env: Env) -> int:
        """Units of work (calls, pairs, round trips) in one measured round."""
        return self.n_ops(env)

    def n_rounds(self, env: Env) -> int:
        return self.rounds[0] if env.quick else self.rounds[1]

    def label(self, env: Env) -> str:
        return self.title

    def start(self, impl: Impl, env: Env) -> dict:
        cls = impl.counter_manager if self.uses_counter else impl.managers.SyncManager
        res = {"manager": start_manager(cls, env)}
        try:
            self.prepare(res, env)
        except BaseException:
            stop_manager(res["manager"], env)
            raise
        return res

    def prepare(self, res: dict, env: Env) -> None:
        pass

    def measure(self, res: dict, env: Env) -> Sample:
        raise NotImplementedError

    def stop(self, res: dict, env: Env) -> None:
        for key in [k for k in res if k != "manager"]:
            res.pop(key)
        stop_manager(res.pop("manager", None), env)

    def show(self, seconds: float) -> str:
        return per_unit(seconds, self.unit)


def short_time(seconds: float) -> str:
    us = seconds * 1e6
    if us < 0.9995:
        return f"{us * 1000:.0f} ns"
    return f"{us:.1f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def ratio_text(ratio: float) -> str:
    """Two decimals; a ratio below 0.01 (the shared array's) keeps two significant digits."""
    return f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.2g}"


def per_unit(seconds: float, unit: str) -> str:
    return f"{short_time(seconds)}/{unit}"


def _timed_loop(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


class CallCase(Case):
    name, group, title = "call", "call", "Counter.increment (registered class)"
    uses_counter = True
    cpu_calls = 20_000

    def prepare(self, res, env):
        res["counter"] = res["manager"].Counter()
        _timed_loop(res["counter"].increment, 50)  # connect + warm up

    def measure(self, res, env):
        return Sample(_timed_loop(res["counter"].increment, self.n_ops(env)))


class PipelinedCase(Case):
    """10,000 increments: the stdlib makes them one by one (it has no other way);
    procshare issues them all through procshare.async_ and then waits for them."""

    name, group, title = "pipelined", "call", "10,000 Counter.increment: stdlib sync vs async_"
    uses_counter = True
    rounds = (5, 9)
    ops = (10_000, 10_000)

    def prepare(self, res, env):
        res["counter"] = res["manager"].Counter()
        _timed_loop(res["counter"].increment, 50)
        if _is_procshare(res["manager"]):
            import procshare
            res["async"] = procshare.async_(res["counter"])
            res["async"].increment().result(30)       # opens the pipelined connection

    def measure(self, res, env):
        n = self.n_ops(env)
        calls = res.get("async")
        if calls is None:
            return Sample(_timed_loop(res["counter"].increment, n))
        t0 = time.perf_counter()
        futures = [calls.increment() for _ in range(n)]
        for f in futures:
            f.result(60)
        return Sample((time.perf_counter() - t0) / n)


def _is_procshare(manager) -> bool:
    return not isinstance(manager, std_managers.BaseManager)


class DictSetCase(Case):
    name, group, title = "dict_set", "dict", "dict d[k] = v"

    def prepare(self, res, env):
        d = res["dict"] = res["manager"].dict()
        for i in range(50):
            d["k"] = i

    def measure(self, res, env):
        d = res["dict"]
        n = self.n_ops(env)
        t0 = time.perf_counter()
        for i in range(n):
            d["k"] = i
        return Sample((time.perf_counter() - t0) / n)


class DictGetCase(Case):
    name, group, title = "dict_get", "dict", "dict d.get(k)"

    def prepare(self, res, env):
        d = res["dict"] = res["manager"].dict()
        d["k"] = 12345
        for _ in range(50):
            d.get("k")

    def measure(self, res, env):
        d = res["dict"]
        n = self.n_ops(env)
        t0 = time.perf_counter()
        for _ in range(n):
            d.get("k")
        elapsed = time.perf_counter() - t0
        if d.get("k") != 12345:
            raise AssertionError("dict.get returned the wrong value")
        return Sample(elapsed / n)


class ProxyCase(Case):
    name, group, title = "proxy", "proxy", "create + drop manager.list()"
    rounds = (15, 31)
    ops = (30, 60)
    unit = "pair"

    def prepare(self, res, env):
        m = res["manager"]
        for _ in range(10):
            p = m.list()
            del p

    def measure(self, res, env):
        m = res["manager"]
        n = self.n_ops(env)
        t0 = time.perf_counter()
        for _ in range(n):
            p = m.list()
            del p
        return Sample((time.perf_counter() - t0) / n)


class LockCase(Case):
    name, group, title = "lock", "lock", "Lock acquire + release (uncontended)"
    unit = "pair"

    def prepare(self, res, env):
        lk = res["lock"] = res["manager"].Lock()
        for _ in range(50):
            lk.acquire()
            lk.release()

    def measure(self, res, env):
        lk = res["lock"]
        acquire, release = lk.acquire, lk.release
        n = self.n_ops(env)
        t0 = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        return Sample((time.perf_counter() - t0) / n)


def run_workers(env: Env, target, worker_args: list[tuple], mark=None) -> tuple[list, list]:
    """Run target(*args, barrier, results) in one process per tuple of `worker_args`.

    The workers start their work together (a Barrier) and each puts one (pid, t0, t1, error)
    tuple on `results`; all are joined before this returns, and any still alive on the way out
    (error, timeout, Ctrl-C) are killed. Returns (the results, marks): with `mark`, a callable,
    the parent takes part in the barrier and marks = [mark() right after the barrier released
    the workers, mark() right after the last result arrived]; without it, marks = [].
    """
    parties = len(worker_args) + (mark is not None)
    barrier = env.ctx.Barrier(parties)
    results = env.ctx.Queue()
    workers = [
        env.ctx.Process(target=target, args=(*args, barrier, results), daemon=True)
        for args in worker_args
    ]
    marks = []
    try:
        for w in workers:
            w.start()
        if mark is not None:
            barrier.wait(env.timeout)
            marks.append(mark())
        got = []
        limit = time.monotonic() + env.timeout
        while len(got) < len(workers):
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker died with exit code {dead[0].exitcode}") from None
                if time.monotonic() > limit:
                    raise BenchTimeout("workers did not finish") from None
        if mark is not None:
            marks.append(mark())
        for w in workers:
            w.join(10)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(5)
        results.close()
    errors = [g[3] for g in got if g[3]]
    if errors:
        raise RuntimeError(f"worker failed: {errors[0]}")
    return got, marks


class ContendedCase(Case):
    name, group = "counter4", "counter4"
    rounds = (5, 9)
    ops = (1000, 5000)  # increments per process, as in the seed for --quick
    procs = 4
    uses_counter = True

    def label(self, env):
        return f"{self.procs} procs x {self.n_ops(env)} Counter.increment"

    def prepare(self, res, env):
        c = res["manager"].Counter()
        c.increment()
        del c

    def units_per_round(self, env):
        return self.procs * self.n_ops(env)

    def measure(self, res, env):
        n = self.n_ops(env)
        counter = res["manager"].Counter()
        got, _ = run_workers(env, _hammer, [(counter, n)] * self.procs)
        wall = max(g[2] for g in got) - min(g[1] for g in got)
        count = counter.get_count()
        del counter
        self.total = self.procs * n
        return Sample(wall, {"count": count, "expected": self.total})

    def show(self, seconds):
        return f"{seconds:.3f} s ({self.total / seconds / 1000:.1f}k calls/s)"


class PayloadCase(Case):
    group = "payload"
    unit = "round trip"

    def __init__(self, size: int, rounds: tuple[int, int], reps: tuple[int, int]):
        self.size = size
        self.name = f"payload_{size // MiB}m"
        self.title = f"bytes {size // MiB} MiB: d[k] = b; d[k]"
        self.rounds = rounds
        self.ops = reps

    def prepare(self, res, env):
        res["payload"] = b"\x5a" * self.size
        d = res["dict"] = res["manager"].dict()
        d["blob"] = res["payload"]
        if len(d["blob"]) != self.size:
            raise AssertionError("payload came back with the wrong size")

    def measure(self, res, env):
        d, payload = res["dict"], res["payload"]
        n = self.n_ops(env)
        total = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            d["blob"] = payload
            got = d["blob"]
            total += time.perf_counter() - t0
            self.check(got)
            del got
        return Sample(total / n, {"memcpy2": memcpy_reference(self.size)})

    def check(self, got):
        if len(got) != self.size:
            raise AssertionError("payload came back with the wrong size")

    def show(self, seconds):
        gbps = 2 * self.size / seconds / 1e9  # the payload crosses the wire twice
        return f"{seconds * 1e3:.2f} ms ({gbps:.2f} GB/s)"


def _set_many(d, n, barrier, results):
    """Worker of the durable cases: n sets of its own key after all are ready."""
    try:
        barrier.wait(60)
        key = os.getpid()
        t0 = time.monotonic()
        for i in range(n):
            d[key] = i
        results.put((os.getpid(), t0, time.monotonic(), None))
    except BaseException as exc:  # noqa: BLE001 - report it to the parent, never hang it
        results.put((os.getpid(), 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


class DurableSetCase(Case):
    """d[k] = v on a dict made with durable=True (procshare: journaled, one commit per
    set, shared by concurrent writers) or without; the stdlib has no durable objects,
    so its rows are its plain dict on both lines."""

    group = "durable"
    rounds = (5, 9)
    ops = (500, 2000)

    def __init__(self, procs: int, durable: bool):
        self.procs, self.durable = procs, durable
        kind = "durable" if durable else "plain"
        self.name = f"{kind}{procs}"
        self.title = (f"{kind} dict d[k] = v, {procs} client" + ("s" if procs > 1 else "")
                      + (" (stdlib: plain)" if durable else ""))
        self.unit = "set"

    def prepare(self, res, env):
        m = res["manager"]
        res["dict"] = m.dict(durable=True) if self.durable and _is_procshare(m) else m.dict()
        for i in range(50):
            res["dict"]["warm"] = i

    def units_per_round(self, env):
        return self.procs * self.n_ops(env)

    def measure(self, res, env):
        d, n = res["dict"], self.n_ops(env)
        if self.procs == 1:
            t0 = time.perf_counter()
            for i in range(n):
                d["k"] = i
            return Sample((time.perf_counter() - t0) / n)
        got, _ = run_workers(env, _set_many, [(d, n)] * self.procs)
        wall = max(g[2] for g in got) - min(g[1] for g in got)
        return Sample(wall / (self.procs * n))


class NdarrayCase(PayloadCase):
    """The same round trip with a numpy array (float64) of `size` bytes."""

    def __init__(self, size: int, rounds: tuple[int, int], reps: tuple[int, int]):
        super().__init__(size, rounds, reps)
        self.name = f"ndarray_{size // MiB}m"
        self.title = f"ndarray {size // MiB} MiB: d[k] = a; d[k]"

    def prepare(self, res, env):
        import numpy

        res["payload"] = numpy.full(self.size // 8, 1.5)
        d = res["dict"] = res["manager"].dict()
        d["blob"] = res["payload"]
        self.check(d["blob"])

    def check(self, got):
        if got.nbytes != self.size or got[-1] != 1.5:
            raise AssertionError("array came back wrong")


_memcpy_buffers: dict[int, tuple[bytes, bytearray]] = {}


def memcpy_reference(size: int) -> float:
    """Seconds for two local copies of `size` bytes into memory already
    faulted in (the floor any transport is measured against), best of three."""
    if size not in _memcpy_buffers:
        _memcpy_buffers.clear()
        dst = bytearray(size)
        dst[::4096] = b"\1" * len(dst[::4096])
        _memcpy_buffers[size] = (b"\x5a" * size, dst)
    src, dst = _memcpy_buffers[size]
    view = memoryview(dst)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        view[:] = src
        view[:] = src
        best = min(best, time.perf_counter() - t0)
    return best


def _echo(sock, warm: int, n: int) -> None:
    """Child of `round_trip_reference`: echo warm + n messages, then send back its own
    CPU seconds over the last n."""
    recv, send = sock.recv, sock.send
    for _ in range(warm):
        send(recv(256))
    t0 = client_cpu_seconds()
    for _ in range(n):
        send(recv(256))
    spent = client_cpu_seconds() - t0
    recv(256)  # asked for it: sent earlier, it could share a read with the last echo
    sock.sendall(repr(spent).encode())
    sock.close()


def round_trip_reference(env: Env, n: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one blocking round trip of a call-sized message
    over a Unix socket between this process and a child, both ends together: no
    pickling, no polling, nothing but the two wakeups every synchronous call without
    polling pays, best of three."""
    import socket

    best = (float("inf"), float("inf"))
    for _ in range(3):
        a, b = socket.socketpair()
        warm = 200
        child = env.ctx.Process(target=_echo, args=(b, warm, n), daemon=True)
        child.start()
        b.close()
        try:
            a.settimeout(env.timeout)
            msg = b"x" * 60
            for _ in range(warm):
                a.send(msg)
                a.recv(256)
            c0, t0 = client_cpu_seconds(), time.perf_counter()
            for _ in range(n):
                a.send(msg)
                a.recv(256)
            wall = time.perf_counter() - t0
            mine = client_cpu_seconds() - c0
            a.send(b"cpu?")
            theirs = float(b"".join(iter(functools.partial(a.recv, 64), b"")))  # to its close
        finally:
            a.close()
            child.join(env.timeout)
        best = min(best, ((mine + theirs) / n, wall / n))
    return best


class ArrayCase(Case):
    """Element writes in a child process, `a[i % len(a)] = i`, to an array of 1,000 'i'
    that the child got as a process argument.  `shared`: procshare's side writes a
    `manager.SharedArray` (plain memory: no round trip) and the stdlib's side, which
    has none, its `manager.Array` proxy (a round trip each); else both write their
    `manager.Array` proxy.  Proxy writes are timed over fewer writes than shared ones
    (`ops`; a million proxy writes take half a minute): compare per write.  With
    --cpu the client's CPU is the child's own over its writes (`process_time`),
    not its start-up; the manager's is the whole round's."""

    group = "array"
    rounds = (5, 9)
    ops = (1000, 5000)  # proxy writes per round (quick, full)
    shared_ops = (100_000, 1_000_000)  # SharedArray writes per round (quick, full)
    unit = "write"
    size = 1000

    def __init__(self, shared: bool):
        self.shared = shared
        self.name = "shared_array" if shared else "array_proxy"
        self.title = ("element writes in a child: SharedArray (stdlib: Array proxy)" if shared
                      else "element writes in a child: manager.Array proxy")

    def _writes(self, res, env) -> int:
        if "shared" not in res:
            return self.n_ops(env)
        return self.shared_ops[0] if env.quick else self.shared_ops[1]

    def prepare(self, res, env):
        m = res["manager"]
        if self.shared and _is_procshare(m):
            res["shared"] = m.SharedArray("i", [0] * self.size)
        else:
            res["proxy"] = m.Array("i", [0] * self.size)

    def measure(self, res, env):
        arr = res.get("shared", res.get("proxy"))
        n = self._writes(res, env)
        got, _ = run_workers(env, _write_elements, [(arr, n)])
        return Sample((got[0][2] - got[0][1]) / n, {"units": n, "worker_cpu": got[0][4]})



def _have_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


CASES: list[Case] = [
    CallCase(),
    PipelinedCase(),
    DictSetCase(),
    DictGetCase(),
    ProxyCase(),
    ContendedCase(),
    LockCase(),
    PayloadCase(1 * MiB, rounds=(15, 31), reps=(4, 8)),
    PayloadCase(64 * MiB, rounds=(5, 9), reps=(1, 1)),
    DurableSetCase(1, durable=False),
    DurableSetCase(1, durable=True),
    DurableSetCase(4, durable=False),
    DurableSetCase(4, durable=True),
    ArrayCase(shared=False),
    ArrayCase(shared=True),
    *(
        [
            NdarrayCase(1 * MiB, rounds=(15, 31), reps=(4, 8)),
            NdarrayCase(64 * MiB, rounds=(5, 9), reps=(1, 1)),
        ]
        if _have_numpy()
        else []
    ),
]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    label: str
    samples: dict = field(default_factory=dict)  # impl name -> [Sample]
    errors: dict = field(default_factory=dict)  # impl name -> text

    def median(self, impl: str) -> float | None:
        s = self.samples.get(impl)
        return statistics.median(x.seconds for x in s) if s else None

    def cpu(self, impl: str) -> tuple[float, float, int] | None:
        """(client, manager) CPU seconds per unit and the units, summed over all rounds."""
        s = [x.extra for x in self.samples.get(impl, []) if "cpu_client" in x.extra]
        units = sum(x["units"] for x in s)
        if not units:
            return None
        return (
            sum(x["cpu_client"] for x in s) / units,
            sum(x["cpu_manager"] for x in s) / units,
            units,
        )

    def spread(self, impl: str) -> float | None:
        """Half the interquartile range, relative to the median."""
        s = [x.seconds for x in self.samples.get(impl, [])]
        if len(s) < 3:
            return None
        q1, _, q3 = statistics.quantiles(s, n=4)
        return (q3 - q1) / 2 / statistics.median(s)


#: rounds per pair of managers: each case starts both implementations' managers afresh
#: every this many rounds, so that a run samples several placements of the processes
#: by the scheduler (on a busy 2-core machine one placement can make every call of a
#: manager's life 4x slower than another does; see docs/design.md, "One call")
FRESH_EVERY = 8


def run_case(case: Case, impls: list[Impl], env: Env) -> CaseResult:
    result = CaseResult(case, case.label(env))
    for impl in impls:
        result.samples[impl.name] = []
    n = case.n_rounds(env)
    for first in range(0, n, FRESH_EVERY):
        _run_rounds(case, impls, env, result, range(first, min(n, first + FRESH_EVERY)))
    return result


def run_case_alone(case: Case, impls: list[Impl], env: Env) -> CaseResult:
    """`run_case` in a process forked for this case alone, so that no case runs in
    what another left behind in this process: glibc raises its mmap threshold after
    large blocks are freed, and after the 64 MiB cases the stdlib's 1 MiB round trips
    ran about three times faster than they do in any process that moves only 1 MiB
    blocks (0.83 ms against 2.2-2.9).  Each case now measures what it measures with
    --only.  Without fork: in this process.

    The result comes back pickled in a file, read once the child has exited (a pipe
    would stay open in whatever the case forked, a manager that outlived it say).  If
    this process is interrupted, the child gets SIGINT (its managers are stopped on
    the way out) and, after `ALONE_STOP_WAIT` seconds, SIGKILL."""
    if not hasattr(os, "fork"):
        return run_case(case, impls, env)
    fd, path = tempfile.mkstemp(prefix="procshare-bench-", suffix=".pickle")
    os.close(fd)
    signals = {signal.SIGINT, signal.SIGTERM}
    sys.stdout.flush()      # (or the child's own flush would print it again)
    sys.stderr.flush()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # none between fork and try
    try:
        pid = os.fork()
        if pid == 0:    # the case's own process: its result goes to the file, then it exits
            code = 1
            try:
                signal.signal(signal.SIGINT, _interrupt_once)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                data = pickle.dumps(run_case(case, impls, env))
                with open(path, "wb") as out:
                    out.write(data)
                code = 0
            except KeyboardInterrupt:
                pass                # the parent was interrupted too: it says so
            except BaseException:  # noqa: BLE001 - reported by the parent; never return here
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        try:
            _, status = os.waitpid(pid, 0)
        except BaseException:
            _stop_child(pid)
            raise
        with open(path, "rb") as got:
            data = got.read()
    finally:
        os.unlink(path)
    problem = f"exit code {os.waitstatus_to_exitcode(status)}"
    if data:
        try:
            return pickle.loads(data)
        except Exception as exc:  # noqa: BLE001
            problem = f"an unreadable result ({_describe(exc)})"
    result = CaseResult(case, case.label(env))
    for impl in impls:
        result.samples[impl.name] = []
        result.errors[impl.name] = (f"the case's process ended without a result ({problem}; "
                                    "its error, if any, is printed above)")
    return result


#: how long an interrupted case's process has to stop its managers before SIGKILL
ALONE_STOP_WAIT = 10.0


def _interrupt_once(signum, frame):
    """A case's process: the first Ctrl-C stops the case, and stopping its managers is
    not interrupted by the next (the parent SIGKILLs it after ALONE_STOP_WAIT)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _stop_child(pid: int) -> None:
    """SIGINT to a case's process, then SIGKILL if it is not gone in ALONE_STOP_WAIT s;
    another Ctrl-C or SIGTERM meanwhile waits until then."""
    signals = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        end = time.monotonic() + ALONE_STOP_WAIT
        while time.monotonic() < end:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:   # reaped already: nothing to kill (its pid may be reused)
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _run_rounds(case: Case, impls: list[Impl], env: Env, result: CaseResult,
                rounds: range) -> None:
    """Start each implementation's manager, run `rounds` alternating rounds, stop them."""
    resources: dict[str, dict] = {}
    for impl in impls:
        if impl.name in result.errors:
            continue
        try:
            with deadline(env.timeout, "setup"):
                resources[impl.name] = case.start(impl, env)
                if env.cpu:
                    cpu_snapshot(_manager_pid(resources[impl.name]["manager"]))  # readable?
        except Exception as exc:  # noqa: BLE001
            result.errors[impl.name] = "setup: " + _describe(exc)
    try:
        for r in rounds:
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                if impl.name in result.errors:
                    continue
                gc.collect()
                gc.disable()
                try:
                    with deadline(env.timeout, f"round {r + 1}"):
                        res = resources[impl.name]
                        if env.cpu:
                            pid = _manager_pid(res["manager"])
                            before = cpu_snapshot(pid)
                        sample = case.measure(res, env)
                        if env.cpu:
                            after = cpu_snapshot(pid)
                            # a case whose worker measured its own loop: that is the
                            # client's CPU (not the worker's start-up, nor this
                            # process's wait; under forkserver it is no child of ours)
                            sample.extra["cpu_client"] = sample.extra.pop(
                                "worker_cpu", after[0] - before[0])
                            sample.extra["cpu_manager"] = after[1] - before[1]
                            sample.extra.setdefault("units", case.units_per_round(env))
                except Exception as exc:  # noqa: BLE001
                    result.errors[impl.name] = _describe(exc)
                else:
                    result.samples[impl.name].append(sample)
                finally:
                    gc.enable()
    finally:
        for name, res in resources.items():
            try:
                case.stop(res, env)
            except Exception as exc:  # noqa: BLE001
                result.errors.setdefault(name, "teardown: " + _describe(exc))


def _count_note(result: CaseResult, impl: str) -> str | None:
    samples = result.samples.get(impl)
    if not samples or "count" not in samples[0].extra:
        return None
    expected = samples[0].extra["expected"]
    n = len(samples)
    inexact = sum(1 for s in samples if s.extra["count"] != s.extra["expected"])
    worst = min(s.extra["count"] for s in samples)
    if not inexact:
        return f"{impl} {expected}/{expected}, exact in every round ({n}/{n})"
    return (
        f"{impl} as low as {worst}/{expected}: LOST up to {expected - worst} increments"
        f" (wrong in {inexact}/{n} rounds)"
    )


def print_table(results: list[CaseResult], impl_names: list[str]) -> None:
    rows = [("case", "what", *impl_names)]
    if len(impl_names) == 2:
        rows[0] += ("ratio",)
    notes = []
    for res in results:
        cells = []
        for name in impl_names:
            med = res.median(name)
            if name in res.errors and med is None:
                cells.append("FAILED")
            elif med is None:
                cells.append("-")
            else:
                sp = res.spread(name)
                text = res.case.show(med)
                if sp is not None:
                    text += f" ±{sp * 100:.0f}%"
                if name in res.errors:
                    text += " (then failed)"
                cells.append(text)
        row = (res.case.name, res.label, *cells)
        if len(impl_names) == 2:
            a, b = (res.median(n) for n in impl_names)
            row += (ratio_text(b / a) if a and b else "-",)
        rows.append(row)
        counts = [c for c in (_count_note(res, n) for n in impl_names) if c]
        if counts:
            notes.append(f"{res.case.name}: final count: " + "; ".join(counts))
        for name, err in res.errors.items():
            notes.append(f"{res.case.name}: {name} failed: {err}")
    notes.extend(durability_cost(results))
    notes.extend(shared_array_gain(results))
    print_rows(rows, notes)


def durability_cost(results: list[CaseResult]) -> list[str]:
    """procshare's durable dict against its plain one, from the durable cases."""
    by_name = {r.case.name: r for r in results}
    out = []
    for procs in (1, 4):
        plain, durable = by_name.get(f"plain{procs}"), by_name.get(f"durable{procs}")
        if plain is None or durable is None:
            continue
        a, b = plain.median("procshare"), durable.median("procshare")
        if a and b:
            out.append(f"durability, {procs} client{'s' if procs > 1 else ''}: a durable set "
                       f"costs {b / a:.2f}x a plain one (throughput {a / b * 100:.0f}% of "
                       "plain)")
    return out


def shared_array_gain(results: list[CaseResult]) -> list[str]:
    """procshare's SharedArray against the Array proxies, from the array cases."""
    by_name = {r.case.name: r for r in results}
    shared, proxy = by_name.get("shared_array"), by_name.get("array_proxy")
    if shared is None or proxy is None:
        return []
    mine = shared.median("procshare")
    if not mine:
        return []
    against = [(f"{who} Array proxy", proxy.median(impl))
               for impl, who in (("procshare", "procshare's"), ("stdlib", "the stdlib's"))]
    parts = [f"{t / mine:.0f}x faster than {what} ({short_time(t)} a write)"
             for what, t in against if t]
    if not parts:
        return []
    return [f"shared array: in a child process, a SharedArray element write takes "
            f"{mine * 1e9:.0f} ns, " + " and ".join(parts)]


def print_rows(rows: list[tuple], notes: list[str] | tuple = ()) -> None:
    """Aligned columns (the first two left-aligned) under a rule, then the notes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                cell.ljust(w) if j < 2 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if notes:
        print()
        for note in notes:
            print(note)


def measure_reference(results: list[CaseResult], env: Env, idle: bool) -> tuple | str | None:
    """`round_trip_reference` under the run's deadline, on an idle run with the call
    case (on a busy machine a wakeup finds its core running already, and the figure
    says nothing); None when not measured, a description when it failed."""
    if not (env.cpu and idle and "call" in {r.case.name for r in results}):
        return None
    try:
        with deadline(env.timeout * 4, "the blocking round trip"):
            return round_trip_reference(env, 5000 if env.quick else 20000)
    except Exception as e:  # noqa: BLE001 - a reference line, never the run's end
        return _describe(e)


def print_cpu_table(results: list[CaseResult], impl_names: list[str], env: Env,
                    reference: tuple | str | None = None) -> None:
    """CPU per unit of work, client + manager, summed over each case's measured rounds;
    then the blocking round trip, if `measure_reference` measured it."""
    print(
        "\nCPU time per unit of work: client (getrusage: self + joined worker children)"
        " + manager server (/proc/<pid>/stat utime + stime), over all measured rounds."
    )
    rows = [("case", "units", *impl_names)]
    if len(impl_names) == 2:
        rows[0] += ("ratio",)
    for res in results:
        cpus = [res.cpu(name) for name in impl_names]
        units = sorted({c[2] for c in cpus if c})
        cells = [
            "-"
            if c is None
            else f"{per_unit(c[0] + c[1], res.case.unit)}"
            f" = {short_time(c[0])} client + {short_time(c[1])} manager"
            for c in cpus
        ]
        row = (res.case.name, "/".join(f"{u:,}" for u in units) or "-", *cells)
        if len(impl_names) == 2:
            a, b = cpus
            row += (ratio_text(sum(b[:2]) / sum(a[:2])) if a and b and sum(a[:2]) else "-",)
        rows.append(row)
    notes = []
    if isinstance(reference, str):
        notes.append(f"blocking round trip: not measured ({reference})")
    elif reference is not None:
        cpu, wall = reference
        std = next((r.cpu("stdlib") for r in results if r.case.name == "call"), None)
        vs = f" ({cpu / sum(std[:2]):.2f}x the stdlib's call)" if std else ""
        notes.append(
            f"reference, same run: a bare blocking round trip of 60 bytes over a Unix"
            f" socket between two Python processes (no pickling, no polling) costs"
            f" {per_unit(cpu, 'call')}{vs}, {short_time(wall)} wall: the two wakeups a"
            " synchronous call pays when it does not poll (PROCSHARE_SPIN_US=0). It moves"
            " with where the scheduler puts the processes, so compare, do not subtract."
        )
    if any(isinstance(r.case, ArrayCase) for r in results):
        notes.append("array cases: the client column is the writing child's own CPU over its"
                     " writes (process_time), without its start-up.")
    if env.ctx.get_start_method() == "forkserver" and any(
        isinstance(r.case, ContendedCase) for r in results
    ):
        notes.append(
            "forkserver: worker processes are children of the fork server, not of this"
            " process, so their CPU is missing from the client column."
        )
    print_rows(rows, notes)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared with scale.py: start method, deadline, background load."""
    p.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
        help="multiprocessing start method for managers and workers (default: fork)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per setup/round (default 60, quick 30)",
    )
    p.add_argument(
        "--loaded",
        action="store_true",
        help=f"run under a CPU load started here: {load_size()} busy-loop processes (two per"
        " CPU, normal priority), stopped at the end, also on errors and Ctrl-C",
    )


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark procshare.managers against multiprocessing.managers, side by side."
    )
    p.add_argument("--quick", action="store_true", help="small N; about 20 s in all")
    p.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help="run only these cases (comma-separated, repeatable); a group name such as "
        "'dict' or 'payload' selects all its cases. Cases: " + ", ".join(c.name for c in CASES),
    )
    p.add_argument("--impl", choices=("stdlib", "procshare", "both"), default="both")
    add_run_args(p)
    p.add_argument(
        "--cpu",
        action="store_true",
        help="also report CPU time per unit of work, client + manager server together "
        "(getrusage + /proc/<pid>/stat; Linux); without --quick the call case then covers "
        f"at least {CallCase.cpu_calls:,} calls",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def select_cases(only: list[str] | None) -> list[Case]:
    if not only:
        return list(CASES)
    wanted = [w.strip() for item in only for w in item.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(w in (c.name, c.group) for c in CASES)]
    if unknown:
        names = sorted({c.name for c in CASES} | {c.group for c in CASES})
        raise SystemExit(
            f"bench.py: unknown case {', '.join(unknown)}; choose from {', '.join(names)}"
        )
    return [c for c in CASES if c.name in wanted or c.group in wanted]


def make_env(args, quick: bool, cpu: bool = False) -> Env:
    return Env(
        ctx=multiprocessing.get_context(args.start_method),
        quick=quick,
        timeout=args.timeout or (30.0 if quick else 60.0),
        cpu=cpu,
    )


def build_impls(which: str) -> list[Impl] | None:
    """The implementations to run ("stdlib", "procshare" or "both"); None if none can."""
    impls: list[Impl] = []
    if which in ("stdlib", "both"):
        impls.append(Impl("stdlib", std_managers, StdCounterManager))
    if which in ("procshare", "both"):
        if ps_managers is None:
            print(f"procshare is not importable: {PS_IMPORT_ERROR}", file=sys.stderr)
            if which == "procshare":
                return None
            print("Running the stdlib alone.\n", file=sys.stderr)
        else:
            impls.append(Impl("procshare", ps_managers, PsCounterManager))
    return impls


def loaded(on: bool):
    """background_load(load_size()) if `on`, else a block without load; yields the processes."""
    return background_load(load_size()) if on else contextlib.nullcontext([])


def describe_run(env: Env, load_procs: list) -> list[str]:
    """Header lines shared with scale.py: interpreter, machine, procshare's path, the load."""
    lines = [
        f"python {platform.python_version()} on {platform.system().lower()}, "
        f"{os.cpu_count()} CPUs, start method {env.ctx.get_start_method()}, "
        f"{'quick' if env.quick else 'full'} mode"
    ]
    if ps_managers is not None:
        lines.append(f"procshare from {Path(ps_managers.__file__).parent}")
    if load_procs:
        lines.append(
            f"LOADED machine: {len(load_procs)} busy-loop load processes (two per CPU,"
            " normal priority) ran throughout the measurements."
        )
    return lines


def load_check(load_procs: list) -> str | None:
    """One line saying whether the load was still there at the end (None without load)."""
    if not load_procs:
        return None
    alive = sum(1 for p in load_procs if p.poll() is None)
    return f"load: {alive}/{len(load_procs)} busy-loop processes still running at the end"


def procshare_failed(results: list[CaseResult]) -> bool:
    """True if procshare raised, timed out or lost increments in any case it ran."""
    for r in results:
        if "procshare" in r.errors:
            return True
        for s in r.samples.get("procshare", []):
            if "count" in s.extra and s.extra["count"] != s.extra["expected"]:
                return True
    return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        env = Env(ctx=None, quick=args.quick, timeout=0)
        for c in CASES:
            print(f"{c.name:<12} group {c.group:<9} {c.label(env)}")
        return 0
    cases = select_cases(args.only)
    if args.cpu and not os.path.exists("/proc/self/stat"):
        raise SystemExit("bench.py: --cpu reads the manager's CPU time from /proc (Linux only)")
    env = make_env(args, args.quick, cpu=args.cpu)
    impls = build_impls(args.impl)
    if impls is None:
        return 2
    names = [i.name for i in impls]

    results = []
    with loaded(args.loaded) as load_procs:
        print("procshare benchmarks: multiprocessing.managers (stdlib) vs procshare.managers")
        for line in describe_run(env, load_procs):
            print(line)
        print(
            "Each cell: median over rounds (± half the interquartile range); the implementations"
            " run in alternating rounds."
        )
        if len(names) == 2:
            print(
                "ratio = procshare time / stdlib time for the same work: lower is better,"
                " < 1 is faster."
            )
        print(flush=True)

        t_start = time.monotonic()
        # the children's managers share this process's temp dir, removed at its exit
        # (a child leaves with os._exit, which skips multiprocessing's cleanup)
        multiprocessing.util.get_temp_dir()
        for case in cases:
            print(f"  running {case.name} ...", file=sys.stderr, flush=True)
            results.append(run_case_alone(case, impls, env))
        elapsed = time.monotonic() - t_start
        load_note = load_check(load_procs)
    print_table(results, names)
    print_memcpy_notes(results)
    reference = measure_reference(results, env, idle=not load_procs)
    if env.cpu:
        print_cpu_table(results, names, env, reference)
    print(f"\n({elapsed:.1f} s" + (f"; {load_note})" if load_note else ")"))

    if args.json:
        data = {
            "python": platform.python_version(),
            "start_method": env.ctx.get_start_method(),
            "quick": env.quick,
            "load_processes": len(load_procs),
            **(
                {"blocking_round_trip_cpu_seconds": reference[0],
                 "blocking_round_trip_wall_seconds": reference[1]}
                if isinstance(reference, tuple)
                else {}
            ),
            "cases": [
                {
                    "case": r.case.name,
                    "what": r.label,
                    "median_seconds": {n: r.median(n) for n in names},
                    "samples_seconds": {n: [s.seconds for s in r.samples[n]] for n in names},
                    "extra": {n: [s.extra for s in r.samples[n]] for n in names},
                    "errors": r.errors,
                    "ratio": (
                        r.median("procshare") / r.median("stdlib")
                        if r.median("procshare") and r.median("stdlib")
                        else None
                    ),
                    **(
                        {"cpu_seconds_per_unit": {n: _cpu_json(r.cpu(n)) for n in names}}
                        if env.cpu
                        else {}
                    ),
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")

    return 1 if procshare_failed(results) else 0


def print_memcpy_notes(results: list[CaseResult]) -> None:
    """For payload cases: the time of two local memcpys of the payload, and
    each implementation's round trip as a multiple of it."""
    lines = []
    for r in results:
        refs = [x.extra["memcpy2"] for s in r.samples.values() for x in s if "memcpy2" in x.extra]
        if not refs:
            continue
        ref = statistics.median(refs)
        times = ", ".join(
            f"{n} {r.median(n) / ref:.1f}x" for n in r.samples if r.median(n) is not None
        )
        lines.append(f"  {r.case.name}: two local memcpys {short_time(ref)}; round trip = {times}")
    if lines:
        print("\nreference (same run): the payload copied twice in this process, warm memory")
        print("\n".join(lines))


def _cpu_json(cpu: tuple[float, float, int] | None) -> dict | None:
    if cpu is None:
        return None
    return {"client": cpu[0], "manager": cpu[1], "total": cpu[0] + cpu[1], "units": cpu[2]}


if __name__ == "__main__":
    sys.exit(main())
