"""Telling what an fd is from procfs alone (no call into the file)."""

from __future__ import annotations

import os
import socket

from tapd import fdinfo


def test_a_pipe_is_neither_a_socket_nor_a_tun_queue() -> None:
    r, w = os.pipe()
    try:
        assert fdinfo.link(r).startswith("pipe:[")
        assert not fdinfo.is_socket(r)
        assert fdinfo.tun_name(r) is None
    finally:
        os.close(r)
        os.close(w)


def test_a_socket_is_told_by_its_link() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert fdinfo.is_socket(a.fileno())
        assert fdinfo.tun_name(a.fileno()) is None


def test_a_closed_fd_is_nothing() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert fdinfo.link(r) == "" and fdinfo.tun_name(r) is None and not fdinfo.is_socket(r)


def test_a_regular_file_is_not_a_tun_queue() -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert fdinfo.link(fd).endswith("/status")
        assert fdinfo.tun_name(fd) is None
    finally:
        os.close(fd)
