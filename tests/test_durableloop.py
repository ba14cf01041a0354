"""The durable loop: while several clients write durable objects at once,
one manager thread serves their durable calls (`server/durableloop.py`).
Real processes; every wait is bounded; what the loop did is read from the
manager (`server_info`)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

import _workers
import procshare
from _helpers import FAULT_START_METHODS, poll, process_gone
from procshare.server import durableloop

WAIT = 30.0


@pytest.fixture(params=FAULT_START_METHODS)
def mp_ctx(request):
    return multiprocessing.get_context(request.param)


def _loop_stats(m) -> dict:
    return m._control("server_info")["durable_loop"] or {}


def _writers(ctx, d, n, stop, **kw):
    return [_workers.start_child(ctx, _workers.durable_writer_until, w, d, stop, **kw)
            for w in range(n)]


def _values(d, n) -> list:
    got = d._getvalue()
    return [got.get(f"k{w}", -1) for w in range(n)]


def _all_advance(d, n, timeout=WAIT) -> bool:
    """Every writer's key moves on (they all make progress)."""
    before = _values(d, n)
    return poll(lambda: all(a > b for a, b in zip(_values(d, n), before)), timeout)


def test_several_writers_are_served_by_the_loop_with_right_errors(mp_ctx):
    """Four writers at once: the loop serves most of their calls, each
    writer's sets land, and a KeyError the loop serves comes back as the
    KeyError of a plain dict."""
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d, stop = m.dict(durable=True), mp_ctx.Event()
        writers = _writers(mp_ctx, d, 4, stop, errors_every=7)
        try:
            # (every writer has begun: under spawn one may start after the others
            # have made the loop serve hundreds of calls)
            assert poll(lambda: min(_values(d, 4)) >= 0
                        and _loop_stats(m).get("calls", 0) > 500, WAIT), _loop_stats(m)
        finally:
            stop.set()
        results = [w.result(WAIT) for w in writers]
        assert all(type(r) is int and r > 0 for r in results), results
        assert _values(d, 4) == [r - 1 for r in results]
        stats = _loop_stats(m)
        assert stats["rounds"] < stats["calls"], stats     # commits shared between calls


def test_a_parked_connection_takes_a_blocking_call_back_to_its_thread(mp_ctx):
    """A writer whose connection the loop serves makes a call that waits (a
    get on a plain queue): its own thread serves it, and the loop goes on
    serving the others meanwhile."""
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d, q, stop = m.dict(durable=True), m.Queue(), mp_ctx.Event()
        started = mp_ctx.Event()
        others = _writers(mp_ctx, d, 3, stop)
        try:
            assert poll(lambda: _loop_stats(m).get("calls", 0) > 200, WAIT)
            getter = _workers.start_child(mp_ctx, _workers.durable_writer_then_blocking_get,
                                          3, d, q, started, 300)
            assert started.wait(WAIT)
            assert _all_advance(d, 3), "the other writers stalled while one waited"
            q.put("item")
            assert getter.result(WAIT) == "item"
        finally:
            stop.set()
        assert all(type(r) is int for r in (w.result(WAIT) for w in others))
        assert d["k3"] == 599


def test_a_call_the_loop_reads_and_leaves_is_unpickled_once(mp_ctx, tmp_path):
    """Calls on a plain object from connections the loop serves go back to
    their threads with their arguments already unpickled: each argument is
    unpickled once (its unpickling may have side effects)."""
    path = str(tmp_path / "probes")
    n = 300
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d, plain = m.dict(durable=True), m.list()
        barrier = mp_ctx.Barrier(4)     # (under spawn, writers start far apart)
        writers = [_workers.start_child(mp_ctx, _workers.durable_writer_with_probes, w, d,
                                        plain, n, path, barrier) for w in range(4)]
        assert [w.result(WAIT) for w in writers] == [n] * 4
        assert len(plain) == 4 * n
        assert _loop_stats(m)["calls"] > 0
    with open(path) as f:
        lines = f.read().split()
    assert len(lines) == len(set(lines)) == 4 * n, "some argument was unpickled twice"


