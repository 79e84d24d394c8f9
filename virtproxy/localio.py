"""Shortcuts past a reactor turn for the local sockets of short streams.

Like :func:`virtproxy.protocol.write_now`, each works on a plain Twisted
socket transport (TCP or UNIX) that holds nothing unsent, and otherwise falls
back to Twisted's own call unchanged, so the reactor still meets every error
and every close itself.

* :func:`read_now` reads what a client sent before its connection was
  accepted, so that a stream's first bytes go over the channel in one write
  with its OPEN instead of one reactor turn later.
* :func:`lose_write_now` and :func:`lose_connection_now` shut a socket down
  at once: Twisted's ``loseWriteConnection`` and ``loseConnection`` always
  register the socket for writing and finish on the next reactor turn (two
  ``epoll_ctl`` calls, an ``epoll_wait`` and an empty ``send``), even with
  nothing left to write.
* :func:`connect_direct` is ``endpoint.connect`` for plain TCP and UNIX client
  endpoints without the endpoint's wrapper protocol, through which every
  later call of the connection would pass.  To an IP address or a UNIX path
  it connects a socket of its own at once (:func:`connect_now`): no reactor
  turn before the ``connect`` (Twisted's client waits one), and none after it
  when the connect completed (on loopback it has by the second ``connect``).
"""

from __future__ import annotations

import socket
from errno import EAGAIN, EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    NoProtocol,
    TimeoutError,
    getConnectError,
)
from twisted.internet.interfaces import IAddress, IConnector, IProtocol, IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure


def open_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain, connected socket transport (TCP or UNIX) with no
    close under way (else None)."""
    handle = getattr(transport, "socket", None)
    if (
        not isinstance(transport, tcp.Connection)
        or not isinstance(handle, socket.socket)
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
    ):
        return None
    return handle


def writable_socket(transport: Any) -> socket.socket | None:
    """:func:`open_socket`, with nothing buffered and its write side still
    open (else None): one we may write to ourselves."""
    handle = open_socket(transport)
    if (
        handle is None
        or transport._writeDisconnecting
        or transport._writeDisconnected
        or transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
        or getattr(transport, "_sendmsgQueue", None)
    ):
        return None
    return handle


def _idle_socket(transport: Any) -> socket.socket | None:
    """:func:`writable_socket`, and no producer registered (one we may shut down)."""
    return writable_socket(transport) if getattr(transport, "producer", None) is None else None


def read_now(transport: Any) -> bytes:
    """Bytes already waiting on the socket (b"" if none, or if it needs the reactor).

    End of file is left where it is: the reactor finds it on its next read.
    A socket error is not (``recv`` consumed it), so the connection is aborted
    as the reactor would have done: the stream fails, it does not end cleanly.
    """
    handle = open_socket(transport)
    if handle is None:
        return b""
    try:
        return handle.recv(transport.bufferSize)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        transport.abortConnection()
        return b""


def lose_write_now(transport: Any) -> None:
    """``loseWriteConnection``: at once (FIN now) if nothing is buffered."""
    if _idle_socket(transport) is None:
        transport.loseWriteConnection()
        return
    # What Twisted's doWrite does once the buffer drained after loseWriteConnection.
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport.stopWriting()
    transport._closeWriteConnection()


def lose_connection_now(transport: Any) -> None:
    """``loseConnection``: at once (FIN now, the protocol's ``connectionLost``
    before this returns) if nothing is buffered."""
    if _idle_socket(transport) is not None:
        # Nothing left to write: with the write side counted as done, Twisted
        # closes at once, and its close (shutdown(2), close) sends the FIN.
        transport._writeDisconnected = True
    transport.loseConnection()


class _DirectFactory(ClientFactory):
    """What the endpoint's wrapping factory does, minus the wrapper protocol."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory = factory
        self.deferred: Deferred[IProtocol] = Deferred(canceller=self._cancel)
        self.connector: IConnector | None = None

    def startedConnecting(self, connector: IConnector) -> None:
        self.connector = connector

    def _cancel(self, deferred: Deferred[IProtocol]) -> None:
        assert self.connector is not None  # connect* calls startedConnecting at once
        deferred.errback(ConnectingCancelledError(self.connector.getDestination()))
        self.connector.stopConnecting()

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        # Called once connected, right before the protocol's connectionMade.
        assert addr is not None  # a connector always passes the peer's address
        try:
            protocol = self.factory.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            self.deferred.errback()
            return None
        self.deferred.callback(protocol)
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


def connect_direct(endpoint: object, factory: IProtocolFactory) -> Deferred[IProtocol] | None:
    """``endpoint.connect(factory)`` for a plain TCP or UNIX client endpoint,
    without its wrapper protocol (None for any other endpoint).

    The Deferred fails as the endpoint's would (``ConnectingCancelledError``
    once cancelled) and fires with the protocol just before its
    ``connectionMade``, not just after.
    """
    fast = connect_now(endpoint, factory)
    if fast is not None:
        return fast
    direct = _DirectFactory(factory)
    if type(endpoint) is TCP4ClientEndpoint:
        endpoint._reactor.connectTCP(
            endpoint._host,
            endpoint._port,
            direct,
            timeout=endpoint._timeout,
            bindAddress=endpoint._bindAddress,
        )
    elif type(endpoint) is UNIXClientEndpoint:
        endpoint._reactor.connectUNIX(
            endpoint._path, direct, timeout=endpoint._timeout, checkPID=endpoint._checkPID
        )
    else:
        return None
    return direct.deferred


