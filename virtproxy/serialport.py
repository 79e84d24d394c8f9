"""Serial and virtio-serial channel transports, as Twisted client endpoints.

Both kinds of channel are character devices driven through one non-blocking
file descriptor by :class:`DeviceTransport`.  The endpoints are what
``clientFromString`` builds for ``virtserial:PATH`` and
``serial:PATH[:BAUDRATE]`` (see ``twisted/plugins/virtproxy_endpoints.py``).

A virtio-serial port whose host end is not connected does not fail: read()
returns 0 bytes at once and poll() reports POLLHUP on every call, and writes
get EAGAIN.  Treating that as end-of-file would make a ClientService reconnect
in a tight loop, and polling it naively spins the CPU; so the transport stops
polling and looks again every :attr:`DeviceTransport.retryInterval` seconds
until the host shows up.  Only real device errors (ENODEV when the port is
hot-unplugged, EIO, a hung-up tty) lose the connection.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import serial
from twisted.internet import defer, error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReadWriteDescriptor,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplementsOnly, implementer

__all__ = [
    "DEFAULT_BAUDRATE",
    "DeviceAddress",
    "DeviceLost",
    "DeviceOpenError",
    "DeviceTransport",
    "SerialEndpoint",
    "SerialTransport",
    "VirtioSerialEndpoint",
    "parseSerial",
    "parseVirtioSerial",
]

_log = Logger()

DEFAULT_BAUDRATE = 115200

#: errnos that only mean "not now" on a non-blocking descriptor.
_TRY_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})

#: Input flags qemu-ga clears on its serial channel (everything that could
#: drop, translate or act on a byte).
_IFLAGS_CLEARED = (
    termios.IGNBRK
    | termios.BRKINT
    | termios.IGNPAR
    | termios.PARMRK
    | termios.INPCK
    | termios.ISTRIP
    | termios.INLCR
    | termios.IGNCR
    | termios.ICRNL
    | termios.IXON
    | termios.IXOFF
    | termios.IXANY
    | termios.IMAXBEL
)

#: A pull producer is asked for more only once the kernel's tty output queue
#: (TIOCOUTQ) is at most this many bytes: on a 115200-baud line the 4 KiB a tty
#: buffers are 0.35 s that every keystroke would otherwise wait behind.
OUTPUT_QUEUE_LOW = 256
#: Seconds between looks at the output queue while it drains.
OUTPUT_QUEUE_POLL = 0.005

_KIND_NAMES = {"virtserial": "virtio-serial port", "serial": "serial port"}


class _Reactor(Protocol):
    """The reactor services a device transport uses (IReactorFDSet + IReactorTime)."""

    def addReader(self, reader: Any) -> None: ...
    def removeReader(self, reader: Any) -> None: ...
    def addWriter(self, writer: Any) -> None: ...
    def removeWriter(self, writer: Any) -> None: ...
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> IDelayedCall: ...


@implementer(IAddress)
@dataclass(frozen=True)
class DeviceAddress:
    """The address of a device channel: there is no network peer, only a path."""

    kind: str  # "virtserial" or "serial"
    path: str

    def __str__(self) -> str:
        return f"{_KIND_NAMES.get(self.kind, self.kind)} {self.path}"


def _reason(code: int | None, fallback: str = "unknown error") -> str:
    """Turn an errno into the short reason used in our one-line errors."""
    if code in (errno.EBUSY, errno.EAGAIN):
        # EBUSY: virtio-serial allows one opener; EAGAIN: pyserial's flock.
        return "already in use by another process"
    if code is None:
        return fallback
    return os.strerror(code)


class DeviceOpenError(error.ConnectError):
    """Opening the channel device failed.

    ``str()`` is one line naming the device and why; its argument alone is
    the reason the channel's endpoint logs (see service.ChannelEndpoint).
    """

    def __init__(self, address: DeviceAddress, code: int | None, reason: str) -> None:
        super().__init__(string=reason)
        self.address = address
        self.errno = code
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot open {self.address}: {self.reason}"


class DeviceLost(error.ConnectionLost):
    """The device failed under an open connection (unplugged port, hung-up tty).

    A distinct type (not plain ConnectionLost) also lets
    :meth:`DeviceTransport.connectionLost` tell our own verdicts from the
    reactor's poll-hang-up guesses.
    """

    def __init__(self, address: DeviceAddress, code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.address = address
        self.errno = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.address} lost: {self.reason}"


class DeviceTransport(FileDescriptor):
    """A non-blocking character-device descriptor as a Twisted transport.

    One object serves both directions because epoll holds one selectable per
    fd.  The descriptor is owned: it is closed when the connection is lost.
    Construct it on any already-open descriptor (it is made non-blocking),
    call :meth:`startReading`, then ``protocol.makeConnection(transport)``.
    """

    #: Seconds between looks at a device whose host end is absent.
    retryInterval = 0.1
    readSize = 65536

    def __init__(
        self,
        reactor: _Reactor,
        fd: int,
        protocol: IProtocol,
        address: DeviceAddress,
    ) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self.reactor: _Reactor = reactor  # type: ignore[assignment]
        os.set_blocking(fd, False)
        self._fd = fd
        self.protocol = protocol
        self.address = address
        self.connected = 1
        self._wantRead = False  # reading requested (not paused by a consumer)
        self._suspended = False  # host end absent: nothing registered, timer due
        self._retry: IDelayedCall | None = None
        self._aborting = False
        self._absentLogged = False
        self._noOutputQueue = False

    # -- ITransport / ILoggingContext ------------------------------------

    def fileno(self) -> int:
        return self._fd

    def getHost(self) -> DeviceAddress:
        return self.address

    def getPeer(self) -> DeviceAddress:
        return self.address

    def logPrefix(self) -> str:
        return str(self.address)

    def loseWriteConnection(self) -> None:
        """Refuse: a device channel has one state for both directions."""
        raise NotImplementedError(f"{self.address}: half-close is not supported")

    def abortConnection(self) -> None:
        """Close at once, dropping buffered output (the ITCPTransport contract)."""
        if self.disconnected or self._aborting:
            return
        self._aborting = True
        self.stopReading()
        self.stopWriting()
        self._cancelRetry()
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.reactor.callLater(0, self.connectionLost, Failure(error.ConnectionAborted()))

    def loseConnection(self) -> None:
        super().loseConnection()
        self._closeIfFlushed()

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        self._closeIfFlushed()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """A pull producer is asked for more only once the tty's queue drained."""
        if not streaming and self.outputQueued() is not None:
            producer = _DrainGate(self, producer)
        super().registerProducer(producer, streaming)

    def outputQueued(self) -> int | None:
        """Bytes in the kernel's output queue (TIOCOUTQ); None if not a tty."""
        if self._noOutputQueue or self.disconnected:
            return None
        try:
            raw = fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            self._noOutputQueue = True  # a virtio-serial port is not a tty
            return None
        return int.from_bytes(raw, "little")

    def _closeIfFlushed(self) -> None:
        """Close without waiting for writability when nothing is left to send.

        FileDescriptor closes from doWrite, but a host end that is absent or
        not reading may never make the device writable.
        """
        if (
            self.connected
            and self.disconnecting
            and not self._aborting
            and self.producer is None
            and not self._hasPendingOutput()
        ):
            self.reactor.removeWriter(self)
            self.reactor.callLater(0, self._closeFlushed)

    def _closeFlushed(self) -> None:
        if not self.disconnected:
            self.connectionLost(Failure(error.ConnectionDone()))

    # -- reactor registration, aware of the suspended state -------------

    def startReading(self) -> None:
        self._wantRead = True
        if not (self._suspended or self._aborting or self.disconnected):
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        self._wantRead = False
        self.reactor.removeReader(self)

    def startWriting(self) -> None:
        # While suspended, _resume() re-registers for pending output.
        if not (self._suspended or self._aborting or self.disconnected):
            self.reactor.addWriter(self)

    # -- I/O --------------------------------------------------------------

    def doRead(self) -> BaseException | None:
        try:
            data = os.read(self._fd, self.readSize)
        except OSError as e:
            if e.errno in _TRY_AGAIN:
                return None
            return self._lost("read", e)
        if not data:
            return self._peerAbsent()
        self._peerPresent()
        self.protocol.dataReceived(data)
        return None

    def writeSomeData(self, data: bytes) -> int | BaseException:
        if not data:
            return 0
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            if e.errno in _TRY_AGAIN:
                return 0  # stay registered; poll says when there is room
            return self._lost("write", e)
        self._peerPresent()
        return written

    def connectionLost(self, reason: Failure) -> None:
        """Tear down, unless this is the reactor misreading an absent host.

        On POLLHUP/POLLERR without POLLIN the reactor skips doRead and calls
        this with a plain ConnectionDone/ConnectionLost.  A virtio-serial port
        reports POLLHUP whenever the host end is absent, so probe the device:
        only a real device error ends the connection.  Our own doRead and
        doWrite never produce those plain types (they use DeviceLost), nor
        does abortConnection.
        """
        if self.disconnected:
            return
        if (
            self.connected
            and not self._aborting
            and type(reason.value) in (error.ConnectionDone, error.ConnectionLost)
        ):
            if self.disconnecting and not self._hasPendingOutput():
                reason = Failure(error.ConnectionDone())
            else:
                gone = self._peerAbsent()
                if gone is None:
                    return
                reason = Failure(gone)
        super().connectionLost(reason)
        self._cancelRetry()
        try:
            self._closeDevice(discardOutput=self._aborting)
        finally:
            self._fd = -1
            self.protocol.connectionLost(reason)

    def _closeDevice(self, discardOutput: bool) -> None:
        """Drop unread input (the next opener must not see stale bytes), close."""
        _flushTty(self._fd, termios.TCIOFLUSH if discardOutput else termios.TCIFLUSH)
        os.close(self._fd)

    # -- the host-absent state ----------------------------------------------

    def _lost(self, op: str, e: OSError) -> DeviceLost:
        return DeviceLost(self.address, e.errno, f"{op} failed: {e.strerror}")

    def _hasPendingOutput(self) -> bool:
        return len(self.dataBuffer) > self.offset or self._tempDataLen > 0

    def _checkDevice(self) -> DeviceLost | None:
        """Tell a device that is gone from one whose host end is merely absent.

        POLLERR: a hung-up tty (e.g. a pty whose master closed; its reads then
        return 0 too).  A zero-length read consumes nothing but fails with
        ENODEV/EIO on an unplugged virtio-serial port.
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLOUT)
        events = poller.poll(0)
        revents = events[0][1] if events else 0
        if revents & select.POLLNVAL:
            return DeviceLost(self.address, errno.EBADF, "descriptor is not open")
        if revents & select.POLLERR:
            return DeviceLost(self.address, None, "device hung up (POLLERR)")
        try:
            os.read(self._fd, 0)
        except OSError as e:
            if e.errno not in _TRY_AGAIN:
                return self._lost("read", e)
        return None

    def _peerAbsent(self) -> DeviceLost | None:
        """A 0-byte read or a poll hang-up: lose the device, or back off."""
        gone = self._checkDevice()
        if gone is not None:
            return gone
        if not self._absentLogged:
            self._absentLogged = True
            _log.info(
                "{address}: other end not connected; looking again every {interval}s",
                address=str(self.address),
                interval=self.retryInterval,
            )
        self._suspend()
        return None

    def _peerPresent(self) -> None:
        if self._absentLogged:
            self._absentLogged = False
            _log.info("{address}: other end connected", address=str(self.address))

    def _suspend(self) -> None:
        """Stop polling (it would report HUP at once, forever) until the timer."""
        self._suspended = True
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        if self._retry is None:
            self._retry = self.reactor.callLater(self.retryInterval, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self.connected or self._aborting:
            return
        self._suspended = False
        if self._wantRead:
            self.reactor.addReader(self)
        if self._hasPendingOutput():
            self.reactor.addWriter(self)

    def _cancelRetry(self) -> None:
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None


# FileDescriptor claims IHalfCloseableDescriptor; a device cannot half-close,
# and claiming it would route a read-side POLLHUP to readConnectionLost.
classImplementsOnly(
    DeviceTransport,
    ITransport,
    IConsumer,
    IPushProducer,
    IReadWriteDescriptor,
    ILoggingContext,
)


@implementer(IPullProducer)
class _DrainGate:
    """Stands between a DeviceTransport and its pull producer: passes the
    transport's request for more on only when the kernel's queue is short."""

    def __init__(self, transport: DeviceTransport, producer: Any) -> None:
        self.transport = transport
        self.producer = producer
        self._check: IDelayedCall | None = None

    def resumeProducing(self) -> None:
        queued = self.transport.outputQueued()
        if queued is not None and queued > OUTPUT_QUEUE_LOW:
            if self._check is None:
                self._check = self.transport.reactor.callLater(OUTPUT_QUEUE_POLL, self._recheck)
            return
        self.producer.resumeProducing()

    def _recheck(self) -> None:
        self._check = None
        if cast(object, self.transport.producer) is self:
            self.resumeProducing()

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def stopProducing(self) -> None:
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self.producer.stopProducing()


def _flushTty(fd: int, queue: int) -> None:
    """tcflush() if fd is a tty; a hung-up or vanished device is not an error."""
    try:
        if os.isatty(fd):
            termios.tcflush(fd, queue)
    except (termios.error, OSError):
        pass


class SerialTransport(DeviceTransport):
    """A DeviceTransport on a pyserial port, which it closes (fd and pipes)."""

    def __init__(
        self,
        reactor: _Reactor,
        port: serial.Serial,
        protocol: IProtocol,
        address: DeviceAddress,
    ) -> None:
        super().__init__(reactor, port.fd, protocol, address)
        self.serial = port

    def _closeDevice(self, discardOutput: bool) -> None:
        _flushTty(self._fd, termios.TCIOFLUSH if discardOutput else termios.TCIFLUSH)
        self.serial.close()


def _attach(
    factory: IProtocolFactory,
    address: DeviceAddress,
    makeTransport: Callable[[IProtocol], DeviceTransport],
    closeDevice: Callable[[], object],
) -> defer.Deferred[IProtocol]:
    """Build the protocol and connect it to a transport on the opened device."""
    try:
        protocol = factory.buildProtocol(address)
    except BaseException:
        closeDevice()
        return defer.fail()
    if protocol is None:
        closeDevice()
        return defer.fail(error.NoProtocol())
    transport = makeTransport(protocol)
    transport.startReading()
    try:
        protocol.makeConnection(transport)
    except BaseException:
        f = Failure()
        transport.abortConnection()
        return defer.fail(f)
    return defer.succeed(protocol)


@implementer(IStreamClientEndpoint)
class VirtioSerialEndpoint:
    """Client endpoint for a guest's virtio-serial port (``/dev/vportNpM``).

    Such a port is a character device but not a tty, so pyserial cannot open
    it; it is opened with os.open() and driven by a :class:`DeviceTransport`.
    """

    def __init__(self, reactor: _Reactor, path: str) -> None:
        self._reactor = reactor
        self.path = path

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        address = DeviceAddress("virtserial", self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            return defer.fail(DeviceOpenError(address, e.errno, _reason(e.errno)))
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            # Anything else (a regular file, a FIFO) would look like a port
            # whose host end never connects: say so instead.
            os.close(fd)
            return defer.fail(DeviceOpenError(address, None, "not a character device"))
        return _attach(
            protocolFactory,
            address,
            lambda p: DeviceTransport(self._reactor, fd, p, address),
            lambda: os.close(fd),
        )

    def __repr__(self) -> str:
        return f"VirtioSerialEndpoint({self.path!r})"


@implementer(IStreamClientEndpoint)
class SerialEndpoint:
    """Client endpoint for a (possibly emulated) serial port: raw 8N1, no flow control.

    Opened with pyserial (which knows baud rates, including non-standard
    ones) holding an exclusive flock, then set to the termios settings qemu-ga
    uses, with stale input flushed.  The rate is set at open time because
    Twisted's SerialPort.setBaudRate is broken with pyserial 3.
    """

    def __init__(self, reactor: _Reactor, path: str, baudrate: int = DEFAULT_BAUDRATE) -> None:
        if baudrate <= 0:
            raise ValueError(f"serial: baud rate must be positive, not {baudrate}")
        self._reactor = reactor
        self.path = path
        self.baudrate = baudrate

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        address = DeviceAddress("serial", self.path)
        try:
            port = _openSerial(address, self.baudrate)
        except DeviceOpenError as e:
            return defer.fail(e)
        return _attach(
            protocolFactory,
            address,
            lambda p: SerialTransport(self._reactor, port, p, address),
            port.close,
        )

    def __repr__(self) -> str:
        return f"SerialEndpoint({self.path!r}, baudrate={self.baudrate})"


def _openSerial(address: DeviceAddress, baudrate: int) -> serial.Serial:
    """Open and configure a serial port, raising DeviceOpenError on failure."""
    port = serial.Serial()
    port.port = address.path
    port.baudrate = baudrate
    port.bytesize = serial.EIGHTBITS
    port.parity = serial.PARITY_NONE
    port.stopbits = serial.STOPBITS_ONE
    port.xonxoff = False
    port.rtscts = False
    port.dsrdtr = False
    port.timeout = 0
    port.exclusive = True
    try:
        port.open()
    except (serial.SerialException, ValueError) as e:
        code = getattr(e, "errno", None)
        if code is None and isinstance(e.__context__, (OSError, termios.error)):
            # pyserial drops the errno of a failed tcgetattr (e.g. ENOTTY).
            ctx = e.__context__.args
            code = ctx[0] if ctx and isinstance(ctx[0], int) else None
        raise DeviceOpenError(address, code, _reason(code, str(e))) from e
    try:
        _makeRaw(port.fd)
        port.reset_input_buffer()
    except (termios.error, OSError) as e:
        port.close()
        code = e.args[0] if e.args and isinstance(e.args[0], int) else None
        raise DeviceOpenError(address, code, _reason(code, str(e))) from e
    return port


def _makeRaw(fd: int) -> None:
    """Apply the termios settings qemu-ga uses on top of pyserial's raw mode."""
    iflag, _oflag, cflag, _lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~_IFLAGS_CLEARED
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, 0, cflag, 0, ispeed, ospeed, cc])


