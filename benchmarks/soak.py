#!/usr/bin/env python
"""Soak test: a long mixed workload through two real virtproxy daemons.

    python benchmarks/soak.py [--duration 600] [--restart-every 60] [--json out.json]

Topology (all on 127.0.0.1)::

    clients -> host daemon (tcp-listen channel, -o forwards) -> guest daemon
            (tcp-connect channel, -i forwards) -> _bench.py target

Client threads in this process loop until the end: bulk uploads checked by
SHA-256 (each ends with a half-close), downloads, interactive echo round
trips, short open/echo/close connections, and refusals (a service the guest
does not serve, and one whose target refuses).  Every ``--restart-every``
seconds the guest daemon is restarted (SIGKILL and SIGTERM alternately), so
the host sees its peer restart.  Each daemon's open file descriptors and RSS
are sampled every second.

Flatness is judged on quiet moments: after a warm-up the workload pauses and
both daemons are sampled idle (the baseline); at the end the workload stops
and they are sampled idle again.  The host daemon lives for the whole run; the
guest is judged on its last generation (its baseline is taken again, idle,
after its last restart has warmed up).  Wrong bytes are always a failure;
transfers cut by a restart are counted, not failed.  Exit status 1 if
anything leaked or a byte was wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import (  # noqa: E402
    BENCH,
    PY,
    REPO,
    Procs,
    echo_ok,
    free_port,
    listening,
    machine,
    status_kib,
    wait_log,
    wait_until,
)

COUNT = struct.Struct(">Q")
#: Extra idle file descriptors tolerated at the end (a lazily opened log or
#: resolver socket is not a leak; a leak grows with the thousands of streams),
#: plus the four of a channel connection's two BULK pipes, made on its first
#: BULK frame each way and kept while it lasts (virtproxy/splicing.py).
FD_TOLERANCE = 8
#: RSS growth tolerated at the end over the idle baseline: allocator noise and
#: caches that fill once, not per stream.
RSS_TOLERANCE_KIB = 8 * 1024
RSS_TOLERANCE_RATIO = 0.25


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


@dataclass
class Counts:
    """What the workers did; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: dict[str, int] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            if outcome == "ok":
                self.ok[kind] = self.ok.get(kind, 0) + 1
            else:  # by kind and how: "refusal: cut (TimeoutError)"
                key = f"{kind}: {outcome}"
                self.cut[key] = self.cut.get(key, 0) + 1

    def bad(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)


