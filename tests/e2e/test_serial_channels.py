"""End-to-end: virtproxy over serial-like channels (``serial:`` and ``virtserial:``).

The host daemon opens one pty slave, the guest daemon another, and a
:class:`~ptyrelay.PtyRelay` thread copies bytes between the two masters (a
null-modem cable we can pause, cut, pace, and inject garbage into).  A serial
line never signals EOF or hang-up, so everything here relies on the protocol's
handshake, keepalive and resynchronisation.

Run with ``-s`` to see the figures (goodput, RTTs, reset latencies) printed.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptyrelay import BAUD_115200_BYTES, PtyRelay
from vp_e2e import (
    FAST_KEEPALIVE,
    LOOPBACK,
    SOCK_TIMEOUT,
    Backend,
    EchoServer,
    HTTPBackend,
    Pair,
    SinkServer,
    connect,
    describe_error,
    echo_roundtrip,
    free_port,
    recv_all,
    send_then_half_close,
    wait_closed,
    wait_listening,
)

from virtproxy.frames import FrameDecoder, FrameType, encode_frame

pytestmark = pytest.mark.e2e

KIND_PAIRS = [("serial", "virtserial"), ("virtserial", "serial")]
KIND_IDS = ["host_serial-guest_virtserial", "host_virtserial-guest_serial"]
KEEPALIVE_TIMEOUT = 2.0  # matches FAST_KEEPALIVE


def channel_spec(kind: str, path: str) -> str:
    return f"serial:{path}:115200" if kind == "serial" else f"virtserial:{path}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def relays(daemons):
    """Factory for :class:`PtyRelay`; teardown stops the daemons first, then
    closes the cable (so no daemon sees its pty hang up mid-test)."""
    made: list[PtyRelay] = []

    def make(**kw) -> PtyRelay:
        r = PtyRelay(**kw)
        made.append(r)
        return r

    try:
        yield make
    finally:
        daemons.cleanup()
        for r in made:
            r.close()
    errors = [e for r in made for e in r.errors]
    if errors:
        pytest.fail(f"pty relay thread failed: {errors!r}")


def start_host(daemons, relay, kind, *, o=(), i=(), args=(), name="host"):
    argv = ["--channel", channel_spec(kind, relay.path_a), *args]
    for f in o:
        argv += ["-o", f]
    for f in i:
        argv += ["-i", f]
    d = daemons(name, *argv)
    wait_listening(d, o)
    return d


def start_guest(daemons, relay, kind, *, o=(), i=(), args=(), name="guest"):
    argv = ["--channel", channel_spec(kind, relay.path_b), *args]
    for f in o:
        argv += ["-o", f]
    for f in i:
        argv += ["-i", f]
    d = daemons(name, *argv)
    wait_listening(d, o)
    return d


def start_pair(
    daemons, relay, host_kind, guest_kind, *, host_o=(), host_i=(), guest_o=(), guest_i=(), args=()
) -> Pair:
    host = start_host(daemons, relay, host_kind, o=host_o, i=host_i, args=args)
    guest = start_guest(daemons, relay, guest_kind, o=guest_o, i=guest_i, args=args)
    p = Pair(host, guest, f"{host_kind}/{guest_kind}")
    p.wait_session()
    return p


def start_echo_pair(relays, daemons, backends, host_kind="serial", guest_kind="virtserial"):
    """A pair whose host forwards service ``e`` to an echo server behind the guest.

    Returns (relay, pair, the host port clients connect to)."""
    relay = relays()
    echo = backends(EchoServer)
    port = free_port()
    p = start_pair(
        daemons,
        relay,
        host_kind,
        guest_kind,
        host_o=[f"e:{LOOPBACK}:{port}"],
        guest_i=[f"e:{echo.addr}"],
    )
    return relay, p, port


# --------------------------------------------------------------------------- helpers


class FiniteSource(Backend):
    """Writes ``payload`` in paced chunks, then closes: a long finite download."""

    def __init__(self, payload: bytes, chunk: int = 8192, pause: float = 0.004):
        self.payload = payload
        self.chunk = chunk
        self.pause = pause
        super().__init__(None)

    def serve(self, conn):
        view = memoryview(self.payload)
        for off in range(0, len(view), self.chunk):
            if self._stop.is_set():
                return
            conn.sendall(view[off : off + self.chunk])
            time.sleep(self.pause)
        conn.shutdown(socket.SHUT_WR)


@dataclass
class Outcome:
    data: bytes
    how: str  # "eof", "reset", "timeout" or "error: ..."
    send_error: str | None = None


def echo_stream(port: int, payload: bytes, timeout: float = SOCK_TIMEOUT) -> Outcome:
    """Send ``payload`` (then half-close) while reading the echo; never raises
    for a reset: the outcome says how the stream ended."""
    s = connect(port, timeout=timeout)
    t, send_err = send_then_half_close(s, payload)
    buf = bytearray()
    how = "eof"
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
    except ConnectionResetError:
        how = "reset"
    except TimeoutError:
        how = "timeout"
    except OSError as e:
        how = f"error: {type(e).__name__}: {e}"
    finally:
        t.join(timeout)
        s.close()
    return Outcome(bytes(buf), how, describe_error(send_err[0]) if send_err else None)


def run_parallel(fn, args_list):
    """Run ``fn(*args)`` for every args tuple in threads; return the results in order."""
    results: list = [None] * len(args_list)

    def worker(i, args):
        try:
            results[i] = fn(*args)
        except BaseException as e:  # reported by the caller
            results[i] = e

    threads = [
        threading.Thread(target=worker, args=(i, a), daemon=True) for i, a in enumerate(args_list)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOCK_TIMEOUT + 20)
    assert not any(t.is_alive() for t in threads), "a stream worker hung"
    return results


def http_get(port: int, timeout: float = SOCK_TIMEOUT) -> bytes:
    """GET / through the proxy; return the body after checking it is complete."""
    s = connect(port, timeout=timeout)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: vp\r\nConnection: close\r\n\r\n")
        raw = recv_all(s)
    finally:
        s.close()
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no HTTP header in {len(raw)} bytes"
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert len(body) == length, f"body {len(body)} bytes, Content-Length {length}"
    return body


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_at_least(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(65536)
        assert d, f"stream ended after {len(buf)} bytes, before {n}"
        buf += d
    return bytes(buf)


class LineWatch:
    """Follows the frames queued in each direction of a relay (its ``tap``)
    to know the ``seq`` the receiver expects next."""

    def __init__(self):
        self.decoders = {"AB": FrameDecoder(), "BA": FrameDecoder()}
        self.expected = {"AB": 0, "BA": 0}
        self.lock = threading.Lock()

    def __call__(self, direction: str, data: bytes) -> None:
        with self.lock:
            for item in self.decoders[direction].feed(data):
                if not hasattr(item, "payload"):
                    continue  # damage: not ours to judge here
                if item.type == FrameType.HELLO:
                    self.expected[direction] = 0
                else:
                    self.expected[direction] = (item.seq + 1) & 0xFF

    def next_seq(self, direction: str) -> int:
        with self.lock:
            return self.expected[direction]


def half_frame(seq: int, rng: random.Random, length: int = 300) -> bytes:
    """The first half of a DATA frame with an intact header: what a peer that
    died mid-frame leaves on the line."""
    frame = encode_frame(FrameType.DATA, 0x80000000 | 777, rng.randbytes(length), seq=seq)
    return frame[: len(frame) // 2]


def garbage(rng: random.Random, n: int) -> bytes:
    """Random bytes with a few false sync markers sprinkled in."""
    g = bytearray(rng.randbytes(n))
    for _ in range(max(1, n // 200)):
        pos = rng.randrange(0, max(1, n - 2))
        g[pos : pos + 2] = b"\xa5\x5c"
    return bytes(g)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS, ids=KIND_IDS)
def test_concurrent_echo_both_directions_and_http(relays, daemons, backends, host_kind, guest_kind):
    relay = relays()
    echo_g = backends(EchoServer)  # behind the guest
    echo_h = backends(EchoServer)  # behind the host
    body = os.urandom(200_000)
    http = backends(HTTPBackend, body)
    hport, gport, wport = free_port(), free_port(), free_port()
    start_pair(
        daemons,
        relay,
        host_kind,
        guest_kind,
        host_o=[f"echo:{LOOPBACK}:{hport}", f"web:{LOOPBACK}:{wport}"],
        guest_i=[f"echo:{echo_g.addr}", f"web:{http.addr}"],
        guest_o=[f"echo:{LOOPBACK}:{gport}"],
        host_i=[f"echo:{echo_h.addr}"],
    )
    size = 256 * 1024
    jobs = [(hport, os.urandom(size)) for _ in range(8)] + [
        (gport, os.urandom(size)) for _ in range(4)
    ]
    t0 = time.monotonic()
    results = run_parallel(echo_stream, jobs)
    took = time.monotonic() - t0
    for n, ((port, payload), out) in enumerate(zip(jobs, results, strict=True)):
        side = "host" if port == hport else "guest"
        assert isinstance(out, Outcome), f"stream {n} ({side}): {out!r}"
        assert out.how == "eof" and out.send_error is None, (n, side, out.how, out.send_error)
        assert out.data == payload, f"stream {n} ({side}) echo differs ({len(out.data)} bytes)"
    total = sum(len(p) for _, p in jobs)
    print(f"\n[{host_kind}->{guest_kind}] 12 echo streams, {total} B each way in {took:.2f}s")

    t0 = time.monotonic()
    assert hashlib.sha256(http_get(wport)).digest() == hashlib.sha256(body).digest()
    print(f"[{host_kind}->{guest_kind}] HTTP GET {len(body)} B in {time.monotonic() - t0:.2f}s")
    c = relay.counters()
    assert c["AB"]["injected"] == c["BA"]["injected"] == 0
    assert "session ended" not in daemons.daemons[0].log()


class GatedReplyServer(Backend):
    """Writes ``payload`` once ``gate`` is set, and closes once ``close_gate`` is
    (never reads)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.gate = threading.Event()
        self.close_gate = threading.Event()
        self.connected = threading.Event()
        super().__init__(None)

    def serve(self, conn):
        self.connected.set()
        if not self.gate.wait(SOCK_TIMEOUT):
            return
        conn.sendall(self.payload)
        self.close_gate.wait(SOCK_TIMEOUT)
        conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS[:1], ids=KIND_IDS[:1])
