#!/usr/bin/env python
"""Coverage-guided fuzz target for the sans-I/O Session with a hostile peer.

    python fuzz/fuzz_session.py [libFuzzer options] [CORPUS_DIR ...]

A Session is brought UP with a forged peer HELLO, then the input is played as
a script of steps: raw bytes for the channel, well-formed frames (checksums
right, ``seq`` right or chosen by the input) of any type, stream id and
payload, time passing, and what a local owner does (open, accept, reject,
send, EOF, reset, consume, reading the channel).  Checked after every step:

* nothing escapes ``receive_data``/``tick`` at all, and the owner API raises
  only what it documents (``open_stream``: ValueError for a bad name);
* the decoder holds less than one frame; the control backlog stays bounded
  while the owner respects ``input_paused`` (reading the channel before
  feeding more);
* per stream, data delivered and not yet consumed never exceeds the window
  this side granted (and all streams together the session window), and
  queued send bytes stay within ``send_high_water`` plus the last write;
* the peer's live streams never exceed ``max_streams``, and every event
  names a stream the owner knows (or announces a new one).

``check(data)`` is plain Python: tests/test_fuzz_targets.py runs it without
atheris.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # virtproxy, from a checkout
sys.path.insert(0, str(HERE))  # fuzzkit

from fuzzkit import Reader, instrumented_imports, run  # noqa: E402

with instrumented_imports():
    from virtproxy import events as ev
    from virtproxy import session as session_module
    from virtproxy.frames import (
        FRAME_OVERHEAD,
        LINK_SLACK,
        OPENER_BIT,
        FrameDecoder,
        encode_frame,
    )
    from virtproxy.link import LINK_WINDOW

Session = session_module.Session
SessionConfig = session_module.SessionConfig
HELLO = struct.Struct(">QQIIII")
PEER_ID = 0x1111111111111111
CONFIGS = {
    link: SessionConfig(
        max_frame=256,
        window=1024,
        session_window=2048,
        max_streams=4,
        max_open_rate=20.0,
        send_high_water=2048,
        keepalive_interval=5.0,
        keepalive_timeout=20.0,
        link=link,
        # As on a socket channel: BULK frames (0x17) and their raw bytes too.
        header_crc=link == "off",
        bulk=link == "off",
    )
    for link in ("auto", "off")
}
#: The limits the invariants check (the same in every mode).
CONFIG = CONFIGS["auto"]
#: Stream ids the input can name: a few of each side's, and raw 32-bit values.
FRAME_TYPES = [0x01, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x00, 0x17]
#: The link layer's frames: in "auto" mode a LINK_DATA turns the link on.
FRAME_TYPES += [0x20, 0x21]


def control_backlog(session: Session) -> int:
    """Queued control frames (a private detail, read defensively)."""
    return len(getattr(session, "_control", ()))


class Harness:
    """One Session, its owner's bookkeeping, and a forging peer."""

    def __init__(self, link: str = "auto") -> None:
        self.session = Session(CONFIGS[link])
        self.now = 0.0
        self.seq = 0
        self.hellos_sent = 0
        self.reader = FrameDecoder()  # what the session sends, decoded
        self.unconsumed: dict[int, int] = {}
        self.last_write: dict[int, int] = {}
        self.known: set[int] = set()
        self.blocked: set[int] = set()
        self.requested: list[int] = []
        self.session.connection_made(self.now)
        hello = self.drain()
        their = [f for f in hello if getattr(f, "type", None) == 0x01]
        assert their, hello
        ours = HELLO.unpack_from(their[0].payload)[0]
        self.feed(self.hello(ours))
        assert self.session.is_up

    def hello(self, peer_session: int, session_id: int = PEER_ID, repeat: bool = False) -> bytes:
        """A HELLO whose seq counts this peer's HELLOs (``repeat``: the last one's again)."""
        self.seq = 0
        if not repeat:
            self.hellos_sent += 1
        payload = HELLO.pack(session_id, peer_session, 256, 1024, 8, 0)
        return encode_frame(0x01, 0, payload, (self.hellos_sent - 1) & 0xFF)

    def frame(self, ftype: int, stream: int, payload: bytes, seq: int | None, flags: int) -> bytes:
        if seq is None:
            seq = self.seq
            self.seq = (self.seq + 1) & 0xFF
        return encode_frame(ftype, stream, payload, seq, flags)

    def drain(self) -> list:
        """Read the channel as the owner would (everything the session has)."""
        frames = []
        for _ in range(1000):
            data = self.session.data_to_send(64 * 1024, now=self.now)
            if not data:
                break
            frames += self.reader.feed(data)
        return frames

    def feed(self, data: bytes) -> None:
        if self.session.input_paused:
            self.drain()  # the owner stops reading the channel until it has written
        before = control_backlog(self.session)
        self.session.receive_data(data, self.now)
        # Each frame queues at most one control frame (a RESET, OPEN_FAIL, PONG
        # or HELLO), so one chunk adds at most that many on top of the backlog,
        # plus the OPENs of our own streams that a session coming up sends.
        ours = sum(1 for key in self.session.streams if not key & OPENER_BIT)
        most = len(data) // FRAME_OVERHEAD + 2 + ours
        assert control_backlog(self.session) <= before + most, (before, most)
        self.events()

    def events(self) -> None:
        for event in self.session.take_events():
            if isinstance(event, ev.SessionUp | ev.SessionEnded | ev.LinkNotice):
                continue
            key = event.stream_id
            if isinstance(event, ev.StreamRequested):
                assert key & OPENER_BIT and key not in self.known, event
                self.known.add(key)
                self.requested.append(key)
                continue
            assert key in self.known, event
            if isinstance(event, ev.DataReceived):
                self.unconsumed[key] = self.unconsumed.get(key, 0) + len(event.data)
                assert self.unconsumed[key] <= CONFIG.window, (key, self.unconsumed[key])
                held = sum(self.unconsumed.values())
                assert held <= self.session.config.session_window, held
            elif isinstance(event, ev.StreamWritable):
                self.blocked.discard(key)
            elif isinstance(event, ev.StreamReset | ev.StreamRejected | ev.StreamClosed):
                self.forget(key)

    def forget(self, key: int) -> None:
        """The stream ended: a restarted peer may reuse its id for a new one."""
        self.known.discard(key)
        self.unconsumed.pop(key, None)
        self.blocked.discard(key)
        if key in self.requested:
            self.requested.remove(key)

    def invariants(self) -> None:
        session = self.session
        decoder = getattr(session, "_decoder", None)
        if decoder is not None:
            assert decoder.buffered < CONFIG.max_frame + LINK_SLACK + FRAME_OVERHEAD
        link = getattr(session, "link", None)
        if link is not None:  # chunks kept for resending, and held out of order
            assert link.unacknowledged <= LINK_WINDOW and link.held <= LINK_WINDOW
        theirs = [k for k in session.streams if k & OPENER_BIT]
        assert len(theirs) <= CONFIG.max_streams
        assert set(session.streams) <= self.known, set(session.streams) - self.known
        for key, stream in session.streams.items():
            assert stream.queued <= CONFIG.send_high_water + self.last_write.get(key, 0)
            assert stream.recv_credit >= 0

    # ------------------------------------------------------------ steps

    def step(self, reader: Reader) -> None:
        op = reader.byte()
        kind = op % 12
        session = self.session
        if kind == 0:  # raw bytes
            self.feed(reader.take(reader.byte()))
        elif kind <= 4:  # a well-formed frame
            ftype = FRAME_TYPES[reader.byte() % len(FRAME_TYPES)]
            pick = reader.byte()
            if pick < 0xF0 and (pick & 1):
                stream = (pick >> 1 & 7) | OPENER_BIT  # a stream the peer opened
            elif pick < 0xF0:
                stream = (pick >> 1) & 7  # one of ours
            else:
                stream = int.from_bytes(reader.take(4).ljust(4, b"\0"), "big")
            size = reader.byte()
            if ftype == 0x13 and size & 0x80:
                size = 256 + (size & 0x7F) * 8  # DATA past max_frame is not decodable
                size = min(size, CONFIG.max_frame)
            payload = reader.take(size)
            if ftype == 0x10 and op & 0x10:
                payload = b"svc"
            seq = reader.byte() if op & 0x20 else None
            flags = reader.byte() & 0x03 if op & 0x40 else 0
            self.feed(self.frame(ftype, stream, payload, seq, flags))
        elif kind == 5:  # a HELLO: the same peer, or a restarted one
            new_id = PEER_ID if op & 0x10 else PEER_ID + reader.byte() + 1
            peer_session = session.session_id if op & 0x20 else 0
            self.feed(self.hello(peer_session, new_id, repeat=bool(op & 0x40)))
        elif kind == 6:
            self.now += reader.byte() / 10
            session.tick(self.now)
            self.events()
        elif kind == 7:
            self.drain()
        elif kind == 8:
            name = reader.take(reader.byte() % 8).decode("latin-1")
            try:
                key = session.open_stream(name or "svc", self.now)
            except ValueError:
                assert not session_module.valid_service_name(name.encode("latin-1") or b"svc")
            else:
                self.known.add(key)
            self.events()
        elif kind == 9 and self.requested:
            key = self.requested.pop(reader.byte() % len(self.requested))
            if op & 0x10:
                session.accept(key)
            else:
                session.reject(key, 1, "no")
                self.forget(key)
            self.events()
        elif kind == 10 and self.known:
            keys = sorted(self.known)
            key = keys[reader.byte() % len(keys)]
            action = op >> 4
            if action < 8:
                if key not in self.blocked:  # a blocked owner stops reading its socket
                    data = bytes(reader.byte() * 16 + 1)
                    self.last_write[key] = len(data)
                    if not session.send(key, data):
                        self.blocked.add(key)
            elif action < 11:
                session.send_eof(key)
            elif action < 13:
                session.reset(key)
                self.forget(key)
            else:
                count = self.unconsumed.get(key, 0)
                if count:
                    self.unconsumed[key] = 0
                    session.consumed(key, count)
            self.events()
        elif kind == 11:
            if op & 0x10:
                session.connection_lost(self.now)
                self.events()
                session.connection_made(self.now)
                self.events()
            else:
                self.drain()
                self.events()

    def run(self, data: bytes) -> None:
        reader = Reader(data)
        while reader.left:
            self.step(reader)
            self.invariants()
            # the session's answers must always decode as intact frames
            assert self.reader.damaged == 0


def check(data: bytes) -> None:
    """The first byte picks the link mode ("auto" as on TCP, or "off")."""
    link = "off" if data[:1] and data[0] & 1 else "auto"
    Harness(link).run(data[1:])


def main() -> None:
    run(check)


if __name__ == "__main__":
    main()
