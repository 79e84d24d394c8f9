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
  later call of the connection would pass.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectingCancelledError, NoProtocol
from twisted.internet.interfaces import IAddress, IConnector, IProtocol, IProtocolFactory
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure


def _idle_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain, connected socket transport with nothing buffered
    and no close under way (else None)."""
    handle = getattr(transport, "socket", None)
    if (
        not isinstance(transport, tcp.Connection)
        or not isinstance(handle, socket.socket)
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnecting
        or transport._writeDisconnected
        or transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
        or getattr(transport, "_sendmsgQueue", None)
        or transport.producer is not None
    ):
        return None
    return handle


def read_now(transport: Any) -> bytes:
    """Bytes already waiting on the socket (b"" if none, or if it needs the reactor).

    End of file is left where it is: the reactor finds it on its next read.
    A socket error is not (``recv`` consumed it), so the connection is aborted
    as the reactor would have done: the stream fails, it does not end cleanly.
    """
    handle = getattr(transport, "socket", None)
    if (
        not isinstance(transport, tcp.Connection)
        or not isinstance(handle, socket.socket)
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
    ):
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
