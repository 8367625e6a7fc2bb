"""Request and reply models shared by the daemon, the client and the docs.

Every model is frozen and forbids unknown keys.  Field names and types mirror
QAPI's ``NetdevTapOptions`` (qapi/net.json), so the keys a VMM would put in a
QMP ``netdev_add`` of type ``tap`` are the keys of a tapd request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: <linux/if.h>: IFNAMSIZ is 16 including the terminating NUL.
IFNAMSIZ = 16

#: drivers/net/tun.c: MAX_TAP_QUEUES is 256 (QEMU's own define of 1024 is not
#: reachable: the 257th TUNSETIFF on one device fails with E2BIG).
MAX_TAP_QUEUES = 256

UInt32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF)]
UInt64 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF_FFFF)]


class _Frozen(BaseModel):
    # strict: a JSON string is never quietly turned into a number or a bool,
    # as QMP would refuse it too.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class TapOptions(_Frozen):
    """QAPI ``NetdevTapOptions``: every member optional, spelled as in QAPI."""

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # Absent means absent: QMP refuses null for a string, bool or number.
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)}: null is not a value here; leave the key out")
        return data

    ifname: str | None = None
    fd: str | None = None
    fds: str | None = None
    script: str | None = None
    downscript: str | None = None
    br: str | None = None
    helper: str | None = None
    sndbuf: UInt64 | None = None
    vnet_hdr: bool | None = None
    vhost: bool | None = None
    vhostfd: str | None = None
    vhostfds: str | None = None
    vhostforce: bool | None = None
    queues: UInt32 | None = None
    poll_us: UInt32 | None = Field(default=None, alias="poll-us")

    def given(self) -> dict[str, Any]:
        """The options the client actually set, spelled as on the wire."""
        return self.model_dump(by_alias=True, exclude_none=True)


#: tapd's own request key (no QEMU tap option has it): the MAC the guest's NIC
#: will use.  Absent: tapd picks a free one.  Granted replies say which.
GuestMac = Annotated[str, Field(min_length=1, max_length=32)]

#: tapd's own request key: the addresses the guest will use, when its allow
#: rule has ip_ranges (the tap passes no other source address)
GuestIps = Annotated[list[Annotated[str, Field(max_length=45)]], Field(min_length=1, max_length=4)]

#: tapd's own request key: the access VLAN the tap is to be in, one its allow
#: rule permits (absent: the rule's first).  QEMU's tap has no such key.
Vlan = Annotated[int, Field(ge=1, le=4094)]

#: the keys of a request that are tapd's own, beside QAPI's NetdevTapOptions
TAPD_REQUEST_KEYS = frozenset({"guest_mac", "guest_ips", "vlan"})


class TapRequest(TapOptions):
    """``{"op": "request", ...}``: make (or adopt) a tap and attach it to ``br``."""

    op: Literal["request"]
    guest_mac: GuestMac | None = None
    guest_ips: GuestIps | None = None
    vlan: Vlan | None = None


class PrepareRequest(TapOptions):
    """``{"op": "prepare", "br": ..., "ifname": ..., "queues": ..., "vnet_hdr": ...}``:
    a persistent tap for a VMM that opens ``/dev/net/tun`` itself by name
    (Firecracker, crosvm ``--tap-name``, cloud-hypervisor ``tap=``, libvirt
    ``ethernet``, QEMU ``ifname=...,script=no``).  It takes QEMU's keys so that
    one that cannot apply to such a tap is refused by name, not as unknown."""

    op: Literal["prepare"]
    guest_mac: GuestMac | None = None
    guest_ips: GuestIps | None = None
    vlan: Vlan | None = None


class HelloRequest(_Frozen):
    """``{"op": "hello"}``: which protocol and daemon version is this?"""

    op: Literal["hello"]


class BridgeHelperRequest(_Frozen):
    """``{"op": "bridge-helper", "br": ..., "vnet_hdr": ...}``: what a process
    standing in for QEMU's bridge helper asks: a tap on ``br`` (QEMU's default
    br0) whose lease belongs to the QEMU that ran it.  The helper sends QEMU's
    socket (its --fd) with the request, and the process at the other end of
    that socket owns the lease; without it, the caller's parent does."""

    op: Literal["bridge-helper"]
    br: str | None = None
    vnet_hdr: bool | None = None


class ListRequest(_Frozen):
    """``{"op": "list"}``: my leases (root: every lease)."""

    op: Literal["list"]


