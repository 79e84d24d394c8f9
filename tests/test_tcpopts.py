"""TCP options on the sockets virtproxy owns: no Nagle, and over loopback a
congestion control that does not pace (virtproxy/tcpopts.py)."""

from __future__ import annotations

import socket
import sys

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from virtproxy.channel import Channel
from virtproxy.factories import ProxyProtocol
from virtproxy.protocol import VPChannelProtocol
from virtproxy.session import SessionConfig
from virtproxy.tcpopts import LOOPBACK_CONGESTION, TCP_CONGESTION, is_loopback_peer, tune_tcp

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="TCP_CONGESTION is Linux's")


def congestion(sock: socket.socket) -> bytes:
    assert TCP_CONGESTION is not None
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).rstrip(b"\0")


def loopback_pair(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as server:
        far = socket.create_connection(server.getsockname()[:2])
        near, _ = server.accept()
    return near, far


@pytest.mark.parametrize(
    "peer, loopback",
    [
        (("127.0.0.1", 80), True),
        (("127.3.4.5", 80), True),
        (("::1", 80, 0, 0), True),
        (("::ffff:127.0.0.1", 80, 0, 0), True),
        (("10.0.0.1", 80), False),
        (("192.0.2.127", 80), False),
        (("::ffff:10.0.0.1", 80, 0, 0), False),
        (("fe80::1", 80, 0, 2), False),
        (("1270::1", 80, 0, 0), False),
        ("/run/vm1/vp.sock", False),
        ((), False),
        (None, False),
    ],
)
def test_is_loopback_peer(peer: object, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


@linux_only
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_loopback_socket_gets_no_nagle_and_an_unpaced_congestion_control(host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    near, far = loopback_pair(host)
    try:
        tune_tcp(near)
        assert near.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert congestion(near) == LOOPBACK_CONGESTION
        assert congestion(far) == default_congestion()  # not ours: untouched
    finally:
        near.close()
        far.close()


def default_congestion() -> bytes:
    with open("/proc/sys/net/ipv4/tcp_congestion_control", "rb") as f:
        return f.read().strip()


class ElsewherePeer(socket.socket):
    """A connected socket that reports a peer off this host."""

    def getpeername(self) -> tuple[str, int]:
        return ("192.0.2.10", 22)


@linux_only
def test_a_socket_to_another_host_keeps_the_hosts_congestion_control() -> None:
    near, far = loopback_pair()
    handle = ElsewherePeer(fileno=near.detach())
    try:
        before = congestion(handle)
        tune_tcp(handle)
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert congestion(handle) == before
    finally:
        handle.close()
        far.close()


@linux_only
def test_a_socket_whose_peer_is_gone_is_left_alone() -> None:
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        before = congestion(unconnected)
        tune_tcp(unconnected)  # getpeername fails with ENOTCONN: no error
        assert congestion(unconnected) == before
    finally:
        unconnected.close()


@linux_only
def test_the_channel_and_proxied_sockets_are_tuned_when_connected() -> None:
    """Both call sites: VPChannelProtocol (the channel) and ProxyProtocol (a
    proxied socket, accepted or connected) tune their real TCP sockets."""
    reactor = MemoryReactorClock()
    channel = Channel(reactor, SessionConfig(), label="A")
    pairs = [loopback_pair(), loopback_pair()]
    try:
        protocols = [VPChannelProtocol(channel), ProxyProtocol(channel, "svc")]
        for (near, _), protocol in zip(pairs, protocols, strict=True):
            near.setblocking(False)
            assert congestion(near) == default_congestion()
            transport = tcp.Connection(near, protocol, reactor)
            transport.connected = True
            transport.getPeer = lambda: IPv4Address("TCP", "127.0.0.1", 1)  # type: ignore[method-assign]
            protocol.makeConnection(transport)
            assert near.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert congestion(near) == LOOPBACK_CONGESTION
    finally:
        for near, far in pairs:
            near.close()
            far.close()
