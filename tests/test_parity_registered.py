"""Scenarios 2 and 17: registered classes and the concurrency rule.

procshare's rule: calls on one object of a registered plain class run one at a
time by default (so the seed's Counter gives exactly 4000); a per-type option,
``register(..., serial=False)``, lets them overlap.  The stdlib runs every
call in its own thread, so its Counter is racy and its calls overlap."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

import _workers
from _helpers import is_stdlib, poll


def test_seed_counter(impl, ctx):
    """The seed document's example: 4 processes x 1000 increments, the proxy
    passed as a Process argument."""
    cls = _workers.get_class(impl, "CounterManager")
    with cls(ctx=ctx) as m:
        counter = m.Counter()
        procs = [
            ctx.Process(target=_workers.increment_counter, args=(counter, 1000)) for _ in range(4)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        count = counter.get_count()
        if is_stdlib(impl):
            assert 1 <= count <= 4000  # racy: lost updates are possible
        else:
            assert count == 4000
        del counter


def _increment_at_once(ctx, counters, n):
    """One child per counter proxy, each making `n` increments, all let go at once."""
    children = [_workers.start_child(ctx, _workers.increment_counter, c, n, gate=True)
                for c in counters]
    for c in children:
        c.wait_ready()
    for c in children:
        c.go()
    for c in children:
        c.result(30)


def test_read_modify_write_is_not_lost(impl, ctx):
    """A slower read-modify-write makes the stdlib's race visible: with calls
    on one object running one at a time, procshare loses no update."""
    cls = _workers.get_class(impl, "CounterManager")
    with cls(ctx=ctx) as m:
        counter = m.SlowCounter()
        _increment_at_once(ctx, [counter, counter], 150)
        count = counter.get_count()
        if is_stdlib(impl):
            assert count < 300, "expected lost updates from concurrent calls"
        else:
            assert count == 300
        del counter


def _two_naps(cls, ctx, seconds):
    """Call Sleeper.nap(seconds) from two processes released at the same
    moment; return both (start, end) intervals on the server's clock."""
    with cls(ctx=ctx) as m:
        sleeper = m.Sleeper()
        children = [
            _workers.start_child(ctx, _workers.nap, sleeper, seconds, gate=True) for _ in range(2)
        ]
        for c in children:
            c.wait_ready()
        for c in children:
            c.go()
        intervals = sorted(c.result(20) for c in children)
        del sleeper
    return intervals


def test_a_long_call_does_not_hold_back_the_next_for_long(impl, ctx):
    """The stdlib runs each connection in its own thread: two long calls on one
    object overlap.  procshare runs calls on a serial object one at a time, but
    one that waited `SERIAL_PATIENCE` behind a call still running starts beside
    it, so code written for the stdlib still overlaps them (and a method that
    waits for another call on its object is not stuck)."""
    nap = 0.6
    (s1, e1), (s2, e2) = _two_naps(_workers.get_class(impl, "CounterManager"), ctx, nap)
    assert s2 < e1, f"calls did not overlap: {(s1, e1)} and {(s2, e2)}"
    if not is_stdlib(impl):
        from procshare.server.server import SERIAL_PATIENCE
        assert s2 - s1 >= SERIAL_PATIENCE - 0.01, "the second call did not wait first"


def test_procshare_calls_behind_a_long_one_keep_turns_among_themselves(ctx):
    """The calls that start beside a call that outlasted the patience run one
    at a time among themselves (a new turn), so a read-modify-write among them
    loses nothing: two children's 100 slow increments each, behind a hold()."""
    import procshare.managers as ps

    with _workers.get_class(ps, "CounterManager")(ctx=ctx) as m:
        counter = m.SlowCounter()
        children = [_workers.start_child(ctx, _workers.increment_counter, counter, 100,
                                         gate=True) for _ in range(2)]
        for c in children:
            c.wait_ready()
        holder = threading.Thread(target=counter.hold, args=(5.0,))
        holder.start()
        oid = counter._id
        assert poll(lambda: m._control("object_state", oid)["running"] == "hold", 5)
        for c in children:
            c.go()
        for c in children:
            c.result(30)
        assert holder.is_alive()        # they ran beside hold(), not after it
        assert counter.get_count() == 200
        holder.join(10)
        del counter


def test_procshare_serial_true_queues_calls_until_the_running_one_returns(ctx):
    import procshare.managers as ps

    nap = 0.3
    (s1, e1), (s2, e2) = _two_naps(_workers.get_class(ps, "StrictSleeperManager"), ctx, nap)
    assert not s2 < e1, f"calls overlapped: {(s1, e1)} and {(s2, e2)}"
    assert e2 - s1 >= 2 * nap - 0.01


