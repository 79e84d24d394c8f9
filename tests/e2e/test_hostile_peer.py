"""A hostile peer against a real daemon: the limits hold, the daemon lives.

The test speaks frames by hand over a real TCP channel to a real daemon (the
guest's side is played by :class:`sessionpair.RawPeer`), and does what a
compromised guest might: opens past ``--max-streams``, asks for a service the
daemon does not serve and one with an over-long name, sends DATA the
stream's state forbids, and resets streams in a loop.  Each must be refused the way
docs/protocol.rst says, and the daemon must go on serving.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from vp_e2e import LOOPBACK, EchoServer, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # sessionpair

from sessionpair import RawPeer, hello_fields

from virtproxy.frames import OPENER_BIT, Frame, FrameType, Reason

pytestmark = pytest.mark.e2e


class Wire:
    """A RawPeer on a real socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)
        self.peer = RawPeer(session_id=0x4242424242424242)
        self.frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait(self, match, timeout: float = 10.0) -> Frame:
        """Read frames until one satisfies ``match``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.frames:
                if match(frame):
                    self.frames.remove(frame)
                    return frame
            left = deadline - time.monotonic()
            assert left > 0, f"no matching frame in {timeout} s; got {self.frames}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                data = None
            assert data is not None, f"no matching frame in {timeout} s; got {self.frames}"
            assert data, "the daemon closed the channel"
            self.frames += [f for f in self.peer.decoder.feed(data) if isinstance(f, Frame)]

    def handshake(self) -> None:
        hello = self.wait(lambda f: f.type == FrameType.HELLO)
        self.send(self.peer.hello(hello_fields(hello)[0]))
        self.wait(lambda f: f.type == FrameType.HELLO)  # the daemon's answer: up

    def open(self, number: int, service: bytes) -> None:
        self.send(self.peer.frame(FrameType.OPEN, OPENER_BIT | number, service))

    def answer_to(self, number: int) -> Frame:
        types = (FrameType.OPEN_OK, FrameType.OPEN_FAIL, FrameType.RESET)
        return self.wait(lambda f: f.stream == number and f.type in types)


def test_a_hostile_peer_meets_every_limit_and_the_daemon_keeps_serving(daemons, backends):
    echo = backends(EchoServer)
    channel = free_port()
    daemon = daemons(
        "host",
        "--channel",
        f"tcp-listen:{LOOPBACK}:{channel}",
        "-i",
        f"echo:{echo.addr}",
        "--max-streams",
        "2",
        "--max-name-length",
        "8",
        "--max-reset-rate",
        "5",
        "--window",
        "65536",
    )
    daemon.wait_for("listening")
    wire = Wire(channel)
    wire.handshake()

    # Two streams are allowed; the third gets OPEN_FAIL(LIMIT).
    wire.open(1, b"echo")
    wire.open(2, b"echo")
    wire.open(3, b"echo")
    assert wire.answer_to(1).type == FrameType.OPEN_OK
    assert wire.answer_to(2).type == FrameType.OPEN_OK
    refused = wire.answer_to(3)
    assert (refused.type, refused.payload[0]) == (FrameType.OPEN_FAIL, Reason.LIMIT)

    # Nothing in a frame picks a target: unknown and over-long names are refused.
    wire.send(wire.peer.frame(FrameType.RESET, OPENER_BIT | 2, bytes([Reason.ABORTED])))
    wire.open(4, b"ssh")
    no_service = wire.answer_to(4)
    assert (no_service.type, no_service.payload[0]) == (FrameType.OPEN_FAIL, Reason.NO_SERVICE)
    wire.open(5, b"echo-but-long")
    too_long = wire.answer_to(5)
    assert (too_long.type, too_long.payload[0]) == (FrameType.OPEN_FAIL, Reason.LIMIT)

    # A frame the stream's state forbids (DATA after EOF) resets it, PROTOCOL.
    # (DATA past the window is the same check; the unit tests pin it, since on
    # real sockets the grants race the burst.)
    eof = wire.peer.frame(FrameType.EOF, OPENER_BIT | 1)
    wire.send(eof + wire.peer.frame(FrameType.DATA, OPENER_BIT | 1, b"after EOF"))  # one write
    reset = wire.wait(lambda f: f.type == FrameType.RESET and f.stream == 1)
    assert reset.payload[0] == Reason.PROTOCOL

    # Opening and resetting in a loop ("rapid reset") ends the session.
    for number in range(6, 30):
        wire.open(number, b"echo")
        wire.send(wire.peer.frame(FrameType.RESET, OPENER_BIT | number, bytes([Reason.ABORTED])))
    daemon.wait_for("resets streams too fast")
    wire.sock.close()

    # The daemon lives, logged what was hit, and serves a well-behaved peer.
    daemon.wait_for("limit_hits=")
    assert daemon.alive()
    again = Wire(channel)
    again.handshake()
    again.open(1, b"echo")
    assert again.answer_to(1).type == FrameType.OPEN_OK
    again.send(again.peer.frame(FrameType.DATA, OPENER_BIT | 1, b"still here"))
    echoed = again.wait(lambda f: f.type == FrameType.DATA and f.stream == 1)
    assert echoed.payload == b"still here"
