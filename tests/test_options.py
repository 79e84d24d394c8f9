"""virtproxy.options: every spelling -> endpoint string, every mistake -> one line.

The endpoint strings are the contract with ``virtproxy.service``; each one is
also fed back to Twisted's own parsers here, so an escaping mistake shows up
as a wrong host, port or path rather than at run time.
"""

from __future__ import annotations

import socket
import string
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from virtproxy.config import ChannelSpec, DaemonConfig, ForwardSpec, Limits
from virtproxy.options import Options, TwistdOptions, format_error, quote_endpoint_arg

CHAN = ["--channel", "tcp-connect:127.0.0.1:4000"]


def parse(*argv: str) -> DaemonConfig:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def error(*argv: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    return str(info.value)


# ----------------------------------------------------------------------- channels

CHANNELS: list[tuple[str, str, str]] = [
    ("tcp-listen:127.0.0.1:4000", "tcp-listen", "tcp:4000:interface=127.0.0.1:backlog=5"),
    ("tcp-listen:0.0.0.0:1", "tcp-listen", "tcp:1:interface=0.0.0.0:backlog=5"),
    ("tcp-listen:localhost:65535", "tcp-listen", "tcp:65535:interface=localhost:backlog=5"),
    ("tcp-listen:[::1]:4000", "tcp-listen", r"tcp6:4000:interface=\:\:1:backlog=5"),
    ("tcp-listen:[::]:4000:0", "tcp-listen", r"tcp6:4000:interface=\:\::backlog=5"),
    ("tcp-connect:localhost:4000", "tcp-connect", "tcp:host=localhost:port=4000"),
    ("tcp-connect:host.example.org.:22", "tcp-connect", "tcp:host=host.example.org.:port=22"),
    ("tcp-connect:10.0.2.2:4000:1", "tcp-connect", "tcp:host=10.0.2.2:port=4000"),
    ("tcp-connect:[::1]:4000", "tcp-connect", r"tcp:host=\:\:1:port=4000"),
    ("tcp-connect:[fe80::1%eth0]:4000", "tcp-connect", r"tcp:host=fe80\:\:1%eth0:port=4000"),
    (
        "unix-listen:/run/vp/vm1.sock",
        "unix-listen",
        "unix:/run/vp/vm1.sock:lockfile=1:mode=600:backlog=5",
    ),
    (
        "unix-listen:/tmp/vp.sock:-",
        "unix-listen",
        "unix:/tmp/vp.sock:lockfile=1:mode=600:backlog=5",
    ),
    ("unix-listen:rel.sock:-:0", "unix-listen", "unix:rel.sock:lockfile=1:mode=600:backlog=5"),
    ("unix-connect:/tmp/vp.sock", "unix-connect", "unix:path=/tmp/vp.sock"),
    ("unix-connect:/tmp/vp.sock:-", "unix-connect", "unix:path=/tmp/vp.sock"),
    ("unix-connect:/tmp/vp.sock:-:3", "unix-connect", "unix:path=/tmp/vp.sock"),
    ("unix-connect:/tmp/a:b=c\\d", "unix-connect", r"unix:path=/tmp/a\:b\=c\\d"),
    (
        "virtserial:/dev/virtio-ports/org.qemu.virtproxy0",
        "virtserial",
        "virtserial:/dev/virtio-ports/org.qemu.virtproxy0",
    ),
    ("virtserial-open:/dev/vport0p1:-", "virtserial", "virtserial:/dev/vport0p1"),
    ("virtserial-open:/dev/vport0p1:-:0", "virtserial", "virtserial:/dev/vport0p1"),
    ("virtserial:/dev/vport0p1:-", "virtserial", "virtserial:/dev/vport0p1"),
    ("serial:/dev/ttyS0", "serial", "serial:/dev/ttyS0:115200"),
    ("serial:/dev/ttyUSB0:9600", "serial", "serial:/dev/ttyUSB0:9600"),
    ("serial:/dev/ttyAMA0:4000000", "serial", "serial:/dev/ttyAMA0:4000000"),
    (
        "serial:/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0",
        "serial",
        r"serial:/dev/serial/by-path/pci-0000\:00\:14.0-usb-0\:2\:1.0-port0:115200",
    ),
    (
        "serial:/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0:57600",
        "serial",
        r"serial:/dev/serial/by-path/pci-0000\:00\:14.0-usb-0\:2\:1.0-port0:57600",
    ),
]


@pytest.mark.parametrize(("spec", "kind", "endpoint"), CHANNELS)
def test_channel_spellings(spec: str, kind: str, endpoint: str) -> None:
    config = parse("--channel", spec)
    assert config.channel == ChannelSpec(kind=kind, endpoint=endpoint, original=spec)
    assert config.channel.listens == kind.endswith("-listen")
    assert parse("-c", spec).channel == config.channel


def test_defaults() -> None:
    config = parse(*CHAN)
    assert config == DaemonConfig(
        channel=ChannelSpec("tcp-connect", "tcp:host=127.0.0.1:port=4000", CHAN[1]),
        oforwards=(),
        iforwards=(),
        limits=Limits(
            connect_timeout=10.0,
            keepalive_interval=5.0,
            keepalive_timeout=20.0,
            max_frame=None,
            window=2097152,
            max_streams=1024,
        ),
    )


def test_numeric_options() -> None:
    config = parse(
        *CHAN,
        "--connect-timeout=2.5",
        "--keepalive-interval",
        "0.5",
        "--keepalive-timeout",
        "2",
        "--max-frame",
        "1024",
        "--window",
        "1024",
        "--max-streams",
        "7",
    )
    limits = config.limits
    assert (limits.connect_timeout, limits.keepalive_interval, limits.keepalive_timeout) == (
        2.5,
        0.5,
        2.0,
    )
    assert (limits.max_frame, limits.window, limits.max_streams) == (1024, 1024, 7)
    limits = parse(*CHAN, "--max-frame", "65535", "--window", str(2**31 - 1)).limits
    assert (limits.max_frame, limits.window) == (65535, 2**31 - 1)


# ----------------------------------------------------------------------- forwards

FORWARDS: list[tuple[str, str, str, str]] = [
    ("-o", "http:127.0.0.1:8080", "http", "tcp:8080:interface=127.0.0.1:backlog=128"),
    ("-o", "http:localhost:8080:1", "http", "tcp:8080:interface=localhost:backlog=128"),
    ("-o", "http:[::1]:8080", "http", r"tcp6:8080:interface=\:\:1:backlog=128"),
    (
        "-o",
        "ssh:/run/vp/ssh.sock:-",
        "ssh",
        "unix:/run/vp/ssh.sock:lockfile=1:mode=600:backlog=128",
    ),
    ("-o", "ssh:/tmp/a:b.sock:-:0", "ssh", r"unix:/tmp/a\:b.sock:lockfile=1:mode=600:backlog=128"),
    ("-o", "http=tcp:9080:interface=127.0.0.1", "http", "tcp:9080:interface=127.0.0.1"),
    ("-o", "sock=unix:/tmp/x.sock:mode=660", "sock", "unix:/tmp/x.sock:mode=660"),
    ("-o", "a.b_c-D9=tcp6:80", "a.b_c-D9", "tcp6:80"),
    ("-o", "x" * 64 + ":127.0.0.1:1", "x" * 64, "tcp:1:interface=127.0.0.1:backlog=128"),
    ("-i", "ssh:127.0.0.1:22", "ssh", "tcp:host=127.0.0.1:port=22:timeout=10"),
    ("-i", "ssh:sshd.internal:22:0", "ssh", "tcp:host=sshd.internal:port=22:timeout=10"),
    ("-i", "ssh:[::1]:22", "ssh", r"tcp:host=\:\:1:port=22:timeout=10"),
    ("-i", "ssh:/run/sshd.sock:-", "ssh", "unix:path=/run/sshd.sock:timeout=10"),
    ("-i", "ssh=unix:path=/run/x.sock", "ssh", "unix:path=/run/x.sock"),
    ("-i", "web=tcp:host=example.org:port=80", "web", "tcp:host=example.org:port=80"),
    ("--oforward", "n:127.0.0.1:1", "n", "tcp:1:interface=127.0.0.1:backlog=128"),
    ("--iforward", "n:127.0.0.1:1", "n", "tcp:host=127.0.0.1:port=1:timeout=10"),
]


@pytest.mark.parametrize(("flag", "spec", "name", "endpoint"), FORWARDS)
def test_forward_spellings(flag: str, spec: str, name: str, endpoint: str) -> None:
    config = parse(*CHAN, flag, spec)
    forwards = config.oforwards if flag in ("-o", "--oforward") else config.iforwards
    assert forwards == (ForwardSpec(name=name, endpoint=endpoint, original=spec),)


def test_connect_timeout_reaches_iforward_endpoints() -> None:
    # Twisted's tcp:/unix: client parsers want whole seconds: round up.
    config = parse(*CHAN, "--connect-timeout", "2.5", "-i", "a:h:1", "-i", "b:/s:-")
    assert [f.endpoint for f in config.iforwards] == [
        "tcp:host=h:port=1:timeout=3",
        "unix:path=/s:timeout=3",
    ]
    # ... and options may come in any order: the forward is built after parsing.
    early = parse("-i", "a:h:1", *CHAN, "--connect-timeout", "0.2")
    assert early.iforwards[0].endpoint == "tcp:host=h:port=1:timeout=1"


def test_forwards_keep_order_and_same_name_both_ways() -> None:
    config = parse(*CHAN, "-o", "b:h:2", "-o", "a:h:1", "-i", "b:h:3", "-i", "a:h:4")
    assert [f.name for f in config.oforwards] == ["b", "a"]
    assert [f.name for f in config.iforwards] == ["b", "a"]


# ----------------------------------------------------------------------- errors

KINDS = (
    "tcp-listen:HOST:PORT, tcp-connect:HOST:PORT, unix-listen:PATH, unix-connect:PATH, "
    "virtserial:PATH, serial:PATH[:BAUD]"
)

#: (argv, exact message) -- exact where the wording is the point, else fragments.
EXACT: list[tuple[list[str], str]] = [
    (
        ["--channel", "tcp-connect:localhost"],
        "--channel 'tcp-connect:localhost': expected tcp-connect:HOST:PORT",
    ),
    (
        ["--channel", "carrier-pigeon:127.0.0.1:1"],
        f"--channel 'carrier-pigeon:127.0.0.1:1': unknown channel kind 'carrier-pigeon' "
        f"(expected one of {KINDS})",
    ),
    ([], f"--channel is required (expected one of {KINDS})"),
    (
        ["-c", "unix-connect:/a", "--channel", "serial:/dev/ttyS0"],
        "--channel given 2 times ('unix-connect:/a' and 'serial:/dev/ttyS0'): "
        "with several channels each needs a label, e.g. vm1=SPEC",
    ),
    (
        [*CHAN, "-o", "x:127.0.0.1:80", "-o", "x:127.0.0.1:81"],
        "--oforward 'x:127.0.0.1:81': duplicate NAME 'x' (already used by --oforward "
        "'x:127.0.0.1:80')",
    ),
    (
        [*CHAN, "--keepalive-interval", "5", "--keepalive-timeout", "5"],
        "--keepalive-timeout '5': must exceed --keepalive-interval (5)",
    ),
]


@pytest.mark.parametrize(("argv", "message"), EXACT)
def test_exact_error_messages(argv: list[str], message: str) -> None:
    assert error(*argv) == message


BAD: list[tuple[list[str], list[str]]] = [
    # channel
    (["-c", "bogus"], ["'bogus'", "unknown channel kind", "tcp-listen:HOST:PORT"]),
    (["-c", ":1.2.3.4:5"], ["':1.2.3.4:5'", "missing channel kind"]),
    (["-c", "tcp-listen"], ["'tcp-listen'", "expected tcp-listen:HOST:PORT"]),
    (["-c", "tcp-listen:"], ["'tcp-listen:'", "expected tcp-listen:HOST:PORT"]),
    (["-c", "tcp-listen:127.0.0.1:"], ["missing port", "tcp-listen:HOST:PORT"]),
    (["-c", "tcp-listen::4000"], ["missing host"]),
    (["-c", "tcp-listen:127.0.0.1:70000"], ["'tcp-listen:127.0.0.1:70000'", "70000 out of range"]),
    (["-c", "tcp-listen:127.0.0.1:0"], ["port 0 out of range 1..65535"]),
    (["-c", "tcp-connect:127.0.0.1:http"], ["port 'http' is not a number"]),
    (["-c", "tcp-connect:127.0.0.1:-1"], ["port '-1' is not a number"]),
    (["-c", "tcp-connect:127.0.0.1:+80"], ["port '+80' is not a number"]),
    (["-c", "tcp-connect:::1:4000"], ["IPv6 addresses go in brackets"]),
    (["-c", "tcp-connect:[::1:4000"], ["missing ']'"]),
    (["-c", "tcp-connect:[::1]4000"], ["expected tcp-connect:HOST:PORT"]),
    (["-c", "tcp-connect:[127.0.0.1]:4000"], ["invalid IPv6 address '127.0.0.1'"]),
    (["-c", "tcp-connect:[nothost]:4000"], ["invalid IPv6 address 'nothost'"]),
    (["-c", "tcp-connect:10.0.0.300:4000"], ["invalid host '10.0.0.300'"]),
    (["-c", "tcp-connect:bad_host:4000"], ["invalid host 'bad_host'"]),
    (["-c", "tcp-connect:-bad:4000"], ["invalid host '-bad'"]),
    (["-c", "tcp-connect:h:4000:x"], ["ID 'x' is not a number"]),
    (["-c", "tcp-connect:h:4000:1:2"], ["too many ':'"]),
    (["-c", "unix-listen:"], ["'unix-listen:'", "expected unix-listen:PATH"]),
    (["-c", "unix-listen::-"], ["missing path"]),
    (["-c", "unix-connect:/" + "x" * 200], ["longer than 107 bytes"]),
    (["-c", "unix-connect:/tmp/s:-:zero"], ["ID 'zero' is not a number"]),
    (["-c", "virtserial:"], ["expected virtserial:PATH"]),
    (["-c", "virtserial-open::-"], ["missing path"]),
    (["-c", "serial:/dev/ttyS0:fast"], ["baud rate 'fast' is not a number", "serial:PATH[:BAUD]"]),
    (["-c", "serial:/dev/ttyS0:"], ["missing baud rate"]),
    (["-c", "serial:/dev/ttyS0:12345"], ["baud rate 12345 is not a standard rate"]),
    (["-c", "serial:/dev/ttyS0:0"], ["baud rate 0 is not a standard rate"]),
    (["-c", "serial::9600"], ["missing path"]),
    (["-c", "unix-connect:/tmp/a\0b"], ["NUL character"]),
    # forwards
    ([*CHAN, "-o", "svc:127.0.0.1"], ["--oforward 'svc:127.0.0.1'", "NAME:ADDR:PORT"]),
    ([*CHAN, "-o", "svc"], ["--oforward 'svc': expected NAME:ADDR:PORT"]),
    ([*CHAN, "-o", "svc:"], ["--oforward 'svc:': expected"]),
    ([*CHAN, "-o", "svc:127.0.0.1:eighty"], ["port 'eighty' is not a number"]),
    ([*CHAN, "-o", "svc:127.0.0.1:70000"], ["port 70000 out of range"]),
    ([*CHAN, "-i", "svc:127.0.0.1:70000"], ["--iforward 'svc:127.0.0.1:70000'", "out of range"]),
    ([*CHAN, "-o", ":127.0.0.1:80"], ["--oforward ':127.0.0.1:80': empty NAME"]),
    ([*CHAN, "-i", ":127.0.0.1:80"], ["--iforward ':127.0.0.1:80': empty NAME"]),
    ([*CHAN, "-i", "=tcp:host=h:port=1"], ["empty NAME"]),
    ([*CHAN, "-o", "b@d:127.0.0.1:80"], ["invalid NAME 'b@d'", "A-Z a-z 0-9 . _ -"]),
    ([*CHAN, "-o", "x" * 65 + ":127.0.0.1:80"], ["invalid NAME"]),
    ([*CHAN, "-o", "na me=tcp:80"], ["invalid NAME 'na me'"]),
    ([*CHAN, "-o", "svc:::1:80"], ["IPv6 addresses go in brackets"]),
    ([*CHAN, "-o", "svc::-"], ["missing path"]),
    ([*CHAN, "-o", "http="], ["--oforward 'http=': expected"]),
    ([*CHAN, "-o", "http=bogus:1"], ["invalid server endpoint", "Unknown endpoint type"]),
    ([*CHAN, "-o", "http=tcp:notaport"], ["invalid server endpoint description 'tcp:notaport'"]),
    ([*CHAN, "-o", "http=unix:/a=b"], ["invalid server endpoint"]),
    ([*CHAN, "-i", "ssh=tcp:22"], ["--iforward 'ssh=tcp:22'", "invalid client endpoint"]),
    ([*CHAN, "-i", "ssh=bogus:x"], ["invalid client endpoint", "CLIENT-ENDPOINT"]),
    ([*CHAN, "-i", "d:h:1", "-i", "d=unix:path=/x"], ["duplicate NAME 'd'"]),
    # numbers
    ([*CHAN, "--connect-timeout", "0"], ["--connect-timeout '0': out of range"]),
    ([*CHAN, "--connect-timeout", "-1"], ["--connect-timeout '-1': expected seconds"]),
    ([*CHAN, "--connect-timeout", "soon"], ["--connect-timeout 'soon'"]),
    ([*CHAN, "--connect-timeout", "nan"], ["--connect-timeout 'nan'"]),
    ([*CHAN, "--connect-timeout", "inf"], ["--connect-timeout 'inf'"]),
    ([*CHAN, "--connect-timeout", ""], ["--connect-timeout ''"]),
    ([*CHAN, "--connect-timeout", "1e3"], ["--connect-timeout '1e3'"]),
    ([*CHAN, "--connect-timeout", "86401"], ["out of range"]),
    ([*CHAN, "--keepalive-interval", "x"], ["--keepalive-interval 'x'"]),
    ([*CHAN, "--keepalive-timeout", "4"], ["must exceed --keepalive-interval (5)"]),
    ([*CHAN, "--max-frame", "255"], ["--max-frame '255': out of range", "256..65535"]),
    ([*CHAN, "--max-frame", "65536"], ["--max-frame '65536'"]),
    ([*CHAN, "--max-frame", "1k"], ["--max-frame '1k': expected an integer 256..65535"]),
    ([*CHAN, "--window", "100"], ["--window '100'", "out of range"]),
    ([*CHAN, "--max-frame", "4096", "--window", "4095"], ["--window '4095'", "4096.."]),
    ([*CHAN, "--window", str(2**31)], ["--window '2147483648'"]),
    ([*CHAN, "--window", "1.5"], ["--window '1.5': expected an integer"]),
    ([*CHAN, "--max-streams", "0"], ["--max-streams '0': out of range"]),
    ([*CHAN, "--max-streams", "many"], ["--max-streams 'many'"]),
    ([*CHAN, "--max-streams", "65537"], ["--max-streams '65537'"]),
    # getopt level
    ([*CHAN, "--bogus"], ["--bogus"]),
    (["-c"], ["-c requires argument"]),
    ([*CHAN, "stray"], ["unexpected argument 'stray'"]),
]


@pytest.mark.parametrize(("argv", "fragments"), BAD, ids=[" ".join(a)[-60:] for a, _ in BAD])
def test_malformed_options(argv: list[str], fragments: list[str]) -> None:
    message = error(*argv)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_twistd_options_exit_2_with_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    """twistd would print its whole usage for a UsageError: TwistdOptions exits first."""
    with pytest.raises(SystemExit) as info:
        TwistdOptions().parseOptions(["--channel", "bogus"])
    assert info.value.code == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("virtproxy: error: --channel 'bogus': unknown channel kind 'bogus'")
    assert err.count("\n") == 1


# ----------------------------------------------------------------------- endpoints

REACTOR: Any = object()  # endpoints only store the reactor while being built


def server(description: str) -> Any:
    return endpoints.serverFromString(REACTOR, description)


def client(description: str) -> Any:
    return endpoints.clientFromString(REACTOR, description)


def test_endpoint_strings_parse_back() -> None:
    """Every tcp/unix string we produce means to Twisted what the option meant."""
    listen = server(parse("-c", "tcp-listen:[::1]:4000").channel.endpoint)
    assert isinstance(listen, endpoints.TCP6ServerEndpoint)
    assert (listen._interface, listen._port, listen._backlog) == ("::1", 4000, 5)

    listen = server(parse("-c", "tcp-listen:127.0.0.1:4000").channel.endpoint)
    assert isinstance(listen, endpoints.TCP4ServerEndpoint)
    assert (listen._interface, listen._port) == ("127.0.0.1", 4000)

    unix = server(parse("-c", "unix-listen:/tmp/a:b=c.sock:-").channel.endpoint)
    assert isinstance(unix, endpoints.UNIXServerEndpoint)
    assert (unix._address, unix._mode, unix._wantPID) == ("/tmp/a:b=c.sock", 0o600, True)

    connect = client(parse("-c", "tcp-connect:[fe80::1%eth0]:4000").channel.endpoint)
    assert isinstance(connect, endpoints.TCP4ClientEndpoint)
    assert (connect._host, connect._port) == ("fe80::1%eth0", 4000)

    unix_client = client(parse("-c", "unix-connect:/tmp/a:b=c\\d").channel.endpoint)
    assert unix_client._path == "/tmp/a:b=c\\d"

    config = parse(*CHAN, "-i", "s:[::1]:22", "-i", "u:/x y:-", "--connect-timeout", "7")
    tcp, unix_in = (client(f.endpoint) for f in config.iforwards)
    assert (tcp._host, tcp._port, tcp._timeout) == ("::1", 22, 7)
    assert (unix_in._path, unix_in._timeout) == ("/x y", 7)


_host_chars = string.ascii_letters + string.digits
hostnames = st.lists(
    st.text(_host_chars, min_size=1, max_size=10).filter(lambda label: not label.isdigit()),
    min_size=1,
    max_size=4,
).map(".".join)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)
paths = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=60
).filter(lambda p: not p.endswith(":-") and len(p.encode()) <= 107)


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(hostnames, ipv6), port=ports, listen=st.booleans())
def test_any_host_port_round_trips(host: str, port: int, listen: bool) -> None:
    bracketed = f"[{host}]" if ":" in host else host
    channel = parse("-c", f"tcp-{'listen' if listen else 'connect'}:{bracketed}:{port}").channel
    if listen:
        endpoint = server(channel.endpoint)
        assert (endpoint._interface, endpoint._port) == (host, port)
    else:
        endpoint = client(channel.endpoint)
        assert (endpoint._host, endpoint._port) == (host, port)


