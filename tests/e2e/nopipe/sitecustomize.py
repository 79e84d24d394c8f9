"""Imported at startup by a daemon whose PYTHONPATH leads here: the process
can make no pipe, as when it is out of file descriptors (EMFILE).  Only
virtproxy's BULK frames ask for pipes (Twisted's waker uses ``os.pipe``)."""

import errno
import os


def _no_pipe(flags: int = 0) -> tuple[int, int]:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


os.pipe2 = _no_pipe
