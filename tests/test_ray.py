"""The Ray backend (procshare.ray): RayManager, proxies over Ray, deadlines,
errors, reference counting, durable objects, and the parity scenarios.

Skipped, with the reason, where Ray is not installed.  One local Ray cluster
serves the whole module (``ray_cluster``: about 2-5 s to start here).  It is
started by this module's fixture, before the per-test leak check
(``no_leaks``) takes its snapshot, so Ray's own daemons (children of the
pytest process) are not counted as leaks; Ray's workers are children of its
raylet, not of pytest.  Ray's session files live in a temp dir of their own
outside the run's private TMPDIR (whose socket files the leak check watches)
and are removed at the end.  Child processes use the "spawn" start method:
Ray does not survive fork().
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'procshare[ray]' to test the Ray backend")

import _workers  # noqa: E402
import procshare  # noqa: E402
import test_parity_basemanager as basemanager_scenarios  # noqa: E402
import test_parity_containers as container_scenarios  # noqa: E402
import test_parity_proxies as proxy_scenarios  # noqa: E402
import test_parity_queues as queue_scenarios  # noqa: E402
import test_parity_registered as registered_scenarios  # noqa: E402
import test_parity_sync as sync_scenarios  # noqa: E402
from _helpers import poll  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (no dashboard, 2 CPUs)."""
    import _ray_workers  # noqa: F401  (registers the "ray" impl with _workers)
    import procshare.ray.session as ray_session

    # how `ray://` reaches RaySession: the core's hook, or procshare.ray's stand-in
    assert ray_session.installed == "hook"
    real_tmp = os.path.dirname(tempfile.gettempdir().rstrip("/")) or "/tmp"
    ray_tmp = tempfile.mkdtemp(prefix="psray-", dir=real_tmp)
    # Ray's workers (hosts of the test classes, tasks) import tests/ modules
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    t0 = time.monotonic()
    try:
        ray.init(include_dashboard=False, num_cpus=2, _temp_dir=ray_tmp, log_to_driver=False,
                 logging_level="warning")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    info = {"init_seconds": time.monotonic() - t0, "installed": ray_session.installed}
    try:
        yield info
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def rw(ray_cluster):
    import _ray_workers
    return _ray_workers


@pytest.fixture(scope="module")
def shared_manager(ray_cluster, rw):
    m = rw.CounterManager()
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


@pytest.fixture
def manager(shared_manager):
    """The module's RayManager; each test must give back what it created."""
    base = shared_manager._number_of_objects()
    yield shared_manager
    gc.collect()
    assert poll(lambda: shared_manager._number_of_objects() <= base, 10), \
        shared_manager.objects()


@pytest.fixture
def ctx():
    return SPAWN


def _actor_pid(proxy):
    from procshare.ray import actor_info
    return actor_info(proxy)["pid"]


# -- layering -------------------------------------------------------------------------------------

def test_ray_package_never_reaches_server_and_has_no_cycles():
    """procshare/ray/ imports client/, wire/ and errors, never server/ (directly or
    through other modules), and is on no import cycle."""
    import test_layers
    g = test_layers.graph()
    mods = [m for m in g.files if test_layers.under(m, "procshare.ray")]
    assert len(mods) >= 8, mods
    bad = {m: test_layers.reach(g, m, "procshare.server") for m in mods}
    assert not any(bad.values()), {m: [g.where(e) for e in c] for m, c in bad.items() if c}
    cycles = [c for c in test_layers.find_cycles(g.adjacency())
              if any(test_layers.under(m, "procshare.ray") for m in c)]
    assert not cycles, cycles


# -- the manager ------------------------------------------------------------------------------

def test_start_joins_this_ray_and_shutdown_leaves_it_running(ray_cluster, rw):
    m = rw.CounterManager()
    m.start()
    assert m.started_ray is False          # the fixture's cluster was joined, not started
    assert str(m.address).startswith("ray://") and m.pid is None
    c = m.Counter()
    c.increment()
    assert c.get_count() == 1
    m.shutdown()
    assert ray.is_initialized()
    with pytest.raises(procshare.ManagerCrashed) as info:
        c.get_count()
    assert "was shut down by this process" in str(info.value)
    with pytest.raises(multiprocessing.ProcessError):
        m.start()


