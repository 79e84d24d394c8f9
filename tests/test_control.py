"""The control protocol in memory: AMP commands against a Runtime on a
MemoryReactorClock (no sockets), paging, refusals, and the ctl options."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from virtproxy import control as c
from virtproxy.config import ProcessConfig
from virtproxy.ctl import format_table
from virtproxy.daemon import Runtime
from virtproxy.metrics import make_registry
from virtproxy.options import Options
from virtproxy.session import StreamState


def runtime(*argv: str) -> tuple[Runtime, MemoryReactorClock]:
    options = Options()
    options.parseOptions(list(argv))
    reactor = MemoryReactorClock()
    rt = Runtime(options.process, reactor)
    rt.startService()
    return rt, reactor


def address_in_use(port: int, *args: Any, **kw: Any) -> Any:
    """A reactor's listenTCP for a port someone else holds."""
    raise CannotListenError("127.0.0.1", port, OSError(98, "Address already in use"))


def call(rt: Runtime, command: type[amp.Command], **kw: Any) -> Any:
    """One AMP round trip over an in-memory connection; a Failure if refused."""
    client, _server, pump = connectedServerAndClient(
        lambda: c.ControlProtocol(rt), amp.AMP, greet=False
    )
    outcome: list[Any] = []
    client.callRemote(command, **kw).addBoth(outcome.append)
    pump.flush()
    assert outcome, "no answer"
    return outcome[0]


HOST = ["-c", "vm1=tcp-listen:127.0.0.1:7001", "-c", "vm2=tcp-connect:127.0.0.1:7002"]


def test_add_list_and_remove_forwards() -> None:
    rt, reactor = runtime(*HOST, "-o", "vm1/ssh:127.0.0.1:9022")
    answer = call(rt, c.AddForward, channel="vm2", kind="iforward", spec="web:127.0.0.1:80")
    assert answer["message"] == "iforward 'web:127.0.0.1:80' added to channel 'vm2'"
    call(rt, c.AddForward, channel="vm1", kind="oforward", spec="http:127.0.0.1:9080")
    assert sorted(p for p, *_ in reactor.tcpServers) == [7001, 9022, 9080]

    rows = call(rt, c.ListForwards, after="")["rows"]
    assert [(r["channel"], r["kind"], r["name"]) for r in rows] == [
        ("vm1", "oforward", "http"),
        ("vm1", "oforward", "ssh"),
        ("vm2", "iforward", "web"),
    ]
    assert "web" in rt.channels["vm2"].channel.iforwards

    answer = call(rt, c.RemoveForward, channel="vm2", kind="iforward", name="web", kill=False)
    assert answer["message"].endswith("0 live streams continue")
    assert "web" not in rt.channels["vm2"].channel.iforwards
    call(rt, c.RemoveForward, channel="vm1", kind="oforward", name="ssh", kill=True)
    assert "ssh" not in rt.channels["vm1"].service.oforwards


@pytest.mark.parametrize(
    ("command", "kw", "message"),
    [
        (c.AddForward, {"channel": "vm3", "kind": "oforward", "spec": "a:1.2.3.4:5"}, "no channel"),
        (c.AddForward, {"channel": "", "kind": "oforward", "spec": "a:1.2.3.4:5"}, "2 channels"),
        (c.AddForward, {"channel": "vm1", "kind": "oforward", "spec": "..x:1.2.3.4:5"}, "reserved"),
        (c.AddForward, {"channel": "vm1", "kind": "sideways", "spec": "a:1.2.3.4:5"}, "unknown"),
        (
            c.AddForward,
            {"channel": "vm1", "kind": "rforward", "spec": "web:127.0.0.1:80"},
            "has no iforward 'web'",
        ),
        (
            c.RemoveForward,
            {"channel": "vm1", "kind": "oforward", "name": "nope", "kill": False},
            "has no oforward 'nope'",
        ),
        (c.RemoveChannel, {"label": "vm9"}, "no channel 'vm9'"),
        (c.Reload, {}, "no --config file"),
    ],
)
def test_refusals_are_one_line_control_errors(command: Any, kw: Any, message: str) -> None:
    rt, _ = runtime(*HOST)
    result = call(rt, command, **kw)
    assert isinstance(result, Failure) and result.check(c.ControlError)
    assert message in str(result.value) and "\n" not in str(result.value)


