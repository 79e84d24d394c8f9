"""The control socket: AMP commands served on a UNIX socket (mode 0600).

``virtproxy ctl`` (:mod:`virtproxy.ctl`) is the client.  AMP gives framing,
typed arguments, request/answer matching and error propagation; each command
below maps onto one :class:`~virtproxy.daemon.Runtime` method.  AMP values are
limited to 64 KiB, so listings come in pages: the client passes the ``key``
of the last row it has as ``after`` until ``more`` is false.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from virtproxy.errors import ConfigError

#: Rows per page of a listing (keeps a page far below AMP's 64 KiB value limit).
PAGE_ROWS = 50


class ControlError(Exception):
    """A request the daemon refused; the message is one line for the operator."""


_STREAM_ROW = [
    (b"key", amp.Unicode()),
    (b"channel", amp.Unicode()),
    (b"id", amp.Integer()),
    (b"service", amp.Unicode()),
    (b"direction", amp.Unicode()),
    (b"client", amp.Unicode()),
    (b"bytes_sent", amp.Integer()),
    (b"bytes_received", amp.Integer()),
    (b"age", amp.Float()),
    (b"state", amp.Unicode()),
    (b"window", amp.Unicode()),
    (b"send_credit", amp.Integer()),
    (b"recv_credit", amp.Integer()),
    (b"queued", amp.Integer()),
]
_FORWARD_ROW = [
    (b"key", amp.Unicode()),
    (b"channel", amp.Unicode()),
    (b"kind", amp.Unicode()),
    (b"name", amp.Unicode()),
    (b"spec", amp.Unicode()),
    (b"state", amp.Unicode()),
    (b"streams", amp.Integer()),
]
_CHANNEL_ROW = [
    (b"key", amp.Unicode()),
    (b"channel", amp.Unicode()),
    (b"spec", amp.Unicode()),
    (b"state", amp.Unicode()),
    (b"connected", amp.Boolean()),
    (b"peer_session", amp.Unicode()),
    (b"uptime", amp.Float()),
    (b"age", amp.Float()),
    *(
        (name, amp.Integer())
        for name in (
            b"streams",
            b"sessions",
            b"frames_in",
            b"frames_out",
            b"bytes_in",
            b"bytes_out",
            b"crc_errors",
            b"resyncs",
            b"lost_frames",
            b"discarded_bytes",
            b"protocol_errors",
            b"keepalive_timeouts",
            b"limit_hits",
            b"retransmits",
            b"link_timeouts",
            b"duplicates",
        )
    ),
    # Newer than the rest: optional, so ctl still reads an older daemon's answer.
    (b"bulk_bytes_out", amp.Integer(optional=True)),
    (b"bulk_bytes_in", amp.Integer(optional=True)),
]


class _Page(amp.Command):
    arguments: ClassVar = [(b"after", amp.Unicode())]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


class ListStreams(_Page):
    response: ClassVar = [(b"rows", amp.AmpList(_STREAM_ROW)), (b"more", amp.Boolean())]


class ListForwards(_Page):
    response: ClassVar = [(b"rows", amp.AmpList(_FORWARD_ROW)), (b"more", amp.Boolean())]


class ChannelStatus(_Page):
    response: ClassVar = [(b"rows", amp.AmpList(_CHANNEL_ROW)), (b"more", amp.Boolean())]


class AddForward(amp.Command):
    arguments: ClassVar = [
        (b"channel", amp.Unicode()),
        (b"kind", amp.Unicode()),
        (b"spec", amp.Unicode()),
    ]
    response: ClassVar = [(b"message", amp.Unicode())]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


class RemoveForward(amp.Command):
    arguments: ClassVar = [
        (b"channel", amp.Unicode()),
        (b"kind", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"kill", amp.Boolean()),
    ]
    response: ClassVar = [(b"message", amp.Unicode())]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


class AddChannel(amp.Command):
    arguments: ClassVar = [
        (b"label", amp.Unicode()),
        (b"spec", amp.Unicode()),
        (b"oforwards", amp.ListOf(amp.Unicode())),
        (b"iforwards", amp.ListOf(amp.Unicode())),
        (b"rforwards", amp.ListOf(amp.Unicode())),
    ]
    response: ClassVar = [(b"message", amp.Unicode())]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


class RemoveChannel(amp.Command):
    arguments: ClassVar = [(b"label", amp.Unicode())]
    response: ClassVar = [(b"message", amp.Unicode())]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


class Reload(amp.Command):
    arguments: ClassVar = []
    #: failed: how many of the changes could not be made (the others were).
    response: ClassVar = [(b"message", amp.Unicode()), (b"failed", amp.Integer(optional=True))]
    errors: ClassVar = {ControlError: b"CONTROL_ERROR"}


def page(rows: list[dict[str, Any]], after: str) -> dict[str, Any]:
    """The rows after key ``after`` (rows are sorted by key), at most PAGE_ROWS."""
    rest = [row for row in rows if row["key"] > after] if after else rows
    return {"rows": rest[:PAGE_ROWS], "more": len(rest) > PAGE_ROWS}


def _refusal(call: Any) -> Deferred[Any]:
    """Run a Runtime call; a ConfigError becomes a ControlError for the client."""

    def translate(failure: Any) -> Any:
        failure.trap(ConfigError)
        raise ControlError(failure.value.message)

    return maybeDeferred(call).addErrback(translate)


class ControlProtocol(amp.AMP):
    """One ``virtproxy ctl`` connection to the daemon's :class:`Runtime`."""

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime

    # AMP logs every connection; a ctl poll loop would flood the daemon's log.
    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @ListStreams.responder
    def list_streams(self, after: str) -> dict[str, Any]:
        return page(sorted(self.runtime.stream_rows(), key=lambda r: r["key"]), after)

    @ListForwards.responder
    def list_forwards(self, after: str) -> dict[str, Any]:
        return page(sorted(self.runtime.forward_rows(), key=lambda r: r["key"]), after)

    @ChannelStatus.responder
    def channel_status(self, after: str) -> dict[str, Any]:
        return page(sorted(self.runtime.channel_rows(), key=lambda r: r["key"]), after)

    @AddForward.responder
    def add_forward(self, channel: str, kind: str, spec: str) -> Deferred[Any]:
        d = _refusal(lambda: self.runtime.add_forward(channel, kind, spec))
        return d.addCallback(lambda message: {"message": message})

    @RemoveForward.responder
    def remove_forward(self, channel: str, kind: str, name: str, kill: bool) -> Deferred[Any]:
        d = _refusal(lambda: self.runtime.remove_forward(channel, kind, name, kill))
        return d.addCallback(lambda message: {"message": message})

    @AddChannel.responder
    def add_channel(
        self,
        label: str,
        spec: str,
        oforwards: list[str],
        iforwards: list[str],
        rforwards: list[str],
    ) -> Deferred[Any]:
        def add() -> str:
            config = self.runtime.channel_from_request(label, spec, oforwards, iforwards, rforwards)
            return str(self.runtime.add_channel(config))

        return _refusal(add).addCallback(lambda message: {"message": message})

    @RemoveChannel.responder
    def remove_channel(self, label: str) -> Deferred[Any]:
        d = _refusal(lambda: self.runtime.remove_channel(label))
        return d.addCallback(lambda message: {"message": message})

    @Reload.responder
    def reload(self) -> Deferred[Any]:
        d = _refusal(self.runtime.reload)
        return d.addCallback(lambda done: {"message": done.text, "failed": len(done.errors)})


class ControlFactory(Factory):
    noisy = False

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.runtime)


def control_service(runtime: Any, path: str) -> Any:
    """A ListenService for the control socket at ``path`` (mode 0600)."""
    from virtproxy.options import UNIX_SOCKET_MODE, quote_endpoint_arg
    from virtproxy.service import ListenService

    class ControlListenService(ListenService):
        def startService(self) -> None:
            """Bind under umask 0177 too: Twisted chmods only after bind()."""
            old = os.umask(0o177)
            try:
                super().startService()
            finally:
                os.umask(old)

    description = f"unix:{quote_endpoint_arg(path)}:lockfile=1:mode={UNIX_SOCKET_MODE}"
    return ControlListenService(
        serverFromString(runtime.reactor, description),
        ControlFactory(runtime),
        f"control socket {path}",
    )
