#!/usr/bin/env python
# ruff: noqa: RUF005, E501, B023, B905, E731, SIM115, RUF059
"""Benchmark virtproxy side by side with direct TCP, socat and OpenSSH -L.

    python benchmarks/run.py [--quick] [--rounds N] [--latency-rounds N] [--only WORKLOAD[,...]]
                             [--json out.json]

Everything runs on 127.0.0.1; every process started here is killed on exit.
See benchmarks/README.rst for what is measured.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
BENCH = os.path.join(HERE, "_bench.py")
SSHD = "/usr/sbin/sshd"
VP_PATH = REPO  # directory holding the virtproxy package under test (--vp-path)

PEERS = ["direct", "socat", "ssh", "vp-tcp", "vp-unix"]
PACED_PEERS = ["direct", "socat", "ssh", "vp-tcp"]
WORKLOADS = ["bulk", "multi", "rtt", "rttload", "short", "many", "paced"]
#: Round trips move most from round to round on a shared box, and they are
#: short: they get more rounds (--latency-rounds).
LATENCY_WORKLOADS = {"rtt", "rttload"}
MB = 1e6
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# process bookkeeping


class Procs:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.n = 0

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
        cwd: str = REPO,
    ) -> subprocess.Popen:
        self.n += 1
        logpath = os.path.join(self.tmp, f"{self.n:03d}-{name}.log")
        logf = open(logpath, "wb")
        p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        logf.close()
        p.logpath = logpath  # type: ignore[attr-defined]
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 2.0) -> None:
        if p.poll() is None:
            kids = descendants(p.pid)
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
            for k in kids:
                try:
                    os.kill(k, signal.SIGTERM)
                except OSError:
                    pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            for k in kids + [p.pid]:
                try:
                    os.kill(k, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                pass
        for f in (p.stdout, p.stdin):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p, grace=1.0)


def ppid_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int, kids: dict | None = None) -> list[int]:
    kids = kids if kids is not None else ppid_map()
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int, kids: dict | None = None) -> float:
    """CPU seconds (user+sys, including reaped children) of pid and its live descendants."""
    tot = 0
    for q in [pid] + descendants(pid, kids):
        try:
            with open(f"/proc/{q}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2 :].split()
            tot += sum(int(x) for x in fields[11:15])
        except (OSError, ValueError):
            pass
    return tot / CLK_TCK


def relays_cpu(peer) -> float:
    kids = ppid_map()
    return sum(tree_cpu(p.pid, kids) for _, p in peer.relays)


def reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# --------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    want = f":{port:04X}"
    for path in ("/proc/net/tcp",):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode}); see {proc.logpath}")
        time.sleep(0.05)
    raise RuntimeError(f"timeout waiting for {what}")


def echo_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(3)
            s.sendall(b"e")
            return s.recv(1) == b"e"
    except OSError:
        return False


def wait_log(proc: subprocess.Popen, text: str, timeout: float) -> None:
    def pred() -> bool:
        with open(proc.logpath, "rb") as f:  # type: ignore[attr-defined]
            return text.encode() in f.read()

    wait_until(pred, timeout, f"{proc.name}: '{text}'", proc)  # type: ignore[attr-defined]


def client(workload: str, port: int, limit: float, **kw) -> dict:
    argv = [PY, BENCH, "client", workload, "--port", str(port)]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    try:
        r = subprocess.run(argv, capture_output=True, timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"client timeout >{limit:.0f} s", "timeout": limit}
    try:
        return json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": (r.stderr.decode()[-300:] or "no output")}


class ClientProcess:
    """A benchmark client in its own process: its stdout lines are collected as
    they come, it takes commands on stdin, and it ends with a JSON line."""

    def __init__(self, procs: Procs, name: str, argv: list[str]) -> None:
        self.procs = procs
        self.p = procs.start(name, argv, stdout_pipe=True, stdin_pipe=True)
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.lines.append(line.decode().strip())

    def wait_line(self, marker: str, timeout: float) -> bool:
        """Has the client printed ``marker`` (before it exited, within ``timeout``)?"""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.p.poll() is None:
            if marker in self.lines:
                return True
            time.sleep(0.02)
        return marker in self.lines

    def tell(self, command: bytes) -> None:
        try:
            self.p.stdin.write(command)  # type: ignore[union-attr]
            self.p.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            pass

    def last_json(self, missing: dict) -> dict:
        for line in reversed(self.lines):
            if line.startswith("{"):
                return json.loads(line)
        return missing


class Gated(ClientProcess):
    """An RTT client that connects (and handshakes) first, then waits for
    go() so that its connection exists before the background load starts."""

    def __init__(self, procs: Procs, workload: str, port: int, **kw) -> None:
        argv = [PY, BENCH, "client", workload, "--port", str(port), "--wait-go"]
        for k, v in kw.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        super().__init__(procs, workload, argv)

    def wait_connected(self, timeout: float) -> bool:
        return self.wait_line("connected", timeout)

    def go(self) -> None:
        self.tell(b"go\n")

    def result(self, timeout: float) -> dict:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(self.p)
            return {"ok": False, "error": f"client timeout >{timeout:.0f} s"}
        self.t.join(5)
        self.procs.stop(self.p)
        return self.last_json({"ok": False, "error": "no result"})


def rtt_under_load(
    procs: Procs,
    port: int,
    workload: str,
    limit: float,
    load_seconds: float,
    load_warmup: float,
    settle: float,
    **kw,
) -> dict:
    """RTT client connected first, then a bulk upload through the same entry,
    then the RTT measurement while the upload runs."""
    g = Gated(procs, workload, port, **kw)
    if not g.wait_connected(15):
        procs.stop(g.p)
        return {"ok": False, "error": "RTT connection failed before load"}
    ld = Loader(procs, port, load_seconds, warmup=load_warmup)
    if ld.wait_ready(20):
        time.sleep(settle)
        g.go()
        r = g.result(limit)
    else:
        procs.stop(g.p)
        r = {"ok": False, "error": "load did not start"}
    r["load"] = ld.finish()
    return r


class Loader(ClientProcess):
    """A bulk upload in its own process for the RTT-under-load workloads."""

    def __init__(self, procs: Procs, port: int, max_seconds: float, warmup: float) -> None:
        argv = [PY, BENCH, "client", "load", "--port", str(port)]
        argv += ["--max-seconds", str(max_seconds), "--warmup", str(warmup)]
        super().__init__(procs, "load", argv)

    def wait_ready(self, timeout: float) -> bool:
        return self.wait_line("ready", timeout)

    def finish(self) -> dict:
        self.tell(b"stop\n")
        self.t.join(10)
        self.procs.stop(self.p)
        return self.last_json({"goodput": 0.0, "error": "no result"})


# --------------------------------------------------------------------------
# peers


class Peer:
    def __init__(
        self, name: str, entry: int, relays: list[tuple[str, subprocess.Popen]], procs: list
    ) -> None:
        self.name = name
        self.entry = entry
        self.relays = relays  # (role, process) pairs whose RSS is reported
        self.procs = procs  # everything to stop on teardown


class Setup:
    def __init__(self, procs: Procs, tmp: str) -> None:
        self.procs = procs
        self.tmp = tmp
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = VP_PATH + os.pathsep + self.env.get("PYTHONPATH", "")
        self.ssh_ready = False

    def pacer(self, listen: int, upstream: int, rate: float) -> subprocess.Popen:
        p = self.procs.start(
            f"pace{listen}",
            [
                PY,
                BENCH,
                "pace",
                "--listen",
                str(listen),
                "--connect",
                f"127.0.0.1:{upstream}",
                "--rate",
                str(rate),
            ],
        )
        wait_until(lambda: listening(listen), 10, "pacer", p)
        return p

    def direct(self, target: int, rate: float | None) -> Peer:
        if rate is None:
            return Peer("direct", target, [], [])
        entry = free_port()
        pp = self.pacer(entry, target, rate)
        return Peer("direct", entry, [], [pp])

    def socat(self, target: int, rate: float | None) -> Peer:
        entry, mid = free_port(), free_port()
        b = self.procs.start(
            "socat-b",
            [
                "socat",
                f"TCP-LISTEN:{mid},bind=127.0.0.1,fork,reuseaddr,backlog=512",
                f"TCP:127.0.0.1:{target}",
            ],
        )
        wait_until(lambda: listening(mid), 10, "socat-b", b)
        hop, extra = mid, []
        if rate is not None:
            hop = free_port()
            extra = [self.pacer(hop, mid, rate)]
        a = self.procs.start(
            "socat-a",
            [
                "socat",
                f"TCP-LISTEN:{entry},bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=512",
                f"TCP:127.0.0.1:{hop},nodelay",
            ],
        )
        wait_until(lambda: listening(entry), 10, "socat-a", a)
        return Peer("socat", entry, [("A", a), ("B", b)], [a] + extra + [b])

    def ssh_files(self) -> None:
        if self.ssh_ready:
            return
        d = os.path.join(self.tmp, "ssh")
        os.makedirs(d, mode=0o700, exist_ok=True)
        for key in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)],
                check=True,
                timeout=30,
            )
        shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
        self.ssh_dir = d
        self.ssh_ready = True

    def ssh(self, target: int, rate: float | None) -> Peer:
        self.ssh_files()
        d = self.ssh_dir
        sport, entry = free_port(), free_port()
        cfg = os.path.join(d, f"sshd_config_{sport}")
        with open(cfg, "w") as f:
            f.write(f"""Port {sport}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd_{sport}.pid
