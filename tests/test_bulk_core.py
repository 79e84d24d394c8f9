"""BULK frames in the sans-I/O core (docs/protocol.rst, "Bulk data").

The decoder part checks that the raw bytes behind a BULK frame come out as
RAW_TYPE pieces, however they are cut into reads, and that the frames after
them decode intact.  The session part runs two Sessions back to back (the test
plays the owner that writes a BULK frame and its raw bytes), and a hand-driven
peer that sends what a well-behaved Session never would.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sessionpair import A, B, RawPeer, SessionPair, hello_fields, peer_id, split_frames

from virtproxy import events as ev
from virtproxy.frames import (
    BULK_FRAME_SIZE,
    CAP_BULK,
    FRAME_OVERHEAD,
    MAX_BULK,
    OPENER_BIT,
    RAW_TYPE,
    SYNC,
    Damage,
    Frame,
    FrameDecoder,
    FrameType,
    Reason,
    bulk_count,
    encode_bulk,
    encode_frame,
    encode_header,
)
from virtproxy.session import BULK_MIN, FLIGHT_INITIAL, Session, SessionConfig

COUNT = struct.Struct(">I")
WINDOW = struct.Struct(">I")

Item = Frame | Damage


# ============================================================================ helpers


def bulk_decoder(max_payload: int = 600) -> FrameDecoder:
    decoder = FrameDecoder(max_payload)
    decoder.bulk_ok = True
    return decoder


def data_frame(stream: int, payload: bytes, seq: int = 0) -> bytes:
    return encode_frame(FrameType.DATA, stream, payload, seq)


def bulk_wire(stream: int, raw: bytes, seq: int = 0) -> bytes:
    return encode_bulk(stream, len(raw), seq) + raw


def merged(items: list[Item]) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each item, with adjacent RAW pieces of one stream joined."""
    out: list[tuple[int, int, bytes]] = []
    for item in items:
        assert isinstance(item, Frame), item
        payload = bytes(item.payload)
        if item.type == RAW_TYPE and out and out[-1][0] == RAW_TYPE and out[-1][1] == item.stream:
            out[-1] = (RAW_TYPE, item.stream, out[-1][2] + payload)
        else:
            out.append((item.type, item.stream, payload))
    return out


def triples(items: list[Item]) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each frame, RAW pieces as they came."""
    assert all(isinstance(i, Frame) for i in items), items
    return [(i.type, i.stream, bytes(i.payload)) for i in items if isinstance(i, Frame)]


def without_damage(items: list[Item]) -> list[Item]:
    return [i for i in items if not isinstance(i, Damage)]


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Item]:
    """Feed one byte at a time; the decoder holds nothing while raw bytes are due."""
    out: list[Item] = []
    for index in range(len(data)):
        out += decoder.feed(data[index : index + 1])
        if decoder.raw_left:
            assert decoder.buffered == 0
    return out


def bulk_config(**kwargs: Any) -> SessionConfig:
    return SessionConfig(bulk=True, **kwargs)


def bulk_pair(
    config_a: SessionConfig | None = None,
    config_b: SessionConfig | None = None,
    lift_caps: bool = True,
) -> SessionPair:
    """An up pair where both offer BULK; ``lift_caps``: as after a PONG without a count."""
    pair = SessionPair(config_a or bulk_config(), config_b or bulk_config())
    pair.handshake()
    if lift_caps:
        pair.a.flight_cap = None
        pair.b.flight_cap = None
    pair.take(A)
    pair.take(B)
    return pair


def write_bulk(pair: SessionPair, side: int, stream_id: int, data: bytes, now: float = 0.0) -> None:
    """The owner's part: what the session had goes first, then the BULK and its raw bytes."""
    pair.flush(side)
    header = pair.sessions[side].bulk_header(stream_id, len(data), now)
    pair.wire[side] += header + data


def reset_events(events: list[ev.Event]) -> list[tuple[int, int]]:
    return [(e.stream_id, e.reason) for e in events if isinstance(e, ev.StreamReset)]


def data_events(events: list[ev.Event]) -> list[ev.DataReceived]:
    return [e for e in events if isinstance(e, ev.DataReceived)]


def delivered(events: list[ev.Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in data_events(events) if e.stream_id == stream_id)


def raw_session(config: SessionConfig | None = None) -> tuple[Session, RawPeer]:
    """A session (offering BULK unless told otherwise) up with a hand-driven peer."""
    session = Session(config or SessionConfig(bulk=True, header_crc=True))
    peer = RawPeer()
    peer.handshake(session)
    session.take_events()
    return session, peer


def raw_open(session: Session, peer: RawPeer, number: int) -> int:
    """The peer opens stream ``number`` and the session accepts it; the session's id."""
    key = OPENER_BIT | number
    session.receive_data(peer.frame(FrameType.OPEN, key, b"svc"), 0.0)
    assert session.take_events() == [ev.StreamRequested(key, "svc")]
    session.accept(key)
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.OPEN_OK, number)]
    return key


def peer_bulk(peer: RawPeer, key: int, count: int, payload: bytes | None = None) -> bytes:
    """The peer's BULK for its stream ``key`` announcing ``count`` (or with ``payload``)."""
    return peer.frame(FrameType.BULK, key, COUNT.pack(count) if payload is None else payload)


def replies(session: Session, peer: RawPeer) -> list[tuple[int, int, int]]:
    """(type, stream, first payload byte) of what the session sends back."""
    return [(f.type, f.stream, f.payload[0] if f.payload else -1) for f in peer.read(session)]


