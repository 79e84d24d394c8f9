"""Test helpers for the sans-I/O core: two Sessions back to back, and a raw peer.

:class:`SessionPair` wires side ``A`` (index 0) and side ``B`` (index 1): what
``data_to_send()`` of one returns goes into ``receive_data()`` of the other.
Bytes travel through an explicit per-direction wire buffer so a test can hold
them, deliver them in pieces, mangle them (``pair.mangle[side]``) or drop them.
Events of each side are collected, in order, in ``pair.events[side]``.

:class:`RawPeer` speaks frames by hand to one real Session, for tests that must
forge what a well-behaved Session never sends (DATA beyond the window, OPENs
beyond the limit, floods).

Time is always explicit: ``now`` is passed to every call, nothing reads a clock.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from virtproxy import events as ev
from virtproxy.frames import (
    MAX_PAYLOAD,
    OPENER_BIT,
    Damage,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from virtproxy.session import Session, SessionConfig

A = 0
B = 1
HELLO_STRUCT = struct.Struct(">QQIIII")

Mangle = Callable[[bytes], bytes]


def split_frames(data: bytes) -> list[Frame]:
    """Decode a chunk made of whole, intact frames (what ``data_to_send`` returns)."""
    decoder = FrameDecoder(MAX_PAYLOAD)
    items = decoder.feed(data)
    assert decoder.buffered == 0, f"partial frame in {data.hex()}"
    assert all(isinstance(item, Frame) for item in items), items
    return [item for item in items if isinstance(item, Frame)]


def encode(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.stream, frame.payload, frame.seq, frame.flags)


def frame_mangler(fn: Callable[[Frame], Iterable[bytes] | bytes | None]) -> Mangle:
    """A mangle hook working frame by frame.

    ``fn(frame)`` returns the bytes to put on the wire instead of the frame:
    ``None`` keeps the frame unchanged, ``b""`` drops it.
    """

    def mangle(data: bytes) -> bytes:
        out: list[bytes] = []
        for frame in split_frames(data):
            result = fn(frame)
            if result is None:
                out.append(encode(frame))
            elif isinstance(result, bytes):
                out.append(result)
            else:
                out.extend(result)
        return b"".join(out)

    return mangle


def hello_fields(frame: Frame) -> tuple[int, int, int, int, int, int]:
    assert frame.type == FrameType.HELLO
    return HELLO_STRUCT.unpack_from(frame.payload)


class SessionPair:
    """Two Sessions wired back to back."""

    def __init__(
        self,
        config_a: SessionConfig | None = None,
        config_b: SessionConfig | None = None,
        *,
        now: float = 0.0,
        connect: bool = True,
    ) -> None:
        self.configs = [config_a or SessionConfig(), config_b or SessionConfig()]
        self.sessions = [Session(self.configs[A]), Session(self.configs[B])]
        self.events: list[list[ev.Event]] = [[], []]
        #: Bytes sent by side i, not yet delivered to the other side.
        self.wire = [bytearray(), bytearray()]
        #: Optional hook applied to every chunk side i sends.
        self.mangle: list[Mangle | None] = [None, None]
        #: Every frame each side produced (before mangling), in order; with
        #: link reliability on, the session frames inside new LINK_DATA chunks
        #: too (retransmissions are not repeated).
        self.sent_frames: list[list[Frame]] = [[], []]
        self._inner = [FrameDecoder(MAX_PAYLOAD), FrameDecoder(MAX_PAYLOAD)]
        self._chunks_seen: list[tuple[int, int]] = [(0, -1), (0, -1)]  # (epoch, last index)
        #: Every HELLO each side produced, with whether its session was up when it did.
        self.hellos: list[list[tuple[Frame, bool]]] = [[], []]
        self.now = now
        #: Pass ``now`` to ``data_to_send`` so the in-flight cap and its probe
        #: PINGs run (docs/protocol.rst, "Bytes in flight").
        self.pass_now = False
        if connect:
            self.connect(now)

    @property
    def a(self) -> Session:
        return self.sessions[A]

    @property
    def b(self) -> Session:
        return self.sessions[B]

    # ---------------------------------------------------------------- plumbing

    def collect(self) -> None:
        for side in (A, B):
            self.events[side].extend(self.sessions[side].take_events())

    def connect(self, now: float | None = None, sides: Iterable[int] = (A, B)) -> None:
        now = self._at(now)
        for side in sides:
            self.sessions[side].connection_made(now)
        self.collect()

    def disconnect(self, now: float | None = None, sides: Iterable[int] = (A, B)) -> None:
        now = self._at(now)
        for side in sides:
            self.sessions[side].connection_lost(now)
        self.collect()

    def replace(
        self, side: int, config: SessionConfig | None = None, now: float | None = None
    ) -> Session:
        """Restart one side's process: a brand-new Session object, connected."""
        now = self._at(now)
        self.collect()
        if config is not None:
            self.configs[side] = config
        self.sessions[side] = Session(self.configs[side])
        self.sessions[side].connection_made(now)
        self.collect()
        return self.sessions[side]

    def flush(self, side: int, limit: int = 256 * 1024) -> int:
        """Move what ``side`` has to send onto the wire; return the bytes produced."""
        was_up = self.sessions[side].is_up
        data = self.sessions[side].data_to_send(limit, now=self.now if self.pass_now else None)
        self.collect()
        if not data:
            return 0
        frames = split_frames(data)
        self.sent_frames[side].extend(frames)
        frames += self._unwrap(side, frames)
        self.hellos[side].extend((f, was_up) for f in frames if f.type == FrameType.HELLO)
        hook = self.mangle[side]
        if hook is not None:
            data = hook(data)
        self.wire[side] += data
        return len(data) or 1

    def _unwrap(self, side: int, frames: list[Frame]) -> list[Frame]:
        """Session frames carried in ``side``'s new LINK_DATA chunks (in index order)."""
        inner: list[Frame] = []
        for frame in frames:
            if frame.type != FrameType.LINK_DATA or len(frame.payload) < 4:
                continue
            epoch = int.from_bytes(frame.payload[:4], "big")
            seen_epoch, last = self._chunks_seen[side]
            if epoch != seen_epoch:
                self._inner[side] = FrameDecoder(MAX_PAYLOAD)
                last = -1
            elif frame.stream <= last:
                continue  # a retransmission
            self._chunks_seen[side] = (epoch, frame.stream)
            items = self._inner[side].feed(frame.payload[4:])
            inner += [item for item in items if isinstance(item, Frame)]
        self.sent_frames[side].extend(inner)
        return inner

    def deliver(self, side: int, count: int | None = None, now: float | None = None) -> int:
        """Deliver ``count`` (default: all) bytes that ``side`` sent to the other side."""
        now = self._at(now)
        wire = self.wire[side]
        if count is None:
            count = len(wire)
        chunk = bytes(wire[:count])
        del wire[:count]
        if chunk:
            self.sessions[1 - side].receive_data(chunk, now)
            self.collect()
        return len(chunk)

    def pump(
        self, now: float | None = None, max_rounds: int = 1000, limit: int = 256 * 1024
    ) -> int:
        """Exchange bytes until neither side has anything to send; return bytes moved."""
        now = self._at(now)
        moved = 0
        for _ in range(max_rounds):
            progress = 0
            for side in (A, B):
                progress += self.flush(side, limit)
                progress += self.deliver(side, now=now)
            moved += progress
            if not progress:
                return moved
        raise AssertionError(f"sessions never went quiet after {max_rounds} rounds")

    def tick(self, now: float) -> None:
        self.now = now
        for session in self.sessions:
            session.tick(now)
        self.collect()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let time pass in steps, ticking and pumping at each."""
        end = self.now + seconds
        while self.now < end:
            self.tick(min(end, self.now + step))
            self.pump()

    def handshake(self, now: float | None = None) -> None:
        self.pump(now)
        assert self.a.is_up and self.b.is_up, (self.a.state, self.b.state)

    def _at(self, now: float | None) -> float:
        if now is not None:
            self.now = now
        return self.now

    # ---------------------------------------------------------------- events

    def take(self, side: int) -> list[ev.Event]:
        events, self.events[side] = self.events[side], []
        return events

    def of(self, side: int, kind: type[Any]) -> list[Any]:
        return [e for e in self.events[side] if isinstance(e, kind)]

    def received(self, side: int, stream_id: int) -> bytes:
        return b"".join(
            e.data
            for e in self.events[side]
            if isinstance(e, ev.DataReceived) and e.stream_id == stream_id
        )

    # ---------------------------------------------------------------- streams

    def open(
        self, service: str = "svc", now: float | None = None, accept: bool = True
    ) -> tuple[int, int]:
        """Open a stream from A to B (accepted by default); return (id at A, id at B)."""
        now = self._at(now)
        sid = self.a.open_stream(service, now)
        self.pump()
        requested = [e for e in self.of(B, ev.StreamRequested) if e.stream_id == peer_id(sid)]
        assert requested, self.events[B]
        if accept:
            self.b.accept(peer_id(sid))
            self.pump()
        return sid, peer_id(sid)


def peer_id(stream_id: int) -> int:
    """The id the other side's Session uses for a stream."""
    return stream_id ^ OPENER_BIT


