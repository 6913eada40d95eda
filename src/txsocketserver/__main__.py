"""``python -m txsocketserver``: serve a handler class without ``twistd``.

    python -m txsocketserver --listen tcp:8000 --handler http.server:SimpleHTTPRequestHandler

The options are those of ``twistd socketserver`` (``--help`` lists them).  The
server runs ``serve_forever()`` in the main thread, in the blocking world.
SIGTERM or Ctrl-C stops it gracefully (stop accepting, drain the requests in
flight for up to ``--drain-timeout`` seconds, close); a second Ctrl-C stops it
at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from twisted.python import usage

from txsocketserver._cli import Options, build_server, build_workers, describe, describe_workers
from txsocketserver._service import stop_gracefully

PROG = "python -m txsocketserver"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, serve until SIGTERM/SIGINT, return the exit status."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
        if options["workers"] is not None:
            workers = build_workers(options)
        else:
            server = build_server(options)
    except usage.UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        print(f"{PROG}: try --help", file=sys.stderr)
        return 2
    if options["workers"] is not None:
        from txsocketserver._workers._supervisor import run_workers

        return run_workers(workers, describe=describe_workers(options, workers))

    stopping: list[threading.Thread] = []
    serving = threading.current_thread()

    def stop(signum: int, frame: FrameType | None) -> None:
        if stopping:
            raise KeyboardInterrupt  # second signal: stop now
        print(f"{PROG}: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        # The drain waits for serve_forever, which runs in this very thread:
        # it has to happen in another one.
        stopper = threading.Thread(
            target=stop_gracefully,
            args=(server,),
            kwargs={"drain_timeout": options["drain-timeout"], "serving": serving},
            name="txsocketserver-stop",
        )
        stopping.append(stopper)
        stopper.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{PROG}: {describe(options, server)}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
        return 130
    except OSError:
        # serve_forever fails once the stopper closed the server under a
        # loop that did not leave in time: the stop itself reports on that.
        if not stopping:
            raise
    if stopping:
        stopping[0].join()
    else:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
