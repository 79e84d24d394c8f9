"""``python -m virtproxy`` option errors: status 2, one line on stderr, no traceback."""

from __future__ import annotations

import socket
import subprocess

import pytest
from vp_e2e import LOOPBACK, daemon_cmd, daemon_env, free_port

pytestmark = pytest.mark.e2e


def _run(args, cwd, timeout=15.0):
    try:
        return subprocess.run(
            daemon_cmd(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=daemon_env(),
            cwd=str(cwd),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"virtproxy {args} still running after {timeout}s; stderr:\n"
            f"{(e.stderr or b'').decode('utf-8', 'replace')}"
        )


def _stderr_lines(proc):
    return [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]


def _chan():
    return f"tcp-listen:{LOOPBACK}:{free_port()}"


BAD = {
    "unknown channel kind": lambda: ["--channel", f"carrier-pigeon:{LOOPBACK}:{free_port()}"],
    "channel missing port": lambda: ["--channel", f"tcp-listen:{LOOPBACK}"],
    "channel non-numeric port": lambda: ["--channel", f"tcp-connect:{LOOPBACK}:http"],
    "channel port 70000": lambda: ["--channel", f"tcp-listen:{LOOPBACK}:70000"],
    "oforward missing port": lambda: ["--channel", _chan(), "-o", f"svc:{LOOPBACK}"],
    "oforward non-numeric port": lambda: ["--channel", _chan(), "-o", f"svc:{LOOPBACK}:eighty"],
    "oforward port 70000": lambda: ["--channel", _chan(), "-o", f"svc:{LOOPBACK}:70000"],
    "iforward port 70000": lambda: ["--channel", _chan(), "-i", f"svc:{LOOPBACK}:70000"],
    "empty oforward name": lambda: ["--channel", _chan(), "-o", f":{LOOPBACK}:{free_port()}"],
    "empty iforward name": lambda: ["--channel", _chan(), "-i", f":{LOOPBACK}:80"],
    "duplicate oforward name": lambda: [
        "--channel",
        _chan(),
        "-o",
        f"dup:{LOOPBACK}:{free_port()}",
        "-o",
        f"dup:{LOOPBACK}:{free_port()}",
    ],
    "duplicate iforward name": lambda: [
        "--channel",
        _chan(),
        "-i",
        f"dup:{LOOPBACK}:80",
        "-i",
        f"dup:{LOOPBACK}:81",
    ],
    "bad oforward endpoint form": lambda: ["--channel", _chan(), "-o", "tw=tcp:notaport"],
    "bad iforward endpoint form": lambda: ["--channel", _chan(), "-i", f"tw=tcp:host={LOOPBACK}"],
    "no channel": lambda: ["-o", f"svc:{LOOPBACK}:{free_port()}"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_exit_2_with_one_line(case, tmp_path):
    args = BAD[case]()
    proc = _run(args, tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 2, f"{case}: exit status {proc.returncode}, stderr:\n{err}"
    lines = _stderr_lines(proc)
    assert len(lines) == 1, f"{case}: {len(lines)} stderr lines, want 1:\n{err}"


def _held_listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("where", ["oforward", "channel"])
def test_address_in_use_fails_cleanly(where, tmp_path):
    held = _held_listener()
    port = held.getsockname()[1]
    try:
        if where == "oforward":
            args = ["--channel", _chan(), "-o", f"busy:{LOOPBACK}:{port}"]
        else:
            args = ["--channel", f"tcp-listen:{LOOPBACK}:{port}"]
        proc = _run(args, tmp_path)
    finally:
        held.close()
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, f"exit status 0 with {LOOPBACK}:{port} in use:\n{err}"
    assert "Traceback" not in err, err
    naming = [line for line in _stderr_lines(proc) if str(port) in line]
    assert len(naming) == 1, f"want one stderr line naming {LOOPBACK}:{port}, got:\n{err}"


def test_unix_listen_in_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "no-such-dir" / "vp.sock"
    proc = _run(["--channel", f"unix-listen:{path}"], tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0 and "Traceback" not in err, err
    lines = _stderr_lines(proc)
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "No such file or directory" in lines[0], err
    assert ".lock" not in lines[0], f"names Twisted's lock file, not the path: {err}"


def test_connect_channel_logs_why_it_cannot_connect_and_keeps_trying(tmp_path):
    path = tmp_path / "not-there.sock"
    proc = subprocess.Popen(
        daemon_cmd("--channel", f"unix-connect:{path}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=daemon_env(),
        cwd=str(tmp_path),
    )
    try:
        out, _ = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    else:
        pytest.fail(f"exited {proc.returncode} instead of retrying:\n{out.decode()}")
    text = out.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    why = [line for line in text.splitlines() if "cannot connect the channel" in line]
    assert len(why) == 1 and "No such file or directory; retrying" in why[0], text
    assert f"to connect unix-connect:{path} in " in text, text  # not an object's repr
