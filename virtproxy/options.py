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
from virtproxy.config import ChannelSpec, DaemonConfig, ForwardSpec

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
    "[options] --channel SPEC [--oforward NAME:ADDR:PORT]... [--iforward NAME:ADDR:PORT]..."
)

EPILOG = """\
Channel SPEC (exactly one --channel):
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


def _forward_endpoint(spec: str, outgoing: bool, connect_timeout: float) -> tuple[str, str]:
    colon, equals = spec.find(":"), spec.find("=")
    twisted_form = equals >= 0 and (colon < 0 or equals < colon)
    name, _, rest = spec.partition("=" if twisted_form else ":")
    if not name:
        raise _Bad("empty NAME")
    if not NAME_RE.match(name):
        raise _Bad(f"invalid NAME {name!r}: 1..64 characters of A-Z a-z 0-9 . _ -")
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


class Options(usage.Options):
    """virtproxy's options; ``postOptions`` leaves the result in ``self.config``."""

    config: DaemonConfig

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
            str(512 * 1024),
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[str] = []
        self.oforwards: list[str] = []
        self.iforwards: list[str] = []

    @_one_line_doc
    def opt_channel(self, spec: str) -> None:
        """The data channel to the peer, exactly once: tcp-listen:HOST:PORT,
        tcp-connect:HOST:PORT, unix-listen:PATH, unix-connect:PATH,
        virtserial:PATH or serial:PATH[:BAUD] (see below).
        """
        self.channels.append(spec)

    opt_c = opt_channel

    @_one_line_doc
    def opt_oforward(self, spec: str) -> None:
        """Listen locally and forward each client to the peer's --iforward
        NAME: NAME:ADDR:PORT, NAME:PATH:- or NAME=SERVER-ENDPOINT (repeatable).
        """
        self.oforwards.append(spec)

    opt_o = opt_oforward

    @_one_line_doc
    def opt_iforward(self, spec: str) -> None:
        """Serve streams the peer opens for NAME by connecting here:
        NAME:ADDR:PORT, NAME:PATH:- or NAME=CLIENT-ENDPOINT (repeatable).
        """
        self.iforwards.append(spec)

    opt_i = opt_iforward

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

    def parseArgs(self, *args: str) -> None:
        """virtproxy takes no positional arguments; name the first stray one."""
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r} (options start with - or --)")

    def postOptions(self) -> None:
        """Validate everything and build ``self.config``."""
        if not self.channels:
            kinds = ", ".join(CHANNEL_FORMS.values())
            raise usage.UsageError(f"--channel is required (expected one of {kinds})")
        if len(self.channels) > 1:
            given = " and ".join(repr(c) for c in self.channels)
            raise usage.UsageError(
                f"--channel given {len(self.channels)} times ({given}): expected exactly one"
            )
        channel = parse_channel(self.channels[0])

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

        oforwards = _unique(
            "--oforward",
            [
                parse_forward(s, outgoing=True, connect_timeout=connect_timeout)
                for s in self.oforwards
            ],
        )
        iforwards = _unique(
            "--iforward",
            [
                parse_forward(s, outgoing=False, connect_timeout=connect_timeout)
                for s in self.iforwards
            ],
        )
        self.config = DaemonConfig(
            channel=channel,
            oforwards=oforwards,
            iforwards=iforwards,
            connect_timeout=connect_timeout,
            keepalive_interval=interval,
            keepalive_timeout=timeout,
            max_frame=max_frame,
            window=window,
            max_streams=max_streams,
            max_open_rate=max_open_rate,
        )


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
