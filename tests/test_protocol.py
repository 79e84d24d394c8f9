"""The Twisted adapters (Channel, VPChannelProtocol, the proxy protocols) over
in-memory transports and a MemoryReactorClock: no sockets, no real reactor.

Two Channels, A (has the oforward listener) and B (has the iforward 'echo'),
are joined by a :class:`Pipe` that moves the bytes each VPChannelProtocol
writes into the other one's ``dataReceived``.  Local sockets are
:class:`RecordingTransport` objects; B's iforward target is reached through a
:class:`FakeEndpoint` whose connect attempts the test completes or fails.
Like real Twisted transports, a RecordingTransport calls ``connectionLost``
asynchronously (on the clock, after ``loseConnection``/``abortConnection``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IHalfCloseableDescriptor, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy import events as ev
from virtproxy.channel import Channel, small_data_first
from virtproxy.factories import ProxyClientProtocol, ProxyServerFactory, ProxyServerProtocol
from virtproxy.frames import OPENER_BIT
from virtproxy.pacing import CHANNEL_READ_SIZE, LOCAL_READ_SIZE, SHARED_READ_SIZE
from virtproxy.protocol import VPChannelProtocol
from virtproxy.session import SessionConfig

WINDOW = 64 * 1024
HIGH_WATER = 96 * 1024


def make_config(**overrides: Any) -> SessionConfig:
    values: dict[str, Any] = {
        "max_frame": 4096,
        "window": WINDOW,
        "send_high_water": HIGH_WATER,
        "keepalive_interval": 5.0,
        "keepalive_timeout": 20.0,
        "open_timeout": 10.0,
    }
    values.update(overrides)
    return SessionConfig(**values)


# --------------------------------------------------------------------------- fakes


@implementer(IHalfCloseableDescriptor)
class RecordingTransport(StringTransport):
    """A StringTransport that records how it was closed and, like a real
    transport, tells its protocol ``connectionLost`` on the next clock turn."""

    def __init__(self, clock: MemoryReactorClock, port: int = 40000) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port), lenient=True)
        self.clock = clock
        self.protocol: Any = None
        self.write_closes = 0
        #: A full buffer: the pipe will not ask the pull producer for more.
        self.stalled = False
        self.closes = 0
        self.aborts = 0
        self.lost = False
        self._lost_scheduled = False
        self.pauses = 0
        #: Twisted reads this many bytes at a time (the daemon resizes it).
        self.bufferSize = 65536

    # IHalfCloseableDescriptor (notifications we never need to send)
    def writeConnectionLost(self, reason: Failure) -> None:  # pragma: no cover
        pass

    def readConnectionLost(self, reason: Failure) -> None:  # pragma: no cover
        pass

    def loseWriteConnection(self) -> None:
        self.write_closes += 1

    def loseConnection(self) -> None:
        self.closes += 1
        self.disconnecting = True
        self._schedule_lost(ConnectionDone("closed"))

    def abortConnection(self) -> None:
        self.aborts += 1
        self.disconnecting = True
        self.disconnected = True
        self._schedule_lost(ConnectionAborted("aborted"))

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()

    def _schedule_lost(self, exc: Exception) -> None:
        if self._lost_scheduled or self.protocol is None:
            return
        self._lost_scheduled = True

        def lost() -> None:
            self.lost = True
            self.connected = False
            self.protocol.connectionLost(Failure(exc))

        self.clock.callLater(0, lost)

    @property
    def clean(self) -> bool:
        """Closed with loseConnection and never aborted."""
        return self.closes > 0 and self.aborts == 0


def attach(protocol: Protocol, transport: RecordingTransport) -> RecordingTransport:
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


@dataclass
class Attempt:
    factory: Factory
    deferred: Deferred[Any] = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.deferred = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[Any]) -> None:
        self.cancelled = True
        deferred.errback(ConnectingCancelledError(IPv4Address("TCP", "127.0.0.1", 7)))

    def succeed(self, clock: MemoryReactorClock) -> tuple[ProxyClientProtocol, RecordingTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7))
        assert isinstance(protocol, ProxyClientProtocol)
        transport = attach(protocol, RecordingTransport(clock, port=7))
        self.deferred.callback(protocol)
        return protocol, transport

    def fail(self, exc: Exception) -> None:
        self.deferred.errback(exc)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An iforward target whose connects the test completes by hand."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, factory: Factory) -> Deferred[Any]:
        attempt = Attempt(factory)
        self.attempts.append(attempt)
        return attempt.deferred


class Pipe:
    """An in-memory channel between the VPChannelProtocols of two Channels."""

    def __init__(self, clock: MemoryReactorClock, a: Channel, b: Channel) -> None:
        self.clock = clock
        self.ta = RecordingTransport(clock, port=1001)
        self.tb = RecordingTransport(clock, port=1002)
        self.pa = VPChannelProtocol(a)
        self.pb = VPChannelProtocol(b)
        self.a_to_b = True  # False: A's bytes are lost (A fell silent)
        self.b_to_a = True

    def connect(self) -> Pipe:
        attach(self.pa, self.ta)
        attach(self.pb, self.tb)
        return self

    def _move(
        self, src: RecordingTransport, dst: RecordingTransport, proto: Protocol, on: bool
    ) -> bool:
        data = src.value()
        if not data or dst.producerState != "producing":
            return self._drained(src)
        src.clear()
        if on and not src.aborts and not dst.lost and not dst.aborts:
            proto.dataReceived(data)
        self._drained(src)
        return True

    @staticmethod
    def _drained(transport: RecordingTransport) -> bool:
        """As a real transport does: an empty buffer asks its pull producer for more."""
        producer = transport.producer
        if (
            producer is None
            or transport.streaming
            or transport.value()
            or not getattr(producer, "paused", False)
            or getattr(transport, "stalled", False)
        ):
            return False
        producer.resumeProducing()
        return True

    def pump(self) -> None:
        """Move bytes both ways and run due callLater(0)s until nothing moves.

        A side that closed or aborted its end is, one turn later, a lost
        connection for the other side too.
        """
        for _ in range(100_000):
            moved = self._move(self.ta, self.tb, self.pb, self.a_to_b)
            moved = self._move(self.tb, self.ta, self.pa, self.b_to_a) or moved
            for near, far in ((self.ta, self.tb), (self.tb, self.ta)):
                if near.lost and not far.lost:
                    far._schedule_lost(ConnectionLost("the other end closed"))
            due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]
            if due:
                self.clock.advance(0)
            if not moved and not due:
                return
        raise AssertionError("the pipe never went quiet")

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Let time pass in small steps, pumping in between."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step < end:
            self.clock.advance(step)
            self.pump()
        self.clock.advance(end - self.clock.seconds())
        self.pump()


class Logs:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def texts(self, level: LogLevel | None = None) -> list[str]:
        return [
            formatEvent(e) or ""
            for e in self.events
            if level is None or e.get("log_level") == level
        ]

    def find(self, *parts: str, level: LogLevel | None = None) -> list[str]:
        return [t for t in self.texts(level) if all(p in t for p in parts)]


@pytest.fixture
def logs() -> Iterator[Logs]:
    captured = Logs()
    globalLogPublisher.addObserver(captured)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured)


@dataclass
class World:
    clock: MemoryReactorClock
    a: Channel
    b: Channel
    endpoint: FakeEndpoint
    pipe: Pipe
    listener: ProxyServerFactory

    def accept(self, service: str | None = None, port: int = 50000) -> Local:
        """A client connected to A's oforward listener."""
        factory = self.listener if service is None else ProxyServerFactory(self.a, service)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = attach(protocol, RecordingTransport(self.clock, port=port))
        self.pipe.pump()
        return Local(protocol, transport)

    def open(self, port: int = 50000) -> tuple[Local, Local]:
        """A client on A, connected through to a target on B."""
        before = len(self.endpoint.attempts)
        local = self.accept(port=port)
        assert len(self.endpoint.attempts) == before + 1, "B never tried to connect"
        protocol, transport = self.endpoint.attempts[-1].succeed(self.clock)
        self.pipe.pump()
        return local, Local(protocol, transport)

    def reconnect(self) -> Pipe:
        self.pipe = Pipe(self.clock, self.a, self.b).connect()
        self.pipe.pump()
        return self.pipe


