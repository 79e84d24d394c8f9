"""The atheris fuzz targets' checks, run as plain tests (no atheris needed).

fuzz/fuzz_frames.py and fuzz/fuzz_session.py hold the invariants; here
hypothesis feeds them random inputs so a broken target, or a decoder or
session change that breaks an invariant, fails the ordinary suite too.  CI
also runs the real coverage-guided fuzzers for a short time (.ci/run).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"vp_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


frames_target = load("fuzz_frames")
session_target = load("fuzz_session")

fuzz_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@fuzz_settings
@given(st.binary(max_size=2048))
def test_frame_decoder_target_holds_for_random_inputs(data: bytes) -> None:
    frames_target.check(data)


@fuzz_settings
@given(st.binary(max_size=2048))
def test_session_target_holds_for_random_inputs(data: bytes) -> None:
    session_target.check(data)


@pytest.mark.parametrize("name", ["frames", "session"])
def test_seed_corpus_holds(name: str) -> None:
    """Every input of the checked-in seed corpus (regressions included) passes."""
    target = frames_target if name == "frames" else session_target
    inputs = sorted((FUZZ / "corpus" / name).iterdir())
    assert inputs, "no seed corpus"
    for path in inputs:
        target.check(path.read_bytes())


def test_frame_decoder_target_detects_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target really checks: a decoder that loses a frame's bytes is caught."""
    real = frames_target.FrameDecoder.feed

    def lossy(self, data: bytes, now: float = 0.0):  # type: ignore[no-untyped-def]
        return real(self, data, now)[1:]

    monkeypatch.setattr(frames_target.FrameDecoder, "feed", lossy)
    # mode 1: a valid HELLO-typed frame built from the input; then its bytes.
    data = bytes([0, 0, 20, 1, 1, 0, 0, 0, 0, 0]) + b"x" * 20
    with pytest.raises(AssertionError):
        frames_target.check(data)