def test_an_address_in_use_is_refused_and_changes_nothing() -> None:
    rt, reactor = runtime(*HOST)
    call(rt, c.AddForward, channel="vm1", kind="oforward", spec="a:127.0.0.1:9000")
    before = len(list(rt.channels["vm1"].service))

    reactor.listenTCP = address_in_use  # type: ignore[method-assign]
    result = call(rt, c.AddForward, channel="vm1", kind="oforward", spec="b:127.0.0.1:9001")
    assert isinstance(result, Failure) and "Address already in use" in str(result.value)
    assert len(list(rt.channels["vm1"].service)) == before
    assert set(rt.channels["vm1"].oforwards) == {"a"}


def test_add_and_remove_channels() -> None:
    rt, reactor = runtime("--control", "/tmp/unused-vp.sock")
    assert rt.channels == {}
    answer = call(
        rt,
        c.AddChannel,
        label="vm5",
        spec="tcp-listen:127.0.0.1:7005",
        oforwards=["ssh:127.0.0.1:9005"],
        iforwards=[],
        rforwards=[],
    )
    assert answer["message"] == "channel 'vm5' added"
    assert {p for p, *_ in reactor.tcpServers} >= {7005, 9005}
    bad = call(
        rt, c.AddChannel, label="vm6", spec="nope:1", oforwards=[], iforwards=[], rforwards=[]
    )
    assert isinstance(bad, Failure) and "unknown channel kind 'nope'" in str(bad.value)
    answer = call(rt, c.RemoveChannel, label="vm5")
    assert answer["message"].startswith("channel 'vm5' removed")
    assert rt.channels == {}


def test_listings_come_in_pages() -> None:
    rt, _ = runtime(*HOST, "-o", "vm1/a:127.0.0.1:9000")
    channel = rt.channels["vm1"].channel
    for _ in range(c.PAGE_ROWS * 2 + 3):
        channel.session.open_stream("a", 0.0)  # pending: the session is not up
    assert all(s.state is StreamState.PENDING for s in channel.session.streams.values())
    seen: list[int] = []
    after = ""
    pages = 0
    while True:
        answer = call(rt, c.ListStreams, after=after)
        pages += 1
        seen += [row["id"] for row in answer["rows"]]
        if not answer["more"]:
            break
        after = answer["rows"][-1]["key"]
    assert pages == 3
    assert seen == sorted(channel.session.streams)


def test_status_rows_and_metrics() -> None:
    rt, _ = runtime(*HOST)
    rows = call(rt, c.ChannelStatus, after="")["rows"]
    assert [(r["channel"], r["state"], r["sessions"]) for r in rows] == [
        ("vm1", "disconnected", 0),
        ("vm2", "disconnected", 0),
    ]
    rt.channels["vm2"].channel.session.stats.damaged_frames = 7
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(rt)).decode()
    assert 'virtproxy_crc_errors_total{channel="vm2"} 7.0' in text
    assert 'virtproxy_session_up{channel="vm1"} 0.0' in text


def test_format_table() -> None:
    text = format_table([("a", "A"), ("bb", "BB")], [{"a": "x", "bb": ""}, {"a": 1.25, "bb": 3}])
    assert text.splitlines() == ["A    BB", "x    -", "1.2  3"]


