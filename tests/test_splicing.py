"""The splice adapters of BULK frames, over real kernel sockets.

:class:`~virtproxy.splicing.SplicePipe` on socket pairs and loopback TCP;
``VPChannelProtocol.write_bulk`` (a frame's rest waits in the pipe, never
copied, until the socket drains) and its ``doRead`` shadow; and the proxy
protocol's side of a BULK turn (its reading stops until the turn came, and
only then).  Transports are Twisted's ``tcp.Connection`` on a real socket
pair, run by a MemoryReactorClock (tests/transportpair.py).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from transportpair import TransportPair
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from virtproxy import splicing
from virtproxy.factories import ProxyProtocol
from virtproxy.pacing import BULK_LEAD_READ, LOCAL_READ_SIZE
from virtproxy.protocol import VPChannelProtocol
from virtproxy.splicing import SplicePipe

pytestmark = pytest.mark.skipif(not splicing.available(), reason="no splice(2) here")


@pytest.fixture
def pipe() -> Iterator[SplicePipe]:
    p = SplicePipe()
    try:
        yield p
    finally:
        p.close()


def socket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    client.setblocking(False)
    accepted.setblocking(False)
    return client, accepted


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


# --------------------------------------------------------------------- SplicePipe


def test_pipe_moves_bytes_between_sockets_exactly(pipe: SplicePipe) -> None:
    src_w, src = socket_pair()
    dst, dst_r = socket_pair()
    data = os.urandom(100_000)
    src_w.sendall(data)
    moved = 0
    while moved < len(data):
        count = pipe.fill(src.fileno(), len(data) - moved)
        assert count > 0 and pipe.error is None
        assert pipe.drain_to(dst.fileno(), count) == count
        moved += count
        assert read_all(dst_r) == data[moved - count : moved]
    assert pipe.fill(src.fileno(), 1000) == 0  # nothing waiting: 0, no error
    assert pipe.error is None


def test_pipe_keeps_what_a_full_socket_did_not_take(pipe: SplicePipe) -> None:
    src_w, src = socket_pair()
    dst, dst_r = socket_pair()
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(min(pipe.capacity, 512 * 1024))
    src_w.sendall(data[:200_000])
    count = pipe.fill(src.fileno(), len(data))
    assert count > 0
    taken = pipe.drain_to(dst.fileno(), count)
    assert 0 < taken < count and pipe.error is None  # full: the rest stays in the pipe
    assert pipe.take(count - taken) == data[taken:count]
    assert read_all(dst_r) == data[:taken]


def test_pipe_reports_a_reset_it_met(pipe: SplicePipe) -> None:
    near, far = tcp_pair()
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()  # a reset
    for _ in range(100):
        if pipe.fill(near.fileno(), 1000) == 0 and pipe.error is not None:
            break
    assert isinstance(pipe.error, ConnectionResetError)
    near.close()


def test_pipe_reports_a_write_to_a_closed_peer(pipe: SplicePipe) -> None:
    src_w, src = socket_pair()
    dst, dst_r = socket_pair()
    dst_r.close()
    src_w.sendall(b"x" * 1000)
    count = pipe.fill(src.fileno(), 1000)
    assert pipe.drain_to(dst.fileno(), count) == 0
    assert isinstance(pipe.error, BrokenPipeError)


def test_pipe_is_at_least_as_large_as_linux_default(pipe: SplicePipe) -> None:
    assert pipe.capacity >= splicing.PIPE_MIN


class ListLog:
    """A Logger stand-in that keeps what was said."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warn(self, fmt: str, **kw: object) -> None:
        self.lines.append(("warn", fmt.format(**kw)))

    def info(self, fmt: str, **kw: object) -> None:
        self.lines.append(("info", fmt.format(**kw)))


def test_open_pipe_out_of_descriptors_gives_none_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pipe(flags: int = 0) -> tuple[int, int]:
        raise OSError(24, os.strerror(24))

    monkeypatch.setattr(splicing, "_logged", set())
    monkeypatch.setattr(splicing.os, "pipe2", no_pipe)
    log = ListLog()
    assert splicing.open_pipe(log) is None  # type: ignore[arg-type]
    assert splicing.open_pipe(log) is None  # type: ignore[arg-type]
    assert log.lines == [
        (
            "warn",
            "no pipe for BULK frames (Too many open files); their bytes go through "
            "Python meanwhile (logged once)",
        )
    ]


class NoResize:
    """``fcntl`` as for a user past the pipe quota: F_SETPIPE_SZ is refused."""

    def fcntl(self, fd: int, op: int, arg: int = 0) -> int:
        if op == splicing.F_SETPIPE_SZ:
            raise PermissionError(1, "Operation not permitted")
        import fcntl

        return fcntl.fcntl(fd, op, arg)


