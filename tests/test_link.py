"""The link-reliability layer (virtproxy/link.py) alone and under a Session.

The unit tests drive two ReliableLinks by hand, frame by frame; the session
tests run two Sessions with link reliability over a wire that corrupts, drops,
duplicates and cuts bytes, and check that every stream still completes
byte-exact without a single reset.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sessionpair import A, B, SessionPair, peer_id

from virtproxy import events as ev
from virtproxy.frames import OPENER_BIT, Damage, Frame, FrameDecoder, FrameType, encode_frame
from virtproxy.link import FLAG_NAK, FLAG_PART, LINK_WINDOW, RTO_MAX, ReliableLink
from virtproxy.session import LINK_DECODER_TYPES, SessionConfig


def frames_of(out: list[bytes]) -> list[Frame]:
    items = FrameDecoder().feed(b"".join(out))
    assert all(isinstance(item, Frame) for item in items)
    return [item for item in items if isinstance(item, Frame)]


def send(link: ReliableLink, data: bytes, now: float = 0.0, size: int = 100) -> list[Frame]:
    out: list[bytes] = []
    link.write_data(out, data, size, now)
    return frames_of(out)


def control(link: ReliableLink, now: float = 0.0) -> list[Frame]:
    out: list[bytes] = []
    link.write_control(out, now, 1 << 20)
    return frames_of(out)


def deliver(receiver: ReliableLink, frames: list[Frame], now: float = 0.0) -> bytes:
    return b"".join(receiver.on_data(f, now) for f in frames if f.type == FrameType.LINK_DATA)


def acks(sender: ReliableLink, receiver: ReliableLink, now: float = 0.0) -> None:
    """The receiver's ACK goes back to the sender."""
    for frame in control(receiver, now):
        assert frame.type == FrameType.LINK_ACK
        sender.on_ack(frame, now)


# ---------------------------------------------------------------------------- units


def test_chunks_arrive_in_order_and_acks_free_them() -> None:
    a, b = ReliableLink(), ReliableLink()
    chunks = send(a, bytes(range(250)), size=100)
    assert [f.stream for f in chunks] == [0, 1, 2]
    assert a.unacknowledged == 3
    assert deliver(b, chunks) == bytes(range(250))
    acks(a, b, now=0.05)
    assert a.unacknowledged == 0
    assert a.srtt == pytest.approx(0.05)


def test_a_lost_chunk_is_resent_once_a_later_one_arrives() -> None:
    a, b = ReliableLink(), ReliableLink()
    chunks = send(a, b"x" * 300, size=100)
    assert deliver(b, [chunks[0], chunks[2]]) == b"x" * 100  # chunk 1 lost
    assert b.held == 1
    acks(a, b)
    resent = control(a)
    assert [(f.type, f.stream) for f in resent] == [(FrameType.LINK_DATA, 1)]
    assert a.stats.retransmits == 1
    assert deliver(b, resent) == b"x" * 200  # the hole, then the held chunk
    acks(a, b)
    assert a.unacknowledged == 0 and b.held == 0


def test_a_resend_is_not_repeated_while_it_may_still_be_in_flight() -> None:
    a, b = ReliableLink(), ReliableLink()
    chunks = send(a, b"y" * 400, size=100)
    deliver(b, [chunks[0], chunks[2]])
    acks(a, b, 0.01)
    assert [f.stream for f in control(a, 0.01)] == [1]
    deliver(b, [chunks[3]])  # sent before the resend: says nothing new about chunk 1
    acks(a, b, 0.02)
    assert control(a, 0.02) == []
    assert a.stats.retransmits == 1


def test_a_damaged_chunk_is_nakked_and_resent() -> None:
    a, b = ReliableLink(), ReliableLink()
    (chunk,) = send(a, b"z" * 50)
    b.on_damage(Damage(chunk.stream, 0, FrameType.LINK_DATA, len(chunk.payload)))
    (ack,) = control(b)
    assert ack.flags & FLAG_NAK and ack.stream == 0
    a.on_ack(ack, 0.0)
    assert [f.stream for f in control(a)] == [0]
    assert b.stats.damaged == 1


