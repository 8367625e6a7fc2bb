"""The kernel stage is the kernel the README installs on: Debian 12's own,
with the two features this machine's kernel lacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from guest import _default_cache_dir, _find_kernel, _kernel_root
from tapdtest import ip, netns


@pytest.mark.vhost_net
@pytest.mark.vlan_filtering
def test_the_stage_is_debian_s_kernel_with_vhost_net_and_vlan_filtering() -> None:
    assert os.environ.get("TAPD_KERNEL_STAGE") == "1"
    _, moddir = _find_kernel(_kernel_root(_default_cache_dir()))
    assert os.uname().release == moddir.name
    assert Path("/dev/vhost-net").is_char_device()
    with netns() as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge", "vlan_filtering", "1")
        assert "vlan_filtering 1" in ip("-n", ns, "-d", "link", "show", "br0").stdout
