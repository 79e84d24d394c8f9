"""Tests of the sans-I/O Session (virtproxy.session) against docs/protocol.rst.

Everything is deterministic: ``now`` is passed explicitly and bytes move only when
a test (or :class:`sessionpair.SessionPair`) moves them.  The last part is a
hypothesis state machine driving a session pair through opens, data, resets,
time, loss, corruption, reconnects and restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sessionpair import (
    A,
    B,
    RawPeer,
    SessionPair,
    encode,
    frame_mangler,
    hello_fields,
    peer_id,
    split_frames,
)

from virtproxy import events as ev
from virtproxy.frames import (
    FRAME_OVERHEAD,
    LINK_SLACK,
    OPENER_BIT,
    Frame,
    FrameType,
    Reason,
    encode_frame,
)
from virtproxy.link import LINK_WINDOW
from virtproxy.session import HELLO_ANSWER, Session, SessionConfig, State, StreamState

WINDOW = struct.Struct(">I")


def types(frames: list[Frame]) -> list[FrameType]:
    return [FrameType(f.type) for f in frames]


def up_pair(
    config_a: SessionConfig | None = None, config_b: SessionConfig | None = None
) -> SessionPair:
    pair = SessionPair(config_a, config_b)
    pair.handshake()
    pair.take(A)
    pair.take(B)
    return pair


def raw_session(config: SessionConfig | None = None, **raw: int) -> tuple[Session, RawPeer]:
    session = Session(config or SessionConfig())
    peer = RawPeer(**raw)
    peer.handshake(session)
    session.take_events()
    return session, peer


def raw_open(session: Session, peer: RawPeer, number: int, service: bytes = b"svc") -> int:
    """The raw peer opens stream ``number``; the session accepts it; returns the session's id."""
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | number, service), 0.0)
    key = OPENER_BIT | number
    assert session.take_events() == [ev.StreamRequested(key, service.decode())]
    session.accept(key)
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.OPEN_OK, number)]
    return key


# ============================================================================ handshake


def test_handshake_both_start_together() -> None:
    pair = SessionPair()
    # Both first HELLOs are on the wire before either side hears anything.
    pair.flush(A)
    pair.flush(B)
    pair.deliver(A)
    pair.deliver(B)
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert pair.take(A) == [ev.SessionUp(pair.b.session_id, 16384, 256 * 1024)]
    assert pair.take(B) == [ev.SessionUp(pair.a.session_id, 16384, 256 * 1024)]
    hellos = [[hello_fields(f)[:2] for f in pair.sent_frames[side]] for side in (A, B)]
    sa, sb = pair.a.session_id, pair.b.session_id
    assert hellos == [[(sa, 0), (sa, sb)], [(sb, 0), (sb, sa)]]
    check_hello_flags(pair)
    # No HELLO ping-pong, and nothing at all while the session is quiet.
    pair.advance(4.9, step=0.1)
    assert len(pair.sent_frames[A]) == len(pair.sent_frames[B]) == 2


def test_handshake_when_one_side_starts_later() -> None:
    pair = SessionPair(connect=False)
    pair.connect(0.0, sides=[A])
    for t in (0.5, 1.0, 1.5, 2.0, 3.0):
        pair.tick(t)
    # At most one HELLO is queued unsent, however many resend timers fired.
    assert types(split_frames(pair.a.data_to_send())) == [FrameType.HELLO]
    pair.connect(3.2, sides=[B])
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    sa, sb = pair.a.session_id, pair.b.session_id
    # B's HELLO(B,0), A's HELLO(A,B), B's HELLO(B,A): three HELLOs converge.
    assert [hello_fields(f)[:2] for f in pair.sent_frames[B]] == [(sb, 0), (sb, sa)]
    assert [hello_fields(f)[:2] for f in pair.sent_frames[A]] == [(sa, sb)]


def check_hello_flags(pair: SessionPair) -> None:
    """ANSWER (0x01) is set on exactly the HELLOs sent while the sender was not up."""
    for side in (A, B):
        for frame, was_up in pair.hellos[side]:
            assert frame.flags == (0 if was_up else HELLO_ANSWER), (side, frame, was_up)


def test_late_duplicate_hellos_are_answered_once_and_never_ping_pong() -> None:
    pair = SessionPair()
    pair.flush(A)
    pair.deliver(A)  # B knows A now
    pair.wire[B].clear()
    pair.b.data_to_send()  # B's first HELLO is lost
    pair.tick(1.0)
    pair.flush(B)
    pair.tick(2.0)
    pair.flush(B)  # two periodic HELLO(B, A), both with ANSWER
    assert [f.flags for f, _ in pair.hellos[B]] == [HELLO_ANSWER, HELLO_ANSWER]
    pair.deliver(B, len(pair.wire[B]) // 2)
    pair.flush(A)
    pair.deliver(B)
    pair.flush(A)
    assert pair.a.is_up
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    check_hello_flags(pair)
    total = len(pair.hellos[A]) + len(pair.hellos[B])
    pair.advance(4.0, step=0.25)
    assert len(pair.hellos[A]) + len(pair.hellos[B]) == total <= 6


@pytest.mark.parametrize("lost", [A, B])
def test_lost_last_hello_of_handshake_recovers_within_a_few_hello_intervals(lost: int) -> None:
    # Regression: without the ANSWER flag this waited for the keepalive timeout (20 s).
    pair = SessionPair()
    dropped: list[Frame] = []

    def drop_agreeing_hello(frame: Frame) -> bytes | None:
        if frame.type == FrameType.HELLO and hello_fields(frame)[1] and not dropped:
            dropped.append(frame)
            return b""
        return None

    pair.mangle[lost] = frame_mangler(drop_agreeing_hello)
    pair.pump()
    pair.mangle[lost] = None
    assert dropped and not (pair.a.is_up and pair.b.is_up)
    pair.advance(2.5, step=0.5)
    assert pair.a.is_up and pair.b.is_up
    assert not pair.of(A, ev.SessionEnded) and not pair.of(B, ev.SessionEnded)
    check_hello_flags(pair)


def test_frames_after_a_lost_last_hello_end_the_session_instead_of_vanishing() -> None:
    """The HELLO that would bring a side up is lost, and its peer, already up,
    opens a stream.  The side not up must not just discard the OPEN (the
    stream would be left half-open, and its next frame drew a RESET(PROTOCOL)
    "frame for a stream that never existed", as the session machine found):
    frames were lost, so it starts a new session, the peer's stream fails
    cleanly, and the next stream works."""
    pair = up_pair()
    pair.replace(A)  # A restarts: HELLO(new A, 0)
    pair.wire[B].clear()  # nothing stale in flight towards the new A
    pair.flush(A)
    pair.deliver(A)  # B answers HELLO(B, new A), ANSWER set
    pair.flush(B)
    pair.deliver(B)  # A is up, and queues HELLO(A, B): the HELLO that gets lost
    assert pair.a.is_up and not pair.b.is_up
    pair.flush(A)
    pair.wire[A].clear()
    b_session = pair.b.session_id
    key = pair.a.open_stream("svc", pair.now)
    pair.a.send(key, b"hello")
    pair.flush(A)
    pair.deliver(A)
    assert pair.b.session_id != b_session, "B kept the session whose frames it discarded"
    assert pair.b.stats.lost_frames == 1
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    rejected = pair.of(A, ev.StreamRejected)
    assert [(e.stream_id, e.reason) for e in rejected] == [(key, Reason.SESSION_LOST)]
    assert not pair.of(B, ev.StreamRequested)
    assert not pair.a.stats.protocol_errors and not pair.b.stats.protocol_errors
    sa, sb = pair.open()
    pair.a.send(sa, b"again")
    pair.pump()
    assert pair.received(B, sb) == b"again"


def test_a_lost_channel_forgets_that_the_new_peer_may_be_up() -> None:
    """Frames fed after the channel was lost start no handshake, whatever the
    last HELLO on it said (the rule above is about a peer on a live channel)."""
    pair = SessionPair()
    pair.flush(A)
    pair.deliver(A)  # B has HELLO(A, 0): a new peer, which goes up on B's answer
    pair.flush(B)
    pair.deliver(B)  # A is up
    pair.flush(A)
    pair.wire[A].clear()  # the HELLO that would bring B up is lost
    pair.b.connection_lost(pair.now)
    pair.a.open_stream("svc", pair.now)
    pair.flush(A)
    pair.deliver(A)
    assert pair.b.state is State.DISCONNECTED
    assert pair.b.data_to_send() == b""
    assert pair.b.stats.lost_frames == 0


def test_handshaking_side_resends_hello_every_interval() -> None:
    session = Session(SessionConfig(hello_interval=1.0))
    session.connection_made(10.0)
    assert types(split_frames(session.data_to_send())) == [FrameType.HELLO]
    session.tick(10.9)
    assert session.data_to_send() == b""
    session.tick(11.0)
    first = split_frames(session.data_to_send())
    assert types(first) == [FrameType.HELLO]
    assert hello_fields(first[0])[0] == session.session_id
    assert session.next_deadline() == 12.0


def stale_bytes() -> tuple[bytes, bytes]:
    """Bytes a previous session left on the channel, per direction (A->B, B->A).

    They hold that session's HELLOs, OPENs, DATA, WINDOW and EOF frames.
    """
    old = up_pair()
    sa, sb = old.open("svc")
    old.b.send(sb, b"STALE-to-A" * 20)
    old.a.send(sa, b"STALE-to-B" * 20)
    old.b.open_stream("svc", 0.0)
    old.a.open_stream("svc", 0.0)
    old.a.consumed(sa, 64 * 1024)
    old.a.send_eof(sa)
    return b"".join(encode(f) for f in old.sent_frames[A]), b"".join(
        encode(f) for f in old.sent_frames[B]
    )


@pytest.mark.parametrize("cut", [0, 1, 7, 30])
def test_stale_bytes_before_handshake_never_reach_an_event(cut: int) -> None:
    stale_ab, stale_ba = stale_bytes()
    # The stale bytes may start mid-frame (a chardev buffer is not frame-aligned).
    stale_ab, stale_ba = stale_ab[cut:], stale_ba[cut:]
    pair = SessionPair()
    pair.wire[A][:0] = stale_ab  # delivered to B before A's HELLO
    pair.wire[B][:0] = stale_ba
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    for side in (A, B):
        events = pair.take(side)
        assert events == [ev.SessionUp(pair.sessions[1 - side].session_id, 16384, 256 * 1024)]
        assert pair.sessions[side].stats.stale_frames > 0
    assert not pair.a.streams and not pair.b.streams
    # The session works afterwards.
    sa, sb = pair.open()
    pair.a.send(sa, b"fresh")
    pair.pump()
    assert pair.received(B, sb) == b"fresh"


def test_stale_bytes_after_the_new_hello_of_the_peer_are_discarded() -> None:
    """A side restarts; the peer's in-flight frames of the old session must not leak."""
    pair = up_pair()
    _sa, sb = pair.open()
    pair.take(A)
    pair.take(B)
    pair.b.send(sb, b"old-session-data")
    pair.flush(B)  # on the wire towards the old A
    pair.replace(A)
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert not pair.of(A, ev.DataReceived)
    assert not pair.of(A, ev.StreamRequested)
    assert [type(e) for e in pair.take(A)] == [ev.SessionUp]


# ============================================================================ peer restart


def test_peer_restart_resets_streams_and_re_converges() -> None:
    pair = up_pair()
    s1, _p1 = pair.open()
    s2, _p2 = pair.open()
    b_own = pair.b.open_stream("svc", 0.0)
    pair.pump()
    pair.a.accept(peer_id(b_own))
    pair.pump()
    opening = pair.a.open_stream("svc", 0.0)  # OPEN sent, never answered
    pair.pump()
    old_b = pair.b.session_id
    pair.take(A)
    pair.take(B)
    pair.replace(B)
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    events = pair.take(A)
    resets = {e.stream_id: e for e in events if isinstance(e, ev.StreamReset)}
    assert set(resets) == {s1, s2, peer_id(b_own)}
    assert all(e.reason == Reason.SESSION_LOST and not e.by_peer for e in resets.values())
    assert [e for e in events if isinstance(e, ev.StreamRejected)] == [
        ev.StreamRejected(opening, Reason.SESSION_LOST, "the peer restarted (new session id)")
    ]
    ended = [e for e in events if isinstance(e, ev.SessionEnded)]
    assert [e.peer_session for e in ended] == [old_b]
    assert events[-1] == ev.SessionUp(pair.b.session_id, 16384, 256 * 1024)
    assert not pair.a.streams
    # A's stream numbers keep counting in the new session.
    s3, p3 = pair.open()
    assert s3 == opening + 1
    pair.a.send(s3, b"new")
    pair.pump()
    assert pair.received(B, p3) == b"new"


def test_restarted_peer_can_open_streams_numbered_from_one_again() -> None:
    pair = up_pair()
    first = pair.b.open_stream("svc", 0.0)
    pair.pump()
    pair.a.accept(peer_id(first))
    pair.pump()
    pair.replace(B)
    pair.pump()
    pair.take(A)
    pair.take(B)
    again = pair.b.open_stream("svc", 1.0)
    assert again == first == 1
    pair.pump()
    assert pair.take(A) == [ev.StreamRequested(peer_id(again), "svc")]
    assert pair.take(B) == []


@pytest.mark.parametrize("how", ["peer_restart", "channel_lost", "keepalive"])
def test_pending_opens_survive_session_end_when_peer_slots_were_full(how: str) -> None:
    # Regression: _end_session used to drop an open stream while still UP, and _drop's
    # _send_pending_opens turned the waiting open into OPENING, then rejected it.
    pair = up_pair(SessionConfig(open_timeout=60.0), SessionConfig(max_streams=1))
    _s1, _ = pair.open()
    waiting = pair.a.open_stream("svc", 0.0)  # PENDING: the peer has one slot
    pair.pump()
    assert pair.a.streams[waiting].state is StreamState.PENDING
    pair.take(A)
    if how == "peer_restart":
        pair.replace(B)
    elif how == "channel_lost":
        pair.disconnect()
        pair.connect()
    else:
        pair.tick(pair.a.config.keepalive_timeout)
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert not [e for e in pair.events[A] if isinstance(e, ev.StreamRejected)]
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)][-1:] == [peer_id(waiting)]


