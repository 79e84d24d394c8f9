"""``--config FILE``: channels, forwards, limits and the control socket in TOML.

Parsed with the standard library's ``tomllib``, which reports no positions
for values, so :class:`_Lines` finds the line of each key itself; every error
reads ``FILE:LINE: KEY: problem``.  Values use the command line's spellings
(they go through the same parsers), so a file and ``--channel``/``-o``/``-i``
never disagree.  Example (README.rst, "Operating")::

    control = "/run/virtproxy.sock"
    metrics = "127.0.0.1:9101"
    allow_remote_listen = ["127.0.0.1"]

    [limits]                  # defaults for every channel
    keepalive_interval = 5
    keepalive_timeout = 20

    [channels.vm1]
    channel = "unix-connect:/run/vm1/vp.sock"
    oforwards = { ssh = "127.0.0.1:9022", http = "127.0.0.1:9080" }
    iforwards = { web = "127.0.0.1:8080" }
    rforwards = { web = "127.0.0.1:8080" }   # peer listens there for our web
    keepalive_interval = 2   # this channel only
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import replace
from typing import Any

from twisted.python import usage

from virtproxy.config import DaemonConfig, Limits, ProcessConfig
from virtproxy.errors import ConfigError
from virtproxy.session import LINK_MODES

TOP_KEYS = {"control", "metrics", "allow_remote_listen", "limits", "channels"}
LIMIT_KEYS = {
    "connect_timeout",
    "keepalive_interval",
    "keepalive_timeout",
    "max_frame",
    "window",
    "max_streams",
    "max_open_rate",
    "max_reset_rate",
    "session_window",
    "stream_buffer",
    "max_pending",
    "max_service_name",
    "link",
    "bulk",
}
CHANNEL_KEYS = {"channel", "oforwards", "iforwards", "rforwards"} | LIMIT_KEYS

_HEADER_RE = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(r"\s*([A-Za-z0-9_.\"' -]+?)\s*=")
_INLINE_KEY_RE = re.compile(r"(?:[{,]\s*)([A-Za-z0-9_\"'.-]+)\s*=")


def _split_dotted(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


class _Lines:
    """Where each key is defined: dotted key path -> 1-based line number."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            header = _HEADER_RE.match(line)
            if header and stripped.startswith("["):
                table = _split_dotted(header.group(1))
                for i in range(1, len(table) + 1):
                    self.where.setdefault(table[:i], number)
                continue
            key = _KEY_RE.match(line)
            if key:
                path = table + _split_dotted(key.group(1))
                self.where.setdefault(path, number)
                # Inline tables: { ssh = "...", http = "..." } on the same line.
                rest = line[key.end() :]
                for inner in _INLINE_KEY_RE.finditer(rest):
                    self.where.setdefault((*path, inner.group(1).strip("\"'")), number)

    def line(self, path: tuple[str, ...]) -> int:
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return 1