StrictModes no
UsePAM no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
UseDNS no
Ciphers aes128-gcm@openssh.com
Compression no
MaxStartups 200:30:400
LogLevel ERROR
""")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        sshd = self.procs.start("sshd", [SSHD, "-D", "-e", "-f", cfg])
        wait_until(lambda: listening(sport), 10, "sshd", sshd)
        hop, extra = sport, []
        if rate is not None:
            hop = free_port()
            extra = [self.pacer(hop, sport, rate)]
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        cli = self.procs.start(
            "ssh",
            [
                "ssh",
                "-N",
                "-F",
                "/dev/null",
                "-i",
                f"{d}/client_key",
                "-p",
                str(hop),
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "Ciphers=aes128-gcm@openssh.com",
                "-o",
                "Compression=no",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ControlMaster=no",
                "-o",
                "ControlPath=none",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
                "-L",
                f"127.0.0.1:{entry}:127.0.0.1:{target}",
                f"{user}@127.0.0.1",
            ],
        )
        wait_until(lambda: listening(entry), 30, "ssh -L", cli)
        return Peer("ssh", entry, [("A", cli), ("B", sshd)], [cli] + extra + [sshd])

    def vp(self, kind: str, target: int, rate: float | None) -> Peer:
        entry = free_port()
        if kind == "unix":
            path = os.path.join(self.tmp, f"vp-{entry}.sock")
            host_ch, guest_ch, extra = f"unix-listen:{path}", f"unix-connect:{path}", []
        else:
            ch = free_port()
            host_ch, hop, extra = f"tcp-listen:127.0.0.1:{ch}", ch, []
        vpcmd = [PY, "-m", "virtproxy"]
        host = self.procs.start(
            f"vp-{kind}-host",
            vpcmd + ["-c", host_ch, "-o", f"bench:127.0.0.1:{entry}"],
            env=self.env,
            cwd=VP_PATH,
        )
        if kind == "tcp":
            wait_until(lambda: listening(ch), 20, "virtproxy host", host)
            if rate is not None:
                hop = free_port()
                extra = [self.pacer(hop, ch, rate)]
            guest_ch = f"tcp-connect:127.0.0.1:{hop}"
        else:
            wait_until(lambda: os.path.exists(path), 20, "virtproxy host socket", host)
        guest = self.procs.start(
            f"vp-{kind}-guest",
            vpcmd + ["-c", guest_ch, "-i", f"bench:127.0.0.1:{target}"],
            env=self.env,
            cwd=VP_PATH,
        )
        wait_log(host, "session up", 30)
        wait_log(guest, "session up", 30)
        wait_until(lambda: listening(entry), 10, "virtproxy entry", host)
        return Peer(f"vp-{kind}", entry, [("host", host), ("guest", guest)], [host, guest] + extra)

    def make(self, name: str, target: int, rate: float | None = None) -> Peer:
        if name == "direct":
            peer = self.direct(target, rate)
        elif name == "socat":
            peer = self.socat(target, rate)
        elif name == "ssh":
            peer = self.ssh(target, rate)
        else:
            peer = self.vp(name.split("-")[1], target, rate)
        wait_until(lambda: echo_ok(peer.entry), 30, f"{name} echo through entry")
        return peer

    def teardown(self, peer: Peer) -> None:
        for p in peer.procs:
            self.procs.stop(p)


class RssSampler:
    """Peak RSS (MiB) of each relay's process tree while running: sampled
    VmRSS of the tree, and VmHWM of the relay's root after a reset."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.peak = {role: 0 for role, _ in peer.relays}
        for _, p in peer.relays:
            reset_hwm(p.pid)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def sample(self) -> None:
        kids = ppid_map()
        for role, p in self.peer.relays:
            tot = sum(status_kib(pid, "VmRSS") for pid in [p.pid] + descendants(p.pid, kids))
            self.peak[role] = max(self.peak[role], tot, status_kib(p.pid, "VmHWM"))

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()

    def finish(self) -> dict:
        self.stop.set()
        self.t.join()
        self.sample()
        return {role: kib / 1024 for role, kib in self.peak.items()}


