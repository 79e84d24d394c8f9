"""The frame codec: bytes in, frames out, and back.  No I/O, no clock.

docs/protocol.rst is the specification; this module is its executable form.
The decoder never raises on input: garbage, half frames and damaged frames are
skipped by searching for the next sync marker, and reported as :class:`Damage`
so the session can reset whatever a damaged frame belonged to.
"""

from __future__ import annotations

import struct
import zlib
from binascii import crc_hqx
from dataclasses import dataclass, field
from enum import IntEnum

SYNC = b"\xa5\x5c"
VERSION = 1

_HEADER = struct.Struct(">2sBBBBIH")
_HCHECK = struct.Struct(">H")
_CRC = struct.Struct(">I")
_LENGTH = struct.Struct(">H")  # a header's payload length, at offset 10
#: The header with its check, for decoding in one call.
_HEADER_CHECKED = struct.Struct(">2sBBBBIHH")

#: Payload bytes as the codec hands them out: a DATA payload may be a view
#: into the bytes read (no copy), everything else is ``bytes``.
Payload = bytes | memoryview

HEADER_SIZE = _HEADER.size + _HCHECK.size  # 14
TRAILER_SIZE = _CRC.size  # 4
FRAME_OVERHEAD = HEADER_SIZE + TRAILER_SIZE  # 18

#: The wire format's hard ceiling on a payload (the length field is 16 bits).
MAX_PAYLOAD = 0xFFFF
#: Smallest max_frame a peer may advertise.
MIN_MAX_FRAME = 256

#: A partial frame may wait this long (plus STALL_PER_BYTE a byte) for the rest.
STALL_BASE = 1.0
STALL_PER_BYTE = 0.0001

#: DATA flag: the trailing CRC-32 covers the header only (see docs/protocol.rst,
#: "Header-only checks"); accepted only where both sides agreed to it.
FLAG_HEADER_CRC = 0x02
#: HELLO capability: "my channel is a kernel-checksummed socket; I accept
#: FLAG_HEADER_CRC DATA frames".
CAP_HEADER_CRC = 0x01
#: HELLO capability: "I accept DATA and EOF right after OPEN, before my OPEN_OK".
CAP_EARLY_DATA = 0x02
#: HELLO capability: "my channel is a kernel-checksummed socket; I accept BULK
#: frames" (docs/protocol.rst, "Bulk data").
CAP_BULK = 0x04

#: Bit 31 of a stream id on the wire: set when the frame's sender opened the stream.
OPENER_BIT = 0x80000000
MAX_STREAM_NUMBER = OPENER_BIT - 1


class FrameType(IntEnum):
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    GOAWAY = 0x04
    OPEN = 0x10
    OPEN_OK = 0x11
    OPEN_FAIL = 0x12
    DATA = 0x13
    WINDOW = 0x14
    EOF = 0x15
    RESET = 0x16
    BULK = 0x17
    LINK_DATA = 0x20
    LINK_ACK = 0x21


DATA_TYPE = int(FrameType.DATA)
BULK_TYPE = int(FrameType.BULK)
#: Not a wire type: a piece of the raw stream data that follows a BULK frame,
#: as the decoder hands it out (a :class:`Frame` with no ``seq`` of its own).
RAW_TYPE = 0x100
#: A BULK frame's payload: how many raw bytes follow it.
_BULK_COUNT = struct.Struct(">I")
#: A BULK frame's whole size on the wire (the raw bytes come on top).
BULK_FRAME_SIZE = FRAME_OVERHEAD + _BULK_COUNT.size
#: The most raw bytes one BULK frame may announce (a stream's window caps it further).
MAX_BULK = 0x7FFFFFFF
LINK_DATA_TYPE = int(FrameType.LINK_DATA)
#: Frames of the link-reliability layer (virtproxy/link.py), below the session.
LINK_FRAME_TYPES = frozenset({FrameType.LINK_DATA, FrameType.LINK_ACK})
#: A LINK_DATA payload may exceed max_payload by this much: it carries one
#: whole session frame (overhead included) plus a 4-byte epoch.
LINK_SLACK = 22

SESSION_FRAME_TYPES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GOAWAY})


