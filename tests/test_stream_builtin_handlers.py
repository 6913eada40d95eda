"""The stdlib's own request handlers, unchanged, on our servers.

``http.server``, ``xmlrpc.server`` and ``wsgiref.simple_server`` subclass the
stdlib's ``socketserver.BaseRequestHandler``; the server classes are rebuilt
here on ``ss.TCPServer`` the way the stdlib builds its own.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import os
import shutil
import subprocess
import urllib.request
import wsgiref.simple_server
import xmlrpc.client
import xmlrpc.server

import pytest

from support import ANY_PORT, WAIT, serve_in_thread, sha256

BIG_SIZE = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"<html>sub index</html>\n")
    (root / "big.bin").write_bytes(os.urandom(BIG_SIZE))
    return root


class QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class KeepAliveHTTPHandler(QuietHTTPHandler):
    protocol_version = "HTTP/1.1"


def http_server(ss, handler_class, docroot):
    class Server(ss.ThreadingTCPServer):
        allow_reuse_address = True

    return Server(ANY_PORT, functools.partial(handler_class, directory=str(docroot)))


def url(server, path):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def test_simple_http_server_http10(ss, docroot):
    with http_server(ss, QuietHTTPHandler, docroot) as server, serve_in_thread(server):
        with urllib.request.urlopen(url(server, "/hello.txt"), timeout=WAIT) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "13"
            assert response.read() == b"hello, world\n"
        with urllib.request.urlopen(url(server, "/sub/"), timeout=WAIT) as response:
            assert response.read() == b"<html>sub index</html>\n"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url(server, "/missing"), timeout=WAIT)
        assert info.value.code == 404
        info.value.close()
        conn = http.client.HTTPConnection(*server.server_address, timeout=WAIT)
        try:
            conn.request("GET", "/hello.txt")
            response = conn.getresponse()
            assert response.version == 10
            assert response.read() == b"hello, world\n"
            assert response.will_close
        finally:
            conn.close()


def test_simple_http_server_keep_alive(ss, docroot):
    connections = []

    class Handler(KeepAliveHTTPHandler):
        def setup(self):
            connections.append(self.client_address)
            super().setup()

    with http_server(ss, Handler, docroot) as server, serve_in_thread(server):
        conn = http.client.HTTPConnection(*server.server_address, timeout=WAIT)
        try:
            for path, body in [
                ("/hello.txt", b"hello, world\n"),
                ("/sub/index.html", b"<html>sub index</html>\n"),
                ("/hello.txt", b"hello, world\n"),
            ]:
                conn.request("GET", path)
                response = conn.getresponse()
                assert response.version == 11
                assert not response.will_close
                assert response.read() == body
            conn.request("HEAD", "/big.bin")
            response = conn.getresponse()
            assert response.headers["Content-Length"] == str(BIG_SIZE)
            assert response.read() == b""
            conn.request("GET", "/big.bin")
            assert sha256(conn.getresponse().read()) == sha256((docroot / "big.bin").read_bytes())
        finally:
            conn.close()
    # Every request went over the one connection.
    assert len(connections) == 1


def test_simple_http_server_big_file(ss, docroot):
    expected = sha256((docroot / "big.bin").read_bytes())
    with http_server(ss, QuietHTTPHandler, docroot) as server, serve_in_thread(server):
        with urllib.request.urlopen(url(server, "/big.bin"), timeout=WAIT) as response:
            data = response.read()
    assert len(data) == BIG_SIZE
    assert sha256(data) == expected


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_simple_http_server_with_curl(ss, docroot, tmp_path):
    expected = sha256((docroot / "big.bin").read_bytes())
    with http_server(ss, KeepAliveHTTPHandler, docroot) as server, serve_in_thread(server):
        out = tmp_path / "big.out"
        result = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                "20",
                "--output",
                "/dev/null",
                url(server, "/hello.txt"),
                "--output",
                str(out),
                url(server, "/big.bin"),
                "--write-out",
                "%{http_code} %{num_connects}\n",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    # Two 200s; the second request reused the connection (0 new connects).
    assert result.stdout.decode().split("\n")[:2] == ["200 1", "200 0"]
    assert sha256(out.read_bytes()) == expected


def xmlrpc_server(ss, threaded=False):
    """SimpleXMLRPCServer, rebuilt on ``ss.TCPServer`` the way the stdlib builds it."""

    class RequestHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
        rpc_paths = ("/", "/RPC2")

    base = ss.ThreadingTCPServer if threaded else ss.TCPServer

    class Server(base, xmlrpc.server.SimpleXMLRPCDispatcher):
        allow_reuse_address = True
        _send_traceback_header = False

        def __init__(self, addr, logRequests=False, allow_none=False, encoding=None):
            self.logRequests = logRequests
            xmlrpc.server.SimpleXMLRPCDispatcher.__init__(self, allow_none, encoding)
            base.__init__(self, addr, RequestHandler)

    return Server(ANY_PORT)


@pytest.mark.parametrize("threaded", [False, True], ids=["sync", "threading"])
def test_xmlrpc_server(ss, threaded):
    def divide(a, b):
        return a / b

    with xmlrpc_server(ss, threaded) as server:
        server.register_function(pow)
        server.register_function(lambda *xs: sum(xs), "add")
        server.register_function(divide)
        server.register_introspection_functions()
        server.register_multicall_functions()
        with serve_in_thread(server):
            with xmlrpc.client.ServerProxy(url(server, "/RPC2")) as proxy:
                assert proxy.pow(2, 10) == 1024
                assert proxy.add(1, 2, 3, 4) == 10
                assert "divide" in proxy.system.listMethods()
                with pytest.raises(xmlrpc.client.Fault) as info:
                    proxy.divide(1, 0)
                assert "ZeroDivisionError" in info.value.faultString
                multi = xmlrpc.client.MultiCall(proxy)
                multi.pow(3, 3)
                multi.add(5, 6)
                assert list(multi()) == [27, 11]
                assert proxy.add(*range(1000)) == sum(range(1000))
            with xmlrpc.client.ServerProxy(url(server, "/wrong-path")) as proxy:
                with pytest.raises(xmlrpc.client.ProtocolError) as info:
                    proxy.pow(1, 1)
                assert info.value.errcode == 404


def wsgi_server(ss, app):
    """A WSGIServer (wsgiref.simple_server) rebuilt on ``ss.TCPServer``."""

    class Server(ss.TCPServer):
        allow_reuse_address = True
        application = None

        def server_bind(self):
            # What http.server.HTTPServer and wsgiref's WSGIServer do, minus
            # getfqdn (a DNS lookup in a test).
            super().server_bind()
            host, port = self.server_address[:2]
            self.server_name = host
            self.server_port = port
            self.base_environ = {
                "SERVER_NAME": self.server_name,
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PORT": str(self.server_port),
                "REMOTE_HOST": "",
                "CONTENT_LENGTH": "",
                "SCRIPT_NAME": "",
            }

        def get_app(self):
            return self.application

        def set_app(self, application):
            self.application = application

    class Handler(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    server = Server(ANY_PORT, Handler)
    server.set_app(app)
    return server


def small_app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    reply = json.dumps(
        {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "query": environ["QUERY_STRING"],
            "body": body.decode(),
            "remote": environ["REMOTE_ADDR"],
            "server_port": environ["SERVER_PORT"],
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [reply]


def test_wsgiref_handler(ss):
    with wsgi_server(ss, small_app) as server, serve_in_thread(server):
        port = str(server.server_address[1])
        with urllib.request.urlopen(url(server, "/a/b?x=1"), timeout=WAIT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert json.load(response) == {
                "method": "GET",
                "path": "/a/b",
                "query": "x=1",
                "body": "",
                "remote": "127.0.0.1",
                "server_port": port,
            }
        request = urllib.request.Request(url(server, "/post"), data=b"payload=42")
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            reply = json.load(response)
        assert reply["method"] == "POST" and reply["body"] == "payload=42"
        if shutil.which("curl"):
            result = subprocess.run(
                ["curl", "--silent", "--fail", "--max-time", "10", url(server, "/curl?y=2")],
                capture_output=True,
                timeout=20,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["query"] == "y=2"
