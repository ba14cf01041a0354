"""Pipelined and asyncio calls: procshare.async_, procshare.oneway, procshare.aio.
Correctness only (ordering, results, errors, deadlines, cancellation), under
fork and spawn; speed is measured by benchmarks/, not here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import select
import socket
import sys
import threading
import time

import pytest

import _async_workers as aw
import _workers
import procshare
from _helpers import FAULT_START_METHODS
from procshare.managers import BaseManager
from procshare.transport import channel
from procshare.transport.channel import Channel
from procshare.wire.frames import pack_frame
from procshare.wire.kinds import Kind


class BoomManager(BaseManager):
    pass


BoomManager.register("Boom", aw.Boom)


class GateManager(BaseManager):
    pass


GateManager.register("Waiter", aw.GateWaiter, serial=False)
GateManager.register("SerialWaiter", aw.GateWaiter, serial=True)
GateManager.register("Opener", aw.GateOpener, serial=False)


@pytest.fixture(params=FAULT_START_METHODS)
def mp_ctx(request):
    return multiprocessing.get_context(request.param)


@pytest.fixture
def sync():
    with procshare.Manager(ctx=multiprocessing.get_context("fork")) as m:
        yield m


def test_futures_keep_call_order_and_return_results(sync):
    lst = sync.list()
    a = procshare.async_(lst)
    futs = [a.append(i) for i in range(2000)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futs)
    assert [f.result(30) for f in futs] == [None] * 2000
    assert list(lst) == list(range(2000))
    d = sync.dict()
    futs = [procshare.async_(d).setdefault(i % 7, i) for i in range(50)]
    assert [f.result(30) for f in futs] == [i % 7 for i in range(50)]


def test_errors_arrive_in_their_futures():
    with BoomManager(ctx=multiprocessing.get_context("fork")) as m:
        b = m.Boom()
        ok, bad = procshare.async_(b).echo(1), procshare.async_(b).fail("no")
        assert ok.result(10) == 1
        with pytest.raises(ValueError, match="no") as info:
            bad.result(10)
        assert "In the manager process" in str(info.value.__cause__)
        # an argument that cannot be serialized raises at once, and nothing is sent
        with pytest.raises(procshare.ArgumentsNotSerializable):
            procshare.async_(b).echo(threading.Lock())
        assert procshare.async_(b).echo(2).result(10) == 2


def test_deadline_gives_call_timeout_and_takes_nothing(sync):
    q = sync.Queue()
    fut = procshare.async_(q, timeout=0.3).get()
    with pytest.raises(procshare.CallTimeout):
        fut.result(10)
    q.put("later")
    assert q.get(timeout=5) == "later"
    # a get whose item was there before the deadline delivers it
    q.put("now")
    assert procshare.async_(q, timeout=5).get().result(10) == "now"


def test_cancel_cancels_in_the_manager(sync):
    q = sync.Queue()
    fut = procshare.async_(q).get()
    assert fut.cancel()
    assert fut.cancelled()
    # cancel() returned once the manager had it, so the abandoned get cannot
    # take an item put now
    q.put("item")
    assert q.get(timeout=5) == "item"



def test_a_wakeup_for_another_future_is_not_a_timeout(sync):
    # result() waits on the pipe's Condition: f2's is woken when f1 settles,
    # and must go on waiting for f2 (not raise TimeoutError early)
    q = sync.Queue()
    aq = procshare.async_(q)
    f1, f2 = aq.get(), aq.get()
    settled = f2._settled      # the pipe's Condition, which result() waits on

    def put_while_waiting():
        # once the main thread waits on the Condition, an item settles f1 only
        end = time.monotonic() + 10
        while not settled._waiters and time.monotonic() < end:
            time.sleep(0.001)
        q.put("one")

    t = threading.Thread(target=put_while_waiting)
    t.start()
    start = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        f2.result(1.0)
    assert time.monotonic() - start >= 0.9
    t.join(10)
    assert f1.result(10) == "one" and not f2.done()
    with pytest.raises(concurrent.futures.TimeoutError):
        f2.exception(0.05)
    # wait() on a pending future installs its waiter in the list made on first use
    assert not concurrent.futures.wait([f2], timeout=0.05).done
    assert "_waiters_" in vars(f2) and f2._waiters == []
    q.put("two")
    assert f2.result(10) == "two" and f2.exception(1) is None


def test_call_futures_work_with_wait_and_as_completed(sync):
    lst = sync.list()
    a = procshare.async_(lst)
    futs = [a.append(i) for i in range(200)]
    done, pending = concurrent.futures.wait(futs, timeout=30)
    assert len(done) == 200 and not pending
    futs = [a.__len__() for _ in range(50)]
    got = [f.result() for f in concurrent.futures.as_completed(futs, timeout=30)]
    assert got == [200] * 50
    seen = []
    called = threading.Event()
    f = a.__len__()
    f.add_done_callback(lambda fut: (seen.append(fut.result()), called.set()))
    assert f.result(10) == 200
    assert called.wait(10) and seen == [200]
    assert "finished" in repr(f) and f.done() and not f.running()
    # a future nobody waited on with wait() nor gave a callback made no list
    # for them (they are made on first use, which wait(), as_completed() and
    # add_done_callback() above did for the futures still pending then)
    plain = a.__len__()
    assert plain.result(10) == 200
    assert not {"_waiters_", "_callbacks_"} & set(vars(plain))
    late = []
    plain.add_done_callback(late.append)    # settled already: called at once
    assert late == [plain] and plain._done_callbacks == []


def test_replies_that_arrive_together_settle_every_kind_of_future(sync):
    """The reader settles the replies of one receive together and wakes the
    pipe's waiters once: futures that nobody holds a Condition of are settled
    there; those with a callback, in a `wait()`, cancelled, or failing take
    the general way, amid the others."""
    lst = sync.list(range(10))
    a = procshare.async_(lst)
    seen = []
    futs, waited, cancelled, failing = [], [], [], []
    for i in range(600):
        if i % 97 == 5:
            f = a.__getitem__(99)       # IndexError, amid the others
            failing.append(f)
        else:
            f = a.__getitem__(i % 10)
            if i % 7 == 0:
                f.add_done_callback(lambda fut, i=i: seen.append((i, fut.result())))
            elif i % 11 == 0:
                waited.append(f)
            elif i % 89 == 0 and f.cancel():
                cancelled.append(f)
        futs.append(f)
    assert not concurrent.futures.wait(waited, timeout=30).not_done
    for i, f in enumerate(futs):
        if f in failing:
            with pytest.raises(IndexError):
                f.result(30)
        elif f in cancelled:
            assert f.cancelled()
        else:
            assert f.result(30) == i % 10
    assert sorted(seen) == [(i, i % 10) for i in range(0, 600, 7) if i % 97 != 5]


def test_a_waiter_is_woken_when_a_broken_frame_follows_its_reply(monkeypatch):
    """The reader settles a reply and, in the same batch, meets a frame that
    breaks the connection: the thread waiting in result() for the settled
    future is woken all the same (it slept on, its future finished)."""
    from procshare.client import pipeline
    from procshare.transport import channel
    from procshare.wire.frames import FrameError

    def broken(self):
        raise FrameError("a malformed frame after the reply (simulated)")

    with procshare.SyncManager() as m:
        ev = m.Event()
        monkeypatch.setattr(channel.Channel, "buffered_frame", broken)   # before the reader
        fut = procshare.async_(ev).wait(30)
        settled = pipeline._pipe(ev).settled
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", fut.result()), daemon=True)
        t.start()
        end = time.monotonic() + 10
        while not settled._waiters and time.monotonic() < end:
            time.sleep(0.001)
        assert settled._waiters
        threading.Thread(target=ev.set, daemon=True).start()     # its own connection
        t.join(10)
        assert not t.is_alive() and got == {"r": True}


def test_waiting_on_futures_of_two_pipes_from_two_threads_does_not_deadlock():
    # wait() and as_completed() lock each future's Condition in the order of
    # id(future): that cannot deadlock only if each future has its own (a lock
    # shared by the futures of a pipe gave two threads opposite orders)
    from procshare.client.pipeline import CallFuture

    class FakePipe:
        def __init__(self):
            self.settled = threading.Condition()

    p, q = FakePipe(), FakePipe()
    # made alternately, so that their ids interleave: some p-future lies below a
    # q-future and another above one, whatever way the allocator goes
    pool = sorted([(CallFuture(pipe, 0, None, "m", None), name)
                   for _ in range(50) for pipe, name in ((p, "p"), (q, "q"))],
                  key=lambda t: id(t[0]))
    ps = [f for f, n in pool if n == "p"]
    qs = [f for f, n in pool if n == "q"]
    first = next([a, b] for a in ps for b in qs if id(a) < id(b))
    second = next([b, a] for a in ps for b in qs
                  if id(b) < id(a) and a not in first and b not in first)
    done = []

    def wait_many(fs):
        for _ in range(20_000):
            concurrent.futures.wait(fs, timeout=0)
        done.append(fs)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=wait_many, args=(fs,), daemon=True)
                   for fs in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    assert len(done) == 2, "two threads waiting on futures of two pipes deadlocked"
    # and the futures still work: settle them, wait for them
    for f in first + second:
        f.set_result(1)
    assert concurrent.futures.wait(first + second, timeout=5).not_done == set()
    assert [f.result(1) for f in second] == [1, 1]


def test_oneway_calls_are_ordered_with_later_calls(sync):
    lst = sync.list()
    ow = procshare.oneway(lst)
    for i in range(500):
        assert ow.append(i) is None
    assert procshare.async_(lst).__len__().result(10) == 500
    assert list(lst) == list(range(500))


# -- replies to pipelined calls go out together, but never wait for a blocked call ------
def _held_pair():
    """(manager's channel, holding replies; the client's raw socket)."""
    a, b = socket.socketpair()
    ch = Channel(a)
    ch.hold_replies()
    return ch, b


def _calls(*rids: int) -> bytes:
    return b"".join(pack_frame(Kind.CALL, rid, b"call %d" % rid) for rid in rids)


def _replies(*rids: int) -> bytes:
    return b"".join(pack_frame(Kind.RETURN, rid, b"reply %d" % rid) for rid in rids)


def _nothing_to_read(sock) -> bool:
    return not select.select([sock], [], [], 0)[0]


def _read_exactly(sock, n: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "the manager's side closed"
        got += chunk
    return got


@pytest.fixture
def no_watch(monkeypatch):
    """The watch waits an hour: only the channel's own rules write what it holds."""
    monkeypatch.setattr(channel, "HOLD_LIMIT", 3600.0)
    yield
    monkeypatch.undo()
    with channel._watch.cond:       # it may be waiting that hour: look again
        channel._watch.cond.notify()


