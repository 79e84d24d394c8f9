"""Socket options VPChannelProtocol sets on a real UNIX channel socket."""

from __future__ import annotations

import socket
import sys

import pytest
from transportpair import TransportPair
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import MemoryReactorClock

from virtproxy.channel import Channel
from virtproxy.pacing import CHANNEL_READ_SIZE
from virtproxy.protocol import UNIX_SNDBUF, VPChannelProtocol, write_now
from virtproxy.session import SessionConfig


def wmem_max() -> int:
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read())


@pytest.mark.skipif(sys.platform != "linux", reason="Linux socket buffer semantics")
def test_unix_channel_send_buffer_holds_several_full_chunks() -> None:
    """A maximum-size paced chunk must fit the kernel whole, several times over,
    or every write falls back to Twisted's buffer and waits on an empty pipe."""
    protocol = VPChannelProtocol(Channel(MemoryReactorClock(), SessionConfig(), label="A"))
    pair = TransportPair(protocol)
    pair.transport.getPeer = lambda: UNIXAddress(None)  # type: ignore[method-assign]
    try:
        before = pair.near.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        protocol.makeConnection(pair.transport)
        assert protocol.attached
        sndbuf = pair.near.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sndbuf == max(before, 2 * min(UNIX_SNDBUF, wmem_max()))
        if wmem_max() >= UNIX_SNDBUF:  # else the host caps it (and the test says nothing)
            chunk = b"x" * protocol.pacer.maximum
            for _ in range(4):
                assert write_now(pair.transport, chunk) == 0, "the kernel took only part"
        assert pair.transport.bufferSize == CHANNEL_READ_SIZE
    finally:
        pair.close()