@dataclass
class Local:
    protocol: Any
    transport: RecordingTransport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()


def make_world(
    connect: bool = True, b_config: dict[str, Any] | None = None, **config: Any
) -> World:
    clock = MemoryReactorClock()
    endpoint = FakeEndpoint()
    a = Channel(clock, make_config(**config), label="A")
    b = Channel(clock, make_config(**{**config, **(b_config or {})}), {"echo": endpoint}, label="B")
    pipe = Pipe(clock, a, b)
    world = World(clock, a, b, endpoint, pipe, ProxyServerFactory(a, "echo"))
    if connect:
        pipe.connect()
        pipe.pump()
    return world


@pytest.fixture
def world() -> World:
    return make_world()


def blob(size: int) -> bytes:
    return os.urandom(size)


# --------------------------------------------------------------------------- handshake, data


def test_handshake_brings_the_session_up(logs: Logs) -> None:
    w = make_world(connect=False)
    w.pipe.connect()
    assert not w.a.session.is_up
    w.pipe.pump()
    assert w.a.session.is_up and w.b.session.is_up
    assert w.a.session.peer_session == w.b.session.session_id
    assert w.b.session.peer_session == w.a.session.session_id
    assert len(logs.find("A: session up with peer")) == 1
    assert len(logs.find("B: session up with peer")) == 1
    assert logs.find("A: channel connected (127.0.0.1:1001)")


def test_stream_opens_and_carries_bytes_both_ways_exactly(world: World, logs: Logs) -> None:
    local = world.accept()
    assert len(world.endpoint.attempts) == 1
    assert local.transport.value() == b""
    target = Local(*world.endpoint.attempts[0].succeed(world.clock))
    world.pipe.pump()
    assert logs.find("opened") == []  # one line per stream, when it ends

    up = blob(700_000)
    down = blob(500_000)
    for i in range(0, len(up), 50_000):
        local.send(up[i : i + 50_000])
        world.pipe.pump()
    for i in range(0, len(down), 33_333):
        target.send(down[i : i + 33_333])
        world.pipe.pump()
    assert target.received() == up
    assert local.received() == down
    assert local.protocol.bytes_in == len(up) and local.protocol.bytes_out == len(down)
    assert target.protocol.bytes_in == len(down) and target.protocol.bytes_out == len(up)
    assert not (local.transport.closes or local.transport.aborts)
    assert not (target.transport.closes or target.transport.aborts)


