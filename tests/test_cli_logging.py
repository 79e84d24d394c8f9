"""The daemon's log lines are Twisted's textFileLogObserver lines, byte for byte."""

from __future__ import annotations

import io

from twisted.logger import Logger, LogPublisher, textFileLogObserver

from virtproxy.cli import text_log_observer


def test_same_lines_as_twisted_text_observer() -> None:
    theirs, ours = io.StringIO(), io.StringIO()
    publisher = LogPublisher(textFileLogObserver(theirs), text_log_observer(ours))
    log = Logger(observer=publisher, namespace="virtproxy.test")
    for n in range(3):
        log.info("stream {id:#x} opened: {who}", id=n, who="peer")
    log.warn("multi\nline {x!r}", x="y")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it failed")
    publisher({"log_format": "no time, no level"})
    publisher({"log_format": "old {x}", "x": 1, "log_time": 1.5, "log_system": "sys"})
    publisher({"log_format": "next second", "log_time": 2.0, "log_namespace": "n"})
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") >= 8
