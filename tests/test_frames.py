"""Unit and property tests of the frame codec (virtproxy.frames)."""

from __future__ import annotations

import struct
from binascii import crc_hqx

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from virtproxy.frames import (
    FRAME_OVERHEAD,
    MAX_PAYLOAD,
    SYNC,
    Damage,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    reason_name,
)

#: Small enough to keep examples fast, large enough to span many reads.
SMALL_MAX = 600


def frame_strategy(max_payload: int = SMALL_MAX) -> st.SearchStrategy[Frame]:
    return st.builds(
        Frame,
        type=st.one_of(st.sampled_from([int(t) for t in FrameType]), st.integers(0, 255)),
        stream=st.one_of(
            st.sampled_from([0, 1, 0x80000001, 0x7FFFFFFF, 0xFFFFFFFF]),
            st.integers(0, 2**32 - 1),
        ),
        payload=st.binary(max_size=max_payload),
        seq=st.integers(0, 255),
        # Bit 0x02 on DATA (FLAG_HEADER_CRC) is only accepted where agreed: tested apart.
        flags=st.integers(0, 255).map(lambda f: f & ~0x02),
    )


def frames_strategy(
    max_payload: int = SMALL_MAX, max_size: int = 12
) -> st.SearchStrategy[list[Frame]]:
    return st.lists(frame_strategy(max_payload), max_size=max_size)


def encode(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.stream, frame.payload, frame.seq, frame.flags)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[Frame | Damage]:
    """Feed ``data`` in chunks of the given sizes (cycled), checking the buffer bound."""
    out: list[Frame | Damage] = []
    pos = 0
    index = 0
    while pos < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        index += 1
        chunk = data[pos : pos + size]
        pos += len(chunk)
        out.extend(decoder.feed(chunk))
        assert decoder.buffered <= decoder.max_payload + FRAME_OVERHEAD + len(chunk)
        assert decoder.buffered < decoder.max_payload + FRAME_OVERHEAD
    return out


def valid_header_at(data: bytes, pos: int, max_payload: int) -> bool:
    """Whether a (possibly false) sync marker at ``pos`` starts a header the decoder accepts."""
    header = data[pos : pos + 14]
    if len(header) < 14 or header[:2] != SYNC:
        return False
    (hcheck,) = struct.unpack_from(">H", header, 12)
    (length,) = struct.unpack_from(">H", header, 10)
    return crc_hqx(header[:12], 0xFFFF) == hcheck and header[2] == 1 and length <= max_payload


chunk_sizes = st.lists(st.integers(1, 2 * SMALL_MAX), min_size=1, max_size=8)


# ----------------------------------------------------------------------------- round trip


@settings(max_examples=300)
@given(frames=frames_strategy(), sizes=chunk_sizes)
def test_frames_round_trip_in_random_chunks(frames: list[Frame], sizes: list[int]) -> None:
    data = b"".join(encode(f) for f in frames)
    assert len(data) == sum(FRAME_OVERHEAD + len(f.payload) for f in frames)
    decoder = FrameDecoder(SMALL_MAX, header_crc_ok=True)
    assert feed_in_chunks(decoder, data, sizes) == frames
    assert decoder.buffered == 0
    assert (decoder.frames, decoder.damaged, decoder.discarded, decoder.resyncs) == (
        len(frames),
        0,
        0,
        0,
    )


@settings(max_examples=400)
@given(
    pieces=st.lists(
        st.one_of(
            frame_strategy().map(lambda f: ("frame", encode(f))),
            st.binary(max_size=40).map(lambda b: ("junk", b)),
            st.tuples(frame_strategy(), st.integers(0, 10_000)).map(
                lambda fc: ("flip", encode(fc[0]), fc[1])
            ),
        ),
        max_size=10,
    ),
    sizes=chunk_sizes,
)
def test_any_split_of_any_stream_decodes_as_one_feed(pieces: list, sizes: list[int]) -> None:
    """Frames, junk and damaged frames: how the bytes are cut into reads changes nothing."""
    parts = []
    for piece in pieces:
        if piece[0] == "flip":
            raw = bytearray(piece[1])
            raw[piece[2] % len(raw)] ^= 0x10
            parts.append(bytes(raw))
        else:
            parts.append(piece[1])
    data = b"".join(parts)
    whole = FrameDecoder(SMALL_MAX, header_crc_ok=True)
    expected = whole.feed(data)
    split = FrameDecoder(SMALL_MAX, header_crc_ok=True)
    assert feed_in_chunks(split, data, sizes) == expected
    assert (split.frames, split.damaged) == (whole.frames, whole.damaged)
    # A tail shorter than a header waits for more bytes whichever way it came.
    assert split.discarded + split.buffered == whole.discarded + whole.buffered