# --------------------------------------------------------------------------
# workloads


def run_normal(args, procs: Procs, setup: Setup, results: dict, only: set) -> None:
    targets = {p: free_port() for p in PEERS}
    tgt = procs.start(
        "target",
        [PY, BENCH, "target", "--ports", ",".join(str(targets[p]) for p in PEERS)],
        stdout_pipe=True,
    )
    line = tgt.stdout.readline()  # type: ignore[union-attr]
    if b"ready" not in line:
        raise RuntimeError("target server did not start")
    setup.target_proc = tgt  # type: ignore[attr-defined]
    setup.targets = targets  # type: ignore[attr-defined]
    normal = only - {"paced"}
    if not normal:
        return
    peers = {}
    for name in PEERS:
        log(f"starting {name}")
        peers[name] = setup.make(name, targets[name])
    q = args.quick
    bulk_bytes = (64 if q else 512) * MiB
    multi_bytes = (4 if q else 16) * MiB
    rtts = 1000 if q else 2000
    short_s = 1.0 if q else 2.0
    total = max(args.rounds, args.latency_rounds)
    for rnd in range(total):
        order = PEERS[rnd % len(PEERS) :] + PEERS[: rnd % len(PEERS)]
        log(f"round {rnd + 1}/{total} (order {', '.join(order)})")
        if rnd == args.rounds:
            only = only & LATENCY_WORKLOADS  # the extra rounds: round trips only
        for name in order:
            port = peers[name].entry
            if "bulk" in only:
                cpu0 = relays_cpu(peers[name])
                r = client("bulk", port, 120, bytes=bulk_bytes, timeout=100)
                if peers[name].relays and r.get("ok"):
                    r["cpu_per_gb"] = (relays_cpu(peers[name]) - cpu0) / (bulk_bytes / 1e9)
                results.setdefault("bulk", {}).setdefault(name, []).append(r)
                log(f"  bulk     {name:8s} {r.get('mbps', 0):9.1f} MB/s {'' if r.get('ok') else r}")
            if "multi" in only:
                sampler = RssSampler(peers[name])
                r = client("multi", port, 150, bytes=multi_bytes, streams=32, timeout=120)
                r["rss"] = sampler.finish()
                results.setdefault("multi", {}).setdefault(name, []).append(r)
                log(
                    f"  multi    {name:8s} {r.get('mbps', 0):9.1f} MB/s slow/fast {r.get('slow_fast', 0):.2f} "
                    f"rss {r['rss']} {'' if r.get('ok') else r}"
                )
            if "rtt" in only:
                r = client("rtt", port, 60, count=rtts, warmup=50, timeout=5, max_seconds=40)
                results.setdefault("rtt", {}).setdefault(name, []).append(r)
                log(
                    f"  rtt      {name:8s} p50 {r.get('p50', 0) * 1e6:8.0f} us p99 {r.get('p99', 0) * 1e6:8.0f} us"
                )
            if "rttload" in only:
                r = rtt_under_load(
                    procs,
                    port,
                    "rtt",
                    60,
                    60,
                    load_warmup=0.5,
                    settle=0.3,
                    count=rtts,
                    warmup=20,
                    timeout=5,
                    max_seconds=20,
                )
                results.setdefault("rttload", {}).setdefault(name, []).append(r)
                log(
                    f"  rttload  {name:8s} p50 {r.get('p50', 0) * 1e6:8.0f} us p99 {r.get('p99', 0) * 1e6:8.0f} us "
                    f"load {r['load'].get('goodput', 0) / MB:.0f} MB/s"
                )
            if "short" in only:
                r = client("short", port, 30, max_seconds=short_s, timeout=5)
                results.setdefault("short", {}).setdefault(name, []).append(r)
                log(f"  short    {name:8s} {r.get('rate', 0):9.0f} conn/s errors {r.get('errors')}")
        if "many" in only:
            for name in ("vp-tcp", "vp-unix"):
                r = client("many", peers[name].entry, 100, streams=1000, bytes=16384, timeout=80)
                results.setdefault("many", {}).setdefault(name, []).append(r)
                log(
                    f"  many     {name:8s} ok={r.get('ok')} {r.get('seconds', 0):.2f} s {r.get('error', '')}"
                )
    for name in PEERS:
        setup.teardown(peers[name])


