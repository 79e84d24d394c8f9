"""Exceptions shared by the daemon's parts and its entry points.

The entry points (``virtproxy``, ``python -m virtproxy``, ``twistd virtproxy``)
turn a :class:`StartupError` into one ``virtproxy: error: <message>`` line on
stderr and a non-zero exit status, so its message must be a single line that
makes sense to an operator without a traceback.
"""

from __future__ import annotations

from twisted.internet.error import ConnectError


class VirtproxyError(Exception):
    """Base class of every error virtproxy raises on purpose."""


class StartupError(VirtproxyError):
    """The daemon cannot start, e.g. an address is already in use.

    Raise it synchronously from ``privilegedStartService``/``startService`` of
    a service returned by ``virtproxy.service.make_service``; the message is
    shown to the operator as one line.
    """

    def __init__(self, message: str) -> None:
        # Keep the one-line promise even if a wrapped OS error had newlines.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        """The one-line message, without any prefix."""
        return str(self.args[0])


class ConfigError(VirtproxyError):
    """A configuration (file, reload or control request) is invalid: one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


def connect_reason(error: BaseException) -> str:
    """Why a connect failed, in one line: a Twisted ConnectError's bare reason
    ("Connection refused", "No such file or directory"), not its message
    ("An error occurred while connecting: 2: No such file or directory.")."""
    bare = error.args[0] if isinstance(error, ConnectError) and error.args else None
    text = bare if isinstance(bare, str) and bare.strip() else str(error)
    return " ".join(text.split()) or type(error).__name__
