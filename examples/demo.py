"""Demo: two virtproxy daemons over a local TCP channel proxying a real HTTP server.

    python examples/demo.py          # serve until Ctrl-C
    python examples/demo.py --once   # fetch one page through the pair and exit

The "guest" daemon listens for the channel and carries streams for ``http`` to
a Python http.server; the "host" daemon connects to it and listens on
127.0.0.1:9080, so http://127.0.0.1:9080/ reaches the guest's server.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: no {text!r} in {log} after {timeout} s:\n{log.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="fetch one page and exit")
    parser.add_argument("--port", type=int, default=9080, help="host-side port (default 9080)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="virtproxy-demo-"))
    (workdir / "index.html").write_text("<h1>Hello from the guest's web server</h1>\n")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(workdir))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_port = web.server_address[1]
    channel_port = free_port()

    vp = [sys.executable, "-m", "virtproxy"]
    channel = f"127.0.0.1:{channel_port}"
    guest_cmd = [*vp, "-c", f"tcp-listen:{channel}", "-i", f"http:127.0.0.1:{web_port}"]
    host_cmd = [*vp, "-c", f"tcp-connect:{channel}", "-o", f"http:127.0.0.1:{args.port}"]
    daemons = []
    try:
        for name, cmd in (("guest", guest_cmd), ("host", host_cmd)):
            log = workdir / f"{name}.log"
            print(f"$ virtproxy {' '.join(cmd[3:])}    # the {name}; log: {log}")
            daemons.append((subprocess.Popen(cmd, stderr=log.open("w")), log))
        for _, log in daemons:
            wait_for(log, "session up", 15)
        url = f"http://127.0.0.1:{args.port}/"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
        print(f"GET {url} through virtproxy -> {reply.status}: {body.strip()}")
        if args.once:
            return 0
        print(f"Serving; try: curl http://127.0.0.1:{args.port}/   (Ctrl-C to stop)")
        while all(proc.poll() is None for proc, _ in daemons):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc, _ in daemons:
            proc.terminate()
        for proc, _ in daemons:
            proc.wait(10)
        web.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
