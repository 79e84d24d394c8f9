# ruff: noqa: RUF046
"""Helper processes for benchmarks/run.py (not meant to be run by hand).

Each role runs in its own process so that it never shares a GIL with the
relays under test or with the other side of a measurement:

``target --ports P1,P2,...``
    asyncio sink/source server.  The first byte a client sends selects the
    mode of its connection:

    ``e``  echo: every byte (the ``e`` included) is written back;
    ``d``  discard-and-report: read until EOF, then write the byte count
           (8 bytes, big endian, not counting the mode byte) and close;
    ``h``  like ``d`` but the count is followed by the SHA-256 of the data;
    ``c``  counting sink: every 200 ms write the cumulative count (8 bytes)
           and the target's CLOCK_MONOTONIC (8-byte double), so a client
           can measure goodput while it is still sending;
    ``s``  source: the next 8 bytes are N; write N bytes, then close.

``pace --listen PORT --connect HOST:PORT --rate BYTES_PER_S``
    token-bucket TCP relay modelling a slow full-duplex line: every
    direction is one shared "line" for all connections through the relay,
    bytes leave only after their serialisation time at ``rate``, and the
    relay's sockets have small buffers so that it hides no queue.

``client WORKLOAD ...``
    the measuring side; prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import select
import socket
import statistics
import struct
import sys
import threading
import time

COUNT = struct.Struct(">Q")
REPORT = struct.Struct(">Qd")  # counting mode: bytes so far, target's CLOCK_MONOTONIC


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------
# target server


class TargetProtocol(asyncio.BufferedProtocol):
    BUFSIZE = 256 * 1024

    def __init__(self) -> None:
        self.buf = bytearray(self.BUFSIZE)
        self.view = memoryview(self.buf)
        self.mode = b""
        self.count = 0
        self.sha = None
        self.header = b""
        self.transport = None
        self.ticker = None
        self.source_left = 0
        self.paused = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int):  # type: ignore[override]
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        data = self.view[:nbytes]
        if not self.mode:
            self.mode = bytes(data[:1])
            if self.mode == b"e":
                self.transport.write(bytes(data))
                return
            data = data[1:]
            if self.mode == b"h":
                self.sha = hashlib.sha256()
            elif self.mode == b"c":
                self.tick()
        mode = self.mode
        if mode == b"e":
            self.transport.write(bytes(data))
        elif mode == b"d" or mode == b"c":
            self.count += len(data)
        elif mode == b"h":
            self.count += len(data)
            self.sha.update(data)
        elif mode == b"s":
            if self.source_left or len(self.header) >= 8:
                return
            self.header += bytes(data)
            if len(self.header) >= 8:
                (self.source_left,) = COUNT.unpack(self.header[:8])
                self.produce()
        else:
            self.transport.abort()

    def tick(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(REPORT.pack(self.count, time.monotonic()))
        self.ticker = asyncio.get_running_loop().call_later(0.2, self.tick)

    def produce(self) -> None:
        chunk = bytes(64 * 1024)
        while self.source_left and not self.paused:
            n = min(len(chunk), self.source_left)
            self.transport.write(chunk[:n])
            self.source_left -= n
        if not self.source_left:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.mode == b"e":
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"e":
            self.transport.resume_reading()
        elif self.mode == b"s" and self.source_left:
            self.produce()

    def eof_received(self):  # type: ignore[override]
        if self.mode == b"d":
            self.transport.write(COUNT.pack(self.count))
        elif self.mode == b"c":
            self.transport.write(REPORT.pack(self.count, time.monotonic()))
        elif self.mode == b"h":
            self.transport.write(COUNT.pack(self.count) + self.sha.digest())
        self.transport.close()
        return True

    def connection_lost(self, exc) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        self.transport = None


async def target_main(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(
            TargetProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True
        )
    print("ready", flush=True)
    await asyncio.Event().wait()


# --------------------------------------------------------------------------
# pacing relay


class Line:
    """One direction of a shared slow line: reservations in arrival order."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free_at = 0.0
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.free_at)
            self.free_at = start + nbytes / self.rate
            return self.free_at