@pytest.mark.parametrize("how", ["peer_restart", "channel_lost", "keepalive"])
def test_open_queued_but_unsent_survives_session_end(how: str) -> None:
    pair = up_pair(SessionConfig(open_timeout=60.0))
    queued = pair.a.open_stream("svc", 0.0)  # OPEN queued, data_to_send not called yet
    if how == "peer_restart":
        pair.replace(B)
        pair.flush(B)
        pair.deliver(B)  # the new peer's HELLO arrives before A writes anything
    elif how == "channel_lost":
        pair.disconnect()
        pair.connect()
    else:
        pair.tick(pair.a.config.keepalive_timeout)
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert not pair.of(A, ev.StreamRejected)
    assert pair.of(B, ev.StreamRequested)[-1:] == [ev.StreamRequested(peer_id(queued), "svc")]


def test_pending_opens_survive_session_end() -> None:
    pair = up_pair()
    pair.disconnect(sides=[A])
    queued = [pair.a.open_stream("svc", 1.0) for _ in range(3)]
    assert all(pair.a.streams[k].state is StreamState.PENDING for k in queued)
    pair.connect(sides=[A])
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)] == [peer_id(k) for k in queued]
    assert types(pair.sent_frames[A]).count(FrameType.OPEN) == 3


def test_opens_queued_before_the_session_are_sent_once_up() -> None:
    pair = SessionPair(connect=False)
    ids = [pair.a.open_stream(name, 0.0) for name in ("one", "two", "three")]
    assert ids == [1, 2, 3]
    assert pair.a.data_to_send() == b""  # no channel: nothing to send
    pair.connect(0.5)
    pair.pump()
    assert [(e.stream_id, e.service) for e in pair.of(B, ev.StreamRequested)] == [
        (peer_id(1), "one"),
        (peer_id(2), "two"),
        (peer_id(3), "three"),
    ]
    assert types(pair.sent_frames[A]).count(FrameType.OPEN) == 3
    pair.advance(30, step=1)
    assert types(pair.sent_frames[A]).count(FrameType.OPEN) == 3


# ============================================================================ stream lifecycle


def test_open_accept_data_half_close_and_close() -> None:
    pair = up_pair(
        SessionConfig(max_frame=1024, window=4096), SessionConfig(max_frame=512, window=2048)
    )
    sa, sb = pair.open("http")
    assert pair.take(A) == [ev.StreamAccepted(sa)]
    assert pair.take(B) == [ev.StreamRequested(sb, "http")]
    to_b = bytes(hashlib.sha256(b"a").digest() * 400)  # many frames and windows
    to_a = bytes(hashlib.sha256(b"b").digest() * 300)
    for piece in range(0, len(to_b), 999):
        pair.a.send(sa, to_b[piece : piece + 999])
    pair.b.send(sb, to_a[:5000])
    pair.a.send_eof(sa)  # EOF follows the queued data
    consumed = {A: 0, B: 0}

    def read_everything() -> None:
        """Both owners' sockets take every byte delivered so far."""
        for _ in range(50):
            pair.pump()
            for side, sid in ((A, sa), (B, sb)):
                got = len(pair.received(side, sid))
                pair.sessions[side].consumed(sid, got - consumed[side])
                consumed[side] = got

    read_everything()
    assert pair.received(B, sb) == to_b
    assert pair.of(B, ev.EndOfData) == [ev.EndOfData(sb)]
    assert not pair.of(A, ev.StreamClosed) and sa in pair.a.streams
    # Half-closed: B keeps sending after A's EOF, and A keeps granting credit.
    pair.b.send(sb, to_a[5000:])
    read_everything()
    assert pair.received(A, sa) == to_a
    assert not pair.of(A, ev.EndOfData)
    pair.b.send_eof(sb)
    pair.pump()
    assert pair.received(A, sa) == to_a
    assert pair.of(A, ev.EndOfData) == [ev.EndOfData(sa)]
    assert pair.of(A, ev.StreamClosed) == [ev.StreamClosed(sa)]
    assert pair.of(B, ev.StreamClosed) == [ev.StreamClosed(sb)]
    assert not pair.of(A, ev.StreamReset) and not pair.of(B, ev.StreamReset)
    assert not pair.a.streams and not pair.b.streams
    assert pair.a.stats.protocol_errors == pair.b.stats.protocol_errors == 0
    # DATA frames respected each receiver's max_frame.
    assert max(len(f.payload) for f in pair.sent_frames[A] if f.type == FrameType.DATA) == 512
    assert max(len(f.payload) for f in pair.sent_frames[B] if f.type == FrameType.DATA) == 1024
    # Nothing follows the end of a stream.
    frames_before = [len(pair.sent_frames[A]), len(pair.sent_frames[B])]
    pair.a.send(sa, b"late")
    pair.a.consumed(sa, 100000)
    pair.pump()
    assert [len(pair.sent_frames[A]), len(pair.sent_frames[B])] == frames_before


def test_eof_before_accept_and_empty_stream() -> None:
    pair = up_pair()
    sa = pair.a.open_stream("svc", 0.0)
    pair.a.send_eof(sa)
    pair.pump()
    sb = peer_id(sa)
    pair.b.send_eof(sb)  # before accept
    pair.b.accept(sb)
    pair.pump()
    assert pair.of(A, ev.StreamClosed) == [ev.StreamClosed(sa)]
    assert pair.of(B, ev.StreamClosed) == [ev.StreamClosed(sb)]
    assert not pair.of(A, ev.DataReceived) and not pair.of(B, ev.DataReceived)


def test_reject_no_service() -> None:
    pair = up_pair()
    sa, sb = pair.open("nope", accept=False)
    pair.b.reject(sb, Reason.NO_SERVICE, "no iforward named nope")
    pair.pump()
    assert pair.take(A) == [ev.StreamRejected(sa, Reason.NO_SERVICE, "no iforward named nope")]
    assert not pair.a.streams and not pair.b.streams
    pair.b.accept(sb)  # too late: ignored
    pair.pump()
    assert pair.take(A) == []


def test_open_times_out_without_a_session() -> None:
    session = Session(SessionConfig(open_timeout=10.0))
    sid = session.open_stream("svc", 0.0)
    assert session.next_deadline() == 10.0
    session.tick(9.99)
    assert session.take_events() == []
    session.tick(10.0)
    [event] = session.take_events()
    assert isinstance(event, ev.StreamRejected)
    assert (event.stream_id, event.reason) == (sid, Reason.TIMEOUT)
    assert not session.streams
    # Connected but the peer never answers: the same.
    session.connection_made(20.0)
    sid = session.open_stream("svc", 20.0)
    session.tick(30.0)
    assert [(e.stream_id, e.reason) for e in session.take_events()] == [(sid, Reason.TIMEOUT)]


def test_open_times_out_when_the_peer_never_answers() -> None:
    pair = up_pair(SessionConfig(open_timeout=3.0))
    sa = pair.a.open_stream("svc", 0.0)
    pair.pump()
    assert pair.of(B, ev.StreamRequested)  # B's owner never accepts
    pair.advance(3.0, step=1.0)
    assert [(e.stream_id, e.reason) for e in pair.of(A, ev.StreamRejected)] == [
        (sa, Reason.TIMEOUT)
    ]
    assert [(e.stream_id, e.reason, e.by_peer) for e in pair.of(B, ev.StreamReset)] == [
        (peer_id(sa), Reason.TIMEOUT, True)
    ]
    assert not pair.a.streams and not pair.b.streams


def test_reset_reaches_the_peer_and_is_never_answered() -> None:
    pair = up_pair()
    sa, sb = pair.open()
    other_a, other_b = pair.open()
    pair.take(A)
    pair.take(B)
    pair.b.send(sb, b"in flight when A resets")
    pair.flush(B)
    pair.a.reset(sa, Reason.ABORTED, "client went away")
    pair.pump()
    assert pair.take(A) == []  # A's own reset: no event; B's in-flight DATA ignored silently
    assert pair.take(B) == [ev.StreamReset(sb, Reason.ABORTED, "client went away", True)]
    assert FrameType.RESET not in types(pair.sent_frames[B])
    assert pair.a.stats.protocol_errors == 0
    assert set(pair.a.streams) == {other_a} and set(pair.b.streams) == {other_b}
    pair.a.send(other_a, b"still fine")
    pair.pump()
    assert pair.received(B, other_b) == b"still fine"


def test_reset_of_an_opening_stream_is_a_rejection() -> None:
    pair = up_pair()
    sa, sb = pair.open(accept=False)
    pair.b.reset(sb, Reason.REFUSED, "connect refused")
    pair.pump()
    assert pair.take(A) == [ev.StreamRejected(sa, Reason.REFUSED, "connect refused")]


