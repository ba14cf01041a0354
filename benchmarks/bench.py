#!/usr/bin/env python3
"""Side-by-side benchmarks: ``multiprocessing.managers`` (stdlib) against ``procshare.managers``.

Run from the repository root, with procshare installed (``pip install -e .``)::

    python benchmarks/bench.py              # every case, both implementations
    python benchmarks/bench.py --quick      # small N, about 20 s
    python benchmarks/bench.py --only call,dict --impl both --start-method spawn

Rules this file keeps:

- Both implementations run in one process tree, in one run, round by round: a stdlib round,
  then a procshare round, then the other order, and so on. Each cell is the median of its
  rounds. Absolute times on shared 2-core machines are noise; the ratio is what we report.
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
import gc
import json
import multiprocessing
import multiprocessing.managers as std_managers
import os
import platform
import queue
import signal
import statistics
import sys
import time
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

    def n_ops(self, env: Env) -> int:
        return self.ops[0] if env.quick else self.ops[1]

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
        us = seconds * 1e6
        if us < 1000:
            return f"{us:.1f} µs/{self.unit}"
        return f"{us / 1000:.2f} ms/{self.unit}"


def _timed_loop(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


class CallCase(Case):
    name, group, title = "call", "call", "Counter.increment (registered class)"
    uses_counter = True

    def prepare(self, res, env):
        res["counter"] = res["manager"].Counter()
        _timed_loop(res["counter"].increment, 50)  # connect + warm up

    def measure(self, res, env):
        return Sample(_timed_loop(res["counter"].increment, self.n_ops(env)))


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

    def measure(self, res, env):
        n = self.n_ops(env)
        counter = res["manager"].Counter()
        barrier = env.ctx.Barrier(self.procs)
        results = env.ctx.Queue()
        workers = [
            env.ctx.Process(target=_hammer, args=(counter, n, barrier, results), daemon=True)
            for _ in range(self.procs)
        ]
        try:
            for w in workers:
                w.start()
            got = []
            limit = time.monotonic() + env.timeout
            while len(got) < self.procs:
                try:
                    got.append(results.get(timeout=1.0))
                except queue.Empty:
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(
                            f"worker died with exit code {dead[0].exitcode}"
                        ) from None
                    if time.monotonic() > limit:
                        raise BenchTimeout("workers did not finish") from None
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
            if len(got) != self.size:
                raise AssertionError("payload came back with the wrong size")
            del got
        return Sample(total / n)

    def show(self, seconds):
        gbps = 2 * self.size / seconds / 1e9  # the payload crosses the wire twice
        return f"{seconds * 1e3:.2f} ms ({gbps:.2f} GB/s)"


CASES: list[Case] = [
    CallCase(),
    DictSetCase(),
    DictGetCase(),
    ProxyCase(),
    ContendedCase(),
    LockCase(),
    PayloadCase(1 * MiB, rounds=(15, 31), reps=(4, 8)),
    PayloadCase(64 * MiB, rounds=(5, 9), reps=(1, 1)),
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

    def spread(self, impl: str) -> float | None:
        """Half the interquartile range, relative to the median."""
        s = [x.seconds for x in self.samples.get(impl, [])]
        if len(s) < 3:
            return None
        q1, _, q3 = statistics.quantiles(s, n=4)
        return (q3 - q1) / 2 / statistics.median(s)


def run_case(case: Case, impls: list[Impl], env: Env) -> CaseResult:
    result = CaseResult(case, case.label(env))
    resources: dict[str, dict] = {}
    for impl in impls:
        result.samples[impl.name] = []
        try:
            with deadline(env.timeout, "setup"):
                resources[impl.name] = case.start(impl, env)
        except Exception as exc:  # noqa: BLE001
            result.errors[impl.name] = "setup: " + _describe(exc)
    try:
        for r in range(case.n_rounds(env)):
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                if impl.name in result.errors:
                    continue
                gc.collect()
                gc.disable()
                try:
                    with deadline(env.timeout, f"round {r + 1}"):
                        sample = case.measure(resources[impl.name], env)
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
    return result


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
            row += (f"{b / a:.2f}" if a and b else "-",)
        rows.append(row)
        counts = [c for c in (_count_note(res, n) for n in impl_names) if c]
        if counts:
            notes.append(f"{res.case.name}: final count: " + "; ".join(counts))
        for name, err in res.errors.items():
            notes.append(f"{res.case.name}: {name} failed: {err}")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        env = Env(ctx=None, quick=args.quick, timeout=0)
        for c in CASES:
            print(f"{c.name:<12} group {c.group:<9} {c.label(env)}")
        return 0
    cases = select_cases(args.only)
    env = Env(
        ctx=multiprocessing.get_context(args.start_method),
        quick=args.quick,
        timeout=args.timeout or (30.0 if args.quick else 60.0),
    )

    impls: list[Impl] = []
    if args.impl in ("stdlib", "both"):
        impls.append(Impl("stdlib", std_managers, StdCounterManager))
    if args.impl in ("procshare", "both"):
        if ps_managers is None:
            print(f"procshare is not importable: {PS_IMPORT_ERROR}", file=sys.stderr)
            if args.impl == "procshare":
                return 2
            print("Running the stdlib alone.\n", file=sys.stderr)
        else:
            impls.append(Impl("procshare", ps_managers, PsCounterManager))

    names = [i.name for i in impls]
    print("procshare benchmarks: multiprocessing.managers (stdlib) vs procshare.managers")
    print(
        f"python {platform.python_version()} on {platform.system().lower()}, "
        f"{os.cpu_count()} CPUs, start method {env.ctx.get_start_method()}, "
        f"{'quick' if env.quick else 'full'} mode"
    )
    if ps_managers is not None:
        print(f"procshare from {Path(ps_managers.__file__).parent}")
    print(
        "Each cell: median over rounds (± half the interquartile range); the implementations"
        " run in alternating rounds."
    )
    if len(names) == 2:
        print(
            "ratio = procshare time / stdlib time for the same work: lower is better, < 1 is faster."
        )
    print(flush=True)

    results = []
    t_start = time.monotonic()
    for case in cases:
        print(f"  running {case.name} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, impls, env))
    print_table(results, names)
    print(f"\n({time.monotonic() - t_start:.1f} s)")

    if args.json:
        data = {
            "python": platform.python_version(),
            "start_method": env.ctx.get_start_method(),
            "quick": env.quick,
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
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")

    bad = False
    for r in results:
        if "procshare" in r.errors:
            bad = True
        for s in r.samples.get("procshare", []):
            if "count" in s.extra and s.extra["count"] != s.extra["expected"]:
                bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
