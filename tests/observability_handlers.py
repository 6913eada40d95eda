"""Handlers the observability tests serve (imported by worker processes, by name)."""

from __future__ import annotations

import socketserver


class LineHandler(socketserver.StreamRequestHandler):
    """Per line: ``ok``; a line starting ``fail`` makes the handler raise
    with the line as its message (which a client controls)."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.startswith(b"fail"):
                raise ValueError(line.decode("utf-8", "replace"))
            self.wfile.write(b"ok\n")
            self.wfile.flush()
