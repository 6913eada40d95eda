# -*- test-case-name: tests.test_config -*-
"""``--config FILE`` (TOML), the environment, and their precedence over defaults.

Theory of operation
===================

Every option of the command line (of ``twistd socketserver`` and ``python -m
txsocketserver``) can also come from a TOML file and from the environment,
under the same name.  Nothing here lists the options: they are read from the
parser itself (its long names, whether each takes a value, the type its value
is coerced to), so an option added to the parser is configurable at once.

:func:`parse` runs instead of the parser's own ``parseOptions``:

1. The command line is scanned with the parser's own ``getopt`` tables for
   ``--config`` (else ``TXSOCKETSERVER_CONFIG``) and the actions
   ``--check-config`` and ``--print-config``.
2. The file's values, then the environment's (``TXSOCKETSERVER_<OPTION>``,
   ``PORT``, ``WEB_CONCURRENCY``), are given to the parser exactly as the
   command line gives its own (the parser's dispatch), before it parses the
   command line: what the command line says wins, then the environment,
   then the file, then the defaults.  A ``--listen`` on the command line
   replaces the listeners of the file and the environment.
3. Each value remembers where it came from (``FILE:LINE``, the variable's
   name, the command line), so that every problem is reported with its place;
   file and environment problems are all gathered before anything listens:
   a wrong type, an unknown option, an endpoint that does not parse, a class
   that cannot be imported, a TLS file that does not exist.

The file holds top-level options, and ``[[listener]]`` tables, each an
``endpoint`` with the options that can differ per listener
(:data:`PER_LISTENER`).
"""

from __future__ import annotations

