"""The stdlib's XML-RPC server, rebuilt on txsocketserver the way the stdlib builds it.

    python examples/xmlrpc_server.py --port 8000
    python -c "import xmlrpc.client as x; print(x.ServerProxy('http://127.0.0.1:8000').pow(2, 8))"

``xmlrpc.server.SimpleXMLRPCServer`` is the stdlib's ``TCPServer`` plus a
dispatcher; the same two pieces on txsocketserver's ``ThreadingTCPServer``
give the same server on Twisted.  The stdlib's request handler is used as it is.
"""

from __future__ import annotations

import argparse
import xmlrpc.server

import txsocketserver


class XMLRPCServer(txsocketserver.ThreadingTCPServer, xmlrpc.server.SimpleXMLRPCDispatcher):
    allow_reuse_address = True

    def __init__(self, address, handler=xmlrpc.server.SimpleXMLRPCRequestHandler):
        self.logRequests = True  # read by the stdlib's handler
        xmlrpc.server.SimpleXMLRPCDispatcher.__init__(self, allow_none=False, encoding=None)
        txsocketserver.ThreadingTCPServer.__init__(self, address, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with XMLRPCServer(("127.0.0.1", args.port)) as server:
        server.register_function(pow)
        print(f"XML-RPC on http://127.0.0.1:{server.server_address[1]}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