class RawPeer:
    """A hand-driven peer: builds frames itself and reads what a Session sends."""

    def __init__(
        self,
        session_id: int = 0x1111111111111111,
        max_frame: int = 16384,
        window: int = 256 * 1024,
        max_streams: int = 1024,
    ) -> None:
        self.session_id = session_id
        self.max_frame = max_frame
        self.window = window
        self.max_streams = max_streams
        self.seq = 0
        self.hellos_sent = 0
        self.decoder = FrameDecoder(MAX_PAYLOAD)
        self.received: list[Frame] = []

    def hello(self, peer_session: int) -> bytes:
        """The next HELLO: its ``seq`` counts this peer's HELLOs (docs: "Loss detection")."""
        self.seq = 0
        payload = HELLO_STRUCT.pack(
            self.session_id, peer_session, self.max_frame, self.window, self.max_streams, 0
        )
        hello_seq = self.hellos_sent & 0xFF
        self.hellos_sent += 1
        return encode_frame(FrameType.HELLO, 0, payload, hello_seq)

    def frame(
        self, ftype: int, stream: int = 0, payload: bytes = b"", seq: int | None = None
    ) -> bytes:
        """A frame with the next sequence number (or ``seq``, which skips the counter)."""
        if seq is None:
            seq = self.seq
            self.seq = (self.seq + 1) & 0xFF
        return encode_frame(ftype, stream, payload, seq)

    def read(self, session: Session, limit: int = 256 * 1024) -> list[Frame]:
        """Decode everything ``session`` has to send."""
        frames: list[Frame] = []
        while True:
            data = session.data_to_send(limit)
            if not data:
                break
            for item in self.decoder.feed(data):
                assert not isinstance(item, Damage)
                frames.append(item)
        self.received.extend(frames)
        return frames

    def handshake(self, session: Session, now: float = 0.0) -> list[Frame]:
        """Connect ``session`` and bring its session up with this peer."""
        session.connection_made(now)
        frames = self.read(session)
        assert [f.type for f in frames] == [FrameType.HELLO], frames
        their = hello_fields(frames[0])[0]
        session.receive_data(self.hello(their), now)
        assert session.is_up
        return self.read(session)
