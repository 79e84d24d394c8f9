"""WritePacer: channel writes sized to ~10 ms of the measured drain rate."""

from virtproxy.pacing import (
    CHANNEL_READ_SIZE,
    INTERACTIVE_READ,
    LOCAL_READ_SIZE,
    SHARED_READ_SIZE,
    ReadSizer,
    WritePacer,
)


def cycle(pacer: WritePacer, now: float, seconds: float) -> float:
    """Write one full chunk at ``now``; it drains ``seconds`` later."""
    pacer.wrote(pacer.chunk, now)
    now += seconds
    pacer.drained(now)
    return now


def test_fast_channel_grows_to_the_maximum() -> None:
    pacer = WritePacer()
    now = 0.0
    for _ in range(10):
        now = cycle(pacer, now, 0.0001)
    assert pacer.chunk == pacer.maximum


def test_one_megabyte_per_second_gives_about_ten_kilobytes() -> None:
    pacer = WritePacer()
    now = 0.0
    for _ in range(30):
        now = cycle(pacer, now, pacer.chunk / 1_000_000)
    assert 8_000 <= pacer.chunk <= 12_000, pacer.chunk
    assert 900_000 <= pacer.rate <= 1_100_000


def test_serial_line_stays_at_the_minimum() -> None:
    pacer = WritePacer()
    now = 0.0
    for _ in range(30):
        now = cycle(pacer, now, pacer.chunk / 11_520)
    assert pacer.chunk == pacer.minimum


def test_channel_that_slows_down_shrinks_the_chunk() -> None:
    pacer = WritePacer()
    now = 0.0
    for _ in range(10):
        now = cycle(pacer, now, 0.0001)
    for _ in range(30):
        now = cycle(pacer, now, pacer.chunk / 2_000_000)
    assert pacer.chunk < 32_000


def test_small_writes_do_not_move_the_estimate() -> None:
    pacer = WritePacer()
    before = pacer.chunk
    pacer.wrote(20, 0.0)
    pacer.drained(5.0)  # an idle keystroke write says nothing about speed
    assert pacer.chunk == before and pacer.rate == 0.0


def test_drained_without_a_write_is_ignored() -> None:
    pacer = WritePacer()
    pacer.drained(1.0)
    assert pacer.chunk == 16 * 1024


def test_a_kernel_buffer_taking_bursts_does_not_make_a_slow_line_look_fast() -> None:
    """4 KiB of kernel buffer in front of an 11520 B/s line: most writes "drain"
    at once, every few a write waits for the line."""
    pacer = WritePacer()
    now, kernel = 0.0, 0.0
    for _ in range(400):
        size = pacer.chunk
        pacer.wrote(size, now)
        kernel += size
        room_wait = max(0.0, (kernel - 4096) / 11_520)
        now += max(room_wait, 0.0002)
        kernel = max(0.0, kernel - (now - (now - max(room_wait, 0.0002))) * 11_520)
        pacer.drained(now)
    assert pacer.chunk <= 1024, pacer.chunk


def test_a_stream_alone_reads_large() -> None:
    sizer = ReadSizer()
    assert sizer.next_size(1, 256 * 1024, 0.0) == LOCAL_READ_SIZE
    assert sizer.next_size(1, 100, 0.1, 256 * 1024) == LOCAL_READ_SIZE  # its own small read
    assert sizer.next_size(1, 100, 0.1, 100) == LOCAL_READ_SIZE
    assert sizer.next_size(1, 256 * 1024, 0.2, 100) == LOCAL_READ_SIZE


def test_bulk_reads_small_while_a_keystroke_stream_is_active() -> None:
    sizer = ReadSizer(hold=1.0)
    assert sizer.next_size(1, 256 * 1024, 0.0) == LOCAL_READ_SIZE
    assert sizer.next_size(2, 1, 0.4, 1) == LOCAL_READ_SIZE  # the keystroke stream itself
    assert sizer.next_size(1, 256 * 1024, 0.6, 256 * 1024) == SHARED_READ_SIZE
    assert sizer.next_size(1, SHARED_READ_SIZE, 1.3, SHARED_READ_SIZE) == SHARED_READ_SIZE
    # A second after the last keystroke, bulk reads large again.
    assert sizer.next_size(1, SHARED_READ_SIZE, 1.5, SHARED_READ_SIZE) == LOCAL_READ_SIZE


def test_one_small_read_is_not_interactive() -> None:
    sizer = ReadSizer()
    sizer.next_size(2, 1, 0.0)  # a bulk upload's first byte ...
    sizer.next_size(2, 256 * 1024, 0.0, 1)  # ... and its data
    sizer.next_size(3, 100, 0.0, 256 * 1024)  # another's last bytes
    assert sizer.next_size(1, 256 * 1024, 0.1, 256 * 1024) == LOCAL_READ_SIZE


def test_medium_reads_are_not_interactive() -> None:
    sizer = ReadSizer()
    sizer.next_size(2, INTERACTIVE_READ + 1, 0.0, INTERACTIVE_READ + 1)
    assert sizer.next_size(1, 256 * 1024, 0.1) == LOCAL_READ_SIZE


def test_after_a_small_delivery_the_channel_reads_small_until_the_reply() -> None:
    sizer = ReadSizer(reply_wait=0.002)
    assert sizer.channel_size(0.0) == CHANNEL_READ_SIZE
    sizer.delivered(60_000, 0.0)
    assert sizer.channel_size(0.0) == CHANNEL_READ_SIZE
    sizer.delivered(1, 0.0)
    assert sizer.channel_size(0.001) == SHARED_READ_SIZE
    sizer.next_size(3, 1, 0.0015)  # the reply
    assert sizer.channel_size(0.0016) == CHANNEL_READ_SIZE
    sizer.delivered(1, 1.0)
    assert sizer.channel_size(1.0019) == SHARED_READ_SIZE
    assert sizer.channel_size(1.0021) == CHANNEL_READ_SIZE  # no reply in time
    assert sizer.channel_size(1.0) == CHANNEL_READ_SIZE
