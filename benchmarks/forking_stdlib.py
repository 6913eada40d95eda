"""The forking scenarios' classes on the stdlib's socketserver (see ``forking_classes``)."""

from __future__ import annotations

import socketserver

from forking_classes import CpuBoundEcho, LineEcho, Settings


class Server(Settings, socketserver.ForkingTCPServer):
    pass


class LineEchoHandler(LineEcho, socketserver.StreamRequestHandler):
    pass


class CpuBoundEchoHandler(CpuBoundEcho, socketserver.StreamRequestHandler):
    pass


HANDLERS = {"echo": LineEchoHandler, "cpu": CpuBoundEchoHandler}
