"""The forking scenarios' classes on txsocketserver (see ``forking_classes``)."""

from __future__ import annotations

import txsocketserver
from forking_classes import CpuBoundEcho, LineEcho, Settings


class Server(Settings, txsocketserver.ForkingTCPServer):
    pass


class LineEchoHandler(LineEcho, txsocketserver.StreamRequestHandler):
    pass


class CpuBoundEchoHandler(CpuBoundEcho, txsocketserver.StreamRequestHandler):
    pass


HANDLERS = {"echo": LineEchoHandler, "cpu": CpuBoundEchoHandler}