def test_a_writer_killed_while_parked_leaves_the_others_going(mp_ctx):
    with procshare.SyncManager(ctx=mp_ctx) as m:
        d, stop = m.dict(durable=True), mp_ctx.Event()
        # (the victim watches an Event of its own: `is_set()` takes the Event's
        # lock, and a SIGKILL there would leave it held, stalling whoever shares it)
        victims_stop = mp_ctx.Event()
        writers = [_workers.start_child(mp_ctx, _workers.durable_writer_until, 0, d,
                                        victims_stop)]
        writers += [_workers.start_child(mp_ctx, _workers.durable_writer_until, w, d, stop)
                    for w in (1, 2, 3)]
        try:
            assert poll(lambda: _loop_stats(m).get("calls", 0) > 500, WAIT)
            victim = writers[0].process
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(WAIT)
            assert poll(lambda: victim.pid not in {c["pid"] for c in m._control("clients")},
                        WAIT), "the killed writer's connections stayed"
            before = _values(d, 4)
            assert poll(lambda: all(a > b for a, b in zip(_values(d, 4)[1:], before[1:])),
                        WAIT), "the other writers stalled"
        finally:
            stop.set()
        for w in writers[1:]:
            assert type(w.result(WAIT)) is int


def test_a_lone_writer_goes_back_to_its_own_thread():
    """Once the other writers are done, the loop hands the last one back
    (SOLO_ROUNDS), and it is served by its own thread again."""
    ctx = multiprocessing.get_context("fork")
    with procshare.SyncManager(ctx=ctx) as m:
        d, stop, stop_last = m.dict(durable=True), ctx.Event(), ctx.Event()
        writers = _writers(ctx, d, 3, stop)
        last = _workers.start_child(ctx, _workers.durable_writer_until, 3, d, stop_last)
        try:
            assert poll(lambda: _loop_stats(m).get("calls", 0) > 500, WAIT)
        finally:
            stop.set()
        assert all(type(w.result(WAIT)) is int for w in writers)
        # the lone writer goes on; the loop gives it back and serves nothing more
        assert poll(lambda: _loop_stats(m)["handed_back"] >= 1, WAIT)
        calls = _loop_stats(m)["calls"]
        k = d["k3"]
        assert poll(lambda: d["k3"] > k + 10 * durableloop.SOLO_ROUNDS, WAIT)
        later = _loop_stats(m)["calls"]
        assert later - calls <= 2 * durableloop.SOLO_ROUNDS, (calls, later)
        stop_last.set()
        assert type(last.result(WAIT)) is int


def test_shutdown_with_parked_connections_is_prompt():
    ctx = multiprocessing.get_context("fork")
    m = procshare.SyncManager(ctx=ctx)
    m.start()
    try:
        d, stop = m.dict(durable=True), ctx.Event()
        writers = _writers(ctx, d, 4, stop)
        assert poll(lambda: _loop_stats(m).get("calls", 0) > 500, WAIT)
        pid = m.pid
        t0 = time.monotonic()
        m.shutdown()
        assert time.monotonic() - t0 < 5.0
        assert poll(lambda: process_gone(pid), 5.0)
    finally:
        stop.set()
    for w in writers:       # each ends, with a count or with the error of its last set
        w.result(WAIT)



