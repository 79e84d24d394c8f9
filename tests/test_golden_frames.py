"""Golden frames: the exact bytes of one frame of every type (docs/protocol.rst).

Each frame is built three ways that must agree byte for byte:

* a literal hex string, pinned here (and pasted into the "Golden frames" section
  of docs/protocol.rst);
* an independent encoder written in this file straight from the spec's layout
  table (``struct``, ``binascii.crc_hqx(..., 0xFFFF)``, ``zlib.crc32``), sharing no
  code with virtproxy;
* ``virtproxy.frames.encode_frame``.

and decodes back to the same fields.  Sequence numbers are 0..10 in table order
(a session's first HELLO carries 0, link frames always do), so the seq and flags bytes are told
apart; the last row is
the HELLO with the ANSWER flag (0x01) that a side sends while its session is not up.

``PYTHONPATH=. python tests/test_golden_frames.py`` prints the table.
"""

from __future__ import annotations

import binascii
import struct
import zlib

import pytest
from sessionpair import RawPeer

from virtproxy.frames import Damage, Frame, FrameDecoder, FrameType, Reason, encode_frame
from virtproxy.session import Session, SessionConfig

SESSION_ID = 0x0102030405060708


def spec_frame(ftype: int, stream: int, payload: bytes, seq: int, flags: int = 0) -> bytes:
    """The frame layout of docs/protocol.rst, written out independently of virtproxy."""
    header = struct.pack(">2sBBBBIH", b"\xa5\x5c", 1, ftype, flags, seq, stream, len(payload))
    header += struct.pack(">H", binascii.crc_hqx(header, 0xFFFF))
    body = header + payload
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


# capabilities 0x02: EARLY_DATA, as a default Session offers it.
HELLO_PAYLOAD = struct.pack(">QQIIIII", SESSION_ID, 0, 16384, 262144, 1024, 0x02, 64 << 20)
PING_PAYLOAD = (1).to_bytes(8, "big")
LINK_EPOCH = (0x11223344).to_bytes(4, "big")

# name, type code, stream, payload, seq, flags, pinned hex
GOLDEN: list[tuple[str, int, int, bytes, int, int, str]] = [
    (
        "HELLO",
        0x01,
        0,
        HELLO_PAYLOAD,
        0,
        0,
        "a55c010100000000000000244cf8"
        "0102030405060708"
        "0000000000000000"
        "00004000"
        "00040000"
        "00000400"
        "00000002"
        "04000000"
        "6b473dfc",
    ),
    ("PING", 0x02, 0, PING_PAYLOAD, 1, 0, "a55c010200010000000000083c330000000000000001921e7e7a"),
    ("PONG", 0x03, 0, PING_PAYLOAD, 2, 0, "a55c010300020000000000080f920000000000000001667d0a32"),
    ("GOAWAY", 0x04, 0, bytes([Reason.SHUTDOWN]), 3, 0, "a55c0104000300000000000197710915574903"),
    ("OPEN", 0x10, 0x80000001, b"http", 4, 0, "a55c01100004800000010004f2916874747004833b27"),
    ("OPEN_OK", 0x11, 0x00000001, b"", 5, 0, "a55c011100050000000100003577674513a8"),
    (
        "OPEN_FAIL",
        0x12,
        0x00000001,
        bytes([Reason.NO_SERVICE]) + b"x",
        6,
        0,
        "a55c01120006000000010002e0f301784d226992",
    ),
    ("DATA", 0x13, 0x80000001, b"hello", 7, 0, "a55c01130007800000010005177668656c6c6f753c0946"),
    (
        "WINDOW",
        0x14,
        0x80000001,
        struct.pack(">I", 65536),
        8,
        0,
        "a55c011400088000000100043c1500010000cc3f36b0",
    ),
    ("EOF", 0x15, 0x80000001, b"", 9, 0, "a55c011500098000000100002fd303058bce"),
    (
        "RESET",
        0x16,
        0x80000001,
        bytes([Reason.ABORTED]),
        10,
        0,
        "a55c0116000a800000010001ca34083a05f475",
    ),
    # 5 raw bytes of stream 0x80000001 follow this frame (docs/protocol.rst, "Bulk data").
    (
        "BULK",
        0x17,
        0x80000001,
        struct.pack(">I", 5),
        11,
        0,
        "a55c0117000b800000010004c9d300000005322a3b6e",
    ),
    # Link reliability (docs/protocol.rst, "Link reliability"): seq is always 0.
    # Chunk 5 of epoch 0x11223344 carrying "hi"; an ACK of everything before
    # chunk 6, holding 7 and 9, with the NAK flag (chunk 6 arrived damaged).
    (
        "LINK_DATA",
        0x20,
        5,
        LINK_EPOCH + b"hi",
        0,
        0,
        "a55c01200000000000050006eff7112233446869ac8819e3",
    ),
    (
        "LINK_ACK+NAK",
        0x21,
        6,
        LINK_EPOCH + (5).to_bytes(8, "big"),
        0,
        0x01,
        "a55c0121010000000006000cbb1d112233440000000000000005cb883474",
    ),
    # A resend of chunk 5 split in parts (flag 0x04): bytes 1024.. of a 2048-byte
    # chunk; seq 1 says this is the chunk's second copy.
    (
        "LINK_DATA+PART",
        0x20,
        5,
        LINK_EPOCH + (1024).to_bytes(4, "big") + (2048).to_bytes(4, "big") + b"hi",
        1,
        0x04,
        "a55c0120040100000005000ed9f311223344000004000000080068690bdbdf98",
    ),
    # The same HELLO with the ANSWER flag (0x01): what a side sends while its session is not up.
    (
        "HELLO+ANSWER",
        0x01,
        0,
        HELLO_PAYLOAD,
        0,
        0x01,
        "a55c010101000000000000240b2b"
        "0102030405060708"
        "0000000000000000"
        "00004000"
        "00040000"
        "00000400"
        "00000002"
        "04000000"
        "75536236",
    ),
]

