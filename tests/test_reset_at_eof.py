"""A TCP reset that Twisted reports as a clean end of file still fails the stream.

Twisted's poll reactors take a hang-up polled without "readable" for a clean
close, error or not, and a reset can be polled that way (the socket closed,
its read side not yet shut down).  The proxy protocol then sees
``readConnectionLost``; it must check for the reset's pending error, or a cut
transfer would reach the far client as a complete one.
"""

from __future__ import annotations

import socket
import struct
import time

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock

from virtproxy.factories import ProxyProtocol


class StubChannel:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.label = "test"
        self.eofs: list[int] = []
        self.lost: list[tuple[int, str]] = []

    def send_eof(self, stream_id: int) -> None:
        self.eofs.append(stream_id)

    def local_lost(self, stream_id: int, why: str) -> None:
        self.lost.append((stream_id, why))


def proxied_tcp_socket() -> tuple[ProxyProtocol, tcp.Connection, socket.socket, StubChannel]:
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname())
    near, _ = server.accept()
    server.close()
    near.setblocking(False)
    channel = StubChannel()
    local = ProxyProtocol(channel, "svc")  # type: ignore[arg-type]
    transport = tcp.Connection(near, local, channel.reactor)
    transport.connected = True
    local.transport = transport
    local.stream_id = 7
    local._live = True
    return local, transport, peer, channel


def test_a_reset_reported_as_end_of_file_aborts_instead_of_sending_eof() -> None:
    local, transport, peer, channel = proxied_tcp_socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    time.sleep(0.05)
    local.readConnectionLost()  # as Twisted calls it for a hang-up without "readable"
    assert channel.eofs == []
    assert transport._aborting
    assert local.end_reason == "local connection lost: Connection reset by peer"
    transport.socket.close()


def test_a_real_end_of_file_sends_eof() -> None:
    local, transport, peer, channel = proxied_tcp_socket()
    peer.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    local.readConnectionLost()
    assert channel.eofs == [7]
    assert not transport._aborting
    peer.close()
    transport.socket.close()
