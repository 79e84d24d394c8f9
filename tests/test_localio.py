"""``read_now``, ``lose_write_now`` and ``lose_connection_now``: at once on an
idle socket transport, else Twisted's own path.

Real socket pairs wrapped in Twisted's tcp.Connection, on a MemoryReactor (so we
see whether the transport registered itself for writing).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.localio import connect_direct, lose_connection_now, lose_write_now, read_now


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.write_lost = 0
        self.lost: list[Failure] = []

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        self.write_lost += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


class Pair:
    def __init__(self) -> None:
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.far.setblocking(False)
        self.reactor = MemoryReactorClock()
        self.protocol = Recorder()
        self.transport = tcp.Connection(self.near, self.protocol, self.reactor)
        self.transport.connected = True
        self.transport.startReading()

    def writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def far_reads(self) -> bytes | None:
        """What the far end reads now (None: nothing yet, b"": end of file)."""
        try:
            return self.far.recv(1 << 20)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.near.close()
        self.far.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def test_read_now_takes_what_is_waiting(pair: Pair) -> None:
    assert read_now(pair.transport) == b""
    pair.far.sendall(b"GET /")
    assert read_now(pair.transport) == b"GET /"
    assert read_now(pair.transport) == b""


def test_read_now_leaves_end_of_file_to_the_reactor(pair: Pair) -> None:
    pair.far.shutdown(socket.SHUT_WR)
    assert read_now(pair.transport) == b""
    assert pair.near.recv(10) == b""  # still there for Twisted's doRead
    assert not pair.protocol.lost


def test_read_now_aborts_on_a_socket_error(pair: Pair) -> None:
    """recv consumed the error: the stream must fail, not end cleanly later."""
    pair.near.close()  # recv fails (EBADF), as on a reset connection
    assert read_now(pair.transport) == b""
    assert pair.transport._aborting
    pair.reactor.advance(0)
    [reason] = pair.protocol.lost
    assert "aborted" in reason.getErrorMessage().lower()


def test_read_now_on_other_transports_reads_nothing() -> None:
    assert read_now(StringTransport()) == b""


def test_lose_write_now_sends_eof_at_once(pair: Pair) -> None:
    lose_write_now(pair.transport)
    assert not pair.writing()
    assert pair.far_reads() == b""
    assert pair.protocol.write_lost == 1 and pair.transport._writeDisconnected
    # Reading goes on after the half-close.
    pair.far.sendall(b"reply")
    assert read_now(pair.transport) == b"reply"
    assert not pair.protocol.lost


def test_lose_write_now_waits_for_buffered_bytes(pair: Pair) -> None:
    pair.transport.write(b"queued")
    lose_write_now(pair.transport)
    assert pair.writing() and not pair.transport._writeDisconnected
    assert pair.far_reads() is None
    pair.transport.doWrite()
    assert pair.far_reads() == b"queued"
    assert pair.transport._writeDisconnected and pair.far_reads() == b""


def test_lose_connection_now_closes_at_once(pair: Pair) -> None:
    lose_connection_now(pair.transport)
    assert pair.far_reads() == b""
    [reason] = pair.protocol.lost
    assert reason.getErrorMessage().startswith("Connection was closed cleanly")
    assert pair.transport not in pair.reactor.getReaders()


def test_lose_connection_now_after_a_half_close(pair: Pair) -> None:
    lose_write_now(pair.transport)
    lose_connection_now(pair.transport)
    assert pair.far_reads() == b""
    assert len(pair.protocol.lost) == 1


def test_lose_connection_now_with_bytes_buffered_is_twisteds_close(pair: Pair) -> None:
    pair.transport.write(b"last words")
    lose_connection_now(pair.transport)
    assert pair.writing() and pair.transport.disconnecting
    assert not pair.protocol.lost
    assert pair.far_reads() is None


# --------------------------------------------------------------------------- connect_direct


class Made(Protocol):
    pass


def made_factory() -> Any:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(Made)


def test_connect_direct_connects_with_the_endpoints_settings_and_no_wrapper() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.endpoints import TCP4ClientEndpoint

    reactor = MemoryReactorClock()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 7, timeout=3, bindAddress=("127.0.0.1", 0))
    d = connect_direct(endpoint, made_factory())
    assert d is not None and not d.called
    [(host, port, factory, timeout, bind)] = reactor.tcpClients
    assert (host, port, timeout, bind) == ("127.0.0.1", 7, 3, ("127.0.0.1", 0))
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7))
    assert type(protocol) is Made  # the protocol itself, not a wrapper
    assert d.result is protocol


def test_connect_direct_fails_and_cancels_as_the_endpoint_does() -> None:
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError

    reactor = MemoryReactorClock()
    endpoint = UNIXClientEndpoint(reactor, "/nonexistent.sock", timeout=2)
    failed = connect_direct(endpoint, made_factory())
    assert failed is not None
    [(path, factory, timeout, _)] = reactor.unixClients
    assert (path, timeout) == ("/nonexistent.sock", 2)
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    errors: list[Failure] = []
    failed.addErrback(errors.append)
    assert errors[0].check(ConnectionRefusedError)

    cancelled = connect_direct(endpoint, made_factory())
    assert cancelled is not None
    cancelled.cancel()
    cancelled.addErrback(errors.append)
    assert errors[1].check(ConnectingCancelledError)
    assert reactor.connectors[1].stoppedConnecting


def test_connect_direct_leaves_other_endpoints_alone() -> None:
    from twisted.internet.endpoints import HostnameEndpoint

    reactor = MemoryReactorClock()
    assert connect_direct(HostnameEndpoint(reactor, b"localhost", 7), made_factory()) is None
    assert reactor.tcpClients == []