def test_context_manager_connect_and_authkey(ray_cluster, rw):
    with rw.CounterManager(authkey=b"right") as m:
        other = rw.CounterManager(address=m.address, authkey=b"right")
        other.connect()
        d = other.dict(a=1)
        assert d._getvalue() == {"a": 1}
        assert m._number_of_objects() == 1
        del d
        bad = rw.CounterManager(address=m.address, authkey=b"wrong")
        with pytest.raises(multiprocessing.AuthenticationError):
            bad.connect()
        address = m.address
    with pytest.raises(OSError):
        rw.CounterManager(address=address, authkey=b"right").connect()


# -- the seed's Counter ---------------------------------------------------------------------------

def test_seed_counter_from_four_ray_tasks(manager, rw):
    counter = manager.Counter()
    task = ray.remote(rw.increment_in_task)
    pids = ray.get([task.remote(counter, 1000) for _ in range(4)], timeout=120)
    assert counter.get_count() == 4000
    assert os.getpid() not in pids
    del counter


def test_seed_counter_from_four_processes_that_connect(manager, rw, ctx):
    counter = manager.Counter()
    authkey = bytes(multiprocessing.current_process().authkey)
    children = [_workers.start_child(ctx, rw.connect_and_use, manager.address, authkey,
                                     counter, 1000) for _ in range(4)]
    got = [c.result(90) for c in children]
    assert counter.get_count() == 4000
    assert sorted(d["pid"] for d in got) == sorted(c.process.pid for c in children)
    del counter


def test_proxy_in_a_ray_actor(manager, rw):
    counter = manager.Counter()
    actor = ray.remote(rw.Incrementer).options(num_cpus=0).remote(counter)
    try:
        assert ray.get(actor.run.remote(100), timeout=60) == 100
    finally:
        ray.kill(actor)
    assert counter.get_count() == 100
    del counter


def test_call_async_pipelines_in_order(manager):
    from procshare.ray import call_async
    lst = manager.list()
    futures = [call_async(lst, "append", i) for i in range(300)]
    assert [f.result(60) for f in futures] == [None] * 300
    assert lst._getvalue() == list(range(300))
    d = manager.dict()
    with pytest.raises(KeyError):
        call_async(d, "__getitem__", "missing").result(30)
    del lst, d


def test_async_oneway_and_aio_work_on_ray_proxies(manager):
    """The local backend's pipelining API, unchanged: procshare.async_ futures,
    procshare.oneway and procshare.aio on a RayManager's proxies."""
    import asyncio

    counter = manager.Counter()
    calls = procshare.async_(counter)
    futures = [calls.increment() for _ in range(200)]
    assert [f.result(60) for f in futures] == [None] * 200
    assert calls.get_count().result(30) == 200
    procshare.oneway(counter).increment()
    assert poll(lambda: counter.get_count() == 201, 30)
    d = manager.dict()
    with pytest.raises(KeyError):
        procshare.async_(d).__getitem__("missing").result(30)
    q = manager.Queue()
    with pytest.raises(procshare.CallTimeout):
        procshare.async_(q, timeout=0.3).get().result(10)

    async def main():
        p = procshare.aio.wrap(counter)
        await asyncio.gather(*(p.increment() for _ in range(50)))
        return await p.get_count()

    assert asyncio.run(main()) == 251

    async def cancelled_get():
        task = asyncio.ensure_future(procshare.aio.wrap(q).get())
        await asyncio.sleep(0.5)            # the get waits in the queue's actor
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_get())
    q.put("kept")                           # the cancelled get took nothing
    assert q.get(timeout=10) == "kept"
    counter = calls = futures = d = q = None   # give back what the test created


# -- durable objects ----------------------------------------------------------------------------------