class _Reader:
    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.lines = _Lines(text)

    def error(self, path: tuple[str, ...], problem: str) -> ConfigError:
        key = ".".join(path) if path else "(top level)"
        return ConfigError(f"{self.filename}:{self.lines.line(path)}: {key}: {problem}")

    def table(self, value: Any, path: tuple[str, ...], keys: set[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_type(value)}")
        if keys is not None:
            for key in value:
                if key not in keys:
                    raise self.error(
                        (*path, key), f"unknown key (expected one of {', '.join(sorted(keys))})"
                    )
        return value

    def string(self, value: Any, path: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_type(value)}")
        return value

    def limits(self, table: dict[str, Any], path: tuple[str, ...], base: Limits) -> Limits:
        from virtproxy.options import MAX_FRAME, MAX_SECONDS, MAX_STREAMS, MAX_WINDOW, MIN_FRAME

        changes: dict[str, Any] = {}
        for key in LIMIT_KEYS & set(table):
            value = table[key]
            where = (*path, key)
            if key == "link":
                if value not in LINK_MODES:
                    raise self.error(where, f"expected one of {', '.join(LINK_MODES)}")
                changes[key] = value
            elif key == "bulk":
                if value not in ("on", "off"):
                    raise self.error(where, "expected on or off")
                changes[key] = value == "on"
            elif key.endswith(("timeout", "interval")):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise self.error(where, f"expected seconds (a number), got {_type(value)}")
                if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
                    raise self.error(where, f"{value!r} out of range (> 0, <= {MAX_SECONDS:g})")
                changes[key] = float(value)
            else:
                low, high = {
                    "max_frame": (MIN_FRAME, MAX_FRAME),
                    "window": (MIN_FRAME, MAX_WINDOW),
                    "max_streams": (1, MAX_STREAMS),
                    "max_open_rate": (1, 1_000_000),
                    "max_reset_rate": (1, 1_000_000),
                    "session_window": (MIN_FRAME, MAX_WINDOW),
                    "stream_buffer": (4096, 16 * 1024 * 1024),
                    "max_pending": (1, 1_000_000),
                    "max_service_name": (1, 64),
                }[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise self.error(where, f"expected an integer, got {_type(value)}")
                if not low <= value <= high:
                    raise self.error(where, f"{value} out of range {low}..{high}")
                changes[key] = value
        limits = replace(base, **changes)
        if limits.keepalive_timeout <= limits.keepalive_interval:
            key = "keepalive_timeout" if "keepalive_timeout" in table else "keepalive_interval"
            raise self.error(
                (*path, key),
                f"keepalive_timeout ({limits.keepalive_timeout:g}) must exceed "
                f"keepalive_interval ({limits.keepalive_interval:g})",
            )
        if limits.max_frame is not None and limits.window < limits.max_frame:
            raise self.error((*path, "window"), "window must be at least max_frame")
        if limits.session_window is not None and limits.session_window < limits.window:
            raise self.error((*path, "session_window"), "session_window must be at least window")
        return limits


def _type(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def load_config_file(filename: str, base: Limits | None = None) -> ProcessConfig:
    """Read and check ``filename``; :class:`ConfigError` (FILE:LINE: KEY: ...) if wrong."""
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{filename}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{filename}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = match.group(1) if match else "1"
        problem = re.sub(r"\s*\(at (?:line \d+, column \d+|end of document)\)", "", message)
        raise ConfigError(f"{filename}:{line}: TOML syntax: {problem}") from None
    return parse_config(filename, text, data, base or Limits())


def parse_config(filename: str, text: str, data: dict[str, Any], base: Limits) -> ProcessConfig:
    from virtproxy.options import (
        _control_path,
        check_label,
        cli_channels,
        parse_allowance,
        parse_metrics,
    )

    reader = _Reader(filename, text)
    reader.table(data, (), TOP_KEYS)

    def option(path: tuple[str, ...], call: Any, *args: Any) -> Any:
        """Run a command-line parser; its one-line message gains FILE:LINE: KEY."""
        try:
            return call(*args)
        except usage.UsageError as e:
            raise reader.error(path, str(e)) from None

    control = metrics = None
    if "control" in data:
        control = option(("control",), _control_path, reader.string(data["control"], ("control",)))
    if "metrics" in data:
        metrics = option(("metrics",), parse_metrics, reader.string(data["metrics"], ("metrics",)))
    allow = []
    if "allow_remote_listen" in data:
        values = data["allow_remote_listen"]
        if not isinstance(values, list):
            raise reader.error(("allow_remote_listen",), f"expected an array, got {_type(values)}")
        for value in values:
            text_value = reader.string(value, ("allow_remote_listen",))
            allow.append(option(("allow_remote_listen",), parse_allowance, text_value))
    limits = base
    if "limits" in data:
        limits = reader.limits(
            reader.table(data["limits"], ("limits",), LIMIT_KEYS), ("limits",), base
        )

    channels: list[DaemonConfig] = []
    for label, body in reader.table(data.get("channels", {}), ("channels",), None).items():
        path = ("channels", label)
        option(path, check_label, label, "channel", label)
        table = reader.table(body, path, CHANNEL_KEYS)
        if "channel" not in table:
            raise reader.error(path, "missing key 'channel' (the channel SPEC)")
        spec = reader.string(table["channel"], (*path, "channel"))
        channel_limits = reader.limits(table, path, limits)
        forwards: dict[str, list[str]] = {"oforwards": [], "iforwards": [], "rforwards": []}
        for kind in forwards:
            entries = reader.table(table.get(kind, {}), (*path, kind), None)
            for name, value in entries.items():
                target = reader.string(value, (*path, kind, name))
                if kind == "rforwards" or not target.startswith("="):
                    forwards[kind].append(f"{name}:{target}")
                else:
                    forwards[kind].append(f"{name}{target}")
        # Parse forward by forward so an error names the exact key.
        option((*path, "channel"), cli_channels, [f"{label}={spec}"], [], [], [], channel_limits)
        for kind, specs in forwards.items():
            for forward in specs:
                name = re.split(r"[:=]", forward, maxsplit=1)[0]
                args: list[list[str]] = [[], [], []]
                args[["oforwards", "iforwards", "rforwards"].index(kind)] = [forward]
                option(
                    (*path, kind, name), cli_channels, [f"{label}={spec}"], *args, channel_limits
                )
        config = option(
            path,
            cli_channels,
            [f"{label}={spec}"],
            forwards["oforwards"],
            forwards["iforwards"],
            forwards["rforwards"],
            channel_limits,
        )[0]
        names = {f.name for f in config.iforwards}
        for r in config.rforwards:
            if r.name not in names:
                raise reader.error(
                    (*path, "rforwards", r.name),
                    f"needs an iforward {r.name!r} on this channel to carry its connections to",
                )
        channels.append(config)
    return ProcessConfig(
        channels=tuple(channels),
        control=control,
        metrics=metrics,
        config_file=filename,
        allow_remote_listen=tuple(allow),
    )


def merge(cli: ProcessConfig, file: ProcessConfig) -> ProcessConfig:
    """Command-line channels and settings first, then the file's (labels must not clash)."""
    seen = {c.name for c in cli.channels}
    for config in file.channels:
        if config.name in seen:
            raise ConfigError(
                f"{file.config_file}: channels.{config.name}: label also given with --channel"
            )
    return ProcessConfig(
        channels=cli.channels + file.channels,
        control=cli.control or file.control,
        metrics=cli.metrics or file.metrics,
        config_file=file.config_file,
        allow_remote_listen=cli.allow_remote_listen + file.allow_remote_listen,
        cli_channels=cli.cli_channels,
        cli_allow=cli.cli_allow,
        limits=cli.limits,
    )
