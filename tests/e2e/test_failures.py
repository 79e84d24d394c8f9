"""End-to-end failure handling: refused targets, unknown services, a channel
that is down, daemons that die and come back."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
from vp_e2e import (
    FAST_KEEPALIVE,
    LOOPBACK,
    EchoServer,
    SourceServer,
    closed_port,
    connect,
    echo_roundtrip,
    free_port,
    open_until_closed,
    wait_closed,
)

pytestmark = pytest.mark.e2e


def _any_line(pair, *patterns):
    return pair.host.find_line(*patterns) or pair.guest.find_line(*patterns)


def _wait_any_line(pair, *patterns, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        line = _any_line(pair, *patterns)
        if line is not None:
            return line
        if time.monotonic() > deadline:
            pytest.fail(
                f"no log line matching {patterns}\n--- host:\n{pair.host.log()}\n"
                f"--- guest:\n{pair.guest.log()}"
            )
        time.sleep(0.05)


def test_refused_target_closes_client_and_daemon_survives(pair, backends):
    echo = backends(EchoServer)
    dport, gport = free_port(), free_port()
    p = pair(
        host_o=[f"deadend:{LOOPBACK}:{dport}", f"good:{LOOPBACK}:{gport}"],
        guest_i=[f"deadend:{LOOPBACK}:{closed_port()}", f"good:{echo.addr}"],
    )

    how, data, took = open_until_closed(dport, 3.0)
    assert data == b"", f"refused stream delivered {len(data)} bytes"
    assert how in ("eof", "reset") and took < 3.0

    line = _wait_any_line(p, r"deadend", r"refused")
    print("log says:", line)
    assert p.host.alive() and p.guest.alive()
    assert echo_roundtrip(gport, b"still serving") == b"still serving"
    # the same failing service fails the same way a second time
    how, data, took = open_until_closed(dport, 3.0)
    assert data == b"" and took < 3.0


def test_request_sent_at_once_to_a_refused_target_is_dropped_quietly(pair, backends):
    """A client's first bytes travel as early data, right behind the OPEN,
    before the far side has tried its connect.  When that connect is refused
    they must be dropped: no byte delivered, the client closed, neither
    daemon counting a protocol error, and the channel serving on."""
    echo = backends(EchoServer)
    dport, gport = free_port(), free_port()
    p = pair(
        host_o=[f"deadend:{LOOPBACK}:{dport}", f"good:{LOOPBACK}:{gport}"],
        guest_i=[f"deadend:{LOOPBACK}:{closed_port()}", f"good:{echo.addr}"],
    )
    request = os.urandom(64 * 1024)  # more than one DATA frame, less than a window
    for _ in range(20):
        how, data, took = open_until_closed(dport, 3.0, send=request)
        assert data == b"", f"refused stream delivered {len(data)} bytes"
        assert how in ("eof", "reset") and took < 3.0
    assert p.host.alive() and p.guest.alive()
    assert echo_roundtrip(gport, b"still serving") == b"still serving"
    # A session's end logs the trouble counters that changed (protocol_errors
    # among them); a clean stop of the guest ends it on both sides.
    hmark = p.host.mark()
    assert p.guest.terminate() == 0
    p.host.wait_for("session ended", 5, since=hmark)
    for side in (p.host, p.guest):
        log = side.log()
        assert "protocol_errors" not in log and "peer error" not in log, log


def test_unknown_service_closes_client_and_is_logged(pair, backends):
    echo = backends(EchoServer)
    uport, gport = free_port(), free_port()
    p = pair(
        host_o=[f"ghost:{LOOPBACK}:{uport}", f"good:{LOOPBACK}:{gport}"],
        guest_i=[f"good:{echo.addr}"],
    )  # the guest has no iforward "ghost"

    how, data, took = open_until_closed(uport, 3.0, send=b"anyone there?")
    assert data == b"" and how in ("eof", "reset") and took < 3.0

    line = _wait_any_line(p, r"\bghost\b", r"no.?service|unknown|not found|no such")
    print("log says:", line)
    assert p.host.alive() and p.guest.alive()
    assert echo_roundtrip(gport, b"x" * 1000) == b"x" * 1000


def test_connect_while_channel_down_times_out(daemons):
    port = free_port()
    host = daemons(
        "host",
        "--channel",
        f"tcp-listen:{LOOPBACK}:{free_port()}",
        "-o",
        f"late:{LOOPBACK}:{port}",
        "--connect-timeout",
        "2",
    )
    host.wait_for("listening")
    t0 = time.monotonic()
    s = connect(port)
    try:
        how, data, _ = wait_closed(s, 10.0)
    finally:
        s.close()
    took = time.monotonic() - t0
    assert data == b"" and how in ("eof", "reset")
    assert 1.5 <= took <= 6.0, f"closed after {took:.2f}s with --connect-timeout 2"
    assert host.alive()
    host.wait_line(r"closed", r"\blate\b")


def test_connection_accepted_before_session_is_served_when_it_comes_up(daemons, backends):
    echo = backends(EchoServer)
    chan, port = free_port(), free_port()
    host = daemons(
        "host",
        "--channel",
        f"tcp-listen:{LOOPBACK}:{chan}",
        "-o",
        f"early:{LOOPBACK}:{port}",
        "--connect-timeout",
        "8",
    )
    host.wait_for("listening")
    s = connect(port)
    try:
        s.sendall(b"queued before the peer exists\n")
        guest = daemons(
            "guest", "--channel", f"tcp-connect:{LOOPBACK}:{chan}", "-i", f"early:{echo.addr}"
        )
        host.wait_for("session up")
        guest.wait_for("session up")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(8)
        got = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    finally:
        s.close()
    assert got == b"queued before the peer exists\n"


def _read_at_least(s: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        d = s.recv(65536)
        assert d, "source stream ended early"
        got += len(d)
    return got


def test_guest_killed_mid_transfer_resets_host_client_then_reconnects(pair, backends):
    src = backends(SourceServer)
    echo = backends(EchoServer)
    sport, eport = free_port(), free_port()
    p = pair(
        host_o=[f"src:{LOOPBACK}:{sport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"src:{src.addr}", f"echo:{echo.addr}"],
        args=FAST_KEEPALIVE,
    )

    s = connect(sport)
    try:
        _read_at_least(s, 512 * 1024)  # a long transfer is under way
        hmark = p.host.mark()
        p.guest.kill()
        t_kill = time.monotonic()
        how, data, took = wait_closed(s, 8.0)
    finally:
        s.close()
    assert how == "reset", (
        f"host-side client saw a clean EOF {took:.2f}s after the guest was "
        f"killed ({len(data)} more bytes): a cut transfer looks complete"
    )
    assert took < 5.0, f"reset only after {took:.2f}s (keepalive timeout 2s)"
    p.host.wait_for("session ended", 5, since=hmark)
    p.host.wait_line(r"closed", r"\bsrc\b", since=hmark)

    # the survivor's listeners stay up: a connect is accepted while the peer is gone
    assert p.host.alive()
    waiting = connect(eport)
    try:
        waiting.sendall(b"waiting for the guest")
        waiting.shutdown(socket.SHUT_WR)

        p.guest.restart()
        p.guest.wait_for("session up", 10)
        p.host.wait_for("session up", 10, since=hmark)
        print(f"session back {time.monotonic() - t_kill:.2f}s after the kill")

        # the connection accepted during the outage is served (default connect-timeout 10s)
        waiting.settimeout(10)
        got = b""
        while True:
            d = waiting.recv(65536)
            if not d:
                break
            got += d
        assert got == b"waiting for the guest"
    finally:
        waiting.close()

    data = os.urandom(200_000)
    assert echo_roundtrip(eport, data) == data
    s = connect(sport)
    try:
        _read_at_least(s, 64 * 1024)
    finally:
        s.close()


def test_host_restarted_guest_reconnects_with_backoff(pair, backends):
    echo_g = backends(EchoServer)
    echo_h = backends(EchoServer)
    hport, gport = free_port(), free_port()
    p = pair(
        host_o=[f"e:{LOOPBACK}:{hport}"],
        guest_i=[f"e:{echo_g.addr}"],
        guest_o=[f"e:{LOOPBACK}:{gport}"],
        host_i=[f"e:{echo_h.addr}"],
        args=FAST_KEEPALIVE,
    )
    assert echo_roundtrip(hport, b"before") == b"before"

    # a transfer through the guest is cut when the host dies
    s = connect(gport)
    try:
        s.sendall(b"x" * 1000)
        assert s.recv(1000)
        gmark = p.guest.mark()
        p.host.kill()
        how, _, took = wait_closed(s, 8.0)
    finally:
        s.close()
    assert how == "reset", "guest-side client saw a clean EOF when the host was killed"
    p.guest.wait_for("session ended", 5, since=gmark)

    time.sleep(1.5)  # let the guest fail a few reconnects, so backoff is exercised
    assert p.guest.alive()
    p.host.restart()
    t0 = time.monotonic()
    p.host.wait_for("session up", 12)
    p.guest.wait_for("session up", 12, since=gmark)
    took = time.monotonic() - t0
    assert took <= 10.0, f"guest reconnected only {took:.2f}s after the host came back"
    print(f"guest reconnected {took:.2f}s after the host restart")

    data = os.urandom(100_000)
    assert echo_roundtrip(hport, data) == data
    assert echo_roundtrip(gport, data) == data


def test_graceful_shutdown_resets_peer_clients_at_once(pair, backends):
    """SIGTERM sends GOAWAY: the peer's clients are reset without waiting for
    the (default, 20 s) keepalive timeout."""
    src = backends(SourceServer)
    sport = free_port()
    p = pair(host_o=[f"src:{LOOPBACK}:{sport}"], guest_i=[f"src:{src.addr}"])
    s = connect(sport)
    try:
        _read_at_least(s, 128 * 1024)
        p.guest.terminate(timeout=5)
        how, _, took = wait_closed(s, 8.0)
    finally:
        s.close()
    assert how == "reset", "client saw a clean EOF for a transfer cut by the peer's shutdown"
    assert took < 3.0, f"reset after {took:.2f}s"
    assert p.host.alive()
    assert not re.search(r"Traceback", p.guest.log())


def test_channel_loss_ends_every_stream(pair, backends):
    """kill -9 the guest: busy, idle and guest-opened streams all end on the host."""
    src = backends(SourceServer)
    echo_g = backends(EchoServer)
    echo_h = backends(EchoServer)
    sport, eport, gport = free_port(), free_port(), free_port()
    p = pair(
        host_o=[f"src:{LOOPBACK}:{sport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"src:{src.addr}", f"echo:{echo_g.addr}"],
        guest_o=[f"back:{LOOPBACK}:{gport}"],
        host_i=[f"back:{echo_h.addr}"],
        args=FAST_KEEPALIVE,
    )

    busy = [connect(sport) for _ in range(3)]
    idle = connect(eport)
    reverse = connect(gport)  # opened by the guest; its backend connection is on the host
    try:
        for s in busy:
            _read_at_least(s, 64 * 1024)
        for s in (idle, reverse):
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        p.guest.kill()
        for i, s in enumerate([*busy, idle]):
            how, _, took = wait_closed(s, 8.0)
            assert how == "reset", (
                f"host-side client {i} saw a clean EOF after the guest was killed"
            )
            assert took < 5.0
        # the host's connection to its own backend for the guest-opened stream is dropped too
        echo_h.wait_ended(1, 5.0)
    finally:
        for s in [*busy, idle, reverse]:
            s.close()
    assert p.host.alive()


def test_frozen_peer_detected_by_keepalive(pair, backends):
    """SIGSTOP the guest: the channel stays open, so only the keepalive can tell."""
    src = backends(SourceServer)
    echo = backends(EchoServer)
    sport, eport = free_port(), free_port()
    p = pair(
        host_o=[f"src:{LOOPBACK}:{sport}", f"echo:{LOOPBACK}:{eport}"],
        guest_i=[f"src:{src.addr}", f"echo:{echo.addr}"],
        args=FAST_KEEPALIVE,
    )
    s = connect(sport)
    hmark, gmark = p.host.mark(), p.guest.mark()
    try:
        _read_at_least(s, 128 * 1024)
        os.kill(p.guest.pid, signal.SIGSTOP)
        try:
            how, _, took = wait_closed(s, 10.0)
            assert how == "reset", "client saw a clean EOF when the session died of keepalive"
            assert took < 6.0, f"frozen peer noticed only after {took:.2f}s (keepalive timeout 2s)"
            p.host.wait_for("session ended", 2, since=hmark)
            assert p.host.count("session up", since=hmark) == 0
        finally:
            os.kill(p.guest.pid, signal.SIGCONT)
    finally:
        s.close()
    # the thawed guest notices the host started a new session; a new one comes up
    p.host.wait_for("session up", 10, since=hmark)
    p.guest.wait_for("session up", 10, since=gmark)
    data = os.urandom(50_000)
    assert echo_roundtrip(eport, data) == data


def test_guest_started_before_host(daemons, backends):
    echo = backends(EchoServer)
    chan, port = free_port(), free_port()
    guest = daemons("guest", "--channel", f"tcp-connect:{LOOPBACK}:{chan}", "-i", f"e:{echo.addr}")
    time.sleep(1.5)  # the guest's first connects are refused
    assert guest.alive()
    host = daemons(
        "host", "--channel", f"tcp-listen:{LOOPBACK}:{chan}", "-o", f"e:{LOOPBACK}:{port}"
    )
    t0 = time.monotonic()
    host.wait_for("session up", 10)
    guest.wait_for("session up", 10)
    assert time.monotonic() - t0 < 10
    host.wait_for("listening")
    assert echo_roundtrip(port, b"late host") == b"late host"
