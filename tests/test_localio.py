"""``read_now``, ``lose_write_now`` and ``lose_connection_now``: at once on an
idle socket transport, else Twisted's own path.

Real socket pairs wrapped in Twisted's tcp.Connection (tests/transportpair.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from transportpair import TransportPair
from twisted.internet import task, tcp
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


@pytest.fixture
def pair() -> Iterator[TransportPair]:
    p = TransportPair(Recorder())
    try:
        yield p
    finally:
        p.close()


def test_read_now_takes_what_is_waiting(pair: TransportPair) -> None:
    assert read_now(pair.transport) == b""
    pair.far.sendall(b"GET /")
    assert read_now(pair.transport) == b"GET /"
    assert read_now(pair.transport) == b""


def test_read_now_leaves_end_of_file_to_the_reactor(pair: TransportPair) -> None:
    pair.far.shutdown(socket.SHUT_WR)
    assert read_now(pair.transport) == b""
    assert pair.near.recv(10) == b""  # still there for Twisted's doRead
    assert not pair.protocol.lost


def test_read_now_aborts_on_a_socket_error(pair: TransportPair) -> None:
    """recv consumed the error: the stream must fail, not end cleanly later."""
    pair.near.close()  # recv fails (EBADF), as on a reset connection
    assert read_now(pair.transport) == b""
    assert pair.transport._aborting
    pair.reactor.advance(0)
    [reason] = pair.protocol.lost
    assert "aborted" in reason.getErrorMessage().lower()


def test_read_now_on_other_transports_reads_nothing() -> None:
    assert read_now(StringTransport()) == b""


def test_lose_write_now_sends_eof_at_once(pair: TransportPair) -> None:
    lose_write_now(pair.transport)
    assert not pair.writing()
    assert pair.far_reads() == b""
    assert pair.protocol.write_lost == 1 and pair.transport._writeDisconnected
    # Reading goes on after the half-close.
    pair.far.sendall(b"reply")
    assert read_now(pair.transport) == b"reply"
    assert not pair.protocol.lost


def test_lose_write_now_waits_for_buffered_bytes(pair: TransportPair) -> None:
    pair.transport.write(b"queued")
    lose_write_now(pair.transport)
    assert pair.writing() and not pair.transport._writeDisconnected
    assert pair.far_reads() is None
    pair.transport.doWrite()
    assert pair.far_reads() == b"queued"
    assert pair.transport._writeDisconnected and pair.far_reads() == b""


def test_lose_connection_now_closes_at_once(pair: TransportPair) -> None:
    lose_connection_now(pair.transport)
    assert pair.far_reads() == b""
    [reason] = pair.protocol.lost
    assert reason.getErrorMessage().startswith("Connection was closed cleanly")
    assert pair.transport not in pair.reactor.getReaders()


def test_lose_connection_now_after_a_half_close(pair: TransportPair) -> None:
    lose_write_now(pair.transport)
    lose_connection_now(pair.transport)
    assert pair.far_reads() == b""
    assert len(pair.protocol.lost) == 1


def test_lose_connection_now_with_bytes_buffered_is_twisteds_close(pair: TransportPair) -> None:
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


# --------------------------------------------------------------------------- connect_now
# A socket of our own, on the real reactor: connected (or failed) before the
# call returns when the kernel already knows, else waiting for writability.


class Echo(Protocol):
    def __init__(self) -> None:
        self.made = False
        self.data = b""
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


def echo_factory() -> Any:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(Echo)


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def outcome(d: Any) -> Any:
    """A fired Deferred's result (a Failure for an error), consumed."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_connect_now_connects_at_once_on_loopback_and_carries_bytes() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from virtproxy.localio import connect_now

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        endpoint = TCP4ClientEndpoint(real_reactor(), "127.0.0.1", port, timeout=5)
        d = connect_now(endpoint, echo_factory())
        assert d is not None
        protocol = outcome(d)
        assert type(protocol) is Echo and protocol.made  # connectionMade ran already
        transport = protocol.transport
        try:
            assert isinstance(transport, tcp.Connection)
            assert transport.getPeer() == IPv4Address("TCP", "127.0.0.1", port)
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(5)
                transport.socket.sendall(b"hello")
                assert peer.recv(5) == b"hello"
                peer.sendall(b"back")
                assert read_now(transport) == b"back"
        finally:
            transport.abortConnection()


