"""Spinning in one process: a receive busy-polls only while no other channel of
its `working` set is working (threads of one process share a GIL).  Behaviour
only; speed is measured by benchmarks/, not here."""

from __future__ import annotations

import socket
import threading
import time

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