@settings(max_examples=200, deadline=None)
@given(path=paths)
def test_any_path_round_trips(path: str) -> None:
    config = parse("-c", f"unix-listen:{path}:-", "-o", f"o:{path}:-", "-i", f"i:{path}:-")
    assert server(config.channel.endpoint)._address == path
    assert server(config.oforwards[0].endpoint)._address == path
    assert client(config.iforwards[0].endpoint)._path == path
    assert endpoints._parse(f"x:{quote_endpoint_arg(path)}") == (["x", path], {})


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(st.text(max_size=30), max_size=6))
def test_garbage_never_crashes(argv: list[str]) -> None:
    """Whatever the command line, parsing ends in a config or a one-line UsageError."""
    try:
        parse(*argv)
    except usage.UsageError as e:
        assert "\n" not in format_error(e)
    except SystemExit as e:  # an abbreviation of --help or --version
        assert e.code == 0


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest_twisted.inlineCallbacks
def test_ipv6_literal_strings_really_listen_and_connect() -> Any:
    """tcp6: servers and tcp: clients to a [v6] literal work with a real reactor.

    Twisted's ``tcp:`` client string builds a TCP4ClientEndpoint, whose
    connectTCP accepts IPv6 literals; checked here rather than assumed.
    """
    from twisted.internet import reactor

    config = parse("-c", "tcp-listen:[::1]:1", "-i", "x:[::1]:1")
    listen_desc = config.channel.endpoint.replace("tcp6:1:", "tcp6:0:")
    port = yield endpoints.serverFromString(reactor, listen_desc).listen(
        Factory.forProtocol(Protocol)
    )
    try:
        number = port.getHost().port
        desc = config.iforwards[0].endpoint.replace("port=1:", f"port={number}:")
        proto = yield endpoints.clientFromString(reactor, desc).connect(
            Factory.forProtocol(Protocol)
        )
        assert proto.transport.getPeer().host == "::1"
        proto.transport.loseConnection()
    finally:
        yield port.stopListening()