def test_durable_dict_and_counter_survive_a_worker_kill(ray_cluster, rw, tmp_path):
    from procshare.ray import actor_info
    with rw.DurableManager(state_dir=str(tmp_path)) as m:
        d = m.dict()
        c = m.Counter()
        for i in range(50):
            d[i] = i
            c.increment()
        before = {"d": actor_info(d), "c": actor_info(c)}
        assert before["d"]["durable"] and before["c"]["durable"]
        os.kill(before["d"]["pid"], signal.SIGKILL)
        os.kill(before["c"]["pid"], signal.SIGKILL)
        for i in range(50, 100):       # acknowledged writes across the restart
            d[i] = i
            c.increment()
        assert d._getvalue() == {i: i for i in range(100)}
        assert c.get_count() == 100
        after = {"d": actor_info(d), "c": actor_info(c)}
        assert after["d"]["pid"] != before["d"]["pid"] and after["d"]["restarted"]
        assert after["c"]["pid"] != before["c"]["pid"] and after["c"]["restarted"]

        # kills while another thread writes: every acknowledged increment counts once
        done = []

        def writer(counter):
            for _ in range(300):
                counter.increment()
                done.append(1)
        t = threading.Thread(target=writer, args=(c,))
        t.start()
        for kill in (1, 2):
            poll(lambda n=kill: len(done) > 60 * n, 30)
            os.kill(actor_info(c)["pid"], signal.SIGKILL)
        t.join(120)
        assert not t.is_alive()
        assert len(done) == 300
        assert c.get_count() == 400
        snapshot = after["c"]["snapshot"]
        assert os.path.exists(snapshot)
        del d, c
        gc.collect()
        assert poll(lambda: not os.path.exists(snapshot), 10), (   # released: file removed
            m.objects(), os.listdir(os.path.dirname(snapshot)))


@pytest.mark.parametrize("durable", [False, True])
def test_exposed_data_reads_as_data_and_a_failing_property_is_a_remote_error(
        ray_cluster, rw, tmp_path, durable):
    """As on the local backend: an exposed attribute or property reads as data,
    durable or not, and a property whose getter raises is a RemoteError (it
    came back as the getter's own exception)."""
    cls, kw = (rw.DurableManager, {"state_dir": str(tmp_path)}) if durable \
        else (rw.CounterManager, {})
    with cls(**kw) as m:
        box = m.Box()
        box.add("x")
        assert (box.size, box.count) == (1, 1)
        with pytest.raises(procshare.RemoteError, match="not ready"):
            box.broken  # noqa: B018
        assert box.count == 1


def test_snapshot_files_are_hmacd_and_trusted_only_when_private(tmp_path):
    from procshare.ray.durable import SnapshotStore, StateTampered, derive_key, prepare_dir
    directory = prepare_dir(str(tmp_path / "state"))
    assert (os.stat(directory).st_mode & 0o777) == 0o700
    key = derive_key(b"secret", "state", "ns")
    store = SnapshotStore(directory, "abc", key)
    assert store.load() is None
    store.save({"obj": b"x", "replies": {"c": [(1, (10, None))]}})
    assert store.load()["replies"] == {"c": [(1, (10, None))]}
    with pytest.raises(StateTampered):               # another authkey
        SnapshotStore(directory, "abc", derive_key(b"other", "state", "ns")).load()
    data = open(store.path, "rb").read()
    with open(store.path, "wb") as f:               # one byte changed
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(StateTampered):
        store.load()
    os.chmod(directory, 0o770)
    with pytest.raises(StateTampered):
        prepare_dir(directory)


def test_large_values_and_async_deadlines(manager):
    from procshare.ray import call_async
    d = manager.dict()
    big = os.urandom(4 << 20)        # through Ray's object store, both ways
    d["big"] = big
    assert d["big"] == big
    q = manager.Queue()
    t0 = time.monotonic()
    with pytest.raises(procshare.CallTimeout) as info:
        call_async(q, "get", timeout=0.3).result(10)
    assert time.monotonic() - t0 < 2.0 and info.value.may_complete is False
    q.put(1)
    assert q.get_nowait() == 1
    # an argument that cannot travel: named, with the object's type and id; the
    # proxy pickled before it gives its loan back (the fixture checks that
    # nothing is left once this test lets go of its proxies)
    with pytest.raises(procshare.errors.ArgumentsNotSerializable) as err:
        d["lock"] = (q, threading.Lock())
    assert f"__setitem__() on 'dict' object {d._id} " in str(err.value)
    assert err.value.path == "args[1][1]" and "lock" not in d
    del d, q, err       # (its traceback holds the proxies)


def test_non_durable_object_lost_with_its_worker(manager):
    counter = manager.Counter()
    counter.increment()
    os.kill(_actor_pid(counter), signal.SIGKILL)
    lost = getattr(procshare.errors, "ObjectLost", procshare.ManagerCrashed)
    with pytest.raises(lost) as info:
        counter.get_count()
    text = str(info.value)
    assert "'Counter' object" in text and "died" in text and "not durable" in text
    del counter


