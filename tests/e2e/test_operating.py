"""Operating a running daemon: the control socket and ``virtproxy ctl``, config
reloads on a real SIGHUP, remote forwards, several channels in one process and
the metrics endpoint, all on real daemons over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.request

import pytest
from vp_e2e import (
    LOOPBACK,
    SESSION_TIMEOUT,
    EchoServer,
    connect,
    daemon_cmd,
    daemon_env,
    free_port,
    open_until_closed,
    wait_closed,
)

pytestmark = pytest.mark.e2e


def ctl(control, *args, ok=True, timeout=15.0):
    """Run ``python -m virtproxy ctl --control PATH ARGS``; check the status."""
    proc = subprocess.run(
        daemon_cmd("ctl", "--control", str(control), *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=timeout,
    )
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert proc.stderr == ""
    return proc


def ctl_json(control, *args):
    return json.loads(ctl(control, *args, "--json").stdout)


def echo_once(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        assert data, "connection closed mid-echo"
        got += data
    assert got == payload


def wait_until(predicate, what, timeout=SESSION_TIMEOUT):
    """Poll a condition that depends on another process (no timing assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def refused(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((LOOPBACK, port)) != 0


# --------------------------------------------------------------------------- ctl


def test_ctl_adds_and_removes_forwards_while_streams_live(pair, backends, short_dir):
    echo = backends(EchoServer)
    control = short_dir / "host.sock"
    p = pair(guest_i=[f"echo:{echo.addr}"], host_args=["--control", str(control)])
    p.host.wait_for("listening for control socket")
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600

    port = free_port()
    out = ctl(control, "add-oforward", "default", "echo", f"{LOOPBACK}:{port}").stdout
    assert "oforward 'echo:127.0.0.1:" in out and "added" in out
    live = connect(port)
    echo_once(live, b"first")

    forwards = ctl_json(control, "forwards")
    assert [(f["kind"], f["name"], f["streams"]) for f in forwards] == [("oforward", "echo", 1)]
    streams = ctl_json(control, "streams")
    assert len(streams) == 1
    row = streams[0]
    assert (row["channel"], row["service"], row["direction"], row["state"]) == (
        "default",
        "echo",
        "out",
        "open",
    )
    assert row["client"].startswith(f"{LOOPBACK}:")
    assert row["bytes_sent"] == 5 and row["bytes_received"] == 5
    assert row["age"] >= 0 and row["window"] == "open"
    table = ctl(control, "streams").stdout.splitlines()
    assert table[0].split()[:3] == ["CHANNEL", "ID", "SERVICE"] and "echo" in table[1]

    # Removing the forward stops new connections; the live stream goes on.
    out = ctl(control, "remove-oforward", "echo").stdout
    assert "1 live streams continue" in out
    assert wait_until(lambda: refused(port), "the listener to close")
    echo_once(live, b"still here")
    live.shutdown(socket.SHUT_WR)
    how, data, _ = wait_closed(live, 10)
    assert (how, data) == ("eof", b"")
    live.close()

    # An iforward removed with --kill ends its live streams at once.
    port2 = free_port()
    ctl(control, "add-oforward", "echo", f"{LOOPBACK}:{port2}")
    victim = connect(port2)
    echo_once(victim, b"x")
    guest_control_free = ctl(control, "remove-oforward", "echo", "--kill").stdout
    assert "1 live streams ended" in guest_control_free
    how, _, _ = wait_closed(victim, 10)
    assert how == "reset"
    victim.close()
    wait_until(lambda: ctl_json(control, "streams") == [], "the stream list to empty")


def test_removing_an_iforward_refuses_new_streams_and_keeps_live_ones(pair, backends, short_dir):
    echo = backends(EchoServer)
    gcontrol = short_dir / "guest.sock"
    port = free_port()
    p = pair(
        host_o=[f"echo:{LOOPBACK}:{port}"],
        guest_i=[f"echo:{echo.addr}"],
        guest_args=["--control", str(gcontrol)],
    )
    p.guest.wait_for("listening for control socket")
    live = connect(port)
    echo_once(live, b"before")
    out = ctl(gcontrol, "remove-iforward", "echo").stdout
    assert "iforward 'echo' removed" in out and "1 live streams continue" in out
    how, _, _ = open_until_closed(port, 10, send=b"new")
    assert how == "reset"  # the guest now refuses the service
    p.host.wait_for("no service 'echo'")
    echo_once(live, b"the live stream goes on")
    live.close()


def test_ctl_status_and_errors(pair, short_dir):
    control = short_dir / "h.sock"
    p = pair(host_args=["--control", str(control)])
    p.host.wait_for("listening for control socket")
    (row,) = ctl_json(control, "status")
    assert row["channel"] == "default" and row["state"] == "up"
    assert len(row["peer_session"]) == 16 and row["sessions"] == 1
    for key in (
        "frames_in",
        "frames_out",
        "crc_errors",
        "resyncs",
        "lost_frames",
        "limit_hits",
        "retransmits",
    ):
        assert isinstance(row[key], int), key
    assert row["frames_in"] >= 1 and row["crc_errors"] == 0

    for args, fragment in [
        (("remove-oforward", "nope"), "has no oforward 'nope'"),
        (("add-oforward", "vm9", "x", "127.0.0.1:1"), "no channel 'vm9'"),
        (("add-oforward", "x", "127.0.0.1:70000"), "port 70000 out of range"),
        (("add-rforward", "web", "127.0.0.1:8080"), "has no iforward 'web'"),
        (("reload",), "no --config file"),
    ]:
        proc = ctl(control, *args, ok=False)
        assert proc.returncode == 1, args
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("virtproxy: error: "), proc.stderr
        assert fragment in lines[0], (args, lines)
        assert "Traceback" not in proc.stderr

    proc = ctl(short_dir / "missing.sock", "status", ok=False)
    assert proc.returncode == 1
    missing = short_dir / "missing.sock"
    assert proc.stderr.strip() == (
        f"virtproxy: error: cannot reach the control socket {missing}: No such file or directory"
    ), proc.stderr
    proc = ctl(control, "frobnicate", ok=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1


def test_ctl_adds_and_removes_channels(daemons, backends, short_dir):
    echo = backends(EchoServer)
    control = short_dir / "h.sock"
    host = daemons("host", "--control", str(control))
    host.wait_for("listening for control socket")
    chan, port = free_port(), free_port()
    ctl(
        control,
        "add-channel",
        "vm7",
        f"tcp-listen:{LOOPBACK}:{chan}",
        "-o",
        f"echo:{LOOPBACK}:{port}",
    )
    guest = daemons("guest", "-c", f"tcp-connect:{LOOPBACK}:{chan}", "-i", f"echo:{echo.addr}")
    guest.wait_for("session up")
    with connect(port) as s:
        echo_once(s, b"via vm7")
    assert [r["channel"] for r in ctl_json(control, "status")] == ["vm7"]
    out = ctl(control, "remove-channel", "vm7").stdout
    assert "channel 'vm7' removed" in out
    assert ctl_json(control, "status") == []
    assert wait_until(lambda: refused(port), "the oforward to close")
    guest.wait_for("session ended")


# --------------------------------------------------------------------------- config file + SIGHUP


def _write(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_sighup_applies_the_config_diff_and_keeps_live_streams(daemons, backends, short_dir):
    echo = backends(EchoServer)
    control = short_dir / "h.sock"
    conf = short_dir / "host.toml"
    chan_a, chan_b = free_port(), free_port()
    port1, port2 = free_port(), free_port()
    base = f"""\
control = "{control}"

[limits]
keepalive_interval = 0.5
keepalive_timeout = 3

[channels.a]
channel = "tcp-listen:{LOOPBACK}:{chan_a}"
"""
    _write(conf, base + f'oforwards = {{ echo = "{LOOPBACK}:{port1}" }}\n')
    host = daemons("host", "--config", str(conf))
    host.wait_for("listening for control socket")
    guest_a = daemons("ga", "-c", f"tcp-connect:{LOOPBACK}:{chan_a}", "-i", f"echo:{echo.addr}")
    guest_a.wait_for("session up")
    live = connect(port1)
    echo_once(live, b"before reload")

    # Move the forward to another port and add a second channel.
    _write(
        conf,
        base
        + f'oforwards = {{ echo = "{LOOPBACK}:{port2}" }}\n'
        + f'\n[channels.b]\nchannel = "tcp-listen:{LOOPBACK}:{chan_b}"\n'
        + f'oforwards = {{ echo = "{LOOPBACK}:{free_port()}" }}\n',
    )
    mark = host.mark()
    os.kill(host.pid, signal.SIGHUP)
    host.wait_for("reloaded", since=mark)
    assert refused(port1)
    with connect(port2) as s:
        echo_once(s, b"new port")
    echo_once(live, b"the old stream lives on")
    assert sorted(r["channel"] for r in ctl_json(control, "status")) == ["a", "b"]

    # A broken file changes nothing and says where it is broken.
    _write(conf, base + "oforwards = { echo = 5 }\n")
    mark = host.mark()
    os.kill(host.pid, signal.SIGHUP)
    line = host.wait_line("reload failed", since=mark)
    assert f"{conf}:9: channels.a.oforwards.echo: expected a string" in line
    with connect(port2) as s:
        echo_once(s, b"unchanged")

    # Dropping channel b from the file removes it; a keeps its live stream.
    _write(conf, base + f'oforwards = {{ echo = "{LOOPBACK}:{port2}" }}\n')
    mark = host.mark()
    os.kill(host.pid, signal.SIGHUP)
    host.wait_for("reloaded", since=mark)
    assert [r["channel"] for r in ctl_json(control, "status")] == ["a"]
    echo_once(live, b"after the last reload")

    # The same oforward with other options on the same port: it is removed and
    # added again, which needs the old listener closed first.
    _write(
        conf,
        base + f'oforwards = {{ echo = "=tcp:{port2}:interface={LOOPBACK}:backlog=32" }}\n',
    )
    reply = ctl(control, "reload").stdout
    assert "removed" in reply and "added" in reply and "error" not in reply, reply
    with connect(port2) as s:
        echo_once(s, b"same port, new options")
    echo_once(live, b"still here")

    # A reload that cannot make every change makes the others and says so:
    # the summary on stdout, one error line, exit status 1.
    with socket.create_server((LOOPBACK, 0)) as held:
        busy = held.getsockname()[1]
        _write(
            conf,
            base
            + f'oforwards = {{ echo = "=tcp:{port2}:interface={LOOPBACK}:backlog=32", '
            + f'busy = "{LOOPBACK}:{busy}", more = "{LOOPBACK}:{port1}" }}\n',
        )
        proc = ctl(control, "reload", ok=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Address already in use" in proc.stdout and "'more:" in proc.stdout, proc.stdout
    assert proc.stderr.strip() == (
        "virtproxy: error: reload: 1 of the changes failed; the others were made"
    ), proc.stderr
    assert not refused(port1)  # the change that could be made was
    assert host.alive()
    live.close()


def test_config_file_errors_name_file_line_and_key(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('[channels.vm1]\nchannel = "tcp-listen:127.0.0.1:4000"\nmax_streams = 0\n')
    proc = subprocess.run(
        daemon_cmd("--config", str(conf)),
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=15,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"virtproxy: error: {conf}:3: channels.vm1.max_streams: 0 out of range 1..65536"
    ]


# --------------------------------------------------------------------------- remote forwards


def test_remote_forward_asked_by_the_host(pair, backends, short_dir):
    """The host asks the guest to listen; the guest needs only --channel and the switch."""
    web = backends(EchoServer)  # a host service
    rport = free_port()
    control = short_dir / "h.sock"
    p = pair(
        host_i=[f"web:{web.addr}"],
        host_args=["--rforward", f"web:{LOOPBACK}:{rport}", "--control", str(control)],
        guest_args=["--allow-remote-listen", LOOPBACK],
    )
    p.guest.wait_for("listening for remote forward 'web'")
    with connect(rport) as s:
        echo_once(s, b"guest to host service")
    (row,) = [f for f in ctl_json(control, "forwards") if f["kind"] == "rforward"]
    assert (row["name"], row["state"]) == (f"{LOOPBACK}:{rport}", "listening")

    # The guest restarts (a reboot): the host asks again in the new session.
    p.guest.kill()
    p.guest.restart()
    p.guest.wait_for("listening for remote forward 'web'")
    with connect(rport) as s:
        echo_once(s, b"after the guest restarted")

    # Withdrawn by the host: the guest stops listening.
    ctl(control, "remove-rforward", f"{LOOPBACK}:{rport}")
    p.guest.wait_for("remote forward 'web' on")
    assert wait_until(lambda: refused(rport), "the guest's remote listener to close")


def test_remote_forward_refused_without_the_switch(pair, backends, short_dir):
    web = backends(EchoServer)
    rport = free_port()
    control = short_dir / "h.sock"
    p = pair(
        host_i=[f"web:{web.addr}"],
        host_args=["--rforward", f"web:{LOOPBACK}:{rport}", "--control", str(control)],
        guest_args=["--allow-remote-listen", f"{LOOPBACK}:{free_port()}"],  # another port only
    )
    p.host.wait_for("peer refused remote forward 'web'")
    assert refused(rport)
    (row,) = [f for f in ctl_json(control, "forwards") if f["kind"] == "rforward"]
    assert "not allowed" in row["state"]


def test_peer_remote_listen_refused_by_default(pair, backends):
    web = backends(EchoServer)
    rport = free_port()
    p = pair(host_i=[f"web:{web.addr}"], host_args=["--rforward", f"web:{LOOPBACK}:{rport}"])
    p.guest.wait_for("peer asked for a remote forward; refused")
    assert refused(rport)


# --------------------------------------------------------------------------- several channels


def test_one_process_many_channels_one_failing(daemons, backends, short_dir):
    echo = backends(EchoServer)
    control = short_dir / "h.sock"
    chans = {label: free_port() for label in ("a", "b", "c")}
    ports = {label: free_port() for label in chans}
    args = ["--control", str(control), *FAST]
    for label, chan in chans.items():
        args += [
            "-c",
            f"{label}=tcp-listen:{LOOPBACK}:{chan}",
            "-o",
            f"{label}/echo:{LOOPBACK}:{ports[label]}",
        ]
    host = daemons("host", *args)
    host.wait_for("listening for control socket")
    guests = {
        label: daemons(
            f"guest-{label}",
            "-c",
            f"tcp-connect:{LOOPBACK}:{chan}",
            "-i",
            f"echo:{echo.addr}",
            *FAST,
        )
        for label, chan in chans.items()
    }
    for g in guests.values():
        g.wait_for("session up")
    lives = {label: connect(port) for label, port in ports.items()}
    for label, s in lives.items():
        echo_once(s, label.encode())

    guests["b"].kill()  # one channel fails
    how, _, _ = wait_closed(lives["b"], 15)
    assert how == "reset"
    for label in ("a", "c"):
        echo_once(lives[label], b"unaffected")
    status = {r["channel"]: r for r in ctl_json(control, "status")}
    assert status["a"]["state"] == "up" and status["c"]["state"] == "up"
    how, _, _ = open_until_closed(ports["b"], 15)
    assert how in ("reset", "eof")
    for s in lives.values():
        s.close()


FAST = ["--keepalive-interval", "0.5", "--keepalive-timeout", "2"]


# --------------------------------------------------------------------------- metrics


def test_metrics_endpoint(pair):
    mport = free_port()
    p = pair(host_args=["--metrics", f"{LOOPBACK}:{mport}"])
    p.host.wait_for("listening for metrics")
    with urllib.request.urlopen(f"http://{LOOPBACK}:{mport}/metrics", timeout=10) as r:
        body = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert 'virtproxy_session_up{channel="default"} 1.0' in body
    assert 'virtproxy_sessions_total{channel="default"} 1.0' in body
    assert 'virtproxy_crc_errors_total{channel="default"} 0.0' in body
    assert "virtproxy_frames_received_total" in body
