"""fd passing: cutting a line into pieces of at most SCM_MAX_FD fds, and
sending many fds over a real UNIX socket pair.

include/net/scm.h: SCM_MAX_FD is 253; the 254th fd in one sendmsg is EINVAL.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from tapd import fdpass

SCM_MAX_FD = 253
LINE = b'{"ok":true,"ifname":"tap0","fds":600}\n'


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.fixture
def pipe_end() -> Iterator[int]:
    r, w = os.pipe()
    os.close(w)
    yield r
    os.close(r)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


# -- plan() ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 252, 253, 254, 506, 507, 600, 1000])
def test_plan(count: int) -> None:
    fds = list(range(1000, 1000 + count))
    pieces = fdpass.plan(LINE, fds)
    assert all(len(run) <= SCM_MAX_FD for _, run in pieces)
    assert [fd for _, run in pieces for fd in run] == fds
    assert b"".join(data for data, _ in pieces) == LINE
    assert all(data for data, _ in pieces)  # a stream carries no empty message
    assert pieces[-1][0].endswith(b"\n")
    assert not any(b"\n" in data for data, _ in pieces[:-1])
    assert len(pieces) == max(1, -(-count // SCM_MAX_FD))


def test_plan_refuses_a_line_too_short_to_carry_the_fds() -> None:
    with pytest.raises(ValueError):
        fdpass.plan(b"\n", list(range(SCM_MAX_FD + 1)))


def test_unpack_keeps_whole_ints_of_scm_rights_only() -> None:
    rights = array.array("i", [7, 8, 9]).tobytes()
    ancdata = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, rights + b"\x01\x02"),
        (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [1, 2, 3]).tobytes()),
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [10]).tobytes()),
    ]
    assert fdpass.unpack(ancdata) == [7, 8, 9, 10]


# -- the kernel ---------------------------------------------------------------------------


def test_the_kernel_takes_exactly_scm_max_fd_in_one_message(
    pipe_end: int, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, _ = pair
    assert fdpass.MAX_FDS_PER_MSG == SCM_MAX_FD
    one_too_many = array.array("i", [pipe_end] * (SCM_MAX_FD + 1))
    with pytest.raises(OSError) as caught:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, one_too_many.tobytes())])
    assert caught.value.errno == errno.EINVAL
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, one_too_many[:-1].tobytes())])


def receive_line(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    try:
        while not data.endswith(b"\n"):
            got = fdpass.recv_sync(sock)
            fds.extend(got.fds)
            assert not got.truncated
            assert got.data, "peer closed before the newline"
            data += got.data
    except BaseException:
        close_all(fds)
        raise
    return data, fds


def test_600_fds_arrive_in_order_and_none_leak(
    pipe_end: int, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    inode = os.fstat(pipe_end).st_ino
    before = open_fds()

    sent = [os.dup(pipe_end) for _ in range(600)]
    try:
        fdpass.send_line_sync(a, LINE, sent)
    finally:
        close_all(sent)  # the kernel holds its own references in flight
    data, received = receive_line(b)
    try:
        assert data == LINE
        assert len(received) == 600
        assert len(set(received)) == 600
        assert all(os.fstat(fd).st_ino == inode for fd in received)
        # MSG_CMSG_CLOEXEC: received fds do not leak into children by accident.
        assert not any(os.get_inheritable(fd) for fd in received)
    finally:
        close_all(received)
    assert open_fds() == before


def read_ends(count: int) -> list[int]:
    ends = []
    for _ in range(count):
        r, w = os.pipe()
        os.close(w)
        ends.append(r)
    return ends


def test_distinct_fds_arrive_in_the_order_sent(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    # Three messages' worth of distinct pipes, told apart by inode.
    ends = read_ends(2 * SCM_MAX_FD + 10)
    try:
        inodes = [os.fstat(fd).st_ino for fd in ends]
        fdpass.send_line_sync(a, LINE, ends)
    finally:
        close_all(ends)
    data, received = receive_line(b)
    try:
        assert data == LINE
        assert [os.fstat(fd).st_ino for fd in received] == inodes
    finally:
        close_all(received)


def test_line_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fdpass.send_line_sync(a, LINE, [])
    assert receive_line(b) == (LINE, [])


async def test_async_send_and_receive(pipe_end: int) -> None:
    inode = os.fstat(pipe_end).st_ino
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    received: list[int] = []
    with a, b:
        sent = [os.dup(pipe_end) for _ in range(300)]
        try:
            await fdpass.send_line(a, LINE, sent)
        finally:
            close_all(sent)
        data = b""
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(lambda: close_all(received))
            while not data.endswith(b"\n"):
                got = await fdpass.recv(b)
                received.extend(got.fds)
                assert not got.truncated
                assert got.data
                data += got.data
            assert data == LINE
            assert [os.fstat(fd).st_ino for fd in received] == [inode] * 300
    assert open_fds() == before


async def test_async_send_waits_for_a_slow_reader_and_recv_for_data(
    pipe_end: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither side is ready at first: the receiver starts before anything
    was sent, and the line (a megabyte, with 300 fds) is far more than the
    socket buffers hold, so the sender meets EAGAIN and must wait for the
    reader, which takes its time."""
    waited: dict[str, int] = {"readable": 0, "writable": 0}
    for kind in waited:
        original = getattr(trio.lowlevel, f"wait_{kind}")

        async def counted(sock: object, kind: str = kind, original: object = original) -> None:
            waited[kind] += 1
            await original(sock)  # type: ignore[operator]

        monkeypatch.setattr(trio.lowlevel, f"wait_{kind}", counted)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(False)
    b.setblocking(False)
    line = b'{"pad":"' + b"x" * (1 << 20) + b'"}\n'
    received: list[int] = []
    data = bytearray()
    waits = 0

    async def read_slowly() -> None:
        nonlocal waits
        while not data.endswith(b"\n"):
            got = await fdpass.recv(b, 8192)
            assert not got.truncated and got.data
            received.extend(got.fds)
            data.extend(got.data)
            waits += 1
            if waits % 16 == 0:
                await trio.sleep(0.001)

    with a, b, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: close_all(received))
        sent = [os.dup(pipe_end) for _ in range(300)]
        cleanup.callback(lambda: close_all(sent))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await trio.sleep(0.01)  # the reader is waiting on an empty socket
            await fdpass.send_line(a, line, sent)
        assert bytes(data) == line
        assert len(received) == 300
        assert waits > 100  # it really came in many pieces
    # Both sides met EAGAIN and waited through trio, not by spinning.
    assert waited["readable"] >= 1 and waited["writable"] >= 1, waited
