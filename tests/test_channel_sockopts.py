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
from virtproxy.protocol import (
    SO_SNDBUFFORCE,
    UNIX_SNDBUF,
    VPChannelProtocol,
    set_unix_send_buffer,
    write_now,
)
from virtproxy.session import SessionConfig


def wmem_max() -> int:
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read())


def may_force() -> bool:
    """Can this process set a send buffer past wmem_max (CAP_NET_ADMIN)?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4096)
        except OSError:
            return False
    return True


def expected_sndbuf() -> int:
    """What the kernel reports for a UNIX_SNDBUF request (it doubles it)."""
    return 2 * (UNIX_SNDBUF if may_force() else min(UNIX_SNDBUF, wmem_max()))


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
        assert sndbuf == max(before, expected_sndbuf())
        if expected_sndbuf() >= 2 * UNIX_SNDBUF:  # else the host caps it (and we may not force)
            chunk = b"x" * protocol.pacer.maximum
            for _ in range(4):
                assert write_now(pair.transport, chunk) == 0, "the kernel took only part"
        assert pair.transport.bufferSize == CHANNEL_READ_SIZE
    finally:
        pair.close()


class RefusedForce(socket.socket):
    """A socket as an unprivileged process sees it: SO_SNDBUFFORCE is refused."""

    def setsockopt(self, *args: object) -> None:  # type: ignore[override]
        if args[:2] == (socket.SOL_SOCKET, SO_SNDBUFFORCE):
            raise PermissionError(1, "Operation not permitted")
        super().setsockopt(*args)  # type: ignore[arg-type]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux socket buffer semantics")
def test_unix_send_buffer_falls_back_to_the_capped_option_without_privilege() -> None:
    """Without CAP_NET_ADMIN the channel still gets as much as wmem_max allows."""
    left, right = socket.socketpair()
    handle = RefusedForce(fileno=left.detach())
    try:
        set_unix_send_buffer(handle)
        sndbuf = handle.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sndbuf == 2 * min(UNIX_SNDBUF, wmem_max())
    finally:
        handle.close()
        right.close()
