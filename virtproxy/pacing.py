"""Size channel writes to the channel's speed.  Plain Python: time is an argument.

A keystroke that arrives while a bulk transfer runs waits behind whatever was
already handed to the transport and the kernel.  On loopback that is nothing;
on a 1 MB/s line every 64 KiB is 64 ms, on a 115200-baud line 5.7 s.  So the
channel writes only when the previous write has drained, and each write (and
each DATA frame in it) is about ``target`` seconds of the rate measured from
those drains.  Fast channels quickly reach ``maximum`` and pay nothing.
"""

from __future__ import annotations


class WritePacer:
    """Adaptive write size from the observed write→drain cycle."""

    def __init__(
        self,
        target: float = 0.010,
        minimum: int = 512,
        maximum: int = 256 * 1024,
        initial: int = 16 * 1024,
    ) -> None:
        self.target = target
        self.minimum = minimum
        self.maximum = maximum
        self.chunk = max(minimum, min(initial, maximum))
        #: Smoothed drain rate in bytes/s (0 until measured).
        self.rate = 0.0
        self._cycle_start: float | None = None
        self._cycle_bytes = 0

    def wrote(self, count: int, now: float) -> None:
        """``count`` bytes were handed to the transport."""
        if self._cycle_start is None:
            self._cycle_start = now
        self._cycle_bytes += count

    def drained(self, now: float) -> None:
        """The transport's buffer emptied (it resumed us)."""
        if self._cycle_start is None:
            return
        elapsed = now - self._cycle_start
        written = self._cycle_bytes
        self._cycle_start = None
        self._cycle_bytes = 0
        if written < self.chunk // 2:
            return  # a small write says little about the channel's speed
        if elapsed <= self.target / 4:
            # Drained at once: the channel is faster than we ask of it.
            self.chunk = min(self.maximum, self.chunk * 2)
            return
        sample = written / elapsed
        self.rate = sample if not self.rate else 0.7 * self.rate + 0.3 * sample
        self.chunk = int(max(self.minimum, min(self.maximum, self.rate * self.target)))
