"""WritePacer: channel writes sized to ~10 ms of the measured drain rate."""

from virtproxy.pacing import WritePacer


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
