"""What procfs says about a tun fd (tests/unit/test_fdinfo.py has the rest;
/dev/net/tun opens for root only)."""

from __future__ import annotations

import os

from tapd import fdinfo


def test_a_tun_fd_attached_to_nothing_names_no_interface() -> None:
    # The tun driver prints "iff:\t" with an empty name before TUNSETIFF.
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            assert b"iff:\t\n" in f.read()
        assert fdinfo.tun_name(fd) is None
    finally:
        os.close(fd)
