# -*- test-case-name: tests.test_observability -*-
"""Observability: metrics, liveness and readiness, and the access log.

``stats`` (the counts, Twisted-free), ``exposition`` (as Prometheus metric
families), ``metrics`` (``Metrics``, the public face; attaching observers to a
server), ``health`` (readiness and the moment a stop begins), ``http`` (the
``--metrics`` endpoint), ``access_log`` (the access log and the text and JSON
log formats), ``cli`` (what the command line's options turn into).
"""
