"""Command-line options shared by every virtproxy entry point.

``virtproxy``, ``python -m virtproxy`` and ``twistd virtproxy`` all parse with
:class:`Options`, so they accept the same spellings and print the same help.
Parsing turns each option into a Twisted endpoint description and checks it,
so a mistake is reported as one line at startup instead of as a failure deep
inside the reactor; the result is a :class:`~virtproxy.config.DaemonConfig`.

Nothing here imports ``twisted.internet.reactor``: under twistd, options are
parsed before twistd installs the reactor the user asked for.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn, TypeVar

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from virtproxy import __version__
from virtproxy.config import (
    DEFAULT_LABEL,
    DEFAULT_WINDOW,
    ChannelSpec,
    DaemonConfig,
    ForwardSpec,
    Limits,
    ListenAllowance,
    ProcessConfig,
    RemoteForwardSpec,
)
from virtproxy.errors import ConfigError
from virtproxy.session import LINK_MODES

_F = TypeVar("_F", bound=Callable[..., Any])

#: Canonical channel kind -> the form shown in error messages and help.
CHANNEL_FORMS: dict[str, str] = {
    "tcp-listen": "tcp-listen:HOST:PORT",
    "tcp-connect": "tcp-connect:HOST:PORT",
    "unix-listen": "unix-listen:PATH",
    "unix-connect": "unix-connect:PATH",
    "virtserial": "virtserial:PATH",
    "serial": "serial:PATH[:BAUD]",
}
#: qemu-vp spellings that mean a canonical kind.
CHANNEL_ALIASES: dict[str, str] = {"virtserial-open": "virtserial"}

OFORWARD_FORM = "NAME:ADDR:PORT, NAME:PATH:- or NAME=SERVER-ENDPOINT"
IFORWARD_FORM = "NAME:ADDR:PORT, NAME:PATH:- or NAME=CLIENT-ENDPOINT"

DEFAULT_BAUD = 115200
#: Rates a serial driver can be expected to accept (pyserial's list, extended).
STANDARD_BAUDS = frozenset(
    {
        *(50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600),
        *(19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000, 921600),
        *(1000000, 1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000),
    }
)

#: Listen queue of the channel (one peer at a time) and of forwarded ports.
CHANNEL_BACKLOG = 5
FORWARD_BACKLOG = 128
#: UNIX sockets we create are for the daemon's user only (see --help).
UNIX_SOCKET_MODE = "600"
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
#: Service names starting with ".." are reserved for virtproxy's own streams
#: (remote-forward requests, docs/protocol.rst); users cannot configure them.
RESERVED_PREFIX = ".."
#: A channel label: ``--channel vm1=unix-connect:...``, ``--oforward vm1/ssh:...``.
CHANNEL_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
RFORWARD_FORM = "NAME:ADDR:PORT (ADDR an IP address on the peer's side)"
ALLOW_FORM = "ADDR or ADDR:PORT (an IP address; IPv6 in brackets)"
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
#: ``PATH:-`` or ``PATH:-:ID`` (qemu-vp: port ``-`` means "address is a path").
_PATH_FORM_RE = re.compile(r"(?P<path>.*):-(?::(?P<id>[^:]*))?\Z", re.DOTALL)
#: ``serial:PATH:BAUD`` when the last field is a word (else it is part of PATH).
_SERIAL_RE = re.compile(r"(.*):([A-Za-z0-9_]*)\Z", re.DOTALL)

MAX_SECONDS = 86400.0
MIN_FRAME, MAX_FRAME = 256, 65535
MAX_WINDOW = 2**31 - 1
MAX_STREAMS = 65536

SYNOPSIS_ARGS = (
    "[options] --channel SPEC [--oforward NAME:ADDR:PORT]... [--iforward NAME:ADDR:PORT]...\n"
    "       virtproxy ctl --control PATH VERB [ARGS] [--json]"
)

EPILOG = """\
Channel SPEC (--channel SPEC, or --channel LABEL=SPEC repeated for several):
  tcp-listen:HOST:PORT    wait for the peer on a TCP address
  tcp-connect:HOST:PORT   connect to the peer (reconnecting with backoff)
  unix-listen:PATH        wait for the peer on a UNIX socket (mode 0600)
  unix-connect:PATH       connect to a UNIX socket, e.g. a QEMU chardev server
  virtserial:PATH         a virtio-serial port, e.g. in the guest
  serial:PATH[:BAUD]      an emulated serial port (default 115200 baud)
  IPv6 hosts go in brackets: tcp-connect:[::1]:4000.  The qemu-vp spellings
  unix-connect:PATH:-, unix-listen:PATH:-, virtserial-open:PATH:- and a
  trailing :ID (ignored) are accepted too.

