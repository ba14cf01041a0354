#!/usr/bin/env python3
"""Scale benchmark: Counter.increment throughput as client processes go from 1 to 16.

Run from the repository root, with procshare installed (``pip install -e .``)::

    python benchmarks/scale.py                      # 1, 2, 4, 8, 16 clients
    python benchmarks/scale.py --quick              # short rounds, under a minute
    python benchmarks/scale.py --plot scale.png     # also a chart (needs matplotlib)
    python benchmarks/scale.py --clients 1,4 --loaded --start-method spawn

For each client count N, two layouts: all N clients call ``increment`` on one shared Counter
("shared"), or each calls it on a Counter of its own ("own"); every round makes the same total
number of calls, split evenly between the clients. The output is a Markdown table: calls/s of
both libraries side by side, the ratio, and each manager server's CPU while the clients ran
(``utime + stime`` from ``/proc/<pid>/stat``, in % of one core: above 100 % it used more than
one core).

It keeps the rules of bench.py, and uses its machinery: the two implementations run in one
process tree in alternating rounds (``bench.run_case``), every setup, round and teardown runs
under a deadline, each cell is a median over rounds, and ``ratio`` is procshare time / stdlib
time for the same work (lower is better; the inverse of the calls/s ratio). Workers are
bench.py's module-level ``_hammer``, so every start method works. A final count that is not
exact is reported as lost increments.

Exit status: 0, or 1 if procshare raised, timed out or lost increments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bench  # benchmarks/bench.py: this directory is sys.path[0] when run as a script
from bench import Case, CaseResult, Env, Sample

LEVELS = (1, 2, 4, 8, 16)
CALLS_PER_ROUND = (4_000, 40_000)  # (quick, full), split between the clients
ROUNDS = (5, 9)  # (quick, full)


class ScaleCase(Case):
    """N client processes, each making its share of the round's calls to Counter.increment."""

    group = "scale"
    uses_counter = True

    def __init__(self, procs: int, own: bool):
        self.procs = procs
        self.own = own
        self.layout = "own" if own else "shared"
        self.name = f"{self.layout}{procs}"
        self.title = f"{procs} clients, {'a Counter each' if own else 'one shared Counter'}"
        self.rounds = ROUNDS
        self.ops = tuple(max(1, c // procs) for c in CALLS_PER_ROUND)  # calls per client

    def units_per_round(self, env):
        return self.procs * self.n_ops(env)

    def prepare(self, res, env):
        bench.cpu_snapshot(bench._manager_pid(res["manager"]))  # the server's CPU is readable
        c = res["manager"].Counter()
        c.increment()
        del c

    def measure(self, res, env):
        manager = res["manager"]
        n = self.n_ops(env)
        pid = bench._manager_pid(manager)
        counters = [manager.Counter() for _ in range(self.procs if self.own else 1)]
        got, marks = bench.run_workers(
            env,
            bench._hammer,
            [(counters[i % len(counters)], n) for i in range(self.procs)],
            mark=lambda: (time.monotonic(), bench.proc_cpu_seconds(pid)),
        )
        wall = max(g[2] for g in got) - min(g[1] for g in got)
        (t0, cpu0), (t1, cpu1) = marks
        count = sum(c.get_count() for c in counters)
        del counters
        total = self.procs * n
        return Sample(
            wall / total,  # seconds per call, so 1 / median is the rate
            {
                "count": count,
                "expected": total,
                "manager_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else None,
            },
        )


def manager_cpu(result: CaseResult, impl: str) -> float | None:
    """Median manager CPU (% of one core) over the rounds."""
    pcts = [
        s.extra["manager_cpu_pct"]
        for s in result.samples.get(impl, [])
        if s.extra.get("manager_cpu_pct") is not None
    ]
    return statistics.median(pcts) if pcts else None


def rate_cell(result: CaseResult, impl: str) -> str:
    med = result.median(impl)
    if med is None:
        return "FAILED" if impl in result.errors else "-"
    text = f"{1 / med:,.0f}"
    sp = result.spread(impl)
    if sp is not None:
        text += f" ±{sp * 100:.0f}%"
    if impl in result.errors:
        text += " (then failed)"
    return text


def print_markdown(results: list[CaseResult], names: list[str]) -> None:
    head = ["clients", "Counter"]
    head += [f"{n} calls/s" for n in names]
    if len(names) == 2:
        head.append("ratio")
    head += [f"{n} manager CPU" for n in names]
    rows = []
    notes = []
    for r in results:
        row = [str(r.case.procs), r.case.layout]
        row += [rate_cell(r, n) for n in names]
        if len(names) == 2:
            a, b = (r.median(n) for n in names)
            row.append(f"{b / a:.2f}" if a and b else "-")
        for n in names:
            pct = manager_cpu(r, n)
            row.append("-" if pct is None else f"{pct:.0f}%")
        rows.append(row)
        counts = [c for c in (bench._count_note(r, n) for n in names) if c]
        if counts:
            notes.append(f"{r.case.name}: final count: " + "; ".join(counts))
        notes += [f"{r.case.name}: {n} failed: {e}" for n, e in r.errors.items()]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells):
        out = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(out) + " |"

    print(line(head))
    print(
        "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|"
    )
    for row in rows:
        print(line(row))
    if notes:
        print()
        for note in notes:
            print(f"- {note}")


def plot(results: list[CaseResult], names: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker as ticker
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, layout in zip(axes, ("shared", "own")):
        rs = [r for r in results if r.case.layout == layout]
        for n in names:
            pts = [(r.case.procs, 1 / r.median(n)) for r in rs if r.median(n)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.case.procs for r in rs}) or [1])
        ax.get_xaxis().set_major_formatter(ticker.ScalarFormatter())
        ax.set_xlabel("client processes")
        ax.set_title("one shared Counter" if layout == "shared" else "a Counter per client")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("Counter.increment calls/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Counter.increment calls/s with 1 to 16 client processes, stdlib vs"
        " procshare side by side, on one shared Counter and on a Counter per client."
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{ROUNDS[0]} rounds of {CALLS_PER_ROUND[0]:,} calls (default {ROUNDS[1]} rounds"
        f" of {CALLS_PER_ROUND[1]:,})",
    )
    p.add_argument(
        "--clients",
        default=",".join(map(str, LEVELS)),
        help="client process counts, comma-separated (default %(default)s)",
    )
    p.add_argument(
        "--layout",
        choices=("shared", "own", "both"),
        default="both",
        help="one shared Counter, a Counter per client, or both (default)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="also save a chart (needs matplotlib)")
    bench.add_run_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    try:
        args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        p.error("--clients takes integers, e.g. 1,2,4")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients needs at least one count, each >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/stat").exists():
        raise SystemExit("scale.py: the manager's CPU comes from /proc (Linux only)")
    env: Env = bench.make_env(args, args.quick)
    impls = bench.build_impls("both")
    names = [i.name for i in impls]
    layouts = {"shared": [False], "own": [True], "both": [False, True]}[args.layout]
    cases = [ScaleCase(n, own) for own in layouts for n in args.clients]

    results = []
    with bench.loaded(args.loaded) as load_procs:
        print("# procshare scale: Counter.increment calls/s by client processes\n")
        for line in bench.describe_run(env, load_procs):
            print(line + "  ")
        calls = CALLS_PER_ROUND[0] if env.quick else CALLS_PER_ROUND[1]
        print(
            f"Each round: {calls:,} calls split evenly between the clients; each cell is the"
            f" median of {ROUNDS[0] if env.quick else ROUNDS[1]} rounds (± half the"
            " interquartile range), the implementations alternating.  "
        )
        print(
            "calls/s = calls / (last client done - first client started);"
            " ratio = procshare time / stdlib time (lower is better, < 1 is faster);"
            " manager CPU = the server's utime + stime over the same window, % of one core.\n",
            flush=True,
        )
        t_start = time.monotonic()
        for case in cases:
            print(f"  running {case.name} ...", file=sys.stderr, flush=True)
            results.append(bench.run_case(case, impls, env))
        elapsed = time.monotonic() - t_start
        load_note = bench.load_check(load_procs)
    print_markdown(results, names)
    print(f"\n({elapsed:.1f} s" + (f"; {load_note})" if load_note else ")"))

    if args.plot:
        plot(results, names, args.plot)
    if args.json:
        data = {
            "quick": env.quick,
            "start_method": env.ctx.get_start_method(),
            "load_processes": len(load_procs),
            "rows": [
                {
                    "clients": r.case.procs,
                    "layout": r.case.layout,
                    "calls_per_second": {
                        n: (1 / r.median(n) if r.median(n) else None) for n in names
                    },
                    "manager_cpu_percent": {n: manager_cpu(r, n) for n in names},
                    "errors": r.errors,
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 1 if bench.procshare_failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