def test_replies_while_more_requests_are_buffered_go_out_together(no_watch):
    ch, peer = _held_pair()
    try:
        peer.sendall(_calls(1, 2, 3))
        for rid in (1, 2):
            assert ch.recv_frame()[1] == rid
            ch.send_reply(pack_frame(Kind.RETURN, rid, b"reply %d" % rid))
            assert _nothing_to_read(peer)       # held: request 3 is here already
        assert ch.recv_frame()[1] == 3
        ch.send_reply(pack_frame(Kind.RETURN, 3, b"reply 3"))   # nothing behind it: now
        assert _read_exactly(peer, len(_replies(1, 2, 3))) == _replies(1, 2, 3)
        # anything else the channel writes goes after them, never before
        peer.sendall(_calls(4, 5))
        assert ch.recv_frame()[1] == 4
        ch.send_reply(pack_frame(Kind.RETURN, 4, b"reply 4"))
        ch.send_bytes(pack_frame(Kind.TRACEBACK, 9, b"other"))
        want = _replies(4) + pack_frame(Kind.TRACEBACK, 9, b"other")
        assert _read_exactly(peer, len(want)) == want
    finally:
        ch.close()
        peer.close()


def test_held_replies_go_before_the_channel_waits_and_at_most_hold_max(no_watch):
    ch, peer = _held_pair()
    try:
        partial = _calls(2)[:5]
        peer.sendall(_calls(1) + partial)       # request 2 has begun, not ended
        assert ch.recv_frame()[1] == 1
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert _nothing_to_read(peer)
        with pytest.raises(TimeoutError):
            ch.recv_frame(time.monotonic() + 0.05)
        # written before the channel waited for the rest of request 2
        assert _read_exactly(peer, len(_replies(1))) == _replies(1)
        peer.sendall(_calls(2)[5:])
        assert ch.recv_frame()[1] == 2
        n = channel.HOLD_MAX + 5
        peer.sendall(_calls(*range(10, 10 + n)))
        for rid in range(10, 10 + channel.HOLD_MAX):
            assert ch.recv_frame()[1] == rid
            ch.send_reply(pack_frame(Kind.RETURN, rid, b"reply %d" % rid))
        want = _replies(*range(10, 10 + channel.HOLD_MAX))
        assert _read_exactly(peer, len(want)) == want       # no more held than HOLD_MAX
    finally:
        ch.close()
        peer.close()


