"""FrameReader, the one parser of the wire format: every frame comes out whole,
once and in order, however the bytes are cut; memory follows the data, not the
header's claim; limits and budgets are enforced on the way in."""

from __future__ import annotations

import math
import random
import struct
import tracemalloc

import pytest

from procshare.wire import frames
from procshare.wire.frames import (
    GROW_FROM,
    HEADER,
    MAX_BUDGET,
    FrameError,
    FrameReader,
    Limits,
    encode_frame,
    pack_frame,
)
from procshare.wire.kinds import Kind

MiB = 1 << 20
_BUFLEN = struct.Struct("!Q")


# -- helpers -------------------------------------------------------------------------------


def wire(kind, rid, body, buffers=(), budget=math.nan):
    """The bytes of one frame, as `encode_frame` lays them out."""
    return b"".join(bytes(p) for p in encode_frame(kind, rid, body, buffers, budget))


def norm(frame):
    """A frame as comparable plain values (NaN budgets become the string "nan")."""
    assert isinstance(frame, tuple) and len(frame) == 5
    kind, rid, budget, body, buffers = frame
    assert isinstance(buffers, tuple)
    assert all(isinstance(b, bytearray) for b in buffers)
    return (kind, rid, "nan" if math.isnan(budget) else budget, bytes(body),
            tuple(bytes(b) for b in buffers))


def spec(kind, rid, body, buffers=(), budget=math.nan):
    """What the reader must return for a frame encoded from these values."""
    return norm((kind, rid, budget, body, tuple(bytearray(b) for b in buffers)))


def drain(reader):
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(norm(frame))
    return out


def feed_cuts(data, cuts):
    """Feed `data` cut at `cuts` (sorted offsets); return `[(offset, frame)]`: each
    frame with the number of bytes fed when `next_frame` first returned it."""
    reader = FrameReader()
    got = []
    start = 0
    for end in [*cuts, len(data)]:
        reader.feed(data[start:end])
        got += [(end, f) for f in drain(reader)]
        start = end
    assert reader.next_frame() is None
    assert reader.buffered == 0 and not reader.in_frame
    return got


def ends(pieces):
    """The offsets at which each of the concatenated frames `pieces` is complete."""
    out, pos = [], 0
    for p in pieces:
        pos += len(p)
        out.append(pos)
    return out


def expect_exact(data, cuts, pieces, specs):
    """Cutting `data` (the frames `pieces`) at `cuts` yields exactly `specs`, each
    as soon as the feed holding its last byte arrived, and not before."""
    got = feed_cuts(data, cuts)
    assert [f for _, f in got] == specs
    points = sorted(set(cuts) | {len(data)})
    expected_at = [next(p for p in points if p >= e) for e in ends(pieces)]
    assert [at for at, _ in got] == expected_at


# -- the frames under test -------------------------------------------------------------

_rng = random.Random(20240611)
BIG_BODY = _rng.randbytes(3 * MiB + 5)            # > GROW_FROM: received in growing parts
BIG_BUF = _rng.randbytes(GROW_FROM + 123)

SMALL = {
    "small": (Kind.CALL, 7, b"\x80\x05hello", (), 1.5),
    "empty-body": (Kind.RETURN, 1, b"", (), math.nan),
    "buffers": (Kind.RETURN, 9, b"body", (b"abc", bytes(range(256)) * 3, b"x", b"yz"), 0.25),
    "zero-length-buffers": (Kind.ERROR, 3, b"b", (b"", b"", b"q", b""), math.nan),
    "empty-body-and-buffers": (Kind.PROXY, 2**64 - 1, b"", (b"", b""), 0.0),
    "fire-and-forget": (Kind.CALL, 0, b"decref", (), MAX_BUDGET),
    "unknown-kind": (255, 2**63, b"\xff" * 40, (b"\x00" * 7,), 12.0),
    "medium": (Kind.RETURN, 44, _rng.randbytes(3000), (_rng.randbytes(1500), b""), 3.0),
}
LARGE = {
    "large-body": (Kind.RETURN, 5, BIG_BODY, (), 2.0),
    "large-body-and-buffers": (Kind.CALL, 6, BIG_BODY, (b"", BIG_BUF, b"tail"), math.nan),
    "large-buffer": (Kind.RETURN, 8, b"small", (BIG_BUF,), math.nan),
}


