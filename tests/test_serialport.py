"""Tests for the virtserial: and serial: channel endpoints (virtproxy.serialport).

Real ptys stand in for the devices: the test drives the master side with
plain os.read/os.write, the code under test opens the slave path.  The
virtio-serial "host not connected" state (read() == 0 and poll hang-up
forever) is played by a socketpair whose peer shut its write side (read 0,
POLLIN|POLLRDHUP: the doRead path) and by a FIFO whose writer went away
(read 0, POLLHUP without POLLIN: the reactor's hang-up path).
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, error, task
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IPushProducer,
    IStreamClientEndpointStringParserWithReactor,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from zope.interface import implementer

from virtproxy import serialport
from virtproxy.serialport import (
    DeviceAddress,
    DeviceLost,
    DeviceOpenError,
    DeviceTransport,
    SerialEndpoint,
    VirtioSerialEndpoint,
)

REPO = Path(__file__).resolve().parent.parent
KINDS = ["virtserial", "serial"]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Collector(Protocol):
    """Records everything received and fires ``lost`` with the close reason."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class ChunkProducer:
    """Writes ``data`` in chunks while not paused; counts pauses."""

    def __init__(self, transport: Any, data: bytes, chunk: int = 16384) -> None:
        self.transport = transport
        self.data = data
        self.chunk = chunk
        self.pos = 0
        self.paused = False
        self.pauses = 0
        self.finished = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.pos < len(self.data):
            self.transport.write(self.data[self.pos : self.pos + self.chunk])
            self.pos += self.chunk
        if self.pos >= len(self.data) and not self.finished:
            self.finished = True
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.finished = True


async def sleep(seconds: float) -> None:
    await task.deferLater(_reactor(), seconds, lambda: None)


async def waitFor(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.005)


async def lostReason(proto: Collector, timeout: float = 2.0) -> Failure:
    await proto.lost.addTimeout(timeout, _reactor())
    assert proto.reason is not None
    return proto.reason


async def writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view[:4096]) :]
        except BlockingIOError:
            await sleep(0.002)


async def readExactly(fd: int, n: int, chunk: int = 65536, delay: float = 0.0) -> bytes:
    """Read n bytes from a non-blocking fd; a delay makes a slow reader."""
    buf = bytearray()
    deadline = time.monotonic() + 10
    while len(buf) < n:
        assert time.monotonic() < deadline, f"got {len(buf)} of {n} bytes"
        try:
            got = os.read(fd, min(chunk, n - len(buf)))
        except BlockingIOError:
            got = b""
        buf += got
        if delay or not got:
            await sleep(delay or 0.002)
    return bytes(buf)


@dataclass
class Pty:
    master: int
    slave: int
    path: str