def test_concurrent_opens_from_both_sides_get_distinct_ids() -> None:
    pair = up_pair()
    a_own = pair.a.open_stream("svc", 0.0)
    b_own = pair.b.open_stream("svc", 0.0)
    assert a_own == b_own == 1
    pair.flush(A)
    pair.flush(B)
    pair.deliver(A)
    pair.deliver(B)
    assert pair.take(A) == [ev.StreamRequested(OPENER_BIT | 1, "svc")]
    assert pair.take(B) == [ev.StreamRequested(OPENER_BIT | 1, "svc")]
    pair.a.accept(OPENER_BIT | 1)
    pair.b.accept(OPENER_BIT | 1)
    pair.pump()
    pair.a.send(a_own, b"A's stream, from A")
    pair.a.send(OPENER_BIT | 1, b"B's stream, from A")
    pair.b.send(b_own, b"B's stream, from B")
    pair.b.send(OPENER_BIT | 1, b"A's stream, from B")
    pair.pump()
    assert pair.received(B, OPENER_BIT | 1) == b"A's stream, from A"
    assert pair.received(A, a_own) == b"A's stream, from B"
    assert pair.received(B, b_own) == b"B's stream, from A"
    assert pair.received(A, OPENER_BIT | 1) == b"B's stream, from B"


def test_invalid_service_names_are_refused_locally() -> None:
    session = Session()
    for bad in ("", "a b", "x" * 65, "caf\u00e9", "a/b", "a\x00"):
        with pytest.raises(ValueError):
            session.open_stream(bad, 0.0)
    assert not session.streams
    assert session.open_stream("A-z_0.9" + "x" * 57, 0.0) == 1


@pytest.mark.parametrize("name", [b"", b"a b", b"x" * 65, b"\xff", b"a/b"])
def test_invalid_service_name_from_peer_is_refused(name: bytes) -> None:
    session, peer = raw_session()
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, name), 0.0)
    assert session.take_events() == []
    [reply] = peer.read(session)
    assert (reply.type, reply.stream, reply.payload[0]) == (FrameType.OPEN_FAIL, 1, Reason.PROTOCOL)
    assert not session.streams


# ============================================================================ limits


def test_opens_beyond_peer_max_streams_wait_for_a_slot() -> None:
    pair = up_pair(SessionConfig(open_timeout=5.0), SessionConfig(max_streams=2))
    ids = [pair.a.open_stream("svc", 0.0) for _ in range(4)]
    pair.pump()
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)] == [peer_id(k) for k in ids[:2]]
    assert types(pair.sent_frames[A]).count(FrameType.OPEN) == 2
    pair.b.reject(peer_id(ids[0]), Reason.REFUSED)
    pair.pump()
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)][-1] == peer_id(ids[2])
    pair.advance(5.0, step=1.0)
    rejected = {e.stream_id: e.reason for e in pair.of(A, ev.StreamRejected)}
    # ids[1] and ids[2] were sent and never answered; ids[3] never got a slot.
    assert rejected == {
        ids[0]: Reason.REFUSED,
        ids[1]: Reason.TIMEOUT,
        ids[2]: Reason.TIMEOUT,
        ids[3]: Reason.TIMEOUT,
    }


def test_open_beyond_max_streams_is_rejected_with_limit() -> None:
    """A peer that ignores our max_streams gets OPEN_FAIL(LIMIT)."""

    def inflate(frame: Frame) -> bytes | None:
        if frame.type != FrameType.HELLO:
            return None
        fields = list(struct.unpack(">QQIIII", frame.payload[:32]))
        fields[4] = 100  # B advertises 2; A is made to believe 100
        return encode_frame(
            FrameType.HELLO, 0, struct.pack(">QQIIII", *fields) + frame.payload[32:], frame.seq
        )

    pair = SessionPair(SessionConfig(), SessionConfig(max_streams=2))
    pair.mangle[B] = frame_mangler(inflate)
    pair.handshake()
    ids = [pair.a.open_stream("svc", 0.0) for _ in range(3)]
    pair.pump()
    assert [e.stream_id for e in pair.of(B, ev.StreamRequested)] == [peer_id(k) for k in ids[:2]]
    rejected = pair.of(A, ev.StreamRejected)
    assert [(e.stream_id, e.reason) for e in rejected] == [(ids[2], Reason.LIMIT)]
    assert pair.b.stats.limit_hits == 1
    # A freed slot can be used again.
    pair.b.reject(peer_id(ids[0]), Reason.REFUSED)
    pair.pump()
    again = pair.a.open_stream("svc", 1.0)
    pair.pump()
    assert pair.of(B, ev.StreamRequested)[-1] == ev.StreamRequested(peer_id(again), "svc")


def test_raw_opens_beyond_max_streams() -> None:
    session, peer = raw_session(SessionConfig(max_streams=3))
    for number in range(1, 6):
        session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | number, b"svc"), 0.0)
    assert len(session.take_events()) == 3
    replies = [(f.type, f.stream, f.payload[:1]) for f in peer.read(session)]
    assert replies == [(FrameType.OPEN_FAIL, n, bytes([Reason.LIMIT])) for n in (4, 5)]
    assert len(session.streams) == 3


# ============================================================================ flow control


def test_sender_stops_at_exactly_the_window() -> None:
    pair = up_pair(SessionConfig(), SessionConfig(max_frame=1024, window=4096))
    sa, sb = pair.open()
    pair.a.send(sa, bytes(range(256)) * 80)  # 20480 bytes
    pair.pump()
    pair.advance(15, step=1.0)  # time passes; the receiver never consumes
    assert len(pair.received(B, sb)) == 4096
    data_frames = [f for f in pair.sent_frames[A] if f.type == FrameType.DATA]
    assert [len(f.payload) for f in data_frames] == [1024] * 4
    assert pair.a.streams[sa].queued == 20480 - 4096
    # Consuming less than a quarter window grants nothing yet.
    pair.b.consumed(sb, 1000)
    pair.pump()
    assert len(pair.received(B, sb)) == 4096
    pair.b.consumed(sb, 24)
    pair.pump()
    windows = [
        WINDOW.unpack(f.payload)[0] for f in pair.sent_frames[B] if f.type == FrameType.WINDOW
    ]
    assert windows == [1024]
    assert len(pair.received(B, sb)) == 5120
    assert pair.received(B, sb) == (bytes(range(256)) * 80)[:5120]


@pytest.mark.parametrize("seed", range(5))
def test_in_flight_data_never_exceeds_the_window(seed: int) -> None:
    rnd = random.Random(seed)
    window = 2048
    pair = up_pair(SessionConfig(), SessionConfig(max_frame=256, window=window))
    sa, sb = pair.open()
    payload = rnd.randbytes(50000)
    for start in range(0, len(payload), 3000):
        pair.a.send(sa, payload[start : start + 3000])
    received = 0
    consumed = 0
    for _ in range(2000):
        pair.flush(A, limit=rnd.choice([1, 100, 1000]))
        pair.deliver(A, rnd.randrange(0, 700))
        pair.flush(B)
        pair.deliver(B)
        sent = sum(len(f.payload) for f in pair.sent_frames[A] if f.type == FrameType.DATA)
        granted = sum(
            WINDOW.unpack(f.payload)[0] for f in pair.sent_frames[B] if f.type == FrameType.WINDOW
        )
        assert sent - granted <= window
        received = len(pair.received(B, sb))
        if rnd.random() < 0.5 and received > consumed:
            amount = rnd.randint(1, received - consumed)
            pair.b.consumed(sb, amount)
            consumed += amount
        if received == len(payload):
            break
    assert pair.received(B, sb) == payload
    assert pair.b.stats.protocol_errors == 0


def test_stream_without_credit_does_not_block_another() -> None:
    pair = up_pair(SessionConfig(), SessionConfig(max_frame=256, window=1024))
    stuck_a, stuck_b = pair.open()
    free_a, free_b = pair.open()
    pair.a.send(stuck_a, b"s" * 10000)
    pair.pump()
    pair.a.send(free_a, b"f" * 3000)
    for _ in range(10):
        pair.pump()
        pair.b.consumed(free_b, len(pair.received(B, free_b)) - pair.b.streams[free_b].unacked)
    assert pair.received(B, stuck_b) == b"s" * 1024
    assert pair.received(B, free_b) == b"f" * 3000


def test_data_beyond_the_window_resets_the_stream_with_protocol() -> None:
    session, peer = raw_session(SessionConfig(max_frame=256, window=1024))
    victim = raw_open(session, peer, 1)
    bystander = raw_open(session, peer, 2)
    for _ in range(4):
        session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"w" * 256), 0.0)
    assert [len(e.data) for e in session.take_events()] == [256] * 4
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"X"), 0.0)
    events = session.take_events()
    assert not [e for e in events if isinstance(e, ev.DataReceived)]
    assert [(type(e), e.stream_id, e.reason) for e in events] == [
        (ev.StreamReset, victim, Reason.PROTOCOL)
    ]
    [reply] = peer.read(session)
    assert (reply.type, reply.stream, reply.payload[0]) == (FrameType.RESET, 1, Reason.PROTOCOL)
    assert victim not in session.streams
    # Later frames of the dead stream are ignored; the other stream is unaffected.
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"Y"), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 2, b"ok"), 0.0)
    assert session.take_events() == [ev.DataReceived(bystander, b"ok")]
    assert peer.read(session) == []
    assert session.is_up


@pytest.mark.parametrize(
    "ftype, payload",
    [
        (FrameType.DATA, b"flagged"),
        (FrameType.EOF, b""),
        (FrameType.WINDOW, struct.pack(">I", 1024)),
        (FrameType.RESET, bytes([Reason.ABORTED])),
        (FrameType.OPEN, b"svc"),
    ],
)
def test_a_frame_with_unknown_flags_resets_its_stream_on_both_sides(
    ftype: FrameType, payload: bytes
) -> None:
    """Not the RESET alone: our local end must go too, or its client would wait
    for ever on a stream the peer has forgotten."""
    session, peer = raw_session()
    victim = raw_open(session, peer, 1)
    bystander = raw_open(session, peer, 2)
    session.receive_data(encode_frame(ftype, victim, payload, peer.seq, 0x40), 0.0)
    peer.seq += 1
    events = session.take_events()
    assert [(type(e), e.stream_id, e.reason) for e in events] == [
        (ev.StreamReset, victim, Reason.PROTOCOL)
    ]
    assert victim not in session.streams
    [reply] = peer.read(session)
    assert (reply.type, reply.stream, reply.payload[0]) == (FrameType.RESET, 1, Reason.PROTOCOL)
    session.receive_data(peer.frame(FrameType.DATA, bystander, b"ok"), 0.0)
    assert session.take_events() == [ev.DataReceived(bystander, b"ok")]
    assert session.is_up and session.stats.protocol_errors == 1


def test_a_session_frame_or_unknown_stream_with_unknown_flags_is_only_counted() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(encode_frame(FrameType.PING, 0, b"12345678", peer.seq, 0x40), 0.0)
    peer.seq += 1
    session.receive_data(encode_frame(FrameType.EOF, OPENER_BIT | 9, b"", peer.seq, 0x40), 0.0)
    peer.seq += 1
    assert session.take_events() == []
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.RESET, 9)]
    assert key in session.streams and session.is_up
    assert session.stats.protocol_errors == 2


