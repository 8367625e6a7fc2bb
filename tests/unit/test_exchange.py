"""The shared wire modules and the clients' sans-IO core, fed by hand.

tapd.wire and tapd.scm are the one definition of the framing for both sides:
the daemon's names for them must be the very same objects.  An Exchange is
fed what recvmsg would return, piece by piece.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapd import aio, client, config, errors, exchange, fdpass, protocol, scm, tapctl, wire
from tapd.exchange import Exchange

# -- one definition ------------------------------------------------------------------------


def test_the_daemon_frames_with_the_shared_modules() -> None:
    assert protocol.LineBuffer is wire.LineBuffer
    assert protocol.MAX_LINE == wire.MAX_LINE == 64 * 1024
    assert protocol.loads_object is wire.loads_object
    assert protocol.decode_reply is wire.decode_reply
    assert fdpass.plan is scm.plan
    assert fdpass.unpack is scm.unpack
    assert fdpass.MAX_FDS_PER_MSG == scm.MAX_FDS_PER_MSG == 253
    assert fdpass.Received is scm.Received


def test_one_default_socket() -> None:
    assert config.DEFAULT_SOCKET == wire.DEFAULT_SOCKET == "/run/tapd.sock"
    assert config.ServerConfig().socket == wire.DEFAULT_SOCKET


def test_a_request_line_is_what_the_daemon_reads() -> None:
    line = wire.dumps_line({"op": "request", "br": "br0", "ifname": "tap\u00e9"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    request = protocol.decode_request(line[:-1])
    assert request.op == "request"


# -- client codes never collide with the daemon's ------------------------------------------


def subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def test_client_codes_are_never_wire_codes() -> None:
    # every code a reply can carry: the concrete classes' (abstract ones have none)
    wire_codes = {c.code for c in subclasses(errors.TapdError) if hasattr(c, "code")}
    assert {"owner-gone", "tap-leased", "timeout", "too-many-fds"} <= wire_codes
    local = {c.CODE for c in subclasses(exchange.LocalError)}
    # every client-side failure, tapctl's included, has a class and a code
    assert local >= {
        "unreachable", "client-timeout", "disconnected", "bad-reply", "reply-fds-dropped",
        "send-failed", "bad-netdev", "no-such-fd", "handoff-failed", "output-failed",
    }  # fmt: skip
    assert not local & wire_codes
    assert len(local) == len(list(subclasses(exchange.LocalError)))  # no two share one


def test_client_class_names_are_never_the_daemons() -> None:
    """A name means one thing: the daemon's ClientError is "the client's
    fault", so the client library's root is CallError."""
    daemon = {c.__name__ for c in [errors.TapdError, *subclasses(errors.TapdError)]}
    ours = {c.__name__ for c in [exchange.CallError, *subclasses(exchange.CallError)]}
    assert "BadNetdev" in ours  # tapctl's too
    assert not daemon & ours


def test_the_client_root_keeps_its_first_name() -> None:
    assert client.ClientError is client.CallError is exchange.CallError
    assert aio.ClientError is aio.CallError is client.CallError
    assert {"CallError", "ClientError"} <= set(client.__all__) & set(aio.__all__)


def test_the_local_base_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        exchange.LocalError("x")


def test_client_errors_are_one_family() -> None:
    assert issubclass(client.DaemonError, client.ClientError)
    assert issubclass(client.Timeout, client.LocalError)
    assert issubclass(tapctl.BadNetdev, client.LocalError)
    assert client.Timeout("x").code == "client-timeout"
    assert str(client.Unreachable("no")) == "no [unreachable]"


def test_a_socket_this_user_may_not_connect_to_says_who_may(tmp_path: Path) -> None:
    sock = tmp_path / "tapd.sock"
    sock.touch()
    sock.chmod(0o660)
    denied = exchange.connect_failed(str(sock), PermissionError(errno.EACCES, "Permission denied"))
    assert denied.code == "unreachable"
    assert "may not connect" in str(denied) and "is tapd running" not in str(denied)
    assert "mode 0660" in str(denied) and "group" in str(denied)
    gone = exchange.connect_failed(str(sock), FileNotFoundError(errno.ENOENT, "No such file"))
    assert "is tapd running?" in str(gone)


# -- an exchange ------------------------------------------------------------------------


