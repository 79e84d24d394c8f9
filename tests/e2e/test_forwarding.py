"""End-to-end forwarding: bytes go through two real daemons exactly as sent."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import urllib.request

import pytest
from vp_e2e import (
    LOOPBACK,
    SOCK_TIMEOUT,
    EchoServer,
    HTTPBackend,
    ReplyThenCloseServer,
    SourceServer,
    connect,
    echo_roundtrip,
    free_port,
    recv_all,
)

pytestmark = pytest.mark.e2e


def _run_threads(fns, timeout=30.0):
    """Run callables concurrently; re-raise the first exception; fail on hang."""
    errors: list[BaseException] = []
    results: list[object] = [None] * len(fns)

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        pytest.fail(f"{alive} of {len(threads)} client threads still running after {timeout}s")
    if errors:
        raise errors[0]
    return results


def test_echo_both_directions_on_one_channel(pair, backends):
    echo_g = backends(EchoServer)  # reached from the host, lives "in the guest"
    echo_h = backends(EchoServer)  # reached from the guest, lives "on the host"
    hport, gport = free_port(), free_port()
    pair(
        host_o=[f"echo:{LOOPBACK}:{hport}"],
        guest_i=[f"echo:{echo_g.addr}"],
        guest_o=[f"hecho:{LOOPBACK}:{gport}"],
        host_i=[f"hecho:{echo_h.addr}"],
    )

    small = b"hello, virtproxy\n"
    assert echo_roundtrip(hport, small) == small
    assert echo_roundtrip(gport, small) == small

    a, b = os.urandom(300_000), os.urandom(300_000)
    got_a, got_b = _run_threads(
        [lambda: echo_roundtrip(hport, a), lambda: echo_roundtrip(gport, b)]
    )
    assert got_a == a, "host->guest echo differs"
    assert got_b == b, "guest->host echo differs"
    assert echo_g.accepted == 2 and echo_h.accepted == 2


def _http_get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/blob", timeout=SOCK_TIMEOUT) as r:
        assert r.status == 200
        return r.read()


def test_http_get_both_directions(pair, backends):
    body_g = os.urandom(1 << 20)
    body_h = os.urandom((1 << 20) + 12345)
    web_g = backends(HTTPBackend, body_g)
    web_h = backends(HTTPBackend, body_h)
    hport, gport = free_port(), free_port()
    pair(
        host_o=[f"web:{LOOPBACK}:{hport}"],
        guest_i=[f"web:{web_g.addr}"],
        guest_o=[f"web:{LOOPBACK}:{gport}"],
        host_i=[f"web:{web_h.addr}"],
    )

    got_g, got_h = _run_threads([lambda: _http_get(hport), lambda: _http_get(gport)])
    assert len(got_g) == len(body_g) and hashlib.sha256(got_g).hexdigest() == web_g.sha256
    assert len(got_h) == len(body_h) and hashlib.sha256(got_h).hexdigest() == web_h.sha256
    # and again on the same session, sequentially
    assert hashlib.sha256(_http_get(hport)).hexdigest() == web_g.sha256


def test_64_concurrent_streams_256k_each(pair, backends):
    echo_g = backends(EchoServer)
    echo_h = backends(EchoServer)
    hport, gport = free_port(), free_port()
    pair(
        host_o=[f"echo:{LOOPBACK}:{hport}"],
        guest_i=[f"echo:{echo_g.addr}"],
        guest_o=[f"echo:{LOOPBACK}:{gport}"],
        host_i=[f"echo:{echo_h.addr}"],
    )

    n, size = 64, 256 * 1024
    payloads = [os.urandom(size) for _ in range(n)]
    # half the streams are opened by the host, half by the guest, all at once
    ports = [hport if i % 2 == 0 else gport for i in range(n)]
    t0 = time.monotonic()
    results = _run_threads(
        [
            (lambda p=p, d=d: echo_roundtrip(p, d, timeout=30))
            for p, d in zip(ports, payloads, strict=True)
        ],
        timeout=45,
    )
    elapsed = time.monotonic() - t0
    bad = [i for i, (got, want) in enumerate(zip(results, payloads, strict=True)) if got != want]
    assert not bad, (
        f"{len(bad)} streams echoed wrong bytes, e.g. stream {bad[0]}: "
        f"got {len(results[bad[0]])} bytes, want {size}"
    )
    assert echo_g.accepted + echo_h.accepted == n
    print(f"64 x 256 KiB echoed in {elapsed:.2f}s")
    assert elapsed < 25, f"64 x 256 KiB took {elapsed:.1f}s: some stream stalled"


def test_half_close_reply_after_client_eof(pair, backends):
    # the backend replies only after it saw EOF: the half-close must be carried
    echo = backends(EchoServer, after_eof=True)
    port = free_port()
    pair(host_o=[f"hc:{LOOPBACK}:{port}"], guest_i=[f"hc:{echo.addr}"])

    data = os.urandom(200_000)
    s = connect(port)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)  # reply, then a clean EOF (recv_all would raise on reset/timeout)
    finally:
        s.close()
    assert got == data
    assert echo.eof_seen == 1

    # a stream that sends nothing and half-closes at once also works
    s = connect(port)
    try:
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    finally:
        s.close()


def test_reply_then_close_delivers_everything_before_eof(pair, backends):
    payload = os.urandom(3 * 1024 * 1024 + 7)
    srv = backends(ReplyThenCloseServer, payload)
    port = free_port()
    pair(host_o=[f"rtc:{LOOPBACK}:{port}"], guest_i=[f"rtc:{srv.addr}"])

    # fast reader
    s = connect(port)
    try:
        got = recv_all(s)
    finally:
        s.close()
    assert len(got) == len(payload) and hashlib.sha256(got).hexdigest() == srv.sha256

    # slow reader: the backend's close arrives while most bytes are still queued
    s = connect(port)
    try:
        time.sleep(1.0)
        got = recv_all(s)
    finally:
        s.close()
    assert len(got) == len(payload) and hashlib.sha256(got).hexdigest() == srv.sha256

    # a tiny reply too
    small = backends(ReplyThenCloseServer, b"bye\n")
    port2 = free_port()
    p2 = pair(host_o=[f"bye:{LOOPBACK}:{port2}"], guest_i=[f"bye:{small.addr}"])
    assert p2
    s = connect(port2)
    try:
        assert recv_all(s) == b"bye\n"
    finally:
        s.close()


def test_unix_socket_channel(pair, backends):
    echo = backends(EchoServer)
    port = free_port()
    p = pair(host_o=[f"echo:{LOOPBACK}:{port}"], guest_i=[f"echo:{echo.addr}"], channel="unix")
    assert p.channel.startswith("unix-listen:")
    data = os.urandom(500_000)
    assert echo_roundtrip(port, data) == data


def test_unix_socket_services(pair, backends, short_dir):
    echo = backends(EchoServer, path=str(short_dir / "backend.sock"))
    front = short_dir / "front.sock"
    # a UNIX oforward on the host, a UNIX iforward on the guest, over a TCP channel
    pair(host_o=[f"usvc:{front}:-"], guest_i=[f"usvc:{echo.addr}"])
    data = os.urandom(400_000)
    assert echo_roundtrip(path=str(front), data=data) == data

    # and mixed: TCP oforward on the guest -> UNIX backend on the host
    echo2 = backends(EchoServer, path=str(short_dir / "b2.sock"))
    gport = free_port()
    pair(guest_o=[f"mix:{LOOPBACK}:{gport}"], host_i=[f"mix:{echo2.addr}"], channel="unix")
    assert echo_roundtrip(gport, data) == data


def test_twisted_endpoint_forward_form(pair, backends):
    echo = backends(EchoServer)
    port = free_port()
    pair(
        host_o=[f"tw=tcp:{port}:interface={LOOPBACK}"],
        guest_i=[f"tw=tcp:host={LOOPBACK}:port={echo.port}"],
    )
    data = os.urandom(100_000)
    assert echo_roundtrip(port, data) == data


def test_slow_reader_holds_back_only_its_own_stream(pair, backends):
    """A client that stops reading a bulk stream: virtproxy's memory stays
    bounded (credit windows) and other streams on the channel still flow."""
    bulk = backends(SourceServer, chunk=65536, pause=0.0)
    echo = backends(EchoServer)
    bport, eport = free_port(), free_port()
    p = pair(
        host_o=[f"bulk:{LOOPBACK}:{bport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"bulk:{bulk.addr}", f"echo:{echo.addr}"],
    )
    s = connect(bport)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        got = 0
        while got < 256 * 1024:
            got += len(s.recv(65536))
        time.sleep(1.0)  # stop reading: buffers fill up to the windows
        rss0 = (p.host.rss_kib(), p.guest.rss_kib())
        # an interactive stream is not stuck behind the blocked bulk stream
        for _ in range(3):
            t0 = time.monotonic()
            data = os.urandom(100_000)
            assert echo_roundtrip(eport, data, timeout=5) == data
            assert time.monotonic() - t0 < 4.0
        time.sleep(1.5)
        rss1 = (p.host.rss_kib(), p.guest.rss_kib())
        growth = [b - a for a, b in zip(rss0, rss1, strict=True)]
        assert max(growth) < 24 * 1024, f"daemon RSS grew {growth} KiB while the reader was stalled"
        # the bulk stream resumes when the client reads again
        s.settimeout(10)
        got = 0
        while got < 16 * 1024 * 1024:
            d = s.recv(1 << 20)
            assert d, "bulk stream ended"
            got += len(d)
    finally:
        s.close()
    print(f"RSS KiB host/guest before {rss0} after {rss1}")
