"""What the fuzz targets share: atheris when it is installed, and a reader that
takes control values off the front of an input.

The targets' ``check(data)`` functions work without atheris
(tests/test_fuzz_targets.py runs them); only :func:`run` needs it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

try:
    import atheris
except ImportError:  # check() still works; run() says what is missing
    atheris = None


def instrumented_imports() -> Any:
    """Wrap the imports of the code under test, so atheris sees its coverage."""
    return atheris.instrument_imports() if atheris is not None else contextlib.nullcontext()


def run(check: Callable[[bytes], None]) -> None:
    """The libFuzzer main loop over ``check``, with libFuzzer's command line."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (see fuzz/README.rst)")
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


class Reader:
    """Takes control values off the front of the input."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        self.pos += len(chunk)
        return chunk

    @property
    def left(self) -> int:
        return len(self.data) - self.pos