# -- deadlines ------------------------------------------------------------------------------------------

def test_deadline_on_a_hung_method_raises_call_timeout_in_time(manager):
    h = manager.Hanger()
    assert h.ping() == "pong"
    t0 = time.monotonic()
    with pytest.raises(procshare.CallTimeout) as info:
        with procshare.timeout(0.5):
            h.hang(60)
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 1.5, elapsed
    text = str(info.value)
    assert "hang() on 'Hanger' object" in text and "within 0.5 s" in text
    assert "may still complete" in text and info.value.may_complete is True
    assert "hang() is still running" in text
    # the next call waits behind it (calls on one object run one at a time)
    t0 = time.monotonic()
    with pytest.raises(procshare.CallTimeout):
        h._callmethod("ping", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    del h       # released: its actor is killed, hung method and all


def test_abandoned_blocking_get_is_cancelled_and_takes_nothing(manager, rw, ctx):
    q = manager.Queue()
    t0 = time.monotonic()
    with pytest.raises(procshare.CallTimeout) as info:
        with procshare.timeout(0.3):
            q.get()
    assert time.monotonic() - t0 < 1.5
    assert info.value.may_complete is False      # it gave up and had no effect
    q.put("kept")
    assert q.get_nowait() == "kept"
    assert _workers.run_child(ctx, rw.timed_call_in_child, q, 0.3, timeout=60) == \
        ("CallTimeout", False)
    q.put("still kept")
    assert q.get(timeout=5) == "still kept"
    del q


def test_blocked_get_does_not_block_a_put_from_another_process(manager, rw, ctx):
    q = manager.Queue()
    out = []
    getter = threading.Thread(target=lambda q: out.append(q.get(timeout=30)), args=(q,))
    getter.start()
    time.sleep(0.3)
    put_time = _workers.run_child(ctx, rw.put_after, q, "from child", 0.2, timeout=60)
    getter.join(30)
    assert out == ["from child"]
    assert put_time < 1.0, f"put() waited {put_time:.2f}s behind a blocked get()"
    del q


# -- errors and lifetimes ------------------------------------------------------------------------------

def test_user_exception_keeps_type_and_remote_traceback(manager):
    d = manager.dict()
    with pytest.raises(KeyError) as info:
        d["missing"]
    cause = info.value.__cause__
    assert type(cause).__name__ == "RemoteTraceback"
    assert "In the Ray actor of 'dict' object" in str(cause) and "KeyError" in str(cause)
    with pytest.raises(AttributeError):
        d._callmethod("no_such_method")
    del d


def test_objects_are_released_with_their_last_proxy(manager):
    from procshare.ray.host import actor_name
    base = manager._number_of_objects()
    d = manager.dict()
    it = iter(d)                   # a sub-object in the dict's actor
    assert list(it) == []
    name = actor_name(d._id)
    token = d._token
    assert manager._number_of_objects() >= base + 1
    del d, it
    gc.collect()
    assert poll(lambda: manager._number_of_objects() == base, 10)

    def gone():
        try:
            ray.get_actor(name, namespace=manager.address.namespace)
        except ValueError:
            return True
        return False
    assert poll(gone, 10)
    # a proxy rebuilt from a bare token: the local backend's "no such object"
    from procshare.client.proxy import DictProxy
    bare = DictProxy(token, "pickle", authkey=manager._authkey, incref=False)
    with pytest.raises(procshare.RemoteError) as info:
        bare.keys()
    assert "found no object with this id" in str(info.value)


def test_a_failed_call_async_keeps_no_frame_alive(manager):
    """The error a call_async (or async_) future holds must not keep the frames
    that made it alive: its traceback leads back to them, and they hold the
    future, the call's arguments and the proxy, a cycle that only a full
    collection frees.  Checked with the collector off, as it is most of the
    time, for an argument those frames hold: in a call Ray cannot serialize, on
    an object whose actor is gone (none by its name), and on one whose actor
    was killed (found out in Ray's callback, settled in the background)."""
    from procshare.client.proxy import ListProxy
    from procshare.ray import call_async
    from procshare.ray.host import actor_name

    class Arg:
        pass

    class Unserializable:
        def __reduce__(self):
            raise TypeError("not this one")

    def no_actor(name):
        try:
            ray.get_actor(name, namespace=manager.address.namespace)
        except ValueError:
            return True
        return False

    lst = manager.list()
    released = manager.list()
    token, name = released._token, actor_name(released._id)
    del released
    gc.collect()
    assert poll(lambda: no_actor(name), 10)
    bare = ListProxy(token, "pickle", authkey=manager._authkey, incref=False)
    bare._procshare_session.forget_handle(bare._id)       # looked up by name, as a new process does
    killed = manager.list([1])
    os.kill(_actor_pid(killed), signal.SIGKILL)
    lost = getattr(procshare.errors, "ObjectLost", procshare.ManagerCrashed)
    cases = [
        ("unserializable", lambda arg: call_async(lst, "append", [arg, Unserializable()]),
         TypeError, "could not be serialized"),
        ("unserializable async_", lambda arg: procshare.async_(lst).append(
            [arg, Unserializable()]), TypeError, "could not be serialized"),
        ("no actor", lambda arg: call_async(bare, "append", arg), procshare.RemoteError,
         "found no object with this id"),
        ("killed", lambda arg: call_async(killed, "append", arg), lost, "died"),
    ]
    kept = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for what, call, cls, text in cases:
            arg = Arg()
            ref = weakref.ref(arg)
            fut = call(arg)
            with pytest.raises(cls) as info:
                fut.result(30)
            assert text in str(info.value), (what, info.value)
            del arg, fut, info
            # (the thread that settled the future may still be returning)
            if not poll(lambda r=ref: r() is None, 5):
                kept.append(what)
    finally:
        if enabled:
            gc.enable()
    assert not kept, f"a frame kept the call's argument alive: {kept}"
    cases = lst = bare = killed = None      # give back what the test created


def test_no_orphans_when_the_starting_process_dies(ray_cluster, rw, ctx):
    """Like a local manager that exits with its parent: the registry notices the
    starting process's Ray job is gone and kills every actor of the manager."""
    reader, writer = ctx.Pipe(duplex=False)
    p = ctx.Process(target=rw.start_and_vanish, args=(writer,))
    p.start()
    writer.close()
    try:
        assert reader.poll(60)
        address, oid = reader.recv()
    finally:
        reader.close()
        p.join(30)
    namespace = address.rpartition("/")[2]

    def left():
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == namespace]
    assert poll(lambda: not left(), 30), left()


