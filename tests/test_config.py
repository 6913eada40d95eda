"""``--config FILE`` (TOML), the environment, ``--check-config``, ``--print-config``.

Real processes, as an operator starts them: ``python -m txsocketserver`` and
``twistd socketserver`` with a file, variables and a command line, checked by
what they print, their exit status and the requests they serve.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, connect, recv_line
from test_twistd_cli import (  # noqa: F401 - spawn: the fixture
    CLI,
    HERE,
    REPO,
    TCP,
    TWISTD,
    Spawn,
    spawn,
)
from test_workers import START, ask, wait_for_workers
from txsocketserver._config import tomllib

HANDLER = "worker_handlers:PidHandler"


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    """test_twistd_cli's process starter (its finalizer kills what it started)."""
    return spawn


def environment(**variables: str) -> dict[str, str]:
    """The test's environment without any configuration variable, plus *variables*."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TXSOCKETSERVER_") and name not in ("PORT", "WEB_CONCURRENCY")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO)])
    env.update(variables)
    return env


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m txsocketserver ARGV`` to its end (an action or an error)."""
    return subprocess.run(
        [*CLI, *argv],
        env=environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=START,
        cwd=REPO,
    )


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


FULL = """\
handler = "worker_handlers:PidHandler"
mode = "threading"
workers = 2
drain-timeout = 5
max-requests = 100
reuse-port = false

[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"
header-timeout = 4.5

[[listener]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
trusted-proxies = "10.0.0.0/8"
max-threads = 3
"""