class Reason(IntEnum):
    """Why a stream or session ended (OPEN_FAIL, RESET, GOAWAY)."""

    NO_SERVICE = 1
    REFUSED = 2
    TIMEOUT = 3
    LIMIT = 4
    PROTOCOL = 5
    SESSION_LOST = 6
    CORRUPT = 7
    ABORTED = 8
    SHUTDOWN = 9


def reason_name(code: int) -> str:
    """A readable name for a reason code, including codes from newer peers."""
    try:
        return Reason(code).name.lower().replace("_", " ")
    except ValueError:
        return f"reason {code}"


def describe_reason(code: int, message: str = "") -> str:
    """``reason name: message``, as logs show an OPEN_FAIL, RESET or GOAWAY."""
    return f"{reason_name(code)}: {message}" if message else reason_name(code)


@dataclass(slots=True)
class Frame:
    """One decoded frame with intact checksums.

    Not frozen: one is made per frame, and a frozen dataclass takes over
    twice as long to construct.
    """

    type: int
    stream: int
    #: A DATA payload may be a memoryview into the bytes read (see ``feed``).
    payload: bytes | memoryview
    seq: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Damage:
    """A frame whose header was intact but whose CRC was not.

    ``stream`` and ``seq`` come from the intact header; the payload is gone.
    """

    stream: int
    seq: int
    type: int
    #: The payload length the header claimed (the bytes crossed the line).
    length: int = field(default=0, compare=False)


def encode_header(ftype: int, stream: int, length: int, seq: int, flags: int = 0) -> bytes:
    header = _HEADER.pack(SYNC, VERSION, ftype, flags, seq, stream, length)
    return header + _HCHECK.pack(crc_hqx(header, 0xFFFF))


def encode_into(
    out: list[bytes | memoryview],
    ftype: int,
    stream: int,
    payload: bytes | memoryview,
    seq: int,
    flags: int = 0,
) -> int:
    """Append one frame's pieces to ``out`` (joined once by the caller); return its size.

    Keeping pieces separate avoids copying a DATA payload twice.
    """
    header = encode_header(ftype, stream, len(payload), seq, flags)
    crc = zlib.crc32(header)
    if not (flags & FLAG_HEADER_CRC and ftype == DATA_TYPE):
        crc = zlib.crc32(payload, crc)
    out.append(header)
    if payload:
        out.append(payload)
    out.append(_CRC.pack(crc))
    return FRAME_OVERHEAD + len(payload)


def encode_bulk(stream: int, count: int, seq: int) -> bytes:
    """A BULK frame announcing ``count`` raw bytes of ``stream`` right behind it."""
    if not 1 <= count <= MAX_BULK:
        raise ValueError(f"a BULK frame announces 1..{MAX_BULK} bytes, not {count}")
    return encode_frame(BULK_TYPE, stream, _BULK_COUNT.pack(count), seq)


def bulk_count(payload: bytes | memoryview) -> int:
    """The raw byte count a BULK payload announces (0: a malformed payload)."""
    if len(payload) != _BULK_COUNT.size:
        return 0
    (count,) = _BULK_COUNT.unpack(payload)
    return count if count <= MAX_BULK else 0