# ============================================================================ codec


def test_encode_bulk_and_bulk_count_round_trip_and_bounds() -> None:
    frame = encode_bulk(0x80000001, MAX_BULK, 3)
    assert len(frame) == BULK_FRAME_SIZE == FRAME_OVERHEAD + 4
    [decoded] = FrameDecoder().feed(frame)
    assert isinstance(decoded, Frame)
    assert (decoded.type, decoded.stream, decoded.seq) == (FrameType.BULK, 0x80000001, 3)
    assert bulk_count(decoded.payload) == MAX_BULK
    assert bulk_count(memoryview(COUNT.pack(1))) == 1
    for count in (0, MAX_BULK + 1, -1):
        with pytest.raises(ValueError):
            encode_bulk(1, count, 0)


@pytest.mark.parametrize(
    "payload", [b"", b"\x00\x00\x05", b"\x00\x00\x00\x05\x00", b"\x00" * 4, b"\x80\x00\x00\x00"]
)
def test_bulk_count_of_a_malformed_payload_is_zero(payload: bytes) -> None:
    assert bulk_count(payload) == 0


# ============================================================================ decoder


def test_bulk_raw_bytes_and_next_frame_in_one_feed() -> None:
    decoder = bulk_decoder()
    wire = bulk_wire(7, b"hello", seq=4) + data_frame(9, b"after", seq=5)
    items = decoder.feed(wire)
    assert triples(items) == [
        (FrameType.BULK, 7, COUNT.pack(5)),
        (RAW_TYPE, 7, b"hello"),
        (FrameType.DATA, 9, b"after"),
    ]
    assert [i.seq for i in items] == [4, 0, 5]  # a RAW piece has no seq of its own
    assert (decoder.raw_left, decoder.buffered, decoder.frames) == (0, 0, 2)
    assert (decoder.discarded, decoder.resyncs, decoder.damaged) == (0, 0, 0)


def test_raw_bytes_that_look_like_frames_are_not_decoded() -> None:
    decoder = bulk_decoder()
    raw = data_frame(1, b"inner") + SYNC + encode_bulk(3, 2, 0)
    items = decoder.feed(bulk_wire(5, raw) + data_frame(6, b"x"))
    assert merged(items) == [
        (FrameType.BULK, 5, COUNT.pack(len(raw))),
        (RAW_TYPE, 5, raw),
        (FrameType.DATA, 6, b"x"),
    ]
    assert decoder.frames == 2 and decoder.raw_left == 0


def test_raw_bytes_fed_one_at_a_time() -> None:
    raw = os.urandom(50)
    wire = bulk_wire(0x80000002, raw) + data_frame(1, b"next")
    decoder = bulk_decoder()
    lefts: list[int] = []
    items: list[Item] = []
    for index in range(len(wire)):
        items += decoder.feed(wire[index : index + 1])
        lefts.append(decoder.raw_left)
        if decoder.raw_left:
            assert decoder.buffered == 0
            assert decoder.raw_stream == 0x80000002
    assert lefts[BULK_FRAME_SIZE - 2] == 0
    assert lefts[BULK_FRAME_SIZE - 1 : BULK_FRAME_SIZE + 50] == list(range(50, -1, -1))
    assert all(len(p) == 1 for t, _, p in triples(items) if t == RAW_TYPE)
    assert merged(items) == [
        (FrameType.BULK, 0x80000002, COUNT.pack(50)),
        (RAW_TYPE, 0x80000002, raw),
        (FrameType.DATA, 1, b"next"),
    ]


segment = st.one_of(
    st.tuples(st.just("frame"), st.integers(0, 2**32 - 1), st.binary(max_size=80)),
    st.tuples(st.just("bulk"), st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=700)),
)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(segment, max_size=8), sizes=st.lists(st.integers(1, 900), min_size=1))
def test_any_split_of_bulks_and_frames_decodes_the_same(
    segments: list[tuple[str, int, bytes]], sizes: list[int]
) -> None:
    wire = b""
    expected: list[tuple[int, int, bytes]] = []
    for seq, (kind, stream, payload) in enumerate(segments):
        if kind == "bulk":
            wire += bulk_wire(stream, payload, seq & 0xFF)
            expected += [
                (FrameType.BULK, stream, COUNT.pack(len(payload))),
                (RAW_TYPE, stream, payload),
            ]
        else:
            wire += encode_frame(FrameType.PING, stream, payload, seq & 0xFF)
            expected.append((FrameType.PING, stream, payload))
    decoder = bulk_decoder(max_payload=100)
    items: list[Item] = []
    pos = index = 0
    while pos < len(wire):
        chunk = wire[pos : pos + sizes[index % len(sizes)]]
        pos += len(chunk)
        index += 1
        items += decoder.feed(chunk)
        assert decoder.buffered < 100 + FRAME_OVERHEAD
        if decoder.raw_left:
            assert decoder.buffered == 0
    assert merged(items) == expected
    assert (decoder.raw_left, decoder.buffered, decoder.discarded, decoder.damaged) == (0, 0, 0, 0)


