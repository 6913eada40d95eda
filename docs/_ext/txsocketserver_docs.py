"""Sphinx directives that generate txsocketserver's reference pages from the code.

Nothing in the reference is copied by hand, so it cannot drift:

``.. txsocketserver-api::``
    Every name in ``txsocketserver.__all__``, in that order: its autodoc entry
    and, for the names ``socketserver`` has, what differs from the stdlib's
    class (members only one side has, defaults and signatures that differ),
    found by comparing the two classes at build time.  ``:names: stdlib`` or
    ``:names: beyond`` picks one of the two groups.

``.. txsocketserver-api-summary::``
    A table of the same names: ours, the stdlib's counterpart, the first line
    of the docstring.

``.. usage-options:: package.module:Options`` (``:program:`` the command)
    The options of a Twisted ``usage.Options`` parser as ``.. option::``
    entries (so ``:option:`` references work), with synopsis, description and
    defaults, read from a parser instance.

``.. benchmark-table:: PATH.json``
    The medians and per-round ratio ranges of a benchmark run written by
    ``benchmarks/run.py --json`` (the run the performance charts are drawn
    from), with where and when it ran.

``.. twistd-plugin-options:: TAPNAME``
    The same for the options of the ``twistd`` plugin registered as
    ``TAPNAME``, found the way ``twistd`` finds it (``IServiceMaker`` plugins).

The directives produce reStructuredText and parse it, so use them from
``.rst`` pages (or a MyST ``{eval-rst}`` block).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import socketserver
import statistics
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

PACKAGE = "txsocketserver"

# socketserver names newer than our oldest supported Python (3.10): they have a
# stdlib counterpart even when the docs are built on a Python that lacks them.
STDLIB_NAMES_SINCE = {"ForkingUnixStreamServer": "3.12", "ForkingUnixDatagramServer": "3.12"}


def public_names() -> list[str]:
    return list(importlib.import_module(PACKAGE).__all__)


def stdlib_counterpart(name: str) -> Any:
    """The stdlib object of that name on the building Python, else None."""
    if name in socketserver.__all__:
        return getattr(socketserver, name)
    return None


def has_stdlib_counterpart(name: str) -> bool:
    return name in socketserver.__all__ or name in STDLIB_NAMES_SINCE


def stdlib_reference(env: Any, name: str, role: str = "class", *, short: bool = False) -> str:
    """A link to ``socketserver.NAME`` in Python's docs, if they document it
    (they name some classes only in prose), else the name as literal text."""
    from sphinx.ext.intersphinx import InventoryAdapter

    target = f"socketserver.{name}"
    inventory = InventoryAdapter(env).main_inventory
    if any(target in inventory.get(f"py:{kind}", {}) for kind in ("class", "function")):
        return f":py:{role}:`{'~' if short else ''}{target}`"
    return f"``{name if short else target}``"


def first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def public_attributes(cls: type) -> dict[str, Any]:
    """Public names a class has (its own and inherited, and the constructor),
    without object's."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        for key, value in vars(klass).items():
            if not key.startswith("_") or key == "__init__":
                found[key] = value
    return found


def signature_of(value: Any) -> str | None:
    function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
    if not callable(function):
        return None
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    # Compare parameters, not annotations: the stdlib has none.
    return "(" + ", ".join(_parameter(p) for p in signature.parameters.values()) + ")"


def _parameter(parameter: inspect.Parameter) -> str:
    text = parameter.name
    if parameter.kind is parameter.VAR_POSITIONAL:
        text = "*" + text
    elif parameter.kind is parameter.VAR_KEYWORD:
        text = "**" + text
    if parameter.default is not parameter.empty:
        text += "=" + repr(parameter.default)
    return text


def literal(text: str) -> str:
    return "``" + text.replace("`", "\\`") + "``" if text else "—"


def differences(ours: type, stdlib: type) -> list[tuple[str, str, str]]:
    """(member, the stdlib's, ours) for every public member that differs."""
    rows = []
    mine, theirs = public_attributes(ours), public_attributes(stdlib)
    for name in sorted(set(mine) | set(theirs)):
        member = f"``{name}``"
        if name not in theirs:
            rows.append((member, "—", _describe(mine[name])))
        elif name not in mine:
            rows.append((member, _describe(theirs[name]), "—"))
        else:
            a, b = theirs[name], mine[name]
            sig_a, sig_b = signature_of(a), signature_of(b)
            if sig_a is not None or sig_b is not None:
                if sig_a != sig_b:
                    rows.append((member, literal(sig_a or ""), literal(sig_b or "")))
            elif not isinstance(a, type) and a != b:
                rows.append((member, literal(repr(a)), literal(repr(b))))
    return rows


