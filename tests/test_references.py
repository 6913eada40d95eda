"""Every code reference in the docs and in the source resolves: nothing cites what is gone.

Read are the docs (``docs/**/*.md``, ``docs/**/*.rst``, ``README.md``,
``benchmarks/README.md``) and the docstrings and comments of every module under
``src/`` and ``tests/`` (references in code are imports, which fail by
themselves).  A reference is:

* a path of ours: ``_twisted/reactor.py``, ``src/txsocketserver/_core/base.py``,
  ``tests/test_layout.py``, ``docs/operations.md``, ``examples/echo_server.py``;
  a bare private file name (``_x.py``) must be a file of ours too;
* a dotted name: ``txsocketserver._twisted.reactor.call_in_reactor`` (imported,
  then looked up attribute by attribute, each defined where it is named, not
  imported there); in the source, also one relative to the package
  (``_twisted.endpoints.listening_socket``);
* a test cited by name: ``tests/test_x.py::test_y``, or
  ``tests/test_x.py`` (``test_y``): ``test_y`` must be defined in that file.

CHANGELOG.md is left out: it tells what names were.  A name with a
one-letter part (``_x/y.py``, ``tests/test_x.py``) is a placeholder, not a reference.
"""

from __future__ import annotations

import ast
import importlib
import io
import os
import re
import tokenize
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "txsocketserver"

URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
FILE_SUFFIXES = {"py", "md", "rst", "toml", "dot", "tac", "c", "lua", "json", "txt", "out", "cfg"}
# A path: an optional directory part, then a file name with one of our extensions.
PATH = re.compile(
    rf"(?<![\w/.-])(?P<path>(?:[\w.-]+/)*[\w-]+\.(?:{'|'.join(sorted(FILE_SUFFIXES))}))"
    r"(?![\w/])"
)
DOTTED = re.compile(r"(?<![\w.])(?P<name>txsocketserver(?:\.\w+)+)")
PRIVATE_DOTTED = re.compile(r"(?<![\w.:/])(?P<name>_[a-z]\w*(?:\.\w+)+)")
TEST_CITED = re.compile(
    r"(?<![\w.])(?:tests/)?(?P<file>test_\w+\.py)(?:::|`{0,2}\s*\(`{1,2})(?P<test>test_\w+)"
)
# A dotted name ending so is a host name (txsocketserver.readthedocs.io).
DOMAINS = {"io", "org", "com", "net", "dev"}
# Directories a path may be relative to, besides the citing file's own.
ROOTS = (REPO, SRC, PACKAGE)
# Files of others that the docs name by their own name (the stdlib's, CPython's
# tests, an operator's load balancer configuration).
NOT_OURS = {"socketserver.py", "test_socketserver.py", "haproxy.cfg"}


def doc_files() -> list[Path]:
    docs = [p for p in (REPO / "docs").rglob("*.md") if "_build" not in p.parts]
    docs += [p for p in (REPO / "docs").rglob("*.rst") if "_build" not in p.parts]
    return sorted(docs) + [REPO / "README.md", REPO / "benchmarks" / "README.md"]


def source_files() -> list[Path]:
    """The package's modules, and the tests' (whose prose cites modules and tests too)."""
    modules = sorted(p for p in SRC.rglob("*.py") if "egg-info" not in str(p))
    return modules + sorted((REPO / "tests").glob("*.py"))


@cache
def repo_file_names() -> frozenset[str]:
    names = set()
    skipped = (".git", ".venv", ".mypy_cache", ".ruff_cache", "_build", "__pycache__")
    for _directory, subdirectories, files in os.walk(REPO):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(skipped)]
        names.update(files)
    return frozenset(names)


def path_problem(reference: str, citing: Path) -> str | None:
    if "/" not in reference:
        # A bare name: some file of the repository must be called so.
        if reference in NOT_OURS:
            return None
        if reference in repo_file_names():
            return None
        return f"names {reference}, which no file of the repository is called"
    candidates = [root / reference for root in (*ROOTS, citing.parent)]
    if any(candidate.exists() for candidate in candidates):
        return None
    first = reference.split("/", 1)[0]
    ours = first.startswith("_") or first in {
        "src",
        "tests",
        "docs",
        "examples",
        "benchmarks",
        "txsocketserver",
        "twisted",
    }
    # .ci/ is the repository's, not the sdist's, which runs this suite too.
    ours = ours or (first == ".ci" and (REPO / ".ci").is_dir())
    if not ours:
        return None
    return f"names {reference}, which does not exist (looked under {', '.join(_where())})"


def _where() -> list[str]:
    return ["the repository", "src/", "src/txsocketserver/", "the citing file's directory"]