def pace_pump(src: socket.socket, dst: socket.socket, line: Line, chunk: int, done: list) -> None:
    try:
        while True:
            data = src.recv(chunk)
            if not data:
                break
            until = line.reserve(len(data))
            delay = until - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            dst.sendall(data)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    except OSError:
        pass
    finally:
        done.append(1)
        if len(done) == 2:
            src.close()
            dst.close()
        else:
            # the other direction may be blocked forever; unblock it on error
            pass


def set_small_buffers(sock: socket.socket, size: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def pace_main(listen: int, connect: str, rate: float, bufsize: int) -> None:
    up, down = Line(rate), Line(rate)
    chunk = max(64, min(16384, int(rate / 250)))
    host, _, port = connect.rpartition(":")
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    set_small_buffers(lsock, bufsize)
    lsock.bind(("127.0.0.1", listen))
    lsock.listen(512)
    print("ready", flush=True)
    while True:
        client, _ = lsock.accept()
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            set_small_buffers(upstream, bufsize)
            upstream.settimeout(10)
            upstream.connect((host, int(port)))
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_small_buffers(s, bufsize)
        done: list = []
        for src, dst, line in ((client, upstream, up), (upstream, client, down)):
            threading.Thread(
                target=pace_pump, args=(src, dst, line, chunk, done), daemon=True
            ).start()


# --------------------------------------------------------------------------
# clients


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += d
    return bytes(out)


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def upload(port: int, nbytes: int, timeout: float) -> tuple[float, float, int]:
    """Upload nbytes in 'd' mode; returns (t_start, t_end, reported count)."""
    payload = memoryview(bytes(random.Random(1).randbytes(1 << 20)))
    t0 = time.perf_counter()
    s = connect(port, timeout)
    s.settimeout(timeout)
    s.sendall(b"d")
    left = nbytes
    while left:
        n = min(left, len(payload))
        s.sendall(payload[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    (count,) = COUNT.unpack(recv_exact(s, 8))
    t1 = time.perf_counter()
    s.close()
    return t0, t1, count


def client_bulk(a) -> dict:
    t0, t1, count = upload(a.port, a.bytes, a.timeout)
    return {
        "ok": count == a.bytes,
        "bytes": count,
        "seconds": t1 - t0,
        "mbps": count / (t1 - t0) / 1e6,
    }


def client_multi(a) -> dict:
    results: list = [None] * a.streams
    barrier = threading.Barrier(a.streams + 1)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = upload(a.port, a.bytes, a.timeout)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(a.streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    errors = [repr(r) for r in results if isinstance(r, Exception)]
    if errors:
        return {"ok": False, "error": errors[0], "errors": len(errors)}
    ends = [r[1] - start for r in results]
    total = sum(r[2] for r in results)
    return {
        "ok": total == a.bytes * a.streams,
        "mbps": total / max(ends) / 1e6,
        "slow_fast": max(ends) / min(ends),
        "seconds": max(ends),
    }


def client_rtt(a) -> dict:
    s = connect(a.port, a.timeout)
    s.settimeout(a.timeout)
    s.sendall(b"e")
    recv_exact(s, 1)
    gate(a)
    samples: list[float] = []
    censored = 0
    deadline = time.perf_counter() + a.max_seconds
    for i in range(a.count + a.warmup):
        t0 = time.perf_counter()
        s.sendall(b"x")
        try:
            recv_exact(s, 1)
        except TimeoutError:
            samples.append(time.perf_counter() - t0)
            censored = 1
            break
        if i >= a.warmup:
            samples.append(time.perf_counter() - t0)
        if a.interval:
            time.sleep(a.interval)
        if time.perf_counter() > deadline:
            break
    s.close()
    return summarise_rtt(samples, censored)


def gate(a) -> None:
    """With --wait-go: the connection is up; wait for the orchestrator to
    start the background load before measuring."""
    if a.wait_go:
        print("connected", flush=True)
        sys.stdin.readline()


def summarise_rtt(samples: list[float], censored: int) -> dict:
    """Censored: the last sample is a lower bound (timed out)."""
    srt = sorted(samples)
    out = {"n": len(samples), "censored": censored}
    for name, p in (("p50", 50), ("p99", 99), ("max", 100)):
        v = pct(srt, p)
        out[name] = v
        # a percentile at or above the censored lower bound is itself censored
        out[name + "_gt"] = bool(censored and samples and v >= samples[-1])
    return out


def client_keys(a) -> dict:
    """Keystrokes on a (slow) line for a fixed time; each waits for its echo,
    at most until the deadline plus a.cap seconds."""
    s = connect(a.port, a.timeout)
    s.settimeout(a.timeout)
    s.sendall(b"e")
    recv_exact(s, 1)
    gate(a)
    samples: list[float] = []
    censored = 0
    deadline = time.perf_counter() + a.max_seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        s.sendall(b"k")
        s.settimeout(max(0.05, deadline + a.cap - t0))
        try:
            recv_exact(s, 1)
        except (TimeoutError, ConnectionError):
            samples.append(time.perf_counter() - t0)
            censored = 1
            break
        samples.append(time.perf_counter() - t0)
        time.sleep(a.interval)
    s.close()
    return summarise_rtt(samples, censored)


def client_load(a) -> dict:
    """Upload in counting mode until stdin says stop (or max_seconds).
    Prints 'ready' once data flows; the final JSON has the goodput measured
    from the target's count reports after a.warmup seconds."""
    payload = memoryview(bytes(random.Random(2).randbytes(64 * 1024)))
    s = connect(a.port, a.timeout)
    s.sendall(b"c")
    reports: list[tuple[float, int]] = []
    stop = threading.Event()
    start = time.monotonic()

    def reader() -> None:
        buf = b""
        try:
            while not stop.is_set():
                r, _, _ = select.select([s], [], [], 0.2)
                if not r:
                    continue
                d = s.recv(4096)
                if not d:
                    return
                buf += d
                while len(buf) >= REPORT.size:
                    c, ts = REPORT.unpack(buf[: REPORT.size])
                    buf = buf[REPORT.size :]
                    reports.append((ts, c))
        except OSError:
            return

    def stopper() -> None:
        try:
            sys.stdin.readline()
        finally:
            stop.set()

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=stopper, daemon=True).start()
    announced = False
    sent = 0
    s.settimeout(0.2)
    while not stop.is_set() and time.monotonic() - start < a.max_seconds:
        try:
            sent += s.send(payload)
        except TimeoutError:
            pass
        except OSError:
            break
        if not announced and reports and reports[-1][1] > 0:
            print("ready", flush=True)
            announced = True
    stop.set()
    end = time.monotonic()
    if not announced:
        print("ready", flush=True)
    try:
        s.close()
    except OSError:
        pass
    # goodput: least-squares slope of the target's byte count over its clock
    # after the warm-up; a slope rather than end points, because a relay that
    # delivers in big frames makes the count a staircase.
    warm = [r for r in reports if r[0] - start >= a.warmup]
    if len(warm) < 3:
        warm = reports
    goodput = 0.0
    if len(warm) >= 2:
        mt = statistics.fmean(t for t, _ in warm)
        mc = statistics.fmean(c for _, c in warm)
        var = sum((t - mt) ** 2 for t, _ in warm)
        if var > 0:
            goodput = sum((t - mt) * (c - mc) for t, c in warm) / var
    return {
        "sent": sent,
        "delivered": reports[-1][1] if reports else 0,
        "seconds": end - start,
        "goodput": goodput,
        "reports": len(reports),
        "trace": [(round(t - start, 3), c) for t, c in reports[:: max(1, len(reports) // 40)]],
    }


def client_short(a) -> dict:
    n = 0
    lat: list[float] = []
    errors = 0
    t_end = time.perf_counter() + a.max_seconds
    start = time.perf_counter()
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"e")
            if s.recv(1) != b"e":
                raise ConnectionError("bad echo")
            s.close()
        except OSError:
            errors += 1
            if errors > 20:
                break
            continue
        lat.append(time.perf_counter() - t0)
        n += 1
    el = time.perf_counter() - start
    lat.sort()
    return {
        "ok": errors == 0,
        "conns": n,
        "errors": errors,
        "rate": n / el,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
    }


async def _many(a) -> dict:
    n, size = a.streams, a.bytes
    datas = [random.Random(i).randbytes(size) for i in range(n)]
    expect = [COUNT.pack(size) + hashlib.sha256(d).digest() for d in datas]
    sem = asyncio.Semaphore(a.connect_concurrency)
    all_connected = asyncio.Event()
    connected = 0
    bad: list[str] = []

    async def one(i: int):
        nonlocal connected
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", a.port)
            w.write(b"h")
            await w.drain()
        connected += 1
        if connected == n:
            all_connected.set()
        await all_connected.wait()
        w.write(datas[i])
        await w.drain()
        w.write_eof()
        got = await r.readexactly(40)
        w.close()
        if got != expect[i]:
            bad.append(f"stream {i}: mismatch")
        return time.perf_counter()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]

    async def wait_connected():
        await all_connected.wait()
        return time.perf_counter()

    try:
        t_conn = await asyncio.wait_for(asyncio.shield(wait_connected()), a.timeout)
        ends = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), a.timeout)
    except TimeoutError:
        done = sum(1 for t in tasks if t.done() and not t.exception())
        for t in tasks:
            t.cancel()
        return {
            "ok": False,
            "error": f"timeout after {a.timeout}s (connected {connected}/{n}, done {done})",
            "connected": connected,
        }
    errs = [e for e in ends if isinstance(e, BaseException)]
    t1 = time.perf_counter()
    return {
        "ok": not errs and not bad,
        "errors": len(errs) + len(bad),
        "error": repr(errs[0]) if errs else (bad[0] if bad else ""),
        "connect_seconds": t_conn - t0,
        "seconds": t1 - t0,
    }


def client_many(a) -> dict:
    return asyncio.run(_many(a))


# --------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    t = sub.add_parser("target")
    t.add_argument("--ports", required=True)
    pc = sub.add_parser("pace")
    pc.add_argument("--listen", type=int, required=True)
    pc.add_argument("--connect", required=True)
    pc.add_argument("--rate", type=float, required=True)
    pc.add_argument("--buf", type=int, default=4096)
    c = sub.add_parser("client")
    c.add_argument("workload", choices=["bulk", "multi", "rtt", "keys", "load", "short", "many"])
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bytes", type=int, default=1 << 20)
    c.add_argument("--streams", type=int, default=32)
    c.add_argument("--count", type=int, default=2000)
    c.add_argument("--warmup", type=float, default=0)
    c.add_argument("--interval", type=float, default=0.0)
    c.add_argument("--cap", type=float, default=5.0)
    c.add_argument("--max-seconds", type=float, default=60.0)
    c.add_argument("--timeout", type=float, default=60.0)
    c.add_argument("--connect-concurrency", type=int, default=48)
    c.add_argument("--wait-go", action="store_true")
    a = p.parse_args()
    raise_nofile()
    if a.role == "target":
        asyncio.run(target_main([int(x) for x in a.ports.split(",")]))
    elif a.role == "pace":
        pace_main(a.listen, a.connect, a.rate, a.buf)
    else:
        if a.workload == "rtt":
            a.warmup = int(a.warmup)
        fn = globals()["client_" + a.workload]
        try:
            out = fn(a)
        except Exception as e:
            out = {"ok": False, "error": repr(e)}
        print(json.dumps(out), flush=True)
        os._exit(0)


if __name__ == "__main__":
    main()
