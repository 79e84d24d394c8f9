"""VPChannelProtocol: the channel transport's protocol.

It is deliberately thin: bytes go to the :class:`~virtproxy.channel.Channel`
(and from there into the sans-I/O session).  It is the channel transport's
*pull* producer: it writes one chunk, sized by a :class:`WritePacer` to the
channel's speed, and writes the next only when the transport has drained the
last.  A slow channel therefore backs up into the per-stream queues (where the
scheduler can still put a keystroke first) and, through them, pauses the
local sockets' reads.  It works over any transport: TCP, UNIX, a serial port,
a virtio-serial port.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.pacing import WritePacer

if TYPE_CHECKING:
    from virtproxy.channel import Channel

#: Kernel send buffer for UNIX channels.  Bounded, so bytes wait in our
#: per-stream queues, where the scheduler can still put a keystroke first,
#: rather than in the kernel in front of it.
UNIX_SNDBUF = 256 * 1024
#: Bytes read from a socket channel at a time (Twisted's default is 64 KiB).
CHANNEL_READ_SIZE = 256 * 1024
#: Unsent bytes a TCP channel's kernel queue may hold before it stops
#: reporting writable (TCP_NOTSENT_LOWAT; 25 on Linux).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: It follows the pacer's chunk (about 10 ms of the line) within these bounds.
NOTSENT_LOWAT_MIN = 512
NOTSENT_LOWAT_MAX = 256 * 1024


def describe_address(address: object, unnamed: str) -> str:
    """``host:port`` for IP addresses, the path for named sockets, else ``unnamed``."""
    host = getattr(address, "host", None)
    if host is not None:
        return f"{host}:{getattr(address, 'port', '')}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name) if name else unnamed


@implementer(IPullProducer)
class VPChannelProtocol(Protocol):
    """Carries one connection of a :class:`~virtproxy.channel.Channel`."""

    log = Logger()

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.paused = False
        self.attached = False
        self._reading = True
        self.pacer = WritePacer()
        self._tcp: socket.socket | None = None
        self._lowat = 0

    def describe_peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        return describe_address(peer, unnamed=type(peer).__name__)

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            if handle.family in (socket.AF_INET, socket.AF_INET6):
                handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._tcp = handle
                self._set_lowat(NOTSENT_LOWAT_MAX)
            elif handle.family == socket.AF_UNIX:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        if hasattr(transport, "bufferSize"):
            # Twisted reads bufferSize bytes at a time; as a pull producer we
            # are never paused by it, so it only sets the read size.
            transport.bufferSize = CHANNEL_READ_SIZE
        # A pull producer: the transport asks for the next chunk only when the
        # previous one has drained into the kernel, so Twisted's buffer never
        # holds more than one paced chunk.
        self.paused = True
        transport.registerProducer(self, False)  # type: ignore[attr-defined]
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

    def wrote(self, data: bytes) -> None:
        """Write one chunk, then wait for the transport to ask for the next."""
        assert self.transport is not None
        if not data:
            return  # an empty write never drains, so it would never resume us
        self.paused = True
        self.pacer.wrote(len(data), self.channel.reactor.seconds())
        self.transport.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    # IPullProducer: the channel transport drained and wants more.
    def resumeProducing(self) -> None:
        self.paused = False
        self.pacer.drained(self.channel.reactor.seconds())
        if self._tcp is not None:
            self._set_lowat(self.pacer.chunk)
        if self.attached:
            self.channel.pump()

    def stopProducing(self) -> None:
        self.paused = True

    def _set_lowat(self, chunk: int) -> None:
        """Keep the kernel's unsent TCP queue near one paced chunk."""
        lowat = max(NOTSENT_LOWAT_MIN, min(NOTSENT_LOWAT_MAX, chunk))
        if lowat == self._lowat or self._tcp is None:
            return
        self._lowat = lowat
        try:
            self._tcp.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, lowat)
        except OSError:
            self._tcp = None  # not Linux: the pacer alone bounds the queue

    def set_reading(self, reading: bool) -> None:
        """Stop reading the channel while the session's control backlog is too long."""
        if reading == self._reading or self.transport is None:
            return
        self._reading = reading
        if reading:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        else:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