def test_data_sent_before_the_open_completes_is_kept(world: World) -> None:
    local = world.accept()
    local.send(b"early ")
    local.send(b"bytes")
    world.pipe.pump()
    local.protocol.readConnectionLost()  # and EOF, all before OPEN_OK
    world.pipe.pump()
    target = Local(*world.endpoint.attempts[0].succeed(world.clock))
    world.pipe.pump()
    assert target.received() == b"early bytes"
    assert target.transport.write_closes == 1
    target.send(b"answer")
    world.pipe.pump()
    assert local.received() == b"answer"


def test_early_data_waits_at_the_far_side_for_the_connect_and_goes_out_at_once(
    world: World,
) -> None:
    """Both sides offer EARLY_DATA: the client's bytes and EOF cross the channel
    behind the OPEN and wait at B while its connect is under way."""
    local = world.accept()
    local.send(b"GET / ")
    local.send(b"HTTP/1.0")
    local.protocol.readConnectionLost()
    world.pipe.pump()
    [stream] = world.b.session.streams.values()
    assert stream.bytes_received == 14 and stream.eof_received  # before any OPEN_OK
    attempt = world.endpoint.attempts[0]
    protocol = attempt.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7))
    transport = RecordingTransport(world.clock, port=7)
    attach(protocol, transport)  # connectionMade: delivered there and then
    assert transport.value() == b"GET / HTTP/1.0" and transport.write_closes == 1
    attempt.deferred.callback(protocol)
    world.pipe.pump()
    assert world.b._early == {}
    protocol.dataReceived(b"200")
    protocol.readConnectionLost()
    world.pipe.pump()
    assert local.received() == b"200"
    assert local.transport.clean and transport.clean


def test_an_eof_goes_at_the_end_of_the_reactor_turn_with_what_else_is_written(
    world: World,
) -> None:
    """A client that closes and connects again at once: one channel write
    carries the old stream's EOF and the new stream's OPEN."""
    from virtproxy.frames import FrameDecoder, FrameType

    local, target = world.open()
    local.protocol.readConnectionLost()
    assert world.pipe.ta.value() == b""  # not yet
    protocol = world.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50001))
    attach(protocol, RecordingTransport(world.clock, port=50001))
    frames = FrameDecoder(1 << 20).feed(world.pipe.ta.value())
    assert [f.type for f in frames] == [FrameType.OPEN, FrameType.EOF]
    world.pipe.pump()
    assert target.transport.write_closes == 1
    assert len(world.endpoint.attempts) == 2


def test_an_open_ok_waits_for_the_reply_or_its_timer() -> None:
    w = make_world(open_ok_delay=0.005)
    local = w.accept()
    local.send(b"ping")
    w.pipe.pump()
    target = Local(*w.endpoint.attempts[0].succeed(w.clock))
    w.pipe.pump()
    assert target.received() == b"ping"
    [stream] = w.a.session.streams.values()
    assert stream.state.name == "OPENING"  # the OPEN_OK waits
    target.send(b"pong")
    w.pipe.pump()
    assert local.received() == b"pong" and stream.state.name == "OPEN"
    # Without a reply, the channel's timer sends it.
    second = w.accept(port=50001)
    w.pipe.pump()
    Local(*w.endpoint.attempts[1].succeed(w.clock))
    w.pipe.pump()
    [opening] = [s for s in w.a.session.streams.values() if s.key == second.protocol.stream_id]
    assert opening.state.name == "OPENING"
    w.pipe.advance(0.01, step=0.002)
    assert opening.state.name == "OPEN"


def test_early_data_of_a_failed_connect_is_dropped_and_the_client_reset(
    world: World, logs: Logs
) -> None:
    local = world.accept()
    local.send(b"x" * 5000)
    local.protocol.readConnectionLost()
    world.pipe.pump()
    assert world.b._early
    world.endpoint.attempts[0].fail(ConnectionRefusedError("nobody home"))
    world.pipe.pump()
    assert local.transport.aborts == 1 and not local.transport.clean
    assert world.b._early == {} and world.b.session.streams == {}
    assert world.a.session.streams == {}
    assert world.a.session.stats.protocol_errors == world.b.session.stats.protocol_errors == 0


