"""Fixtures for the differential tests: one scenario, two implementations.

``ss`` is the module under test: the stdlib's ``socketserver`` or
``txsocketserver``.  A scenario written against ``ss`` must give the same
observable result for both.  Run ``-k stdlib`` to check a scenario against the
reference alone, ``-k tx`` for the implementation.
"""

from __future__ import annotations

import importlib
import socketserver
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from support import SelfSignedCert, make_self_signed_cert, unix_socket_path


@pytest.fixture(params=["stdlib", "tx"])
def ss(request: pytest.FixtureRequest) -> ModuleType:
    """The ``socketserver`` implementation under test."""
    if request.param == "stdlib":
        return socketserver
    return importlib.import_module("txsocketserver")


@pytest.fixture(params=["stdlib", "tx", "tx-fork-from-server"])
def forking_ss(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``ss`` for the forking tests: ours again with ``fork_from = "server"``
    (the serving process forks, as the stdlib's does): both of ours must
    give the stdlib's result."""
    if request.param == "stdlib":
        return socketserver
    tx = importlib.import_module("txsocketserver")
    if request.param == "tx-fork-from-server":
        monkeypatch.setattr(tx.ForkingMixIn, "fork_from", "server")
    return tx


@pytest.fixture
def tx() -> ModuleType:
    """``txsocketserver`` alone, for tests of documented improvements over the stdlib."""
    return importlib.import_module("txsocketserver")


@pytest.fixture
def unix_path() -> Iterator[str]:
    """A short, unused path for a Unix socket, removed after the test."""
    with unix_socket_path() as path:
        yield path


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> SelfSignedCert:
    """A self-signed certificate for localhost, made once per session."""
    return make_self_signed_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event of the ``txsocketserver`` namespace (and every
    logged failure) during the test."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "txsocketserver" or "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)
