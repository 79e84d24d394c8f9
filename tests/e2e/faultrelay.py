"""A channel relay that damages bytes on purpose, for fault-injection tests.

:class:`Faults` is the damage: given the bytes of one direction in whatever
chunks they arrive, it corrupts single bytes, drops runs, duplicates runs and
truncates chunks (drops a chunk's tail: a frame cut short) at set per-byte
rates, from a seeded RNG, and counts what it did.  Two relays apply it:

* :class:`TcpFaultRelay` sits between a ``tcp-connect`` daemon and a
  ``tcp-listen`` daemon: it accepts the connecting side, connects upstream,
  and copies both ways through a :class:`Faults` per direction.  A *cut*
  closes both connections (the connecting daemon reconnects).
* :class:`SerialFaultRelay` is a :class:`~ptyrelay.PtyRelay` (two ptys, for
  ``serial:``/``virtserial:`` channels) whose byte damage is a
  :class:`Faults` per direction; a cut loses every byte for a moment (a
  serial line never closes).

Cuts come at random times (exponential gaps, mean ``cut_every`` seconds)
while enabled.  :meth:`counts` reports everything (bytes in and out,
corrupted bytes, dropped/duplicated runs and bytes, truncations, cuts,
connections).

Note: on socket channels virtproxy checks only the header of DATA frames
(docs/protocol.rst, "Header-only checks"), so corrupting bytes *in place* on
a TCP relay would reach clients by design; corruption belongs on the serial
relay, or on TCP with a link layer that checks whole frames.
"""

from __future__ import annotations

import random
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ptyrelay import PtyRelay, _Direction

KINDS = ("corrupt", "drop", "duplicate", "truncate")


@dataclass
class FaultRates:
    """Per-byte probabilities of each fault starting at a byte (0: never)."""

    corrupt: float = 0.0
    drop: float = 0.0
    duplicate: float = 0.0
    truncate: float = 0.0
    #: Longest run a drop or duplicate affects.
    max_run: int = 48


@dataclass
class FaultCounts:
    bytes_in: int = 0
    bytes_out: int = 0
    corrupted: int = 0
    dropped_runs: int = 0
    dropped_bytes: int = 0
    duplicated_runs: int = 0
    duplicated_bytes: int = 0
    truncations: int = 0
    truncated_bytes: int = 0

    @property
    def faults(self) -> int:
        return self.corrupted + self.dropped_runs + self.duplicated_runs + self.truncations


@dataclass
class Faults:
    """Damage for one direction of a byte stream (not thread-safe: one caller)."""

    rng: random.Random
    rates: FaultRates = field(default_factory=FaultRates)
    counts: FaultCounts = field(default_factory=FaultCounts)
    _offset: int = 0
    _next: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_rates(self.rates)

    def set_rates(self, rates: FaultRates) -> None:
        self.rates = rates
        self._next = {kind: self._gap(kind) for kind in KINDS}

    def _gap(self, kind: str, base: int | None = None) -> float:
        """Absolute input offset of the next fault of ``kind`` (inf: off)."""
        rate = getattr(self.rates, kind)
        start = self._offset if base is None else base
        return start + 1 + int(self.rng.expovariate(rate)) if rate > 0 else float("inf")

    def apply(self, data: bytes) -> bytes:
        """The bytes to pass on in place of ``data``."""
        counts = self.counts
        counts.bytes_in += len(data)
        base, size = self._offset, len(data)
        self._offset += size
        nxt = self._next
        if min(nxt.values()) >= base + size:
            counts.bytes_out += size
            return data
        out = bytearray()
        pos = 0
        rng = self.rng
        while pos < size:
            kind = min(KINDS, key=nxt.__getitem__)
            at = nxt[kind] - base
            if at >= size:
                break
            at = max(pos, int(at))  # a fault due inside a dropped run happens after it
            out += data[pos:at]
            pos = at
            if kind == "corrupt":
                out.append(data[pos] ^ rng.randrange(1, 256))
                pos += 1
                counts.corrupted += 1
            elif kind == "drop":
                run = min(rng.randint(1, self.rates.max_run), size - pos)
                pos += run
                counts.dropped_runs += 1
                counts.dropped_bytes += run
            elif kind == "duplicate":
                run = data[pos : pos + rng.randint(1, self.rates.max_run)]
                out += run
                out += run
                pos += len(run)
                counts.duplicated_runs += 1
                counts.duplicated_bytes += len(run)
            else:
                counts.truncations += 1
                counts.truncated_bytes += size - pos
                pos = size
            nxt[kind] = self._gap(kind, base + pos)
        out += data[pos:]
        counts.bytes_out += len(out)
        return bytes(out)


class _Cutter:
    """Calls ``cut()`` at random times while enabled (exponential gaps)."""

    def __init__(
        self, rng: random.Random, cut_every: float | None, cut: Callable[[], None]
    ) -> None:
        self._rng = rng
        self._cut = cut
        self._every = cut_every
        self._event = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cutter", daemon=True)
        self._thread.start()

    def set(self, cut_every: float | None) -> None:
        self._every = cut_every
        self._event.set()

    def stop(self) -> None:
        self._stop = True
        self._event.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop:
            every = self._every
            if every is None:
                self._event.wait()
                self._event.clear()
                continue
            if self._event.wait(self._rng.expovariate(1.0 / every)):
                self._event.clear()
                continue  # settings changed: draw again
            if not self._stop and self._every is not None:
                self._cut()


