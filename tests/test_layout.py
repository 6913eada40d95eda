"""The package's boundaries, checked: what each part may import.

``txsocketserver._core`` (the socketserver classes) and the forking template
are what a forking server's children import, so they import no Twisted,
``zope.interface``, ``threading`` or ``typing`` at module level: a child
stays small and cheap to fork (``docs/architecture.md``, "The parts").  A
forking request run end to end is checked in ``test_forking.py``
(``test_workers_import_no_twisted``); here the rule is checked on the source,
so that breaking it fails even where no test happens to import the module.

Also checked here: every strategy of every role (``_twisted/interfaces.py``)
fills it, and every module names its tests on its first line.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "txsocketserver"
TWISTED_FREE = sorted((PACKAGE / "_core").glob("*.py")) + [
    PACKAGE / "_forking" / "template.py",
    # What a forking ssl: server's template and children unpickle.
    PACKAGE / "_forking" / "tls.py",
]
FORBIDDEN = ("twisted", "zope", "threading", "typing", "txsocketserver._twisted")


def module_level_imports(path: pathlib.Path) -> list[str]:
    """Modules imported when *path* is imported (``if TYPE_CHECKING:`` blocks and
    function bodies excluded)."""
    names: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names.append(base)
                names.extend(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


@pytest.mark.parametrize("path", TWISTED_FREE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_twisted_free_modules_import_nothing_heavy(path: pathlib.Path) -> None:
    offending = [
        name
        for name in module_level_imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not offending, f"{path.name} imports {offending} at module level"


def test_the_source_check_sees_imports() -> None:
    # The check above must not pass by seeing nothing.
    names = module_level_imports(PACKAGE / "_twisted" / "listeners.py")
    assert "zope.interface.implementer" in names


def run_script(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_core_loads_nothing_heavy() -> None:
    loaded = run_script(
        "import sys; import txsocketserver._core.stream, txsocketserver._core.datagram, "
        "txsocketserver._core.threading_mixin, txsocketserver._core.forking_mixin; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[:4]!r}))"
    )
    assert loaded == "[]"


def test_a_plain_server_loads_no_endpoint_facade_or_tls() -> None:
    loaded = run_script(
        "import sys, txsocketserver as ss\n"
        "with ss.TCPServer(('127.0.0.1', 0), ss.BaseRequestHandler) as server:\n"
        "    server.handle_request  # made, bound, listening\n"
        "print(sorted(m for m in sys.modules if m.startswith('txsocketserver._')))"
    )
    assert "txsocketserver._twisted.listeners" in loaded  # the check sees modules
    for module in ("endpoints", "transport_socket", "tls"):
        assert f"txsocketserver._twisted.{module}'" not in loaded


# -- the strategies fill their roles ------------------------------------------------


def test_each_strategy_provides_its_role() -> None:
    import ssl

    from zope.interface.verify import verifyClass, verifyObject

    import txsocketserver as ss
    from txsocketserver._async.serving import AsyncServing
    from txsocketserver._core.stream import PlainConnections, ServingThread
    from txsocketserver._forking.dispatcher import ProcessDispatcher
    from txsocketserver._twisted import interfaces
    from txsocketserver._twisted.endpoints import EndpointListener
    from txsocketserver._twisted.listeners import SocketListener
    from txsocketserver._twisted.readiness import SocketReadiness
    from txsocketserver._twisted.thread_dispatcher import ThreadDispatcher
    from txsocketserver._twisted.tls import TLSSecurity

    for role, strategy in [
        (interfaces.IListener, SocketListener),
        (interfaces.IListener, EndpointListener),
        (interfaces.IConnectionSecurity, TLSSecurity),
        (interfaces.IRequestReadiness, SocketReadiness),
        (interfaces.IThreadDispatcher, ThreadDispatcher),
        (interfaces.IProcessDispatcher, ProcessDispatcher),
        (interfaces.IServing, AsyncServing),
    ]:
        assert verifyClass(role, strategy)
    # Twisted-free classes declare nothing (no zope.interface there), but fit.
    assert verifyClass(interfaces.IConnectionSecurity, PlainConnections, tentative=True)
    assert verifyObject(interfaces.IServing, ServingThread(), tentative=True)
    assert verifyClass(interfaces.IServerControl, ss.BaseServer, tentative=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert verifyObject(interfaces.IConnectionSecurity, TLSSecurity(context))
    with ss.TCPServer(("127.0.0.1", 0), ss.BaseRequestHandler) as server:
        assert verifyObject(interfaces.IListener, server._listener)
        assert verifyObject(interfaces.IServerControl, server, tentative=True)
    with ss.TCPServer(
        ss.Endpoint("haproxy:tcp:0:interface=127.0.0.1"), ss.BaseRequestHandler
    ) as server:
        assert verifyObject(interfaces.IListener, server._listener)


# -- a reader finds each module's tests ---------------------------------------------
#
# Twisted's convention: a module's first line names the test modules that test it,
# ``# -*- test-case-name: tests.test_reactor,tests.test_service -*-`` (comma-separated,
# no spaces), ``tests.test_x`` meaning ``tests/test_x.py``.

SOURCES = PACKAGE.parent
TESTS = pathlib.Path(__file__).resolve().parent
TEST_CASE_NAME = re.compile(r"# -\*- test-case-name: (?P<names>\S+) -\*-")
TEST_MODULE = re.compile(r"tests\.(?P<stem>test_\w+)")


def pairing_problems(source: str, where: str, tests: pathlib.Path = TESTS) -> list[str]:
    """What is wrong with the test-case-name line of a module whose text is
    *source* (*where*: its path, for the messages); ``[]`` if nothing."""
    first_line = source.split("\n", 1)[0]
    match = TEST_CASE_NAME.fullmatch(first_line)
    if match is None:
        stem = pathlib.PurePath(where).stem.lstrip("_") or "module"
        return [
            f"{where}: its first line must name the test files that test it, e.g. "
            f"'# -*- test-case-name: tests.test_{stem} -*-' (several: comma-separated, "
            f"no spaces); found {first_line!r}"
        ]
    problems = []
    for name in match["names"].split(","):
        test_module = TEST_MODULE.fullmatch(name)
        if test_module is None:
            problems.append(
                f"{where}: test-case-name {name!r} is not of the form tests.test_<name> "
                "(for tests/test_<name>.py)"
            )
        elif not (tests / f"{test_module['stem']}.py").is_file():
            problems.append(
                f"{where}: test-case-name {name} names tests/{test_module['stem']}.py, which "
                "does not exist: name the test file that tests this module (or write it)"
            )
    return problems


def source_modules() -> list[pathlib.Path]:
    return sorted(p for p in SOURCES.rglob("*.py") if "egg-info" not in str(p))


def test_every_module_names_its_tests() -> None:
    modules = source_modules()
    assert len(modules) > 30, "the check must see the package's modules"
    problems = [
        problem
        for path in modules
        for problem in pairing_problems(
            path.read_text(), path.relative_to(SOURCES.parent).as_posix()
        )
    ]
    assert not problems, "\n".join(problems)


def test_the_test_case_name_check_catches_what_it_should(tmp_path: pathlib.Path) -> None:
    (tmp_path / "test_there.py").write_text("")
    where = "src/txsocketserver/_x/thing.py"

    def check(first_line: str) -> list[str]:
        return pairing_problems(first_line + '\n"""Doc."""\n', where, tmp_path)

    assert check("# -*- test-case-name: tests.test_there -*-") == []
    assert check("# -*- test-case-name: tests.test_there,tests.test_there -*-") == []
    (missing,) = check('"""No line."""')
    assert "tests.test_thing" in missing and where in missing
    (dangling,) = check("# -*- test-case-name: tests.test_there,tests.test_gone -*-")
    assert "tests/test_gone.py, which does not exist" in dangling
    (malformed,) = check("# -*- test-case-name: test_there.py -*-")
    assert "not of the form tests.test_<name>" in malformed
    assert check("# -*- test-case-name: tests.test_there, tests.test_there -*-")


# -- every strategy of every role, found rather than listed ----------------------------

# Twisted-free classes that fill a role: they cannot import zope.interface, so
# they declare nothing, and are verified against their role as written here.
UNDECLARED_STRATEGIES = {
    "txsocketserver._core.stream.PlainConnections": "IConnectionSecurity",
    "txsocketserver._core.stream.RequestProcessListener": "IListener",
    "txsocketserver._core.base.BaseServer": "IServerControl",
}


def package_modules() -> list[object]:
    import importlib

    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append(importlib.import_module(name))
    return modules


def test_every_strategy_of_every_role_provides_it() -> None:
    import importlib

    from zope.interface.exceptions import Invalid
    from zope.interface.interface import InterfaceClass
    from zope.interface.verify import verifyClass

    from txsocketserver._twisted import interfaces

    roles = [
        value
        for value in vars(interfaces).values()
        if isinstance(value, InterfaceClass) and value.__module__ == interfaces.__name__
    ]
    strategies: dict[str, list[str]] = {role.__name__: [] for role in roles}
    problems = []

    def verify(role: InterfaceClass, cls: type, tentative: bool) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        strategies[role.__name__].append(where)
        try:
            verifyClass(role, cls, tentative=tentative)
        except Invalid as exc:
            problems.append(f"{where} does not fill {role.__name__}: {exc}")

    for module in package_modules():
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != module.__name__:  # type: ignore[attr-defined]
                continue
            for role in roles:
                if role.implementedBy(cls):
                    verify(role, cls, tentative=False)
    for dotted, role_name in UNDECLARED_STRATEGIES.items():
        module_name, _, class_name = dotted.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        assert cls is not None, (
            f"{dotted} is gone: update UNDECLARED_STRATEGIES to where the class lives now"
        )
        verify(getattr(interfaces, role_name), cls, tentative=True)
    without = [name for name, found in strategies.items() if not found]
    assert not without, (
        f"roles no class fills (a dead interface, or an undeclared strategy): {without}"
    )
    assert not problems, "\n".join(problems)
    # The check must see every kind of strategy, the async ones included.
    for expected in (
        "txsocketserver._twisted.endpoints.EndpointReadiness",
        "txsocketserver._async.serving.AsyncReadiness",
        "txsocketserver._async.serving.AsyncEndpointListener",
        "txsocketserver._core.stream.RequestProcessListener",
    ):
        assert any(expected in found for found in strategies.values()), (
            f"{expected} fills no role now; if it moved or was renamed, update this test"
        )


# -- the layering: _core below _twisted below _async ---------------------------------

# The parts in their layers, lowest first: a part may import the ones below it.
LAYERS = ("_core", "_twisted", "_async")


def runtime_imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(module, is_type_only)`` for every import in *path*, function bodies
    included; ``is_type_only`` for those under ``if TYPE_CHECKING:``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(path.read_text()), False)
    return found


def test_one_import_runs_against_the_layering() -> None:
    # The core reaches the Twisted side through _core.base.twisted_side()
    # alone (plus the roles' names, for the type checker, in base.py); the
    # Twisted side never imports _async: an async handler class names its
    # serving itself (AsyncBaseRequestHandler._serving_strategy).
    against: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0]
        if part not in LAYERS:
            continue
        for module, type_only in runtime_imports(path):
            bits = module.split(".")
            if bits[0] != "txsocketserver" or len(bits) < 2 or bits[1] not in LAYERS:
                continue
            if LAYERS.index(bits[1]) > LAYERS.index(part):
                name = f"{path.relative_to(PACKAGE)} -> {module}"
                against.append(name + (" (type only)" if type_only else ""))
    assert sorted(against) == [
        "_core/base.py -> txsocketserver._twisted",
        "_core/base.py -> txsocketserver._twisted (type only)",
    ]


def test_the_core_tests_no_mode() -> None:
    # Async is a strategy (IServing), not a flag the core's hooks test.
    import re

    for path in (PACKAGE / "_core").glob("*.py"):
        assert not re.search(r"\b_async\b", path.read_text()), path.name