def run_paced(args, procs: Procs, setup: Setup, results: dict) -> None:
    q = args.quick
    for rate, label, secs, cap in (
        (1e6, "1MB/s", 6 if q else 12, 5.0),
        (11520.0, "115200", 10 if q else 20, 10.0),
    ):
        for name in PACED_PEERS:
            try:
                peer = setup.make(name, setup.targets[name], rate)
            except Exception as e:
                log(f"  paced {label} {name}: setup failed: {e}")
                results.setdefault("paced", {}).setdefault(label, {})[name] = {
                    "ok": False,
                    "error": str(e),
                }
                continue
            try:
                r = rtt_under_load(
                    procs,
                    peer.entry,
                    "keys",
                    secs + cap + 20,
                    secs + cap + 30,
                    load_warmup=min(3.0, secs / 4),
                    settle=0.5,
                    max_seconds=secs,
                    cap=cap,
                    interval=0.05,
                    timeout=10,
                )
                r["rate"] = rate
                r["util"] = r["load"].get("goodput", 0) / rate
            finally:
                setup.teardown(peer)
            results.setdefault("paced", {}).setdefault(label, {})[name] = r
            log(
                f"  paced {label:6s} {name:8s} goodput {r['util'] * 100:5.1f}% of line; keys n={r.get('n')} "
                f"p50 {fmt_s(r, 'p50')} p99 {fmt_s(r, 'p99')} {r.get('error', '')}"
            )


