"""VPChannelProtocol: the channel transport's protocol.

It is deliberately thin: bytes go to the :class:`~virtproxy.channel.Channel`
(and from there into the sans-I/O session).  It is the channel transport's
*pull* producer: it writes one chunk, sized by a :class:`WritePacer` to the
channel's speed, and writes the next only when the transport has drained the
last.  A slow channel therefore backs up into the per-stream queues (where the
scheduler can still put a keystroke first) and, through them, pauses the
local sockets' reads.  It works over any transport: TCP, UNIX, a serial port,
a virtio-serial port.  On a TCP or UNIX socket it also moves BULK frames' raw
bytes with splice(2) (``write_bulk``, ``splice_reads``; see virtproxy/bulk.py).
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.frames import Payload
from virtproxy.localio import open_socket, writable_socket
from virtproxy.pacing import BULK_CHANNEL_READ, CHANNEL_READ_SIZE, WritePacer
from virtproxy.splicing import SplicePipe, open_pipe
from virtproxy.tcpopts import tune_tcp

if TYPE_CHECKING:
    from virtproxy.channel import Channel

#: Kernel send buffer for UNIX channels (Linux doubles it; see
#: set_unix_send_buffer for its cap).  A UNIX socket's send buffer is the
#: whole pipe (the peer's receive buffer does not count), and it reports
#: writable again only once three quarters of it drained.  At 256 KiB most 256 KiB chunks were
#: taken in part: the rest went through Twisted's buffer (a copy, two
#: epoll_ctl) and the sender waited on a nearly empty pipe, so 32 streams ran
#: about 20 % slower than over loopback TCP, whose receive buffer holds
#: megabytes.  Still bounded, so a slow peer backs up into our per-stream
#: queues, where the scheduler can still put a keystroke first.
UNIX_SNDBUF = 2 * 1024 * 1024
#: SO_SNDBUFFORCE: SO_SNDBUF past net.core.wmem_max, for a process with
#: CAP_NET_ADMIN (Linux only; 208 KiB is a common cap, where SO_SNDBUF alone
#: would leave the pipe small).  Not in Python's socket module.
SO_SNDBUFFORCE = 32
#: Unsent bytes a TCP channel's kernel queue may hold before it stops
#: reporting writable (TCP_NOTSENT_LOWAT; 25 on Linux).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: It follows the pacer's chunk (about 10 ms of the line) within these bounds.
NOTSENT_LOWAT_MIN = 512
NOTSENT_LOWAT_MAX = 256 * 1024


#: Most pieces one ``sendmsg`` takes (Linux's IOV_MAX is 1024).
MAX_IOV = 1024


def set_unix_send_buffer(handle: socket.socket) -> None:
    """Give a UNIX channel socket a UNIX_SNDBUF send buffer, past the host's
    wmem_max cap where we may (as QEMU's host side often runs, as root)."""
    if sys.platform.startswith("linux"):
        try:
            handle.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, UNIX_SNDBUF)
            return
        except OSError:
            pass  # no CAP_NET_ADMIN: as much as the cap allows
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)


def write_now(transport: object, data: Payload | list[Payload]) -> int:
    """Write ``data`` (bytes, or pieces in order) to a socket transport now.

    Returns how many bytes Twisted still holds.  Twisted's ``write`` only
    buffers: it registers the socket for writing and sends on the next reactor
    turn, then unregisters once drained, so every write costs two
    ``epoll_ctl`` calls, a reactor turn and a copy into its buffer.  When
    Twisted holds nothing for this socket we call ``send`` (or ``sendmsg`` for
    pieces, without joining them) ourselves and hand Twisted only what the
    kernel did not take, copied.  Anything unusual (not a plain socket
    transport, closing, queued bytes or file descriptors, a socket error) goes
    through Twisted's own write path unchanged, so the reactor still meets
    every error and every close itself.
    """
    if isinstance(data, list) and len(data) > MAX_IOV:
        data = b"".join(data)
    handle = writable_socket(transport)
    if handle is None:
        return _write_later(transport, data)
    try:
        sent = handle.sendmsg(data) if isinstance(data, list) else handle.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted send it and meet the error itself (connectionLost).
        return _write_later(transport, data)
    if not isinstance(data, list):
        return _write_later(transport, data[sent:]) if sent < len(data) else 0
    rest: list[Payload] = []
    for piece in data:
        if sent >= len(piece):
            sent -= len(piece)
        else:
            rest.append(piece[sent:] if sent else piece)
            sent = 0
    return _write_later(transport, rest) if rest else 0


