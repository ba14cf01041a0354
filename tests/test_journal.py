"""The durable-object journal (``procshare.server.journal``) and effects (``.durable``).

Real SQLite files in ``tmp_path``; no manager is started.  Covered: the state
directory's safety checks, HMACs and tampering (nothing is unpickled before its
HMAC passes), effects of every built-in type replaying to an equal object
(hypothesis, random call sequences, with and without compaction), user classes
in snapshot and journal mode, exactly-once replies, group commit, a writer
process SIGKILLed at random moments, and compaction.  Every wait is bounded.

``python tests/test_journal.py`` prints the micro-benchmark (not a test).
"""

from __future__ import annotations

import array
import contextlib
import hmac
import operator
import os
import pickle
import queue
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

import procshare
from procshare import managers
from procshare.server import durable, journal, primitives
from procshare.server.journal import (
    FILENAME,
    Journal,
    JournalBroken,
    JournalError,
    JournalInUse,
    JournalTampered,
    NotJournalable,
    UnsafeStateDir,
    _HmacSha256,
    benchmark,
    check_state_dir,
    private_state_dir,
    remove_private_state_dir,
)

# hypothesis' caches go to this run's private temp dir (see conftest), not the work tree
configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "hypothesis"))

KEY = b"test-authkey-\x00\xff-do-not-print"
OTHER_UID = 12345
WAIT = 10.0     # seconds: the bound on every commit wait


def factory(typeid: str, args: tuple, kwds: dict):
    makers = {"dict": dict, "list": list, "set": set, "Queue": primitives.Queue,
              "JoinableQueue": primitives.Queue, "Namespace": managers.Namespace,
              "Value": managers.Value, "Array": managers.Array, "Counter": Counter,
              "Det": Det, "GrowsALock": GrowsALock}
    return makers[typeid](*args, **kwds)


def reopen(path, **kw) -> tuple[Journal, dict]:
    j = Journal(path, KEY, **kw)
    return j, j.recover(factory)


def call(j: Journal, h, method, *args, client="c1", request=None, **kwds):
    done = h.call(method, args, kwds, client=client, request=request)
    j.wait(done.ticket, WAIT)
    if not done.ok:
        raise done.value
    return done.value


# -- user classes ----------------------------------------------------------------------------

class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def increment(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def value(self) -> int:
        return self.n


class Det:
    """Deterministic, declared for durable='journal'."""

    def __init__(self, base: int) -> None:
        self.items = [base]

    def add(self, x: int) -> int:
        if x < 0:
            self.items.append("neg")    # a change, then an error: replay must match
            raise ValueError("negative")
        if x == 0:
            self.items.append("zero")   # a change, then SystemExit: journaled all the same
            raise SystemExit(3)
        self.items.append(x)
        return len(self.items)

    def get(self) -> list:
        return list(self.items)


class Unpicklable:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def touch(self) -> None:
        pass


class Flaky:
    """Not deterministic: replay of `bump` differs from the original run."""
    runs = 0

    def __init__(self) -> None:
        self.lock = threading.Lock()    # not picklable: journal mode must replay calls

    def bump(self) -> None:
        Flaky.runs += 1
        if Flaky.runs > 1:
            raise RuntimeError("different on replay")


# -- the state directory ---------------------------------------------------------------------

def test_state_dir_is_created_0700(tmp_path):
    d = tmp_path / "a" / "state"
    with Journal(d, KEY):
        pass
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / FILENAME).st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeStateDir) as ei:
        Journal(d, KEY)
    msg = str(ei.value)
    assert str(d) in msg and "writable by" in msg and f"{mode:04o}" in msg
    assert "chmod go-w" in msg
    assert isinstance(ei.value, PermissionError)


def test_readable_by_others_is_allowed(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, 0o755)
    Journal(d, KEY).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_dir_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, -1)
    with pytest.raises(UnsafeStateDir) as ei:
        Journal(d, KEY)
    msg = str(ei.value)
    assert str(d) in msg and f"owned by uid {OTHER_UID}" in msg and "state_dir" in msg


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_journal_file_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "state"
    Journal(d, KEY).close()
    os.chown(d / FILENAME, OTHER_UID, -1)
    with pytest.raises(UnsafeStateDir, match=f"owned by uid {OTHER_UID}"):
        Journal(d, KEY)


def test_journal_file_writable_by_others_is_refused(tmp_path):
    d = tmp_path / "state"
    Journal(d, KEY).close()
    os.chmod(d / FILENAME, 0o666)
    with pytest.raises(UnsafeStateDir, match="journal file is writable by its group and all"):
        Journal(d, KEY)


def test_symlinked_journal_file_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", d / FILENAME)
    with pytest.raises(UnsafeStateDir, match="not a regular file"):
        Journal(d, KEY)


def test_not_a_directory_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(UnsafeStateDir, match="not a directory"):
        check_state_dir(f)


def test_private_state_dir_lifetime(tmp_path):
    d = private_state_dir(str(tmp_path))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    with Journal(d, KEY) as j:
        j.create("x", "dict", {"a": 1})
    remove_private_state_dir(d)
    assert not os.path.exists(d)
    with pytest.raises(ValueError, match="not made by private_state_dir"):
        remove_private_state_dir(str(tmp_path))
    assert tmp_path.exists()


def test_second_opener_is_refused(tmp_path):
    with Journal(tmp_path / "s", KEY):
        t0 = time.monotonic()
        with pytest.raises(JournalInUse, match="in use by another process"):
            Journal(tmp_path / "s", KEY)
        assert time.monotonic() - t0 < 5
    Journal(tmp_path / "s", KEY).close()     # free again once closed


