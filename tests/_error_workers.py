"""Referents, managers, serializers and child-process functions for
test_errors.py and test_serializers.py.

Everything here is module level, so spawn children and manager processes find
it by name.  Unlike ``_workers``, this module imports procshare at import time:
only procshare cases use it.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import zlib

import procshare.managers as managers
from procshare import serializers


class Box:
    """A registered class whose methods take and return awkward values."""

    def __init__(self, *items):
        self.items = list(items)

    def put(self, x):
        self.items.append(x)
        return len(self.items)

    def get(self, i):
        return self.items[i]

    def size(self):
        return len(self.items)

    def call(self, i, *args):
        return self.items[i](*args)

    def with_lock(self):
        return {"ok": 1, "lock": threading.Lock()}

    def a_lambda(self, n):
        return lambda: n

    def start_failing_thread(self):
        """Start a thread in the manager that dies with an uncaught exception."""
        def run():
            raise ValueError("boom in a manager thread")
        t = threading.Thread(target=run, name="doomed")
        t.start()
        t.join(5)
        return True


class Thrower:
    def boom(self, msg):
        return self._deeper(msg)

    def _deeper(self, msg):
        raise LookupError(msg)


class BoxManager(managers.BaseManager):
    pass


BoxManager.register("Box", Box)
BoxManager.register("Thrower", Thrower)
BoxManager.register("CBox", Box, serializer="cloudpickle")


def exit_in_initializer(code):
    os._exit(code)


# -- a user-supplied dumps/loads pair ---------------------------------------------------

CALLS = {"dumps": 0, "loads": 0}


class ZlibPickle:
    """A user serializer: pickle, compressed.  Passed as an object."""

    name = "zlib-pickle"

    def dumps(self, obj):
        CALLS["dumps"] += 1
        return zlib.compress(pickle.dumps(obj, 5))

    def loads(self, data):
        CALLS["loads"] += 1
        return pickle.loads(zlib.decompress(data))


def zlib_pickle_factory():
    return ZlibPickle()


serializers.register_serializer("zlib-pickle-by-name", zlib_pickle_factory)


# -- functions run in child processes ----------------------------------------------------


def typed_box_in_child(box, n):
    """Use a proxy of a type registered with serializer='cloudpickle' in a child."""
    box.put(lambda x: x * n)
    return box.call(box.size() - 1, 7)


def lambdas_in_child(d, n):
    """A cloudpickle/dill manager's dict, used from a child with a closure."""
    d["f"] = lambda: n * 2
    return d["f"]()


def plain_in_child(d):
    d["from-child"] = (1, {2, 3}, b"x")
    return d["from-child"]


def marker(path):
    """Called only if something unpickles a payload made to call it."""
    with open(path, "w") as f:
        f.write("executed")
    return path


class Evil:
    """Pickles to a call of `marker(path)`: proof of code run on load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return marker, (self.path,)


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def append_one(value):
    return value + [1]


def exit_instead(value):
    """update_item's func that raises SystemExit in the manager."""
    raise SystemExit(5)
