"""Every error path of issue 3 (except timeouts, see test_timeouts.py): the
error's classes, and the facts its message must carry.

Real manager processes, fork and spawn where the start method matters, and
bounded waits everywhere (a crash must be reported within a second, never as a
hang).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import _error_workers as ew
import procshare
from _helpers import FAULT_START_METHODS, poll
from _workers import subprocess_env
from procshare import errors
from procshare.errors import (
    ArgumentsNotDeserializable,
    ArgumentsNotSerializable,
    LocalObjectNotSerializable,
    ManagerConnectionRefused,
    ManagerCrashed,
    ManagerSocketMissing,
    MessageTooLarge,
    NotExposedError,
    ProcessLocalNotSerializable,
    RemoteError,
    ResultNotSerializable,
    SerializationError,
)


@pytest.fixture(params=FAULT_START_METHODS)
def box_manager(request):
    m = ew.BoxManager(ctx=multiprocessing.get_context(request.param), restart="never")
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


@pytest.fixture
def sync_manager():
    m = procshare.SyncManager(restart="never")
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


# -- serialization: arguments -------------------------------------------------------------

def test_unserializable_argument_names_method_path_and_serializer(sync_manager):
    d = sync_manager.dict()
    conn_before = d._procshare_session.thread_conn()
    with pytest.raises(SerializationError) as info:
        d["job"] = {"size": 3, "cfg": ["fast", threading.Lock()]}
    e = info.value
    text = str(e)
    assert f"__setitem__() on 'dict' object {d._id} " in text     # what the object is
    assert "args[1]['cfg'][1] -> <_thread.lock object>" in text
    assert "'pickle'" in text and "arguments" in text
    assert "Nothing was sent" in text
    assert "manager.Lock()" in text                       # the fix for a lock
    assert (e.method, e.direction, e.path, e.serializer) == (
        "__setitem__", "arguments", "args[1]['cfg'][1]", "pickle")
    assert e.culprit == "<_thread.lock object>"
    # what the stdlib raises here, so old except clauses keep working
    assert isinstance(e, TypeError) and isinstance(e, pickle.PicklingError)
    assert isinstance(e, ArgumentsNotSerializable)
    assert e.__cause__ is None
    # nothing was sent: the same connection serves the next call, and the dict is untouched
    assert d._procshare_session.thread_conn() is conn_before and not conn_before.pending
    assert "job" not in d
    d["job"] = {"size": 3}
    assert d["job"] == {"size": 3}


def test_unserializable_keyword_argument_and_nested_object(box_manager):
    box = box_manager.Box()
    holder = ew.Box(1, 2)
    holder.callback = threading.RLock()
    with pytest.raises(SerializationError) as info:
        box._callmethod("put", (), {"x": [0, holder]})
    assert "kwds['x'][1].callback -> <_thread.RLock object>" in str(info.value)
    with pytest.raises(SerializationError, match=rf"put\(\) on 'Box' object {box._id} "):
        procshare.async_(box).put(holder)
    assert box.size() == 0


@pytest.mark.skipif(not procshare.serializers.available_serializers().count("cloudpickle"),
                    reason="cloudpickle is not installed")
def test_lambda_argument_suggests_an_installed_serializer(box_manager):
    box = box_manager.Box()
    with pytest.raises(ArgumentsNotSerializable) as info:
        box.put(lambda: 1)
    e = info.value
    assert "put()" in str(e) and "args[0] -> <function " in str(e)
    assert "cloudpickle" in e.alternatives
    assert "serializer='cloudpickle'" in str(e)
    assert isinstance(e, pickle.PicklingError)        # pickle's own error for a lambda

    def local():
        pass
    with pytest.raises(SerializationError) as info:
        box.put(local)
    assert "local" in str(info.value)
    # before Python 3.14 pickle raises AttributeError for local objects
    if sys.version_info < (3, 14):
        assert isinstance(info.value, LocalObjectNotSerializable)
        assert isinstance(info.value, AttributeError)
    assert box.size() == 0


def test_multiprocessing_lock_argument_is_a_runtime_error_with_advice(sync_manager):
    lst = sync_manager.list()
    with pytest.raises(ProcessLocalNotSerializable) as info:
        lst.append(multiprocessing.Lock())
    e = info.value
    assert isinstance(e, RuntimeError)                 # what the stdlib raises here
    assert "args[0] -> <multiprocessing.synchronize.Lock object>" in str(e)
    assert "manager.Lock()" in str(e)
    assert e.alternatives == []                        # copying a lock is never the answer
    assert lst[:] == []


def test_arguments_of_create_are_diagnosed(box_manager):
    with pytest.raises(SerializationError) as info:
        box_manager.Box(1, threading.Lock())
    assert "Box() (creating a shared object)" in str(info.value)
    assert "args[1] -> <_thread.lock object>" in str(info.value)


def test_argument_the_manager_cannot_import(box_manager):
    ghost = type("Ghost", (), {"__module__": "_error_workers"})
    ew.Ghost = ghost              # exists in this process only, not in the manager
    try:
        box = box_manager.Box()
        with pytest.raises(ArgumentsNotDeserializable) as info:
            box.put(ghost())
    finally:
        del ew.Ghost
    e = info.value
    assert isinstance(e, SerializationError) and isinstance(e, RemoteError)
    text = str(e)
    assert text.startswith("put(): ") and "Ghost" in text
    assert "did not run" in text and "module level" in text
    assert e.direction == "arguments"
    assert box.size() == 0                             # and the connection still works


# -- serialization: results -----------------------------------------------------------------

def test_unserializable_result_is_a_remote_error_and_the_next_call_works(box_manager):
    box = box_manager.Box()
    with pytest.raises(ResultNotSerializable) as info:
        box.with_lock()
    e = info.value
    assert isinstance(e, RemoteError)                  # the stdlib raises RemoteError here
    assert isinstance(e, SerializationError) and isinstance(e, TypeError)
    text = str(e)
    assert "with_lock()" in text and "'Box'" in text
    assert "result['lock'] -> <_thread.lock object>" in text
    assert "'pickle'" in text and "did run" in text
    assert (e.direction, e.path, e.serializer) == ("result", "result['lock']", "pickle")
    assert box.put(5) == 1 and box.get(0) == 5         # the connection stays usable
    with pytest.raises(ResultNotSerializable) as info:
        box.a_lambda(3)
    assert "result -> <function Box.a_lambda.<locals>.<lambda>>" in str(info.value)
    assert box.size() == 1


# -- size limits ----------------------------------------------------------------------------

def test_a_call_over_the_managers_message_limit_is_refused_before_it_is_sent():
    m = procshare.SyncManager(restart="never", max_message_bytes=1 << 20)
    m.start()
    try:
        d = m.dict()
        d["k"] = b"small"
        conn_before = d._procshare_session.thread_conn()
        for big in (b"x" * (3 << 20), "y" * (2 << 20)):     # out-of-band, and in-band
            with pytest.raises(MessageTooLarge) as info:
                d["k"] = big
            e = info.value
            text = str(e)
            assert isinstance(e, ValueError)
            assert f"__setitem__() on 'dict' object {d._id} " in text
            assert repr(m.address) in text
            assert "over the 1048576-byte limit" in text and "max_message_bytes=" in text
            assert f"args[1] (<{type(big).__name__} object>, " in text
            assert "was not sent" in text
            assert (e.method, e.address, e.path) == ("__setitem__", m.address, "args[1]")
            assert e.size > 1 << 20
        # nothing was sent: the same connection serves the next call
        assert d._procshare_session.thread_conn() is conn_before and not conn_before.pending
        assert d["k"] == b"small"
        with pytest.raises(MessageTooLarge, match=r"__setitem__\(\) on 'dict' object"):
            procshare.async_(d).__setitem__("k", b"x" * (3 << 20))
        assert procshare.async_(d).get("k").result(timeout=10) == b"small"
        with pytest.raises(MessageTooLarge, match=r"list\(\) \(creating a shared object\)"):
            m.list(list(range(400_000)))
        # what the manager sends back is not bounded by what it accepts
        for i in range(3):
            d[i] = bytearray(600_000)
        assert len(d.copy()) == 4
        assert d._procshare_session.thread_conn() is conn_before and m.restarts == 0
    finally:
        m.shutdown()


def test_message_limits_name_the_broken_one_and_the_advice_fits_it():
    from procshare.client.session import _limits_of
    from procshare.wire import diagnose
    from procshare.wire.frames import DEFAULT_LIMITS, Limits, frame_problem

    lim = Limits(max_body=100, max_frame=1000, max_buffers=2)
    assert frame_problem(lim, 100, 1000, 2) is None
    assert frame_problem(lim, 10, 1001, 1) == "over the 1000-byte limit"
    assert "pickled part alone (101 bytes)" in frame_problem(lim, 101, 101, 0)
    assert "in 3 out-of-band buffers" in frame_problem(lim, 10, 40, 3)
    # what a hello gives, made consistent; the defaults from a hello without it
    assert _limits_of([5000, 1000, 7]) == Limits(1000, 1000, 7)
    assert _limits_of(None) == _limits_of("junk") == _limits_of([1, -2, 3]) == DEFAULT_LIMITS

    class FakeProxy:            # pickling a proxy would lend its manager a reference
        _procshare_proxy_ = True

        def __reduce__(self):
            raise AssertionError("a proxy was pickled to measure it")

    with pytest.raises(MessageTooLarge) as info:      # too many buffers, not too many bytes
        diagnose.check_message(lim, b"x" * 10, [b"a" * 10] * 3, "pickle", "ab12", "put",
                               ([FakeProxy(), "y" * 500],), {"block": True}, "/tmp/m.sock")
    text = str(info.value)
    assert "put() on object ab12 was not sent" in text and "'/tmp/m.sock'" in text
    assert "in 3 out-of-band buffers" in text and "fewer, larger buffers" in text
    assert "max_message_bytes" not in text
    assert "the largest argument is args[0] (<list object>, " in text
    # a durable call sent again is named as the call it is
    with pytest.raises(MessageTooLarge,
                       match=r"__setitem__\(\) on 'dict' object ab12.*args\[1\]"):
        diagnose.check_message(lim, b"x" * 200, [], "pickle", "ab12", "#RETRY",
                               (3, 9, "__setitem__", ("k", b"v" * 150), {}), {}, "/tmp/m.sock",
                               "dict")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_result_too_large_for_one_message_is_an_error_and_the_next_call_works(monkeypatch):
    from procshare.server import server as server_module
    from procshare.wire.frames import Limits

    # the wire's own limit, lowered in the server that fork starts
    monkeypatch.setattr(server_module, "REPLY_LIMITS", Limits(1 << 20, 1 << 20))
    m = procshare.SyncManager(ctx=multiprocessing.get_context("fork"), restart="never")
    m.start()
    try:
        d = m.dict()
        d["big"] = bytearray(2 << 20)           # the manager accepts it
        for get in (lambda: d["big"], lambda: procshare.async_(d).__getitem__("big").result(10),
                    lambda: d.copy()):
            with pytest.raises(ResultNotSerializable) as info:
                get()
            text = str(info.value)
            assert "over the 1048576-byte limit" in text and "one message cannot carry it" in text
            assert "did run" in text and f"(pid {m.pid})" in text
            assert info.value.direction == "result"
        assert "__getitem__() on 'dict' object" in str(
            pytest.raises(ResultNotSerializable, lambda: d["big"]).value)
        d["small"] = 1
        assert d["small"] == 1 and len(d) == 2 and m.restarts == 0
        # a durable object's call replies another way, and is named all the same
        dd = m.dict(durable=True)
        dd["big"] = bytearray(2 << 20)
        with pytest.raises(ResultNotSerializable) as info:
            dd["big"]
        assert f"__getitem__() on 'dict' object {dd._id} in the manager" in str(info.value)
        dd["small"] = 2
        assert dd["small"] == 2 and len(dd) == 2
    finally:
        m.shutdown()


# -- exceptions of the referent ------------------------------------------------------------

def test_referent_exception_keeps_its_type_and_the_manager_traceback(box_manager):
    thrower = box_manager.Thrower()
    with pytest.raises(LookupError) as info:
        thrower.boom("no such thing")
    e = info.value
    assert type(e) is LookupError and e.args == ("no such thing",)
    remote = e.__cause__
    assert type(remote).__name__ == "RemoteTraceback"
    assert f"In the manager process (pid {box_manager.pid})" in str(remote)
    assert "in _deeper" in str(remote) and "in boom" in str(remote)   # server frames


def test_builtin_exception_from_a_container_keeps_its_type(sync_manager):
    d = sync_manager.dict()
    with pytest.raises(KeyError) as info:
        d["missing"]
    assert info.value.args == ("missing",)
    assert "In the manager process" in str(info.value.__cause__)


# -- the manager crashes ----------------------------------------------------------------------

@pytest.mark.parametrize("start_method", FAULT_START_METHODS)
def test_sigkilled_manager_raises_manager_crashed_within_a_second(start_method):
    # restart="never": the crash report itself (restarts: tests/test_restart.py)
    with procshare.SyncManager(ctx=multiprocessing.get_context(start_method),
                               restart="never") as m:
        q = m.Queue()
        q.put(1)
        address, pid = m.address, m.pid
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ManagerCrashed) as info:
            q.put(2)
        assert time.monotonic() - t0 < 1.0
        e = info.value
        assert isinstance(e, ConnectionError) and isinstance(e, EOFError)
        text = str(e)
        assert "SIGKILL" in text and repr(address) in text and str(pid) in text
        assert "SyncManager" in text
        assert (e.signal, e.exitcode, e.pid, e.address) == ("SIGKILL", -signal.SIGKILL, pid,
                                                            address)
        assert "Last lines of the manager's log" in text and "serving at" in text
        assert any("serving at" in line for line in e.log)
        # and again, quickly, on a new connection
        t0 = time.monotonic()
        with pytest.raises(ManagerCrashed) as info:
            m.dict()
        assert time.monotonic() - t0 < 1.0 and "SIGKILL" in str(info.value)


def _blocked_acquire(lock, out):
    try:
        lock.acquire()
        out.append(("returned", None, time.monotonic()))
    except BaseException as e:
        out.append(("raised", e, time.monotonic()))


def _waits_for(m, lock, thread) -> bool:
    """The manager lists `thread` (of this process) among `lock`'s waiters."""
    return any(w["pid"] == os.getpid() and w["thread_name"] == thread.name
               for d in m.locks() if d["id"] == lock._id for w in d["waiters"])


