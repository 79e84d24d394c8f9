"""How many short connections a second can a relay chain carry at all?

The short-connection workload of run.py (connect, send one byte, read the
echo, close; one connection after the other) through relay chains of the
same shape (client -> relay A -> relay B -> echo target, all on 127.0.0.1),
side by side in one run.  Each hand-written relay below serves many clients
and relays only tiny messages (a send the kernel does not take whole is
finished blocking): it exists to measure a connection's fixed cost, not to
move data.

``loop``
    two minimal Python relays on a bare ``select.epoll`` loop: accept,
    connect onward, copy, pass EOF on, close.  No framework, no framing, no
    multiplexing.  About the most a Python event loop can do.
``reactor``
    the same relay driven by Twisted's epoll reactor (``addReader`` with
    raw sockets), but with none of Twisted's transports, protocols,
    producers or Deferreds: what the reactor itself costs.
``twisted``
    two plain Twisted relays (``twisted.protocols.portforward``): the
    idiomatic Twisted way, one transport and protocol per socket.
``asyncio``
    two relays on asyncio ``Protocol`` objects (no streams).
``ssh``
    OpenSSH local forwarding (``ssh -L`` to a private sshd, as in run.py):
    the peer the short-connection target is stated against.
``vp-tcp``
    two virtproxy daemons over a TCP channel, default options.

Prints connections per second and the relays' CPU microseconds per
connection (A+B, with sshd's children), medians of the rounds, and each rate
against ssh's::

    python benchmarks/ceiling_short.py [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench_run  # noqa: E402  (run.py's target, client, sshd and virtproxy setup)
from ceiling import TWISTED_RELAY  # noqa: E402

PY = sys.executable
CHAINS = ["loop", "reactor", "twisted", "asyncio", "ssh", "vp-tcp"]

#: Shared by the hand-written relays: argv is the listen port and the onward port.
RELAY_COMMON = r"""
import socket, sys
listen, onward = int(sys.argv[1]), int(sys.argv[2])
server = socket.create_server(("127.0.0.1", listen), backlog=512)
server.setblocking(False)


def pair():
    inbound, _ = server.accept()
    outbound = socket.socket()
    for s in (inbound, outbound):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outbound.connect_ex(("127.0.0.1", onward))
    return inbound, outbound


def forward(data, to):
    sent = to.send(data)
    if sent < len(data):  # never for one byte; correct, not fast
        to.setblocking(True)
        to.sendall(data[sent:])
        to.setblocking(False)
"""

LOOP_RELAY = (
    RELAY_COMMON
    + r"""
import select
poll = select.epoll()
poll.register(server.fileno(), select.EPOLLIN)
other, sockets, ended = {}, {}, set()
print("ready", flush=True)
while True:
    for fd, _ in poll.poll():
        if fd == server.fileno():
            try:
                a, b = pair()
            except BlockingIOError:
                continue
            other[a.fileno()], other[b.fileno()] = b, a
            sockets[a.fileno()], sockets[b.fileno()] = a, b
            poll.register(a.fileno(), select.EPOLLIN)
            poll.register(b.fileno(), select.EPOLLIN)
            continue
        me, to = sockets[fd], other[fd]
        try:
            data = me.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            forward(data, to)
            continue
        poll.unregister(fd)
        try:
            to.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        ended.add(fd)
        if to.fileno() in ended:
            ended.discard(fd)
            ended.discard(to.fileno())
            for gone in (fd, to.fileno()):
                del other[gone]
                sockets.pop(gone).close()
"""
)

REACTOR_RELAY = (
    RELAY_COMMON
    + r"""
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor


class Reader:
    # What the reactor asks of a reader, for one socket.

    def __init__(self, sock):
        self.sock, self.fd = sock, sock.fileno()

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return type(self).__name__

    def connectionLost(self, reason):
        pass


