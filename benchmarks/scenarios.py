"""The scenario table: what is served, by each implementation, and how it is loaded.

To add a scenario, add a ``Scenario`` to ``SCENARIOS`` with a server factory per
implementation (``servers.py``: each binds 127.0.0.1 port 0 and returns the port
and a serve callable) and a load function (``loads.py``: port, tools, duration ->
``Measurement``).  Nothing else needs to change: ``run.py`` starts each server in
its own process with ``server.py --impl IMPL --scenario NAME``.

Scenario ideas with the same shape: TLS echo (``get_request`` wrapping in ``ssl`` vs an
``ssl:`` endpoint, a TLS load client).
"""

from __future__ import annotations

from dataclasses import dataclass

from loads import Load, datagram_load, echo_load, http_load, tls_echo_load
from servers import (
    ServerStarter,
    async_echo_servers,
    datagram_servers,
    echo_servers,
    forking_servers,
    http_servers,
    observed_servers,
    tls_echo_servers,
)

# A scenario without a server for an implementation skips it (asyncio serves
# only the async-* scenarios).
# "metrics" and "access-log" are ours observed (the observed-* scenarios only).
# "uvloop" (start_server streams on uvloop), "uvloop-protocol" (a raw
# asyncio.Protocol on uvloop) and "ours-asyncio-uvloop" (ours on Twisted's
# asyncio reactor over uvloop) serve the async-* scenarios only.
IMPLEMENTATIONS = (
    "ours",
    "stdlib",
    "twisted",
    "asyncio",
    "metrics",
    "access-log",
    "uvloop",
    "uvloop-protocol",
    "ours-asyncio-uvloop",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    servers: dict[str, ServerStarter]
    load: Load
    quick: bool = False  # part of the ``--quick`` smoke run


def _table(*scenarios: Scenario) -> dict[str, Scenario]:
    return {scenario.name: scenario for scenario in scenarios}


SCENARIOS = _table(
    *(
        Scenario(
            f"echo-persistent-{n}",
            f"{n} persistent connections, one line in flight each; ThreadingTCPServer",
            echo_servers("ThreadingTCPServer"),
            echo_load("persistent", n),
            quick=n == 16,
        )
        for n in (1, 16, 128)
    ),
    Scenario(
        "echo-persistent-1-sync",
        "1 persistent connection, one line in flight; TCPServer (no threads)",
        echo_servers("TCPServer"),
        echo_load("persistent", 1),
        quick=True,
    ),
    *(
        Scenario(
            f"connect-per-request-{kind}-{n}",
            f"{n} clients, a new connection per line; {server_class}",
            echo_servers(server_class),
            echo_load("connect", n),
            quick=(kind, n) == ("threading", 8),
        )
        for kind, server_class in (("sync", "TCPServer"), ("threading", "ThreadingTCPServer"))
        for n in (1, 8)
    ),
    *(
        Scenario(
            f"http-{n}",
            f"{n} HTTP/1.0 clients, a new connection per GET; BaseHTTPRequestHandler",
            http_servers("HTTP/1.0"),
            http_load(n, keep_alive=False),
            quick=n == 16,
        )
        for n in (1, 16, 64)
    ),
    *(
        Scenario(
            f"http-keepalive-{n}",
            f"{n} HTTP/1.1 keep-alive clients; BaseHTTPRequestHandler",
            http_servers("HTTP/1.1"),
            http_load(n, keep_alive=True),
            quick=n == 16,
        )
        for n in (1, 16, 64)
    ),
    *(
        Scenario(
            f"datagram-{kind}-{n}",
            f"{n} UDP clients, one datagram in flight each; {server_class}",
            datagram_servers(server_class),
            datagram_load(n),
            quick=(kind, n) == ("threading", 16),
        )
        for kind, server_class in (("sync", "UDPServer"), ("threading", "ThreadingUDPServer"))
        for n in (1, 16)
    ),
    *(
        Scenario(
            f"forking-connect-per-request-{n}",
            f"{n} clients, a new connection per line; ForkingTCPServer (a process each)",
            forking_servers("echo"),
            echo_load("connect", n),
            quick=n == 8,
        )
        for n in (1, 8)
    ),
    *(
        Scenario(
            f"forking-local-classes-connect-per-request-{n}",
            f"{n} clients, a new connection per line; ForkingTCPServer with its classes "
            "defined inside a function (ours carries them by value)",
            forking_servers("echo", local_classes=True),
            echo_load("connect", n),
            quick=False,
        )
        for n in (1, 8)
    ),
    Scenario(
        "forking-fork-from-server-connect-per-request-8",
        '8 clients, a new connection per line; ForkingTCPServer, ours with fork_from = "server" '
        "(the serving process forks, as the stdlib's does)",
        forking_servers("echo", fork_from="server"),
        echo_load("connect", 8),
        quick=False,
    ),
    Scenario(
        "forking-cpu-bound-4",
        "4 clients, a new connection per line, ~20 ms of pure Python each; ForkingTCPServer",
        forking_servers("cpu"),
        echo_load("connect", 4),
        quick=True,
    ),
    *(
        Scenario(
            f"async-echo-persistent-{n}",
            f"{n} persistent connections, one line in flight each; ours: TCPServer with an "
            "async handler (stdlib: ThreadingTCPServer; asyncio: start_server)",
            async_echo_servers(),
            echo_load("persistent", n),
            quick=n == 16,
        )
        for n in (1, 16, 128)
    ),
    Scenario(
        "async-connect-per-request-16",
        "16 clients, a new connection per line; ours: TCPServer with an async handler "
        "(stdlib: ThreadingTCPServer; asyncio: start_server)",
        async_echo_servers(),
        echo_load("connect", 16),
        quick=True,
    ),
    *(
        Scenario(
            f"tls-echo-persistent-{n}",
            f"{n} persistent TLS connections, one line in flight each; ThreadingTCPServer "
            "on an ssl: endpoint (stdlib: ssl-wrapping get_request)",
            tls_echo_servers(),
            tls_echo_load(n),
            quick=n == 16,
        )
        for n in (1, 16)
    ),
    # The cost of observing: ours plain, with metrics, with the access log.
    Scenario(
        "observed-async-echo-persistent-16",
        "16 persistent connections, one line in flight each; TCPServer with an async "
        "handler, plain / with metrics / with the access log",
        observed_servers(async_echo_servers()),
        echo_load("persistent", 16),
    ),
    Scenario(
        "observed-connect-per-request-threading-8",
        "8 clients, a new connection per line; ThreadingTCPServer, plain / with "
        "metrics / with the access log",
        observed_servers(echo_servers("ThreadingTCPServer")),
        echo_load("connect", 8),
    ),
)
