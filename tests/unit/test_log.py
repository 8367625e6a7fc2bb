"""Log lines: every event named by a literal, and the line's priority when, and
only when, stderr is the journal."""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tapd import log


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    log.configure()


def stream_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_the_journal_is_the_stream_journal_stream_names(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        assert log.is_journal(stream, {"JOURNAL_STREAM": stream_id(path)})
        other = tmp_path / "other"
        other.touch()
        # Inherited from a parent whose stderr was the journal: not ours.
        assert not log.is_journal(stream, {"JOURNAL_STREAM": stream_id(other)})
        assert not log.is_journal(stream, {})
        for bad in ("", "12", "a:b", ":", "1:2:3"):
            assert not log.is_journal(stream, {"JOURNAL_STREAM": bad})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_in_the_journal_each_line_starts_with_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(path))
        log.configure(stream)
        logger = log.get(peer=1)
        logger.critical("a.critical")
        logger.error("a.error")
        logger.warning("a.warning")
        logger.info("a.info")
        try:
            raise ValueError("x")
        except ValueError:
            logger.exception("a.exception")
    lines = _lines(path)
    assert [line[:3] for line in lines] == ["<2>", "<3>", "<4>", "<6>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == [
        "a.critical", "a.error", "a.warning", "a.info", "a.exception",
    ]  # fmt: skip
    assert all(e["peer"] == 1 for e in events)


def test_elsewhere_the_lines_are_plain_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(other))
    with open(path, "w") as stream:
        log.configure(stream)
        log.get().error("an.error")
    (line,) = _lines(path)
    assert json.loads(line)["event"] == "an.error"
    assert log.prefix("error") == ""


# -- event names --------------------------------------------------------------------------

LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
#: thing.action[.outcome]: lowercase words, dotted
EVENT = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
PACKAGE = Path(log.__file__).parent


def _log_calls() -> Iterator[tuple[str, ast.Call]]:
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
            ):
                yield f"{path.name}:{node.lineno}", node


def test_the_walk_finds_the_log_calls() -> None:
    assert sum(1 for _ in _log_calls()) > 50


def test_every_event_is_named_by_a_literal() -> None:
    """So that grep finds every place an event is logged (an f-string such as
    f"request.{outcome}" hides request.denied from it)."""
    computed = [
        where
        for where, call in _log_calls()
        if not (
            call.args
            and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str)
        )
    ]
    assert computed == []


def test_every_event_is_named_thing_action() -> None:
    names = {
        where: call.args[0].value
        for where, call in _log_calls()
        if call.args and isinstance(call.args[0], ast.Constant)
    }
    assert {where: name for where, name in names.items() if not EVENT.match(str(name))} == {}
