"""Remote forwards (``--rforward``, like ``ssh -R``) over an ordinary stream.

The requesting side opens a stream to the reserved service
:data:`~virtproxy.channel.REMOTE_SERVICE` and sends one request, "listen on
ADDR:PORT for service NAME"; the other side answers once.  If it agreed, it
listens for as long as that stream lives, and every connection it accepts
becomes a normal stream to the requester's service NAME, which the requester
resolves through its own iforwards.  So nothing read from the channel picks a
host or port to connect to, and the listening side binds only addresses its
operator allowed (``--allow-remote-listen``).  docs/protocol.rst, "Remote
forwards", is the wire format; no session change was needed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from virtproxy.channel import REMOTE_SERVICE, Channel, StreamEnd
from virtproxy.config import ListenAllowance, RemoteForwardSpec
from virtproxy.frames import Payload, Reason, describe_reason
from virtproxy.options import FORWARD_BACKLOG, NAME_RE, RESERVED_PREFIX, quote_endpoint_arg

REQUEST_MAGIC = b"VPRF"
ANSWER_MAGIC = b"VPRA"
VERSION = 1
#: Longest IP literal (an IPv6 address with an IPv4 tail is 45 characters).
MAX_ADDRESS = 45
MAX_NAME = 64
MAX_MESSAGE = 200
MAX_REQUEST = 4 + 1 + 1 + MAX_ADDRESS + 2 + 1 + MAX_NAME
MAX_ANSWER = 4 + 1 + 1 + MAX_MESSAGE
#: Answer status codes.
OK, NOT_ALLOWED, LISTEN_FAILED, MALFORMED, LIMIT = 0, 1, 2, 3, 4
STATUS_NAMES = {
    OK: "listening",
    NOT_ALLOWED: "not allowed",
    LISTEN_FAILED: "listen failed",
    MALFORMED: "malformed request",
    LIMIT: "too many remote forwards",
}
#: Remote listeners one channel's peer may hold open at once.
MAX_REMOTE_LISTENERS = 64
#: Requests are retried after a refusal or a lost stream, backing off to this.
RETRY_MAX = 30.0

_PORT = struct.Struct(">H")


class MalformedError(ValueError):
    """A request or answer broke the format (the message says how)."""


@dataclass(frozen=True)
class Request:
    host: str
    port: int
    name: str


def encode_request(host: str, port: int, name: str) -> bytes:
    address = host.encode("ascii")
    service = name.encode("ascii")
    if not 0 < len(address) <= MAX_ADDRESS or not 0 < len(service) <= MAX_NAME:
        raise ValueError("address or name length out of range")
    return (
        REQUEST_MAGIC
        + bytes([VERSION, len(address)])
        + address
        + _PORT.pack(port)
        + bytes([len(service)])
        + service
    )


def request_length(buffer: bytes) -> int | None:
    """Bytes the request in ``buffer`` needs in all, once that is known."""
    if len(buffer) < 6:
        return None
    alen = buffer[5]
    if len(buffer) < 6 + alen + 3:
        return None
    return 6 + alen + 3 + buffer[6 + alen + 2]


def decode_request(data: bytes) -> Request:
    """Check every field of a complete request; :class:`MalformedError` if any is wrong."""
    if len(data) < 9 or data[:4] != REQUEST_MAGIC:
        raise MalformedError("bad magic")
    if data[4] != VERSION:
        raise MalformedError(f"unsupported version {data[4]}")
    alen = data[5]
    if not 0 < alen <= MAX_ADDRESS or len(data) < 6 + alen + 3:
        raise MalformedError("bad address length")
    try:
        host = data[6 : 6 + alen].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("address is not ASCII") from None
    if not (isIPAddress(host) or isIPv6Address(host)):
        raise MalformedError("address is not an IP address")
    (port,) = _PORT.unpack_from(data, 6 + alen)
    if port == 0:
        raise MalformedError("port 0")
    nlen = data[6 + alen + 2]
    if not 0 < nlen <= MAX_NAME or len(data) != 6 + alen + 3 + nlen:
        raise MalformedError("bad name length")
    try:
        name = data[6 + alen + 3 :].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("name is not ASCII") from None
    if not NAME_RE.match(name) or name.startswith(RESERVED_PREFIX):
        raise MalformedError("invalid service name")
    return Request(host, port, name)


def encode_answer(status: int, message: str = "") -> bytes:
    text = message.encode("utf-8")[:MAX_MESSAGE]
    return ANSWER_MAGIC + bytes([status, len(text)]) + text


def answer_length(buffer: bytes) -> int | None:
    return None if len(buffer) < 6 else 6 + buffer[5]


def decode_answer(data: bytes) -> tuple[int, str]:
    if len(data) < 6 or data[:4] != ANSWER_MAGIC:
        raise MalformedError("bad magic")
    if data[5] > MAX_MESSAGE or len(data) != 6 + data[5]:
        raise MalformedError("bad message length")
    return data[4], data[6:].decode("utf-8", "replace")


def _server_description(host: str, port: int) -> str:
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={quote_endpoint_arg(host)}:backlog={FORWARD_BACKLOG}"


# --------------------------------------------------------------------------- listening side


class RemoteListenPolicy:
    """Which remote-forward requests this side grants (``--allow-remote-listen``)."""

    def __init__(self, reactor: Any, allow: Sequence[ListenAllowance] = ()) -> None:
        self.reactor = reactor
        self.allow = tuple(allow)
        #: Live listeners per channel label, for the limit and for ``ctl forwards``.
        self.listeners: dict[int, RemoteListener] = {}

    def allows(self, host: str, port: int) -> bool:
        return any(a.allows(host, port) for a in self.allow)

    def handler(self, channel: Channel, stream_id: int) -> StreamEnd | None:
        """Called by the Channel for a peer's request stream; None refuses it outright."""
        if not self.allow:
            return None
        return RemoteListener(self, channel, stream_id)

    def count(self, channel: Channel) -> int:
        return sum(1 for lst in self.listeners.values() if lst.channel is channel)