def test_open_pipe_says_once_when_the_kernel_gives_a_smaller_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splicing, "_logged", set())
    monkeypatch.setattr(splicing, "fcntl", NoResize())
    log = ListLog()
    pipes = [splicing.open_pipe(log) for _ in range(2)]  # type: ignore[arg-type]
    try:
        assert all(p is not None and p.capacity < splicing.PIPE_SIZE for p in pipes)
        [(level, line)] = log.lines
        assert level == "info" and line.startswith("BULK frames carry at most 64 KiB")
    finally:
        for p in pipes:
            if p is not None:
                p.close()


# --------------------------------------------------------------------- channel side


class StubChannel:
    """What VPChannelProtocol needs of a Channel."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pumps = 0
        self.bulk: Any = None
        self.received: list[bytes] = []

    def pump(self) -> None:
        self.pumps += 1

    def receive(self, data: bytes) -> None:
        self.received.append(data)


def fill_send_pipe(protocol: VPChannelProtocol, body: bytes) -> int:
    """Queue ``body`` on a socket and splice what the pipe takes of it into
    the protocol's send pipe, as a BULK turn does; return how much."""
    src_w, src = socket_pair()
    src_w.setblocking(True)
    src_w.sendall(body)
    pipe = protocol.send_pipe()
    assert pipe is not None
    count = pipe.fill(src.fileno(), len(body))
    src_w.close()
    src.close()
    return count


@pytest.fixture
def channel_pair() -> Iterator[tuple[VPChannelProtocol, TransportPair]]:
    channel = StubChannel()
    protocol = VPChannelProtocol(channel)  # type: ignore[arg-type]
    pair = TransportPair(protocol)
    protocol.transport = pair.transport
    protocol.attached = True
    protocol.paused = False
    pair.transport.registerProducer(protocol, False)
    try:
        yield protocol, pair
    finally:
        pair.close()


def test_write_bulk_writes_header_lead_and_spliced_bytes_in_order(
    channel_pair: tuple[VPChannelProtocol, TransportPair],
) -> None:
    protocol, pair = channel_pair
    body = os.urandom(50_000)
    count = fill_send_pipe(protocol, body)
    assert count == len(body)
    protocol.write_bulk(b"HEADER", b"lead", count)
    assert not protocol.paused and not pair.writing()
    assert pair.drain() == b"HEADER" + b"lead" + body


def test_a_frames_rest_waits_in_the_pipe_until_the_socket_drains(
    channel_pair: tuple[VPChannelProtocol, TransportPair],
) -> None:
    """Not copied into Twisted's buffer: the socket's writability resumes us."""
    protocol, pair = channel_pair
    pair.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = os.urandom(150_000)
    count = fill_send_pipe(protocol, body)
    assert count == len(body)
    protocol.write_bulk(b"H", b"L", count)
    assert protocol.paused  # the rest waits: no other frame may go meanwhile
    assert pair.writing()  # Twisted tells us when the socket takes more
    assert pair.transport.dataBuffer == b"" and not pair.transport._tempDataLen
    got = bytearray()
    pumps = protocol.channel.pumps  # type: ignore[attr-defined]
    while protocol.paused:
        got += read_all(pair.far)
        if pair.writing():
            pair.transport.doWrite()  # as the reactor would: resumeProducing
    got += read_all(pair.far)
    assert bytes(got) == b"H" + b"L" + body
    assert protocol.channel.pumps > pumps  # type: ignore[attr-defined]


def test_flush_pipe_hands_the_rest_to_twisted_whole(
    channel_pair: tuple[VPChannelProtocol, TransportPair],
) -> None:
    protocol, pair = channel_pair
    pair.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = os.urandom(150_000)
    count = fill_send_pipe(protocol, body)
    protocol.write_bulk(b"H", b"", count)
    assert protocol.paused
    protocol.flush_pipe()  # before a close: the frame goes out whole
    pair.transport.write(b"GOAWAY")
    assert pair.drain() == b"H" + body[:count] + b"GOAWAY"


def test_splice_reads_shadows_do_read_and_falls_back_to_twisteds(
    channel_pair: tuple[VPChannelProtocol, TransportPair],
) -> None:
    protocol, pair = channel_pair
    channel = protocol.channel

    class NothingToSplice:
        calls = 0

        def splice_in(self, _protocol: object) -> int:
            self.calls += 1
            return 0

    channel.bulk = NothingToSplice()  # type: ignore[attr-defined]
    protocol.splice_reads(True)
    assert vars(pair.transport)["doRead"] == protocol._splice_read
    pair.far.sendall(b"frames")
    pair.transport.doRead()  # the reactor's call: nothing spliced, so Twisted reads
    assert channel.bulk.calls == 1  # type: ignore[attr-defined]
    assert channel.received == [b"frames"]  # type: ignore[attr-defined]
    assert "doRead" not in vars(pair.transport)  # Twisted's own doRead again
    protocol.splice_reads(False)  # idempotent
    assert "doRead" not in vars(pair.transport)


# --------------------------------------------------------------------- stream side