@pytest.mark.parametrize("cut", range(1, BULK_FRAME_SIZE))
def test_bulk_header_split_across_feeds_then_raw_in_same_and_later_feeds(cut: int) -> None:
    raw = bytes(range(40))
    wire = bulk_wire(3, raw) + data_frame(4, b"tail")
    decoder = bulk_decoder()
    first = decoder.feed(wire[:cut])
    assert first == [] and decoder.buffered == cut and decoder.raw_left == 0
    second = decoder.feed(wire[cut : BULK_FRAME_SIZE + 10])  # header's rest and 10 raw bytes
    assert merged(second) == [(FrameType.BULK, 3, COUNT.pack(40)), (RAW_TYPE, 3, raw[:10])]
    assert (decoder.raw_left, decoder.raw_stream, decoder.buffered) == (30, 3, 0)
    third = decoder.feed(wire[BULK_FRAME_SIZE + 10 :])
    assert merged(third) == [(RAW_TYPE, 3, raw[10:]), (FrameType.DATA, 4, b"tail")]
    assert decoder.raw_left == 0 and decoder.buffered == 0


def test_partial_frame_then_bulk_whole_in_next_feed() -> None:
    """A frame completed by topping up the buffer, then a BULK and raw bytes in the same read."""
    first = data_frame(1, b"abc")
    wire = first + bulk_wire(2, b"R" * 30) + data_frame(1, b"z")
    decoder = bulk_decoder()
    assert decoder.feed(wire[:5]) == []
    items = decoder.feed(wire[5:])
    assert merged(items) == [
        (FrameType.DATA, 1, b"abc"),
        (FrameType.BULK, 2, COUNT.pack(30)),
        (RAW_TYPE, 2, b"R" * 30),
        (FrameType.DATA, 1, b"z"),
    ]


def test_raw_pieces_from_a_whole_read_are_views_of_it() -> None:
    data = bulk_wire(2, b"viewed")
    items = bulk_decoder().feed(data)
    piece = items[-1]
    assert piece.type == RAW_TYPE and isinstance(piece.payload, memoryview)
    assert piece.payload.obj is data and bytes(piece.payload) == b"viewed"


def test_take_raw_then_the_rest_arrives() -> None:
    raw = b"0123456789"
    wire = bulk_wire(8, raw) + data_frame(8, b"then")
    decoder = bulk_decoder()
    assert merged(decoder.feed(wire[: BULK_FRAME_SIZE + 3])) == [
        (FrameType.BULK, 8, COUNT.pack(10)),
        (RAW_TYPE, 8, b"012"),
    ]
    decoder.take_raw(4)  # "3456" read past the decoder
    assert decoder.raw_left == 3
    rest = wire[BULK_FRAME_SIZE + 7 :]
    assert merged(decoder.feed(rest)) == [(RAW_TYPE, 8, b"789"), (FrameType.DATA, 8, b"then")]
    assert decoder.raw_left == 0 and decoder.discarded == 0


def test_take_raw_of_everything_left_goes_straight_to_the_next_frame() -> None:
    decoder = bulk_decoder()
    decoder.feed(encode_bulk(8, 1000, 0))
    decoder.take_raw(1000)
    assert decoder.raw_left == 0
    items = decoder.feed(data_frame(8, b"next", seq=1))
    assert triples(items) == [(FrameType.DATA, 8, b"next")]


@pytest.mark.parametrize("count", [0, -1, 11])
def test_take_raw_refuses_nothing_or_more_than_left(count: int) -> None:
    decoder = bulk_decoder()
    decoder.feed(encode_bulk(8, 10, 0))
    with pytest.raises(ValueError):
        decoder.take_raw(count)
    assert decoder.raw_left == 10


def test_take_raw_outside_raw_mode_is_refused() -> None:
    decoder = bulk_decoder()
    decoder.feed(data_frame(1, b"abc")[:7])  # a partial frame buffered, no BULK
    with pytest.raises(ValueError):
        decoder.take_raw(1)
    assert decoder.buffered == 7


def test_reset_leaves_raw_mode() -> None:
    decoder = bulk_decoder()
    decoder.feed(bulk_wire(8, b"x" * 100)[:-40])
    assert decoder.raw_left == 40
    decoder.reset()
    assert decoder.raw_left == 0 and decoder.buffered == 0
    items = decoder.feed(data_frame(2, b"fresh"))
    assert triples(items) == [(FrameType.DATA, 2, b"fresh")]


def test_without_bulk_ok_a_bulk_is_a_plain_frame_and_its_bytes_are_parsed() -> None:
    decoder = FrameDecoder(600)
    assert decoder.bulk_ok is False
    garbage = b"\x01\x02\x03\x04\x05"
    raw = garbage + data_frame(3, b"inside")
    items = decoder.feed(bulk_wire(3, raw) + data_frame(4, b"after"))
    assert triples(items) == [
        (FrameType.BULK, 3, COUNT.pack(len(raw))),
        (FrameType.DATA, 3, b"inside"),
        (FrameType.DATA, 4, b"after"),
    ]
    assert decoder.raw_left == 0
    assert (decoder.discarded, decoder.resyncs) == (len(garbage), 1)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x05", b"\x00\x00\x00\x05\x00", b"\x00" * 4, b"\x80\x00\x00\x00", b"\xff" * 4],
)
def test_malformed_bulk_starts_no_raw_mode(payload: bytes) -> None:
    decoder = bulk_decoder()
    items = decoder.feed(encode_frame(FrameType.BULK, 5, payload) + data_frame(5, b"next"))
    assert triples(items) == [(FrameType.BULK, 5, payload), (FrameType.DATA, 5, b"next")]
    assert decoder.raw_left == 0 and decoder.discarded == 0


