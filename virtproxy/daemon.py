"""The running daemon's registry of channels and forwards.

Both ``virtproxy ctl`` (through :mod:`virtproxy.control`) and a SIGHUP reload
of the config file change a running process through :class:`Runtime`, so the
two have the same effect: forwards are added and removed one by one, live
streams are kept (unless a removal asks to end them), and each channel keeps
its own session, limits, counters and reconnect loop, so a failure on one
never touches the others.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from virtproxy.channel import Channel
from virtproxy.config import DaemonConfig, ForwardSpec, ProcessConfig, RemoteForwardSpec
from virtproxy.errors import ConfigError, StartupError
from virtproxy.remote import RemoteForwardClient, RemoteListener, RemoteListenPolicy
from virtproxy.service import ChannelService, ListenService, make_service, oforward_service
from virtproxy.session import State

#: Kinds of forward, as ctl and the config file name them.
OFORWARD, IFORWARD, RFORWARD = "oforward", "iforward", "rforward"
FORWARD_KINDS = (OFORWARD, IFORWARD, RFORWARD)


@dataclass(frozen=True)
class Reloaded:
    """What a reload did: the summary it logs, and the changes that failed."""

    text: str
    errors: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text


@dataclass
class ChannelRuntime:
    """One channel's parts: its service tree and the forwards it has now."""

    config: DaemonConfig
    service: ChannelService
    oforwards: dict[str, ForwardSpec]
    iforwards: dict[str, ForwardSpec]
    rforwards: dict[str, RemoteForwardClient]

    @property
    def channel(self) -> Channel:
        return self.service.channel

    @property
    def name(self) -> str:
        return self.config.name


def _live(channel: Channel, service: str, ours: bool) -> int:
    return sum(
        1 for s in channel.session.streams.values() if s.service == service and s.ours == ours
    )


