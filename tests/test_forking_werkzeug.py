"""Flask's and werkzeug's forking servers, stdlib vs txsocketserver, driven by curl.

Each scenario is a program run twice in a fresh interpreter: once on the
stdlib, once with ``sys.modules["socketserver"] = txsocketserver`` set before
werkzeug is imported (the only way to move werkzeug onto us without editing
it).  curl talks to both (``--raw``: the chunked framing is compared too),
and what it prints must be the same, Date headers aside.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flask")

WAIT = 30.0
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

# The program's binding, as gevent-style patching makes it: before anything
# imports socketserver.
PREAMBLE = """
    import os, sys
    sys.path.insert(0, {src!r})
    if sys.argv[1] == "tx":
        import txsocketserver
        sys.modules["socketserver"] = txsocketserver
"""

# A Flask application in the main script, run the way Flask's docs say
# (threaded=False: Flask's own default, threaded=True, refuses processes=2
# on the stdlib too).
FLASK_MAIN = (
    PREAMBLE
    + """
    from flask import Flask, Response, request

    app = Flask(__name__)
    VISITS = []  # changed by each request, in its own process only

    @app.route("/")
    def index():
        VISITS.append(1)
        return f"hello from a child: {{os.getpid() != PARENT}}, visits {{len(VISITS)}}\\n"

    @app.route("/stream")
    def stream():
        return Response(f"line {{n}}\\n" for n in range(3))

    @app.route("/echo", methods=["POST"])
    def echo():
        return request.get_data()[::-1]

    @app.route("/fail")
    def fail():
        raise ValueError("failing on purpose")

    PARENT = os.getpid()
    if __name__ == "__main__":
        import logging
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        sys.stderr.write("PORT %d\\n" % 0)  # placeholder, replaced below
"""
)


def _flask_main(processes_line: str) -> str:
    return FLASK_MAIN.replace(
        '        sys.stderr.write("PORT %d\\n" % 0)  # placeholder, replaced below\n',
        processes_line,
    )


APP_RUN = _flask_main(
    "        from werkzeug import serving\n"
    "        make_server = serving.make_server\n"
    "        def announce(*args, **kwargs):\n"
    "            server = make_server(*args, **kwargs)\n"
    '            print("PORT", server.server_address[1], flush=True)\n'
    "            return server\n"
    "        serving.make_server = announce\n"
    '        app.run(host="127.0.0.1", port=0, processes=2, threaded=False)\n'
)

# werkzeug's ForkingWSGIServer made directly, with an application that no
# module holds by name (made in a function).
FACTORY = (
    PREAMBLE
    + """
    from flask import Flask
    from werkzeug.serving import ForkingWSGIServer, make_server

    def create_app():
        app = Flask("factory")

        @app.route("/")
        def index():
            return "made in a factory\\n"

        return app

    if __name__ == "__main__":
        if sys.argv[2:] == ["server"]:
            ForkingWSGIServer.fork_from = "server"
        server = make_server("127.0.0.1", 0, create_app(), processes=2)
        print("PORT", server.server_address[1], flush=True)
        server.serve_forever()
"""
)

# An application in an importable module, served by werkzeug from a script.
MODULE_APP = """
    import os
    from flask import Flask

    app = Flask(__name__)

    @app.route("/")
    def index():
        return "from a module\\n"
"""

MODULE_SERVER = (
    PREAMBLE
    + """
    from werkzeug.serving import make_server
    import module_app

    if __name__ == "__main__":
        server = make_server("127.0.0.1", 0, module_app.app, processes=2)
        print("PORT", server.server_address[1], flush=True)
        server.serve_forever()
"""
)


@contextlib.contextmanager
def running(script: Path, *args: str) -> Iterator[tuple[int, list[str]]]:
    """Run *script* with *args*; yield its port and, once it has stopped
    (SIGINT, as Ctrl-C), a list holding its stderr."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=script.parent,
    )
    errors: list[str] = []
    try:
        line = " "
        while line and not line.startswith("PORT "):  # Flask says more first
            line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.communicate(timeout=WAIT)[1]
        yield int(line.split()[1]), errors
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        errors.append(err)


