"""Who may have a tap on which bridge.

Uses accounts every Debian system has: user root (0) and nobody (65534),
group root (0) and nogroup (65534).
"""

from __future__ import annotations

import pytest

from tapd.config import AllowRule, Config, DenyRule
from tapd.errors import Denied, QuotaExceeded
from tapd.owner import Peer
from tapd.policy import Decision, Policy

ROOT = Peer(uid=0, gid=0, pid=100)
NOBODY = Peer(uid=65534, gid=65534, pid=200)
USER = Peer(uid=1000, gid=1000, pid=300)
USER_IN_NOGROUP = Peer(uid=1000, gid=1000, pid=301, groups=(27, 65534))


def check(cfg: Config, peer: Peer, bridge: str = "br0", queues: int = 1, held: int = 0) -> Decision:
    return Policy(cfg).check(peer, bridge, queues, held)


def allow(*rules: AllowRule) -> Config:
    return Config(allow=rules)


def denied(cfg: Config, peer: Peer, bridge: str = "br0", queues: int = 1) -> str:
    with pytest.raises(Denied) as caught:
        check(cfg, peer, bridge, queues)
    assert caught.value.code == "denied"
    return caught.value.message


@pytest.mark.parametrize(
    ("users", "peer"),
    [
        (("root",), ROOT),
        (("0",), ROOT),
        (("nobody",), NOBODY),
        (("65534",), NOBODY),
        (("1000",), USER),  # a uid needs no passwd entry
        (("root", "nobody"), NOBODY),
    ],
)
def test_users_by_name_or_id(users: tuple[str, ...], peer: Peer) -> None:
    assert check(allow(AllowRule(users=users, bridges=("*",))), peer).rule == "allow[0]"


@pytest.mark.parametrize(
    ("users", "peer"),
    [
        (("root",), NOBODY),
        (("65534",), ROOT),
        (("nobody",), Peer(uid=1000, gid=65534, pid=1)),  # a gid is not a uid
    ],
)
def test_users_that_do_not_match(users: tuple[str, ...], peer: Peer) -> None:
    denied(allow(AllowRule(users=users, bridges=("*",))), peer)


@pytest.mark.parametrize(
    ("groups", "peer"),
    [
        (("nogroup",), NOBODY),  # primary gid
        (("65534",), NOBODY),
        (("nogroup",), USER_IN_NOGROUP),  # supplementary group
        (("65534",), USER_IN_NOGROUP),
        (("root",), ROOT),
        (("0",), Peer(uid=1000, gid=1000, pid=1, groups=(0,))),
        (("1000",), USER),  # a gid needs no group entry
    ],
)
def test_groups_by_primary_or_supplementary_gid(groups: tuple[str, ...], peer: Peer) -> None:
    assert check(allow(AllowRule(groups=groups, bridges=("*",))), peer).rule == "allow[0]"


@pytest.mark.parametrize(
    ("groups", "peer"),
    [
        (("nogroup",), USER),
        (("root",), NOBODY),
        (("root",), Peer(uid=0, gid=1000, pid=1)),  # uid 0 is not gid 0
    ],
)
def test_groups_that_do_not_match(groups: tuple[str, ...], peer: Peer) -> None:
    denied(allow(AllowRule(groups=groups, bridges=("*",))), peer)


def test_no_rules_means_no_one() -> None:
    message = denied(Config(allow=()), ROOT)
    assert "no allow rule" in message
    assert "'br0'" in message
    assert "uid 0" in message


def test_no_matching_rule_says_so() -> None:
    message = denied(allow(AllowRule(users=("root",), bridges=("*",))), NOBODY, "br7")
    assert "no allow rule" in message
    assert "'br7'" in message
    assert "uid 65534" in message


def test_deny_wins_over_an_earlier_allow() -> None:
    cfg = Config(
        allow=(AllowRule(users=("nobody",), bridges=("*",)),), deny=(DenyRule(groups=("nogroup",)),)
    )
    assert "deny[0]" in denied(cfg, NOBODY)


