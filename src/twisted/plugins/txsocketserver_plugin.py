# -*- test-case-name: tests.test_twistd_cli -*-
"""The ``twistd socketserver`` plugin: serve a socketserver handler class.

``twistd -n socketserver --listen tcp:8000 --handler http.server:SimpleHTTPRequestHandler``

Deliberately tiny: ``twistd`` imports every plugin module to list them, so the
options and the service live in ``txsocketserver._cli``, imported only when
this plugin is used.  No ``__init__.py`` exists in ``twisted/`` or
``twisted/plugins/`` here: they are namespace portions merged with Twisted's.
"""

from twisted.application.service import ServiceMaker

socketserver = ServiceMaker(
    "txsocketserver",
    "txsocketserver._cli",
    "Serve a socketserver request handler class (e.g. http.server:SimpleHTTPRequestHandler) "
    "on any Twisted endpoint, with txsocketserver.",
    "socketserver",
)
