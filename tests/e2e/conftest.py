"""Harness for the end-to-end suite: real ``python -m virtproxy`` processes on loopback.

Everything here is blocking sockets and threads; no reactor runs in the test
process.  Every socket gets a timeout and every test runs under a watchdog
(``faulthandler.dump_traceback_later``), so no test can hang the run.

Daemon children are started with ``PR_SET_PDEATHSIG`` (Linux) so that even if
the watchdog kills pytest, no virtproxy process outlives it.
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import http.server
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Test modules import the helpers below as ``vp_e2e`` (a unique name: the bare
# name "conftest" is shared with every other conftest.py in the tree).
sys.modules.setdefault("vp_e2e", sys.modules[__name__])

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

#: Seconds one e2e test may take before the watchdog dumps every thread's stack and exits.
WATCHDOG_SECONDS = 60.0
#: Default timeout for one blocking socket operation in a test.
SOCK_TIMEOUT = 10.0
#: A backend connection idle this long counts as a hung stream.
BACKEND_TIMEOUT = 40.0
#: How long to wait for a daemon's handshake.
SESSION_TIMEOUT = 10.0

#: Fast loss detection for tests that kill a daemon.
FAST_KEEPALIVE = ["--keepalive-interval", "0.5", "--keepalive-timeout", "2"]


# --------------------------------------------------------------------------- ports


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that this run
    has not handed out before (so two allocations never collide)."""
    with _ports_lock:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def closed_port() -> int:
    """A port where a connect is refused (nothing listens)."""
    return free_port()


# --------------------------------------------------------------------------- daemons


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


#: Set VIRTPROXY_E2E_ROOT to run the suite against another checkout of virtproxy.
IMPL_ROOT = Path(os.environ.get("VIRTPROXY_E2E_ROOT") or REPO_ROOT)


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(IMPL_ROOT) + (os.pathsep + pp if pp else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "virtproxy", *args]


