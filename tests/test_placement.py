"""Placement: on a busy machine a manager's connection thread sleeps on the CPU
of its client's thread, and only while it sleeps (`transport.placement`).
Behaviour only; what it saves is measured by benchmarks/, not here."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import _workers
import procshare.transport.placement as placement
from _workers import subprocess_env
from procshare.transport.channel import Channel
from procshare.transport.processes import host_identity
from procshare.wire.frames import pack_frame
from procshare.wire.kinds import Kind

_ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
#: placement needs two CPUs to choose from; elsewhere it must stay off
_CAN_PLACE = placement.ENABLED and len(_ALLOWED) > 1


def _hello(**over):
    h = {"pid": os.getpid(), "tid": threading.get_native_id(), "pidns": host_identity()[1]}
    h.update(over)
    return h


def _mask(pid: int, tid: int | str) -> set[int] | None:
    """A thread's allowed CPUs, as /proc shows them to another thread (None:
    the thread ended meanwhile)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    out: set[int] = set()
                    for part in line.split(":", 1)[1].strip().split(","):
                        lo, _, hi = part.partition("-")
                        out.update(range(int(lo), int(hi or lo) + 1))
                    return out
    except OSError:
        return None
    raise AssertionError(f"no Cpus_allowed_list for thread {pid}/{tid}")


class _OnOneCpu:
    """Run this thread on one CPU of its mask (the 'client' whose CPU a
    placement follows); its own mask comes back afterwards."""

    def __enter__(self) -> int:
        self.cpu = max(_ALLOWED)
        os.sched_setaffinity(0, {self.cpu})
        return self.cpu

    def __exit__(self, *exc) -> None:
        os.sched_setaffinity(0, _ALLOWED)


def test_a_placement_is_made_only_for_a_thread_of_the_unix_socket_peer():
    a, b = socket.socketpair()
    tcp_server = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(tcp_server.getsockname())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        p = placement.for_peer(a, _hello())
        if placement.ENABLED:
            assert isinstance(p, placement.Placement)
            assert (p.pid, p.tid) == (os.getpid(), threading.get_native_id())
        else:
            assert p is None
        # never for a TCP peer, a thread that is not the peer's, a pid that is
        # not the socket's, another pid namespace, or a hello without a thread
        assert placement.for_peer(tcp, _hello()) is None
        assert placement.for_peer(a, _hello(tid=child.pid)) is None
        assert placement.for_peer(a, _hello(pid=child.pid, tid=child.pid)) is None
        assert placement.for_peer(a, _hello(pidns="pid:[1]")) is None
        assert placement.for_peer(a, _hello(tid=0)) is None
        assert placement.for_peer(a, {"pid": os.getpid()}) is None
    finally:
        child.kill()
        child.wait()
        for s in (a, b, tcp, tcp_server):
            s.close()