@pytest.mark.parametrize("reserved", [True, False])
def test_streams_stalled_on_the_session_window_leave_a_keystroke_its_reserve(
    reserved: bool,
) -> None:
    """Bulk streams whose destinations stall hold the peer's session credit,
    but not its last sixteenth: a stream with a keystroke queued still sends.
    (A session window too small to spare 64 KiB keeps no reserve.)"""
    session_window = 1024 * 1024 if reserved else 512 * 1024
    config = SessionConfig(max_frame=16384, window=256 * 1024, session_window=session_window)
    pair = up_pair(config, config)
    bulk = [pair.open() for _ in range(6)]
    keys_a, keys_b = pair.open()
    for sa, _ in bulk:
        pair.a.send(sa, b"x" * (300 * 1024))
    pair.pump()
    held = sum(len(pair.received(B, sb)) for _, sb in bulk)  # no destination took any
    reserve = 64 * 1024 if reserved else 0
    assert held == session_window - reserve
    pair.a.send(keys_a, b"k")
    pair.pump()
    assert pair.received(B, keys_b) == (b"k" if reserved else b"")
    # Once the stalled destinations take their bytes, the bulk streams go on.
    for _, sb in bulk:
        pair.b.consumed(sb, len(pair.received(B, sb)))
    pair.pump()
    assert sum(len(pair.received(B, sb)) for _, sb in bulk) > held
    assert pair.received(B, keys_b) == b"k"


def test_partially_covered_data_frame_is_not_delivered_in_part() -> None:
    session, peer = raw_session(SessionConfig(max_frame=256, window=256))
    key = raw_open(session, peer, 1)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"a" * 200), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"b" * 100), 0.0)
    events = session.take_events()
    assert events[0] == ev.DataReceived(key, b"a" * 200)
    assert [type(e) for e in events[1:]] == [ev.StreamReset]


def test_window_grant_resumes_and_overflow_is_a_protocol_error() -> None:
    session, peer = raw_session(window=1024, max_frame=256)
    key = session.open_stream("svc", 0.0)
    assert types(peer.read(session)) == [FrameType.OPEN]
    session.receive_data(peer.frame(FrameType.OPEN_OK, key), 0.0)
    session.send(key, b"z" * 3000)
    sent = [len(f.payload) for f in peer.read(session)]
    assert sent == [256, 256, 256, 256]
    session.receive_data(peer.frame(FrameType.WINDOW, key, WINDOW.pack(300)), 0.0)
    assert [len(f.payload) for f in peer.read(session)] == [256, 44]
    session.take_events()
    # Credit is 0 now: up to 2**31-1 in total is fine, one byte more is not.
    session.receive_data(peer.frame(FrameType.WINDOW, key, WINDOW.pack(0x7FFFFFFF - 100)), 0.0)
    assert session.take_events() == []
    session.receive_data(peer.frame(FrameType.WINDOW, key, WINDOW.pack(101)), 0.0)
    assert [(type(e), e.reason) for e in session.take_events()] == [
        (ev.StreamReset, Reason.PROTOCOL)
    ]
    assert types(peer.read(session)) == [FrameType.RESET]


@pytest.mark.parametrize(
    "payload", [b"", b"\x00\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"]
)
def test_bad_window_frames_reset_the_stream(payload: bytes) -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer.frame(FrameType.WINDOW, OPENER_BIT | 1, payload), 0.0)
    assert [(type(e), e.stream_id, e.reason) for e in session.take_events()] == [
        (ev.StreamReset, key, Reason.PROTOCOL)
    ]


def test_data_before_open_ok_and_after_eof_are_protocol_errors() -> None:
    session, peer = raw_session(SessionConfig(early_data=False))
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, b"svc"), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"early"), 0.0)
    events = session.take_events()
    assert [type(e) for e in events] == [ev.StreamRequested, ev.StreamReset]
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.RESET, 1)]
    key = raw_open(session, peer, 2)
    session.receive_data(peer.frame(FrameType.EOF, OPENER_BIT | 2), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 2, b"late"), 0.0)
    events = session.take_events()
    assert events[0] == ev.EndOfData(key)
    assert [(type(e), e.reason) for e in events[1:]] == [(ev.StreamReset, Reason.PROTOCOL)]


# ============================================================================ scheduling


@pytest.mark.parametrize("bulk_streams", [1, 3])
def test_round_robin_small_stream_is_not_stuck_behind_bulk(bulk_streams: int) -> None:
    pair = up_pair()
    bulk = [pair.open()[0] for _ in range(bulk_streams)]
    small_a, _small_b = pair.open()
    for sid in bulk:
        pair.a.send(sid, b"B" * 200000)
    pair.a.send(small_a, b"!")
    frames: list[Frame] = []
    for _ in range(bulk_streams + 1):
        frames.extend(split_frames(pair.a.data_to_send(limit=1)))
    assert all(f.type == FrameType.DATA for f in frames)
    assert len(frames) == bulk_streams + 1
    assert (peer_id(small_a), b"!") in [(f.stream, f.payload) for f in frames]


@pytest.mark.parametrize("frame_limit", [1, 100, 300])
def test_data_to_send_frame_limit_caps_data_payloads(frame_limit: int) -> None:
    pair = up_pair(SessionConfig(), SessionConfig(max_frame=256))
    sa, sb = pair.open()
    pair.a.send(sa, bytes(range(250)) * 4)
    frames = split_frames(pair.a.data_to_send(frame_limit=frame_limit))
    sizes = [len(f.payload) for f in frames if f.type == FrameType.DATA]
    assert max(sizes) == min(frame_limit, 256)
    assert sum(sizes) == 1000
    pair.wire[A] += b"".join(encode(f) for f in frames)
    pair.pump()
    assert pair.received(B, sb) == bytes(range(250)) * 4


def test_control_frames_go_before_data() -> None:
    pair = up_pair()
    sa, sb = pair.open()
    pair.a.send(sa, b"d" * 100000)
    pair.b.send(sb, b"x" * 70000)
    pair.flush(B)
    pair.deliver(B)
    pair.a.consumed(sa, 70000)  # WINDOW queued behind a lot of DATA
    first = split_frames(pair.a.data_to_send(limit=1))
    assert types(first)[0] == FrameType.WINDOW


def test_send_high_water_and_writable() -> None:
    pair = up_pair(SessionConfig(send_high_water=1000), SessionConfig(early_data=False))
    sa = pair.a.open_stream("svc", 0.0)
    assert pair.a.send(sa, b"a" * 999) is True
    assert pair.a.send(sa, b"a") is False  # queued while still opening
    assert pair.a.send(sa, b"") is False
    pair.pump()
    assert not pair.of(A, ev.StreamWritable)
    pair.b.accept(peer_id(sa))
    pair.pump()
    assert pair.of(A, ev.StreamWritable) == [ev.StreamWritable(sa)]
    assert pair.a.send(sa, b"b" * 10) is True
    assert len(pair.received(B, peer_id(sa))) == 1000


def test_writable_only_after_draining_below_half() -> None:
    pair = up_pair(SessionConfig(send_high_water=4096), SessionConfig(max_frame=1024, window=4096))
    sa, sb = pair.open()
    assert pair.a.send(sa, b"q" * 10000) is False
    pair.pump()  # 4096 sent, 5904 still queued
    assert not pair.of(A, ev.StreamWritable)
    pair.b.consumed(sb, 4096)
    pair.pump()  # 8192 sent, 1808 queued < 2048
    assert pair.of(A, ev.StreamWritable) == [ev.StreamWritable(sa)]


# ============================================================================ keepalive


def test_keepalive_ping_after_interval_and_pong_answered() -> None:
    pair = up_pair()
    pair.tick(4.9)
    assert not pair.a.has_data_to_send() and not pair.b.has_data_to_send()
    pair.tick(5.0)
    pair.flush(A)
    pair.flush(B)
    assert types(pair.sent_frames[A][-1:]) == [FrameType.PING]
    assert types(pair.sent_frames[B][-1:]) == [FrameType.PING]
    ping_a = pair.sent_frames[A][-1].payload
    pair.pump()
    pong_b = pair.sent_frames[B][-1]
    # A PONG echoes the PING's 8 bytes, then counts the DATA bytes received.
    assert (pong_b.type, pong_b.payload[:8]) == (FrameType.PONG, ping_a)
    assert len(pong_b.payload) == 16
    # Driven only at next_deadline(), the session stays up for a long time.
    for _ in range(100):
        pair.tick(min(s.next_deadline() or 1e9 for s in pair.sessions))
        pair.pump()
    assert pair.now > 200
    assert pair.a.is_up and pair.b.is_up
    assert not pair.of(A, ev.SessionEnded) and not pair.of(B, ev.SessionEnded)


def test_silence_past_keepalive_timeout_ends_the_session() -> None:
    pair = up_pair()
    sa, sb = pair.open()
    pair.a.tick(15.0)
    waiting = pair.a.open_stream("svc", 15.0)
    pair.flush(A)  # PING and OPEN on the wire, never delivered
    pair.wire[A].clear()
    pair.take(A)
    old_id = pair.a.session_id
    pair.a.tick(19.9)
    assert pair.a.is_up
    pair.a.tick(20.0)
    events = pair.a.take_events()
    assert (
        ev.StreamReset(sa, Reason.SESSION_LOST, "keepalive timeout: the peer fell silent", False)
        in events
    )
    assert (
        ev.SessionEnded(pair.b.session_id, "keepalive timeout: the peer fell silent", True)
        in events
    )
    assert [(e.stream_id, e.reason) for e in events if isinstance(e, ev.StreamRejected)] == [
        (waiting, Reason.SESSION_LOST)
    ]
    assert pair.a.stats.keepalive_timeouts == 1
    [hello] = split_frames(pair.a.data_to_send())  # the queued PING went with the session
    their, seen = hello_fields(hello)[:2]
    assert their != old_id and their == pair.a.session_id and seen == 0
    pair.wire[A] += encode(hello)
    pair.pump(20.1)
    assert pair.a.is_up and pair.b.is_up
    assert [(e.stream_id, e.reason) for e in pair.of(B, ev.StreamReset)] == [
        (sb, Reason.SESSION_LOST)
    ]


def test_ping_flood_keeps_one_pong() -> None:
    session, peer = raw_session()
    flood = b"".join(peer.frame(FrameType.PING, 0, n.to_bytes(8, "big")) for n in range(10000))
    session.receive_data(flood, 1.0)
    assert not session.input_paused
    frames = peer.read(session)
    assert [(f.type, f.payload[:8]) for f in frames] == [
        (FrameType.PONG, (9999).to_bytes(8, "big"))
    ]
    assert session.is_up


def test_control_flood_pauses_input() -> None:
    session, peer = raw_session()
    flood = b"".join(peer.frame(FrameType.DATA, OPENER_BIT | n, b"x") for n in range(1, 5001))
    session.receive_data(flood, 1.0)
    assert session.input_paused
    assert len(peer.read(session, limit=64 * 1024)) == 5000  # every stranger answered
    assert not session.input_paused


def test_goaway_ends_the_session_on_both_sides() -> None:
    pair = up_pair()
    sa, sb = pair.open()
    pending = pair.a.open_stream("svc", 0.0)
    pair.take(A)
    pair.take(B)
    pair.a.go_away(1.0, Reason.SHUTDOWN, "daemon stopping")
    pair.collect()
    events_a = pair.take(A)
    assert [
        (type(e), e.stream_id, e.reason) for e in events_a if not isinstance(e, ev.SessionEnded)
    ] == [
        (ev.StreamReset, sa, Reason.SHUTDOWN),
        (ev.StreamRejected, pending, Reason.SHUTDOWN),
    ]
    pair.flush(A)
    assert [(f.type, f.payload) for f in pair.sent_frames[A][-1:]] == [
        (FrameType.GOAWAY, bytes([Reason.SHUTDOWN]) + b"daemon stopping")
    ]
    pair.pump()
    events_b = pair.take(B)
    assert [
        (type(e), e.stream_id, e.reason) for e in events_b if isinstance(e, ev.StreamReset)
    ] == [(ev.StreamReset, sb, Reason.SESSION_LOST)]
    ended = [e for e in events_b if isinstance(e, ev.SessionEnded)]
    assert len(ended) == 1 and "daemon stopping" in ended[0].reason
    assert not pair.a.is_up and not pair.b.is_up
    assert not pair.a.streams and not pair.b.streams
    pair.advance(5)
    assert not pair.a.is_up and not pair.b.is_up  # A is gone; B keeps trying


