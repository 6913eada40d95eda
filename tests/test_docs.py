"""The documentation's Python snippets (ours only: it documents this package).

Whole programs in the docs are included from ``examples/``, which
``test_examples.py`` runs.  The fragments written inline (a class to adapt,
a ``.tac`` excerpt) are checked here: each one compiles, and every
``txsocketserver`` name it uses exists, so renaming or removing a public name
fails here rather than in a reader's hands.  The site itself is built, with
warnings as errors, by ``docs/build.py`` in ``.ci/run``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import txsocketserver

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```", re.M | re.S)
OURS = ("import txsocketserver as socketserver", "import txsocketserver\n")


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts:
            continue
        for match in FENCE.finditer(page.read_text()):
            found.append((page.relative_to(DOCS).as_posix(), textwrap.dedent(match["code"])))
    return found


SNIPPETS = snippets()


def test_the_docs_have_snippets() -> None:
    assert len(SNIPPETS) >= 10


@pytest.mark.parametrize(
    ("page", "code"), SNIPPETS, ids=[f"{page}-{i}" for i, (page, _) in enumerate(SNIPPETS)]
)
def test_snippet_compiles_and_uses_real_names(page: str, code: str) -> None:
    compile(code, page, "exec")
    uses_ours = any(form in code + "\n" for form in OURS) or "txsocketserver." in code
    if not uses_ours:
        return
    prefix = "socketserver" if OURS[0] in code else "txsocketserver"
    names = set(re.findall(rf"\b{prefix}\.([A-Za-z_]\w*)", code))
    names |= set(re.findall(r"\btxsocketserver\.([A-Za-z_]\w*)", code))
    missing = sorted(name for name in names if not hasattr(txsocketserver, name))
    assert missing == [], f"{page} uses names txsocketserver does not have"
