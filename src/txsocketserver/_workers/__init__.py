# -*- test-case-name: tests.test_workers -*-
"""Workers: several processes serving the same listening sockets, supervised.

``bound_sockets`` makes the supervisor's sockets from ``--listen`` descriptions,
``supervisor`` holds the :class:`~txsocketserver.Workers` service (start,
replace, reload, recycle, stop the workers), ``worker`` is the worker
process's entry point, and ``exclusive_accept`` spreads the connections of a
shared socket evenly over the workers.  Operators' view: ``docs/operations.md``.

Nothing is imported here: a worker process starts as
``python -m txsocketserver._workers.worker``, and must set up its
environment before anything imports Twisted (see ``worker``).
"""