@cache
def resolve(dotted: str) -> str | None:
    """``None`` if *dotted* names a module or an attribute of one; else why not."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue
            raise
        for depth, attribute in enumerate(parts[split:], start=split):
            have = ".".join(parts[:depth])
            if not hasattr(obj, attribute):
                return f"{have} has no attribute {attribute!r}"
            found = getattr(obj, attribute)
            home = getattr(found, "__module__", None)
            if (
                isinstance(obj, ModuleType)
                and "._" in have
                and isinstance(home, str)
                and home.startswith("txsocketserver")
                and home != have
            ):
                # A private module's name for what it merely imports: cite its home.
                return f"{attribute} is defined in {home}, and only imported into {have}"
            obj = found
        return None
    return f"no module {parts[0]!r}"


def dotted_problem(name: str) -> str | None:
    name = name.rstrip(".")
    last = name.rsplit(".", 1)[-1]
    # A host name, or a file named like a module (an operator's TOML file): no module.
    if name in log_namespaces() or last in DOMAINS or last in FILE_SUFFIXES:
        return None
    why = resolve(name)
    return None if why is None else f"names {name}, which does not resolve ({why})"


def private_dotted_problem(name: str) -> str | None:
    """``_x.y``: relative to the package, unless ``_x`` is a top-level module
    of its own (the stdlib's ``_thread``)."""
    top, _, rest = name.partition(".")
    if rest in FILE_SUFFIXES:
        return None  # a file name: path_problem reads it
    try:
        importlib.import_module(top)
        return None
    except ImportError:
        pass
    why = resolve(f"txsocketserver.{name}")
    if why is None:
        return None
    return f"names {name} (read as txsocketserver.{name}), which does not resolve ({why})"


def prose_of(source: str) -> list[tuple[int, str]]:
    """The docstrings (any bare string statement) and comments of a module, each
    with the number of its first line: the rest is code, which imports check."""
    fragments = [
        (node.lineno, node.value.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    fragments += [(t.start[0], t.string) for t in tokens if t.type == tokenize.COMMENT]
    return sorted(fragments)


@cache
def log_namespaces() -> frozenset[str]:
    """``twisted.logger`` namespaces of ours: dotted, but not code."""
    found = set()
    for path in source_files():
        found.update(re.findall(r"namespace=\"(txsocketserver[\w.]*)\"", path.read_text()))
    return frozenset(found)


@cache
def defined_tests(test_file: str) -> frozenset[str] | None:
    path = REPO / "tests" / test_file
    if not path.exists():
        return None
    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    )


def cited_test_problem(test_file: str, test: str) -> str | None:
    defined = defined_tests(test_file)
    if defined is None:
        return f"cites tests/{test_file}, which does not exist"
    if test in defined:
        return None
    return f"cites {test} in tests/{test_file}, which defines no such test"


PLACEHOLDER = re.compile(r"(?:_|test_)?[a-z]")


def is_placeholder(reference: str) -> bool:
    return any(PLACEHOLDER.fullmatch(part) for part in re.split(r"[/.:]+", reference))


def problems_in(text: str, citing: Path, *, source: bool, first_line: int = 1) -> list[str]:
    """Every dangling reference in *text* (from *citing*, at *first_line*)."""
    found: list[str] = []
    text = URL.sub(" ", text)
    for number, line in enumerate(text.splitlines(), start=first_line):
        checks: list[str | None] = []

        def real(pattern: re.Pattern[str], line: str = line) -> list[re.Match[str]]:
            return [m for m in pattern.finditer(line) if not is_placeholder(m[0])]

        checks += [path_problem(m["path"], citing) for m in real(PATH)]
        checks += [dotted_problem(m["name"]) for m in real(DOTTED)]
        checks += [cited_test_problem(m["file"], m["test"]) for m in real(TEST_CITED)]
        if source:
            checks += [private_dotted_problem(m["name"]) for m in real(PRIVATE_DOTTED)]
        where = f"{citing.relative_to(REPO).as_posix()}:{number}"
        found += [f"{where}: {problem}" for problem in checks if problem is not None]
    return found


def test_the_reference_check_reads_something() -> None:
    assert len(doc_files()) >= 10 and len(source_files()) >= 30


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_docs_cite_what_exists(path: Path) -> None:
    problems = problems_in(path.read_text(), path, source=False)
    assert not problems, "dangling references; fix or remove them:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_source_cites_what_exists(path: Path) -> None:
    problems = [
        problem
        for line, text in prose_of(path.read_text())
        for problem in problems_in(text, path, source=True, first_line=line)
    ]
    assert not problems, "dangling references; fix or remove them:\n" + "\n".join(problems)


def test_the_reference_check_catches_what_it_should() -> None:
    citing = PACKAGE / "_twisted" / "listeners.py"
    text = "\n".join(
        [
            "See ``_workers/listeners.py`` and _readiness.py,",  # gone, never was
            "``txsocketserver._twisted.readiness.IRequestReadiness``",  # wrong module
            "``_endpoints.listening_socket``",  # no such module
            "``_twisted.endpoints.no_such_function``",  # a missing attribute
            "``tests/test_proxy_protocol.py`` (``test_haproxy_endpoints_are_unwrapped``)",
            "tests/test_nothing_here.py",
        ]
    )
    problems = problems_in(text, citing, source=True)
    expected = [
        "_workers/listeners.py, which does not exist",
        "_readiness.py, which no file",
        "IRequestReadiness is defined in txsocketserver._twisted.interfaces, and only imported",
        "names _endpoints.listening_socket",
        "endpoints has no attribute 'no_such_function'",
        "test_haproxy_endpoints_are_unwrapped in tests/test_proxy_protocol.py, which defines no",
        "tests/test_nothing_here.py, which does not exist",
    ]
    for message in expected:
        assert any(message in problem for problem in problems), (message, problems)
    assert len(problems) == len(expected), problems
    fine = "\n".join(
        [
            "``_twisted/reactor.py``, ``src/txsocketserver/_core/base.py``, docs/operations.md",
            "``txsocketserver._twisted.interfaces.IRequestReadiness``, _thread.allocate_lock",
            "``_twisted.endpoints.listening_socket``, ``txsocketserver.TCPServer``",
            "tests/test_twisted_compat.py::test_haproxy_endpoints_are_unwrapped",
            "https://example.org/_gone/file.py, CPython's socketserver.py",
            "placeholders: _x/y.py, tests/test_x.py, txsocketserver._x.y",
        ]
    )
    assert problems_in(fine, citing, source=True) == []