def _write_later(transport: Any, data: Payload | list[Payload]) -> int:
    """Twisted's own buffered write (one ``write`` call of ``bytes``, which is all it takes)."""
    data = b"".join(data) if isinstance(data, list) else bytes(data)
    transport.write(data)
    return len(data)


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
        self._read_size = 0
        self._wanted_read_size = 0
        self._bulk_reads = False
        #: Holds a BULK frame's raw bytes on their way out (made on first use),
        #: and how many of them still wait there for the socket to take them.
        self._pipe: SplicePipe | None = None
        self._pipe_rest = 0
        #: Our transport's ``doRead`` is shadowed (see ``splice_reads``).
        self._splicing = False

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
                tune_tcp(handle)
                self._tcp = handle
                self._set_lowat(NOTSENT_LOWAT_MAX)
            elif handle.family == socket.AF_UNIX:
                set_unix_send_buffer(handle)
        self.set_read_size(CHANNEL_READ_SIZE)
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
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
            self._pipe_rest = 0
        if self.attached:
            self.attached = False
            self.channel.detach(self, reason.getErrorMessage())

    def wrote(self, data: list[Payload]) -> None:
        """Write one chunk (pieces in order); unless the kernel took it all,
        wait for the transport to drain it."""
        assert self.transport is not None
        size = sum(map(len, data))
        if not size:
            return  # an empty write never drains, so it would never resume us
        pacer = self.pacer
        if pacer.chunk < pacer.maximum and size >= pacer.chunk // 2:
            # A full chunk on a slow (or not yet measured) channel goes through
            # Twisted, and its drain time is what sizes the next one.
            pacer.wrote(size, self.channel.reactor.seconds())
            self.paused = True
            self.transport.write(b"".join(data))
            return
        if write_now(self.transport, data):
            self.paused = True  # the transport resumes us once it drained the rest
            pacer.wrote(size, self.channel.reactor.seconds())
        # else the kernel took it at once: no wait, and no sample for the pacer
        # (a short write would not have given one anyway), so no clock read.

    def pauseProducing(self) -> None:
        self.paused = True

    # IPullProducer: the channel transport drained and wants more.
    def resumeProducing(self) -> None:
        if self._pipe_rest and not self._drain_pipe():
            return  # the rest of a BULK frame still waits in the pipe
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

    def set_read_size(self, size: int) -> None:
        """Read the channel ``size`` bytes at a time (see pacing.ReadSizer)."""
        self._wanted_read_size = size
        self._apply_read_size()

    def set_bulk_reads(self, bulk: bool) -> None:
        """While BULK frames arrive, read the channel a few frames at a time,
        leaving their raw bytes to be spliced on, not copied by a large read."""
        if bulk != self._bulk_reads:
            self._bulk_reads = bulk
            self._apply_read_size()

    def _apply_read_size(self) -> None:
        size = BULK_CHANNEL_READ if self._bulk_reads else self._wanted_read_size
        if size == self._read_size or not hasattr(self.transport, "bufferSize"):
            return
        # Twisted reads bufferSize bytes at a time; as a pull producer we are
        # never paused by it, so it only sets the read size.
        self._read_size = size
        self.transport.bufferSize = size  # type: ignore[union-attr]

    def splice_reads(self, splice: bool) -> None:
        """Let the channel's next readable turns splice a BULK frame's raw
        bytes on (``BulkPath.splice_in``) instead of reading them.

        Twisted's socket transports read in ``doRead`` with no hook before
        the read, so the transport's ``doRead`` is shadowed meanwhile.  It
        falls back to Twisted's own read whenever nothing was spliced (an
        end of file, an error, or the frame's end), so the reactor still
        meets every close itself.
        """
        transport: Any = self.transport
        if splice == self._splicing or transport is None:
            return
        self._splicing = splice
        if splice:
            transport.doRead = self._splice_read
        else:
            vars(transport).pop("doRead", None)

    def _splice_read(self) -> object:
        bulk = self.channel.bulk
        if self.attached and bulk is not None and bulk.splice_in(self):
            return None
        self.splice_reads(False)
        transport: Any = self.transport
        return transport.doRead()

    def readable_fd(self) -> int:
        """The channel socket's descriptor, to splice from while we read (else -1)."""
        handle = open_socket(self.transport) if self._reading else None
        return -1 if handle is None else handle.fileno()

    def writable_fd(self) -> int:
        """The channel socket's descriptor, to write to ourselves now (else -1)."""
        handle = None if self.paused else writable_socket(self.transport)
        return -1 if handle is None else handle.fileno()

    def send_pipe(self) -> SplicePipe | None:
        """The pipe a BULK frame's raw bytes pass through on their way out
        (None while the kernel gives none)."""
        if self._pipe is None:
            self._pipe = open_pipe(self.log)
        return self._pipe

    def write_bulk(self, header: bytes, lead: bytes, count: int) -> None:
        """Write a BULK frame (``header``), its first raw bytes (``lead``),
        then ``count`` more from :meth:`send_pipe`, with nothing in between.

        Only right after :meth:`writable_fd` said we may.  What the socket
        does not take at once waits in the pipe, and we wait for the socket
        to drain (the transport asks for more as it would after a buffered
        write), so the bytes are never copied; only if ``header`` and
        ``lead`` do not go whole (or the socket fails) does the rest go
        through Twisted's buffer, for the reactor to meet any error.
        """
        handle = writable_socket(self.transport)
        assert handle is not None
        try:
            sent = handle.sendmsg([header, lead])
        except OSError:
            sent = 0
        if sent < len(header) + len(lead):
            assert self._pipe is not None
            self._write_rest((header + lead)[sent:] + self._pipe.take(count))
            return
        self._pipe_rest = count
        if count and not self._drain_pipe():
            self.paused = True

    def _drain_pipe(self) -> bool:
        """Splice the rest of a BULK frame to the socket; True once it all went."""
        assert self._pipe is not None
        handle = open_socket(self.transport)
        rest = self._pipe_rest
        moved = self._pipe.drain_to(handle.fileno(), rest) if handle is not None else 0
        rest -= moved
        self._pipe_rest = rest
        if not rest:
            return True
        if handle is None or self._pipe.error is not None:
            self.flush_pipe()  # the reactor meets the error, or the close
            return False
        # Twisted calls resumeProducing once the socket is writable: with
        # nothing in its buffer, that is its next write turn.
        self.transport.startWriting()  # type: ignore[union-attr]
        return False

    def flush_pipe(self) -> None:
        """Hand what waits in the pipe to Twisted's buffer (before a close)."""
        if self._pipe_rest and self._pipe is not None:
            rest, self._pipe_rest = self._pipe_rest, 0
            self._write_rest(self._pipe.take(rest))

    def _write_rest(self, rest: bytes) -> None:
        assert self.transport is not None
        self.paused = True  # the transport resumes us once it drained the rest
        self.pacer.wrote(len(rest), self.channel.reactor.seconds())
        self.transport.write(rest)

    def set_reading(self, reading: bool) -> None:
        """Stop reading the channel while the session's control backlog is too long."""
        if reading == self._reading or self.transport is None:
            return
        self._reading = reading
        if reading:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        else:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
