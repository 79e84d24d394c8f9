"""Turn a :class:`~virtproxy.config.DaemonConfig` into running Twisted services.

All three entry points (console script, ``python -m virtproxy``, twistd plugin)
call :func:`make_service`.  Listening happens synchronously in ``startService``,
so an address already in use surfaces as a :class:`StartupError` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy.channel import Channel
from virtproxy.config import DEFAULT_SESSION_WINDOW, DaemonConfig, ForwardSpec, ProcessConfig
from virtproxy.errors import StartupError, connect_reason
from virtproxy.factories import (
    ChannelClientFactory,
    ChannelServerFactory,
    ProxyServerFactory,
)
from virtproxy.frames import MAX_PAYLOAD
from virtproxy.protocol import describe_address
from virtproxy.session import SessionConfig
from virtproxy.splicing import available as splice_available

#: Kernel-checksummed, connection-per-session channels: no line noise to guard against.
SOCKET_KINDS = frozenset({"tcp-listen", "tcp-connect", "unix-listen", "unix-connect"})
#: Kinds whose transport cannot tell us the peer is gone: liveness is in-band only.
IN_BAND_KINDS = frozenset({"serial", "virtserial"})


def default_max_frame(kind: str) -> int:
    """Frames sized to the channel: small on a serial line, so a keystroke
    never waits long behind a bulk frame."""
    if kind == "serial":
        return 512
    return 16384 if kind == "virtserial" else MAX_PAYLOAD


class ListenService(Service):
    """Listen on an endpoint; failing to listen is a StartupError, raised at once."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, description: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise StartupError(f"cannot listen for {self.description}: no answer from the endpoint")
        result = outcome[0]
        if isinstance(result, Failure):
            self.running = False
            raise StartupError(f"cannot listen for {self.description}: {listen_error(result)}")
        self.port = result
        self.log.info(
            "listening for {what} on {where}",
            what=self.description,
            where=_where(result),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening()  # type: ignore[return-value]


def listen_error(failure: Failure) -> str:
    """Why a listen failed.  A bare OSError's file names are left out: for a
    UNIX path they name Twisted's lock file (``'1234' -> b'/x.sock.lock'``),
    and the description names the path the user gave."""
    error = failure.value
    if type(error).__module__ == "builtins" and isinstance(error, OSError) and error.strerror:
        return error.strerror
    return failure.getErrorMessage()


@implementer(IStreamClientEndpoint)
class ChannelEndpoint:
    """A connect channel's endpoint as its ClientService sees it.

    ClientService logs every retry with the endpoint's repr (an object address
    for Twisted's endpoints) and never why the attempt failed; so this one is
    named as the user wrote it, and says why, once per new reason: a mistyped
    device path or a refused port shows at once without repeating every retry.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, description: str, label: str) -> None:
        self.endpoint = endpoint
        self.description = description
        self.label = label
        self._failing: str | None = None

    def __repr__(self) -> str:
        return self.description

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = self.endpoint.connect(factory)
        attempt.addCallbacks(self._connected, self._failed)
        return attempt

    def _connected(self, protocol: IProtocol) -> IProtocol:
        self._failing = None
        return protocol

    def _failed(self, failure: Failure) -> Failure:
        if not failure.check(CancelledError, ConnectingCancelledError):
            why = connect_reason(failure.value) if failure.value else failure.getErrorMessage()
            if why != self._failing:
                self._failing = why
                self.log.warn(
                    "{label}: cannot connect the channel{to}: {why}; retrying",
                    label=self.label,
                    to="" if self.label == self.description else f" to {self.description}",
                    why=why,
                )
        return failure


def retry_policy(
    initial: float = 0.5, most: float = 10.0, factor: float = 2.0
) -> Callable[[int], float]:
    """Twisted's jittered backoff, in tenths of a second (it logs each delay)."""
    policy = backoffPolicy(initialDelay=initial, maxDelay=most, factor=factor)
    return lambda attempt: round(policy(attempt), 1)


class ChannelService(MultiService):
    """Owns the Channel; on stop it says GOAWAY and ends every stream first."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel
        #: The oforward listeners by NAME (added and removed at run time by the Runtime).
        self.oforwards: dict[str, ListenService] = {}

    def stopService(self) -> Deferred[None]:
        self.channel.shutdown()
        return super().stopService()


def _where(port: Any) -> str:
    address = port.getHost()
    return describe_address(address, unnamed=str(address))


#: An OPEN_OK may wait this long for the stream's first reply (SessionConfig.open_ok_delay).
OPEN_OK_DELAY = 0.005


def session_config(config: DaemonConfig) -> SessionConfig:
    limits = config.limits
    kind = config.channel.kind
    max_frame = limits.max_frame or default_max_frame(kind)
    return SessionConfig(
        max_frame=max_frame,
        window=max(limits.window, max_frame),
        max_streams=limits.max_streams,
        max_open_rate=limits.max_open_rate,
        keepalive_interval=limits.keepalive_interval,
        keepalive_timeout=limits.keepalive_timeout,
        open_timeout=limits.connect_timeout,
        header_crc=kind in SOCKET_KINDS,
        bulk=limits.bulk and kind in SOCKET_KINDS and splice_available(),
        link=limits.link or default_link(kind),
        max_reset_rate=limits.max_reset_rate,
        session_window=max(
            limits.session_window or DEFAULT_SESSION_WINDOW, limits.window, max_frame
        ),
        send_high_water=limits.stream_buffer,
        max_pending=limits.max_pending,
        max_service_name=limits.max_service_name,
        open_ok_delay=min(OPEN_OK_DELAY, limits.connect_timeout / 2),
    )


def default_link(kind: str) -> str:
    """An emulated serial line corrupts and drops bytes; virtio and sockets do not."""
    return "on" if kind == "serial" else "auto"


def oforward_service(reactor: Any, channel: Channel, spec: ForwardSpec) -> ListenService:
    """The listener of one oforward (not started)."""
    return ListenService(
        serverFromString(reactor, spec.endpoint),
        ProxyServerFactory(channel, spec.name),
        f"oforward {spec.name!r} ({spec.original})",
    )


def make_service(config: DaemonConfig, reactor: Any = None) -> ChannelService:
    """Build (but do not start) the services of one daemon."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    iforwards = {spec.name: clientFromString(reactor, spec.endpoint) for spec in config.iforwards}
    channel = Channel(
        reactor,
        session_config(config),
        iforwards,
        label=config.log_label,
        drop_on_silence=config.channel.kind not in IN_BAND_KINDS,
    )
    top = ChannelService(channel)
    for spec in config.oforwards:
        listener = oforward_service(reactor, channel, spec)
        listener.setServiceParent(top)
        top.oforwards[spec.name] = listener
    if config.channel.listens:
        ListenService(
            serverFromString(reactor, config.channel.endpoint),
            ChannelServerFactory(channel),
            f"channel {config.channel.original}",
        ).setServiceParent(top)
    else:
        ClientService(
            ChannelEndpoint(
                clientFromString(reactor, config.channel.endpoint),
                config.channel.original,
                config.log_label,
            ),
            ChannelClientFactory(channel),
            retryPolicy=retry_policy(),
            clock=reactor,
        ).setServiceParent(top)
    return top


def make_process_service(config: ProcessConfig | DaemonConfig, reactor: Any = None) -> MultiService:
    """Build (but do not start) every service of one process: a Runtime."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from virtproxy.daemon import Runtime

    if isinstance(config, DaemonConfig):
        config = ProcessConfig(channels=(config,), cli_channels=(config.name,))
    return Runtime(config, reactor)
