"""Test helper: a real socket pair whose near end is a Twisted ``tcp.Connection``.

The transport runs on a MemoryReactorClock, so a test sees whether Twisted
registered it for writing, while its bytes go through a real kernel socket
(for ``write_now`` and the ``localio`` shortcuts, which bypass Twisted's
buffer when it holds nothing).
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock


class TransportPair:
    def __init__(self, protocol: IProtocol | None = None) -> None:
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.far.setblocking(False)
        self.reactor = MemoryReactorClock()
        self.protocol = protocol if protocol is not None else Protocol()
        self.transport = tcp.Connection(self.near, self.protocol, self.reactor)
        self.transport.connected = True
        self.transport.startReading()

    def writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def far_reads(self) -> bytes | None:
        """What the far end reads now (None: nothing yet, b"": end of file)."""
        try:
            return self.far.recv(1 << 20)
        except BlockingIOError:
            return None

    def drain(self) -> bytes:
        """Read everything the far end can get, letting Twisted write its buffer."""
        out = bytearray()
        while True:
            if self.writing():
                self.transport.doWrite()
            try:
                data = self.far.recv(1 << 20)
            except BlockingIOError:
                if not self.writing():
                    return bytes(out)
                continue
            out += data

    def close(self) -> None:
        self.near.close()
        self.far.close()
