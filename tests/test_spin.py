"""Spinning in one process: a receive busy-polls only while no other channel of
its `working` set is working (threads of one process share a GIL).  Behaviour
only; speed is measured by benchmarks/, not here."""

from __future__ import annotations

import socket
import threading
import time

from pytest import approx

from procshare.transport.channel import Channel
from procshare.transport.spin import SpinPolicy
from procshare.wire.frames import pack_frame
from procshare.wire.kinds import Kind


class _Always(SpinPolicy):
    __slots__ = ()

    def budget(self) -> float:
        return 1e-4     # would spin, whatever the machine's load


class _Probe(Channel):
    """A channel that records its busy-polls."""

    __slots__ = ("polls",)

    def _poll(self, budget):
        self.polls.append(budget)
        return super()._poll(budget)


def _pair(working: set) -> tuple[_Probe, socket.socket]:
    a, b = socket.socketpair()
    ch = _Probe(a)
    ch.polls = []
    ch.spin = _Always()
    ch.working = working
    return ch, b


def test_a_receive_spins_only_while_no_other_channel_works():
    working: set = set()
    ch, peer = _pair(working)
    other, other_peer = _pair(working)
    polls = ch.polls
    try:
        peer.sendall(pack_frame(Kind.CALL, 1, b"x"))
        assert ch.recv_frame(time.monotonic() + 5)[:2] == (Kind.CALL, 1)
        assert polls == [1e-4] and working == {ch}     # alone: it spun; now it works
        working.add(other)                              # another thread runs a call
        peer.sendall(pack_frame(Kind.CALL, 2, b"y"))
        assert ch.recv_frame(time.monotonic() + 5)[:2] == (Kind.CALL, 2)
        assert polls == [1e-4], "it spun while another channel was working"
        working.discard(other)
    finally:
        for s in (ch, other):
            s.close()
        peer.close()
        other_peer.close()


def test_a_sleeping_receive_is_not_working():
    working: set = set()
    ch, peer = _pair(working)
    got: list = []
    t = threading.Thread(target=lambda: got.append(ch.recv_frame(time.monotonic() + 10)))
    try:
        t.start()
        end = time.monotonic() + 5
        while (ch in working or not t.is_alive()) and time.monotonic() < end:
            time.sleep(0.001)       # until it spun out and sleeps in recv
        assert ch not in working and t.is_alive()
        peer.sendall(pack_frame(Kind.CALL, 3, b"z"))
        t.join(5)
        assert got and got[0][:2] == (Kind.CALL, 3)
        assert working == {ch}
    finally:
        ch.close()
        peer.close()


def test_after_a_miss_a_poll_gives_the_cpu_away_between_attempts(monkeypatch):
    """A poll that caught nothing may have kept its peer off the CPU: the next
    CROWDED_POLLS polls that catch their data yield between attempts; a
    channel whose polls keep catching never yields."""
    from procshare.transport import channel, spin

    yields = []
    monkeypatch.setattr(channel, "_sched_yield", lambda: yields.append(1))
    ch, peer = _pair(set())
    try:
        def nothing_comes():
            try:
                ch.recv_frame(time.monotonic() + 0.01)
            except TimeoutError:
                return
            raise AssertionError("a frame came from nowhere")

        nothing_comes()
        assert ch.polls and not yields          # it polled, never having missed
        assert ch.spin.crowded == spin.CROWDED_POLLS
        nothing_comes()
        assert yields, "a poll after a miss did not yield"
        for rid in range(spin.CROWDED_POLLS):   # polls that catch their data...
            peer.sendall(pack_frame(Kind.CALL, rid, b"x"))
            assert ch.recv_frame(time.monotonic() + 5)[:2] == (Kind.CALL, rid)
        assert ch.spin.crowded == 0             # ...end it
        del yields[:]
        nothing_comes()
        assert not yields
    finally:
        ch.close()
        peer.close()


# -- the budget: how long a receive polls (a fake clock, no sockets) -------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _policy(monkeypatch, clock):
    from procshare.transport import spin

    monkeypatch.setattr(spin, "SPIN_SECONDS", 50e-6)
    monkeypatch.setattr(spin, "LONG_SPIN_SECONDS", 200e-6)
    monkeypatch.setattr(spin, "core_free", lambda: True)
    monkeypatch.setattr(spin, "_perf", clock)
    monkeypatch.setattr(spin, "_allowance", spin.BUCKET)
    monkeypatch.setattr(spin, "_allowance_at", clock.now)
    return spin


def test_a_miss_doubles_the_next_poll_up_to_the_cap(monkeypatch):
    spin = _policy(monkeypatch, _Clock())
    p = spin.SpinPolicy()
    p.long()
    p.hit(10e-6)
    assert p.budget() == approx(30e-6)              # three times the usual wait...
    p.miss()
    assert p.budget() == approx(60e-6)              # ...doubled after a miss
    p.miss()
    assert p.budget() == approx(120e-6)
    p.miss()
    assert p.budget() == approx(200e-6)             # the cap of a long channel
    p.miss()
    assert p.budget() == approx(200e-6)


def test_a_poll_covers_twice_the_longest_wait_it_caught_lately(monkeypatch):
    spin = _policy(monkeypatch, _Clock())
    p = spin.SpinPolicy()
    p.long()
    for _ in range(20):                     # mostly short waits, now and then a long one
        p.budget()
        p.hit(5e-6)
        p.budget()
        p.hit(5e-6)
        p.budget()
        p.hit(60e-6)
    assert p.budget() >= 120e-6             # (three times the average would miss it)
    for _ in range(200):                    # then only short ones: it is forgotten
        p.budget()
        p.hit(5e-6)
    assert p.budget() == approx(15e-6, rel=0.05)
    short = spin.SpinPolicy()
    short.hit(60e-6)
    assert short.budget() == approx(50e-6)  # never past the channel's cap


