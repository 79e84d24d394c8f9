"""The daemons' own TCP sockets carry the options of virtproxy/tcpopts.py:
``TCP_NODELAY``, and over loopback the congestion control reno.

Checked on the live sockets of running daemons: each is copied into this
process with ``pidfd_getfd(2)`` (Linux 5.6+; the test process is the daemons'
parent, so it may), and its options read there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

import pytest
from vp_e2e import LOOPBACK, EchoServer, connect, free_port

from virtproxy.tcpopts import LOOPBACK_CONGESTION, TCP_CONGESTION

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or TCP_CONGESTION is None, reason="TCP_CONGESTION is Linux's"
)

#: pidfd_getfd's number: the same on every Linux architecture (asm-generic).
SYS_PIDFD_GETFD = 438


def _tcp_sockets(pid: int) -> list[socket.socket]:
    """Copies of the connected TCP sockets process ``pid`` holds (the caller closes them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found: list[socket.socket] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue  # closed meanwhile
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSYS, errno.EPERM):
                    pytest.skip(f"pidfd_getfd: {os.strerror(code)}")
                continue  # closed meanwhile
            sock = socket.socket(fileno=fd)
            try:
                sock.getpeername()
            except OSError:
                sock.close()  # a listener
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                found.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def _options(sockets: list[socket.socket], peer_port: int) -> tuple[int, bytes]:
    """``TCP_NODELAY`` and the congestion control of the one socket to ``peer_port``."""
    assert TCP_CONGESTION is not None
    mine = [s for s in sockets if s.getpeername()[1] == peer_port]
    assert len(mine) == 1, f"{len(mine)} sockets to port {peer_port}"
    sock = mine[0]
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).rstrip(b"\0"),
    )


def test_channel_and_proxied_sockets_have_no_nagle_and_reno(pair, backends):
    probe = socket.socket()
    try:
        probe.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, LOOPBACK_CONGESTION)
    except OSError as e:
        pytest.skip(f"this kernel does not let us pick reno: {e}")
    finally:
        probe.close()
    echo = backends(EchoServer)
    port = free_port()
    p = pair(host_o=[f"echo:{LOOPBACK}:{port}"], guest_i=[f"echo:{echo.addr}"])
    channel_port = int(p.channel.rsplit(":", 1)[1])
    target_port = echo.port
    with connect(port) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"  # both daemons hold their socket of it now
        client_port = client.getsockname()[1]
        host_sockets = _tcp_sockets(p.host.pid)
        guest_sockets = _tcp_sockets(p.guest.pid)
        try:
            # The guest's end of the channel is the one whose peer is the channel port.
            assert _options(guest_sockets, channel_port) == (1, LOOPBACK_CONGESTION)
            guest_end = next(s for s in guest_sockets if s.getpeername()[1] == channel_port)
            assert _options(host_sockets, guest_end.getsockname()[1]) == (1, LOOPBACK_CONGESTION)
            assert _options(host_sockets, client_port) == (1, LOOPBACK_CONGESTION)
            assert _options(guest_sockets, target_port) == (1, LOOPBACK_CONGESTION)
        finally:
            for sock in host_sockets + guest_sockets:
                sock.close()