class RemoteListener:
    """Our end of a peer's request stream: one listener, as long as the stream lives."""

    log = Logger()
    service = REMOTE_SERVICE

    def __init__(self, policy: RemoteListenPolicy, channel: Channel, stream_id: int) -> None:
        self.policy = policy
        self.channel = channel
        self.stream_id = stream_id
        self.request: Request | None = None
        self.port: IListeningPort | None = None
        self._buffer = b""
        self._done = False

    def describe_peer(self) -> str:
        if self.request is None:
            return "remote-forward request"
        return f"remote forward {self.request.name!r} on {self.request.host}:{self.request.port}"

    def deliver(self, data: Payload | list[Payload]) -> None:
        if isinstance(data, list):
            data = b"".join(data)
        self.channel.consumed(self.stream_id, len(data))
        if self._done:
            return
        if self.request is not None:
            self._refuse(MALFORMED, "data after the request")
            return
        self._buffer += data
        need = request_length(self._buffer)
        if len(self._buffer) > MAX_REQUEST or (need is not None and len(self._buffer) > need):
            self._refuse(MALFORMED, "request too long")
            return
        if need is None or len(self._buffer) < need:
            return
        try:
            request = decode_request(self._buffer)
        except MalformedError as e:
            self._refuse(MALFORMED, str(e))
            return
        self.request = request
        self._grant(request)

    def _grant(self, request: Request) -> None:
        where = f"{request.host}:{request.port}"
        if not self.policy.allows(request.host, request.port):
            self._refuse(NOT_ALLOWED, f"{where} is not in --allow-remote-listen")
            return
        if self.policy.count(self.channel) >= MAX_REMOTE_LISTENERS:
            self._refuse(LIMIT, f"at most {MAX_REMOTE_LISTENERS} remote forwards per channel")
            return
        from virtproxy.factories import ProxyServerFactory

        endpoint = serverFromString(
            self.policy.reactor, _server_description(request.host, request.port)
        )
        self.policy.listeners[id(self)] = self
        endpoint.listen(ProxyServerFactory(self.channel, request.name)).addCallbacks(
            self._listening, self._listen_failed
        )

    def _listening(self, port: IListeningPort) -> None:
        if self._done:  # the stream ended while we were binding
            port.stopListening()
            return
        self.port = port
        assert self.request is not None
        self.log.info(
            "{label}: listening for remote forward {name!r} (peer's request) on {host}:{port}",
            label=self.channel.label,
            name=self.request.name,
            host=self.request.host,
            port=self.request.port,
        )
        self.channel.send(self.stream_id, encode_answer(OK, "listening"))

    def _listen_failed(self, failure: Failure) -> None:
        self.policy.listeners.pop(id(self), None)
        if not self._done:
            self._refuse(LISTEN_FAILED, failure.getErrorMessage())

    def _refuse(self, status: int, message: str) -> None:
        self.log.warn(
            "{label}: remote-forward request refused: {what}: {message}",
            label=self.channel.label,
            what=STATUS_NAMES.get(status, str(status)),
            message=message,
        )
        self.channel.send(self.stream_id, encode_answer(status, message))
        self.channel.send_eof(self.stream_id)
        self._stop()

    def _stop(self) -> None:
        self._done = True
        self.policy.listeners.pop(id(self), None)
        port, self.port = self.port, None
        if port is not None and self.request is not None:
            self.log.info(
                "{label}: remote forward {name!r} on {host}:{port} closed",
                label=self.channel.label,
                name=self.request.name,
                host=self.request.host,
                port=self.request.port,
            )
            port.stopListening()

    def resume_reading(self) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def end_of_data(self) -> None:
        """The requester withdrew: stop listening (accepted streams live on)."""
        was_done = self._done
        self._stop()
        if not was_done:
            self.channel.send_eof(self.stream_id)

    def stream_closed(self) -> None:
        self._stop()

    def stream_reset(self, why: str) -> None:
        self._stop()

    def stream_rejected(self, reason: int, message: str) -> None:
        self._stop()


