# -*- test-case-name: tests.test_layout -*-
"""The socketserver classes: servers, mixins and request handlers, hook for hook the stdlib's.

What every process imports: the package's public names come from here, and so
does everything a forking server's children load.  So these modules import no
Twisted, ``zope.interface``, ``threading`` or ``typing`` when they are
imported (``typing`` names appear only under ``if TYPE_CHECKING:``); what they
need of the Twisted side (``txsocketserver._twisted``) they import when a
server is made or first serves.  ``tests/test_layout.py`` checks the rule.
See ``docs/architecture.md``.
"""
