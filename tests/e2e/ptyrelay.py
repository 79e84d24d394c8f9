"""A two-pty "null-modem cable" for serial-channel end-to-end tests.

:class:`PtyRelay` creates two pty pairs.  The host daemon opens side A's slave
path (``relay.path_a``), the guest daemon side B's (``relay.path_b``); a
background thread copies bytes between the two masters::

    host daemon <-> slave A | master A <-- relay thread --> master B | slave B <-> guest daemon

Both slaves are put in raw mode and kept open by the relay for its whole life,
so a pty never hangs up when a daemon closes (or is killed) and reopens it:
like a virtio-serial port or a UART, the "cable" never signals EOF.

Directions are named by where bytes go: ``"AB"`` (host -> guest) and ``"BA"``
(guest -> host).  Controls (all thread-safe, take effect at once):

* :meth:`pause` / :meth:`resume`: hold bytes (nothing is read or written; the
  kernel pty buffers fill and the writer gets EAGAIN): a port whose other side
  is not connected.  Held bytes are delivered on resume (stale bytes).
* :meth:`cut`: read and discard everything, for ``seconds`` or until
  :meth:`uncut`: a line that loses all bytes.
* :meth:`inject`: queue garbage bytes in one direction, after what is already
  queued there.
* :meth:`set_faults`: drop or corrupt (flip bits of) about one byte in N.
* ``rate`` (bytes/s, per direction, token bucket): a paced line; 11520 B/s
  is a 115200-baud 8N1 line.
* :meth:`counters`, :meth:`backlog`: what moved, what is queued where.
* ``tap(direction, data)``: an optional callback that sees every byte queued
  for delivery in order (after faults, injections included; bytes a later
  :meth:`cut` discards were seen too), e.g. to follow the frames on the line.

No socat, no external processes.  Use it as a context manager or call
:meth:`close`.
"""

from __future__ import annotations

import fcntl
import os
import random
import selectors
import struct
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field

DIRECTIONS = ("AB", "BA")

#: 115200 baud, 8N1: ten bit times per byte.
BAUD_115200_BYTES = 11520


@dataclass
class _Direction:
    name: str
    src: int  # master fd we read from
    dst: int  # master fd we write to
    buf: bytearray = field(default_factory=bytearray)
    tokens: float = 0.0
    last_refill: float = 0.0
    corrupt_one_in: int = 0
    drop_one_in: int = 0
    corrupt_countdown: int = 0
    drop_countdown: int = 0
    # counters
    read: int = 0
    written: int = 0
    injected: int = 0
    dropped: int = 0
    corrupted: int = 0
    cut: int = 0
    generation: int = 0  # bumped by cut(): a write in flight must not trim the buffer


