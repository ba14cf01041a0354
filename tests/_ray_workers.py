"""What the Ray backend tests run in other processes, and a managers-like module.

Imported by name (``import _ray_workers``) in the pytest process, in spawned
children and in Ray worker processes (the test fixture puts tests/ on their
PYTHONPATH).  It imports Ray and procshare.ray, so only test_ray.py imports it.

It also stands in for a managers module (``impl``) in the parity scenarios of
``test_parity_*.py``: it has ``BaseManager``, ``SyncManager``, ``BaseProxy``,
``IteratorProxy`` and ``RemoteError``, and registers itself with ``_workers`` under the name
"ray", so ``_workers.get_class(_ray_workers, "CounterManager")`` builds the
Ray version of each test manager (``_workers.ray__CounterManager``).
"""

from __future__ import annotations

import os
import time

import _workers
import procshare
from procshare.client.proxy import BaseProxy, IteratorProxy  # noqa: F401  (impl.*)
from procshare.errors import RemoteError  # noqa: F401  (impl.RemoteError)
from procshare.managers import DictProxy
from procshare.ray import RayBaseManager, RayManager

# -- a managers-like module for the parity scenarios ----------------------------------------
BaseManager = RayBaseManager
SyncManager = RayManager
_workers.IMPL_MODULES.setdefault("ray", __name__)


# -- managers of the Ray tests --------------------------------------------------------------------
class Hanger:
    """A method that does not return in time."""

    def hang(self, seconds):
        time.sleep(seconds)
        return "woke"

    def ping(self):
        return "pong"


class CounterManager(RayManager):
    pass


CounterManager.register("Counter", _workers.Counter)
CounterManager.register("Hanger", Hanger)
CounterManager.register("Box", _workers.Box, exposed=("add", "size", "count", "broken"))


class DurableManager(RayManager):
    pass


DurableManager.register("dict", dict, DictProxy, durable=True)
DurableManager.register("Counter", _workers.Counter, durable=True)
DurableManager.register("Box", _workers.Box, exposed=("add", "size", "count", "broken"),
                        durable=True)


# -- functions run in Ray tasks and actors --------------------------------------------------------
def increment_in_task(counter, n):
    """A Ray task: the proxy arrived pickled in the task's arguments."""
    for _ in range(n):
        counter.increment()
    return os.getpid()


class Incrementer:
    """A user's Ray actor that is handed a proxy."""

    def __init__(self, counter):
        self.counter = counter

    def run(self, n):
        for _ in range(n):
            self.counter.increment()
        return self.counter.get_count()


# -- functions run in multiprocessing children ------------------------------------------------------
def connect_and_use(address, authkey, counter, n):
    """Connect a manager to a running Ray manager, create an object there, and
    use a proxy that came as an argument."""
    m = RayManager(address=address, authkey=authkey)
    m.connect()
    d = m.dict(pid=os.getpid())
    for _ in range(n):
        counter.increment()
    return d._getvalue()


def put_after(q, item, delay):
    time.sleep(delay)
    t0 = time.monotonic()
    q.put(item)
    return time.monotonic() - t0


def timed_call_in_child(q, seconds):
    """A Queue.get with a deadline in a child: the CallTimeout's facts."""
    try:
        with procshare.timeout(seconds):
            q.get()
    except procshare.CallTimeout as e:
        return ("CallTimeout", e.may_complete)
    return ("no timeout", None)


def start_and_vanish(conn):
    """Start a Ray manager, create an object, report the address, and die
    without shutting anything down (no finalizers run)."""
    m = RayManager()
    m.start()
    d = m.dict(x=1)
    conn.send((str(m.address), d._id))
    conn.close()
    os._exit(0)
