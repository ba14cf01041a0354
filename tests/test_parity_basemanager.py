"""Scenarios 12 and 15: the BaseManager API, and the AF_UNIX path fallback."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

import _workers
from _helpers import assert_not_exposed, is_stdlib, poll


def test_register_exposed_proxytype_create_method(impl, ctx):
    cls = _workers.get_class(impl, "ApiManager")
    assert not hasattr(cls, "Hidden")  # create_method=False
    with cls(ctx=ctx) as m:
        o = m.Obj()  # exposed=('a', 'b')
        assert o.a() == "a"
        assert o.b(1) == ("b", 1)
        assert not hasattr(o, "hidden")
        assert_not_exposed(impl, o, "hidden")
        p = m.ObjP()  # proxytype=ObjProxy
        assert type(p) is _workers.get_class(impl, "ObjProxy")
        assert p.a() == "a"
        assert p.b(2) == ("b", 2)
        assert p._callmethod("b", (3,)) == ("b", 3)
        assert p._callmethod("b", kwds={"x": 4}) == ("b", 4)
        assert not hasattr(m, "Hidden")
        del o, p


def test_an_exposed_method_the_object_lacks_is_a_remote_error(impl, ctx):
    """The stdlib answers with the manager's AttributeError as a RemoteError
    (procshare's is an AttributeError too, and names the method and typeid)."""
    cls = _workers.get_class(impl, "ApiManager")
    with cls(ctx=ctx) as m:
        o = m.Lacking()
        assert o.a() == "a"
        with pytest.raises(impl.RemoteError) as info:
            o.nosuch()
        assert "nosuch" in str(info.value)
        it = m.ListIter()
        with pytest.raises(impl.RemoteError) as info:
            it.send(None)       # IteratorProxy exposes send; a list iterator has none
        assert "send" in str(info.value)
        assert next(it) == 1    # the object and the connection are fine
        if not is_stdlib(impl):
            assert isinstance(info.value, AttributeError)
            assert "'ListIter'" in str(info.value) and "exposed" in str(info.value)
        # a property that fails inside is no missing method: the traceback shows where
        b = m.BrokenProp()
        with pytest.raises(impl.RemoteError) as info:
            b._callmethod("size")
        assert "'NoneType' object has no attribute 'size'" in str(info.value)
        assert "return self._data.size" in str(info.value)
        assert b.a() == "a"
        del o, it, b


def test_a_manager_used_before_start_or_after_shutdown(impl, ctx):
    """What the stdlib raises, by what is used: making an object fails its
    `assert` (AssertionError); inspecting fails to connect (ValueError with no
    address yet, FileNotFoundError once the socket is gone); join() before
    start() has no process (AttributeError)."""
    m = impl.SyncManager(ctx=ctx)
    with pytest.raises(AssertionError):
        m.list()
    with pytest.raises(ValueError):
        m._number_of_objects()
    with pytest.raises(ValueError):
        m._debug_info()
    with pytest.raises(AttributeError):
        m.join(0.1)
    m.start()
    m.shutdown()
    m.join(0.1)
    m.join(0.1)         # again: nothing left to join, no error
    with pytest.raises(AssertionError):
        m.dict()
    with pytest.raises(FileNotFoundError):
        m._number_of_objects()
    m.join(0.1)
    if not is_stdlib(impl):
        import procshare
        with pytest.raises(procshare.ManagerNotRunning, match="has shut down"):
            m.Lock()
        with pytest.raises(multiprocessing.ProcessError, match="has shut down"):
            m._debug_info()


def test_a_server_that_fails_to_start_is_an_eof_error(impl, ctx):
    """The stdlib's start() raises EOFError when its server fails (address in
    use, initializer raising), and the manager can be started again
    (procshare's names the cause, and chains it)."""
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        m = impl.SyncManager(address=busy.getsockname(), ctx=ctx)
        with pytest.raises(EOFError) as info:
            m.start()
        if not is_stdlib(impl):
            assert "another process listens at" in str(info.value)
            assert isinstance(info.value.__cause__, OSError)
    m = impl.SyncManager(ctx=ctx)
    with pytest.raises(EOFError) as info:
        m.start(int, ("not a number",))
    if not is_stdlib(impl):
        assert "ValueError" in str(info.value) and "initializer" in str(info.value)
    m.join(0.1)         # start() was called: join() works, as in the stdlib
    m.start()           # nothing of the failed start is in the way
    try:
        assert m.list([1])[0] == 1
    finally:
        m.shutdown()


def test_an_unknown_serializer_is_refused_at_once(impl):
    with pytest.raises(KeyError):
        impl.SyncManager(serializer="no-such-serializer")


def test_a_method_to_typeid_result_that_cannot_be_made_is_a_remote_error(impl, ctx):
    """The typeid is not registered, or its callable fails on the result:
    the stdlib answers with the manager's traceback (RemoteError)."""
    cls = _workers.get_class(impl, "ApiManager")
    with cls(ctx=ctx) as m:
        nowhere, to_obj = m.ToNowhere(), m.ToObj()
        with pytest.raises(impl.RemoteError, match="nowhere") as first:
            nowhere.a()
        with pytest.raises(impl.RemoteError, match="TypeError") as second:
            to_obj.a()              # Obj("a"): Obj takes no argument
        assert m._number_of_objects() == 2      # nothing made for the failed results
        del nowhere, to_obj, first, second      # (their tracebacks hold the proxies)
        gc.collect()
        assert poll(lambda: m._number_of_objects() == 0, 10)


def test_callmethod_with_none_for_args_or_kwds_is_a_type_error(impl, ctx):
    cls = _workers.get_class(impl, "ApiManager")
    with cls(ctx=ctx) as m:
        o = m.Obj()
        with pytest.raises(TypeError):
            o._callmethod("a", None)
        with pytest.raises(TypeError):
            o._callmethod("a", (), None)
        assert o._callmethod("a") == "a"
        del o


def test_connect_to_a_bad_address_is_what_the_stdlib_raises(impl):
    """An address of the wrong type is a TypeError (the stdlib's, for one it
    cannot index); a host that does not resolve is a socket.gaierror (no
    manager crashed)."""
    import socket
    with pytest.raises(TypeError):
        impl.SyncManager(address=12345).connect()
    with pytest.raises(socket.gaierror):
        impl.SyncManager(address=("no-such-host.invalid", 5000)).connect()


def test_a_call_after_shutdown_in_a_thread_that_had_a_connection(impl, ctx):
    """The thread's connection from before breaks: BrokenPipeError; a thread
    without one finds no socket file: FileNotFoundError."""
    m = impl.SyncManager(ctx=ctx)
    m.start()
    lst = m.list()
    lst.append(1)
    m.shutdown()
    with pytest.raises(BrokenPipeError):
        lst.append(2)
    got = {}

    def other():
        try:
            lst.append(3)
        except Exception as e:      # noqa: BLE001  (what it is, is the test)
            got["error"] = e

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    assert isinstance(got.get("error"), FileNotFoundError), got


def test_start_initializer_runs_in_server(impl, ctx):
    cls = _workers.get_class(impl, "ApiManager")
    m = cls(ctx=ctx)
    m.start(_workers.init_server, ("from-initializer",))
    try:
        info = m.Info()
        assert info.env("PROCSHARE_TEST_INIT") == "from-initializer"
        assert info.init_value() == "from-initializer"
        assert info.pid() != os.getpid()
        assert os.environ.get("PROCSHARE_TEST_INIT") is None  # not in this process
        del info
    finally:
        m.shutdown()


def test_start_rejects_non_callable_initializer(impl, ctx):
    m = impl.SyncManager(ctx=ctx)
    with pytest.raises(TypeError):
        m.start(initializer=5)
    assert multiprocessing.active_children() == []
    # The manager can still be started properly afterwards.
    m.start()
    try:
        assert m.list([1])._getvalue() == [1]
    finally:
        m.shutdown()


def test_start_twice_raises_process_error(impl, ctx):
    m = impl.SyncManager(ctx=ctx)
    m.start()
    try:
        with pytest.raises(multiprocessing.ProcessError):
            m.start()
    finally:
        m.shutdown()


def test_context_manager_then_unreachable(impl, ctx):
    with impl.SyncManager(ctx=ctx) as m:
        address = m.address
        lst = m.list([1, 2])
        assert lst._getvalue() == [1, 2]
        del lst
    other = impl.SyncManager(address=address)
    with pytest.raises(OSError):
        other.connect()


def test_shutdown_then_join(impl, ctx):
    m = impl.SyncManager(ctx=ctx)
    m.start()
    address = m.address
    m.shutdown()
    m.join(timeout=5)
    assert multiprocessing.active_children() == []
    with pytest.raises(OSError):
        impl.SyncManager(address=address).connect()


def test_shutdown_timeout_accepted(impl, ctx):
    if is_stdlib(impl) and sys.version_info < (3, 11):
        pytest.skip("shutdown_timeout is new in the stdlib 3.11")
    m = impl.SyncManager(ctx=ctx, shutdown_timeout=2.0)
    m.start()
    assert m.list([1])._getvalue() == [1]
    t0 = time.monotonic()
    m.shutdown()
    assert time.monotonic() - t0 < 5.0


def test_address_attribute(impl, ctx):
    m = impl.SyncManager(ctx=ctx)
    m.start()
    try:
        assert isinstance(m.address, str) and m.address  # a unix socket path
    finally:
        m.shutdown()
    m = impl.SyncManager(address=("127.0.0.1", 0), authkey=b"tcp-key", ctx=ctx)
    m.start()
    try:
        host, port = m.address
        assert host == "127.0.0.1"
        assert isinstance(port, int) and port != 0  # the real port, not 0
        assert m.list([5])._getvalue() == [5]
    finally:
        m.shutdown()


def test_number_of_objects_goes_back_down(manager):
    base = manager._number_of_objects()
    a = manager.list()
    b = manager.dict()
    c = manager.Queue()
    assert manager._number_of_objects() == base + 3
    del a, b, c
    gc.collect()
    assert poll(lambda: manager._number_of_objects() == base), manager._number_of_objects()


def test_connect_second_manager_same_address(impl, ctx):
    cls = _workers.get_class(impl, "QueueManager")
    authkey = b"shared-secret"
    m1 = cls(authkey=authkey, ctx=ctx)
    m1.start()
    try:
        m2 = cls(address=m1.address, authkey=authkey)
        m2.connect()
        assert m2.address == m1.address
        q2 = m2.get_queue()
        q2.put("hello from m2")
        q1 = m1.get_queue()
        assert q1.get(timeout=5) == "hello from m2"
        del q1, q2
    finally:
        m1.shutdown()


def test_connect_syncmanager_shares_server(impl, manager):
    authkey = bytes(multiprocessing.current_process().authkey)
    other = impl.SyncManager(address=manager.address, authkey=authkey)
    other.connect()
    base = manager._number_of_objects()
    lst = other.list([1])
    assert manager._number_of_objects() == base + 1
    del lst
    gc.collect()
    assert poll(lambda: manager._number_of_objects() == base)


def test_procshare_pid(ctx):
    import procshare.managers as ps

    cls = _workers.get_class(ps, "ApiManager")
    m = cls(ctx=ctx)
    assert m.pid is None  # not started
    m.start()
    try:
        info = m.Info()
        server_pid = info.pid()
        assert server_pid != os.getpid()
        assert m.pid == server_pid
        other = cls(address=m.address, authkey=bytes(multiprocessing.current_process().authkey))
        other.connect()
        assert other.pid is None  # not started by this process
        del info
    finally:
        m.shutdown()


# -- 15. AF_UNIX path too long -------------------------------------------------------

LONG_TMPDIR_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, tempfile
    multiprocessing.set_start_method({method!r})
    if {method!r} == "forkserver":
        # the stdlib's forkserver binds its own socket in the temp dir, and fails
        # there before any manager starts: start it from a short one, then make
        # multiprocessing use the long one again for everything else
        from multiprocessing import forkserver, process
        long_tmp = os.environ["TMPDIR"]
        os.environ["TMPDIR"] = "/tmp"
        tempfile.tempdir = None
        forkserver.ensure_running()
        os.environ["TMPDIR"] = long_tmp
        tempfile.tempdir = None
        process.current_process()._config.pop("tempdir", None)
    import {module} as managers
    print("TMPDIR", len(tempfile.gettempdir()), flush=True)
    m = managers.SyncManager()
    m.start()
    try:
        lst = m.list([1, 2])
        lst.append(3)
        print("VALUE", lst._getvalue(), flush=True)
        del lst
    finally:
        m.shutdown()
    """
)


def test_long_tmpdir_unix_socket_fallback(impl, ctx, tmp_path):
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    assert len(str(long_dir)) > 110
    script = LONG_TMPDIR_SCRIPT.format(method=ctx.get_start_method(), module=impl.__name__)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=_workers.subprocess_env(TMPDIR=str(long_dir)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert f"TMPDIR {len(str(long_dir))}" in proc.stdout, proc.stderr
    if is_stdlib(impl) and ctx.get_start_method() != "forkserver":
        assert proc.returncode != 0
        assert "OSError: AF_UNIX path too long" in proc.stderr
    else:
        # procshare falls back to a short path; under forkserver the stdlib's
        # server process is forked from the forkserver, which kept the short
        # temp dir it started with, so the stdlib works there too
        assert proc.returncode == 0, proc.stderr
        assert "VALUE [1, 2, 3]" in proc.stdout


def test_client_and_dispatch_like_the_stdlib(impl, ctx):
    """Code that talks to a manager directly: `manager._Client(...)` and
    `dispatch(conn, None, name)`, e.g. to check that the manager is alive."""
    m = impl.SyncManager(ctx=ctx)
    m.start()
    try:
        conn = m._Client(m.address, authkey=m._authkey)
        try:   # the stdlib serves one request per such connection
            assert impl.dispatch(conn, None, "dummy") is None
        finally:
            conn.close()
        lst = m.list([1, 2])
        conn = m._Client(m.address, authkey=m._authkey)
        try:
            assert impl.dispatch(conn, None, "number_of_objects") == 1
        finally:
            conn.close()
        del lst
        _listener, client_factory = impl.listener_client["pickle"]
        with client_factory(m.address, authkey=m._authkey) as conn:
            assert impl.dispatch(conn, None, "dummy") is None
    finally:
        m.shutdown()


def test_finalize_manager_overridden_with_the_stdlibs_signature(impl, ctx):
    """A subclass whose `_finalize_manager` is the stdlib's own (5 arguments on
    3.10, 6 later; `_Client(address, authkey=...)` then `dispatch(conn, None,
    'shutdown')`) shuts its manager down, here as there."""
    cls = _workers.get_class(impl, "OwnFinalizeManager")
    del _workers.FINALIZED[:]
    m = cls(ctx=ctx)
    m.start()
    c = m.Counter()
    c.increment()
    del c
    proc = m._process
    m.shutdown()
    assert _workers.FINALIZED == [(6 if sys.version_info >= (3, 11) else 5, True, "sent")]
    assert m._state.value == impl.State.SHUTDOWN
    assert poll(lambda: not proc.is_alive(), 10)
    m.join(5)


class _StdlibStyleConnection:
    """An object with the stdlib's `send()` and `recv()` (CPython's own
    manager tests pass such a stand-in to `dispatch`)."""

    def __init__(self, *reply):
        self.reply, self.sent = reply, []     # (kind, a factory of the result)

    def send(self, obj):
        self.sent.append(obj)

    def recv(self):
        return self.reply[0], self.reply[1]()


def test_dispatch_on_any_connection_with_send_and_recv(impl):
    """`dispatch` sends the stdlib's request tuple on any object with `send`
    and `recv`, returns a `#RETURN`'s result, raises a `#ERROR`'s exception
    (keeping no reference cycle to it: cpython#106558, fixed in the stdlib in
    3.13) and a `#TRACEBACK` as a RemoteError."""
    import queue

    c = _StdlibStyleConnection("#RETURN", lambda: 42)
    assert impl.dispatch(c, "7f", "get", (1,), {"k": 2}) == 42
    assert c.sent == [("7f", "get", (1,), {"k": 2})]
    gc.disable()
    ref = None
    try:
        try:
            impl.dispatch(_StdlibStyleConnection("#ERROR", queue.Empty), None, None)
        except queue.Empty as e:
            ref = weakref.ref(e)
        assert ref is not None, "no queue.Empty raised"
        if not is_stdlib(impl) or sys.version_info >= (3, 13):   # (the stdlib's fix)
            assert ref() is None, "the exception is kept alive by a reference cycle"
    finally:
        gc.enable()
    with pytest.raises(impl.RemoteError) as info:
        impl.dispatch(_StdlibStyleConnection("#TRACEBACK", lambda: "Traceback: boom"),
                      None, "m")
    assert "boom" in str(info.value)


def test_dispatch_on_a_stdlib_connection_to_a_stdlib_manager(ctx):
    """procshare's `dispatch` on a `multiprocessing.connection` to a stdlib
    manager works as the stdlib's does (code that mixes the two imports)."""
    import multiprocessing.connection
    import multiprocessing.managers

    import procshare.managers

    m = multiprocessing.managers.SyncManager(ctx=ctx)
    m.start()
    try:
        with multiprocessing.connection.Client(m.address, authkey=m._authkey) as conn:
            assert procshare.managers.dispatch(conn, None, "dummy") is None
        with multiprocessing.connection.Client(m.address, authkey=m._authkey) as conn:
            with pytest.raises(procshare.managers.RemoteError):
                procshare.managers.dispatch(conn, None, "no_such_request")
    finally:
        m.shutdown()