def test_half_close_then_reply_then_clean_close(world: World, logs: Logs) -> None:
    local, target = world.open()
    local.send(b"request")
    local.protocol.readConnectionLost()  # the client shut down its write side
    world.pipe.pump()
    assert target.received() == b"request"
    assert target.transport.write_closes == 1
    assert not (target.transport.closes or target.transport.aborts)
    assert not (local.transport.closes or local.transport.aborts)

    # The other direction still flows after the half-close.
    reply = blob(300_000)
    target.send(reply[:100_000])
    world.pipe.pump()
    target.send(reply[100_000:])
    world.pipe.pump()
    assert local.received() == reply
    assert local.transport.write_closes == 0

    target.protocol.readConnectionLost()  # the target is done too
    world.pipe.pump()
    assert local.transport.write_closes == 1
    assert local.transport.clean and target.transport.clean
    assert local.transport.lost and target.transport.lost
    assert logs.find(
        "A: stream 0x1 closed: service=echo peer=127.0.0.1:50000 (oforward) ",
        "s in=7 out=300000: closed cleanly",
    )
    assert logs.find(
        "B: stream", "closed: service=echo peer=127.0.0.1:7 (iforward) ", "in=300000 out=7"
    )
    assert len(logs.find("stream")) == 2
    assert logs.find("closed", level=LogLevel.warn) == []
    assert world.a.session.streams == {} and world.b.session.streams == {}


def test_half_close_from_the_target_side_first(world: World) -> None:
    local, target = world.open()
    target.send(b"banner")
    target.protocol.readConnectionLost()
    world.pipe.pump()
    assert local.received() == b"banner"
    assert local.transport.write_closes == 1 and not local.transport.closes
    local.send(b"late data")
    local.protocol.readConnectionLost()
    world.pipe.pump()
    assert target.received() == b"late data"
    assert target.transport.write_closes == 1
    assert local.transport.clean and target.transport.clean


def test_clean_close_forgets_the_local_sockets(world: World) -> None:
    local, target = world.open()
    local.protocol.readConnectionLost()
    target.protocol.readConnectionLost()
    world.pipe.pump()
    assert local.transport.clean and target.transport.clean
    assert local.transport.lost and target.transport.lost
    assert world.a._locals == {}
    assert world.b._locals == {}


def test_local_reset_aborts_the_far_side(world: World, logs: Logs) -> None:
    local, target = world.open()
    local.send(b"x")
    world.pipe.pump()
    local.protocol.connectionLost(Failure(ConnectionLost("client went away")))
    world.pipe.pump()
    assert target.transport.aborts == 1 and target.transport.closes == 0
    assert logs.find("B: stream", "reset (peer): aborted", level=LogLevel.warn)
    assert world.a._locals == {} and world.b._locals == {}


# --------------------------------------------------------------------------- failed opens


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (ConnectionRefusedError("nobody home"), "refused", "refused"),
        (TimeoutError("too slow"), "timeout", "timeout"),
    ],
)
def test_failed_target_connect_aborts_the_client(
    world: World, logs: Logs, exc: Exception, code: str, words: str
) -> None:
    local = world.accept()
    world.endpoint.attempts[0].fail(exc)
    world.pipe.pump()
    assert local.transport.aborts == 1 and local.transport.closes == 0
    assert local.transport.lost
    [line] = logs.find("B: stream", "iforward 'echo' failed", level=LogLevel.warn)
    assert words in line.lower()
    [line] = logs.find("A: stream 0x1 closed", f"open failed: {code}", level=LogLevel.warn)
    assert words in line.lower()
    assert world.a.session.streams == {} and world.b.session.streams == {}
    assert world.a._locals == {} and world.b._connecting == {}


def test_synchronously_failing_endpoint(logs: Logs) -> None:
    @implementer(IStreamClientEndpoint)
    class Refusing:
        def connect(self, factory: Factory) -> Deferred[Any]:
            return fail(ConnectionRefusedError("at once"))

    w = make_world()
    w.b.iforwards["echo"] = Refusing()
    local = w.accept()
    assert local.transport.aborts == 1
    assert logs.find("B: stream", "iforward 'echo' failed", "at once")
    assert w.b._connecting == {}


def test_synchronously_connecting_endpoint_leaves_nothing_behind() -> None:
    made: list[RecordingTransport] = []

    @implementer(IStreamClientEndpoint)
    class Immediate:
        def connect(self, factory: Factory) -> Deferred[Any]:
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7))
            made.append(attach(protocol, RecordingTransport(w.clock, port=7)))
            return succeed(protocol)

    w = make_world()
    w.b.iforwards["echo"] = Immediate()
    local = w.accept()
    local.send(b"hi")
    w.pipe.pump()
    assert made[0].value() == b"hi"
    local.protocol.readConnectionLost()
    made[0].protocol.readConnectionLost()
    w.pipe.pump()
    assert local.transport.clean and made[0].clean
    assert w.b._connecting == {}


def test_unknown_service_is_refused_and_named(world: World, logs: Logs) -> None:
    local = world.accept(service="nope")
    assert local.transport.aborts == 1 and local.transport.closes == 0
    assert world.endpoint.attempts == []
    assert logs.find("B: stream", "unknown service 'nope'", level=LogLevel.warn)
    assert logs.find(
        "A: stream 0x1 closed", "service=nope", "open failed: no service", level=LogLevel.warn
    )


def test_client_gone_while_target_connects_cancels_the_connect(world: World) -> None:
    local = world.accept()
    attempt = world.endpoint.attempts[0]
    local.protocol.connectionLost(Failure(ConnectionLost("impatient")))
    world.pipe.pump()
    assert attempt.cancelled
    assert world.b._connecting == {} and world.b.session.streams == {}


