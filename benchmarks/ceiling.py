"""How close is virtproxy's bulk path to what a relay can do at all?

One upload through relay chains of the same shape (client -> relay A ->
relay B -> sink, all on 127.0.0.1), side by side in one run:

``blocking``
    two minimal Python relays: one blocking ``recv_into``/``sendall`` loop
    with a 256 KiB buffer, no framing, no multiplexing, no event loop.  The
    ceiling for any Python relay that copies the bytes through user space.
``splice``
    the same, but each relay moves the bytes with ``splice(2)`` through a
    pipe, never copying them to user space (Linux only): about the most any
    relay process can do, in any language.
``framed``
    ``splice`` with virtproxy's framing cost: relay A sends an 18-byte frame
    header (and the previous frame's 4-byte trailer) before each payload of up
    to 1 MiB it splices, relay B reads each header and splices the payload on.
    What virtproxy could reach with DATA frames longer than the 64 KiB its
    16-bit length allows, moved by splice (with 64 KiB frames: ``--frame
    65535``).
``ssh``
    OpenSSH local forwarding (``ssh -L`` to a private sshd, as in run.py):
    the peer the bulk target is stated against.
``twisted``
    two plain Twisted relays (``twisted.protocols.portforward``, 256 KiB
    reads): what the idiomatic Twisted way costs.
``vp-tcp``
    two virtproxy daemons over a TCP channel, default options.

Prints MB/s and the relays' CPU seconds per GB (A+B, with ssh's and sshd's
children), medians of the rounds, and each rate against blocking's and ssh's::

    python benchmarks/ceiling.py [--mib 1024] [--rounds 3] [--frame 1048576]

The client, the sink and each relay are separate processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench_run  # noqa: E402  (run.py's private sshd setup, for the ssh chain)

PY = sys.executable
CHAINS = ["blocking", "splice", "framed", "ssh", "twisted", "vp-tcp"]

#: What every hand-written relay starts with: accept one client, connect onward.
#: argv: listen port, onward port, role (a or b), frame size.
RELAY_START = r"""
import fcntl, os, socket, struct, sys
listen, onward, role, frame = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
server = socket.create_server(("127.0.0.1", listen))
print("ready", flush=True)
inbound, _ = server.accept()
outbound = socket.create_connection(("127.0.0.1", onward))
for s in (inbound, outbound):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
src, dst = inbound.fileno(), outbound.fileno()
"""

#: ... and how it ends: EOF onward, then wait for the sink to close.
RELAY_END = r"""
outbound.shutdown(socket.SHUT_WR)
outbound.recv(1)
"""

#: A pipe for splice(2); the default 64 KiB one still works, in smaller steps.
PIPE = r"""
r, w = os.pipe()
try:
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
except OSError:
    pass
"""

BLOCKING_RELAY = (
    RELAY_START
    + r"""
buf = bytearray(256 * 1024)
view = memoryview(buf)
while n := inbound.recv_into(buf):
    outbound.sendall(view[:n])
"""
    + RELAY_END
)

SPLICE_RELAY = (
    RELAY_START
    + PIPE
    + r"""
while n := os.splice(src, w, 1 << 20):
    while n:
        n -= os.splice(r, dst, n)
"""
    + RELAY_END
)

FRAMED_RELAY = (
    RELAY_START
    + PIPE
    + r"""
HEADER = struct.Struct("!10sI")  # 14 bytes, as virtproxy's, with a 32-bit length


def move(count):
    while count:
        got = os.splice(src, w, count)
        if not got:
            raise SystemExit("cut short")
        count -= got
        while got:
            got -= os.splice(r, dst, got)


if role == "a":  # bytes in, frames out
    trailer = b""
    while n := os.splice(src, w, frame):
        outbound.send(trailer + HEADER.pack(b"h" * 10, n), socket.MSG_MORE)
        left = n
        while left:
            left -= os.splice(r, dst, left, flags=os.SPLICE_F_MORE)
        trailer = b"t" * 4
    outbound.send(trailer)