class PtyRelay:
    """Two raw pty pairs joined by a relay thread (see the module docstring).

    ``rate``: bytes per second per direction (``None``: as fast as possible).
    ``max_buffer``: bytes the relay holds per direction before it stops
    reading (back-pressure into the pty); kept small when paced so that the
    relay adds little queue of its own.
    """

    def __init__(
        self,
        rate: float | None = None,
        max_buffer: int | None = None,
        seed: int | None = None,
        name: str = "ptyrelay",
        tap: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.rate = rate
        self.tap = tap
        if max_buffer is None:
            max_buffer = 256 if rate else 256 * 1024
        self.max_buffer = max_buffer
        self._burst = max(1.0, (rate or 0) / 200)  # 5 ms worth of line time
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._paused: set[str] = set()
        self._cut_until: float | None = None  # monotonic; inf = until uncut()
        self._closed = False
        self.errors: list[BaseException] = []

        self.master_a, self.slave_a = os.openpty()
        self.master_b, self.slave_b = os.openpty()
        for fd in (self.slave_a, self.slave_b):
            tty.setraw(fd)  # before any daemon opens it: no echo, no translation
        for fd in (self.master_a, self.master_b):
            os.set_blocking(fd, False)
        self.path_a = os.ttyname(self.slave_a)
        self.path_b = os.ttyname(self.slave_b)

        now = time.monotonic()
        self._dirs = {
            "AB": _Direction("AB", self.master_a, self.master_b, last_refill=now),
            "BA": _Direction("BA", self.master_b, self.master_a, last_refill=now),
        }
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ controls

    def pause(self, direction: str | None = None) -> None:
        """Hold bytes in ``direction`` (default: both) until :meth:`resume`."""
        with self._lock:
            self._paused.update(self._names(direction))
        self._wake()

    def resume(self, direction: str | None = None) -> None:
        with self._lock:
            self._paused.difference_update(self._names(direction))
        self._wake()

    def cut(self, seconds: float | None = None) -> None:
        """Discard every byte in both directions for ``seconds`` (or until
        :meth:`uncut`).  Bytes already queued in the relay are discarded too."""
        with self._lock:
            self._cut_until = float("inf") if seconds is None else time.monotonic() + seconds
            for d in self._dirs.values():
                d.cut += len(d.buf)
                d.buf.clear()
                d.generation += 1
        self._wake()

    def uncut(self) -> None:
        with self._lock:
            self._cut_until = None
        self._wake()

    def inject(self, data: bytes, direction: str) -> None:
        """Queue ``data`` in ``direction`` ("AB": towards the guest, "BA":
        towards the host) after the bytes already queued there."""
        with self._lock:
            d = self._dirs[direction]
            self._enqueue(d, data)
            d.injected += len(data)
        self._wake()

    def set_faults(
        self,
        direction: str | None = None,
        *,
        corrupt_one_in: int = 0,
        drop_one_in: int = 0,
    ) -> None:
        """Flip bits of / drop about one byte in N read from the source (0: off).

        The gap to the next fault is uniform in 1 .. 2N-1 (mean N)."""
        with self._lock:
            for name in self._names(direction):
                d = self._dirs[name]
                d.corrupt_one_in = corrupt_one_in
                d.drop_one_in = drop_one_in
                d.corrupt_countdown = self._gap(corrupt_one_in)
                d.drop_countdown = self._gap(drop_one_in)

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self.rate = rate
            self._burst = max(1.0, (rate or 0) / 200)
        self._wake()

    # ------------------------------------------------------------------ inspection

    def counters(self) -> dict[str, dict[str, int]]:
        """Per direction: read, written, injected, dropped, corrupted, cut, queued."""
        with self._lock:
            return {
                name: {
                    "read": d.read,
                    "written": d.written,
                    "injected": d.injected,
                    "dropped": d.dropped,
                    "corrupted": d.corrupted,
                    "cut": d.cut,
                    "queued": len(d.buf),
                }
                for name, d in self._dirs.items()
            }

    def backlog(self, direction: str) -> dict[str, int]:
        """Bytes queued in ``direction``: written by the daemon but not yet read
        by the relay (kernel), held by the relay, and written by the relay but
        not yet read by the other daemon (kernel)."""
        d = self._dirs[direction]
        dst_slave = self.slave_b if direction == "AB" else self.slave_a
        with self._lock:
            held = len(d.buf)
        return {
            "kernel_in": _inq(d.src),
            "relay": held,
            "kernel_out": _inq(dst_slave),
        }

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the relay holds nothing (both directions)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(d.buf for d in self._dirs.values()):
                    return True
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the thread and close every fd (masters last: a daemon still
        holding a slave then sees a hang-up, never a half-open cable)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self.slave_a, self.slave_b):
            _close(fd)
        for fd in (self.master_a, self.master_b):
            _close(fd)

    def __enter__(self) -> PtyRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _names(direction: str | None) -> tuple[str, ...]:
        if direction is None:
            return DIRECTIONS
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        return (direction,)

    def _gap(self, one_in: int) -> int:
        return self._rng.randint(1, 2 * one_in - 1) if one_in > 0 else 0

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _cutting(self, now: float) -> bool:
        if self._cut_until is None:
            return False
        if now >= self._cut_until:
            self._cut_until = None
            return False
        return True

    def _apply_faults(self, d: _Direction, data: bytes) -> bytes:
        """Drop and corrupt bytes of ``data`` per ``d``'s settings (lock held)."""
        if not (d.corrupt_one_in or d.drop_one_in):
            return data
        out = bytearray(data)
        if d.corrupt_one_in:
            pos = d.corrupt_countdown - 1
            while pos < len(out):
                out[pos] ^= self._rng.randint(1, 255)
                d.corrupted += 1
                gap = self._gap(d.corrupt_one_in)
                pos += gap
            d.corrupt_countdown = pos - len(out) + 1
        if d.drop_one_in:
            keep = bytearray()
            pos = d.drop_countdown - 1
            start = 0
            while pos < len(out):
                keep += out[start:pos]
                d.dropped += 1
                start = pos + 1
                pos += self._gap(d.drop_one_in)
            keep += out[start:]
            d.drop_countdown = pos - len(out) + 1
            out = keep
        return bytes(out)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        registered: dict[int, int] = {}
        try:
            while not self._closed:
                now = time.monotonic()
                timeout = 0.1
                want: dict[int, int] = {}
                with self._lock:
                    cutting = self._cutting(now)
                    if self._cut_until not in (None, float("inf")):
                        timeout = min(timeout, max(0.0, self._cut_until - now))
                    for d in self._dirs.values():
                        if d.name in self._paused:
                            continue
                        if cutting or len(d.buf) < self.max_buffer:
                            want[d.src] = want.get(d.src, 0) | selectors.EVENT_READ
                        if d.buf and not cutting:
                            if self.rate:
                                self._refill(d, now)
                                if d.tokens < 1:
                                    timeout = min(timeout, (1 - d.tokens) / self.rate)
                                    continue
                            want[d.dst] = want.get(d.dst, 0) | selectors.EVENT_WRITE
                for fd, events in want.items():
                    if fd not in registered:
                        sel.register(fd, events)
                    elif registered[fd] != events:
                        sel.modify(fd, events)
                for fd in list(registered):
                    if fd not in want:
                        sel.unregister(fd)
                registered = want
                ready = sel.select(timeout)
                for key, events in ready:
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    if events & selectors.EVENT_READ:
                        self._do_read(key.fd)
                    if events & selectors.EVENT_WRITE:
                        self._do_write(key.fd)
        except BaseException as e:  # surfaced through self.errors
            self.errors.append(e)
        finally:
            sel.close()

    def _enqueue(self, d: _Direction, data: bytes) -> None:
        """Queue bytes for delivery (lock held); the tap sees them in order."""
        d.buf += data
        if self.tap is not None and data:
            try:
                self.tap(d.name, data)
            except Exception as e:  # a broken tap must not stop the cable
                self.errors.append(e)

    def _refill(self, d: _Direction, now: float) -> None:
        assert self.rate
        d.tokens = min(self._burst, d.tokens + (now - d.last_refill) * self.rate)
        d.last_refill = now

    def _do_read(self, fd: int) -> None:
        d = self._dirs["AB"] if fd == self.master_a else self._dirs["BA"]
        with self._lock:
            room = 65536 if self._cut_until is not None else self.max_buffer - len(d.buf)
        try:
            # never take more than the relay may hold: the rest stays queued in
            # the kernel, so the writer feels the back-pressure of a slow line
            data = os.read(fd, max(1, min(65536, room)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO: no slave open (cannot happen while we hold the slaves).
            return
        if not data:
            return
        with self._lock:
            d.read += len(data)
            if self._cutting(time.monotonic()):
                d.cut += len(data)
                return
            self._enqueue(d, self._apply_faults(d, data))

    def _do_write(self, fd: int) -> None:
        now = time.monotonic()
        for d in self._dirs.values():
            if d.dst != fd:
                continue
            with self._lock:
                if not d.buf or d.name in self._paused or self._cutting(now):
                    continue
                n = len(d.buf)
                if self.rate:
                    self._refill(d, now)
                    n = min(n, int(d.tokens))
                    if n < 1:
                        continue
                chunk = bytes(d.buf[: min(n, 65536)])
                generation = d.generation
            try:
                written = os.write(fd, chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue
            with self._lock:
                # inject() only appends and cut() clears: drop what we wrote
                # unless a cut cleared the buffer meanwhile.
                if d.generation == generation:
                    del d.buf[:written]
                d.written += written
                if self.rate:
                    d.tokens -= written


def _inq(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return -1


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