class Daemon:
    """One ``python -m virtproxy`` process; stderr goes to ``<name>.log``."""

    def __init__(self, name: str, args: list[str], logdir: Path):
        self.name = name
        self.args = list(args)
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.log_path: Path | None = None
        self.out_path: Path | None = None
        self._paths: list[tuple[Path, Path]] = []

    # -- lifecycle
    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.generation += 1
        suffix = "" if self.generation == 1 else f".{self.generation}"
        self.log_path = self.logdir / f"{self.name}{suffix}.log"
        self.out_path = self.logdir / f"{self.name}{suffix}.stdout"
        self._paths.append((self.log_path, self.out_path))
        with open(self.log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                daemon_cmd(*self.args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=daemon_env(),
                cwd=str(self.logdir),
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        return self

    restart = start

    def rss_kib(self) -> int:
        """Resident set size of the daemon process (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap: the peer sees the channel die without a GOAWAY."""
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    # -- logs
    def log(self) -> str:
        """The current generation's stderr."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def all_logs(self) -> str:
        parts = []
        for i, (err, out) in enumerate(self._paths, 1):
            for label, p in (("stderr", err), ("stdout", out)):
                text = p.read_bytes().decode("utf-8", "replace") if p.exists() else ""
                if text or label == "stderr":
                    parts.append(f"----- {self.name} run {i} {label} ({p.name}) -----\n{text}")
        return "\n".join(parts)

    def mark(self) -> int:
        """Position in the current log; pass as ``since`` to wait for later lines."""
        return len(self.log())

    def lines(self, since: int = 0) -> list[str]:
        return self.log()[since:].splitlines()

    def count(self, substring: str, since: int = 0) -> int:
        return self.log()[since:].count(substring)

    def wait_for(
        self, substring: str, timeout: float = SESSION_TIMEOUT, *, count: int = 1, since: int = 0
    ) -> float:
        """Poll the log until ``substring`` occurs ``count`` times after ``since``.

        Returns the seconds waited.  Fails early if the process exits.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if self.count(substring, since) >= count:
                return time.monotonic() - t0
            if not self.alive():
                # one last look: the line may have landed just before exit
                if self.count(substring, since) >= count:
                    return time.monotonic() - t0
                pytest.fail(
                    f"{self.name} exited (status {self.proc.returncode if self.proc else None}) "
                    f"before logging {substring!r} x{count}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: {substring!r} x{count} not logged within {timeout}s:\n"
                    f"{self.log()}"
                )
            time.sleep(0.05)

    def find_line(self, *patterns: str, since: int = 0, flags: int = re.I) -> str | None:
        """First log line matching every regex in ``patterns``."""
        for line in self.lines(since):
            if all(re.search(p, line, flags) for p in patterns):
                return line
        return None

    def wait_line(self, *patterns: str, timeout: float = 5.0, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.find_line(*patterns, since=since)
            if line is not None:
                return line
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: no line matching {patterns} within {timeout}s:\n{self.log()}"
                )
            time.sleep(0.05)


class DaemonFactory:
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.daemons: list[Daemon] = []

    def __call__(self, name: str, *args: str, start: bool = True) -> Daemon:
        d = Daemon(name, list(args), self.logdir)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.alive():
                try:
                    d.proc.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for d in self.daemons:
            if d.proc is None:
                continue
            try:
                d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(timeout=10)


class Pair:
    """A host daemon (tcp-listen / unix-listen channel) and a guest (connect side)."""

    def __init__(self, host: Daemon, guest: Daemon, channel: str):
        self.host = host
        self.guest = guest
        self.channel = channel

    def wait_session(
        self, timeout: float = SESSION_TIMEOUT, host_since: int = 0, guest_since: int = 0
    ) -> None:
        self.host.wait_for("session up", timeout, since=host_since)
        self.guest.wait_for("session up", timeout, since=guest_since)


# --------------------------------------------------------------------------- fixtures


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach every daemon's log to a failed test's report."""
    rep = yield
    factory = getattr(item, "_vp_daemons", None)
    if rep.failed and factory is not None and factory.daemons:
        for d in factory.daemons:
            try:
                rep.sections.append((f"virtproxy log: {d.name}", d.all_logs()))
            except Exception as e:  # the report must not fail
                rep.sections.append((f"virtproxy log: {d.name}", f"<unreadable: {e}>"))
    return rep


@pytest.fixture(autouse=True)
def _watchdog():
    """No e2e test may hang: dump all stacks and exit the run after WATCHDOG_SECONDS."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def daemons(request, tmp_path, short_dir):
    """Factory: ``daemons("host", "--channel", ...)`` starts a daemon.

    Depends on ``short_dir`` so that UNIX sockets outlive the daemons using them.
    Teardown stops every daemon (even when the test failed) and fails the
    test if a daemon logged a Python traceback or a Twisted unhandled error.
    """
    factory = DaemonFactory(tmp_path)
    request.node._vp_daemons = factory
    try:
        yield factory
    finally:
        factory.cleanup()
    bad = []
    for d in factory.daemons:
        text = d.all_logs()
        if "Traceback (most recent call last)" in text or "Unhandled Error" in text:
            bad.append(d.name)
    if bad:
        pytest.fail(
            f"daemon(s) {bad} logged a traceback / unhandled error (see the virtproxy log sections)"
        )


def _listen_token(spec: str) -> str | None:
    """The port (or path) a forward / channel spec listens on, as it would
    appear in a log line."""
    if "=" in spec.split(":", 1)[0]:  # NAME=tcp:PORT:interface=...
        m = re.match(r"^[^=]*=tcp:(\d+)", spec)
        return m.group(1) if m else None
    parts = spec.split(":")
    if spec.startswith(("unix-listen:", "unix-connect:")):
        return spec.split(":", 1)[1]
    if len(parts) >= 3 and parts[-1] == "-":
        return ":".join(parts[1:-1])
    return parts[-1] if parts[-1].isdigit() else None


def _token_re(token: str) -> str:
    return rf"(?<![\w/.]){re.escape(token)}(?![\w/.])"


def wait_listening(daemon: Daemon, specs, timeout: float = SESSION_TIMEOUT) -> None:
    """Wait until ``daemon`` logged "listening" for each of ``specs``.

    The contract promises one "listening" line per oforward; daemons that also
    name the port/path in it are waited on per listener (so an extra
    "listening" line for the channel cannot be mistaken for an oforward's)."""
    specs = list(specs)
    if not specs:
        return
    daemon.wait_for("listening", timeout, count=len(specs))
    deadline = time.monotonic() + 2.0
    for spec in specs:
        token = _listen_token(spec)
        if token is None:
            continue
        while daemon.find_line(r"listening", _token_re(token)) is None:
            if time.monotonic() > deadline:
                break  # the daemon does not name the address: the count must do
            time.sleep(0.05)


def _forward_args(flag: str, forwards) -> list[str]:
    out: list[str] = []
    for f in forwards or ():
        out += [flag, f]
    return out


@pytest.fixture
def short_dir():
    """A short directory for UNIX socket paths (sun_path is at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vpe2e-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pair(daemons, short_dir):
    """Factory starting a host (listen channel) and a guest (connect channel).

    ``pair(host_o=[...], host_i=[...], guest_o=[...], guest_i=[...],
    channel="tcp"|"unix", args=[...], host_args=[...], guest_args=[...])``
    waits until both sides log "session up" and every oforward logged
    "listening", then returns a :class:`Pair`.
    """
    counter = [0]

    def make(
        host_o=(),
        host_i=(),
        guest_o=(),
        guest_i=(),
        *,
        channel="tcp",
        args=(),
        host_args=(),
        guest_args=(),
        wait=True,
    ) -> Pair:
        counter[0] += 1
        n = "" if counter[0] == 1 else str(counter[0])
        if channel == "tcp":
            port = free_port()
            listen = f"tcp-listen:{LOOPBACK}:{port}"
            connect = f"tcp-connect:{LOOPBACK}:{port}"
        elif channel == "unix":
            path = short_dir / f"chan{n}.sock"
            listen = f"unix-listen:{path}"
            connect = f"unix-connect:{path}"
        else:
            raise ValueError(channel)
        host_cmd = [
            "--channel",
            listen,
            *_forward_args("-o", host_o),
            *_forward_args("-i", host_i),
            *args,
            *host_args,
        ]
        guest_cmd = [
            "--channel",
            connect,
            *_forward_args("-o", guest_o),
            *_forward_args("-i", guest_i),
            *args,
            *guest_args,
        ]
        host = daemons(f"host{n}", *host_cmd)
        wait_listening(host, host_o)
        # let the channel listener come up too, so the guest's first connect succeeds
        tok = _listen_token(listen)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and host.find_line(r"listening", _token_re(tok)) is None:
            time.sleep(0.05)
        guest = daemons(f"guest{n}", *guest_cmd)
        p = Pair(host, guest, listen)
        if wait:
            p.wait_session()
            wait_listening(guest, guest_o)
        return p

    return make


# --------------------------------------------------------------------------- backends


class Backend:
    """A threaded server on 127.0.0.1 (or a UNIX path) accepting connections."""

    def __init__(self, path: str | None = None):
        if path is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((LOOPBACK, 0))
            self.port = self.sock.getsockname()[1]
            self.path = None
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            self.port = None
            self.path = path
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.timeouts: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self.ended = 0
        self._ended = threading.Condition()
        self._lock = threading.Lock()
        t = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"{type(self).__name__}-accept"
        )
        t.start()
        self._threads.append(t)

    @property
    def addr(self) -> str:
        """The ``ADDR:PORT`` / ``PATH:-`` part of a forward spec."""
        return f"{LOOPBACK}:{self.port}" if self.path is None else f"{self.path}:-"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            conn.settimeout(BACKEND_TIMEOUT)
            self._conns.append(conn)
            t = threading.Thread(target=self._serve_wrapper, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_wrapper(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except TimeoutError as e:
            # A stream hung.  Abort (RST) so the client cannot mistake this for a
            # clean end, and let the fixture fail the test.
            self.timeouts.append(e)
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        except OSError as e:
            self.errors.append(e)
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._ended:
                self.ended += 1
                self._ended.notify_all()

    def wait_ended(self, count: int, timeout: float) -> float:
        """Wait until ``count`` served connections have ended; returns seconds waited."""
        t0 = time.monotonic()
        with self._ended:
            if not self._ended.wait_for(lambda: self.ended >= count, timeout):
                pytest.fail(
                    f"{type(self).__name__}: {self.ended} of {self.accepted} connections "
                    f"ended after {timeout}s, wanted {count}"
                )
        return time.monotonic() - t0

    def serve(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        for conn in list(self._conns):  # unblock serving threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 3
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


class EchoServer(Backend):
    """Echoes every byte as it arrives until EOF, then shuts down and closes.

    With ``after_eof=True`` it reads everything first and only replies after
    the client's EOF (proves the half-close reached the backend).
    """

    def __init__(self, path: str | None = None, after_eof: bool = False):
        self.after_eof = after_eof
        self.eof_seen = 0
        super().__init__(path)

    def serve(self, conn):
        kept = []
        while True:
            data = conn.recv(65536)
            if not data:
                break
            if self.after_eof:
                kept.append(data)
            else:
                conn.sendall(data)
        with self._lock:
            self.eof_seen += 1
        if self.after_eof:
            conn.sendall(b"".join(kept))
        conn.shutdown(socket.SHUT_WR)
        # wait for the client's close so our close is graceful
        conn.settimeout(5)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


class ReplyThenCloseServer(Backend):
    """Writes ``payload`` at once on accept, then closes (never reads)."""

    def __init__(self, payload: bytes, path: str | None = None):
        self.payload = payload
        self.sha256 = hashlib.sha256(payload).hexdigest()
        super().__init__(path)

    def serve(self, conn):
        conn.sendall(self.payload)
        conn.shutdown(socket.SHUT_WR)


class SinkServer(Backend):
    """Reads until EOF; records (byte count, sha256) per connection."""

    def __init__(self, path: str | None = None):
        self.results: list[tuple[int, str]] = []
        self.done = threading.Condition()
        super().__init__(path)

    def serve(self, conn):
        h = hashlib.sha256()
        n = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            n += len(data)
            h.update(data)
        with self.done:
            self.results.append((n, h.hexdigest()))
            self.done.notify_all()

    def wait_results(self, count: int, timeout: float = SOCK_TIMEOUT):
        with self.done:
            if not self.done.wait_for(lambda: len(self.results) >= count, timeout):
                pytest.fail(f"sink got {len(self.results)} finished connections, wanted {count}")
            return list(self.results)


class SourceServer(Backend):
    """Streams random data forever (until the peer goes away), paced so that a
    transfer is still running when a test kills a daemon."""

    def __init__(self, chunk: int = 16384, pause: float = 0.005):
        self.chunk = chunk
        self.pause = pause
        super().__init__(None)

    def serve(self, conn):
        block = os.urandom(self.chunk)
        while not self._stop.is_set():
            conn.sendall(block)
            time.sleep(self.pause)


class HTTPBackend:
    """http.server in a thread serving ``body`` for every GET."""

    def __init__(self, body: bytes):
        self.body = body
        self.sha256 = hashlib.sha256(body).hexdigest()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(backend.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(backend.body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.thread.start()

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


@pytest.fixture
def backends():
    """Factory: ``backends(EchoServer)``, ``backends(HTTPBackend, body)`` ...

    All are closed at teardown; a backend connection that timed out fails the test."""
    made = []

    def make(cls, *a, **kw):
        b = cls(*a, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
    hung = [
        f"{type(b).__name__}:{b.addr} ({len(b.timeouts)})"
        for b in made
        if getattr(b, "timeouts", None)
    ]
    if hung:
        pytest.fail(
            f"backend connection(s) timed out waiting for the proxy (a stream hung): {hung}"
        )


# --------------------------------------------------------------------------- client helpers


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def send_then_half_close(
    sock: socket.socket, payload: bytes, chunk: int = 16384
) -> tuple[threading.Thread, list[BaseException]]:
    """Send ``payload`` on a thread (so the caller can read the echo meanwhile),
    then shut the write side down.  Returns the thread and a list that gets
    the exception if sending failed (a reset, a broken pipe)."""
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            view = memoryview(payload)
            for off in range(0, len(view), chunk):
                sock.sendall(view[off : off + chunk])
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    return thread, errors


def connect(
    port: int | None = None, path: str | None = None, timeout: float = SOCK_TIMEOUT
) -> socket.socket:
    if path is not None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
    else:
        s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    return s


def recv_all(s: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or ``limit`` bytes); socket timeouts propagate."""
    buf = bytearray()
    while limit is None or len(buf) < limit:
        data = s.recv(65536 if limit is None else min(65536, limit - len(buf)))
        if not data:
            break
        buf += data
    return bytes(buf)


def echo_roundtrip(
    port: int | None = None,
    data: bytes = b"",
    *,
    path: str | None = None,
    chunk: int = 32768,
    timeout: float = SOCK_TIMEOUT,
) -> bytes:
    """Send ``data`` from a thread while reading the echo; half-close after
    sending; return everything read up to EOF."""
    s = connect(port, path, timeout)
    t, err = send_then_half_close(s, data, chunk)
    try:
        got = recv_all(s)
    finally:
        t.join(timeout)
        s.close()
    if err:
        raise err[0]
    return got


def wait_closed(s: socket.socket, timeout: float) -> tuple[str, bytes, float]:
    """Read until the peer closes; returns (how, data, seconds): how is
    "eof" or "reset".  Fails on timeout."""
    s.settimeout(timeout)
    t0 = time.monotonic()
    buf = bytearray()
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return "eof", bytes(buf), time.monotonic() - t0
            buf += data
    except ConnectionResetError:
        return "reset", bytes(buf), time.monotonic() - t0
    except TimeoutError:
        pytest.fail(f"connection still open after {timeout}s ({len(buf)} bytes received)")


def open_until_closed(port: int, timeout: float, send: bytes = b"") -> tuple[str, bytes, float]:
    """Connect, optionally send, and read until the proxy closes the connection.

    For streams the proxy is expected to reject: a reset may arrive so fast
    that ``connect()`` or ``sendall()`` already fails with it, which counts as
    "reset".  Returns (how, data, seconds since the connect started)."""
    t0 = time.monotonic()
    try:
        s = connect(port)
    except ConnectionResetError:
        return "reset", b"", time.monotonic() - t0
    try:
        if send:
            try:
                s.sendall(send)
            except (ConnectionResetError, BrokenPipeError):
                return "reset", b"", time.monotonic() - t0
        how, data, _ = wait_closed(s, timeout)
        return how, data, time.monotonic() - t0
    finally:
        s.close()
