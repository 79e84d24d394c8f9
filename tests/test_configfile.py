"""``--config FILE``: what a TOML file turns into, and errors that name the
file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from virtproxy.config import Limits
from virtproxy.configfile import load_config_file
from virtproxy.errors import ConfigError
from virtproxy.options import Options

GOOD = """\
control = "/run/vp.sock"
metrics = "127.0.0.1:9101"
allow_remote_listen = ["127.0.0.1", "[::1]:8080"]

[limits]
keepalive_interval = 2
keepalive_timeout = 9
max_streams = 64

[channels.vm1]
channel = "unix-connect:/run/vm1/vp.sock"
oforwards = { ssh = "127.0.0.1:9022", http = "=tcp:9080:interface=127.0.0.1" }
iforwards = { web = "127.0.0.1:8080" }
rforwards = { web = "127.0.0.1:18080" }

[channels.vm2]
channel = "tcp-connect:127.0.0.1:4000"
keepalive_interval = 1
bulk = "off"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vp.toml"
    path.write_text(text)
    return str(path)


def test_a_full_file(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, GOOD))
    assert config.control == "/run/vp.sock"
    assert config.metrics == "tcp:9101:interface=127.0.0.1:backlog=128"
    assert [(a.host, a.port) for a in config.allow_remote_listen] == [
        ("127.0.0.1", None),
        ("::1", 8080),
    ]
    vm1, vm2 = config.channels
    assert (vm1.label, vm1.channel.endpoint) == ("vm1", "unix:path=/run/vm1/vp.sock")
    assert {f.name: f.endpoint for f in vm1.oforwards} == {
        "ssh": "tcp:9022:interface=127.0.0.1:backlog=128",
        "http": "tcp:9080:interface=127.0.0.1",
    }
    assert [f.name for f in vm1.iforwards] == ["web"]
    assert [(r.name, r.host, r.port) for r in vm1.rforwards] == [("web", "127.0.0.1", 18080)]
    one, two = vm1.limits, vm2.limits
    assert (one.keepalive_interval, one.keepalive_timeout, one.max_streams) == (2, 9, 64)
    assert (two.keepalive_interval, two.keepalive_timeout) == (1, 9)
    assert two.window == Limits().window
    assert (one.bulk, two.bulk) == (True, False)


def test_options_merge_the_file_with_the_command_line(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(
        ["--config", write(tmp_path, GOOD), "-c", "host0=tcp-listen:127.0.0.1:4001"]
    )
    process = options.process
    assert [c.name for c in process.channels] == ["host0", "vm1", "vm2"]
    assert process.cli_channels == ("host0",)
    assert process.config_file is not None


ERRORS = [
    ("bogus = 1\n", "1: bogus: unknown key"),
    ("[channels.vm1]\nchanel = 'x'\n", "2: channels.vm1.chanel: unknown key"),
    ("[channels.vm1]\nwindow = 1\n", "1: channels.vm1: missing key 'channel'"),
    (
        "[channels.vm1]\nchannel = 'tcp-listen:127.0.0.1:1'\nwindow = 'big'\n",
        "3: channels.vm1.window: expected an integer, got a string",
    ),
    (
        "[limits]\n\nkeepalive_interval = 30\n",
        "3: limits.keepalive_interval: keepalive_timeout (20) must exceed keepalive_interval (30)",
    ),
    (
        "[channels.vm1]\nchannel = 'tcp-listen:127.0.0.1:70000'\n",
        "2: channels.vm1.channel: --channel 'tcp-listen:127.0.0.1:70000': port 70000 out of range",
    ),
    (
        "[channels.vm1]\nchannel = 'tcp-listen:127.0.0.1:1'\n\n"
        "oforwards = { ok = '127.0.0.1:1', bad = '127.0.0.1' }\n",
        "4: channels.vm1.oforwards.bad: --oforward 'bad:127.0.0.1'",
    ),
    (
        "[channels.vm1]\nchannel = 'tcp-listen:127.0.0.1:1'\n"
        "rforwards = { web = '127.0.0.1:80' }\n",
        "3: channels.vm1.rforwards.web: needs an iforward 'web'",
    ),
    ("[channels.'v m']\nchannel = 'tcp-listen:127.0.0.1:1'\n", "1: channels.v m: channel 'v m'"),
    ("allow_remote_listen = ['localhost']\n", "1: allow_remote_listen: --allow-remote-listen"),
    ("control = [1]\n", "1: control: expected a string, got an array"),
    ("[limits]\nbulk = true\n", "2: limits.bulk: expected on or off"),
    ("[channels.vm1]\nchannel = tcp\n", "2: TOML syntax: Invalid value"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = info.value.message
    assert message.startswith(f"{path}:{expected}"), message
    assert "\n" not in message


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read: No such file"):
        load_config_file(str(tmp_path / "missing.toml"))


def test_file_errors_are_usage_errors_of_the_options(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\n")
    with pytest.raises(usage.UsageError, match=r"vp.toml:1: bogus: unknown key"):
        Options().parseOptions(["--config", path])


def test_file_label_clashing_with_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(usage.UsageError, match=r"channels.vm1: label also given with --channel"):
        Options().parseOptions(["--config", path, "-c", "vm1=tcp-listen:127.0.0.1:1"])