IDS = [row[0] for row in GOLDEN]
FIELDS = ("name", "ftype", "stream", "payload", "seq", "flags", "pinned")


def hexdump(data: bytes) -> str:
    return data.hex(" ", 2)


def test_checksum_algorithms_match_their_catalogue_check_values() -> None:
    # The spec names CRC-16/CCITT-FALSE and CRC-32/ISO-HDLC; these are their check values.
    assert binascii.crc_hqx(b"123456789", 0xFFFF) == 0x29B1
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_every_frame_type_has_a_golden_frame() -> None:
    assert {row[1] for row in GOLDEN} == {int(t) for t in FrameType}
    for name, code, *_ in GOLDEN:
        assert FrameType[name.split("+")[0]] == code


@pytest.mark.parametrize(FIELDS, GOLDEN, ids=IDS)
def test_golden_frame_bytes(
    name: str, ftype: int, stream: int, payload: bytes, seq: int, flags: int, pinned: str
) -> None:
    independent = spec_frame(ftype, stream, payload, seq, flags)
    encoded = encode_frame(ftype, stream, payload, seq, flags)
    assert independent.hex() == pinned, (
        f"{name}: spec layout gives {independent.hex()}\n  pinned is      {pinned}"
    )
    assert encoded == independent, (
        f"{name}: encode_frame gives\n  {hexdump(encoded)}\n"
        f"spec layout gives\n  {hexdump(independent)}"
    )
    assert len(encoded) == 18 + len(payload)


@pytest.mark.parametrize(FIELDS, GOLDEN, ids=IDS)
def test_golden_frame_decodes(
    name: str, ftype: int, stream: int, payload: bytes, seq: int, flags: int, pinned: str
) -> None:
    data = bytes.fromhex(pinned)
    decoder = FrameDecoder()
    assert decoder.feed(data) == [Frame(ftype, stream, payload, seq, flags)], hexdump(data)
    assert decoder.buffered == 0
    assert (decoder.frames, decoder.damaged, decoder.discarded, decoder.resyncs) == (1, 0, 0, 0)


@pytest.mark.parametrize(FIELDS, GOLDEN, ids=IDS)
def test_golden_frame_with_bad_crc_is_damage(
    name: str, ftype: int, stream: int, payload: bytes, seq: int, flags: int, pinned: str
) -> None:
    data = bytearray.fromhex(pinned)
    data[-1] ^= 0x01
    assert FrameDecoder().feed(bytes(data)) == [Damage(stream, seq, ftype)], hexdump(data)