class TurnChannel:
    """A Channel stub whose ``send_bulk`` plays the turn as a test says."""

    def __init__(self, turn: str) -> None:
        self.reactor = MemoryReactorClock()
        self.turn = turn
        self.local: ProxyProtocol | None = None
        self.sent: list[bytes] = []
        self.label = "test"

    def send_bulk(self, stream_id: int, lead: bytes) -> bool:
        assert self.local is not None
        if self.turn == "none":
            return False
        if self.turn == "now":
            self.local.bulk_sent(4096)
        elif self.turn == "data-went":
            self.local.resume_reading()  # the lead went as DATA at once
        return True  # "later" (the turn is queued) or "held" (lead held as DATA)

    def send(self, stream_id: int, data: bytes) -> bool:
        self.sent.append(data)
        return True

    def read_size(self, stream_id: int, count: int, previous: int) -> int:
        return LOCAL_READ_SIZE


def stream_end(turn: str) -> tuple[ProxyProtocol, TransportPair, TurnChannel]:
    channel = TurnChannel(turn)
    local = ProxyProtocol(channel, "svc")  # type: ignore[arg-type]
    channel.local = local
    pair = TransportPair(local)
    local.transport = pair.transport
    pair.transport.bufferSize = BULK_LEAD_READ
    local._sized = local._live = True
    local.stream_id = 1
    return local, pair, channel


def reading(pair: TransportPair) -> bool:
    return pair.transport in pair.reactor.getReaders()


@pytest.mark.parametrize("turn", ["now", "data-went"])
def test_a_turn_that_comes_at_once_leaves_reading_on(turn: str) -> None:
    local, pair, _ = stream_end(turn)
    try:
        local.dataReceived(b"x" * BULK_LEAD_READ)
        assert reading(pair)
        assert pair.transport.bufferSize == BULK_LEAD_READ
    finally:
        pair.close()


@pytest.mark.parametrize("turn", ["later", "held"])
def test_reading_stops_until_the_turn_or_the_held_lead_went(turn: str) -> None:
    """A stream whose lead waits must not read on: that grew a queue without bound."""
    local, pair, _ = stream_end(turn)
    try:
        local.dataReceived(b"x" * BULK_LEAD_READ)
        assert not reading(pair)
        if turn == "later":
            local.bulk_sent(1 << 20)
            assert local.bytes_in == BULK_LEAD_READ + (1 << 20)
        else:
            local.resume_reading()  # the session's StreamWritable: the lead went
        assert reading(pair)
    finally:
        pair.close()


def test_a_stream_that_cannot_send_bulk_sends_its_read_as_data() -> None:
    local, pair, channel = stream_end("none")
    try:
        local.dataReceived(b"y" * BULK_LEAD_READ)
        assert channel.sent == [b"y" * BULK_LEAD_READ]
        assert reading(pair)
        assert pair.transport.bufferSize == LOCAL_READ_SIZE
    finally:
        pair.close()


def test_a_short_read_never_asks_for_a_turn() -> None:
    local, pair, channel = stream_end("later")
    try:
        local.dataReceived(b"z" * 10)  # not a full read: a keystroke, a request
        assert channel.sent == [b"z" * 10]
        assert reading(pair)
    finally:
        pair.close()


def test_splice_target_only_while_nothing_is_buffered_or_withheld() -> None:
    local, pair, _ = stream_end("none")
    try:
        assert local.splice_target() == pair.near.fileno()
        local.pauseProducing()  # Twisted: our write buffer is full
        assert local.splice_target() == -1
        local.resumeProducing()
        pair.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pair.transport.write(b"q" * 100_000)  # Twisted holds some
        assert local.splice_target() == -1
    finally:
        pair.close()


def test_a_failed_splice_aborts_the_socket() -> None:
    local, pair, _ = stream_end("none")
    try:
        local.spliced(0, b"", BrokenPipeError(32, "Broken pipe"))
        assert pair.transport._aborting
        assert local.end_reason == "local connection lost: Broken pipe"
    finally:
        pair.close()


def test_spliced_bytes_are_counted_and_a_rest_is_delivered() -> None:
    local, pair, _ = stream_end("none")
    consumed: list[int] = []
    local.channel.consumed = lambda stream_id, count: consumed.append(count)  # type: ignore[method-assign]
    try:
        local.spliced(1000, b"rest", None)
        assert local.bytes_out == 1004
        assert consumed == [1000, 4]
        assert read_all(pair.far) == b"rest"
    finally:
        pair.close()


def test_plain_protocol_is_unaffected() -> None:
    """A TransportPair sanity check: Twisted reads into dataReceived."""
    got: list[bytes] = []

    class P(Protocol):
        def dataReceived(self, data: bytes) -> None:
            got.append(data)

    pair = TransportPair(P())
    try:
        pair.far.sendall(b"abc")
        pair.transport.doRead()
        assert got == [b"abc"]
    finally:
        pair.close()