Forwards (repeatable; NAME is 1..64 of A-Z a-z 0-9 . _ -):
  -o NAME:ADDR:PORT       listen on ADDR:PORT; each client there becomes a
                          stream to the peer's --iforward NAME
  -o NAME:PATH:-          the same on a UNIX socket (mode 0600)
  -o NAME=SERVER-ENDPOINT listen on any Twisted server endpoint description
  -i NAME:ADDR:PORT       for each stream the peer opens for NAME, connect to
                          ADDR:PORT (timeout: --connect-timeout)
  -i NAME:PATH:-          the same to a UNIX socket
  -i NAME=CLIENT-ENDPOINT connect to any Twisted client endpoint description
  The same NAME may be used once with -o and once with -i.
  With several channels, prefix each forward with its channel: -o vm1/ssh:...
  -R NAME:ADDR:PORT       ask the peer to listen on ADDR:PORT and carry each
                          connection back to our -i NAME (the peer must allow
                          it with --allow-remote-listen ADDR[:PORT])

Operating (see README, Operating):
  --config FILE           channels and forwards from TOML; SIGHUP re-reads it
  --control PATH          control socket for: virtproxy ctl --control PATH VERB
  --metrics ADDR:PORT     Prometheus metrics over HTTP

Examples:
  host, QEMU started with
    -chardev socket,id=vp0,path=/run/vp/vm1.sock
    -device virtserialport,chardev=vp0,name=org.qemu.virtproxy0
  virtproxy -c unix-listen:/run/vp/vm1.sock -o ssh:127.0.0.1:2222
  guest:
  virtproxy -c virtserial:/dev/virtio-ports/org.qemu.virtproxy0 \\
            -i ssh:127.0.0.1:22
  virtproxy -c tcp-connect:[::1]:4000 -o 'http=tcp:9080:interface=127.0.0.1'
  twistd -n virtproxy -c serial:/dev/ttyS1:115200 \\
            -i 'ssh=unix:path=/run/sshd.sock'
"""


class _Bad(Exception):
    """A spec is malformed; ``reason`` is None when "expected FORM" says it all."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason


class _ParseOnlyReactor:
    """Stands in for the reactor while checking endpoint descriptions.

    Parsing a description only constructs an endpoint object; passing this
    instead of the global reactor keeps option parsing from installing one.
    """


def _usage_error(option: str, value: str, form: str, bad: _Bad) -> usage.UsageError:
    """One line naming the option, the bad value and what was expected."""
    if bad.reason is None:
        return usage.UsageError(f"{option} {value!r}: expected {form}")
    return usage.UsageError(f"{option} {value!r}: {bad.reason} (expected {form})")