def test_empty_runtime_is_allowed_only_with_a_control_socket() -> None:
    options = Options()
    options.parseOptions(["--control", "/tmp/x.sock"])
    assert options.process == ProcessConfig(control="/tmp/x.sock")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctl", "--control", "/x"], "ctl: missing VERB"),
        (["ctl", "status"], "--control PATH is required"),
        (["ctl", "--control", "/x", "add-oforward", "a"], "expected [CHANNEL] NAME TARGET"),
        (["ctl", "--control", "/x", "remove-channel"], "expected LABEL, got 0"),
    ],
)
def test_ctl_usage_errors(argv: list[str], message: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("VIRTPROXY_CONTROL", raising=False)
    with pytest.raises(usage.UsageError, match=message.replace("[", r"\[")):
        Options().parseOptions(argv)


def test_ctl_arguments_in_any_order() -> None:
    options = Options()
    options.parseOptions(["ctl", "--control", "/x", "remove-oforward", "ssh", "--kill", "--json"])
    sub = options.subOptions
    assert options.subCommand == "ctl" and sub.subCommand == "remove-oforward"
    assert sub.subOptions.args == ["", "ssh"]
    assert sub.subOptions["kill"] and sub.as_json


def test_reload_applies_the_diff(tmp_path: Any) -> None:
    before = signal.getsignal(signal.SIGHUP)
    conf = tmp_path / "vp.toml"
    base = "[channels.a]\nchannel = 'tcp-listen:127.0.0.1:7101'\n"
    conf.write_text(
        base
        + "oforwards = { x = '127.0.0.1:9101' }\n"
        + "[channels.b]\nchannel = 'tcp-listen:127.0.0.1:7102'\n"
    )
    rt, _ = runtime("--config", str(conf))
    a, b = rt.channels["a"].channel, rt.channels["b"].channel
    a.session.open_stream("x", 0.0)  # a live stream of the forward that moves

    conf.write_text(
        base
        + "oforwards = { x = '127.0.0.1:9201', y = '127.0.0.1:9202' }\n"
        + "[channels.b]\nchannel = 'tcp-listen:127.0.0.1:7102'\nmax_streams = 7\n"
        + "[channels.c]\nchannel = 'tcp-connect:127.0.0.1:7103'\n"
    )
    outcome: list[Any] = []
    rt.reload().addBoth(outcome.append)
    (done,) = outcome
    summary, errors = done.text, done.errors
    assert errors == ()
    assert "oforward 'x:127.0.0.1:9201' added" in summary and "channel 'c' added" in summary
    assert "channel 'b' added (restarted: spec or limits changed)" in summary
    assert rt.channels["a"].channel is a and len(a.session.streams) == 1  # kept
    assert set(rt.channels["a"].oforwards) == {"x", "y"}
    assert rt.channels["b"].channel is not b  # new limits need a new session
    assert rt.channels["b"].channel.session.config.max_streams == 7
    assert sorted(rt.channels) == ["a", "b", "c"]

    conf.write_text("[channels.a]\nchannel = 5\n")
    rt.reload().addBoth(outcome.append)
    failure = outcome[-1]
    assert isinstance(failure, Failure)
    assert str(failure.value) == f"{conf}:2: channels.a.channel: expected a string, got an integer"
    assert sorted(rt.channels) == ["a", "b", "c"]  # nothing changed

    conf.write_text(base)
    rt.reload().addBoth(outcome.append)
    assert sorted(rt.channels) == ["a"] and set(rt.channels["a"].oforwards) == set()
    assert len(a.session.streams) == 1

    assert signal.getsignal(signal.SIGHUP) is not before
    rt.stopService()
    assert signal.getsignal(signal.SIGHUP) is before  # the process's handler is back


def test_a_restart_that_cannot_listen_is_counted_and_rolled_back(tmp_path: Any) -> None:
    conf = tmp_path / "vp.toml"
    conf.write_text("[channels.a]\nchannel = 'tcp-listen:127.0.0.1:7301'\n")
    rt, reactor = runtime("--config", str(conf))
    conf.write_text("[channels.a]\nchannel = 'tcp-listen:127.0.0.1:7302'\n")

    # The restart removes channel a, then its new listener fails: a change
    # that fails after the reload began, not at once.  The previous spec
    # starts again rather than leave the channel gone.
    listen = reactor.listenTCP
    reactor.listenTCP = lambda port, *a, **kw: (  # type: ignore[method-assign]
        address_in_use(port) if port == 7302 else listen(port, *a, **kw)
    )
    answer = call(rt, c.Reload)
    assert answer["failed"] == 1, answer
    assert "Address already in use" in answer["message"] and "1 errors" in answer["message"]
    assert "channel 'a' runs its previous spec again" in answer["message"]
    assert rt.channels["a"].config.channel.original == "tcp-listen:127.0.0.1:7301"

    # And if the previous spec cannot start either, the answer says the channel is down.
    conf.write_text("[channels.a]\nchannel = 'tcp-listen:127.0.0.1:7303'\n")
    reactor.listenTCP = address_in_use  # type: ignore[method-assign]
    answer = call(rt, c.Reload)
    assert answer["failed"] == 1 and "channel 'a' is down" in answer["message"], answer
    assert "a" not in rt.channels
    rt.stopService()
