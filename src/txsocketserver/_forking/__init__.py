# -*- test-case-name: tests.test_forking -*-
"""ForkingMixIn's machinery: the server process's dispatcher, the template and its children.

``dispatcher`` runs in the server process (it needs Twisted's
``spawnProcess``); ``template`` is the program of the template process and of
the children it forks, and imports nothing of Twisted.  See
``docs/architecture.md``.
"""