def test_held_replies_go_within_hold_limit_whatever_the_thread_does():
    """The thread that holds them runs a call that never returns (here: does
    nothing more with the channel): the watch writes them."""
    ch, peer = _held_pair()
    try:
        peer.sendall(_calls(1, 2))
        assert ch.recv_frame()[1] == 1
        t0 = time.monotonic()
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert _read_exactly(peer, len(_replies(1))) == _replies(1)
        assert time.monotonic() - t0 >= channel.HOLD_LIMIT * 0.9
        with ch._out:           # (the watch empties the list after its write)
            assert not ch.held
        # and the channel goes on as before
        assert ch.recv_frame()[1] == 2
        ch.send_reply(pack_frame(Kind.RETURN, 2, b"reply 2"))
        assert _read_exactly(peer, len(_replies(2))) == _replies(2)
    finally:
        ch.close()
        peer.close()


def _fill(ch: Channel) -> None:
    """Write whole frames to `ch` until its socket takes no more."""
    ch.sock.setblocking(False)
    filler = pack_frame(Kind.RETURN, 99, b"x" * 4000)
    try:
        while True:
            ch.sock.send(filler)
    except BlockingIOError:
        pass
    finally:
        ch.sock.setblocking(True)


def _drain_until(sock, tail: bytes, timeout: float = 10.0) -> bytes:
    sock.setblocking(False)
    got = b""
    end = time.monotonic() + timeout
    while not got.endswith(tail) and time.monotonic() < end:
        try:
            got += sock.recv(1 << 16)
        except BlockingIOError:
            select.select([sock], [], [], 0.05)
    return got


