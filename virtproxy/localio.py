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
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp


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
        lose_write_now(transport)
    # With the write side shut, Twisted closes at once.
    transport.loseConnection()