def test_connect_now_ipv6_and_unix_targets(tmp_path: Any) -> None:
    from twisted.internet.address import IPv6Address, UNIXAddress
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint

    from virtproxy.localio import connect_now

    path = str(tmp_path / "target.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(4)
        d = connect_now(UNIXClientEndpoint(real_reactor(), path), echo_factory())
        assert d is not None
        protocol = outcome(d)
        assert protocol.made and protocol.transport.getPeer() == UNIXAddress(path)
        protocol.transport.abortConnection()

    try:
        listener6 = socket.socket(socket.AF_INET6)
        listener6.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener6:
        listener6.listen(4)
        port = listener6.getsockname()[1]
        d = connect_now(TCP4ClientEndpoint(real_reactor(), "::1", port), echo_factory())
        assert d is not None
        protocol = outcome(d)
        assert protocol.made
        assert protocol.transport.getPeer() == IPv6Address("TCP", "::1", port, 0, 0)
        protocol.transport.abortConnection()


def test_connect_now_fails_as_twisteds_client_does(tmp_path: Any) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
    from twisted.internet.error import ConnectError, ConnectionRefusedError

    from virtproxy.localio import connect_now

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        d = connect_now(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", port), echo_factory())
        assert d is not None
        failure = outcome(d)
        assert isinstance(failure, Failure) and failure.check(ConnectionRefusedError)

    d = connect_now(UNIXClientEndpoint(real_reactor(), str(tmp_path / "none")), echo_factory())
    assert d is not None
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(ConnectError)
    assert "No such file" in failure.getErrorMessage()


def test_connect_now_leaves_names_bind_addresses_and_fake_reactors_to_twisted() -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint

    from virtproxy.localio import connect_now

    reactor = real_reactor()
    assert connect_now(TCP4ClientEndpoint(reactor, "localhost", 7), echo_factory()) is None
    bound = TCP4ClientEndpoint(reactor, "127.0.0.1", 7, bindAddress=("127.0.0.1", 0))
    assert connect_now(bound, echo_factory()) is None
    assert connect_now(UNIXClientEndpoint(reactor, "/x", checkPID=True), echo_factory()) is None
    fake = MemoryReactorClock()
    assert connect_now(TCP4ClientEndpoint(fake, "127.0.0.1", 7), echo_factory()) is None


@pytest.fixture
def full_listener() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A TCP listener whose backlog is full: a new connect stays under way."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    target = listener.getsockname()
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(target)
        fillers.append(filler)
    yield listener, fillers
    for filler in fillers:
        filler.close()
    listener.close()


def start_waiting(listener: socket.socket, timeout: float) -> tuple[Any, Any]:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from virtproxy.localio import connect_now

    reactor = real_reactor()
    port = listener.getsockname()[1]
    before = set(reactor.getWriters())
    d = connect_now(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout), echo_factory())
    assert d is not None
    if d.called:
        outcome(d).transport.abortConnection()
        pytest.skip("the kernel took the connect although the backlog is full")
    [waiting] = set(reactor.getWriters()) - before
    return d, waiting


@pytest_twisted.ensureDeferred
async def test_connect_now_waits_and_times_out(full_listener: Any) -> None:
    from twisted.internet.error import TimeoutError

    d, waiting = start_waiting(full_listener[0], timeout=0.2)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    await task.deferLater(real_reactor(), 0.4, lambda: None)
    assert errors and errors[0].check(TimeoutError)
    assert waiting not in real_reactor().getWriters()
    assert waiting.handle.fileno() == -1  # closed


@pytest_twisted.ensureDeferred
async def test_connect_now_cancelled_while_waiting(full_listener: Any) -> None:
    from twisted.internet.error import ConnectingCancelledError

    d, waiting = start_waiting(full_listener[0], timeout=5)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    d.cancel()
    assert errors and errors[0].check(ConnectingCancelledError)
    assert waiting not in real_reactor().getWriters()
    assert waiting.handle.fileno() == -1
    assert not waiting._timer.active()


@pytest_twisted.ensureDeferred
async def test_connect_now_completes_after_waiting(full_listener: Any) -> None:
    listener, _fillers = full_listener
    d, waiting = start_waiting(listener, timeout=10)
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    deadline = real_reactor().seconds() + 5
    while not d.called and real_reactor().seconds() < deadline:
        try:
            accepted.append(listener.accept()[0])  # room in the backlog: the SYN gets in
        except BlockingIOError:
            pass
        await task.deferLater(real_reactor(), 0.05, lambda: None)
    try:
        protocol = outcome(d)
        assert type(protocol) is Echo and protocol.made
        assert waiting not in real_reactor().getWriters()
        assert not waiting._timer.active()
        protocol.transport.abortConnection()
    finally:
        for sock in accepted:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_connect_now_dropped_by_the_reactor_fails_once(full_listener: Any) -> None:
    from twisted.internet.error import ConnectionLost

    d, waiting = start_waiting(full_listener[0], timeout=5)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    waiting.connectionLost(Failure(ConnectionLost()))  # e.g. the reactor shutting down
    waiting.connectionLost(Failure(ConnectionLost()))  # again: nothing more happens
    assert len(errors) == 1 and errors[0].check(ConnectionLost)
    assert waiting not in real_reactor().getWriters()
    assert waiting.handle.fileno() == -1
