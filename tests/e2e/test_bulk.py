"""End-to-end BULK frames (docs/protocol.rst, "Bulk data").

On TCP and UNIX channels a stream whose local reads fill up sends BULK frames
whose raw bytes are spliced past Python at both ends.  These tests move large
amounts of data through two real daemons, check every byte (sha256), and read
the channels' bulk byte counters (Prometheus metrics, and ``virtproxy ctl
status --json`` over each daemon's control socket) to prove the bytes really
went in BULK frames, or, where they must not, that they did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from vp_e2e import (
    FAST_KEEPALIVE,
    LOOPBACK,
    Backend,
    EchoServer,
    daemon_cmd,
    daemon_env,
    free_port,
    wait_listening,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
CHANNELS = ["tcp", "unix"]
SIDES = ["host", "guest"]
#: Timeout of one blocking socket operation in these tests.
TIMEOUT = 20.0


# --------------------------------------------------------------------------- payloads

#: Every payload is a window onto this random block, repeated.  Its odd length
#: keeps a repeat from lining up with any chunk or frame size, so a chunk lost,
#: repeated or reordered anywhere changes the sha256.
_BLOCK = os.urandom(8 * MiB + 4099)
_BLOCK2 = _BLOCK * 2


class Payload:
    """``size`` bytes (None: endless) from an offset of the block chosen by ``seed``;
    generated as sent, never held whole."""

    def __init__(self, size: int | None, seed: int = 0):
        self.size = size
        self.seed = seed
        self.start = (seed * 1_000_003) % len(_BLOCK)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = self.prefix_sha256(self.size)
        return self._sha256

    def prefix_sha256(self, count: int) -> str:
        """sha256 of the first ``count`` bytes (all a cut transfer may deliver)."""
        h = hashlib.sha256()
        for piece in Payload(count, self.seed).chunks():
            h.update(piece)
        return h.hexdigest()

    def skip(self, count: int) -> Payload:
        """The same bytes after the first ``count``."""
        rest = Payload(None if self.size is None else self.size - count, self.seed)
        rest.start = (self.start + count) % len(_BLOCK)
        return rest

    def chunks(self, chunk: int = MiB):
        view = memoryview(_BLOCK2)
        off, left = self.start, self.size
        while left is None or left > 0:
            n = min(chunk, len(_BLOCK2) - off)
            if left is not None:
                n = min(n, left)
                left -= n
            yield view[off : off + n]
            off = (off + n) % len(_BLOCK)


# --------------------------------------------------------------------------- client helpers


def recv_hash(sock: socket.socket, progress=None, into=None) -> tuple[str, int, str]:
    """Read until the peer closes: ("eof"|"reset", bytes read, sha256), the hash
    continuing ``into`` if given.  A timeout propagates (and fails the test)."""
    h = hashlib.sha256() if into is None else into
    n = 0
    buf = bytearray(MiB)
    view = memoryview(buf)
    how = "eof"
    try:
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            h.update(view[:got])
            n += got
            if progress is not None:
                progress(got)
    except ConnectionResetError:
        how = "reset"
    return how, n, h.hexdigest()


def read_slowly(sock: socket.socket, seconds: float, h, progress=None) -> int:
    """Read 8 KiB every 10 ms for ``seconds`` (into hash ``h``); bytes read."""
    n = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        data = sock.recv(8192)
        if not data:
            break
        h.update(data)
        n += len(data)
        if progress is not None:
            progress(len(data))
        time.sleep(0.01)
    return n


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the TCP window is small from the start
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(TIMEOUT)
    s.connect((LOOPBACK, port))
    return s


class Worker:
    """Runs ``fn(*args)`` on a thread; ``join`` returns its result, re-raises
    what it raised, and fails the test if it hangs."""

    def __init__(self, fn, *args):
        self.result = None
        self.error: BaseException | None = None

        def run():
            try:
                self.result = fn(*args)
            except BaseException as e:  # reported by join
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 30.0):
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"worker still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def upload(port: int, payload: Payload, progress: list[int] | None = None) -> str:
    """Send ``payload``, half-close, and read the (empty) reply: how the stream ended."""
    s = connect(port)
    try:
        for piece in payload.chunks():
            s.sendall(piece)
            if progress is not None:
                progress[0] += len(piece)
        s.shutdown(socket.SHUT_WR)
        how, n, _ = recv_hash(s)
        assert n == 0
        return how
    finally:
        s.close()


def download(port: int) -> tuple[str, int, str]:
    s = connect(port)
    try:
        return recv_hash(s)
    finally:
        s.close()


def send_until_error(port: int, payload: Payload) -> BaseException | None:
    """Send an endless payload until the connection fails; the error."""
    s = connect(port)
    try:
        for piece in payload.chunks():
            s.sendall(piece)
    except OSError as e:
        return e
    finally:
        s.close()
    return None


def read_at_least(sock: socket.socket, count: int) -> None:
    got = 0
    while got < count:
        data = sock.recv(MiB)
        assert data, f"the stream ended after {got} bytes"
        got += len(data)


# --------------------------------------------------------------------------- backends


class HashSink(Backend):
    """Reads until EOF or reset and records ("eof"|"reset", bytes, sha256) per
    connection; ``received`` counts all bytes as they come.  With ``slow``
    seconds it first reads 8 KiB every 10 ms (a slow destination)."""

    def __init__(self, path: str | None = None, slow: float = 0.0):
        self.slow = slow
        self.results: list[tuple[str, int, str]] = []
        self.received = 0
        self.cond = threading.Condition()
        #: Cleared: the sink stops reading (until set again).
        self.reading = threading.Event()
        self.reading.set()
        super().__init__(path)
        if slow:  # accepted sockets inherit a small receive buffer: a small TCP window
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def _count(self, n: int) -> None:
        with self.cond:
            self.received += n
            self.cond.notify_all()

    def serve(self, conn):
        h = hashlib.sha256()
        n = read_slowly(conn, self.slow, h, self._count) if self.slow else 0

        def progress(count):
            self._count(count)
            self.reading.wait(TIMEOUT)

        how, rest, digest = recv_hash(conn, progress=progress, into=h)
        with self.cond:
            self.results.append((how, n + rest, digest))
            self.cond.notify_all()

    def wait_received(self, count: int, timeout: float = TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= count, timeout):
                pytest.fail(f"sink received {self.received} bytes, wanted {count}")

    def wait_results(self, count: int, timeout: float = TIMEOUT) -> list[tuple[str, int, str]]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.results) >= count, timeout):
                pytest.fail(f"sink got {len(self.results)} finished connections, wanted {count}")
            return list(self.results)


class PayloadSource(Backend):
    """On accept, sends ``payload`` (for the n-th connection ``payload(n)`` if
    callable), shuts its write side down and waits for the client's close.

    An endless payload goes until :meth:`stop`.  ``sent`` records (bytes, sha256)
    of what each connection sent, ``progress`` counts all bytes sent."""

    def __init__(self, payload, path: str | None = None, sndbuf: int | None = None):
        self.payload = payload
        self.sndbuf = sndbuf
        self.sent: list[tuple[int, str]] = []
        self.progress = 0
        self._halt = threading.Event()
        self._n = 0
        super().__init__(path)

    def stop(self) -> None:
        self._halt.set()

    def serve(self, conn):
        with self._lock:
            index = self._n
            self._n += 1
        payload = self.payload(index) if callable(self.payload) else self.payload
        if self.sndbuf is not None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        h = hashlib.sha256()
        n = 0
        for piece in payload.chunks():
            if self._halt.is_set():
                break
            conn.sendall(piece)
            h.update(piece)
            n += len(piece)
            self.progress += len(piece)
        with self._lock:
            self.sent.append((n, h.hexdigest()))
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(TIMEOUT)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


class ReadThenAbort(Backend):
    """Reads ``count`` bytes, then aborts the connection (RST)."""

    def __init__(self, count: int):
        self.count = count
        super().__init__(None)

    def serve(self, conn):
        left = self.count
        while left > 0:
            data = conn.recv(min(left, MiB))
            if not data:
                break
            left -= len(data)
        abort(conn)


def send_until_blocked(sock: socket.socket, payload: Payload, seconds: float = 0.5) -> int:
    """Send an endless payload until the socket takes nothing for ``seconds``
    (every buffer on the way is full); bytes sent."""
    sock.settimeout(seconds)
    sent = 0
    try:
        for piece in payload.chunks():
            while piece:
                n = sock.send(piece)
                sent += n
                piece = piece[n:]
    except TimeoutError:
        return sent
    finally:
        sock.settimeout(TIMEOUT)
    raise AssertionError("an endless payload ended")


class StalledAbortSource(Backend):
    """Sends an endless payload until the way to the client is full, then,
    once told to (:attr:`go`), aborts (RST) with bytes still queued on both
    sides of its connection; ``sent`` is how many bytes it had sent."""

    def __init__(self, payload: Payload):
        self.payload = payload
        self.sent = 0
        self.blocked = threading.Event()
        self.go = threading.Event()
        self.aborted = threading.Event()
        super().__init__(None)

    def serve(self, conn):
        self.sent = send_until_blocked(conn, self.payload)
        self.blocked.set()
        self.go.wait(TIMEOUT)
        abort(conn)
        self.aborted.set()


class DigestReplyServer(Backend):
    """Reads the request to EOF (with ``slow``: 8 KiB every 10 ms at first),
    then replies with its length (8 bytes), its sha256 (32 bytes) and
    ``reply``; then shuts down and waits for the client's clean close."""

    def __init__(self, reply: Payload, slow: float = 0.0):
        self.reply = reply
        self.slow = slow
        self.closed_cleanly = 0
        super().__init__(None)
        if slow:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def serve(self, conn):
        h = hashlib.sha256()
        n = read_slowly(conn, self.slow, h) if self.slow else 0
        how, rest, digest = recv_hash(conn, into=h)
        if how != "eof":
            return
        conn.sendall(struct.pack(">Q", n + rest) + bytes.fromhex(digest))
        for piece in self.reply.chunks():
            conn.sendall(piece)
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) == b"":
            with self._lock:
                self.closed_cleanly += 1