class ReleaseRequest(_Frozen):
    """``{"op": "release", "lease": ID_OR_IFNAME}``: end one of my leases now."""

    op: Literal["release"]
    lease: Annotated[str, Field(min_length=1, max_length=64)]


class StatusRequest(_Frozen):
    """``{"op": "status"}``: how the daemon is doing."""

    op: Literal["status"]


class MetricsRequest(_Frozen):
    """``{"op": "metrics"}``: tapd's numbers as Prometheus text (root only)."""

    op: Literal["metrics"]


Request = (
    HelloRequest
    | TapRequest
    | PrepareRequest
    | BridgeHelperRequest
    | ListRequest
    | ReleaseRequest
    | StatusRequest
    | MetricsRequest
)

#: op name -> model; the protocol module dispatches on it.
REQUEST_MODELS: dict[str, type[Request]] = {
    "hello": HelloRequest,
    "request": TapRequest,
    "prepare": PrepareRequest,
    "bridge-helper": BridgeHelperRequest,
    "list": ListRequest,
    "release": ReleaseRequest,
    "status": StatusRequest,
    "metrics": MetricsRequest,
}


class HelloReply(_Frozen):
    ok: Literal[True] = True
    protocol: int
    version: str
    ops: tuple[str, ...]


class TapReply(_Frozen):
    """A granted request.  The fds follow in ``SCM_RIGHTS``: first ``fds`` tap
    queue fds, then ``vhostfds`` vhost fds, in that order, possibly spread over
    several messages (the kernel carries at most 253 fds in one)."""

    ok: Literal[True] = True
    #: the lease this grant started (see the list and release ops)
    lease: str
    ifname: str
    bridge: str
    fds: int
    vhostfds: int = 0
    vnet_hdr: bool
    vnet_hdr_len: int
    mac: str
    mtu: int
    #: the send buffer the kernel reports after QEMU's defaulting and clamping
    sndbuf: int
    #: TUNSETOFFLOAD flags set (0 until the guest negotiates offloads, as in QEMU)
    offloads: int = 0
    warnings: tuple[str, ...] = ()
    #: the MAC the guest's NIC must use (tapctl's {mac}); the tap's own is ``mac``
    guest_mac: str | None = None
    #: what the port may not do, as the allow rule says (absent: nothing fenced)
    fence: dict[str, bool | int] | None = None
    #: the only source addresses the tap passes (when the rule has ip_ranges)
    guest_ips: tuple[str, ...] | None = None
    #: the access VLAN the tap is an untagged member of, and those it carries
    #: tagged (absent: the rule sets no VLANs)
    vlan: int | None = None
    vlan_tagged: tuple[int, ...] | None = None


class PrepareReply(_Frozen):
    """A prepared tap: persistent, owned by the requester's uid (and the rule's
    ``tap_group``), on its bridge and up.  No fds: the VMM attaches to
    ``ifname`` itself, with as many queues as it likes up to ``queues``'s mode
    (multi-queue when ``queues`` > 1)."""

    ok: Literal[True] = True
    lease: str
    ifname: str
    bridge: str
    queues: int
    vnet_hdr: bool
    mac: str
    mtu: int
    warnings: tuple[str, ...] = ()
    guest_mac: str | None = None
    fence: dict[str, bool | int] | None = None
    guest_ips: tuple[str, ...] | None = None
    vlan: int | None = None
    vlan_tagged: tuple[int, ...] | None = None


class LeaseInfo(_Frozen):
    id: str
    ifname: str
    ifindex: int
    bridge: str
    queues: int
    uid: int
    gid: int
    pid: int
    created: int
    downscript: str | None = None
    adopted: bool = False
    #: made with the prepare op: a persistent tap the VMM opens by name
    prepared: bool = False
    guest_mac: str | None = None
    fence: dict[str, bool | int] | None = None
    guest_ips: tuple[str, ...] | None = None
    vlan: int | None = None
    vlan_tagged: tuple[int, ...] | None = None


class ListReply(_Frozen):
    ok: Literal[True] = True
    leases: tuple[LeaseInfo, ...]


class ReleaseReply(_Frozen):
    ok: Literal[True] = True
    lease: LeaseInfo


class StatusReply(_Frozen):
    ok: Literal[True] = True
    version: str
    protocol: int
    uptime: float
    #: live leases this client can see (root: all)
    leases: int
    connections: int
    config: str | None


class MetricsReply(_Frozen):
    ok: Literal[True] = True
    #: Prometheus's text exposition format, version 0.0.4
    text: str