def test_max_size_payload_round_trips_byte_by_byte_boundaries() -> None:
    payload = bytes(range(256)) * 255 + bytes(range(255))
    assert len(payload) == MAX_PAYLOAD
    frame = Frame(FrameType.DATA, 0x80000001, payload, 200, 0)
    data = encode(frame) + encode_frame(FrameType.EOF, 0x80000001, b"", 201)
    decoder = FrameDecoder()
    out = feed_in_chunks(decoder, data, [1, 4095, 7, 65536])
    assert out == [frame, Frame(FrameType.EOF, 0x80000001, b"", 201, 0)]


def test_frame_fed_one_byte_at_a_time() -> None:
    data = encode_frame(FrameType.DATA, 7, b"abc", 3) * 3
    decoder = FrameDecoder()
    out: list[Frame | Damage] = []
    for index in range(len(data)):
        out.extend(decoder.feed(data[index : index + 1]))
        # A frame is returned exactly when its last byte arrives.
        assert len(out) == (index + 1) // 21
    assert out == [Frame(FrameType.DATA, 7, b"abc", 3, 0)] * 3


def test_encode_frame_rejects_oversized_payload() -> None:
    encode_frame(FrameType.DATA, 1, bytes(MAX_PAYLOAD))
    with pytest.raises(ValueError):
        encode_frame(FrameType.DATA, 1, bytes(MAX_PAYLOAD + 1))


# ----------------------------------------------------------------------------- arbitrary input


@settings(max_examples=300)
@given(
    data=st.binary(max_size=4000), sizes=chunk_sizes, max_payload=st.sampled_from([256, SMALL_MAX])
)
@example(data=b"\xa5" * 50, sizes=[1], max_payload=256)
@example(data=(b"\xa5\x5c" + bytes(30)) * 20, sizes=[3], max_payload=256)
def test_arbitrary_bytes_never_raise_and_stay_bounded(
    data: bytes, sizes: list[int], max_payload: int
) -> None:
    decoder = FrameDecoder(max_payload)
    out = feed_in_chunks(decoder, data, sizes)
    assert all(isinstance(item, Frame | Damage) for item in out)
    frames = [item for item in out if isinstance(item, Frame)]
    assert all(len(f.payload) <= max_payload for f in frames)
    # Every byte fed is accounted for: in an accepted frame, discarded, or still buffered.
    accepted = sum(FRAME_OVERHEAD + len(f.payload) for f in frames)
    assert accepted + decoder.discarded + decoder.buffered == len(data)
    assert decoder.frames == len(frames)
    assert decoder.damaged == len(out) - len(frames)


@settings(max_examples=200)
@given(
    frames=frames_strategy(max_size=8),
    garbage=st.lists(st.binary(max_size=80), min_size=9, max_size=9),
    sizes=chunk_sizes,
)
@example(
    frames=[Frame(FrameType.PING, 0, b"12345678", 0, 0)] * 2,
    garbage=[b"\xa5", b"\xa5\x5c", b"\xa5\x5c\x01", b"", b"", b"", b"", b"", b""],
    sizes=[1],
)
def test_garbage_between_frames_is_skipped_and_counted(
    frames: list[Frame], garbage: list[bytes], sizes: list[int]
) -> None:
    # garbage[i] goes before frames[i]; the last piece is trailing garbage.
    pieces: list[bytes] = []
    regions: list[tuple[int, int]] = []
    pos = 0
    for index, frame in enumerate(frames):
        pieces.append(garbage[index])
        regions.append((pos, pos + len(garbage[index])))
        pos += len(garbage[index])
        encoded = encode(frame)
        pieces.append(encoded)
        pos += len(encoded)
    data = b"".join(pieces)
    # Rule out the 1-in-65536 false header a random garbage byte string might contain.
    assume(
        not any(
            valid_header_at(data, p, SMALL_MAX) for start, end in regions for p in range(start, end)
        )
    )
    decoder = FrameDecoder(SMALL_MAX)
    out = feed_in_chunks(decoder, data, sizes)
    assert out == frames
    assert decoder.buffered == 0
    assert decoder.discarded == sum(end - start for start, end in regions)
    assert decoder.resyncs == sum(1 for start, end in regions if end > start)
    assert decoder.damaged == 0


