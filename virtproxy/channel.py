"""A Channel binds one sans-I/O Session to Twisted: a clock, a channel transport
and the local sockets of its streams.

The Channel outlives channel connections: a :class:`~virtproxy.protocol.VPChannelProtocol`
attaches when its transport connects and detaches when it goes, while
listeners, pending opens and counters stay.  Several Channels can live in one
process; nothing here is global.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from virtproxy import events as ev
from virtproxy.bulk import BulkPath
from virtproxy.frames import Payload, Reason, describe_reason
from virtproxy.localio import connect_direct
from virtproxy.pacing import INTERACTIVE_READ, ReadSizer
from virtproxy.session import Session, SessionConfig
from virtproxy.splicing import available as splice_available

if TYPE_CHECKING:
    from virtproxy.protocol import VPChannelProtocol

#: Streams for this service name carry remote-forward requests
#: (docs/protocol.rst, "Remote forwards"); users cannot configure a NAME
#: starting with "..", so it never collides with an iforward.
REMOTE_SERVICE = "..rforward"


class StreamEnd(Protocol):
    """The local end of one stream: a socket (ProxyProtocol) or an in-process
    handler such as a remote-forward request."""

    service: str

    def deliver(self, data: Payload | list[Payload]) -> None:
        """Peer data: one payload, or several in a row (written at once)."""

    def resume_reading(self) -> None: ...
    def end_of_data(self) -> None: ...
    def stream_opened(self) -> None: ...
    def stream_closed(self) -> None: ...
    def stream_reset(self, why: str) -> None: ...
    def stream_rejected(self, reason: int, message: str) -> None: ...
    def describe_peer(self) -> str: ...


#: Session counters that tell of a noisy or hostile channel (logged when they change).
TROUBLE_COUNTERS = (
    "damaged_frames",
    "resyncs",
    "discarded_bytes",
    "lost_frames",
    "protocol_errors",
    "limit_hits",
    "keepalive_timeouts",
    "retransmits",
    "timeouts",
    "duplicates",
    "peer_restarts",
)
#: Changed counters are logged at most this often (and when a session ends).
COUNTER_LOG_INTERVAL = 60.0
#: At most this many DATA payloads go to a local socket in one write (one
#: ``sendmsg``; the kernel takes at most IOV_MAX = 1024 pieces).
MAX_PIECES = 256


class Channel:
    """One channel to one peer, with its session and streams."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: SessionConfig | None = None,
        iforwards: Mapping[str, IStreamClientEndpoint] | None = None,
        label: str = "channel",
        drop_on_silence: bool = True,
    ) -> None:
        self.reactor = reactor
        self.session = Session(config)
        self.iforwards = dict(iforwards or {})
        self.label = label
        #: Abort a socket channel whose peer fell silent, so that a connect
        #: channel reconnects and a listen channel frees its one slot.
        self.drop_on_silence = drop_on_silence
        self.protocol: VPChannelProtocol | None = None
        #: When the channel object was made, and when its session came up.
        self.started_at = reactor.seconds() if hasattr(reactor, "seconds") else 0.0
        self.up_since: float | None = None
        #: When each live stream was opened (for ``virtproxy ctl streams``).
        self.opened_at: dict[int, float] = {}
        #: Called for a peer's stream to REMOTE_SERVICE; None refuses them.
        self.remote_handler: Callable[[Channel, int], StreamEnd | None] | None = None
        self._locals: dict[int, StreamEnd] = {}
        #: Sizes local reads: smaller while an interactive stream shares the channel.
        self.reads = ReadSizer()
        self._connecting: dict[int, Deferred[Any]] = {}
        self._timer: IDelayedCall | None = None
        #: The deadline ``_timer`` was set for (kept here: asking the DelayedCall costs calls).
        self._timer_at = 0.0
        self._pumping = False
        self._again = False
        self._pump_soon: IDelayedCall | None = None
        self._closing = False
        self._counters_logged: dict[str, int] = {}
        #: Peer data for streams whose local connect is under way (early data).
        self._early: dict[int, list[bytes | None]] = {}
        self._counters_logged_at = 0.0
        #: BULK frames (docs/protocol.rst, "Bulk data"), where we can splice.
        self.bulk = BulkPath(self) if self.session.config.bulk and splice_available() else None

    # -------------------------------------------------------------- channel side

    def attach(self, protocol: VPChannelProtocol) -> bool:
        """A channel transport connected.  False if another one is already attached."""
        if self.protocol is not None or self._closing:
            return False
        self.protocol = protocol
        self.log.info(
            "{label}: channel connected ({peer})",
            label=self.label,
            peer=protocol.describe_peer(),
        )
        self.session.connection_made(self.reactor.seconds())
        self.pump()
        return True

    def detach(self, protocol: VPChannelProtocol, reason: str) -> None:
        if self.protocol is not protocol:
            return
        self.protocol = None
        if self.bulk is not None:
            self.bulk.detach()
        self.log.info("{label}: channel lost: {reason}", label=self.label, reason=reason)
        self.session.connection_lost(self.reactor.seconds(), "channel lost: " + reason)
        self.pump()

    def receive(self, data: bytes) -> None:
        now = self.reactor.seconds()
        if self.reads.reply_until:
            self._size_channel_reads(now)
        self.session.receive_data(data, now)
        self.pump()
        if self.bulk is not None and self.protocol is not None:
            self.bulk.received(self.protocol, len(data))

    def shutdown(self) -> None:
        """Tell the peer we leave (GOAWAY), reset every stream, then close the channel."""
        self._closing = True
        for deferred in list(self._connecting.values()):
            deferred.cancel()
        protocol = self.protocol
        if protocol is not None:
            protocol.flush_pipe()  # a BULK frame's rest first, whole
        now = self.reactor.seconds()
        self.session.go_away(now)
        self.pump()
        if protocol is not None and protocol.transport is not None:
            if protocol.paused and self.session.has_data_to_send():
                # The channel is busy: the GOAWAY goes behind what the transport
                # holds (it closes once that is out), so the peer hears why.
                goaway = self.session.pieces_to_send(1 << 20, 1 << 20, now)
                protocol.transport.write(b"".join(goaway))
            # A transport does not close while a producer is registered on it.
            protocol.transport.unregisterProducer()  # type: ignore[attr-defined]
            protocol.transport.loseConnection()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None

    # -------------------------------------------------------------- stream side

    def local(self, stream_id: int) -> StreamEnd | None:
        """The local end of a stream, if it has one yet."""
        return self._locals.get(stream_id)

    def end_streams(self, service: str, ours: bool, why: str) -> int:
        """Reset every live stream of ``service`` opened by us (``ours``: an
        oforward's) or by the peer (an iforward's); returns how many."""
        ended = 0
        for stream in list(self.session.streams.values()):
            if stream.service != service or stream.ours != ours:
                continue
            self._abort_stream(stream.key, Reason.ABORTED, why, by_peer=False)
            self.session.reset(stream.key, Reason.ABORTED, why)
            self.opened_at.pop(stream.key, None)
            ended += 1
        self.pump()
        return ended

    def open_stream(self, service: str, local: StreamEnd, flush: bool = True) -> int:
        """Open a stream for ``local``; ``flush=False``: the caller pumps soon
        (so the OPEN can go in one write with the first data)."""
        now = self.reactor.seconds()
        stream_id = self.session.open_stream(service, now)
        self.opened_at[stream_id] = now
        self._locals[stream_id] = local
        if flush:
            self.pump()
        return stream_id

    def send(self, stream_id: int, data: bytes, hold: bool = False) -> bool:
        """Queue data; False means: stop reading, ``resume_reading`` follows
        (``hold``: stop until this data went out)."""
        more = self.session.send(stream_id, data, hold)
        self.pump()
        if not more:
            # The pump may have drained the queue already (and dispatched the
            # StreamWritable): answer with the state after it, or the local
            # socket would stop reading with no resume to come.
            stream = self.session.stream_info(stream_id)
            more = stream is not None and not stream.blocked
        return more

    def send_bulk(self, stream_id: int, lead: bytes) -> bool:
        """A bulk read of a stream's local socket: see :meth:`BulkPath.send`."""
        return self.bulk is not None and self.bulk.send(stream_id, lead)

    def read_size(self, stream_id: int, count: int, previous: int) -> int:
        """A local socket of the stream read ``count`` bytes (``previous`` before
        them, 0 if none): how many to read next."""
        waiting = self.reads.reply_until
        size = self.reads.next_size(stream_id, count, self.reactor.seconds(), previous)
        if waiting and not self.reads.reply_until:
            self._size_channel_reads(0.0)  # the reply came: large channel reads again
        return size

    def _size_channel_reads(self, now: float) -> None:
        if self.protocol is not None:
            self.protocol.set_read_size(self.reads.channel_size(now))

    def send_eof(self, stream_id: int) -> None:
        """EOF follows the queued data, at the end of this reactor turn: a
        short connection's EOF then often shares a write with the next
        connection's OPEN (the client closed and connected again at once)."""
        self.session.send_eof(stream_id)
        if self._pump_soon is None:
            self._pump_soon = self.reactor.callLater(0, self._pump_now)

    def _pump_now(self) -> None:
        self._pump_soon = None
        self.pump()

    def consumed(self, stream_id: int, count: int) -> None:
        # Mostly this only counts bytes: pump only for a WINDOW to send.
        if self.session.consumed(stream_id, count):
            self.pump()

    def local_lost(self, stream_id: int, why: str) -> None:
        """A local socket is gone; a stream still live on it is reset."""
        self._locals.pop(stream_id, None)
        if self.bulk is not None:
            self.bulk.forget(stream_id)
        if self.session.stream_info(stream_id) is not None:
            self.session.reset(stream_id, Reason.ABORTED, why)
            self.pump()

    def local_done(self, stream_id: int) -> None:
        """A local socket closed after EOF both ways; the session ends the stream itself."""
        self._locals.pop(stream_id, None)

    def connected(self, stream_id: int, local: StreamEnd) -> bool:
        """An iforward connect for the peer's stream completed."""
        self._connecting.pop(stream_id, None)
        if self.session.stream_info(stream_id) is None:
            return False
        self._locals[stream_id] = local
        self.session.accept(stream_id, self.reactor.seconds())
        early = self._early.pop(stream_id, None)
        if early is not None:
            # What the peer sent right behind its OPEN goes out at once, in one write.
            eof = early[-1] is None
            pieces: list[Payload] = [item for item in early if item is not None]
            if len(pieces) > MAX_PIECES:
                pieces = [b"".join(pieces)]
            if pieces:
                local.deliver(pieces[0] if len(pieces) == 1 else pieces)
            if eof:
                local.end_of_data()
        self.pump()
        return True

    # -------------------------------------------------------------- the pump

    def pump(self) -> None:
        """Handle the session's events and move its output to the channel.

        Re-entrant calls (a local transport calling back while we handle an
        event) just ask the running pump to go round again.
        """
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        session = self.session
        try:
            self._again = True
            while self._again:
                self._again = False
                if session.has_events:
                    self._dispatch_all(session.take_events())
                self._flush()
                if self.bulk is not None and self.bulk.waiting and self.protocol is not None:
                    # Streams waiting for a BULK turn get the channel once
                    # it is free; then go round for what the turns queued.
                    self._again = self.bulk.serve(self.protocol) or self._again
            protocol = self.protocol
            if protocol is not None and protocol.transport is not None:
                protocol.set_reading(not session.input_paused)
            self._schedule_timer()
        finally:
            self._pumping = False

    def _flush(self) -> None:
        protocol = self.protocol
        session = self.session
        if protocol is None or protocol.paused or protocol.transport is None:
            return
        if session.has_data_to_send():
            chunk = protocol.pacer.chunk
            data = session.pieces_to_send(chunk, chunk, self.reactor.seconds())
            protocol.wrote(data)
            # Go round again for events, and for more data if the kernel took
            # all of this at once (the transport will not ask for it).
            if session.has_events or (data and not protocol.paused and session.has_data_to_send()):
                self._again = True

    def _schedule_timer(self) -> None:
        """Keep one timer at or before the session's next deadline.

        A deadline that moved later (the usual case: keepalive times move
        with every frame received) leaves the timer alone; it fires early,
        ticks for nothing and is set again.
        """
        deadline = self.session.next_deadline()
        timer = self._timer
        if deadline is None or self._closing:
            if timer is not None:
                self._timer = None
                timer.cancel()
            return
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        delay = max(0.0, deadline - self.reactor.seconds())
        self._timer_at = deadline
        self._timer = self.reactor.callLater(delay + 0.001, self._on_timer)

    def log_counters(self) -> None:
        """Log the channel's trouble counters that changed since they were last logged."""
        self._counters_logged_at = self.reactor.seconds()
        stats = self.session.stats
        now = {name: getattr(stats, name) for name in TROUBLE_COUNTERS}
        changed = {k: v for k, v in now.items() if v != self._counters_logged.get(k, 0)}
        if not changed:
            return
        self._counters_logged = now
        self.log.info(
            "{label}: counters: {counters}",
            label=self.label,
            counters=" ".join(f"{k}={v}" for k, v in changed.items()),
        )

    def _on_timer(self) -> None:
        """The session's next deadline came (or one that has since moved later).

        Counters are checked here, not on every pump: with a session up the
        timer comes at least every keepalive interval, and a session's end
        logs them anyway.
        """
        self._timer = None
        now = self.reactor.seconds()
        self.session.tick(now)
        self.pump()
        if now - self._counters_logged_at >= COUNTER_LOG_INTERVAL:
            self.log_counters()

    def _dispatch_all(self, events: list[ev.Event]) -> None:
        """Dispatch events in order; consecutive data of one stream is written at once.

        Small payloads go first (see :func:`small_data_first`).
        """
        count = len(events)
        if count > 1 and type(events[0]) is ev.DataReceived:
            events = small_data_first(events)
        index = 0
        while index < count:
            event = events[index]
            index += 1
            if type(event) is not ev.DataReceived:
                self._dispatch(event)
                continue
            stream_id = event.stream_id
            pieces: list[Payload] | None = None
            while index < count:
                following = events[index]
                if (
                    type(following) is not ev.DataReceived
                    or following.stream_id != stream_id
                    or (pieces is not None and len(pieces) >= MAX_PIECES)
                ):
                    break
                if pieces is None:
                    pieces = [event.data]
                pieces.append(following.data)
                index += 1
            local = self._locals.get(stream_id)
            if local is not None:
                local.deliver(event.data if pieces is None else pieces)
                if pieces is None and len(event.data) <= INTERACTIVE_READ:
                    # A keystroke or request: its reply should not wait behind
                    # a large channel read.
                    now = self.reactor.seconds()
                    self.reads.delivered(len(event.data), now)
                    self._size_channel_reads(now)
            else:
                self._hold_early(stream_id, [event.data] if pieces is None else pieces)

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            local = self._locals.get(event.stream_id)
            if local is not None:
                local.deliver(event.data)
            else:
                self._hold_early(event.stream_id, [event.data])
        elif isinstance(event, ev.StreamWritable):
            local = self._locals.get(event.stream_id)
            if local is not None:
                local.resume_reading()
        elif isinstance(event, ev.EndOfData):
            local = self._locals.get(event.stream_id)
            if local is not None:
                local.end_of_data()
            else:
                self._hold_early(event.stream_id, [None])
        elif isinstance(event, ev.StreamClosed):
            self.opened_at.pop(event.stream_id, None)
            local = self._locals.pop(event.stream_id, None)
            if local is not None:
                local.stream_closed()
        elif isinstance(event, ev.StreamReset):
            self._abort_stream(event.stream_id, event.reason, event.message, event.by_peer)
        elif isinstance(event, ev.StreamRejected):
            self.opened_at.pop(event.stream_id, None)
            local = self._locals.pop(event.stream_id, None)
            if local is not None:
                local.stream_rejected(event.reason, event.message)
        elif isinstance(event, ev.StreamAccepted):
            local = self._locals.get(event.stream_id)
            if local is not None:
                local.stream_opened()
        elif isinstance(event, ev.StreamRequested):
            self._on_stream_requested(event.stream_id, event.service)
        elif isinstance(event, ev.SessionUp):
            self.up_since = self.reactor.seconds()
            self.log.info(
                "{label}: session up with peer {peer:016x} (max frame {frame}, window {window})",
                label=self.label,
                peer=event.peer_session,
                frame=event.peer_max_frame,
                window=event.peer_window,
            )
        elif isinstance(event, ev.LinkNotice):
            self.log.info("{label}: {message}", label=self.label, message=event.message)
        elif isinstance(event, ev.SessionEnded):
            self.log_counters()
            self.up_since = None
            self.log.info(
                "{label}: session ended with peer {peer:016x}: {reason}",
                label=self.label,
                peer=event.peer_session,
                reason=event.reason,
            )
            if event.silent and self.drop_on_silence and self.protocol is not None:
                transport = self.protocol.transport
                if transport is not None:
                    transport.abortConnection()  # type: ignore[attr-defined]

    def _abort_stream(self, stream_id: int, reason: int, message: str, by_peer: bool) -> None:
        self._early.pop(stream_id, None)
        if self.bulk is not None:
            self.bulk.forget(stream_id)
        self.opened_at.pop(stream_id, None)
        connecting = self._connecting.pop(stream_id, None)
        if connecting is not None:
            connecting.cancel()
        local = self._locals.pop(stream_id, None)
        if local is not None:
            who = "peer" if by_peer else "local"
            local.stream_reset(f"reset ({who}): {describe_reason(reason, message)}")

    def _on_stream_requested(self, stream_id: int, service: str) -> None:
        self.opened_at[stream_id] = self.reactor.seconds()
        if service == REMOTE_SERVICE:
            self._on_remote_request(stream_id)
            return
        endpoint = self.iforwards.get(service)
        if endpoint is None or self._closing:
            self.log.warn(
                "{label}: stream {id:#x}: peer asked for unknown service {service!r}; refused",
                label=self.label,
                id=stream_id,
                service=service,
            )
            self.session.reject(stream_id, Reason.NO_SERVICE, f"no service {service!r}")
            self.opened_at.pop(stream_id, None)
            return
        factory = (_client_factory or _load_client_factory())(self, stream_id, service)
        deferred: Deferred[Any] | None = connect_direct(endpoint, factory)
        if deferred is None:
            deferred = endpoint.connect(factory)
        if not deferred.called:  # an endpoint may connect (or fail) synchronously
            self._connecting[stream_id] = deferred
        deferred.addErrback(self._connect_failed, stream_id, service)

    def _on_remote_request(self, stream_id: int) -> None:
        """The peer asks us to listen for it: only a handler (set when the
        operator allowed some address) may accept."""
        handler = None
        if self.remote_handler is not None and not self._closing:
            handler = self.remote_handler(self, stream_id)
        if handler is None:
            self.log.warn(
                "{label}: stream {id:#x}: peer asked for a remote forward; refused "
                "(no --allow-remote-listen)",
                label=self.label,
                id=stream_id,
            )
            self.session.reject(stream_id, Reason.NO_SERVICE, "remote forwards not allowed")
            self.opened_at.pop(stream_id, None)
            return
        self.connected(stream_id, handler)

    def _hold_early(self, stream_id: int, items: Sequence[Payload | None]) -> None:
        """Data (or EOF, None: always last) that came right behind the peer's
        OPEN, while our connect is under way.  The session bounds it by the
        window our HELLO granted each stream; the bytes count as delivered
        (credit) only once the local socket took them.

        Held as copies: a payload may be a view into a whole channel read,
        which a few bytes of early data must not keep alive.
        """
        if self.session.stream_info(stream_id) is not None:
            held = self._early.setdefault(stream_id, [])
            held.extend(None if item is None else bytes(item) for item in items)

    def _connect_failed(self, failure: Failure, stream_id: int, service: str) -> None:
        self._early.pop(stream_id, None)
        self._connecting.pop(stream_id, None)
        self.opened_at.pop(stream_id, None)
        if failure.check(ConnectingCancelledError) or self.session.stream_info(stream_id) is None:
            return
        code = Reason.TIMEOUT if failure.check(TimeoutError) else Reason.REFUSED
        why = failure.getErrorMessage()
        self.log.warn(
            "{label}: stream {id:#x}: iforward {service!r} failed: {why}",
            label=self.label,
            id=stream_id,
            service=service,
            why=why,
        )
        self.session.reject(stream_id, code, why)
        self.pump()


#: ProxyClientFactory (virtproxy.factories imports this module): bound on first
#: use, not imported again for every stream.
_client_factory: Any = None


def _load_client_factory() -> Any:
    global _client_factory
    from virtproxy.factories import ProxyClientFactory

    _client_factory = ProxyClientFactory
    return ProxyClientFactory


def small_data_first(events: list[ev.Event]) -> list[ev.Event]:
    """Move small payloads (keystrokes, requests) ahead of the bulk data decoded with them.

    One channel read can hold 256 KiB of a bulk transfer with a keystroke at
    its end; written in order, the keystroke would wait until all of it went
    to its local socket.  Only payloads of the leading run of DataReceived
    events move, and only a stream's first one in it, so each stream's data
    keeps its order, and so does everything relative to other events.
    """
    seen: set[int] = set()
    moved: list[int] = []
    for index, event in enumerate(events):
        if type(event) is not ev.DataReceived:
            break
        if event.stream_id in seen:
            continue
        seen.add(event.stream_id)
        if index and len(event.data) <= INTERACTIVE_READ:
            moved.append(index)
    if not moved:
        return events
    skip = set(moved)
    return [events[i] for i in moved] + [e for i, e in enumerate(events) if i not in skip]