# ============================================================================ loss and damage


def test_lost_frame_restarts_the_session_without_wrong_data() -> None:
    pair = up_pair()
    s1a, s1b = pair.open()
    s2a, s2b = pair.open()
    pair.a.send(s1a, b"A" * 100)
    pair.pump()
    pair.take(A)
    pair.take(B)
    # Only the DATA frame: a HELLO or PING payload (random ids) may begin with "B" too.
    pair.mangle[A] = frame_mangler(
        lambda f: b"" if f.type == FrameType.DATA and f.payload[:1] == b"B" else None
    )
    pair.a.send(s1a, b"B" * 100)
    pair.a.send(s2a, b"C" * 100)
    pair.pump()
    pair.mangle[A] = None
    pair.pump()
    assert pair.a.is_up and pair.b.is_up
    assert pair.b.stats.lost_frames == 1
    events_b = pair.take(B)
    assert not [e for e in events_b if isinstance(e, ev.DataReceived)]
    assert {(e.stream_id, e.reason) for e in events_b if isinstance(e, ev.StreamReset)} == {
        (s1b, Reason.CORRUPT),
        (s2b, Reason.CORRUPT),
    }
    assert {(e.stream_id, e.reason) for e in pair.of(A, ev.StreamReset)} == {
        (s1a, Reason.SESSION_LOST),
        (s2a, Reason.SESSION_LOST),
    }
    assert [type(e) for e in events_b][-1] is ev.SessionUp
    assert not pair.a.streams and not pair.b.streams


def test_damaged_data_frame_resets_only_its_stream() -> None:
    pair = up_pair()
    s1a, s1b = pair.open()
    s2a, s2b = pair.open()
    pair.take(A)
    pair.take(B)

    def flip(frame: Frame) -> bytes | None:
        if frame.type == FrameType.DATA and frame.payload[:1] == b"B":
            data = bytearray(encode(frame))
            data[14 + 10] ^= 0x40  # a payload byte
            return bytes(data)
        return None

    pair.mangle[A] = frame_mangler(flip)
    pair.a.send(s1a, b"A" * 50)
    pair.pump()
    pair.a.send(s1a, b"B" * 50)
    pair.a.send(s2a, b"C" * 50)
    pair.pump()
    pair.a.send(s2a, b"D" * 50)
    pair.b.send(s2b, b"back")
    pair.pump()
    assert pair.received(B, s1b) == b"A" * 50
    assert pair.received(B, s2b) == b"C" * 50 + b"D" * 50
    assert pair.received(A, s2a) == b"back"
    assert pair.of(B, ev.StreamReset) == [
        ev.StreamReset(s1b, Reason.CORRUPT, "damaged frame on the channel", False)
    ]
    assert [(e.stream_id, e.reason, e.by_peer) for e in pair.of(A, ev.StreamReset)] == [
        (s1a, Reason.CORRUPT, True)
    ]
    assert not pair.of(A, ev.SessionEnded) and not pair.of(B, ev.SessionEnded)
    assert pair.b.stats.damaged_frames == 1
    assert set(pair.a.streams) == {s2a} and set(pair.b.streams) == {s2b}


def test_damaged_data_for_a_just_reset_stream_leaves_other_streams_alone() -> None:
    pair = up_pair()
    s1a, s1b = pair.open()
    s2a, s2b = pair.open()
    pair.take(A)
    pair.take(B)

    def flip(frame: Frame) -> bytes | None:
        if frame.type == FrameType.DATA:
            data = bytearray(encode(frame))
            data[20] ^= 1
            return bytes(data)
        return None

    pair.mangle[A] = frame_mangler(flip)
    pair.a.send(s1a, b"in flight")
    pair.b.reset(s1b)
    pair.flush(A)
    pair.flush(B)
    pair.deliver(A)
    pair.deliver(B)
    pair.mangle[A] = None
    pair.pump()
    assert not pair.of(B, ev.SessionEnded)
    assert set(pair.a.streams) == {s2a} and set(pair.b.streams) == {s2b}


@pytest.mark.parametrize(
    "victim", [FrameType.WINDOW, FrameType.OPEN, FrameType.OPEN_OK, FrameType.EOF, FrameType.RESET]
)
def test_damaged_control_frame_never_leaves_streams_half_open(victim: FrameType) -> None:
    pair = up_pair(SessionConfig(), SessionConfig(max_frame=256, window=1024))
    _keep_a, keep_b = pair.open()
    sa, sb = pair.open()
    pair.take(A)
    pair.take(B)
    damaged: list[Frame] = []

    def flip(frame: Frame) -> bytes | None:
        if frame.type == victim and not damaged:
            damaged.append(frame)
            data = bytearray(encode(frame))
            data[-1] ^= 0x80  # the CRC: header intact
            return bytes(data)
        return None

    for side in (A, B):
        pair.mangle[side] = frame_mangler(flip)
    pair.a.send(sa, b"x" * 1024)
    pair.pump()
    pair.b.consumed(sb, 1024)  # WINDOW from B
    pair.a.send_eof(sa)  # EOF from A
    pair.b.reset(keep_b)  # RESET from B
    late = pair.a.open_stream("svc", 0.0)  # OPEN from A
    pair.pump()
    pair.b.accept(peer_id(late))  # OPEN_OK from B
    pair.pump()
    for side in (A, B):
        pair.mangle[side] = None
    pair.advance(25, step=1.0)
    assert damaged, "the victim frame type was never sent"
    assert pair.a.is_up and pair.b.is_up
    # Whatever happened (stream reset or session restart), both sides agree.
    assert {peer_id(k) for k in pair.a.streams} == set(pair.b.streams)
    assert pair.received(B, sb) == b"x" * len(pair.received(B, sb))


def test_bit_flips_on_the_wire_never_deliver_wrong_data() -> None:
    """Flip each byte position of a burst of traffic in turn: never wrong bytes, always recovers."""
    payload = bytes(range(256)) * 2
    for position in range(0, 400, 7):
        pair = up_pair()
        sa, sb = pair.open()
        pair.take(B)
        pair.a.send(sa, payload)
        pair.a.send_eof(sa)
        pair.flush(A)
        wire = pair.wire[A]
        wire[position % len(wire)] ^= 0x10
        pair.pump()
        pair.advance(25, step=1.0)
        got = pair.received(B, sb)
        assert payload.startswith(got), position
        assert pair.a.is_up and pair.b.is_up
        if pair.of(B, ev.EndOfData):
            assert got == payload


# ============================================================================ strangers


def test_a_repeated_hello_and_data_run_is_not_delivered_twice() -> None:
    """A line that repeats a run of bytes must never make a stream deliver twice.

    An up side sends an agreeing HELLO when its peer asks (ANSWER flag), and
    the frames after it restart at seq 0.  Until 506701e the receiver reset its
    expected seq on every HELLO, so the same run arriving twice passed the
    sequence check and its DATA reached the client twice (a wrong byte).
    """
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    run = peer.hello(session.session_id) + peer.frame(FrameType.DATA, key, b"abc")
    session.receive_data(run, 0.1)
    session.receive_data(run, 0.2)  # the same bytes again
    delivered = b"".join(e.data for e in session.take_events() if isinstance(e, ev.DataReceived))
    assert delivered == b"abc", delivered


def test_frames_for_unknown_streams_do_not_crash() -> None:
    session, peer = raw_session()
    strangers = [0, 1, 7, 0x7FFFFFFF, 0x80000000, 0x80000009, 0xFFFFFFFF]
    for stream in strangers:
        for ftype in (
            FrameType.DATA,
            FrameType.WINDOW,
            FrameType.EOF,
            FrameType.OPEN_OK,
            FrameType.OPEN_FAIL,
            FrameType.RESET,
        ):
            session.receive_data(peer.frame(ftype, stream, b"\x01\x02\x03\x04"), 1.0)
    assert session.take_events() == []
    replies = peer.read(session)
    assert all(f.type == FrameType.RESET and f.payload[0] == Reason.PROTOCOL for f in replies)
    assert session.is_up and not session.streams


def test_unknown_type_flags_and_session_frames_with_stream_are_ignored() -> None:
    session, peer = raw_session()
    session.receive_data(peer.frame(0x7F, 0, b"future"), 1.0)
    session.receive_data(peer.frame(FrameType.PING, 5, bytes(8)), 1.0)
    session.receive_data(encode_frame(FrameType.PING, 0, bytes(8), peer.seq, flags=1), 1.0)
    peer.seq += 1
    assert peer.read(session) == []
    # The sequence still counts the ignored frames: the next PING is answered.
    session.receive_data(peer.frame(FrameType.PING, 0, b"12345678"), 1.0)
    pongs = [(f.type, f.payload[:8]) for f in peer.read(session)]
    assert pongs == [(FrameType.PONG, b"12345678")]
    assert session.is_up and session.take_events() == []
    assert session.stats.protocol_errors == 3


@pytest.mark.parametrize(
    "fields",
    [
        (0, 0, 16384, 262144, 1024, 0),  # session 0
        (5, 0, 255, 262144, 1024, 0),  # max_frame too small
        (5, 0, 16384, 1000, 1024, 0),  # window < max_frame
        (5, 0, 16384, 262144, 0, 0),  # no streams
    ],
)
def test_bad_hellos_are_ignored(fields: tuple[int, ...]) -> None:
    session = Session()
    session.connection_made(0.0)
    session.data_to_send()
    session.receive_data(encode_frame(FrameType.HELLO, 0, struct.pack(">QQIIII", *fields)), 0.0)
    session.receive_data(encode_frame(FrameType.HELLO, 0, b"short"), 0.0)
    assert session.data_to_send() == b"" and not session.is_up
    assert session.stats.protocol_errors == 2


def test_duplicate_open_does_not_leave_an_orphan_stream() -> None:
    session, peer = raw_session()
    key = raw_open(session, peer, 1)
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, b"svc"), 0.0)
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.RESET, 1)]
    # We told the peer that stream 1 is dead: it must be dead here too.
    assert key not in session.streams
    assert [type(e) for e in session.take_events()] == [ev.StreamReset]


def test_accept_reject_reset_send_on_unknown_ids_are_harmless() -> None:
    session, peer = raw_session()
    for call in (session.accept, session.send_eof, session.reset):
        call(12345)
    session.reject(12345, Reason.REFUSED)
    session.consumed(12345, 10)
    assert session.send(12345, b"x") is False
    assert session.take_events() == [] and peer.read(session) == []


# ============================================================================ state machine


def stream_bytes(uid: int, key: int, offset: int, size: int) -> bytes:
    """Deterministic, stream-unique content: misrouted bytes can never pass for right ones."""
    out = bytearray()
    block = offset // 32
    while len(out) < (offset % 32) + size:
        out += hashlib.blake2s(f"{uid}/{key}/{block}".encode()).digest()
        block += 1
    start = offset % 32
    return bytes(out[start : start + size])


