"""The ``virtproxy`` command and ``python -m virtproxy``.

Errors an operator can fix (bad options, an address already in use) end the
process with one ``virtproxy: error: ...`` line on stderr, never a traceback:
status 2 for options, 1 for startup.  Once the service is up, everything goes
to stderr through twisted.logger, one line per event, until SIGINT or SIGTERM
stops the reactor (status 0).

This module imports neither the reactor nor ``virtproxy.service`` at import
time: the twistd plugin imports it while twistd has not yet installed the
reactor the user chose.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from twisted.application.service import IService, MultiService
from twisted.logger import (
    FileLogObserver,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
    timeFormatRFC3339,
)

from virtproxy.errors import StartupError
from virtproxy.options import format_error, parse_or_exit

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore

    from virtproxy.config import DaemonConfig, ProcessConfig

log = Logger()


def _real_stderr() -> TextIO:
    """stderr as the process got it: twistd replaces ``sys.stderr`` with a log."""
    return sys.__stderr__ or sys.stderr


def report_error(message: object) -> None:
    """Print the one-line ``virtproxy: error: ...`` for the operator."""
    print(format_error(message), file=_real_stderr(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``virtproxy`` console script; returns the exit status."""
    options = parse_or_exit(sys.argv[1:] if argv is None else argv)
    if options.subCommand == "ctl":
        from virtproxy.ctl import run_ctl

        return run_ctl(options.subOptions)
    return run(options.process)


def run(config: ProcessConfig | DaemonConfig, reactor: IReactorCore | None = None) -> int:
    """Start the daemon for ``config`` and run the reactor until it stops.

    Logging begins only after the service started: events from startup are
    buffered by twisted.logger and replayed then, so a :class:`StartupError`
    is the only line a failed start writes.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    assert reactor is not None
    from virtproxy.service import make_process_service

    stop_early_on_signals(reactor)
    try:
        service = make_process_service(config, reactor)
        service.privilegedStartService()
        service.startService()
    except StartupError as e:
        report_error(e.message)
        return 1
    begin_logging(sys.stderr)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(log.info, "virtproxy started; {what}", what=describe(config))
    # From here the reactor's own SIGINT/SIGTERM handlers stop it cleanly.
    reactor.run()
    return 0


def describe(config: ProcessConfig | DaemonConfig) -> str:
    """The startup line's summary: the channel, or how many channels."""
    from virtproxy.config import DaemonConfig

    if isinstance(config, DaemonConfig):
        return f"channel {config.channel.original}"
    if len(config.channels) == 1:
        return f"channel {config.channels[0].channel.original}"
    return f"{len(config.channels)} channels"


def stop_early_on_signals(reactor: IReactorCore) -> None:
    """Make SIGINT/SIGTERM before ``reactor.run()`` a clean stop too.

    The reactor installs its handlers only once it runs; until then SIGINT
    would be a KeyboardInterrupt traceback and SIGTERM an abrupt death.
    """

    def stop_when_running(signum: int, frame: object) -> None:
        reactor.callWhenRunning(reactor.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_when_running)


def begin_logging(stream: TextIO) -> None:
    """Send every log event to ``stream``, one timestamped line each."""
    globalLogBeginner.beginLoggingTo([text_log_observer(stream)], redirectStandardIO=False)


def text_log_observer(stream: TextIO) -> FileLogObserver:
    """Twisted's ``textFileLogObserver``, with the timestamp formatted once a second.

    The stamp has whole seconds; formatting it (datetime, time zone) was about
    a third of the cost of a log line, and a stream logs two lines at each end.
    """
    last: list[Any] = [None, "-"]

    def stamp(when: float | None) -> str:
        if when is None:
            return formatTime(when, timeFormatRFC3339)
        second = int(when)
        if second != last[0]:
            last[0] = second
            last[1] = formatTime(second, timeFormatRFC3339)
        return str(last[1])

    def format_event(event: Any) -> str | None:
        text = _fast_classic_text(event, stamp)
        if text is None:
            return formatEventAsClassicLogText(event, formatTime=stamp)
        return text

    return FileLogObserver(stream, format_event)


def _fast_classic_text(event: dict[str, Any], stamp: Callable[[float | None], str]) -> str | None:
    """``formatEventAsClassicLogText`` for a plain event, with ``str.format_map``.

    Twisted's own formatter parses the format in Python (to allow ``{f()}``
    calls); a stream's log line spent most of its time there.  Anything but a
    plain ``log_format`` with named fields (calls, failures, flattened or
    legacy events, a field that does not format) returns None: Twisted's
    formatter then handles it, so every line stays byte for byte the same.
    """
    fmt = event.get("log_format")
    if (
        type(fmt) is not str
        or "()" in fmt
        or "log_failure" in event
        or "log_flattened" in event
        or "log_system" in event
    ):
        return None
    try:
        text = fmt.format_map(event)
    except Exception:
        return None
    if not text:
        return None  # no line at all, as Twisted decides
    level = event.get("log_level")
    system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    line = f"{stamp(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


class StartupGuard(MultiService):
    """Parent of the daemon's services under twistd: one line for StartupError.

    twistd lets an exception from starting the application escape as a
    traceback.  Instead this logs the error line, removes the pidfile twistd
    wrote and exits 1.  In the foreground (``twistd -n``) the line also goes to
    the real stderr; daemonised, it goes through twistd's status pipe, so the
    waiting parent reports it and exits 1.
    """

    def __init__(self, child: IService, twistd_config: Mapping[str, Any] | None) -> None:
        super().__init__()
        #: twistd's ServerOptions (``None`` if built outside twistd); read at
        #: failure time because twistd adds ``statusPipe`` when it daemonises.
        self.twistd_config = twistd_config
        child.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """Children bind privileged ports here; a failure is reported the same."""
        try:
            super().privilegedStartService()
        except StartupError as e:
            self._fail(e)

    def startService(self) -> None:
        """Start the children, turning StartupError into one line and an exit."""
        try:
            super().startService()
        except StartupError as e:
            self._fail(e)

    def _fail(self, error: StartupError) -> NoReturn:
        line = format_error(error.message)
        log.critical("{line}", line=line)
        config = self.twistd_config or {}
        status_pipe = config.get("statusPipe")
        if isinstance(status_pipe, int):
            # twistd's parent reads at most 100 bytes and prints them after "1 ".
            with contextlib.suppress(OSError):
                os.write(status_pipe, b"1 " + line.encode("utf-8", "replace")[:98])
                os.close(status_pipe)
        else:
            report_error(error.message)
        _remove_pidfile(config.get("pidfile"))
        raise SystemExit(1)


def _remove_pidfile(pidfile: object) -> None:
    """twistd removes its pidfile on an exception, but not on SystemExit."""
    if not isinstance(pidfile, str) or not pidfile:
        return
    with contextlib.suppress(OSError):
        with open(pidfile, "rb") as f:
            mine = f.read().strip() == str(os.getpid()).encode()
        if mine:
            os.remove(pidfile)
