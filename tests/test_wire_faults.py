"""Frames under faults on a live manager: replies interrupted part-way (by a
deadline or Ctrl-C) leave the connection in step, and a peer that claims a
huge frame and goes silent costs the manager no memory and loses its
connection."""

from __future__ import annotations

import math
import multiprocessing
import os
import select
import signal
import time

import pytest

import _wire_workers as ww
import procshare
from procshare.transport import channel as transport
from procshare.wire import frames
from procshare.wire.kinds import Kind
from procshare.wire.serializers import encode_hello

MiB = 1 << 20
SIZES = [64 * 1024, MiB, 16 * MiB, 128 * MiB]


@pytest.fixture
def blob_mgr():
    m = ww.BlobManager(ctx=multiprocessing.get_context("fork"))
    m.start()
    try:
        yield m
    finally:
        m.shutdown()


def _transfer_time(b, n: int) -> float:
    t0 = time.monotonic()
    assert len(b.blob(n)) == n
    return time.monotonic() - t0


def _hundred_calls(b, n: int) -> None:
    for i in range(100):
        assert b.echo(i) == i
    assert b.blob(n) == ww.blob_bytes(n)


@pytest.mark.parametrize("n", SIZES, ids=["64KiB", "1MiB", "16MiB", "128MiB"])
def test_deadline_inside_a_large_reply_keeps_the_connection_in_step(blob_mgr, n):
    b = blob_mgr.Blob()
    took = max(min(_transfer_time(b, n), _transfer_time(b, n)), 1e-4)
    inside = 0
    # the deadline falls before, at several points inside, and after the transfer
    for frac in (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.5):
        delay = 0.1
        timeout = delay + frac * took
        t0 = time.monotonic()
        try:
            got = b._callmethod("blob", (n, delay), timeout=timeout)
        except procshare.CallTimeout as e:
            assert e.may_complete       # the deadline passed before the reply began
        else:
            # a reply that had begun to arrive is read to the end and returned:
            # the call happened, so it is not reported as failed
            assert got == ww.blob_bytes(n)
            inside += time.monotonic() - t0 > timeout
        _hundred_calls(b, n)
    if n >= 16 * MiB:
        assert inside, "no deadline fell inside the reply: the test did not test anything"


@pytest.mark.parametrize("n", [16 * MiB, 128 * MiB], ids=["16MiB", "128MiB"])
def test_ctrl_c_inside_a_large_reply_keeps_the_thread_usable(blob_mgr, n):
    b = blob_mgr.Blob()
    took = max(_transfer_time(b, n), 1e-3)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        for frac in (0.1, 0.5, 0.9):
            got = None
            signal.setitimer(signal.ITIMER_REAL, 0.05 + frac * took)
            try:
                got = b.blob(n, 0.05)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert got is None or got == ww.blob_bytes(n)
            _hundred_calls(b, n)
    finally:
        signal.signal(signal.SIGALRM, old)


# -- a peer that claims more than it sends -----------------------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _authenticated_channel(m) -> transport.Channel:
    ch = transport.connect(m.address, timeout=5)
    transport.client_handshake(ch, bytes(multiprocessing.current_process().authkey), m.address)
    hello = {"client": "claimer", "pid": os.getpid(), "serializer": "pickle"}
    ch.send_bytes(frames.pack_frame(Kind.HELLO, 1, encode_hello(hello)))
    assert ch.recv_frame(time.monotonic() + 5)[0] == Kind.RETURN
    return ch


def _watch_until_closed(ch: transport.Channel, pid: int, within: float) -> tuple[float, int]:
    """Wait (at most `within` s) for the server to close `ch`, sampling the
    manager's RSS meanwhile: `(seconds it took, largest growth in bytes)`."""
    before = _rss(pid)
    grown = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        grown = max(grown, _rss(pid) - before)
        if select.select([ch.sock], [], [], 0.05)[0]:
            try:
                if not ch.sock.recv(65536):
                    return time.monotonic() - t0, grown
            except ConnectionResetError:
                return time.monotonic() - t0, grown
    pytest.fail(f"the server kept the connection open for more than {within} s")


CLAIMS = {
    # a 1 GiB body, one byte of it, then silence: dropped after frame_timeout
    "1GiB-then-silence": (frames.HEADER.pack(1 << 30, Kind.CALL, 0, 0, 2, math.nan) + b"\x80",
                          "nothing for 1.0 s"),
    # one out-of-band buffer of 512 GiB: over max_message_bytes, dropped at once
    "512GiB-buffer": (frames.HEADER.pack(4, Kind.CALL, 0, 1, 2, math.nan)
                      + (512 << 30).to_bytes(8, "big") + b"body", "over the"),
}


@pytest.mark.parametrize("claim", sorted(CLAIMS))
def test_a_claim_the_peer_does_not_send(ctx_fork_manager_with_short_frame_timeout, claim):
    m = ctx_fork_manager_with_short_frame_timeout
    lst = m.list([1])
    data, reason = CLAIMS[claim]
    ch = _authenticated_channel(m)
    ch.send_bytes(data)
    took, grown = _watch_until_closed(ch, m._process.pid, within=10.0)
    ch.close()
    assert grown < 50 * MiB, f"the manager grew by {grown / MiB:.0f} MiB"
    assert took < 10.0
    assert list(lst) == [1]                   # everyone else is still served
    log = "\n".join(m._control("server_info")["log"])
    assert "bad frame" in log and reason in log


@pytest.fixture
def ctx_fork_manager_with_short_frame_timeout():
    m = procshare.SyncManager(ctx=multiprocessing.get_context("fork"), frame_timeout=1.0,
                              max_message_bytes=4 << 30)
    m.start()
    try:
        yield m
    finally:
        m.shutdown()
