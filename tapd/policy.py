"""Who may have a tap on which bridge.  Pure logic: no I/O but name lookups.

Deny wins over allow; no match is deny.  Root goes through the same code: the
built-in configuration simply has an allow rule for uid 0.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass

from .config import Config, Rule
from .errors import Denied


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, as the kernel reported at accept time."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()

    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *self.groups))


def _uid(name: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid(name: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _matches_peer(rule: Rule, peer: Peer) -> bool:
    if any(_uid(u) == peer.uid for u in rule.users):
        return True
    gids = peer.all_gids()
    return any(_gid(g) in gids for g in rule.groups)


def _matches_bridge(rule: Rule, bridge: str) -> bool:
    return "*" in rule.bridges or bridge in rule.bridges


@dataclass(frozen=True)
class Decision:
    rule: str  # e.g. "allow[0]"
    max_queues: int | None


def check(config: Config, peer: Peer, bridge: str, queues: int = 1) -> Decision:
    """The allow rule that grants this, or :class:`Denied` naming the reason."""
    for i, rule in enumerate(config.deny):
        if _matches_peer(rule, peer) and _matches_bridge(rule, bridge):
            raise Denied(
                f"uid {peer.uid} may not use bridge {bridge!r} (refused by deny[{i}] "
                "in tapd's configuration)"
            )
    for i, rule in enumerate(config.allow):
        if _matches_peer(rule, peer) and _matches_bridge(rule, bridge):
            if rule.max_queues is not None and queues > rule.max_queues:
                raise Denied(
                    f"uid {peer.uid} may ask for at most {rule.max_queues} queues on "
                    f"bridge {bridge!r} (allow[{i}]); ask for fewer"
                )
            return Decision(rule=f"allow[{i}]", max_queues=rule.max_queues)
    raise Denied(
        f"uid {peer.uid} is not allowed to use bridge {bridge!r}: no allow rule in "
        "tapd's configuration matches; ask the host's administrator"
    )