@pytest.mark.parametrize(
    ("value", "ok"), [("1", True), ("5000", True), ("0", False), ("-3", False), ("fast", False)]
)
def test_max_open_rate(value: str, ok: bool) -> None:
    from virtproxy.options import Options

    options = Options()
    argv = ["--channel", "tcp-connect:127.0.0.1:4000", "--max-open-rate", value]
    if ok:
        options.parseOptions(argv)
        assert options.config.limits.max_open_rate == int(value)
    else:
        with pytest.raises(usage.UsageError, match="--max-open-rate"):
            options.parseOptions(argv)


def test_hostile_peer_limits_reach_the_session_config() -> None:
    from virtproxy.service import session_config

    config = parse(
        *CHAN,
        "--window=65536",
        "--session-window=1048576",
        "--max-reset-rate=50",
        "--stream-buffer=8192",
        "--max-pending=9",
        "--max-name-length=12",
        "--link=off",
    )
    session = session_config(config)
    assert (session.window, session.session_window, session.max_reset_rate) == (
        65536,
        1048576,
        50,
    )
    assert (session.send_high_water, session.max_pending, session.max_service_name) == (
        8192,
        9,
        12,
    )
    assert session.link == "off"
    defaults = session_config(parse(*CHAN))
    assert (defaults.session_window, defaults.link) == (16 * 1024 * 1024, "auto")
    serial = session_config(parse("--channel", "serial:/dev/ttyS0"))
    assert serial.link == "on"
    big = session_config(parse(*CHAN, "--window", str(128 * 1024 * 1024)))
    assert big.session_window == 128 * 1024 * 1024


