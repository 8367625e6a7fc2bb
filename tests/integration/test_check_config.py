"""``tapd --check-config``: every kind of mistake is named with its file and key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tapdtest import daemon_argv

REPO = Path(__file__).resolve().parents[2]


def check(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        daemon_argv("--check-config", str(path)),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


def test_the_example_configuration_is_valid() -> None:
    example = REPO / "config" / "tapd.toml"
    done = check(example)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{example}: ok"
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        pytest.param(
            "[server]\nbogus = 1\n",
            ["server.bogus", "unknown key", "socket, socket_mode, socket_group, max_connections"],
            id="unknown-key",
        ),
        pytest.param(
            "bogus = 1\n",
            ["bogus", "unknown key", "server, taps, vhost, programs, allow, deny"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            '[server]\nsocket_mode = "0999"\n',
            ["server.socket_mode", "'0999'", "octal"],
            id="socket-mode-not-octal",
        ),
        pytest.param(
            '[server]\nsocket_mode = "07777"\n',
            ["server.socket_mode", "0777"],
            id="socket-mode-out-of-range",
        ),
        pytest.param(
            "[server]\nsocket_mode = 660\n",
            ["server.socket_mode"],
            id="socket-mode-a-number",
        ),
        pytest.param(
            '[server]\nsocket_group = "no-such-group-tapd"\n',
            ["server.socket_group", "no group 'no-such-group-tapd'"],
            id="unknown-socket-group",
        ),
        pytest.param(
            '[[allow]]\nbridges = ["*"]\nusers = ["no-such-user-tapd"]\n',
            ["allow[0].users[0]", "no user 'no-such-user-tapd'"],
            id="unknown-user",
        ),
        pytest.param(
            '[[allow]]\nbridges = ["*"]\nusers = ["0"]\n'
            '[[allow]]\nbridges = ["*"]\ngroups = ["0", "no-such-group-tapd"]\n',
            ["allow[1].groups[1]", "no group 'no-such-group-tapd'"],
            id="unknown-group",
        ),
        pytest.param(
            '[[allow]]\nbridges = ["*"]\nusers = ["0"]\ntap_group = "no-such-group-tapd"\n',
            ["allow[0].tap_group", "no group 'no-such-group-tapd'"],
            id="unknown-tap-group",
        ),
        pytest.param(
            '[[allow]]\nbridges = ["br0"]\n',
            ["allow[0]", "matches nobody"],
            id="allow-rule-matching-nobody",
        ),
        pytest.param(
            '[[allow]]\nusers = ["0"]\n',
            ["allow[0].bridges", "missing", '"*" for every one'],
            id="allow-rule-without-bridges",
        ),
        pytest.param(
            "[[deny]]\nusers = []\ngroups = []\n",
            ["deny[0]", "matches nobody"],
            id="deny-rule-matching-nobody",
        ),
        pytest.param(
            '[[allow]]\nusers = ["0"]\nbridges = []\n',
            ["allow[0]", "no bridge"],
            id="rule-matching-no-bridge",
        ),
        pytest.param(
            '[[deny]]\nusers = ["0"]\nmax_taps = 2\n',
            ["deny[0].max_taps", "unknown key", "users, groups, bridges"],
            id="deny-rule-with-max-taps",
        ),
        pytest.param(
            '[[allow]]\nbridges = ["*"]\nusers = ["0"]\nmax_queues = 257\n',
            ["allow[0].max_queues", "256"],
            id="max-queues-over-the-kernels",
        ),
        pytest.param(
            '[[allow]]\nusers = ["0"]\nbridges = ["../etc"]\n',
            ["allow[0].bridges[0]", "'../etc'"],
            id="bridge-pattern-a-path",
        ),
        pytest.param(
            '[programs]\nhelpers = { qbh = "/etc/passwd" }\n',
            ["programs.helpers.qbh", "'/etc/passwd' is not an executable file"],
            id="helper-not-executable",
        ),
        pytest.param(
            '[programs]\nhooks = { up = "/nonexistent/up.sh" }\n',
            ["programs.hooks.up", "not an executable file"],
            id="hook-missing",
        ),
        pytest.param(
            '[programs]\nhelpers = { qbh = "bin/true" }\n',
            ["programs.helpers.qbh", "not an absolute path"],
            id="helper-relative-path",
        ),
        pytest.param(
            '[programs]\nhelpers = { qbh = "/" }\n',
            ["programs.helpers.qbh", "not an executable file"],
            id="helper-a-directory",
        ),
        pytest.param(
            '[taps]\nname_template = "tap"\n',
            ["taps.name_template", "{rand}"],
            id="name-template-without-rand",
        ),
        pytest.param(
            '[taps]\nname_template = "vm-{rand}-{uid}"\n',
            ["taps.name_template", "15"],
            id="name-template-too-long",
        ),
        pytest.param(
            "[server\nsocket = 1\n",
            ["not valid TOML"],
            id="invalid-toml",
        ),
        pytest.param(
            '[server]\nsocket = "/a"\n[server]\nsocket = "/b"\n',
            ["not valid TOML"],
            id="section-twice",
        ),
    ],
)
def test_each_mistake_is_named_with_the_file_and_key(
    tmp_path: Path, text: str, mentions: list[str]
) -> None:
    path = tmp_path / "tapd.toml"
    path.write_text(text)
    done = check(path)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines, "no message at all"
    assert all(line.startswith(f"{path}: ") for line in lines), done.stderr
    for mention in mentions:
        assert mention in done.stderr, (mention, done.stderr)


def test_every_problem_in_a_file_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "tapd.toml"
    path.write_text(
        '[server]\nbogus = 1\nsocket_mode = "9"\n'
        '[[allow]]\nbridges = ["*"]\nusers = ["no-such-user-tapd"]\n'
    )
    done = check(path)
    assert done.returncode != 0
    problems = done.stderr.splitlines()
    assert len(problems) == 3, done.stderr
    for key in ("server.bogus", "server.socket_mode", "allow[0].users[0]"):
        assert sum(key in line for line in problems) == 1, (key, done.stderr)


@pytest.mark.parametrize(
    ("content", "mentions"),
    [
        pytest.param(None, "cannot read it: No such file or directory", id="missing"),
        pytest.param(b'[server]\nsocket = "\xff"\n', "not UTF-8", id="not-utf8"),
    ],
)
def test_a_file_that_cannot_be_read(tmp_path: Path, content: bytes | None, mentions: str) -> None:
    path = tmp_path / "tapd.toml"
    if content is not None:
        path.write_bytes(content)
    done = check(path)
    assert done.returncode != 0
    assert done.stderr.strip() == f"{path}: {mentions}" or (
        done.stderr.startswith(f"{path}: ") and mentions in done.stderr
    ), done.stderr


def test_a_directory_is_not_a_configuration(tmp_path: Path) -> None:
    done = check(tmp_path)
    assert done.returncode != 0
    assert done.stderr.startswith(f"{tmp_path}: cannot read it"), done.stderr
