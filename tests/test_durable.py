"""Durable objects: they survive SIGKILLs of the manager with no acknowledged
write lost and none applied twice, re-attach by name across program runs,
and their state directory is guarded.  Real SIGKILLs, bounded waits."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

import _workers
import procshare
from _helpers import FAULT_START_METHODS, poll, process_gone
from procshare.server.journal import UnsafeStateDir

WAIT = 15.0


def _kill_and_wait(m, timeout: float = 5.0) -> float:
    """SIGKILL the manager's server; return when its successor runs."""
    pid0 = m.pid
    os.kill(pid0, signal.SIGKILL)
    t0 = time.monotonic()
    assert poll(lambda: m.pid != pid0 and not process_gone(m.pid), timeout), "no restart"
    return time.monotonic() - t0


@pytest.fixture(params=FAULT_START_METHODS)
def mp_ctx(request):
    return multiprocessing.get_context(request.param)


def test_every_builtin_survives_a_sigkill_and_the_others_say_lost(mp_ctx):
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d = m.dict({"a": 1}, durable=True)
        lst = m.list([1, 2], durable=True)
        s = m.set({1}, durable=True)
        q = m.Queue(durable=True)
        jq = m.JoinableQueue(durable=True)
        ns = m.Namespace(durable=True)
        v = m.Value("i", 7, durable=True)
        arr = m.Array("d", [0.5, 1.5], durable=True)
        plain = m.dict(b=2)
        d["k"] = "v"
        del d["a"]
        lst.append(3)
        lst[0] = 10
        s.add(2)
        q.put("first")
        q.put("second")
        assert q.get() == "first"
        jq.put("job")
        ns.x = 5
        v.value = 8
        arr[1] = 2.5
        _kill_and_wait(m)
        t0 = time.monotonic()
        assert dict(d) == {"k": "v"}
        assert time.monotonic() - t0 < 2.0
        assert list(lst) == [10, 2, 3]
        assert s._getvalue() == {1, 2}
        assert q.get(timeout=2) == "second" and q.empty()
        assert jq.get(timeout=2) == "job"
        jq.task_done()
        jq.join()
        assert ns.x == 5 and v.value == 8 and list(arr) == [0.5, 2.5]
        with pytest.raises(procshare.ObjectLost) as info:
            plain["b"]
        assert "durable" in str(info.value)
        # they go on working, and survive the next crash too
        d["after"] = 1
        _kill_and_wait(m)
        assert dict(d) == {"k": "v", "after": 1}


def test_a_registered_durable_class_ends_exactly_right_across_a_crash():
    """The seed's Counter, registered durable, from 4 processes that each
    increment 250 times while the manager is SIGKILLed: exactly 1000."""
    manager_cls = _workers.durable_manager_class()
    ctx = multiprocessing.get_context("fork")
    with manager_cls(ctx=ctx) as m:
        counter = m.Counter()
        children = [_workers.start_child(ctx, _workers.increment_counter, counter, 250)
                    for _ in range(4)]
        assert poll(lambda: counter.get_count() >= 100, 15)
        _kill_and_wait(m)
        for c in children:
            c.result(30)
        assert counter.get_count() == 1000
        assert m.restarts == 1