def pipe_fds(n: int) -> list[int]:
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def chunk(data: bytes, fds: list[int] | None = None, truncated: bool = False) -> scm.Received:
    return scm.Received(data, fds or [], truncated)


def test_a_reply_in_pieces_with_fds_in_each() -> None:
    ex = Exchange({"op": "request", "br": "br0"})
    assert ex.line == b'{"op":"request","br":"br0"}\n'
    first, second = pipe_fds(2), pipe_fds(1)
    assert not ex.receive(chunk(b"{", first))
    assert not ex.receive(chunk(b'"ok":true,"fds":3', second))
    assert ex.receive(chunk(b"}\n"))
    reply, fds = ex.result()
    assert reply == {"ok": True, "fds": 3}
    assert fds == first + second
    ex.close()  # handed over: not closed
    assert all(is_open(fd) for fd in fds)
    scm.close_all(fds)


def test_an_error_reply_is_a_daemon_error_and_its_fds_are_closed() -> None:
    ex = Exchange({"op": "request"})
    fds = pipe_fds(1)
    with pytest.raises(client.DaemonError) as caught:
        ex.receive(chunk(b'{"ok":false,"error":{"code":"denied","message":"no"}}\n', fds))
    assert (caught.value.code, caught.value.message) == ("denied", "no")
    ex.close()
    assert not is_open(fds[0])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", client.Disconnected),
        (b"nonsense\n", client.BadReply),
        (b'{"ok":"yes"}\n', client.BadReply),
        (b'{"ok":true,"ok":true}\n', client.BadReply),
        (b"[1]\n", client.BadReply),
    ],
)
def test_what_is_no_reply(data: bytes, expected: type[client.LocalError]) -> None:
    ex = Exchange({"op": "hello"})
    fds = pipe_fds(1)
    with pytest.raises(expected):
        ex.receive(chunk(data, fds))
    ex.close()
    assert not is_open(fds[0])


def test_a_reply_that_never_ends_is_refused_at_the_limit() -> None:
    ex = Exchange({"op": "list"})
    piece = b"x" * 65536
    with pytest.raises(client.BadReply):
        for _ in range(exchange.REPLY_LIMIT // len(piece) + 1):
            ex.receive(chunk(piece))


def test_dropped_fds_close_the_rest() -> None:
    ex = Exchange({"op": "request"})
    fds = pipe_fds(2)
    with pytest.raises(client.ReplyFdsDropped):
        ex.receive(chunk(b'{"ok":true,"fds":3}\n', fds, truncated=True))
    ex.close()
    assert not any(is_open(fd) for fd in fds)


@pytest.mark.parametrize(
    ("reply", "n"),
    [({"ok": True, "fds": 2}, 1), ({"ok": True, "fds": 1, "vhostfds": 1}, 1),
     ({"ok": True, "fds": "x"}, 1), ({"ok": True, "fds": -1, "vhostfds": 2}, 1)],
)  # fmt: skip
def test_a_grant_whose_fds_do_not_add_up(reply: dict[str, object], n: int) -> None:
    fds = pipe_fds(n)
    with pytest.raises(client.BadReply):
        exchange.tap_grant(dict(reply), fds)
    assert not any(is_open(fd) for fd in fds)


def test_a_grant_splits_tap_and_vhost_fds() -> None:
    grant = exchange.tap_grant({"ok": True, "ifname": "t", "fds": 2, "vhostfds": 1}, [7, 8, 9])
    assert (grant.tap_fds, grant.vhost_fds) == ([7, 8], [9])


def test_request_keys_are_qemus() -> None:
    assert exchange.tap_request({"br": "br0", "poll_us": 5, "queues": None}) == {
        "op": "request", "br": "br0", "poll-us": 5,
    }  # fmt: skip
    assert exchange.helper_request(None, False) == {"op": "bridge-helper", "vnet_hdr": False}


def test_a_grant_closes_as_a_context_manager() -> None:
    fds = pipe_fds(2)
    with client.TapGrant(reply={"ifname": "t"}, tap_fds=fds[:1], vhost_fds=fds[1:]) as grant:
        assert grant.netdev_args() == f"fds={fds[0]},vhost=on,vhostfds={fds[1]}"
    assert not any(is_open(fd) for fd in fds)
    assert grant.tap_fds == []


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_a_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        exchange.check_timeout(timeout)
