"""virtproxy: proxy and multiplex socket streams over one host/guest data channel.

A Python/Twisted re-creation of the 2010 QEMU "virtproxy" (qemu-vp) patchset.
"""

__version__ = "0.1.0"
