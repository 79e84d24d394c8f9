"""VPChannelProtocol: the channel transport's protocol.

It is deliberately thin: bytes go to the :class:`~virtproxy.channel.Channel`
(and from there into the sans-I/O session), and it is the channel transport's
streaming producer, so a full transport buffer pauses the session's output and
in turn, through per-stream queues, the local sockets' reads.  It works over
any transport: TCP, UNIX, a serial port, a virtio-serial port.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from virtproxy.channel import Channel

#: Kernel send buffer for socket channels.  Small, so bytes wait in our
#: per-stream queues, where the scheduler can still put a keystroke first,
#: rather than in the kernel in front of it.
CHANNEL_SNDBUF = 256 * 1024
#: Twisted's own write buffer before it pauses us.
CHANNEL_BUFFER = 128 * 1024


@implementer(IPushProducer)
class VPChannelProtocol(Protocol):
    """Carries one connection of a :class:`~virtproxy.channel.Channel`."""

    log = Logger()

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.paused = False
        self.attached = False
        self._reading = True

    def describe_peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if host is not None:
            return f"{host}:{getattr(peer, 'port', '')}"
        name = getattr(peer, "name", None)
        return str(name) if name else type(peer).__name__

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            if handle.family in (socket.AF_INET, socket.AF_INET6):
                handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_SNDBUF)
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = CHANNEL_BUFFER
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.attached = self.channel.attach(self)
        if not self.attached:
            self.log.warn(
                "{label}: refusing a second channel connection from {peer}: one peer at a time",
                label=self.channel.label,
                peer=self.describe_peer(),
            )
            transport.unregisterProducer()  # type: ignore[attr-defined]
            transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.attached:
            self.channel.receive(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.attached:
            self.attached = False
            self.channel.detach(self, reason.getErrorMessage())

    # IPushProducer: the channel transport tells us when its buffer is full.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.attached:
            self.channel.pump()

    def stopProducing(self) -> None:
        self.paused = True

    def set_reading(self, reading: bool) -> None:
        """Stop reading the channel while the session's control backlog is too long."""
        if reading == self._reading or self.transport is None:
            return
        self._reading = reading
        if reading:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        else:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
