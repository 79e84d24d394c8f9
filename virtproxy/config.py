"""Plain data describing what a virtproxy daemon should do.

Options parsing (``virtproxy.options``) produces a :class:`DaemonConfig`;
``virtproxy.service.make_service`` turns one into running Twisted services.
Nothing here touches the reactor, so configs can be built and checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Channel kinds whose Twisted endpoint is a *server* (we wait for the peer).
LISTEN_KINDS = frozenset({"tcp-listen", "unix-listen"})
#: Channel kinds whose Twisted endpoint is a *client* (reconnected with backoff).
CONNECT_KINDS = frozenset({"tcp-connect", "unix-connect", "virtserial", "serial"})


@dataclass(frozen=True)
class ChannelSpec:
    """The one data channel to the peer.

    ``endpoint`` is a Twisted endpoint description: for listen kinds a
    ``serverFromString`` string, for connect kinds a ``clientFromString`` one
    (``virtserial:`` and ``serial:`` are virtproxy's own endpoint plugins).
    """

    kind: str
    endpoint: str
    original: str

    @property
    def listens(self) -> bool:
        return self.kind in LISTEN_KINDS


@dataclass(frozen=True)
class ForwardSpec:
    """A named service.

    For an oforward, ``endpoint`` is a ``serverFromString`` description we listen
    on; for an iforward, a ``clientFromString`` description we connect to when
    the peer opens a stream for ``name``.
    """

    name: str
    endpoint: str
    original: str


@dataclass(frozen=True)
class DaemonConfig:
    channel: ChannelSpec
    oforwards: tuple[ForwardSpec, ...] = ()
    iforwards: tuple[ForwardSpec, ...] = ()
    #: Seconds an accepted client waits for the session and the peer's OPEN_OK.
    connect_timeout: float = 10.0
    #: Seconds of silence before a PING, and before the session is declared dead.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 20.0
    #: Largest DATA payload we accept (advertised in HELLO); None = per channel kind.
    max_frame: int | None = None
    #: Credit each new stream grants the peer before the first WINDOW.
    window: int = 512 * 1024
    #: Concurrent streams the peer may open towards us.
    max_streams: int = 1024
    #: Streams the peer may open per second (token bucket, bursts of twice that).
    max_open_rate: int = 1000
    extra: dict[str, object] = field(default_factory=dict)