def curl(port: int, *requests: list[str]) -> str:
    """What curl prints for *requests*, one after the other on one connection
    (HTTP/1.1 keep-alive), headers and raw body; Date headers dropped."""
    command = ["curl"]
    for index, request in enumerate(requests):
        if index:
            command.append("--next")  # which resets the options
        command += ["-sS", "--raw", "-i", "--max-time", str(WAIT), *request[1:]]
        command.append(f"http://127.0.0.1:{port}{request[0]}")
    output = subprocess.run(command, capture_output=True, timeout=WAIT * 2)
    assert output.returncode == 0, output.stderr
    return re.sub(r"(?m)^Date: .*\r\n", "", output.stdout.decode())


def both(tmp_path: Path, source: str, *args: str, ask: list[list[str]]) -> dict[str, tuple]:
    script = tmp_path / "server_main.py"
    script.write_text(textwrap.dedent(source.format(src=SRC)))
    results = {}
    for which in ("stdlib", "tx"):
        with running(script, which, *args) as (port, errors):
            replies = [curl(port, *requests) for requests in ask]
        results[which] = (replies, errors[0])
    return results


def test_flask_app_run_with_processes(tmp_path):
    results = both(
        tmp_path,
        APP_RUN,
        ask=[
            [["/"]],
            [["/stream"]],
            [["/echo", "--data-binary", "olleh"]],
            [["/fail"]],
            # Keep-alive: two requests on one connection, in one child.
            [["/"], ["/stream"]],
        ],
    )
    stdlib, ours = results["stdlib"][0], results["tx"][0]
    assert stdlib[0].startswith("HTTP/1.1 200 OK\r\n")
    assert "hello from a child: True, visits 1\n" in stdlib[0]
    assert "Transfer-Encoding: chunked\r\n" in stdlib[1]
    assert "\r\n7\r\nline 0\n\r\n" in stdlib[1]
    assert stdlib[2].endswith("hello")
    assert stdlib[3].startswith("HTTP/1.1 500 INTERNAL SERVER ERROR\r\n")
    assert stdlib[4].count("HTTP/1.1 200 OK") == 2
    assert ours == stdlib
    # Both print the failing request's traceback; ours nothing else.
    assert "ValueError: failing on purpose" in results["tx"][1]
    assert "Warning" not in results["tx"][1], results["tx"][1]


def test_werkzeug_app_from_an_importable_module(tmp_path):
    (tmp_path / "module_app.py").write_text(textwrap.dedent(MODULE_APP))
    results = both(tmp_path, MODULE_SERVER, ask=[[["/"]], [["/"], ["/"]]])
    assert results["stdlib"][0][0].startswith("HTTP/1.1 200 OK\r\n")
    assert results["stdlib"][0][0].endswith("from a module\n")
    assert results["tx"][0] == results["stdlib"][0]
    assert "Warning" not in results["tx"][1], results["tx"][1]


def test_an_app_no_module_holds_is_named_in_a_warning(tmp_path):
    # Ours only: the stdlib's child is a copy of the server process; ours
    # gets what pickles or can be found by name, and says what it cannot.
    script = tmp_path / "factory.py"
    script.write_text(textwrap.dedent(FACTORY.format(src=SRC)))
    with running(script, "tx") as (port, errors):
        first = curl(port, ["/"])
        second = curl(port, ["/"])
    assert first.startswith("HTTP/1.1 500 INTERNAL SERVER ERROR\r\n"), first
    assert second.startswith("HTTP/1.1 500 INTERNAL SERVER ERROR\r\n"), second
    warning = [line for line in errors[0].splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1, errors[0]
    assert "server attribute 'app' (a flask.app.Flask)" in warning[0]
    assert "does not pickle" in warning[0]
    assert 'fork_from = "server"' in warning[0]


def test_fork_from_server_serves_what_cannot_be_carried(tmp_path):
    results = both(tmp_path, FACTORY, "server", ask=[[["/"]], [["/"], ["/"]]])
    assert results["stdlib"][0][0].startswith("HTTP/1.1 200 OK\r\n")
    assert results["stdlib"][0][0].endswith("made in a factory\n")
    assert results["tx"][0] == results["stdlib"][0]
    assert "Warning" not in results["tx"][1], results["tx"][1]
