"""What the published package promises about itself (ours only: no stdlib counterpart).

The built artefacts themselves (sdist, wheel, ``twine check``, a wheel-only
install serving a request) are checked by ``.ci/run`` and
``.ci/check_installed.py``, which need a build and a fresh venv.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import txsocketserver

REPO = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions() -> None:
    assert txsocketserver.__version__ == importlib.metadata.version("txsocketserver")


def test_readme_links_work_on_a_package_index_page() -> None:
    # The README is the long description: a relative link resolves against the
    # index's page there, so every link must be absolute.
    links = re.findall(r"\]\(([^)]*)\)", (REPO / "README.md").read_text())
    assert links
    relative = [link for link in links if not link.startswith("https://")]
    assert relative == []


def test_the_tls_extra_is_what_ssl_endpoints_need() -> None:
    requirements = importlib.metadata.requires("txsocketserver") or []
    tls = [r for r in requirements if 'extra == "tls"' in r]
    assert [r.split(";")[0].strip() for r in tls] == ["twisted[tls]>=23.10"]
