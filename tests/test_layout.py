"""The package's boundaries, checked: what each part may import.

``txsocketserver._core`` (the socketserver classes) and the forking template
are what a forking server's workers import, so they import no Twisted,
``zope.interface``, ``threading`` or ``typing`` at module level: a worker
stays small and cheap to fork (``docs/architecture.md``, "The parts").  A
forking request run end to end is checked in ``test_forking.py``
(``test_workers_import_no_twisted``); here the rule is checked on the source,
so that breaking it fails even where no test happens to import the module.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "txsocketserver"
TWISTED_FREE = sorted((PACKAGE / "_core").glob("*.py")) + [PACKAGE / "_forking" / "template.py"]
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
