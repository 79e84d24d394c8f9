"""``virtproxy ctl``: the client of a daemon's ``--control`` socket.

A subcommand of the same options (``virtproxy ctl``, ``python -m virtproxy
ctl``).  It connects, sends one AMP command (or a few, for a paged listing),
prints a table (or JSON with ``--json``) and exits.  Every failure is one
``virtproxy: error: ...`` line and status 1; a usage mistake is status 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from twisted.python import usage

from virtproxy.errors import connect_reason

#: Used when ``--control`` is not given.
CONTROL_ENV = "VIRTPROXY_CONTROL"


def _version() -> NoReturn:
    from virtproxy import __version__

    print(f"virtproxy {__version__}")
    sys.exit(0)


class _Verb(usage.Options):
    """One verb; ``positional`` names its arguments (``?`` marks an optional CHANNEL)."""

    positional: ClassVar[tuple[str, ...]] = ()
    longdesc = ""

    def opt_version(self) -> NoReturn:
        """Display virtproxy's version and exit."""
        _version()

    optFlags: ClassVar[list[list[str | None]]] = [["json", "j", "Print JSON instead of a table."]]

    def __init__(self) -> None:
        super().__init__()
        self.args: list[str] = []

    #: Options of this verb that take a value (the next word).
    valued: ClassVar[frozenset[str]] = frozenset()

    def getSynopsis(self) -> str:
        return " ".join(self.positional)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Options may follow the arguments (``streams --json``, ``remove-oforward
        ssh --kill``): move them first, as getopt wants them."""
        words = list(options or ())
        flags: list[str] = []
        rest: list[str] = []
        while words:
            word = words.pop(0)
            if word == "--":
                rest += words
                break
            if word.startswith("-") and len(word) > 1:
                flags.append(word)
                if word in self.valued and words:
                    flags.append(words.pop(0))
            else:
                rest.append(word)
        super().parseOptions([*flags, "--", *rest] if rest else flags)

    def parseArgs(self, *args: str) -> None:
        required = [p for p in self.positional if not p.startswith("[")]
        if not len(required) <= len(args) <= len(self.positional):
            want = " ".join(self.positional) or "no arguments"
            raise usage.UsageError(f"expected {want}, got {len(args)} arguments")
        if len(args) < len(self.positional) and self.positional[0].startswith("["):
            args = ("", *args)  # CHANNEL left out: the daemon's only channel
        self.args = list(args)


class _AddForward(_Verb):
    positional = ("[CHANNEL]", "NAME", "TARGET")


class _AddRForward(_Verb):
    positional = ("[CHANNEL]", "NAME", "ADDR:PORT")


class _RemoveForward(_Verb):
    positional = ("[CHANNEL]", "NAME")
    optFlags: ClassVar[list[list[str | None]]] = [
        *_Verb.optFlags,
        ["kill", "k", "Also end the forward's live streams (default: let them finish)."],
    ]


class _RemoveRForward(_Verb):
    positional = ("[CHANNEL]", "ADDR:PORT")


class _List(_Verb):
    pass


class _AddChannel(_Verb):
    positional = ("LABEL", "SPEC")
    valued = frozenset({"-o", "--oforward", "-i", "--iforward", "-R", "--rforward"})

    def __init__(self) -> None:
        super().__init__()
        self.oforwards: list[str] = []
        self.iforwards: list[str] = []
        self.rforwards: list[str] = []

    def opt_oforward(self, spec: str) -> None:
        """An oforward of the new channel, as --oforward (repeatable)."""
        self.oforwards.append(spec)

    def opt_iforward(self, spec: str) -> None:
        """An iforward of the new channel, as --iforward (repeatable)."""
        self.iforwards.append(spec)

    def opt_rforward(self, spec: str) -> None:
        """An rforward of the new channel, as --rforward (repeatable)."""
        self.rforwards.append(spec)

    opt_o, opt_i, opt_R = opt_oforward, opt_iforward, opt_rforward


class _RemoveChannel(_Verb):
    positional = ("LABEL",)


VERBS: list[tuple[str, None, type[_Verb], str]] = [
    ("add-oforward", None, _AddForward, "Listen on TARGET (ADDR:PORT, PATH:- or an endpoint)."),
    ("add-iforward", None, _AddForward, "Serve the peer's NAME by connecting to TARGET."),
    ("add-rforward", None, _AddRForward, "Ask the peer to listen on ADDR:PORT for our NAME."),
    ("remove-oforward", None, _RemoveForward, "Stop listening (live streams finish)."),
    ("remove-iforward", None, _RemoveForward, "Refuse new streams for NAME."),
    ("remove-rforward", None, _RemoveRForward, "Withdraw a remote forward."),
    ("forwards", None, _List, "List forwards."),
    ("streams", None, _List, "List live streams."),
    ("status", None, _List, "Channel and session status and counters."),
    ("add-channel", None, _AddChannel, "Add a channel (LABEL SPEC, forwards with -o/-i/-R)."),
    ("remove-channel", None, _RemoveChannel, "Remove a channel (its streams are reset)."),
    ("reload", None, _List, "Re-read the daemon's --config file (as SIGHUP does)."),
]


class CtlOptions(usage.Options):
    """``virtproxy ctl [--control PATH] VERB ARGS [--json]``."""

    optParameters: ClassVar[list[list[str | None]]] = [
        ["control", None, None, f"The daemon's control socket [default: ${CONTROL_ENV}]."],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [["json", "j", "Print JSON instead of a table."]]
    subCommands: ClassVar = VERBS
    longdesc = "Talk to a running daemon's --control socket; see README, Operating."

    def opt_version(self) -> NoReturn:
        """Display virtproxy's version and exit."""
        _version()

    def getSynopsis(self) -> str:
        return "virtproxy ctl [--control PATH] VERB [ARGS] [--json]"

    def postOptions(self) -> None:
        if self.subCommand is None:
            verbs = ", ".join(v[0] for v in VERBS)
            raise usage.UsageError(f"ctl: missing VERB (one of {verbs})")
        if self["control"] is None:
            self["control"] = os.environ.get(CONTROL_ENV) or None
        if not self["control"]:
            raise usage.UsageError(f"ctl: --control PATH is required (or set ${CONTROL_ENV})")

    @property
    def as_json(self) -> bool:
        return bool(self["json"] or self.subOptions["json"])


