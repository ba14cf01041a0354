"""Lifetimes: exit is not death, abandoned calls are cancelled, and the
defects found in the manager's call path stay fixed.  procshare only: in each
of these cases the stdlib hangs, loses data or releases nothing."""

from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import signal
import socket
import threading
import time
import warnings

import pytest

import _lifetime_workers as lw
import _workers
import procshare
from _helpers import interrupt_after, poll

WAIT = 15.0


@pytest.fixture
def lmgr():
    with lw.LifetimeManager(ctx=multiprocessing.get_context("fork")) as m:
        yield m


@pytest.fixture
def sync():
    with procshare.Manager(ctx=multiprocessing.get_context("fork")) as m:
        yield m


# -- case 4: Ctrl-C cancels the call in the manager ---------------------------------------

def test_interrupted_get_does_not_swallow_a_later_item(sync):
    q = sync.Queue()
    assert isinstance(interrupt_after(0.3, q.get), KeyboardInterrupt)
    q.put("later")
    assert q.get(timeout=5) == "later"
    assert q.qsize() == 0


def test_interrupted_acquire_does_not_take_the_lock_later(sync, ctx=None):
    lock = sync.Lock()
    ready = sync.Event()
    release = sync.Event()
    holder = _workers.start_child(multiprocessing.get_context("fork"), lw_hold, lock, ready,
                                  release)
    try:
        assert ready.wait(WAIT)
        assert isinstance(interrupt_after(0.3, lock.acquire), KeyboardInterrupt)
        release.set()
        assert holder.result(WAIT) is True
        # the abandoned acquire did not take it when the holder let go
        assert lock.acquire(timeout=5)
        lock.release()
    finally:
        release.set()


def lw_hold(lock, ready, release):
    lock.acquire()
    ready.set()
    release.wait(WAIT)
    lock.release()
    return True


def test_interrupted_event_and_condition_waits_take_nothing(sync):
    ev = sync.Event()
    assert isinstance(interrupt_after(0.3, ev.wait), KeyboardInterrupt)
    cond = sync.Condition()
    cond.acquire()
    assert isinstance(interrupt_after(0.3, cond.wait), KeyboardInterrupt)
    # like threading, the lock is held again when the interrupted wait returns
    cond.release()
    got = []
    t = threading.Thread(target=lambda: got.append(cond.acquire(timeout=5)))
    t.start()
    t.join(WAIT)
    assert got == [True]


# -- case 5: a reply that has begun is read to the end ------------------------------------

def test_timed_out_gets_of_large_items_lose_nothing(sync):
    q = sync.Queue()
    sizes = [(32 + 3 * i) << 20 for i in range(12)]
    for i, n in enumerate(sizes):
        q.put(bytes([i + 1]) * n)
    got, timeouts = [], 0
    for i in range(len(sizes)):
        try:
            got.append(q._callmethod("get", (), {}, timeout=0.001 * (i % 4)))
        except procshare.CallTimeout:
            timeouts += 1
    while True:
        try:
            got.append(q.get(timeout=2))
        except Exception:
            break
    assert sorted(len(x) for x in got) == sizes
    assert sorted(x[0] for x in got) == list(range(1, 13))


# -- a call never sent gives back the loans of its proxies ----------------------------------

def test_a_call_that_is_not_sent_gives_back_the_loans_of_the_proxies_in_it():
    """Pickling a proxy takes a loan (a reference kept for the receiver).  A
    call whose arguments cannot be serialized, or whose message is over the
    manager's limits, is never sent: the loans its proxies took go back at
    once (they kept the object alive for LOAN_TTL, 10 minutes, after its last
    proxy went).  A loan in a message on its way is not touched."""
    from procshare.errors import MessageTooLarge, SerializationError

    with procshare.Manager(ctx=multiprocessing.get_context("fork"),
                           max_message_bytes=1 << 20) as m:
        d = m.dict()
        base = m._number_of_objects()
        lst = m.list([1])
        on_its_way = procshare.async_(d).__setitem__("kept", lst)    # its loan: adopted
        with pytest.raises(SerializationError):
            d["x"] = (lst, threading.Lock())
        with pytest.raises(SerializationError):
            procshare.async_(d).__setitem__("y", [lst, threading.Lock()])
        with pytest.raises(MessageTooLarge):
            d["z"] = (lst, b"x" * (2 << 20))
        with pytest.raises(MessageTooLarge):
            procshare.async_(d).update({"z": lst, "big": b"x" * (2 << 20)})
        assert on_its_way.result(WAIT) is None
        del lst
        kept = d["kept"]
        assert kept[:] == [1] and sorted(d.keys()) == ["kept"]
        # once the dict and this process let go, nothing holds the list
        del d["kept"], kept
        assert poll(lambda: m._number_of_objects() == base, WAIT), m._debug_info()