class Half(Reader):
    other = None
    ended = False

    def doRead(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            forward(data, self.other.sock)
            return
        reactor.removeReader(self)
        try:
            self.other.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.ended = True
        if self.other.ended:
            self.sock.close()
            self.other.sock.close()


class Listener(Reader):
    def doRead(self):
        try:
            a, b = map(Half, pair())
        except BlockingIOError:
            return
        a.other, b.other = b, a
        reactor.addReader(a)
        reactor.addReader(b)


reactor.addReader(Listener(server))
print("ready", flush=True)
reactor.run()
"""
)

ASYNCIO_RELAY = r"""
import asyncio, socket, sys
listen, onward = int(sys.argv[1]), int(sys.argv[2])


class Onward(asyncio.Protocol):
    def __init__(self, inbound):
        self.inbound = inbound

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def data_received(self, data):
        self.inbound.transport.write(data)

    def eof_received(self):
        self.inbound.transport.write_eof()
        return True

    def connection_lost(self, exc):
        self.inbound.transport.close()


class Inbound(asyncio.Protocol):
    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport, self.onward, self.early, self.eof = transport, None, [], False
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self):
        loop = asyncio.get_running_loop()
        _, self.onward = await loop.create_connection(lambda: Onward(self), "127.0.0.1", onward)
        for data in self.early:
            self.onward.transport.write(data)
        if self.eof:
            self.onward.transport.write_eof()

    def data_received(self, data):
        if self.onward is None:
            self.early.append(data)
        else:
            self.onward.transport.write(data)

    def eof_received(self):
        if self.onward is None:
            self.eof = True
        else:
            self.onward.transport.write_eof()
        return True

    def connection_lost(self, exc):
        if self.onward is not None:
            self.onward.transport.close()


async def main():
    server = await asyncio.get_running_loop().create_server(
        Inbound, "127.0.0.1", listen, backlog=512
    )
    print("ready", flush=True)
    await server.serve_forever()


asyncio.run(main())
"""

SOURCES = {
    "loop": LOOP_RELAY,
    "reactor": REACTOR_RELAY,
    "twisted": TWISTED_RELAY,
    "asyncio": ASYNCIO_RELAY,
}


def start_chain(
    chain: str, target: int, procs: bench_run.Procs, setup: bench_run.Setup
) -> bench_run.Peer:
    """A chain's relays towards ``target``, once its entry echoes."""
    if chain in ("ssh", "vp-tcp"):
        return setup.make(chain, target)
    entry, middle = bench_run.free_port(), bench_run.free_port()
    started = []
    for name, listen, onward in (("B", middle, target), ("A", entry, middle)):
        relay = procs.start(f"{chain}-{name}", [PY, "-c", SOURCES[chain], str(listen), str(onward)])
        bench_run.wait_until(lambda p=listen: bench_run.listening(p), 15, f"{chain} {name}", relay)
        started.append((name, relay))
    peer = bench_run.Peer(chain, entry, started, [relay for _, relay in started])
    bench_run.wait_until(lambda: bench_run.echo_ok(entry), 30, f"{chain} echo through entry")
    return peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {chain: [] for chain in CHAINS}
    cpus: dict[str, list[float]] = {chain: [] for chain in CHAINS}
    with tempfile.TemporaryDirectory(prefix="vp-ceiling-short-") as tmp:
        procs = bench_run.Procs(tmp)
        setup = bench_run.Setup(procs, tmp)
        try:
            ports = {chain: bench_run.free_port() for chain in CHAINS}
            target = procs.start(
                "target",
                [PY, bench_run.BENCH, "target", "--ports", ",".join(map(str, ports.values()))],
                stdout_pipe=True,
            )
            assert target.stdout is not None
            if b"ready" not in target.stdout.readline():
                raise RuntimeError("the echo target did not start")
            peers = {chain: start_chain(chain, ports[chain], procs, setup) for chain in CHAINS}
            time.sleep(0.5)
            for n in range(args.rounds):
                for chain in CHAINS[n % len(CHAINS) :] + CHAINS[: n % len(CHAINS)]:
                    peer = peers[chain]
                    before = bench_run.relays_cpu(peer)
                    result = bench_run.client(
                        "short", peer.entry, 30 + args.seconds, max_seconds=args.seconds, timeout=5
                    )
                    if not result.get("ok") or not result.get("conns"):
                        raise RuntimeError(f"{chain}: {result}")
                    cpu = bench_run.relays_cpu(peer) - before
                    rates[chain].append(result["rate"])
                    cpus[chain].append(1e6 * cpu / result["conns"])
                    print(
                        f"round {n + 1} {chain:8s} {rates[chain][-1]:6.0f} conn/s "
                        f"{cpus[chain][-1]:5.0f} relay CPU us/conn",
                        file=sys.stderr,
                    )
        finally:
            procs.stop_all()
    print(f"{'chain':9s} {'conn/s':>7s} {'relay CPU us/conn':>18s} {'vs ssh':>7s}")
    ssh_rate = statistics.median(rates["ssh"])
    for chain in CHAINS:
        rate = statistics.median(rates[chain])
        cpu = statistics.median(cpus[chain])
        print(f"{chain:9s} {rate:7.0f} {cpu:18.0f} {rate / ssh_rate:6.2f}x")


if __name__ == "__main__":
    main()
