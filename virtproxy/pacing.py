"""Size channel writes to the channel's speed, and local reads to the company
they keep.  Plain Python: time is an argument.

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

#: Bytes read from a local socket at a time (Twisted's default is 64 KiB): one
#: read fills several DATA frames, and the channel writes them in one send.
LOCAL_READ_SIZE = 256 * 1024
#: ... and while an interactive stream shares the channel (see ReadSizer).  In
#: interleaved benchmark runs the median round trip under a loopback upload
#: was 0.97-1.52x ssh -L's at 32 KiB and 0.86-1.18x at 16 KiB, the upload
#: meanwhile about a quarter slower (8 KiB: 0.76-1.01x at under half the rate).
SHARED_READ_SIZE = 16 * 1024
#: A local read of at least this many bytes (or a full one) is bulk: the
#: stream asks for a turn to send a BULK frame (see virtproxy/bulk.py).  Not
#: only full reads: a UNIX socket's peer may never queue a whole 256 KiB.
BULK_READ = 64 * 1024
#: Bytes read from a local socket ahead of a BULK frame (splice moves the
#: rest): the read tells that more is waiting, or meets the end of file.
#: More than INTERACTIVE_READ, so that no lead looks like a keystroke.
BULK_LEAD_READ = 1024
#: ... and while BULK frames arrive: their headers, and what small frames
#: come with them, but little of their raw bytes, which splice moves.
BULK_CHANNEL_READ = 128
#: Bytes read from a socket channel at a time (Twisted's default is 64 KiB).
CHANNEL_READ_SIZE = 256 * 1024
#: A local read of at most this many bytes is a keystroke or a request.
INTERACTIVE_READ = 512


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
        """``count`` bytes were handed to the transport, which holds some of
        them (a write the kernel took whole starts no cycle: it says nothing
        about the rate)."""
        if self._cycle_start is None:
            self._cycle_start = now
        self._cycle_bytes += count

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


class ReadSizer:
    """How much to read from a local socket, and from the channel, at a time.

    Every read a daemon makes is handled whole before it looks at any other
    socket: one 256 KiB read of a bulk upload is framed and sent, and on the
    other side decoded and delivered, in one go.  Alone on the channel a bulk
    stream should read that much (fewer, cheaper rounds).  Next to an
    interactive stream it should not: a keystroke that arrives meanwhile waits
    for the whole read at both ends, and a sender that reads 256 KiB per round
    outpaces a receiver that must decode it, so a queue forms in the kernel in
    front of every later keystroke.  At ``small`` bytes a read the sender
    slows to about the receiver's pace, and that queue stays short (it does
    not vanish: with 32 KiB reads a loopback guest still held a median 64 KiB
    of bulk unread in its channel socket).

    A stream is interactive while its reads are small (two in a row: one
    small read is as likely a bulk upload's header); other streams read
    ``small`` bytes until ``hold`` seconds after its last small read.

    The receiving side has the same problem with the reply: a keystroke
    delivered to a local socket is answered within microseconds, but the
    answer is read only after the channel read that comes first, and under a
    bulk transfer that is everything queued, up to ``channel`` bytes.  So
    after a small delivery the channel is read ``small`` bytes at a time
    until a small local read (the reply, most likely) or ``reply_wait``
    seconds.
    """

    def __init__(
        self,
        large: int = LOCAL_READ_SIZE,
        small: int = SHARED_READ_SIZE,
        hold: float = 1.0,
        interactive: int = INTERACTIVE_READ,
        channel: int = CHANNEL_READ_SIZE,
        reply_wait: float = 0.002,
    ) -> None:
        self.large = large
        self.small = small
        self.hold = hold
        self.interactive = interactive
        self.channel = channel
        self.reply_wait = reply_wait
        self._stream: object = None  # the stream that read small last
        self._until = float("-inf")
        #: Until when the channel is read ``small`` bytes at a time (0: it is not).
        self.reply_until = 0.0

    def next_size(self, stream: object, count: int, now: float, previous: int = 0) -> int:
        """``stream`` just read ``count`` bytes, after ``previous`` (0: none): how much next."""
        if count <= self.interactive:
            self.reply_until = 0.0
            if 0 < previous <= self.interactive:
                self._stream = stream
                self._until = now + self.hold
            return self.large
        if now < self._until and stream != self._stream:
            return self.small
        return self.large

    def shared(self, now: float) -> bool:
        """Is an interactive stream about (other streams read ``small``)?"""
        return now < self._until

    def delivered(self, count: int, now: float) -> None:
        """``count`` bytes of peer data went to a local socket in one write."""
        if count <= self.interactive:
            self.reply_until = now + self.reply_wait

    def channel_size(self, now: float) -> int:
        """How much to read from the channel next."""
        if self.reply_until:
            if now < self.reply_until:
                return self.small
            self.reply_until = 0.0
        return self.channel
