"""The local side of streams, and the factories that make channel protocols.

* :class:`ProxyServerFactory` listens for an oforward: each accepted
  connection (a :class:`ProxyServerProtocol`) becomes a stream to the peer's
  iforward of the same name.
* :class:`ProxyClientFactory` connects for an iforward: the peer opened a
  stream and a :class:`ProxyClientProtocol` carries it to the local target.
* :class:`ChannelServerFactory` / :class:`ChannelClientFactory` build
  :class:`~virtproxy.protocol.VPChannelProtocol` for listen and connect channels.

Both proxy protocols pair producers the way Twisted's portforward does, but
across the channel: a local socket's reads pause while its stream's queue is
full, and its stream's credit is withheld while the socket's write buffer is
full (see ``deliver``).
"""

from __future__ import annotations

import os
import socket

from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.channel import Channel
from virtproxy.frames import Payload, describe_reason
from virtproxy.localio import (
    lose_connection_now,
    lose_write_now,
    open_socket,
    read_now,
    writable_socket,
)
from virtproxy.pacing import BULK_LEAD_READ, BULK_READ, LOCAL_READ_SIZE
from virtproxy.protocol import VPChannelProtocol, describe_address, write_now
from virtproxy.tcpopts import tune_tcp


@implementer(IHalfCloseableProtocol, IPushProducer)
class ProxyProtocol(Protocol):
    """One local socket carried by one stream."""

    log = Logger()
    role = "stream"

    def __init__(self, channel: Channel, service: str) -> None:
        self.channel = channel
        self.service = service
        self.stream_id = 0
        self.bytes_in = 0  # from the local socket into the channel
        self.bytes_out = 0  # from the channel to the local socket
        self.end_reason = ""
        self.failed = False
        self._write_paused = False
        self._withheld = 0
        self._live = False
        self._registered = False
        self._sized = False  # our transport reads bufferSize bytes at a time
        self._last_read = 0  # bytes of the previous local read (0: none yet)
        self._read_done = False  # the local socket sent EOF
        self._bulk_turn = False  # we asked for a BULK turn (and wait for it)
        self._bulk_paused = False  # ... and stopped reading meanwhile
        self._write_done = False  # we shut down its write side (peer EOF)
        self.started_at = 0.0

    # -------------------------------------------------------------- local socket

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self.started_at = self.channel.reactor.seconds()
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket) and handle.family in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            tune_tcp(handle)
        if hasattr(transport, "bufferSize"):
            # Twisted reads bufferSize bytes at a time (64 KiB by default) and
            # pauses us as its producer past that many buffered bytes.  The
            # channel resizes it after every read (see Channel.read_size).
            transport.bufferSize = LOCAL_READ_SIZE
            self._sized = True
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        if not self._live:
            return
        self.bytes_in += len(data)
        transport = self.transport
        if (
            self._sized
            and len(data) >= min(transport.bufferSize, BULK_READ)  # type: ignore[union-attr]
            and self._send_bulk(data)
        ):
            return
        if not self.channel.send(self.stream_id, data) and transport is not None:
            transport.pauseProducing()  # type: ignore[attr-defined]
        if self._sized and transport is not None:
            transport.bufferSize = self.channel.read_size(  # type: ignore[attr-defined]
                self.stream_id, len(data), self._last_read
            )
        self._last_read = len(data)

    def _send_bulk(self, data: bytes) -> bool:
        """A bulk read (64 KiB, or a full one): ask the channel for a turn to
        send it and what waits behind it on the socket as one BULK frame (see
        BulkPath.send).

        Reading stops until the turn came (``bulk_sent``), or, where the
        turn sent the lead as DATA instead, until it went (``resume_reading``).
        Either may come at once, inside ``send_bulk``.
        """
        transport = self.transport
        assert transport is not None
        self._bulk_turn = True
        if not self.channel.send_bulk(self.stream_id, data):
            self._bulk_turn = False
            return False
        if self._bulk_turn:
            self._bulk_paused = True
            transport.pauseProducing()  # type: ignore[attr-defined]
        # Read a little first next time too: splice takes the rest.
        transport.bufferSize = BULK_LEAD_READ  # type: ignore[attr-defined]
        self._last_read = len(data)
        return True

    def splice_source(self) -> int:
        """The socket's descriptor, to splice the rest of a BULK frame from (else -1)."""
        handle = open_socket(self.transport) if self._live else None
        return -1 if handle is None else handle.fileno()

    def bulk_sent(self, extra: int) -> None:
        """Our BULK frame went, with ``extra`` bytes spliced from the socket behind the lead."""
        self.bytes_in += extra
        self._bulk_turn = False
        if self._bulk_paused:
            self.resume_reading()

    def bulk_failed(self, error: OSError) -> None:
        """Splicing from or to the socket failed: abort it (met by splice, a
        reset would read as a clean end on the reactor's next read)."""
        self._abort_local(error.strerror or str(error))

    def _abort_local(self, why: str) -> None:
        """The socket failed where the reactor will not meet it: abort it,
        so the stream fails (a reset), and say why in its log line."""
        self.end_reason = f"local connection lost: {why}"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def readConnectionLost(self) -> None:
        if self._reset_pending():
            return
        self._read_done = True
        if self._live:
            self.channel.send_eof(self.stream_id)

    def _reset_pending(self) -> bool:
        """Is this "end of file" a reset?  Then abort: the stream fails.

        Twisted takes a hang-up that the poll reports without "readable" for
        a clean end, error or not; a TCP reset can be polled that way, in the
        instant between the socket closing and its read side shutting down.
        The reset's error is still pending on the socket then.
        """
        handle = getattr(self.transport, "socket", None)
        if not isinstance(handle, socket.socket):
            return False
        try:
            error = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return False
        if not error:
            return False
        self._abort_local(os.strerror(error))
        return True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was_live = self._live
        self._live = False
        if was_live and self._read_done and self._write_done:
            # Both halves ended (EOF each way); our EOF frame may still be queued.
            self.end_reason = "closed cleanly"
            self.channel.local_done(self.stream_id)
        elif was_live:
            self.end_reason = (
                self.end_reason or f"local connection lost: {reason.getErrorMessage()}"
            )
            self.failed = True
            self.channel.local_lost(self.stream_id, reason.getErrorMessage())
        if self.stream_id and self.end_reason:
            # The stream's one log line: who, what, how much, how long, how it ended.
            log = self.log.warn if self.failed else self.log.info
            log(
                "{label}: stream {id:#x} closed: service={service} peer={peer} ({role}) "
                "{seconds:.3f}s in={bytes_in} out={bytes_out}: {why}",
                label=self.channel.label,
                id=self.stream_id,
                service=self.service,
                peer=self.describe_peer(),
                role=self.role,
                seconds=max(0.0, self.channel.reactor.seconds() - self.started_at),
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                why=self.end_reason,
            )

    def describe_peer(self) -> str:
        if self.transport is None:
            return "?"
        return describe_address(self.transport.getPeer(), unnamed="unix")

    # IPushProducer: our local transport's write buffer is full (or drained).
    def pauseProducing(self) -> None:
        self._write_paused = True

    def resumeProducing(self) -> None:
        self._write_paused = False
        if self._withheld and self._live:
            count, self._withheld = self._withheld, 0
            self.channel.consumed(self.stream_id, count)

    def stopProducing(self) -> None:
        self._write_paused = True

    # -------------------------------------------------------------- from the channel

    def deliver(self, data: Payload | list[Payload]) -> None:
        """Peer data (bytes, or pieces in order): write it, and grant credit
        only once the socket took it."""
        if self.transport is None:
            return
        size = sum(map(len, data)) if isinstance(data, list) else len(data)
        self.bytes_out += size
        write_now(self.transport, data)
        if self._write_paused:
            self._withheld += size
        else:
            self.channel.consumed(self.stream_id, size)

    def splice_target(self) -> int:
        """The socket's descriptor, for peer data spliced in now (else -1):
        only while it holds nothing unsent and no credit is withheld."""
        if self._write_paused or self._withheld:
            return -1
        handle = writable_socket(self.transport)
        return -1 if handle is None else handle.fileno()

    def spliced(self, count: int, rest: bytes, error: OSError | None) -> None:
        """``count`` bytes of peer data were spliced into the socket; ``rest``
        did not fit (it goes as ``deliver`` sends it); ``error`` failed it."""
        if error is not None:
            self.bulk_failed(error)
            return
        self.bytes_out += count
        if count:
            self.channel.consumed(self.stream_id, count)
        if rest:
            self.deliver(rest)

    def _release_transport(self) -> None:
        """Unregister as our transport's producer (it won't close while we are)."""
        if self._registered and self.transport is not None:
            self._registered = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        self._bulk_turn = self._bulk_paused = False
        if self.transport is not None and self._live:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def end_of_data(self) -> None:
        """The peer half-closed: shut down our write side once the buffer is out."""
        self._write_done = True
        if self.transport is not None:
            # No more peer data, so no more credit to withhold; and Twisted does
            # not shut down a write side while a producer is registered on it.
            self._release_transport()
            lose_write_now(self.transport)

    def stream_opened(self) -> None:
        """The peer accepted (or we connected): logged once, when the stream ends."""

    def stream_closed(self) -> None:
        """EOF both ways: a clean end; the transport closes once its buffer is out."""
        self._live = False
        self.end_reason = "closed cleanly"
        if self.transport is not None:
            self._release_transport()
            lose_connection_now(self.transport)

    def stream_reset(self, why: str) -> None:
        """The stream died of a failure: abort, so the client sees a reset, not an EOF."""
        self._live = False
        self.failed = True
        self.end_reason = why
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def stream_rejected(self, reason: int, message: str) -> None:
        self._live = False
        self.failed = True
        self.end_reason = f"open failed: {describe_reason(reason, message)}"
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class ProxyServerProtocol(ProxyProtocol):
    """A connection accepted on an oforward listener."""

    role = "oforward"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._live = True
        self.stream_id = self.channel.open_stream(self.service, self, flush=False)
        # A client often sends at once (a request): its first bytes may be
        # here already, and then go over the channel in one write with the OPEN.
        data = read_now(self.transport)
        if data:
            self.dataReceived(data)
        else:
            self.channel.pump()


