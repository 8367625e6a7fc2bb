"""tapctl's placeholders, the client's QEMU arguments, and where the socket is.

A grant is built by hand: substitute() and netdev_args() only read its numbers.
"""

from __future__ import annotations

import pathlib
import socket
import time

import pytest

from tapd import client
from tapd.models import TapOptions
from tapd.options import check_qemu_rules
from tapd.tapctl import substitute


def grant(tap: list[int], vhost: list[int] | None = None, ifname: str = "tap7") -> client.TapGrant:
    return client.TapGrant(reply={"ok": True, "ifname": ifname}, tap_fds=tap, vhost_fds=vhost or [])


# -- substitute() -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("{fd}", "10"),
        ("{fds}", "10:11:12"),
        ("{vhostfd}", "20"),
        ("{vhostfds}", "20:21:22"),
        ("{ifname}", "tap7"),
        (
            "tap,id=n0,fds={fds},vhost=on,vhostfds={vhostfds}",
            "tap,id=n0,fds=10:11:12,vhost=on,vhostfds=20:21:22",
        ),
        ("{fd},{fd}", "10,10"),
        ("{fd}{fds}{ifname}", "1010:11:12tap7"),
        ('{"a": 1}', '{"a": 1}'),
        ("{other}", "{other}"),
        ("{FD}", "{FD}"),
        ("{ fd }", "{ fd }"),
        ("{{fd}}", "{10}"),
        ("no placeholders", "no placeholders"),
        ("", ""),
    ],
)
def test_substitute(arg: str, expected: str) -> None:
    assert substitute([arg], grant([10, 11, 12], [20, 21, 22])) == [expected]


def test_substitute_keeps_every_argument_in_place() -> None:
    args = ["qemu-system-x86_64", "-netdev", "tap,id=n0,fd={fd}", "-name", "{ifname}"]
    assert substitute(args, grant([3])) == [
        "qemu-system-x86_64",
        "-netdev",
        "tap,id=n0,fd=3",
        "-name",
        "tap7",
    ]


def test_substitute_with_one_tap_fd() -> None:
    assert substitute(["{fd}", "{fds}"], grant([3])) == ["3", "3"]


@pytest.mark.parametrize("placeholder", ["{vhostfd}", "{vhostfds}"])
def test_vhost_placeholder_without_vhost_fds(placeholder: str) -> None:
    with pytest.raises(client.ClientError) as caught:
        substitute(["fd={fd}", f"x={placeholder}"], grant([3]))
    assert placeholder in caught.value.message


def test_no_vhost_placeholder_needs_no_vhost_fds() -> None:
    assert substitute(["fd={fd}", '{"vhost": false}'], grant([3])) == ["fd=3", '{"vhost": false}']


# -- TapGrant.netdev_args() ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tap", "vhost", "expected"),
    [
        ([3], [], "fd=3"),
        ([3, 4], [], "fds=3:4"),
        ([3, 4], [5, 6], "fds=3:4,vhost=on,vhostfds=5:6"),
        ([3], [5], "fds=3,vhost=on,vhostfds=5"),
    ],
)
def test_netdev_args(tap: list[int], vhost: list[int], expected: str) -> None:
    assert grant(tap, vhost).netdev_args() == expected


def as_options(netdev_args: str) -> TapOptions:
    fields: dict[str, object] = {}
    for item in netdev_args.split(","):
        key, value = item.split("=", 1)
        fields[key] = {"on": True, "off": False}.get(value, value)
    return TapOptions.model_validate(fields)


@pytest.mark.parametrize(
    ("tap", "vhost"), [([3], []), ([3, 4], []), ([3, 4, 5], [6, 7, 8]), ([3], [4])]
)
def test_netdev_args_are_options_qemu_accepts(tap: list[int], vhost: list[int]) -> None:
    options = as_options(grant(tap, vhost).netdev_args())
    check_qemu_rules(options)
    names = (options.fds or options.fd or "").split(":")
    assert names == [str(fd) for fd in tap]


# -- socket_path() -------------------------------------------------------------------------


def test_explicit_path_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPD_SOCKET", "/from/env.sock")
    assert client.socket_path("/explicit.sock") == "/explicit.sock"


def test_environment_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPD_SOCKET", "/from/env.sock")
    assert client.socket_path() == "/from/env.sock"
    assert client.socket_path(None) == "/from/env.sock"


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAPD_SOCKET", raising=False)
    assert client.socket_path() == "/run/tapd.sock"


def test_empty_environment_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPD_SOCKET", "")
    assert client.socket_path() == "/run/tapd.sock"


def test_a_silent_daemon_times_out(tmp_path: pathlib.Path) -> None:
    """The client's timeout is kept by the kernel (SO_RCVTIMEO): a daemon
    that takes the request and never answers gives a timeout error in about
    that time, not a hang."""
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(client.ClientError) as caught:
            client.call({"op": "hello"}, path=path, timeout=0.3)
        waited = time.monotonic() - start
    # the client's own code: the daemon's "timeout" means a request sent too slowly
    assert isinstance(caught.value, client.Timeout)
    assert caught.value.code == "client-timeout"
    assert 0.25 <= waited < 5


def test_a_missing_socket_is_unreachable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(client.ClientError) as caught:
        client.call({"op": "hello"}, path=str(tmp_path / "nothing"), timeout=0.3)
    assert isinstance(caught.value, client.Unreachable)
    assert caught.value.code == "unreachable"