def test_damaged_bulk_starts_no_raw_mode() -> None:
    """Its header is intact but its CRC is not: what follows is searched for frames."""
    damaged = bytearray(encode_bulk(5, 6, 2))
    damaged[-1] ^= 0xFF
    decoder = bulk_decoder()
    items = decoder.feed(bytes(damaged) + b"rawraw" + data_frame(6, b"ok", seq=3))
    assert items[0] == Damage(5, 2, FrameType.BULK, 4)
    assert triples(items[1:]) == [(FrameType.DATA, 6, b"ok")]
    assert decoder.raw_left == 0 and decoder.discarded == len(damaged) + 6


def test_two_bulks_back_to_back_for_two_streams() -> None:
    wire = bulk_wire(1, b"a" * 5) + bulk_wire(2, b"b" * 7) + bulk_wire(1, b"c")
    items = feed_bytewise(bulk_decoder(), wire)
    assert [(t, s, p) for t, s, p in merged(items) if t == RAW_TYPE] == [
        (RAW_TYPE, 1, b"a" * 5),
        (RAW_TYPE, 2, b"b" * 7),
        (RAW_TYPE, 1, b"c"),
    ]


def test_a_large_bulk_never_grows_the_buffer_and_has_no_stall_deadline() -> None:
    decoder = bulk_decoder()
    decoder.feed(encode_bulk(1, MAX_BULK, 0), now=0.0)
    for _ in range(8):
        items = decoder.feed(b"\xa5\x5c" * 32768, now=0.0)  # sync markers, all raw
        assert [i.type for i in items] == [RAW_TYPE]
        assert decoder.buffered == 0
    assert decoder.raw_left == MAX_BULK - 8 * 65536
    assert decoder.stall_deadline() is None
    assert decoder.expire(1e9) == [] and decoder.raw_left == MAX_BULK - 8 * 65536
    assert (decoder.frames, decoder.discarded) == (1, 0)


def _bulk_inside_a_damaged_frame() -> tuple[list[bytes], float]:
    """A DATA header claiming 100 bytes, whose bytes hold a whole BULK and its raw bytes
    and whose CRC is wrong: read in two pieces, it is taken from the decoder's buffer."""
    inner = bulk_wire(5, b"R" * 10)
    wire = encode_header(FrameType.DATA, 1, 100, 0) + inner.ljust(100, b"\0") + b"\0" * 4
    return [wire[:14], wire[14:]], 0.0


def _bulk_behind_a_truncated_frame() -> tuple[list[bytes], float]:
    """A frame cut off after its header, then a BULK and raw bytes: found once the stall expires."""
    wire = encode_header(FrameType.DATA, 1, 500, 0) + bulk_wire(5, b"R" * 10)
    return [wire], 100.0


@pytest.mark.parametrize("how", [_bulk_inside_a_damaged_frame, _bulk_behind_a_truncated_frame])
def test_bulk_and_raw_bytes_decoded_from_the_buffer_never_raise(
    how: Callable[[], tuple[list[bytes], float]],
) -> None:
    """Regression: such a RAW piece held a view of the buffer, so ``del buf[...]`` raised."""
    reads, expire_at = how()
    decoder = bulk_decoder()
    items: list[Item] = []
    for read in reads:
        items += decoder.feed(read, 0.0)
    if expire_at:
        items += decoder.expire(expire_at)
    assert merged(without_damage(items)) == [
        (FrameType.BULK, 5, COUNT.pack(10)),
        (RAW_TYPE, 5, b"R" * 10),
    ]
    assert decoder.raw_left == 0


# =========================================================================== session pair: offer


def test_both_offer_bulk_in_their_hellos_and_then_may_send_it() -> None:
    pair = bulk_pair()
    for side in (A, B):
        assert all(hello_fields(f)[5] & CAP_BULK for f, _ in pair.hellos[side])
    sid, bid = pair.open()
    assert pair.a.bulk_stream(sid) and pair.b.bulk_stream(bid)


def test_bulk_waits_for_a_large_flight_cap() -> None:
    """Before the first measurement the cap is 4 KiB: DATA frames serve as well."""
    pair = bulk_pair(lift_caps=False)
    sid, _ = pair.open()
    assert pair.a.flight_cap == FLIGHT_INITIAL
    assert not pair.a.bulk_stream(sid) and pair.a.bulk_room(sid) == 0
    pair.a.flight_cap = 2 * BULK_MIN - 1
    assert not pair.a.bulk_stream(sid) and pair.a.bulk_room(sid) == 0
    pair.a.flight_cap = 2 * BULK_MIN
    assert pair.a.bulk_stream(sid) and pair.a.bulk_room(sid) == 2 * BULK_MIN


def test_a_fast_measured_line_enables_bulk() -> None:
    pair = bulk_pair(lift_caps=False)
    pair.pass_now = True
    sid, bid = pair.open()
    now = 0.0
    for _ in range(3):
        pair.a.send(sid, b"x" * 100_000)
        now += 0.01
        pair.pump(now)
        pair.b.consumed(bid, 100_000)
    cap = pair.a.flight_cap
    assert cap is not None and cap >= 2 * BULK_MIN
    assert pair.a.bulk_stream(sid)


@pytest.mark.parametrize("without", [A, B])
def test_no_bulk_unless_both_offer_it(without: int) -> None:
    configs = [bulk_config(), bulk_config()]
    configs[without] = SessionConfig()
    pair = bulk_pair(configs[A], configs[B])
    assert not any(hello_fields(f)[5] & CAP_BULK for f, _ in pair.hellos[without])
    assert all(hello_fields(f)[5] & CAP_BULK for f, _ in pair.hellos[1 - without])
    sid, bid = pair.open()
    assert not pair.a.bulk_stream(sid) and pair.a.bulk_room(sid) == 0
    assert not pair.b.bulk_stream(bid) and pair.b.bulk_room(bid) == 0


