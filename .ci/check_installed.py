"""Check an installed (not editable) txsocketserver, as a new user meets it.

Run with the Python of a fresh venv where only the wheel is installed (no
extras): ``VENV/bin/python .ci/check_installed.py``.  Checks that

1. the version the package reports is the installed distribution's;
2. ``twistd --help`` lists the ``socketserver`` plugin;
3. ``twistd -n socketserver`` serves one request (the stdlib's
   ``SimpleHTTPRequestHandler``, fetched with ``urllib``) and stops on SIGTERM;
4. an ``ssl:`` endpoint without the ``tls`` extra fails with a message naming
   ``txsocketserver[tls]``.

Every wait is bounded; the server is killed whatever happens.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
WAIT = 30.0


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"check_installed: FAILED: {message}")
    print(f"check_installed: ok: {message}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*command: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT, cwd=cwd)


def check_version() -> None:
    import txsocketserver

    installed = importlib.metadata.version("txsocketserver")
    check(
        txsocketserver.__version__ == installed,
        f"txsocketserver.__version__ {txsocketserver.__version__} is the installed {installed}",
    )
    check(
        "site-packages" in txsocketserver.__file__,
        f"imported from the installed wheel ({txsocketserver.__file__})",
    )


def check_twistd_help() -> None:
    result = run(str(BIN / "twistd"), "--help")
    check(
        result.returncode == 0 and "socketserver" in result.stdout,
        "twistd --help lists the socketserver plugin",
    )


def check_serves_one_request(directory: str) -> None:
    Path(directory, "hello.txt").write_text("served by the installed plugin\n")
    port = free_port()
    log = Path(directory, "twistd.out")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                "socketserver",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--handler",
                "http.server:SimpleHTTPRequestHandler",
            ],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + WAIT
        body = None
        while body is None:
            try:
                url = f"http://127.0.0.1:{port}/hello.txt"
                with urllib.request.urlopen(url, timeout=WAIT) as reply:
                    body = reply.read().decode()
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"check_installed: FAILED: no server on {port}:\n{log.read_text()}")
                time.sleep(0.1)
        check(body == "served by the installed plugin\n", "twistd socketserver served a request")
        server.send_signal(signal.SIGTERM)
        status = server.wait(WAIT)
        output = log.read_text()
        check(
            status in (0, -signal.SIGTERM) and "stopped serving" in output,
            f"it stopped on SIGTERM (status {status})",
        )
        check("Traceback" not in output, "without a traceback")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def check_tls_extra_message(directory: str) -> None:
    try:
        import OpenSSL  # noqa: F401
    except ImportError:
        pass
    else:
        print("check_installed: skipped the ssl: message check: pyOpenSSL is installed here")
        return
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=directory,
        capture_output=True,
        timeout=WAIT,
        check=True,
    )
    result = run(
        str(BIN / "python"),
        "-m",
        "txsocketserver",
        "--listen",
        "ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem",
        "--handler",
        "http.server:SimpleHTTPRequestHandler",
        cwd=directory,
    )
    check(
        result.returncode == 2 and "pip install 'txsocketserver[tls]'" in result.stderr,
        f"ssl: without the tls extra says to install it: {result.stderr.strip()!r}",
    )


def main() -> None:
    os.environ.pop("PYTHONPATH", None)
    check_version()
    check_twistd_help()
    with tempfile.TemporaryDirectory() as directory:
        check_serves_one_request(directory)
        check_tls_extra_message(directory)


if __name__ == "__main__":
    main()