def test_chaos_twenty_sigkills_lose_no_acknowledged_write():
    """Four workers increment a durable Counter, append to a durable list, put
    and get on a durable Queue and set keys of a durable dict, recording every
    acknowledged call, while the manager is SIGKILLed 20 times at random."""
    manager_cls = _workers.durable_manager_class()
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    # (a restart window shorter than the time between kills: each is a first
    # crash, restarted after FIRST_BACKOFF; within 1 s of each other, kills
    # would be a crash loop, whose backoff doubles up to 2 s by design)
    with manager_cls(ctx=ctx, max_restarts=100, restart_window=0.05) as m:
        counter, lst = m.Counter(), m.list(durable=True)
        q, d = m.Queue(durable=True), m.dict(durable=True)
        stop, ops = ctx.Event(), ctx.Value("i", 0)
        workers = [_workers.start_child(ctx, _workers.chaos_worker, w, counter, lst, q, d,
                                        stop, ops) for w in range(4)]
        try:
            assert poll(lambda: ops.value >= 20, 15)
            recoveries = []
            for _ in range(20):
                before = ops.value
                time.sleep(rng.uniform(0.0, 0.15))      # a random moment of the workload
                recoveries.append(_kill_and_wait(m))
                # the workers go on after each restart (bounded wait)
                assert poll(lambda b=before: ops.value > b + 4, 10), "the workers stalled"
        finally:
            stop.set()
        results = [w.result(30) for w in workers]
        assert m.restarts == 20
        final_count = counter.get_count()
        final_list = [tuple(x) for x in lst]
        left = []
        while not q.empty():
            left.append(tuple(q.get(timeout=2)))
        final_dict = d._getvalue()
    errors = [e for r in results for e in r["errors"]]
    assert not errors, errors
    increments = sum(r["inc"] for r in results)
    appended = [tuple(x) for r in results for x in r["append"]]
    puts = [tuple(x) for r in results for x in r["put"]]
    got = [tuple(x) for r in results for x in r["got"]]
    sets = {k: int(k.split(":")[1]) for r in results for k in r["set"]}
    assert increments > 100
    # every acknowledged write is there exactly once, and nothing else
    assert final_count == increments
    assert sorted(final_list) == sorted(appended) and len(set(final_list)) == len(final_list)
    # no queue item lost or delivered twice
    assert sorted(got + left) == sorted(puts) and len(set(got + left)) == len(puts)
    assert final_dict == sets
    assert max(recoveries) < 2.0, recoveries


def test_concurrent_durable_writers_get_their_own_replies_in_order(mp_ctx):
    """Four clients write one durable dict at once, synchronously and
    pipelined, with plain calls and reads in between (commits shared, and
    the durable loop serving some of them, when the writers overlap): each
    client gets its own replies, in order, and reads back what it wrote;
    every write went through the journal."""
    n = 300
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d, plain = m.dict(durable=True), m.dict()
        go = mp_ctx.Event()
        workers = [_workers.start_child(mp_ctx, _workers.durable_mixed_writer, w, d, plain,
                                        n, go) for w in range(4)]
        go.set()
        results = [w.result(60) for w in workers]
        assert results == [[]] * 4
        assert d._getvalue() == {**{f"k{w}": n - 1 for w in range(4)},
                                 **{f"a{w}": n - 1 for w in range(4)}}
        stats = m._control("server_info")["journal"]
        assert stats["rows"] >= 8 * n and stats["commits"] > 0, stats


def test_a_named_object_outlives_the_program_with_state_dir(tmp_path):
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state) as m:
        results = m.dict(durable=True, name="results")
        results["run1"] = 42
        scratch = m.list([1], durable=True)     # unnamed: lives with its proxies
        scratch.append(2)
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    with procshare.SyncManager(state_dir=state) as m:
        again = m.dict(durable=True, name="results")
        assert dict(again) == {"run1": 42}
        again["run2"] = 43
        same = m.dict(durable=True, name="results")
        assert same._id == again._id and dict(same) == {"run1": 42, "run2": 43}
        with pytest.raises(procshare.RemoteError, match="is a 'dict', not a 'list'"):
            m.list(durable=True, name="results")    # errors of create: RemoteError
        ids = {o["id"] for o in m.objects()}
        assert ids == {again._id}       # the unnamed list of the first run is gone


def test_writes_after_an_unnamed_durable_object_goes():
    """Its drop and the next write share a commit (this broke the journal)."""
    with procshare.SyncManager() as m:
        keep = m.dict(durable=True)
        scratch = m.list(durable=True)
        scratch.append(1)
        del scratch
        keep["a"] = 1
        keep["b"] = 2
        assert dict(keep) == {"a": 1, "b": 2} and m.restarts == 0


def test_proxies_in_durable_objects_outlive_the_program_on_a_new_address(tmp_path):
    """A named durable list holds proxies to named durable objects.  The next
    program's manager listens at another address: the stored proxies are
    bound to it (before, they kept the old address, and the manager could
    not even start: recovery tried to reach the old one)."""
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state) as m:
        first = m.address
        inner = m.dict(durable=True, name="inner")
        inner["a"] = 1
        outer = m.list(durable=True, name="outer")
        outer.append(inner)
        outer.append({"plain": inner})          # a proxy inside a value
        assert outer[0]["a"] == 1
    with procshare.SyncManager(state_dir=state) as m:
        assert m.address != first
        outer = m.list(durable=True, name="outer")
        stored = outer[0]
        assert stored._token.address == m.address
        assert stored["a"] == 1
        stored["b"] = 2
        assert outer[1]["plain"]["b"] == 2
        assert dict(m.dict(durable=True, name="inner")) == {"a": 1, "b": 2}
        assert outer.pop(0)["b"] == 2           # a stored reply with a proxy in it
    with procshare.SyncManager(state_dir=state) as m:
        outer = m.list(durable=True, name="outer")
        assert len(outer) == 1 and dict(outer[0]["plain"]) == {"a": 1, "b": 2}