def test_link_on_never_offers_bulk() -> None:
    pair = bulk_pair(bulk_config(link="on"), bulk_config())
    assert pair.a.link is not None and pair.b.link is not None
    assert pair.hellos[A] and not any(hello_fields(f)[5] & CAP_BULK for f, _ in pair.hellos[A])
    sid, bid = pair.open()
    assert not pair.a.bulk_stream(sid) and not pair.b.bulk_stream(bid)


def test_link_off_offers_bulk() -> None:
    pair = bulk_pair(bulk_config(link="off"), bulk_config(link="off"))
    sid, _ = pair.open()
    assert pair.a.bulk_stream(sid)


def test_bulk_stream_only_for_an_open_stream_without_eof_on_an_up_session() -> None:
    pair = bulk_pair()
    opening = pair.a.open_stream("svc", 0.0)
    assert pair.a.stream_info(opening) is not None
    assert not pair.a.bulk_stream(opening)  # OPEN not even sent
    pair.pump()
    assert not pair.a.bulk_stream(opening)  # OPEN sent, no OPEN_OK yet
    pair.b.accept(peer_id(opening))
    pair.pump()
    assert pair.a.bulk_stream(opening)
    assert not pair.a.bulk_stream(12345)
    pair.a.send_eof(opening)
    assert not pair.a.bulk_stream(opening) and pair.a.bulk_room(opening) == 0
    sid, _ = pair.open()
    pair.disconnect()
    assert not pair.a.bulk_stream(sid)


# ============================================================================ session pair: room


def test_bulk_room_is_half_the_peer_window() -> None:
    pair = bulk_pair(config_b=bulk_config(window=100_000))
    sid, _ = pair.open()
    assert pair.a.peer_window == 100_000
    assert pair.a.bulk_room(sid) == 50_000


def test_bulk_room_is_bounded_by_the_stream_credit() -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    pair.a.send(sid, b"d" * 200_000)
    assert pair.a.bulk_room(sid) == 0  # queued data goes first, as DATA
    pair.pump()
    assert pair.received(B, bid) == b"d" * 200_000
    assert pair.a.bulk_room(sid) == 256 * 1024 - 200_000
    pair.b.consumed(bid, 200_000)
    pair.pump()
    assert pair.a.bulk_room(sid) == 128 * 1024


def test_bulk_room_is_bounded_by_the_session_credit() -> None:
    config_b = bulk_config(window=256 * 1024, session_window=256 * 1024)
    pair = bulk_pair(config_b=config_b)
    first, _ = pair.open()
    second, _ = pair.open()
    pair.a.send(first, b"d" * 200_000)
    pair.pump()
    assert pair.a.bulk_room(second) == 256 * 1024 - 200_000


def test_bulk_room_is_bounded_by_the_flight_cap() -> None:
    pair = bulk_pair(config_b=bulk_config(window=1024 * 1024))
    sid, _ = pair.open()
    pair.a.flight_cap = 200_000
    assert pair.a.bulk_room(sid) == 200_000
    write_bulk(pair, A, sid, b"b" * 150_000)
    assert pair.a.bulk_room(sid) == 0  # its probe PING goes first
    pair.a.data_to_send()  # (and is written; the test delivers no more)
    assert pair.a.bulk_room(sid) == 50_000


def test_bulk_room_is_zero_with_data_queued_or_eof_pending() -> None:
    pair = bulk_pair()
    sid, _ = pair.open()
    pair.a.send(sid, b"k")
    assert pair.a.bulk_stream(sid) and pair.a.bulk_room(sid) == 0
    pair.pump()
    assert pair.a.bulk_room(sid) == 128 * 1024
    pair.a.send_eof(sid)
    assert pair.a.bulk_room(sid) == 0


# ======================================================================== session pair: transfer


def test_bulk_transfer_is_delivered_and_accounted() -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    data = os.urandom(100_000)
    frames_before, bytes_before = pair.a.stats.frames_out, pair.a.stats.bytes_out
    write_bulk(pair, A, sid, data)
    stream_a = pair.a.streams[sid]
    assert stream_a.send_credit == 256 * 1024 - 100_000
    assert stream_a.bytes_sent == 100_000
    assert pair.a.stats.frames_out == frames_before + 1
    assert pair.a.stats.bytes_out == bytes_before + BULK_FRAME_SIZE + 100_000
    assert pair.a.stats.bulk_bytes_out == 100_000
    assert len(pair.wire[A]) == BULK_FRAME_SIZE + 100_000

    pair.deliver(A)
    assert pair.received(B, bid) == data
    assert pair.b.bulk_arrived and pair.b.raw_left == 0
    stream_b = pair.b.streams[bid]
    assert (stream_b.recv_credit, stream_b.unconsumed) == (256 * 1024 - 100_000, 100_000)
    assert stream_b.bytes_received == 100_000
    assert pair.b.stats.bulk_bytes_in == 100_000
    assert pair.b.stats.frames_in >= 1 and pair.b.stats.protocol_errors == 0

    assert pair.b.consumed(bid, 100_000)  # past window // 4: a WINDOW is queued
    pair.pump()
    assert stream_a.send_credit == 256 * 1024
    assert stream_b.unconsumed == 0
    assert pair.a.stats.bulk_bytes_in == pair.b.stats.bulk_bytes_out == 0