def test_reply_then_close_larger_than_window(relays, daemons, backends, host_kind, guest_kind):
    """HTTP-ish: the server writes a reply bigger than one window and closes.

    The client reads nothing at first through a tiny receive buffer, so the host
    withholds credit and the guest's stream runs out of it; the server's EOF
    arrives then (what a slow reader on the host side does).  Once the client
    reads, every byte and a clean EOF must follow, and the channel must not wedge.
    """
    relay = relays()
    payload = os.urandom(256 * 1024 + 50_000)
    srv = backends(GatedReplyServer, payload)
    wport, eport = free_port(), free_port()
    echo = backends(EchoServer)
    start_pair(
        daemons,
        relay,
        host_kind,
        guest_kind,
        host_o=[f"web:{LOOPBACK}:{wport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"web:{srv.addr}", f"echo:{echo.addr}"],
    )
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect((LOOPBACK, wport))
    try:
        assert srv.connected.wait(SOCK_TIMEOUT), "the guest never connected to the server"
        srv.gate.set()
        time.sleep(3.0)  # the reply crosses until the host withholds credit
        srv.close_gate.set()  # the server's EOF reaches the guest's stream, out of credit
        time.sleep(0.5)
        s.settimeout(10)
        got = b""
        try:
            got = recv_all(s)
        except TimeoutError:
            print(f"\n[{host_kind}->{guest_kind}] reply stuck at {len(got)} of {len(payload)}")
            out = echo_stream(eport, b"ping", timeout=2)
            print(f"[{host_kind}->{guest_kind}] a new stream meanwhile: {out.how}, {out.data!r}")
            raise
    finally:
        s.close()
    assert got == payload


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS, ids=KIND_IDS)
def test_stale_bytes_and_garbage_between_transfers(
    relays, daemons, backends, host_kind, guest_kind
):
    rng = random.Random(1234)
    relay = relays()
    echo = backends(EchoServer)
    port = free_port()
    # stale junk on the line before anyone is there, both ways: garbage and
    # truncated frames (a peer that died mid-frame)
    relay.inject(garbage(rng, 3000) + half_frame(0, rng), "AB")
    relay.inject(garbage(rng, 3000) + half_frame(0, rng), "BA")
    host = start_host(daemons, relay, host_kind, o=[f"e:{LOOPBACK}:{port}"])
    time.sleep(0.3)  # the host reads its junk and sends HELLOs into the void
    relay.inject(garbage(rng, 1000) + half_frame(5, rng), "AB")
    t0 = time.monotonic()
    guest = start_guest(daemons, relay, guest_kind, i=[f"e:{echo.addr}"])
    Pair(host, guest, "").wait_session()
    print(
        f"\n[{host_kind}->{guest_kind}] session up {time.monotonic() - t0:.2f}s after the "
        "guest started on a line full of junk"
    )

    data = os.urandom(250_000)
    assert echo_roundtrip(port, data) == data

    for round_ in range(3):
        # garbage between frames on an idle line, both ways: discarded, no side effect
        relay.inject(garbage(rng, 2000), "AB")
        relay.inject(garbage(rng, 2000), "BA")
        relay.wait_idle()
        time.sleep(0.05)
        data = os.urandom(100_000 + round_)
        assert echo_roundtrip(port, data) == data, f"round {round_}"

    c = relay.counters()
    print(f"[{host_kind}->{guest_kind}] injected AB={c['AB']['injected']} BA={c['BA']['injected']}")
    for d in (host, guest):
        assert d.alive()
        assert d.count("session up") == 1, f"{d.name} restarted its session:\n{d.log()}"
        assert "session ended" not in d.log(), d.log()
        assert "reset" not in d.log().lower(), d.log()