def test_the_watch_does_not_wait_for_a_peer_that_reads_nothing():
    """One client reads nothing (its socket is full), and its connection's own
    thread is stuck writing to it: the replies another connection holds still
    go, and the stuck one's go once its client reads again."""
    stuck, stuck_peer = _held_pair()
    ch, peer = _held_pair()
    writer = None
    try:
        _fill(stuck)
        stuck_peer.sendall(_calls(1, 2, 3, 4))
        assert stuck.recv_frame()[1] == 1
        stuck.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert stuck.recv_frame()[1] == 2
        # its own thread writes what it holds, blocked on the full socket (holding _out)
        writer = threading.Thread(target=stuck.send_bytes,
                                  args=(pack_frame(Kind.RETURN, 2, b"reply 2"),), daemon=True)
        writer.start()
        end = time.monotonic() + 10
        while not stuck._out.locked() and time.monotonic() < end:
            time.sleep(0.001)
        assert stuck._out.locked() and writer.is_alive()
        peer.sendall(_calls(1, 2))
        assert ch.recv_frame()[1] == 1
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert _read_exactly(peer, len(_replies(1))) == _replies(1)
        # the stuck client reads what filled its socket, then gets its replies too
        got = _drain_until(stuck_peer, _replies(1, 2))
        assert got.endswith(_replies(1, 2))
        writer.join(10)
        assert not writer.is_alive()
        # and a reply held while nobody writes goes once its client reads
        assert stuck.recv_frame()[1] == 3      # request 4 is buffered behind it
        _fill(stuck)
        stuck.send_reply(pack_frame(Kind.RETURN, 3, b"reply 3"))
        assert stuck.held
        assert _drain_until(stuck_peer, _replies(3)).endswith(_replies(3))
    finally:
        for s in (stuck, ch, stuck_peer, peer):
            s.close()
        if writer is not None:
            writer.join(10)


