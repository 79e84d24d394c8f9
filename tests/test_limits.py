"""Limits a Session puts on its peer (docs/protocol.rst, "Limits"), and the session window."""

from __future__ import annotations

import struct

from sessionpair import A, B, RawPeer, SessionPair, peer_id

from virtproxy import events as ev
from virtproxy.frames import OPENER_BIT, FrameType, Reason
from virtproxy.session import Session, SessionConfig

MIB = 1024 * 1024


def window_frames(pair: SessionPair, side: int) -> list[int]:
    """Session WINDOW increments ``side`` has sent."""
    return [
        struct.unpack(">I", f.payload)[0]
        for f in pair.sent_frames[side]
        if f.type == FrameType.WINDOW and f.stream == 0
    ]


def test_the_session_window_bounds_data_over_all_streams() -> None:
    # Four streams with 64 KiB windows each, but 128 KiB for the session.
    config_b = SessionConfig(window=64 * 1024, session_window=128 * 1024)
    pair = SessionPair(SessionConfig(), config_b)
    pair.handshake()
    streams = [pair.open() for _ in range(4)]
    for a_id, _ in streams:
        pair.a.send(a_id, b"x" * 64 * 1024)
    pair.pump()
    delivered = sum(len(e.data) for e in pair.of(B, ev.DataReceived))
    assert delivered == 128 * 1024  # not 256 KiB: B's local sockets took nothing yet
    # B's sockets take the bytes: session credit flows back, the rest arrives.
    for _, b_id in streams:
        pair.b.consumed(b_id, len(pair.received(B, b_id)))
    pair.pump()
    assert window_frames(pair, B), "no session WINDOW was sent"
    total = sum(len(pair.received(B, b_id)) for _, b_id in streams)
    assert total > 128 * 1024


def test_data_beyond_the_session_window_ends_the_session() -> None:
    session = Session(SessionConfig(window=64 * 1024, session_window=64 * 1024))
    peer = RawPeer()
    peer.handshake(session)
    for number in (1, 2):
        session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | number, b"svc"), 0.0)
        session.accept(number | OPENER_BIT)
    peer.read(session)
    for stream in (1, 1, 1, 2):  # 64,000 bytes: within both windows
        session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | stream, b"a" * 16000), 0.0)
    assert session.is_up
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 2, b"b" * 16000), 0.0)
    assert not session.is_up  # restarted: the peer ignored the session window
    assert session.stats.protocol_errors == 1
    ended = [e for e in session.take_events() if isinstance(e, ev.SessionEnded)]
    assert ended and "session window" in ended[0].reason


def test_an_ended_stream_gives_its_unread_bytes_back_to_the_session() -> None:
    config_b = SessionConfig(window=64 * 1024, session_window=64 * 1024)
    pair = SessionPair(SessionConfig(), config_b)
    pair.handshake()
    first, second = pair.open(), pair.open()
    pair.a.send(first[0], b"x" * 64 * 1024)
    pair.pump()
    pair.a.send(second[0], b"y" * 1000)
    pair.pump()
    assert pair.received(B, second[1]) == b""  # the session window is used up
    pair.b.reset(first[1], Reason.ABORTED)  # its 64 KiB were never read: discarded
    pair.pump()
    assert pair.received(B, second[1]) == b"y" * 1000


def test_resetting_faster_than_the_limit_ends_the_session() -> None:
    session = Session(SessionConfig(max_reset_rate=10))
    peer = RawPeer()
    peer.handshake(session)
    for number in range(1, 31):
        session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | number, b"svc"), 0.0)
        session.accept(number | OPENER_BIT)
        session.receive_data(peer.frame(FrameType.RESET, OPENER_BIT | number, b"\x08"), 0.0)
        if not session.is_up:
            break
    assert number == 21  # a burst of twice the rate, then the limit
    assert session.stats.limit_hits == 1
    ended = [e for e in session.take_events() if isinstance(e, ev.SessionEnded)]
    assert ended and "too fast" in ended[0].reason


def test_resets_within_the_rate_are_fine() -> None:
    session = Session(SessionConfig(max_reset_rate=10))
    peer = RawPeer()
    peer.handshake(session)
    for number in range(1, 61):
        now = number * 0.1
        session.tick(now)
        session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | number, b"svc"), now)
        session.accept(number | OPENER_BIT)
        session.receive_data(peer.frame(FrameType.RESET, OPENER_BIT | number, b"\x08"), now)
        peer.read(session)
    assert session.is_up and session.stats.limit_hits == 0


def test_a_service_name_longer_than_the_limit_gets_open_fail_limit() -> None:
    pair = SessionPair(SessionConfig(), SessionConfig(max_service_name=8))
    pair.handshake()
    short = pair.a.open_stream("12345678", 0.0)
    long = pair.a.open_stream("123456789", 0.0)
    pair.pump()
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)] == [peer_id(short)]
    rejected = pair.of(A, ev.StreamRejected)
    assert [(e.stream_id, e.reason, e.message) for e in rejected] == [
        (long, Reason.LIMIT, "service name too long")
    ]
    assert pair.b.stats.limit_hits == 1


def test_pending_opens_are_bounded() -> None:
    session = Session(SessionConfig(max_pending=3))  # no channel: every open waits
    ids = [session.open_stream("svc", 0.0) for _ in range(5)]
    rejected = [e for e in session.take_events() if isinstance(e, ev.StreamRejected)]
    assert [(e.stream_id, e.reason) for e in rejected] == [
        (ids[3], Reason.LIMIT),
        (ids[4], Reason.LIMIT),
    ]
    assert len(session.streams) == 3
    assert session.stats.limit_hits == 2
