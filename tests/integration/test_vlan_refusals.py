"""A rule with VLANs on a bridge that does not filter them, against the
host's kernel (which has no bridge VLAN filtering at all, so it reports none):
refused with what to do, and nothing made.  What a filtering bridge does is
the kernel stage's (tests/kernel/test_vlan_bridge.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tapdtest import ip, run_daemon, taps

from tapd import client

CONFIG = """
[[allow]]
users = ["0"]
bridges = ["br0"]
vlan = [10, 20]

[[allow]]
users = ["0"]
bridges = ["br1"]
"""


def test_vlans_on_a_bridge_that_does_not_filter_them_are_refused(
    ns: str, br0: str, tmp_path: Path
) -> None:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    with run_daemon(ns, tmp_path, CONFIG) as daemon:
        with pytest.raises(client.ClientError) as off:
            daemon.request(br="br0")
        assert off.value.code == "vlan-filtering-off"
        assert "ip link set br0 type bridge vlan_filtering 1" in str(off.value)
        with pytest.raises(client.ClientError) as prepared:
            client.prepare_tap(path=daemon.socket_path, br="br0", vlan=20)
        assert prepared.value.code == "vlan-filtering-off"
        with pytest.raises(client.ClientError) as unset:
            daemon.request(br="br1", vlan=10)
        assert unset.value.code == "vlan-not-configured"
        assert taps(ns) == [] and daemon.leases() == []
        # A rule without VLANs still serves, its port as the bridge makes it.
        with daemon.request(br="br1") as grant:
            assert "vlan" not in grant.reply and "vlan" not in daemon.leases()[0]