class Runtime(MultiService):
    """All channels of one process, plus the control and metrics listeners."""

    log = Logger()

    def __init__(self, process: ProcessConfig, reactor: Any) -> None:
        super().__init__()
        self.process = process
        self.reactor = reactor
        self.channels: dict[str, ChannelRuntime] = {}
        self.policy = RemoteListenPolicy(reactor, process.allow_remote_listen)
        #: Channels as the config file last described them (what a reload diffs against).
        self.from_file: dict[str, DaemonConfig] = {
            c.name: c for c in process.channels if c.name not in process.cli_channels
        }
        self.default_limits = process.limits
        self._sighup: Any = None

    # ----------------------------------------------------------------- lifecycle

    def startService(self) -> None:
        """Start every channel, then the control and metrics listeners.

        Any failure at startup (an address in use) is a StartupError: the
        operator's configuration is wrong, and nothing should half-run.
        """
        super().startService()
        try:
            for config in self.process.channels:
                self._start_channel(config)
        except ConfigError as e:
            raise StartupError(e.message) from None
        if self.process.control is not None:
            from virtproxy.control import control_service

            control_service(self, self.process.control).setServiceParent(self)
        if self.process.metrics is not None:
            from virtproxy.metrics import metrics_service

            metrics_service(self, self.process.metrics).setServiceParent(self)
        if self.process.config_file is not None:
            self._install_sighup()

    def stopService(self) -> Deferred[None]:
        if self._sighup is not None:
            signal.signal(signal.SIGHUP, self._sighup)
            self._sighup = None
        for runtime in self.channels.values():
            for client in runtime.rforwards.values():
                client.stop()
        return super().stopService()

    def _install_sighup(self) -> None:
        def reload_logged() -> None:
            # reload() logs its own outcome; a failure has nobody else to tell.
            self.reload().addErrback(lambda failure: None)

        def on_hup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(reload_logged)

        self._sighup = signal.signal(signal.SIGHUP, on_hup)

    # ----------------------------------------------------------------- channels

    def _channel(self, label: str) -> ChannelRuntime:
        if not label:
            if len(self.channels) == 1:
                return next(iter(self.channels.values()))
            raise ConfigError(
                f"{len(self.channels)} channels: name one ({', '.join(sorted(self.channels))})"
            )
        runtime = self.channels.get(label)
        if runtime is None:
            known = ", ".join(sorted(self.channels)) or "none"
            raise ConfigError(f"no channel {label!r} (channels: {known})")
        return runtime

    def _start_channel(self, config: DaemonConfig) -> ChannelRuntime:
        if config.name in self.channels:
            raise ConfigError(f"channel {config.name!r} already exists")
        for spec in config.rforwards:
            if spec.name not in {f.name for f in config.iforwards}:
                raise ConfigError(
                    f"channel {config.name!r}: rforward {spec.original!r} needs an iforward "
                    f"{spec.name!r} on this channel"
                )
        service = make_service(config, self.reactor)
        service.channel.remote_handler = self.policy.handler
        try:
            service.setServiceParent(self)
        except StartupError as e:
            self.removeService(service)
            raise ConfigError(f"channel {config.name!r}: {e.message}") from None
        runtime = ChannelRuntime(
            config,
            service,
            {f.name: f for f in config.oforwards},
            {f.name: f for f in config.iforwards},
            {},
        )
        self.channels[config.name] = runtime
        for spec in config.rforwards:
            self._start_rforward(runtime, spec)
        if self.running:
            self.log.info(
                "channel {name!r} added ({spec})", name=config.name, spec=config.channel.original
            )
        return runtime

    def channel_from_request(
        self,
        label: str,
        spec: str,
        oforwards: list[str],
        iforwards: list[str],
        rforwards: list[str],
    ) -> DaemonConfig:
        """A channel as ``ctl add-channel`` describes it, with the default limits."""
        from virtproxy.options import check_label, cli_channels

        try:
            check_label(label, "channel", label)
            (config,) = cli_channels(
                [f"{label}={spec}"], oforwards, iforwards, rforwards, self.default_limits
            )
        except usage.UsageError as e:
            raise ConfigError(str(e)) from None
        return config

    def add_channel(self, config: DaemonConfig) -> str:
        self._start_channel(config)
        return f"channel {config.name!r} added"

    def remove_channel(self, label: str) -> Deferred[str]:
        runtime = self._channel(label)
        del self.channels[runtime.name]
        self.from_file.pop(runtime.name, None)
        for client in runtime.rforwards.values():
            client.stop()
        streams = len(runtime.channel.session.streams)
        self.log.info("channel {name!r} removed ({n} streams reset)", name=runtime.name, n=streams)
        done = runtime.service.disownServiceParent()
        message = f"channel {runtime.name!r} removed; {streams} live streams ended"
        if isinstance(done, Deferred):
            return done.addCallback(lambda _: message)
        return succeed(message)

    # ----------------------------------------------------------------- forwards

    def parse_forward(self, label: str, kind: str, spec: str) -> tuple[ChannelRuntime, Any]:
        """Parse a forward spec the way ``--oforward``/``--iforward``/``--rforward`` do."""
        from virtproxy.options import parse_forward, parse_rforward

        runtime = self._channel(label)
        try:
            if kind == RFORWARD:
                return runtime, parse_rforward(spec)
            if kind not in (OFORWARD, IFORWARD):
                raise ConfigError(f"unknown forward kind {kind!r}")
            return runtime, parse_forward(
                spec,
                outgoing=kind == OFORWARD,
                connect_timeout=runtime.config.limits.connect_timeout,
            )
        except usage.UsageError as e:
            raise ConfigError(str(e)) from None

    def add_forward(self, label: str, kind: str, spec: str) -> str:
        runtime, parsed = self.parse_forward(label, kind, spec)
        return self._add_parsed(runtime, kind, parsed)

    def _add_parsed(self, runtime: ChannelRuntime, kind: str, parsed: Any) -> str:
        name = runtime.name
        if kind == OFORWARD:
            assert isinstance(parsed, ForwardSpec)
            if parsed.name in runtime.oforwards:
                raise ConfigError(f"channel {name!r} already has oforward {parsed.name!r}")
            listener = oforward_service(self.reactor, runtime.channel, parsed)
            try:
                listener.setServiceParent(runtime.service)
            except StartupError as e:
                runtime.service.removeService(listener)
                raise ConfigError(e.message) from None
            runtime.service.oforwards[parsed.name] = listener
            runtime.oforwards[parsed.name] = parsed
        elif kind == IFORWARD:
            assert isinstance(parsed, ForwardSpec)
            if parsed.name in runtime.iforwards:
                raise ConfigError(f"channel {name!r} already has iforward {parsed.name!r}")
            runtime.channel.iforwards[parsed.name] = clientFromString(self.reactor, parsed.endpoint)
            runtime.iforwards[parsed.name] = parsed
        else:
            assert isinstance(parsed, RemoteForwardSpec)
            if parsed.address in runtime.rforwards:
                raise ConfigError(f"channel {name!r} already has rforward on {parsed.address}")
            if parsed.name not in runtime.iforwards:
                raise ConfigError(
                    f"rforward {parsed.original!r}: channel {name!r} has no iforward "
                    f"{parsed.name!r} to carry its connections to"
                )
            self._start_rforward(runtime, parsed)
        self.log.info(
            "{label}: {kind} {spec!r} added", label=runtime.name, kind=kind, spec=parsed.original
        )
        return f"{kind} {parsed.original!r} added to channel {name!r}"

    def _start_rforward(self, runtime: ChannelRuntime, spec: RemoteForwardSpec) -> None:
        client = RemoteForwardClient(runtime.channel, spec)
        runtime.rforwards[spec.address] = client
        client.start()

    def remove_forward(self, label: str, kind: str, name: str, kill: bool = False) -> Deferred[str]:
        """Stop new connections for a forward; its live streams finish unless ``kill``.

        Fires once an oforward's listener has closed (the reactor closes it a
        turn later), so its address may be listened on again at once.
        """
        runtime = self._channel(label)
        channel = runtime.channel
        closed: Any = None
        if kind == OFORWARD:
            if name not in runtime.oforwards:
                raise ConfigError(f"channel {runtime.name!r} has no oforward {name!r}")
            del runtime.oforwards[name]
            closed = runtime.service.oforwards.pop(name).disownServiceParent()
            ours = True
        elif kind == IFORWARD:
            if name not in runtime.iforwards:
                raise ConfigError(f"channel {runtime.name!r} has no iforward {name!r}")
            users = [c.spec.original for c in runtime.rforwards.values() if c.spec.name == name]
            if users:
                raise ConfigError(
                    f"iforward {name!r} carries rforward {users[0]!r}: remove that first"
                )
            del runtime.iforwards[name]
            channel.iforwards.pop(name, None)
            ours = False
        elif kind == RFORWARD:
            client = runtime.rforwards.pop(name, None)
            if client is None:
                raise ConfigError(
                    f"channel {runtime.name!r} has no rforward on {name!r} (give ADDR:PORT)"
                )
            client.stop()
            self.log.info("{label}: rforward {name!r} removed", label=runtime.name, name=name)
            return succeed(f"rforward {name!r} removed from channel {runtime.name!r}")
        else:
            raise ConfigError(f"unknown forward kind {kind!r}")
        if kill:
            ended = channel.end_streams(name, ours, f"{kind} {name!r} removed")
            outcome = f"{ended} live streams ended"
        else:
            outcome = f"{_live(channel, name, ours)} live streams continue"
        self.log.info(
            "{label}: {kind} {name!r} removed; {outcome}",
            label=runtime.name,
            kind=kind,
            name=name,
            outcome=outcome,
        )
        message = f"{kind} {name!r} removed from channel {runtime.name!r}; {outcome}"
        if isinstance(closed, Deferred):
            return closed.addCallback(lambda _: message)
        return succeed(message)

    # ----------------------------------------------------------------- views

    def forward_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for label in sorted(self.channels):
            runtime = self.channels[label]
            channel = runtime.channel
            for name, spec in sorted(runtime.oforwards.items()):
                listener = runtime.service.oforwards.get(name)
                where = _listening_on(listener)
                rows.append(
                    _forward_row(
                        label, OFORWARD, name, spec.original, where, _live(channel, name, True)
                    )
                )
            for name, spec in sorted(runtime.iforwards.items()):
                rows.append(
                    _forward_row(
                        label, IFORWARD, name, spec.original, "ready", _live(channel, name, False)
                    )
                )
            for address, client in sorted(runtime.rforwards.items()):
                rows.append(
                    _forward_row(label, RFORWARD, address, client.spec.original, client.state, 0)
                )
            for remote in self.policy.listeners.values():
                if remote.channel is channel and remote.request is not None:
                    rows.append(_remote_listen_row(label, remote))
        return rows

    def stream_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        now = self.reactor.seconds()
        for label in sorted(self.channels):
            channel = self.channels[label].channel
            streams = channel.session.streams
            for stale in [k for k in channel.opened_at if k not in streams]:
                del channel.opened_at[stale]
            for key in sorted(streams):
                stream = streams[key]
                local = channel.local(key)
                window = "blocked" if stream.send_credit <= 0 and stream.queued else "open"
                rows.append(
                    {
                        "key": f"{label}/{key:08x}",
                        "channel": label,
                        "id": key,
                        "service": stream.service,
                        "direction": "out" if stream.ours else "in",
                        "client": local.describe_peer() if local is not None else "-",
                        "bytes_sent": stream.bytes_sent,
                        "bytes_received": stream.bytes_received,
                        "age": round(now - channel.opened_at.get(key, now), 3),
                        "state": stream.state.name.lower(),
                        "window": window,
                        "send_credit": stream.send_credit,
                        "recv_credit": stream.recv_credit,
                        "queued": stream.queued,
                    }
                )
        return rows

    def channel_rows(self) -> list[dict[str, Any]]:
        now = self.reactor.seconds()
        rows = []
        for label in sorted(self.channels):
            runtime = self.channels[label]
            channel = runtime.channel
            session = channel.session
            stats = session.stats
            state = {
                State.UP: "up",
                State.HANDSHAKING: "handshaking",
                State.DISCONNECTED: "disconnected",
            }[session.state]
            rows.append(
                {
                    "key": label,
                    "channel": label,
                    "spec": runtime.config.channel.original,
                    "state": state,
                    "connected": channel.protocol is not None,
                    "peer_session": f"{session.peer_session:016x}" if session.is_up else "",
                    "uptime": round(now - channel.up_since, 3) if channel.up_since else 0.0,
                    "age": round(now - channel.started_at, 3),
                    "streams": len(session.streams),
                    "sessions": stats.sessions,
                    "frames_in": stats.frames_in,
                    "frames_out": stats.frames_out,
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                    "crc_errors": stats.damaged_frames,
                    "resyncs": stats.resyncs,
                    "lost_frames": stats.lost_frames,
                    "discarded_bytes": stats.discarded_bytes,
                    "protocol_errors": stats.protocol_errors,
                    "keepalive_timeouts": stats.keepalive_timeouts,
                    "limit_hits": stats.limit_hits,
                    "retransmits": stats.retransmits,
                    "link_timeouts": stats.timeouts,
                    "duplicates": stats.duplicates,
                    "bulk_bytes_out": stats.bulk_bytes_out,
                    "bulk_bytes_in": stats.bulk_bytes_in,
                }
            )
        return rows

    # ----------------------------------------------------------------- reload

    def reload(self) -> Deferred[Reloaded]:
        """Re-read the config file and apply the differences (SIGHUP, ``ctl reload``)."""
        path = self.process.config_file
        if path is None:
            return _failed("no --config file to reload")
        from virtproxy.configfile import load_config_file

        self.log.info("reloading {path}", path=path)
        try:
            new = load_config_file(path, self.default_limits)
        except ConfigError as e:
            self.log.error("reload failed, nothing changed: {error}", error=e.message)
            return _failed(e.message)
        errors: list[str] = []
        changes: list[str] = []
        pending: list[Deferred[Any]] = []

        def attempt(what: Callable[[], Any]) -> None:
            try:
                result = what()
            except ConfigError:
                self._reload_error(errors, Failure())
                return
            if isinstance(result, Deferred):
                pending.append(
                    result.addCallbacks(changes.append, partial(self._reload_error, errors))
                )
            elif isinstance(result, str):
                changes.append(result)

        old = self.from_file
        wanted = {c.name: c for c in new.channels}
        for name in sorted(set(old) - set(wanted)):
            if name in self.channels:
                attempt(partial(self.remove_channel, name))
        for name, config in wanted.items():
            before = old.get(name)
            if before is None:
                if name in self.channels:
                    errors.append(f"channel {name!r} exists already (from --channel or ctl)")
                    continue
                attempt(partial(self.add_channel, config))
            elif _bare(before) != _bare(config) or name not in self.channels:
                # A new spec or new limits need a new session: restart the channel.
                attempt(partial(self._restart_channel, name, config))
            else:
                applied = self._apply_forwards(self.channels[name], before, config, errors)
                pending.append(applied.addCallback(changes.extend))
        self.from_file = {n: c for n, c in wanted.items()}
        self.policy.allow = tuple(
            {a.original: a for a in (*self._cli_allow(), *new.allow_remote_listen)}.values()
        )
        if new.control != self.process.control and new.control is not None:
            errors.append("control: a new control socket path takes effect after a restart")
        if new.metrics != self.process.metrics and new.metrics is not None:
            errors.append("metrics: a new metrics endpoint takes effect after a restart")

        def summary(_: object) -> Reloaded:
            text = "; ".join(changes) or "no changes"
            if errors:
                text += f"; {len(errors)} errors: " + "; ".join(errors)
            self.log.info("reloaded {path}: {summary}", path=path, summary=text)
            return Reloaded(text, tuple(errors))

        return DeferredList(pending, consumeErrors=True).addCallback(summary)

    def _restart_channel(self, name: str, config: DaemonConfig) -> Deferred[str]:
        """Replace channel ``name`` with ``config``; if that cannot start (its
        address is in use), start the previous one again rather than leave
        the channel gone."""
        running = self.channels.get(name)
        previous = running.config if running is not None else None
        d = self.remove_channel(name) if running is not None else succeed("")

        def start(_: object) -> str:
            try:
                return self.add_channel(config) + " (restarted: spec or limits changed)"
            except (ConfigError, StartupError) as e:
                if previous is None:
                    raise
                try:
                    self.add_channel(previous)
                except (ConfigError, StartupError) as again:
                    raise ConfigError(
                        f"{e.message}; channel {name!r} is down: its previous spec did not"
                        f" start again either: {again.message}"
                    ) from None
                raise ConfigError(
                    f"{e.message}; channel {name!r} runs its previous spec again"
                ) from None

        return d.addCallback(start)

    def _reload_error(self, errors: list[str], failure: Failure) -> None:
        """A change of a reload failed, at once or later (a restarted channel
        that cannot listen again): counted in ``errors`` and logged."""
        error = failure.value
        if isinstance(error, (ConfigError, StartupError)):
            message = error.message
        else:
            message = f"{type(error).__name__}: {failure.getErrorMessage()}"
            self.log.failure("reload: unexpected error", failure)
        errors.append(message)
        self.log.error("reload: {error}", error=message)

    def _cli_allow(self) -> tuple[Any, ...]:
        return self.process.cli_allow

    def _apply_forwards(
        self, runtime: ChannelRuntime, before: DaemonConfig, after: DaemonConfig, errors: list[str]
    ) -> Deferred[list[str]]:
        """Apply forward-level differences of one channel, keeping live streams.

        Forwards are added once the removed ones are gone: an oforward renamed
        or changed on the same address can listen there only after the old
        listener closed.
        """
        messages: list[str] = []
        removing: list[Deferred[Any]] = []
        label = runtime.name

        def run(action: Callable[[], str | Deferred[str]]) -> None:
            try:
                result = action()
            except ConfigError:
                self._reload_error(errors, Failure())
                return
            if isinstance(result, Deferred):
                removing.append(
                    result.addCallbacks(messages.append, partial(self._reload_error, errors))
                )
            else:
                messages.append(result)

        # Removals first, rforwards before the iforwards they use.
        old_r = {r.address: r for r in before.rforwards}
        new_r = {r.address: r for r in after.rforwards}
        for address, rspec in old_r.items():
            if new_r.get(address) != rspec and address in runtime.rforwards:
                run(partial(self.remove_forward, label, RFORWARD, address))
        by_kind = [
            (kind, {f.name: f for f in old_list}, {f.name: f for f in new_list})
            for kind, old_list, new_list in (
                (OFORWARD, before.oforwards, after.oforwards),
                (IFORWARD, before.iforwards, after.iforwards),
            )
        ]
        for kind, old, new in by_kind:
            for name, spec in old.items():
                if new.get(name) != spec:
                    run(partial(self.remove_forward, label, kind, name))
        runtime.config = after

        def add(_: object) -> list[str]:
            for kind, old, new in by_kind:
                for name, spec in new.items():
                    if old.get(name) != spec:
                        run(partial(self._add_parsed, runtime, kind, spec))
            for address, rspec in new_r.items():
                if old_r.get(address) != rspec:
                    run(partial(self._add_parsed, runtime, RFORWARD, rspec))
            return messages

        return DeferredList(removing, consumeErrors=True).addCallback(add)


def _bare(config: DaemonConfig) -> DaemonConfig:
    """A channel config without its forwards: what needs a restart to change."""
    return replace(config, oforwards=(), iforwards=(), rforwards=())


def _failed(message: str) -> Deferred[Any]:
    """A Deferred that has failed with ConfigError(message)."""
    return fail(ConfigError(message))


def _listening_on(listener: ListenService | None) -> str:
    if listener is None or listener.port is None:
        return "not listening"
    from virtproxy.service import _where

    return f"listening on {_where(listener.port)}"


def _forward_row(
    channel: str, kind: str, name: str, spec: str, state: str, streams: int
) -> dict[str, Any]:
    return {
        "key": f"{channel}/{kind}/{name}",
        "channel": channel,
        "kind": kind,
        "name": name,
        "spec": spec,
        "state": state,
        "streams": streams,
    }


def _remote_listen_row(channel: str, listener: RemoteListener) -> dict[str, Any]:
    request = listener.request
    assert request is not None
    where = f"{request.host}:{request.port}"
    state = "listening" if listener.port is not None else "binding"
    return _forward_row(channel, "remote-listen", where, f"for peer's {request.name!r}", state, 0)