def test_a_method_that_waits_for_another_call_on_its_object_is_not_stuck(impl, ctx):
    """Stdlib code may wait in one method for another call on the same object;
    procshare's serial default must not turn that into a wait until the first
    call's own timeout (the set() used to queue behind the wait_for())."""

    with _workers.get_class(impl, "CounterManager")(ctx=ctx) as m:
        flag = m.Flag()
        got = {}
        waiter = threading.Thread(
            target=lambda flag=flag: got.setdefault("waited", flag.wait_for(30)))
        waiter.start()
        assert poll(flag.waiting, 5)        # wait_for() runs in the manager
        t0 = time.monotonic()
        flag.set()
        assert time.monotonic() - t0 < 5
        waiter.join(10)
        assert got == {"waited": True}
        del flag


@pytest.mark.parametrize("gate", ["DictGate", "SlotGate"])
def test_an_object_holding_its_own_primitive_deeper_stays_concurrent(impl, ctx, gate):
    """A class that synchronizes itself with a threading primitive kept in a
    dict attribute, or in a slot, is concurrent under procshare's rule too:
    its wait() blocks until another call opens it (serial, the other call
    queued behind the wait, which timed out)."""
    import threading

    with _workers.get_class(impl, "CounterManager")(ctx=ctx) as m:
        g = getattr(m, gate)()
        got = {}

        def wait(g=g):
            got["waited"] = g.wait(5)

        t = threading.Thread(target=wait)
        t.start()
        assert poll(g.is_waiting, 5)            # answered while wait() runs
        g.open()
        t.join(10)
        assert got == {"waited": True}
        del g


def test_procshare_serial_false_lets_calls_overlap(ctx):
    # `serial=False` is the procshare option name for the per-type opt-out
    # (see _workers.ParallelSleeperManager).
    import procshare.managers as ps

    nap = 0.3
    (s1, e1), (s2, e2) = _two_naps(_workers.get_class(ps, "ParallelSleeperManager"), ctx, nap)
    assert s2 < e1, f"calls did not overlap: {(s1, e1)} and {(s2, e2)}"
    assert e2 - s1 < 2 * nap


class _Node:
    def __init__(self, depth=0):
        self.depth = depth

    def get(self):
        return self.depth

    def child(self):
        return self.depth + 1


def test_a_proxy_type_defined_in_a_function_works_with_method_to_typeid(impl):
    """Under fork a manager may register a proxy type that cannot be pickled
    (defined in a function): the stdlib's client builds a returned proxy from
    its own registry.  procshare's manager named the type in its reply, and
    failed to pickle it (ResultNotSerializable)."""
    class NodeProxy(impl.BaseProxy):
        _exposed_ = ("get", "child")
        _method_to_typeid_ = {"child": "Node"}

        def get(self):
            return self._callmethod("get")

        def child(self):
            return self._callmethod("child")

    class M(impl.BaseManager):
        pass

    M.register("Node", _Node, proxytype=NodeProxy)
    with M(ctx=multiprocessing.get_context("fork")) as m:
        node = m.Node(3)
        child = node.child()        # the manager makes _Node(4)
        assert type(child) is NodeProxy and child.get() == 4
        assert child.child().get() == 5
        del node, child


def test_a_callable_that_returns_one_object_gives_one_id(impl, ctx):
    """The stdlib names objects by id(): a registered callable that returns
    the same object every time (a singleton) gives proxies with one id, and
    the manager holds one object, alive while any of them is."""
    import gc

    cls = _workers.get_class(impl, "CounterManager")
    with cls(ctx=ctx) as m:
        a, b = m.TheCounter(), m.TheCounter()
        assert a._id == b._id
        assert m._number_of_objects() == 1
        del a
        gc.collect()
        b.increment()
        assert b.get_count() == 1
        assert m._number_of_objects() == 1
        del b
        gc.collect()
        assert poll(lambda: m._number_of_objects() == 0, 10)


def test_one_object_from_two_creates_runs_its_calls_one_at_a_time(impl, ctx):
    """Two proxies made by two calls of a singleton callable are one serial
    object: procshare loses no update made through them at once."""
    cls = _workers.get_class(impl, "CounterManager")
    with cls(ctx=ctx) as m:
        proxies = [m.TheCounter(), m.TheCounter()]
        _increment_at_once(ctx, proxies, 150)
        count = proxies[0].get_count()
        if is_stdlib(impl):
            assert 1 <= count <= 300    # its calls overlap: updates may be lost
        else:
            assert count == 300


