# -*- test-case-name: tests.test_layout -*-
"""The reactor side: what a server made in this process uses to wait, accept and serve.

The reactor bridge, the strategies behind the socketserver hooks (listeners,
readiness, connection security, the thread pool; their roles in
``interfaces``), the socket facade over Twisted transports, services, and
Twisted's private API in ``compat``.  Loaded when a server is made, never by
a forking server's child.  See ``docs/architecture.md``.
"""