# --------------------------------------------------------------------------- running


def run_ctl(options: CtlOptions) -> int:
    """Run one verb against the daemon; returns the exit status."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    outcome: dict[str, Any] = {}

    def finish(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    def start() -> None:
        d = ensureDeferred(_run(reactor, options))
        d.addTimeout(ANSWER_TIMEOUT, reactor, onTimeoutCancel=_no_answer)
        d.addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    result = outcome.get("result")
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        from virtproxy.control import ControlError
        from virtproxy.options import format_error

        if result.check(ControlError, _Unreachable, _Refused):
            message = str(result.value)
        else:
            message = f"{type(result.value).__name__}: {result.getErrorMessage()}"
        print(format_error(message), file=sys.stderr, flush=True)
        return 1
    return 0


class _Refused(Exception):
    """The daemon answered, but did not do all that was asked (exit status 1)."""


class _Unreachable(Exception):
    pass


#: Seconds ctl waits for the daemon before giving up (a wedged daemon must not hang scripts).
ANSWER_TIMEOUT = 60.0


def _no_answer(result: Any, timeout: float) -> Any:
    raise _Unreachable(f"no answer from the daemon within {timeout:g} s")


async def _run(reactor: Any, options: CtlOptions) -> None:
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    from twisted.protocols import amp

    from virtproxy import control as c

    path = options["control"]
    try:
        proto = await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), amp.AMP())
    except Exception as e:
        raise _Unreachable(f"cannot reach the control socket {path}: {connect_reason(e)}") from None
    try:
        verb, sub = options.subCommand, options.subOptions
        assert verb is not None
        args = sub.args
        if verb in ("forwards", "streams", "status"):
            command = {
                "forwards": c.ListForwards,
                "streams": c.ListStreams,
                "status": c.ChannelStatus,
            }[verb]
            rows: list[dict[str, Any]] = []
            after = ""
            while True:
                answer = await proto.callRemote(command, after=after)
                rows.extend(answer["rows"])
                if not answer["more"] or not answer["rows"]:
                    break
                after = answer["rows"][-1]["key"]
            _print_rows(verb, rows, options.as_json)
            return
        if verb in ("add-oforward", "add-iforward"):
            channel, name, target = args
            sep = "=" if "=" in target else ":"
            kind = verb.removeprefix("add-")
            answer = await proto.callRemote(
                c.AddForward, channel=channel, kind=kind, spec=f"{name}{sep}{target}"
            )
        elif verb == "add-rforward":
            channel, name, target = args
            answer = await proto.callRemote(
                c.AddForward, channel=channel, kind="rforward", spec=f"{name}:{target}"
            )
        elif verb in ("remove-oforward", "remove-iforward", "remove-rforward"):
            channel, name = args
            answer = await proto.callRemote(
                c.RemoveForward,
                channel=channel,
                kind=verb.removeprefix("remove-"),
                name=name,
                kill=bool(sub.opts.get("kill")),
            )
        elif verb == "add-channel":
            label, spec = args
            assert isinstance(sub, _AddChannel)
            answer = await proto.callRemote(
                c.AddChannel,
                label=label,
                spec=spec,
                oforwards=sub.oforwards,
                iforwards=sub.iforwards,
                rforwards=sub.rforwards,
            )
        elif verb == "remove-channel":
            answer = await proto.callRemote(c.RemoveChannel, label=args[0])
        elif verb == "reload":
            answer = await proto.callRemote(c.Reload)
        else:  # pragma: no cover - usage.Options rejects unknown verbs
            raise usage.UsageError(f"unknown verb {verb!r}")
        failed = answer.get("failed") or 0
        if options.as_json:
            print(json.dumps({"ok": not failed, "message": answer["message"]}))
        else:
            print(answer["message"])
        if failed:
            raise _Refused(f"reload: {failed} of the changes failed; the others were made")
    finally:
        proto.transport.loseConnection()


# --------------------------------------------------------------------------- output

COLUMNS: dict[str, list[tuple[str, str]]] = {
    "streams": [
        ("channel", "CHANNEL"),
        ("id", "ID"),
        ("service", "SERVICE"),
        ("direction", "DIR"),
        ("client", "CLIENT"),
        ("bytes_sent", "SENT"),
        ("bytes_received", "RECEIVED"),
        ("age", "AGE(s)"),
        ("state", "STATE"),
        ("window", "WINDOW"),
        ("send_credit", "CREDIT"),
        ("queued", "QUEUED"),
    ],
    "forwards": [
        ("channel", "CHANNEL"),
        ("kind", "KIND"),
        ("name", "NAME"),
        ("spec", "SPEC"),
        ("state", "STATE"),
        ("streams", "STREAMS"),
    ],
    "status": [
        ("channel", "CHANNEL"),
        ("state", "STATE"),
        ("peer_session", "PEER SESSION"),
        ("uptime", "UPTIME(s)"),
        ("streams", "STREAMS"),
        ("frames_in", "FRAMES IN"),
        ("frames_out", "FRAMES OUT"),
        ("crc_errors", "CRC ERR"),
        ("resyncs", "RESYNCS"),
        ("lost_frames", "LOST"),
        ("retransmits", "RETRANSMITS"),
        ("limit_hits", "LIMIT HITS"),
        ("spec", "SPEC"),
    ],
}


def _print_rows(verb: str, rows: Sequence[dict[str, Any]], as_json: bool) -> None:
    clean = [{k: v for k, v in row.items() if k != "key"} for row in rows]
    if as_json:
        print(json.dumps(clean, indent=1))
        return
    print(format_table(COLUMNS[verb], clean))


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """Left-aligned columns, a header line, ``-`` for empty cells."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value) if value not in ("", None) else "-"

    table = [[title for _, title in columns]]
    table += [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    return "\n".join(lines)
