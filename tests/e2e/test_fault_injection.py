"""End-to-end fault injection: real daemons, a channel relay that damages bytes.

The relays (:mod:`faultrelay`) corrupt, drop, duplicate and truncate bytes at
set rates from a seeded RNG and cut the channel at random times.  Many echo
transfers of random, per-stream data run through the daemons meanwhile, and:

* no client ever receives a wrong byte: what arrives is always a prefix of
  what was sent, and a clean EOF only ever follows the complete echo;
* nothing hangs: every transfer ends (complete, or reset) within a bound;
* the sessions recover: with the faults off, new streams work again.

Without a link layer a damaged stream can only be reset, and any loss ends
the session; with ``--link on`` (the link-reliability layer) damage is
repaired below the streams and every transfer must complete byte-exact.

Run with ``-s`` to see the counts (relay actions, streams complete/reset).
"""

from __future__ import annotations

import functools
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultrelay import FaultRates, SerialFaultRelay, TcpFaultRelay
from vp_e2e import (
    FAST_KEEPALIVE,
    LOOPBACK,
    EchoServer,
    Pair,
    daemon_cmd,
    daemon_env,
    describe_error,
    free_port,
    send_then_half_close,
    wait_listening,
)

pytestmark = pytest.mark.e2e

#: A transfer that makes no progress for this long counts as hung.
STALL = 15.0


@functools.cache
def daemon_help() -> str:
    out = subprocess.run(
        daemon_cmd("--help"), capture_output=True, text=True, env=daemon_env(), timeout=60
    )
    return out.stdout


def link_mode_available() -> bool:
    """Whether the daemons under test know ``--link`` (the link-reliability layer)."""
    return "--link" in daemon_help()


requires_link = pytest.mark.skipif(
    not link_mode_available(), reason="the daemons have no --link option (link layer not merged)"
)


def plain_args() -> list[str]:
    """Daemon options for the plain session (no link layer), whatever the default."""
    return ["--link", "off"] if link_mode_available() else []


# --------------------------------------------------------------------------- transfers


@dataclass
class Outcome:
    sent: int
    received: int
    how: str  # "complete", "reset", or a failure ("WRONG BYTES", "short EOF", "hung")
    detail: str = ""


def echo_transfer(port: int, payload: bytes) -> Outcome:
    """Send ``payload`` (then half-close) while reading the echo back.

    Any reset is an acceptable end; a wrong byte, an EOF before the full echo
    or a stall of STALL seconds is not.
    """
    try:
        s = socket.create_connection((LOOPBACK, port), timeout=STALL)
    except OSError as e:
        return Outcome(len(payload), 0, "reset", f"connect: {e}")
    t, send_error = send_then_half_close(s, payload)
    got = bytearray()
    how = "complete"
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            if data != payload[len(got) : len(got) + len(data)]:
                return Outcome(len(payload), len(got), "WRONG BYTES", f"at offset {len(got)}")
            got += data
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except TimeoutError:
        how = "hung"
    finally:
        s.close()
        t.join(STALL)
    if how == "complete" and len(got) != len(payload):
        how = "reset" if send_error else "short EOF"
    return Outcome(len(payload), len(got), how, "; ".join(map(describe_error, send_error)))


def run_transfers(
    port: int,
    count: int,
    concurrency: int,
    size: int,
    seed: int,
    cut: Callable[[], None] | None = None,
) -> list[Outcome]:
    """``count`` echo transfers of ``size`` random bytes, ``concurrency`` at a time.

    ``cut`` is called once, when a tenth of the transfers have ended, so the
    channel is cut while transfers are surely in flight (a timer could fire
    after a fast machine finished them all).
    """
    finished = [0]
    rng = random.Random(seed)
    payloads = [rng.randbytes(size) for _ in range(count)]
    results: list[Outcome | None] = [None] * count
    lock = threading.Lock()
    todo = list(range(count))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            results[i] = echo_transfer(port, payloads[i])
            with lock:
                finished[0] += 1
                due = cut is not None and finished[0] == max(1, count // 10)
            if due:
                cut()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 45
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a transfer hung past every socket timeout"
    return [r for r in results if r is not None]


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.how] = counts.get(o.how, 0) + 1
    return counts


def assert_never_wrong(outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if o.how not in ("complete", "reset")]
    assert not bad, f"{len(bad)} transfers failed: {bad[:5]}"