@pytest.fixture
def pty() -> Iterator[Pty]:
    """A pty; the slave is raw (what a virtio port is), the master non-blocking."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    p = Pty(master, slave, os.ttyname(slave))
    yield p
    for fd in (p.master, p.slave):
        try:
            os.close(fd)
        except OSError:
            pass


async def connect(description: str) -> Collector:
    proto = Collector()
    await connectProtocol(clientFromString(_reactor(), description), proto)
    return proto


def transportOf(proto: Collector) -> DeviceTransport:
    assert isinstance(proto.transport, DeviceTransport)
    return proto.transport


def attach(fd: int, name: str) -> tuple[DeviceTransport, Collector]:
    """Drive an already-open fd the way the virtserial endpoint does."""
    proto = Collector()
    transport = DeviceTransport(_reactor(), fd, proto, DeviceAddress("virtserial", name))
    transport.startReading()
    proto.makeConnection(transport)
    return transport, proto


# -- data transfer ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_bytes_both_ways_byte_exact_with_backpressure(kind: str, pty: Pty) -> None:
    proto = await connect(f"{kind}:{pty.path}")
    transport = transportOf(proto)
    assert ITransport.providedBy(transport)
    assert not IHalfCloseableDescriptor.providedBy(transport)
    assert transport.getPeer() == transport.getHost() == DeviceAddress(kind, pty.path)

    rng = random.Random(kind)
    inbound = rng.randbytes(200 * 1024)
    await writeAll(pty.master, inbound)
    await waitFor(lambda: len(proto.data) >= len(inbound), "inbound data")
    assert bytes(proto.data) == inbound

    outbound = rng.randbytes(200 * 1024)
    producer = ChunkProducer(transport, outbound)
    producer.start()
    received = await readExactly(pty.master, len(outbound), chunk=4096, delay=0.003)
    assert received == outbound
    assert producer.pauses >= 1, "a slow reader must pause the producer"
    assert producer.finished

    transport.loseConnection()
    reason = await lostReason(proto)
    assert reason.check(error.ConnectionDone)
    assert transport.fileno() == -1


@pytest_twisted.ensureDeferred
async def test_serial_keyword_form_sets_termios_and_flushes_stale_input(pty: Pty) -> None:
    os.write(pty.master, b"stale")
    await sleep(0.05)  # let the pty move it into the slave's input queue

    proto = await connect(f"serial:path={pty.path}:baudrate=9600")
    iflag, oflag, cflag, lflag, _ispeed, ospeed, cc = termios.tcgetattr(pty.slave)
    assert iflag & serialport._IFLAGS_CLEARED == 0
    assert (oflag, lflag) == (0, 0)
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)
    assert ospeed == termios.B9600
    assert cflag & termios.CSIZE == termios.CS8
    assert not cflag & (termios.PARENB | termios.CSTOPB | termios.CRTSCTS)

    os.write(pty.master, b"fresh")
    await waitFor(lambda: len(proto.data) >= 5, "fresh data")
    await sleep(0.02)
    assert bytes(proto.data) == b"fresh"

    transportOf(proto).pauseProducing()
    os.write(pty.master, b"later")
    await sleep(0.2)
    assert bytes(proto.data) == b"fresh", "paused transport must not deliver"
    transportOf(proto).resumeProducing()
    await waitFor(lambda: bytes(proto.data) == b"freshlater", "data after resume")
    transportOf(proto).loseConnection()
    await lostReason(proto)


# -- open errors -------------------------------------------------------------


def openPaths() -> set[str]:
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return paths


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", {"virtserial": os.strerror(errno.ENOENT), "serial": os.strerror(errno.ENOENT)}),
        (
            "directory",
            {"virtserial": os.strerror(errno.EISDIR), "serial": os.strerror(errno.EISDIR)},
        ),
        ("regular", {"virtserial": "not a character device", "serial": os.strerror(errno.ENOTTY)}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_open_errors_are_one_line(
    kind: str, case: str, expected: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "port"
    if case == "directory":
        path.mkdir()
    elif case == "regular":
        path.write_bytes(b"")
    with pytest.raises(DeviceOpenError) as info:
        await connect(f"{kind}:{path}")
    message = str(info.value)
    assert isinstance(info.value, error.ConnectError)
    assert "\n" not in message
    assert str(path) in message and expected[kind] in message, message
    assert str(path) not in openPaths(), "a failed open leaked its descriptor"


@pytest_twisted.ensureDeferred
async def test_serial_port_in_use_by_another_opener(pty: Pty) -> None:
    first = await connect(f"serial:{pty.path}")
    with pytest.raises(DeviceOpenError, match="already in use by another process"):
        await connect(f"serial:{pty.path}")
    transportOf(first).loseConnection()
    await lostReason(first)


def test_virtserial_ebusy_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # A virtio-serial port allows one opener (EBUSY); a pty can't show that.
    def busy(path: str, flags: int) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)

    with monkeypatch.context() as m:
        m.setattr(serialport.os, "open", busy)
        d = VirtioSerialEndpoint(_reactor(), "/dev/vport0p1").connect(
            Factory.forProtocol(Collector)
        )
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(DeviceOpenError)
    assert str(failures[0].value) == (
        "cannot open virtio-serial port /dev/vport0p1: already in use by another process"
    )


# -- device loss -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_hot_unplug_loses_connection(kind: str, pty: Pty) -> None:
    proto = await connect(f"{kind}:{pty.path}")
    transport = transportOf(proto)
    os.close(pty.master)  # the slave hangs up: read() == 0 with POLLERR, write() EIO
    pty.master = -1
    reason = await lostReason(proto)
    assert reason.check(DeviceLost), reason
    assert pty.path in str(reason.value)
    assert transport.fileno() == -1


@pytest_twisted.ensureDeferred
async def test_abort_discards_output_and_closes(pty: Pty) -> None:
    proto = await connect(f"virtserial:{pty.path}")
    transport = transportOf(proto)
    with pytest.raises(NotImplementedError):
        transport.loseWriteConnection()
    transport.write(b"x" * (1024 * 1024))  # far more than the pty will take
    await sleep(0.05)
    transport.abortConnection()
    reason = await lostReason(proto, timeout=1.0)
    assert reason.check(error.ConnectionAborted)
    assert transport.fileno() == -1


# -- host side not connected ---------------------------------------------------


def cpuOver(seconds: float) -> Callable[[], float]:
    start = time.process_time()
    return lambda: time.process_time() - start


@pytest_twisted.ensureDeferred
async def test_zero_byte_reads_back_off_and_writes_still_flow() -> None:
    ours, host = socket.socketpair()
    host.shutdown(socket.SHUT_WR)  # our reads now return 0 at once, forever
    host.setblocking(False)
    transport, proto = attach(ours.detach(), "socketpair")

    start = time.process_time()
    await sleep(1.0)
    cpu = time.process_time() - start
    assert not proto.lost.called, "a 0-byte read is not end of file here"
    assert cpu < 0.3, f"used {cpu:.2f}s CPU in 1s of host-absent state"

    transport.write(b"ping")
    got = bytearray()

    def received() -> bool:
        try:
            got.extend(host.recv(100))
        except BlockingIOError:
            pass
        return bytes(got) == b"ping"

    await waitFor(received, "write while the host end is absent", timeout=1.0)
    transport.loseConnection()
    reason = await lostReason(proto, timeout=1.0)
    assert reason.check(error.ConnectionDone)
    host.close()


@pytest_twisted.ensureDeferred
async def test_pollhup_backs_off_and_reading_resumes_when_host_appears(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    ours = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    host = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    transport, proto = attach(ours, "fifo")
    os.write(host, b"hello")
    await waitFor(lambda: bytes(proto.data) == b"hello", "first data")
    os.close(host)  # from now on: POLLHUP without POLLIN, read() == 0

    poller = select.poll()
    poller.register(ours, select.POLLIN)
    assert poller.poll(0) == [(ours, select.POLLHUP)], "stand-in must hang up like virtio"

    start = time.process_time()
    await sleep(1.0)
    cpu = time.process_time() - start
    assert not proto.lost.called, "POLLHUP is not connection lost here"
    assert cpu < 0.3, f"used {cpu:.2f}s CPU in 1s of host-absent state"

    host = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(host, b"again")
    await waitFor(lambda: bytes(proto.data) == b"helloagain", "data after host returns", 1.0)
    transport.loseConnection()
    reason = await lostReason(proto, timeout=1.0)
    assert reason.check(error.ConnectionDone)
    os.close(host)


# -- endpoint strings and the plugin ---------------------------------------


@pytest.mark.parametrize(
    ("description", "cls", "path", "baudrate"),
    [
        ("virtserial:/dev/virtio-ports/x", VirtioSerialEndpoint, "/dev/virtio-ports/x", None),
        ("virtserial:path=/dev/vport0p1", VirtioSerialEndpoint, "/dev/vport0p1", None),
        (r"virtserial:/tmp/a\:b", VirtioSerialEndpoint, "/tmp/a:b", None),
        ("serial:/dev/ttyS1:115200", SerialEndpoint, "/dev/ttyS1", 115200),
        ("serial:/dev/ttyS1", SerialEndpoint, "/dev/ttyS1", 115200),
        ("serial:path=/dev/ttyS1:baudrate=9600", SerialEndpoint, "/dev/ttyS1", 9600),
        ("serial:/dev/ttyS1:baudrate=57600", SerialEndpoint, "/dev/ttyS1", 57600),
    ],
)
def test_client_from_string(description: str, cls: Any, path: str, baudrate: int | None) -> None:
    endpoint: Any = clientFromString(_reactor(), description)
    assert type(endpoint) is cls
    assert endpoint.path == path
    if baudrate is not None:
        assert endpoint.baudrate == baudrate


@pytest.mark.parametrize(
    ("description", "exc", "match"),
    [
        ("virtserial:", ValueError, "path is required"),
        ("serial:/dev/ttyS1:fast", ValueError, "baud rate must be a number"),
        ("serial:/dev/ttyS1:-5", ValueError, "must be positive"),
        ("serial:/dev/ttyS1:9600:x", TypeError, "too many parameters"),
        ("serial:path=/dev/ttyS1:speed=9600", TypeError, "unknown parameter"),
        ("virtserial:/dev/a:path=/dev/b", TypeError, "path given twice"),
    ],
)
def test_bad_endpoint_strings(description: str, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        clientFromString(_reactor(), description)


def test_plugin_is_found_and_imports_light() -> None:
    """Found through Twisted's plugin scan: the repo's copy, or an installed copy of it
    (an installed package's twisted/plugins directory is scanned first)."""
    import twisted.plugins

    parsers = {
        p.prefix: p
        for p in getPlugins(IStreamClientEndpointStringParserWithReactor, twisted.plugins)
    }
    assert {"virtserial", "serial"} <= parsers.keys()
    module = sys.modules[type(parsers["serial"]).__module__]
    found = Path(module.__file__ or "").resolve()
    repo_copy = REPO / "twisted/plugins/virtproxy_endpoints.py"
    assert found == repo_copy or found.read_bytes() == repo_copy.read_bytes(), found

    probe = (
        "import sys, twisted.plugins.virtproxy_endpoints;"
        "print(sorted(m for m in ('twisted.internet.reactor', 'virtproxy.serialport', 'serial')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