def test_not_a_journal_file(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    (d / FILENAME).write_bytes(b"this is not sqlite" * 100)
    os.chmod(d / FILENAME, 0o600)
    with pytest.raises(JournalError, match="not a procshare journal"):
        Journal(d, KEY)


# -- HMACs and tampering ---------------------------------------------------------------------

@pytest.mark.parametrize("klen", [1, 32, 64, 65, 200])
def test_hmac_is_rfc2104_hmac_sha256(klen):
    key = bytes(range(256))[:klen]
    mac = _HmacSha256(key)
    for msg in (b"", b"x", os.urandom(1000)):
        assert mac(msg) == hmac.digest(key, msg, "sha256")
    assert "key hidden" in repr(mac)


class _Boom:
    """A pickle that runs code when loaded: it must never be loaded."""
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _filled(path) -> None:
    with Journal(path, KEY) as j:
        d = j.create("d", "dict", {"a": 1})
        for i in range(5):
            call(j, d, "__setitem__", f"k{i}", i, request=i + 1)


@contextlib.contextmanager
def _db(path):
    """A plain connection to a closed journal, to change it behind its back."""
    db = sqlite3.connect(os.path.join(path, FILENAME), isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _flip(data: bytes, at: int = -1) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def test_tampered_effect_is_refused_before_unpickling(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    marker = tmp_path / "pwned"
    with _db(path) as db:
        rid, = db.execute("SELECT id FROM log WHERE seq=3").fetchone()
        db.execute("UPDATE log SET effects=? WHERE id=?", (pickle.dumps(_Boom(str(marker))), rid))
    j = Journal(path, KEY)
    try:
        with pytest.raises(JournalTampered) as ei:
            j.recover(factory)
    finally:
        j.close()
    msg = str(ei.value)
    assert "log row 3 of 'd'" in msg and "integrity check" in msg and str(path) in msg
    assert not marker.exists()
    assert KEY.decode("latin-1") not in msg and repr(KEY) not in msg


@pytest.mark.parametrize("column", ["effects", "reply", "mac", "client", "seq"])
def test_flipped_byte_in_log_row_is_refused(tmp_path, column):
    path = tmp_path / "s"
    _filled(path)
    with _db(path) as db:
        rid, val = db.execute(f"SELECT id, {column} FROM log WHERE seq=2").fetchone()
        if isinstance(val, bytes):
            val = _flip(val)
        elif isinstance(val, str):
            val = val + "x"
        else:
            val = val + 1000
        db.execute(f"UPDATE log SET {column}=? WHERE id=?", (val, rid))
    with Journal(path, KEY) as j:
        with pytest.raises(JournalTampered):
            j.recover(factory)


def test_flipped_byte_in_snapshot_is_refused(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    with _db(path) as db:
        oid, data = db.execute("SELECT oid, data FROM snapshots").fetchone()
        db.execute("UPDATE snapshots SET data=? WHERE oid=?", (_flip(data, 10), oid))
    with Journal(path, KEY) as j:
        with pytest.raises(JournalTampered, match="the snapshot of 'd'"):
            j.recover(factory)


def test_tampered_object_record_is_refused_at_open(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    with _db(path) as db:
        db.execute("UPDATE objects SET typeid='list'")
    with pytest.raises(JournalTampered, match="the object record of 'd'"):
        Journal(path, KEY)


def test_tampered_reply_is_refused(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    with _db(path) as db:
        rid, rep = db.execute("SELECT id, reply FROM log WHERE request=4").fetchone()
        db.execute("UPDATE log SET reply=? WHERE id=?", (_flip(rep), rid))
    with Journal(path, KEY) as j:
        assert j.lookup_reply("c1", 3) == (True, None)
        with pytest.raises(JournalTampered, match="stored reply of request 4 of client 'c1'"):
            j.lookup_reply("c1", 4)
        with pytest.raises(JournalTampered, match="log row 4 of 'd'"):
            j.recover(factory)      # one row holds the effects and the reply


def test_missing_row_is_refused(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    with _db(path) as db:
        db.execute("DELETE FROM log WHERE seq=3")
    with Journal(path, KEY) as j:
        with pytest.raises(JournalTampered, match="jumps from row 2 to row 4"):
            j.recover(factory)


def test_wrong_authkey_is_refused_at_open(tmp_path):
    path = tmp_path / "s"
    _filled(path)
    with pytest.raises(JournalTampered) as ei:
        Journal(path, b"another key")
    msg = str(ei.value)
    assert "different authkey" in msg and str(path) in msg
    assert "another key" not in msg


def test_records_cannot_move_between_journals(tmp_path):
    """The MAC key depends on the file's random id: a row copied from another
    journal with the same authkey fails."""
    a, b = tmp_path / "a", tmp_path / "b"
    _filled(a)
    _filled(b)
    with _db(a) as da, _db(b) as dbb:
        row = da.execute("SELECT effects, reply, mac FROM log WHERE seq=2").fetchone()
        dbb.execute("UPDATE log SET effects=?, reply=?, mac=? WHERE seq=2", row)
    with Journal(b, KEY) as j:
        with pytest.raises(JournalTampered):
            j.recover(factory)


# -- effects replay to an identical object (hypothesis) ---------------------------------------

keys = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "c"]))
vals = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.tuples(st.integers(0, 2)),
                 st.lists(st.integers(0, 2), max_size=2))
unhashable = st.just([1])
small = st.integers(-4, 4)


def op(name, *args, **kwds):
    return st.tuples(st.just(name), st.tuples(*args) if args else st.just(()),
                     st.fixed_dictionaries(kwds) if kwds else st.just({}))


DICT_OPS = st.one_of(
    op("__setitem__", keys, vals), op("__setitem__", unhashable, vals),
    op("__delitem__", keys), op("pop", keys), op("pop", keys, vals), op("popitem"),
    op("setdefault", keys, vals), op("setdefault", keys), op("clear"),
    op("update", st.lists(st.tuples(keys, vals), max_size=3)),
    op("update", st.lists(st.one_of(st.tuples(keys, vals), st.tuples(keys)), max_size=3)),
    op("update", st.dictionaries(keys, vals, max_size=3)),
    op("update", a=vals, b=vals),
    op("__ior__", st.lists(st.tuples(keys, vals), max_size=3)),
    op("#UPDATE_ITEM", keys, st.just(repr), vals, st.booleans()),
    op("get", keys), op("__getitem__", keys), op("__len__"), op("keys"), op("items"),
    op("__contains__", keys), op("copy"),
)

LIST_OPS = st.one_of(
    op("append", vals), op("extend", st.lists(vals, max_size=3)), op("extend", st.just(5)),
    op("__iadd__", st.lists(vals, max_size=3)), op("insert", small, vals),
    op("__setitem__", small, vals),
    op("__setitem__", st.builds(slice, st.none() | small, st.none() | small),
       st.lists(vals, max_size=3)),
    op("__setitem__", st.builds(slice, st.none(), st.none(), st.sampled_from([2, -1])),
       st.lists(vals, max_size=3)),
    op("__delitem__", small),
    op("__delitem__", st.builds(slice, st.none() | small, st.none() | small)),
    op("pop"), op("pop", small), op("remove", vals), op("reverse"), op("sort"),
    op("sort", reverse=st.booleans()), op("clear"), op("__imul__", st.integers(0, 2)),
    op("#UPDATE_ITEM", small, st.just(repr), vals, st.booleans()),
    op("__getitem__", small), op("__len__"), op("count", vals), op("index", vals),
    op("__contains__", vals),
)

SET_OPS = st.one_of(
    op("add", keys), op("add", unhashable), op("discard", keys), op("remove", keys),
    op("pop"), op("clear"),
    op("update", st.lists(keys, max_size=3)),
    op("update", st.lists(keys, max_size=2), st.lists(st.one_of(keys, unhashable), max_size=3)),
    op("difference_update", st.lists(keys, max_size=3)),
    op("difference_update", st.lists(st.one_of(keys, unhashable), max_size=3)),
    op("intersection_update", st.lists(keys, max_size=3)),
    op("symmetric_difference_update", st.lists(keys, max_size=3)),
    op("__ior__", st.sets(keys, max_size=3)), op("__ior__", st.lists(keys, max_size=2)),
    op("__iand__", st.sets(keys, max_size=3)), op("__isub__", st.sets(keys, max_size=3)),
    op("__ixor__", st.sets(keys, max_size=3)),
    op("__contains__", keys), op("__len__"), op("issubset", st.sets(keys, max_size=3)),
)

QUEUE_OPS = st.one_of(
    op("put_nowait", vals), op("put", vals, st.just(True), st.just(0.001)),
    op("put", vals, st.just(False)),
    op("get_nowait"), op("get", st.just(True), st.just(0.001)), op("task_done"),
    op("qsize"), op("empty"), op("full"),
)

NAMES = st.sampled_from(["a", "b", "c"])
NS_OPS = st.one_of(op("__setattr__", NAMES, vals), op("__delattr__", NAMES),
                   op("__getattribute__", NAMES))
VALUE_OPS = st.one_of(op("set", vals), op("get"))
ints = st.integers(-3, 3)
ARRAY_OPS = st.one_of(
    op("__setitem__", small, ints), op("__setitem__", small, st.just(2 ** 40)),
    op("__setitem__", small, st.just("x")),
    op("__setitem__", st.builds(slice, st.none() | small, st.none() | small),
       st.builds(lambda xs: array.array("i", xs), st.lists(ints, max_size=3))),
    op("__setitem__", st.builds(slice, st.none(), st.none(), st.just(2)),
       st.builds(lambda xs: array.array("i", xs), st.lists(ints, max_size=3))),
    op("__setitem__", st.builds(slice, st.none(), st.none()), st.lists(ints, max_size=2)),
    op("__delitem__", small), op("append", ints), op("extend", st.lists(ints, max_size=3)),
    op("pop"), op("reverse"), op("insert", small, ints), op("remove", ints),
    op("#UPDATE_ITEM", small, st.just(operator.neg), ints, st.booleans()),
    op("__getitem__", small), op("__len__"),
)

TYPES = {
    # typeid: (make live/reference object, creation args, ops, state)
    "dict": (lambda: {"a": 1}, (), DICT_OPS, lambda d: list(d.items())),
    "list": (lambda: [1, "x"], (), LIST_OPS, list),
    "set": (lambda: {1, "a"}, (), SET_OPS, lambda s: sorted(map(repr, s))),
    "Queue": (lambda: primitives.Queue(3), (3,), QUEUE_OPS,
              lambda q: (list(q.queue), q.unfinished_tasks)),
    "Namespace": (lambda: managers.Namespace(a=1), (), NS_OPS, lambda n: dict(vars(n))),
    "Value": (lambda: managers.Value("i", 7), ("i", 7), VALUE_OPS, lambda v: v.get()),
    "Array": (lambda: managers.Array("i", [1, 2, 3]), ("i", [1, 2, 3]), ARRAY_OPS,
              lambda a: (a.typecode, a.tolist())),
}


def _norm(x):
    if type(x).__name__ in ("dict_keys", "dict_items", "dict_values"):
        return list(x)
    return x


def _ref_call(typeid, ref, method, args, kwds, done):
    """The same call on the plain reference object."""
    if typeid == "set" and method == "pop" and done.ok:
        ref.remove(done.value)          # set.pop's choice is arbitrary: follow the live one
        return done.value
    if method == "#UPDATE_ITEM":
        key, func, default, use_default = args
        try:
            old = ref[key]
        except (KeyError, IndexError):
            if not use_default:
                raise
            old = default
        ref[key] = new = func(old)
        return new
    return getattr(ref, method)(*args, **kwds)


def _check_model(typeid, ops, compact_bytes, base):
    make, cargs, _, state = TYPES[typeid]
    path = tempfile.mkdtemp(dir=base)
    try:
        j = Journal(path, KEY, compact_bytes=compact_bytes)
        live, ref = make(), make()
        if typeid == "Queue":
            ref = queue.Queue(3)
        h = j.create("obj", typeid, live, args=cargs)
        outcomes = {}
        for n, (method, args, kwds) in enumerate(ops, 1):
            seq0 = h.seq
            done = h.call(method, args, kwds, client="c", request=n)
            j.wait(done.ticket, WAIT)
            try:
                rv, rok = _ref_call(typeid, ref, method, args, kwds, done), True
            except Exception as e:
                rv, rok = e, False
            assert done.ok == rok, (method, args, done, rv)
            if rok:
                assert _norm(done.value) == _norm(rv) or (rv is ref and done.value is live), \
                    (method, args, done.value, rv)
            else:
                assert type(done.value) is type(rv), (method, args, done.value, rv)
            assert state(live) == state(ref), (method, args)
            if h.seq != seq0:
                outcomes[n] = (method, args, kwds, done)
        expected = state(live)
        j.close()
        # recovery gives an equal object
        j, hs = reopen(path, compact_bytes=compact_bytes)
        try:
            h2 = hs["obj"]
            assert state(h2.obj) == expected
            # and every call that had an effect, re-sent, is answered, not re-run
            for n, (method, args, kwds, done) in outcomes.items():
                again = h2.call(method, args, kwds, client="c", request=n)
                j.wait(again.ticket, WAIT)
                assert again.ok == done.ok
                if done.ok and done.value is not live:
                    assert _norm(again.value) == _norm(done.value)
                elif done.ok:
                    assert again.value is h2.obj
                else:
                    assert type(again.value) is type(done.value)
            assert state(h2.obj) == expected
        finally:
            j.close()
        # the pure API: durable_apply's effects, replayed on a fresh copy, give the same
        a, b = make(), make()
        for method, args, kwds in ops:
            effects: list = []
            try:
                durable.durable_apply(a, typeid, method, args, kwds, effects=effects)
            except Exception:
                pass
            durable.replay(b, typeid, effects)
            assert state(a) == state(b), (method, args, effects)
        # and a whole state round-trips
        c = make()
        durable.restore(c, typeid, durable.state_of(a, typeid))
        assert state(c) == state(a)
    finally:
        shutil.rmtree(path, ignore_errors=True)


MODEL = settings(max_examples=40, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.mark.parametrize("typeid", sorted(TYPES))
def test_effects_replay_to_an_identical_object(typeid, tmp_path):
    @MODEL
    @given(ops=st.lists(TYPES[typeid][2], max_size=30),
           compact_bytes=st.sampled_from([1 << 20, 150]))
    def check(ops, compact_bytes):
        _check_model(typeid, ops, compact_bytes, tmp_path)

    check()


def test_joinable_queue_task_done_survives(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    q = primitives.Queue()
    h = j.create("q", "JoinableQueue", q)
    for i in range(3):
        call(j, h, "put", i, request=i + 1)
    assert call(j, h, "get", request=10) == 0
    call(j, h, "task_done", request=11)
    with pytest.raises(ValueError):
        for r in range(12, 20):
            call(j, h, "task_done", request=r)
    j.close()
    j, hs = reopen(tmp_path / "s")
    q2 = hs["q"].obj
    assert list(q2.queue) == [1, 2] and q2.unfinished_tasks == 0
    call(j, hs["q"], "put", 9, request=30)
    assert q2.unfinished_tasks == 1 and call(j, hs["q"], "get_nowait", request=31) == 1
    j.close()


def test_durable_queue_must_be_fifo():
    with pytest.raises(TypeError, match="FIFO"):
        durable.QueueKind().prepare(queue.LifoQueue(), None)


def test_unknown_effects_typeid():
    with pytest.raises(ValueError, match="has no effect journal"):
        durable.kind_for("Pool", "effects")
    with pytest.raises(ValueError, match="durable mode must be one of"):
        durable.kind_for("dict", "sometimes")


# -- user classes ----------------------------------------------------------------------------

def test_snapshot_mode_user_class(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    h = j.create("ctr", "Counter", Counter(5), args=(5,), mutators=("increment",))
    assert h.kind.mode == "snapshot"
    for r in range(1, 11):
        assert call(j, h, "increment", 2, request=r) == 5 + 2 * r
    t = h.last_ticket
    assert call(j, h, "value", request=99) == 25
    assert h.last_ticket == t                   # a read stages nothing
    rows = j.stats["rows"]
    j.close()
    assert rows == 10                           # one reply row a call, no effect rows
    j, hs = reopen(tmp_path / "s")
    h = hs["ctr"]
    assert h.obj.n == 25 and isinstance(h.obj, Counter)
    assert call(j, h, "increment", 2, request=3) == 11      # the stored reply, not re-run
    assert h.obj.n == 25
    assert call(j, h, "increment", 1, request=11) == 26
    j.close()


def test_snapshot_mode_default_mutators_is_every_method(tmp_path):
    with Journal(tmp_path / "s", KEY) as j:
        h = j.create("ctr", "Counter", Counter())
        call(j, h, "value", request=1)
        assert j.stats["rows"] == 1


def test_snapshot_mode_needs_a_picklable_object(tmp_path):
    with Journal(tmp_path / "s", KEY) as j:
        with pytest.raises(TypeError, match="cannot be pickled for its snapshots"):
            j.create("u", "Unpicklable", Unpicklable())
        assert j.names() == []


def test_journal_mode_user_class(tmp_path):
    j = Journal(tmp_path / "s", KEY, compact_bytes=300)
    h = j.create("det", "Det", Det(1), args=(1,), mode="journal", mutators=("add",))
    for r, x in enumerate([3, -1, 4, 5, -9, 2] * 5, 1):
        done = h.call("add", (x,), client="c", request=r)
        j.wait(done.ticket, WAIT)
        assert done.ok == (x >= 0)
    items = list(h.obj.items)
    assert j.stats["snapshots"] >= 2             # compacted (Det pickles)
    j.close()
    j, hs = reopen(tmp_path / "s", compact_bytes=300)
    assert hs["det"].obj.items == items
    j.close()


def test_journal_mode_call_that_raises_systemexit_is_journaled(tmp_path):
    """A method that changes the object and then raises SystemExit: a failed
    call whose reply is MethodRaisedExit (an EOFError), and its change is in
    the journal, so memory and a recovered object agree."""
    j = Journal(tmp_path / "s", KEY)
    h = j.create("det", "Det", Det(1), args=(1,), mode="journal", mutators=("add",))
    call(j, h, "add", 2, request=1)
    done = h.call("add", (0,), client="c1", request=2)
    j.wait(done.ticket, WAIT)
    assert not done.ok and isinstance(done.value, procshare.MethodRaisedExit)
    assert isinstance(done.value, EOFError) and "SystemExit(3)" in str(done.value)
    call(j, h, "add", 4, request=3)
    assert h.obj.items == [1, 2, "zero", 4]
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert hs["det"].obj.items == [1, 2, "zero", 4]
    j.close()


def test_journal_mode_replays_calls_and_detects_nondeterminism(tmp_path):
    Flaky.runs = 0
    j = Journal(tmp_path / "s", KEY)
    h = j.create("f", "Flaky", Flaky(), mode="journal")
    call(j, h, "bump", request=1)
    j.close()
    j = Journal(tmp_path / "s", KEY)
    try:
        with pytest.raises(JournalError, match="not deterministic"):
            j.recover(lambda typeid, a, k: Flaky())
    finally:
        j.close()


class GrowsALock:
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n

    def spoil(self) -> None:
        self.lock = threading.Lock()


def test_a_change_that_cannot_be_journaled_stops_the_object(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    d = j.create("d", "dict", {})
    g = j.create("g", "GrowsALock", GrowsALock())
    q = j.create("q", "Queue", primitives.Queue())
    call(j, d, "__setitem__", "a", 1, request=1)
    call(j, g, "bump", request=2)
    call(j, q, "put", 1, request=3)
    for h, method, args in [(d, "__setitem__", ("f", lambda: 0)), (g, "spoil", ()),
                            (q, "put", (lambda: 0,))]:
        done = h.call(method, args, None, "c1", 10)
        assert not done.ok and isinstance(done.value, NotJournalable), (h, done)
        assert "in memory only" in str(done.value) and "restart" in str(done.value)
        again = h.call(method, args, None, "c1", 11)     # refused from now on
        assert not again.ok and again.value is done.value
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert hs["d"].obj == {"a": 1} and hs["g"].obj.n == 1 and list(hs["q"].obj.queue) == [1]
    j.close()


# -- exactly once ----------------------------------------------------------------------------

def test_resent_call_is_answered_not_applied(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    h = j.create("l", "list", [])
    assert call(j, h, "append", "x", client="A", request=1) is None
    assert call(j, h, "append", "x", client="A", request=1) is None
    assert call(j, h, "append", "y", client="B", request=1) is None   # another client
    assert h.obj == ["x", "y"]
    assert call(j, h, "pop", client="A", request=2) == "y"
    assert call(j, h, "pop", client="A", request=2) == "y"            # same reply again
    assert h.obj == ["x"]
    assert j.lookup_reply("A", 2) == (True, "y")
    # a failing call with no effect stores nothing: re-sent, it runs again
    with pytest.raises(ValueError):
        call(j, h, "remove", "zz", client="A", request=3)
    assert j.lookup_reply("A", 3) is None
    j.close()
    j, hs = reopen(tmp_path / "s")
    h = hs["l"]
    assert call(j, h, "pop", client="A", request=2) == "y"
    assert call(j, h, "append", "x", client="A", request=1) is None
    assert h.obj == ["x"]
    assert j.lookup_reply("A", 2) == (True, "y")
    j.close()


def test_in_place_operator_reply_is_the_object(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    h = j.create("d", "dict", {})
    assert call(j, h, "__ior__", {"a": 1}, request=1) is h.obj
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert call(j, hs["d"], "__ior__", {"a": 2}, request=1) is hs["d"].obj
    assert j.lookup_reply("c1", 1) == (True, hs["d"].obj)
    assert hs["d"].obj == {"a": 1}
    j.close()


def test_stored_replies_are_bounded_per_client(tmp_path):
    j = Journal(tmp_path / "s", KEY, keep_replies=4)
    h = j.create("d", "dict", {})
    for r in range(1, 11):
        call(j, h, "__setitem__", r, r, client="A", request=r)
        call(j, h, "__setitem__", -r, r, client="B", request=r)
    j.flush(WAIT)
    assert [r for r in range(1, 11) if j.lookup_reply("A", r)] == [7, 8, 9, 10]
    j.forget_client("A")
    j.flush(WAIT)
    assert not any(j.lookup_reply("A", r) for r in range(1, 11))
    assert [r for r in range(1, 11) if j.lookup_reply("B", r)] == [7, 8, 9, 10]
    j.close()
    j, _ = reopen(tmp_path / "s", keep_replies=4)
    assert not any(j.lookup_reply("A", r) for r in range(1, 11))
    assert [r for r in range(1, 11) if j.lookup_reply("B", r)] == [7, 8, 9, 10]
    j.close()


def test_who_a_client_is_is_kept_with_its_replies(tmp_path):
    """`identify` is asked once, at a client's first stored reply; its answer
    is committed with it, survives a reopen, goes with `forget_client`, and is
    HMAC-checked.  A client that `identify` does not know (None, or an error)
    just has no identity."""
    asked = []

    def identify(client):
        asked.append(client)
        if client == "C":
            raise RuntimeError("no idea")
        return None if client == "B" else f"who is {client}"

    path = tmp_path / "s"
    j = Journal(path, KEY, identify=identify)
    h = j.create("d", "dict", {})
    for r in range(1, 4):
        for c in "ABC":
            call(j, h, "__setitem__", c, r, client=c, request=r)
    call(j, h, "get", "A", client="D", request=1)     # no effect: no reply stored
    assert asked == ["A", "B", "C"]
    assert [j.client_ident(c) for c in "ABCD"] == ["who is A", None, None, None]
    j.close()
    j, _ = reopen(path, identify=identify)
    assert j.client_ident("A") == "who is A" and asked == ["A", "B", "C"]
    call(j, h := j.get("d"), "__setitem__", "A", 9, client="A", request=4)
    assert asked == ["A", "B", "C"]          # known already
    j.forget_client("A")
    call(j, h, "__setitem__", "E", 1, client="E", request=1)   # a commit with the forget
    assert j.client_ident("A") is None and j.client_ident("E") == "who is E"
    j.close()
    with _db(path) as db:
        assert sorted(db.execute("SELECT client FROM clients")) == [("E",)]
        db.execute("UPDATE clients SET ident='who is F' WHERE client='E'")
    with pytest.raises(JournalTampered, match="the identity record of client 'E'"):
        Journal(path, KEY)


def test_a_client_forgotten_and_back_in_one_commit_keeps_its_identity(tmp_path):
    """A forget and the same client's next stored reply planned in one commit
    (in either order): the identity row ends as the index says."""
    path = tmp_path / "s"
    j = Journal(path, KEY, identify=lambda c: f"who is {c}")
    h = j.create("d", "dict", {})
    call(j, h, "__setitem__", "k", 1, client="A", request=1)
    with j._mu:         # nothing commits meanwhile: the next three go in one commit
        j._leading = True
    try:
        j.forget_client("A")
        t1 = h.call("__setitem__", ("k", 2), {}, client="A", request=2).ticket
        j.forget_client("A")
        j.forget_client("B")
        t2 = h.call("__setitem__", ("k", 3), {}, client="B", request=1).ticket
    finally:
        with j._mu:
            j._leading = False
    j.wait(max(t1, t2), WAIT)
    assert j.client_ident("A") is None and j.client_ident("B") == "who is B"
    j.close()
    with _db(path) as db:
        assert sorted(db.execute("SELECT client FROM clients")) == [("B",)]
    j = Journal(path, KEY)
    assert j.clients() == ["B"] and j.client_ident("B") == "who is B"
    j.close()


def test_a_drop_and_a_new_row_in_one_commit(tmp_path):
    """A dropped object's rows and a new row of another object in one group
    commit (the drop of an unnamed object is staged, not waited for): the new
    row got the id of the dropped object's last row, and the commit failed
    (UNIQUE constraint), breaking the journal."""
    j = Journal(tmp_path / "s", KEY)
    a = j.create("a", "list", [])
    b = j.create("b", "dict", {})
    call(j, a, "append", 1, request=1)
    j.drop("a")
    assert call(j, b, "__setitem__", "k", 2, request=2) is None
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert sorted(hs) == ["b"] and hs["b"].obj == {"k": 2}
    j.close()


def test_the_journal_pickler_is_reused_after_a_failure():
    from procshare.server.durables import journal_dumps
    with pytest.raises(TypeError):
        journal_dumps([1, threading.Lock()])
    assert pickle.loads(journal_dumps([("set", "k", 1)])) == [("set", "k", 1)]
    big = b"x" * (3 << 20)                  # a buffer this large is not kept
    assert pickle.loads(journal_dumps(big)) == big
    assert pickle.loads(journal_dumps({"a": 1})) == {"a": 1}


def test_rows_are_deleted_by_runs_and_only_those():
    assert journal._runs([]) == []
    assert journal._runs([7, 3, 5, 4, 10, 3, 11]) == [(3, 5), (7, 7), (10, 11)]


def test_a_compaction_deletes_around_the_rows_still_needed(tmp_path):
    """Rows go in runs (`DELETE ... BETWEEN`); a row whose reply is still
    kept sits between deleted ones and stays, in memory and in the file."""
    j = Journal(tmp_path / "s", KEY, keep_replies=2, compact_bytes=1)
    h = j.create("d", "dict", {})
    for r in range(1, 41):
        call(j, h, "__setitem__", r, r, client="A", request=r)
        if r % 10 == 0:     # B calls now and then: its rows sit among A's
            call(j, h, "__setitem__", -r, r, client="B", request=r)
    j.flush(WAIT)
    assert j.stats["deleted"] > 30
    kept = {(c, r) for c, r in j._db.execute("SELECT client, request FROM log")
            if c is not None}
    assert {("A", 39), ("A", 40), ("B", 30), ("B", 40)} <= kept      # still needed
    assert len(kept) <= 6, kept     # at most the last evictions wait for the next delete
    j.close()
    j, hs = reopen(tmp_path / "s", keep_replies=2)
    assert [r for r in range(1, 41) if j.lookup_reply("A", r)] == [39, 40]
    assert [r for r in range(1, 41) if j.lookup_reply("B", r)] == [30, 40]
    assert hs["d"].obj == {**{r: r for r in range(1, 41)}, **{-r: r for r in (10, 20, 30, 40)}}
    j.close()


def test_resent_call_still_running_waits_for_the_first(tmp_path):
    """A re-sent blocking get waits for the original and gets its item: the
    queue gives the item once."""
    j = Journal(tmp_path / "s", KEY)
    q = primitives.Queue()
    h = j.create("q", "Queue", q)
    got = []

    def first():
        done = h.call("get", (True, 5.0), client="A", request=7)
        j.wait(done.ticket, WAIT)
        got.append(("first", done))

    t = threading.Thread(target=first)
    t.start()
    # the first get is blocked in the queue (waiting on its condition)
    _until(lambda: ("A", 7) in j._running and len(q.not_empty._waiters) == 1,
           "the first get never blocked in the queue")
    dup = threading.Thread(target=lambda: got.append(
        ("dup", h.call("get", (True, 5.0), client="A", request=7, timeout=5.0))))
    dup.start()
    _until(lambda: j._running_waiters == 1, "the re-sent get never waited for the first")
    call(j, h, "put", "item", client="B", request=1)
    t.join(WAIT)
    dup.join(WAIT)
    assert not t.is_alive() and not dup.is_alive()
    values = {who: done.value for who, done in got}
    assert values == {"first": "item", "dup": "item"}
    assert q.qsize() == 0
    j.close()


# -- group commit, failures ------------------------------------------------------------------

def _writers(j, h, nthreads, per, lock):
    errors = []

    def work(w):
        try:
            for i in range(per):
                with lock:
                    done = h.call("__setitem__", (f"{w}-{i}", i), client=f"c{w}", request=i + 1)
                j.wait(done.ticket, WAIT)
                assert done.ok
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


def _count_sql_commits(j) -> list:
    """Count real SQLite commits: explicit COMMITs and autocommit INSERTs."""
    seen = []

    def trace(sql):
        s = sql.lstrip().upper()
        if s.startswith("COMMIT") or (s.startswith("INSERT INTO LOG")
                                      and not j._db.in_transaction):
            seen.append(s[:6])

    j._db.set_trace_callback(trace)
    return seen


def test_group_commit_groups(tmp_path):
    """4 threads x 200 writes share commits.  fsync="full" makes each commit
    wait for the disk (GIL released), as group commit is for; about 2 writes
    a commit here, even with the CPUs busy."""
    j = Journal(tmp_path / "s", KEY, fsync="full")
    h = j.create("d", "dict", {})
    h.sync(WAIT)
    commits = _count_sql_commits(j)
    c0 = j.stats["commits"]
    _writers(j, h, 4, 200, threading.Lock())
    n = j.stats["commits"] - c0
    assert len(h.obj) == 800
    assert n < 800, n
    assert len(commits) == n
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert len(hs["d"].obj) == 800
    j.close()


def test_group_commit_with_a_slow_disk(tmp_path):
    """With 2 ms commits (a slow disk), 4 writers share nearly every commit."""
    j = Journal(tmp_path / "s", KEY)
    h = j.create("d", "dict", {})
    h.sync(WAIT)
    write = j._write

    def slow_write(*a):
        time.sleep(0.002)
        write(*a)

    j._write = slow_write
    c0 = j.stats["commits"]
    _writers(j, h, 4, 100, threading.Lock())
    n = j.stats["commits"] - c0
    assert n <= 400 / 2, n
    j.close()


def test_failed_commit_breaks_the_journal(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    h = j.create("d", "dict", {})
    h.sync(WAIT)

    def broken(*a):
        raise sqlite3.OperationalError("disk I/O error")

    j._write = broken
    done = h.call("__setitem__", ("a", 1), client="c", request=1)
    with pytest.raises(JournalBroken, match="disk I/O error"):
        j.wait(done.ticket, WAIT)
    with pytest.raises(JournalBroken):
        h.call("__setitem__", ("b", 1), client="c", request=2)
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert hs["d"].obj == {}                   # memory was ahead; the file is the truth
    j.close()


def _gated(tmp_path):
    """A journal with a dict whose commits wait for `release` (set it to let
    them through); `write` is the journal's own."""
    j = Journal(tmp_path / "s", KEY)
    h = j.create("d", "dict", {})
    h.sync(WAIT)
    release = threading.Event()
    write = j._write

    def gated(*a):
        release.wait(WAIT)
        write(*a)

    j._write = gated
    return j, h, release, write


def test_wait_is_bounded(tmp_path):
    j, h, release, write = _gated(tmp_path)
    d1 = h.call("__setitem__", ("a", 1))
    leader = threading.Thread(target=j.wait, args=(d1.ticket, WAIT))
    leader.start()
    _until(lambda: j._leading, "the first commit never started")
    d2 = h.call("__setitem__", ("b", 1))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        j.wait(d2.ticket, 0.2)
    assert time.monotonic() - t0 < 2
    release.set()
    leader.join(WAIT)
    j._write = write
    j.close()                                   # commits b too
    j, hs = reopen(tmp_path / "s")
    assert hs["d"].obj == {"a": 1, "b": 1}
    j.close()


def _until(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_a_commit_wakes_the_waiters_it_covers_and_one_to_lead(tmp_path, monkeypatch):
    """Waiters sleep on locks of their own.  A waiter woken to lead the next
    commit that is interrupted instead passes the lead on: the others do not
    sleep until their timeout."""
    from procshare.server import journal as jmod
    j, h, release, write = _gated(tmp_path)

    class Interrupted(Exception):
        pass

    class Fragile:
        """A waiter's lock whose wakeup is interrupted (as by a signal)."""

        def __init__(self):
            self.lock = threading.Lock()
            self.release = self.lock.release
            self.taken = 0

        def acquire(self, blocking=True, timeout=-1):
            got = self.lock.acquire(blocking, timeout)
            self.taken += 1
            if got and self.taken == 2:     # the first is taken before sleeping
                raise Interrupted("woken, then interrupted")
            return got

    real = jmod._allocate_lock
    monkeypatch.setattr(jmod, "_allocate_lock",
                        lambda: Fragile() if threading.current_thread().name == "fragile"
                        else real())
    d1 = h.call("__setitem__", ("a", 1))
    leader = threading.Thread(target=j.wait, args=(d1.ticket, WAIT))
    leader.start()
    _until(lambda: j._leading, "the first commit never started")
    d2 = h.call("__setitem__", ("b", 2))
    d3 = h.call("__setitem__", ("c", 3))
    got: dict = {}

    def waiter(name, ticket):
        t0 = time.monotonic()
        try:
            j.wait(ticket, WAIT)
            got[name] = time.monotonic() - t0
        except BaseException as e:
            got[name] = e

    fragile = threading.Thread(target=waiter, args=("fragile", d2.ticket), name="fragile")
    fragile.start()
    _until(lambda: len(j._waiters) == 1, "the first waiter never slept")
    other = threading.Thread(target=waiter, args=("other", d3.ticket), name="other")
    other.start()
    _until(lambda: len(j._waiters) == 2, "the second waiter never slept")
    release.set()       # the first commit covers neither: the first of them is woken to lead
    for t in (leader, fragile, other):
        t.join(WAIT + 5)
    assert isinstance(got["fragile"], Interrupted)
    assert got["other"] < WAIT / 2, got             # led at once, not after its timeout
    assert j._done >= d3.ticket and not j._waiters
    j._write = write
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert hs["d"].obj == {"a": 1, "b": 2, "c": 3}
    j.close()


def test_wait_for_a_ticket_never_issued(tmp_path):
    with Journal(tmp_path / "s", KEY) as j:
        with pytest.raises(ValueError):
            j.wait(99, 1)


# -- objects: names, drop, compaction --------------------------------------------------------

def test_reattach_by_name_and_drop(tmp_path):
    j = Journal(tmp_path / "s", KEY)
    call(j, j.create("results", "dict", {}), "__setitem__", "a", 1, request=1)
    with pytest.raises(ValueError, match="exists already"):
        j.create("results", "dict", {})
    j.create("tmp", "list", [1])
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert sorted(hs) == ["results", "tmp"] == j.names()
    assert j.get("results").obj == {"a": 1}
    j.wait(j.drop("tmp"), WAIT)
    h = j.create("tmp", "set", {3})             # the name is free again: a new object
    call(j, h, "add", 4, request=2)
    j.close()
    j, hs = reopen(tmp_path / "s")
    assert hs["tmp"].obj == {3, 4} and hs["results"].obj == {"a": 1}
    with pytest.raises(KeyError):
        j.drop("nothing")
    j.close()


@pytest.mark.parametrize("typeid,make,method,argf", [
    ("dict", dict, "__setitem__", lambda i: (i % 50, "v" * (i % 7))),
    ("list", list, "append", lambda i: (i,)),
    ("Queue", primitives.Queue, "put", lambda i: (i,)),
])
def test_compaction_keeps_state_and_bounds_the_log(tmp_path, typeid, make, method, argf):
    j = Journal(tmp_path / "s", KEY, compact_bytes=2000, keep_replies=8)
    h = j.create("o", typeid, make())
    for i in range(1500):
        call(j, h, method, *argf(i), client=f"c{i % 3}", request=i + 1)
        if typeid == "Queue" and i % 3 == 2:
            call(j, h, "get_nowait", client="g", request=i + 1)
    state = (list(h.obj.queue) if typeid == "Queue" else
             list(h.obj.items()) if typeid == "dict" else list(h.obj))
    assert j.stats["snapshots"] >= 5
    j.close()
    with _db(tmp_path / "s") as db:
        rows, = db.execute("SELECT count(*) FROM log").fetchone()
    assert rows < 700, rows                     # bounded, not 1500+
    j, hs = reopen(tmp_path / "s", compact_bytes=2000, keep_replies=8)
    o = hs["o"].obj
    assert (list(o.queue) if typeid == "Queue" else
            list(o.items()) if typeid == "dict" else list(o)) == state
    # replies kept across compaction: the last calls of each client are still answered
    assert j.lookup_reply("c2", 1500) == (True, None)
    j.close()


# -- a writer SIGKILLed at random moments ----------------------------------------------------

CHILD = r"""
import itertools, os, sys, threading
from procshare.server import primitives
from procshare.server.journal import Journal
state, run, key = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
j = Journal(state, key, compact_bytes=4000)
makers = {"list": list, "dict": dict, "Queue": primitives.Queue}
hs = j.recover(lambda typeid, a, k: makers[typeid](*a, **k))
if not hs:
    hs = {"L": j.create("L", "list", []), "D": j.create("D", "dict", {}),
          "Q": j.create("Q", "Queue", primitives.Queue())}
    j.flush(10)
L, D, Q = hs["L"], hs["D"], hs["Q"]
out = threading.Lock()
locks = {"L": threading.Lock(), "D": threading.Lock()}

def ack(line):
    with out:
        os.write(1, (line + "\n").encode())

def work(t):
    client = f"{run}-{t}"
    for i in itertools.count(1):
        with locks["L"]:
            done = L.call("append", ((run, t, i),), None, client, 4 * i)
        j.wait(done.ticket, 10)
        ack(f"L {t} {i}")
        with locks["D"]:
            done = D.call("__setitem__", (f"{run}-{t}-{i}", i), None, client, 4 * i + 1)
        j.wait(done.ticket, 10)
        ack(f"D {t} {i}")
        done = Q.call("put", ((run, t, i),), None, client, 4 * i + 2)
        j.wait(done.ticket, 10)
        ack(f"Q {t} {i}")
        done = Q.call("get_nowait", (), None, client, 4 * i + 3)
        j.wait(done.ticket, 10)
        ack(f"G {t} {i} {done.value!r}" if done.ok else f"E {t} {i}")

ack("ready")
threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(3)]
for th in threads:
    th.start()
threading.Event().wait(30)
"""


def _run_child_and_kill(path, run, rng) -> list[str]:
    from _workers import subprocess_env
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), run, KEY.hex()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    lines: list[str] = []
    enough = threading.Event()

    def read():
        for raw in p.stdout:
            lines.append(raw.decode().rstrip("\n"))
            if len(lines) >= 40:
                enough.set()
        enough.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert enough.wait(20), f"the child wrote {lines[:5]}; stderr: {p.stderr.read()!r}"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        reader.join(10)
        p.stdout.close()
        p.stderr.close()
    assert lines and lines[0] == "ready", lines[:3]
    return lines[1:]


NEXT = {"L": "D", "D": "Q", "Q": "G", "G": "L"}


def test_sigkilled_writer_loses_no_acknowledged_write(tmp_path):
    """A child writes through 3 threads (append, set, put, get_nowait, in turn)
    and prints an ack only after each commit; it is SIGKILLed at a random
    moment, 3 times over the same state dir.  Every acked write is there,
    exactly once.  Then each thread's call in flight at the kill (and its last
    acked one) is re-sent, as a reconnecting proxy does: each call has taken
    effect exactly once, and no queue item is lost or delivered twice."""
    path = tmp_path / "state"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    all_puts: set = set()
    all_gets: list = []
    for run in ("r1", "r2", "r3"):
        acks = _run_child_and_kill(path, run, rng)
        acked = {k: set() for k in "LDQ"}
        got: dict = {}
        last: dict[int, tuple[str, int]] = {}
        for line in acks:
            kind, t, i, *rest = line.split(" ", 3)
            t, i = int(t), int(i)
            kind = "G" if kind == "E" else kind
            last[t] = (kind, i)
            if kind in acked:
                acked[kind].add((run, t, i))
            elif rest:
                got[(t, i)] = eval(rest[0])     # the repr of a (str, int, int) tuple
        assert sum(map(len, acked.values())) > 0
        j, hs = reopen(path)
        try:
            L, D, Q = hs["L"], hs["D"], hs["Q"]
            mine = [x for x in L.obj if x[0] == run]
            assert len(mine) == len(set(mine)), "an append was applied twice"
            assert acked["L"] <= set(mine), "an acknowledged append was lost"
            for (_, t, i) in acked["D"]:
                assert D.obj[f"{run}-{t}-{i}"] == i, "an acknowledged set was lost"
            queued = list(Q.obj.queue)
            assert len(queued) == len(set(queued)), "a queue item is there twice"
            assert not (set(got.values()) & set(queued)), "a delivered item is still queued"
            all_puts |= acked["Q"]
            all_gets.extend(got.values())
            # re-send each thread's last acked call and the call in flight
            for t in range(3):
                client = f"{run}-{t}"
                kind, i = last.get(t, ("G", 0))
                nxt = NEXT[kind]
                todo = [(nxt, i + 1 if nxt == "L" else i)]     # the call in flight
                if i and (kind != "G" or (t, i) in got):
                    todo.insert(0, (kind, i))   # the last acked one had an effect: re-send

                for kind, i in todo:
                    if kind == "L":
                        call(j, L, "append", (run, t, i), client=client, request=4 * i)
                    elif kind == "D":
                        call(j, D, "__setitem__", f"{run}-{t}-{i}", i, client=client,
                             request=4 * i + 1)
                    elif kind == "Q":
                        call(j, Q, "put", (run, t, i), client=client, request=4 * i + 2)
                        all_puts.add((run, t, i))
                    else:
                        done = Q.call("get_nowait", (), None, client, 4 * i + 3)
                        j.wait(done.ticket, WAIT)
                        if (t, i) in got:
                            assert done.ok and done.value == got[(t, i)], \
                                "a re-sent get was answered differently"
                        elif done.ok:
                            all_gets.append(done.value)
                # now every append up to the one in flight is there, once
                n = todo[-1][1]
                assert sorted(x for x in L.obj if x[:2] == (run, t)) == \
                    [(run, t, k) for k in range(1, n + 1)], "not exactly once after re-sending"
            assert len(all_gets) == len(set(all_gets)), "an item was delivered twice"
            assert sorted(all_gets + list(Q.obj.queue)) == sorted(all_puts), \
                "queue items lost or duplicated"
        finally:
            j.close()


# -- the benchmark ---------------------------------------------------------------------------

def test_benchmark_runs():
    r = benchmark("normal", writers=2, writes=200)
    assert r["writes"] == 200 and r["commits"] >= 1 and r["us_per_write"] > 0


def _rpc_client(conn, calls: int) -> None:
    conn.recv()                                 # start
    for i in range(calls):
        conn.send(("__setitem__", (i % 100, i), i + 1))
        conn.recv()
    conn.close()


def _rpc_once(clients: int, durable_: bool, fsync: str, calls: int) -> float:
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    d = private_state_dir()
    j = Journal(d, KEY, fsync=fsync) if durable_ else None
    obj: dict = {}
    h = j.create("d", "dict", obj) if j else None
    if h:
        h.sync(WAIT)
    lock = threading.Lock()
    pairs = [ctx.Pipe() for _ in range(clients)]
    procs = [ctx.Process(target=_rpc_client, args=(b, calls)) for _, b in pairs]
    for p in procs:
        p.start()

    def serve(conn, w):
        client = f"client-{w}"
        while True:
            try:
                meth, args, rid = conn.recv()
            except EOFError:
                return
            with lock:
                if h is None:
                    getattr(obj, meth)(*args)
                    done = None
                else:
                    done = h.call(meth, args, None, client, rid)
            if done is not None:
                j.wait(done.ticket, WAIT)
            conn.send(None)

    threads = [threading.Thread(target=serve, args=(a, w)) for w, (a, _) in enumerate(pairs)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    for a, _ in pairs:
        a.send("go")
    for p in procs:
        p.join(120)
    dt = time.perf_counter() - t0
    for _, b in pairs:
        b.close()
    for t in threads:
        t.join(WAIT)
    for a, _ in pairs:
        a.close()
    if j:
        j.close()
    remove_private_state_dir(d)
    return dt / (clients * calls) * 1e6


def rpc_benchmark(clients: int, durable_: bool, fsync: str = "normal", calls: int = 2000,
                  repeat: int = 3) -> float:
    """Microseconds per call, as throughput, for `clients` processes each
    making `calls` dict sets over a pipe to a server thread of their own: a
    manager's shape (receive, lock, apply, release, commit, reply) without its
    framing.  The best of `repeat` runs.  Not a test: ``python tests/test_journal.py``."""
    return min(_rpc_once(clients, durable_, fsync, calls) for _ in range(repeat))


def _report() -> None:      # python tests/test_journal.py
    for fsync in ("normal", "full"):
        for writers in (1, 4):
            r = min((benchmark(fsync, writers, 4000 if fsync == "normal" else 1000)
                     for _ in range(3)), key=lambda r: r["us_per_write"])
            print(f"journal alone, fsync={fsync:6} writers={writers}: "
                  f"{r['us_per_write']:6.1f} us per committed write, "
                  f"{r['writes_per_commit']:.2f} writes per commit "
                  f"(no journal: {r['us_per_write_plain']:.2f} us)")
    for clients in (1, 4):
        plain = rpc_benchmark(clients, False)
        for fsync in ("normal", "full"):
            dur = rpc_benchmark(clients, True, fsync, 2000 if fsync == "normal" else 500)
            print(f"rpc, {clients} client(s), fsync={fsync:6}: durable {dur:6.1f} us/call, "
                  f"plain {plain:5.1f} us/call: {dur / plain:.2f}x the time, "
                  f"{plain / dur:.0%} of the throughput")


if __name__ == "__main__":
    _report()