class Soak:
    def __init__(self, args: argparse.Namespace, procs: Procs) -> None:
        self.args = args
        self.procs = procs
        self.counts = Counts()
        self.stop = threading.Event()
        #: Cleared while the workload pauses for an idle sample.
        self.running = threading.Event()
        self.running.set()
        self.busy = 0
        self.busy_lock = threading.Lock()
        self.samples: list[dict] = []
        self.env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.target = free_port()
        self.channel = free_port()
        self.entry = {name: free_port() for name in ("bench", "nosvc", "refused")}
        self.host = self.guest = self.target_proc = None  # type: ignore[assignment]
        self.guest_generation = 0
        self.restarts = 0
        self.logs: list[str] = []

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        self.target_proc = self.procs.start(
            "target", [PY, BENCH, "target", "--ports", str(self.target)], stdout_pipe=True
        )
        wait_until(lambda: listening(self.target), 20, "target", self.target_proc)
        forwards: list[str] = []
        for name, port in self.entry.items():
            forwards += ["-o", f"{name}:127.0.0.1:{port}"]
        self.host = self.procs.start(
            "host",
            [
                PY,
                "-m",
                "virtproxy",
                "-c",
                f"tcp-listen:127.0.0.1:{self.channel}",
                *forwards,
                *self.args.daemon_arg,
            ],
            env=self.env,
        )
        self.logs.append(self.host.logpath)  # type: ignore[attr-defined]
        wait_until(lambda: listening(self.channel), 20, "host channel", self.host)
        self.start_guest()
        wait_until(lambda: echo_ok(self.entry["bench"]), 30, "echo through the daemons")

    def start_guest(self) -> None:
        self.guest_generation += 1
        refused = free_port()  # nothing listens there
        self.guest = self.procs.start(
            f"guest{self.guest_generation}",
            [
                PY,
                "-m",
                "virtproxy",
                "-c",
                f"tcp-connect:127.0.0.1:{self.channel}",
                "-i",
                f"bench:127.0.0.1:{self.target}",
                "-i",
                f"refused:127.0.0.1:{refused}",
                "--connect-timeout",
                "3",
                *self.args.daemon_arg,
            ],
            env=self.env,
        )
        self.logs.append(self.guest.logpath)  # type: ignore[attr-defined]
        wait_log(self.guest, "session up", 30)

    def restart_guest(self) -> None:
        """Peer restart: SIGKILL (no GOAWAY) and SIGTERM (GOAWAY) alternately."""
        self.restarts += 1
        old = self.guest
        if self.restarts % 2:
            os.killpg(old.pid, signal.SIGKILL)
        self.procs.stop(old)
        self.start_guest()

    # ------------------------------------------------------------ workers

    def connect(self, name: str = "bench", timeout: float = 20.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.entry[name]), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def worker(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        job = getattr(self, f"job_{kind}")
        while not self.stop.is_set():
            if not self.running.is_set():
                self.running.wait(1.0)
                continue
            with self.busy_lock:
                self.busy += 1
            try:
                outcome = job(rng)
            except (OSError, EOFError) as e:
                outcome = f"cut ({type(e).__name__})"
            finally:
                with self.busy_lock:
                    self.busy -= 1
            self.counts.add(kind, outcome)
            # Bulk jobs rest longer: a soak looks for leaks, not for peak throughput.
            think = self.args.think * (6 if kind in ("bulk", "download") else 1)
            self.stop.wait(rng.uniform(0.0, think))

    @staticmethod
    def recv_exact(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def job_bulk(self, rng: random.Random) -> str:
        """Upload, half-close, and compare the target's count and SHA-256."""
        size = rng.randint(64 * 1024, self.args.bulk_bytes)
        data = rng.randbytes(size)
        with self.connect() as s:
            s.sendall(b"h")
            for i in range(0, size, 65536):
                s.sendall(data[i : i + 65536])
            s.shutdown(socket.SHUT_WR)
            reply = self.recv_exact(s, 8 + 32)
        (count,) = COUNT.unpack(reply[:8])
        if count != size or reply[8:] != hashlib.sha256(data).digest():
            self.counts.bad(f"bulk upload: {count} of {size} bytes or wrong hash")
            return "wrong"
        with self.counts.lock:
            self.counts.bytes_up += size
        return "ok"

    def job_download(self, rng: random.Random) -> str:
        size = rng.randint(1, self.args.bulk_bytes)
        with self.connect() as s:
            s.sendall(b"s" + COUNT.pack(size))
            got = 0
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    self.counts.bad("download: a nonzero byte from a zero source")
                    return "wrong"
                got += len(chunk)
        if got != size:
            return f"cut (download {got} of {size})"
        with self.counts.lock:
            self.counts.bytes_down += size
        return "ok"

    def job_interactive(self, rng: random.Random) -> str:
        """A session of keystroke-sized echo round trips."""
        rtts = []
        with self.connect() as s:
            s.sendall(b"e")
            self.recv_exact(s, 1)
            for _ in range(rng.randint(5, 40)):
                msg = rng.randbytes(rng.randint(1, 200))
                t0 = time.monotonic()
                s.sendall(msg)
                if self.recv_exact(s, len(msg)) != msg:
                    self.counts.bad("interactive: echo differs")
                    return "wrong"
                rtts.append(time.monotonic() - t0)
                time.sleep(rng.uniform(0.0, 0.05))
            s.shutdown(socket.SHUT_WR)
            if s.recv(1):
                self.counts.bad("interactive: bytes after the last echo")
                return "wrong"
        with self.counts.lock:
            self.counts.rtts.extend(rtts)
        return "ok"

    def job_short(self, rng: random.Random) -> str:
        """Open, one echo, close; sometimes close abruptly (RST) instead."""
        with self.connect() as s:
            s.sendall(b"ex")
            if self.recv_exact(s, 2) != b"ex":
                self.counts.bad("short: echo differs")
                return "wrong"
            if rng.random() < 0.3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "ok"

    def job_refusal(self, rng: random.Random) -> str:
        """An unknown service or a refused target: closed without a byte of data.

        The reset can come at any point, even before ``connect`` returns to us
        (TCP_NODELAY then fails): every such error is the refusal.
        """
        name = rng.choice(["nosvc", "refused"])
        data = b""
        try:
            with self.connect(name) as s:
                s.sendall(b"hello")
                data = s.recv(1024)
        except (ConnectionResetError, BrokenPipeError):
            pass
        if data:
            self.counts.bad(f"refusal ({name}): got data {data[:20]!r}")
            return "wrong"
        return "ok"

    # ------------------------------------------------------------ sampling

    def sample(self, phase: str) -> dict:
        point = {"t": round(time.monotonic() - self.t0, 1), "phase": phase}
        for role, proc in (("host", self.host), ("guest", self.guest)):
            point[f"{role}_fds"] = fd_count(proc.pid)
            point[f"{role}_rss"] = status_kib(proc.pid, "VmRSS")
        point["guest_gen"] = self.guest_generation
        self.samples.append(point)
        return point

    def idle_sample(self, phase: str) -> dict:
        """Pause the workload, wait until no client is mid-job, let the daemons settle."""
        self.running.clear()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.busy_lock:
                if not self.busy:
                    break
            time.sleep(0.1)
        time.sleep(self.args.settle)
        point = self.sample(phase)
        return point

    def run(self) -> dict:
        args = self.args
        self.t0 = time.monotonic()
        self.start()
        log(f"daemons up: host pid {self.host.pid}, guest pid {self.guest.pid}")
        kinds = {"bulk": 2, "download": 1, "interactive": 3, "short": 2, "refusal": 1}
        threads = []
        for kind, n in kinds.items():
            for i in range(n):
                t = threading.Thread(
                    target=self.worker, args=(kind, hash((kind, i)) & 0xFFFF), daemon=True
                )
                t.start()
                threads.append(t)
        end = self.t0 + args.duration
        warm = self.t0 + min(args.warmup, args.duration / 3)
        baseline = guest_baseline = None
        next_restart = self.t0 + args.restart_every
        last_restart = None
        while time.monotonic() < end:
            now = time.monotonic()
            if baseline is None and now >= warm:
                baseline = guest_baseline = self.idle_sample("baseline")
                log(f"idle baseline: {baseline}")
                self.running.set()
            elif (
                args.restart_every
                and now >= next_restart
                and now + args.restart_every / 2 < end
                and baseline is not None
            ):
                log(f"restarting the guest (restart {self.restarts + 1})")
                self.restart_guest()
                next_restart = time.monotonic() + args.restart_every
                last_restart = time.monotonic()
            elif (
                last_restart is not None
                and now - last_restart >= min(args.warmup, args.restart_every / 3)
                and guest_baseline is not None
                and guest_baseline["guest_gen"] != self.guest_generation
            ):
                guest_baseline = self.idle_sample("guest baseline")
                log(f"guest idle baseline (generation {self.guest_generation}): {guest_baseline}")
                self.running.set()
            else:
                self.sample("load")
            time.sleep(1.0)
        final = self.idle_sample("end")
        self.stop.set()
        self.running.set()
        for t in threads:
            t.join(30)
        log(f"idle at the end: {final}")
        assert baseline is not None and guest_baseline is not None
        return self.report(baseline, guest_baseline, final)

    def report(self, baseline: dict, guest_baseline: dict, final: dict) -> dict:
        def flat(role: str, base: dict) -> dict:
            load = [
                p for p in self.samples if role == "host" or p["guest_gen"] == final["guest_gen"]
            ]
            fds = [p[f"{role}_fds"] for p in load]
            rss = [p[f"{role}_rss"] for p in load]
            fd_ok = final[f"{role}_fds"] <= base[f"{role}_fds"] + FD_TOLERANCE
            rss_limit = base[f"{role}_rss"] + max(
                RSS_TOLERANCE_KIB, RSS_TOLERANCE_RATIO * base[f"{role}_rss"]
            )
            return {
                "fds_start": load[0][f"{role}_fds"],
                "fds_idle_baseline": base[f"{role}_fds"],
                "fds_peak": max(fds),
                "fds_idle_end": final[f"{role}_fds"],
                "rss_kib_start": load[0][f"{role}_rss"],
                "rss_kib_idle_baseline": base[f"{role}_rss"],
                "rss_kib_peak": max(rss),
                "rss_kib_idle_end": final[f"{role}_rss"],
                "fds_flat": fd_ok,
                "rss_flat": final[f"{role}_rss"] <= rss_limit,
            }

        c = self.counts
        rtts = sorted(c.rtts)
        result = {
            "machine": machine(),
            "duration_s": self.args.duration,
            "daemon_args": self.args.daemon_arg,
            "guest_restarts": self.restarts,
            "jobs_ok": c.ok,
            "jobs_cut": c.cut,
            "wrong": c.wrong,
            "mb_up": round(c.bytes_up / 1e6, 1),
            "mb_down": round(c.bytes_down / 1e6, 1),
            "rtt_ms_p50": round(1000 * statistics.median(rtts), 2) if rtts else None,
            "rtt_ms_p99": round(1000 * rtts[int(0.99 * (len(rtts) - 1))], 2) if rtts else None,
            "host": flat("host", baseline),
            "guest_last_generation": flat("guest", guest_baseline),
            "tracebacks": [path for path in self.logs if b"Traceback" in read(path)],
        }
        result["ok"] = (
            not c.wrong
            and not result["tracebacks"]
            and all(
                result[r][k]
                for r in ("host", "guest_last_generation")
                for k in ("fds_flat", "rss_flat")
            )
        )
        return result


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before the baseline")
    ap.add_argument(
        "--restart-every", type=float, default=60.0, help="restart the guest every N s (0: never)"
    )
    ap.add_argument("--bulk-bytes", type=int, default=2 << 20, help="largest bulk transfer")
    ap.add_argument("--think", type=float, default=0.3, help="max pause between a worker's jobs")
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds before a sample")
    ap.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        help="an extra option for both daemons, e.g. --daemon-arg=--link=on (repeatable)",
    )
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vp-soak-")
    procs = Procs(tmp)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    log(f"{machine()}; {args.duration:.0f} s; logs in {tmp}")
    try:
        result = Soak(args, procs).run()
    finally:
        procs.stop_all()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print("SOAK", "PASS" if result["ok"] else "FAIL")
    if result["ok"] and not os.environ.get("VP_BENCH_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