def test_open_timeout_while_target_connects(world: World, logs: Logs) -> None:
    local = world.accept()
    attempt = world.endpoint.attempts[0]
    world.pipe.advance(9.5)
    assert local.transport.aborts == 0
    world.pipe.advance(1.0)
    assert local.transport.aborts == 1
    assert logs.find("A: stream 0x1 closed", "timeout", "did not answer the open in time")
    assert attempt.cancelled, "B kept connecting for a stream A gave up"


def test_target_connecting_after_the_stream_ended_is_aborted(world: World) -> None:
    """An endpoint that ignores cancel and connects anyway gets aborted."""
    local = world.accept()
    attempt = world.endpoint.attempts[0]
    attempt.deferred = Deferred()  # this endpoint ignores cancel()
    world.b._connecting[max(world.b.session.streams)] = attempt.deferred
    local.protocol.connectionLost(Failure(ConnectionLost("gone")))
    world.pipe.pump()
    protocol, transport = attempt.succeed(world.clock)
    world.pipe.pump()
    assert transport.aborts == 1
    assert protocol.end_reason == "the stream ended while connecting"
    assert world.b._locals == {}


# --------------------------------------------------------------------------- channel down


def test_client_waits_for_the_channel_then_times_out(logs: Logs) -> None:
    w = make_world(connect=False, open_timeout=3.0)
    local = w.accept()
    assert w.a.session.streams  # pending
    w.pipe.advance(2.9)
    assert local.transport.aborts == 0
    w.pipe.advance(0.2)
    assert local.transport.aborts == 1 and local.transport.lost
    assert logs.find(
        "A: stream 0x1 closed", "open failed: timeout: no session with the peer in time"
    )
    assert w.a.session.streams == {} and w.a._locals == {}


def test_client_waiting_for_the_channel_proceeds_when_it_comes_up() -> None:
    w = make_world(connect=False, open_timeout=3.0)
    local = w.accept()
    local.send(b"queued while down")
    w.pipe.advance(2.0)
    w.pipe.connect()
    w.pipe.pump()
    protocol, transport = w.endpoint.attempts[0].succeed(w.clock)
    w.pipe.pump()
    w.pipe.advance(5.0)
    assert local.transport.aborts == 0
    assert transport.value() == b"queued while down"
    protocol.dataReceived(b"pong")
    w.pipe.pump()
    assert local.received() == b"pong"


def test_channel_lost_aborts_every_stream_and_a_new_channel_works(world: World, logs: Logs) -> None:
    pairs = [world.open(port=50000 + i) for i in range(3)]
    hanging = world.accept(port=50100)  # B still connecting its target
    hanging_attempt = world.endpoint.attempts[-1]
    old_ids = (world.a.session.session_id, world.b.session.session_id)

    world.pipe.pa.connectionLost(Failure(ConnectionLost("cable cut")))
    world.pipe.pb.connectionLost(Failure(ConnectionLost("cable cut")))
    world.pipe.pump()
    for local, target in pairs:
        assert local.transport.aborts == 1 and local.transport.closes == 0
        assert target.transport.aborts == 1 and target.transport.closes == 0
    assert hanging.transport.aborts == 1
    assert hanging_attempt.cancelled
    assert logs.find("A: channel lost:", "cable cut")
    assert logs.find("A: stream 0x1 closed", "reset (local): session lost", level=LogLevel.warn)
    assert world.a.protocol is None and world.b.protocol is None
    assert world.a._locals == {} and world.b._locals == {} and world.b._connecting == {}
    world.pipe.advance(30.0)  # spurious early wakeups are fine; a timer loop is not
    assert [c for c in world.clock.getDelayedCalls() if c.active()] == []

    world.reconnect()
    assert world.a.session.is_up and world.b.session.is_up
    assert world.a.session.session_id not in old_ids
    assert world.b.session.session_id not in old_ids
    local, target = world.open(port=50200)  # the same listener factory
    local.send(b"after")
    target.send(b"reconnect")
    world.pipe.pump()
    assert target.received() == b"after" and local.received() == b"reconnect"


def test_second_channel_connection_is_refused(world: World, logs: Logs) -> None:
    local, target = world.open()
    intruder = VPChannelProtocol(world.a)
    transport = attach(intruder, RecordingTransport(world.clock, port=6666))
    assert not intruder.attached
    assert transport.closes == 1 and transport.aborts == 0
    assert world.a.protocol is world.pipe.pa
    assert logs.find(
        "A: refusing a second channel connection from 127.0.0.1:6666", level=LogLevel.warn
    )
    intruder.dataReceived(world.pipe.ta.value() + b"garbage")
    world.pipe.pump()  # runs the intruder's connectionLost too
    assert world.a.protocol is world.pipe.pa and world.a.session.is_up
    local.send(b"still")
    target.send(b"fine")
    world.pipe.pump()
    assert target.received() == b"still" and local.received() == b"fine"


# --------------------------------------------------------------------------- backpressure