def test_forked_child_gets_a_clear_error(manager):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    lst = manager.list([1])
    got = _workers.run_child(multiprocessing.get_context("fork"), _try_len, lst, timeout=30)
    assert got[0] == "ForkedRayError" and "spawn" in got[1]
    del lst


def _try_len(lst):
    try:
        return ("ok", len(lst))
    except Exception as e:
        return (type(e).__name__, str(e))


# -- the parity scenarios, run against RayManager where their behaviour is defined -----------------

def _impl():
    import _ray_workers
    return _ray_workers


#: (module, scenario): each called with the arguments its signature names
SCENARIOS = [
    (container_scenarios, name) for name in (
        "test_list", "test_dict", "test_dict_constructor_and_view_types",
        "test_list_seen_from_child", "test_list_clear_copy_314",
        "test_dict_or_ior_fromkeys_reversed_314", "test_reversed_dict_proxy", "test_set_314",
        "test_lock_locked_314",
        "test_namespace", "test_namespace_from_child", "test_value", "test_array")
] + [
    (sync_scenarios, name) for name in (
        "test_event", "test_lock_acquire_timeout_same_process",
        "test_plain_lock_released_by_another_process",
        "test_plain_lock_released_by_another_thread", "test_rlock_release_by_non_owner",
        "test_semaphore_counts", "test_bounded_semaphore_over_release",
        "test_condition_wait_notify_across_processes",
        "test_condition_wait_for_across_processes", "test_condition_timeouts_and_errors",
        "test_barrier", "test_barrier_abort", "test_barrier_timeout_breaks")
] + [
    (queue_scenarios, name) for name in (
        "test_queue_basics", "test_queue_maxsize", "test_joinable_queue",
        "test_blocked_get_does_not_block_put", "test_blocked_get_same_process_other_thread",
        "test_queue_put_from_child_parent_gets")
] + [
    (registered_scenarios, name) for name in (
        "test_seed_counter", "test_read_modify_write_is_not_lost")
] + [
    (proxy_scenarios, name) for name in (
        "test_nested_proxies_used_from_child", "test_nested_namespace_holds_queue",
        "test_method_to_typeid_in_parent", "test_method_to_typeid_in_child",
        "test_dict_iteration_in_child", "test_handoff_through_managed_queue",
        "test_handoff_through_pipe", "test_referent_exceptions_keep_their_type",
        "test_custom_exception_and_non_exposed_method", "test_creation_error",
        "test_repr_and_str", "test_non_callable_exposed_attribute",
        "test_the_object_count_leaves_out_objects_held_only_inside_the_manager")
] + [
    (basemanager_scenarios, name) for name in (
        "test_start_initializer_runs_in_server", "test_start_twice_raises_process_error",
        "test_number_of_objects_goes_back_down")
]


