"""The daemon's edges without root: exit statuses, no tracebacks, and what it
does with a configuration it cannot use while systemd holds its socket."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio

from tapd import client, daemon, log
from tapd.config import ConfigError, load
from tapd.listen import Listener
from tapd.sdnotify import Notifier


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    log.configure()


def test_an_unexpected_error_is_one_line_and_a_non_zero_exit(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise RuntimeError("the kernel said something new")

    monkeypatch.setattr(daemon, "_raise_fd_limit", broken)
    assert daemon.main(["--config", "/nonexistent"]) == daemon.EXIT_BUG
    out, err = capfd.readouterr()
    assert out == ""
    assert "Traceback" not in err
    (line,) = err.splitlines()
    event = json.loads(line)
    assert event["event"] == "tapd.crashed"
    assert event["level"] == "critical"
    assert event["error"] == "RuntimeError: the kernel said something new"
    assert event["at"].endswith("test_daemon.py:" + str(broken.__code__.co_firstlineno + 1))


def test_an_error_inside_a_group_is_named_by_its_first_member(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise ExceptionGroup("tasks", [OSError(5, "Input/output error")])

    monkeypatch.setattr(daemon, "_raise_fd_limit", broken)
    assert daemon.main([]) == daemon.EXIT_BUG
    (line,) = capfd.readouterr().err.splitlines()
    assert json.loads(line)["error"] == "OSError: [Errno 5] Input/output error"


def test_check_config_ranks_its_problems_as_errors_in_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "tapd.toml"
    bad.write_text("[server]\nbogus = 1\n[taps]\nnope = 2\n")
    st = os.fstat(2)  # capfd's file: what systemd would have connected
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert daemon.main(["--check-config", str(bad)]) == daemon.EXIT_CHECK_FAILED
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"<3>{bad}: ") for line in lines)
    monkeypatch.delenv("JOURNAL_STREAM")
    assert daemon.main(["--check-config", str(bad)]) == daemon.EXIT_CHECK_FAILED
    assert all(line.startswith(f"{bad}: ") for line in capfd.readouterr().err.splitlines())


def test_a_bad_file_outside_socket_activation_is_an_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "tapd.toml"
    bad.write_text("bogus = 1\n")
    monkeypatch.setattr(daemon, "_raise_fd_limit", lambda: None)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert daemon.main(["--config", str(bad)]) == daemon.EXIT_CANNOT_START
    events = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [("config.invalid", "error")]
    assert "bogus" in events[0]["problem"]


async def test_unconfigured_answers_config_invalid_until_a_reload_brings_a_good_file(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "tapd.toml"
    cfg.write_text("[server]\nbogus = 1\n")
    try:
        load(str(cfg))
    except ConfigError as exc:
        error = exc
    path = str(tmp_path / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    listener = Listener(sock=sock, source="systemd")
    got: list[object] = []

    async def serve() -> None:
        got.append(await daemon._unconfigured(listener, error, Notifier({})))

    async def refused() -> None:
        with pytest.raises(client.ClientError) as caught:
            await trio.to_thread.run_sync(
                lambda: client.call({"op": "request", "br": "br0"}, path=path)
            )
        assert caught.value.code == "config-invalid"
        assert str(cfg) in caught.value.message

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        # Answered: its signal receiver is open (it is, before it accepts).
        for _ in range(3):
            await refused()
        # Still bad on SIGHUP: it goes on as it was.
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(3):
            await refused()
        assert got == []
        cfg.write_text("[server]\nrequest_timeout = 5.0\n")
        os.kill(os.getpid(), signal.SIGHUP)
    sock.close()
    (config,) = got
    assert config is not None and config.server.request_timeout == 5.0


class _Said(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.lines: list[str] = []

    def notify(self, *lines: str) -> None:
        self.lines += lines


async def test_status_follows_the_lease_count(autojump_clock: trio.abc.Clock) -> None:
    leases: list[str] = []
    said = _Said()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._lease_status, said, leases)
        # Half a period out of step with its wake-ups, so that no two coincide.
        await trio.sleep(5.5 * daemon.STATUS_SECONDS)
        assert said.lines == []  # nothing changed, nothing said
        leases.append("a")
        await trio.sleep(daemon.STATUS_SECONDS)
        leases += ["b", "c"]
        await trio.sleep(daemon.STATUS_SECONDS)
        leases.clear()
        await trio.sleep(daemon.STATUS_SECONDS)
        nursery.cancel_scope.cancel()
    assert said.lines == [
        "STATUS=serving, 1 lease",
        "STATUS=serving, 3 leases",
        "STATUS=serving, 0 leases",
    ]