# --------------------------------------------------------------------------- counters


def ctl_status(control) -> dict:
    """The one channel's row of ``virtproxy ctl --control PATH status --json``."""
    proc = subprocess.run(
        daemon_cmd("ctl", "--control", str(control), "status", "--json"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=15,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    (row,) = json.loads(proc.stdout)
    return row


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=TIMEOUT) as r:
        return r.read().decode()


def metric(text: str, name: str) -> int:
    """The default channel's sample of ``name`` in a metrics page."""
    for line in text.splitlines():
        if line.startswith(f'{name}{{channel="default"}} '):
            return int(float(line.split()[-1]))
    pytest.fail(f"no {name} in the metrics:\n{text}")


class Counters:
    """The bulk byte counters of both daemons of a pair: from their Prometheus
    metrics (quick to read while transfers run) or their control sockets."""

    METRICS = {
        "bulk_bytes_out": "virtproxy_bulk_sent_bytes_total",
        "bulk_bytes_in": "virtproxy_bulk_received_bytes_total",
    }
    #: Counters that stay 0 on a socket channel whatever the streams do.
    TROUBLE = (
        "virtproxy_protocol_errors_total",
        "virtproxy_crc_errors_total",
        "virtproxy_resyncs_total",
        "virtproxy_lost_frames_total",
        "virtproxy_discarded_bytes_total",
        "virtproxy_keepalive_timeouts_total",
    )

    def __init__(self, controls: dict, metrics_ports: dict):
        self.controls = controls
        self.metrics_ports = metrics_ports

    def read(self, via: str = "metrics") -> dict[str, dict[str, int]]:
        out = {}
        for side in SIDES:
            if via == "ctl":
                row = ctl_status(self.controls[side])
                assert row["state"] == "up", row
                out[side] = {k: row[k] for k in self.METRICS}
            else:
                text = metrics_text(self.metrics_ports[side])
                assert metric(text, "virtproxy_session_up") == 1, text
                out[side] = {k: metric(text, name) for k, name in self.METRICS.items()}
        return out

    @staticmethod
    def delta(before, after) -> dict[str, dict[str, int]]:
        return {side: {k: after[side][k] - before[side][k] for k in after[side]} for side in after}

    def assert_clean(self) -> None:
        """One session all along, and no frame damaged, lost or out of place on
        either side: the raw bytes of every BULK frame were taken exactly."""
        for side in SIDES:
            text = metrics_text(self.metrics_ports[side])
            found = {
                name: metric(text, name) for name in (*self.TROUBLE, "virtproxy_sessions_total")
            }
            want = dict.fromkeys(self.TROUBLE, 0) | {"virtproxy_sessions_total": 1}
            assert found == want, f"{side}: {found}"


def bulk_pair(pair, short_dir, channel, **kw):
    """``pair(...)`` with a control socket and a metrics endpoint on each side:
    (Pair, Counters)."""
    controls = {"host": short_dir / "hctl.sock", "guest": short_dir / "gctl.sock"}
    mports = {side: free_port() for side in SIDES}
    extra = {
        side: ["--control", str(controls[side]), "--metrics", f"{LOOPBACK}:{mports[side]}"]
        for side in SIDES
    }
    host_args = [*kw.pop("host_args", ()), *extra["host"]]
    guest_args = [*kw.pop("guest_args", ()), *extra["guest"]]
    p = pair(channel=channel, host_args=host_args, guest_args=guest_args, **kw)
    for d in (p.host, p.guest):
        d.wait_for("listening for control socket")
        d.wait_for("listening for metrics")
    return p, Counters(controls, mports)


def forwards(client_side: str, *services: tuple[str, int, str]) -> dict[str, list[str]]:
    """pair() arguments for services (name, port, backend address) whose
    clients connect on ``client_side`` and whose backends are on the other."""
    far = other(client_side)
    out: dict[str, list[str]] = {f"{client_side}_o": [], f"{far}_i": []}
    for name, port, addr in services:
        out[f"{client_side}_o"].append(f"{name}:{LOOPBACK}:{port}")
        out[f"{far}_i"].append(f"{name}:{addr}")
    return out


def other(side: str) -> str:
    return "guest" if side == "host" else "host"


def assert_bulk(d, sender: str, count: int, fraction: float = 0.8, settled: bool = True) -> None:
    """At least ``fraction`` of ``count`` bytes went in BULK frames from ``sender``
    (and, once the transfers are over, arrived as such at the other side)."""
    assert d[sender]["bulk_bytes_out"] >= fraction * count, (
        f"only {d[sender]['bulk_bytes_out']} of {count} bytes went in BULK frames from "
        f"the {sender}: {d}"
    )
    if settled:
        assert d[other(sender)]["bulk_bytes_in"] == d[sender]["bulk_bytes_out"], d


# --------------------------------------------------------------------------- large transfers


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("client_side", SIDES)
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_large_transfer_is_byte_exact_and_goes_in_bulk_frames(
    pair, backends, short_dir, channel, client_side, direction
):
    """160 MiB one way, opened from either side: every byte arrives, in BULK
    frames, and a clean end follows."""
    payload = Payload(160 * MiB + 12345, seed=3)
    port = free_port()
    if direction == "upload":
        backend = backends(HashSink)
        sender = client_side
    else:
        backend = backends(PayloadSource, payload)
        sender = other(client_side)
    _, counters = bulk_pair(
        pair, short_dir, channel, **forwards(client_side, ("big", port, backend.addr))
    )
    before = counters.read()
    t0 = time.monotonic()
    if direction == "upload":
        assert upload(port, payload) == "eof"
        (result,) = backend.wait_results(1)
    else:
        result = download(port)
    took = time.monotonic() - t0
    assert result[:2] == ("eof", payload.size), result
    assert result[2] == payload.sha256, f"{direction}: the bytes differ"
    print(f"{channel} {direction} by a {client_side} client: {payload.size / MiB / took:.0f} MiB/s")
    d = Counters.delta(before, counters.read())
    assert_bulk(d, sender, payload.size)
    assert d[other(sender)]["bulk_bytes_out"] == 0, d
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
def test_bulk_between_unix_socket_forwards(pair, backends, short_dir, channel):
    """Local UNIX sockets splice like TCP ones: an upload and a download at
    once between a UNIX oforward and UNIX backends, byte-exact, in BULK frames.

    A stream goes BULK once a local read comes back full (256 KiB), and a UNIX
    stream socket holds no more than its writer's send buffer: with Linux's
    default of 208 KiB that is down to luck, so the writers here use 1 MiB."""
    size = 96 * MiB + 17
    sink = backends(HashSink, path=str(short_dir / "sink.sock"))
    src = backends(
        PayloadSource, Payload(size, seed=5), path=str(short_dir / "src.sock"), sndbuf=MiB
    )
    up_front, down_front = short_dir / "up.sock", short_dir / "down.sock"
    _, counters = bulk_pair(
        pair,
        short_dir,
        channel,
        host_o=[f"up:{up_front}:-", f"down:{down_front}:-"],
        guest_i=[f"up:{sink.addr}", f"down:{src.addr}"],
    )
    before = counters.read()
    up_payload = Payload(size + 1, seed=6)

    def unix_upload():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MiB)
            s.settimeout(TIMEOUT)
            s.connect(str(up_front))
            for piece in up_payload.chunks():
                s.sendall(piece)
            s.shutdown(socket.SHUT_WR)
            return recv_hash(s)

    up = Worker(unix_upload)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(down_front))
        result = recv_hash(s)
    assert result == ("eof", size, src.payload.sha256)
    assert up.join(TIMEOUT)[:2] == ("eof", 0)
    assert sink.wait_results(1) == [("eof", up_payload.size, up_payload.sha256)]
    d = Counters.delta(before, counters.read())
    print(f"BULK bytes between UNIX sockets: {d}")
    assert_bulk(d, "host", up_payload.size)
    assert_bulk(d, "guest", size)
    counters.assert_clean()