@pytest.mark.parametrize("start_method", FAULT_START_METHODS)
def test_call_blocked_in_the_manager_gets_manager_crashed(start_method):
    with procshare.SyncManager(ctx=multiprocessing.get_context(start_method),
                               restart="never") as m:
        lock = m.Lock()
        assert lock.acquire()
        out: list = []
        t = threading.Thread(target=_blocked_acquire, args=(lock, out), daemon=True)
        t.start()
        # a blocked call the manager reports (it lists no waiter of a Queue's get)
        assert poll(lambda: _waits_for(m, lock, t), 10), m.locks()
        assert not out
        killed = time.monotonic()
        os.kill(m.pid, signal.SIGKILL)
        t.join(3.0)
        assert out, "the blocked call did not return after the manager died"
        outcome, e, when = out[0]
        assert outcome == "raised" and isinstance(e, ManagerCrashed)
        assert when - killed < 1.0
        assert "SIGKILL" in str(e)


def test_uncaught_exception_in_a_manager_thread_reaches_the_crash_report(box_manager):
    box = box_manager.Box()
    assert box.start_failing_thread() is True
    os.kill(box_manager.pid, signal.SIGKILL)
    with pytest.raises(ManagerCrashed) as info:
        box.size()
    text = str(info.value)
    assert "uncaught exception in manager thread doomed" in text or \
        "boom in a manager thread" in text