def _by_flush_nowait(ch):
    ch.flush_nowait()
    return None


def _by_wait_limit(ch):
    """What a primitive does just before it waits: `wait_limit`, holding its lock."""
    from procshare.server import callctx

    st = callctx.server_state
    st.working, st.channel, st.deadline = set(), ch, None
    with threading.Lock():
        return callctx.wait_limit(0.5)


@pytest.mark.parametrize("write", [_by_flush_nowait, _by_wait_limit])
def test_a_call_about_to_wait_never_blocks_writing_held_replies(write):
    """A call about to wait (a primitive, holding its own lock) writes the
    replies held without waiting for a full socket; the watch writes the rest
    once the client reads."""
    ch, peer = _held_pair()
    try:
        _fill(ch)
        peer.sendall(_calls(1, 2))
        assert ch.recv_frame()[1] == 1
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", write(ch)), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive() and ch.held
        if write is _by_wait_limit:
            assert got["r"] == (0.5, False)
        assert _drain_until(peer, _replies(1)).endswith(_replies(1))
    finally:
        ch.close()
        peer.close()


def test_the_watch_wakes_for_a_channel_due_before_it_would():
    """The watch sleeps until its earliest channel is due (here: an hour); a
    channel that begins to hold wakes it, and goes within about HOLD_LIMIT."""
    later, later_peer = _held_pair()
    ch, peer = _held_pair()
    watch = channel._watch
    try:
        watch.add(later)                # (starts the watch if need be)
        with watch.cond:                # then: due in an hour
            watch.due[later] = time.monotonic() + 3600.0
            watch.cond.notify()
        end = time.monotonic() + 10
        while (watch.until is None or watch.until < time.monotonic() + 60) \
                and time.monotonic() < end:
            time.sleep(0.001)
        assert watch.until is not None and watch.until > time.monotonic() + 60
        peer.sendall(_calls(1, 2))
        assert ch.recv_frame()[1] == 1
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert _read_exactly(peer, len(_replies(1))) == _replies(1)
    finally:
        with watch.cond:
            watch.due.pop(later, None)
            watch.cond.notify()
        for s in (later, later_peer, ch, peer):
            s.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_forgets_the_replies_its_parent_held(no_watch):
    ch, peer = _held_pair()
    try:
        peer.sendall(_calls(1, 2))
        assert ch.recv_frame()[1] == 1
        ch.send_reply(pack_frame(Kind.RETURN, 1, b"reply 1"))
        assert ch.held
        pid = os.fork()
        if pid == 0:        # the child: nothing of the parent's to write, no lock to wait on
            ok = ch.held is None and ch._out is None
            ch.flush()
            ch.flush_nowait()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _nothing_to_read(peer) and ch.held      # still the parent's to write
        ch.flush()
        assert _read_exactly(peer, len(_replies(1))) == _replies(1)
    finally:
        ch.close()
        peer.close()