# --------------------------------------------------------------------------- parallel streams


@pytest.mark.parametrize("channel", CHANNELS)
def test_parallel_bulk_streams_each_byte_exact(pair, backends, short_dir, channel):
    """16 streams at once, uploads and downloads opened from both sides: each
    arrives whole and exact, mostly in BULK frames taking turns; ``ctl status``
    shows the same counters as the metrics."""
    n, size = 16, 12 * MiB
    sinks = {side: backends(HashSink) for side in SIDES}
    sources = {
        side: backends(PayloadSource, lambda i: Payload(size + i, seed=100 + i)) for side in SIDES
    }
    ports = {(kind, side): free_port() for kind in ("up", "down") for side in SIDES}
    kw: dict[str, list[str]] = {}
    for side in SIDES:  # clients on ``side``, backends on the other
        far = other(side)
        services = [
            ("up", ports["up", side], sinks[far].addr),
            ("down", ports["down", side], sources[far].addr),
        ]
        for key, specs in forwards(side, *services).items():
            kw[key] = kw.get(key, []) + specs
    _, counters = bulk_pair(pair, short_dir, channel, **kw)
    before = counters.read()

    def client_side(i):
        return "host" if i % 4 < 2 else "guest"

    # stream i: an upload (even i) or a download (odd i), by a client on client_side(i)
    uploads = {i: Payload(size + 7 * i, seed=i) for i in range(0, n, 2)}
    t0 = time.monotonic()
    workers = {
        i: Worker(upload, ports["up", client_side(i)], uploads[i])
        if i % 2 == 0
        else Worker(download, ports["down", client_side(i)])
        for i in range(n)
    }
    results = {i: w.join(40) for i, w in workers.items()}
    took = time.monotonic() - t0

    moved = dict.fromkeys(SIDES, 0)  # stream bytes sent by each side's daemon
    sent = {side: dict(src.sent) for side, src in sources.items()}
    assert sum(map(len, sent.values())) == n // 2
    for i in range(1, n, 2):
        how, count, digest = results[i]
        server = other(client_side(i))
        assert how == "eof" and sent[server].get(count) == digest, (
            f"download {i} got {count} bytes ({how}) that its source did not send whole"
        )
        moved[server] += count
    for side, sink in sinks.items():
        got = sorted(sink.wait_results(n // 4))
        want = sorted(
            ("eof", uploads[i].size, uploads[i].sha256)
            for i in uploads
            if other(client_side(i)) == side
        )
        assert got == want, f"uploads to the {side}'s backend differ"
        moved[other(side)] += sum(c for _, c, _ in got)
    assert all(results[i] == "eof" for i in uploads)
    print(f"{n} streams, {sum(moved.values()) / MiB:.0f} MiB in {took:.2f}s")

    after = counters.read(via="ctl")
    d = Counters.delta(before, after)
    for side in SIDES:
        assert_bulk(d, side, moved[side], fraction=0.6)
    assert after == counters.read(via="metrics")
    counters.assert_clean()


# --------------------------------------------------------------------------- half-close


def read_reply_head(s: socket.socket) -> tuple[int, str]:
    head = b""
    while len(head) < 40:
        data = s.recv(40 - len(head))
        assert data, f"EOF after {len(head)} bytes of the reply"
        head += data
    return struct.unpack(">Q", head[:8])[0], head[8:].hex()


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("client_side", SIDES)
def test_half_closed_bulk_upload_gets_whole_reply_then_clean_eof(
    pair, backends, short_dir, channel, client_side
):
    """The client uploads a large body and shuts its write side; the backend
    reads to EOF (so the EOF must follow the last spliced byte) and only then
    replies, itself in bulk; the client gets the whole reply, then a clean EOF."""
    request, reply = Payload(96 * MiB + 1, seed=7), Payload(48 * MiB + 3, seed=8)
    server = backends(DigestReplyServer, reply)
    port = free_port()
    _, counters = bulk_pair(
        pair, short_dir, channel, **forwards(client_side, ("rpc", port, server.addr))
    )
    before = counters.read()
    s = connect(port)
    try:
        for piece in request.chunks():
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        size, sha = read_reply_head(s)
        result = recv_hash(s)  # up to EOF: a reset or a timeout fails
    finally:
        s.close()
    assert (size, sha) == (request.size, request.sha256), "the backend got other bytes"
    assert result == ("eof", reply.size, reply.sha256)
    server.wait_ended(1, TIMEOUT)
    assert server.closed_cleanly == 1, "the backend did not see the client's clean close"
    d = Counters.delta(before, counters.read())
    assert_bulk(d, client_side, request.size)
    assert_bulk(d, other(client_side), reply.size)
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
def test_half_close_with_slow_readers_at_both_ends(pair, backends, short_dir, channel):
    """As above, with a backend that reads the request slowly at first and a
    client that reads the reply slowly at first: each EOF arrives while bytes
    of BULK frames still wait in the copying path, and must not overtake them."""
    request, reply = Payload(64 * MiB + 11, seed=9), Payload(64 * MiB + 13, seed=10)
    server = backends(DigestReplyServer, reply, slow=1.5)
    port = free_port()
    _, counters = bulk_pair(
        pair, short_dir, channel, **forwards("host", ("rpc", port, server.addr))
    )
    before = counters.read()
    s = connect(port, rcvbuf=65536)
    try:
        for piece in request.chunks():
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        size, sha = read_reply_head(s)
        h = hashlib.sha256()
        slow_bytes = read_slowly(s, 1.5, h)
        how, count, digest = recv_hash(s, into=h)
    finally:
        s.close()
    assert (size, sha) == (request.size, request.sha256), "the backend got other bytes"
    assert (how, slow_bytes + count, digest) == ("eof", reply.size, reply.sha256)
    server.wait_ended(1, TIMEOUT)
    assert server.closed_cleanly == 1
    d = Counters.delta(before, counters.read())
    assert_bulk(d, "host", request.size, fraction=0.5)
    assert_bulk(d, "guest", reply.size, fraction=0.5)
    counters.assert_clean()


# --------------------------------------------------------------------------- slow destination


class RssSampler:
    """Samples both daemons' RSS every 50 ms until stopped; keeps the largest."""

    def __init__(self, p):
        self.daemons = {"host": p.host, "guest": p.guest}
        self.peak = {side: d.rss_kib() for side, d in self.daemons.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            for side, d in self.daemons.items():
                try:
                    self.peak[side] = max(self.peak[side], d.rss_kib())
                except (OSError, RuntimeError):
                    pass

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("slow", ["client", "backend"])
def test_slow_destination_gets_every_byte_and_memory_stays_bounded(
    pair, backends, short_dir, channel, slow
):
    """The destination of 128 MiB reads 8 KiB every 10 ms for 2 s, then as fast
    as it can.  Its socket is full at once, so spliced bytes fall back to the
    copying path and credit is withheld: the source is held back, neither
    daemon buffers much, and every byte arrives in order."""
    payload = Payload(128 * MiB, seed=11)
    port = free_port()
    # a download to a slow client, or an upload to a slow backend
    backend = backends(PayloadSource, payload) if slow == "client" else backends(HashSink, slow=2.0)
    p, counters = bulk_pair(
        pair, short_dir, channel, **forwards("host", ("slow", port, backend.addr))
    )
    before = counters.read()
    rss0 = {"host": p.host.rss_kib(), "guest": p.guest.rss_kib()}
    sampler = RssSampler(p)
    try:
        if slow == "client":
            s = connect(port, rcvbuf=65536)
            try:
                h = hashlib.sha256()
                n = read_slowly(s, 2.0, h)
                sent_while_slow = backend.progress
                how, rest, digest = recv_hash(s, into=h)
                result = (how, n + rest, digest)
            finally:
                s.close()
        else:
            progress = [0]
            sender = Worker(upload, port, payload, progress)
            time.sleep(2.0)
            sent_while_slow = progress[0]
            assert sender.join(30) == "eof"
            (result,) = backend.wait_results(1)
    finally:
        peak = sampler.stop()
    assert result == ("eof", payload.size, payload.sha256)
    growth = {side: peak[side] - rss0[side] for side in rss0}
    print(
        f"RSS KiB at start {rss0}, peak growth {growth}; "
        f"{sent_while_slow / MiB:.1f} MiB sent while the destination was slow"
    )
    assert max(growth.values()) < 32 * 1024, f"daemon RSS grew {growth} KiB"
    # Kernel buffers, a window and a pipe: far from the whole payload.
    assert sent_while_slow < 48 * MiB, f"{sent_while_slow} bytes went to a stalled destination"
    d = Counters.delta(before, counters.read())
    assert_bulk(d, "guest" if slow == "client" else "host", payload.size, fraction=0.5)
    counters.assert_clean()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("client_side", SIDES)
def test_client_reset_mid_bulk_upload_resets_the_backend(
    pair, backends, short_dir, channel, client_side
):
    """A client that aborts (RST) in the middle of a bulk upload: the backend's
    connection is reset too.  A clean EOF would pass a cut upload off as whole.

    The backend stops reading first, so that the abort finds bytes queued all
    the way: the daemon meets the reset behind data it has yet to read.  (A
    reset that arrives after the daemon read everything is met, now and then,
    as a clean end: a race below virtproxy's BULK code, with DATA frames too.)"""
    sink = backends(HashSink)
    port = free_port()
    _, counters = bulk_pair(
        pair, short_dir, channel, **forwards(client_side, ("up", port, sink.addr))
    )
    payload = Payload(None, seed=21)
    before = counters.read()
    s = connect(port)
    try:
        sent = 0
        for piece in payload.chunks():
            s.sendall(piece)
            sent += len(piece)
            if sink.received >= 16 * MiB:
                break
        sink.reading.clear()
        sent += send_until_blocked(s, Payload(None, seed=21).skip(sent))
        d = Counters.delta(before, counters.read())
        assert d[client_side]["bulk_bytes_out"] >= 8 * MiB, d
    finally:
        abort(s)
    sink.reading.set()
    ((how, n, digest),) = sink.wait_results(1)
    assert how == "reset", (
        f"the backend saw a clean EOF after {n} of the {sent} bytes sent: "
        "an aborted upload looks complete"
    )
    assert n < sent and digest == payload.prefix_sha256(n), "the backend got other bytes"
    # the channel serves on
    again = Payload(20 * MiB, seed=22)
    assert upload(port, again) == "eof"
    assert sink.wait_results(2)[1] == ("eof", again.size, again.sha256)
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("client_side", SIDES)
def test_backend_reset_mid_bulk_download_resets_the_client(
    pair, backends, short_dir, channel, client_side
):
    """A backend that aborts (RST) in the middle of a bulk download: the client
    sees a reset, never a clean EOF after a short body.

    The client stops reading after 8 MiB, the backend sends until everything
    on the way is full and aborts; then the client reads on."""
    payload = Payload(None, seed=23)
    src = backends(StalledAbortSource, payload)
    port = free_port()
    _, counters = bulk_pair(
        pair, short_dir, channel, **forwards(client_side, ("down", port, src.addr))
    )
    before = counters.read()
    s = connect(port, rcvbuf=256 * 1024)
    try:
        h = hashlib.sha256()
        first = 0
        while first < 8 * MiB:
            data = s.recv(MiB)
            assert data, f"EOF after {first} bytes"
            h.update(data)
            first += len(data)
        assert src.blocked.wait(TIMEOUT), "the backend's sends never blocked"
        src.go.set()
        assert src.aborted.wait(TIMEOUT)
        how, rest, digest = recv_hash(s, into=h)
    finally:
        s.close()
    n = first + rest
    assert how == "reset", (
        f"the client saw a clean EOF after {n} of the {src.sent} bytes the backend "
        "sent before it aborted: an aborted download looks complete"
    )
    assert n <= src.sent and digest == payload.prefix_sha256(n), "the client got other bytes"
    d = Counters.delta(before, counters.read())
    assert d[other(client_side)]["bulk_bytes_out"] >= 4 * MiB, d
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("client_side", SIDES)
def test_destination_gone_mid_bulk_frame_channel_carries_on(
    pair, backends, short_dir, channel, client_side
):
    """The receiving end of a bulk stream vanishes (RST) while BULK frames for
    it are on the way: a client mid-download, a backend mid-upload.  The raw
    bytes still coming for it are dropped exactly, so the framing holds: the
    same session goes on with no frame damaged or lost, later transfers are
    exact, and the other end of each stream sees it fail."""
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(None, seed=71))
    quitter = backends(ReadThenAbort, 8 * MiB)
    uport, dport, qport = free_port(), free_port(), free_port()
    services = [("up", uport, sink.addr), ("down", dport, src.addr), ("quit", qport, quitter.addr)]
    _, counters = bulk_pair(pair, short_dir, channel, **forwards(client_side, *services))
    before = counters.read()

    for _ in range(3):  # a client that aborts mid-download
        s = connect(dport)
        read_at_least(s, 8 * MiB)
        abort(s)
    for _ in range(3):  # a backend that aborts mid-upload
        s = connect(qport)
        error = None
        try:
            for piece in Payload(None, seed=73).chunks():
                s.sendall(piece)
        except OSError as e:
            error = e
        finally:
            s.close()
        assert isinstance(error, (ConnectionResetError, BrokenPipeError)), error
    d = Counters.delta(before, counters.read())
    assert d[other(client_side)]["bulk_bytes_out"] >= 12 * MiB, d
    assert d[client_side]["bulk_bytes_out"] >= 12 * MiB, d

    # The channel is as good as new: exact transfers both ways at once.
    up_payload = Payload(64 * MiB + 1, seed=74)
    src.payload = Payload(64 * MiB + 2, seed=75)
    up = Worker(upload, uport, up_payload)
    assert download(dport) == ("eof", src.payload.size, src.payload.sha256)
    assert up.join(TIMEOUT) == "eof"
    assert sink.wait_results(1) == [("eof", up_payload.size, up_payload.sha256)]
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
def test_many_aborted_bulk_streams_leak_no_session_credit(pair, backends, short_dir, channel):
    """Streams reset in the middle of BULK frames, again and again, under a
    small (4 MiB) session window: credit lost with any of them would soon
    stall the whole session."""
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(None, seed=81))
    uport, dport = free_port(), free_port()
    _, counters = bulk_pair(
        pair,
        short_dir,
        channel,
        args=["--session-window", str(4 * MiB)],
        **forwards("host", ("up", uport, sink.addr), ("down", dport, src.addr)),
    )
    before = counters.read()
    for i in range(12):
        start = sink.received
        s = connect(uport)
        try:
            for piece in Payload(None, seed=200 + i).chunks(256 * 1024):
                s.sendall(piece)
                if sink.received - start >= 3 * MiB:
                    break
        finally:
            abort(s)
        s = connect(dport)
        read_at_least(s, 3 * MiB)
        abort(s)
    results = sink.wait_results(12)
    assert [how for how, _, _ in results] == ["reset"] * 12
    d = Counters.delta(before, counters.read())
    assert d["host"]["bulk_bytes_out"] >= 12 * MiB and d["guest"]["bulk_bytes_out"] >= 12 * MiB, d
    # still the whole session window: long transfers each way go through
    up_payload = Payload(96 * MiB, seed=82)
    src.payload = Payload(96 * MiB + 1, seed=83)
    up = Worker(upload, uport, up_payload)
    assert download(dport) == ("eof", src.payload.size, src.payload.sha256)
    assert up.join(TIMEOUT) == "eof"
    assert sink.wait_results(13)[12] == ("eof", up_payload.size, up_payload.sha256)
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("victim,stop", [("guest", "kill"), ("host", "kill"), ("guest", "term")])
def test_daemon_stopped_mid_bulk_transfer_resets_the_clients_and_recovers(
    pair, backends, short_dir, channel, victim, stop
):
    """SIGKILL (or SIGTERM) one daemon while bulk transfers run both ways,
    likely in the middle of a BULK frame's raw bytes: the survivor's clients
    see their streams fail, the downloading one with a reset, never a clean
    EOF.  Restarted, the daemon gets a new session (the survivor's decoder
    must not still wait for raw bytes) whose transfers are exact."""
    client_side = other(victim)
    src = backends(PayloadSource, Payload(None, seed=31))
    sink = backends(HashSink)
    dport, uport = free_port(), free_port()
    fw = forwards(client_side, ("down", dport, src.addr), ("up", uport, sink.addr))
    p, counters = bulk_pair(pair, short_dir, channel, args=FAST_KEEPALIVE, **fw)
    survivor, stopped = (p.host, p.guest) if victim == "guest" else (p.guest, p.host)
    before = counters.read()
    uploader = Worker(send_until_error, uport, Payload(None, seed=32))
    d = connect(dport)
    try:
        read_at_least(d, 32 * MiB)
        sink.wait_received(32 * MiB)
        delta = Counters.delta(before, counters.read())
        assert_bulk(delta, victim, 8 * MiB, fraction=1, settled=False)
        assert_bulk(delta, client_side, 8 * MiB, fraction=1, settled=False)
        mark = survivor.mark()
        if stop == "kill":
            stopped.kill()
        else:
            stopped.proc.terminate()
        t_stop = time.monotonic()
        how, n, _ = recv_hash(d)
        took = time.monotonic() - t_stop
    finally:
        d.close()
    assert how == "reset", (
        f"the downloading client saw a clean EOF {took:.2f}s after the {victim} got "
        f"SIG{stop.upper()} ({n} more bytes): a cut transfer looks complete"
    )
    assert took < 8.0
    error = uploader.join(10)
    assert isinstance(error, (ConnectionResetError, BrokenPipeError)), (
        f"the uploading client's stream did not fail: {error!r}"
    )
    survivor.wait_for("session ended", 10, since=mark)
    assert survivor.alive()
    if stop == "term":
        assert stopped.proc.wait(10) == 0

    stopped.restart()
    survivor.wait_for("session up", 15, since=mark)
    stopped.wait_for("session up", 15)
    stopped.wait_for("listening for metrics")
    if client_side == "guest":
        wait_listening(p.guest, fw["guest_o"])
    src.payload = Payload(32 * MiB + 5, seed=33)
    up_payload = Payload(32 * MiB + 6, seed=34)
    before = counters.read()
    up = Worker(upload, uport, up_payload)
    assert download(dport) == ("eof", src.payload.size, src.payload.sha256)
    assert up.join(TIMEOUT) == "eof"
    assert sink.wait_results(2)[1] == ("eof", up_payload.size, up_payload.sha256)
    d = Counters.delta(before, counters.read())
    assert_bulk(d, "host", 32 * MiB, fraction=0.5)
    assert_bulk(d, "guest", 32 * MiB, fraction=0.5)


# --------------------------------------------------------------------------- interactive + bulk


class Pinger:
    """Echoes a 100-byte message every 20 ms on one connection; records round trips."""

    def __init__(self, port: int):
        self.rtts: list[float] = []
        self.sock = connect(port)
        self._stop = threading.Event()
        self._worker = Worker(self._run)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            msg = f"{i:08d}".encode() * 12 + b"ping"
            t0 = time.monotonic()
            self.sock.sendall(msg)
            got = b""
            while len(got) < len(msg):
                data = self.sock.recv(len(msg) - len(got))
                assert data, "the echo stream ended"
                got += data
            self.rtts.append(time.monotonic() - t0)
            assert got == msg, f"echo {i} came back wrong"
            i += 1
            time.sleep(0.02)

    def stop(self) -> list[float]:
        self._stop.set()
        try:
            self._worker.join(TIMEOUT)
        finally:
            self.sock.close()
        return self.rtts


@pytest.mark.parametrize("channel", CHANNELS)
def test_interactive_stream_flows_while_bulk_runs_and_pauses_bulk_frames(
    pair, backends, short_dir, channel
):
    """An echo stream keeps answering, promptly and exactly, while a bulk upload
    and a bulk download share the channel.  Meanwhile the bulk streams go on
    in DATA frames (no BULK frame while an interactive stream is about); once
    the echo stream is quiet, BULK frames resume.  Every bulk byte arrives."""
    echo = backends(EchoServer)
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(None, seed=41))
    eport, uport, dport = free_port(), free_port(), free_port()
    services = [("echo", eport, echo.addr), ("up", uport, sink.addr), ("down", dport, src.addr)]
    _, counters = bulk_pair(pair, short_dir, channel, **forwards("host", *services))

    up_stop = threading.Event()
    up_sent = hashlib.sha256()

    def uploader():
        s = connect(uport)
        n = 0
        try:
            for piece in Payload(None, seed=42).chunks(256 * 1024):
                if up_stop.is_set():
                    break
                s.sendall(piece)
                up_sent.update(piece)
                n += len(piece)
            s.shutdown(socket.SHUT_WR)
            assert recv_hash(s)[:2] == ("eof", 0)
        finally:
            s.close()
        return n

    down_got = [0]

    def downloader():
        s = connect(dport)
        try:
            return recv_hash(s, progress=lambda k: down_got.__setitem__(0, down_got[0] + k))
        finally:
            s.close()

    up = Worker(uploader)
    down = Worker(downloader)
    sink.wait_received(16 * MiB)
    deadline = time.monotonic() + TIMEOUT
    while down_got[0] < 16 * MiB:
        assert time.monotonic() < deadline, "the download does not start"
        time.sleep(0.01)
    # Bulk alone: BULK frames both ways.
    c0 = counters.read()
    time.sleep(0.3)
    alone = Counters.delta(c0, counters.read())

    # An interactive stream joins.
    pinger = Pinger(eport)
    time.sleep(0.5)  # both sides have seen its small reads by now
    c1 = counters.read()
    moved1 = (sink.received, down_got[0])
    time.sleep(1.5)
    c2 = counters.read()
    moved2 = (sink.received, down_got[0])
    rtts = pinger.stop()
    shared = Counters.delta(c1, c2)

    # Alone again: once the interactive stream's hold (1 s) is over, BULK frames resume.
    time.sleep(1.2)
    c3 = counters.read()
    time.sleep(0.3)
    after = Counters.delta(c3, counters.read())

    up_stop.set()
    src.stop()
    sent_up = up.join(TIMEOUT)
    result = down.join(TIMEOUT)

    # every bulk byte arrived exactly
    assert sink.wait_results(1) == [("eof", sent_up, up_sent.hexdigest())]
    ((src_n, src_digest),) = src.sent
    assert result == ("eof", src_n, src_digest)

    rtts_ms = sorted(1000 * r for r in rtts)
    med, worst = statistics.median(rtts_ms), rtts_ms[-1]
    print(f"{len(rtts)} echoes under bulk load: median {med:.1f} ms, max {worst:.1f} ms")
    print(
        f"bulk bytes moved while shared: {moved2[0] - moved1[0]} up, {moved2[1] - moved1[1]} down"
    )
    print(f"BULK bytes: alone {alone}, shared {shared}, after {after}")
    # the interactive stream was served all along, without a long stall
    assert len(rtts) >= 20, f"only {len(rtts)} echoes in about 2 s"
    assert med < 250 and worst < 2000, f"echo round trips: median {med:.0f} ms, max {worst:.0f} ms"
    for side in SIDES:
        assert alone[side]["bulk_bytes_out"] > MiB, alone
        assert after[side]["bulk_bytes_out"] > MiB, after
    # the bulk streams kept moving meanwhile, in DATA frames
    assert moved2[0] - moved1[0] > 4 * MiB and moved2[1] - moved1[1] > 4 * MiB
    bulk_while_shared = max(shared[side]["bulk_bytes_out"] for side in SIDES)
    if worst < 500:
        # the echo stream was never quiet for the 1 s that ends "interactive"
        assert bulk_while_shared == 0, f"BULK frames next to an interactive stream: {shared}"
    else:  # a stall of this test process itself may let a frame or two through
        assert bulk_while_shared <= 2 * MiB, shared
    counters.assert_clean()