# --------------------------------------------------------------------------
# reporting


def fmt_s(r: dict, key: str) -> str:
    if key not in r or r[key] != r[key]:
        return "-"
    v = r[key]
    s = f"{v * 1e3:.0f} ms" if v >= 0.0995 else f"{v * 1e3:.1f} ms"
    if v >= 10:
        s = f"{v:.1f} s"
    return (">" + s) if r.get(key + "_gt") else s


def med(results: dict, wl: str, peer: str, key: str) -> float | None:
    vals = [
        r[key]
        for r in results.get(wl, {}).get(peer, [])
        if key in r and r.get("ok", True) is not False
    ]
    return statistics.median(vals) if vals else None


def med_rtt(results: dict, wl: str, peer: str, key: str) -> tuple[float | None, bool]:
    rs = [r for r in results.get(wl, {}).get(peer, []) if key in r]
    if not rs:
        return None, False
    rs.sort(key=lambda r: r[key])
    m = rs[len(rs) // 2]
    return m[key], bool(m.get(key + "_gt"))


def build_table(results: dict) -> tuple[list[list[str]], dict]:
    rows: list[list[str]] = []
    vals: dict = {}

    def add(label: str, getter, fmt) -> None:
        row = [label]
        for p in PEERS:
            v = getter(p)
            vals[(label, p)] = v
            row.append("-" if v is None else fmt(v))
        rows.append(row)

    us = lambda v: f"{v * 1e6:.0f}"
    add("1 bulk upload MB/s", lambda p: med(results, "bulk", p, "mbps"), lambda v: f"{v:.0f}")
    add(
        "1 relays' CPU s per GB (A+B)",
        lambda p: med(results, "bulk", p, "cpu_per_gb"),
        lambda v: f"{v:.2f}",
    )
    add(
        "2 32 streams aggregate MB/s",
        lambda p: med(results, "multi", p, "mbps"),
        lambda v: f"{v:.0f}",
    )
    add(
        "2 32 streams slowest/fastest",
        lambda p: med(results, "multi", p, "slow_fast"),
        lambda v: f"{v:.2f}",
    )
    add("3 idle RTT p50 us", lambda p: med_rtt(results, "rtt", p, "p50")[0], us)
    add("3 idle RTT p99 us", lambda p: med_rtt(results, "rtt", p, "p99")[0], us)

    def rl(p, key):
        v, gt = med_rtt(results, "rttload", p, key)
        return None if v is None else (v, gt)

    rtt_fmt = lambda v: (
        (">" if v[1] else "") + (f"{v[0] * 1e6:.0f}" if v[0] < 0.1 else f"{v[0] * 1e3:.0f}ms")
    )
    add("4 RTT under bulk p50 us", lambda p: rl(p, "p50"), rtt_fmt)
    add("4 RTT under bulk p99 us", lambda p: rl(p, "p99"), rtt_fmt)

    def loadmb(p):
        vs = [r["load"]["goodput"] for r in results.get("rttload", {}).get(p, []) if "load" in r]
        return statistics.median(vs) / MB if vs else None

    add("4 ... bulk alongside MB/s", loadmb, lambda v: f"{v:.0f}")
    add("5 short connections /s", lambda p: med(results, "short", p, "rate"), lambda v: f"{v:.0f}")

    def rss(p, i):
        rs = [r["rss"] for r in results.get("multi", {}).get(p, []) if r.get("rss")]
        if not rs:
            return None
        roles = list(rs[0].keys())
        if i >= len(roles):
            return None
        return max(r[roles[i]] for r in rs)

    add("6 peak RSS relay A MiB (tree)", lambda p: rss(p, 0), lambda v: f"{v:.1f}")
    add("6 peak RSS relay B MiB (tree)", lambda p: rss(p, 1), lambda v: f"{v:.1f}")

    def many(p):
        rs = results.get("many", {}).get(p, [])
        if not rs:
            return None
        return (
            all(r.get("ok") for r in rs),
            statistics.median(r.get("seconds", float("nan")) for r in rs),
        )

    add("7 1000 streams byte-exact", many, lambda v: f"{'PASS' if v[0] else 'FAIL'} {v[1]:.1f}s")
    for label in ("1MB/s", "115200"):
        pr = results.get("paced", {}).get(label, {})
        add(
            f"8 {label} goodput % of line",
            lambda p: pr[p].get("util") * 100 if p in pr and "util" in pr[p] else None,
            lambda v: f"{v:.1f}",
        )
        add(
            f"8 {label} keys RTT p50",
            lambda p: pr.get(p) if p in pr and "p50" in pr[p] else None,
            lambda r: fmt_s(r, "p50"),
        )
        add(
            f"8 {label} keys RTT p99",
            lambda p: pr.get(p) if p in pr and "p99" in pr[p] else None,
            lambda r: fmt_s(r, "p99"),
        )
    return rows, vals


def print_table(rows: list[list[str]]) -> str:
    hdr = ["workload"] + PEERS
    widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
    sep = "  ".join("=" * w for w in widths)
    lines = [
        sep,
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(hdr, widths))
        ),
        sep,
    ]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    lines.append(sep)
    return "\n".join(lines)