def test_an_unnamed_object_a_named_one_refers_to_outlives_the_program(tmp_path):
    """At a fresh start, unnamed durable objects of the earlier program go,
    except those a kept object holds a proxy to (and what they hold)."""
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state) as m:
        rows = m.list(durable=True, name="rows")
        row = m.dict(durable=True)              # unnamed, held by the named list
        cell = m.list([1], durable=True)        # unnamed, held by the unnamed dict
        row["cell"] = cell
        rows.append(row)
        m.dict({"x": 1}, durable=True)          # unnamed, held by nobody
        x = m.dict(durable=True)                # unnamed, held by this program only,
        x["y"] = m.list([2], durable=True)      # and what it holds
        del row, cell
    with procshare.SyncManager(state_dir=state) as m:
        rows = m.list(durable=True, name="rows")
        row = rows[0]
        cell = row["cell"]
        assert cell[0] == 1
        cell.append(2)
        ids = {o["id"] for o in m.objects()}
        assert len(ids) == 3, ids               # rows, row, cell: not x, nor what x held
        assert rows.pop()["cell"][1] == 2
        del row, cell                           # the last references to row and cell
        gc.collect()
        assert poll(lambda: len(m.objects()) == 1, 10), m.objects()
    with procshare.SyncManager(state_dir=state) as m:
        assert len(m.list(durable=True, name="rows")) == 0
        assert len(m.objects()) == 1


def test_a_proxy_to_another_manager_in_a_durable_object(tmp_path):
    """Journaling it takes no loan at that manager (one a change, each held
    for `loan_ttl`, before); the next program's manager gets it back without
    a reference, and calls on it work while that manager keeps the object."""
    state = tmp_path / "state"
    with procshare.SyncManager() as other:
        theirs = other.dict({"k": 1})
        with procshare.SyncManager(state_dir=state) as m:
            box = m.list(durable=True, name="box")
            box.append(theirs)
            box.append(theirs)
            holders = other.objects()[0]["holders"]
            assert not [h for h in holders if h.startswith("loan:")], holders
            assert box[1]["k"] == 1
        with procshare.SyncManager(state_dir=state) as m:
            box = m.list(durable=True, name="box")
            stored = box[0]
            assert stored._token.address == other.address and stored["k"] == 1
            stored["k"] = 2
            assert theirs["k"] == 2


def test_a_stored_reply_whose_proxy_is_gone_fails_the_call_not_the_connection(tmp_path):
    """A re-sent call is answered from its stored reply; a proxy in that reply
    whose object is gone since then comes back as a proxy that says so."""
    with procshare.SyncManager() as m:
        box = m.list(durable=True)
        box.append(m.dict({"k": 1}, durable=True))
        conn = box._tls.conn
        first = (conn.no, conn.rid + 1)
        gone = box.pop()
        assert gone["k"] == 1
        gone_id = gone._id
        del gone                                # its object goes with its last proxy
        assert poll(lambda: gone_id not in {o["id"] for o in m.objects()}, 10)
        box.append("after")                     # commits the drop too (an earlier ticket)
        pid0 = m.pid
        os.kill(pid0, signal.SIGKILL)           # a re-send goes to a restarted manager
        assert len(box) == 1 and m.pid != pid0
        again = box._callmethod("#RETRY", (*first, "pop", (), {}))
        with pytest.raises(procshare.RemoteError, match="found no object with this id"):
            again["k"]
        assert list(box) == ["after"]           # the connection still serves


def test_a_manager_started_afresh_does_not_run_a_re_sent_call(tmp_path):
    """A call re-sent to a manager that started afresh on the state directory
    (not a restart: it keeps no replies of earlier managers' calls) fails,
    saying so, instead of running a second time."""
    with procshare.SyncManager(state_dir=tmp_path / "state") as m:
        box = m.list(durable=True, name="box")
        with pytest.raises(RuntimeError, match="started afresh"):
            box._callmethod("#RETRY", (1, 1, "append", ("x",), {}))
        assert len(box) == 0