@pytest.mark.parametrize(("module", "name"), SCENARIOS,
                         ids=[f"{m.__name__[len('test_parity_'):]}-{n[len('test_'):]}"
                              for m, n in SCENARIOS])
def test_parity_scenario(module, name, manager, ctx):
    import inspect
    func = getattr(module, name)
    available = {"manager": manager, "ctx": ctx, "impl": _impl()}
    params = inspect.signature(func).parameters
    if "kind" in params:
        for kind in sync_scenarios.LOCK_KINDS:
            func(**{p: available.get(p, kind) for p in params})
        return
    func(**{p: available[p] for p in params})


@pytest.mark.parametrize("kind", list(sync_scenarios.LOCK_KINDS))
def test_parity_locks_held_elsewhere_and_context_manager(kind, manager, ctx):
    sync_scenarios.test_acquire_fails_while_held_elsewhere(manager, ctx, kind)
    sync_scenarios.test_context_manager(manager, kind)


def test_calls_on_one_object_run_one_at_a_time_on_ray(ray_cluster, ctx):
    """On Ray a serial object's actor runs one call at a time, however long it
    takes (the local backend's 0.1 s patience does not apply: README)."""
    nap = 0.3
    cls = _workers.get_class(_impl(), "CounterManager")
    (s1, e1), (s2, e2) = registered_scenarios._two_naps(cls, ctx, nap)
    assert not s2 < e1, f"calls overlapped: {(s1, e1)} and {(s2, e2)}"
    assert e2 - s1 >= 2 * nap - 0.01


def test_parity_serial_false_lets_calls_overlap(ray_cluster, ctx):
    nap = 0.3
    cls = _workers.get_class(_impl(), "ParallelSleeperManager")
    (s1, e1), (s2, e2) = registered_scenarios._two_naps(cls, ctx, nap)
    assert s2 < e1, f"calls did not overlap: {(s1, e1)} and {(s2, e2)}"


# -- what it costs ---------------------------------------------------------------------------------------

def test_cost_per_call_against_the_local_backend(manager, ray_cluster, capsys):
    """Measured, printed and loosely bounded: a synchronous call on a Ray actor
    against the local backend (procshare.Manager())."""
    from procshare.ray import call_async

    def per_call(fn, n):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    d = manager.dict(k=1)
    ray_us = per_call(functools.partial(d.get, "k"), 500)
    t0 = time.perf_counter()
    futures = [call_async(d, "get", "k") for _ in range(500)]
    for f in futures:
        f.result(60)
    pipelined_us = (time.perf_counter() - t0) / 500 * 1e6
    with procshare.Manager() as local:
        ld = local.dict(k=1)
        local_us = per_call(functools.partial(ld.get, "k"), 2000)
        del ld
    with capsys.disabled():
        print(f"\n[procshare.ray] ray.init {ray_cluster['init_seconds']:.2f} s; dict get: "
              f"Ray actor {ray_us:.0f} us sync, {pipelined_us:.0f} us pipelined; "
              f"local backend {local_us:.1f} us; ratio {ray_us / local_us:.0f}x "
              f"(hook: {ray_cluster['installed']})")
    assert ray_us < 100_000
    del d


def test_queue_module_exceptions_cross(manager):
    q = manager.Queue(1)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put_nowait(2)
    del q


def test_demo_ray_scene(ray_cluster):
    """`python -m procshare demo ray`: the seed's Counter from 4 Ray tasks, exact."""
    import io

    from procshare.cli import demo

    out = io.StringIO()
    assert demo.run(["ray"], compare_stdlib=False, out=out) == 0, out.getvalue()
    assert "final count 4000 (expected 4000)" in out.getvalue()
