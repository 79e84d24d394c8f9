"""The session and stream state machine: plain Python, no reactor, no clock.

Bytes from the channel go in through :meth:`Session.receive_data`, commands from
local sockets through methods such as :meth:`Session.open_stream` and
:meth:`Session.send`; bytes for the channel come out of
:meth:`Session.data_to_send` and events out of :meth:`Session.take_events`.
Time is an argument (``now``, in seconds), never read from a clock, so tests
and fuzzers drive it.  docs/protocol.rst specifies the behaviour.

A :class:`Session` object outlives channel connections: a client that connects
while the channel is down gets a *pending* stream that is opened as soon as a
session comes up (or fails when its open timeout passes).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from heapq import heappop, heappush

from virtproxy import events as ev
from virtproxy.frames import (
    BULK_TYPE,
    CAP_BULK,
    CAP_EARLY_DATA,
    CAP_HEADER_CRC,
    FLAG_HEADER_CRC,
    LINK_FRAME_TYPES,
    MAX_PAYLOAD,
    MAX_STREAM_NUMBER,
    MIN_MAX_FRAME,
    OPENER_BIT,
    RAW_TYPE,
    SESSION_FRAME_TYPES,
    Damage,
    Frame,
    FrameDecoder,
    FrameType,
    Reason,
    bulk_count,
    describe_reason,
    encode_bulk,
    encode_into,
)
from virtproxy.link import LinkStats, ReliableLink, chunk_size

_HELLO = struct.Struct(">QQIIII")
#: HELLO field appended after the version-1 fields: the session window.
_HELLO_SESSION_WINDOW = struct.Struct(">I")
_WINDOW = struct.Struct(">I")
MAX_WINDOW = 0x7FFFFFFF
#: Bytes in flight are kept near the peer's best delivery rate times this, so
#: queues hidden below us (kernel, pty, relays, a UART) stay short.
FLIGHT_TARGET = 0.030
#: ... but never below this many bytes.
FLIGHT_MIN = 2048
#: Before the first rate sample: small, since a slow line fills its hidden
#: buffers at once; a fast link outgrows it in a few round trips.
FLIGHT_INITIAL = 2 * FLIGHT_MIN
#: Fewer raw bytes than this go as DATA frames: a BULK frame saves little
#: below it, and takes a turn of its own.
BULK_MIN = 64 * 1024
#: Re-probe if a probe PING went unanswered this long.
PROBE_TIMEOUT = 1.0
#: A stream with at most this many bytes queued (keystrokes, requests) may send
#: past an exhausted flight cap: it must not wait a probe round trip.
INTERACTIVE_BYTES = 512
#: The part of the peer's session credit that only such streams may use (a
#: sixteenth of its session window, at most this much): streams whose
#: destinations stall can hold the rest, but never a keystroke's share.
SESSION_RESERVE_MAX = 1024 * 1024
#: A session window too small to spare a reserve of at least this much has none.
SESSION_RESERVE_MIN = 64 * 1024
#: Delivery-rate samples older than this are forgotten (max filter window).
RATE_WINDOW = 1.0
_COUNTER = struct.Struct(">Q")
#: HELLO flag: the sender's session is not up yet, so answer even if you agree.
HELLO_ANSWER = 0x01
MAX_SERVICE_NAME = 64
MAX_MESSAGE = 200
_SERVICE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

#: Streams we ended (or refused) lately, remembered with the DATA credit the
#: peer may still spend on them: DATA in flight when they ended is dropped
#: quietly, DATA past that credit is a protocol error.
_RECENT_RESETS = 4096
#: Above this many queued control frames the owner should stop reading the
#: channel: a peer that sends without reading must not grow our memory.
CONTROL_HIGH_WATER = 4096


def valid_service_name(name: bytes) -> bool:
    return 0 < len(name) <= MAX_SERVICE_NAME and _SERVICE_CHARS.issuperset(name)


@dataclass
class SessionConfig:
    """Limits and timers of one side.  See docs/protocol.rst for their meaning."""

    max_frame: int = 16384
    window: int = 256 * 1024
    max_streams: int = 1024
    #: Peer OPENs accepted per second, sustained; bursts up to twice that.
    #: Each one costs a local connect, and opening and resetting streams in a
    #: loop ("rapid reset") must not turn a peer into a connect flood.
    max_open_rate: float = 1000.0
    #: Peer RESETs accepted per second, sustained (bursts of twice that); a peer
    #: resetting faster loses its session.
    max_reset_rate: float = 1000.0
    #: DATA bytes the peer may have sent and we not yet delivered, over all its
    #: streams together: the bound on what one session can make us buffer.
    session_window: int = 64 * 1024 * 1024
    #: Our own opens waiting for a session or a free peer slot.
    max_pending: int = 1024
    #: Longest service name the peer may open (at most MAX_SERVICE_NAME).
    max_service_name: int = 64
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 20.0
    hello_interval: float = 1.0
    open_timeout: float = 10.0
    #: The channel is a kernel-checksummed socket (TCP, UNIX): offer and use
    #: header-only checks on DATA (docs/protocol.rst, "Header-only checks").
    header_crc: bool = False
    #: The channel is such a socket and our owner can take and send BULK
    #: frames' raw bytes (docs/protocol.rst, "Bulk data"): offer CAP_BULK.
    bulk: bool = False
    #: Bytes queued on one stream (unsent) above which ``send`` asks the caller
    #: to stop reading its local socket.
    send_high_water: int = 256 * 1024
    #: Link reliability (virtproxy/link.py): "on" carries everything in
    #: acknowledged, retransmitted chunks; "auto" does so once the peer does;
    #: "off" never (a peer that insists gets no session).
    link: str = "auto"
    #: Send a stream's first bytes right behind its OPEN when the peer accepts
    #: that (a round trip less for every short connection), and accept them.
    early_data: bool = True
    #: Seconds an OPEN_OK to a peer that sends early data may wait for company
    #: (the stream's first DATA, usually a reply): one write instead of two.
    #: No data waits for it; the opener needs it only to accept our DATA.
    open_ok_delay: float = 0.0

    def __post_init__(self) -> None:
        if not MIN_MAX_FRAME <= self.max_frame <= MAX_PAYLOAD:
            raise ValueError(f"max_frame must be {MIN_MAX_FRAME}..{MAX_PAYLOAD}")
        if not self.max_frame <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be max_frame..{MAX_WINDOW}")
        if self.max_streams < 1:
            raise ValueError("max_streams must be positive")
        if self.max_open_rate <= 0 or self.max_reset_rate <= 0:
            raise ValueError("max_open_rate and max_reset_rate must be positive")
        if not self.window <= self.session_window <= MAX_WINDOW:
            raise ValueError(f"session_window must be window..{MAX_WINDOW}")
        if self.max_pending < 1:
            raise ValueError("max_pending must be positive")
        if not 1 <= self.max_service_name <= MAX_SERVICE_NAME:
            raise ValueError(f"max_service_name must be 1..{MAX_SERVICE_NAME}")
        if not 0 <= self.open_ok_delay < self.open_timeout:
            raise ValueError("open_ok_delay must be 0..open_timeout")
        if not 0 < self.keepalive_interval < self.keepalive_timeout:
            raise ValueError("need 0 < keepalive_interval < keepalive_timeout")
        if self.link not in LINK_MODES:
            raise ValueError(f"link must be one of {', '.join(LINK_MODES)}")


LINK_MODES = ("on", "auto", "off")
#: What the channel decoder accepts while the link layer is on.
LINK_DECODER_TYPES = LINK_FRAME_TYPES | {FrameType.HELLO}
#: An auto-mode side drops the link after this many plain HELLOs in a row.
PLAIN_HELLOS_TO_DROP_LINK = 3


class TokenBucket:
    """``rate`` events a second, sustained, in bursts of up to twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 2.0 * rate
        self.at = 0.0

    def take(self, now: float) -> bool:
        """Spend a token if one is there (time is an argument, as everywhere here)."""
        elapsed = max(0.0, now - self.at)
        self.tokens = min(2.0 * self.rate, self.tokens + elapsed * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class State(Enum):
    DISCONNECTED = auto()
    HANDSHAKING = auto()
    UP = auto()


class StreamState(Enum):
    PENDING = auto()  # ours, waiting for a session (or a free slot at the peer)
    OPENING = auto()  # ours, OPEN sent
    ACCEPTING = auto()  # theirs, waiting for our owner to accept or reject
    OPEN = auto()


# Bound once for the per-frame paths: an enum attribute lookup costs several
# times a global's.
_UP = State.UP
_OPEN = StreamState.OPEN
_OPENING = StreamState.OPENING
_HELLO_TYPE = int(FrameType.HELLO)
_NEVER = float("inf")
_DATA_TYPE = int(FrameType.DATA)


@dataclass(eq=False)
class Stream:
    key: int
    service: str
    ours: bool
    state: StreamState
    deadline: float = 0.0
    send_credit: int = 0
    recv_credit: int = 0
    unacked: int = 0
    queue: deque[bytes] = field(default_factory=deque)
    head_offset: int = 0
    queued: int = 0
    eof_pending: bool = False
    eof_sent: bool = False
    eof_received: bool = False
    ready: bool = False
    blocked: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    #: DATA received and not yet taken by the local socket (session window).
    unconsumed: int = 0
    #: Data may flow before OPEN_OK (ours: sent behind the OPEN; theirs: taken
    #: while our local connect is under way).
    early: bool = False


@dataclass
class Stats(LinkStats):
    """Counters kept for the life of the Session object (all connections).

    The link layer's counters (retransmits and so on) are inherited.
    """

    sessions: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    damaged_frames: int = 0
    resyncs: int = 0
    discarded_bytes: int = 0
    lost_frames: int = 0
    stale_frames: int = 0
    protocol_errors: int = 0
    keepalive_timeouts: int = 0
    limit_hits: int = 0
    #: Stream bytes sent and received as BULK frames' raw bytes (not DATA).
    bulk_bytes_out: int = 0
    bulk_bytes_in: int = 0


def _new_session_id() -> int:
    while True:
        value = int.from_bytes(os.urandom(8), "big")
        if value:
            return value


class Session:
    """One side of a virtproxy session over one channel."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.stats = Stats()
        self.state = State.DISCONNECTED
        self.session_id = 0
        self.peer_session = 0
        self.peer_max_frame = MIN_MAX_FRAME
        self.peer_window = 0
        self.peer_max_streams = 0
        self.streams: dict[int, Stream] = {}
        self._events: list[ev.Event] = []
        self._decoder = FrameDecoder(self.config.max_frame, self.config.header_crc)
        #: Link reliability on this channel connection (None: plain frames).
        self.link: ReliableLink | None = None
        #: Decodes the session frames the link layer delivers.
        self._inner = FrameDecoder(self.config.max_frame, self.config.header_crc)
        #: We offer BULK frames (never with the link on: it cuts the byte
        #: stream into chunks), and we may send them (the peer offered too).
        self._bulk_offered = self.config.bulk and self.config.link != "on"
        self._decoder.bulk_ok = self._inner.bulk_ok = self._bulk_offered
        self._bulk_out = False
        #: The last bytes received held a BULK frame or its raw bytes.
        self.bulk_arrived = False
        #: The stream the current BULK frame's raw bytes go to (None: dropped).
        self._raw_target: Stream | None = None
        self._link_refused = False
        self._plain_hellos = 0
        self._now = 0.0
        self._hellos_sent = 0  # in this session: the seq of our next HELLO
        self._peer_hello_seq = -1  # seq of the peer's last HELLO we acted on
        #: Not up, and the peer's last HELLO named no session of ours: a new
        #: peer, which goes up on our answer.  Any other frame from it then
        #: means the HELLO that would have brought us up was lost.
        self._peer_may_be_up = False
        self._data_flags = 0  # FLAG_HEADER_CRC once both sides offered it
        self._control: deque[tuple[int, int, bytes]] = deque()
        self._hello_queued = False
        #: The control queue holds only this many OPEN_OKs that may wait (for
        #: company) until _lazy_until; any other control frame sends them all.
        self._lazy = 0
        self._lazy_until = 0.0
        self._ready: deque[Stream] = deque()
        self._pending: deque[int] = deque()
        self._tx_seq = 0
        self._rx_seq = 0
        self._next_number = 1
        self._highest_peer_number = 0
        self._peer_opened = 0  # live streams the peer opened
        self._we_opened = 0  # live streams we opened that the peer counts
        self._recent_resets: OrderedDict[int, int] = OrderedDict()
        self._deadlines: list[tuple[float, int]] = []
        self._last_received = 0.0
        self._last_ping = 0.0
        self._next_hello = 0.0
        self._ping_counter = 0
        # In-flight bound (docs/protocol.rst, "Bytes in flight").
        self._data_sent = 0  # DATA payload bytes sent since our last HELLO
        self._data_received = 0  # DATA payload bytes received since the peer's last HELLO
        self._peer_received = 0  # the peer's _data_received, from its latest PONG
        self._probe_at: float | None = None
        self._probe_bytes = 0
        self._last_pong: tuple[float, int] | None = None
        self._rates: deque[tuple[float, float]] = deque()
        self.flight_cap: int | None = FLIGHT_INITIAL
        #: Peer OPENs and RESETs ("rapid reset" would turn a peer into a connect flood).
        self._opens = TokenBucket(self.config.max_open_rate)
        self._resets = TokenBucket(self.config.max_reset_rate)
        # Session window (docs/protocol.rst, "Flow control"); None: no bound.
        self._session_credit: int | None = None  # what we may still send
        self._session_reserve = 0  # of it, kept for streams with little queued
        self._session_recv_credit = self.config.session_window  # what the peer may
        self._session_unacked = 0  # delivered since our last session WINDOW
        self._peer_early = False  # the peer takes DATA right behind an OPEN

    # ------------------------------------------------------------------ owner API

    def take_events(self) -> list[ev.Event]:
        events, self._events = self._events, []
        return events

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    @property
    def is_up(self) -> bool:
        return self.state is State.UP

    @property
    def input_paused(self) -> bool:
        """True while the owner should stop reading the channel (see CONTROL_HIGH_WATER)."""
        return len(self._control) > CONTROL_HIGH_WATER

    def connection_made(self, now: float) -> None:
        """A channel connected: start a new session with a fresh id."""
        if self.state is not State.DISCONNECTED:
            self.connection_lost(now, "replaced by a new channel connection")
        self._decoder.reset()
        self._inner.reset()
        self._set_link(ReliableLink(self.stats) if self.config.link == "on" else None)
        self._link_refused = False
        self._plain_hellos = 0
        self._start_handshake(now)

    def connection_lost(self, now: float, reason: str = "channel lost") -> None:
        """The channel went away: end the session; pending opens wait for the next."""
        self._end_session(reason, Reason.SESSION_LOST)
        self.state = State.DISCONNECTED
        self._control.clear()
        self._lazy = 0
        self._hello_queued = False
        self._set_link(None)

    def go_away(self, now: float, reason: int = Reason.SHUTDOWN, message: str = "") -> None:
        """Tell the peer we are leaving, and end every stream (shutdown)."""
        if self.state is not State.DISCONNECTED:
            self._queue_reason(FrameType.GOAWAY, 0, reason, message)
        leaving = "this side is shutting down"
        self._end_session(message or leaving, reason)
        for stream in list(self.streams.values()):
            self._drop(stream)
            self._events.append(ev.StreamRejected(stream.key, reason, leaving))
        self.state = State.DISCONNECTED

    def open_stream(self, service: str, now: float) -> int:
        """Open a stream to the peer's iforward ``service``; returns the stream id.

        The stream waits (PENDING) until a session is up and the peer has a free
        slot; it fails with TIMEOUT after ``config.open_timeout``.
        """
        name = service.encode("ascii")
        if not valid_service_name(name):
            raise ValueError(f"invalid service name {service!r}")
        if self._next_number > MAX_STREAM_NUMBER:
            raise RuntimeError("stream numbers exhausted")
        key = self._next_number
        self._next_number += 1
        stream = Stream(key, service, ours=True, state=StreamState.PENDING)
        if len(self._pending) >= self.config.max_pending:
            self.stats.limit_hits += 1
            self._events.append(ev.StreamRejected(key, Reason.LIMIT, "too many opens waiting"))
            return key
        stream.deadline = now + self.config.open_timeout
        heappush(self._deadlines, (stream.deadline, key))
        self.streams[key] = stream
        self._pending.append(key)
        self._send_pending_opens()
        return key

    def accept(self, stream_id: int, now: float | None = None) -> None:
        """Our local connect for the peer's OPEN succeeded."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state is not StreamState.ACCEPTING:
            return
        self._control.append((FrameType.OPEN_OK, stream_id ^ OPENER_BIT, b""))
        delay = self.config.open_ok_delay
        if delay and stream.early and self._peer_early and self._lazy == len(self._control) - 1:
            # The opener already sends; our OPEN_OK can ride with our first DATA.
            if not self._lazy:
                self._lazy_until = (self._now if now is None else now) + delay
            self._lazy += 1
        self._now_open(stream)

    def reject(self, stream_id: int, reason: int, message: str = "") -> None:
        """Our local connect for the peer's OPEN failed (or no such service)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state is not StreamState.ACCEPTING:
            return
        self._queue_reason(FrameType.OPEN_FAIL, stream_id ^ OPENER_BIT, reason, message)
        self._drop(stream)

    def send(self, stream_id: int, data: bytes, hold: bool = False) -> bool:
        """Queue ``data`` for the stream.  False means: stop reading, you'll get StreamWritable.

        ``hold``: stop reading anyway, until these bytes went out (a bulk
        stream waits for its turn to send a BULK frame, see :meth:`bulk_room`).
        """
        stream = self.streams.get(stream_id)
        if stream is None or stream.eof_pending or not data:
            return stream is not None and not stream.blocked
        stream.queue.append(data)
        stream.queued += len(data)
        if (stream.state is StreamState.OPEN or stream.early) and stream.send_credit > 0:
            self._mark_ready(stream)
        if hold or stream.queued >= self.config.send_high_water:
            stream.blocked = True
            return False
        return True

    def send_eof(self, stream_id: int) -> None:
        """The local socket stopped sending: EOF follows the queued data."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.eof_pending:
            return
        stream.eof_pending = True
        if stream.state is StreamState.OPEN or stream.early:
            self._mark_ready(stream)

    def reset(self, stream_id: int, reason: int = Reason.ABORTED, message: str = "") -> None:
        """Abort a stream from this side (its local socket failed or closed early)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.state is not StreamState.PENDING:
            self._queue_reason(FrameType.RESET, stream_id ^ OPENER_BIT, reason, message)
        self._drop(stream)

    def consumed(self, stream_id: int, count: int) -> bool:
        """The local socket really took ``count`` bytes of this stream: grant credit.

        True if that queued a WINDOW frame (mostly it only counts bytes, and
        the owner need not look for output).
        """
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        queued = len(self._control)
        taken = min(count, stream.unconsumed)
        stream.unconsumed -= taken
        self._credit_session(taken)
        if not stream.eof_received and (stream.state is StreamState.OPEN or stream.early):
            stream.unacked += count
            # Early data taken before our OPEN_OK is granted back right behind it.
            if stream.unacked >= self.config.window // 4 and stream.state is StreamState.OPEN:
                self._grant(stream)
        return len(self._control) != queued

    def stream_info(self, stream_id: int) -> Stream | None:
        return self.streams.get(stream_id)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` has something to do.

        The owner asks after every batch of work, so this keeps to plain
        comparisons (no list, no ``min`` of one).
        """
        state = self.state
        at = _NEVER
        if state is _UP:
            config = self.config
            received = self._last_received
            at = max(received, self._last_ping) + config.keepalive_interval
            at = min(at, received + config.keepalive_timeout)
            if self._probe_at is not None:
                at = min(at, self._probe_at + PROBE_TIMEOUT)
        elif state is State.HANDSHAKING:
            at = self._next_hello
        if state is not State.DISCONNECTED:
            stall = self._decoder.stall_deadline()
            if stall is not None and stall < at:
                at = stall
        if self._deadlines and self._deadlines[0][0] < at:
            at = self._deadlines[0][0]
        if self._lazy and self._control and self._lazy_until < at:
            at = self._lazy_until
        if self.link is not None:
            resend = self.link.deadline()
            if resend is not None and resend < at:
                at = resend
        return None if at == _NEVER else at

    def tick(self, now: float) -> None:
        """Run timers due at ``now``: open timeouts, HELLO resends, keepalive,
        and a truncated frame's stall."""
        self._now = now
        if self.state is not State.DISCONNECTED:
            self._handle_decoded(self._decoder.expire(now), now)
        if self.link is not None:
            self.link.tick(now)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heappop(self._deadlines)
            stream = self.streams.get(key)
            if stream is None or stream.state not in (
                StreamState.PENDING,
                StreamState.OPENING,
            ):
                continue
            if stream.deadline > now:
                continue
            if stream.state is StreamState.OPENING:
                self._queue_reason(FrameType.RESET, key ^ OPENER_BIT, Reason.TIMEOUT, "")
                message = "the peer did not answer the open in time"
            elif self.state is State.UP:
                message = "the peer had no free stream slot in time"
            else:
                message = "no session with the peer in time"
            self._drop(stream)
            self._events.append(ev.StreamRejected(key, Reason.TIMEOUT, message))
        if self.state is State.HANDSHAKING and now >= self._next_hello:
            self._queue_hello()
            self._next_hello = now + self.config.hello_interval
        elif self.state is State.UP:
            if now - self._last_received >= self.config.keepalive_timeout:
                self.stats.keepalive_timeouts += 1
                self._restart(
                    now,
                    "keepalive timeout: the peer fell silent",
                    Reason.SESSION_LOST,
                    silent=True,
                )
            elif now - max(self._last_received, self._last_ping) >= self.config.keepalive_interval:
                self._last_ping = now
                self._control.append((FrameType.PING, 0, self._ping_token()))

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the channel."""
        self.bulk_arrived = self._decoder.raw_left > 0
        self.stats.bytes_in += len(data)
        self._now = now
        self._handle_decoded(self._decoder.feed(data, now), now)

    def _handle_decoded(self, items: list[Frame | Damage], now: float, inner: bool = False) -> None:
        """Frames from the channel (or, ``inner``, from the link layer's byte stream)."""
        decoder = self._decoder
        stats = self.stats
        stats.damaged_frames = decoder.damaged + self._inner.damaged
        stats.resyncs = decoder.resyncs + self._inner.resyncs
        stats.discarded_bytes = decoder.discarded + self._inner.discarded
        for item in items:
            if item.type == RAW_TYPE:
                self._on_raw(item)  # type: ignore[arg-type]
                continue
            if item.type == BULK_TYPE:
                self._raw_target = None  # until the session accepts the frame
                self.bulk_arrived = True
            if item.type in LINK_FRAME_TYPES:
                if inner:
                    stats.protocol_errors += 1  # a link frame inside the link: nonsense
                else:
                    self._on_link_item(item, now)
            elif self.link is not None and not inner and not self._plain_again(item):
                # Once the link is on, every frame comes in a chunk.  A plain frame
                # here is one the decoder found inside a damaged chunk while
                # resynchronising: the link delivers it (again) once repaired.
                stats.stale_frames += 1
            elif isinstance(item, Damage):
                self._on_damage(item, now)
            else:
                stats.frames_in += 1
                self._on_frame(item, now)

    def _set_link(self, link: ReliableLink | None) -> None:
        """Turn the link layer on or off for this channel connection.

        With it on, the channel decoder looks for link frames (and HELLOs, see
        :meth:`_plain_again`) only: a session frame header found inside a
        damaged chunk is skipped at once instead of waiting for its payload.
        """
        self.link = link
        self._decoder.only_types = None if link is None else LINK_DECODER_TYPES

    def _plain_again(self, item: Frame | Damage) -> bool:
        """Did the peer go back to plain frames (a restart, in auto mode or off)?

        In auto mode, only a run of plain HELLOs with no chunk in between says
        so (frames found inside damaged chunks always come among intact ones),
        and the link goes off.  With the link on, the peer is asked to follow.
        """
        if item.type != FrameType.HELLO or isinstance(item, Damage):
            return False
        if self.config.link == "on":
            assert self.link is not None
            self.link.nudge()  # a new peer in auto mode: our next chunk turns its link on
            return False
        self._plain_hellos += 1
        if self._plain_hellos < PLAIN_HELLOS_TO_DROP_LINK:
            return False
        self._set_link(None)
        self._inner.reset()
        self._events.append(ev.LinkNotice("link reliability off: the peer stopped using it"))
        return True

    def _on_link_item(self, item: Frame | Damage, now: float) -> None:
        link = self.link
        if link is None:
            if self.state is State.DISCONNECTED or isinstance(item, Damage):
                return
            if self.config.link == "off":
                self.stats.protocol_errors += 1
                if not self._link_refused:
                    self._link_refused = True
                    self._events.append(
                        ev.LinkNotice("the peer uses link reliability, which --link off refuses")
                    )
                return
            link = ReliableLink(self.stats)
            self._set_link(link)
            self._events.append(ev.LinkNotice("link reliability on: the peer uses it"))
        if isinstance(item, Damage):
            link.on_damage(item)
            return
        self._plain_hellos = 0
        if item.type == FrameType.LINK_ACK:
            link.on_ack(item, now)
        else:
            data = link.on_data(item, now)
            if link.peer_restarted:
                link.peer_restarted = False
                self._inner.reset()  # a cut-off frame of the old link is gone for good
            if data:
                self._handle_decoded(self._inner.feed(data, now), now, inner=True)

    def _on_damage(self, damage: Damage, now: float) -> None:
        if self.state is not State.UP or damage.seq != self._rx_seq:
            return  # a lost frame shows up as a sequence gap on the next good one
        self._rx_seq = (self._rx_seq + 1) & 0xFF
        if damage.type == FrameType.DATA:
            self._data_received += damage.length
        if damage.type in SESSION_FRAME_TYPES:
            return
        if damage.type == FrameType.DATA or damage.type == FrameType.EOF:
            key = damage.stream
            stream = self.streams.get(key)
            if stream is not None:
                self.reset(key, Reason.CORRUPT, "a frame of this stream was damaged")
                self._events.append(
                    ev.StreamReset(key, Reason.CORRUPT, "damaged frame on the channel", False)
                )
            return  # data of a stream that is gone already: nothing else lost
        # Losing a control frame (OPEN, WINDOW, RESET...) can wedge any stream.
        self._restart(now, "a damaged control frame", Reason.CORRUPT)

    def _on_frame(self, frame: Frame, now: float) -> None:
        ftype = frame.type
        if ftype == _HELLO_TYPE:
            if self._duplicate_hello(frame):
                self.stats.stale_frames += 1
                return
            self._rx_seq = 0
            self._data_received = 0
            self._on_hello(frame, now)
            return
        if self.state is not _UP:
            if self._peer_may_be_up:
                # The peer is up and sending, and we discard what it sends:
                # its HELLO that named us was lost.  Lost frames, as below.
                self.stats.lost_frames += 1
                self._restart(now, "frames were lost during the handshake", Reason.CORRUPT)
                return
            self.stats.stale_frames += 1
            return
        if frame.seq != self._rx_seq:
            self.stats.lost_frames += (frame.seq - self._rx_seq) & 0xFF
            self._restart(now, "frames were lost on the channel", Reason.CORRUPT)
            return
        self._rx_seq = (self._rx_seq + 1) & 0xFF
        self._last_received = now
        if ftype == _DATA_TYPE and not frame.flags & ~FLAG_HEADER_CRC:
            # The common case first, without the dispatch below.
            stream = self.streams.get(frame.stream)
            if stream is None:
                self._on_unknown_stream(frame, frame.stream)
            else:
                self._on_data(frame, stream)
            return
        if frame.flags:
            self._on_unknown_flags(frame)
            return
        handler = _HANDLERS.get(ftype)
        if handler is None:
            self.stats.protocol_errors += 1
            return
        if ftype in SESSION_FRAME_TYPES:  # HELLO was handled above
            if frame.stream:
                self.stats.protocol_errors += 1
                return
            handler(self, frame, now)
            return
        key = frame.stream
        if ftype == FrameType.OPEN:
            self._on_open(frame, key, now)
            return
        if not key and ftype == FrameType.WINDOW:
            self._on_session_window(frame)
            return
        stream = self.streams.get(key)
        if stream is None:
            self._on_unknown_stream(frame, key)
            return
        handler(self, frame, stream)

    def _on_unknown_flags(self, frame: Frame) -> None:
        """A frame with flags we do not know.  Its stream, if we have it, is
        reset on both sides: the RESET alone would leave our local socket open
        on a stream the peer has forgotten, and its client waiting for ever."""
        key = frame.stream
        stream = self.streams.get(key) if key and frame.type not in SESSION_FRAME_TYPES else None
        if stream is None:
            self._protocol_error(frame, "unknown flags")
            return
        self._data_received += _stream_bytes(frame)  # they still crossed the line
        self._stream_protocol_error(stream, "unknown flags")

    def _duplicate_hello(self, frame: Frame) -> bool:
        """A HELLO we already acted on, repeated by the line (not sent again).

        A HELLO's ``seq`` counts the HELLOs its sender sent in this session;
        acting on a repeated one would reset the sequence check and let the
        repeated frames after it through a second time.
        """
        if len(frame.payload) < 8 or self.state is not State.UP:
            return False
        (their,) = struct.unpack_from(">Q", frame.payload)
        return their == self.peer_session and frame.seq == self._peer_hello_seq

    def _on_hello(self, frame: Frame, now: float) -> None:
        if frame.stream or len(frame.payload) < _HELLO.size:
            self.stats.protocol_errors += 1
            return
        their, seen, max_frame, window, max_streams, caps = _HELLO.unpack_from(frame.payload)
        session_window: int | None = None  # an older peer: no session bound
        if len(frame.payload) >= _HELLO.size + _HELLO_SESSION_WINDOW.size:
            (session_window,) = _HELLO_SESSION_WINDOW.unpack_from(frame.payload, _HELLO.size)
        if (
            not their
            or not MIN_MAX_FRAME <= max_frame <= MAX_PAYLOAD
            or not max_frame <= window <= MAX_WINDOW
            or not max_streams
            or (session_window is not None and not window <= session_window <= MAX_WINDOW)
        ):
            self.stats.protocol_errors += 1
            return
        if self.state is State.DISCONNECTED:
            return
        self._peer_hello_seq = frame.seq
        known = their == self.peer_session
        if not known:
            if self.state is State.UP:
                self._end_session("the peer restarted (new session id)", Reason.SESSION_LOST)
                self.state = State.HANDSHAKING
            self.peer_session = their
            # A new peer numbers its streams from 1 again.
            self._highest_peer_number = 0
            self._recent_resets.clear()
            self.peer_max_frame = max_frame
            self.peer_window = window
            self.peer_max_streams = max_streams
            self._session_credit = session_window
            self._session_reserve = _session_reserve(session_window)
            self._session_recv_credit = self.config.session_window
            self._session_unacked = 0
            self._peer_early = bool(caps & CAP_EARLY_DATA)
            self._bulk_out = self._bulk_offered and bool(caps & CAP_BULK)
            both = self.config.header_crc and caps & CAP_HEADER_CRC
            self._data_flags = FLAG_HEADER_CRC if both else 0
        self._peer_may_be_up = not seen and self.state is not State.UP
        if seen == self.session_id and self.state is not State.UP:
            self.state = State.UP
            self._last_received = now
            self._last_ping = now
            self.stats.sessions += 1
            self._events.append(ev.SessionUp(their, max_frame, window))
        if not (known and seen == self.session_id) or frame.flags & HELLO_ANSWER:
            self._queue_hello()
        if self.state is State.UP:
            self._send_pending_opens()

    def _on_ping(self, frame: Frame, now: float) -> None:
        # Only the newest unanswered PING is kept: a peer cannot grow our queue.
        for index, (ftype, _, _) in enumerate(self._control):
            if ftype == FrameType.PONG:
                del self._control[index]
                break
        pong = bytes(frame.payload[:8]).ljust(8, b"\0") + _COUNTER.pack(self._data_received)
        self._control.appendleft((FrameType.PONG, 0, pong))

    def _on_pong(self, frame: Frame, now: float) -> None:
        """Liveness came with any frame; a PONG also tells how much DATA arrived."""
        self._probe_at = None
        if len(frame.payload) < 16:
            self.flight_cap = None  # a peer that does not count: no end-to-end bound
            return
        (received,) = _COUNTER.unpack_from(frame.payload, 8)
        if not self._peer_received <= received <= self._data_sent:
            return  # from before our last HELLO, or nonsense
        self._peer_received = received
        if self._last_pong is not None:
            then, before = self._last_pong
            if received > before:
                rate = (received - before) / max(now - then, 0.001)
                self._rates.append((now, rate))
                while self._rates and self._rates[0][0] < now - RATE_WINDOW:
                    self._rates.popleft()
                best = max(sample for _, sample in self._rates)
                self.flight_cap = max(FLIGHT_MIN, int(1.25 * best * FLIGHT_TARGET))
        self._last_pong = (now, received)

    def _on_goaway(self, frame: Frame, now: float) -> None:
        reason, message = _parse_reason(frame.payload)
        text = f"the peer went away ({describe_reason(reason, message)})"
        self._restart(now, text, Reason.SESSION_LOST)

    def _take_reset_token(self) -> bool:
        """A peer RESET within max_reset_rate; past it, the session ends."""
        if self._resets.take(self._now):
            return True
        self.stats.limit_hits += 1
        self._restart(self._now, "the peer resets streams too fast", Reason.LIMIT)
        return False

    def _take_session_credit(self, size: int) -> bool:
        """Count peer DATA against the session window; past it, the session ends."""
        if size <= self._session_recv_credit:
            self._session_recv_credit -= size
            return True
        self.stats.protocol_errors += 1
        self._restart(self._now, "peer error: DATA beyond the session window", Reason.PROTOCOL)
        return False

    def _credit_session(self, count: int) -> None:
        """Bytes left our buffers: give the peer that much session credit back."""
        if not count or self.state is State.DISCONNECTED:
            return
        self._session_recv_credit += count
        self._session_unacked += count
        if self._session_unacked >= self.config.session_window // 4:
            increment, self._session_unacked = self._session_unacked, 0
            self._control.append((FrameType.WINDOW, 0, _WINDOW.pack(increment)))

    def _on_session_window(self, frame: Frame) -> None:
        credit = self._session_credit
        if len(frame.payload) != _WINDOW.size or credit is None:
            self.stats.protocol_errors += 1
            return
        (increment,) = _WINDOW.unpack(frame.payload)
        if not increment or credit + increment > MAX_WINDOW:
            self.stats.protocol_errors += 1
            return
        self._session_credit = credit + increment

    def _refuse_open(self, frame: Frame, message: str) -> None:
        """OPEN_FAIL(LIMIT): a limit of ours, not a fault of the peer's."""
        self.stats.limit_hits += 1
        self._queue_reason(FrameType.OPEN_FAIL, frame.stream ^ OPENER_BIT, Reason.LIMIT, message)
        self._refused(frame.stream)

    def _refused(self, key: int) -> None:
        """An OPEN we answered with OPEN_FAIL at once: early data may follow it."""
        self._remember_ended(key, self.config.window if self.config.early_data else 0)

    def _on_open(self, frame: Frame, key: int, now: float) -> None:
        number = key & MAX_STREAM_NUMBER
        duplicate = self.streams.get(key)
        if duplicate is not None:
            self._stream_protocol_error(duplicate, "OPEN for a stream already open")
            return
        if not key & OPENER_BIT or number <= self._highest_peer_number:
            self._protocol_error(frame, "OPEN with a used or invalid stream id")
            return
        self._highest_peer_number = number
        name = bytes(frame.payload)  # not DATA, so bytes already: no copy
        if valid_service_name(name) and len(name) > self.config.max_service_name:
            self._refuse_open(frame, "service name too long")
            return
        if not valid_service_name(name):
            self.stats.protocol_errors += 1
            self._queue_reason(
                FrameType.OPEN_FAIL, frame.stream ^ OPENER_BIT, Reason.PROTOCOL, "bad service name"
            )
            self._refused(key)
            return
        if self._peer_opened >= self.config.max_streams:
            self._refuse_open(frame, "too many streams")
            return
        if not self._opens.take(now):
            self._refuse_open(frame, "opening too fast")
            return
        self._peer_opened += 1
        stream = Stream(key, name.decode("ascii"), ours=False, state=StreamState.ACCEPTING)
        if self.config.early_data:
            stream.early = True
            stream.recv_credit = self.config.window
        self.streams[key] = stream
        self._events.append(ev.StreamRequested(key, stream.service))

    def _on_unknown_stream(self, frame: Frame, key: int) -> None:
        is_data = frame.type == _DATA_TYPE or frame.type == BULK_TYPE
        size = _stream_bytes(frame)
        if is_data:
            self._data_received += size  # it still crossed the line
            if self._take_session_credit(size):
                self._credit_session(size)  # dropped: delivered, as it were
        credit = self._recent_resets.get(key)
        if credit is not None:
            # In flight when we ended (or refused) it, early DATA of a refused
            # OPEN included: dropped, but only up to the credit the peer had.
            if is_data:
                if size > credit:
                    self._protocol_error(frame, "DATA beyond the granted window")
                self._recent_resets[key] = max(0, credit - size)
            return
        number = key & MAX_STREAM_NUMBER
        known_range = self._highest_peer_number if key & OPENER_BIT else self._next_number - 1
        if number and number <= known_range:
            return  # an old stream, ended on our side already
        self._protocol_error(frame, "frame for a stream that never existed")

    def _on_open_ok(self, frame: Frame, stream: Stream) -> None:
        if stream.state is not StreamState.OPENING:
            self._stream_protocol_error(stream, "unexpected OPEN_OK")
            return
        self._events.append(ev.StreamAccepted(stream.key))
        self._now_open(stream)

    def _on_open_fail(self, frame: Frame, stream: Stream) -> None:
        if stream.state is not StreamState.OPENING:
            self._stream_protocol_error(stream, "unexpected OPEN_FAIL")
            return
        reason, message = _parse_reason(frame.payload)
        self._drop(stream)
        self._events.append(ev.StreamRejected(stream.key, reason, message))

    def _on_data(self, frame: Frame, stream: Stream) -> None:
        if self._take_data(stream, len(frame.payload)):
            self._events.append(ev.DataReceived(stream.key, frame.payload))

    def _take_data(self, stream: Stream, size: int) -> bool:
        """Account for ``size`` bytes of the peer's DATA (or BULK) on ``stream``;
        False if they broke the rules (the stream is reset) or the session."""
        self._data_received += size
        if (
            not (stream.state is _OPEN or (stream.early and not stream.ours))
            or stream.eof_received
            or not size
        ):
            self._stream_protocol_error(stream, "DATA in the wrong state")
            return False
        if size > stream.recv_credit:
            self._stream_protocol_error(stream, "DATA beyond the granted window")
            return False
        if not self._take_session_credit(size):
            return False
        stream.unconsumed += size
        stream.recv_credit -= size
        stream.bytes_received += size
        return True

    def _on_bulk(self, frame: Frame, stream: Stream) -> None:
        """A BULK frame: its raw bytes, which follow, are DATA of ``stream``."""
        size = bulk_count(frame.payload)
        if not self._bulk_offered or not size:
            self._stream_protocol_error(stream, "a BULK frame we did not offer to take")
            return
        if self._take_data(stream, size):
            self._raw_target = stream
            self.stats.bulk_bytes_in += size

    def _on_raw(self, piece: Frame) -> None:
        """Raw bytes of the current BULK frame: its stream's data, if it lives."""
        stream = self._raw_target
        if stream is not None and self.streams.get(stream.key) is stream:
            self._events.append(ev.DataReceived(stream.key, piece.payload))

    def raw_pending(self) -> tuple[int, int] | None:
        """(stream id, bytes) of a BULK frame's raw bytes the owner may read
        past :meth:`receive_data` (and report with :meth:`raw_taken`): only
        with nothing buffered, and only for a live stream (the rest are
        dropped, so the decoder takes them)."""
        decoder = self._decoder
        left = decoder.raw_left
        if not left or decoder.buffered or self.link is not None:
            return None
        stream = self._raw_target
        if stream is None or self.streams.get(stream.key) is not stream:
            return None
        return stream.key, left

    @property
    def raw_left(self) -> int:
        """Raw bytes of the current BULK frame still to come on the channel."""
        return self._decoder.raw_left

    def raw_taken(self, count: int) -> None:
        """``count`` of the :meth:`raw_pending` bytes were read (and delivered) by the owner."""
        self._decoder.take_raw(count)
        self.stats.bytes_in += count

    def _on_window(self, frame: Frame, stream: Stream) -> None:
        if len(frame.payload) != _WINDOW.size or stream.state is not StreamState.OPEN:
            self._stream_protocol_error(stream, "bad WINDOW")
            return
        (increment,) = _WINDOW.unpack(frame.payload)
        if not increment or stream.send_credit + increment > MAX_WINDOW:
            self._stream_protocol_error(stream, "WINDOW overflow")
            return
        stream.send_credit += increment
        self._mark_ready(stream)

    def _on_eof(self, frame: Frame, stream: Stream) -> None:
        open_enough = stream.state is StreamState.OPEN or (stream.early and not stream.ours)
        if not open_enough or stream.eof_received:
            self._stream_protocol_error(stream, "EOF in the wrong state")
            return
        stream.eof_received = True
        self._events.append(ev.EndOfData(stream.key))
        self._maybe_finished(stream)

    def _on_reset(self, frame: Frame, stream: Stream) -> None:
        if not self._take_reset_token():
            return
        reason, message = _parse_reason(frame.payload)
        self._drop(stream)
        if stream.ours and stream.state is StreamState.OPENING:
            self._events.append(ev.StreamRejected(stream.key, reason, message))
        else:
            self._events.append(ev.StreamReset(stream.key, reason, message, True))

    # ------------------------------------------------------------------ output

    def has_data_to_send(self) -> bool:
        """True if :meth:`data_to_send` may return bytes (it can still return none)."""
        link = self.link
        if link is not None:
            if link.has_control:
                return True
            if link.room <= 0:
                return False  # an ACK from the peer reopens the window
            if link.has_unsent:
                return True
        return self._has_frames()

    def _has_frames(self) -> bool:
        return bool(
            self._hello_queued
            or (self._control and not (self._lazy and self._control_waits(self._now)))
            or (self.state is _UP and self._ready)
        )

    def _control_waits(self, now: float) -> bool:
        """Only OPEN_OKs that may wait for company are queued, and nothing
        else is to go with them before ``_lazy_until``."""
        return (
            len(self._control) <= self._lazy
            and now < self._lazy_until
            and not self._hello_queued
            and not (self.state is State.UP and self._ready)
        )

    def data_to_send(
        self, limit: int = 256 * 1024, frame_limit: int = MAX_PAYLOAD, now: float | None = None
    ) -> bytes:
        """Frames for the channel, control first, then DATA round-robin; about ``limit`` bytes.

        DATA payloads are at most ``frame_limit`` (and the peer's max_frame), so
        a slow channel can keep each frame short.  Given ``now``, DATA in flight
        is also kept under :attr:`flight_cap`, learnt from probe PINGs.  With
        link reliability on, the frames travel inside LINK_DATA chunks.
        """
        return b"".join(self.pieces_to_send(limit, frame_limit, now))

    def pieces_to_send(
        self, limit: int = 256 * 1024, frame_limit: int = MAX_PAYLOAD, now: float | None = None
    ) -> list[bytes | memoryview]:
        """:meth:`data_to_send` as pieces in order, for one gathering write.

        DATA payloads stay views of the bytes the local socket gave us, so a
        transport that can write pieces (``sendmsg``) copies them only once.
        """
        link = self.link
        if link is None:
            pieces, size = self._frames_to_send(limit, frame_limit, now)
            self.stats.bytes_out += size
            return pieces
        at = self._now if now is None else now
        out: list[bytes | memoryview] = []
        size = link.write_control(out, at, limit)
        if size < limit and link.room > 0:
            size_each = min(chunk_size(self.peer_max_frame, frame_limit), link.chunk_limit)
            room = link.room * size_each
            frames = b""
            if self._has_frames():
                pieces, _ = self._frames_to_send(min(limit - size, room), frame_limit, now)
                frames = b"".join(pieces)
            if frames or link.has_unsent:
                size += link.write_data(out, frames, size_each, at)
        self.stats.bytes_out += size
        return out

    def _frames_to_send(
        self, limit: int, frame_limit: int, now: float | None
    ) -> tuple[list[bytes | memoryview], int]:
        """The session's own frames (pieces, and their size), as :meth:`data_to_send` describes."""
        if self._lazy and self._control_waits(self._now if now is None else now):
            return [], 0
        self._lazy = 0  # whatever else goes, the waiting OPEN_OKs go first
        out: list[bytes | memoryview] = []
        size = 0
        control = self._control
        seq = self._tx_seq
        frames = 0
        while control and control[0][0] == FrameType.GOAWAY:
            ftype, stream_id, payload = control.popleft()
            size += encode_into(out, ftype, stream_id, payload, seq)
            seq = (seq + 1) & 0xFF
            frames += 1
        if self._hello_queued:
            self._hello_queued = False
            payload = _HELLO.pack(
                self.session_id,
                self.peer_session,
                self.config.max_frame,
                self.config.window,
                self.config.max_streams,
                (CAP_HEADER_CRC if self.config.header_crc else 0)
                | (CAP_EARLY_DATA if self.config.early_data else 0)
                | (CAP_BULK if self._bulk_offered else 0),
            ) + _HELLO_SESSION_WINDOW.pack(self.config.session_window)
            flags = 0 if self.state is State.UP else HELLO_ANSWER
            size += encode_into(out, FrameType.HELLO, 0, payload, self._hellos_sent & 0xFF, flags)
            self._hellos_sent += 1
            frames += 1
            seq = 0
            self._reset_flight()
        while control and size < limit:
            ftype, stream_id, payload = control.popleft()
            size += encode_into(out, ftype, stream_id, payload, seq)
            seq = (seq + 1) & 0xFF
            frames += 1
            if ftype == FrameType.OPEN and self._peer_early:
                self._open_sent(stream_id ^ OPENER_BIT)
        if self.state is _UP:
            ready = self._ready
            max_frame = max(1, min(self.peer_max_frame, frame_limit))
            data_flags = self._data_flags
            budget = -1  # unbounded
            if now is not None and self.flight_cap is not None:
                budget = max(0, self.flight_cap - (self._data_sent - self._peer_received))
            sent_before = self._data_sent
            session_credit = self._session_credit  # None: the peer set no bound
            reserve = self._session_reserve
            parked: list[Stream] = []  # waiting for the flight cap or session credit
            while ready and size < limit:
                stream = ready.popleft()
                stream.ready = False
                if self.streams.get(stream.key) is not stream or not (
                    stream.state is _OPEN or (stream.early and stream.state is _OPENING)
                ):
                    continue
                wire_id = stream.key ^ OPENER_BIT
                if not budget and stream.queued > INTERACTIVE_BYTES:
                    parked.append(stream)  # bulk waits for the cap; keystrokes go on
                    continue
                if stream.queued and stream.send_credit > 0:
                    room = session_credit
                    if room is not None and stream.queued > INTERACTIVE_BYTES:
                        room -= reserve  # bulk leaves the reserve to keystrokes
                    if room is not None and room <= 0:
                        parked.append(stream)  # until the peer's session WINDOW
                        continue
                    most = min(stream.send_credit, max_frame)
                    if room is not None:
                        most = min(most, room)
                    if budget > 0:
                        most = min(most, budget)  # a frame never overshoots the flight cap
                    chunk = self._take(stream, most)
                    self._data_sent += len(chunk)
                    if session_credit is not None:
                        session_credit -= len(chunk)
                    if budget > 0:
                        budget = max(0, budget - len(chunk))
                    size += encode_into(out, _DATA_TYPE, wire_id, chunk, seq, data_flags)
                    seq = (seq + 1) & 0xFF
                    frames += 1
                if not stream.queued and stream.eof_pending and not stream.eof_sent:
                    stream.eof_sent = True
                    size += encode_into(out, FrameType.EOF, wire_id, b"", seq)
                    seq = (seq + 1) & 0xFF
                    frames += 1
                    self._maybe_finished(stream)
                    continue
                if stream.queued and stream.send_credit > 0:
                    stream.ready = True
                    ready.append(stream)
            self._session_credit = session_credit
            for stream in reversed(parked):  # first in line once the cap reopens
                stream.ready = True
                ready.appendleft(stream)
            if (self._data_sent > sent_before or budget == 0) and self._take_probe(now):
                # A probe right behind the data: its PONG says how much arrived.
                size += encode_into(out, FrameType.PING, 0, self._ping_token(), seq)
                seq = (seq + 1) & 0xFF
                frames += 1
        self._tx_seq = seq
        self.stats.frames_out += frames
        return out, size

    def bulk_stream(self, stream_id: int) -> bool:
        """May this stream send BULK frames (now or once its queue drained)?

        Only on a fast channel: where the bytes-in-flight cap keeps frames
        under :data:`BULK_MIN`, DATA frames serve as well.
        """
        if not self._bulk_out or self.link is not None or self.state is not _UP:
            return False
        if self.flight_cap is not None and self.flight_cap < 2 * BULK_MIN:
            return False
        stream = self.streams.get(stream_id)
        return stream is not None and stream.state is _OPEN and not stream.eof_pending

    def bulk_room(self, stream_id: int) -> int:
        """How many bytes the stream may send now as one BULK frame (0: none).

        Only on a session where both sides offered BULK, with the link off,
        for an open stream with nothing queued (its queued bytes go first, as
        DATA); bounded like DATA by its credit, the session credit and the
        bytes-in-flight cap.  The owner must have written everything
        :meth:`pieces_to_send` had for it first.
        """
        if not self.bulk_stream(stream_id):
            return 0
        stream = self.streams[stream_id]
        if stream.queued or self._control or self._hello_queued:
            # Queued bytes of the stream go first, and so do control frames:
            # an OPEN_OK held back for company must not be overtaken.
            return 0
        # Half the peer's window a frame: the next can go while it grants more.
        room = min(stream.send_credit, self.peer_window // 2)
        if self._session_credit is not None:
            room = min(room, self._session_credit - self._session_reserve)
        if self.flight_cap is not None:
            room = min(room, self.flight_cap - (self._data_sent - self._peer_received))
        return max(0, room)

    def bulk_header(self, stream_id: int, count: int, now: float) -> bytes:
        """The BULK frame for ``count`` raw bytes of the stream (at most
        :meth:`bulk_room`), which the owner writes right behind it, nothing
        in between.  A probe PING, if one is due, is queued to follow them."""
        stream = self.streams[stream_id]
        header = encode_bulk(stream.key ^ OPENER_BIT, count, self._tx_seq)
        self._tx_seq = (self._tx_seq + 1) & 0xFF
        stream.send_credit -= count
        stream.bytes_sent += count
        self._data_sent += count
        if self._session_credit is not None:
            self._session_credit -= count
        self.stats.frames_out += 1
        self.stats.bytes_out += len(header) + count
        self.stats.bulk_bytes_out += count
        if self._take_probe(now):
            self._control.append((FrameType.PING, 0, self._ping_token()))
        return header

    def _ping_token(self) -> bytes:
        """A fresh 8-byte PING payload (keepalive or probe)."""
        self._ping_counter += 1
        return self._ping_counter.to_bytes(8, "big")

    def _take_probe(self, now: float | None) -> bool:
        """Is a probe PING to go behind the data just sent?  Then it counts as
        sent from here.  Only once half the cap is out: idle keystrokes need
        no probes."""
        cap = self.flight_cap
        if cap is None or (self._data_sent - self._peer_received) * 2 < cap:
            return False
        if not self._probe_due(now):
            return False
        self._probe_at = now
        self._probe_bytes = self._data_sent
        return True

    def _probe_due(self, now: float | None) -> bool:
        """Probe when none is out, or every half cap of data, so answers keep coming."""
        if now is None:
            return False
        if self._probe_at is None or now - self._probe_at >= PROBE_TIMEOUT:
            return True
        cap = self.flight_cap
        return cap is not None and self._data_sent - self._probe_bytes >= cap // 2

    def _reset_flight(self) -> None:
        """Our HELLO restarts the DATA counters on both sides."""
        self._data_sent = 0
        self._peer_received = 0
        self._probe_at = None
        self._last_pong = None
        self._rates.clear()
        self.flight_cap = FLIGHT_INITIAL

    def _take(self, stream: Stream, limit: int) -> bytes | memoryview:
        """Remove up to ``limit`` queued bytes, coalescing small writes into one frame.

        Part of one large write comes back as a view of it, not a copy.
        """
        queue = stream.queue
        head = queue[0]
        offset = stream.head_offset
        available = len(head) - offset
        if available >= limit or len(queue) == 1:
            count = min(available, limit)
            chunk: bytes | memoryview = (
                memoryview(head)[offset : offset + count] if offset or count < len(head) else head
            )
            if count == available:
                queue.popleft()
                stream.head_offset = 0
            else:
                stream.head_offset = offset + count
        else:
            pieces = [head[offset:] if offset else head]
            queue.popleft()
            count = available
            stream.head_offset = 0
            while queue and count < limit:
                piece = queue[0]
                want = limit - count
                if len(piece) <= want:
                    pieces.append(queue.popleft())
                    count += len(piece)
                else:
                    pieces.append(piece[:want])
                    stream.head_offset = want
                    count = limit
            chunk = b"".join(pieces)
        stream.queued -= count
        stream.send_credit -= count
        stream.bytes_sent += count
        if stream.blocked and stream.queued < self.config.send_high_water // 2:
            stream.blocked = False
            self._events.append(ev.StreamWritable(stream.key))
        return chunk

    # ------------------------------------------------------------------ internals

    def _start_handshake(self, now: float) -> None:
        self.session_id = _new_session_id()
        self.peer_session = 0
        self.state = State.HANDSHAKING
        self._rx_seq = 0
        self._highest_peer_number = 0
        self._peer_opened = 0
        self._we_opened = 0
        self._recent_resets.clear()
        self._session_recv_credit = self.config.session_window
        self._session_unacked = 0
        self._hellos_sent = 0
        self._peer_hello_seq = -1
        self._peer_may_be_up = False
        self._queue_hello()
        self._next_hello = now + self.config.hello_interval

    def _queue_hello(self) -> None:
        self._hello_queued = True

    def _restart(self, now: float, reason: str, code: int, silent: bool = False) -> None:
        """End the session on a live channel and handshake a new one.

        The new session id in our HELLO is what ends the session at the peer.
        """
        self._end_session(reason, code, silent)
        self._start_handshake(now)

    def _end_session(self, reason: str, code: int, silent: bool = False) -> None:
        was_up = self.state is State.UP
        if was_up:
            # Leave UP first: dropping a stream must not send queued opens now.
            self.state = State.HANDSHAKING
        # An OPEN still queued unsent never reached the peer: it waits for the
        # next session like any other pending open.
        unsent = [wire ^ OPENER_BIT for ftype, wire, _ in self._control if ftype == FrameType.OPEN]
        for key in reversed(unsent):
            stream = self.streams.get(key)
            if stream is not None and stream.state is StreamState.OPENING:
                stream.state = StreamState.PENDING
                stream.early = False
                stream.send_credit = 0
                self._we_opened = max(0, self._we_opened - 1)
                self._pending.appendleft(key)
        for stream in list(self.streams.values()):
            if stream.state is StreamState.PENDING:
                continue
            self._drop(stream)
            if stream.ours and stream.state is StreamState.OPENING:
                self._events.append(ev.StreamRejected(stream.key, code, reason))
            else:
                self._events.append(ev.StreamReset(stream.key, code, reason, False))
        for stream in self._ready:
            stream.ready = False  # a pending open's early data waits for the next session
        self._ready.clear()
        # Drop queued frames that belong to the old session; keep a GOAWAY.
        self._control = deque(item for item in self._control if item[0] == FrameType.GOAWAY)
        self._lazy = 0
        if was_up:
            self._events.append(ev.SessionEnded(self.peer_session, reason, silent))
        self.peer_session = 0
        self._peer_may_be_up = False  # about the peer just forgotten

    def _send_pending_opens(self) -> None:
        if self.state is not State.UP:
            return
        pending = self._pending
        while pending and self._we_opened < self.peer_max_streams:
            stream = self.streams.get(pending.popleft())
            if stream is None or stream.state is not StreamState.PENDING:
                continue
            self._we_opened += 1
            stream.state = StreamState.OPENING
            self._control.append(
                (
                    FrameType.OPEN,
                    stream.key ^ OPENER_BIT,
                    stream.service.encode("ascii"),
                )
            )

    def _open_sent(self, key: int) -> None:
        """Our OPEN just went out to a peer that takes early data: the peer's
        window applies from here on, so the stream's first bytes (and EOF) follow
        the OPEN without waiting a round trip for OPEN_OK.

        Not before the OPEN is on its way: DATA must never overtake its OPEN.
        """
        stream = self.streams.get(key)
        if (
            stream is None
            or stream.state is not StreamState.OPENING
            or stream.early
            or not self.config.early_data
        ):
            return
        stream.early = True
        stream.send_credit = self.peer_window
        self._mark_ready(stream)

    def _now_open(self, stream: Stream) -> None:
        """OPEN_OK sent or received: both windows start, queued data may flow."""
        early = stream.early
        stream.state = StreamState.OPEN
        stream.early = False
        # An early stream got one window at the OPEN: the opener's credit to
        # send, the acceptor's credit to receive.  The other starts now.
        if not early or not stream.ours:
            stream.send_credit = self.peer_window
        if not early or stream.ours:
            stream.recv_credit = self.config.window
        elif stream.unacked >= self.config.window // 4:
            self._grant(stream)  # early data the local socket took already
        self._mark_ready(stream)

    def _queue_reason(self, ftype: int, wire_id: int, reason: int, message: str) -> None:
        self._control.append((ftype, wire_id, _reason_payload(reason, message)))

    def _mark_ready(self, stream: Stream) -> None:
        if not stream.ready and (
            (stream.queued and stream.send_credit > 0)
            or (stream.eof_pending and not stream.eof_sent)
        ):
            stream.ready = True
            self._ready.append(stream)

    def _grant(self, stream: Stream) -> None:
        increment = stream.unacked
        stream.unacked = 0
        if increment and stream.recv_credit + increment <= MAX_WINDOW:
            stream.recv_credit += increment
            self._control.append(
                (FrameType.WINDOW, stream.key ^ OPENER_BIT, _WINDOW.pack(increment))
            )

    def _maybe_finished(self, stream: Stream) -> None:
        if stream.eof_sent and stream.eof_received:
            self._drop(stream)
            self._events.append(ev.StreamClosed(stream.key))

    def _drop(self, stream: Stream) -> None:
        """Forget a stream (no event)."""
        if self.streams.pop(stream.key, None) is None:
            return
        if stream.ours:
            if stream.state is not StreamState.PENDING:
                self._we_opened = max(0, self._we_opened - 1)
        else:
            self._peer_opened = max(0, self._peer_opened - 1)
        if stream.state is not StreamState.PENDING:
            if stream.eof_received:
                credit = 0
            elif stream.ours and stream.state is StreamState.OPENING:
                credit = self.config.window  # it may accept, unaware, and send
            else:
                credit = stream.recv_credit
            self._remember_ended(stream.key, credit)
        stream.queue.clear()
        stream.queued = 0
        if stream.unconsumed:
            # Whatever the local socket had not taken is discarded (a reset) or
            # already handed to its transport (a clean close): either way, gone.
            self._credit_session(stream.unconsumed)
            stream.unconsumed = 0
        if stream.ours and stream.state is not StreamState.PENDING:
            self._send_pending_opens()

    def _remember_ended(self, key: int, credit: int) -> None:
        self._recent_resets[key] = credit
        if len(self._recent_resets) > _RECENT_RESETS:
            self._recent_resets.popitem(last=False)

    def _protocol_error(self, frame: Frame, why: str) -> None:
        self.stats.protocol_errors += 1
        if frame.type != FrameType.RESET and frame.stream:
            self._queue_reason(FrameType.RESET, frame.stream ^ OPENER_BIT, Reason.PROTOCOL, why)

    def _stream_protocol_error(self, stream: Stream, why: str) -> None:
        self.stats.protocol_errors += 1
        self.reset(stream.key, Reason.PROTOCOL, why)
        if stream.key in self._recent_resets:
            # One RESET(PROTOCOL) says it all: what follows in flight is ignored.
            self._recent_resets[stream.key] = MAX_WINDOW
        self._events.append(
            ev.StreamReset(stream.key, Reason.PROTOCOL, f"peer error: {why}", False)
        )


def _stream_bytes(frame: Frame) -> int:
    """Stream bytes a frame carries: a DATA payload, or a BULK frame's raw bytes."""
    if frame.type == _DATA_TYPE:
        return len(frame.payload)
    if frame.type == BULK_TYPE:
        return bulk_count(frame.payload)
    return 0


def _session_reserve(session_window: int | None) -> int:
    """How much of a peer's session credit only streams with little queued may use."""
    if session_window is None:
        return 0
    reserve = min(SESSION_RESERVE_MAX, session_window // 16)
    return reserve if reserve >= SESSION_RESERVE_MIN else 0


def _reason_payload(reason: int, message: str) -> bytes:
    """OPEN_FAIL, RESET and GOAWAY payloads: a reason byte, then a short UTF-8 message."""
    return bytes([reason & 0xFF]) + message.encode("utf-8")[:MAX_MESSAGE]


def _parse_reason(payload: bytes | memoryview) -> tuple[int, str]:
    if not payload:
        return 0, ""
    return payload[0], bytes(payload[1 : 1 + MAX_MESSAGE]).decode("utf-8", "replace")


_HANDLERS: dict[int, Callable[..., None]] = {
    FrameType.PING: Session._on_ping,
    FrameType.PONG: Session._on_pong,
    FrameType.GOAWAY: Session._on_goaway,
    FrameType.OPEN: Session._on_open,
    FrameType.OPEN_OK: Session._on_open_ok,
    FrameType.OPEN_FAIL: Session._on_open_fail,
    FrameType.DATA: Session._on_data,
    FrameType.WINDOW: Session._on_window,
    FrameType.EOF: Session._on_eof,
    FrameType.RESET: Session._on_reset,
    FrameType.BULK: Session._on_bulk,
}