def test_paused_channel_transport_gets_no_writes_and_local_reads_pause(world: World) -> None:
    local, target = world.open()
    world.pipe.ta.stalled = True  # A's channel transport buffer is full
    world.pipe.pa.pauseProducing()
    world.pipe.ta.clear()
    data = blob(HIGH_WATER + 40_000)
    local.send(data[: HIGH_WATER - 1])
    world.pipe.pump()
    assert world.pipe.ta.value() == b"", "wrote to a paused channel transport"
    assert local.transport.producerState == "producing"
    local.send(data[HIGH_WATER - 1 :])  # the stream's queue passes send_high_water
    assert local.transport.producerState == "paused"
    assert world.pipe.ta.value() == b""

    world.pipe.ta.stalled = False
    world.pipe.pa.resumeProducing()
    world.pipe.pump()
    assert target.received() == data
    assert local.transport.producerState == "producing"


def test_channel_transport_pausing_during_write_stops_the_flush(world: World) -> None:
    """A real transport calls pauseProducing from inside write() when its buffer fills."""
    local, _ = world.open()
    writes: list[int] = []
    ta = world.pipe.ta
    original = ta.write

    def write(data: bytes) -> None:
        writes.append(len(data))
        original(data)
        world.pipe.pa.pauseProducing()

    ta.write = write  # type: ignore[method-assign]
    for _ in range(4):
        local.send(blob(40_000))
    assert len(writes) == 1, writes
    world.pipe.pa.resumeProducing()
    world.pipe.pump()  # the peer's PONG reopens the in-flight budget
    assert len(writes) >= 2


def test_local_reads_go_on_when_the_pump_drains_the_queue_at_once() -> None:
    """A send past the high-water mark whose pump already drained the queue
    (a kernel that takes every write at once) must not pause the local socket:
    its StreamWritable was dispatched inside that very pump."""
    w = make_world(window=8 * HIGH_WATER)
    local, target = w.open()
    w.a.session.flight_cap = None
    pa = w.pipe.pa
    original = pa.wrote

    def wrote(data: bytes) -> None:
        original(data)
        pa.paused = False  # the kernel took it all: no drain to wait for

    pa.wrote = wrote  # type: ignore[method-assign]
    data = blob(HIGH_WATER + 1)
    local.send(data)
    assert local.transport.producerState == "producing"
    w.pipe.pump()
    assert target.received() == data


def test_slow_target_withholds_credit_only_for_its_stream(world: World) -> None:
    slow_local, slow_target = world.open(port=50001)
    fast_local, fast_target = world.open(port=50002)
    slow_target.protocol.pauseProducing()  # its socket buffer is full
    slow_data = blob(3 * WINDOW + 1234)
    fast_data = blob(5 * WINDOW)
    slow_local.send(slow_data)
    world.pipe.pump()
    for i in range(0, len(fast_data), 10_000):
        fast_local.send(fast_data[i : i + 10_000])
        world.pipe.pump()
    # The slow stream got exactly its window, no WINDOW credit came back ...
    assert slow_target.received() == slow_data[:WINDOW]
    slow_a = world.a.session.streams[slow_local.protocol.stream_id]
    assert slow_a.send_credit == 0 and slow_a.queued == len(slow_data) - WINDOW
    # ... while the other stream flowed completely.
    assert fast_target.received() == fast_data
    world.pipe.pump()
    assert slow_target.received() == slow_data[:WINDOW]

    slow_target.protocol.resumeProducing()  # the socket drained
    world.pipe.pump()
    assert slow_target.received() == slow_data


def test_target_pausing_inside_write_withholds_that_write(world: World) -> None:
    """pauseProducing from inside transport.write(): the written bytes are not credited."""
    local, target = world.open()
    transport = target.transport
    original = transport.write

    def write(data: bytes) -> None:
        original(data)
        if len(transport.value()) >= WINDOW // 2:
            target.protocol.pauseProducing()

    transport.write = write  # type: ignore[method-assign]
    data = blob(4 * WINDOW)
    local.send(data)
    world.pipe.pump()
    got = len(target.received())
    # Credit came back only for what was written before the pause: at most
    # WINDOW // 2 granted on top of the initial window.
    assert WINDOW <= got <= WINDOW + WINDOW // 2
    world.pipe.advance(30.0)
    assert len(target.received()) == got
    transport.write = original  # type: ignore[method-assign]
    target.protocol.resumeProducing()
    world.pipe.pump()
    assert target.received() == data


# --------------------------------------------------------------------------- keepalive, shutdown


def test_silent_peer_is_dropped_after_keepalive_timeout(logs: Logs) -> None:
    w = make_world(keepalive_interval=1.0, keepalive_timeout=3.0)
    local, target = w.open()
    w.pipe.advance(10.0)  # both talk: nothing times out
    assert w.b.session.is_up and w.pipe.tb.aborts == 0
    w.pipe.a_to_b = False  # A falls silent
    w.pipe.advance(2.5)
    assert w.pipe.tb.aborts == 0 and target.transport.aborts == 0
    w.pipe.advance(1.0)
    assert w.pipe.tb.aborts == 1, "B kept a silent channel"
    assert target.transport.aborts == 1
    assert logs.find("B: session ended with peer", "keepalive timeout")
    assert w.b.session.stats.keepalive_timeouts == 1
    assert w.b.protocol is None  # connectionLost followed the abort
    assert w.a.protocol is None  # and A saw its channel go
    assert local.transport.aborts == 1