@given(frames=st.lists(frame_strategy(), min_size=1, max_size=4), cut=st.integers(1, 200))
def test_truncated_frame_then_good_frames_recovered(frames: list[Frame], cut: int) -> None:
    """Half a frame (a guest rebooted mid-write) hides nothing that follows it."""
    half = encode_frame(FrameType.DATA, 5, bytes(range(200)), 9)[:cut]
    good = b"".join(encode(f) for f in frames)
    decoder = FrameDecoder(SMALL_MAX)
    # Padding lets the decoder finish waiting for the truncated frame's declared length.
    out = decoder.feed(half + good + bytes(SMALL_MAX + FRAME_OVERHEAD))
    assert [item for item in out if isinstance(item, Frame)] == frames
    # If the header survived the cut, the truncated frame is reported as damage of stream 5.
    assert [item for item in out if isinstance(item, Damage)] == (
        [Damage(5, 9, FrameType.DATA)] if cut >= 14 else []
    )


@pytest.mark.parametrize("junk", [b"", b"\x00", b"\xa5", b"\xa5\xa5", b"x\xa5\x5c", b"\x5c\xa5"])
def test_sync_marker_split_across_feeds(junk: bytes) -> None:
    frame = encode_frame(FrameType.DATA, 0x80000002, b"payload", 17)
    data = junk + frame
    for split in range(len(data) + 1):
        decoder = FrameDecoder()
        out = decoder.feed(data[:split]) + decoder.feed(data[split:])
        assert out == [Frame(FrameType.DATA, 0x80000002, b"payload", 17, 0)], (split, data.hex())
        assert decoder.discarded == len(junk)


def test_garbage_ending_in_first_sync_byte_keeps_only_that_byte() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(bytes(19) + b"\xa5") == []
    assert (decoder.buffered, decoder.discarded) == (1, 19)
    assert decoder.feed(b"\x01" * 20) == []
    assert (decoder.buffered, decoder.discarded) == (0, 40)
    frame = encode_frame(FrameType.EOF, 9, b"", 0)
    assert decoder.feed(bytes(30) + frame[:1]) == []
    assert decoder.buffered == 1
    assert decoder.feed(frame[1:]) == [Frame(FrameType.EOF, 9, b"", 0, 0)]
    assert (decoder.discarded, decoder.resyncs) == (70, 1)  # one loss of sync


# ----------------------------------------------------------------------------- damage


@settings(max_examples=300)
@given(
    frame=frame_strategy(),
    data=st.data(),
)
def test_single_bit_flip_is_never_accepted(frame: Frame, data: st.DataObject) -> None:
    encoded = bytearray(encode(frame))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1), label="bit")
    encoded[bit // 8] ^= 1 << (bit % 8)
    sentinel = Frame(FrameType.PING, 0, b"sentinel", 1, 0)
    decoder = FrameDecoder(SMALL_MAX)
    out = decoder.feed(bytes(encoded) + encode(sentinel))
    assert [item for item in out if isinstance(item, Frame)] == [sentinel], (
        f"flipped bit {bit} of {bytes(encoded).hex()} was accepted: {out}"
    )
    damage = [item for item in out if isinstance(item, Damage)]
    if bit // 8 >= 14:
        # Header intact, payload or CRC hit: reported with the header's stream and seq.
        assert damage == [Damage(frame.stream, frame.seq, frame.type)]
    else:
        # Header hit: a CRC-16 catches every single-bit error, the frame is just skipped.
        assert damage == []
        assert decoder.resyncs == 1


@given(excess=st.integers(1, 300), max_payload=st.sampled_from([256, 1000]))
def test_payload_longer_than_max_payload_is_rejected(excess: int, max_payload: int) -> None:
    big = encode_frame(FrameType.DATA, 3, bytes(max_payload + excess), 0)
    ok = encode_frame(FrameType.DATA, 3, bytes(max_payload), 1)
    decoder = FrameDecoder(max_payload)
    out = decoder.feed(big + ok)
    # The oversized frame is skipped by its header alone (no wait for its payload).
    assert out == [Frame(FrameType.DATA, 3, bytes(max_payload), 1, 0)]
    assert decoder.damaged == 0
    assert decoder.discarded == len(big)
    assert decoder.resyncs == 1


def test_oversized_header_is_rejected_before_its_payload_arrives() -> None:
    decoder = FrameDecoder(256)
    big = encode_frame(FrameType.DATA, 3, bytes(257), 0)
    assert decoder.feed(big[:14]) == []
    # The decoder does not wait for 257 bytes that a false or hostile header promises.
    assert decoder.buffered < 14
    assert decoder.resyncs == 1


@pytest.mark.parametrize("byte", [2, 3])
def test_wrong_version_is_skipped(byte: int) -> None:
    frame = bytearray(encode_frame(FrameType.PING, 0, bytes(8), 0))
    frame[2] = byte  # version byte: re-make the header check so only the version is wrong
    frame[12:14] = struct.pack(">H", crc_hqx(bytes(frame[:12]), 0xFFFF))
    decoder = FrameDecoder()
    assert decoder.feed(bytes(frame)) == []
    assert decoder.resyncs == 1


def test_reset_forgets_buffered_bytes() -> None:
    frame = encode_frame(FrameType.DATA, 1, b"xyz", 0)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:10]) == []
    decoder.reset()
    assert decoder.buffered == 0
    assert decoder.feed(frame) == [Frame(FrameType.DATA, 1, b"xyz", 0, 0)]


