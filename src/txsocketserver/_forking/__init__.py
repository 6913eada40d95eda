# -*- test-case-name: tests.test_forking -*-
"""ForkingMixIn's machinery: the server process's dispatcher, the template and its workers.

``dispatcher`` runs in the server process (it needs Twisted's
``spawnProcess``); ``template`` is the program of the template process and of
the workers it forks, and imports nothing of Twisted.  See
``docs/architecture.md``.
"""
