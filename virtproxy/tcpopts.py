"""Options for the TCP sockets virtproxy owns: the channel and proxied sockets.

* ``TCP_NODELAY`` always: frames and keystrokes go at once, not after a
  delayed ACK (with Nagle, one ssh-over-pipe setup made 34 connections a
  second instead of thousands).
* Over loopback, the congestion control ``reno``.  A loopback connection
  loses nothing and has no queue to control, so its congestion control only
  costs CPU.  Where a host's default is a pacing one (BBR, as many tuned
  hosts now set it), the kernel paces even loopback bytes with a timer per
  burst, and the sender idles between bursts: over a loopback TCP channel,
  bulk ran at 1.5 GB/s with BBR and 1.95 with reno, the sending daemon
  spending 1.05 CPU s per 2 GB against 0.67 (benchmarks/README.rst).  ``reno`` paces
  nothing and is the one algorithm Linux lets any user pick.  A socket to
  any other address keeps the host's default, which may well matter there.
"""

from __future__ import annotations

import socket

#: Linux's TCP_CONGESTION; absent elsewhere, where nothing is changed.
TCP_CONGESTION: int | None = getattr(socket, "TCP_CONGESTION", None)
#: Always built into Linux, and always allowed to unprivileged processes.
LOOPBACK_CONGESTION = b"reno"


def is_loopback_peer(peer: object) -> bool:
    """Whether a ``getpeername()`` result is a loopback IPv4 or IPv6 address."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    host = peer[0]
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


def tune_tcp(handle: socket.socket) -> None:
    """Set our options on a connected TCP socket (see the module docstring)."""
    handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if TCP_CONGESTION is None:
        return
    try:
        if is_loopback_peer(handle.getpeername()):
            handle.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, LOOPBACK_CONGESTION)
    except OSError:
        pass  # gone already, or a kernel without reno: the default stays