def test_silent_peer_on_an_in_band_channel_is_not_dropped(logs: Logs) -> None:
    w = make_world(keepalive_interval=1.0, keepalive_timeout=3.0)
    w.b.drop_on_silence = False
    _, target = w.open()
    w.pipe.a_to_b = False
    w.pipe.advance(3.5)
    assert logs.find("B: session ended with peer", "keepalive timeout")
    assert target.transport.aborts == 1
    assert w.pipe.tb.aborts == 0 and w.pipe.tb.closes == 0
    w.pipe.a_to_b = True  # the peer speaks again: a new session comes up
    w.pipe.advance(2.0)
    assert w.a.session.is_up and w.b.session.is_up
    w.open(port=50001)


def test_shutdown_sends_goaway_and_closes(world: World, logs: Logs) -> None:
    local, target = world.open()
    hanging = world.accept(port=50001)
    world.a.shutdown()
    assert local.transport.aborts == 1 and hanging.transport.aborts == 1
    assert world.pipe.ta.closes == 1 and world.pipe.ta.aborts == 0
    world.pipe.pump()
    assert target.transport.aborts == 1, "the peer's target was not reset"
    assert world.endpoint.attempts[-1].cancelled
    assert logs.find("B: session ended with peer", "the peer went away (shutdown)")
    assert not world.b.session.is_up
    assert world.a.protocol is None
    # No timers are left behind and a new channel connection is not taken.
    world.clock.advance(100)
    assert [c for c in world.clock.getDelayedCalls() if c.active()] == []
    late = VPChannelProtocol(world.a)
    transport = attach(late, RecordingTransport(world.clock))
    assert not late.attached and transport.closes == 1


def test_shutdown_of_a_busy_channel_still_tells_the_peer(world: World, logs: Logs) -> None:
    """A GOAWAY goes behind what a paused channel transport holds, not nowhere."""
    world.open()
    world.pipe.ta.stalled = True  # A's channel transport buffer is full
    world.pipe.pa.pauseProducing()
    world.a.shutdown()
    world.pipe.ta.stalled = False
    world.pipe.pump()
    assert logs.find("B: session ended with peer", "the peer went away (shutdown)")


def test_shutdown_cancels_iforward_connects(world: World) -> None:
    world.accept()
    attempt = world.endpoint.attempts[0]
    world.b.shutdown()
    assert attempt.cancelled
    assert world.b._connecting == {}
    world.pipe.pump()
    assert not world.a.session.is_up


def test_local_server_protocol_is_the_stream_producer(world: World) -> None:
    local, target = world.open()
    assert local.transport.producer is local.protocol and local.transport.streaming
    assert target.transport.producer is target.protocol
    assert world.pipe.ta.producer is world.pipe.pa
    assert isinstance(local.protocol, ProxyServerProtocol)
    assert target.protocol.stream_id & OPENER_BIT


def test_opens_wait_for_a_free_slot_at_the_peer(logs: Logs) -> None:
    w = make_world(open_timeout=5.0, b_config={"max_streams": 1})
    first, first_target = w.open(port=50001)
    second = w.accept(port=50002)
    assert len(w.endpoint.attempts) == 1  # not sent: the peer has one slot
    w.pipe.advance(2.0)
    first.protocol.readConnectionLost()
    first_target.protocol.readConnectionLost()
    w.pipe.pump()
    assert first.transport.clean
    assert len(w.endpoint.attempts) == 2  # the slot freed: the second OPEN went out
    _, transport = w.endpoint.attempts[1].succeed(w.clock)
    w.pipe.pump()
    second.send(b"second")
    w.pipe.pump()
    assert transport.value() == b"second"
    third = w.accept(port=50003)
    w.pipe.advance(5.5)
    assert third.transport.aborts == 1
    assert logs.find("A: stream 0x3 closed", "the peer had no free stream slot in time")
    assert second.transport.aborts == 0


def test_shutdown_while_the_channel_is_down_fails_waiting_clients(logs: Logs) -> None:
    w = make_world(connect=False)
    local = w.accept()
    w.a.shutdown()
    w.pipe.pump()
    assert local.transport.aborts == 1 and local.transport.lost
    assert logs.find("A: stream 0x1 closed", "open failed: shutdown")
    assert w.a.session.streams == {} and w.a._timer is None


def test_control_backlog_stops_reading_the_channel(logs: Logs) -> None:
    """A peer that sends without reading our answers: we stop reading it."""
    w = make_world(b_config={"max_streams": 10_000})
    w.pipe.tb.stalled = True  # B cannot write: its answers pile up
    w.pipe.pb.pauseProducing()
    locals_ = [w.accept(service="nope", port=10_000 + i) for i in range(4200)]
    assert w.pipe.tb.producerState == "paused", "B kept reading a peer that does not read"
    backlog = len(w.b.session._control)
    assert backlog > 4096
    w.pipe.pump()
    assert len(w.b.session._control) == backlog  # nothing more was read
    w.pipe.tb.stalled = False
    w.pipe.pb.resumeProducing()
    w.pipe.pump()
    assert w.pipe.tb.producerState == "producing"
    assert all(local.transport.aborts == 1 for local in locals_)
    assert w.a.session.streams == {} and w.b.session.streams == {}
    assert w.a.session.is_up and w.b.session.is_up