def encode_frame(
    ftype: int, stream: int, payload: bytes = b"", seq: int = 0, flags: int = 0
) -> bytes:
    """Encode one frame as bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    out: list[bytes | memoryview] = []
    encode_into(out, ftype, stream, payload, seq, flags)
    return b"".join(out)


class FrameDecoder:
    """Incremental, resynchronising frame decoder.

    ``feed`` returns the frames (and damage reports) completed by the new bytes.
    Memory is bounded: at most one frame of ``max_payload`` plus one read's worth
    is ever held.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, header_crc_ok: bool = False) -> None:
        self._buffer = bytearray()
        self.max_payload = max_payload
        self._max_link_payload = min(MAX_PAYLOAD, max_payload + LINK_SLACK)
        #: Frame types worth waiting for (None: all).  A valid header of any
        #: other type is skipped like garbage, without waiting for its payload.
        self.only_types: frozenset[int] | None = None
        #: Accept DATA frames whose CRC covers the header only (FLAG_HEADER_CRC).
        self.header_crc_ok = header_crc_ok
        #: Take the raw bytes behind a BULK frame (we offered CAP_BULK).  If
        #: not, a BULK frame is handed out like any other and the bytes behind
        #: it are decoded as frames (garbage, skipped).
        self.bulk_ok = False
        #: Raw bytes of a BULK frame still to come, and the wire id they belong to.
        self.raw_left = 0
        self.raw_stream = 0
        #: Frames accepted.
        self.frames = 0
        #: Frames with a valid header but a bad CRC.
        self.damaged = 0
        #: Times the decoder lost its alignment and searched for a sync marker.
        self.resyncs = 0
        #: Bytes skipped while searching (garbage, bad headers, damaged frames).
        self.discarded = 0
        self._in_sync = True
        #: When the frame at the head of the buffer started waiting for its
        #: missing bytes (None: not waiting), and how many it needs in all.
        self._waiting_since: float | None = None
        self._waiting_size = 0

    def reset(self) -> None:
        """Forget buffered bytes (a new connection starts with a clean slate)."""
        self._buffer.clear()
        self._in_sync = True
        self._waiting_since = None
        self.raw_left = 0

    def take_raw(self, count: int) -> None:
        """``count`` raw bytes of the current BULK frame were read past the
        decoder (spliced straight to their socket); only with nothing buffered."""
        if not 0 < count <= self.raw_left or self._buffer:
            raise ValueError(f"cannot take {count} of {self.raw_left} raw bytes here")
        self.raw_left -= count

    def stall_deadline(self) -> float | None:
        """When a partial frame at the head of the buffer counts as truncated.

        A sender writes every frame whole, so its bytes follow its header
        closely; one that stays incomplete for seconds was cut off (a peer
        that died or rebooted mid-frame).  Allow 1 s plus 0.1 ms a byte (a
        10 kB/s line); senders keep frames small on slower lines (see pacing).
        """
        if self._waiting_since is None:
            return None
        return self._waiting_since + STALL_BASE + self._waiting_size * STALL_PER_BYTE

    def expire(self, now: float) -> list[Frame | Damage]:
        """Give up on a truncated partial frame: resynchronise past its header."""
        deadline = self.stall_deadline()
        if deadline is None or now < deadline:
            return []
        self._waiting_since = None
        buf = self._buffer
        skip_to = self._skip(buf, 0, 1, len(buf))
        del buf[:skip_to]
        return self.feed(b"", now)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, now: float = 0.0) -> list[Frame | Damage]:
        """Decode what ``data`` completes; ``now`` dates a partial frame (see stall_deadline).

        DATA payloads are handed out as memoryviews into ``data`` itself
        wherever a frame lies wholly inside it: at channel speed, copying each
        payload out of the read buffer was a measurable share of the CPU.  Only
        a frame split across reads is assembled (in our own buffer, copied).
        """
        buf = self._buffer
        if not data:
            return self._decode(buf, 0, now, copy=True) if buf else []
        results: list[Frame | Damage] = []
        start = 0
        view = memoryview(data)
        if self.raw_left:
            start = self._raw_piece(view, 0, results)
        while buf and start < len(data):
            # Top the buffer up with just the bytes its head frame still needs
            # (its header first), then go on in ``data`` itself.
            need = self._head_needs()
            if need <= 0:
                break  # not a plain partial frame: decode it all from the buffer
            taken = view[start : start + need]
            buf += taken
            start += len(taken)
            results += self._decode(buf, 0, now, copy=True)
            if self.raw_left:
                start = self._raw_piece(view, start, results)
        if start >= len(data):
            return results
        if buf:
            buf += view[start:]
            results += self._decode(buf, 0, now, copy=True)
            return results
        results += self._decode(data, start, now, copy=False)
        return results

    def _raw_piece(
        self, view: memoryview, start: int, results: list[Frame | Damage], copy: bool = False
    ) -> int:
        """Hand out the raw bytes of a BULK frame at ``view[start:]``; return
        where the frames after them start.  ``copy``: ``view`` is of our own
        buffer, so the piece is copied out of it."""
        take = min(self.raw_left, len(view) - start)
        if take:
            self.raw_left -= take
            # Unnamed, like a payload in _decode: a live view would stop ``del buf``.
            piece = bytes(view[start : start + take]) if copy else view[start : start + take]
            results.append(Frame(RAW_TYPE, self.raw_stream, piece))
        return start + take

    def _head_needs(self) -> int:
        """How many more bytes the frame at the head of the buffer needs (0: unknown)."""
        buf = self._buffer
        if self.raw_left:
            return 0
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf) if buf[:2] == SYNC[: len(buf)] else 0
        if buf[0] != 0xA5 or buf[1] != 0x5C:
            return 0
        (length,) = _LENGTH.unpack_from(buf, 10)
        return HEADER_SIZE + length + TRAILER_SIZE - len(buf)

    def _decode(
        self, source: bytes | bytearray, pos: int, now: float, copy: bool
    ) -> list[Frame | Damage]:
        """Decode frames from ``source[pos:]``; keep an incomplete tail in the buffer.

        ``source`` is the buffer itself (``copy``: payloads are copied out, and
        decoded bytes are dropped from it) or a read that arrived with the
        buffer empty (payloads of DATA frames are views into it).
        """
        buf = self._buffer
        results: list[Frame | Damage] = []
        size = len(source)
        crc32 = zlib.crc32
        max_payload = self.max_payload
        max_link_payload = self._max_link_payload
        only_types = self.only_types
        unpack_header = _HEADER_CHECKED.unpack_from
        view = memoryview(source)
        try:
            while size - pos >= HEADER_SIZE:
                sync, version, ftype, flags, seq, stream, length, hcheck = unpack_header(
                    source, pos
                )
                if sync != SYNC:
                    pos = self._skip(source, pos, pos, size)
                    continue
                if (
                    crc_hqx(view[pos : pos + 12], 0xFFFF) != hcheck
                    or version != VERSION
                    or (
                        length > max_payload
                        and (ftype != LINK_DATA_TYPE or length > max_link_payload)
                    )
                    or (only_types is not None and ftype not in only_types)
                ):
                    pos = self._skip(source, pos, pos + 1, size)
                    continue
                end = pos + HEADER_SIZE + length
                if size < end + TRAILER_SIZE:
                    if pos or self._waiting_since is None or not copy:
                        self._waiting_since = now
                        self._waiting_size = length + FRAME_OVERHEAD
                    break
                (crc,) = _CRC.unpack_from(source, end)
                if flags & FLAG_HEADER_CRC and self.header_crc_ok and ftype == DATA_TYPE:
                    checked = crc32(view[pos : pos + HEADER_SIZE])
                else:
                    checked = crc32(view[pos:end])
                if checked != crc:
                    self.damaged += 1
                    results.append(Damage(stream, seq, ftype, length))
                    pos = self._skip(source, pos, pos + 1, size)
                    continue
                self._in_sync = True
                self._waiting_since = None
                self.frames += 1
                payload: bytes | memoryview
                if ftype == DATA_TYPE and not copy:
                    payload = view[pos + HEADER_SIZE : end]
                else:
                    # Bound to no name: a live view would stop ``del buf[...]``.
                    payload = bytes(view[pos + HEADER_SIZE : end])
                results.append(Frame(ftype, stream, payload, seq, flags))
                pos = end + TRAILER_SIZE
                if ftype == BULK_TYPE and self.bulk_ok:
                    # Its raw bytes follow: all of them are the stream's data.
                    self.raw_left = bulk_count(payload)
                    self.raw_stream = stream
                    pos = self._raw_piece(view, pos, results, copy)
                    if self.raw_left:
                        break  # the rest of them is still to come
            if pos < size and (source[pos] != 0xA5 or (size - pos > 1 and source[pos + 1] != 0x5C)):
                pos = self._skip(source, pos, pos, size)  # a tail that cannot start a frame
        finally:
            if copy:
                view.release()
        if copy:
            if pos:
                del buf[:pos]
        elif pos < size:
            buf += view[pos:]
        return results

    def _skip(self, buf: bytes | bytearray, pos: int, search_from: int, size: int) -> int:
        """Drop bytes from ``pos`` up to the next possible sync marker."""
        self._waiting_since = None
        if self._in_sync:
            self._in_sync = False
            self.resyncs += 1
        found = buf.find(SYNC, search_from)
        if found < 0:
            # Keep a trailing first sync byte: the marker may be split across reads.
            found = size - 1 if size > search_from and buf[size - 1] == 0xA5 else size
        self.discarded += found - pos
        return found