# --------------------------------------------------------------------------- requesting side


class RemoteForwardClient:
    """Keeps one ``--rforward`` requested from the peer, re-asking after a session
    restart or a refusal (with backoff)."""

    log = Logger()
    service = REMOTE_SERVICE

    def __init__(self, channel: Channel, spec: RemoteForwardSpec) -> None:
        self.channel = channel
        self.spec = spec
        self.state = "starting"
        self.stream_id: int | None = None
        self._buffer = b""
        self._answered = False
        self._retry: IDelayedCall | None = None
        self._delay = 1.0
        self._stopped = False

    def describe_peer(self) -> str:
        return f"remote forward {self.spec.name!r} on peer {self.spec.address}"

    def start(self) -> None:
        self._retry = None
        if self._stopped:
            return
        self._buffer = b""
        self._answered = False
        self.state = "requesting"
        self.stream_id = self.channel.open_stream(REMOTE_SERVICE, self)

    def stop(self) -> None:
        """Withdraw: the peer stops listening (live streams it carried go on)."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        stream_id, self.stream_id = self.stream_id, None
        if stream_id is not None:
            self.channel.local_lost(stream_id, "remote forward removed")
        self.state = "removed"

    def _again(self, state: str, delay: float | None = None) -> None:
        self.stream_id = None
        if self._stopped:
            return
        self.state = state
        if delay is None:
            delay, self._delay = self._delay, min(RETRY_MAX, self._delay * 2)
        if self._retry is None or not self._retry.active():
            self._retry = self.channel.reactor.callLater(delay, self.start)

    def stream_opened(self) -> None:
        if self.stream_id is None:
            return
        self.channel.send(
            self.stream_id, encode_request(self.spec.host, self.spec.port, self.spec.name)
        )

    def deliver(self, data: Payload | list[Payload]) -> None:
        if isinstance(data, list):
            data = b"".join(data)
        if self.stream_id is None:
            return
        self.channel.consumed(self.stream_id, len(data))
        if self._answered:
            return
        self._buffer += data
        need = answer_length(self._buffer)
        if len(self._buffer) > MAX_ANSWER or (need is not None and len(self._buffer) > need):
            self._malformed("answer too long")
            return
        if need is None or len(self._buffer) < need:
            return
        try:
            status, message = decode_answer(self._buffer)
        except MalformedError as e:
            self._malformed(str(e))
            return
        self._answered = True
        if status == OK:
            self._delay = 1.0
            self.state = "listening"
            self.log.info(
                "{label}: peer listens on {where} for remote forward {name!r}",
                label=self.channel.label,
                where=self.spec.address,
                name=self.spec.name,
            )
        else:
            self.state = f"refused: {STATUS_NAMES.get(status, str(status))}: {message}"
            self.log.warn(
                "{label}: peer refused remote forward {name!r} on {where}: {message}",
                label=self.channel.label,
                name=self.spec.name,
                where=self.spec.address,
                message=message,
            )

    def _malformed(self, why: str) -> None:
        self._answered = True
        stream_id = self.stream_id
        self.log.warn(
            "{label}: bad answer to remote forward {name!r}: {why}",
            label=self.channel.label,
            name=self.spec.name,
            why=why,
        )
        if stream_id is not None:
            self.channel.local_lost(stream_id, f"bad remote-forward answer: {why}")
        self._again("bad answer")

    def resume_reading(self) -> None:
        pass

    def end_of_data(self) -> None:
        """The peer ended the listener (refusal or shutdown): close our side too."""
        if self.stream_id is not None:
            self.channel.send_eof(self.stream_id)

    def stream_closed(self) -> None:
        state = self.state if self.state.startswith("refused") else "closed by peer"
        self._again(state)

    def stream_reset(self, why: str) -> None:
        self._again(f"down ({why})")

    def stream_rejected(self, reason: int, message: str) -> None:
        if reason == Reason.TIMEOUT and not self.channel.session.is_up:
            # Our open waited for a session that has not come up yet: wait on
            # at once, so the request goes out with the next session's first frames.
            self._again("waiting for a session", delay=0.0)
            return
        self._again(f"rejected: {describe_reason(reason, message)}")