def test_bulk_frames_are_offered_on_socket_channels_unless_turned_off() -> None:
    from virtproxy import splicing
    from virtproxy.service import session_config

    assert session_config(parse(*CHAN)).bulk == splicing.available()
    assert not session_config(parse(*CHAN, "--bulk", "off")).bulk
    assert not session_config(parse("--channel", "serial:/dev/ttyS0")).bulk
    assert not session_config(parse("--channel", "virtserial:/dev/vport0p1")).bulk


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--link", "maybe"], "--link 'maybe': expected one of on, auto, off"),
        (["--bulk", "yes"], "--bulk 'yes': expected on or off"),
        (["--window", "100000", "--session-window", "5000"], "--session-window '5000'"),
        (["--max-name-length", "65"], "--max-name-length '65'"),
        (["--max-pending", "0"], "--max-pending '0'"),
        (["--stream-buffer", "1"], "--stream-buffer '1'"),
        (["--max-reset-rate", "x"], "--max-reset-rate 'x'"),
    ],
)
def test_bad_limits_are_one_line_errors(argv: list[str], fragment: str) -> None:
    message = error(*CHAN, *argv)
    assert fragment in message and "\n" not in message


# ----------------------------------------------------------------------- several channels


def process(*argv: str) -> Any:
    options = Options()
    options.parseOptions(list(argv))
    return options.process