def test_results_before_a_user_method_that_blocks_arrive_while_it_blocks():
    """Pipelined calls, then one that waits in a user method (no procshare
    primitive: only the watch can write the replies held before it)."""
    with GateManager(ctx=multiprocessing.get_context("fork")) as m:
        w, opener = m.Waiter(), m.Opener()
        a = procshare.async_(w)
        before = [a.echo(i) for i in range(300)]
        blocked = a.wait(60)
        after = [a.echo(i) for i in range(5)]
        assert [f.result(10) for f in before] == list(range(300))
        end = time.monotonic() + 10
        while not opener.entered() and time.monotonic() < end:
            time.sleep(0.005)
        assert opener.entered() and not blocked.done()
        opener.open()
        assert blocked.result(10) is True
        assert [f.result(10) for f in after] == list(range(5))


def test_results_before_a_call_that_waits_in_the_manager_arrive_while_it_waits(monkeypatch):
    """A call that waits on a primitive, or for a serial object another call
    holds, writes the replies held before it as it starts to wait (the watch
    is slowed down here, in the manager forked from this process, so that
    only that can write them)."""
    monkeypatch.setattr(channel, "HOLD_LIMIT", 3600.0)
    with GateManager(ctx=multiprocessing.get_context("fork")) as m:
        sw, opener = m.SerialWaiter(), m.Opener()
        holder = threading.Thread(target=sw.wait, args=(60,), daemon=True)
        holder.start()              # holds the serial object's lock, waiting at the gate
        end = time.monotonic() + 10
        while not opener.entered() and time.monotonic() < end:
            time.sleep(0.005)
        assert opener.entered()
        with procshare.Manager(ctx=multiprocessing.get_context("fork")) as sync:
            lst, ev = sync.list(), sync.Event()
            before = [procshare.async_(lst).append(i) for i in range(300)]
            waits = procshare.async_(ev).wait(60)
            assert [f.result(10) for f in before] == [None] * 300
            threading.Thread(target=ev.set, daemon=True).start()
            assert waits.result(10) is True
        a = procshare.async_(opener)
        before = [a.entered() for _ in range(300)]
        busy = procshare.async_(sw).echo("after")   # waits for the holder's call
        assert [f.result(10) for f in before] == [True] * 300
        assert not busy.done()
        opener.open()
        holder.join(10)
        assert busy.result(10) == "after"


def test_futures_in_child_processes(sync, mp_ctx):
    lst = sync.list()
    assert _workers.run_child(mp_ctx, aw.pipelined_appends, lst, 300, timeout=60) == 300
    assert list(lst) == list(range(300))


def test_aio_many_calls_from_many_tasks(sync):
    d = sync.dict()

    async def main():
        p = procshare.aio.wrap(d)
        await asyncio.gather(*(p.__setitem__(i, i) for i in range(300)))
        values = await asyncio.gather(*(p.get(i) for i in range(300)))
        return values, await p.__len__()

    values, n = asyncio.run(main())
    assert values == list(range(300)) and n == 300


def test_aio_cancel_cancels_the_call_in_the_manager(sync):
    q = sync.Queue()

    async def main():
        p = procshare.aio.wrap(q)
        task = asyncio.ensure_future(p.get())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return True

    assert asyncio.run(main())
    q.put("item")
    assert q.get(timeout=5) == "item"


def test_aio_timeout_and_errors():
    with BoomManager(ctx=multiprocessing.get_context("fork")) as m:
        b = m.Boom()

        async def main():
            p = procshare.aio.wrap(b)
            with pytest.raises(ValueError):
                await p.fail("x")
            return await p.echo(5)

        assert asyncio.run(main()) == 5


def test_aio_in_child_processes(sync, mp_ctx):
    d = sync.dict()
    assert _workers.run_child(mp_ctx, aw.aio_in_child, d, 100, timeout=60) == 100


def test_aio_with_uvloop(sync):
    uvloop = pytest.importorskip("uvloop", reason="uvloop is optional (pip install uvloop)")
    d = sync.dict()

    async def main():
        p = procshare.aio.wrap(d)
        await asyncio.gather(*(p.__setitem__(i, -i) for i in range(100)))
        return await p.__len__()

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == 100
    finally:
        loop.close()


def test_async_refuses_what_is_not_a_proxy():
    with pytest.raises(TypeError, match="procshare proxy"):
        procshare.async_({"a": 1})