def test_frames_after_a_bulk_keep_their_sequence() -> None:
    """The BULK frame takes a seq, its raw bytes none: DATA and EOF behind it are accepted."""
    pair = bulk_pair()
    sid, bid = pair.open()
    write_bulk(pair, A, sid, b"B" * 70_000)
    pair.a.send(sid, b"then data")
    pair.a.send_eof(sid)
    pair.pump()
    assert pair.received(B, bid) == b"B" * 70_000 + b"then data"
    assert pair.of(B, ev.EndOfData) == [ev.EndOfData(bid)]
    assert pair.a.is_up and pair.b.is_up
    assert pair.b.stats.lost_frames == 0 and not pair.of(B, ev.SessionEnded)


def test_acceptor_sends_bulk_back_after_open_ok() -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    assert pair.b.bulk_room(bid) == 128 * 1024
    write_bulk(pair, B, bid, b"reply" * 20_000)
    write_bulk(pair, B, bid, b"more")
    pair.pump()
    assert pair.received(A, sid) == b"reply" * 20_000 + b"more"
    assert pair.a.stats.bulk_bytes_in == 100_004
    assert not reset_events(pair.events[A])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bulk_delivered_in_any_split_keeps_its_bytes_and_what_follows(data: st.DataObject) -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    raw = data.draw(st.binary(min_size=1, max_size=3000))
    write_bulk(pair, A, sid, raw)
    pair.a.send(sid, b"|tail")
    pair.flush(A)
    wire = bytes(pair.wire[A])
    pair.wire[A].clear()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=12)))
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        pair.b.receive_data(wire[start:end], 0.0)
        if pair.b.raw_left:
            assert pair.b.raw_pending() == (bid, pair.b.raw_left)
    pair.collect()
    assert pair.received(B, bid) == raw + b"|tail"
    assert pair.b.raw_left == 0 and pair.b.stats.protocol_errors == 0


def test_bulk_header_queues_a_probe_and_pong_counts_bulk_bytes() -> None:
    pair = bulk_pair(config_b=bulk_config(window=1024 * 1024))
    sid, _ = pair.open()
    pair.a.flight_cap = 200_000
    write_bulk(pair, A, sid, b"p" * 150_000, now=1.0)
    assert pair.a.has_data_to_send()
    probe_data = pair.a.data_to_send(now=1.0)
    [probe] = split_frames(probe_data)
    assert probe.type == FrameType.PING
    pair.wire[A] += probe_data  # right behind the raw bytes
    pair.deliver(A)
    pong_data = pair.b.data_to_send()
    [pong] = split_frames(pong_data)
    assert pong.type == FrameType.PONG
    assert bytes(pong.payload[:8]) == bytes(probe.payload)
    assert int.from_bytes(pong.payload[8:16], "big") == 150_000
    assert pair.a.bulk_room(sid) == 50_000
    pair.a.receive_data(pong_data, 1.01)
    assert pair.a.bulk_room(sid) == 200_000  # all of it arrived: nothing in flight


def test_bulk_arrived_says_whether_the_last_read_held_bulk() -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    write_bulk(pair, A, sid, b"x" * 1000)
    pair.deliver(A, BULK_FRAME_SIZE + 10)
    assert pair.b.bulk_arrived and pair.b.raw_left == 990
    pair.deliver(A, 500)
    assert pair.b.bulk_arrived and pair.b.raw_left == 490
    pair.deliver(A)
    assert pair.b.bulk_arrived and pair.b.raw_left == 0
    pair.a.send(sid, b"plain")
    pair.pump()
    assert not pair.b.bulk_arrived
    assert pair.received(B, bid) == b"x" * 1000 + b"plain"


def test_raw_bytes_of_a_stream_reset_locally_mid_bulk_are_dropped() -> None:
    pair = bulk_pair()
    sid, bid = pair.open()
    write_bulk(pair, A, sid, b"x" * 1000)
    pair.deliver(A, BULK_FRAME_SIZE + 100)
    assert pair.b.raw_pending() == (bid, 900)
    pair.b.reset(bid)
    assert pair.b.raw_pending() is None and pair.b.raw_left == 900
    pair.take(B)
    pair.deliver(A)
    assert pair.b.raw_left == 0 and data_events(pair.take(B)) == []
    pair.pump()
    assert reset_events(pair.events[A]) == [(sid, Reason.ABORTED)]
    assert pair.a.is_up and pair.b.is_up and pair.b.stats.protocol_errors == 0


def test_bulk_of_an_acceptor_never_overtakes_its_waiting_open_ok() -> None:
    """An OPEN_OK held back for company (open_ok_delay) goes before any BULK frame."""
    pair = bulk_pair(bulk_config(), bulk_config(open_ok_delay=0.005))
    sid = pair.a.open_stream("svc", 0.0)
    pair.a.send(sid, b"early")  # the opener sends early data: B's OPEN_OK may wait
    pair.pump(0.0)
    bid = peer_id(sid)
    pair.b.accept(bid, 0.0)
    reply = b"r" * 100_000
    # The owner's turn rule (virtproxy/bulk.py): nothing else to send, room for a BULK.
    if not pair.b.has_data_to_send() and pair.b.bulk_room(bid) >= len(reply):
        write_bulk(pair, B, bid, reply, now=0.0)
    else:
        pair.b.send(bid, reply)
    pair.tick(0.01)
    pair.pump()
    assert reset_events(pair.events[A]) == []
    assert pair.received(A, sid) == reply


