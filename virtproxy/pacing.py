"""Size channel writes to the channel's speed.  Plain Python: time is an argument.

A keystroke that arrives while a bulk transfer runs waits behind whatever was
already handed to the transport and the kernel.  On loopback that is nothing;
on a 1 MB/s line every 64 KiB is 64 ms, on a 115200-baud line 5.7 s.  So the
channel writes only when the previous write has drained, and each write (and
each DATA frame in it) is about ``target`` seconds at the channel's measured
rate.  Fast channels quickly reach ``maximum`` and pay nothing.

The rate is bytes over busy time across the write→drain cycles of the last
``window`` seconds, not one cycle's: a kernel buffer that takes a burst at
once would otherwise make a slow line look fast.
"""

from __future__ import annotations

from collections import deque


class WritePacer:
    """Adaptive write size from observed write→drain cycles."""

    def __init__(
        self,
        target: float = 0.010,
        minimum: int = 512,
        maximum: int = 256 * 1024,
        initial: int = 16 * 1024,
        window: float = 0.2,
    ) -> None:
        self.target = target
        self.minimum = minimum
        self.maximum = maximum
        self.window = window
        self.chunk = max(minimum, min(initial, maximum))
        #: Measured drain rate in bytes/s (0 until measured).
        self.rate = 0.0
        self._cycle_start: float | None = None
        self._cycle_bytes = 0
        self._samples: deque[tuple[float, int]] = deque()  # (busy seconds, bytes)
        self._busy = 0.0
        self._bytes = 0

    def wrote(self, count: int, now: float) -> None:
        """``count`` bytes were handed to the transport."""
        if self._cycle_start is None:
            self._cycle_start = now
        self._cycle_bytes += count

    def discard_cycle(self) -> None:
        """The transport took the write at once: it says nothing about the rate."""
        self._cycle_start = None
        self._cycle_bytes = 0

    def drained(self, now: float) -> None:
        """The transport's buffer emptied (it asked for more)."""
        if self._cycle_start is None:
            return
        elapsed = max(now - self._cycle_start, 1e-6)
        written = self._cycle_bytes
        self._cycle_start = None
        self._cycle_bytes = 0
        if written < self.chunk // 2:
            return  # a short write (idle keystrokes) says little about the channel
        self._samples.append((elapsed, written))
        self._busy += elapsed
        self._bytes += written
        while len(self._samples) > 1 and self._busy - self._samples[0][0] >= self.window:
            old_elapsed, old_written = self._samples.popleft()
            self._busy -= old_elapsed
            self._bytes -= old_written
        self.rate = self._bytes / self._busy
        wanted = self.rate * self.target
        # Grow at most twofold a cycle, so one lucky burst cannot jump to the top.
        self.chunk = int(max(self.minimum, min(self.maximum, wanted, self.chunk * 2)))
