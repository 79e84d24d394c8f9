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


#: A stream's default window: what its peer may send before we grant more.
#: 2 MiB lets a BULK frame (up to half a window) carry a megabyte on fast
#: channels; it bounds only what a stream may buffer (and the session window
#: bounds all of them together), it allocates nothing.
DEFAULT_WINDOW = 2 * 1024 * 1024
#: The session window: what one session can make us buffer over all its
#: streams.  At 64 MiB, 32 streams whose destinations stalled could hold it
#: all (a daemon peaked at 114-120 MiB in a stress run, against 54 MiB at
#: 16 MiB); a reserve of it keeps keystrokes moving meanwhile
#: (docs/protocol.rst, "Flow control"), and 32 streams ran as fast.
DEFAULT_SESSION_WINDOW = 16 * 1024 * 1024


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
class RemoteForwardSpec:
    """Ask the peer to listen on ``host:port`` (its side) and carry each
    connection back to our iforward ``name`` (like ``ssh -R``)."""

    name: str
    host: str
    port: int
    original: str

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ListenAllowance:
    """An address the peer may ask us to listen on; ``port`` None = any port."""

    host: str
    port: int | None
    original: str

    def allows(self, host: str, port: int) -> bool:
        return host == self.host and (self.port is None or self.port == port)


@dataclass(frozen=True)
class Limits:
    """A channel's limits and timers (options, or a config file's tables)."""

    #: Seconds an accepted client waits for the session and the peer's OPEN_OK.
    connect_timeout: float = 10.0
    #: Seconds of silence before a PING, and before the session is declared dead.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 20.0
    #: Largest DATA payload we accept (advertised in HELLO); None = per channel kind.
    max_frame: int | None = None
    #: Credit each new stream grants the peer before the first WINDOW.
    window: int = DEFAULT_WINDOW
    #: Concurrent streams the peer may open towards us.
    max_streams: int = 1024
    #: Streams the peer may open per second (token bucket, bursts of twice that).
    max_open_rate: int = 1000
    #: Link reliability mode (on, auto, off); None = per channel kind.
    link: str | None = None
    #: BULK frames on socket channels (docs/protocol.rst, "Bulk data").
    bulk: bool = True
    #: Peer RESETs per second (token bucket, bursts of twice that).
    max_reset_rate: int = 1000
    #: Bytes the peer may have in flight to us over all streams together;
    #: None = DEFAULT_SESSION_WINDOW (16 MiB), or ``window`` if larger.
    session_window: int | None = None
    #: Bytes queued unsent on one stream before its local socket is paused.
    stream_buffer: int = 256 * 1024
    #: Our local clients waiting for a session or a free stream slot.
    max_pending: int = 1024
    #: Longest service name the peer may open.
    max_service_name: int = 64


@dataclass(frozen=True)
class DaemonConfig:
    """One channel with its forwards and limits (one Session each)."""

    channel: ChannelSpec
    oforwards: tuple[ForwardSpec, ...] = ()
    iforwards: tuple[ForwardSpec, ...] = ()
    limits: Limits = field(default_factory=Limits)
    extra: dict[str, object] = field(default_factory=dict)
    #: The channel's label (``--channel vm1=...``); "" for the one unlabelled channel.
    label: str = ""
    #: Listeners we ask the peer to open for us (``--rforward``).
    rforwards: tuple[RemoteForwardSpec, ...] = ()

    @property
    def name(self) -> str:
        """How ctl, metrics and reloads refer to this channel."""
        return self.label or DEFAULT_LABEL

    @property
    def log_label(self) -> str:
        """Log lines name a labelled channel by label, else by its spec."""
        return self.label or self.channel.original


#: The name of the one unlabelled channel.
DEFAULT_LABEL = "default"


@dataclass(frozen=True)
class ProcessConfig:
    """Everything one virtproxy process runs: channels plus process-wide parts."""

    channels: tuple[DaemonConfig, ...] = ()
    #: UNIX socket path of the control socket (``--control``), or None.
    control: str | None = None
    #: Server endpoint description of the Prometheus endpoint, or None.
    metrics: str | None = None
    #: The TOML file the channels came from (re-read on SIGHUP), or None.
    config_file: str | None = None
    #: Addresses the peer may ask us to listen on (``--allow-remote-listen``).
    allow_remote_listen: tuple[ListenAllowance, ...] = ()
    #: The channels given on the command line (kept across reloads).
    cli_channels: tuple[str, ...] = ()
    #: The command line's part of ``allow_remote_listen`` (kept across reloads).
    cli_allow: tuple[ListenAllowance, ...] = ()
    #: The command line's limits: for ``ctl add-channel``, and the base of the
    #: config file's ``[limits]`` on every reload.
    limits: Limits = field(default_factory=Limits)
