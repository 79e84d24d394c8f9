"""Endpoint string parsers for virtproxy's device channels.

Makes ``clientFromString(reactor, "virtserial:/dev/virtio-ports/NAME")`` and
``clientFromString(reactor, "serial:/dev/ttyS1:115200")`` work.  Twisted
imports every plugin module to find parsers, so this one stays light: it
neither imports the reactor nor virtproxy.serialport (pyserial) until a
description is actually parsed.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _VirtioSerialParser:
    """``virtserial:PATH``: a guest's virtio-serial port."""

    prefix = "virtserial"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamClientEndpoint:
        from virtproxy.serialport import parseVirtioSerial

        return parseVirtioSerial(reactor, *args, **kwargs)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _SerialParser:
    """``serial:PATH[:BAUDRATE]``: a serial port, raw 8N1 (default 115200 baud)."""

    prefix = "serial"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamClientEndpoint:
        from virtproxy.serialport import parseSerial

        return parseSerial(reactor, *args, **kwargs)


virtioSerialEndpointParser = _VirtioSerialParser()
serialEndpointParser = _SerialParser()