def test_missed_polls_are_paid_from_one_allowance_per_process(monkeypatch):
    """Polls that catch nothing stop when the process's allowance is spent,
    on every channel at once, and start again as time refills it: over time
    a process wastes no more than WASTE of a core on them."""
    clock = _Clock()
    spin = _policy(monkeypatch, clock)
    a, b = spin.SpinPolicy(), spin.SpinPolicy()
    a.long()
    spent = 0.0
    while a.budget():
        spent += a.last
        a.miss()
    # (the last poll may overdraw it, by one budget at most)
    assert spin.BUCKET <= spent < spin.BUCKET + 200e-6
    assert b.budget() == 0.0                # the other channel pays from the same one
    owed = -spin._allowance
    clock.now += (owed + 100e-6) / spin.WASTE   # time pays the debt, and 100 us more
    assert b.budget() == approx(50e-6)
    b.hit(10e-6)                            # a poll that catches its data costs nothing
    assert spin._allowance == approx(100e-6)
    assert b.budget() == approx(30e-6)
    b.miss()
    assert spin._allowance == approx(70e-6)
    clock.now += 3600.0                     # saved up to BUCKET at most
    assert a.budget() == approx(200e-6)
    assert spin._allowance == approx(spin.BUCKET - 200e-6)


def test_a_budget_is_granted_while_the_allowance_lasts_whatever_its_size(monkeypatch):
    """Short polls that keep missing do not shut longer ones out, and a
    budget larger than the whole allowance (PROCSHARE_SPIN_US=2000) is
    still granted: a poll only has to find the allowance above zero."""
    clock = _Clock()
    spin = _policy(monkeypatch, clock)
    monkeypatch.setattr(spin, "_allowance", 10e-6)
    long = spin.SpinPolicy()
    long.long()
    long.hit(100e-6)
    assert long.budget() == approx(200e-6)
    long.hit(100e-6)
    monkeypatch.setattr(spin, "SPIN_SECONDS", 2e-3)
    big = spin.SpinPolicy()
    assert big.budget() == approx(2e-3)     # more than BUCKET: granted, and owed
    big.miss()
    assert spin._allowance < 0
    assert big.budget() == 0.0


def test_no_spinning_when_the_cores_are_busy_or_it_is_off(monkeypatch):
    spin = _policy(monkeypatch, _Clock())
    p = spin.SpinPolicy()
    monkeypatch.setattr(spin, "core_free", lambda: False)
    assert p.budget() == 0.0
    monkeypatch.setattr(spin, "core_free", lambda: True)
    monkeypatch.setattr(spin, "SPIN_SECONDS", 0.0)
    assert p.budget() == 0.0


class _Never(SpinPolicy):
    __slots__ = ()

    def budget(self) -> float:
        return 0.0      # sleeps at once


def _task_state(tid: int) -> tuple[str, int]:
    """(the thread's scheduler state letter, its voluntary context switches)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    with open(f"/proc/self/task/{tid}/status") as f:
        switches = next(int(line.split()[1]) for line in f
                        if line.startswith("voluntary_ctxt_switches"))
    return state, switches


def _asleep(tid: int) -> int:
    """Wait (bounded) until thread `tid` sleeps; its voluntary switches then."""
    deadline = time.monotonic() + 5
    while True:
        state, switches = _task_state(tid)
        if state == "S":
            return switches
        assert time.monotonic() < deadline, f"thread {tid} never slept ({state})"
        time.sleep(0)   # (yield the GIL to it)


def _wakeups_while_the_peer_reads(slow: bool, writes: int = 20) -> int:
    """Voluntary switches of a thread waiting in `recv_frame` while the peer
    reads, one by one, `writes` messages that thread's channel sent."""
    a, b = socket.socketpair()
    ch = Channel(a)
    ch.spin = _Never()
    if slow:
        ch.slow_replies()
    for _ in range(writes):
        ch.sock.sendall(b"r" * 16)
    got: list = []
    tids: list = []

    def wait() -> None:
        tids.append(threading.get_native_id())
        got.append(ch.recv_frame(None))

    t = threading.Thread(target=wait)
    t.start()
    try:
        while not tids:
            time.sleep(0)
        before = _asleep(tids[0])
        for _ in range(writes):
            assert b.recv(16) == b"r" * 16
            after = _asleep(tids[0])
        b.sendall(pack_frame(Kind.RETURN, 1, b"done"))
        t.join(5)
        assert got and got[0][:2] == (Kind.RETURN, 1)
        return after - before
    finally:
        b.close()
        ch.close()
        t.join(5)


def test_a_channel_with_slow_replies_sleeps_through_the_peers_reads():
    """A thread asleep in a Unix socket's recv is woken whenever the peer reads
    what this end sent (the kernel's write-space wakeup reaches readers), only
    to sleep again; that cost the durable loop, which reads four clients'
    requests, about a fifth of its CPU.  A channel whose replies wait for a
    commit (`slow_replies`, a durable object's) sleeps in poll(), which only
    data wakes."""
    # (without it, Linux 6.18 here: 20 wakeups for 20 reads, in every run)
    assert _wakeups_while_the_peer_reads(slow=True) <= 2