@pytest.mark.parametrize("method", ["exit", "interrupt"])
def test_a_method_raising_systemexit_or_keyboardinterrupt_gives_eoferror(impl, ctx, method):
    """The stdlib's connection thread dies of it: the caller gets EOFError.
    procshare answers with MethodRaisedExit, also an EOFError, which says what
    happened, and the connection and the object stay usable."""
    with _workers.get_class(impl, "CounterManager")(ctx=ctx) as m:
        e = m.Exiter()
        args = (3,) if method == "exit" else ()
        with pytest.raises(EOFError) as info:
            getattr(e, method)(*args)
        if not is_stdlib(impl):
            import procshare

            assert isinstance(info.value, procshare.MethodRaisedExit)
            raised = "SystemExit(3)" if method == "exit" else "KeyboardInterrupt"
            assert f"{method}() on 'Exiter' object" in str(info.value)
            assert f"raised {raised} in the manager" in str(info.value)
            assert e.ok() == "ok"
            assert m.Exiter().ok() == "ok"
        del e


# -- customised registrations (a parity hunt, 2026-11-29) ---------------------------


def test_a_constructors_own_durable_and_name_keywords_reach_it(impl, ctx):
    """`durable=` and `name=` are procshare's options only for the typeids that
    can be durable by keyword (and those registered durable): a class of yours
    that takes them gets them, as in the stdlib (procshare took both, and the
    object was made with its defaults, silently)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        assert m.TaskQueue(name="tasks", durable=True).info() == ("tasks", True)
        assert m.TaskQueue(durable="journal").info() == ("default", "journal")
        assert m.TaskQueue("jobs", False).info() == ("jobs", False)


def test_exposed_names_are_not_read_when_the_object_is_made(impl, ctx):
    """The stdlib reads no exposed name at creation: a property that fails
    until the object is ready must not fail the create, nor run at all
    (procshare read each exposed name to tell data from methods)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        job = m.Job()
        assert job.reads() == 0
        job.run()
        if is_stdlib(impl):
            with pytest.raises(TypeError):      # (the stdlib calls what it reads)
                job.result()
        else:
            assert job.result == 42     # procshare: an exposed property reads as data
        assert job.reads() == 1


def test_an_exposed_property_whose_value_is_callable_is_a_method(impl, ctx):
    """The stdlib calls every exposed name as a method, so a property that
    returns a function (a handler, a bound method) works as one: procshare
    read it as data and called its value, with no arguments, in the manager."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        h = m.Handlers()
        assert h.handler(5) == 5
        assert h.handler() == 6
        assert h.get() == 6


def test_a_property_whose_getter_calls_back_into_its_object(impl, ctx):
    """A getter that calls its own object through a proxy runs (procshare reads
    exposed data under the object's lock, as a call: the call back is let
    through as one from its running method; it waited for good)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        p = m.SelfCaller()
        if not is_stdlib(impl):
            p._set_timeout(20)      # (bounded: a hang is a CallTimeout)
        p.set_me(p)
        for _ in range(3):
            if is_stdlib(impl):
                with pytest.raises(TypeError):  # (the getter ran; then it calls its 10)
                    p.via_me()
            else:
                assert p.via_me == 10
            assert p.get() == 5