class ProxyServerFactory(Factory):
    """Listens for one oforward; every connection opens a stream to the peer."""

    protocol = ProxyServerProtocol
    noisy = False

    def __init__(self, channel: Channel, service: str) -> None:
        self.channel = channel
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> ProxyServerProtocol:
        return ProxyServerProtocol(self.channel, self.service)


class ProxyClientProtocol(ProxyProtocol):
    """Our connection to an iforward target, for a stream the peer opened."""

    role = "iforward"

    def __init__(self, channel: Channel, service: str, stream_id: int) -> None:
        super().__init__(channel, service)
        self.stream_id = stream_id

    def connectionMade(self) -> None:
        super().connectionMade()
        self._live = True
        if not self.channel.connected(self.stream_id, self):
            self._live = False
            self.end_reason = "the stream ended while connecting"
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]


class ProxyClientFactory(Factory):
    """Connects one iforward target for one stream."""

    noisy = False

    def __init__(self, channel: Channel, stream_id: int, service: str) -> None:
        self.channel = channel
        self.stream_id = stream_id
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> ProxyClientProtocol:
        return ProxyClientProtocol(self.channel, self.service, self.stream_id)


class ChannelServerFactory(Factory):
    """For listen channels: one peer at a time (the Channel refuses a second)."""

    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: IAddress | None) -> VPChannelProtocol:
        return VPChannelProtocol(self.channel)


class ChannelClientFactory(ChannelServerFactory):
    """For connect channels, driven by a ClientService that reconnects."""
