"""The procshare demo: ``python -m procshare demo``.

Owns: the seed document's two scenes (registered with `scenes.scene`); importing
it registers every scene (it imports `demo_errors`, `demo_locks`, `demo_ray` and `demo_large`). Each scene is a short story that starts
real processes, uses procshare the way a newcomer would, checks what came out, and says in
plain words what happened and why. The first two scenes are the seed document's examples
(the shared Counter and the shared Array); later issues add one scene per failure mode
(timeouts, crashes, deadlocks, ...) with the ``@scene`` decorator.

Rules it keeps:

- Scenes use only the stdlib-compatible API (``procshare.managers.BaseManager``,
  ``register``, ``start``/``shutdown`` or ``with``, ``procshare.Manager()``), exactly as the
  seed document's code does with ``multiprocessing.managers``.
- Everything a child process runs, and every class a manager serves, is defined at module
  level, so the scenes work under fork, spawn and forkserver.
- Output is plain text. A scene returns True when it saw what it promised, and never waits
  forever: worker processes are joined with a time limit and killed if they overrun.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers as std_managers
import time

import procshare
import procshare.managers as managers

from .scenes import Demo, get_scene, list_scenes, run, run_workers, scene  # noqa: F401
from .seed import Counter, SlowCounter  # the seed's classes (demo_ray uses them too)


# --------------------------------------------------------------------------------------------
# Scene 1: the shared counter
# --------------------------------------------------------------------------------------------
class CounterManager(managers.BaseManager):
    """The seed's ``MyManager``, on procshare."""


CounterManager.register("Counter", Counter)
CounterManager.register("SlowCounter", SlowCounter)


class StdlibCounterManager(std_managers.BaseManager):
    """The same manager on the stdlib, for comparison only."""


StdlibCounterManager.register("Counter", Counter)
StdlibCounterManager.register("SlowCounter", SlowCounter)


def increment_worker(shared_counter, times: int = 1000) -> None:
    """The seed's worker: call increment() `times` times through the proxy."""
    for _ in range(times):
        shared_counter.increment()


PROCESSES = 4
INCREMENTS = 1000


def _count_with(manager_cls, typeid: str) -> tuple[int | None, float, list]:
    """Run the seed's experiment once: returns (final count, seconds, worker exit codes)."""
    t0 = time.monotonic()
    with manager_cls() as manager:
        shared_counter = getattr(manager, typeid)()
        codes = run_workers(increment_worker, [(shared_counter, INCREMENTS)] * PROCESSES)
        count = shared_counter.get_count()
    return count, time.monotonic() - t0, codes


def _report_count(demo: Demo, label: str, count, seconds: float, codes, must_be_exact: bool):
    expected = PROCESSES * INCREMENTS
    failed = [c for c in codes if c != 0]
    text = f"final count {count} (expected {expected}), {seconds:.2f} s"
    if failed:
        text += f"; {len(failed)} worker(s) failed, exit codes {codes}"
    ok = (count == expected and not failed) if must_be_exact else None
    demo.result(label, text, ok)
    return count == expected and not failed


