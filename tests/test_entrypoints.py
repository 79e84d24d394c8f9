"""The three ways to run virtproxy behave alike, as real processes.

``virtproxy`` (console script), ``python -m virtproxy`` and ``twistd -n
virtproxy``: same help, and every operator error is exit status != 0 with
exactly one stderr line and no traceback.  The runs below put the repository
first on PYTHONPATH so the code under test is this checkout's, whichever
launcher starts it; ``test_installed_package`` checks the installed copy.

A launcher that is missing (the package not pip-installed) skips its tests,
except under CI=true, where it fails: CI must exercise all three.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LOOPBACK = "127.0.0.1"


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where everything must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


def launcher(kind: str) -> list[str]:
    if kind == "module":
        return [sys.executable, "-m", "virtproxy"]
    script = BIN / ("virtproxy" if kind == "console" else "twistd")
    if not script.exists():
        unavailable(f"{script} not found: `pip install .` (not -e) into this venv")
    return [str(script), "-n", "virtproxy"] if kind == "twistd" else [str(script)]


def repo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "80"
    return env


def run(
    kind: str, *args: str, cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*launcher(kind), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=repo_env(),
            cwd=cwd,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{kind} {args} still running after {timeout}s; stderr: {e.stderr!r}")


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


KINDS = ["console", "module", "twistd"]


@pytest.mark.parametrize("kind", KINDS)
def test_help(kind: str, tmp_path: Path) -> None:
    proc = run(kind, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--oforward" in proc.stdout and "--iforward" in proc.stdout
    assert "tcp-connect:[::1]:4000" in proc.stdout
    assert proc.stdout.startswith("Usage: ")
    assert proc.stderr == ""


def test_help_is_the_same_everywhere(tmp_path: Path) -> None:
    texts = {}
    for kind in KINDS:
        text = run(kind, "--help", cwd=tmp_path).stdout
        texts[kind] = text.split("\n", 1)[1]  # line 1 names the launcher
    assert texts["console"] == texts["module"] == texts["twistd"]


@pytest.mark.parametrize("kind", ["console", "module"])
def test_version(kind: str, tmp_path: Path) -> None:
    proc = run(kind, "--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "virtproxy 0.1.0\n")


BAD = {
    "unknown kind": ["--channel", "bogus"],
    "no channel": ["-o", "svc:127.0.0.1:8080"],
    "two channels": ["-c", "tcp-listen:127.0.0.1:1", "-c", "unix-connect:/x"],
    "bad port": ["-c", "tcp-connect:127.0.0.1:70000"],
    "bad forward": ["-c", "tcp-connect:127.0.0.1:1", "-i", "b@d:h:1"],
    "bad endpoint": ["-c", "tcp-connect:127.0.0.1:1", "-o", "x=bogus:1"],
    "bad number": ["-c", "tcp-connect:127.0.0.1:1", "--window", "lots"],
    "unknown option": ["-c", "tcp-connect:127.0.0.1:1", "--frobnicate"],
    "missing argument": ["-c"],
    "stray argument": ["-c", "tcp-connect:127.0.0.1:1", "extra"],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_one_line_exit_2(kind: str, case: str, tmp_path: Path) -> None:
    proc = run(kind, *BAD[case], cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("virtproxy: error: "), lines
    assert "Usage:" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # twistd wrote no pidfile or log


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that something is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((LOOPBACK, 0))
        held.listen(1)
        yield held.getsockname()[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def needs_service() -> None:
    try:
        import virtproxy.service  # noqa: F401
    except ImportError as e:
        unavailable(f"virtproxy.service not importable yet: {e}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["channel", "oforward"])
def test_address_in_use_one_line_exit_1(
    kind: str, where: str, busy_port: int, tmp_path: Path
) -> None:
    needs_service()
    if where == "channel":
        args = ["-c", f"tcp-listen:{LOOPBACK}:{busy_port}"]
    else:
        args = ["-c", f"tcp-listen:{LOOPBACK}:{free_port()}", "-o", f"web:{LOOPBACK}:{busy_port}"]
    proc = run(kind, *args, cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("virtproxy: error: ") and str(busy_port) in lines[0], lines
    assert not (tmp_path / "twistd.pid").exists()  # the guard cleaned up after twistd


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("kind", ["console", "module"])
def test_signal_stops_cleanly(kind: str, sig: signal.Signals, tmp_path: Path) -> None:
    needs_service()
    proc = subprocess.Popen(
        [*launcher(kind), "-c", f"tcp-listen:{LOOPBACK}:{free_port()}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=repo_env(),
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "virtproxy started" in line:
                break
        else:
            pytest.fail(f"no 'virtproxy started' within 20 s: {seen}")
        assert seen and "virtproxy started" in seen[-1], seen
        proc.send_signal(sig)
        rest = proc.communicate(timeout=20)[1]
        assert proc.returncode == 0, [*seen, rest]
        assert "Traceback" not in "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_option_parsing_never_imports_the_reactor() -> None:
    """twistd parses options before installing the reactor the user chose."""
    code = (
        "import sys\n"
        "import twisted.plugins.virtproxy_plugin as p\n"
        "o = p.serviceMaker.options()\n"
        "o.parseOptions(['-c', 'tcp-listen:127.0.0.1:1', '-o', 'a=tcp:80', '-i', 'b=unix:/x'])\n"
        "assert o.config.oforwards[0].endpoint == 'tcp:80'\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=repo_env(), timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_installed_package(tmp_path: Path) -> None:
    """`pip install .` ships the plugin without a twisted/__init__.py of its own.

    Run from an empty directory with no PYTHONPATH, so only the installed copy
    can answer: the console script, ``-m`` and twistd must all find it.
    """
    try:
        dist = importlib.metadata.distribution("virtproxy")
    except importlib.metadata.PackageNotFoundError:
        unavailable("virtproxy is not pip-installed in this venv")
        return
    files = {str(f) for f in dist.files or ()}
    assert "twisted/plugins/virtproxy_plugin.py" in files
    assert "twisted/__init__.py" not in files
    assert "twisted/plugins/__init__.py" not in files
    assert not any(f.endswith("dropin.cache") for f in files)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (
        [str(BIN / "virtproxy"), "--help"],
        [sys.executable, "-m", "virtproxy", "--help"],
        [str(BIN / "twistd"), "virtproxy", "--help"],
    ):
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
        )
        assert proc.returncode == 0, (argv, proc.stderr)
        assert "--oforward" in proc.stdout, argv
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import virtproxy, twisted; print(virtproxy.__file__, twisted.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    mine, twisted_init = where.stdout.split()
    # The venv may live inside the checkout (README: python3 -m venv .venv).
    assert Path(mine).resolve() != (REPO_ROOT / "virtproxy" / "__init__.py").resolve(), (
        "the installed copy was not used"
    )
    assert "site-packages" in Path(mine).parts, mine
    assert Path(twisted_init).parent.parent == Path(mine).parent.parent  # same site-packages