def ratios_and_targets(results: dict) -> tuple[str, list[tuple[str, str, bool | None, str]]]:
    def g(wl, p, k):
        return med(results, wl, p, k)

    def rt(wl, p, k):
        return med_rtt(results, wl, p, k)[0]

    out = []

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    lines = []
    for vp in ("vp-tcp", "vp-unix"):
        items = [
            ("bulk/ssh", ratio(g("bulk", vp, "mbps"), g("bulk", "ssh", "mbps"))),
            ("bulk/socat", ratio(g("bulk", vp, "mbps"), g("bulk", "socat", "mbps"))),
            ("bulk/direct", ratio(g("bulk", vp, "mbps"), g("bulk", "direct", "mbps"))),
            ("cpu/GB vs ssh", ratio(g("bulk", vp, "cpu_per_gb"), g("bulk", "ssh", "cpu_per_gb"))),
            ("32x/ssh", ratio(g("multi", vp, "mbps"), g("multi", "ssh", "mbps"))),
            ("32x/socat", ratio(g("multi", vp, "mbps"), g("multi", "socat", "mbps"))),
            ("rtt/ssh", ratio(rt("rtt", vp, "p50"), rt("rtt", "ssh", "p50"))),
            ("rtt-load/ssh", ratio(rt("rttload", vp, "p50"), rt("rttload", "ssh", "p50"))),
            ("short/ssh", ratio(g("short", vp, "rate"), g("short", "ssh", "rate"))),
            ("short/socat", ratio(g("short", vp, "rate"), g("short", "socat", "rate"))),
        ]
        lines.append(f"{vp:8s} " + "  ".join(f"{k} {v:.2f}x" for k, v in items if v is not None))

        def check(name, value, ok, detail):
            out.append((vp, name, ok if value is not None else None, detail))

        r = ratio(g("bulk", vp, "mbps"), g("bulk", "ssh", "mbps"))
        check("bulk >= 2x ssh", r, r is not None and r >= 2, f"{r:.2f}x" if r else "n/a")
        r = ratio(g("bulk", vp, "mbps"), g("bulk", "socat", "mbps"))
        check("bulk >= socat", r, r is not None and r >= 1, f"{r:.2f}x" if r else "n/a")
        r = ratio(g("multi", vp, "mbps"), g("multi", "ssh", "mbps"))
        check(
            "32x aggregate >= 1.5x ssh", r, r is not None and r >= 1.5, f"{r:.2f}x" if r else "n/a"
        )
        r = g("multi", vp, "slow_fast")
        check(
            "32x slowest/fastest <= 1.3", r, r is not None and r <= 1.3, f"{r:.2f}" if r else "n/a"
        )
        r = ratio(rt("rtt", vp, "p50"), rt("rtt", "ssh", "p50"))
        check("idle RTT p50 <= 2x ssh", r, r is not None and r <= 2, f"{r:.2f}x" if r else "n/a")
        r = ratio(rt("rttload", vp, "p50"), rt("rttload", "ssh", "p50"))
        check("RTT under bulk p50 <= ssh", r, r is not None and r <= 1, f"{r:.2f}x" if r else "n/a")
        r = ratio(g("short", vp, "rate"), g("short", "ssh", "rate"))
        check(
            "short conns >= 0.75x ssh", r, r is not None and r >= 0.75, f"{r:.2f}x" if r else "n/a"
        )
        rs = [r["rss"] for r in results.get("multi", {}).get(vp, []) if r.get("rss")]
        r = max(max(x.values()) for x in rs) if rs else None
        check(
            "daemon peak RSS (32x) <= 64 MiB",
            r,
            r is not None and r <= 64,
            f"{r:.1f} MiB" if r else "n/a",
        )
        rs = results.get("many", {}).get(vp, [])
        r = all(x.get("ok") for x in rs) if rs else None
        check(
            "1000 streams byte-exact",
            r,
            bool(r),
            (
                f"{statistics.median(x.get('seconds', float('nan')) for x in rs):.1f} s"
                if r
                else (rs[0].get("error", "") if rs else "n/a")
            ),
        )
        if vp == "vp-tcp":
            pr = results.get("paced", {})
            x = pr.get("1MB/s", {}).get(vp)
            r = x.get("p99") if x and "p99" in x else None
            check(
                "1MB/s RTT under bulk p99 <= 50 ms",
                r,
                r is not None and r <= 0.05 and not x.get("p99_gt"),
                fmt_s(x, "p99") if r is not None else "n/a",
            )
            x = pr.get("115200", {}).get(vp)
            r = x.get("util") if x else None
            check(
                "115200 bulk goodput >= 90% line",
                r,
                r is not None and r >= 0.9,
                f"{r * 100:.1f}%" if r is not None else "n/a",
            )
    return "\n".join(lines), out