@dataclass(eq=False)
class Track:
    """One end of a stream, at one Session object (``uid``)."""

    uid: int
    key: int
    ours: bool
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    peer: Track | None = None
    requested: bool = False
    open_sent: bool = False
    eof_sent: bool = False
    eof_received: bool = False
    blocked: bool = False
    unconsumed: int = 0
    #: Size of the owner's latest ``send``: the queue may exceed the high
    #: water mark by at most that write (the owner stops reading after it).
    last_write: int = 0
    end: str = ""


SM_CONFIG = SessionConfig(
    max_frame=256,
    window=1024,
    # Smaller than three streams' windows: the session-wide bound binds too.
    session_window=2048,
    max_streams=3,
    keepalive_interval=5.0,
    keepalive_timeout=20.0,
    hello_interval=1.0,
    open_timeout=10.0,
    send_high_water=2048,
    # OPEN_OKs wait for company (or a tick) now and then, as in the daemon.
    open_ok_delay=0.5,
)
MAX_OPENS = 14
#: Control frames one side may have queued unsent.  Each step adds a few per
#: stream at most (OPEN*, WINDOW, EOF, RESET), plus a PING, PONG and HELLO.
CONTROL_BOUND = 64
sides = st.sampled_from([A, B])
indexes = st.integers(0, 20)


class SessionPairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = SessionPair(SM_CONFIG, SM_CONFIG)
        self.uid = [0, 1]
        self.next_uid = 2
        self.live: list[dict[int, Track]] = [{}, {}]
        self.tracks: dict[tuple[int, int], Track] = {}
        self.sid_owner: dict[int, int] = {}
        self.peer_uid: dict[int, int] = {}
        self.opens = 0
        self.broken = False
        self.link = False

    # ------------------------------------------------------------------ model

    def note_session_ids(self) -> None:
        check_hello_flags(self.pair)
        for side in (A, B):
            self.pair.hellos[side].clear()
            for frame in self.pair.sent_frames[side]:
                if frame.type == FrameType.HELLO:
                    self.sid_owner.setdefault(hello_fields(frame)[0], self.uid[side])
                elif frame.type == FrameType.OPEN:
                    self.tracks[(self.uid[side], frame.stream ^ OPENER_BIT)].open_sent = True
            self.pair.sent_frames[side].clear()

    def process(self) -> None:
        self.broken = True  # stays set if an assertion fails half-way (see teardown)
        self._process()
        self.broken = False

    def _process(self) -> None:
        self.note_session_ids()
        for side in (A, B):  # ids announced inside link chunks, too
            self.sid_owner.setdefault(self.pair.sessions[side].session_id, self.uid[side])
        for side in (A, B):
            uid = self.uid[side]
            live = self.live[side]
            for event in self.pair.take(side):
                if isinstance(event, ev.SessionUp):
                    assert event.peer_session in self.sid_owner, event
                    self.peer_uid[uid] = self.sid_owner[event.peer_session]
                    continue
                if isinstance(event, ev.SessionEnded | ev.LinkNotice):
                    continue
                key = event.stream_id
                if isinstance(event, ev.StreamRequested):
                    assert key & OPENER_BIT and key not in live, event
                    opener = self.tracks.get((self.peer_uid[uid], key ^ OPENER_BIT))
                    assert opener is not None and opener.ours, f"OPEN from nowhere: {event}"
                    assert opener.peer is None, f"stream opened twice: {event}"
                    track = Track(uid, key, ours=False, requested=True, peer=opener)
                    opener.peer = track
                    live[key] = self.tracks[(uid, key)] = track
                    continue
                track = live.get(key)
                assert track is not None, f"event for a stream not live at side {side}: {event}"
                if isinstance(event, ev.StreamAccepted):
                    assert track.ours and track.peer is not None
                elif isinstance(event, ev.DataReceived):
                    assert not track.eof_received and track.peer is not None, event
                    start = len(track.received)
                    expected = bytes(track.peer.sent[start : start + len(event.data)])
                    assert event.data == expected, f"wrong bytes on {key:#x} at offset {start}"
                    track.received += event.data
                    track.unconsumed += len(event.data)
                elif isinstance(event, ev.EndOfData):
                    assert not track.eof_received and track.peer is not None
                    assert track.peer.eof_sent and track.received == track.peer.sent
                    track.eof_received = True
                elif isinstance(event, ev.StreamClosed):
                    assert track.eof_received and track.eof_sent
                    assert track.peer is not None and track.received == track.peer.sent
                    track.end = "closed"
                    del live[key]
                elif isinstance(event, ev.StreamWritable):
                    assert track.blocked
                    track.blocked = False
                elif isinstance(event, ev.StreamReset | ev.StreamRejected):
                    assert not isinstance(event, ev.StreamRejected) or track.ours
                    # Two correct peers never commit a protocol error, whatever the channel
                    # does (checksums turn damage into CORRUPT or a new session).
                    assert event.reason != Reason.PROTOCOL, event
                    # With link reliability on, damage is repaired below the streams.
                    assert not (self.link and event.reason == Reason.CORRUPT), event
                    # Opens not yet sent stay queued when a session ends (docs: "The session").
                    assert not (
                        isinstance(event, ev.StreamRejected)
                        and event.reason == Reason.SESSION_LOST
                        and not track.open_sent
                    ), event
                    track.end = type(event).__name__
                    del live[key]
                else:  # pragma: no cover
                    raise AssertionError(f"unknown event {event}")

    def pick(self, side: int, index: int, want: str = "any") -> Track | None:
        candidates = [
            t
            for t in self.live[side].values()
            if want == "any"
            or (want == "requested" and t.requested)
            or (want == "sendable" and not t.eof_sent and not t.blocked)
            or (want == "unconsumed" and t.unconsumed)
        ]
        return candidates[index % len(candidates)] if candidates else None

    # ------------------------------------------------------------------ rules

    def settle(self, pump: bool) -> None:
        if pump:
            self.pair.pump()
        self.process()

    @initialize(
        streams=st.lists(st.sampled_from([A, B]), max_size=3),
        data=st.booleans(),
        flight=st.booleans(),
        link=st.sampled_from(["off", "on"]),
    )
    def start(self, streams: list[int], data: bool, flight: bool, link: str) -> None:
        """Begin with a session up and a few open streams (maybe with data in flight).

        ``flight``: the owners pass ``now`` when they write, so the in-flight
        cap and its probe PINGs/PONGs run too.  ``link``: link reliability on
        both sides ("on"), which must repair every fault of the line.
        """
        self.link = link == "on"
        if self.link:
            config = dataclasses.replace(SM_CONFIG, link="on")
            self.pair = SessionPair(config, config)
        self.pair.pass_now = flight
        self.settle(pump=True)
        for side in streams:
            self.open(side, pump=True)
            self.answer(1 - side, -1, accept=True, pump=True)
            if data:
                self.send(side, -1, 300, pump=False)
                self.send(1 - side, 0, 700, pump=False)

    @precondition(lambda self: self.opens < MAX_OPENS)
    @rule(side=sides, pump=st.booleans())
    def open(self, side: int, pump: bool) -> None:
        self.opens += 1
        key = self.pair.sessions[side].open_stream("svc", self.pair.now)
        uid = self.uid[side]
        assert (uid, key) not in self.tracks
        self.live[side][key] = self.tracks[(uid, key)] = Track(uid, key, ours=True)
        self.settle(pump)

    @rule(side=sides, index=indexes, accept=st.integers(0, 3).map(bool), pump=st.booleans())
    def answer(self, side: int, index: int, accept: bool, pump: bool) -> None:
        track = self.pick(side, index, "requested")
        if track is not None:
            track.requested = False
            if accept:
                self.pair.sessions[side].accept(track.key)
            else:
                self.pair.sessions[side].reject(track.key, Reason.NO_SERVICE, "no")
                track.end = "rejected here"
                del self.live[side][track.key]
        self.settle(pump)

    @rule(side=sides, index=indexes, size=st.integers(1, 1500), pump=st.booleans())
    def send(self, side: int, index: int, size: int, pump: bool) -> None:
        track = self.pick(side, index, "sendable")
        if track is not None:
            data = stream_bytes(track.uid, track.key, len(track.sent), size)
            track.sent += data
            track.last_write = size
            if not self.pair.sessions[side].send(track.key, data):
                track.blocked = True
        self.settle(pump)

    @rule(side=sides, index=indexes, pump=st.booleans())
    def send_eof(self, side: int, index: int, pump: bool) -> None:
        track = self.pick(side, index, "sendable")
        if track is not None:
            track.eof_sent = True
            self.pair.sessions[side].send_eof(track.key)
        self.settle(pump)

    @rule(side=sides, index=indexes)
    def reset(self, side: int, index: int) -> None:
        track = self.pick(side, index)
        if track is not None:
            self.pair.sessions[side].reset(track.key, Reason.ABORTED)
            track.end = "reset here"
            del self.live[side][track.key]
        self.process()

    @rule(side=sides, index=indexes, everything=st.booleans(), pump=st.booleans())
    def consume(self, side: int, index: int, everything: bool, pump: bool) -> None:
        track = self.pick(side, index, "unconsumed")
        if track is not None:
            count = track.unconsumed if everything else max(1, track.unconsumed // 2)
            track.unconsumed -= count
            self.pair.sessions[side].consumed(track.key, count)
        self.settle(pump)

    @rule(seconds=st.sampled_from([0.3, 1.0, 1.0, 3.0, 6.0, 11.0, 21.0]), pump=st.booleans())
    def tick(self, seconds: float, pump: bool) -> None:
        self.pair.tick(self.pair.now + seconds)
        self.settle(pump)

    @rule(
        side=sides,
        limit=st.sampled_from([1, 300, 256 * 1024]),
        count=st.one_of(st.none(), st.integers(0, 300)),
    )
    def move(self, side: int, limit: int, count: int | None) -> None:
        """Some of the bytes go: flush ``limit`` bytes' worth, deliver ``count`` (None: all)."""
        self.pair.flush(side, limit)
        self.pair.deliver(side, count)
        self.process()

    @rule(
        side=sides,
        position=st.integers(0, 10**6),
        xor=st.integers(0, 255),
        lose=st.integers(0, 60),
    )
    def mangle(self, side: int, position: int, xor: int, lose: int) -> None:
        """Corrupt one byte in flight (``xor``) and/or lose a run of bytes (``lose``)."""
        self.pair.flush(side)
        wire = self.pair.wire[side]
        if wire:
            start = position % len(wire)
            wire[start] ^= xor
            del wire[start : start + lose]
        self.process()

    @rule(side=sides, position=st.integers(0, 10**6), garbage=st.binary(min_size=1, max_size=80))
    def inject(self, side: int, position: int, garbage: bytes) -> None:
        """Garbage on the line between (or inside) frames."""
        self.pair.flush(side)
        wire = self.pair.wire[side]
        start = position % (len(wire) + 1)
        wire[start:start] = garbage
        self.process()

    @rule(side=sides, position=st.integers(0, 10**6), length=st.integers(1, 200))
    def duplicate(self, side: int, position: int, length: int) -> None:
        """A run of bytes arrives twice (a line or relay that repeats itself)."""
        self.pair.flush(side)
        wire = self.pair.wire[side]
        if wire:
            start = position % len(wire)
            wire[start:start] = wire[start : start + length]
        self.process()

    @rule(side=st.sampled_from([A, B, None]), keep_stale=st.booleans())
    def disrupt(self, side: int | None, keep_stale: bool) -> None:
        """Drop the channel (both sides reconnect), or restart one side's process."""
        if side is None:
            self.pair.disconnect()
            self.process()
            if not keep_stale:
                for wire in self.pair.wire:
                    wire.clear()
            self.pair.connect()
        else:
            self.process()
            for track in self.live[side].values():
                track.end = "crashed"
            self.live[side] = {}
            self.pair.replace(side)
            self.uid[side] = self.next_uid
            self.next_uid += 1
            if not keep_stale:
                self.pair.wire[1 - side].clear()
        self.process()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def model_matches_sessions(self) -> None:
        self.broken = True
        self._model_matches_sessions()
        self.broken = False

    def _model_matches_sessions(self) -> None:
        for side in (A, B):
            session = self.pair.sessions[side]
            config = session.config
            assert set(self.live[side]) == set(session.streams), side
            theirs = sum(1 for k in session.streams if k & OPENER_BIT)
            assert theirs <= config.max_streams
            assert len(session.streams) <= theirs + MAX_OPENS
            # Buffers stay within limits, whatever the peer and the line do.
            for key, stream in session.streams.items():
                track = self.live[side][key]
                assert stream.queued <= config.send_high_water + track.last_write, (
                    f"{key:#x} queues {stream.queued} bytes"
                )
                assert track.unconsumed <= config.window, (
                    f"{key:#x}: {track.unconsumed} bytes delivered past the granted window"
                )
            # One incomplete frame at most (a LINK_DATA chunk may be LINK_SLACK longer).
            held = sum(track.unconsumed for track in self.live[side].values())
            assert held <= config.session_window, f"{held} bytes past the session window"
            assert session._decoder.buffered < config.max_frame + LINK_SLACK + FRAME_OVERHEAD
            assert len(session._control) <= CONTROL_BOUND, len(session._control)
            if session.link is not None:  # chunks kept for resending, and held out of order
                assert session.link.unacknowledged <= LINK_WINDOW
                assert session.link.held <= LINK_WINDOW

    def teardown(self) -> None:
        """Once both owners stop (EOF everything, read everything), every stream ends."""
        if self.broken:
            return  # a step already failed; the model is out of step with the sessions
        pair = self.pair
        for _ in range(120):
            self.process()
            for side in (A, B):
                session = pair.sessions[side]
                for track in list(self.live[side].values()):
                    if track.requested:
                        track.requested = False
                        session.accept(track.key)
                    if not track.eof_sent:
                        track.eof_sent = True
                        session.send_eof(track.key)
                    if track.unconsumed:
                        session.consumed(track.key, track.unconsumed)
                        track.unconsumed = 0
            pair.pump()
            self.process()
            if not self.live[A] and not self.live[B]:
                break
            pair.tick(pair.now + 1.0)
        assert not self.live[A] and not self.live[B], (
            f"streams never ended: A {pair.a.streams} B {pair.b.streams}"
        )
        assert not pair.a.streams and not pair.b.streams


TestSessionPairMachine = SessionPairMachine.TestCase
#: How hard the machine searches.  ``VP_HYPOTHESIS_PROFILE=thorough`` for a long
#: hunt (minutes); CI (CI=true) runs fewer examples than a developer's default.
MACHINE_PROFILES = {
    "default": dict(max_examples=200, stateful_step_count=50),
    "ci": dict(max_examples=120, stateful_step_count=50),
    "thorough": dict(max_examples=5000, stateful_step_count=100),
}
_profile = os.environ.get("VP_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
TestSessionPairMachine.settings = settings(
    **MACHINE_PROFILES[_profile],  # type: ignore[arg-type]
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_session_recovers_from_a_peer_that_died_mid_frame() -> None:
    """The survivor's tick() gives up on the truncated frame; the new peer's HELLOs get through."""
    from virtproxy.frames import FrameType, encode_frame
    from virtproxy.session import Session

    survivor, newcomer = Session(), Session()
    survivor.connection_made(0.0)
    survivor.data_to_send()
    survivor.receive_data(encode_frame(FrameType.DATA, 0x80000001, b"z" * 8000)[:3000], 0.0)
    newcomer.connection_made(0.5)
    now = 0.5
    while now < 30.0 and not (survivor.is_up and newcomer.is_up):
        for src, dst in ((newcomer, survivor), (survivor, newcomer)):
            data = src.data_to_send()
            if data:
                dst.receive_data(data, now)
        for side in (survivor, newcomer):
            side.tick(now)
        now += 0.25
    assert survivor.is_up and newcomer.is_up
    assert now < 12.0, f"took until {now} s"


def test_header_only_checks_are_used_only_when_both_sides_offer_them() -> None:
    from virtproxy.frames import FLAG_HEADER_CRC, FrameDecoder
    from virtproxy.session import Session, SessionConfig

    def data_flags(a_offers: bool, b_offers: bool) -> int:
        a = Session(SessionConfig(header_crc=a_offers))
        b = Session(SessionConfig(header_crc=b_offers))
        a.connection_made(0.0)
        b.connection_made(0.0)
        for _ in range(4):
            b.receive_data(a.data_to_send(), 0.0)
            a.receive_data(b.data_to_send(), 0.0)
        assert a.is_up and b.is_up
        stream = a.open_stream("svc", 0.0)
        b.receive_data(a.data_to_send(), 0.0)
        b.accept(b.take_events()[-1].stream_id)
        a.receive_data(b.data_to_send(), 0.0)
        a.send(stream, b"x" * 1000)
        frames = FrameDecoder(header_crc_ok=True).feed(a.data_to_send())
        got = [e for e in b.take_events()]
        assert got is not None
        return frames[-1].flags

    assert data_flags(True, True) == FLAG_HEADER_CRC
    assert data_flags(True, False) == 0  # the peer is on a serial or virtio port
    assert data_flags(False, True) == 0


def test_peer_opens_are_rate_limited_with_a_burst() -> None:
    """A peer that opens streams faster than max_open_rate gets OPEN_FAIL(LIMIT):
    each accepted open costs a local connect ("rapid reset" must not become a flood)."""
    from virtproxy import events as ev
    from virtproxy.frames import Reason
    from virtproxy.session import Session, SessionConfig

    guest = Session(SessionConfig(max_open_rate=10))
    host = Session()
    guest.connection_made(0.0)
    host.connection_made(0.0)

    def pump(now: float) -> None:
        for _ in range(4):
            guest.receive_data(host.data_to_send(), now)
            host.receive_data(guest.data_to_send(), now)

    pump(0.0)
    assert guest.is_up and host.is_up
    host.take_events()
    guest.take_events()

    def burst(count: int, now: float) -> tuple[int, int]:
        for _ in range(count):
            host.open_stream("svc", now)
        pump(now)
        for event in guest.take_events():
            if isinstance(event, ev.StreamRequested):
                guest.reset(event.stream_id)  # open-and-reset churn
        pump(now)
        rejected = [e for e in host.take_events() if isinstance(e, ev.StreamRejected)]
        limited = sum(e.reason == Reason.LIMIT for e in rejected)
        churned = sum(e.reason == Reason.ABORTED for e in rejected)  # accepted, then reset
        assert limited + churned == len(rejected) == count
        return churned, limited

    assert burst(30, 1.0) == (20, 10)  # a burst of twice the rate, then LIMIT
    assert burst(8, 1.5) == (5, 3)  # half a second at 10/s refills 5 tokens
    assert guest.stats.limit_hits == 13


def test_bytes_in_flight_follow_the_line_so_keystrokes_pass_bulk() -> None:
    """A 11.5 kB/s line with an unbounded buffer in front of it (a pty, a relay, a
    UART's queue): probes keep that hidden queue short, so a keystroke sent during
    a bulk upload crosses in well under the 250 ms budget, and goodput stays high."""
    from virtproxy import events as ev
    from virtproxy.session import FLIGHT_MIN, Session, SessionConfig

    rate, step = 11_520.0, 0.005
    a = Session(SessionConfig(max_frame=512))
    b = Session(SessionConfig(max_frame=512))
    line = bytearray()  # a -> b, drained at `rate`
    now = 0.0
    a.connection_made(now)
    b.connection_made(now)
    for _ in range(4):
        b.receive_data(a.data_to_send(now=now), now)
        a.receive_data(b.data_to_send(now=now), now)
    assert a.is_up and b.is_up
    bulk = a.open_stream("bulk", now)
    keys = a.open_stream("keys", now)
    b.receive_data(a.data_to_send(now=now), now)
    for event in b.take_events():
        if isinstance(event, ev.StreamRequested):
            b.accept(event.stream_id)
    a.receive_data(b.data_to_send(now=now), now)
    a.send(bulk, b"B" * 200_000)
    received = {bulk | 0x80000000: 0, keys | 0x80000000: 0}
    key_sent_at: float | None = None
    delays: list[float] = []
    hidden_max = 0
    budget = 0.0
    while now < 12.0:
        now += step
        if len(line) < 16_384:  # like a pty: the kernel takes 16 KiB before it pushes back
            line += a.data_to_send(512, 512, now)
        hidden_max = max(hidden_max, len(line))
        budget += rate * step
        take = int(budget)
        budget -= take
        chunk, line[:take] = bytes(line[:take]), b""
        if chunk:
            b.receive_data(chunk, now)
        for event in b.take_events():
            if isinstance(event, ev.DataReceived):
                received[event.stream_id] += len(event.data)
                b.consumed(event.stream_id, len(event.data))
                if event.stream_id == keys | 0x80000000 and key_sent_at is not None:
                    delays.append(now - key_sent_at)
                    key_sent_at = None
        a.receive_data(b.data_to_send(now=now), now)
        a.take_events()
        a.tick(now)
        b.tick(now)
        if key_sent_at is None and now > 2.0 and round(now / step) % 40 == 0:
            key_sent_at = now
            a.send(keys, b"k")
    assert len(delays) > 20
    assert max(delays) < 0.25, max(delays)
    assert a.flight_cap is not None and a.flight_cap <= 2 * FLIGHT_MIN
    assert hidden_max < 4 * FLIGHT_MIN, hidden_max
    goodput = received[bulk | 0x80000000] / now
    assert goodput > 0.85 * rate, goodput


def test_a_pong_without_a_count_lifts_the_flight_cap() -> None:
    """A peer that answers PINGs with the 8-byte form must not leave data capped forever."""
    from virtproxy.frames import FrameType

    session, peer = raw_session()
    assert session.flight_cap is not None
    session.receive_data(peer.frame(FrameType.PONG, 0, b"\0" * 8), 1.0)
    assert session.flight_cap is None


def test_a_keystroke_behind_a_bulk_stream_passes_an_exhausted_flight_cap() -> None:
    """With the cap used up, bulk streams wait for the next PONG, but a stream with
    a few bytes queued goes out in the same write even when it is behind them."""
    from virtproxy import events as ev
    from virtproxy.frames import FrameDecoder, FrameType
    from virtproxy.session import Session, SessionConfig

    a, b = Session(SessionConfig()), Session(SessionConfig())
    a.connection_made(0.0)
    b.connection_made(0.0)
    for _ in range(4):
        b.receive_data(a.data_to_send(now=0.0), 0.0)
        a.receive_data(b.data_to_send(now=0.0), 0.0)
    bulk = a.open_stream("bulk", 0.0)
    keys = a.open_stream("keys", 0.0)
    b.receive_data(a.data_to_send(now=0.0), 0.0)
    for event in b.take_events():
        if isinstance(event, ev.StreamRequested):
            b.accept(event.stream_id)
    a.receive_data(b.data_to_send(now=0.0), 0.0)
    a.send(bulk, b"B" * 100_000)
    a.data_to_send(now=0.1)  # no PONG comes back: the cap is now used up
    assert not FrameDecoder().feed(a.data_to_send(now=0.2)), "bulk sent past the cap"
    a.send(keys, b"k")  # queued behind the bulk stream
    frames = FrameDecoder().feed(a.data_to_send(now=0.3))
    sent = [(f.stream & 0x7FFFFFFF, f.payload) for f in frames if f.type == FrameType.DATA]
    assert sent == [(keys, b"k")]


def test_a_repeated_hello_and_data_run_is_not_taken_twice() -> None:
    """A line that repeats a run holding the peer's HELLO and DATA after it."""
    pair = SessionPair()
    pair.handshake()
    a_id, b_id = pair.open()
    pair.a.send(a_id, b"once")
    hello = pair.a._hellos_sent
    pair.a._queue_hello()  # A re-announces itself (as after a peer's ANSWER HELLO)
    data = pair.a.data_to_send()
    assert pair.a._hellos_sent == hello + 1
    pair.b.receive_data(data, 1.0)
    pair.b.receive_data(data, 1.0)  # the line repeats the run
    pair.collect()
    assert pair.received(B, b_id) == b"once"  # not "onceonce"
    # The repeated DATA then fails the sequence check: a loss, as the spec says.
    assert pair.b.stats.stale_frames == 1 and pair.b.stats.lost_frames > 0


def test_early_data_follows_the_open_and_is_taken_before_open_ok() -> None:
    """Both sides offer EARLY_DATA: the opener's first bytes and EOF go right
    behind its OPEN; the acceptor takes them before its OPEN_OK."""
    pair = SessionPair()
    pair.handshake()
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"GET /")
    pair.a.send_eof(sid)
    out = split_frames(pair.a.data_to_send())
    assert [f.type for f in out] == [FrameType.OPEN, FrameType.DATA, FrameType.EOF]
    pair.b.receive_data(b"".join(encode(f) for f in out), pair.now)
    pair.collect()
    key = peer_id(sid)
    assert pair.of(B, ev.StreamRequested) == [ev.StreamRequested(key, "svc")]
    assert pair.received(B, key) == b"GET /" and pair.of(B, ev.EndOfData)
    pair.b.accept(key)
    pair.b.consumed(key, 5)
    pair.b.send(key, b"200")
    pair.b.send_eof(key)
    pair.pump()
    assert pair.received(A, sid) == b"200"
    assert pair.of(A, ev.StreamClosed) and pair.of(B, ev.StreamClosed)


def test_no_early_data_to_a_peer_that_does_not_offer_it() -> None:
    pair = SessionPair(SessionConfig(), SessionConfig(early_data=False))
    pair.handshake()
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"hello")
    assert [f.type for f in split_frames(pair.a.data_to_send())] == [FrameType.OPEN]


def test_early_data_of_a_refused_open_is_dropped() -> None:
    pair = SessionPair()
    pair.handshake()
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"x" * 1000)
    pair.flush(A)
    pair.deliver(A)
    pair.b.reject(peer_id(sid), Reason.REFUSED, "no")
    pair.pump()
    assert [e.reason for e in pair.of(A, ev.StreamRejected)] == [Reason.REFUSED]
    assert pair.b.streams == {} and pair.b.stats.protocol_errors == 0