def _describe(value: Any) -> str:
    signature = signature_of(value)
    if signature is not None:
        return literal(signature)
    if isinstance(value, property):
        return "a property"
    return literal(repr(value))


def list_table(header: Iterable[str], rows: Iterable[Iterable[str]], widths: str) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [list(header), *map(list, rows)]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return lines + [""]


class GeneratedRst(SphinxDirective):
    """A directive whose output is reStructuredText it writes itself."""

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        source = self.get_source_info()[0]
        content = StringList()
        for line in self.lines():
            content.append(line, source)
        self.state.nested_parse(content, self.content_offset, container, match_titles=True)
        return container.children


def selected_names(group: str | None) -> list[str]:
    names = public_names()
    if group == "stdlib":
        return [n for n in names if has_stdlib_counterpart(n)]
    if group == "beyond":
        return [n for n in names if not has_stdlib_counterpart(n)]
    return names


GROUP_OPTION = {"names": lambda arg: directives.choice(arg, ("stdlib", "beyond"))}


class ApiSummary(GeneratedRst):
    option_spec = GROUP_OPTION

    def lines(self) -> list[str]:
        package = importlib.import_module(PACKAGE)
        rows = []
        for name in selected_names(self.options.get("names")):
            obj = getattr(package, name)
            role = "class" if isinstance(obj, type) else "func"
            if has_stdlib_counterpart(name):
                since = STDLIB_NAMES_SINCE.get(name)
                stdlib = stdlib_reference(self.env, name, role, short=True)
                if since is not None:
                    stdlib += f" (Python {since}+)"
            else:
                stdlib = "— (ours only)"
            rows.append((f":py:{role}:`~{PACKAGE}.{name}`", stdlib, first_line(obj)))
        return list_table(("txsocketserver", "socketserver", "what it is"), rows, "auto")


class ApiReference(GeneratedRst):
    option_spec = GROUP_OPTION

    def lines(self) -> list[str]:
        package = importlib.import_module(PACKAGE)
        out: list[str] = []
        for name in selected_names(self.options.get("names")):
            obj = getattr(package, name)
            if isinstance(obj, type):
                out += [f".. autoclass:: {PACKAGE}.{name}", "   :members:", "   :undoc-members:"]
                out += ["   :show-inheritance:", ""]
                out += self.comparison(name, obj)
            else:
                out += [f".. autofunction:: {PACKAGE}.{name}", ""]
        return out

    def comparison(self, name: str, ours: type) -> list[str]:
        if not has_stdlib_counterpart(name):
            return []
        stdlib = stdlib_counterpart(name)
        indent = "   "
        if stdlib is None:
            since = STDLIB_NAMES_SINCE[name]
            return [
                f"{indent}**Compared with** ``socketserver.{name}``: the stdlib has it from "
                f"Python {since}; txsocketserver on every supported Python.",
                "",
            ]
        rows = differences(ours, stdlib)
        python = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if not rows:
            return [
                f"{indent}**Compared with** {stdlib_reference(self.env, name)} (Python {python}): "
                "the same public members, defaults and signatures.",
                "",
            ]
        heading = [
            f"{indent}**Compared with** {stdlib_reference(self.env, name)} (Python {python}): "
            "the public members that differ (— : not there).",
            "",
        ]
        table = list_table(("member", "socketserver", "txsocketserver"), rows, "25 35 40")
        return heading + [indent + line if line else "" for line in table]


def option_entries(options: Any, program: str) -> list[str]:
    """``.. option::`` entries for a ``usage.Options`` instance."""
    shorts: dict[str, str] = {}
    for alias, canonical in options.synonyms.items():
        if len(alias) == 1:
            shorts[canonical] = alias
    out = [f".. program:: {program}", ""]
    for spec in options.longOpt:
        takes_value = spec.endswith("=")
        name = spec.rstrip("=")
        metavar = f" <{name}>" if takes_value else ""
        forms = [f"--{name}{'=' + metavar.strip() if takes_value else ''}"]
        if name in shorts:
            forms.insert(0, f"-{shorts[name]}{metavar}")
        out.append(f".. option:: {', '.join(forms)}")
        out.append("")
        doc = " ".join(inspect.cleandoc(options.docs.get(name) or "").split())
        out.append(textwrap.indent(help_text(doc) or "(undocumented)", "   "))
        default = options.defaults.get(name)
        if takes_value and default is not None:
            out += ["", f"   Default: ``{default}``."]
        out.append("")
    return out