def rounds_text(args) -> str:
    if args.latency_rounds == args.rounds:
        return f"{args.rounds} round(s)"
    return f"{args.rounds} round(s), {args.latency_rounds} for round trips"


def congestion_control() -> str:
    """The host's default TCP congestion control, recorded because it decides
    whether the kernel paces loopback sockets (BBR does).  The peers keep it;
    virtproxy picks reno on loopback (virtproxy/tcpopts.py)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "?"


def machine() -> str:
    return (
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, nproc {os.cpu_count()}, "
        f"kernel {platform.release()}, Python {platform.python_version()}, "
        f"tcp cc {congestion_control()}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs (~3 min)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds for workloads 1-7 (default 3, quick 1)"
    )
    ap.add_argument(
        "--latency-rounds",
        type=int,
        default=None,
        help="rounds for workloads 3-4, the round trips (default 5, quick 1; at least --rounds)",
    )
    ap.add_argument("--only", default="", help=f"comma list of {','.join(WORKLOADS)}")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument(
        "--vp-path",
        default=REPO,
        help="directory containing the virtproxy package to test (default: this checkout)",
    )
    ap.add_argument(
        "--vp-rev",
        help="benchmark this git revision of virtproxy/ instead (extracted with "
        "git archive into a temp dir; the checkout is not touched)",
    )
    args = ap.parse_args()
    global VP_PATH
    VP_PATH = os.path.abspath(args.vp_path)
    if args.vp_rev:
        VP_PATH = tempfile.mkdtemp(prefix="vp-rev-")
        atexit.register(shutil.rmtree, VP_PATH, True)
        arch = subprocess.run(
            ["git", "-C", REPO, "archive", args.vp_rev, "virtproxy"], capture_output=True
        )
        if arch.returncode:
            ap.error(f"git archive {args.vp_rev}: {arch.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", VP_PATH], input=arch.stdout, check=True)
    if not os.path.isdir(os.path.join(VP_PATH, "virtproxy")):
        ap.error(f"no virtproxy package in {VP_PATH}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.latency_rounds is None:
        args.latency_rounds = 1 if args.quick else 5
    args.latency_rounds = max(args.rounds, args.latency_rounds)
    only = set(WORKLOADS)
    if args.only:
        only = set(args.only.split(","))
        bad = only - set(WORKLOADS)
        if bad:
            ap.error(
                f"unknown workload(s) {', '.join(sorted(bad))}; choose from {', '.join(WORKLOADS)}"
            )
    for tool in ("socat", "ssh", "ssh-keygen", SSHD):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the daemons and clients

    tmp = tempfile.mkdtemp(prefix="vp-bench-")
    procs = Procs(tmp)

    def cleanup() -> None:
        procs.stop_all()
        if not os.environ.get("VP_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))

    started = time.monotonic()
    results: dict = {}
    setup = Setup(procs, tmp)
    log(f"virtproxy from {VP_PATH}")
    log(
        f"{machine()}; mode {'quick' if args.quick else 'full'}, {rounds_text(args)}; logs in {tmp}"
    )
    run_normal(args, procs, setup, results, only)
    if "paced" in only:
        run_paced(args, procs, setup, results)
    rows, _ = build_table(results)
    table = print_table(rows)
    ratios, checks = ratios_and_targets(results)
    print()
    print(
        f"virtproxy benchmark, {'quick' if args.quick else 'full'} mode, {rounds_text(args)}, "
        f"medians; {machine()}; {time.monotonic() - started:.0f} s"
    )
    print(table)
    print("\nRatios (virtproxy / peer):")
    print(ratios)
    print("\nTargets:")
    for vp, name, ok, detail in checks:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {mark}  {vp:8s} {name:36s} {detail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "quick": args.quick,
                    "rounds": args.rounds,
                    "latency_rounds": args.latency_rounds,
                    "results": results,
                    "checks": checks,
                    "table": table,
                },
                f,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
