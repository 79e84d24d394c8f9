"""Link reliability: numbered chunks, acknowledgements and retransmission.

On a noisy serial line bytes are corrupted, dropped, duplicated or cut off.
The frame CRCs detect that, but without this layer the session can only reset
the stream that was hit (or restart the whole session when a control frame was
lost).  With it, the session's own byte stream is carried in numbered
LINK_DATA chunks that the receiver acknowledges (LINK_ACK: a cumulative index
plus a bitmap of the chunks held beyond it, and a NAK for a chunk that arrived
damaged); the sender keeps every unacknowledged chunk and sends it again when
the receiver reports a hole, or when its retransmission timer runs out.  The
session above sees an exact, in-order byte stream.

A channel is a byte stream, so chunks never overtake each other: a chunk is
lost once a later one arrived without it, and is sent again at once.

Sans-I/O like the rest of the core: frames in, frame pieces out, explicit time.
docs/protocol.rst, "Link reliability", is the wire specification.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass

from .frames import FRAME_OVERHEAD, MAX_PAYLOAD, Damage, Frame, FrameType, encode_into

#: Chunks the sender may have unacknowledged; the receiver holds at most this
#: many out of order, and the ACK bitmap covers them.
LINK_WINDOW = 64
#: LINK_ACK flag: the chunk at the acknowledged index arrived damaged.
FLAG_NAK = 0x01
#: LINK_DATA flag: the payload is one part of a chunk (a resend split at the
#: current chunk size): epoch, offset and total length, then the bytes.
FLAG_PART = 0x04
#: A receiver assembles at most this many split chunks at once.
MAX_ASSEMBLIES = 8
#: The 4-byte epoch that starts every LINK_DATA payload.
EPOCH_SIZE = 4
#: Retransmission timer bounds (seconds); it starts at RTO_INITIAL.
RTO_MIN = 1.0
RTO_MAX = 3.0
RTO_INITIAL = 1.0

#: Chunk sizes (session bytes): a corrupted byte costs its whole chunk, so the
#: size adapts, halving on every loss and doubling after CHUNK_GROWTH clean
#: chunks.  It settles where about one chunk in CHUNK_GROWTH is hit: near
#: 500 bytes at one bad byte in 10,000; at the frame size on a clean link.
CHUNK_MIN = 128
CHUNK_START = 1024
CHUNK_GROWTH = 16

_MASK = 0xFFFFFFFF
_EPOCH = struct.Struct(">I")
_ACK = struct.Struct(">IQ")  # epoch of the data acknowledged, bitmap
_PART = struct.Struct(">III")  # epoch, offset in the chunk, the chunk's length


def _new_epoch() -> int:
    while True:
        value = int.from_bytes(os.urandom(4), "big")
        if value:
            return value


def chunk_size(peer_max_frame: int, frame_limit: int) -> int:
    """Session bytes per chunk: one whole session frame of the current size."""
    return min(min(peer_max_frame, frame_limit) + FRAME_OVERHEAD, MAX_PAYLOAD - EPOCH_SIZE)


@dataclass(slots=True)
class LinkStats:
    """Link counters (kept across channel connections by the session)."""

    chunks_sent: int = 0
    retransmits: int = 0
    timeouts: int = 0
    duplicates: int = 0
    damaged: int = 0
    out_of_order: int = 0
    peer_restarts: int = 0


class _Assembly:
    """The parts of one split chunk received so far."""

    __slots__ = ("data", "have", "missing")

    def __init__(self, total: int) -> None:
        self.data = bytearray(total)
        self.have = bytearray(total)  # 1 where a byte arrived
        self.missing = total

    def add(self, offset: int, piece: bytes) -> None:
        end = offset + len(piece)
        self.missing -= len(piece) - self.have.count(1, offset, end)
        self.data[offset:end] = piece
        self.have[offset:end] = b"\x01" * len(piece)


@dataclass(slots=True)
class _Chunk:
    payload: bytes  # epoch + session bytes, exactly as sent
    sent_at: float
    order: int  # when it was last sent, counted in sends on this link
    sends: int = 1


class ReliableLink:
    """Both directions of the link layer on one channel connection."""

    def __init__(self, stats: LinkStats | None = None) -> None:
        self.stats = stats if stats is not None else LinkStats()
        # Sending.
        self.epoch = _new_epoch()
        self._epoch_bytes = _EPOCH.pack(self.epoch)
        self._base = 0  # oldest unacknowledged index
        self._next = 0  # index of the next new chunk
        self._chunks: dict[int, _Chunk] = {}
        self._resend: deque[int] = deque()
        self._unsent = bytearray()  # session bytes waiting for window room
        self._sends = 0  # chunks sent, resends included: the send order
        self.chunk_limit = CHUNK_START
        self._clean = 0  # chunks acknowledged since the last loss
        self.srtt: float | None = None
        self._rttvar = 0.0
        self.rto = RTO_INITIAL
        # Receiving.
        self.peer_epoch: int | None = None
        self._expected = 0
        self._held: dict[int, bytes] = {}
        self._parts: dict[int, _Assembly] = {}
        self._ack_due = False
        self._nak = False
        self._nak_copy = 0  # which send of the chunk arrived damaged (its seq byte)
        #: Set when the peer's link started over; the owner resets its decoder.
        self.peer_restarted = False

    # ------------------------------------------------------------------ receiving

    def on_data(self, frame: Frame, now: float) -> bytes:
        """A LINK_DATA chunk (or part): return the session bytes it makes available, in order."""
        payload = bytes(frame.payload)  # not DATA, so bytes already: no copy
        split = frame.flags & FLAG_PART
        if len(payload) < (_PART.size if split else EPOCH_SIZE):
            return b""
        (epoch,) = _EPOCH.unpack_from(payload)
        index = frame.stream
        if epoch != self.peer_epoch:
            self._peer_started(epoch, index)
        self._ack_due = True
        ahead = (index - self._expected) & _MASK
        if ahead >= LINK_WINDOW or index in self._held:
            self.stats.duplicates += 1  # already delivered (or nonsense): drop
            return b""
        if split:
            whole = self._assemble(index, payload)
            if whole is None:
                return b""
        else:
            self._parts.pop(index, None)
            whole = payload[EPOCH_SIZE:]
        if ahead:
            self.stats.out_of_order += 1
            self._held[index] = whole
            return b""
        self._nak = False
        pieces = [whole]
        expected = (index + 1) & _MASK
        held = self._held
        while held:
            piece = held.pop(expected, None)
            if piece is None:
                break
            pieces.append(piece)
            expected = (expected + 1) & _MASK
        self._expected = expected
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _assemble(self, index: int, payload: bytes) -> bytes | None:
        """Add a part of a split chunk; the whole chunk once every byte is there."""
        _, offset, total = _PART.unpack_from(payload)
        piece = payload[_PART.size :]
        if not piece or not 0 < total <= MAX_PAYLOAD or offset + len(piece) > total:
            return None  # nonsense from a peer: ignore
        parts = self._parts
        assembly = parts.get(index)
        if assembly is None or len(assembly.data) != total:
            if len(parts) >= MAX_ASSEMBLIES:
                farthest = max(parts, key=lambda i: (i - self._expected) & _MASK)
                del parts[farthest]
            assembly = parts[index] = _Assembly(total)
        assembly.add(offset, piece)
        if assembly.missing:
            return None
        del parts[index]
        return bytes(assembly.data)

    def on_damage(self, damage: Damage) -> None:
        """A chunk whose header survived but whose payload did not: ask again."""
        if damage.type != FrameType.LINK_DATA:
            return  # a damaged ACK: the next one says the same
        self.stats.damaged += 1
        self._ack_due = True
        if damage.stream == self._expected:
            self._nak = True
            self._nak_copy = damage.seq

    def _peer_started(self, epoch: int, index: int) -> None:
        """A chunk of an epoch we don't know: the peer's link (re)started, or we did.

        Its stream is taken up at this chunk.  A receiver that joins mid-stream
        (we restarted; the peer did not) gets the peer's bytes from a frame
        boundary found by the session's decoder; what came before belonged to a
        session that ended with the restart.  A new peer's chunk 0 is normally
        the first one seen; if it was lost, the session above sees the loss.
        """
        if self.peer_epoch is not None:
            self.stats.peer_restarts += 1
            self.peer_restarted = True
        self.peer_epoch = epoch
        self._expected = index
        self._held.clear()
        self._parts.clear()
        self._nak = False

    def nudge(self) -> None:
        """Send an ACK soon: any link frame turns an auto-mode peer's link on."""
        self._ack_due = True

    def on_ack(self, frame: Frame, now: float) -> None:
        """A LINK_ACK: forget what arrived, resend what it shows was lost.

        Chunks cross the channel in the order they were sent, so a chunk sent
        before one that arrived, and not itself acknowledged, was lost.
        """
        if len(frame.payload) < _ACK.size:
            return
        epoch, bitmap = _ACK.unpack_from(frame.payload)
        cumulative = frame.stream
        if epoch != self.epoch and not (epoch == 0 and cumulative == self._base == 0):
            # Chunks of an earlier epoch.  (Epoch 0: the receiver has not had an
            # intact chunk yet, so it can only NAK our chunk 0.)
            return
        advance = (cumulative - self._base) & _MASK
        if advance > (self._next - self._base) & _MASK:
            return  # acknowledges chunks never sent: nonsense
        chunks = self._chunks
        latest = -1  # send order of the latest chunk known to have arrived
        for offset in range(advance):
            chunk = chunks.pop((self._base + offset) & _MASK, None)
            if chunk is not None:
                latest = max(latest, self._arrived(chunk, now))
        self._base = cumulative
        if advance and self.srtt is not None:
            self.rto = self._computed_rto()  # progress ends any timer backoff
        outstanding = (self._next - cumulative) & _MASK
        position = 1
        while bitmap and position < outstanding:
            if bitmap & 1:
                chunk = chunks.pop((cumulative + position) & _MASK, None)
                if chunk is not None:
                    latest = max(latest, self._arrived(chunk, now))
            bitmap >>= 1
            position += 1
        resend = self._resend
        if latest >= 0:
            lost = [i for i, c in chunks.items() if c.order < latest and i not in resend]
            if lost:
                lost.sort(key=lambda index: (index - cumulative) & _MASK)
                resend.extend(lost)
                self._lost()
        if frame.flags & FLAG_NAK and cumulative in chunks and cumulative not in resend:
            chunk = chunks[cumulative]
            # The NAK names the copy that arrived damaged (the seq byte counts a
            # chunk's sends): if it is the latest, no other copy is on its way.
            if frame.seq == (chunk.sends - 1) & 0xFF:
                resend.appendleft(cumulative)
                self._lost()

    def _arrived(self, chunk: _Chunk, now: float) -> int:
        self._sample(chunk, now)
        self._clean += 1
        if self._clean >= CHUNK_GROWTH:
            self._clean = 0
            self.chunk_limit = min(MAX_PAYLOAD - EPOCH_SIZE, self.chunk_limit * 2)
        return chunk.order

    def _lost(self) -> None:
        self._clean = 0
        self.chunk_limit = max(CHUNK_MIN, self.chunk_limit // 2)

    def _sample(self, chunk: _Chunk, now: float) -> None:
        """Round-trip sample from a chunk sent once (Karn's rule)."""
        if chunk.sends != 1:
            return
        sample = max(0.0, now - chunk.sent_at)
        if self.srtt is None:
            self.srtt = sample
            self._rttvar = sample / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
        self.rto = self._computed_rto()

    def _computed_rto(self) -> float:
        srtt = self.srtt or 0.0
        return min(RTO_MAX, max(RTO_MIN, srtt + max(0.01, 4 * self._rttvar)))

    # ------------------------------------------------------------------ time

    def deadline(self) -> float | None:
        """When the oldest unacknowledged chunk (not already queued) times out."""
        pending = [c.sent_at for i, c in self._chunks.items() if i not in self._resend]
        return min(pending) + self.rto if pending else None

    def tick(self, now: float) -> None:
        """Resend every chunk whose acknowledgement is overdue; back the timer off."""
        expired = [
            index
            for index, chunk in self._chunks.items()
            if index not in self._resend and now - chunk.sent_at >= self.rto
        ]
        if not expired:
            return
        self.stats.timeouts += 1
        expired.sort(key=lambda index: (index - self._base) & _MASK)
        self._resend.extend(expired)
        self.rto = min(RTO_MAX, self.rto * 2)

    # ------------------------------------------------------------------ sending

    @property
    def room(self) -> int:
        """New chunks the window allows now."""
        return LINK_WINDOW - ((self._next - self._base) & _MASK)

    @property
    def has_control(self) -> bool:
        """An ACK or a resend is waiting (sent even when the window is full)."""
        return self._ack_due or bool(self._resend)

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def write_control(self, out: list[bytes | memoryview], now: float, limit: int) -> int:
        """Append the due ACK, then resends (up to about ``limit`` bytes)."""
        size = 0
        if self._ack_due:
            self._ack_due = False
            bitmap = 0
            expected = self._expected
            for index in self._held:
                bitmap |= 1 << (((index - expected) & _MASK) - 1)
            flags, copy = (FLAG_NAK, self._nak_copy) if self._nak else (0, 0)
            self._nak = False
            payload = _ACK.pack(self.peer_epoch or 0, bitmap)
            size += encode_into(out, FrameType.LINK_ACK, expected, payload, copy, flags)
        resend = self._resend
        while resend and size < limit:
            index = resend.popleft()
            chunk = self._chunks.get(index)
            if chunk is None:
                continue
            chunk.sent_at = now
            chunk.sends += 1
            self._sends += 1
            chunk.order = self._sends
            self.stats.retransmits += 1
            size += self._resend_chunk(out, index, chunk.payload, (chunk.sends - 1) & 0xFF)
        return size

    def _resend_chunk(
        self, out: list[bytes | memoryview], index: int, payload: bytes, copy: int
    ) -> int:
        """Send a chunk again; split into parts if it is much larger than chunks are now.

        A chunk made while the line was clean can be many times the size that
        gets through now; sent whole it might never arrive intact.  The
        receiver keeps the parts that arrive, so each resend completes more.
        """
        data = memoryview(payload)[EPOCH_SIZE:]
        part = self.chunk_limit
        if len(data) <= 2 * part:
            return encode_into(out, FrameType.LINK_DATA, index, payload, copy)
        size = 0
        (epoch,) = _EPOCH.unpack_from(payload)
        for offset in range(0, len(data), part):
            piece = _PART.pack(epoch, offset, len(data)) + data[offset : offset + part]
            size += encode_into(out, FrameType.LINK_DATA, index, piece, copy, FLAG_PART)
        return size

    def write_data(self, out: list[bytes | memoryview], data: bytes, size: int, now: float) -> int:
        """Append session bytes as new chunks of at most ``size`` bytes, as the window allows.

        What the window does not take now waits, and goes first next time.
        """
        unsent = self._unsent
        if unsent:
            unsent += data
            data = bytes(unsent)
            unsent.clear()
        written = 0
        offset = 0
        total = len(data)
        while offset < total and self.room > 0:
            piece = data[offset : offset + size]
            offset += len(piece)
            payload = self._epoch_bytes + piece
            index = self._next
            self._sends += 1
            self._chunks[index] = _Chunk(payload, now, self._sends)
            self._next = (index + 1) & _MASK
            self.stats.chunks_sent += 1
            written += encode_into(out, FrameType.LINK_DATA, index, payload, 0)
        if offset < total:
            unsent += data[offset:]
        return written

    @property
    def unacknowledged(self) -> int:
        """Chunks kept for a possible resend (a bound: LINK_WINDOW)."""
        return len(self._chunks)

    @property
    def held(self) -> int:
        """Chunks received out of order, waiting for a hole (a bound: LINK_WINDOW)."""
        return len(self._held)

    @property
    def assembling(self) -> int:
        """Split chunks partly received (a bound: MAX_ASSEMBLIES)."""
        return len(self._parts)
