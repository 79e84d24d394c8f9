"""``write_now``: straight to the socket when Twisted holds nothing, else Twisted's path.

Real socket pairs wrapped in Twisted's tcp.Connection (tests/transportpair.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from transportpair import TransportPair
from twisted.internet.testing import StringTransport

from virtproxy.protocol import write_now


@pytest.fixture
def pair() -> Iterator[TransportPair]:
    p = TransportPair()
    try:
        yield p
    finally:
        p.close()


def test_idle_socket_gets_the_bytes_at_once(pair: TransportPair) -> None:
    assert write_now(pair.transport, b"hello") == 0
    assert not pair.writing(), "registered for writing though nothing is buffered"
    assert pair.far.recv(100) == b"hello"


def test_pieces_go_in_one_send_and_in_order(pair: TransportPair) -> None:
    assert write_now(pair.transport, [b"ab", b"", b"cde", b"f"]) == 0
    assert not pair.writing()
    assert pair.far.recv(100) == b"abcdef"


@pytest.mark.parametrize("kind", ["bytes", "pieces", "view", "views"])
def test_what_the_kernel_refuses_is_buffered_by_twisted(pair: TransportPair, kind: str) -> None:
    """Whatever the form (views of a read included), Twisted gets the rest as bytes."""
    pair.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 8192  # 2 MiB: more than the socket pair holds
    view = memoryview(data)
    written: object = {
        "bytes": data,
        "pieces": [data[i : i + 100_000] for i in range(0, len(data), 100_000)],
        "view": view,
        "views": [view[i : i + 100_000] for i in range(0, len(data), 100_000)],
    }[kind]
    left = write_now(pair.transport, written)  # type: ignore[arg-type]
    assert 0 < left < len(data)
    assert pair.writing(), "the rest must wait in Twisted for the socket to drain"
    # A write while Twisted holds bytes queues behind them, never jumps ahead.
    assert write_now(pair.transport, b"tail") == 4
    assert pair.drain() == data + b"tail"
    assert not pair.writing()


def test_socket_error_is_left_to_twisted(pair: TransportPair) -> None:
    pair.far.close()
    lost = []
    pair.transport.connectionLost = lost.append  # type: ignore[method-assign]
    assert write_now(pair.transport, b"x" * 1000) == 1000
    assert pair.writing()
    result = pair.transport.doWrite()  # Twisted meets the error on its own path
    assert isinstance(result, Exception)


def test_closing_transport_uses_twisted_write(pair: TransportPair) -> None:
    pair.transport.disconnecting = True
    assert write_now(pair.transport, b"late") == 4
    assert pair.writing()


def test_aborted_transport_sends_nothing(pair: TransportPair) -> None:
    pair.transport.abortConnection()
    write_now(pair.transport, b"after abort")
    with pytest.raises(BlockingIOError):
        pair.far.recv(100)


def test_other_transports_use_their_write() -> None:
    transport = StringTransport()
    assert write_now(transport, b"abc") == 3
    assert write_now(transport, [b"de", memoryview(b"f")]) == 3
    assert write_now(transport, memoryview(b"gh")) == 2  # Twisted takes only bytes
    assert transport.value() == b"abcdefgh"


def test_more_pieces_than_one_sendmsg_takes_are_joined(pair: TransportPair) -> None:
    pieces = [bytes([n % 256]) for n in range(3000)]
    assert write_now(pair.transport, pieces) == 0
    assert pair.drain() == b"".join(pieces)