def quote_endpoint_arg(argument: str) -> str:
    """Escape a value for a Twisted endpoint description.

    Like ``twisted.internet.endpoints.quoteStringArgument`` but also escapes
    ``=``, so a positional path such as ``/tmp/a=b`` is not read as a keyword.
    """
    return argument.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _check_port(text: str) -> int:
    if not text:
        raise _Bad("missing port")
    if not _DIGITS_RE.match(text):
        raise _Bad(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _Bad(f"port {port} out of range 1..65535")
    return port


def _check_id(text: str | None) -> None:
    """qemu-vp's trailing channel ID: accepted for compatibility, ignored."""
    if text is not None and not _DIGITS_RE.match(text):
        raise _Bad(f"ID {text!r} is not a number")


def _is_hostname(host: str) -> bool:
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return False
    # All-numeric names are mistyped IPv4 addresses (e.g. 10.0.0.300), not hosts.
    return not all(label.isdigit() for label in labels)


def _split_host_port(rest: str) -> tuple[str, int, bool]:
    """Parse ``HOST:PORT[:ID]`` or ``[V6]:PORT[:ID]`` -> (host, port, is_ipv6)."""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise _Bad("missing ']' after IPv6 address")
        host, after = rest[1:end], rest[end + 1 :]
        if not isIPv6Address(host):
            raise _Bad(f"invalid IPv6 address {host!r}")
        if not after.startswith(":"):
            raise _Bad(None)
        fields = after[1:].split(":")
        is_v6 = True
    else:
        fields = rest.split(":")
        host = fields.pop(0)
        if len(fields) > 2:
            raise _Bad("too many ':' (IPv6 addresses go in brackets, e.g. [::1])")
        if not host:
            raise _Bad("missing host" if fields else None)
        if not fields:
            raise _Bad(None)
        if not (isIPAddress(host) or _is_hostname(host)):
            raise _Bad(f"invalid host {host!r}")
        is_v6 = False
    if len(fields) > 2:
        raise _Bad("too many ':'-separated fields")
    port = _check_port(fields[0])
    _check_id(fields[1] if len(fields) > 1 else None)
    return host, port, is_v6


def _check_path(path: str, *, unix_socket: bool) -> str:
    if not path:
        raise _Bad("missing path")
    if "\0" in path:
        raise _Bad("NUL character in path")
    if unix_socket and len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise _Bad(f"UNIX socket path longer than {MAX_UNIX_PATH_BYTES} bytes")
    return path


def _strip_path_form(rest: str) -> str:
    """``PATH:-[:ID]`` (qemu-vp) -> PATH; anything else is the path itself."""
    match = _PATH_FORM_RE.match(rest)
    if match is None:
        return rest
    _check_id(match.group("id"))
    return match.group("path")


def _tcp_server(host: str, port: int, is_v6: bool, backlog: int) -> str:
    kind = "tcp6" if is_v6 else "tcp"
    return f"{kind}:{port}:interface={quote_endpoint_arg(host)}:backlog={backlog}"


def _unix_server(path: str, backlog: int) -> str:
    return f"unix:{quote_endpoint_arg(path)}:lockfile=1:mode={UNIX_SOCKET_MODE}:backlog={backlog}"


def parse_channel(spec: str) -> ChannelSpec:
    """Turn a ``--channel`` value into a :class:`ChannelSpec`.

    :raises usage.UsageError: one line naming ``spec`` and the expected form.
    """
    kind, sep, rest = spec.partition(":")
    kind = CHANNEL_ALIASES.get(kind, kind)
    form = CHANNEL_FORMS.get(kind)
    if form is None:
        kinds = ", ".join(CHANNEL_FORMS.values())
        what = f"unknown channel kind {kind!r}" if kind else "missing channel kind"
        raise usage.UsageError(f"--channel {spec!r}: {what} (expected one of {kinds})")
    try:
        if not sep or not rest:
            raise _Bad(None)
        endpoint = _channel_endpoint(kind, rest)
    except _Bad as bad:
        raise _usage_error("--channel", spec, form, bad) from None
    return ChannelSpec(kind=kind, endpoint=endpoint, original=spec)


def _channel_endpoint(kind: str, rest: str) -> str:
    if kind in ("tcp-listen", "tcp-connect"):
        host, port, is_v6 = _split_host_port(rest)
        if kind == "tcp-listen":
            return _tcp_server(host, port, is_v6, CHANNEL_BACKLOG)
        return f"tcp:host={quote_endpoint_arg(host)}:port={port}"
    if kind == "serial":
        # A last field of letters/digits is BAUD; one with '.', '-' or '/' is
        # part of the path (/dev/serial/by-path/ names contain colons).
        path, baud = rest, DEFAULT_BAUD
        match = _SERIAL_RE.match(rest)
        if match is not None:
            path, baud_text = match.groups()
            if not baud_text:
                raise _Bad("missing baud rate after ':'")
            if not _DIGITS_RE.match(baud_text):
                raise _Bad(f"baud rate {baud_text!r} is not a number")
            baud = int(baud_text)
            if baud not in STANDARD_BAUDS:
                raise _Bad(f"baud rate {baud} is not a standard rate such as 9600 or 115200")
        path = _check_path(path, unix_socket=False)
        return f"serial:{quote_endpoint_arg(path)}:{baud}"
    path = _check_path(_strip_path_form(rest), unix_socket=kind.startswith("unix-"))
    if kind == "unix-listen":
        return _unix_server(path, CHANNEL_BACKLOG)
    if kind == "unix-connect":
        return f"unix:path={quote_endpoint_arg(path)}"
    return f"virtserial:{quote_endpoint_arg(path)}"


def _check_description(parse: Callable[[object, str], object], description: str, what: str) -> None:
    """Build (never listen on or connect) the endpoint to prove it parses."""
    try:
        parse(_ParseOnlyReactor(), description)
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise _Bad(f"invalid {what} endpoint description {description!r}: {detail}") from e


def parse_forward(spec: str, *, outgoing: bool, connect_timeout: float) -> ForwardSpec:
    """Turn an ``--oforward`` (``outgoing``) or ``--iforward`` value into a spec.

    :raises usage.UsageError: one line naming ``spec`` and the expected form.
    """
    option, form = ("--oforward", OFORWARD_FORM) if outgoing else ("--iforward", IFORWARD_FORM)
    try:
        name, endpoint = _forward_endpoint(spec, outgoing, connect_timeout)
    except _Bad as bad:
        raise _usage_error(option, spec, form, bad) from None
    return ForwardSpec(name=name, endpoint=endpoint, original=spec)


def check_name(name: str) -> None:
    """A user-chosen service NAME: the session's alphabet, minus the reserved prefix."""
    if not NAME_RE.match(name):
        raise _Bad(f"invalid NAME {name!r}: 1..64 characters of A-Z a-z 0-9 . _ -")
    if name.startswith(RESERVED_PREFIX):
        raise _Bad(f"invalid NAME {name!r}: names starting with '..' are reserved")


def split_label(spec: str, separator: str) -> tuple[str, str]:
    """``LABEL<sep>REST`` -> (LABEL, REST); ("", spec) when there is no label.

    The separator counts only before the first ':' (and, for forwards, '='),
    so paths and endpoint descriptions that contain it are left alone.
    """
    head = spec
    for stop in (":", "=") if separator == "/" else (":",):
        head = head.split(stop, 1)[0]
    if separator not in head:
        return "", spec
    label, _, rest = spec.partition(separator)
    return label, rest


def check_label(label: str, option: str, value: str) -> str:
    if not CHANNEL_LABEL_RE.match(label):
        raise usage.UsageError(
            f"{option} {value!r}: invalid channel label {label!r} "
            "(1..64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return label


def parse_ip_port(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """``ADDR[:PORT]`` or ``[V6][:PORT]`` with ADDR an IP literal.

    Remote listeners bind only literal addresses, so an allow-list entry and a
    request compare exactly (no name resolution on either side).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Bad("missing ']' after IPv6 address")
        host, after = text[1:end], text[end + 1 :]
        if not isIPv6Address(host):
            raise _Bad(f"invalid IPv6 address {host!r}")
        if after and not after.startswith(":"):
            raise _Bad(None)
        port_text = after[1:] if after else None
    else:
        host, sep, port_text_raw = text.partition(":")
        port_text = port_text_raw if sep else None
        if not isIPAddress(host):
            raise _Bad(f"invalid address {host!r}: an IP address is required")
    if port_text is None:
        if port_required:
            raise _Bad("missing port")
        return host, None
    return host, _check_port(port_text)


def parse_rforward(spec: str) -> RemoteForwardSpec:
    """``--rforward NAME:ADDR:PORT``: ask the peer to listen on ADDR:PORT for our NAME."""
    try:
        name, sep, rest = spec.partition(":")
        if not name:
            raise _Bad("empty NAME")
        check_name(name)
        if not sep or not rest:
            raise _Bad(None)
        host, port = parse_ip_port(rest, port_required=True)
        assert port is not None
    except _Bad as bad:
        raise _usage_error("--rforward", spec, RFORWARD_FORM, bad) from None
    return RemoteForwardSpec(name=name, host=host, port=port, original=spec)


def parse_allowance(spec: str) -> ListenAllowance:
    """``--allow-remote-listen ADDR[:PORT]``."""
    try:
        host, port = parse_ip_port(spec, port_required=False)
    except _Bad as bad:
        raise _usage_error("--allow-remote-listen", spec, ALLOW_FORM, bad) from None
    return ListenAllowance(host=host, port=port, original=spec)


def _forward_endpoint(spec: str, outgoing: bool, connect_timeout: float) -> tuple[str, str]:
    colon, equals = spec.find(":"), spec.find("=")
    twisted_form = equals >= 0 and (colon < 0 or equals < colon)
    name, _, rest = spec.partition("=" if twisted_form else ":")
    if not name:
        raise _Bad("empty NAME")
    check_name(name)
    if not rest:
        raise _Bad(None)
    if twisted_form:
        if outgoing:
            _check_description(serverFromString, rest, "server")
        else:
            _check_description(clientFromString, rest, "client")
        return name, rest
    timeout = max(1, math.ceil(connect_timeout))
    path_match = _PATH_FORM_RE.match(rest)
    if path_match is not None:
        path = _check_path(_strip_path_form(rest), unix_socket=True)
        if outgoing:
            return name, _unix_server(path, FORWARD_BACKLOG)
        return name, f"unix:path={quote_endpoint_arg(path)}:timeout={timeout}"
    host, port, is_v6 = _split_host_port(rest)
    if outgoing:
        return name, _tcp_server(host, port, is_v6, FORWARD_BACKLOG)
    return name, f"tcp:host={quote_endpoint_arg(host)}:port={port}:timeout={timeout}"


_DECIMAL_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def _seconds(option: str, text: str) -> float:
    """A positive, finite duration in plain decimal notation."""
    form = f"seconds, a number > 0 and <= {MAX_SECONDS:g}"
    if not _DECIMAL_RE.match(text):
        raise usage.UsageError(f"{option} {text!r}: expected {form}")
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise usage.UsageError(f"{option} {text!r}: out of range (expected {form})")
    return value


def _integer(option: str, text: str, low: int, high: int) -> int:
    """A decimal integer within ``low..high``."""
    form = f"an integer {low}..{high}"
    if not _DIGITS_RE.match(text):
        raise usage.UsageError(f"{option} {text!r}: expected {form}")
    value = int(text)
    if not low <= value <= high:
        raise usage.UsageError(f"{option} {text!r}: out of range (expected {form})")
    return value


def _one_line_doc(method: _F) -> _F:
    """Collapse a docstring's whitespace: usage.Options shows it verbatim."""
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


def _ctl_options() -> usage.Options:
    """Imported lazily: ``virtproxy.ctl`` is only needed for ``virtproxy ctl``."""
    from virtproxy.ctl import CtlOptions

    return CtlOptions()


class Options(usage.Options):
    """virtproxy's options; ``postOptions`` leaves the result in ``self.config``."""

    config: DaemonConfig
    process: ProcessConfig

    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "connect-timeout",
            None,
            "10",
            (
                "Seconds a forwarded client waits for the peer to accept its stream, "
                "and an --iforward connect waits for its target."
            ),
        ],
        [
            "keepalive-interval",
            None,
            "5",
            "Seconds of silence on the channel before sending a PING.",
        ],
        [
            "keepalive-timeout",
            None,
            "20",
            (
                "Seconds of silence after which the session is declared dead "
                "(must exceed --keepalive-interval)."
            ),
        ],
        [
            "max-frame",
            None,
            None,
            (
                f"Largest DATA payload accepted from the peer, {MIN_FRAME}..{MAX_FRAME} "
                "bytes [default: chosen per channel kind]."
            ),
        ],
        [
            "window",
            None,
            str(DEFAULT_WINDOW),
            (
                "Bytes each new stream may carry before the receiver grants more "
                f"(>= --max-frame, <= {MAX_WINDOW})."
            ),
        ],
        [
            "max-streams",
            None,
            "1024",
            f"Concurrent streams the peer may open towards us (1..{MAX_STREAMS}).",
        ],
        [
            "max-open-rate",
            None,
            "1000",
            "Streams the peer may open per second, sustained (bursts of twice that); "
            "each open costs a local connect, so a hostile peer must not churn them.",
        ],
        [
            "max-reset-rate",
            None,
            "1000",
            "Stream resets the peer may send per second, sustained (bursts of twice "
            "that); a faster peer loses its session (the HTTP/2 rapid-reset attack).",
        ],
        [
            "session-window",
            None,
            None,
            "Bytes the peer may send over all streams together before we have "
            "delivered them: what one session can make us buffer "
            f"(--window..{MAX_WINDOW}) [default: 16 MiB, or --window if larger].",
        ],
        [
            "stream-buffer",
            None,
            str(256 * 1024),
            "Bytes read from a local socket and queued for one stream before we stop "
            "reading it (4096..16777216).",
        ],
        [
            "max-pending",
            None,
            "1024",
            "Local clients that may wait for a session or a free stream slot at once "
            "(1..1000000); more are closed at once.",
        ],
        [
            "max-name-length",
            None,
            "64",
            "Longest service name the peer may ask for (1..64).",
        ],
        [
            "link",
            None,
            None,
            "Link reliability: on (acknowledge and retransmit frames, for noisy lines), "
            "auto (on once the peer turns it on) or off "
            "[default: on for serial:, auto for the others].",
        ],
        [
            "bulk",
            None,
            "on",
            "BULK frames on a TCP or UNIX channel (bulk bytes spliced past Python, "
            "Linux): on, or off for a channel through something that may lose or "
            "repeat bytes, which a BULK frame's raw bytes do not survive.",
        ],
        [
            "config",
            None,
            None,
            "A TOML file of channels, forwards, limits and the control socket; "
            "re-read on SIGHUP (see README, Operating).",
        ],
        [
            "control",
            None,
            None,
            "Serve the control protocol (virtproxy ctl) on this UNIX socket path (mode 0600).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics over HTTP on ADDR:PORT (or a server endpoint).",
        ],
    ]

    subCommands: ClassVar[list[tuple[str, None, Any, str]]] = [
        (
            "ctl",
            None,
            _ctl_options,
            "Talk to a running daemon's --control socket (see ctl --help).",
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[str] = []
        self.oforwards: list[str] = []
        self.iforwards: list[str] = []
        self.rforwards: list[str] = []
        self.allowances: list[str] = []

    @_one_line_doc
    def opt_channel(self, spec: str) -> None:
        """The data channel to the peer: tcp-listen:HOST:PORT,
        tcp-connect:HOST:PORT, unix-listen:PATH, unix-connect:PATH,
        virtserial:PATH or serial:PATH[:BAUD] (see below); repeatable as
        LABEL=SPEC for several channels in one process.
        """
        self.channels.append(spec)

    opt_c = opt_channel

    @_one_line_doc
    def opt_oforward(self, spec: str) -> None:
        """Listen locally and forward each client to the peer's --iforward
        NAME: [LABEL/]NAME:ADDR:PORT, NAME:PATH:- or NAME=SERVER-ENDPOINT (repeatable).
        """
        self.oforwards.append(spec)

    opt_o = opt_oforward

    @_one_line_doc
    def opt_iforward(self, spec: str) -> None:
        """Serve streams the peer opens for NAME by connecting here:
        [LABEL/]NAME:ADDR:PORT, NAME:PATH:- or NAME=CLIENT-ENDPOINT (repeatable).
        """
        self.iforwards.append(spec)

    opt_i = opt_iforward

    @_one_line_doc
    def opt_rforward(self, spec: str) -> None:
        """Ask the peer to listen on ADDR:PORT (its side) and carry each
        connection back to our --iforward NAME: [LABEL/]NAME:ADDR:PORT (repeatable).
        """
        self.rforwards.append(spec)

    opt_R = opt_rforward

    @_one_line_doc
    def opt_allow_remote_listen(self, spec: str) -> None:
        """Let the peer ask us to listen on ADDR (any port) or ADDR:PORT for
        its --rforward (repeatable; default: refuse every such request).
        """
        self.allowances.append(spec)

    def opt_version(self) -> NoReturn:
        """Display virtproxy's version and exit."""
        print(f"virtproxy {__version__}")
        sys.exit(0)

    def getSynopsis(self) -> str:
        """Name the program as it was run; under twistd, Twisted prefixes it."""
        if self.parent is not None:
            return super().getSynopsis()
        return f"Usage: {program_name()} {SYNOPSIS_ARGS}"

    synopsis = SYNOPSIS_ARGS
    #: Shown by getUsage below instead: Twisted re-wraps longdesc into a blob.
    longdesc = ""

    def getUsage(self, width: int | None = None) -> str:
        """Twisted's option list plus our preformatted channel/forward guide."""
        return (
            "Proxy and multiplex socket streams over one data channel between a "
            "VM host and guest.\n\n" + super().getUsage(width) + "\n" + EPILOG
        )

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse; a stray word is named as such, not as an unknown command."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            text = str(e)
            if text.startswith("Unknown command: "):
                word = text.removeprefix("Unknown command: ")
                raise usage.UsageError(
                    f"unexpected argument {word!r} (options start with - or --; "
                    "the one command is ctl)"
                ) from None
            raise

    def parseArgs(self, *args: str) -> None:
        """virtproxy takes no positional arguments; name the first stray one."""
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r} (options start with - or --)")

    def postOptions(self) -> None:
        """Validate everything and build ``self.process`` (and ``self.config``)."""
        if self.subCommand is not None:
            return  # ``virtproxy ctl ...``: the daemon's options do not apply
        config_file = self["config"]
        if not self.channels and config_file is None and self["control"] is None:
            kinds = ", ".join(CHANNEL_FORMS.values())
            raise usage.UsageError(f"--channel is required (expected one of {kinds})")
        limits = self._limits()
        channels = cli_channels(
            self.channels, self.oforwards, self.iforwards, self.rforwards, limits
        )
        allow = tuple(parse_allowance(a) for a in self.allowances)
        control = None
        if self["control"] is not None:
            control = _control_path(self["control"])
        metrics = None
        if self["metrics"] is not None:
            metrics = parse_metrics(self["metrics"])
        process = ProcessConfig(
            channels=channels,
            control=control,
            metrics=metrics,
            config_file=config_file,
            allow_remote_listen=allow,
            cli_channels=tuple(c.name for c in channels),
            cli_allow=allow,
            limits=limits,
        )
        if config_file is not None:
            from virtproxy.configfile import load_config_file, merge

            try:
                process = merge(process, load_config_file(config_file, limits))
            except ConfigError as e:
                raise usage.UsageError(e.message) from None
        self.process = process
        if process.channels:
            self.config = process.channels[0]

    def _limits(self) -> Limits:
        connect_timeout = _seconds("--connect-timeout", self["connect-timeout"])
        interval = _seconds("--keepalive-interval", self["keepalive-interval"])
        timeout = _seconds("--keepalive-timeout", self["keepalive-timeout"])
        if timeout <= interval:
            raise usage.UsageError(
                f"--keepalive-timeout {self['keepalive-timeout']!r}: must exceed "
                f"--keepalive-interval ({self['keepalive-interval']})"
            )
        max_frame: int | None = None
        if self["max-frame"] is not None:
            max_frame = _integer("--max-frame", self["max-frame"], MIN_FRAME, MAX_FRAME)
        window = _integer("--window", self["window"], max_frame or MIN_FRAME, MAX_WINDOW)
        max_streams = _integer("--max-streams", self["max-streams"], 1, MAX_STREAMS)
        max_open_rate = _integer("--max-open-rate", self["max-open-rate"], 1, 1_000_000)
        max_reset_rate = _integer("--max-reset-rate", self["max-reset-rate"], 1, 1_000_000)
        session_window: int | None = None
        if self["session-window"] is not None:
            session_window = _integer(
                "--session-window", self["session-window"], window, MAX_WINDOW
            )
        stream_buffer = _integer("--stream-buffer", self["stream-buffer"], 4096, 16 * 1024 * 1024)
        max_pending = _integer("--max-pending", self["max-pending"], 1, 1_000_000)
        max_name = _integer("--max-name-length", self["max-name-length"], 1, 64)
        link = self["link"]
        if link is not None and link not in LINK_MODES:
            raise usage.UsageError(f"--link {link!r}: expected one of {', '.join(LINK_MODES)}")
        if self["bulk"] not in ("on", "off"):
            raise usage.UsageError(f"--bulk {self['bulk']!r}: expected on or off")
        return Limits(
            connect_timeout=connect_timeout,
            keepalive_interval=interval,
            keepalive_timeout=timeout,
            max_frame=max_frame,
            window=window,
            max_streams=max_streams,
            max_open_rate=max_open_rate,
            link=link,
            bulk=self["bulk"] == "on",
            max_reset_rate=max_reset_rate,
            session_window=session_window,
            stream_buffer=stream_buffer,
            max_pending=max_pending,
            max_service_name=max_name,
        )


def _control_path(path: str) -> str:
    try:
        return _check_path(path, unix_socket=True)
    except _Bad as bad:
        raise _usage_error("--control", path, "PATH of a UNIX socket", bad) from None


METRICS_FORM = "ADDR:PORT or a Twisted server endpoint description"


def parse_metrics(spec: str) -> str:
    """``--metrics 127.0.0.1:9101`` (or ``tcp:9101:interface=...``) -> server endpoint."""
    try:
        if "=" in spec or spec.startswith(("tcp:", "tcp6:", "unix:")):
            _check_description(serverFromString, spec, "server")
            return spec
        host, port, is_v6 = _split_host_port(spec)
    except _Bad as bad:
        raise _usage_error("--metrics", spec, METRICS_FORM, bad) from None
    return _tcp_server(host, port, is_v6, FORWARD_BACKLOG)


def channel_config(
    label: str,
    channel: ChannelSpec,
    oforwards: Sequence[ForwardSpec],
    iforwards: Sequence[ForwardSpec],
    rforwards: Sequence[RemoteForwardSpec],
    limits: Limits,
) -> DaemonConfig:
    """One channel's :class:`DaemonConfig` from parsed parts."""
    return DaemonConfig(
        channel=channel,
        oforwards=_unique("--oforward", oforwards),
        iforwards=_unique("--iforward", iforwards),
        rforwards=_unique_r(rforwards),
        label=label,
        limits=limits,
    )


def cli_channels(
    channels: Sequence[str],
    oforwards: Sequence[str],
    iforwards: Sequence[str],
    rforwards: Sequence[str],
    limits: Limits,
) -> tuple[DaemonConfig, ...]:
    """Channels from ``--channel [LABEL=]SPEC`` with their ``[LABEL/]`` forwards.

    One channel may go unlabelled (its forwards need no label); with several,
    every channel needs a label and every forward names its channel.
    """
    parsed: dict[str, ChannelSpec] = {}
    given: dict[str, str] = {}
    for value in channels:
        label, spec = split_label(value, "=")
        if label:
            check_label(label, "--channel", value)
        elif len(channels) > 1:
            listed = " and ".join(repr(c) for c in channels)
            raise usage.UsageError(
                f"--channel given {len(channels)} times ({listed}): "
                "with several channels each needs a label, e.g. vm1=SPEC"
            )
        if (label or DEFAULT_LABEL) in parsed:
            raise usage.UsageError(f"--channel {value!r}: duplicate label {label!r}")
        parsed[label or DEFAULT_LABEL] = parse_channel(spec)
        given[label or DEFAULT_LABEL] = label
    if not parsed and (oforwards or iforwards or rforwards):
        raise usage.UsageError("forwards given without --channel")
    labels = list(parsed)
    per: dict[str, tuple[list[ForwardSpec], list[ForwardSpec], list[RemoteForwardSpec]]] = {
        label: ([], [], []) for label in labels
    }

    def owner(option: str, value: str) -> tuple[str, str]:
        label, spec = split_label(value, "/")
        if not label:
            if len(labels) > 1:
                raise usage.UsageError(
                    f"{option} {value!r}: several channels: prefix the channel label, "
                    f"e.g. {labels[0]}/{value}"
                )
            return labels[0], spec
        if label not in per:
            raise usage.UsageError(f"{option} {value!r}: no --channel labelled {label!r}")
        return label, spec

    for value in oforwards:
        label, spec = owner("--oforward", value)
        per[label][0].append(
            parse_forward(spec, outgoing=True, connect_timeout=limits.connect_timeout)
        )
    for value in iforwards:
        label, spec = owner("--iforward", value)
        per[label][1].append(
            parse_forward(spec, outgoing=False, connect_timeout=limits.connect_timeout)
        )
    for value in rforwards:
        label, spec = owner("--rforward", value)
        per[label][2].append(parse_rforward(spec))
    return tuple(
        channel_config(
            given[label],
            parsed[label],
            *per[label],
            limits,
        )
        for label in labels
    )


def _unique_r(forwards: Sequence[RemoteForwardSpec]) -> tuple[RemoteForwardSpec, ...]:
    seen: dict[tuple[str, int], RemoteForwardSpec] = {}
    for forward in forwards:
        first = seen.setdefault((forward.host, forward.port), forward)
        if first is not forward:
            raise usage.UsageError(
                f"--rforward {forward.original!r}: duplicate address {forward.address} "
                f"(already used by --rforward {first.original!r})"
            )
    return tuple(forwards)


def _unique(option: str, forwards: Sequence[ForwardSpec]) -> tuple[ForwardSpec, ...]:
    """Reject a NAME used twice in one direction: the peer could not tell which."""
    seen: dict[str, ForwardSpec] = {}
    for forward in forwards:
        first = seen.setdefault(forward.name, forward)
        if first is not forward:
            raise usage.UsageError(
                f"{option} {forward.original!r}: duplicate NAME {forward.name!r} "
                f"(already used by {option} {first.original!r})"
            )
    return tuple(forwards)


def program_name() -> str:
    """How the user ran us: ``virtproxy`` or ``python3 -m virtproxy``."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "virtproxy"
    base = os.path.basename(argv0)
    if base == "__main__.py":
        return f"{os.path.basename(sys.executable)} -m virtproxy"
    return base


def format_error(message: object) -> str:
    """The one line every entry point prints for a usage or startup error."""
    text = " ".join(str(message).split())
    return f"virtproxy: error: {text}"


def parse_or_exit(argv: Sequence[str], options: Options | None = None) -> Options:
    """Parse ``argv``; on a usage error print one line to stderr and exit 2.

    ``--help`` and ``--version`` print to stdout and exit 0 (Twisted's
    behaviour); no usage dump or traceback ever accompanies an error.
    """
    opts = Options() if options is None else options
    try:
        opts.parseOptions(list(argv))
    except usage.UsageError as e:
        print(format_error(e), file=sys.__stderr__ or sys.stderr, flush=True)
        raise SystemExit(2) from None
    return opts


class TwistdOptions(Options):
    """The same options for ``twistd virtproxy``, with one-line errors.

    twistd answers a ``UsageError`` with its whole usage text and exit status
    1; raising ``SystemExit(2)`` after printing one line bypasses that.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse like :class:`Options`, exiting 2 with one line on error."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            print(format_error(e), file=sys.__stderr__ or sys.stderr, flush=True)
            raise SystemExit(2) from None