def test_manager_exit_code_is_reported(sync_manager):
    lst = sync_manager.list()
    os.kill(sync_manager.pid, signal.SIGTERM)
    with pytest.raises(ManagerCrashed) as info:
        for _ in range(100):             # SIGTERM is handled: the manager logs, then dies
            lst.append(1)
            time.sleep(0.01)
    text = str(info.value)
    assert "SIGTERM" in text and "received SIGTERM" in text


def test_manager_dying_before_it_is_ready_says_so():
    m = procshare.SyncManager()
    with pytest.raises(ManagerCrashed) as info:
        m.start(ew.exit_in_initializer, (3,))
    text = str(info.value)
    assert "exited with code 3 before it was ready" in text
    assert info.value.exitcode == 3


def test_dead_unix_address_is_manager_crashed_and_file_not_found(tmp_path):
    address = str(tmp_path / "nobody-here.sock")
    m = procshare.SyncManager(address=address)
    with pytest.raises(ManagerSocketMissing) as info:
        m.connect()
    e = info.value
    assert isinstance(e, ManagerCrashed) and isinstance(e, FileNotFoundError)
    assert repr(address) in str(e) and "cannot be reached" in str(e)
    assert e.address == address


def test_dead_tcp_address_is_manager_crashed_and_connection_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                       # nothing listens on this port now
    m = procshare.SyncManager(address=("127.0.0.1", port))
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError) as info:   # the stdlib's except clause
        m.connect()
    assert time.monotonic() - t0 < 1.0
    assert isinstance(info.value, ManagerConnectionRefused)
    assert not isinstance(info.value, FileNotFoundError)