def test_a_failing_loop_answers_what_it_applied_and_gives_every_connection_back(
        monkeypatch):
    """A bug in the loop (here: its reply step raises, once, mid-run): the
    calls it applied get an error that says so, every connection goes back
    to its own thread, the writers go on there, and nothing is parked again."""
    original = durableloop.DurableLoop._reply

    def failing_reply(self, served):
        if self.stats["rounds"] >= 300:
            raise RuntimeError("injected bug")
        return original(self, served)

    monkeypatch.setattr(durableloop.DurableLoop, "_reply", failing_reply)
    ctx = multiprocessing.get_context("fork")   # (the manager inherits the patch)
    with procshare.SyncManager(ctx=ctx) as m:
        d, stop = m.dict(durable=True), ctx.Event()
        writers = _writers(ctx, d, 4, stop)
        try:
            assert poll(lambda: _loop_stats(m).get("rounds", 0) >= 300, WAIT), _loop_stats(m)
            # the loop stopped: no more calls go through it
            assert poll(lambda: _loop_stats(m)["parked"] == _loop_stats(m)["handed_back"],
                        WAIT), _loop_stats(m)
            stats = _loop_stats(m)
            # writers go on, on their own threads: those the failure did not
            # answer, and two new ones writing at once (which the loop would park)
            writers += [_workers.start_child(ctx, _workers.durable_writer_until, w, d, stop)
                        for w in (4, 5)]
            going = [w for w in range(6) if not writers[w].finished()]
            before = _values(d, 6)
            assert poll(lambda: all(_values(d, 6)[w] > before[w] + 100 for w in going
                                    if not writers[w].finished()), WAIT), "writers stalled"
            assert _loop_stats(m) == stats, "the failed loop served calls again"
        finally:
            stop.set()
        results = [w.result(WAIT) for w in writers]
        errors = [r for r in results if type(r) is str]
        assert errors, results      # the round that failed had calls
        for w, r in enumerate(results):
            if type(r) is int:
                assert d[f"k{w}"] == r - 1
                continue
            assert r.startswith("set ") and "RuntimeError" in r, r
            assert "durable loop" in r and "check the object" in r, r
            # it names the call: the method and the object
            assert f"__setitem__() on the durable dict object {d._id}" in r, r
            # "the call was applied": the value it set is there
            assert d[f"k{w}"] == int(r.split()[1].rstrip(":")), (r, d[f"k{w}"])


# -- the loop's rules, in-process (no thread: its methods on stand-ins) ----------

class _Sent:
    def __init__(self):
        self.frames = []

    def send_from_loop(self, data):
        self.frames.append(data)


def _parked():
    from procshare.server.callctx import CallState

    class Info:
        pass

    info = Info()
    info.channel, info.call = _Sent(), CallState()
    info.client, info.session, info.conn = "c", "s", 1
    return durableloop._Parked(info)


def test_a_failed_commit_is_reported_only_for_the_calls_it_lost():
    """One wait covers a round; if it fails, each call says whether its own
    commit happened (another thread's commit may have taken it)."""
    from procshare.server import journal
    from procshare.server.durables import Applied
    from procshare.wire.frames import pack_frame
    from procshare.wire.kinds import Kind

    class Journal:
        def wait(self, ticket, timeout=None):
            if ticket > 3:      # tickets up to 3 were committed, then a commit failed
                raise journal.JournalBroken("disk I/O error")

    class Durables:
        journal = Journal()

        def finish(self, got, info):
            return (Kind.RETURN, None)

        def _broken(self, e):
            return (Kind.ERROR, e)

    class Server:
        durables = Durables()
        none_body = b"None"

        def encode_reply(self, rid, kind, payload, oid=None, meth=None):
            return (rid, kind, str(payload))

    loop = durableloop.DurableLoop.__new__(durableloop.DurableLoop)
    loop.server = Server()
    p = _parked()
    served = [(p, rid, Applied(None, "D:x", "__setitem__", journal.Done(t, True, None), None))
              for rid, t in ((1, 2), (2, 3), (3, 4))]
    loop._reply(served)
    assert served == []
    assert p.info.channel.frames == [pack_frame(Kind.RETURN, 1, b"None"),
                                     pack_frame(Kind.RETURN, 2, b"None"),
                                     (3, Kind.ERROR, "disk I/O error")]
    assert p.info.call.done_rid == 3


def test_a_cancelled_call_is_left_to_its_thread_as_the_running_one():
    """The loop makes a frame's request the running one before it looks for
    a cancel, as the connection's thread does: a cancel then either finds it
    cancelled before it ran, or running (never "not started" and then run)."""
    from procshare.wire.kinds import Kind

    loop = durableloop.DurableLoop.__new__(durableloop.DurableLoop)
    p = _parked()
    p.info.call.cancel_rid = 5
    got = loop._serve(p, (Kind.CALL, 5, float("nan"), b"", ()))
    assert type(got) is durableloop._Back and got.call is None
    assert p.info.call.rid == 5