def assert_recovers(port: int, seed: int, timeout: float = 20.0) -> int:
    """With the faults off, new streams complete again; returns the attempts taken."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        outcomes = run_transfers(port, 4, 4, 100_000, seed + attempts)
        assert_never_wrong(outcomes)
        if all(o.how == "complete" for o in outcomes):
            return attempts
        assert time.monotonic() < deadline, f"no recovery: {tally(outcomes)}"
        time.sleep(0.5)


def report(name: str, relay_counts: dict, outcomes: list[Outcome], attempts: int, pair) -> None:
    ended = pair.host.count("session ended") + pair.guest.count("session ended")
    print(
        f"\n[{name}] relay: {relay_counts}\n[{name}] transfers: {tally(outcomes)}; "
        f"sessions ended (host + guest): {ended}; recovered after {attempts} attempt(s)"
    )
    for daemon in (pair.host, pair.guest):
        lines = counter_lines(daemon)
        if lines:
            print(f"[{name}] {daemon.name} {lines[-1].split(': ', 1)[-1]}")


def counter_lines(daemon) -> list[str]:
    """The daemon's "counters: ..." log lines (damage, resyncs, losses, limit hits)."""
    return [line for line in daemon.lines() if "counters:" in line]


def assert_damage_counted(pair) -> int:
    """The status interface (where the daemons have one) counts what the line
    did, and every session that ended on it logged its damage counters.
    Returns how many sessions ended."""
    status = host_status(pair)
    if status is not None:
        print(f"host status: {status_counters(status)}")
        assert status["crc_errors"] + status["resyncs"] + status["lost_frames"] > 0, status
    ended = pair.host.count("session ended") + pair.guest.count("session ended")
    if ended or status is None:
        text = " ".join(counter_lines(pair.host) + counter_lines(pair.guest))
        names = ("damaged_frames", "resyncs", "lost_frames")
        assert any(f"{name}=" in text for name in names), (
            f"{ended} sessions ended on a noisy channel, and no damage counters were logged"
        )
    return ended


STATUS_COUNTERS = ("crc_errors", "resyncs", "lost_frames", "limit_hits", "retransmits")


def status_counters(status: dict) -> dict:
    return {key: status.get(key) for key in ("sessions", *STATUS_COUNTERS)}


def control_supported() -> bool:
    """Whether the daemons under test serve ``--control`` (the status interface)."""
    return "--control" in daemon_help()


