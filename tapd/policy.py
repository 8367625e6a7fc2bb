"""Who may have a tap on which bridge.  Pure logic over the configuration.

Deny wins over allow; no match is deny.  Root goes through the same code: the
built-in configuration simply has an allow rule for uid 0.  Names in the rules
are resolved once, when a configuration is loaded, not per request.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass, field

from .config import AllowRule, Config, DenyRule, is_id
from .errors import Denied, QuotaExceeded
from .fence import Fence
from .owner import Peer


def uid_of(name: str) -> int:
    return int(name) if is_id(name) else pwd.getpwnam(name).pw_uid


def gid_of(name: str) -> int:
    return int(name) if is_id(name) else grp.getgrnam(name).gr_gid


@dataclass(frozen=True)
class _Rule:
    name: str  # "allow[0]", for messages and the audit log
    uids: frozenset[int]
    gids: frozenset[int]
    bridges: frozenset[str] | None  # None: any bridge

    def matches(self, peer: Peer, bridge: str) -> bool:
        who = peer.uid in self.uids or not self.gids.isdisjoint(peer.all_gids())
        return who and (self.bridges is None or bridge in self.bridges)


def _compile(name: str, rule: DenyRule) -> _Rule:
    return _Rule(
        name=name,
        uids=frozenset(uid_of(u) for u in rule.users),
        gids=frozenset(gid_of(g) for g in rule.groups),
        bridges=None if "*" in rule.bridges else frozenset(rule.bridges),
    )


@dataclass(frozen=True)
class Decision:
    """The allow rule that granted a request, and the limits it sets."""

    rule: str
    max_queues: int | None = None
    max_taps: int | None = None
    tap_gid: int | None = None
    fence: Fence = field(default_factory=Fence)
    #: the networks guest addresses must come from (empty: not filtered)
    ip_ranges: tuple[str, ...] = ()
    #: the access VLANs the rule permits, its default first (empty: none);
    #: the fence says which VLANs go tagged
    vlans: tuple[int, ...] = ()


def _fence(rule: AllowRule) -> Fence:
    return Fence(
        mac_filtering=rule.mac_filtering,
        isolated=rule.port_isolation,
        learning=rule.learning,
        flood=rule.flood,
        ingress=rule.ingress_limit,
        egress=rule.egress_limit,
        ip_filter=bool(rule.ip_ranges),
        vlan_tagged=rule.vlan_tagged,
    )


class Policy:
    def __init__(self, config: Config) -> None:
        self._deny = [_compile(f"deny[{i}]", r) for i, r in enumerate(config.deny)]
        # Everything a grant needs from its rule, worked out once per load.
        self._allow: list[tuple[_Rule, AllowRule, int | None, Fence]] = [
            (
                _compile(f"allow[{i}]", r),
                r,
                gid_of(r.tap_group) if r.tap_group is not None else None,
                _fence(r),
            )
            for i, r in enumerate(config.allow)
        ]

    def check(self, peer: Peer, bridge: str, queues: int = 1, held: int = 0) -> Decision:
        """The allow rule that grants ``queues`` queues on ``bridge`` to a peer
        already holding ``held`` live taps, or :class:`Denied` saying why not."""
        for rule in self._deny:
            if rule.matches(peer, bridge):
                raise Denied(
                    f"uid {peer.uid} may not use bridge {bridge!r}: refused by "
                    f"{rule.name} in tapd's configuration"
                ).about(rule=rule.name)
        for rule, allow, tap_gid, fence in self._allow:
            if not rule.matches(peer, bridge):
                continue
            if allow.max_queues is not None and queues > allow.max_queues:
                raise Denied(
                    f"uid {peer.uid} may ask for at most {allow.max_queues} queues on "
                    f"bridge {bridge!r} ({rule.name}); ask for fewer"
                ).about(rule=rule.name)
            if allow.max_taps is not None and held >= allow.max_taps:
                raise QuotaExceeded(
                    f"uid {peer.uid} already holds {held} taps, the most {rule.name} "
                    f"allows (max_taps = {allow.max_taps}); release one first"
                ).about(rule=rule.name)
            return Decision(
                rule=rule.name,
                max_queues=allow.max_queues,
                max_taps=allow.max_taps,
                tap_gid=tap_gid,
                fence=fence,
                ip_ranges=allow.ip_ranges,
                vlans=allow.vlan,
            )
        raise Denied(
            f"uid {peer.uid} is not allowed to use bridge {bridge!r}: no allow rule in "
            "tapd's configuration matches; ask the host's administrator"
        ).about(rule="no-match")