def test_early_data_of_an_open_refused_at_once_is_dropped_up_to_the_window() -> None:
    """An OPEN refused on arrival (a limit) may have early DATA right behind it:
    dropped quietly up to the window our HELLO granted, a protocol error past it."""
    session, peer = raw_session(SessionConfig(max_frame=1024, window=2048, max_streams=1))
    raw_open(session, peer, 1)
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 2, b"svc"), 0.0)
    for _ in range(2):
        session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 2, b"e" * 1024), 0.0)
    session.receive_data(peer.frame(FrameType.EOF, OPENER_BIT | 2), 0.0)
    assert session.take_events() == []
    assert [(f.type, f.stream) for f in peer.read(session)] == [(FrameType.OPEN_FAIL, 2)]
    assert session.stats.protocol_errors == 0 and session.is_up
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 2, b"X"), 0.0)
    assert session.stats.protocol_errors == 1
    [reply] = peer.read(session)
    assert (reply.type, reply.stream, reply.payload[0]) == (FrameType.RESET, 2, Reason.PROTOCOL)


def test_early_data_of_a_stream_rejected_after_its_connect_failed_is_dropped() -> None:
    session, peer = raw_session(SessionConfig(max_frame=1024, window=2048))
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, b"svc"), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"e" * 1000), 0.0)
    assert [type(e) for e in session.take_events()] == [ev.StreamRequested, ev.DataReceived]
    session.reject(OPENER_BIT | 1, Reason.REFUSED, "connection refused")
    # The rest of the window was in flight: quietly dropped; one byte more is not.
    for size in (1024, 24):
        session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"e" * size), 0.0)
    assert session.stats.protocol_errors == 0
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"e"), 0.0)
    assert session.stats.protocol_errors == 1
    assert session.take_events() == [] and session.is_up


def test_early_data_beyond_the_window_is_a_protocol_error() -> None:
    session, peer = raw_session(SessionConfig(max_frame=1024, window=2048))
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, b"svc"), 0.0)
    for _ in range(2):
        session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"e" * 1024), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"X"), 0.0)
    events = session.take_events()
    assert (type(events[-1]), events[-1].reason) == (ev.StreamReset, Reason.PROTOCOL)
    assert session.streams == {} and session.stats.protocol_errors == 1


def test_early_data_taken_before_open_ok_is_granted_back_behind_it() -> None:
    """The local socket may take early data before the owner accepts: that
    credit comes back in a WINDOW right after the OPEN_OK."""
    session, peer = raw_session(SessionConfig(max_frame=1024, window=2048))
    session.receive_data(peer.frame(FrameType.OPEN, OPENER_BIT | 1, b"svc"), 0.0)
    session.receive_data(peer.frame(FrameType.DATA, OPENER_BIT | 1, b"e" * 1024), 0.0)
    session.take_events()
    session.consumed(OPENER_BIT | 1, 1024)
    assert peer.read(session) == []  # no WINDOW before the OPEN_OK
    session.accept(OPENER_BIT | 1)
    frames = peer.read(session)
    assert [(f.type, f.stream) for f in frames] == [(FrameType.OPEN_OK, 1), (FrameType.WINDOW, 1)]
    assert frames[1].payload == (1024).to_bytes(4, "big")


def test_an_open_sent_when_a_slot_frees_mid_write_keeps_its_data_behind_it() -> None:
    """A stream closing while the session writes frees a slot for a pending open:
    that open's early DATA and EOF must not overtake its OPEN."""
    pair = up_pair(SessionConfig(), SessionConfig(max_streams=1))
    first = pair.a.open_stream("svc", pair.now)
    pair.pump()
    pair.b.accept(peer_id(first))
    pair.b.send_eof(peer_id(first))
    pair.pump()
    second = pair.a.open_stream("svc", pair.now)  # waits for the one slot
    pair.a.send(second, b"hello")
    pair.a.send_eof(second)
    pair.a.send_eof(first)  # closes the first stream inside data_to_send
    pair.pump()
    wire = second ^ OPENER_BIT
    mine = [FrameType(f.type) for f in pair.sent_frames[A] if f.stream == wire]
    assert mine == [FrameType.OPEN, FrameType.DATA, FrameType.EOF]
    assert pair.b.stats.protocol_errors == 0
    assert pair.received(B, peer_id(second)) == b"hello"


def test_early_data_of_an_unsent_open_waits_for_the_next_session() -> None:
    """An OPEN still queued when the session ends goes back to pending with its
    data and EOF, and all of it is sent once a new session is up."""
    pair = up_pair()
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"later")
    pair.a.send_eof(sid)
    pair.disconnect()
    pair.connect()
    pair.handshake()
    pair.pump()
    key = peer_id(sid)
    assert pair.of(B, ev.StreamRequested) == [ev.StreamRequested(key, "svc")]
    assert pair.received(B, key) == b"later" and pair.of(B, ev.EndOfData)


def test_an_open_ok_to_an_early_sender_waits_for_the_first_reply() -> None:
    """With open_ok_delay, the acceptor's OPEN_OK goes in one write with its
    first DATA; no data ever waits for it."""
    config = SessionConfig(open_ok_delay=0.005)
    pair = up_pair(config, config)
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"GET /")
    pair.pump()
    key = peer_id(sid)
    pair.b.accept(key, pair.now)
    assert not pair.b.has_data_to_send() and pair.b.data_to_send(now=pair.now) == b""
    assert pair.b.next_deadline() == pytest.approx(pair.now + 0.005)
    pair.b.send(key, b"200 OK")
    out = split_frames(pair.b.data_to_send(now=pair.now))
    assert [(f.type, f.payload) for f in out] == [
        (FrameType.OPEN_OK, b""),
        (FrameType.DATA, b"200 OK"),
    ]
    assert not pair.b.has_data_to_send()


def test_a_waiting_open_ok_goes_alone_once_its_delay_passed() -> None:
    config = SessionConfig(open_ok_delay=0.005)
    pair = up_pair(config, config)
    sid = pair.a.open_stream("svc", pair.now)
    pair.pump()
    pair.b.accept(peer_id(sid), pair.now)
    pair.pump()
    assert not pair.of(A, ev.StreamAccepted)
    pair.tick(pair.now + 0.005)
    assert pair.b.has_data_to_send()
    pair.pump()
    assert pair.of(A, ev.StreamAccepted) == [ev.StreamAccepted(sid)]


def test_any_other_control_frame_takes_a_waiting_open_ok_along() -> None:
    config = SessionConfig(open_ok_delay=0.005)
    pair = up_pair(config, config)
    first = pair.a.open_stream("svc", pair.now)
    second = pair.a.open_stream("svc", pair.now)
    pair.pump()
    pair.b.accept(peer_id(first), pair.now)
    pair.b.accept(peer_id(second), pair.now)  # waits too
    assert not pair.b.has_data_to_send()
    pair.b.reset(peer_id(second), Reason.ABORTED)
    out = split_frames(pair.b.data_to_send(now=pair.now))
    assert [f.type for f in out] == [FrameType.OPEN_OK, FrameType.OPEN_OK, FrameType.RESET]


def test_an_open_ok_to_a_peer_without_early_data_goes_at_once() -> None:
    pair = up_pair(SessionConfig(early_data=False), SessionConfig(open_ok_delay=0.005))
    sid = pair.a.open_stream("svc", pair.now)
    pair.pump()
    pair.b.accept(peer_id(sid), pair.now)
    assert [f.type for f in split_frames(pair.b.data_to_send())] == [FrameType.OPEN_OK]


@pytest.mark.parametrize("sent", [False, True])
def test_early_data_reaching_a_restarted_peer_is_no_protocol_error(sent: bool) -> None:
    """A opens a stream with early data and EOF while B restarts: what A had
    sent is stale at the new B, what it had not sent goes once the new session
    is up; nobody counts a protocol error."""
    pair = up_pair()
    sid = pair.a.open_stream("svc", pair.now)
    pair.a.send(sid, b"request")
    pair.a.send_eof(sid)
    if sent:
        pair.flush(A)  # OPEN, DATA, EOF on the wire towards the old B
    pair.replace(B)
    pair.flush(B)
    pair.deliver(B)  # the new B's HELLO ends A's session
    pair.handshake()
    pair.pump()
    assert pair.a.stats.protocol_errors == 0 and pair.b.stats.protocol_errors == 0
    if sent:
        assert [e.stream_id for e in pair.of(A, ev.StreamRejected)] == [sid]
        assert pair.b.streams == {}
    else:
        key = peer_id(sid)
        assert pair.of(B, ev.StreamRequested) == [ev.StreamRequested(key, "svc")]
        assert pair.received(B, key) == b"request" and pair.of(B, ev.EndOfData)
