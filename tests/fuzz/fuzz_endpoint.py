"""Fuzz our handling of endpoint descriptions: ``Endpoint``, ``listening_socket``
(with the ``ssl:`` options read for the server's own TLS, ``tls.server_context``),
``proxy_protocol_endpoint`` and ``endpoint_backlog`` (``haproxy:``).

Documented failures: ``ValueError`` from ``Endpoint.resolve`` for a
description Twisted cannot parse; ``OSError``/``ssl.SSLError`` (or
``open()``'s ``ValueError`` for a path with a NUL byte) from
``listening_socket`` for key, certificate or DH files that cannot be used.
Invariants: nothing listens or touches the network (the endpoint is resolved
on a ``MemoryReactor``); a socket served on our own path has a family that
matches its address, an integer port (one out of range is left to ``bind()``,
which raises ``OverflowError`` as for the stdlib's ``("", 65536)``), a host
string (a name is ``bind()``'s to resolve) and an integer backlog (passed to
``listen()`` as Twisted's own port would); a ``haproxy:`` description's
inner endpoint is found, and its backlog is positive if named.

Descriptions are assembled from the input: an endpoint type, then options
picked from the names and values each type takes (a real certificate and key
among them, so ``ssl:`` gets past Twisted's own checks), or raw text (a
first byte divisible by 8, ``{cert}`` and ``{key}`` standing for the files:
the seeds are written so).

Run: ``python tests/fuzz/fuzz_endpoint.py CORPUS_DIR [libFuzzer options]``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import ssl
import sys
import tempfile

from _harness import FuzzInput, fuzz, instrumented
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.testing import MemoryReactor

with instrumented("txsocketserver", "twisted.internet.endpoints"):
    from txsocketserver._twisted.endpoints import (
        Endpoint,
        endpoint_backlog,
        listening_socket,
        proxy_protocol_endpoint,
    )


def _certificate() -> tuple[str, str]:
    # The tests' own helper (tests/support.py); this script runs with only
    # tests/fuzz on its path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from support import make_self_signed_cert

    directory = tempfile.mkdtemp(prefix="txss-fuzz-")
    atexit.register(shutil.rmtree, directory, True)
    made = make_self_signed_cert(directory)
    return made.cert_path, made.key_path


CERT, KEY = _certificate()
# Colons in a description's values are escaped.
CERT_OPTION, KEY_OPTION = (path.replace(":", "\\:") for path in (CERT, KEY))

KINDS = ["tcp:", "tcp6:", "ssl:", "unix:", "haproxy:tcp:", "haproxy:ssl:", "haproxy:unix:",
         "haproxy:", "systemd:", "", "haproxy:haproxy:tcp:"]  # fmt: skip
NAMES = ["port", "interface", "backlog", "privateKey", "certKey", "extraCertChain",
         "dhParameters", "sslmethod", "address", "mode", "lockfile", "domain", "index",
         "name", "wantPID"]  # fmt: skip
VALUES = ["0", "8443", "-1", "65536", "99999", "1e3", "0x10", "", "127.0.0.1", "::1",
          "\\:\\:1", "0.0.0.0", "localhost", "TLSv1_2_METHOD", "SSLv23_METHOD",
          "TLS_METHOD", "TLSv1_METHOD", "nope_METHOD", CERT_OPTION, KEY_OPTION,
          "/nonexistent.pem", "/tmp/fuzz.sock", "666", "0o600", "INET", "UNIX",
          "INET6", "yes", "no", "true"]  # fmt: skip


def describe(data: bytes) -> str:
    """An endpoint description made from the fuzzer's *data*."""
    given = FuzzInput(data)
    if given.below(8) == 0:
        # Raw text (the seeds are written so), {cert} and {key} naming the files.
        text = given.rest().decode("utf-8", "replace")
        return text.replace("{cert}", CERT_OPTION).replace("{key}", KEY_OPTION)
    parts = [str(given.choice(KINDS)).rstrip(":")] if given.below(6) else []
    for _ in range(given.below(6)):
        text = given.bytes(given.below(12)).decode("utf-8", "replace")
        value = str(given.choice(VALUES)) if given.below(4) else text
        shape = given.below(4)
        if shape == 0:
            parts.append(value)
        elif shape == 3:
            parts.append(f"{text}={value}")
        else:
            parts.append(f"{given.choice(NAMES)}={value}")
    return ":".join(part for part in parts if part != "") or given.rest().decode("latin-1")


def check(data: bytes) -> None:
    description = describe(data)
    endpoint = Endpoint(description)
    try:
        resolved = endpoint.resolve(MemoryReactor())
    except ValueError:
        return
    try:
        listening = listening_socket(endpoint)
    except (OSError, ssl.SSLError, ValueError):
        # Files named by ssl: options that cannot be used (dhParameters is
        # read only here; a path with a NUL byte is open()'s ValueError).
        assert isinstance(resolved, SSL4ServerEndpoint), description
        return
    if listening is not None:
        # backlog=-1 is passed on to listen() as Twisted's own port would.
        assert isinstance(listening.backlog, int), listening
        if listening.family == socket.AF_UNIX:
            assert isinstance(listening.address, str), listening
        else:
            assert listening.family in (socket.AF_INET, socket.AF_INET6), listening
            host, port = listening.address
            # A port out of range (tcp:65536) is bind()'s to refuse, with the
            # OverflowError the stdlib raises for ("", 65536): no check here.
            assert isinstance(port, int), (description, listening)
            # A host name (interface=localhost) is bind()'s to resolve, as
            # for the stdlib's ("localhost", 0).
            assert isinstance(host, str), (description, listening)
        # TLS where Twisted parsed an ssl: endpoint, which a description
        # need not start with: its first positional segment names the type
        # ("privateKey=k.pem:ssl:0" is ssl:).
        assert (listening.tls is not None) == isinstance(resolved, SSL4ServerEndpoint), listening
    inner = proxy_protocol_endpoint(resolved)
    backlog = endpoint_backlog(endpoint)
    if inner is None:
        assert not description.startswith("haproxy:"), description
        assert backlog is None, description
    else:
        assert backlog is None or backlog > 0, description


if __name__ == "__main__":
    sys.exit(fuzz(check))