def test_a_fresh_start_drops_an_earlier_unnamed_object_it_cannot_rebuild(tmp_path):
    """An unnamed object of an earlier program whose type this program does
    not register costs that object, not the start."""
    state = tmp_path / "state"

    class WithCounter(procshare.SyncManager):
        pass

    WithCounter.register("Counter", _workers.Counter, durable=True)
    with WithCounter(state_dir=state) as m:
        c = m.Counter()
        c.increment()
        named = m.dict(durable=True, name="kept")
        named["k"] = 1                          # c is held until the end
    with procshare.SyncManager(state_dir=state) as m:         # no Counter here
        assert dict(m.dict(durable=True, name="kept")) == {"k": 1}
        log = "\n".join(m._control("server_info")["log"])
        assert "cannot be rebuilt" in log and "Counter" in log, log
        assert len(m.objects()) == 1


def test_garbage_a_manager_inherits_does_not_hold_recovered_objects(tmp_path):
    """The server is forked from this process and inherits its garbage: here
    a proxy to a manager that is gone, in a cycle.  Recovery's collection
    finalized it in the server, which tried to give its reference back there;
    the failed attempt left a cycle that held recovery's frame, and with it a
    rebuilt proxy, so its object outlived its last reference (until the next
    full collection).  A proxy the server inherits is the parent's: its
    reference is not given back from the server."""
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state) as m:
        rows = m.list(durable=True, name="rows")
        rows.append(m.dict(durable=True))       # unnamed, held by the named list
    gc.disable()
    try:
        with procshare.SyncManager() as other:
            junk = [other.dict()]
            junk.append(junk)                   # a cycle: freed only by a collection
            del junk
        with procshare.SyncManager(state_dir=state) as m:    # forked with the cycle
            gc.enable()
            rows = m.list(durable=True, name="rows")
            assert len(m.objects()) == 2
            rows.pop()
            assert poll(lambda: len(m.objects()) == 1, 10), m.objects()
    finally:
        gc.enable()


def _one_program_run(state) -> None:
    """A program (its own client id) writes a durable dict and ends."""
    with procshare.SyncManager(state_dir=state) as m:
        d = m.dict(durable=True, name="d")
        for i in range(300):
            d[i % 10] = "x" * 20_000        # compacted often: replies keep the rows


def test_the_journal_does_not_grow_from_program_to_program(tmp_path):
    """Each program left the stored replies of its client (256 rows, with their
    effects) in the journal for good: a fresh start forgets them."""
    import sqlite3
    fork = multiprocessing.get_context("fork")
    state = str(tmp_path / "state")
    rows = []
    for _ in range(3):
        run = fork.Process(target=_one_program_run, args=(state,))
        run.start()
        run.join(60)
        assert run.exitcode == 0, run.exitcode
        db = sqlite3.connect(os.path.join(state, "journal.sqlite3"))
        try:
            rows.append(db.execute("SELECT count(*) FROM log").fetchone()[0])
        finally:
            db.close()
    assert rows[2] <= rows[0] + 16, rows


@pytest.mark.parametrize("serializer", ["cloudpickle", "dill"])
def test_a_durable_object_keeps_what_the_managers_serializer_carries(tmp_path, serializer):
    """The journal pickles with the manager's serializer's pickler: a lambda
    set on a durable dict (with cloudpickle) made the dict refuse every later
    call (NotJournalable: the journal pickled with plain pickle)."""
    pytest.importorskip(serializer)
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state, serializer=serializer) as m:
        d = m.dict(durable=True, name="d")
        d["f"] = lambda x: x + 1
        d["a"] = 1
        assert d["f"](1) == 2 and d["a"] == 1
    with procshare.SyncManager(state_dir=state, serializer=serializer) as m:
        d = m.dict(durable=True, name="d")
        assert d["f"](2) == 3 and d["a"] == 1


def test_nested_proxies_of_a_manager_with_an_authkey_of_its_own(tmp_path):
    """A proxy nested in a value the manager returns uses the key this process
    already uses with that manager (the stdlib, and procshare before, tried
    the process's default key, and the manager refused it): so a durable list
    of durable dicts reads back in a program that passes `authkey=`."""
    state = tmp_path / "state"
    for run in range(2):
        with procshare.SyncManager(state_dir=state, authkey=b"k" * 16) as m:
            rows = m.list(durable=True, name="rows")
            if run == 0:
                rows.append(m.dict({"x": 1}, durable=True, name="row"))
            assert rows[0]["x"] == 1 and rows[0]._authkey == b"k" * 16


