#!/usr/bin/env python
"""Coverage-guided fuzz target for the frame decoder (virtproxy.frames.FrameDecoder).

    python fuzz/fuzz_frames.py [libFuzzer options] [CORPUS_DIR ...]

The decoder reads what a possibly hostile guest wrote, so for any bytes in
any chunking it must:

* never raise (the module promises that input never raises);
* never hold more than one incomplete frame: ``buffered`` stays below
  ``max_payload + FRAME_OVERHEAD``;
* account for every byte: fed == discarded + accepted frames' sizes + buffered;
* yield only frames that re-encode to the same bytes and decode back to
  themselves, with payloads within ``max_payload`` (and damage reports whose
  claimed length is within it too).

With ``bulk_ok`` a BULK frame's raw bytes come out as RAW pieces of its
stream, never more than it announced, and nothing is buffered meanwhile.

The first input bytes choose ``max_payload``, ``header_crc_ok``, ``bulk_ok``
and, between chunks, how far time moves (so ``expire`` runs on truncated
frames).
``check(data)`` is plain Python: tests/test_fuzz_targets.py runs it without
atheris.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # virtproxy, from a checkout
sys.path.insert(0, str(HERE))  # fuzzkit

from fuzzkit import Reader, instrumented_imports, run  # noqa: E402

with instrumented_imports():
    from virtproxy.frames import (
        BULK_TYPE,
        FRAME_OVERHEAD,
        LINK_DATA_TYPE,
        LINK_SLACK,
        MAX_PAYLOAD,
        MIN_MAX_FRAME,
        RAW_TYPE,
        Damage,
        Frame,
        FrameDecoder,
        FrameType,
        bulk_count,
        encode_frame,
    )


#: Every frame type, two unknown ones, and the link layer's (whose LINK_DATA
#: may exceed max_payload by LINK_SLACK).
FRAME_TYPES = [int(t) for t in FrameType] + [0x00, 0x18, 0x22, 0xFF]


def make_chunk(reader: Reader, size: int, max_payload: int) -> bytes:
    """Raw bytes, or a frame with valid checksums (maybe then damaged).

    Blind mutation almost never gets a CRC-16 and a CRC-32 right, so half the
    chunks are built as real frames from the input: that is what reaches the
    accept, damage and header-only paths.
    """
    mode = reader.byte()
    if not mode & 1:
        return reader.take(size)
    ftype = FRAME_TYPES[reader.byte() % len(FRAME_TYPES)]
    flags = reader.byte() & 0x03 if mode & 2 else 0
    header = reader.take(5).ljust(5, b"\0")
    payload = reader.take(size)
    if ftype == BULK_TYPE and mode & 32:  # a count that the input can cover
        payload = (reader.byte() * 7 + 1).to_bytes(4, "big")
    elif mode & 16:  # past max_payload: only LINK_DATA may be, and by LINK_SLACK at most
        want = min(MAX_PAYLOAD, max_payload + reader.byte() % (LINK_SLACK + 8))
        payload = (payload + bytes(want))[:want]
    frame = bytearray(
        encode_frame(ftype, int.from_bytes(header[1:], "big"), payload, header[0], flags)
    )
    if mode & 4:  # damage one byte: header, payload or CRC
        where = reader.byte() % len(frame)
        frame[where] ^= reader.byte() or 1
    if mode & 8:  # truncate: the rest never comes
        del frame[reader.byte() % len(frame) :]
    return bytes(frame)


def roundtrip(frame: Frame, max_payload: int, header_crc_ok: bool) -> None:
    encoded = encode_frame(frame.type, frame.stream, frame.payload, frame.seq, frame.flags)
    again = FrameDecoder(max_payload, header_crc_ok).feed(encoded)
    assert again == [frame], (frame, again)


def check(data: bytes) -> None:
    """One fuzz input: the control bytes, then the stream split into chunks."""
    reader = Reader(data)
    first = reader.byte()
    # Small limits reach the "length too big" paths; 0xFF picks the wire maximum.
    max_payload = MAX_PAYLOAD if first == 0xFF else MIN_MAX_FRAME + first * 4
    options = reader.byte()
    header_crc_ok = bool(options & 1)
    decoder = FrameDecoder(max_payload, header_crc_ok)
    decoder.bulk_ok = bool(options & 2)
    raw_due = 0  # raw bytes the last BULK frame announced and not yet handed out
    bound = max_payload + LINK_SLACK + FRAME_OVERHEAD
    fed = accepted = frames = 0
    now = 0.0
    while reader.left:
        control = reader.byte()
        chunk = make_chunk(reader, control & 0x3F or 64, max_payload)
        now += (control >> 6) * 0.75  # 0, 0.75, 1.5 or 2.25 s: past a stall deadline
        items = decoder.feed(chunk, now)
        fed += len(chunk)
        if control >> 6 == 3:
            items += decoder.expire(now + 30.0)
        for item in items:
            if isinstance(item, Frame) and item.type == RAW_TYPE:
                assert decoder.bulk_ok and 0 < len(item.payload) <= raw_due, (raw_due, item)
                raw_due -= len(item.payload)
                accepted += len(item.payload)
                continue
            assert not raw_due, raw_due  # no frame inside a BULK frame's raw bytes
            if isinstance(item, Frame):
                frames += 1
                if item.type == BULK_TYPE and decoder.bulk_ok:
                    raw_due = bulk_count(item.payload)
                limit = max_payload + (LINK_SLACK if item.type == LINK_DATA_TYPE else 0)
                assert len(item.payload) <= limit, (item.type, len(item.payload))
                accepted += FRAME_OVERHEAD + len(item.payload)
                roundtrip(item, max_payload, header_crc_ok)
            else:
                assert isinstance(item, Damage), item
                assert item.length <= max_payload + LINK_SLACK
        assert decoder.buffered < bound, (decoder.buffered, bound)
        assert decoder.raw_left == raw_due, (decoder.raw_left, raw_due)
        assert not (raw_due and decoder.buffered), decoder.buffered
        assert fed == decoder.discarded + accepted + decoder.buffered, (
            fed,
            decoder.discarded,
            accepted,
            decoder.buffered,
        )
        assert decoder.frames == frames


def main() -> None:
    run(check)


if __name__ == "__main__":
    main()