class TcpFaultRelay:
    """``tcp-connect`` daemon -> :attr:`port` -> this relay -> ``upstream`` port."""

    def __init__(
        self,
        upstream: int,
        rates: FaultRates | None = None,
        *,
        seed: int = 0,
        cut_every: float | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.upstream = (host, upstream)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults = {
            "down": Faults(random.Random(self._rng.random()), rates or FaultRates()),  # to guest
            "up": Faults(random.Random(self._rng.random()), rates or FaultRates()),  # to host
        }
        self.connections = 0
        self.errors: list[BaseException] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(8)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tcpfaultrelay", daemon=True)
        self._thread.start()
        self.cuts = 0
        self._cutter = _Cutter(random.Random(self._rng.random()), cut_every, self.cut)

    # ------------------------------------------------------------ controls

    def set_faults(self, rates: FaultRates | None = None, cut_every: float | None = None) -> None:
        """New rates for both directions (None: no faults), and new cut timing."""
        with self._lock:
            for faults in self.faults.values():
                faults.set_rates(rates or FaultRates())
        self._cutter.set(cut_every)

    def cut(self) -> None:
        """Close every relayed connection at once, both ways (counted if there was one)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += bool(pairs)
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                except OSError:
                    pass
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> dict[str, object]:
        with self._lock:
            return {
                "connections": self.connections,
                "cuts": self.cuts,
                **{name: vars(f.counts).copy() for name, f in self.faults.items()},
            }

    def close(self) -> None:
        self._closed = True
        self._cutter.stop()
        self.cut()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> TcpFaultRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the copy loop

    #: Bytes held per direction before the relay stops reading the source:
    #: back-pressure reaches the writer as it would through a real link.
    MAX_BUFFER = 256 * 1024

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        # socket -> its peer, the direction of bytes read from it, and the
        # bytes waiting to be written *to* it.
        links: dict[socket.socket, _Side] = {}
        try:
            while not self._closed:
                for sock, side in list(links.items()):
                    want = 0
                    if len(links[side.peer].pending) < self.MAX_BUFFER:
                        want |= selectors.EVENT_READ
                    if side.pending:
                        want |= selectors.EVENT_WRITE
                    if want != side.registered:
                        if side.registered and want:
                            sel.modify(sock, want)
                        elif want:
                            sel.register(sock, want)
                        else:
                            sel.unregister(sock)
                        side.registered = want
                for key, events in sel.select(0.1):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept(links)
                        continue
                    assert isinstance(sock, socket.socket)
                    if sock in links and events & selectors.EVENT_WRITE:
                        self._write(sel, links, sock)
                    if sock in links and events & selectors.EVENT_READ:
                        self._read(sel, links, sock)
        except BaseException as e:  # surfaced through self.errors
            self.errors.append(e)
        finally:
            for s in list(links):
                s.close()
            sel.close()

    def _accept(self, links: dict[socket.socket, _Side]) -> None:
        try:
            down, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            down.close()
            return
        for s in (down, up):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.connections += 1
            self._pairs.append((down, up))
        links[down] = _Side(up, "up")
        links[up] = _Side(down, "down")

    def _read(self, sel: selectors.BaseSelector, links: dict, sock: socket.socket) -> None:
        side = links[sock]
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF, error or cut: end the whole pair
            self._end(sel, links, sock)
            return
        with self._lock:
            data = self.faults[side.direction].apply(data)
        links[side.peer].pending += data

    def _write(self, sel: selectors.BaseSelector, links: dict, sock: socket.socket) -> None:
        side = links[sock]
        try:
            sent = sock.send(side.pending[:65536])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(sel, links, sock)
            return
        del side.pending[:sent]

    def _end(self, sel: selectors.BaseSelector, links: dict, sock: socket.socket) -> None:
        peer = links[sock].peer
        for s in (sock, peer):
            side = links.pop(s, None)
            if side is not None:
                if side.registered:
                    sel.unregister(s)
                s.close()
        with self._lock:
            self._pairs = [p for p in self._pairs if sock not in p]


@dataclass(eq=False)
class _Side:
    """One socket of a relayed pair (see TcpFaultRelay._run)."""

    peer: socket.socket
    direction: str
    pending: bytearray = field(default_factory=bytearray)
    registered: int = 0


class SerialFaultRelay(PtyRelay):
    """A pty null-modem cable (see :mod:`ptyrelay`) whose damage is :class:`Faults`."""

    def __init__(
        self,
        rates: FaultRates | None = None,
        *,
        seed: int = 0,
        cut_every: float | None = None,
        cut_seconds: float = 0.5,
    ) -> None:
        rng = random.Random(seed)
        self.faults = {
            "AB": Faults(random.Random(rng.random()), rates or FaultRates()),
            "BA": Faults(random.Random(rng.random()), rates or FaultRates()),
        }
        self.cut_seconds = cut_seconds
        self.cuts = 0
        super().__init__(seed=seed, name="serialfaultrelay")
        self._cutter = _Cutter(random.Random(rng.random()), cut_every, self.cut_line)

    def cut_line(self) -> None:
        """Lose every byte both ways for ``cut_seconds`` (a serial line never closes)."""
        with self._lock:
            self.cuts += 1
        self.cut(self.cut_seconds)

    def _apply_faults(self, d: _Direction, data: bytes) -> bytes:
        return self.faults[d.name].apply(data)  # called with the relay's lock held

    def set_faults(  # type: ignore[override]
        self, rates: FaultRates | None = None, cut_every: float | None = None
    ) -> None:
        with self._lock:
            for faults in self.faults.values():
                faults.set_rates(rates or FaultRates())
        self._cutter.set(cut_every)

    def counts(self) -> dict[str, object]:
        with self._lock:
            return {
                "cuts": self.cuts,
                **{name: vars(f.counts).copy() for name, f in self.faults.items()},
            }

    def close(self) -> None:
        self._cutter.stop()
        super().close()