def test_crash_errors_pickle_with_their_facts():
    e = errors.manager_crashed(("h", 1), ConnectionRefusedError(111, "refused"))
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is type(e) and str(e2) == str(e) and e2.address == ("h", 1)


# -- pitfalls -----------------------------------------------------------------------------------

def test_proxy_used_after_its_manager_shut_down(box_manager):
    box = box_manager.Box()
    address = box_manager.address
    box_manager.shutdown()
    t0 = time.monotonic()
    with pytest.raises(ManagerCrashed) as info:
        box.size()
    assert time.monotonic() - t0 < 1.0
    text = str(info.value)
    assert "BoxManager" in text and repr(address) in text
    assert "shut down by this process" in text
    assert "Keep the manager running" in text
    assert info.value.shut_down is True


def test_server_log_dir_is_private_and_removed_at_shutdown():
    m = procshare.SyncManager()
    m.start()
    logdir = errors.crash_reporters[m.address].args[1]
    try:
        assert os.path.isdir(logdir)
        assert os.path.exists(os.path.join(logdir, "server.log"))
    finally:
        m.shutdown()
    assert not os.path.exists(logdir)
    assert m.address not in errors.crash_reporters


def test_wrong_authkey_says_who_rejected_it_and_why():
    with procshare.SyncManager(authkey=b"right") as m:
        other = procshare.SyncManager(address=m.address, authkey=b"wrong")
        with pytest.raises(multiprocessing.AuthenticationError) as info:
            other.connect()
        e = info.value
        assert isinstance(e, procshare.AuthenticationError)
        text = str(e)
        assert "manager side refused" in text and "rejected the authkey of this process" in text
        assert "Usual causes" in text and "current_process().authkey" in text
        assert e.rejected_by == "manager"
        log = "\n".join(m._control("server_info")["log"])
        assert "rejected a client's authkey" in log