def both_ways(uport: int, dport: int, sink: HashSink, src: PayloadSource, up: Payload) -> None:
    """Upload ``up`` to ``sink`` while downloading ``src``'s payload: both
    byte-exact, each ending cleanly."""
    worker = Worker(upload, uport, up)
    assert download(dport) == ("eof", src.payload.size, src.payload.sha256)
    assert worker.join(TIMEOUT) == "eof"
    assert sink.wait_results(1) == [("eof", up.size, up.sha256)]


# --------------------------------------------------------------------------- where BULK is off


@pytest.mark.parametrize("channel", CHANNELS)
def test_link_reliability_on_means_no_bulk_frames(pair, backends, short_dir, channel):
    """With ``--link on`` (as on a serial line) a side does not offer BULK, so
    no BULK frame is sent either way, not even by the ``auto`` guest that
    follows it: the same transfers go in DATA frames, byte-exact."""
    size = 24 * MiB + 99
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(size, seed=51))
    uport, dport = free_port(), free_port()
    p, counters = bulk_pair(
        pair,
        short_dir,
        channel,
        host_args=["--link", "on"],
        **forwards("host", ("up", uport, sink.addr), ("down", dport, src.addr)),
    )
    p.guest.wait_for("link reliability on")
    before = counters.read()
    both_ways(uport, dport, sink, src, Payload(size + 1, seed=52))
    after = counters.read(via="ctl")
    assert after == counters.read(via="metrics")
    zero = {"bulk_bytes_out": 0, "bulk_bytes_in": 0}
    assert Counters.delta(before, after) == {"host": zero, "guest": zero}
    assert after == {"host": zero, "guest": zero}


