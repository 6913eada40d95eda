"""Async handlers: ``async def handle`` on the reactor, no thread per connection.

Theory of operation
===================

A server whose ``RequestHandlerClass`` derives from ``AsyncBaseRequestHandler``
serves every request on the reactor thread: here, and only here, the server
*is* a Twisted factory (``serving.ServerFactory``) and each connection a
protocol (``protocol.Connection``) whose handler coroutine a
``task.HandlerTask`` drives.  Nothing runs on a thread of ours; blocking work
goes to ``server.to_thread`` (a pool of its own).

Who accepts:

* A server on its own socket (a ``(host, port)`` or path, ``tcp:``,
  ``tcp6:``, ``unix:``): the stdlib hooks bind and listen as for any server;
  while it serves, the reactor watches the listening socket, calls
  ``get_request()`` (the socket is non-blocking meanwhile), and adopts each
  accepted socket into a Twisted transport built by the server's factory.
  Datagram servers take each datagram the same way, with no transport.
* A server on any other endpoint (``ssl:``, where Twisted does the TLS on the
  reactor; ``systemd:``, ``haproxy:``, endpoint objects): the endpoint listens
  with the server's factory, and its port accepts only while the server serves.

Then, on the reactor thread, per connection: ``verify_request`` (a refusal
goes to ``shutdown_request``), ``process_request`` → ``finish_request`` (which
instantiates the handler) → the handler's ``setup``/``handle``/``finish``
coroutine; an exception goes to ``handle_error`` (inside the ``except``, so it
is current), then ``shutdown_request`` → ``close_request`` close the
connection once what was written has been sent.

The serving loop (``serve_forever``/``handle_request``, in the caller's thread,
or a ``ServerService``'s) keeps its stdlib shape: its readiness
(``serving.AsyncReadiness``) turns the reactor's accepting on for as long as
the loop runs and only sleeps until ``shutdown()`` (``service_actions`` still
runs every ``poll_interval``); ``handle_request()`` accepts one request.
Outside a serving call nobody accepts, so clients wait in the kernel backlog.

Limits: at ``max_connections`` open connections (datagram handlers running) the
reactor stops accepting, and resumes when one ends; a connection with no
progress either way for ``idle_timeout`` seconds is aborted and logged.
``server_close()`` cancels the handlers still running (``CancelledError`` at
their ``await``; ``finish()`` still runs); a graceful stop
(``ServerService``, the CLI) first lets them finish for the drain timeout.

Only the handler classes (``handlers``) are imported with the package; the
rest needs Twisted and loads when a server with an async handler is created.
"""

from txsocketserver._async.handlers import (
    AsyncBaseRequestHandler,
    AsyncDatagramRequestHandler,
    AsyncStreamRequestHandler,
    is_async_handler,
)

__all__ = [
    "AsyncBaseRequestHandler",
    "AsyncDatagramRequestHandler",
    "AsyncStreamRequestHandler",
    "is_async_handler",
]
