"""Fuzz the PROXY header stage of a connection (``proxy_stage.ProxyHeaderStage``),
fed the same bytes in arbitrary segments.

Documented behaviour: a bad header closes the connection (no exception
leaves ``feed``).  Invariants:

* the outcome (a header and the payload after it, a refusal, or still
  waiting) is the same however the bytes are split, and the same as
  ``parse_header`` on all of them at once;
* the payload is exactly the bytes after the header;
* a refused connection is closed, and a connection still waiting is closed
  by the deadline (or ends with its peer); after the stage nothing is left
  scheduled.

The bytes are built as in ``fuzz_proxy_header`` (raw, a v1 line, a v2 block
with TLVs), then cut at points taken from the input.

Run: ``python tests/fuzz/fuzz_proxy_stage.py CORPUS_DIR [libFuzzer options]``.
"""

from __future__ import annotations

import sys
from typing import Any

from _harness import FuzzInput, fuzz, instrumented
from fuzz_proxy_header import build
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

with instrumented("txsocketserver"):
    from txsocketserver._twisted.proxy_protocol import (
        ProxyHeaderError,
        TrustedProxies,
        parse_header,
    )
    from txsocketserver._twisted.proxy_stage import ProxyHeaderPolicy, ProxyHeaderStage

PEER = ("127.0.0.1", 40000)
POLICY = ProxyHeaderPolicy(TrustedProxies(["127.0.0.1"]), timeout=10.0)


def run_stage(chunks: list[bytes], peer_leaves: bool = False) -> tuple[Any, ...]:
    """Feed *chunks* to a stage as ``dataReceived`` would; what became of it."""
    transport = StringTransport()
    clock = Clock()
    headers: list[Any] = []
    stage = ProxyHeaderStage(transport, PEER, POLICY, clock, headers.append)
    assert stage.begin()
    payload = b""
    for chunk in chunks:
        if stage.active:
            payload += stage.feed(chunk)
        elif headers:
            payload += chunk  # past the stage: the protocol's own bytes
        else:
            break  # refused: the connection is closing, nothing more is read
    if stage.active:
        assert not transport.disconnecting
        if peer_leaves:
            stage.peer_ended("closed")
            assert not stage.active
        else:
            clock.advance(POLICY.timeout)  # type: ignore[arg-type]
            assert not stage.active and transport.disconnecting, "the deadline did not close it"
        outcome: tuple[Any, ...] = ("waiting",)
    elif headers:
        assert len(headers) == 1 and not transport.disconnecting
        outcome = ("header", tuple(headers[0]), payload)
    else:
        assert transport.disconnecting, "refused but not closed"
        outcome = ("refused",)
    assert not clock.getDelayedCalls(), "the deadline outlived the stage"
    return outcome


def split(data: bytes, given: FuzzInput) -> list[bytes]:
    cuts = sorted({given.below(len(data) + 1) for _ in range(given.below(12))})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def check(data: bytes) -> None:
    given = FuzzInput(data[:24])
    stream = build(data[24:])
    try:
        header = parse_header(stream)
    except ProxyHeaderError:
        expected: tuple[Any, ...] = ("refused",)
    else:
        if header is None:
            expected = ("waiting",)
        else:
            expected = ("header", tuple(header), stream[header.length :])
    assert run_stage([stream] if stream else []) == expected
    assert run_stage(split(stream, given), peer_leaves=given.below(2) == 1) == expected
    assert run_stage([stream[i : i + 1] for i in range(min(len(stream), 300))]) == (
        expected if len(stream) <= 300 else run_stage([stream[:300]])
    )


if __name__ == "__main__":
    sys.exit(fuzz(check))