def test_labelled_channels_and_their_forwards() -> None:
    config = process(
        "-c",
        "vm1=unix-connect:/run/vm1.sock",
        "--channel",
        "vm2=tcp-listen:127.0.0.1:4000",
        "-o",
        "vm1/ssh:127.0.0.1:9022",
        "-o",
        "vm2/ssh:127.0.0.1:9122",
        "-i",
        "vm2/web=tcp:host=127.0.0.1:port=80",
        "-R",
        "vm2/web:127.0.0.1:8080",
        "--allow-remote-listen",
        "[::1]:22",
    )
    vm1, vm2 = config.channels
    assert (vm1.label, vm1.channel.endpoint) == ("vm1", "unix:path=/run/vm1.sock")
    assert [f.endpoint for f in vm1.oforwards] == ["tcp:9022:interface=127.0.0.1:backlog=128"]
    assert [f.name for f in vm2.oforwards] == ["ssh"] and [f.name for f in vm2.iforwards] == ["web"]
    assert [(r.name, r.host, r.port) for r in vm2.rforwards] == [("web", "127.0.0.1", 8080)]
    assert [(a.host, a.port) for a in config.allow_remote_listen] == [("::1", 22)]
    assert config.cli_channels == ("vm1", "vm2")


def test_one_unlabelled_channel_is_default() -> None:
    config = process(*CHAN, "-o", "ssh:127.0.0.1:22", "-o", "default/web:127.0.0.1:80")
    (only,) = config.channels
    assert only.label == "" and only.name == "default"
    assert [f.name for f in only.oforwards] == ["ssh", "web"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "-c",
                "a=tcp-listen:127.0.0.1:1",
                "-c",
                "b=tcp-listen:127.0.0.1:2",
                "-o",
                "s:1.2.3.4:5",
            ],
            "several channels: prefix the channel label, e.g. a/s:1.2.3.4:5",
        ),
        (["-c", "a=tcp-listen:127.0.0.1:1", "-o", "z/s:1.2.3.4:5"], "no --channel labelled 'z'"),
        (
            ["-c", "a=tcp-listen:127.0.0.1:1", "-c", "a=tcp-listen:127.0.0.1:2"],
            "duplicate label 'a'",
        ),
        (["-c", "-x=tcp-listen:127.0.0.1:1"], "invalid channel label '-x'"),
        ([*CHAN, "-o", "..rforward:127.0.0.1:1"], "names starting with '..' are reserved"),
        ([*CHAN, "-R", "web:localhost:80"], "an IP address is required"),
        ([*CHAN, "-R", "web:127.0.0.1"], "missing port"),
        ([*CHAN, "--allow-remote-listen", "127.0.0.1:0"], "port 0 out of range"),
        ([*CHAN, "--metrics", "127.0.0.1"], "--metrics '127.0.0.1'"),
        (["-o", "s:1.2.3.4:5", "--control", "/x"], "forwards given without --channel"),
    ],
)
def test_several_channel_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        process(*argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