else:  # frames in, bytes out
    wanted = HEADER.size
    while True:
        head = b""
        while len(head) < wanted and (part := inbound.recv(wanted - len(head))):
            head += part
        if len(head) < wanted:
            break
        move(HEADER.unpack_from(head, len(head) - HEADER.size)[1])
        wanted = 4 + HEADER.size
"""
    + RELAY_END
)

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


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """run.py's ``listening`` (read from /proc: a probe connection would itself
    travel the chain and use up the sink's single accept) until ``proc`` is up."""
    deadline = time.monotonic() + 15
    while not bench_run.listening(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} is not listening on {port}")
        time.sleep(0.05)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )


def relays(
    chain: str, sink: int, ssh: bench_run.Setup, frame: int
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Start a chain's relays towards ``sink``: its entry port, and the relay processes."""
    if chain == "ssh":
        peer = ssh.ssh(sink, None)
        return peer.entry, list(peer.procs)
    entry = bench_run.free_port()
    if chain == "vp-tcp":
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        channel = bench_run.free_port()
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
        return entry, [host, guest]
    source = {"blocking": BLOCKING_RELAY, "splice": SPLICE_RELAY, "framed": FRAMED_RELAY}
    code = source.get(chain, TWISTED_RELAY)
    middle = bench_run.free_port()
    b = start([PY, "-c", code, str(middle), str(sink), "b", str(frame)])
    assert b.stdout is not None
    b.stdout.readline()
    a = start([PY, "-c", code, str(entry), str(middle), "a", str(frame)])
    assert a.stdout is not None
    a.stdout.readline()
    return entry, [a, b]


def relays_cpu(relays: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds of the relays and their children (sshd forks one per connection)."""
    kids = bench_run.ppid_map()
    return sum(bench_run.tree_cpu(p.pid, kids) for p in relays)


def one_round(chain: str, mib: int, ssh: bench_run.Setup, frame: int) -> tuple[float, float]:
    """MB/s (10^6 bytes/s) and relay CPU seconds per GB for one upload of ``mib`` MiB."""
    sink_port = bench_run.free_port()
    sink = start([PY, "-c", SINK, str(sink_port)])
    pair: list[subprocess.Popen[bytes]] = []
    try:
        assert sink.stdout is not None
        sink.stdout.readline()
        entry, pair = relays(chain, sink_port, ssh, frame)
        before = relays_cpu(pair)
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
        cpu = relays_cpu(pair) - before
        return (mib << 20) / elapsed / 1e6, cpu / ((mib << 20) / 1e9)
    finally:
        for proc in [sink, *pair]:
            if chain == "ssh" and proc is not sink:
                ssh.procs.stop(proc)
            else:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="upload size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--frame", type=int, default=1 << 20, help="framed: largest payload (default 1 MiB)"
    )
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {chain: [] for chain in CHAINS}
    with tempfile.TemporaryDirectory(prefix="vp-ceiling-") as tmp:
        procs = bench_run.Procs(tmp)
        ssh = bench_run.Setup(procs, tmp)
        try:
            for n in range(args.rounds):
                for chain in CHAINS[n % len(CHAINS) :] + CHAINS[: n % len(CHAINS)]:
                    results[chain].append(one_round(chain, args.mib, ssh, args.frame))
                    rate, cpu = results[chain][-1]
                    print(
                        f"round {n + 1} {chain:9s} {rate:6.0f} MB/s  {cpu:.2f} CPU s/GB",
                        file=sys.stderr,
                    )
        finally:
            procs.stop_all()
    print(f"{'chain':10s} {'MB/s':>6s} {'relay CPU s/GB':>15s} {'vs blocking':>12s} {'vs ssh':>7s}")
    ceiling = statistics.median(r for r, _ in results["blocking"])
    ssh_rate = statistics.median(r for r, _ in results["ssh"])
    for chain in CHAINS:
        rate = statistics.median(r for r, _ in results[chain])
        cpu = statistics.median(c for _, c in results[chain])
        print(
            f"{chain:10s} {rate:6.0f} {cpu:15.2f} {rate / ceiling:11.2f}x {rate / ssh_rate:6.2f}x"
        )


if __name__ == "__main__":
    main()
