"""The daemon reaches its first tap without importing pyroute2 (0.9's import
pulls in asyncio, ssl and multiprocessing: two fifths of the daemon's start),
which it loads only when a fence, a rate or a VLAN first needs IPRoute."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import tapd.daemon
from tapd.netlink import Netlink
nl = Netlink()
lo = nl.link(name="lo")
assert lo is not None and nl.link(index=lo.index).name == "lo", lo
assert any(link.name == "lo" for link in nl.links())
assert nl.link(name="nosuch-link0") is None
nl.tagged_taps(), nl.present(), nl.addresses(), nl.orphan_ifbs()
print(sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2"))
"""


def test_the_daemon_and_its_link_lookups_load_no_pyroute2() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