class StalledSink(Backend):
    """Takes connections, with a small receive buffer, and reads nothing until
    :attr:`go` is set; then reads each to its end and records how much came."""

    def __init__(self):
        self.go = threading.Event()
        self.counts: list[int] = []
        super().__init__()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def serve(self, conn):
        self.go.wait(TIMEOUT)
        n = 0
        while data := conn.recv(MiB):
            n += len(data)
        with self._lock:
            self.counts.append(n)


@pytest.mark.parametrize("channel", CHANNELS)
def test_bulk_streams_stalled_on_the_session_window_leave_keystrokes_flowing(
    pair, backends, channel
):
    """12 uploads whose destination reads nothing hold up to 12 windows of
    256 KiB, three times the 1 MiB session window.  A keystroke on another stream of the
    same channel still gets its echo at once: the last sixteenth of the session
    credit is kept for streams with little queued.  Then every byte arrives."""
    sink = backends(StalledSink)
    echo = backends(EchoServer)
    uport, kport = free_port(), free_port()
    pair(
        host_o=[f"up:{LOOPBACK}:{uport}", f"keys:{LOOPBACK}:{kport}"],
        guest_i=[f"up:{sink.addr}", f"keys:{echo.addr}"],
        channel=channel,
        args=["--window", str(256 * 1024), "--session-window", str(MiB)],
    )
    keys = socket.create_connection((LOOPBACK, kport), timeout=TIMEOUT)
    keys.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keys.sendall(b"a")
    assert keys.recv(1) == b"a"
    # Larger than what the kernel's buffers on the way to the sink take (its
    # socket's send buffer starts at megabytes on loopback).
    payloads = [Payload(8 * MiB + i, seed=70 + i) for i in range(12)]
    workers = [Worker(upload, uport, payload) for payload in payloads]
    time.sleep(1.5)  # the uploads fill every window they get
    assert sink.accepted == 12 and not sink.counts
    took = []
    for key in (b"b", b"c", b"d"):
        t0 = time.monotonic()
        keys.sendall(key)
        keys.settimeout(5.0)
        assert keys.recv(1) == key, "the keystroke never came back"
        took.append(time.monotonic() - t0)
    assert max(took) < 1.0, f"keystroke round trips {took} s behind stalled uploads"
    sink.go.set()
    assert [w.join(TIMEOUT) for w in workers] == ["eof"] * 12
    keys.close()
    deadline = time.monotonic() + TIMEOUT
    while len(sink.counts) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(sink.counts) == sorted(p.size for p in payloads)