def test_an_unsafe_state_dir_is_refused(tmp_path):
    state = tmp_path / "shared"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    with pytest.raises(UnsafeStateDir) as info:
        procshare.SyncManager(state_dir=state).start()
    assert "writable" in str(info.value)


def test_a_constructor_keyword_called_durable_is_left_alone():
    with procshare.SyncManager() as m:
        assert dict(m.dict(durable="yes")) == {"durable": "yes"}
        assert dict(m.dict(name="x")) == {"name": "x"}
        # (a type not registered durable: durable=False means nothing to procshare)
        assert dict(m.dict(durable=False, name="n")) == {"durable": False, "name": "n"}
        ns = m.Namespace(durable=False)
        assert ns.durable is False


def _serve(address: str, state: str, key: str):
    proc = subprocess.Popen(
        [sys.executable, "-m", "procshare", "serve", address, "--state-dir", state],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_workers.subprocess_env(PROCSHARE_AUTHKEY=key))
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    if "serving at" not in line:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"procshare serve did not start: {line!r} {err[-2000:]}")
    assert key not in line
    return proc


def _stop_serve(proc) -> None:
    """Ctrl-C a `_serve` process (a SIGKILL if it does not stop in time)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    proc.stdout.close()
    proc.stderr.close()


def test_serve_keeps_durable_objects_across_its_own_restarts(tmp_path):
    """`python -m procshare serve ADDRESS --state-dir DIR`: a standalone manager
    that restarts nothing by itself; run again on the same state dir (after a
    Ctrl-C or a SIGKILL), it has every durable write."""
    address, state, key = str(tmp_path / "m.sock"), str(tmp_path / "state"), "s3cret-key"
    proc = _serve(address, state, key)
    try:
        m = procshare.SyncManager(address=address, authkey=key.encode())
        m.connect()
        jobs = m.dict(durable=True, name="jobs")
        for i in range(50):
            jobs[i] = f"done {i}"
        proc.send_signal(signal.SIGINT)                 # Ctrl-C: a clean stop
        assert proc.wait(10) == 0
        proc = _serve(address, state, key)
        jobs = m.dict(durable=True, name="jobs")
        assert len(jobs) == 50 and jobs[49] == "done 49"
        jobs[50] = "done 50"
        proc.kill()                                     # SIGKILL: nothing restarts it
        proc.wait(10)
        with pytest.raises(procshare.ManagerCrashed):
            jobs[51] = "lost"
        proc = _serve(address, state, key)
        jobs = m.dict(durable=True, name="jobs")
        assert len(jobs) == 51 and jobs[50] == "done 50"
        del jobs
    finally:
        _stop_serve(proc)
    assert not os.path.exists(address)


def test_serve_records_who_may_hold_unnamed_objects_from_the_first(tmp_path):
    """`serve` never starts afresh, so the record of who may hold unnamed
    durable objects is written when its journal is new: without it, a later
    run would trust no record, for good, and keep every unnamed object."""
    address, state, key = str(tmp_path / "m.sock"), str(tmp_path / "state"), "s3cret-key"
    proc = _serve(address, state, key)
    try:
        m = procshare.SyncManager(address=address, authkey=key.encode())
        m.connect()
        m.dict(durable=True, name="named")["x"] = 1     # the journal's first use
        assert os.path.exists(os.path.join(state, "holders.json"))
    finally:
        _stop_serve(proc)


def test_serve_run_again_keeps_the_unnamed_objects_of_connected_clients(tmp_path):
    """A connected client's unnamed durable object outlives a restart of
    `serve` (by SIGKILL or Ctrl-C): the new run recovers as after a crash,
    for the clients that come back (it started fresh, and dropped them)."""
    address, state, key = str(tmp_path / "m.sock"), str(tmp_path / "state"), "s3cret-key"
    proc = _serve(address, state, key)
    try:
        m = procshare.SyncManager(address=address, authkey=key.encode())
        m.connect()
        mine = m.dict(durable=True)
        mine["a"] = 1
        proc.kill()
        proc.wait(10)
        proc = _serve(address, state, key)              # within the clients' reconnect time
        mine["b"] = 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc = _serve(address, state, key)
        mine["c"] = 3
        assert dict(mine) == {"a": 1, "b": 2, "c": 3}
        del mine
    finally:
        _stop_serve(proc)


def test_serve_run_again_forgets_the_replies_of_clients_that_died_meanwhile(tmp_path):
    """`serve` resumes as after a crash, so the stored replies of the last
    run's clients stay for those that come back; a client that died while no
    server ran (here: SIGKILLed between the runs) goes, replies and identity."""
    from procshare.server.journal import Journal
    address, state, key = str(tmp_path / "m.sock"), str(tmp_path / "state"), "s3cret-key"
    fork = multiprocessing.get_context("fork")
    proc = _serve(address, state, key)
    a, b = fork.Pipe()
    kid = _workers.start_child(fork, _workers.write_named_durable, address, key.encode(), b)
    b.close()
    try:
        assert a.poll(WAIT)
        dead = a.recv()
        os.kill(kid.process.pid, signal.SIGSTOP)    # silent: no goodbye, no lease end
        proc.kill()
        proc.wait(10)
        kid.kill()                                  # dies while no server runs
        proc = _serve(address, state, key)
        m = procshare.SyncManager(address=address, authkey=key.encode())
        m.connect()
        shared = m.dict(durable=True, name="shared")
        assert len(shared) == 3

        def log():
            return "\n".join(m._control("server_info")["log"])

        assert poll(lambda: "forgot the stored replies of 1 client(s)" in log(), WAIT), log()
        shared["after"] = 1                         # (a commit: the forget is in it)
    finally:
        kid.kill()
        a.close()
        _stop_serve(proc)
    with Journal(state, key.encode()) as j:
        assert dead not in j.clients() and j.client_ident(dead) is None


def test_a_durable_queue_get_honours_its_deadline_and_takes_nothing():
    with procshare.SyncManager() as m:
        q = m.Queue(durable=True)
        with pytest.raises(procshare.CallTimeout):
            with procshare.timeout(0.3):
                q.get()
        q.put("x")
        assert q.get(timeout=2) == "x"


@pytest.mark.parametrize("method", FAULT_START_METHODS)
def test_a_child_whose_first_call_meets_a_restart_waits_for_it(method):
    """A child that has never connected yet, started while the manager is down,
    waits for the supervised manager to come back (it knows its socket file)."""
    ctx = multiprocessing.get_context(method)
    with procshare.SyncManager(ctx=ctx) as m:
        d = m.dict({"n": 0}, durable=True)
        os.kill(m.pid, signal.SIGKILL)
        _workers.run_child(ctx, _workers.update_item_many, d, 10, timeout=30)
        assert d["n"] == 10


def test_a_resent_call_keeps_the_deadline_it_had():
    """A durable call in flight at a crash is re-sent with what is left of
    its deadline, not a new one; the re-sent get then takes nothing."""
    import threading
    with procshare.SyncManager() as m:
        q = m.Queue(durable=True)
        box: dict = {}

        def get_one():
            box["t0"] = time.monotonic()
            try:
                with procshare.timeout(3.0):
                    q.get()
            except procshare.CallTimeout as e:
                box["err"] = e
            box["took"] = time.monotonic() - box["t0"]

        t = threading.Thread(target=get_one, name="getter", daemon=True)
        t.start()
        assert poll(lambda: "t0" in box and time.monotonic() - box["t0"] >= 1.5 and any(
            "getter" in name for c in m.clients() for name in c["threads"]), 10)
        _kill_and_wait(m)
        t.join(10)
        assert not t.is_alive()
        assert isinstance(box.get("err"), procshare.CallTimeout), box
        assert box["took"] < 4.0, f"the re-sent get waited a new deadline: {box['took']:.2f} s"
        q.put("x")
        assert q.get(timeout=2) == "x"


def test_an_unnamed_create_sent_again_after_a_crash_finds_the_first_object():
    """The client keys an unnamed durable create, so a create whose reply the
    crash swallowed, sent again, gets the object the first one made (not a
    second object, with the first leaked)."""
    from procshare.managers import DictProxy
    from procshare.server.durables import UNNAMED_KEY
    with procshare.SyncManager() as m:
        assert m._unnamed_durable("dict", {"durable": True})
        assert not m._unnamed_durable("dict", {"durable": True, "name": "x"})
        assert not m._unnamed_durable("dict", {})
        first, _exposed = m._control("create", "dict", durable=True,
                                     **{UNNAMED_KEY: "5eed"})
        d = DictProxy(procshare.managers.Token("dict", m.address, first), m._serializer,
                      manager=m, authkey=m._authkey, incref=False)
        d["k"] = "v"
        _kill_and_wait(m)
        again, _exposed = m._control("create", "dict", durable=True,
                                     **{UNNAMED_KEY: "5eed"})
        assert again == first
        assert d["k"] == "v"
        assert sum(o["id"] == first for o in m.objects()) == 1


@pytest.mark.parametrize("method", FAULT_START_METHODS)
def test_pipelined_calls_on_a_durable_object_are_sent_again_exactly_once(method):
    """async_ appends in flight when the manager is SIGKILLed are sent again,
    in order, on a new connection: every future succeeds and the list holds
    each item once, in order; a pipelined call on a plain object says ObjectLost."""
    with procshare.SyncManager(ctx=multiprocessing.get_context(method)) as m:
        items = m.list(durable=True)
        plain = m.dict()
        n = 3000
        futures = [procshare.async_(items).append(i) for i in range(n // 2)]
        lost = procshare.async_(plain).get("x", 1)
        futures += [procshare.async_(items).append(i) for i in range(n // 2, n)]
        assert poll(lambda: sum(f.done() for f in futures) >= 50, 10)
        _kill_and_wait(m)
        for f in futures:
            f.result(30)        # none raised
        procshare.async_(items).append(n).result(10)
        assert list(items) == list(range(n + 1))
        if not lost.done() or lost.exception(10) is not None:
            with pytest.raises(procshare.ObjectLost):
                lost.result(10)
        assert m.restarts == 1


def test_pipelined_calls_sent_again_survive_a_second_crash():
    """Calls re-sent after one crash and caught by a second are sent again
    under the key of their first sending: each item still lands once, in order."""
    with procshare.SyncManager() as m:
        items = m.list(durable=True)
        n = 6000
        futures = [procshare.async_(items).append(i) for i in range(n)]
        assert poll(lambda: sum(f.done() for f in futures) >= 50, 10)
        _kill_and_wait(m)
        done = sum(f.done() for f in futures)
        assert poll(lambda: sum(f.done() for f in futures) >= done + 50, 20)
        _kill_and_wait(m)
        for f in futures:
            f.result(60)
        assert list(items) == list(range(n))
        assert m.restarts == 2



def test_an_exposed_method_a_durable_object_lacks_is_a_missing_method_error():
    """As for a plain object: a RemoteError (the stdlib's) that is also an
    AttributeError, naming the method; the object keeps working."""
    class Lacking(procshare.BaseManager):
        pass

    Lacking.register("Obj", _workers.Obj, exposed=("a", "nosuch"), durable=True)
    with Lacking() as m:
        o = m.Obj()
        with pytest.raises(procshare.MissingMethodError, match="'nosuch'") as info:
            o._callmethod("nosuch")
        assert isinstance(info.value, procshare.RemoteError)
        assert o.a() == "a"


@pytest.mark.parametrize("mode", ["snapshot", "journal"])
def test_a_durable_objects_exposed_data_reads_as_data_across_a_crash(mode):
    """An exposed attribute or property of a durable object reads as on a plain
    one (it raised TypeError: the read went to the journal as a method call);
    a property that raises is a RemoteError with the manager's traceback."""
    class Boxes(procshare.BaseManager):
        pass

    Boxes.register("Box", _workers.Box, exposed=("add", "size", "count", "broken"),
                   durable=mode)
    with Boxes(ctx=multiprocessing.get_context("fork")) as m:
        box = m.Box()
        box.add("x")
        assert (box.size, box.count) == (1, 1)
        with pytest.raises(procshare.RemoteError, match="not ready"):
            box.broken  # noqa: B018
        _kill_and_wait(m)
        box.add("y")
        assert (box.size, box.count) == (2, 2)
        assert box._getvalue().items == ["x", "y"]


def test_a_second_manager_on_a_state_dir_in_use_raises_journal_in_use(tmp_path):
    """procshare's own errors from a server that cannot start come as they are
    (`except JournalInUse:` around start() works), not as the EOFError that
    stands for other failures."""
    from procshare.server.journal import JournalInUse
    state = tmp_path / "state"
    with procshare.SyncManager(state_dir=state) as m:
        m.dict(durable=True, name="x")["a"] = 1
        other = procshare.SyncManager(state_dir=state)
        with pytest.raises(JournalInUse, match="in use by another process"):
            other.start()
        assert dict(m.dict(durable=True, name="x")) == {"a": 1}
