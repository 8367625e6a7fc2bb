"""A prepared tap's group: the kernel lets a process attach to a tap only if
it is the tap's owner *and* in its group (drivers/net/tun.c
tun_not_capable()), so a prepared tap given a group its requester is not in
could be opened by nobody but root."""

from __future__ import annotations

import os
from pathlib import Path

from tapdtest import run_daemon, taps
from test_prepare import U1, Vmm


def test_prepare_refuses_a_tap_group_the_requester_is_not_in(
    ns: str, br0: str, tmp_path: Path
) -> None:
    config = f"""
[[allow]]
users = ["{U1}"]
bridges = ["br0"]
tap_group = "4999"
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        os.chmod(os.path.dirname(daemon.socket_path), 0o755)
        os.chmod(daemon.socket_path, 0o666)
        vmm = Vmm(daemon, U1)
        try:
            got = vmm.prepare(br="br0", ifname="vm1")
            if got["ok"]:
                attached = vmm.ask({"attach": "vm1", "mq": False})
                assert attached["ok"], f"the requester cannot open its prepared tap: {attached}"
            else:
                assert got["code"] == "denied" and "4999" in got["message"], got
                assert taps(ns) == []
        finally:
            vmm.exit()