@scene(
    "counter",
    "Shared counter: 4 processes x 1000 increments",
    "the seed's Counter on a BaseManager: no increment is lost",
)
def shared_counter_scene(demo: Demo) -> bool:
    demo.say(
        """
        The seed document's first example. A Counter class is registered on a BaseManager
        subclass. The manager starts a server process that holds the one real Counter; each
        worker process gets a proxy to it and calls increment() 1000 times. Four workers run
        at once, so the count should end at 4000.
        """
    )
    demo.code(
        """
        import procshare.managers as managers        # was: multiprocessing.managers

        class CounterManager(managers.BaseManager):
            pass

        CounterManager.register("Counter", Counter)

        def worker(shared_counter):                  # module level: works under spawn too
            for _ in range(1000):
                shared_counter.increment()

        with CounterManager() as manager:            # starts the server process
            shared_counter = manager.Counter()       # a proxy to the Counter in the server
            ...start 4 Process(target=worker, args=(shared_counter,)), join them...
            print(shared_counter.get_count())
        """
    )
    demo.flush()
    count, seconds, codes = _count_with(CounterManager, "Counter")
    ok = _report_count(demo, "procshare", count, seconds, codes, must_be_exact=True)
    stdlib_count = None
    if demo.compare_stdlib:
        stdlib_count, seconds, codes = _count_with(StdlibCounterManager, "Counter")
        _report_count(demo, "stdlib", stdlib_count, seconds, codes, must_be_exact=False)
    demo.line()
    demo.say(
        """
        Why nothing is lost: `self.count += 1` is three steps: read the count, add one, write
        it back. If two calls on the same object overlap, both read the same value and one
        increment disappears. procshare runs the calls on one registered object one at a time,
        so every increment sees the one before it (a call still running after 0.1 s lets the
        next start beside it, as the stdlib would have, so a method that waits for another
        call is never stuck; serial=True makes them wait). (Built-in types such as
        Queue, Lock and Event keep running calls concurrently, so a get() that waits never
        blocks the put() it waits for.)
        """
    )

    if stdlib_count == PROCESSES * INCREMENTS:
        luck = "The stdlib (multiprocessing.managers) got 4000 too this time, by luck:"
    elif stdlib_count is not None:
        luck = f"The stdlib (multiprocessing.managers) got {stdlib_count} here. It often gets 4000:"
    else:
        luck = "The stdlib (multiprocessing.managers) often gets 4000 on this example too:"
    demo.say(
        f"""
        {luck} with CPython's GIL, the three steps of `+=` are rarely interrupted, but nothing
        in the stdlib prevents it. Real methods do more (log, take a lock, touch a file), and
        that opens the gap. Here is the same experiment with a SlowCounter whose increment()
        reads the count, yields with time.sleep(0), and writes it back:
        """
    )
    demo.flush()
    count, seconds, codes = _count_with(CounterManager, "SlowCounter")
    ok = _report_count(demo, "procshare", count, seconds, codes, must_be_exact=True) and ok
    if demo.compare_stdlib:
        count, seconds, codes = _count_with(StdlibCounterManager, "SlowCounter")
        _report_count(demo, "stdlib", count, seconds, codes, must_be_exact=False)
        demo.line()
        lost = PROCESSES * INCREMENTS - count if isinstance(count, int) else None
        if lost:
            demo.say(
                f"""
                The stdlib multiprocessing.managers lost {lost} of
                {PROCESSES * INCREMENTS} increments: its server runs each client
                connection in its own thread and lets calls on one object overlap.
                procshare gives the exact count every time.
                """
            )
        else:
            demo.say(
                """
                The stdlib happened to lose nothing this time; nothing in it prevents the
                overlap, so it may on the next run. procshare's exact count is guaranteed.
                """
            )
    else:
        demo.line()
    return ok


# --------------------------------------------------------------------------------------------
# Scene 2: the shared array
# --------------------------------------------------------------------------------------------

SQUARES = [i * i for i in range(10)]


def fill_squares(shared_array) -> None:
    """The seed's worker: shared_array[i] = i * i. Works on an Array and on a proxy alike."""
    for i in range(10):
        shared_array[i] = i * i


@scene(
    "array",
    "Shared array: a child process fills in squares",
    "the seed's multiprocessing.Array, and the same through a manager Array",
)
def shared_array_scene(demo: Demo) -> bool:
    demo.say(
        """
        The seed document's shared-memory example: a child process writes i*i into an array
        of 10 ints, and the parent reads them back. First exactly as in the seed, with
        multiprocessing.Array: one block of shared memory that parent and child both map. No
        manager and no server are involved.
        """
    )
    demo.code(
        """
        shared_array = multiprocessing.Array('i', 10)
        p = multiprocessing.Process(target=worker, args=(shared_array,))
        p.start(); p.join()
        print(shared_array[:])
        """
    )
    demo.flush()
    shared_array = multiprocessing.Array("i", 10)
    codes = run_workers(fill_squares, [(shared_array,)])
    values = shared_array[:]
    ok_raw = values == SQUARES and codes == [0]
    demo.result("Array", f"{values}", ok_raw)
    demo.line()

    demo.say(
        """
        Now the same through a procshare manager. The array lives in the manager's server
        process; the child gets a proxy, and each shared_array[i] = v is one call to the
        server. As with the stdlib's managers, manager.Array takes the initial values, not a
        size.
        """
    )
    demo.code(
        """
        with procshare.Manager() as manager:
            shared_array = manager.Array('i', [0] * 10)
            p = multiprocessing.Process(target=worker, args=(shared_array,))
            p.start(); p.join()
            print(shared_array[:])
        """
    )
    demo.flush()
    with procshare.Manager() as manager:
        shared_array = manager.Array("i", [0] * 10)
        codes = run_workers(fill_squares, [(shared_array,)])
        values = list(shared_array[:])
    ok_managed = values == SQUARES and codes == [0]
    demo.result("manager", f"{values}", ok_managed)
    demo.line()
    demo.say(
        """
        Which to choose: multiprocessing.Array is the fastest, since reads and writes touch
        memory directly, but it only reaches processes you start and hand it to. A manager's
        Array is a proxy: it can be passed to any process, stored inside other managed
        objects, or reached over the network, at the cost of one round trip per access.
        """
    )
    return ok_raw and ok_managed


from . import demo_errors  # noqa: E402,F401,I001  (registers the failure scenes)
from . import demo_locks  # noqa: E402,F401  (registers the lock scenes)
from . import demo_ray  # noqa: E402,F401  (registers the Ray scene; Ray itself is optional)
from . import demo_large  # noqa: E402,F401  (registers the large-data scene)