def test_truncated_frame_on_idle_line_does_not_hold_back_next_open(relays, daemons, backends):
    rng = random.Random(7)
    watch = LineWatch()
    relay = relays(tap=watch)
    echo = backends(EchoServer)
    port = free_port()
    p = start_pair(
        daemons,
        relay,
        "serial",
        "virtserial",
        host_o=[f"e:{LOOPBACK}:{port}"],
        guest_i=[f"e:{echo.addr}"],
        args=["--connect-timeout", "3"],
    )
    assert echo_roundtrip(port, b"before") == b"before"
    relay.pause("AB")
    # a seq the guest does not expect: the damage, once seen, must not count as a lost frame
    nxt = watch.next_seq("AB")
    relay.inject(half_frame(nxt ^ 0x80, rng, length=2000), "AB")
    relay.resume("AB")
    gmark = p.guest.mark()
    out = echo_stream(port, b"after a half frame", timeout=8)
    print(
        f"\n[idle half frame] stream after it: {out.how}, {len(out.data)} bytes; guest log "
        f"since: {p.guest.lines(gmark)}"
    )
    assert out.how == "eof" and out.data == b"after a half frame", out


def test_session_comes_back_after_peer_died_mid_frame(relays, daemons, backends):
    """Slow line + guest crash: the guest's last write stops inside a DATA frame."""
    relay = relays()
    payload = os.urandom(16 * 1024 * 1024)
    src = backends(FiniteSource, payload)
    echo = backends(EchoServer)
    sport, eport = free_port(), free_port()
    # a virtserial host accepts 16 KiB frames from the guest
    p = start_pair(
        daemons,
        relay,
        "virtserial",
        "serial",
        host_o=[f"src:{LOOPBACK}:{sport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"src:{src.addr}", f"echo:{echo.addr}"],
        args=FAST_KEEPALIVE,
    )
    s = connect(sport)
    try:
        read_at_least(s, 128 * 1024)
        relay.pause("BA")  # the line stalls: the guest's writes stop part-way
        time.sleep(0.3)
        hmark = p.host.mark()
        p.guest.kill()
        backlog = relay.backlog("BA")
        # The kernel now holds the guest's last bytes, almost surely ending inside
        # a frame; a half 16 KiB frame behind them makes the cut-off certain.
        relay.inject(half_frame(0, random.Random(5), length=16000), "BA")
        relay.resume("BA")
        wait_closed(s, KEEPALIVE_TIMEOUT + 6)
    finally:
        s.close()
    t0 = time.monotonic()
    p.guest.restart()
    try:
        p.guest.wait_for("session up", 5)
    finally:
        print(
            f"\n[died mid-frame] backlog at kill {backlog}; host since kill: "
            f"{[ln.split('] ', 1)[-1] for ln in p.host.lines(hmark)]}"
        )
    print(f"session back {time.monotonic() - t0:.2f}s after the guest restarted")
    assert echo_roundtrip(eport, b"back") == b"back"


def test_garbage_during_transfer_never_delivers_wrong_bytes(relays, daemons, backends):
    rng = random.Random(99)
    relay = relays()
    echo = backends(EchoServer)
    port = free_port()
    p = start_pair(
        daemons,
        relay,
        "serial",
        "virtserial",
        host_o=[f"e:{LOOPBACK}:{port}"],
        guest_i=[f"e:{echo.addr}"],
        args=["--connect-timeout", "3"],
    )
    hmark, gmark = p.host.mark(), p.guest.mark()
    jobs = [(port, os.urandom(256 * 1024)) for _ in range(8)]
    stop = threading.Event()
    bursts = [0]

    def injector():
        # a few short bursts while the streams run, in random directions
        for _ in range(3):
            time.sleep(0.03)
            if stop.is_set():
                return
            relay.inject(garbage(rng, rng.randint(1, 64)), rng.choice(("AB", "BA")))
            bursts[0] += 1

    t = threading.Thread(target=injector, daemon=True)
    t.start()
    try:
        results = run_parallel(echo_stream, jobs)
    finally:
        stop.set()
        t.join(5)

    complete = reset = 0
    for n, ((_, payload), out) in enumerate(zip(jobs, results, strict=True)):
        assert isinstance(out, Outcome), f"stream {n}: {out!r}"
        # never a wrong byte: whatever arrived is a prefix of what was sent
        assert out.data == payload[: len(out.data)], f"stream {n}: WRONG BYTES delivered"
        if out.how == "eof":
            assert out.data == payload, (
                f"stream {n}: clean EOF after {len(out.data)} of {len(payload)} bytes "
                "(a cut stream looked complete)"
            )
            complete += 1
        else:
            assert out.how == "reset" or out.send_error, f"stream {n}: {out.how}"
            reset += 1
    ended = p.host.count("session ended", hmark) + p.guest.count("session ended", gmark)
    print(
        f"\n[garbage during transfer] {bursts[0]} bursts: {complete} streams complete, "
        f"{reset} reset; sessions ended: {ended}"
    )
    assert reset >= 1 or bursts[0] == 0 or complete == len(jobs)
    # the channel recovers: a new stream afterwards works
    deadline = time.monotonic() + 10
    data = os.urandom(200_000)
    while True:
        out = echo_stream(port, data)
        if out.how == "eof" and out.data == data:
            break
        assert out.data == data[: len(out.data)], "WRONG BYTES after recovery"
        assert time.monotonic() < deadline, f"channel did not recover: {out.how}"
        time.sleep(0.5)
    assert p.host.alive() and p.guest.alive()


@dataclass
class Transfer:
    """A 16 MiB download under way through a daemon pair, cut by the test."""

    pair: Pair
    client: socket.socket
    got: bytes
    payload: bytes
    echo_port: int


def start_transfer(
    relays, daemons, backends, host_kind, guest_kind, listen_on_host: bool
) -> Transfer:
    """Daemons over a relayed serial channel; a client on the listening side has
    read the first 256 KiB of a 16 MiB download from the other side."""
    relay = relays()
    payload = os.urandom(16 * 1024 * 1024)
    src = backends(FiniteSource, payload)
    echo = backends(EchoServer)
    sport, eport = free_port(), free_port()
    listeners = [f"src:{LOOPBACK}:{sport}", f"echo:{LOOPBACK}:{eport}"]
    targets = [f"src:{src.addr}", f"echo:{echo.addr}"]
    if listen_on_host:
        forwards = {"host_o": listeners, "guest_i": targets}
    else:
        forwards = {"guest_o": listeners, "host_i": targets}
    p = start_pair(daemons, relay, host_kind, guest_kind, args=FAST_KEEPALIVE, **forwards)
    s = connect(sport)
    return Transfer(p, s, read_at_least(s, 256 * 1024), payload, eport)


def cut_short(transfer: Transfer, rest: bytes, how: str) -> bytes:
    """What the client got: right bytes, not all of them, and a reset, never an EOF."""
    got = transfer.got + rest
    payload = transfer.payload
    assert got == payload[: len(got)], "wrong bytes before the cut"
    assert len(got) < len(payload), "transfer completed before the cut: test too short"
    assert how == "reset", f"the client saw a clean EOF with {len(got)} of {len(payload)} bytes"
    return got


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS, ids=KIND_IDS)
def test_guest_killed_mid_transfer_then_restarted(relays, daemons, backends, host_kind, guest_kind):
    transfer = start_transfer(relays, daemons, backends, host_kind, guest_kind, True)
    p, s, eport = transfer.pair, transfer.client, transfer.echo_port
    try:
        hmark = p.host.mark()
        p.guest.kill()
        t_kill = time.monotonic()
        how, rest, took = wait_closed(s, KEEPALIVE_TIMEOUT + 6)
    finally:
        s.close()
    got = cut_short(transfer, rest, how)
    print(
        f"\n[{host_kind}->{guest_kind}] guest killed: host client saw {how} after {took:.2f}s, "
        f"{len(got)} of {len(transfer.payload)} bytes"
    )
    assert took < KEEPALIVE_TIMEOUT + 3, f"reset only after {took:.2f}s"
    p.host.wait_for("session ended", 5, since=hmark)
    assert p.host.alive()

    # the host's listener stays up while the guest is gone
    waiting = connect(eport)
    try:
        waiting.sendall(b"accepted while the guest was down")
        waiting.shutdown(socket.SHUT_WR)
        p.guest.restart()
        p.guest.wait_for("session up", 10)
        p.host.wait_for("session up", 10, since=hmark)
        print(
            f"[{host_kind}->{guest_kind}] session back {time.monotonic() - t_kill:.2f}s after kill"
        )
        waiting.settimeout(10)
        assert recv_all(waiting) == b"accepted while the guest was down"
    finally:
        waiting.close()
    data = os.urandom(200_000)
    assert echo_roundtrip(eport, data) == data


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS, ids=KIND_IDS)
def test_host_restarted_resets_guest_streams_and_new_session(
    relays, daemons, backends, host_kind, guest_kind
):
    transfer = start_transfer(relays, daemons, backends, host_kind, guest_kind, False)
    p, s, eport = transfer.pair, transfer.client, transfer.echo_port
    try:
        gmark = p.guest.mark()
        p.host.kill()
        p.host.restart()  # at once: its new session id, not the keepalive, ends the old session
        how, rest, took = wait_closed(s, KEEPALIVE_TIMEOUT + 6)
    finally:
        s.close()
    cut_short(transfer, rest, how)
    line = p.guest.wait_line(r"session ended", since=gmark)
    p.guest.wait_for("session up", 10, since=gmark)
    p.host.wait_for("session up", 10)
    print(
        f"\n[{host_kind}->{guest_kind}] host restarted: guest client {how} after {took:.2f}s; "
        f"guest logged: {line.split('] ', 1)[-1]}"
    )
    data = os.urandom(200_000)
    assert echo_roundtrip(eport, data) == data