def test_listen_side_takes_a_new_peer_once_the_dead_one_times_out(logs: Logs) -> None:
    """The peer reconnects while our old channel connection is dead but not closed:
    refused at first (one peer at a time), accepted after the keepalive timeout."""
    w = make_world(keepalive_interval=1.0, keepalive_timeout=3.0)
    local, _ = w.open()
    old = w.pipe
    old.a_to_b = old.b_to_a = False  # the link died without a FIN or RST
    old.pb.connectionLost(Failure(ConnectionLost("peer rebooted")))
    retry = Pipe(w.clock, w.a, w.b).connect()
    retry.pump()
    assert not retry.pa.attached and retry.ta.closes == 1
    assert logs.find("A: refusing a second channel connection")
    old.advance(3.5)
    assert old.ta.aborts == 1 and w.a.protocol is None
    assert local.transport.aborts == 1
    w.reconnect()
    assert w.a.session.is_up and w.b.session.is_up
    w.open(port=50001)


# --------------------------------------------------------------------------- read sizes


def test_bulk_reads_shrink_while_a_keystroke_stream_is_active(world: World) -> None:
    bulk, bulk_target = world.open(port=50000)
    keys, keys_target = world.open(port=50001)
    bulk.send(blob(100_000))
    world.pipe.pump()
    assert bulk.transport.bufferSize == LOCAL_READ_SIZE
    keys.send(b"k")
    bulk.send(blob(100_000))
    world.pipe.pump()
    assert bulk.transport.bufferSize == LOCAL_READ_SIZE  # one small read: a header?
    keys.send(b"k")
    bulk.send(blob(100_000))
    world.pipe.pump()
    assert bulk.transport.bufferSize == SHARED_READ_SIZE
    world.clock.advance(1.5)
    bulk.send(blob(100_000))
    world.pipe.pump()
    assert bulk.transport.bufferSize == LOCAL_READ_SIZE
    assert len(bulk_target.received()) == 400_000
    assert keys_target.received() == b"kk"


def test_the_channel_reads_small_until_the_reply_to_a_keystroke(world: World) -> None:
    keys, keys_target = world.open()
    assert world.pipe.tb.bufferSize == CHANNEL_READ_SIZE
    keys.send(b"k")
    world.pipe.pump()
    assert keys_target.received() == b"k"
    assert world.pipe.tb.bufferSize == SHARED_READ_SIZE  # B waits for the reply
    keys_target.send(b"K")
    world.pipe.pump()
    assert keys.received() == b"K"
    assert world.pipe.tb.bufferSize == CHANNEL_READ_SIZE  # it came
    # No reply: large reads again a moment later.
    keys.send(b"k")
    world.pipe.pump()
    assert world.pipe.tb.bufferSize == SHARED_READ_SIZE
    world.clock.advance(0.01)
    keys.send(blob(2000))
    world.pipe.pump()
    assert world.pipe.tb.bufferSize == CHANNEL_READ_SIZE


def test_small_payloads_are_delivered_before_the_bulk_decoded_with_them() -> None:
    bulk1, bulk2, key, later = b"b" * 16384, b"c" * 16384, b"k", b"d" * 16384
    events: list[ev.Event] = [
        ev.DataReceived(1, bulk1),
        ev.DataReceived(1, bulk2),
        ev.DataReceived(3, key),
        ev.DataReceived(1, b"x"),  # not stream 1's first payload: stays
        ev.DataReceived(5, later),
        ev.DataReceived(7, b"y"),
        ev.EndOfData(9),
        ev.DataReceived(9, b"z"),  # after another kind of event: stays
    ]
    assert small_data_first(events) == [
        events[2],
        events[5],
        events[0],
        events[1],
        events[3],
        events[4],
        events[6],
        events[7],
    ]
    in_order = [ev.DataReceived(3, key), ev.DataReceived(1, bulk1)]
    assert small_data_first(in_order) is in_order


# --------------------------------------------------------------------------- timer


def test_the_timer_stays_put_while_traffic_moves_the_deadline_later(world: World) -> None:
    """Every frame received moves the keepalive deadline a little later; the
    timer set for the earlier one is kept (it fires early and is set again),
    not cancelled and made anew on every pump."""
    local, target = world.open()
    world.pipe.advance(2.0)  # past the handshake's timers: the keepalive's is next
    timer = world.a._timer
    assert timer is not None and timer.active()
    made = len(world.clock.getDelayedCalls())
    for _ in range(20):
        world.clock.advance(0.0002)
        local.send(b"x")
        world.pipe.pump()
        target.send(b"y")
        world.pipe.pump()
    assert world.a._timer is timer and timer.active()
    assert len(world.clock.getDelayedCalls()) == made
    assert local.received() == b"y" * 20 and target.received() == b"x" * 20
    deadline = world.a.session.next_deadline()
    assert deadline is not None and timer.getTime() < deadline  # it fires early, as said


def test_changed_counters_are_logged_by_the_timer(logs: Logs) -> None:
    w = make_world(keepalive_interval=1.0, keepalive_timeout=3.0)
    w.open()
    w.a.session.stats.limit_hits += 1
    w.pipe.advance(59.0)
    assert not logs.find("A: counters:")
    w.pipe.advance(2.0)
    assert logs.find("A: counters: limit_hits=1")