def test_duplicates_are_dropped_and_counted() -> None:
    a, b = ReliableLink(), ReliableLink()
    chunks = send(a, b"d" * 200, size=100)
    assert deliver(b, chunks + chunks) == b"d" * 200
    assert b.stats.duplicates == 2


def test_a_lost_tail_is_resent_by_the_timer_with_backoff() -> None:
    a = ReliableLink()
    send(a, b"t" * 150, now=1.0, size=100)  # both chunks lost
    deadline = a.deadline()
    assert deadline == pytest.approx(1.0 + a.rto)
    a.tick(deadline - 0.01)
    assert control(a, deadline - 0.01) == []
    rto = a.rto
    a.tick(deadline)
    assert [f.stream for f in control(a, deadline)] == [0, 1]
    assert a.rto == pytest.approx(min(RTO_MAX, 2 * rto))
    assert a.stats.timeouts == 1


def test_the_window_bounds_unacknowledged_chunks() -> None:
    a, b = ReliableLink(), ReliableLink()
    data = bytes(200) * (LINK_WINDOW + 10)
    chunks = send(a, data, size=200)
    assert len(chunks) == LINK_WINDOW and a.room == 0 and a.has_unsent
    assert deliver(b, chunks) == data[: 200 * LINK_WINDOW]
    acks(a, b)
    assert a.room == LINK_WINDOW
    rest = send(a, b"", size=200)
    assert deliver(b, rest) == data[200 * LINK_WINDOW :]


def test_chunks_beyond_the_window_are_not_held() -> None:
    b = ReliableLink()
    a = ReliableLink()
    chunks = send(a, bytes(10) * (LINK_WINDOW + 1), size=10)
    deliver(b, chunks[:1])
    acks(a, b)
    chunks += send(a, b"", size=10)
    deliver(b, chunks[2:])  # chunk 1 lost: everything after it is out of order
    assert b.held == LINK_WINDOW - 1
    far = Frame(FrameType.LINK_DATA, 1 + LINK_WINDOW, a.epoch.to_bytes(4, "big") + b"far")
    assert b.on_data(far, 0.0) == b""
    assert b.held == LINK_WINDOW - 1


def test_acks_for_another_epoch_or_unsent_chunks_are_ignored() -> None:
    a = ReliableLink()
    send(a, b"q" * 100)
    other = (a.epoch ^ 1).to_bytes(4, "big") + bytes(8)
    a.on_ack(Frame(FrameType.LINK_ACK, 1, other), 0.0)
    assert a.unacknowledged == 1
    mine = a.epoch.to_bytes(4, "big") + bytes(8)
    a.on_ack(Frame(FrameType.LINK_ACK, 5, mine), 0.0)  # beyond what was sent
    assert a.unacknowledged == 1
    a.on_ack(Frame(FrameType.LINK_ACK, 1, b"short"), 0.0)
    assert a.unacknowledged == 1


def test_a_restarted_peer_is_taken_up_at_its_first_chunk() -> None:
    a, b = ReliableLink(), ReliableLink()
    deliver(b, send(a, b"old" * 10))
    fresh = ReliableLink()  # a's process restarted
    assert deliver(b, send(fresh, b"new")) == b"new"
    assert b.peer_restarted and b.stats.peer_restarts == 1


def test_a_restarted_receiver_joins_the_stream_where_it_is() -> None:
    a = ReliableLink()
    send(a, b"x" * 1000, size=100)  # chunks 0..9 went to a receiver that is gone
    acks(a, ReliableLink())  # epoch 0, nothing acknowledged: ignored
    assert a.unacknowledged == 10
    fresh = ReliableLink()
    later = send(a, b"y" * 100, size=100)
    assert [f.stream for f in later] == [10]
    assert deliver(fresh, later) == b"y" * 100
    acks(a, fresh)
    assert a.unacknowledged == 0  # its ACK covers what the old receiver lost
    assert not fresh.peer_restarted  # the first peer it has known