def test_a_proxy_type_keeps_private_names_of_its_own(impl, ctx):
    """A user's proxy type may use private names the stdlib's BaseProxy does not
    (`_session`, `_epoch`, `_track`...): procshare's own are `_procshare_*`
    (a proxy type that set `self._session` failed to be made)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        before = m._number_of_objects()
        p = m.OwnNames()
        assert p.a() == "a" and p._session == {"user": "data"} and p._epoch == "mine"
        assert _workers.start_child(ctx, _workers.call_a, p).result(30) == "a"
        del p
        assert poll(lambda: m._number_of_objects() == before, 10)


def test_an_exposed_property_that_raises_is_a_remote_error(impl, ctx):
    """Looking up an exposed name that fails (a property's getter raises) is a
    RemoteError with the manager's traceback, as in the stdlib."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        job = m.Job()
        with pytest.raises(impl.RemoteError) as info:
            job._callmethod("result")
        assert "not ready" in str(info.value)
        assert job.reads() == 1


def test_an_exception_the_object_keeps_is_left_as_it_was(impl, ctx):
    """An exception a method raised, kept by the object and returned later,
    carries nothing procshare attached to it for the reply."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        keeper = m.Keeper()
        with pytest.raises(ValueError):
            keeper.fail()
        kept = keeper.kept_error()
        assert type(kept) is ValueError and kept.args == ("kept",)
        assert vars(kept) == {}


def test_the_managers_thread_is_named_after_its_caller(impl, ctx):
    """As the stdlib's, the thread that serves a process's calls is named after
    that process (and its thread, unless the main one): logging inside a
    managed object (`%(threadName)s`) says who called."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        namer = m.ThreadNamer()
        assert namer.name() == multiprocessing.current_process().name
        got = []
        t = threading.Thread(target=lambda: got.append(namer.name()), name="T2")
        t.start()
        t.join(30)
        assert got == [f"{multiprocessing.current_process().name}|T2"]


def test_a_dropped_proxys_object_is_gone_before_the_next_call(impl, ctx):
    """As the stdlib's decref is a round trip, the object a dropped proxy held
    is gone (its `__del__` ran) when this process's next call runs, on any of
    its connections: a create, a call from this thread or from another one
    (procshare's decref goes one-way on another connection, so the next call
    could run before it)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        seen = m.Finalizations()
        for i in range(40):
            f = m.Finalized(f"f{i}")
            assert f.ping() == f"f{i}"
            del f
            assert seen.names()[-1] == f"f{i}"
        f, g = m.Finalized("by create"), m.Finalized("kept")
        del f
        assert m.Finalized("next") is not None
        assert "by create" in seen.names()
        f = m.Finalized("other thread")
        got = []
        t = threading.Thread(target=lambda: got.append(seen.names()))
        del f
        t.start()
        t.join(30)
        assert got and got[0][-1] == "other thread"
        assert "kept" not in seen.names()
        del g


def test_a_proxy_types_own_timeout_attribute_is_its_own(impl, ctx):
    """A user's proxy type that keeps a `_timeout` of its own (an argument for
    its methods) gets no deadline from it (procshare read it as its own)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        assert m.Poller().poll() == "done"


def test_a_proxytype_factory_that_wraps_the_proxy(impl, ctx):
    """`register(proxytype=factory)` where the factory returns a wrapper of its
    own around the proxy it makes: it works, and the object goes with it."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        handle = m.Wrapped()
        assert type(handle) is _workers.Handle
        assert handle.value() == "a"
        assert m._number_of_objects() == 1
        del handle
        assert poll(lambda: m._number_of_objects() == 0, 10), m._number_of_objects()


def test_a_proxytype_class_that_wraps_the_proxy(impl, ctx):
    """The same with a class of the user's (not a proxy type) that takes the
    stdlib's arguments, `incref` too (procshare passed it incref=False, then
    gave the create's reference back: the object was gone at once)."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        handle = m.WrappedByClass()
        assert handle.value() == "a"
        assert m._number_of_objects() == 1
        del handle
        assert poll(lambda: m._number_of_objects() == 0, 10), m._number_of_objects()


def test_exposed_data_that_is_not_a_property(impl, ctx):
    """A `cached_property`, a namedtuple's fields: procshare reads them as data
    (`proxy.total`), as it did before it stopped reading exposed names at
    creation; the stdlib calls what it reads."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        totals, point = m.Totals(), m.Point()
        if is_stdlib(impl):
            with pytest.raises(TypeError):
                totals.total()
            with pytest.raises(TypeError):
                point.x()
        else:
            assert (totals.plain, totals.total) == (1, 42)
            assert (point.x, point.y) == (1, 2)


def test_a_proxy_type_that_sets_client_as_the_stdlib_does(impl, ctx):
    """The stdlib's BaseProxy sets `self._Client`; a subclass may too."""
    with _workers.get_class(impl, "CustomizedManager")(ctx=ctx) as m:
        p = m.ClientSetting()
        assert p.a() == "a"
        conn = p._Client(p._token.address, authkey=p._authkey)
        try:
            assert impl.dispatch(conn, None, "dummy") is None
        finally:
            conn.close()
        del p
        assert poll(lambda: m._number_of_objects() == 0, 10)


def test_the_patched_autoproxy_recipe(impl, monkeypatch):
    """A widely copied fix for nested proxies replaces `managers.AutoProxy` with
    a function of the stdlib's signature whose `manager_owned` defaults to
    True; types registered after it use it (procshare passed it an
    `attributes=` keyword: TypeError).  Under fork, as the recipe is used (the
    stdlib cannot start a manager under spawn with it)."""
    patched = _workers.get_class(impl, "stdlib_style_autoproxy")
    monkeypatch.setattr(impl, "AutoProxy", patched)

    class PatchedManager(impl.BaseManager):
        pass

    PatchedManager.register("Obj", _workers.Obj)
    with PatchedManager(ctx=multiprocessing.get_context("fork")) as m:
        o = m.Obj()
        assert type(o).__name__ == "AutoProxy[Obj]"
        if not is_stdlib(impl):     # (the stdlib's proxy holds no reference: its
            assert o.a() == "a"     # object is gone, a call raises KeyError there)
        del o