# -- endpoint string parsing (used by the twisted.plugins module) ---------


def _splitParams(
    prefix: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    names: tuple[str, ...],
    required: int,
) -> dict[str, str]:
    """Merge positional and keyword endpoint parameters, by name, strictly."""
    usage = prefix + ":" + ":".join(n.upper() for n in names)
    if len(args) > len(names):
        raise TypeError(f"{prefix}: too many parameters; expected {usage}")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"{prefix}: unknown parameter(s) {', '.join(unknown)}; expected {usage}")
    params = {name: str(value) for name, value in zip(names, args, strict=False)}
    for name, value in kwargs.items():
        if name in params:
            raise TypeError(f"{prefix}: {name} given twice")
        params[name] = str(value)
    for name in names[:required]:
        if not params.get(name):
            raise ValueError(f"{prefix}: {name} is required; expected {usage}")
    return params


def parseVirtioSerial(reactor: object, *args: object, **kwargs: object) -> VirtioSerialEndpoint:
    """Parse ``virtserial:PATH`` or ``virtserial:path=PATH``."""
    params = _splitParams("virtserial", args, kwargs, ("path",), required=1)
    return VirtioSerialEndpoint(cast(_Reactor, reactor), params["path"])


def parseSerial(reactor: object, *args: object, **kwargs: object) -> SerialEndpoint:
    """Parse ``serial:PATH[:BAUDRATE]`` or ``serial:path=PATH[:baudrate=N]``."""
    params = _splitParams("serial", args, kwargs, ("path", "baudrate"), required=1)
    rate = params.get("baudrate") or str(DEFAULT_BAUDRATE)
    try:
        baudrate = int(rate)
    except ValueError:
        raise ValueError(f"serial: baud rate must be a number, not {rate!r}") from None
    return SerialEndpoint(cast(_Reactor, reactor), params["path"], baudrate)
