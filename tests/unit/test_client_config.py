"""Where clients look for tapd: --socket, $TAPD_SOCKET, the system-wide
client setting (/etc/tapd/client.conf), then /run/tapd.sock."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapd import client, exchange


def test_the_client_setting_names_the_socket(tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text('# where tapd listens on this host\n\nsocket = "/run/tapd/tapd.sock"  # ours\n')
    assert exchange.configured_socket(str(conf)) == "/run/tapd/tapd.sock"
    conf.write_text("timeout = 5\nsocket=/srv/t.sock\n")
    assert exchange.configured_socket(str(conf)) == "/srv/t.sock"


@pytest.mark.parametrize("text", ["", "# socket = /x\n", "socket =\n", "sockets = /x\n"])
def test_a_setting_without_a_socket_names_none(tmp_path: Path, text: str) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text(text)
    assert exchange.configured_socket(str(conf)) is None


def test_no_file_names_none(tmp_path: Path) -> None:
    assert exchange.configured_socket(str(tmp_path / "absent")) is None


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text("socket = /from/conf\n")
    monkeypatch.setattr(exchange, "CLIENT_CONFIG", str(conf))
    monkeypatch.delenv(client.ENV_SOCKET, raising=False)
    assert client.socket_path() == "/from/conf"
    monkeypatch.setenv(client.ENV_SOCKET, "/from/env")
    assert client.socket_path() == "/from/env"
    assert client.socket_path("/from/flag") == "/from/flag"
    conf.unlink()
    monkeypatch.delenv(client.ENV_SOCKET)
    assert client.socket_path() == "/run/tapd.sock"