def test_all_golden_frames_in_one_stream() -> None:
    data = b"".join(bytes.fromhex(row[-1]) for row in GOLDEN)
    frames = FrameDecoder().feed(data)
    assert frames == [
        Frame(ftype, stream, payload, seq, flags)
        for _, ftype, stream, payload, seq, flags, _ in GOLDEN
    ]


def test_session_emits_the_golden_hello() -> None:
    """At connect the session is not up, so its HELLO carries the ANSWER flag."""
    session = Session(SessionConfig())
    session.connection_made(0.0)
    session.session_id = SESSION_ID  # the id is random; pin it before the HELLO is encoded
    data = session.data_to_send()
    golden = bytes.fromhex(GOLDEN[-1][-1])
    assert data == golden, f"session HELLO\n  {hexdump(data)}\ngolden\n  {hexdump(golden)}"
    # The same frame without the flag is the golden HELLO.
    assert encode_frame(0x01, 0, data[14:-4], 0, 0) == bytes.fromhex(GOLDEN[0][-1])


def test_session_emits_frames_in_the_spec_layout() -> None:
    """OPEN, PONG, DATA, EOF and PING as a real Session encodes them."""
    session = Session(SessionConfig())
    peer = RawPeer(session_id=0x0A0B0C0D0E0F1011)
    after_hello = peer.handshake(session, now=0.0)
    # Not known before: the session answers our HELLO with its own: its second
    # HELLO of the session (seq 1; up: no flag).
    assert [f.type for f in after_hello] == [FrameType.HELLO]
    hello = after_hello[0]
    sid = session.session_id
    assert encode_frame(FrameType.HELLO, 0, hello.payload, hello.seq, hello.flags) == spec_frame(
        0x01,
        0,
        struct.pack(">QQIIIII", sid, peer.session_id, 16384, 262144, 1024, 0x02, 64 << 20),
        1,
        0,
    )

    stream = session.open_stream("http", 0.0)
    assert stream == 1
    data = session.data_to_send()
    assert data == spec_frame(0x10, 0x80000001, b"http", 0), hexdump(data)

    session.receive_data(peer.frame(FrameType.PING, 0, b"\x00" * 7 + b"\x2a"), 0.5)
    data = session.data_to_send()
    # PONG: the PING's 8 bytes, then the DATA bytes received since our HELLO (none).
    pong = b"\x00" * 7 + b"\x2a" + b"\x00" * 8
    assert data == spec_frame(0x03, 0, pong, 1), hexdump(data)

    session.receive_data(peer.frame(FrameType.OPEN_OK, 0x00000001), 0.5)
    session.send(stream, b"hello")
    session.send_eof(stream)
    data = session.data_to_send()
    expected = spec_frame(0x13, 0x80000001, b"hello", 2) + spec_frame(0x15, 0x80000001, b"", 3)
    assert data == expected, f"\n  {hexdump(data)}\n  {hexdump(expected)}"

    session.tick(0.5 + session.config.keepalive_interval)
    data = session.data_to_send()
    assert data == spec_frame(0x02, 0, PING_PAYLOAD, 4), hexdump(data)


def test_session_with_link_on_sends_its_hello_in_chunk_0() -> None:
    """With --link on, the session's frames travel inside LINK_DATA chunks."""
    session = Session(SessionConfig(link="on"))
    session.connection_made(0.0)
    session.session_id = SESSION_ID
    assert session.link is not None
    session.link.epoch = 0x11223344
    session.link._epoch_bytes = LINK_EPOCH
    data = session.data_to_send(now=0.0)
    hello = bytes.fromhex(GOLDEN[-1][-1])
    assert data == spec_frame(0x20, 0, LINK_EPOCH + hello, 0), hexdump(data)


if __name__ == "__main__":
    for name, ftype, stream, payload, seq, flags, _pinned in GOLDEN:
        frame = spec_frame(ftype, stream, payload, seq, flags)
        print(f"{name:<12} seq {seq:<2} flags {flags} {frame.hex()}")
