"""Property tests of the async handlers' reader (``_async.streams.AsyncReader``).

However the same bytes arrive (in one segment, in many, byte by byte),
``readline``, ``readexactly``, ``readuntil`` and ``read`` return the same
results, and those of a model written from their docstrings (``io``'s and
asyncio's semantics), errors included.  The reader is driven as its protocol
drives it: ``feed`` when a read waits, ``feed_eof`` once the bytes are all
given; no reactor is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from txsocketserver._async.streams import AsyncReader


class Connection:
    """What a reader asks of its connection: flow control, no timeout."""

    timeout = None

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


Operation = tuple[str, Any]


def start(reader: AsyncReader, operation: Operation) -> Coroutine[Any, Any, bytes]:
    name, argument = operation
    if name == "readuntil":
        separator, limit = argument
        return reader.readuntil(separator, limit)
    return getattr(reader, name)(argument)  # type: ignore[no-any-return]


def outcome(error: BaseException) -> tuple[Any, ...]:
    if isinstance(error, asyncio.IncompleteReadError):
        return ("incomplete", error.partial)
    if isinstance(error, asyncio.LimitOverrunError):
        # How many bytes it had looked at depends on what had arrived: not compared.
        return ("overrun",)
    raise error


def run(chunks: list[bytes], operations: list[Operation]) -> list[tuple[Any, ...]]:
    """The results of *operations*, one after another, with *chunks* arriving as needed."""
    reader = AsyncReader(Connection())
    pending = list(chunks)
    results = []
    for operation in operations:
        coroutine = start(reader, operation)
        while True:
            try:
                coroutine.send(None)
            except StopIteration as done:
                results.append(("ok", done.value))
                break
            except Exception as error:
                results.append(outcome(error))
                break
            # The read waits: what arrives next, or the end of the stream.
            if pending:
                reader.feed(pending.pop(0))
            else:
                reader.feed_eof()
    return results


def model(data: bytes, operations: list[Operation]) -> list[tuple[Any, ...]]:
    """The same reads on all of *data*, from the semantics the docstrings give."""
    results: list[tuple[Any, ...]] = []
    rest = data
    for name, argument in operations:
        if name == "readline":
            end = rest.find(b"\n") + 1 or len(rest)
            if argument >= 0:
                end = min(end, argument)
            results.append(("ok", rest[:end]))
            rest = rest[end:]
        elif name == "read":
            end = len(rest) if argument < 0 else argument
            results.append(("ok", rest[:end]))
            rest = rest[end:]
        elif name == "readexactly":
            if len(rest) < argument:
                results.append(("incomplete", rest))
                rest = b""
            else:
                results.append(("ok", rest[:argument]))
                rest = rest[argument:]
        else:
            separator, limit = argument
            found = rest.find(separator)
            if found >= 0 and found + len(separator) <= limit:
                results.append(("ok", rest[: found + len(separator)]))
                rest = rest[found + len(separator) :]
            elif found >= 0 or len(rest) > limit:
                results.append(("overrun",))
            else:
                results.append(("incomplete", rest))
                rest = b""
    return results


pieces = st.sampled_from([b"a", b"bc", b"\n", b"\r\n", b"--", b"xyz", b"\x00", b"line\n"])
data_strategy = st.lists(pieces, max_size=40).map(b"".join)
operations_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("readline"), st.integers(-1, 12)),
        st.tuples(st.just("readexactly"), st.integers(0, 20)),
        st.tuples(st.just("read"), st.integers(-1, 20)),
        st.tuples(
            st.just("readuntil"),
            st.tuples(st.sampled_from([b"\n", b"--", b"xyz", b"\r\n"]), st.integers(1, 40)),
        ),
    ),
    min_size=1,
    max_size=8,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@settings(max_examples=400, deadline=None, database=None)
@given(data_strategy, operations_strategy, st.lists(st.integers(0, 1000), max_size=12))
def test_reads_give_the_same_results_however_the_bytes_are_split(
    data: bytes, operations: list[Operation], cuts: list[int]
) -> None:
    expected = model(data, operations)
    assert run([data] if data else [], operations) == expected
    assert run(split(data, cuts), operations) == expected
    assert run([data[i : i + 1] for i in range(len(data))], operations) == expected


@settings(max_examples=100, deadline=None, database=None)
@given(data_strategy, st.lists(st.integers(0, 1000), max_size=12))
def test_async_for_yields_the_lines_readline_gives(data: bytes, cuts: list[int]) -> None:
    reader = AsyncReader(Connection())
    pending = split(data, cuts)
    lines = []
    iterator = reader.__aiter__()
    while True:
        step = iterator.__anext__()
        try:
            while True:
                step.send(None)
                if pending:
                    reader.feed(pending.pop(0))
                else:
                    reader.feed_eof()
        except StopIteration as done:
            lines.append(done.value)
        except StopAsyncIteration:
            break
    assert lines == data.splitlines(keepends=True)