def test_reason_name() -> None:
    assert reason_name(1) == "no service"
    assert reason_name(6) == "session lost"
    assert reason_name(200) == "reason 200"


def test_truncated_frame_is_given_up_after_its_stall_deadline() -> None:
    """A peer that died mid-frame must not hold back the frames that follow."""
    from virtproxy.frames import FrameDecoder, FrameType, encode_frame

    decoder = FrameDecoder()
    cut = encode_frame(FrameType.DATA, 0x80000001, b"x" * 4000)[:1000]
    good = encode_frame(FrameType.PING, 0, b"12345678")
    assert decoder.feed(cut, now=10.0) == []
    # Fresh frames keep arriving but sit inside the truncated frame's "payload".
    assert decoder.feed(good, now=11.0) == []
    deadline = decoder.stall_deadline()
    assert deadline is not None and 11.0 < deadline < 13.0
    assert decoder.expire(deadline - 0.1) == []
    frames = decoder.expire(deadline)
    assert [f.payload for f in frames] == [b"12345678"]
    assert decoder.stall_deadline() is None
    assert decoder.discarded == len(cut)


def test_a_frame_arriving_slowly_but_steadily_is_not_expired() -> None:
    from virtproxy.frames import FrameDecoder, FrameType, encode_frame

    decoder = FrameDecoder()
    frame = encode_frame(FrameType.DATA, 0x80000001, b"y" * 512)
    for index in range(0, len(frame) - 10, 10):  # 10 bytes per 8 ms: a 9600-baud line
        assert decoder.feed(frame[index : index + 10], now=index * 0.0008) == []
        assert decoder.expire(index * 0.0008) == []
    frames = decoder.feed(frame[index + 10 :], now=0.5)
    assert len(frames) == 1 and frames[0].payload == b"y" * 512


def test_header_crc_data_is_accepted_only_where_agreed() -> None:
    """FLAG_HEADER_CRC skips the payload check; a decoder that did not offer it
    (a serial or virtio channel) treats such a frame as damaged."""
    from virtproxy.frames import FLAG_HEADER_CRC, Damage, Frame, FrameDecoder, FrameType

    light = encode_frame(FrameType.DATA, 0x80000001, b"payload", seq=3, flags=FLAG_HEADER_CRC)
    trusting = FrameDecoder(header_crc_ok=True).feed(light)
    assert trusting == [Frame(FrameType.DATA, 0x80000001, b"payload", 3, FLAG_HEADER_CRC)]
    assert isinstance(FrameDecoder().feed(light)[0], Damage)
    # The header stays protected: a flipped header byte is still caught.
    flipped = bytearray(light)
    flipped[9] ^= 0x01
    assert not any(
        isinstance(item, Frame) for item in FrameDecoder(header_crc_ok=True).feed(bytes(flipped))
    )


def test_data_payloads_are_views_of_the_read_and_split_frames_still_exact() -> None:
    """Whole DATA frames in one read come out as views of it (no copy); a
    frame split across reads is assembled, and the frames after it in the
    same read are views again."""
    payloads = [bytes([n]) * (1000 + n) for n in range(4)]
    wire = b"".join(encode_frame(FrameType.DATA, 5, p, n) for n, p in enumerate(payloads))
    wire += encode_frame(FrameType.EOF, 5, b"", 4)
    cut = len(wire) // 3  # inside the second frame
    decoder = FrameDecoder()
    first = decoder.feed(wire[:cut])
    rest = decoder.feed(wire[cut:])
    frames = first + rest
    assert [f.payload for f in frames] == [*payloads, b""]
    assert isinstance(first[0].payload, memoryview)
    assert isinstance(rest[0].payload, bytes)  # the split one: assembled in our buffer
    assert all(isinstance(f.payload, memoryview) for f in rest[1:-1])
    assert isinstance(rest[-1].payload, bytes)  # not DATA: always bytes
    assert decoder.buffered == 0
