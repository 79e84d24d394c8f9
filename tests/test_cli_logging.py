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
    # What the fast path formats itself, and what it leaves to Twisted.
    log.info("{a.real} {b[k]!r} {c:>6.2f} {d:#x}", a=3, b={"k": "v"}, c=1.5, d=255)
    log.info("missing {nothere}")
    log.info("positional {}")
    log.info("a call {f()}", f=lambda: "called")
    log.info("braces {{literal}} {x}", x="\n")
    publisher({"log_format": b"bytes {x}", "x": 1, "log_time": 3.0})
    publisher({"log_format": "with system {x}", "x": 1, "log_time": 3.0, "log_system": "s"})
    publisher({"log_format": "leveled {x}", "x": 1, "log_time": 3.0, "log_level": None})
    publisher({"log_format": "", "log_time": 3.0})
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") >= 8