class _Maker:
    def make(self):
        return [1, 2]



# -- a parity hunt's findings (2026-11-29) ----------------------------------------------


def _send_shutdown(impl_name, address, authkey):
    """(in a child) What a known recipe does to stop a manager it did not start."""
    if impl_name == "stdlib":
        from multiprocessing.connection import Client
        from multiprocessing.managers import dispatch
    else:
        from procshare.managers import dispatch, listener_client
        Client = listener_client["pickle"][1]
    conn = Client(address, authkey=authkey)
    try:
        dispatch(conn, None, "shutdown")
    finally:
        conn.close()


def test_a_shutdown_request_from_another_process_stops_the_manager(impl, ctx):
    """`dispatch(conn, None, 'shutdown')` from a process that did not start the
    manager stops it for good: `join()` returns, and nothing restarts it
    (procshare's supervisor took the exit for a crash and restarted it, so
    `join()` never returned)."""
    m = impl.SyncManager(ctx=ctx, authkey=b"shared-key")
    m.start()
    lst = m.list([1])
    p = ctx.Process(target=_send_shutdown,
                    args=(_workers.impl_name(impl), m.address, b"shared-key"))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    m.join(20)
    assert m._process is None
    with pytest.raises(OSError):
        lst[:]
    with pytest.raises(OSError):
        m.list()
    m.shutdown()
    del lst


