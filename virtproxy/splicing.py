"""A kernel pipe that moves a BULK frame's raw bytes between two sockets.

``splice(2)`` moves bytes from a socket into a pipe and from the pipe into
another socket without copying them through Python: on loopback about twice
what a relay that reads and writes each byte can do (benchmarks/ceiling.py).
virtproxy uses it for the raw bytes that follow a BULK frame
(docs/protocol.rst, "Bulk data"), from a local socket into the channel and
from the channel into a local socket.

A :class:`SplicePipe` carries one transfer at a time.  What a local socket
does not take at once is read back (:meth:`SplicePipe.take`) and handed to
Twisted's buffered write, so the channel never waits on one slow socket; a
BULK frame's rest that the channel does not take waits in the sender's pipe
for it to drain.  Errors are kept for the caller, which aborts the socket.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.logger import Logger

#: Linux's F_SETPIPE_SZ / F_GETPIPE_SZ (not in Python's fcntl before 3.10).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: The pipe's size, and so the largest BULK frame we send (Linux's default
#: pipe-max-size is 1 MiB for unprivileged processes).
PIPE_SIZE = 1024 * 1024
#: A smaller pipe is not worth asking for (Linux's default is 64 KiB).
PIPE_MIN = 64 * 1024
_splice = getattr(os, "splice", None)
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)


def available() -> bool:
    """Can this platform splice (Linux, Python 3.10+)?"""
    return _splice is not None


#: What :func:`open_pipe` has logged already: once a process each, since the
#: causes (the fd limit, the user's pipe quota) last.
_logged: set[str] = set()


def open_pipe(log: Logger) -> SplicePipe | None:
    """A new pipe, or None where the kernel gives none (out of descriptors):
    the bytes then go the copying way, as on a channel without BULK frames."""
    try:
        pipe = SplicePipe()
    except OSError as error:
        if "none" not in _logged:
            _logged.add("none")
            log.warn(
                "no pipe for BULK frames ({error}); their bytes go through Python "
                "meanwhile (logged once)",
                error=error.strerror or error,
            )
        return None
    if pipe.capacity < PIPE_SIZE and "small" not in _logged:
        _logged.add("small")
        log.info(
            "BULK frames carry at most {kib} KiB: the kernel gave a smaller pipe "
            "(fs.pipe-max-size, or the user's pipe quota fs.pipe-user-pages-soft)",
            kib=pipe.capacity // 1024,
        )
    return pipe


class SplicePipe:
    """One pipe, one transfer at a time (see the module doc)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        size = PIPE_SIZE
        while size > PIPE_MIN:
            try:
                fcntl.fcntl(self._write_fd, F_SETPIPE_SZ, size)
                break
            except OSError:
                size //= 2  # past pipe-max-size, or the user's pipe quota
        self.capacity: int = fcntl.fcntl(self._write_fd, F_GETPIPE_SZ)
        #: The error of the last ``fill`` or ``drain_to``, if it met one.
        self.error: OSError | None = None

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read_fd = self._write_fd = -1

    def fill(self, source: int, count: int) -> int:
        """Move up to ``count`` bytes waiting on socket ``source`` into the pipe.

        0 when none are waiting or at end of file (the reactor meets the end
        on its next read), and on an error, which is kept in :attr:`error`:
        the caller must abort that socket, since a reset is reported only
        once and the reactor's next read would take it for a clean end.
        """
        assert _splice is not None
        self.error = None
        while True:
            try:
                return _splice(source, self._write_fd, count, flags=_NONBLOCK)
            except InterruptedError:
                continue
            except BlockingIOError:
                return 0
            except OSError as error:
                self.error = error
                return 0

    def drain_to(self, destination: int, count: int) -> int:
        """Move up to ``count`` bytes from the pipe to socket ``destination``
        while it takes them; return how many it took (an error: see ``fill``)."""
        assert _splice is not None
        moved = 0
        self.error = None
        while moved < count:
            try:
                moved += _splice(self._read_fd, destination, count - moved, flags=_NONBLOCK)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as error:
                self.error = error
                break
        return moved

    def take(self, count: int) -> bytes:
        """Read ``count`` bytes back out of the pipe (what a socket did not take)."""
        pieces = []
        while count > 0:
            piece = os.read(self._read_fd, count)
            if not piece:
                break
            pieces.append(piece)
            count -= len(piece)
        return b"".join(pieces)
