#!/usr/bin/env python
"""One host process, many channels: RSS and CPU of the host daemon.

    python benchmarks/many_channels.py [--channels 100] [--streams 10] [--rounds 5]

Starts a host virtproxy with ``--channels`` tcp-listen channels (from a config
file, with a control socket) and one guest process with as many tcp-connect
channels, opens ``--streams`` client connections per channel through the
host's oforwards to an echo server behind the guest, and reports the host's
resident set size and CPU time: idle with every session up, idle with every
stream open (keepalive cost), and while every stream echoes 16 KiB per round.
Everything runs on 127.0.0.1; the processes are killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOOPBACK = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def echo_server() -> int:
    """A selectors echo server in a thread (stands in for the guest's services)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(2048)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)

    def loop() -> None:
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is listener:
                    conn, _ = listener.accept()
                    conn.setblocking(True)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if data:
                    sock.sendall(data)  # type: ignore[union-attr]
                else:
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]

    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1]


def proc_usage(pid: int) -> tuple[int, float]:
    """(RSS in KiB, CPU seconds user+system) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / TICK


def ctl(control: str, *args: str) -> object:
    out = subprocess.run(
        [sys.executable, "-m", "virtproxy", "ctl", "--control", control, *args, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out)


ENV = dict(os.environ, PYTHONPATH=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of each idle sample")
    args = parser.parse_args()
    n, per = args.channels, args.streams

    tmp = tempfile.mkdtemp(prefix="vpmany-")
    backend = echo_server()
    ports = free_ports(2 * n)
    chans, fwds = ports[:n], ports[n:]
    control = os.path.join(tmp, "host.sock")
    host_conf = [f'control = "{control}"']
    guest_conf = []
    for i in range(n):
        host_conf += [
            f"[channels.vm{i}]",
            f'channel = "tcp-listen:{LOOPBACK}:{chans[i]}"',
            f'oforwards = {{ echo = "{LOOPBACK}:{fwds[i]}" }}',
        ]
        guest_conf += [
            f"[channels.vm{i}]",
            f'channel = "tcp-connect:{LOOPBACK}:{chans[i]}"',
            f'iforwards = {{ echo = "{LOOPBACK}:{backend}" }}',
        ]
    for name, lines in (("host", host_conf), ("guest", guest_conf)):
        with open(os.path.join(tmp, f"{name}.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    procs = []
    try:
        for name in ("host", "guest"):
            log = open(os.path.join(tmp, f"{name}.log"), "wb")  # noqa: SIM115 (the child keeps it)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "virtproxy", "--config", f"{tmp}/{name}.toml"],
                    stdout=log,
                    stderr=log,
                    env=ENV,
                    start_new_session=True,
                )
            )
            if name == "host":
                deadline = time.monotonic() + 30
                while not os.path.exists(control):
                    assert time.monotonic() < deadline, "host did not start"
                    time.sleep(0.1)
        host = procs[0].pid
        deadline = time.monotonic() + 60
        while True:
            status = ctl(control, "status")
            up = sum(1 for row in status if row["state"] == "up")  # type: ignore[union-attr]
            if up == n:
                break
            assert time.monotonic() < deadline, f"only {up} of {n} sessions up"
            time.sleep(0.5)
        _, cpu0 = proc_usage(host)
        time.sleep(args.idle)
        rss1, cpu1 = proc_usage(host)
        report = {
            "channels": n,
            "streams_per_channel": per,
            "rss_kib_sessions_up": rss1,
            "cpu_percent_idle_sessions": 100 * (cpu1 - cpu0) / args.idle,
        }

        clients = []
        for i in range(n):
            for _ in range(per):
                s = socket.create_connection((LOOPBACK, fwds[i]), timeout=30)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                clients.append(s)
        for s in clients:  # every stream is open end to end
            s.sendall(b"x")
        for s in clients:
            assert s.recv(1) == b"x"
        streams = ctl(control, "streams")
        assert len(streams) == n * per, len(streams)  # type: ignore[arg-type]
        _, cpu2 = proc_usage(host)
        time.sleep(args.idle)
        rss3, cpu3 = proc_usage(host)
        report["rss_kib_streams_open"] = rss3
        report["cpu_percent_idle_streams"] = 100 * (cpu3 - cpu2) / args.idle

        payload = os.urandom(16384)
        t0 = time.monotonic()
        _, cpu4 = proc_usage(host)
        for _ in range(args.rounds):
            for s in clients:
                s.sendall(payload)
            for s in clients:
                got = 0
                while got < len(payload):
                    chunk = s.recv(65536)
                    assert chunk, "stream closed"
                    got += len(chunk)
        elapsed = time.monotonic() - t0
        rss5, cpu5 = proc_usage(host)
        moved = 2 * len(payload) * len(clients) * args.rounds
        report["rss_kib_after_traffic"] = rss5
        report["traffic_mb_each_way"] = round(moved / 2 / 1e6, 1)
        report["traffic_seconds"] = round(elapsed, 2)
        report["host_cpu_seconds_traffic"] = round(cpu5 - cpu4, 2)
        report["host_cpu_seconds_per_gb"] = round((cpu5 - cpu4) / (moved / 1e9), 1)
        for s in clients:
            s.close()
        for key, value in report.items():
            if isinstance(value, float):
                report[key] = round(value, 2)
        print(json.dumps(report, indent=1))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