# ---------------------------------------------------------------------------- sessions


def noisy(rng: random.Random, corrupt: float, drop: float = 0.0, dup: float = 0.0) -> Callable:
    """A wire mangler: corrupt bytes, drop and duplicate runs, at per-byte rates."""

    def mangle(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(_events(rng, len(out), corrupt)):
            pos = rng.randrange(len(out))
            out[pos] ^= rng.randrange(1, 256)
        for _ in range(_events(rng, len(out), drop)):
            pos = rng.randrange(len(out))
            del out[pos : pos + rng.randrange(1, 64)]
        for _ in range(_events(rng, len(out), dup)):
            pos = rng.randrange(len(out))
            out[pos:pos] = out[pos : pos + rng.randrange(1, 64)]
        return bytes(out)

    return mangle


def _events(rng: random.Random, size: int, rate: float) -> int:
    """How many of ``size`` bytes an error hits, each independently at ``rate``."""
    if not rate:
        return 0
    count, position = 0, rng.expovariate(rate)
    while position < size:
        count += 1
        position += rng.expovariate(rate)
    return count


def run_transfers(
    pair: SessionPair, count: int, size: int, seconds: float = 120.0
) -> tuple[dict[int, bytes], set[int]]:
    """Open ``count`` streams A->B, send ``size`` patterned bytes each, then EOF."""
    payloads: dict[int, bytes] = {}
    for number in range(count):
        sid = pair.a.open_stream("svc", pair.now)
        payloads[sid] = bytes((number * 7 + i) & 0xFF for i in range(size))
    received: dict[int, bytearray] = {peer_id(s): bytearray() for s in payloads}
    eof: set[int] = set()
    sent: set[int] = set()
    end = pair.now + seconds
    while len(eof) < count and pair.now < end:
        pair.advance(0.02, step=0.02)
        for event in pair.take(B):
            if isinstance(event, ev.StreamRequested):
                pair.b.accept(event.stream_id)
                pair.b.send_eof(event.stream_id)
            elif isinstance(event, ev.DataReceived):
                received[event.stream_id] += event.data
                pair.b.consumed(event.stream_id, len(event.data))
            elif isinstance(event, ev.EndOfData):
                eof.add(event.stream_id)
            elif isinstance(event, (ev.StreamReset, ev.StreamRejected)):
                raise AssertionError(f"B: {event}")
        for event in pair.take(A):
            if isinstance(event, ev.StreamAccepted) and event.stream_id not in sent:
                sent.add(event.stream_id)
                pair.a.send(event.stream_id, payloads[event.stream_id])
                pair.a.send_eof(event.stream_id)
            elif isinstance(event, (ev.StreamReset, ev.StreamRejected)):
                raise AssertionError(f"A: {event}")
    got = {s: bytes(received[peer_id(s)]) for s in payloads}
    return {s: payloads[s] for s in payloads if got[s] != payloads[s]}, eof


def linked_pair(a_mode: str = "on", b_mode: str = "on", max_frame: int = 512) -> SessionPair:
    pair = SessionPair(
        SessionConfig(link=a_mode, max_frame=max_frame, window=16 * 1024),
        SessionConfig(link=b_mode, max_frame=max_frame, window=16 * 1024),
    )
    pair.advance(0.1, step=0.05)
    assert pair.a.is_up and pair.b.is_up
    return pair


def test_32_streams_complete_byte_exact_with_1_corrupt_byte_in_10000() -> None:
    pair = linked_pair()
    rng = random.Random(1)
    for side in (A, B):
        pair.mangle[side] = noisy(rng, corrupt=1e-4)
    wrong, eof = run_transfers(pair, 32, 16 * 1024)
    assert len(eof) == 32 and not wrong
    stats = pair.a.stats
    assert stats.sessions == 1 and pair.b.stats.sessions == 1  # never restarted
    assert stats.retransmits + pair.b.stats.retransmits > 0  # the noise did hit


@pytest.mark.parametrize("seed", [2, 3])
def test_streams_survive_drops_duplicates_and_heavy_corruption(seed: int) -> None:
    pair = linked_pair()
    rng = random.Random(seed)
    for side in (A, B):
        pair.mangle[side] = noisy(rng, corrupt=1e-3, drop=2e-4, dup=2e-4)
    wrong, eof = run_transfers(pair, 8, 16 * 1024)
    assert len(eof) == 8 and not wrong
    assert pair.a.stats.sessions == 1
    assert pair.b.link is not None and pair.b.link.held <= LINK_WINDOW


def test_without_the_link_corruption_resets_streams_instead() -> None:
    pair = linked_pair("off", "off")
    rng = random.Random(1)
    pair.mangle[A] = noisy(rng, corrupt=1e-3)
    with pytest.raises(AssertionError, match=r"StreamReset|StreamRejected"):
        run_transfers(pair, 8, 16 * 1024)


def test_auto_follows_a_peer_that_turns_the_link_on() -> None:
    pair = linked_pair("on", "auto")
    assert pair.b.link is not None
    notices = [e for e in pair.events[B] if isinstance(e, ev.LinkNotice)]
    assert notices and "on" in notices[0].message
    wrong, eof = run_transfers(pair, 2, 4096)
    assert len(eof) == 2 and not wrong
    assert not any(f.type == FrameType.HELLO for f in pair.sent_frames[B][-3:])


def test_auto_on_both_sides_stays_plain() -> None:
    pair = linked_pair("auto", "auto")
    assert pair.a.link is None and pair.b.link is None
    types = {f.type for side in (A, B) for f in pair.sent_frames[side]}
    assert not types & {FrameType.LINK_DATA, FrameType.LINK_ACK}


def test_off_refuses_a_peer_that_insists_and_says_why() -> None:
    pair = SessionPair(SessionConfig(link="on"), SessionConfig(link="off"))
    pair.advance(2.0, step=0.5)
    assert not pair.b.is_up and pair.b.link is None
    notices = [e for e in pair.events[B] if isinstance(e, ev.LinkNotice)]
    assert len(notices) == 1 and "--link off" in notices[0].message
    assert pair.b.stats.protocol_errors > 0


def test_a_restarted_peer_gets_a_new_session_over_the_link() -> None:
    pair = linked_pair()
    old_peer = pair.b.peer_session
    pair.replace(A)
    pair.advance(3.0, step=0.1)
    assert pair.a.is_up and pair.b.is_up
    assert pair.b.peer_session == pair.a.session_id != old_peer
    assert pair.of(B, ev.SessionEnded)
    assert pair.b.stats.peer_restarts == 1
    wrong, eof = run_transfers(pair, 2, 4096)
    assert len(eof) == 2 and not wrong


def test_a_link_frame_carrying_a_link_frame_is_an_error() -> None:
    pair = linked_pair()
    before = pair.b.stats.protocol_errors
    assert pair.a.link is not None
    inner = encode_frame(FrameType.LINK_ACK, 0, bytes(12))
    out: list[bytes] = []
    pair.a.link.write_data(out, inner, 512, pair.now)
    pair.b.receive_data(b"".join(out), pair.now)
    assert pair.b.stats.protocol_errors == before + 1


def test_the_chunk_size_halves_on_loss_and_grows_back_when_clean() -> None:
    a, b = ReliableLink(), ReliableLink()
    start = a.chunk_limit
    chunks = send(a, b"c" * 300, size=100)
    deliver(b, [chunks[0], chunks[2]])
    acks(a, b)
    assert a.chunk_limit == start // 2
    deliver(b, control(a))
    acks(a, b)
    deliver(b, send(a, b"g" * 1600, size=100))
    acks(a, b)
    assert a.chunk_limit == start  # 16 clean chunks (the resend included) doubled it back


@settings(
    max_examples=int(os.environ.get("LINK_EXAMPLES", 12 if os.environ.get("CI") else 25)),
    deadline=None,
)
@given(
    seed=st.integers(0, 2**32 - 1),
    corrupt=st.sampled_from([0.0, 1e-4, 5e-4, 1e-3]),
    drop=st.sampled_from([0.0, 1e-4, 3e-4]),
    dup=st.sampled_from([0.0, 1e-4, 3e-4]),
    streams=st.integers(1, 6),
    size=st.integers(1, 20_000),
    max_frame=st.sampled_from([256, 512, 4096]),
)
def test_any_noise_any_load_every_stream_byte_exact(
    seed: int, corrupt: float, drop: float, dup: float, streams: int, size: int, max_frame: int
) -> None:
    pair = linked_pair(max_frame=max_frame)
    rng = random.Random(seed)
    for side in (A, B):
        pair.mangle[side] = noisy(rng, corrupt=corrupt, drop=drop, dup=dup)
    wrong, eof = run_transfers(pair, streams, size, seconds=300)
    assert len(eof) == streams and not wrong
    assert pair.a.stats.sessions == 1 and pair.b.stats.sessions == 1
    for session in (pair.a, pair.b):
        assert session.link is not None
        assert session.link.unacknowledged <= LINK_WINDOW and session.link.held <= LINK_WINDOW


def test_a_session_frame_inside_a_damaged_chunk_holds_nothing_up() -> None:
    """The decoder, resynchronising after a damaged chunk, finds the session frame
    header inside it; with the link on it must not wait for that frame's payload."""
    inner = encode_frame(FrameType.DATA, OPENER_BIT | 1, bytes(60000))
    chunk = bytearray(encode_frame(FrameType.LINK_DATA, 7, bytes(4) + inner[:1000]))
    chunk[500] ^= 0xFF  # damage the chunk, not the inner header
    ack = encode_frame(FrameType.LINK_ACK, 3, bytes(12))
    plain = FrameDecoder(65535)
    assert [type(item) for item in plain.feed(bytes(chunk) + ack)] == [Damage]  # stuck waiting
    linked = FrameDecoder(65535)
    linked.only_types = LINK_DECODER_TYPES
    items = linked.feed(bytes(chunk) + ack)
    assert [type(item) for item in items] == [Damage, Frame]
    assert items[1].type == FrameType.LINK_ACK


def test_a_large_chunk_is_resent_in_parts_that_add_up() -> None:
    a, b = ReliableLink(), ReliableLink()
    (big,) = send(a, bytes(range(256)) * 16, size=4096)  # made while the line was clean
    a.chunk_limit = 1024  # the line turned noisy since
    a.tick(a.deadline() or 0.0)  # lost: the timer resends it
    parts = control(a, 10.0)
    assert len(parts) == 4 and all(p.flags & FLAG_PART and p.seq == 1 for p in parts)
    assert deliver(b, parts[:3]) == b"" and b.assembling == 1
    a.chunk_limit = 512  # smaller still: the next resend cuts other parts
    b.on_damage(Damage(big.stream, 1, FrameType.LINK_DATA, 0))  # the 4th part was damaged
    a.on_ack(control(b)[0], 10.1)  # NAK of copy 1, the latest: resent at once
    again = control(a, 10.1)  # the loss halved the chunk size again: 256-byte parts
    assert len(again) == 16 and all(p.seq == 2 for p in again)
    assert deliver(b, again[-4:]) == bytes(range(256)) * 16  # only the missing bytes were needed
    assert b.assembling == 0


def test_a_nak_of_an_older_copy_does_not_resend() -> None:
    a = ReliableLink()
    send(a, b"z" * 50)
    a.tick(a.deadline() or 0.0)
    control(a, 5.0)  # copy 1 is on its way
    nak = Frame(FrameType.LINK_ACK, 0, a.epoch.to_bytes(4, "big") + bytes(8), 0, FLAG_NAK)
    a.on_ack(nak, 5.001)  # copy 0 arrived damaged: copy 1 may still make it
    assert control(a, 5.001) == []