def test_a_shutdown_request_from_the_starting_process_stops_the_manager(impl, ctx):
    """The same recipe run by the process that started the manager, which
    tells its supervisor nothing first (procshare restarted that server)."""
    m = impl.SyncManager(ctx=ctx, authkey=b"shared-key")
    m.start()
    _send_shutdown(_workers.impl_name(impl), m.address, b"shared-key")
    m.join(20)
    assert m._process is None
    m.shutdown()


def test_a_server_class_with_the_stdlibs_public_names(impl, ctx):
    """A manager whose server class lists the stdlib's operations plus its own
    (`public = list(managers.Server.public) + [...]`, the stdlib's own idiom)
    still makes objects (procshare's own operations were gone from it)."""
    with _workers.get_class(impl, "PublicListManager")(ctx=ctx) as m:
        lst = m.list([1])
        assert lst[:] == [1]
        d = m.dict()
        d["l"] = lst
        assert d["l"][:] == [1]
        del lst, d


def test_create_over_dispatch_gives_the_id_and_exposed_names(impl, ctx):
    """The stdlib's `_create` is `id, exposed = dispatch(conn, None, 'create',
    (typeid,) + args, kwds)`, which code that manages objects by hand copies
    (procshare answered with three values)."""
    with impl.SyncManager(ctx=ctx) as m:
        conn = m._Client(m.address, authkey=m._authkey)
        try:
            ident, exposed = impl.dispatch(conn, None, "create", ("list", [1, 2]), {})
        finally:
            conn.close()
        assert "append" in exposed
        lst = impl.ListProxy(impl.Token("list", m.address, ident), "pickle", manager=m)
        assert lst[:] == [1, 2]
        conn = m._Client(m.address, authkey=m._authkey)
        try:    # the create's own reference, given back as the stdlib's _create's caller does
            impl.dispatch(conn, None, "decref", (ident,))
        finally:
            conn.close()
        del lst
        assert poll(lambda: m._number_of_objects() == 0, 10)