def escape(text: str) -> str:
    """Plain text as reStructuredText (no markup meant)."""
    for char in ("\\", "*", "`", "|", "_"):
        text = text.replace(char, "\\" + char)
    return text


# In help text: option names (``--drain-timeout``) and anything with a colon
# (``tcp:8000``, ``package.module:Class``) are code.  Left as text, docutils
# would make ``--`` a dash and ``tcp:8000`` a link to nowhere.
CODE_TOKEN = re.compile(r"(?<![\w`])(--?[A-Za-z][\w-]*|[\w.+/-]*:[^\s,()]*[^\s,().;:])")


def help_text(text: str) -> str:
    """Help text as reStructuredText: its code tokens as literals."""
    out, last = [], 0
    for match in CODE_TOKEN.finditer(text):
        out.append(escape(text[last : match.start()]))
        # A literal must not run straight into a word character.
        joined = match.end() < len(text) and text[match.end()].isalnum()
        out.append(f"``{match.group(1)}``" + ("\\ " if joined else ""))
        last = match.end()
    out.append(escape(text[last:]))
    return "".join(out)


def options_page(options: Any, program: str) -> list[str]:
    out = []
    synopsis = getattr(options, "synopsis", None)
    if synopsis:
        usage = synopsis if synopsis.startswith("Usage:") else f"Usage: {program} {synopsis}"
        out += [".. code-block:: text", "", "   " + usage, ""]
    longdesc = " ".join((getattr(options, "longdesc", "") or "").split())
    if longdesc:
        out += [help_text(longdesc), ""]
    return out + option_entries(options, program)


class UsageOptions(GeneratedRst):
    required_arguments = 1
    option_spec = {"program": directives.unchanged_required}

    def lines(self) -> list[str]:
        module_name, _, class_name = self.arguments[0].partition(":")
        options_class = getattr(importlib.import_module(module_name), class_name)
        return options_page(options_class(), self.options["program"])


class TwistdPluginOptions(GeneratedRst):
    required_arguments = 1

    def lines(self) -> list[str]:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        tapname = self.arguments[0]
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == tapname]
        if not makers:
            raise self.error(f"no twistd plugin {tapname!r} is installed")
        maker = makers[0]
        out = [help_text(maker.description), ""]
        return out + options_page(maker.options(), f"twistd {tapname}")


INTERFACE_REPR = re.compile(r"<InterfaceClass ([\w.]+)>")


def plain_interface_names(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
    """Annotations naming a ``zope.interface`` interface (Twisted's
    ``IStreamServerEndpoint``...) show as its dotted name, which intersphinx
    resolves, instead of the interface's repr."""

    def plain(text: str | None) -> str | None:
        return INTERFACE_REPR.sub(r"\1", text) if text else text

    return plain(signature), plain(return_annotation)


def _benchmark_charts() -> Any:
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import charts
    finally:
        sys.path.remove(str(benchmarks))
    return charts


class BenchmarkTable(GeneratedRst):
    required_arguments = 1

    def lines(self) -> list[str]:
        charts = _benchmark_charts()
        relative, path = self.env.relfn2path(self.arguments[0])
        self.env.note_dependency(relative)
        run = json.loads(Path(path).read_text())
        shown = ("ours", "stdlib", "twisted", "uvloop", "before")
        impls = [i for i in shown if i in run["settings"]["impls"]]
        others = [o for o in shown[1:] if o in impls and "ours" in impls]
        ratios = {o: {r[0]: r[1:] for r in charts.ratio_summary(run, o)} for o in others}
        header = ["scenario", *(f"{i} (req/s)" for i in impls), *(f"ours/{o}" for o in others)]
        rows = []
        for scenario, results in run["results"].items():
            row = [f"``{scenario}``"]
            for impl in impls:
                rates = [m["rate"] for m in results.get(impl, [])]
                row.append(f"{statistics.median(rates):,.0f}" if rates else "failed")
            for other in others:
                found = ratios[other].get(scenario)
                row.append(f"**{found[0]:.2f}** ({found[1]:.2f}–{found[2]:.2f})" if found else "—")
            rows.append(row)
        return [
            f"Run: {escape(charts.caption(run))}.  Figures: the median over the rounds; "
            "ratios: the median of the per-round ratios (lowest–highest round).",
            "",
            *list_table(header, rows, "auto"),
        ]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("benchmark-table", BenchmarkTable)
    app.connect("autodoc-process-signature", plain_interface_names)
    app.add_directive("txsocketserver-api", ApiReference)
    app.add_directive("txsocketserver-api-summary", ApiSummary)
    app.add_directive("usage-options", UsageOptions)
    app.add_directive("twistd-plugin-options", TwistdPluginOptions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
