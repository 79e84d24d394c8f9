"""make_service and ListenService on a MemoryReactorClock: which services a
DaemonConfig turns into, what they listen on or connect to, and how a failed
listen surfaces as a one-line StartupError."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    CannotListenError,
    ConnectError,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.channel import Channel
from virtproxy.config import ChannelSpec, DaemonConfig, ForwardSpec, Limits
from virtproxy.errors import StartupError, connect_reason
from virtproxy.factories import ChannelServerFactory, ProxyServerFactory
from virtproxy.protocol import VPChannelProtocol
from virtproxy.service import (
    ChannelEndpoint,
    ChannelService,
    ListenService,
    make_service,
    retry_policy,
    session_config,
)

ECHO = ForwardSpec("echo", "tcp:0:interface=127.0.0.1:backlog=128", "echo:127.0.0.1:0")
WEB = ForwardSpec("web", "tcp:8080:interface=127.0.0.1", "web:127.0.0.1:8080")
SSH = ForwardSpec("ssh", "tcp:host=127.0.0.1:port=22:timeout=7", "ssh:127.0.0.1:22")


def listen_config(**kw: Any) -> DaemonConfig:
    channel = ChannelSpec(
        "tcp-listen", "tcp:7000:interface=127.0.0.1:backlog=5", "tcp-listen:127.0.0.1:7000"
    )
    return DaemonConfig(
        channel=channel, oforwards=(ECHO, WEB), iforwards=(SSH,), limits=Limits(**kw)
    )


def connect_config(**kw: Any) -> DaemonConfig:
    channel = ChannelSpec("tcp-connect", "tcp:host=127.0.0.1:port=1", "tcp-connect:127.0.0.1:1")
    return DaemonConfig(channel=channel, oforwards=(ECHO,), iforwards=(SSH,), limits=Limits(**kw))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def children(service: Any) -> list[Any]:
    return list(service)


# --------------------------------------------------------------------------- tcp-listen


def test_listen_config_builds_listeners_for_forwards_and_channel(log_lines: list[str]) -> None:
    reactor = MemoryReactorClock()
    top = make_service(listen_config(connect_timeout=3.5), reactor=reactor)
    assert isinstance(top, ChannelService)
    channel = top.channel
    assert isinstance(channel, Channel)
    assert channel.label == "tcp-listen:127.0.0.1:7000"
    assert channel.drop_on_silence
    assert set(channel.iforwards) == {"ssh"}
    ssh = channel.iforwards["ssh"]
    assert isinstance(ssh, TCP4ClientEndpoint)
    assert (ssh._host, ssh._port, ssh._timeout) == ("127.0.0.1", 22, 7)
    assert channel.session.config.open_timeout == 3.5
    assert all(isinstance(s, ListenService) for s in children(top))
    assert reactor.tcpServers == [] and reactor.tcpClients == []  # built, not started

    top.startService()
    assert top.running
    servers = {
        port: (factory, backlog, interface)
        for port, factory, backlog, interface in reactor.tcpServers
    }
    assert set(servers) == {0, 8080, 7000}
    echo_factory, echo_backlog, echo_interface = servers[0]
    assert isinstance(echo_factory, ProxyServerFactory)
    assert (echo_factory.service, echo_backlog, echo_interface) == ("echo", 128, "127.0.0.1")
    assert echo_factory.channel is channel
    web_factory = servers[8080][0]
    assert isinstance(web_factory, ProxyServerFactory) and web_factory.service == "web"
    channel_factory, backlog, interface = servers[7000]
    assert type(channel_factory) is ChannelServerFactory
    assert channel_factory.channel is channel and (backlog, interface) == (5, "127.0.0.1")
    assert reactor.tcpClients == []
    assert any("listening for oforward 'echo' (echo:127.0.0.1:0) on" in line for line in log_lines)
    assert any("listening for channel tcp-listen:127.0.0.1:7000 on" in line for line in log_lines)

    # The channel factory's protocol attaches to the one Channel; a second is refused.
    first = channel_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    assert isinstance(first, VPChannelProtocol)
    transport = StringTransport()
    first.makeConnection(transport)
    first.resumeProducing()  # a real transport asks its new pull producer at once
    assert channel.protocol is first and transport.value()  # our HELLO
    second = channel_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4001))
    second_transport = StringTransport()
    second.makeConnection(second_transport)
    assert second_transport.disconnecting and channel.protocol is first

    top.stopService()
    assert not top.running
    assert channel._closing
    assert transport.disconnecting  # the channel connection was closed
    assert all(s.port is None for s in children(top))


# --------------------------------------------------------------------------- tcp-connect


def test_connect_config_connects_with_a_client_service() -> None:
    reactor = MemoryReactorClock()
    top = make_service(connect_config(), reactor=reactor)
    kinds = sorted(type(s).__name__ for s in children(top))
    assert kinds == ["ClientService", "ListenService"]
    assert reactor.tcpClients == []

    top.startService()
    assert [port for port, *_ in reactor.tcpServers] == [0]
    assert len(reactor.tcpClients) == 1
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 1)

    # The connection it makes carries a VPChannelProtocol of our Channel.
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    channel = top.channel
    assert isinstance(channel.protocol, VPChannelProtocol)
    channel.protocol.resumeProducing()  # a real transport asks its pull producer at once
    assert transport.value(), "no HELLO on a new channel connection"

    top.stopService()
    assert channel._closing and transport.disconnecting


def test_connect_channel_retries_with_backoff_on_the_given_reactor() -> None:
    reactor = MemoryReactorClock()
    top = make_service(connect_config(), reactor=reactor)
    top.startService()
    try:
        assert len(reactor.tcpClients) == 1
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        reactor.advance(0.1)
        assert len(reactor.tcpClients) == 1  # not at once
        reactor.advance(3.0)
        assert len(reactor.tcpClients) == 2  # but again, after a back-off
    finally:
        top.stopService()  # cancels a retry wherever it was scheduled
    reactor.advance(60)
    assert len(reactor.tcpClients) == 2  # and never after stopping


def test_connect_channel_says_why_an_attempt_failed_once_per_reason(log_lines: list[str]) -> None:
    reactor = MemoryReactorClock()
    top = make_service(connect_config(), reactor=reactor)
    top.startService()
    try:

        def refuse() -> None:
            factory = reactor.tcpClients[-1][2]
            error = ConnectionRefusedError(111, "Connection refused")
            factory.clientConnectionFailed(reactor.connectors[-1], Failure(error))
            reactor.advance(11.0)  # past the longest back-off

        refuse()
        refuse()
        why = [line for line in log_lines if "cannot connect" in line]
        assert why == [
            "tcp-connect:127.0.0.1:1: cannot connect the channel: Connection refused; retrying"
        ]
        # Twisted's own retry line names the endpoint as the user wrote it.
        retries = [line for line in log_lines if line.startswith("Scheduling retry")]
        assert retries and all(" tcp-connect:127.0.0.1:1 in " in line for line in retries)
        assert all(len(line.split(" in ")[-1]) <= len("10.0 seconds.") for line in retries)
    finally:
        top.stopService()
    assert len([line for line in log_lines if "cannot connect" in line]) == 1  # not the cancel


def test_channel_endpoint_names_a_labelled_channel_and_its_spec(log_lines: list[str]) -> None:
    @implementer(IStreamClientEndpoint)
    class Refusing:
        def connect(self, factory: Any) -> Deferred[Any]:
            return fail(ConnectionRefusedError(111, "Connection refused"))

    endpoint = ChannelEndpoint(Refusing(), "unix-connect:/run/vm1/vp.sock", "vm1")
    assert repr(endpoint) == "unix-connect:/run/vm1/vp.sock"
    endpoint.connect(Factory()).addErrback(lambda _: None)
    assert [line for line in log_lines if "cannot connect" in line] == [
        "vm1: cannot connect the channel to unix-connect:/run/vm1/vp.sock: "
        "Connection refused; retrying"
    ]


def test_retry_delays_grow_and_are_rounded() -> None:
    policy = retry_policy()
    delays = [policy(attempt) for attempt in range(1, 12)]
    assert all(delay == round(delay, 1) for delay in delays)
    assert delays[0] < delays[3] and max(delays) <= 10.0 + 1.0  # capped (plus jitter)


def test_in_band_channels_are_not_dropped_on_silence() -> None:
    reactor = MemoryReactorClock()
    config = DaemonConfig(
        channel=ChannelSpec("virtserial", "virtserial:/dev/vport0p1", "virtserial:/dev/vport0p1")
    )
    top = make_service(config, reactor=reactor)
    assert not top.channel.drop_on_silence
    assert top.channel.session.config.max_frame == 16384
    serial = DaemonConfig(channel=ChannelSpec("serial", "serial:/dev/ttyS0:115200", "serial"))
    assert session_config(serial).max_frame == 512
    assert not make_service(serial, reactor=reactor).channel.drop_on_silence


def test_session_config_follows_the_daemon_config() -> None:
    config = listen_config(
        connect_timeout=2.0,
        keepalive_interval=1.5,
        keepalive_timeout=4.0,
        max_frame=1024,
        window=512,  # below max_frame: raised to it
        max_streams=7,
    )
    session = session_config(config)
    assert (session.max_frame, session.window, session.max_streams) == (1024, 1024, 7)
    assert (session.keepalive_interval, session.keepalive_timeout) == (1.5, 4.0)
    assert session.open_timeout == 2.0
    assert session.early_data and session.open_ok_delay == 0.005
    # A tiny connect timeout still makes a valid config: the OPEN_OK waits less.
    assert session_config(listen_config(connect_timeout=0.002)).open_ok_delay == 0.001


# --------------------------------------------------------------------------- failed listens


@implementer(IStreamServerEndpoint)
class FailingEndpoint:
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc

    def listen(self, factory: Factory) -> Deferred[Any]:
        if self.exc is None:
            return Deferred()  # never answers
        return fail(self.exc)


def test_failed_listen_is_a_one_line_startup_error() -> None:
    error = CannotListenError("127.0.0.1", 8080, OSError(98, "Address\nalready in use"))
    service = ListenService(
        FailingEndpoint(error), Factory(), "oforward 'web' (web:127.0.0.1:8080)"
    )
    with pytest.raises(StartupError) as caught:
        service.startService()
    message = caught.value.message
    assert "\n" not in message and str(caught.value) == message
    assert message.startswith("cannot listen for oforward 'web' (web:127.0.0.1:8080): ")
    assert "127.0.0.1:8080" in message and "Address already in use" in message
    assert not service.running and service.port is None


def test_failed_unix_listen_names_the_path_not_twisteds_lock_file() -> None:
    # Twisted's UNIX listener takes a lock (a symlink) before it binds: in a
    # missing directory that symlink is what fails, with both names in it.
    error = FileNotFoundError(2, "No such file or directory", "1234", None, b"/no/dir/x.sock.lock")
    service = ListenService(FailingEndpoint(error), Factory(), "channel unix-listen:/no/dir/x.sock")
    with pytest.raises(StartupError) as caught:
        service.startService()
    assert caught.value.message == (
        "cannot listen for channel unix-listen:/no/dir/x.sock: No such file or directory"
    )


def test_listen_without_an_answer_is_a_startup_error() -> None:
    service = ListenService(FailingEndpoint(None), Factory(), "oforward 'slow' (slow:x)")
    with pytest.raises(StartupError, match=r"oforward 'slow'.*no answer"):
        service.startService()


def test_make_service_reports_the_oforward_that_cannot_listen() -> None:
    reactor = RaisingMemoryReactor(
        listenException=CannotListenError("127.0.0.1", 0, OSError(98, "Address already in use"))
    )
    top = make_service(listen_config(), reactor=reactor)
    with pytest.raises(StartupError) as caught:
        top.startService()
    message = caught.value.message
    assert message.startswith("cannot listen for oforward 'echo' (echo:127.0.0.1:0): ")
    assert "Address already in use" in message and "\n" not in message


def test_connect_reason_is_the_bare_reason_of_a_connect_error() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    assert connect_reason(refused) == "Connection refused"
    assert connect_reason(ConnectError(2, "No such file or\ndirectory")) == (
        "No such file or directory"
    )
    # No bare reason: the whole message, on one line.
    assert connect_reason(TimeoutError()) == str(TimeoutError())
    assert connect_reason(ValueError("bad\nthing")) == "bad thing"
    assert connect_reason(ValueError()) == "ValueError"
