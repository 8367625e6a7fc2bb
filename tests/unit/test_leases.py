"""Lease tags survive a round trip through an interface alias; the registry
counts and scopes leases per uid."""

from __future__ import annotations

import pytest

from tapd.leases import IFALIASZ, TAG_PREFIX, Lease, Registry, new_id, parse_tag


def lease(index: int = 7, uid: int = 1000, **kw: object) -> Lease:
    fields: dict[str, object] = dict(
        id=new_id(), ifname=f"tap{index}", ifindex=index, bridge="br0", queues=4, uid=uid,
        gid=100, pid=4242, starttime=123456789, created=1_700_000_000, downscript="down",
    )  # fmt: skip
    fields.update(kw)
    return Lease(**fields)  # type: ignore[arg-type]


def test_a_tag_gives_back_the_lease() -> None:
    original = lease()
    tag = original.tag()
    assert tag.startswith(TAG_PREFIX + " ")
    assert parse_tag(original.ifindex, original.ifname, tag) == original


def test_the_longest_tag_fits_an_interface_alias() -> None:
    longest = lease(
        uid=2**32 - 1, gid=2**32 - 1, pid=2**22, starttime=2**63, created=2**40,
        bridge="b" * 15, queues=256, downscript="d" * 64,
    )  # fmt: skip
    assert len(longest.tag().encode()) < IFALIASZ


@pytest.mark.parametrize(
    "alias",
    [
        None,
        "",
        "uplink to the core",
        "tapd:0 id=x",  # another format version
        TAG_PREFIX,  # no fields
        TAG_PREFIX + " id=abc br=br0 q=1 uid=0 gid=0 pid=1 start=1",  # created missing
        TAG_PREFIX + " id=abc br=br0 q=one uid=0 gid=0 pid=1 start=1 created=1",
    ],
)
def test_anything_else_in_an_alias_is_not_a_lease(alias: str | None) -> None:
    assert parse_tag(3, "tap3", alias) is None


def test_no_downscript_is_none_after_a_round_trip() -> None:
    original = lease(downscript=None)
    assert "down=" not in original.tag()
    restored = parse_tag(original.ifindex, original.ifname, original.tag())
    assert restored is not None and restored.downscript is None


def test_registry_counts_per_uid_as_leases_come_and_go() -> None:
    reg = Registry()
    a, b, c = lease(1, uid=10), lease(2, uid=10), lease(3, uid=20)
    for x in (a, b, c):
        reg.add(x)
    assert (reg.held_by(10), reg.held_by(20), reg.held_by(30), len(reg)) == (2, 1, 0, 3)
    assert reg.pop(1) is a
    assert reg.pop(1) is None
    assert (reg.held_by(10), len(reg)) == (1, 2)
    # the same interface index leased again replaces, never double-counts
    reg.add(lease(2, uid=20))
    assert (reg.held_by(10), reg.held_by(20)) == (0, 2)


def test_a_uid_sees_and_finds_only_its_own_leases_and_root_sees_all() -> None:
    reg = Registry()
    mine, theirs = lease(1, uid=10, created=1), lease(2, uid=20, created=2)
    reg.add(theirs)
    reg.add(mine)
    assert reg.visible_to(10) == [mine]
    assert reg.visible_to(0) == [mine, theirs]  # oldest first
    assert reg.find(10, mine.id) is mine and reg.find(10, mine.ifname) is mine
    assert reg.find(10, theirs.id) is None and reg.find(10, theirs.ifname) is None
    assert reg.find(0, theirs.ifname) is theirs
