"""Scenarios 5 and 16: Queue, JoinableQueue, blocked get vs put, the stdlib
docs' remote-queue example, and a registered callable returning queue.Queue."""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time

import pytest

import _workers
from _helpers import blocked_in_call


def test_queue_basics(manager):
    q = manager.Queue()
    assert q.empty() is True
    assert q.qsize() == 0
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    for item in (1, "two", [3], {"four": 4}, None):
        q.put(item)
    assert q.qsize() == 5
    assert q.empty() is False
    assert q.full() is False
    assert [q.get(timeout=5) for _ in range(4)] == [1, "two", [3], {"four": 4}]
    assert q.get_nowait() is None
    assert q.empty() is True


def test_a_queue_with_a_maxsize_that_is_no_number(manager):
    q = manager.Queue("x")      # made as queue.Queue("x") is: put compares it
    with pytest.raises(TypeError, match="'>' not supported"):
        q.put(1)


def test_queue_maxsize(manager):
    q = manager.Queue(2)
    q.put("a")
    q.put_nowait("b")
    assert q.full() is True
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    with pytest.raises(queue.Full):
        q.put("c", timeout=0.1)
    with pytest.raises(queue.Full):
        q.put("c", block=False)
    assert q.get(timeout=5) == "a"
    assert q.full() is False
    q.put("c", timeout=1)
    assert [q.get(timeout=5), q.get(timeout=5)] == ["b", "c"]


def test_joinable_queue(manager, ctx):
    q = manager.JoinableQueue()
    for i in range(3):
        q.put(i)
    child = _workers.start_child(ctx, _workers.joinable_consume, q, 3)
    # join() returns once the child called task_done() three times.
    assert _join_within(q, 10), "JoinableQueue.join() did not return"
    assert child.result(15) == [0, 1, 2]
    with pytest.raises(ValueError):
        q.task_done()  # more task_done() calls than items
    q.put("x")
    assert q.get(timeout=5) == "x"
    assert not _join_within(q, 0.3)  # one unfinished task left
    q.task_done()
    assert _join_within(q, 5)


def _join_within(q, timeout):
    """JoinableQueue.join() has no timeout: run it in a thread, bounded."""
    t = threading.Thread(target=q.join, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def test_blocked_get_does_not_block_put(manager, ctx):
    q = manager.Queue()
    calling = ctx.Event()
    child = _workers.start_child(ctx, _workers.queue_get_timed, q, 10, calling)
    assert calling.wait(15)
    assert blocked_in_call(child.process.pid, manager=manager)      # blocked in get()
    t0 = time.monotonic()
    q.put("hello")
    put_time = time.monotonic() - t0
    item, waited = child.result(15)
    assert item == "hello"
    assert put_time < 1.0, f"put() waited {put_time:.2f}s behind a blocked get()"
    assert waited < 9.0


def test_blocked_get_same_process_other_thread(manager):
    q = manager.Queue()
    out = []
    calling = threading.Event()
    tid: list = []

    def get() -> None:
        tid.append(threading.get_native_id())
        q.qsize()       # (this thread's connection opens here)
        calling.set()
        out.append(q.get(timeout=10))

    t = threading.Thread(target=get)
    t.start()
    assert calling.wait(10)
    assert blocked_in_call(os.getpid(), tid[0], manager)   # blocked in get()
    t0 = time.monotonic()
    q.put(5)
    assert time.monotonic() - t0 < 1.0
    t.join(10)
    assert out == [5]


def test_remote_queue_example(impl, ctx):
    """The stdlib docs' example: a server serving a module-level queue.Queue
    over TCP with get_server().serve_forever(); one client blocks in get()
    while another puts."""
    name = _workers.impl_name(impl)
    cls = _workers.get_class(impl, "QueueManager")
    authkey = b"remote-queue-secret"
    listening, child_end = ctx.Pipe(duplex=False)
    server = ctx.Process(
        target=_workers.remote_queue_server, args=(name, child_end, authkey), daemon=True
    )
    server.start()
    child_end.close()
    try:
        # (the server picks its port and says it once it listens: a port picked
        # here and bound there could be taken meanwhile, and a connect retried
        # before it listens can connect a socket to itself)
        assert listening.poll(30), "the server never said where it listens"
        address = tuple(listening.recv())
        listening.close()
        putter = cls(address=address, authkey=authkey)
        putter.connect()
        q = putter.get_queue()
        calling = ctx.Event()
        getter = _workers.start_child(
            ctx, _workers.remote_queue_client_get, name, address, authkey, 10, calling
        )
        assert calling.wait(15)
        assert blocked_in_call(getter.process.pid)     # blocked in get()
        t0 = time.monotonic()
        q.put("over tcp")
        put_time = time.monotonic() - t0
        item, waited = getter.result(15)
        assert item == "over tcp"
        assert put_time < 1.0, f"put() waited {put_time:.2f}s behind a blocked get()"
        assert q.qsize() == 0
        # A wrong authkey is refused.
        bad = cls(address=address, authkey=b"wrong")
        with pytest.raises(multiprocessing.AuthenticationError):
            bad.connect()
        del q
    finally:
        server.terminate()
        server.join(5)
        if server.is_alive():
            server.kill()
            server.join(2)


def test_registered_callable_returning_queue_stays_concurrent(impl, ctx):
    """Scenario 16: an object of a thread-safe stdlib type (queue.Queue)
    returned by a registered callable keeps concurrent semantics: a get()
    blocked through one proxy does not block a put() through another proxy of
    the same object."""
    cls = _workers.get_class(impl, "QueueManager")
    with cls(ctx=ctx) as m:
        q_get = m.get_queue()
        q_put = m.get_queue()
        calling = ctx.Event()
        child = _workers.start_child(ctx, _workers.queue_get_timed, q_get, 5, calling)
        assert calling.wait(15)
        assert blocked_in_call(child.process.pid)     # blocked in get()
        t0 = time.monotonic()
        q_put.put("concurrent")
        put_time = time.monotonic() - t0
        item, waited = child.result(15)
        assert item == "concurrent"
        assert put_time < 1.0, f"put() waited {put_time:.2f}s behind a blocked get()"
        assert waited < 4.0
        del q_get, q_put


def test_queue_put_from_child_parent_gets(manager, ctx):
    q = manager.Queue()
    _workers.run_child(ctx, _workers.queue_put, q, ("from", os.getpid()))
    assert q.get(timeout=5) == ("from", os.getpid())
