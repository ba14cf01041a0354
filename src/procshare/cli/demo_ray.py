"""The Ray scene: the seed's Counter on `procshare.ray.RayManager`, from 4 Ray tasks.

Owns: the `ray` demo scene and the Ray task it runs (`increment_in_task`).

Rules it keeps:
- Ray is optional: it is imported only when the scene runs, and without it
  the scene says how to install it (and counts as shown).
- The scene leaves Ray as it found it: a local Ray it started is shut down
  with the manager; a Ray this process had joined before stays up.
"""

from __future__ import annotations

import os
import time

from .scenes import Demo, scene

TASKS = 4
INCREMENTS = 1000


def increment_in_task(counter, n: int) -> int:
    """A Ray task: the proxy arrives pickled in the task's arguments."""
    for _ in range(n):
        counter.increment()
    return os.getpid()


@scene(
    "ray",
    "On Ray: the seed's Counter from 4 Ray tasks",
    "RayManager: one import changes, the count is exact, and what a call costs there",
)
def ray_scene(demo: Demo) -> bool:
    demo.say(
        """
        When one machine is not enough, procshare.ray.RayManager has the same API as
        SyncManager and runs every shared object as a Ray actor, so the objects can live on
        any node of a Ray cluster and Ray tasks and actors can use the proxies. Deadlines,
        errors, durable objects and the one-call-at-a-time rule stay the same.
        """
    )
    demo.code(
        """
        from procshare.ray import RayManager          # was: from procshare.managers import ...

        class CounterManager(RayManager): pass
        CounterManager.register("Counter", Counter)

        with CounterManager() as manager:             # joins a Ray cluster, or starts one
            counter = manager.Counter()
            task = ray.remote(increment_in_task)
            ray.get([task.remote(counter, 1000) for _ in range(4)])
            counter.get_count()
        """
    )
    demo.flush()
    try:
        import ray

        from procshare.ray import RayManager
    except ImportError as e:
        demo.result("Ray", f"not installed here ({e}): pip install 'procshare[ray]', then "
                           "python -m procshare demo ray", None)
        return True
    from .seed import Counter

    class CounterManager(RayManager):
        pass

    CounterManager.register("Counter", Counter)
    t0 = time.monotonic()
    with CounterManager() as manager:
        started = time.monotonic() - t0
        counter = manager.Counter()
        task = ray.remote(increment_in_task)
        t1 = time.monotonic()
        pids = ray.get([task.remote(counter, INCREMENTS) for _ in range(TASKS)], timeout=300)
        took = time.monotonic() - t1
        count = counter.get_count()
        t2 = time.monotonic()
        for _ in range(100):
            counter.get_count()
        per_call = (time.monotonic() - t2) / 100
        del counter
    ok = count == TASKS * INCREMENTS
    demo.result("Ray", f"final count {count} (expected {TASKS * INCREMENTS}) from {TASKS} Ray "
                       f"tasks in {len(set(pids))} worker process(es), {took:.2f} s", ok)
    demo.result("cost", f"Ray ready in {started:.1f} s; one synchronous call from here "
                        f"{per_call * 1e6:.0f} µs (the local manager: tens of µs)")
    demo.line()
    demo.say(
        """
        The count is exact because the Counter's actor runs its calls one at a time, as the
        local manager does. A call through Ray costs about a millisecond against tens of
        microseconds locally: move to Ray when the objects or the load outgrow one machine,
        not before. procshare.async_ pipelines calls on Ray proxies too.
        """
    )
    return ok