# ============================================================================ hostile peer


def test_bulk_within_the_window_is_delivered_from_a_raw_peer() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer_bulk(peer, key, 5) + b"hello" + peer.frame(FrameType.EOF, key), 0.0)
    assert session.take_events() == [ev.DataReceived(key, b"hello"), ev.EndOfData(key)]
    assert session.stats.bulk_bytes_in == 5 and session.streams[key].recv_credit == 256 * 1024 - 5


def test_bulk_beyond_the_window_resets_the_stream_and_its_bytes_are_dropped() -> None:
    session, peer = raw_session(SessionConfig(bulk=True, max_frame=256, window=1024))
    victim = raw_open(session, peer, 1)
    bystander = raw_open(session, peer, 2)
    session.receive_data(peer_bulk(peer, victim, 1025) + b"v" * 600, 0.0)
    events = session.take_events()
    assert data_events(events) == []
    assert reset_events(events) == [(victim, Reason.PROTOCOL)]
    assert session.raw_left == 425 and session.raw_pending() is None
    session.receive_data(b"v" * 425 + peer.frame(FrameType.DATA, bystander, b"ok"), 0.0)
    assert session.take_events() == [ev.DataReceived(bystander, b"ok")]
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.PROTOCOL)]
    assert session.is_up and session.stats.protocol_errors == 1
    assert session.stats.bulk_bytes_in == 0 and session.raw_left == 0


def test_bulk_after_eof_is_a_protocol_error_and_its_bytes_are_dropped() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer.frame(FrameType.EOF, key), 0.0)
    assert session.take_events() == [ev.EndOfData(key)]
    session.receive_data(
        peer_bulk(peer, key, 8) + b"too late" + peer.frame(FrameType.PING, 0, b"p" * 8), 0.0
    )
    events = session.take_events()
    assert data_events(events) == [] and reset_events(events) == [(key, Reason.PROTOCOL)]
    assert [t for t, _, _ in replies(session, peer)] == [FrameType.PONG, FrameType.RESET]
    assert session.raw_left == 0 and session.is_up


def test_bulk_for_a_recently_reset_stream_within_credit_is_dropped_quietly() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    other = raw_open(session, peer, 2)
    session.reset(key)
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.ABORTED)]
    session.receive_data(peer_bulk(peer, key, 5000) + b"i" * 5000, 0.0)
    session.receive_data(peer.frame(FrameType.DATA, other, b"still"), 0.0)
    assert session.take_events() == [ev.DataReceived(other, b"still")]
    assert replies(session, peer) == []
    assert session.stats.protocol_errors == 0 and session.raw_left == 0 and session.is_up


def test_dropped_bulk_bytes_give_their_session_credit_back() -> None:
    config = SessionConfig(bulk=True, max_frame=256, window=1024, session_window=1024)
    session, peer = raw_session(config)
    key = raw_open(session, peer, 1)
    session.reset(key)
    peer.read(session)
    session.receive_data(peer_bulk(peer, key, 1000) + b"d" * 1000, 0.0)
    [window] = peer.read(session)
    assert (window.type, window.stream, WINDOW.unpack(window.payload)) == (
        FrameType.WINDOW,
        0,
        (1000,),
    )
    assert session.stats.protocol_errors == 0 and session.is_up


def test_bulk_beyond_the_credit_of_a_recently_reset_stream_is_a_protocol_error() -> None:
    session, peer = raw_session(SessionConfig(bulk=True, max_frame=256, window=1024))
    key = raw_open(session, peer, 1)
    session.reset(key)
    peer.read(session)
    session.receive_data(peer_bulk(peer, key, 1025) + b"i" * 1025, 0.0)
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.PROTOCOL)]
    assert session.stats.protocol_errors == 1 and session.raw_left == 0 and session.is_up


def test_bulk_for_a_stream_that_never_existed_is_refused_and_its_bytes_dropped() -> None:
    session, peer = raw_session()
    other = raw_open(session, peer, 1)
    stranger = OPENER_BIT | 77
    session.receive_data(peer_bulk(peer, stranger, 30) + SYNC * 15, 0.0)
    session.receive_data(peer.frame(FrameType.DATA, other, b"fine"), 0.0)
    assert session.take_events() == [ev.DataReceived(other, b"fine")]
    assert replies(session, peer) == [(FrameType.RESET, 77, Reason.PROTOCOL)]
    assert session.stats.discarded_bytes == 0 and session.raw_left == 0


def test_bulk_to_a_receiver_that_did_not_offer_it_is_a_protocol_error() -> None:
    session, peer = raw_session(SessionConfig(header_crc=True))
    key = raw_open(session, peer, 1)
    other = raw_open(session, peer, 2)
    garbage = b"\x00garbage\x01"
    session.receive_data(peer_bulk(peer, key, len(garbage)) + garbage, 0.0)
    session.receive_data(peer.frame(FrameType.DATA, other, b"next"), 0.0)
    events = session.take_events()
    assert reset_events(events) == [(key, Reason.PROTOCOL)]
    assert data_events(events) == [ev.DataReceived(other, b"next")]
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.PROTOCOL)]
    assert session.raw_left == 0 and session.stats.bulk_bytes_in == 0
    assert session.stats.discarded_bytes == len(garbage)  # resynchronised past them
    assert session.is_up and session.stats.lost_frames == 0