def _loop_gives_back_unread(ch, client):
    """With a call from `client` waiting on `ch`, the loop's `_read` gives
    the connection back to its thread and leaves the call unread."""
    from procshare.wire.frames import pack_frame
    from procshare.wire.kinds import Kind

    p = _parked()
    p.info.channel = ch
    client.sendall(pack_frame(Kind.CALL, 2, b"next call"))
    loop = durableloop.DurableLoop.__new__(durableloop.DurableLoop)
    served, back = [], []
    loop._read(p, served, back)
    assert served == [] and back == [(p, None)]


def _next_call_is_there(ch):
    """The call `_loop_gives_back_unread` sent is next on `ch`, for its thread."""
    from procshare.wire.kinds import Kind

    kind, rid, _budget, body, _bufs = ch.recv_frame(time.monotonic() + WAIT)
    assert (kind, rid, bytes(body)) == (Kind.CALL, 2, b"next call")


def test_a_connection_whose_client_reads_no_replies_goes_back_to_its_thread():
    """Back-pressure: replies the socket did not take are still held, so the
    loop reads nothing more from that connection and gives it back (its
    thread's next write waits for the client); the next call stays unread for
    that thread, behind the held replies."""
    import socket
    import threading

    from procshare.transport.channel import Channel
    from procshare.wire.frames import pack_frame
    from procshare.wire.kinds import Kind

    ours, client = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ch = Channel(ours)
    try:
        ch.hold_replies()
        big = pack_frame(Kind.RETURN, 1, b"x" * (1 << 20))
        ch.send_from_loop(big)
        assert ch.held, "the socket took a 1 MiB reply at once"
        _loop_gives_back_unread(ch, client)

        got = bytearray()

        def read_all():
            while len(got) < len(big):
                data = client.recv(1 << 16)
                if not data:
                    return
                got.extend(data)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        ch.flush()              # what the connection's thread does first
        reader.join(WAIT)
        assert bytes(got) == big
        _next_call_is_there(ch)
    finally:
        ch.close()
        client.close()


def test_a_connection_that_owes_its_client_notices_goes_back_to_its_thread():
    """Notices owed to the client (slots it may use again) ride only on its
    thread's frames, not on what the loop writes: such a connection goes back,
    with its next call unread, and its thread's next frame carries them."""
    import collections
    import socket

    from procshare.transport.channel import Channel

    ours, client = socket.socketpair()
    ch = Channel(ours)
    try:
        ch.hold_replies()
        ch.notices = collections.deque(["a release"])
        _loop_gives_back_unread(ch, client)
        _next_call_is_there(ch)
    finally:
        ch.close()
        client.close()


def test_a_failing_loop_gives_back_a_frame_it_read_after_a_call_it_served():
    """A connection with a call the failed round served and then a frame the
    loop left to its thread (a pipelining client) gets the error reply and
    goes back with that frame: nothing it sent is lost.  The error names the
    call; a call that had failed at once gets its own reply."""
    from procshare.server.durables import Applied
    from procshare.server.registry import Entry
    from procshare.wire.kinds import Kind

    class Server:
        def error_reply(self, e):
            return (Kind.ERROR, e)

        def encode_reply(self, rid, kind, payload, oid=None, meth=None):
            return (rid, kind, str(payload))

    loop = durableloop.DurableLoop.__new__(durableloop.DurableLoop)
    loop.server = Server()
    loop.channels = durableloop.ChannelSet()
    loop.stats = {"handed_back": 0}
    p = _parked()
    p.info.channel.fileno = lambda: -1
    entry = Entry(obj={}, typeid="dict", exposed=frozenset(), method_to_typeid=None,
                  lock=None)
    frame = (Kind.CALL, 9, float("nan"), b"body", ())
    loop._served = [(p, 7, Applied(entry, "7f00", "__setitem__", None, None)),
                    (p, 8, (Kind.ERROR, "KeyError('k')"))]
    loop._back = [(p, (frame, None))]
    try:
        loop._fail_round()
    finally:
        loop.channels.close()
    assert [f[:2] for f in p.info.channel.frames] == [(7, Kind.ERROR), (8, Kind.ERROR)]
    first, second = p.info.channel.frames[0][2], p.info.channel.frames[1][2]
    assert "durable loop" in first and "__setitem__() on the durable dict object 7f00" in first
    assert second == "KeyError('k')"
    assert p.out and p.back == (frame, None)
