"""The examples run as documented: the ``.tac`` under ``twistd``, the mixed
``twisted.web`` program under Python, each talked to by real clients.

Each runs from a copy whose fixed ports (and, for the ``.tac``, certificate
paths) are replaced by free ones, so that tests never collide with anything
listening on the machine.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
import xmlrpc.client
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, SelfSignedCert, connect, recv_line, wait_until
from test_twistd_cli import REPO, TWISTD, ServerProcess, Spawn, spawn  # noqa: F401 - the fixture

EXAMPLES = REPO / "examples"


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (the kernel's choice, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def copy_example(name: str, directory: Path, replacements: dict[str, str]) -> Path:
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{name} no longer contains {old!r}"
        text = text.replace(old, new)
    copy = directory / name
    copy.write_text(text)
    return copy


def listening(port: int) -> bool:
    try:
        connect((LOCALHOST, port)).close()
    except OSError:
        return False
    return True


def wait_for_connect(server: ServerProcess, port: int) -> None:
    """Wait until ``port`` accepts connections; fail at once if ``server`` exits."""
    wait_until(lambda: listening(port) or server.process.poll() is not None, timeout=20)
    assert server.process.poll() is None, server.output()
    assert listening(port), f"nothing listens on {port}:\n{server.output()}"


def test_two_handlers_tac_under_twistd(
    spawn: Spawn,  # noqa: F811
    tls_cert: SelfSignedCert,
    tmp_path: Path,
) -> None:
    echo_port, https_port = free_ports(2)
    tac = copy_example(
        "two_handlers.tac",
        tmp_path,
        {
            "8000)": f"{echo_port})",
            "ssl:8443:": f"ssl:{https_port}:",
            "examples/key.pem": tls_cert.key_path,
            "examples/cert.pem": tls_cert.cert_path,
        },
    )
    (tmp_path / "index.html").write_text("<p>served by the example</p>\n")
    server = spawn(*TWISTD, "-n", "--pidfile=", "-y", str(tac), cwd=tmp_path)
    wait_for_connect(server, echo_port)
    wait_for_connect(server, https_port)
    with connect((LOCALHOST, echo_port)) as client:
        client.sendall(b"hello\n")
        assert recv_line(client) == b"hello\n"
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    url = f"https://{LOCALHOST}:{https_port}/index.html"
    with urllib.request.urlopen(url, context=context, timeout=WAIT) as reply:
        assert reply.read() == b"<p>served by the example</p>\n"
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


def test_with_twisted_web_serves_both_in_one_process(
    spawn: Spawn,  # noqa: F811
    tmp_path: Path,
) -> None:
    web_port, handler_port = free_ports(2)
    program = copy_example(
        "with_twisted_web.py",
        tmp_path,
        {"tcp:8080:": f"tcp:{web_port}:", "tcp:8081:": f"tcp:{handler_port}:"},
    )
    server = spawn(sys.executable, str(program))
    wait_for_connect(server, web_port)
    wait_for_connect(server, handler_port)
    bodies = []
    for port in (web_port, handler_port, web_port):
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/", timeout=WAIT) as reply:
            bodies.append(reply.read().decode())
    assert bodies[0].startswith("twisted.web resource, request #1 ")
    assert bodies[1].startswith("http.server handler, request #2 ")
    assert bodies[2].startswith("twisted.web resource, request #3 ")
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.output()


def test_library_tour_prints_what_the_docs_show() -> None:
    # The library user's tutorial shows library_tour.out as this program's output.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "library_tour.py")],
        capture_output=True,
        text=True,
        timeout=WAIT * 6,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (EXAMPLES / "library_tour.out").read_text()
    assert result.stderr == ""


def test_library_tour_on_the_stdlib_prints_the_same() -> None:
    # The same program on socketserver: one import changed.  Its forking
    # requests run in copies of the server process (os.fork), which has seen
    # the threading server's two requests; ours carry the main script's global
    # as it was when serving started: both count 3.
    ours_import = "import txsocketserver as socketserver\n"
    source = (EXAMPLES / "library_tour.py").read_text()
    assert ours_import in source
    stdlib_source = source.replace(ours_import, "import socketserver\n")
    result = subprocess.run(
        [sys.executable, "-c", stdlib_source],
        capture_output=True,
        text=True,
        timeout=WAIT * 6,
    )
    assert result.returncode == 0, result.stderr
    ours = (EXAMPLES / "library_tour.out").read_text().splitlines()
    theirs = result.stdout.splitlines()
    assert theirs == ours


def test_xmlrpc_server_example_answers_xmlrpc_client(spawn: Spawn) -> None:  # noqa: F811
    # The porting guide shows this server; the stdlib's own client calls it.
    server = spawn(sys.executable, str(EXAMPLES / "xmlrpc_server.py"), "--port", "0")
    port = int(server.wait_for(re.compile(r"XML-RPC on http://127\.0\.0\.1:(\d+)/")).group(1))
    with xmlrpc.client.ServerProxy(f"http://{LOCALHOST}:{port}/") as proxy:
        assert proxy.pow(2, 10) == 1024
        with pytest.raises(xmlrpc.client.Fault):
            proxy.no_such_method()
    assert server.stop(signal.SIGINT) == 0
    assert '"POST / HTTP/1.1" 200' in server.output()