@pytest.mark.parametrize("payload", [COUNT.pack(0), b"\x00\x00\x05", b"\x00\x00\x00\x05\x00"])
def test_malformed_bulk_is_a_protocol_error_with_no_bytes_taken(payload: bytes) -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    other = raw_open(session, peer, 2)
    session.receive_data(peer_bulk(peer, key, 0, payload), 0.0)
    assert session.raw_left == 0
    session.receive_data(peer.frame(FrameType.DATA, other, b"next"), 0.0)
    events = session.take_events()
    assert reset_events(events) == [(key, Reason.PROTOCOL)]
    assert data_events(events) == [ev.DataReceived(other, b"next")]
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.PROTOCOL)]
    assert session.stats.discarded_bytes == 0 and session.is_up


def test_bulk_with_unknown_flags_is_refused_but_the_framing_holds() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    other = raw_open(session, peer, 2)
    frame = encode_frame(FrameType.BULK, key, COUNT.pack(4), peer.seq, 0x40)
    peer.seq += 1
    session.receive_data(frame + b"flag" + peer.frame(FrameType.DATA, other, b"after"), 0.0)
    events = session.take_events()
    assert data_events(events) == [ev.DataReceived(other, b"after")]
    assert reset_events(events) == [(key, Reason.PROTOCOL)]  # our end too, not only the peer's
    assert replies(session, peer) == [(FrameType.RESET, 1, Reason.PROTOCOL)]
    assert session.raw_left == 0 and session.stats.discarded_bytes == 0
    assert session.stats.bulk_bytes_in == 0


def test_bulk_beyond_the_session_window_ends_the_session_and_its_bytes_are_dropped() -> None:
    config = SessionConfig(bulk=True, max_frame=256, window=1024, session_window=1024)
    session, peer = raw_session(config)
    first = raw_open(session, peer, 1)
    second = raw_open(session, peer, 2)
    session.receive_data(peer_bulk(peer, first, 1000) + b"f" * 1000, 0.0)
    assert delivered(session.take_events(), first) == b"f" * 1000
    session.receive_data(peer_bulk(peer, second, 100) + b"s" * 100, 0.0)
    events = session.take_events()
    assert not session.is_up and data_events(events) == []
    assert [type(e) for e in events if isinstance(e, ev.SessionEnded)] == [ev.SessionEnded]
    assert session.raw_left == 0 and session.stats.discarded_bytes == 0


def test_raw_pending_and_raw_taken_let_the_owner_read_past_the_session() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer_bulk(peer, key, 1000) + b"a" * 300, 0.0)
    assert delivered(session.take_events(), key) == b"a" * 300
    assert session.raw_pending() == (key, 700) and session.raw_left == 700
    bytes_in = session.stats.bytes_in
    session.raw_taken(400)  # spliced straight to the local socket
    assert session.raw_pending() == (key, 300)
    session.raw_taken(300)
    assert session.raw_pending() is None and session.raw_left == 0
    assert session.stats.bytes_in == bytes_in + 700
    session.receive_data(peer.frame(FrameType.DATA, key, b"framed"), 0.0)
    assert session.take_events() == [ev.DataReceived(key, b"framed")]
    stream = session.streams[key]
    assert stream.unconsumed == 1006 and stream.bytes_received == 1006
    assert session.consumed(key, 1006) is False  # below window // 4: no WINDOW yet
    assert stream.unconsumed == 0


@pytest.mark.parametrize("count", [0, 701])
def test_raw_taken_refuses_what_is_not_pending(count: int) -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer_bulk(peer, key, 1000) + b"a" * 300, 0.0)
    with pytest.raises(ValueError):
        session.raw_taken(count)
    assert session.raw_pending() == (key, 700)


def test_raw_pending_is_none_without_raw_bytes_of_a_live_stream() -> None:
    session, peer = raw_session()
    assert session.raw_pending() is None
    key = raw_open(session, peer, 1)
    session.receive_data(peer_bulk(peer, key, 10) + b"0123456789", 0.0)
    assert session.raw_pending() is None  # all arrived
    assert delivered(session.take_events(), key) == b"0123456789"
    gone = raw_open(session, peer, 2)
    session.reset(gone)
    session.receive_data(peer_bulk(peer, gone, 10) + b"01234", 0.0)
    assert session.raw_left == 5 and session.raw_pending() is None


def test_taken_raw_bytes_get_no_event_and_the_window_is_granted_on_consumed() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer_bulk(peer, key, 100_000), 0.0)
    assert session.take_events() == [] and session.raw_pending() == (key, 100_000)
    session.raw_taken(100_000)
    session.receive_data(peer.frame(FrameType.PING, 0, b"12345678"), 0.0)
    assert session.take_events() == []
    assert session.consumed(key, 100_000)
    [pong, window] = peer.read(session)
    assert pong.type == FrameType.PONG and int.from_bytes(pong.payload[8:], "big") == 100_000
    assert (window.type, window.stream) == (FrameType.WINDOW, 1)
    assert WINDOW.unpack(window.payload) == (100_000,)


def test_a_bulk_inside_a_damaged_frame_never_breaks_receive_data() -> None:
    """Regression: a RAW piece cut from the decoder's own buffer once stopped its resize."""
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    inner = peer_bulk(peer, key, 10) + b"R" * 10
    wire = encode_header(FrameType.DATA, key, 100, 0) + inner.ljust(100, b"\0") + b"\0" * 4
    session.receive_data(wire[:14], 0.0)
    session.receive_data(wire[14:], 0.0)
    assert delivered(session.take_events(), key) == b"R" * 10
    assert session.is_up and session.raw_left == 0