import difflib
import getopt
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.python import usage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Prefix of the environment variables that set options: TXSOCKETSERVER_DRAIN_TIMEOUT.
ENV_PREFIX = "TXSOCKETSERVER_"
#: Options that are actions, not configuration: never read from a file or the environment.
ACTIONS = frozenset({"help", "version", "config", "check-config", "print-config"})
#: Options a ``[[listener]]`` table may set for itself, and the server attribute each sets.
PER_LISTENER = {
    "trusted-proxies": "trusted_proxies",
    "header-timeout": "header_timeout",
    "max-threads": "max_threads",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_COMMAND_LINE = "the command line"

#: The options of this group, added to the parser (``_cli.Options``).
CONFIG_FLAGS = [
    [
        "check-config",
        None,
        "Check the configuration (command line, environment, --config file): import "
        "the handler and server classes, parse every endpoint, look for the files TLS "
        "options name; print every problem with where it is and exit 2, or exit 0. "
        "Nothing listens.",
    ],
    [
        "print-config",
        None,
        "Print the effective configuration (command line > environment > --config "
        "file > defaults) as TOML that --config reads back, and exit.",
    ],
]
CONFIG_PARAMETERS = [
    [
        "config",
        None,
        None,
        "TOML file holding any of these options under the same names (drain-timeout = "
        "30, reuse-port = true, listen = [...]) and [[listener]] tables with their own "
        "options; see the operations guide. Also TXSOCKETSERVER_CONFIG. Options also "
        "come from the environment as TXSOCKETSERVER_<OPTION> (PORT means --listen "
        "tcp:$PORT when no listener is given, WEB_CONCURRENCY means --workers); the "
        "command line wins over the environment, which wins over the file.",
    ],
]


class ConfigError(usage.UsageError):
    """The configuration is wrong; the message lists every problem with its place."""


@dataclass
class Problem:
    """One problem in the configuration, and where it is."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class _Value:
    value: Any
    where: str


@dataclass
class _Listener:
    endpoint: str
    where: str
    options: dict[str, _Value] = field(default_factory=dict)


@dataclass
class _Option:
    """One option of the parser, as the file and the environment see it."""

    name: str
    takes_value: bool
    coerce: Any  # int, float, str or the parser's own coercion; None for flags

    def expected(self) -> str:
        if not self.takes_value:
            return "true or false"
        if self.coerce is int:
            return "an integer"
        if self.coerce is float:
            return "a number"
        return "a string"

    def accepts(self, value: Any) -> bool:
        if not self.takes_value:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.coerce is int:
            return isinstance(value, int)
        if self.coerce is float:
            return isinstance(value, (int, float))
        return isinstance(value, str)


def options_of(parser: usage.Options) -> dict[str, _Option]:
    """The parser's long options, canonical names only, in definition order."""
    found: dict[str, _Option] = {}
    for long in parser.longOpt:
        name = long.rstrip("=")
        if name in found or parser.synonyms.get(name) != name:
            continue
        dispatch = parser._dispatch[name]
        coerce = dispatch.coerce if isinstance(dispatch, usage.CoerceParameter) else None
        if coerce is None and long.endswith("="):
            coerce = str
        found[name] = _Option(name, long.endswith("="), coerce)
    return found


def _given_on_command_line(parser: usage.Options, argv: Sequence[str]) -> dict[str, str]:
    """{canonical name: value} of what *argv* gives, by the parser's own tables."""
    try:
        pairs, _ = getopt.getopt(list(argv), parser.shortOpt, parser.longOpt)
    except getopt.GetoptError:
        return {}  # the real parse reports it
    given = {}
    for opt, value in pairs:
        name = opt.lstrip("-")
        name = parser.synonyms.get(name, parser.synonyms.get(name.replace("-", "_"), name))
        given[name] = value
    return given


def _key_lines(text: str) -> dict[tuple[str, int, str], int]:
    """{(table, occurrence, key): line} for the keys of a TOML document.

    ``tomllib`` gives no positions, so this reads the lines: good enough for
    the flat documents this configuration is (top-level keys, arrays of
    tables), and only used to say where a problem is.
    """
    lines: dict[tuple[str, int, str], int] = {}
    table, occurrence = "", 0
    counts: dict[str, int] = {}
    header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?")
    key = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            table = match.group(1).strip("\"'")
            counts[table] = counts.get(table, 0) + 1
            occurrence = counts[table] - 1
            lines.setdefault((table, occurrence, ""), number)
            continue
        match = key.match(line)
        if match:
            name = next(group for group in match.groups() if group)
            lines.setdefault((table, occurrence, name), number)
    return lines


class Configuration:
    """The values of the file and the environment, with where each came from."""

    def __init__(self, parser: usage.Options, given: Mapping[str, str]) -> None:
        self.parser = parser
        self.options = options_of(parser)
        self.given = dict(given)
        self.values: dict[str, _Value] = {}
        self.listeners: list[_Listener] | None = None
        self.problems: list[Problem] = []

    def _place(self, path: str, lines: Mapping[Any, int], *key: Any) -> str:
        # A key, or else a table of that name (its header line).
        line = lines.get(key) or (lines.get((key[2], 0, "")) if key[0] == "" else None)
        return f"{path}:{line}" if line else path

    # -- reading ---------------------------------------------------------------

    def read_file(self, path: str) -> None:
        """Read the TOML file *path*; its problems are gathered."""
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except OSError as exc:
            self.problems.append(Problem(path, f"cannot read the --config file: {exc.strerror}"))
            return
        try:
            text = raw.decode()
            document = tomllib.loads(text)
        except UnicodeDecodeError as exc:
            self.problems.append(Problem(path, f"not UTF-8 text: {exc}"))
            return
        except tomllib.TOMLDecodeError as exc:
            # The message ends "(at line L, column C)".
            match = re.search(r"line (\d+)", str(exc))
            where = f"{path}:{match.group(1)}" if match else path
            self.problems.append(Problem(where, f"not valid TOML: {exc}"))
            return
        lines = _key_lines(text)
        listeners: list[_Listener] = []
        for name, value in document.items():
            where = self._place(path, lines, "", 0, name)
            if name == "listener":
                listeners.extend(self._listener_tables(path, lines, value))
            elif name == "listen":
                for description in self._listen_values(where, value):
                    listeners.append(_Listener(description, where))
            else:
                checked = self._checked(name, value, where)
                if checked is not None:
                    self.values[name] = checked
        if "listen" in document or "listener" in document:
            self.listeners = listeners

    def _listen_values(self, where: str, value: Any) -> list[str]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            self.problems.append(
                Problem(
                    where,
                    f"listen = {value!r}: expected an endpoint string or a list "
                    'of them, e.g. listen = ["tcp:8000"]',
                )
            )
            return []
        return values

    def _listener_tables(self, path: str, lines: Mapping[Any, int], value: Any) -> list[_Listener]:
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            where = self._place(path, lines, "", 0, "listener")
            self.problems.append(
                Problem(where, "listener: expected [[listener]] tables, each with an endpoint")
            )
            return []
        listeners = []
        for index, table in enumerate(value):
            where = self._place(path, lines, "listener", index, "")
            endpoint = table.get("endpoint")
            if not isinstance(endpoint, str):
                self.problems.append(
                    Problem(
                        where,
                        '[[listener]] needs endpoint = "..." (an endpoint string, '
                        'e.g. "tcp:8000")',
                    )
                )
                continue
            listener = _Listener(endpoint, self._place(path, lines, "listener", index, "endpoint"))
            for name, item in table.items():
                if name == "endpoint":
                    continue
                item_where = self._place(path, lines, "listener", index, name)
                if name not in PER_LISTENER:
                    self.problems.append(
                        Problem(
                            item_where,
                            f"unknown option {name!r} in [[listener]]: a "
                            f"listener may set endpoint, {', '.join(PER_LISTENER)}",
                        )
                    )
                    continue
                checked = self._checked(name, item, item_where)
                if checked is not None:
                    listener.options[name] = checked
            listeners.append(listener)
        return listeners

    def _checked(self, name: str, value: Any, where: str) -> _Value | None:
        option = self.options.get(name)
        if option is None or name in ACTIONS:
            if self._other_front_end(name):
                return None  # e.g. log-level under twistd, which has its own
            self.problems.append(Problem(where, self._unknown(name)))
            return None
        if not option.accepts(value):
            self.problems.append(
                Problem(where, f"{name} = {value!r}: expected {option.expected()}")
            )
            return None
        return _Value(value, where)

    def _unknown(self, name: str) -> str:
        known = [n for n in self.options if n not in ACTIONS] + ["listen", "listener"]
        close = difflib.get_close_matches(name.replace("_", "-"), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown option {name!r}{hint}"

    def _other_front_end(self, name: str) -> bool:
        # The parser says which options only the other front end has (the
        # file is shared): this module imports neither front end.
        return name in getattr(self.parser, "other_front_end_options", ())

    def read_environment(self, environ: Mapping[str, str]) -> None:
        """Read ``TXSOCKETSERVER_<OPTION>``, ``PORT`` and ``WEB_CONCURRENCY``."""
        for variable, text in sorted(environ.items()):
            if not variable.startswith(ENV_PREFIX) or variable == ENV_PREFIX + "CONFIG":
                continue
            name = variable[len(ENV_PREFIX) :].lower().replace("_", "-")
            if name == "listen":
                self.listeners = [_Listener(d, variable) for d in text.split()]
                continue
            option = self.options.get(name)
            if option is None or name in ACTIONS:
                self.problems.append(Problem(f"environment {variable}", self._unknown(name)))
                continue
            if option.takes_value:
                self.values[name] = _Value(text, f"environment {variable}")
            elif text.strip().lower() in _TRUE | _FALSE:
                self.values[name] = _Value(
                    text.strip().lower() in _TRUE, f"environment {variable}"
                )
            else:
                self.problems.append(
                    Problem(f"environment {variable}", f"{text!r}: expected 1 or 0 (true, false)")
                )
        if "WEB_CONCURRENCY" in environ and ENV_PREFIX + "WORKERS" not in environ:
            self.values["workers"] = _Value(
                environ["WEB_CONCURRENCY"], "environment WEB_CONCURRENCY"
            )
        if environ.get("PORT") and not self.listeners:
            self.listeners = [_Listener(f"tcp:{environ['PORT']}", "environment PORT")]

    # -- handing the values to the parser ---------------------------------------

    def apply(self) -> None:
        """Give the parser every value, as its command line would (before it parses one)."""
        parser = self.parser
        for name, item in self.values.items():
            if name in self.given:
                continue  # the command line's wins; and --reactor must install once
            try:
                if not self.options[name].takes_value:
                    if item.value:
                        parser._dispatch[name](name, None)
                    else:
                        parser[name] = 0
                    continue
                text = str(item.value)
                dispatch = parser._dispatch[name]
                if isinstance(dispatch, usage.CoerceParameter):
                    dispatch.dispatch(name, text)
                else:
                    dispatch(name, text)
            except usage.UsageError as exc:
                self.problems.append(Problem(item.where, f"{name}: {exc}"))
        if self.listeners is not None:
            parser["listens"] = [listener.endpoint for listener in self.listeners]
            parser["listener-options"] = [
                {name: value.value for name, value in listener.options.items()}
                for listener in self.listeners
            ]
            # A --listen on the command line replaces these (Options.opt_listen).
            parser["listens-preset"] = True

    # -- where a value came from ------------------------------------------------

    def where(self, name: str) -> str | None:
        """Where the effective value of option *name* came from (None: the default)."""
        if name in self.given:
            return _COMMAND_LINE
        if name == "listen":
            if self.parser.get("listens-preset") and self.listeners:
                return self.listeners[0].where
            return _COMMAND_LINE if self.parser.get("listens") else None
        item = self.values.get(name)
        return None if item is None else item.where

    def _listens_with_places(self) -> list[tuple[str, str]]:
        listens = self.parser.get("listens") or []
        if self.parser.get("listens-preset") and self.listeners is not None:
            return [(x.endpoint, x.where) for x in self.listeners]
        return [(d, _COMMAND_LINE) for d in listens]

    def locate(self, error: usage.UsageError) -> str:
        """*error*'s message, with the place of the option it names first."""
        message = str(error)
        match = re.match(r"--([a-z0-9-]+)", message)
        where = self.where(match.group(1)) if match else None
        if where is None or where == _COMMAND_LINE:
            return message
        return f"{where}: {message}"

    # -- checking what the values mean --------------------------------------------

    def check_values(self) -> list[Problem]:
        """Import the classes, parse every endpoint, look for TLS files: each problem."""
        from txsocketserver._server_classes import MODES, load_object, mode_for, server_class
        from txsocketserver._twisted.endpoints import Endpoint

        problems = []
        parser = self.parser
        listens = self._listens_with_places()
        if not listens:
            problems.append(
                Problem(
                    "configuration",
                    "no listener: give --listen, listen = "
                    "[...] or [[listener]] in the file, or PORT",
                )
            )
        for description, where in listens:
            description = f"tcp:{description}" if description.isdigit() else description
            missing = [path for path in _tls_files(description) if not os.path.exists(path)]
            for path in missing:
                problems.append(Problem(where, f"{description!r}: no such file {path!r}"))
            if missing:
                continue
            try:
                Endpoint(description).resolve()
            except ValueError as exc:
                problems.append(
                    Problem(
                        where,
                        f"{exc} (expected an endpoint such as tcp:8000, "
                        "unix:/run/app.sock or ssl:8443:privateKey=...)",
                    )
                )
        for index, options in enumerate(parser.get("listener-options") or []):
            for name, value in options.items():
                listener_where = self.listeners[index].options[name].where  # type: ignore[index]
                try:
                    listener_value(name, value)
                except ValueError as exc:
                    problems.append(Problem(listener_where, f"{name}: {exc}"))
        handler = None
        if not parser.get("handler"):
            problems.append(
                Problem(
                    "configuration",
                    'no handler: give --handler or handler = "package.module:Class"',
                )
            )
        else:
            try:
                handler = load_object(parser["handler"], "--handler")
            except usage.UsageError as exc:
                problems.append(Problem(self.where("handler") or "handler", str(exc)))
        mode = parser.get("mode")
        if mode is not None and mode not in MODES:
            problems.append(
                Problem(
                    self.where("mode") or "mode",
                    f"mode {mode!r}: expected one of {', '.join(MODES)}",
                )
            )
        elif handler is not None:
            try:
                server_class(parser.get("server"), mode_for(handler, mode))
            except usage.UsageError as exc:
                problems.append(Problem(self.where("server") or "server", str(exc)))
        return problems

    # -- printing ---------------------------------------------------------------

    def dump(self) -> str:
        """The effective configuration as TOML that ``--config`` reads back."""
        parser = self.parser
        lines = [
            "# txsocketserver: the effective configuration (--print-config).",
            "# Read it back with --config FILE.",
        ]
        for name, option in self.options.items():
            if name in ACTIONS or name == "listen" or name not in parser:
                continue
            value = parser[name]
            if value is None:
                continue
            if not option.takes_value:
                value = bool(value)
            lines.append(f"{name} = {toml_value(value)}")
        per_listener = parser.get("listener-options") or []
        for index, description in enumerate(parser.get("listens") or []):
            lines += ["", "[[listener]]", f"endpoint = {toml_value(description)}"]
            options = per_listener[index] if index < len(per_listener) else {}
            lines += [f"{name} = {toml_value(value)}" for name, value in options.items()]
        return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """*value* (a string, a number, a boolean) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON's string escapes are TOML's, once DEL (a control character in TOML) is escaped too.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


_TLS_FILE_KEYS = ("privateKey", "certKey", "extraCertChain", "caCertsDir", "dhParameters")


def _tls_files(description: str) -> list[str]:
    """Paths an ``ssl:`` description names (it may sit behind ``haproxy:``)."""
    if not re.match(r"^(haproxy:)?ssl:", description, re.IGNORECASE):
        return []
    files = []
    for part in re.split(r"(?<!\\):", description):
        key, _, value = part.partition("=")
        if key in _TLS_FILE_KEYS and value:
            files.append(value.replace("\\:", ":"))
    return files


def listener_value(name: str, value: Any) -> Any:
    """The server attribute's value for a ``[[listener]]`` option.

    Error handling:
        ``ValueError`` saying what was expected.
    """
    if name == "trusted-proxies":
        from txsocketserver._twisted.proxy_protocol import TrustedProxies

        entries = tuple(entry.strip() for entry in str(value).split(",") if entry.strip())
        TrustedProxies(entries)
        return entries
    if name == "header-timeout":
        if not float(value) > 0:  # nan too
            raise ValueError(f"{value!r}: expected a positive number of seconds")
        return float(value)
    if int(value) < 1:
        raise ValueError(f"{value!r}: expected an integer of at least 1")
    return int(value)


def listener_settings(parser: Mapping[str, Any], index: int) -> dict[str, Any]:
    """{server attribute: value} that listener *index* sets for itself."""
    per_listener = parser.get("listener-options") or []
    if index >= len(per_listener):
        return {}
    return {PER_LISTENER[name]: listener_value(name, v) for name, v in per_listener[index].items()}


def parse(
    parser: usage.Options,
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None = None,
    *,
    out: Callable[[str], object] = print,
) -> None:
    """Parse *argv* with *parser*, after the ``--config`` file and the environment.

    Carries out ``--check-config`` and ``--print-config`` (``SystemExit``).

    Error handling:
        :class:`ConfigError` listing every problem of the file and the
        environment, each with its place; ``usage.UsageError`` from the
        command line and the parser's own checks, with the place of the
        option they name when it came from the file or the environment.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    given = _given_on_command_line(parser, argv)
    if given.keys() & {"help", "version"}:
        # They answer whatever the file says (and exit).
        usage.Options.parseOptions(parser, argv)
        return
    configuration = Configuration(parser, given)
    path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        configuration.read_file(path)
    configuration.read_environment(environ)
    configuration.apply()
    checking = "check-config" in given
    problems = list(configuration.problems)
    post_options = parser.postOptions
    parser.postOptions = lambda: None  # type: ignore[method-assign]
    try:
        usage.Options.parseOptions(parser, argv)
    except usage.UsageError as exc:
        if not checking:
            raise
        problems.append(Problem(_COMMAND_LINE, str(exc)))
    finally:
        del parser.postOptions
    if checking:
        problems += configuration.check_values()
        if not problems:
            try:
                post_options()
            except usage.UsageError as exc:
                problems.append(Problem("configuration", configuration.locate(exc)))
        if problems:
            report = ["configuration problems:"] + [f"  {problem}" for problem in problems]
            print("\n".join(report), file=sys.stderr)
            raise SystemExit(2)
        out(f"configuration OK: {', '.join(parser['listens'])} -> {parser['handler']}")
        raise SystemExit(0)
    if path or configuration.values or configuration.listeners is not None:
        # What the file and the environment say, with their places; the
        # parser's own checks below report the command line's.
        problems += [
            problem
            for problem in configuration.check_values()
            if problem.where not in (_COMMAND_LINE, "configuration")
        ]
    if problems:
        raise ConfigError("\n  ".join(["configuration problems:", *map(str, problems)]))
    try:
        post_options()
    except usage.UsageError as exc:
        located = configuration.locate(exc)
        if located != str(exc):
            raise ConfigError(located) from None
        raise
    if "print-config" in given:
        out(configuration.dump().rstrip("\n"))
        raise SystemExit(0)


__all__ = [
    "CONFIG_FLAGS",
    "CONFIG_PARAMETERS",
    "ConfigError",
    "Configuration",
    "PER_LISTENER",
    "listener_settings",
    "parse",
    "toml_value",
]
