"""What every fuzz harness shares: instrumenting the code under test, and reading the input.

A harness (``fuzz_*.py`` here) is a module with a ``check(data: bytes)``
function that feeds *data* to one parser and raises on a bug: an exception
other than the parser's documented one, or a broken invariant
(``AssertionError``).  Run as a script, it hands ``check`` to atheris
(libFuzzer), which mutates inputs towards new coverage of the modules
imported inside :func:`instrumented`; imported (by ``run.py`` to measure line
coverage, by ``tests/test_fuzz_corpus.py`` to replay the corpus and every
crash ever found), it needs no atheris.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

#: The only modules a harness lets ``--handler``/``--server`` (or a config
#: file's ``handler``/``server``) import: a fuzzed name could import anything.
IMPORTABLE = frozenset({"socketserver", "http.server", "txsocketserver"})


@contextlib.contextmanager
def instrumented(*packages: str) -> Iterator[None]:
    """Instrument the modules of *packages* imported inside, when the running
    script is a harness (``fuzz_*.py``): libFuzzer then sees their branches."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if not Path(main).name.startswith("fuzz_"):
        yield
        return
    import atheris

    with atheris.instrument_imports(include=list(packages)):
        yield


@contextlib.contextmanager
def guarded_imports() -> Iterator[None]:
    """Inside, ``load_object`` (``package.module:Name`` options) imports only
    :data:`IMPORTABLE` modules; any other name fails as a module that is not
    there.  Undone on leaving: the replay in the normal suite shares the process."""
    from txsocketserver import _server_classes

    def import_module(name: str, package: str | None = None) -> types.ModuleType:
        if name not in IMPORTABLE:
            raise ModuleNotFoundError(f"fuzzing imports no {name!r}", name=name)
        return importlib.import_module(name, package)

    real = _server_classes.importlib
    _server_classes.importlib = types.SimpleNamespace(  # type: ignore[assignment]
        import_module=import_module
    )
    try:
        yield
    finally:
        _server_classes.importlib = real


def fuzz(check: Callable[[bytes], None]) -> None:
    """Run libFuzzer on *check*, with the command line's libFuzzer options."""
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


class FuzzInput:
    """Structured values taken from the front of the fuzzer's bytes.

    Past the end every take returns zeros or empty bytes, so that any input
    means something and small mutations make small changes.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def int(self, size: int = 1) -> int:
        """An unsigned big-endian integer of *size* bytes."""
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return int.from_bytes(chunk.ljust(size, b"\0"), "big")

    def below(self, bound: int) -> int:
        """An integer in ``range(bound)``."""
        return self.int(2 if bound > 256 else 1) % bound

    def choice(self, options: list) -> object:  # type: ignore[type-arg]
        return options[self.below(len(options))]

    def bytes(self, size: int) -> bytes:
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def rest(self) -> bytes:
        chunk = self._data[self._at :]
        self._at = len(self._data)
        return chunk