def test_precedence_and_print_config_round_trip(tmp_path: Path) -> None:
    config = write(tmp_path / "app.toml", FULL)
    env = environment(TXSOCKETSERVER_DRAIN_TIMEOUT="7", WEB_CONCURRENCY="3")
    first = run("--config", config, "--max-requests", "50", "--print-config", env=env)
    assert first.returncode == 0, first.stderr
    printed = tomllib.loads(first.stdout)
    assert printed["drain-timeout"] == 7.0  # environment > file
    assert printed["workers"] == 3  # WEB_CONCURRENCY is the environment's --workers
    assert printed["max-requests"] == 50  # command line > file
    assert printed["mode"] == "threading"  # file > default
    assert printed["header-timeout"] == 10.0  # the default
    assert printed["listener"] == [
        {"endpoint": "tcp:0:interface=127.0.0.1", "header-timeout": 4.5},
        {
            "endpoint": "haproxy:tcp:0:interface=127.0.0.1",
            "trusted-proxies": "10.0.0.0/8",
            "max-threads": 3,
        },
    ]
    # What it printed, read back with nothing else, is the same configuration.
    again = run("--config", write(tmp_path / "printed.toml", first.stdout), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_environment_variables(tmp_path: Path) -> None:
    config = write(tmp_path / "app.toml", FULL)
    env = environment(TXSOCKETSERVER_WORKERS="4", WEB_CONCURRENCY="3",
                      TXSOCKETSERVER_REUSE_PORT="true", PORT="8123")  # fmt: skip
    printed = tomllib.loads(run("--config", config, "--print-config", env=env).stdout)
    assert printed["workers"] == 4  # TXSOCKETSERVER_WORKERS beats WEB_CONCURRENCY
    assert printed["reuse-port"] is True
    assert len(printed["listener"]) == 2  # the file gives listeners: PORT is not used
    # PORT and a handler from the environment alone make a configuration.
    env = environment(PORT="8123", TXSOCKETSERVER_HANDLER=HANDLER)
    alone = run("--print-config", env=env)
    assert alone.returncode == 0, alone.stderr
    assert tomllib.loads(alone.stdout)["listener"] == [{"endpoint": "tcp:8123"}]
    # TXSOCKETSERVER_CONFIG names the file when --config does not.
    named = run("--print-config", env=environment(TXSOCKETSERVER_CONFIG=config))
    assert tomllib.loads(named.stdout)["mode"] == "threading", named.stderr
    # A --listen on the command line replaces the file's listeners.
    cli = run("--config", config, "--listen", "tcp:0", "--print-config")
    assert tomllib.loads(cli.stdout)["listener"] == [{"endpoint": "tcp:0"}], cli.stderr


def test_check_config_accepts_a_good_configuration(tmp_path: Path) -> None:
    result = run("--config", write(tmp_path / "app.toml", FULL), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_config_lists_every_problem_with_its_place(tmp_path: Path) -> None:
    config = write(
        tmp_path / "bad.toml",
        'handler = "worker_handlers:NoSuchHandler"\n'  # 1
        "workers = \"two\"\n"  # 2
        "drain_timeout = 5\n"  # 3
        "\n"
        "[[listener]]\n"  # 5
        'endpoint = "tcp:notaport"\n'  # 6
        "header-timeout = -1\n"  # 7
        "colour = 1\n"  # 8
        "\n"
        "[[listener]]\n"  # 10
        'endpoint = "ssl:0:privateKey=/no/key.pem:certKey=/no/cert.pem"\n',  # 11
    )
    env = environment(TXSOCKETSERVER_MAX_REQUESTS="many")
    result = run("--config", config, "--check-config", env=env)
    assert result.returncode == 2, result
    report = result.stderr
    for expected in [
        rf"{config}:1: .*NoSuchHandler",
        rf"{config}:2: workers = 'two': expected an integer",
        rf"{config}:3: unknown option 'drain_timeout' \(did you mean 'drain-timeout'\?\)",
        rf"{config}:6: bad endpoint description 'tcp:notaport'.*expected an endpoint",
        rf"{config}:7: header-timeout: -1: expected a positive number",
        rf"{config}:8: unknown option 'colour' in \[\[listener\]\]",
        rf"{config}:11: .*no such file '/no/key.pem'",
        rf"{config}:11: .*no such file '/no/cert.pem'",
        r"environment TXSOCKETSERVER_MAX_REQUESTS: max-requests: .*many",
    ]:
        assert re.search(expected, report), (expected, report)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('handler = "x\nworkers = 2\n', r":1: not valid TOML: .*line 1"),
        ("workers = 2\nworkers = 3\n", r":2: not valid TOML"),
        ("max-threads = 2.5\n", r":1: max-threads = 2.5: expected an integer"),
        ("reuse-port = 1\n", r":1: reuse-port = 1: expected true or false"),
        ('listen = "unix"\n', r":1: bad endpoint description 'unix'"),
        ('[colours]\nname = "x"\n', r":1: unknown option 'colours'"),
        ('[server]\nname = "x"\n', r":1: server = .*: expected a string"),
    ],
)
def test_bad_input_exits_2_before_anything_listens(
    tmp_path: Path, content: str, expected: str
) -> None:
    socket_path = tmp_path / "app.sock"
    if "listen" not in content:
        content += f'\n[[listener]]\nendpoint = "unix:{socket_path}"\n'
    config = write(tmp_path / "app.toml", content)
    result = run("--config", config, "--handler", HANDLER)
    assert result.returncode == 2, result
    assert re.search(re.escape(config) + expected, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not socket_path.exists()  # nothing listened


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.toml", tmp_path):  # absent; a directory
        result = run("--config", str(path), "--listen", TCP, "--handler", HANDLER)
        assert result.returncode == 2, result
        assert f"{path}: cannot read the --config file" in result.stderr


def test_served_from_the_file_with_per_listener_options(cli: Spawn, tmp_path: Path) -> None:
    """Two listeners, one of which trusts no PROXY header from loopback."""
    config = write(tmp_path / "app.toml", f"""\
handler = "{HANDLER}"
workers = 1
mode = "threading"

[[listener]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"

[[listener]]
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
trusted-proxies = "10.0.0.0/8"
""")  # fmt: skip
    server = cli(*CLI, "--config", config)
    both = re.compile(r"(?s)serving .* at 127\.0\.0\.1:\d+ .*at 127\.0\.0\.1:\d+ ")
    ports = [int(port) for port in re.findall(r" at 127\.0\.0\.1:(\d+) ",
                                              server.wait_for(both).group(0))]  # fmt: skip
    wait_for_workers(server, 1)
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n"
    with connect((LOCALHOST, ports[0])) as trusting:
        trusting.sendall(header + b"hi\n")
        assert b"192.0.2.7" in recv_line(trusting)
    with connect((LOCALHOST, ports[1])) as distrusting:
        distrusting.sendall(header + b"hi\n")
        distrusting.settimeout(WAIT)
        assert distrusting.recv(100) == b""  # refused: 127.0.0.1 is not in 10.0.0.0/8
    assert server.stop() == 0


def test_twistd_takes_the_same_file(cli: Spawn, tmp_path: Path) -> None:
    config = write(tmp_path / "app.toml", f"""\
handler = "{HANDLER}"
mode = "sync"
log-level = "info"  # python -m txsocketserver's own: twistd has its logging options
listen = ["{TCP}"]
""")  # fmt: skip
    server = cli(*TWISTD, "-n", "socketserver", "--config", config)
    address = server.address()
    assert ask(address)["pid"] == server.process.pid
    assert server.stop() in (0, -15)
    bad = write(tmp_path / "bad.toml", "workers = 0.5\n")
    result = subprocess.run([*TWISTD, "-n", "socketserver", "--config", bad],
                            env=environment(), capture_output=True, text=True,
                            timeout=START)  # fmt: skip
    assert result.returncode == 2, result
    assert f"{bad}:1: workers = 0.5: expected an integer" in result.stderr


def test_command_line_errors_keep_their_messages() -> None:
    result = run("--listen", TCP, "--handler", HANDLER, "--workers", "0")
    assert result.returncode == 2
    assert "error: --workers must be at least 1" in result.stderr


def test_an_option_from_the_file_failing_a_check_names_its_line(tmp_path: Path) -> None:
    config = write(tmp_path / "app.toml", f'handler = "{HANDLER}"\nlisten = ["{TCP}"]\n'
                                          "workers = 0\n")  # fmt: skip
    result = run("--config", config)
    assert result.returncode == 2
    assert f"{config}:3: --workers must be at least 1" in result.stderr, result.stderr


def test_the_configuration_files_in_the_docs_are_valid(tmp_path: Path) -> None:
    """Each TOML example of docs/operations.md: no unknown option, no wrong type."""
    from txsocketserver.__main__ import MainOptions
    from txsocketserver._config import Configuration

    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "docs" / "operations.md").read_text(),
                        re.DOTALL)  # fmt: skip
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        configuration = Configuration(MainOptions(), {})
        configuration.read_file(write(tmp_path / f"docs-{index}.toml", block))
        assert configuration.problems == [], block
        assert configuration.listeners, block


def test_help_answers_whatever_the_file_says(tmp_path: Path) -> None:
    result = run("--config", write(tmp_path / "bad.toml", "bogus = 1\n"), "--help")
    assert result.returncode == 0, result.stderr
    assert "--check-config" in result.stdout


def test_twistd_knows_which_options_are_python_m_s_alone() -> None:
    # The config file is shared by both front ends; twistd ignores the options
    # only `python -m txsocketserver` has.  The list is written in _cli (so
    # that _config imports neither front end): it must be exactly those.
    from txsocketserver import _config
    from txsocketserver.__main__ import MainOptions
    from txsocketserver._cli import Options

    only_main = set(_config.options_of(MainOptions())) - set(_config.options_of(Options()))
    assert set(Options.other_front_end_options) == only_main
    assert MainOptions.other_front_end_options == ()
