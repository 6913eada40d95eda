"""The fuzz harnesses' inputs, replayed in the normal suite.

Every harness in ``tests/fuzz`` (``fuzz_*.py``) gets its committed seeds
(``corpus/NAME``) and every input a fuzzing run ever failed on
(``regressions/NAME``) through its ``check``, without atheris: a finding,
once its input is committed there, stays a test.  How to fuzz, and for
how long: docs/reliability.md.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
sys.path.insert(0, str(FUZZ))

HARNESSES = sorted(path.stem.removeprefix("fuzz_") for path in FUZZ.glob("fuzz_*.py"))
INPUTS = [
    pytest.param(name, path, id=f"{name}/{kind}/{path.name}")
    for name in HARNESSES
    for kind in ("corpus", "regressions")
    for path in sorted((FUZZ / kind / name).glob("*"))
]


def test_every_harness_has_seeds() -> None:
    assert HARNESSES
    for name in HARNESSES:
        assert any((FUZZ / "corpus" / name).iterdir()), name


# sslmethod= seeds: Twisted warns that it will pick the method itself.
@pytest.mark.filterwarnings("ignore:Passing method to twisted.internet.ssl:DeprecationWarning")
@pytest.mark.parametrize(("name", "path"), INPUTS)
def test_input_passes_its_harness(name: str, path: Path) -> None:
    harness = importlib.import_module(f"fuzz_{name}")
    if not getattr(harness, "AVAILABLE", True):
        pytest.skip(f"fuzz_{name}: what it fuzzes is not in this tree yet")
    harness.check(path.read_bytes())
