"""What the sans-I/O session tells its owner.

The session never calls out; it queues these and the owner (a Twisted adapter,
a test, a fuzzer) takes them with ``Session.take_events()``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionUp:
    """The handshake completed; streams can flow."""

    peer_session: int
    peer_max_frame: int
    peer_window: int


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session ended; its streams were reset (each gets a StreamReset)."""

    peer_session: int
    reason: str
    #: True when the peer fell silent past the keepalive timeout.
    silent: bool = False


@dataclass(frozen=True, slots=True)
class LinkNotice:
    """Something about the link-reliability layer that belongs in the log."""

    message: str


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """The peer opened a stream for ``service``: call ``accept`` or ``reject``."""

    stream_id: int
    service: str


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer accepted a stream we opened (OPEN_OK)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """A stream we opened will never open (OPEN_FAIL, timeout, no session)."""

    stream_id: int
    reason: int
    message: str


@dataclass(slots=True)
class DataReceived:
    """Peer data for a stream (not frozen, unlike the rarer events: one is
    made per DATA frame, and a frozen dataclass is slower to construct)."""

    stream_id: int
    #: A view into the bytes read from the channel, where the frame lay whole in one read.
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The peer sends no more data on this stream (half-close)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream died of a failure: abort the local socket."""

    stream_id: int
    reason: int
    message: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """EOF went both ways: the stream ended cleanly and is forgotten."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """The stream's send queue drained below its low-water mark: read more."""

    stream_id: int


Event = (
    SessionUp
    | SessionEnded
    | StreamRequested
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | EndOfData
    | StreamReset
    | StreamClosed
    | StreamWritable
    | LinkNotice
)
