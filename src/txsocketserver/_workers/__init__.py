"""Workers: several processes serving the same listening sockets, supervised.

``_listeners`` makes the supervisor's sockets from ``--listen`` descriptions,
``_supervisor`` holds the :class:`~txsocketserver.Workers` service (start,
replace, reload, recycle, stop the workers), and ``_worker`` is the worker
process's entry point.  Operators' view: ``docs/operations.md``.

Nothing is imported here: a worker process starts as
``python -m txsocketserver._workers._worker``, and must set up its
environment before anything imports Twisted (see ``_worker``).
"""