def sample_cuts(n, rng, count=40):
    """Interesting cut points in a large frame of `n` bytes, plus random ones."""
    h = HEADER.size
    points = {0, 1, h - 1, h, h + 1, h + 8, h + 9, n - 1, n, n // 2}
    for k in (1, 2, 3):
        points |= {h + k * GROW_FROM - 1, h + k * GROW_FROM, h + k * GROW_FROM + 1}
    points |= {rng.randrange(n + 1) for _ in range(count)}
    return sorted(p for p in points if 0 <= p <= n)


# -- whole frames, any cut -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_small_frame_whole_byte_by_byte_and_at_every_split(name):
    values = SMALL[name]
    data = wire(*values)
    want = [spec(*values)]
    expect_exact(data, [], [data], want)                            # one feed
    expect_exact(data, list(range(1, len(data))), [data], want)     # byte by byte
    for cut in range(len(data) + 1):                                # two feeds, every cut
        expect_exact(data, [cut], [data], want)


@pytest.mark.parametrize("name", list(LARGE))
def test_large_frame_whole_in_chunks_and_at_sampled_splits(name):
    values = LARGE[name]
    data = wire(*values)
    want = [spec(*values)]
    rng = random.Random(name)
    expect_exact(data, [], [data], want)
    for cut in sample_cuts(len(data), rng):
        expect_exact(data, [cut], [data], want)
    for size in (1000, 4096, 65536, 1 << 19):
        expect_exact(data, list(range(size, len(data), size)), [data], want)
    # random chunk sizes, and the first 4 KiB of the frame byte by byte
    cuts, pos = list(range(1, 4096)), 4096
    while pos < len(data):
        cuts.append(pos)
        pos += rng.choice((1, 7, 100, 4095, 65536, 300_000, GROW_FROM + 1))
    expect_exact(data, cuts, [data], want)


def test_next_frame_is_none_until_the_last_byte():
    for values in [*SMALL.values(), LARGE["large-body-and-buffers"]]:
        data = wire(*values)
        reader = FrameReader()
        step = 1 if len(data) < 10_000 else 9_973
        for pos in range(0, len(data) - 1, step):
            reader.feed(data[pos:min(pos + step, len(data) - 1)])
            assert reader.next_frame() is None
            assert reader.in_frame
        assert reader.next_frame() is None
        reader.feed(data[-1:])
        assert norm(reader.next_frame()) == spec(*values)
        assert reader.next_frame() is None and not reader.in_frame and reader.buffered == 0


def test_frames_back_to_back_in_one_feed_and_split_anywhere():
    small = [SMALL[k] for k in SMALL]
    pieces = [wire(*v) for v in small]
    data = b"".join(pieces)
    want = [spec(*v) for v in small]
    expect_exact(data, [], pieces, want)
    expect_exact(data, list(range(1, len(data))), pieces, want)
    for cut in range(len(data) + 1):
        expect_exact(data, [cut], pieces, want)
    # with large frames between the small ones
    mixed = [SMALL["small"], LARGE["large-body"], SMALL["zero-length-buffers"],
             LARGE["large-body-and-buffers"], SMALL["empty-body"], LARGE["large-buffer"],
             SMALL["buffers"]]
    pieces = [wire(*v) for v in mixed]
    data = b"".join(pieces)
    want = [spec(*v) for v in mixed]
    expect_exact(data, [], pieces, want)
    rng = random.Random(7)
    for _ in range(15):
        expect_exact(data, [rng.randrange(len(data) + 1)], pieces, want)
    expect_exact(data, sorted(rng.sample(range(1, len(data)), 200)), pieces, want)


def test_many_small_frames_in_one_feed():
    values = [(Kind.CALL, i, bytes([i % 256]) * (i % 50), (), float(i)) for i in range(1000)]
    reader = FrameReader()
    reader.feed(b"".join(wire(*v) for v in values) + wire(Kind.RETURN, 1, b"part")[:-1])
    assert drain(reader) == [spec(*v) for v in values]
    assert reader.in_frame and reader.next_frame() is None


def test_pack_frame_matches_encode_frame():
    for kind, rid, body, _bufs, budget in SMALL.values():
        expected = wire(kind, rid, body, (), budget)
        assert pack_frame(kind, rid, body, budget) == expected
        assert feed_cuts(expected, [])[0][1] == spec(kind, rid, body, (), budget)


# -- recv_into: room() and commit() --------------------------------------------------------


def recv_into(data, rng, sizes):
    """What a channel does: receive into `room()` when the reader offers it, else
    `feed` a received chunk.  Returns (frames, number of commits)."""
    reader = FrameReader()
    out, pos, commits = [], 0, 0
    while pos < len(data):
        n = rng.choice(sizes)
        room = reader.room()
        if room is None:
            chunk = data[pos:pos + n]
            reader.feed(chunk)
            pos += len(chunk)
        else:
            assert len(room) > 0
            k = min(n, len(room), len(data) - pos)
            room[:k] = data[pos:pos + k]
            reader.commit(k)
            pos += k
            commits += 1
        out += drain(reader)
    assert reader.room() is None
    assert reader.next_frame() is None and reader.buffered == 0 and not reader.in_frame
    return out, commits


@pytest.mark.parametrize("seed", range(6))
def test_room_and_commit_give_the_same_frames_as_feed(seed):
    rng = random.Random(seed)
    chosen = [*SMALL.values(), *LARGE.values()]
    rng.shuffle(chosen)
    data = b"".join(wire(*v) for v in chosen)
    want = [spec(*v) for v in chosen]
    sizes = [1, 13, 512, 4096, 65536, 262_144, GROW_FROM, 3 * GROW_FROM]
    got, commits = recv_into(data, rng, sizes)
    assert got == want
    assert commits > 0                      # the large parts did go through room()


def test_room_is_offered_only_for_large_parts():
    reader = FrameReader()
    assert reader.room() is None                      # nothing started
    data = wire(*LARGE["large-body"])
    reader.feed(data[:HEADER.size])
    assert reader.next_frame() is None
    room = reader.room()
    assert room is not None and 0 < len(room) <= GROW_FROM
    room[:10] = data[HEADER.size:HEADER.size + 10]
    reader.commit(10)
    reader.feed(data[HEADER.size + 10:HEADER.size + 20])
    assert reader.next_frame() is None and reader.buffered == 20
    reader.feed(data[HEADER.size + 20:])
    assert norm(reader.next_frame()) == spec(*LARGE["large-body"])
    reader.feed(wire(Kind.CALL, 1, b"x" * 100)[:40])  # a small part: better fed
    assert reader.next_frame() is None
    assert reader.room() is None


# -- memory follows the data -----------------------------------------------------------------


def traced(fn):
    """(result, peak bytes allocated while `fn` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def test_a_gigabyte_claim_with_nothing_after_costs_about_a_megabyte():
    head = HEADER.pack(1 << 30, Kind.CALL, 0, 0, 1, math.nan)
    reader = FrameReader()

    def claim():
        reader.feed(head)
        return reader.next_frame()

    frame, peak = traced(claim)
    assert frame is None
    assert peak < 8 * MiB
    assert reader.buffered == 0 and reader.in_frame
    assert len(reader._parts[0].buf) <= GROW_FROM
    room = reader.room()
    assert room is not None and len(room) <= GROW_FROM
    reader.commit(0)

    # 2.5 MiB of it arrive: what is held grows with them, not with the claim
    chunk = bytes(GROW_FROM // 2)

    def some():
        for _ in range(5):
            reader.feed(chunk)
        return reader.next_frame()

    frame, peak = traced(some)
    assert frame is None and reader.buffered == 5 * len(chunk)
    assert peak < 8 * MiB
    assert len(reader._parts[0].buf) <= 4 * GROW_FROM


def test_a_huge_out_of_band_buffer_claim_costs_about_a_megabyte():
    claim = 8 << 30                 # 8 GiB: under the default 16 GiB frame limit
    head = HEADER.pack(4, Kind.RETURN, 0, 1, 1, math.nan) + _BUFLEN.pack(claim) + b"body"
    reader = FrameReader()

    def feed():
        reader.feed(head + b"x" * 1000)
        return reader.next_frame()

    frame, peak = traced(feed)
    assert frame is None and reader.in_frame
    assert peak < 8 * MiB
    assert reader.buffered < 2000


def test_many_buffer_claims_with_nothing_after_cost_little():
    n = 64                          # 64 buffers of 256 MiB: 16 GiB, the default max_frame
    head = HEADER.pack(0, Kind.RETURN, 0, n, 1, math.nan) + b"".join(
        _BUFLEN.pack(1 << 28) for _ in range(n))
    reader = FrameReader()

    def feed():
        reader.feed(head)
        return reader.next_frame()

    frame, peak = traced(feed)
    assert frame is None and reader.in_frame
    assert peak < 8 * MiB                               # allocates 64 MiB today


# -- limits --------------------------------------------------------------------------------


def broken(reader):
    """After a FrameError the reader stays broken, whatever it is given."""
    for _ in range(3):
        with pytest.raises(FrameError):
            reader.next_frame()
        reader.feed(wire(Kind.CALL, 1, b"a valid frame"))
    assert reader.room() is None


def run(data, limits, cuts=()):
    """Feed `data` to a reader with `limits` (cut at `cuts`); the FrameError it
    raised, with the reader, or fail."""
    reader = FrameReader(limits)
    start = 0
    with pytest.raises(FrameError) as info:
        for end in [*cuts, len(data)]:
            reader.feed(data[start:end])
            start = end
            drain(reader)
    broken(reader)
    return str(info.value)


@pytest.mark.parametrize("how", [
    "header-only", "byte-by-byte",
    "whole",
])
def test_body_over_max_body_is_refused(how):
    limits = Limits(max_body=100)
    data = wire(Kind.CALL, 1, b"x" * 101)
    cuts = {"header-only": [HEADER.size], "byte-by-byte": range(1, len(data)),
            "whole": []}[how]
    data = data[:HEADER.size] if how == "header-only" else data
    assert "101 bytes is over the 100-byte limit" in run(data, limits, cuts)
    # exactly at the limit is fine
    reader = FrameReader(limits)
    reader.feed(wire(Kind.CALL, 1, b"x" * 100))
    assert drain(reader) == [spec(Kind.CALL, 1, b"x" * 100)]


def test_claimed_body_over_the_default_limit_is_refused_at_the_header():
    limits = Limits(max_body=1 << 30)
    head = HEADER.pack((1 << 30) + 1, Kind.CALL, 0, 0, 1, math.nan)
    assert "over the" in run(head, limits)


@pytest.mark.parametrize("how", [
    "header-only",
    "whole",
])
def test_body_over_max_frame_is_refused(how):
    limits = Limits(max_frame=100)
    data = wire(Kind.CALL, 1, b"x" * 200)
    assert "over the 100-byte limit" in run(data[:HEADER.size] if how == "header-only"
                                            else data, limits)


def test_frame_over_max_frame_with_its_buffers_is_refused_at_the_table():
    limits = Limits(max_frame=1000)
    data = wire(Kind.RETURN, 3, b"b" * 10, [b"x" * 500, b"y" * 491])   # 1001 bytes
    table_end = HEADER.size + 2 * 8
    for cuts in ([], [table_end], range(1, table_end + 1)):
        message = run(data[:table_end], limits, cuts)
        assert "1001 bytes (with its buffers) is over the 1000-byte limit" in message
    # the same frame one byte shorter passes
    ok = wire(Kind.RETURN, 3, b"b" * 10, [b"x" * 500, b"y" * 490])
    reader = FrameReader(limits)
    reader.feed(ok)
    assert drain(reader) == [spec(Kind.RETURN, 3, b"b" * 10, [b"x" * 500, b"y" * 490])]
    # lengths that would overflow a fixed-width sum are refused too
    head = HEADER.pack(0, Kind.RETURN, 0, 3, 1, math.nan) + _BUFLEN.pack(2**64 - 1) * 3
    assert "over the" in run(head, frames.DEFAULT_LIMITS)


def test_room_and_commit_enforce_the_buffer_table_limit():
    n = 0x8000                                  # a 256 KiB table: offered through room()
    lengths = [0] * (n - 1) + [2000]
    data = HEADER.pack(0, Kind.RETURN, 0, n, 1, math.nan) + b"".join(
        _BUFLEN.pack(x) for x in lengths)
    reader = FrameReader(Limits(max_frame=1000))
    reader.feed(data[:HEADER.size])
    assert reader.next_frame() is None
    room = reader.room()
    assert room is not None and len(room) == n * 8
    room[:] = data[HEADER.size:]
    with pytest.raises(FrameError, match="over the 1000-byte limit"):
        reader.commit(len(room))
    broken(reader)


@pytest.mark.parametrize("cut", ["header-only", "whole"])
def test_too_many_buffers_are_refused(cut):
    limits = Limits(max_buffers=2)
    data = wire(Kind.RETURN, 1, b"b", [b"1", b"2", b"3"])
    assert "3 out-of-band buffers is over the limit of 2" in run(
        data[:HEADER.size] if cut == "header-only" else data, limits)
    reader = FrameReader(limits)
    reader.feed(wire(Kind.RETURN, 1, b"b", [b"1", b"2"]))
    assert drain(reader) == [spec(Kind.RETURN, 1, b"b", [b"1", b"2"])]


def test_frames_before_a_bad_one_are_returned_then_the_reader_stays_broken():
    limits = Limits(max_buffers=1)
    good = [wire(Kind.CALL, i, b"ok%d" % i) for i in range(3)]
    bad = wire(Kind.CALL, 9, b"", [b"1", b"2"])
    reader = FrameReader(limits)
    reader.feed(b"".join(good) + bad + good[0])
    assert [norm(reader.next_frame()) for _ in range(3)] == [
        spec(Kind.CALL, i, b"ok%d" % i) for i in range(3)]
    with pytest.raises(FrameError):
        reader.next_frame()
    broken(reader)


def test_limits_must_be_non_negative_ints():
    for bad in ({"max_body": -1}, {"max_frame": 1.5}, {"max_buffers": None}):
        with pytest.raises(ValueError, match="frame limit"):
            Limits(**bad)


# -- budgets -------------------------------------------------------------------------------

BUDGETS = [
    (-5.0, 0.0), (-math.inf, 0.0), (-1e-300, 0.0), (0.0, 0.0), (1.5, 1.5),
    (MAX_BUDGET, MAX_BUDGET), (MAX_BUDGET * 1.000001, "nan"), (1e300, "nan"),
    (math.inf, "nan"), (math.nan, "nan"),
]


@pytest.mark.parametrize("sent, got", BUDGETS)
@pytest.mark.parametrize("how", ["whole", "byte-by-byte", "with-buffers", "large"])
def test_budgets_are_clamped(sent, got, how):
    body = BIG_BODY if how == "large" else b"body"
    buffers = [b"buf"] if how == "with-buffers" else []
    data = wire(Kind.CALL, 1, body, buffers, budget=sent)
    cuts = list(range(1, len(data))) if how == "byte-by-byte" else []
    ((_, frame),) = feed_cuts(data, cuts)
    assert frame[2] == got


# -- encode_frame checks before anything is sent ---------------------------------------------


def test_encode_frame_refuses_a_frame_over_the_limits():
    limits = Limits(max_body=10, max_frame=100, max_buffers=2)
    with pytest.raises(FrameError, match="11 bytes is over the 10-byte limit"):
        encode_frame(Kind.CALL, 1, b"x" * 11, limits=limits)
    with pytest.raises(FrameError, match="11 bytes is over the 10-byte limit"):
        encode_frame(Kind.CALL, 1, b"x" * 11, [b"y"], limits=limits)
    with pytest.raises(FrameError, match="101 bytes in 2 buffers"):
        encode_frame(Kind.CALL, 1, b"x" * 10, [b"y" * 50, bytearray(41)], limits=limits)
    with pytest.raises(FrameError, match="in 3 buffers"):
        encode_frame(Kind.CALL, 1, b"x", [b"a", b"b", b"c"], limits=limits)
    # at the limits: encoded, and read back by a reader with the same limits
    pieces = encode_frame(Kind.CALL, 1, b"x" * 10, [b"y" * 50, memoryview(bytes(40))],
                          limits=limits)
    reader = FrameReader(limits)
    reader.feed(b"".join(bytes(p) for p in pieces))
    assert drain(reader) == [spec(Kind.CALL, 1, b"x" * 10, [b"y" * 50, bytes(40)])]


def test_encode_frame_refuses_a_body_over_max_frame():
    with pytest.raises(FrameError):
        encode_frame(Kind.CALL, 1, b"x" * 200, limits=Limits(max_body=1000, max_frame=100))


def test_unsent_slot_entries_are_those_of_frames_a_write_did_not_finish():
    """After a write that stopped at `sent` bytes: the slot entries of every
    frame not wholly written (the peer cannot have read it), none of those
    written whole, whatever frames lie between (plain, with buffers)."""
    notice = (frames.OP_RELEASE, 0, 3, 0, 4096)
    buf = (frames.OP_BUFFER, frames.TYPE_BYTES, 1, 65536, 70000)
    first = frames.encode_slot_frame(Kind.CALL, 0, b"", [notice])
    plain = frames.pack_frame(Kind.CALL, 1, b"x" * 50)
    oob = b"".join(bytes(p) for p in frames.encode_frame(Kind.CALL, 2, b"y", [b"z" * 30]))
    last = frames.encode_slot_frame(Kind.RETURN, 3, b"body", [buf, notice])
    data = first + plain + oob + last
    assert frames.unsent_slot_entries(data, 0) == [notice, buf, notice]
    assert frames.unsent_slot_entries(data, len(first) - 1) == [notice, buf, notice]
    assert frames.unsent_slot_entries(data, len(first)) == [buf, notice]
    assert frames.unsent_slot_entries(data, len(data) - 1) == [buf, notice]
    assert frames.unsent_slot_entries(data, len(data)) == []
    assert frames.unsent_slot_entries(plain + oob, 0) == []
    # a frame cut short ends the walk (never raises: it runs while a send fails)
    assert frames.unsent_slot_entries(data[:len(first) + 5], 0) == [notice]
    assert frames.unsent_slot_entries(last[:HEADER.size + 3], 0) == []