# -- a fork loan the child never adopts ----------------------------------------------------

def _fork_loans_added(before: set) -> set:
    """The read ends of fork loans the parent watches now and did not before."""
    from procshare.client import loans
    return set(loans._watched) - before


def _fork_loans_settled(before: set) -> bool:
    """Look at the fork loans (as a control call would), then: are all the
    ones added since `before` given back?"""
    from procshare.client import loans
    loans.check_fork_loans()
    return not _fork_loans_added(before)


def _forked(child, *args) -> int:
    """os.fork(): the child runs `child(*args)` and leaves with os._exit of
    what it returns (1 if it raised), so that no test code runs on in it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(*args)
        finally:
            os._exit(code)
    return pid


def test_a_fork_loan_that_no_child_adopts_is_given_back_when_the_child_goes(sync):
    """Before a fork the parent lends the child its references; a child that
    never uses the manager (a raw os.fork() that exits, or a child that
    execs) never adopts that loan, which kept every object the parent held
    for LOAN_TTL (10 minutes) after the parent let go.  It goes back once the
    child is gone, and the parent keeps no descriptor for it."""
    import subprocess

    from procshare.client import loans

    base = sync._number_of_objects()
    lst = sync.list([1])
    before = set(loans._watched)
    pid = _forked(lambda: 0)
    assert os.waitpid(pid, 0)[1] == 0
    subprocess.run(["true"], preexec_fn=lambda: None, check=True)   # runs the fork hooks, execs
    del lst
    assert poll(lambda: sync._number_of_objects() == base, WAIT), sync._debug_info()
    assert poll(lambda: _fork_loans_settled(before), WAIT)     # (each read end closed)


def test_a_forked_child_that_adopts_later_keeps_the_objects_its_parent_let_go(sync):
    """The loan is given back only once the child adopted it (or is gone): a
    raw os.fork() child that first uses a proxy after its parent dropped its
    own, and after the parent looked at its fork loans, still finds the
    object; the object goes when the child exits."""
    from procshare.client import loans

    base = sync._number_of_objects()
    lst = sync.list([1])
    before = set(loans._watched)
    r, w = os.pipe()

    def child(lst):
        os.close(w)
        os.read(r, 1)           # the parent let go, and looked at its fork loans
        lst.append(2)
        return 0 if lst[:] == [1, 2] else 2

    pid = _forked(child, lst)
    os.close(r)
    del lst                 # (a decref: the parent looks at its fork loans)
    loans.check_fork_loans()
    assert _fork_loans_added(before), "a loan whose child lives and has not adopted it went back"
    os.write(w, b"x")
    os.close(w)
    assert os.waitpid(pid, 0)[1] == 0, "the child lost the object its parent let go"
    assert poll(lambda: sync._number_of_objects() == base, WAIT), sync._debug_info()
    assert poll(lambda: _fork_loans_settled(before), WAIT)


def test_a_child_that_forks_before_it_adopted_lends_its_own_child_the_objects(sync):
    """A child that never used the manager forks a grandchild and exits (a
    daemon's double fork); the parent lets go: the grandchild still finds
    the object (the child adopted its loan before forking, and lent its
    own), and the object goes when the grandchild exits."""
    import select

    from procshare.client import loans

    base = sync._number_of_objects()
    lst = sync.list([1])
    before = set(loans._watched)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()

    def grandchild(lst):
        got = b"?"
        try:
            os.read(go_r, 1)    # the child is gone and the parent let go
            lst.append(2)
            got = b"y" if lst[:] == [1, 2] else b"n"
        except BaseException as e:
            got = type(e).__name__.encode()
        finally:
            os.write(res_w, got)
        return 0

    def child(lst):
        os.close(go_w)
        os.close(res_r)
        _forked(grandchild, lst)
        return 0

    pid = _forked(child, lst)
    os.close(go_r)
    os.close(res_w)
    try:
        assert os.waitpid(pid, 0)[1] == 0
        del lst
        assert _fork_loans_settled(before)     # the child is gone: its loan goes back now
        os.write(go_w, b"x")
        assert select.select([res_r], [], [], WAIT)[0], "no word from the grandchild"
        assert os.read(res_r, 64) == b"y", "the grandchild lost the object"
    finally:
        os.close(go_w)
        os.close(res_r)
    assert poll(lambda: sync._number_of_objects() == base, WAIT), sync._debug_info()


def test_adopting_never_closes_a_descriptor_that_is_no_longer_the_loans_pipe():
    """A child that closed what it inherited (as a daemon does) may reuse the
    number of its fork loan's pipe, for the very control connection that
    adopts the loan: adopting closes the number only if it is still that
    pipe."""
    from procshare.client.session import Session

    s = object.__new__(Session)
    r, w = os.pipe()
    s.adopt_w, s.adopt_id = -1, None
    s._lend_to_child(w)
    os.close(w)                         # closed, and the number reused by something else
    r2, w2 = os.pipe()
    try:
        if w2 != w:
            os.dup2(w2, w)
        s._adopted()
        os.fstat(w)                     # still open: not the loan's pipe
        assert s.adopt_w == -1 and s.adopt_id is None
    finally:
        for fd in {r, w, r2, w2}:
            try:
                os.close(fd)
            except OSError:
                pass
    r, w = os.pipe()                    # the loan's own pipe is closed
    pipe = os.fstat(w)
    s._lend_to_child(w)
    s._adopted()
    try:
        now = os.fstat(w)               # (another thread may have reused the number)
    except OSError:
        pass
    else:
        assert (now.st_dev, now.st_ino) != (pipe.st_dev, pipe.st_ino)
    finally:
        os.close(r)


def test_the_parent_gives_back_a_fork_loan_only_for_the_pipe_it_watched():
    """The parent's look at its fork loans: a pipe whose write ends are all
    closed gives its loan back once; one whose child still holds it does
    not; a read end closed and reused under us is forgotten, neither closed
    nor taken for an ended loan."""
    from procshare.client import loans

    class FakeSession:
        closed = False

        def __init__(self):
            self.sent = []

        def control_send(self, meth, *args):
            self.sent.append((meth, *args))

    s = FakeSession()
    ended_r, ended_w = os.pipe()
    alive_r, alive_w = os.pipe()
    reused_r, reused_w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        loans.watch_fork_loan(s, "loan:ended", ended_r)
        loans.watch_fork_loan(s, "loan:alive", alive_r)
        loans.watch_fork_loan(s, "loan:reused", reused_r)
        os.close(ended_w)
        os.close(reused_w)
        os.dup2(other_r, reused_r)      # the number now names another pipe
        os.close(other_w)               # (which reads as ended too)
        loans.check_fork_loans()
        assert s.sent == [("release_loan", "loan:ended")]
        assert alive_r in loans._watched and reused_r not in loans._watched
        os.fstat(reused_r)              # not closed by the look
        loans.check_fork_loans()
        assert s.sent == [("release_loan", "loan:ended")]
        os.close(alive_w)
        loans.check_fork_loans()
        assert s.sent[1:] == [("release_loan", "loan:alive")] and alive_r not in loans._watched
    finally:
        for fd in (alive_w, reused_r, other_r):
            try:
                os.close(fd)
            except OSError:
                pass


# -- case 6: a broken control connection is not death ------------------------------------

def test_replaced_control_connection_keeps_this_process_objects(sync):
    lst = sync.list([1, 2])
    session = lst._procshare_session
    before = sync._number_of_objects()
    session.control.ch.sock.shutdown(socket.SHUT_RDWR)      # broken, no goodbye
    session.control.pending.add(1)                          # so it is replaced
    lst.append(3)
    assert list(lst) == [1, 2, 3]
    assert poll(lambda: sync._number_of_objects() == before, 3)
    assert list(lst) == [1, 2, 3]


# -- case 7: a timed-out call on a serial object says it still runs there ----------------

# -- a dropped proxy's object is gone before the next call (as the stdlib's) ---------------

def test_the_next_call_waits_for_a_slow_del_of_a_dropped_object(lmgr):
    """The decref goes one-way on the control connection; the next call, on
    another connection, runs only once it is handled, `__del__` included."""
    watch = lmgr.Finalizing()
    slow = lmgr.Finalizing("slow", 0.3)
    del slow
    assert watch.done() == ["slow"]


def test_a_pipelined_call_runs_after_the_drops_before_it(lmgr):
    watch = lmgr.Finalizing()
    assert procshare.async_(watch).done().result(WAIT) == []
    slow = lmgr.Finalizing("slow", 0.3)
    del slow
    assert procshare.async_(watch).done().result(WAIT) == ["slow"]


def test_a_del_that_does_not_end_holds_the_next_call_back_only_for_a_while(monkeypatch):
    """A referent's `__del__` that outlasts `SYNC_PATIENCE` lets the next
    call go ahead of it (the stdlib's `del proxy` would wait for it)."""
    from procshare.server import server
    monkeypatch.setattr(server, "SYNC_PATIENCE", 0.5)     # (in the forked manager too)
    with lw.LifetimeManager(ctx=multiprocessing.get_context("fork")) as m:
        watch = m.Finalizing()
        stuck = m.Finalizing("stuck")
        del stuck
        t0 = time.monotonic()
        assert watch.done() == []       # went ahead of the waiting __del__
        waited = time.monotonic() - t0
        assert 0.4 < waited < 4.0     # it waited for the __del__, the patience (not 5 s)
        watch.release()
        assert poll(lambda: watch.done() == ["stuck"], WAIT)


def test_timeout_on_a_serial_object_says_calls_queue_behind_it(lmgr):
    s = lmgr.StrictStateful()       # serial=True: the next calls wait until it returns
    with pytest.raises(procshare.CallTimeout) as info:
        s._callmethod("hang", (2.0,), {}, timeout=0.3)
    text = str(info.value)
    assert "hang() is still running in the manager" in text
    assert "run one at a time" in text and "queue behind it" in text
    t0 = time.monotonic()
    with pytest.raises(procshare.CallTimeout) as info:
        s._callmethod("echo", (1,), {}, timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert "busy with another call" in str(info.value) and "running hang()" in str(info.value)
    assert s._callmethod("echo", (2,), {}, timeout=10) == 2


def test_timeout_on_an_object_serial_by_default_says_the_next_calls_run_beside_it(lmgr):
    from procshare.server.server import SERIAL_PATIENCE

    s = lmgr.Stateful()
    with pytest.raises(procshare.CallTimeout) as info:
        s._callmethod("hang", (2.0,), {}, timeout=0.3)
    text = str(info.value)
    assert "hang() is still running in the manager" in text
    assert f"wait up to {SERIAL_PATIENCE:g} s behind it, then run beside it" in text
    assert "serial=True" in text
    t0 = time.monotonic()
    assert s._callmethod("echo", (1,), {}, timeout=10) == 1    # while hang() runs
    assert SERIAL_PATIENCE - 0.01 <= time.monotonic() - t0 < 2.0
    assert lmgr._control("object_state", s._id)["running"] == "hang"


# -- case 8: defects found by reading the code -------------------------------------------

def test_condition_wait_at_the_deadline_takes_the_lock_back(sync):
    cond = sync.Condition()
    with pytest.raises(procshare.CallTimeout):
        with procshare.timeout(0.3):
            with cond:          # __exit__ must find the lock held again
                cond.wait()
    got = []
    t = threading.Thread(target=lambda: got.append(cond.acquire(timeout=5)))
    t.start()
    t.join(WAIT)
    assert got == [True]


def test_serial_reply_is_serialized_under_the_lock(lmgr):
    s = lmgr.Stateful()
    s.grow(1000)
    errors = []

    def grow():
        try:
            for _ in range(200):
                s.grow(50)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=grow)
    t.start()
    sizes = []
    while t.is_alive():
        sizes.append(len(s.get_d()))    # a dict that must not change while pickled
    t.join(WAIT)
    assert not errors and sizes and sizes == sorted(sizes)


def test_update_item_on_a_dict_is_not_overlapped_by_a_call_that_waited(sync, tmp_path):
    """A dict's calls keep strict turns (no patience): a set that came while
    a slow update_item ran waits for it, so neither change is lost."""
    d = sync.dict({"k": 0})
    mark = str(tmp_path / "started")
    func = functools.partial(lw.slow_increment, mark)
    t = threading.Thread(target=d.update_item, args=("k", func))
    t.start()
    assert poll(lambda: os.path.exists(mark), 5)       # update_item's func runs
    t0 = time.monotonic()
    d["k"] = 100
    took = time.monotonic() - t0
    t.join(WAIT)
    assert d["k"] == 100 and took > 0.2


def test_getvalue_repr_and_str_wait_for_a_running_call(lmgr):
    s = lmgr.StrictStateful()
    t = threading.Thread(target=s.work, args=(1.0,))
    t.start()
    assert poll(lambda: lmgr._control("object_state", s._id)["running"] == "work", 5)
    assert s._getvalue().busy is False
    t.join(WAIT)
    assert "Stateful object" in repr(s._getvalue()) and str(s)


def test_a_method_calling_back_into_its_own_object_runs(lmgr):
    s = lmgr.Stateful()
    assert s._callmethod("call_me", (s, 7), {}, timeout=10) == 7


def test_concurrent_creation_does_not_swap_attributes(lmgr):
    ones, twos = [], []
    t1 = threading.Thread(target=lw.make_many, args=(lmgr, "Attrs1", 150, ones))
    t2 = threading.Thread(target=lw.make_many, args=(lmgr, "Attrs2", 150, twos))
    t1.start()
    t2.start()
    t1.join(60)
    t2.join(60)
    assert len(ones) == len(twos) == 150
    assert all(p._attributes_ == ("kind",) for p in ones)
    assert all(p._attributes_ == ("size", "other") for p in twos)
    assert ones[0].kind == "one" and twos[0].size == 2


def test_a_notify_taken_by_a_gone_waiter_reaches_a_live_one(sync):
    ctx = multiprocessing.get_context("fork")
    cond = sync.Condition()
    ready = sync.Event()
    # a child waits on the condition, then dies; a live thread here waits too
    child = _workers.start_child(ctx, cond_wait_forever, cond, ready)
    assert ready.wait(WAIT)
    got = []

    def live_wait():
        with cond:
            got.append(cond.wait(10))

    t = threading.Thread(target=live_wait)
    t.start()
    assert poll(lambda: _waiters(sync, cond) == 2, WAIT)
    pid = child.process.pid
    child.kill()
    # the manager has seen the death (its lease ended): now one notify
    assert poll(lambda: all(c["pid"] != pid for c in sync.clients()), WAIT)
    with cond:
        cond.notify()       # one notify: it must reach the live waiter
    t.join(WAIT)
    assert got == [True]


def cond_wait_forever(cond, ready):
    with cond:
        ready.set()
        cond.wait(60)


def _waiters(m, cond) -> int:
    for d in m.locks():
        if d["id"] == cond._id:
            return len(d["waiters"])
    return -1


def test_a_thread_that_ends_closes_its_connection_at_once(sync):
    """Each thread that calls opens a connection of its own; when the thread
    ends, the connection closes then, quietly (as the stdlib's does), not at
    some later collection with a ResourceWarning: an unclosed socket each."""
    import gc

    lst = sync.list()

    def work():
        lst.append(1)

    def run_threads(n):
        threads = [threading.Thread(target=work) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_threads(1)              # (whatever opens once per process is open now)
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        run_threads(5)
        assert len(os.listdir("/proc/self/fd")) == before, "an ended thread's socket is open"
    finally:
        gc.enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], \
        [str(w.message) for w in caught]
    assert len(lst) == 6


def test_errors_for_an_address_where_no_manager_runs(tmp_path):
    address = str(tmp_path / "nothing.sock")
    m = procshare.SyncManager(address=address, authkey=b"k")
    with pytest.raises(procshare.ManagerCrashed) as info:
        m.connect()
    e = info.value
    assert isinstance(e, FileNotFoundError) and e.errno == errno.ENOENT
    assert "no manager is listening" in str(e) and "gone" not in str(e)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()
    m = procshare.SyncManager(address=("127.0.0.1", port), authkey=b"k")
    with pytest.raises(ConnectionRefusedError) as info:
        m.connect()
    assert info.value.errno == errno.ECONNREFUSED


def test_authkey_type_error_keeps_the_key_secret():
    from procshare.managers import Server
    with pytest.raises(TypeError) as info:
        Server({}, None, "s3cret-key")
    assert "s3cret" not in str(info.value) and "str" in str(info.value)


def test_accept_loop_backs_off_when_out_of_descriptors():
    from procshare.managers import Server
    srv = Server({}, None, b"k")
    calls = []

    def accept():
        calls.append(time.monotonic())
        raise OSError(errno.EMFILE, "Too many open files")

    srv.listener.accept = accept
    t = threading.Thread(target=srv.accepter, daemon=True)
    t.start()
    try:
        assert poll(lambda: len(calls) >= 5, 10), calls
    finally:
        srv.stop_event.set()
        t.join(5)
        srv.listener.close()
    # backing off, not spinning: each pause at least doubles, from 10 ms (a busy
    # machine only makes a pause longer)
    gaps = [b - a for a, b in zip(calls, calls[1:5])]
    assert all(g >= 0.009 * 2 ** i for i, g in enumerate(gaps)), gaps


def test_ended_leases_do_not_grow_without_bound():
    from procshare.server import leases
    ended = []
    table = leases.Leases(lambda c, p, how: ended.append(c))
    for i in range(leases.KEEP_ENDED + 500):
        table.control_opened(f"c{i}", 0, {})
        table.goodbye(f"c{i}")
    assert len(ended) == leases.KEEP_ENDED + 500
    assert len(table.records) <= leases.KEEP_ENDED


# -- exit against death, for locks ---------------------------------------------------------

def test_lock_of_an_exited_owner_is_taken_over_by_a_waiting_acquire(sync):
    ctx = multiprocessing.get_context("fork")
    lock = sync.Lock()
    assert _workers.run_child(ctx, lw.acquire_and_exit, lock) == "held"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lock.acquire(timeout=5)
    lock.release()
    texts = [str(w.message) for w in caught if w.category is procshare.OwnerDiedWarning]
    assert texts and "exited without releasing it" in texts[0]


def test_this_process_is_not_dead_while_it_lives(sync):
    # a child whose control connection breaks keeps its lock (it is alive)
    lock = sync.Lock()
    lock.acquire()
    session = lock._procshare_session
    session.control.ch.sock.shutdown(socket.SHUT_RDWR)
    session.control.pending.add(1)
    assert sync._number_of_objects() >= 1      # replaced the control connection
    # (forked from this thread: a fork from a thread of its own made Python 3.12+
    # warn that the process is multi-threaded)
    got = _workers.run_child(multiprocessing.get_context("fork"), try_lock, lock, timeout=WAIT)
    assert got is False         # nobody took it over from a live owner
    lock.release()


def try_lock(lock):
    return lock.acquire(timeout=0.5)


def test_os_pid_is_ours():
    assert os.getpid() > 0


def test_a_forked_server_gives_back_only_references_of_its_own():
    """The fork that starts a manager's server lends it nothing, so the
    proxies it inherits are the client's: their finalizers give nothing back
    there.  Proxies of the server's own, and of processes it forks, are
    theirs (a Pool worker's proxies are released as anywhere)."""
    from procshare.client import session
    fork = multiprocessing.get_context("fork")
    with session.forking_server():
        child = _workers.start_child(fork, lw.inherited_flags, os.getpid())
    assert child.result(15) == {"parent": True, "own": False, "flag_cleared": True,
                                "grand_parent": True, "grand_server": False,
                                "grand_own": False}
    assert not session.inherited_by_server(os.getpid())


def test_a_process_counts_as_gone_only_when_it_is_known_gone(monkeypatch):
    """Forgetting a client's stored replies, or releasing what it held, needs
    it dead: a pid gone, a zombie, or a pid reused by a later process.  Not
    reading /proc (out of file descriptors) tells nothing: such a client was
    taken for dead, and a call it re-sent could run twice."""
    from procshare.transport import processes
    me = os.getpid()
    start = processes.start_time(me)
    assert start is not None
    assert not processes.is_other_process(me, start)
    assert processes.is_other_process(me, start + 1)          # the pid reused
    kid = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    kid.start()
    kid.join(WAIT)
    assert processes.is_other_process(kid.pid, start)         # gone (reaped)
    monkeypatch.setattr(processes, "_stat", lambda pid: [])   # /proc unreadable (EMFILE)
    assert processes.start_time(me) is None
    assert not processes.is_other_process(me, start)


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_a_failure_on_a_gone_manager_keeps_no_frame_alive(how):
    """A proxy's finalizer can run in any frame (a garbage collection inside
    a call, a `del`). Giving its reference back to a manager that is gone
    fails, and that failure must not keep the frame it ran in alive: the
    proxies held there went only at a later full collection (maybe never
    within a test's wait). The same for an error a call on it raised and the
    caller caught. Checked with the collector off, as it is most of the time."""
    import gc
    import weakref
    ctx = multiprocessing.get_context("fork")
    from procshare.managers import SyncManager
    gone = SyncManager(ctx=ctx, restart="never")      # (killed, it stays dead)
    gone.start()
    doomed = [gone.list([1]), gone.list([2])]
    if how == "shutdown":
        gone.shutdown()
    else:
        os.kill(gone.pid, signal.SIGKILL)
        assert poll(lambda: not _alive(gone.pid), WAIT)
    with procshare.Manager(ctx=ctx) as live:
        def finalizer_runs_here(x):
            del doomed[0]               # its finalizer gives back to a gone manager

        def call_fails_here(x):
            try:
                doomed[0].append(3)
            except ConnectionError as e:     # (the stdlib's class for this)
                assert "manager" in str(e).lower()

        enabled = gc.isenabled()
        gc.disable()
        try:
            for body in (finalizer_runs_here, call_fails_here):
                x = live.list([0])
                ref = weakref.ref(x)
                body(x)
                del x
                assert ref() is None, f"{body.__name__}: a frame kept the proxy alive"
        finally:
            if enabled:
                gc.enable()
        del doomed[:]
    if how == "sigkill":
        gone.shutdown()       # (tidies what the killed server left)


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("not today")


def test_failures_leave_no_cycle_through_procshare_frames():
    """The guard behind the test above, over the kinds of failure a caller
    can catch: none may leave a reference cycle through a frame of
    procshare's (an exception kept past its except block, a future holding
    an exception whose traceback holds the frame that holds the future).
    Such a cycle keeps whatever those frames held (proxies, arguments, shared
    memory) until a full collection. With the collector off, each failure
    is run and caught; then a collection that saves what it frees must find
    no procshare frame among it."""
    import gc
    ctx = multiprocessing.get_context("fork")
    from procshare.managers import SyncManager
    ran = []

    def caught(what, fn, expected):
        try:
            fn()
        except expected:
            ran.append(what)

    with procshare.Manager(ctx=ctx) as live:
        gone = SyncManager(ctx=ctx, restart="never")
        gone.start()
        d, lst, q = live.dict(), live.list(), live.Queue()
        doomed = [gone.list([1]), gone.list([2])]
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            caught("KeyError from the referent", lambda: d["missing"], KeyError)
            caught("IndexError from the referent", lst.pop, IndexError)
            caught("an argument that cannot be pickled",
                   lambda: d.__setitem__("k", _Unpicklable()),
                   procshare.ArgumentsNotSerializable)
            caught("a method the referent lacks", lambda: d._callmethod("no_such_method"),
                   procshare.NotExposedError)
            caught("a constructor's error", lambda: live.list(1, 2, 3), procshare.RemoteError)
            caught("a stdlib-style dispatch's error", lambda: _dispatch_error(live),
                   procshare.RemoteError)
            caught("a deadline", lambda: _with_timeout(0.05, q.get), procshare.CallTimeout)
            caught("a pipelined call's error",
                   lambda: procshare.async_(lst).pop().result(WAIT), IndexError)
            gone.shutdown()
            caught("a call on a gone manager", lambda: doomed[0].append(2), ConnectionError)
            caught("a new object on a gone manager", gone.dict, procshare.ManagerNotRunning)
            del doomed[:]       # their finalizers give references back to a gone manager
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            frames = sorted({f"{o.f_code.co_name} ({os.path.basename(o.f_code.co_filename)})"
                             for o in gc.garbage if type(o).__name__ == "frame"
                             and f"{os.sep}procshare{os.sep}" in o.f_code.co_filename})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            if enabled:
                gc.enable()
    assert len(ran) == 10, ran
    assert not frames, f"procshare frames left in reference cycles: {frames}"


def _dispatch_error(manager):
    from procshare.managers import dispatch
    conn = manager._Client(manager._address, authkey=manager._authkey)
    try:
        dispatch(conn, None, "no_such_request")
    finally:
        conn.close()


def _with_timeout(seconds, fn):
    with procshare.timeout(seconds):
        return fn()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Holder:
    pass


def _fork_with_cycles(manager, q, deadlock: str) -> None:
    """Fork a child (`collect_while_opening`) while 20 proxies of `manager`
    sit in unreachable cycles, with the collector off until then; fail with
    `deadlock` if the child does not exit."""
    import gc
    ctx = multiprocessing.get_context("fork")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(20):     # proxies only a collection frees
            h = _Holder()
            h.me, h.p = h, manager.list()
        del h
        child = ctx.Process(target=lw.collect_while_opening, args=(q,))
        child.start()
    finally:
        if enabled:
            gc.enable()
    child.join(WAIT)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(deadlock)
    assert child.exitcode == 0


def _report(fd: int) -> bytes:
    """What the child wrote to the pipe `fd` before it exited (the managers'
    servers also have its write end, so no end of file comes)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def test_a_collection_while_a_connection_opens_does_not_deadlock(sync, monkeypatch, request):
    """A collection can run a proxy's finalizer while this thread opens a
    connection, with the transport's (not re-entrant) mutex held: the forked
    child's first connection, here, with proxies of the parent's in
    unreachable cycles. Their decrefs must not open another connection there
    (it deadlocked, and the parent waited in join() for ever); they go with
    the next message. The collection is forced where it was seen to happen
    (the arena pool made under the mutex), in place of an unlucky automatic one."""
    import gc

    from procshare.client import session
    from procshare.transport import slots
    made = slots.ArenaPool
    parent = os.getpid()
    report_r, report_w = os.pipe()
    request.addfinalizer(lambda: (os.close(report_r), os.close(report_w)))

    def collecting_pool(*args, **kwds):
        gc.collect()
        if os.getpid() != parent and session._sessions:     # the child: what the
            n = sum(len(s.deferred) for s in list(session._sessions.values()))
            os.write(report_w, b"%d," % n)                  # decrefs did (a pipe: no
        return made(*args, **kwds)                          # connection opens here)

    monkeypatch.setattr(slots, "ArenaPool", collecting_pool)

    q = sync.Queue()
    keep = sync.list()          # a live proxy: the child has references to adopt
    base = len(sync.objects())
    _fork_with_cycles(sync, q, "the child deadlocked in a finalizer run while it opened "
                      "a connection")
    put_off = _report(report_r)
    assert put_off and int(put_off.split(b",")[0]) > 0, put_off     # they were put off
    assert q.get(timeout=WAIT) == "ran"
    assert q.get(timeout=WAIT) == 0          # ...and sent since
    gc.collect()                             # (the parent's cycles too)
    assert poll(lambda: len(sync.objects()) <= base, WAIT), sync.objects()
    del keep


def test_a_collection_while_a_connection_opens_waits_for_no_other_threads_session(
        sync, monkeypatch, request):
    """The same collection, while another thread holds the lock of the session
    the finalizers' decrefs are for, and waits for the transport's mutex that
    this thread holds (it opens its own connection too). A decref that waited
    for that lock deadlocked both threads; it is put off, and goes first on
    that session's next use of its control connection."""
    import gc

    from procshare.client import session
    from procshare.transport import slots
    made = slots.ArenaPool
    parent = os.getpid()

    def collecting_pool(*args, **kwds):
        other = [s for s in list(session._sessions.values())
                 if s.address == address and not s.lock._is_owned()]
        if os.getpid() != parent and other and not done:    # the child (not a manager's
            done.append(True)               # server), opening another connection
            holding = threading.Event()

            def hold_then_open():
                with other[0].lock:
                    holding.set()
                    with slots._client_mutex:   # what opening its connection needs
                        pass

            threading.Thread(target=hold_then_open, daemon=True).start()
            if holding.wait(WAIT):
                gc.collect()
                # what the decrefs did: put off (a pipe: no connection opens here)
                os.write(report_w, b"%d" % len(other[0].deferred))
        return made(*args, **kwds)

    monkeypatch.setattr(slots, "ArenaPool", collecting_pool)
    done: list = []
    address = None                      # the other manager's, once started
    report_r, report_w = os.pipe()
    request.addfinalizer(lambda: (os.close(report_r), os.close(report_w)))

    with procshare.Manager(ctx=multiprocessing.get_context("fork")) as other:
        address = other.address
        q = sync.Queue()
        keep = (sync.list(), other.list())      # the child adopts references of both
        base = len(other.objects())
        _fork_with_cycles(other, q, "the child deadlocked: a finalizer waited for a "
                          "session's lock held by a thread that waited for the "
                          "transport's mutex")
        put_off = _report(report_r)
        assert put_off and int(put_off) > 0, put_off    # the case arose, and was put off
        assert q.get(timeout=WAIT) == "ran"
        assert q.get(timeout=WAIT) == 0          # ...and sent since
        gc.collect()
        assert poll(lambda: len(other.objects()) <= base, WAIT), other.objects()
        del keep