def test_the_deny_rule_that_matched_is_named() -> None:
    cfg = Config(
        allow=(AllowRule(users=("0",), bridges=("*",)),),
        deny=(DenyRule(users=("nobody",)), DenyRule(users=("root",), bridges=("br1",))),
    )
    assert "deny[1]" in denied(cfg, ROOT, "br1")
    assert check(cfg, ROOT, "br0").rule == "allow[0]"


def test_a_deny_that_does_not_match_changes_nothing() -> None:
    cfg = Config(
        allow=(AllowRule(users=("root",), bridges=("*",)),), deny=(DenyRule(users=("nobody",)),)
    )
    assert check(cfg, ROOT).rule == "allow[0]"


@pytest.mark.parametrize(("bridge", "allowed"), [("br0", True), ("br1", True), ("br2", False)])
def test_named_bridges(bridge: str, allowed: bool) -> None:
    cfg = allow(AllowRule(users=("root",), bridges=("br0", "br1")))
    if allowed:
        assert check(cfg, ROOT, bridge).rule == "allow[0]"
    else:
        assert repr(bridge) in denied(cfg, ROOT, bridge)


def test_star_is_every_bridge() -> None:
    cfg = allow(AllowRule(users=("root",), bridges=("*",)))
    for bridge in ("br0", "lan", "x"):
        assert check(cfg, ROOT, bridge).rule == "allow[0]"


def test_deny_on_one_bridge_only() -> None:
    cfg = Config(
        allow=(AllowRule(users=("root",), bridges=("*",)),),
        deny=(DenyRule(users=("root",), bridges=("lan",)),),
    )
    assert "deny[0]" in denied(cfg, ROOT, "lan")
    assert check(cfg, ROOT, "guests").rule == "allow[0]"


def test_the_first_matching_allow_rule_is_reported() -> None:
    cfg = allow(
        AllowRule(users=("nobody",), bridges=("*",)),
        AllowRule(groups=("nogroup",), bridges=("br0",)),
        AllowRule(users=("1000",), bridges=("br0",)),
    )
    assert check(cfg, USER_IN_NOGROUP).rule == "allow[1]"
    assert check(cfg, USER).rule == "allow[2]"


@pytest.mark.parametrize(("queues", "allowed"), [(1, True), (4, True), (5, False), (256, False)])
def test_max_queues(queues: int, allowed: bool) -> None:
    cfg = allow(AllowRule(users=("root",), max_queues=4, bridges=("*",)))
    if allowed:
        decision = check(cfg, ROOT, queues=queues)
        assert (decision.rule, decision.max_queues) == ("allow[0]", 4)
    else:
        message = denied(cfg, ROOT, queues=queues)
        assert "allow[0]" in message
        assert "4" in message


def test_no_limits_means_any() -> None:
    decision = check(
        allow(AllowRule(users=("root",), bridges=("*",))), ROOT, queues=256, held=10_000
    )
    assert (decision.max_queues, decision.max_taps) == (None, None)


@pytest.mark.parametrize(("held", "allowed"), [(0, True), (2, True), (3, False), (7, False)])
def test_max_taps(held: int, allowed: bool) -> None:
    cfg = allow(AllowRule(users=("root",), max_taps=3, bridges=("*",)))
    if allowed:
        assert check(cfg, ROOT, held=held).max_taps == 3
    else:
        with pytest.raises(QuotaExceeded) as caught:
            check(cfg, ROOT, held=held)
        assert caught.value.code == "quota-exceeded"
        assert "allow[0]" in caught.value.message
        assert str(held) in caught.value.message


@pytest.mark.parametrize(("group", "gid"), [("nogroup", 65534), ("root", 0), ("4242", 4242)])
def test_tap_group_is_resolved_to_a_gid(group: str, gid: int) -> None:
    assert (
        check(allow(AllowRule(users=("root",), tap_group=group, bridges=("*",))), ROOT).tap_gid
        == gid
    )
