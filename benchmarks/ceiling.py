"""How close is virtproxy's bulk path to what a Python relay can do at all?

One upload through three relay chains of the same shape (client -> relay A ->
relay B -> sink, all on 127.0.0.1), side by side in one run:

``blocking``
    two minimal Python relays: one blocking ``recv_into``/``sendall`` loop
    with a 256 KiB buffer, no framing, no multiplexing, no event loop.  The
    ceiling for any Python relay with two TCP hops more than direct.
``twisted``
    two plain Twisted relays (``twisted.protocols.portforward``, 256 KiB
    reads): what the idiomatic Twisted way costs.
``vp-tcp``
    two virtproxy daemons over a TCP channel, default options.

Prints MB/s and the relays' CPU seconds per GB (A+B), medians of the rounds::

    python benchmarks/ceiling.py [--mib 1024] [--rounds 3]

The client, the sink and each relay are separate processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
CHAINS = ["blocking", "twisted", "vp-tcp"]

BLOCKING_RELAY = r"""
import socket, sys
listen, onward = int(sys.argv[1]), int(sys.argv[2])
server = socket.create_server(("127.0.0.1", listen))
print("ready", flush=True)
inbound, _ = server.accept()
outbound = socket.create_connection(("127.0.0.1", onward))
for s in (inbound, outbound):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(256 * 1024)
view = memoryview(buf)
while n := inbound.recv_into(buf):
    outbound.sendall(view[:n])
outbound.shutdown(socket.SHUT_WR)
outbound.recv(1)
"""

TWISTED_RELAY = r"""
import sys
from twisted.internet import reactor
from twisted.protocols import portforward

class Client(portforward.ProxyClient):
    def connectionMade(self):
        self.transport.bufferSize = 256 * 1024
        super().connectionMade()

class ClientFactory(portforward.ProxyClientFactory):
    protocol = Client

class Server(portforward.ProxyServer):
    clientProtocolFactory = ClientFactory
    def connectionMade(self):
        self.transport.bufferSize = 256 * 1024
        super().connectionMade()

class Factory(portforward.ProxyFactory):
    protocol = Server

reactor.listenTCP(int(sys.argv[1]), Factory("127.0.0.1", int(sys.argv[2])), interface="127.0.0.1")
print("ready", flush=True)
reactor.run()
"""

SINK = r"""
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = server.accept()
buf = bytearray(1 << 20)
total = 0
while n := conn.recv_into(buf):
    total += n
print(total, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port?  (Read from /proc: a probe
    connection would itself travel the chain and use up the sink's accept.)"""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            return True
    return False


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not listening(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} is not listening on {port}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )


def relays(chain: str, entry: int, sink: int) -> list[subprocess.Popen[bytes]]:
    """Start relay B then relay A; return [A, B] once A accepts connections."""
    if chain == "vp-tcp":
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        channel = free_port()
        host = start(
            [PY, "-m", "virtproxy", "-c", f"tcp-listen:127.0.0.1:{channel}",
             "-o", f"bulk:127.0.0.1:{entry}"],
            env,
        )  # fmt: skip
        wait_listening(channel, host, "virtproxy host")
        guest = start(
            [PY, "-m", "virtproxy", "-c", f"tcp-connect:127.0.0.1:{channel}",
             "-i", f"bulk:127.0.0.1:{sink}"],
            env,
        )  # fmt: skip
        wait_listening(entry, host, "virtproxy host")
        time.sleep(1.0)  # the session handshake
        return [host, guest]
    source = BLOCKING_RELAY if chain == "blocking" else TWISTED_RELAY
    middle = free_port()
    b = start([PY, "-c", source, str(middle), str(sink)])
    assert b.stdout is not None
    b.stdout.readline()
    a = start([PY, "-c", source, str(entry), str(middle)])
    assert a.stdout is not None
    a.stdout.readline()
    return [a, b]


def one_round(chain: str, mib: int) -> tuple[float, float]:
    """MB/s (10^6 bytes/s) and relay CPU seconds per GB for one upload of ``mib`` MiB."""
    sink_port, entry = free_port(), free_port()
    sink = start([PY, "-c", SINK, str(sink_port)])
    procs = [sink]
    try:
        assert sink.stdout is not None
        sink.stdout.readline()
        pair = relays(chain, entry, sink_port)
        procs += pair
        before = sum(cpu_seconds(p.pid) for p in pair)
        block = b"x" * (1 << 20)
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", entry)) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(mib):
                client.sendall(block)
            client.shutdown(socket.SHUT_WR)
            received = int(sink.stdout.readline())
            elapsed = time.perf_counter() - started
        if received != mib << 20:
            raise RuntimeError(f"{chain}: the sink got {received} of {mib << 20} bytes")
        cpu = sum(cpu_seconds(p.pid) for p in pair) - before
        return (mib << 20) / elapsed / 1e6, cpu / ((mib << 20) / 1e9)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="upload size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {chain: [] for chain in CHAINS}
    for n in range(args.rounds):
        for chain in CHAINS[n % len(CHAINS) :] + CHAINS[: n % len(CHAINS)]:
            results[chain].append(one_round(chain, args.mib))
            rate, cpu = results[chain][-1]
            print(f"round {n + 1} {chain:9s} {rate:6.0f} MB/s  {cpu:.2f} CPU s/GB", file=sys.stderr)
    print(f"{'chain':10s} {'MB/s':>6s} {'relay CPU s/GB':>15s} {'vs blocking':>12s}")
    ceiling = statistics.median(r for r, _ in results["blocking"])
    for chain in CHAINS:
        rate = statistics.median(r for r, _ in results[chain])
        cpu = statistics.median(c for _, c in results[chain])
        print(f"{chain:10s} {rate:6.0f} {cpu:15.2f} {rate / ceiling:11.2f}x")


if __name__ == "__main__":
    main()