def test_placement_is_off_when_the_environment_says_so():
    code = "import procshare.transport.placement as p; print(p.ENABLED, p.ALWAYS)"
    out = subprocess.run([sys.executable, "-c", code],
                         env=subprocess_env(PROCSHARE_PLACEMENT="0"),
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]
    out = subprocess.run([sys.executable, "-c", code],
                         env=subprocess_env(PROCSHARE_PLACEMENT="always"),
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split()[1] == "True"


def test_an_idle_machine_places_nothing(monkeypatch):
    monkeypatch.setattr(placement, "ALWAYS", False)
    monkeypatch.setattr(placement, "core_free", lambda: True)
    p = placement.Placement(os.getpid(), threading.get_native_id())
    assert [p.target() for _ in range(3 * placement.LOOK_EVERY)] == \
        [None] * (3 * placement.LOOK_EVERY)


def test_one_wait_in_look_every_is_placed_on_the_clients_cpu(monkeypatch):
    monkeypatch.setattr(placement, "core_free", lambda: False)
    p = placement.Placement(os.getpid(), threading.get_native_id())
    targets = [p.target() for _ in range(2 * placement.LOOK_EVERY)]
    assert [i for i, t in enumerate(targets) if t is not None] == \
        [placement.LOOK_EVERY - 1, 2 * placement.LOOK_EVERY - 1]   # never a first wait
    if _CAN_PLACE:
        with _OnOneCpu() as cpu:        # the client's thread stays on one CPU
            p.left = 0
            assert p.target() == cpu
    # while other connections of the manager work, nothing is placed, and the
    # count starts again: LOOK_EVERY quiet waits before the next placed one
    p.left = 0
    assert [p.target(True) for _ in range(3 * placement.LOOK_EVERY)] == \
        [None] * (3 * placement.LOOK_EVERY)
    targets = [p.target() for _ in range(placement.LOOK_EVERY)]
    assert [i for i, t in enumerate(targets) if t is not None] == [placement.LOOK_EVERY - 1]
    # the client's thread is gone: no more looking
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    deadline = time.monotonic() + 10    # (join returns before the OS thread is gone)
    while os.path.exists(f"/proc/self/task/{t.native_id}"):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    p = placement.Placement(os.getpid(), t.native_id)
    assert [p.target() for _ in range(2 * placement.LOOK_EVERY)] == \
        [None] * (2 * placement.LOOK_EVERY)
    assert p.left > 1e9


class _Receiver:
    """A thread that waits for one frame on `ch` once told to go, and records
    the frame (or error) and its own mask afterwards."""

    def __init__(self, ch: Channel, timeout: float | None = None) -> None:
        self.ch, self.seen, self.timeout = ch, {}, timeout
        self.go, self.asleep = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()     # (before the test narrows its own thread: a new
        #                          thread inherits its creator's mask)

    def _run(self) -> None:
        self.seen["tid"] = threading.get_native_id()
        self.seen["before"] = os.sched_getaffinity(0)
        if not self.go.wait(10):
            return
        self.asleep.set()
        try:
            self.seen["frame"] = self.ch.recv_frame(
                None if self.timeout is None else time.monotonic() + self.timeout)
        except BaseException as e:      # (checked by the test)
            self.seen["error"] = e
        self.seen["after"] = os.sched_getaffinity(0)

    def sleep_placed(self, cpu: int) -> None:
        """Let it receive, in a wait placed on this thread's CPU `cpu`, and
        return once it sleeps there."""
        _follow_me(self.ch)
        self.go.set()
        assert self.asleep.wait(10)
        self.wait_for_mask({cpu})

    def wait_for_mask(self, want: set[int]) -> None:
        deadline = time.monotonic() + 10
        while _mask(os.getpid(), self.seen["tid"]) != want:
            assert time.monotonic() < deadline, \
                f"the sleeping thread's mask stayed {_mask(os.getpid(), self.seen['tid'])}"
            time.sleep(0.001)

    def join(self) -> dict:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.seen


def _receive_placed(ch: Channel, meanwhile, timeout: float | None = None) -> dict:
    """One receive on `ch` by a `_Receiver`, in a wait placed on this thread's
    CPU; `meanwhile(receiver, cpu)` runs once it sleeps there.  What the
    receiver saw."""
    r = _Receiver(ch, timeout)
    with _OnOneCpu() as cpu:
        r.sleep_placed(cpu)
        meanwhile(r, cpu)
        return r.join()


@contextlib.contextmanager
def _placed_pair(monkeypatch):
    """(channel, its peer's socket) on a machine that looks busy; both closed
    afterwards.  Give the channel a `Placement` to place its waits."""
    monkeypatch.setattr(placement, "core_free", lambda: False)
    a, b = socket.socketpair()
    ch = Channel(a)
    try:
        yield ch, b
    finally:
        ch.close()
        b.close()


def _follow_me(ch: Channel) -> placement.Placement:
    """Place `ch`'s next wait on this thread's CPU."""
    ch.place = placement.Placement(os.getpid(), threading.get_native_id())
    ch.place.left = 0           # (the next wait is the 16th)
    return ch.place


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_placed_wait_narrows_the_mask_only_while_it_sleeps(monkeypatch):
    with _placed_pair(monkeypatch) as (ch, b):
        # a frame arrives: the receiver slept on the client's CPU, and has its
        # own mask back when the frame is returned
        seen = _receive_placed(ch, lambda r, cpu: b.sendall(pack_frame(Kind.CALL, 7, b"body")))
        assert "error" not in seen, seen.get("error")
        assert seen["frame"][:2] == (Kind.CALL, 7)
        assert seen["before"] == seen["after"] == _ALLOWED
        # the peer hangs up during a placed wait: the mask comes back all the same
        seen = _receive_placed(ch, lambda r, cpu: b.close())
        assert isinstance(seen.get("error"), EOFError)
        assert seen["after"] == _ALLOWED


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_placed_wait_that_times_out_gives_the_mask_back(monkeypatch):
    with _placed_pair(monkeypatch) as (ch, b):
        seen = _receive_placed(ch, lambda r, cpu: None, timeout=0.5)
        assert isinstance(seen.get("error"), TimeoutError)
        assert seen["after"] == _ALLOWED


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_mask_set_by_someone_else_during_the_sleep_stays(monkeypatch):
    moved: dict = {}

    def taskset_then_send(r, cpu):
        moved["to"] = min(_ALLOWED - {cpu})
        os.sched_setaffinity(r.seen["tid"], {moved["to"]})     # `taskset -p` meanwhile
        b.sendall(pack_frame(Kind.CALL, 5, b"y"))

    with _placed_pair(monkeypatch) as (ch, b):
        seen = _receive_placed(ch, taskset_then_send)
        assert seen["frame"][:2] == (Kind.CALL, 5)
        assert seen["after"] == {moved["to"]}


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_wait_is_placed_only_within_the_threads_own_mask(monkeypatch):
    """A wait is narrowed only within the thread's mask as it is then: a
    thread on one CPU (a call set it) whose client runs on another keeps its
    CPU, during the sleep and after."""
    mine = min(_ALLOWED)
    with _placed_pair(monkeypatch) as (ch, b):
        os.sched_setaffinity(0, {mine})
        try:
            r = _Receiver(ch)       # started narrowed: {mine} is its own mask
        finally:
            os.sched_setaffinity(0, _ALLOWED)
        with _OnOneCpu() as cpu:    # the client, on another CPU
            assert cpu != mine
            place = _follow_me(ch)
            r.go.set()
            assert r.asleep.wait(10)
            deadline = time.monotonic() + 10
            while place.cpu is None:    # until the look is done
                assert time.monotonic() < deadline
                time.sleep(0.001)
            assert place.cpu == cpu
            assert _mask(os.getpid(), r.seen["tid"]) == {mine}
            b.sendall(pack_frame(Kind.CALL, 3, b"x"))
            seen = r.join()
        assert seen["frame"][:2] == (Kind.CALL, 3)
        assert seen["before"] == seen["after"] == {mine}


def _until_placed(pid: int, cpu: int, call, deadline: float) -> None:
    """Make calls until a thread of the manager `pid` is seen waiting on
    {cpu} (a placed wait lasts until the next call arrives)."""
    while True:
        call()
        for _ in range(200):
            if any(_mask(pid, t) == {cpu} for t in os.listdir(f"/proc/{pid}/task")):
                return
        assert time.monotonic() < deadline, "no manager thread ever waited on the client's CPU"


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_managers_thread_follows_its_client_and_calls_never_see_it(ctx):
    import procshare.managers as pm

    Manager = _workers.get_class(pm, "AffinityManager")
    m = Manager(ctx=ctx)
    m.start(_workers.place_always)
    try:
        r = m.AffinityReporter()
        full = r.mask()
        assert len(full) > 1
        pid = m._process.pid
        with _OnOneCpu() as cpu:
            masks = []
            _until_placed(pid, cpu, lambda: masks.append(r.mask()), time.monotonic() + 20)
            # calls run with the thread's whole mask, and so do its children
            for _ in range(2 * placement.LOOK_EVERY):
                masks.append(r.mask())
            assert all(mk == full for mk in masks), masks
            assert r.forked_mask() == repr(full)
            assert r.subprocess_mask() == repr(full)
        assert r.mask() == full
    finally:
        m.shutdown()


@pytest.mark.skipif(not _CAN_PLACE, reason="placement needs Linux and two CPUs")
def test_a_pipelines_connection_is_never_placed():
    import procshare
    import procshare.managers as pm

    Manager = _workers.get_class(pm, "AffinityManager")
    m = Manager()
    m.start(_workers.place_always)
    try:
        r = m.AffinityReporter()
        pid = m._process.pid
        with _OnOneCpu() as cpu:
            a = procshare.async_(r)
            for _ in range(4 * placement.LOOK_EVERY):
                a.mask().result(10)
                assert not any(_mask(pid, t) == {cpu} for t in os.listdir(f"/proc/{pid}/task"))
            # (the same manager places a plain connection, as the test above shows)
            _until_placed(pid, cpu, r.mask, time.monotonic() + 20)
    finally:
        m.shutdown()