#: A directory whose sitecustomize leaves a daemon unable to make any pipe.
NO_PIPE = Path(__file__).parent / "nopipe"


@pytest.mark.parametrize("channel", CHANNELS)
def test_without_a_pipe_bulk_streams_go_in_data_frames(
    pair, backends, short_dir, channel, monkeypatch
):
    """A daemon out of file descriptors gets no pipe for BULK frames: both
    sides offered them, yet every byte goes the copying way, exact, and each
    daemon says so once (never a traceback, never a stalled stream)."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(NO_PIPE), os.environ.get("PYTHONPATH")]))
    )
    size = 24 * MiB + 7
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(size, seed=55))
    uport, dport = free_port(), free_port()
    p, counters = bulk_pair(
        pair,
        short_dir,
        channel,
        **forwards("host", ("up", uport, sink.addr), ("down", dport, src.addr)),
    )
    both_ways(uport, dport, sink, src, Payload(size + 1, seed=56))
    zero = {"bulk_bytes_out": 0, "bulk_bytes_in": 0}
    assert counters.read(via="ctl") == {"host": zero, "guest": zero}
    for d in (p.host, p.guest):
        assert d.all_logs().count("no pipe for BULK frames (Too many open files)") == 1, d.name
    counters.assert_clean()


@pytest.mark.parametrize("channel", CHANNELS)
def test_small_window_bulk_turns_that_find_too_little_credit(pair, backends, short_dir, channel):
    """A 256 KiB window allows BULK frames of at most 128 KiB, barely above the
    64 KiB minimum: many turns find too little credit and send their lead as
    DATA instead.  Mixed DATA and BULK frames still make exact streams."""
    size = 48 * MiB + 5
    sink = backends(HashSink)
    src = backends(PayloadSource, Payload(size, seed=61))
    uport, dport = free_port(), free_port()
    _, counters = bulk_pair(
        pair,
        short_dir,
        channel,
        args=["--window", str(256 * 1024)],
        **forwards("host", ("up", uport, sink.addr), ("down", dport, src.addr)),
    )
    before = counters.read()
    both_ways(uport, dport, sink, src, Payload(size, seed=62))
    d = Counters.delta(before, counters.read())
    print(f"BULK bytes with a 256 KiB window: {d}")
    assert_bulk(d, "host", size, fraction=0.5)
    assert_bulk(d, "guest", size, fraction=0.5)
    counters.assert_clean()