def host_status(pair) -> dict | None:
    """The host's channel row of ``virtproxy ctl status`` (None without --control)."""
    control = getattr(pair, "control", None)
    if control is None:
        return None
    proc = subprocess.run(
        daemon_cmd("ctl", "--control", str(control), "status", "--json"),
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    return row


def faults_done(relay_counts: dict) -> int:
    total = 0
    for value in relay_counts.values():
        if isinstance(value, dict):
            total += sum(value[k] for k in ("corrupted", "dropped_runs", "duplicated_runs"))
            total += value["truncations"]
    return total + int(relay_counts.get("cuts", 0))


# --------------------------------------------------------------------------- daemons


def control_args(control: Path) -> list[str]:
    return ["--control", str(control)] if control_supported() else []


def serial_pair(
    daemons, relay: SerialFaultRelay, port: int, echo: EchoServer, args, control: Path
) -> Pair:
    host = daemons(
        "host",
        "--channel",
        f"serial:{relay.path_a}:115200",
        "-o",
        f"e:{LOOPBACK}:{port}",
        *args,
        *control_args(control),
    )
    wait_listening(host, [f"e:{LOOPBACK}:{port}"])
    guest = daemons(
        "guest", "--channel", f"virtserial:{relay.path_b}", "-i", f"e:{echo.addr}", *args
    )
    pair = Pair(host, guest, "serial/virtserial")
    pair.wait_session()
    pair.control = control if control_supported() else None  # type: ignore[attr-defined]
    return pair


def tcp_pair(
    daemons, channel: int, relay: TcpFaultRelay, port: int, echo, args, control: Path
) -> Pair:
    host = daemons(
        "host",
        "--channel",
        f"tcp-listen:{LOOPBACK}:{channel}",
        "-o",
        f"e:{LOOPBACK}:{port}",
        *args,
        *control_args(control),
    )
    wait_listening(host, [f"e:{LOOPBACK}:{port}"])
    deadline = time.monotonic() + 2.0  # the channel listener too, if the daemon logs it
    while time.monotonic() < deadline and host.find_line("listening", rf":{channel}\b") is None:
        time.sleep(0.05)
    guest = daemons(
        "guest", "--channel", f"tcp-connect:{LOOPBACK}:{relay.port}", "-i", f"e:{echo.addr}", *args
    )
    pair = Pair(host, guest, "tcp via fault relay")
    pair.wait_session()
    pair.control = control if control_supported() else None  # type: ignore[attr-defined]
    return pair


@pytest.fixture
def fault_relays(daemons):
    """Factory for fault relays; the daemons stop before the relays close."""
    made: list = []

    def make(cls, *args, **kw):
        relay = cls(*args, **kw)
        made.append(relay)
        return relay

    try:
        yield make
    finally:
        daemons.cleanup()
        for relay in made:
            relay.close()
    errors = [e for r in made for e in r.errors]
    if errors:
        pytest.fail(f"fault relay thread failed: {errors!r}")


# --------------------------------------------------------------------------- plain session


SERIAL_RATES = FaultRates(corrupt=4e-6, drop=1e-6, duplicate=1e-6, truncate=5e-7)


def test_plain_session_on_a_noisy_serial_line_resets_never_corrupts(
    daemons, backends, fault_relays, short_dir
):
    """Corruption, loss, duplication, truncation and cuts on a serial line.

    The plain session resets what it cannot trust: clients see resets, never a
    wrong byte, and nothing hangs.
    """
    relay = fault_relays(SerialFaultRelay, seed=5, cut_seconds=0.3)
    echo = backends(EchoServer)
    port = free_port()
    args = [*FAST_KEEPALIVE, "--connect-timeout", "3", *plain_args()]
    pair = serial_pair(daemons, relay, port, echo, args, short_dir / "host.sock")
    relay.set_faults(SERIAL_RATES, cut_every=1.5)
    outcomes = run_transfers(
        port, count=96, concurrency=12, size=64 * 1024, seed=11, cut=relay.cut_line
    )
    relay.set_faults(None, None)
    counts = relay.counts()
    assert_never_wrong(outcomes)
    attempts = assert_recovers(port, seed=100)
    report("serial, plain session", counts, outcomes, attempts, pair)
    assert_damage_counted(pair)
    assert faults_done(counts) > 0, "the relay did nothing: the test would prove nothing"
    assert pair.host.alive() and pair.guest.alive()


TCP_RATES = FaultRates(drop=1e-6, duplicate=1e-6, truncate=1e-6)


def test_plain_session_over_a_lossy_tcp_relay_resets_never_corrupts(
    daemons, backends, fault_relays, short_dir
):
    """Drops, duplicates, truncations and cuts between two TCP-channel daemons.

    No in-place corruption here: socket channels check DATA headers only, by
    design (see faultrelay).  Every other fault must end in a reset or a new
    session, never in wrong bytes, and a cut channel reconnects.
    """
    channel = free_port()
    relay = fault_relays(TcpFaultRelay, channel, seed=7)
    echo = backends(EchoServer)
    port = free_port()
    # BULK frames' raw bytes trust the channel not to lose or repeat bytes
    # (docs/protocol.rst, "Bulk data"): this relay does, so they are off.
    args = [*FAST_KEEPALIVE, "--connect-timeout", "3", *plain_args(), "--bulk", "off"]
    pair = tcp_pair(daemons, channel, relay, port, echo, args, short_dir / "host.sock")
    relay.set_faults(TCP_RATES, cut_every=1.5)
    outcomes = run_transfers(port, count=96, concurrency=12, size=64 * 1024, seed=12, cut=relay.cut)
    relay.set_faults(None, None)
    counts = relay.counts()
    assert_never_wrong(outcomes)
    attempts = assert_recovers(port, seed=200)
    report("tcp, plain session", counts, outcomes, attempts, pair)
    assert counts["cuts"] >= 1, "the channel was never cut"
    assert assert_damage_counted(pair) >= 1, "a cut TCP channel must end the session"
    assert faults_done(counts) > 0, "the relay did nothing: the test would prove nothing"
    assert pair.host.alive() and pair.guest.alive()


# --------------------------------------------------------------------------- link layer


LINK_CASES = {
    "serial-corrupt": ("serial", FaultRates(corrupt=1e-4)),
    "tcp-corrupt": ("tcp", FaultRates(corrupt=1e-4)),
    "serial-mixed": (
        "serial",
        FaultRates(corrupt=1e-4, drop=1e-5, duplicate=1e-5, truncate=1e-5),
    ),
}


@requires_link
@pytest.mark.parametrize(
    "case",
    LINK_CASES,
)
def test_link_layer_repairs_faults_all_transfers_byte_exact(
    daemons, backends, fault_relays, short_dir, case
):
    """With ``--link on``, 32 concurrent transfers complete byte-exact at 1
    corrupted byte in 10,000 (and with loss, duplication and truncation too)."""
    kind, rates = LINK_CASES[case]
    echo = backends(EchoServer)
    port = free_port()
    args = ["--connect-timeout", "10", "--link", "on"]
    if kind == "serial":
        relay = fault_relays(SerialFaultRelay, seed=21)
        pair = serial_pair(daemons, relay, port, echo, args, short_dir / "host.sock")
    else:
        channel = free_port()
        relay = fault_relays(TcpFaultRelay, channel, seed=22)
        pair = tcp_pair(daemons, channel, relay, port, echo, args, short_dir / "host.sock")
    relay.set_faults(rates)
    outcomes = run_transfers(port, count=32, concurrency=32, size=64 * 1024, seed=31)
    counts = relay.counts()
    relay.set_faults(None)
    report(f"link layer, {case}", counts, outcomes, 0, pair)
    assert_never_wrong(outcomes)
    assert all(o.how == "complete" for o in outcomes), tally(outcomes)
    assert faults_done(counts) > 0
    status = host_status(pair)
    if status is not None:  # the status interface tells what the link repaired
        print(f"[link layer, {case}] host status: {status_counters(status)}")
        assert status["crc_errors"] > 0 and status["retransmits"] > 0, status
    assert pair.host.alive() and pair.guest.alive()