def test_method_not_exposed_lists_the_exposed_ones(box_manager):
    thrower = box_manager.Thrower()
    with pytest.raises(NotExposedError) as info:
        thrower._callmethod("_deeper", ("x",))
    e = info.value
    assert isinstance(e, AttributeError) and isinstance(e, RemoteError)
    assert "'_deeper'" in str(e) and "the exposed ones are: boom" in str(e)
    assert e.exposed == ("boom",)


def test_bootstrap_error_is_a_runtime_error_with_the_fix():
    me = multiprocessing.current_process()
    me._inheriting = True         # what a spawned child looks like while it imports main
    try:
        with pytest.raises(RuntimeError) as info:
            procshare.SyncManager().start()
    finally:
        del me._inheriting
    assert isinstance(info.value, errors.BootstrapError)
    assert 'if __name__ == "__main__":' in str(info.value)
    assert "bootstrapping phase" in str(info.value)


SCRIPT = """
import multiprocessing
import procshare

multiprocessing.set_start_method("spawn", force=True)
manager = procshare.Manager()          # at import time: the classic mistake
shared = manager.dict()
print("parent got", shared)
manager.shutdown()
"""


def test_manager_started_at_import_time_under_spawn(tmp_path):
    script = tmp_path / "at_import.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    # the manager's own process imported the script and hit the mistake...
    assert "BootstrapError" in err and 'if __name__ == "__main__":' in err
    # ...and the parent says what most likely happened
    assert "ManagerCrashed" in err and "before it was ready" in err
    assert "import time" in err


def test_nested_plain_values_are_copies_and_update_item_is_the_fix(sync_manager):
    d = sync_manager.dict()
    d["k"] = []
    d["k"].append(1)                  # changes a local copy, as in the stdlib
    assert d["k"] == []
    if hasattr(d, "update_item"):     # the atomic read-modify-write helper
        d.update_item("k", ew.append_one)
        assert d["k"] == [1]
    d["nested"] = sync_manager.list()  # nested managed containers see the change
    d["nested"].append(1)
    assert d["nested"][:] == [1]


def test_systemexit_in_update_items_func_is_a_method_raised_exit(sync_manager):
    """User code the manager runs outside a plain method call (here
    update_item's func) that raises SystemExit: MethodRaisedExit, an EOFError
    naming the call, and the connection serves on."""
    d = sync_manager.dict({"k": 1})
    with pytest.raises(procshare.MethodRaisedExit) as info:
        d.update_item("k", ew.exit_instead)
    assert isinstance(info.value, EOFError)
    assert "update_item() on object" in str(info.value) and "SystemExit(5)" in str(info.value)
    assert d["k"] == 1
    d["k"] = 2
    assert d._getvalue() == {"k": 2}
