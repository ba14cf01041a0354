"""Scenes: the registry of demo scenes, what a scene is given, and running them.

Owns: the `Scene` registry (`@scene`), `Demo` (where a scene prints), `run_workers`
(bounded worker processes for scenes) and `run`/`list_scenes`.  The scenes themselves
live in `demo` (the seed's examples), `demo_errors`, `demo_locks`, `demo_ray` and
`demo_large`, which import this module; `demo` imports the others so that every scene is registered.

Rules it keeps:
- A scene returns True when it saw what it promised; `run` returns 0 only if
  every scene did, and reports an unexpected exception as a failed scene.
- Nothing here waits forever: workers are joined with a time limit and killed
  if they overrun.
- `run(start_method=...)` restores the previous start method afterwards.
"""

from __future__ import annotations

import multiprocessing
import platform
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

import procshare

WIDTH = 78
WORKER_TIMEOUT = 120.0  # seconds a scene's workers may take before they are killed


# --------------------------------------------------------------------------------------------
# Scene registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    name: str  # what `python -m procshare demo NAME` takes
    title: str  # the heading
    about: str  # one line for `--list`
    func: Callable[[Demo], bool]  # runs the scene; True when it saw what it promised


SCENES: list[Scene] = []


def scene(name: str, title: str, about: str):
    """Register the decorated ``func(demo) -> bool`` as a scene, in definition order."""

    def register(func: Callable[[Demo], bool]) -> Callable[[Demo], bool]:
        if any(s.name == name for s in SCENES):
            raise ValueError(f"demo scene {name!r} is already registered")
        SCENES.append(Scene(name, title, about, func))
        return func

    return register


def get_scene(name: str) -> Scene:
    for s in SCENES:
        if s.name == name:
            return s
    raise KeyError(
        f"no demo scene named {name!r}; choose from: {', '.join(s.name for s in SCENES)}"
    )


class Demo:
    """What a scene gets: where to print, and the options it runs under."""

    def __init__(self, out: TextIO | None = None, compare_stdlib: bool = True):
        self.out = out if out is not None else sys.stdout
        self.compare_stdlib = compare_stdlib

    def say(self, text: str = "") -> None:
        """Print a paragraph, wrapped. Blank lines separate paragraphs."""
        for para in textwrap.dedent(text).strip("\n").split("\n\n"):
            words = " ".join(para.split())
            print(textwrap.fill(words, WIDTH) if words else "", file=self.out)
            print(file=self.out)

    def code(self, text: str) -> None:
        """Print a block of code, indented, as is."""
        for line in textwrap.dedent(text).strip("\n").splitlines():
            print("    " + line if line else "", file=self.out)
        print(file=self.out)

    def result(self, label: str, text: str, ok: bool | None = None) -> None:
        mark = "" if ok is None else ("   OK" if ok else "   <-- NOT what we expected")
        print(f"  {label:<10} {text}{mark}", file=self.out)

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def flush(self) -> None:
        self.out.flush()


def run_workers(target: Callable, args_list: Iterable[tuple], timeout: float = WORKER_TIMEOUT):
    """Start one process per args tuple, join them all; return their exit codes.

    A process still running after `timeout` seconds (all together) is killed and reported
    with exit code None, so a scene never hangs.
    """
    procs = [multiprocessing.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    limit = time.monotonic() + timeout
    codes = []
    for p in procs:
        p.join(max(0.0, limit - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


# --------------------------------------------------------------------------------------------
# Running scenes
# --------------------------------------------------------------------------------------------


def list_scenes(out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout
    width = max(len(s.name) for s in SCENES)
    for s in SCENES:
        print(f"  {s.name:<{width}}  {s.about}", file=out)


def run(
    names: Iterable[str] | None = None,
    *,
    start_method: str | None = None,
    compare_stdlib: bool = True,
    out: TextIO | None = None,
) -> int:
    """Run the named scenes (all when `names` is empty); return 0 if every scene went as
    promised, else 1.

    `start_method` sets multiprocessing's default start method for the duration of the run
    (procshare.Manager() and multiprocessing.Process both follow it), then restores it.
    """
    out = out if out is not None else sys.stdout
    chosen = [get_scene(n) for n in names] if names else list(SCENES)
    demo = Demo(out=out, compare_stdlib=compare_stdlib)

    previous = multiprocessing.get_start_method(allow_none=True)
    if start_method is not None:
        multiprocessing.set_start_method(start_method, force=True)
    try:
        name = " ".join(filter(None, ["procshare", getattr(procshare, "__version__", None)]))
        demo.line(
            f"{name} demo (Python {platform.python_version()}, start method "
            f"{multiprocessing.get_start_method()})"
        )
        demo.line()
        outcomes = []
        for i, s in enumerate(chosen, 1):
            heading = f"Scene {i} of {len(chosen)}: {s.title}"
            demo.line(heading)
            demo.line("=" * len(heading))
            demo.line()
            demo.flush()
            try:
                ok = bool(s.func(demo))
            except Exception:
                demo.line("This scene failed with an unexpected error:")
                demo.line(textwrap.indent(traceback.format_exc().rstrip(), "    "))
                demo.line()
                ok = False
            outcomes.append((s, ok))
            demo.flush()
        demo.line("Summary")
        demo.line("=======")
        width = max(len(s.name) for s, _ in outcomes)
        for s, ok in outcomes:
            demo.line(f"  {s.name:<{width}}  {'as expected' if ok else 'NOT as expected'}")
        demo.flush()
        return 0 if all(ok for _, ok in outcomes) else 1
    finally:
        if start_method is not None:
            multiprocessing.set_start_method(previous, force=True)