#: connect() results that mean "under way": wait until the socket is writable.
_IN_PROGRESS = (EINPROGRESS, EALREADY)


def connect_now(endpoint: object, factory: IProtocolFactory) -> Deferred[IProtocol] | None:
    """Connect a plain TCP endpoint to an IP address, or a UNIX endpoint, with
    a non-blocking socket of our own (None: not such an endpoint, or a case
    left to Twisted's client).

    ``connect`` is called at once; on loopback the handshake is over by the
    time it returns, and a second ``connect`` tells (as Twisted's client does
    one reactor turn later): then the transport is made and the protocol's
    ``connectionMade`` runs before this returns.  Otherwise the socket waits
    for writability (:class:`_Connecting`), with the endpoint's timeout.
    Failures are the ones Twisted's client reports (``getConnectError``,
    ``TimeoutError``, ``ConnectingCancelledError`` once cancelled).
    """
    kind = type(endpoint)
    if kind is TCP4ClientEndpoint:
        reactor = endpoint._reactor  # type: ignore[attr-defined]
        host = endpoint._host  # type: ignore[attr-defined]
        port = endpoint._port  # type: ignore[attr-defined]
        if endpoint._bindAddress is not None or not isinstance(port, int):  # type: ignore[attr-defined]
            return None
        if isIPAddress(host):
            family = socket.AF_INET
            target: Any = (host, port)
            peer: Any = IPv4Address("TCP", host, port)
        elif isIPv6Address(host) and "%" not in host:
            family = socket.AF_INET6
            target = (host, port, 0, 0)
            peer = IPv6Address("TCP", host, port, 0, 0)
        else:
            return None  # a name to resolve
    elif kind is UNIXClientEndpoint:
        reactor = endpoint._reactor  # type: ignore[attr-defined]
        if endpoint._checkPID:  # type: ignore[attr-defined]
            return None
        family = socket.AF_UNIX
        target = endpoint._path  # type: ignore[attr-defined]
        peer = UNIXAddress(target)
    else:
        return None
    if not isinstance(reactor, PosixReactorBase):
        return None
    try:
        handle = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None  # Twisted's client reports it its own way
    try:
        handle.setblocking(False)
        result = handle.connect_ex(target)
        if result == EINPROGRESS:
            result = handle.connect_ex(target)
    except OSError as e:
        result = e.errno or -1
    if result in (EAGAIN, EWOULDBLOCK):
        # A UNIX listener's full backlog (or no local port left): Twisted's
        # client retries on writability.
        handle.close()
        return None
    if result in _IN_PROGRESS:
        waiting = _Connecting(reactor, handle, target, peer, factory, endpoint._timeout)  # type: ignore[attr-defined]
        return waiting.deferred
    deferred: Deferred[IProtocol] = Deferred()
    if result in (0, EISCONN):
        _make_connection(reactor, handle, target, peer, factory, deferred)
    else:
        handle.close()
        deferred.errback(getConnectError((result, strerror(result))))
    return deferred


def _make_connection(
    reactor: Any,
    handle: socket.socket,
    target: Any,
    peer: Any,
    factory: IProtocolFactory,
    deferred: Deferred[IProtocol],
) -> None:
    """What Twisted's client does once connected: a transport for the socket,
    the protocol's Deferred fired, then its ``connectionMade``."""
    try:
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            raise NoProtocol()
    except BaseException:
        handle.close()
        deferred.errback()
        return
    if handle.family == socket.AF_UNIX:
        transport: tcp.Server = unix.Server(handle, protocol, target, None, 0, reactor)
    else:
        transport = tcp.Server(handle, protocol, target, None, 0, reactor)  # type: ignore[arg-type]
    transport.repstr = f"<{type(protocol).__name__} to {target!r}>"
    deferred.callback(protocol)
    protocol.makeConnection(transport)


class _Connecting:
    """A connect under way: the socket waits for writability (an
    ``IWriteDescriptor`` of the reactor's), at most ``timeout`` seconds."""

    def __init__(
        self,
        reactor: Any,
        handle: socket.socket,
        target: Any,
        peer: Any,
        factory: IProtocolFactory,
        timeout: float,
    ) -> None:
        self.reactor = reactor
        self.handle = handle
        self.target = target
        self.peer = peer
        self.factory = factory
        self.deferred: Deferred[IProtocol] = Deferred(canceller=self._cancel)
        self._fd = handle.fileno()
        reactor.addWriter(self)
        self._timer = reactor.callLater(timeout, self._fail, TimeoutError())

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "connecting"

    def doRead(self) -> None:
        pass

    def doWrite(self) -> None:
        err = self.handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:
                err = self.handle.connect_ex(self.target)
            except OSError as e:
                err = e.errno or -1
            if err in _IN_PROGRESS:
                return  # not yet
        if err in (0, EISCONN):
            self._stop()
            _make_connection(
                self.reactor, self.handle, self.target, self.peer, self.factory, self.deferred
            )
        else:
            self._fail(getConnectError((err, strerror(err))))

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped us (an error event, or its shutdown).
        if self.deferred.called:
            return
        err = self.handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._fail(getConnectError((err, strerror(err))) if err else reason)

    def _stop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        self.reactor.removeWriter(self)

    def _fail(self, reason: BaseException | Failure) -> None:
        if self.deferred.called:
            return
        self._stop()
        self.handle.close()
        self.deferred.errback(reason)

    def _cancel(self, deferred: Deferred[IProtocol]) -> None:
        self._fail(ConnectingCancelledError(self.peer))
