"""Sphinx configuration of txsocketserver's documentation site.

Build it with ``python docs/build.py`` (see there): warnings are errors,
references are checked (nitpicky), and internal links are checked afterwards.
"""

from __future__ import annotations

import sys
from importlib.metadata import version as installed_version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "txsocketserver"
author = "the txsocketserver authors"
copyright = "the txsocketserver authors (MIT licence)"
release = installed_version("txsocketserver")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.graphviz",
    "txsocketserver_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
# Markdown links to headings (``page.md#a-heading``) are checked like references.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

nitpicky = True

# The docstrings are Google style ("Args:", "Returns:") with sections of ours.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [
    ("Resource handling", "notes_style"),
    ("Error handling", "notes_style"),
    ("Raises", "notes_style"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Our public classes live in private modules and are re-exported: name them as
# a user imports them, so the reference and the links say ``txsocketserver.X``.
add_module_names = True

# The real sites' addresses, so rendered links go there, read from inventory
# files made offline (``docs/build.py``): the build machine need not reach them.
# Where a local file is missing, Sphinx falls back to fetching the site's own.
INVENTORIES = HERE / "_build" / "inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", (str(INVENTORIES / "python.inv"), None)),
    "twisted": (
        "https://docs.twisted.org/en/stable/api/",
        (str(INVENTORIES / "twisted.inv"), None),
    ),
}
intersphinx_timeout = 10

html_theme = "furo"
html_title = f"txsocketserver {release}"
html_static_path: list[str] = []
graphviz_output_format = "svg"