def test_guest_with_host_absent_stays_idle_then_connects(relays, daemons, backends):
    relay = relays()
    relay.pause()  # the port's other side is not connected: bytes are held
    echo = backends(EchoServer)
    port = free_port()
    guest = start_guest(daemons, relay, "virtserial", i=[f"e:{echo.addr}"])
    guest.wait_for("virtproxy started")
    time.sleep(0.5)
    figures = {}
    for mode, seconds in (("paused", 2.0), ("cut", 1.0)):
        if mode == "cut":
            relay.resume()
            relay.cut()
        c0, t0 = cpu_seconds(guest.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(guest.pid), time.monotonic()
        figures[mode] = (c1 - c0, t1 - t0)
    print(
        "\n[host absent] guest CPU: "
        + ", ".join(f"{m} {cpu:.3f}s in {wall:.2f}s" for m, (cpu, wall) in figures.items())
    )
    for mode, (cpu, wall) in figures.items():
        assert cpu < 0.3 * wall / 2.0, f"guest used {cpu:.3f}s CPU in {wall:.2f}s ({mode})"
    assert guest.alive() and "session up" not in guest.log()

    relay.uncut()
    relay.pause()
    relay.inject(b"\x00" * 100, "BA")  # stale bytes the host finds on arrival
    host = start_host(daemons, relay, "serial", o=[f"e:{LOOPBACK}:{port}"])
    relay.resume()
    Pair(host, guest, "").wait_session()
    data = os.urandom(100_000)
    assert echo_roundtrip(port, data) == data


@pytest.mark.parametrize("host_kind", ["serial", "virtserial"])
def test_connect_while_guest_absent_times_out(relays, daemons, host_kind):
    relay = relays()
    port = free_port()
    host = start_host(
        daemons, relay, host_kind, o=[f"late:{LOOPBACK}:{port}"], args=["--connect-timeout", "2"]
    )
    t0 = time.monotonic()
    s = connect(port)
    try:
        how, data, _ = wait_closed(s, 10.0)
    finally:
        s.close()
    took = time.monotonic() - t0
    print(f"\n[{host_kind} host, no guest] client closed ({how}) after {took:.2f}s")
    assert data == b"" and how in ("eof", "reset")
    assert 1.5 <= took <= 6.0, f"closed after {took:.2f}s with --connect-timeout 2"
    assert host.alive()


def test_paced_line_bulk_upload_and_interactive_rtt(relays, daemons, backends, record_property):
    relay = relays(rate=BAUD_115200_BYTES)
    sink = backends(SinkServer)
    echo = backends(EchoServer)
    bport, eport = free_port(), free_port()
    start_pair(
        daemons,
        relay,
        "serial",
        "serial",
        host_o=[f"bulk:{LOOPBACK}:{bport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"bulk:{sink.addr}", f"echo:{echo.addr}"],
    )
    e = connect(eport, timeout=12)

    def rtt() -> float:
        t = time.monotonic()
        e.sendall(b"k")
        assert e.recv(1) == b"k"
        return time.monotonic() - t

    try:
        idle = [rtt() for _ in range(10)]
        size = 100 * 1024
        payload = os.urandom(size)
        b = connect(bport, timeout=60)
        t0 = time.monotonic()
        sent = threading.Event()

        def upload():
            b.sendall(payload)
            b.shutdown(socket.SHUT_WR)
            sent.set()

        up = threading.Thread(target=upload, daemon=True)
        up.start()
        loaded: list[float] = []
        backlog_max = {"kernel_in": 0, "relay": 0, "kernel_out": 0}
        while len(sink.results) < 1 and time.monotonic() - t0 < 50:
            loaded.append(rtt())
            for k, v in relay.backlog("AB").items():
                backlog_max[k] = max(backlog_max[k], v)
            time.sleep(0.02)
        n, digest = sink.wait_results(1, timeout=max(1, 55 - (time.monotonic() - t0)))[0]
        took = time.monotonic() - t0
        b.close()
        up.join(5)
    finally:
        e.close()
    assert (n, digest) == (size, hashlib.sha256(payload).hexdigest())
    goodput = size / took
    c = relay.counters()["AB"]
    med = statistics.median(loaded)
    p99 = sorted(loaded)[max(0, math.ceil(0.99 * len(loaded)) - 1)]  # nearest rank
    report = {
        "goodput_Bps": round(goodput),
        "line_Bps": BAUD_115200_BYTES,
        "efficiency": round(goodput / BAUD_115200_BYTES, 3),
        "bulk_seconds": round(took, 2),
        "line_bytes_AB": c["written"],
        "idle_rtt_median_ms": round(statistics.median(idle) * 1000, 1),
        "loaded_rtt_median_ms": round(med * 1000, 1),
        "loaded_rtt_p99_ms": round(p99 * 1000, 1),
        "loaded_rtt_max_ms": round(max(loaded) * 1000, 1),
        "rtt_samples": len(loaded),
        "backlog_max_AB": backlog_max,
    }
    for k, v in report.items():
        record_property(k, v)
    print(f"\n[paced 115200 8N1 line] {report}")
    assert took < 60
    assert max(loaded) < 10, f"1-byte RTT up to {max(loaded):.1f}s behind a bulk upload"


# --------------------------------------------------------------------------- link reliability


@pytest.mark.parametrize(("host_kind", "guest_kind"), KIND_PAIRS, ids=KIND_IDS)
def test_link_repairs_a_noisy_line_32_transfers_byte_exact(
    relays, daemons, backends, host_kind, guest_kind
):
    """1 corrupted byte in 10,000 each way: the serial side's link layer (on by
    default; the virtio side follows) repairs every frame below the streams."""
    relay, p, port = start_echo_pair(relays, daemons, backends, host_kind, guest_kind)
    relay.set_faults(corrupt_one_in=10_000)
    hmark, gmark = p.host.mark(), p.guest.mark()
    jobs = [(port, os.urandom(64 * 1024)) for _ in range(32)]
    results = run_parallel(echo_stream, jobs)
    for n, ((_, payload), out) in enumerate(zip(jobs, results, strict=True)):
        assert isinstance(out, Outcome), f"stream {n}: {out!r}"
        assert out.how == "eof", f"stream {n}: {out.how} after {len(out.data)} bytes"
        assert out.data == payload, f"stream {n}: wrong bytes"
    counters = relay.counters()
    corrupted = sum(d["corrupted"] for d in counters.values())
    ended = p.host.count("session ended", hmark) + p.guest.count("session ended", gmark)
    print(
        f"\n[link, {host_kind}/{guest_kind}] 32 x 64 KiB echoed byte-exact; "
        f"relay corrupted {corrupted} bytes; sessions ended: {ended}"
    )
    assert corrupted > 0, "the relay corrupted nothing: the test proves nothing"
    assert ended == 0, "the link layer should have repaired every frame"
    relay.set_faults()
    p.host.terminate()  # the counters are logged when the session ends
    assert "retransmits=" in p.host.log() or "retransmits=" in p.guest.log()


def test_link_repairs_drops_and_garbage_bursts(relays, daemons, backends):
    """Dropped bytes and bursts of garbage too: still every stream byte-exact."""
    rng = random.Random(7)
    relay, _, port = start_echo_pair(relays, daemons, backends)
    relay.set_faults(corrupt_one_in=5_000, drop_one_in=20_000)
    stop = threading.Event()

    def injector():
        while not stop.wait(0.05):
            relay.inject(garbage(rng, rng.randint(1, 64)), rng.choice(("AB", "BA")))

    t = threading.Thread(target=injector, daemon=True)
    t.start()
    try:
        jobs = [(port, os.urandom(128 * 1024)) for _ in range(8)]
        results = run_parallel(echo_stream, jobs)
    finally:
        stop.set()
        t.join(5)
    for n, ((_, payload), out) in enumerate(zip(jobs, results, strict=True)):
        assert isinstance(out, Outcome), f"stream {n}: {out!r}"
        assert (out.how, out.data == payload) == ("eof", True), f"stream {n}: {out.how}"
    counters = relay.counters()
    print(f"\n[link, drops and garbage] 8 x 128 KiB byte-exact; relay: {counters}")
    assert sum(d["dropped"] + d["injected"] for d in counters.values()) > 0