def test_a_subclass_create_is_what_makes_objects(impl, ctx):
    """A manager subclass that overrides `_create` sees every object made
    (procshare's create methods went around it)."""
    del _workers.CREATED[:]
    with _workers.get_class(impl, "CreateRecordingManager")(ctx=ctx) as m:
        lst = m.list([1])
        d = m.dict()
        assert lst[:] == [1] and len(d) == 0
        w = m.WithAttr()    # (what procshare's create tells goes through it too)
        assert w.method() == "method"
        if not is_stdlib(impl):
            assert w.attr == 42
        assert _workers.CREATED == ["list", "dict", "WithAttr"]
        del lst, d, w


def test_the_stdlibs_connection_names_on_a_proxy(impl, ctx):
    """What reconnecting code written for the stdlib uses (cimatosa/jobmanager:
    `proxy._connect()` before an operation, `proxy._tls.connection.close()`
    after a failure), `proxy._Client`, and `proxy._after_fork()`."""
    with impl.SyncManager(ctx=ctx) as m:
        q = m.Queue()
        q._connect()
        q.put(1)
        q._tls.connection.close()
        q._connect()
        assert q.get(timeout=10) == 1
        q._tls.connection.close()
        if is_stdlib(impl):
            with pytest.raises(OSError):    # ("handle is closed": _connect() first)
                q.put(2)
            q._connect()
        q.put(2)        # (procshare: without _connect() too)
        conn = q._Client(q._token.address, authkey=q._authkey)
        try:
            assert impl.dispatch(conn, None, "dummy") is None
        finally:
            conn.close()
        del q._tls.connection   # (the stdlib's way to reconnect: the next call does)
        assert q.qsize() == 1
        q._after_fork()     # as in a forked child: a reference of its own
        assert q._manager is None
        assert q.qsize() == 1
        del q
        assert poll(lambda: m._number_of_objects() == 0, 10)


