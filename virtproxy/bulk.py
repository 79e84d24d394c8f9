"""BULK frames on a socket channel: bulk data spliced past Python.

A BULK frame announces raw stream bytes that follow it on the channel
(docs/protocol.rst, "Bulk data").  Both ends move those bytes with
``splice(2)`` (:mod:`virtproxy.splicing`): a sender from the stream's local
socket into the channel, a receiver from the channel into the local socket,
so they are never copied through Python.  On loopback that is about half the
CPU per gigabyte of reading and writing each byte, and about 1.5x the
throughput (benchmarks/README.rst).

The session (plain Python) decides what may be sent and keeps every count;
this module only moves bytes, and only while it can do so at once:

* A stream whose local read is bulk (64 KiB, or a full read) asks for a
  *turn* with what it read (the *lead*), and stops reading.  Turns go first come first served,
  whenever the session has nothing else to send and the channel takes more:
  the lead and what waits behind it on the socket go as one BULK frame.
  Where a turn finds too little credit, the lead goes as DATA, and the stream
  reads again once it went (the session's ``hold``).
* On the receiving side the raw bytes go straight to their local socket while
  it takes them; where it does not, the copying path (``Channel.receive``)
  delivers the rest through Twisted's buffer, and credit waits for it, as
  for DATA.

Interactive streams keep to DATA frames: while one is about (see
``pacing.ReadSizer.shared``) no stream asks for a turn, so a keystroke never
waits behind a megabyte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtproxy.pacing import BULK_CHANNEL_READ
from virtproxy.session import BULK_MIN
from virtproxy.splicing import SplicePipe, open_pipe

if TYPE_CHECKING:
    from virtproxy.channel import Channel
    from virtproxy.protocol import VPChannelProtocol

#: Raw bytes spliced in from the channel in one go before other sockets get a turn.
SPLICE_TURN = 4 * 1024 * 1024


class BulkPath:
    """The BULK frames of one :class:`~virtproxy.channel.Channel`."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        #: Streams waiting for their turn, in order, with their leads; their
        #: local sockets are not read meanwhile.
        self.waiting: dict[int, bytes] = {}
        #: The pipe raw bytes come in through (made on first use).
        self._pipe: SplicePipe | None = None

    def detach(self) -> None:
        """The channel connection is gone (and with it the session's streams)."""
        self.waiting.clear()
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def forget(self, stream_id: int) -> None:
        """The stream ended: its turn is void."""
        self.waiting.pop(stream_id, None)

    # ------------------------------------------------------------- sending

    def send(self, stream_id: int, lead: bytes) -> bool:
        """A bulk read of the stream's local socket: ask for a turn.

        False when the stream cannot send BULK frames now (the peer does not
        take them, a slow channel, an interactive stream about): the caller
        sends ``lead`` as usual.  Else the lead is taken, and the stream's
        local end hears of its turn: ``bulk_sent`` when it sent a BULK
        frame, or, where the turn found too little credit and sent the lead
        as DATA with ``hold``, ``resume_reading`` once that went.  Either may
        come before this returns.
        """
        channel = self.channel
        if channel.protocol is None or not channel.session.bulk_stream(stream_id):
            return False
        if channel.reads.shared(channel.reactor.seconds()):
            return False
        self.waiting[stream_id] = lead
        channel.pump()
        return True

    def serve(self, protocol: VPChannelProtocol) -> bool:
        """Give the channel to the waiting streams in turn while nothing else
        is to be sent and it takes more; True if a turn was served."""
        channel = self.channel
        session = channel.session
        waiting = self.waiting
        served = False
        while waiting and not session.has_data_to_send() and protocol.writable_fd() >= 0:
            stream_id = next(iter(waiting))
            lead = waiting.pop(stream_id)
            served = True
            local = channel.local(stream_id)
            splice_source = getattr(local, "splice_source", None)
            source = -1 if splice_source is None else splice_source()
            room = session.bulk_room(stream_id)
            now = channel.reactor.seconds()
            pipe = None
            if source >= 0 and room >= max(BULK_MIN, len(lead)) and not channel.reads.shared(now):
                pipe = protocol.send_pipe()
            if pipe is None:
                # Not now (too little credit, a keystroke about, closing, no
                # pipe): the lead goes as DATA, and the stream reads on once it went.
                session.send(stream_id, lead, hold=True)
                continue
            room = min(room - len(lead), pipe.capacity)
            extra = pipe.fill(source, room) if room else 0
            if pipe.error is not None:
                local.bulk_failed(pipe.error)  # type: ignore[union-attr]
                continue
            header = session.bulk_header(stream_id, len(lead) + extra, now)
            protocol.write_bulk(header, lead, extra)
            local.bulk_sent(extra)  # type: ignore[union-attr]
        return served

    # ------------------------------------------------------------- receiving

    def received(self, protocol: VPChannelProtocol, read: int) -> None:
        """After a channel read of ``read`` bytes: splice on the raw bytes of a
        BULK frame it began or did not finish, and size the next read.

        While BULK frames arrive the channel is read a few frames at a time
        (``set_bulk_reads``), so that a read copies little of their raw bytes.
        """
        session = self.channel.session
        if session.raw_pending() is not None:
            self.splice_in(protocol)
        elif session.raw_left:
            protocol.set_bulk_reads(False)  # raw bytes of a stream gone: read, dropped
        elif session.bulk_arrived:
            protocol.set_bulk_reads(True)
        elif read >= BULK_CHANNEL_READ:
            protocol.set_bulk_reads(False)  # other frames fill our reads

    def splice_in(self, protocol: VPChannelProtocol) -> int:
        """Move a BULK frame's raw bytes from the channel straight to their
        local socket while it takes them at once; return how many moved.

        Where it does not (it is full, or gone), the copying path takes over.
        While raw bytes are still to come, the channel's next readable turn
        comes here first (``VPChannelProtocol.splice_reads``).
        """
        channel = self.channel
        session = channel.session
        pending = session.raw_pending()
        moved = 0
        spliceable = False
        while pending is not None and moved < SPLICE_TURN:
            stream_id, left = pending
            local = channel.local(stream_id)
            splice_target = getattr(local, "splice_target", None)
            target = -1 if splice_target is None else splice_target()
            source = protocol.readable_fd()
            spliceable = target >= 0 and source >= 0
            if not spliceable:
                break
            if self._pipe is None:
                self._pipe = open_pipe(channel.log)
            pipe = self._pipe
            if pipe is None:
                spliceable = False  # no pipe to be had: the copying path takes them
                break
            count = pipe.fill(source, min(left, pipe.capacity))
            if pipe.error is not None:
                # Met here, a reset would read as a clean end on the next read.
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                spliceable = False
                break
            if not count:
                break  # the rest is not here yet
            session.raw_taken(count)
            moved += count
            taken = pipe.drain_to(target, count)
            rest = pipe.take(count - taken) if taken < count else b""
            local.spliced(taken, rest, pipe.error)  # type: ignore[union-attr]
            if rest:
                spliceable = False  # the socket is full: DATA's path delivers the rest
                break
            pending = session.raw_pending()
        # Small reads while BULK frames come; none at all while raw bytes are
        # spliced, but large ones where the copying path takes them.
        protocol.set_bulk_reads(spliceable or not session.raw_left)
        protocol.splice_reads(spliceable and pending is not None)
        if moved:
            channel.pump()
        return moved