def test_a_proxy_pickles_after_its_manager_is_gone(impl, ctx):
    """Pickling a proxy talks to no one in the stdlib, so it works after the
    manager has gone (procshare asked the manager for a loan, and raised);
    the copy fails when it is rebuilt, here as there."""
    import pickle

    m = impl.SyncManager(ctx=ctx)
    m.start()
    lst = m.list([1])
    m.shutdown()
    data = pickle.dumps(lst)
    with pytest.raises(OSError):
        pickle.loads(data)
    del lst


def test_a_server_in_this_process_gets_its_references_back(impl):
    """A server run by `get_server().serve_forever()` in a thread, and a
    manager of this same process connected to it: dropped proxies (made by a
    create, or returned by a method_to_typeid method) give their references
    back.  procshare counted their release against the server's own holder,
    which had none, so the objects stayed for good.  Once it is shut down,
    procshare leaves none of its threads behind (its accepter stayed blocked
    in accept() for good, as the stdlib's does, so every later fork of the
    process warned on 3.12+ that it was multi-threaded)."""
    before = set(threading.enumerate())

    class M(impl.BaseManager):
        pass

    M.register("L", list, proxytype=impl.ListProxy)
    M.register("Maker", _Maker, method_to_typeid={"make": "L"})
    server = M(address=("127.0.0.1", 0), authkey=b"in-this-process").get_server()

    def serve():
        try:
            server.serve_forever()
        except SystemExit:      # how both end serve_forever() after a shutdown
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        m = M(address=server.address, authkey=b"in-this-process")
        m.connect()
        lst = m.L([3])
        maker = m.Maker()
        made = maker.make()
        assert list(made) == [1, 2] and list(lst) == [3]
        assert m._number_of_objects() == 3
        del lst, made
        gc.collect()
        assert poll(lambda: m._number_of_objects() == 1, 10)
        del maker
        gc.collect()
        assert poll(lambda: m._number_of_objects() == 0, 10)
    finally:
        conn = impl.listener_client["pickle"][1](server.address, authkey=b"in-this-process")
        try:
            impl.dispatch(conn, None, "shutdown")
        except Exception:
            pass
        conn.close()
        thread.join(10)
    if not is_stdlib(impl):
        assert poll(lambda: not set(threading.enumerate()) - before, 5), \
            set(threading.enumerate()) - before


GET_SERVER_SCRIPT = textwrap.dedent(
    """
    import {module} as m
    server = m.BaseManager(authkey=b"k").get_server()
    print("ADDRESS", server.address)
    """
)


def test_a_server_never_served_leaves_no_socket_file(impl, tmp_path):
    """get_server() without serve_forever(): the stdlib's socket lives in a temp
    dir removed at exit; procshare's own file goes at exit too."""
    proc = subprocess.run(
        [sys.executable, "-c", GET_SERVER_SCRIPT.format(module=impl.__name__)],
        env=_workers.subprocess_env(TMPDIR=str(tmp_path)),
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    address = proc.stdout.split("ADDRESS ", 1)[1].strip()
    assert address and not os.path.exists(address)
