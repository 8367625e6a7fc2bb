"""tapd's configuration: a TOML file validated by frozen pydantic models.

Every section has built-in defaults, so the file is optional; with none, only
root is served.  Unknown keys and bad values are refused with the key path and
what would be valid.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .fence import DEFAULT_PREFIX, check_prefix, parse_rate, trunk_tag
from .options import ifname_problem
from .tun import TUN_PATH
from .wire import DEFAULT_SOCKET as DEFAULT_SOCKET  # where it was before clients shared it


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def is_id(name: str) -> bool:
    """A numeric uid/gid written as ASCII digits ("²" is a digit to str.isdigit)."""
    return name.isascii() and name.isdigit()


def _user(name: str) -> str:
    if not is_id(name):
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"no user {name!r} on this host; {_ID_ADVICE % 'uid'}") from None
    return name


def _group(name: str) -> str:
    if not is_id(name):
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no group {name!r} on this host; {_ID_ADVICE % 'gid'}") from None
    return name


_ID_ADVICE = "use a name from this host or a numeric %s"


def _bridge_pattern(name: str) -> str:
    if name != "*" and not re.fullmatch(r"[A-Za-z0-9_.+@-]{1,15}", name):
        raise ValueError(f'{name!r} is neither a bridge name nor "*"')
    return name


User = Annotated[str, AfterValidator(_user)]
Group = Annotated[str, AfterValidator(_group)]
BridgePattern = Annotated[str, AfterValidator(_bridge_pattern)]


class ServerConfig(_Section):
    socket: str = DEFAULT_SOCKET
    #: permission bits of the socket file, as an octal string
    socket_mode: str = "0660"
    #: group owning the socket file (name or numeric id); None keeps root's
    socket_group: Group | None = None
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 1024
    #: connections one uid may hold open at once, so that no uid (nor two)
    #: can take them all; root is not counted per uid
    max_connections_per_uid: Annotated[int, Field(ge=1, le=65536)] = 128
    #: connections root may open beyond max_connections: others cannot lock
    #: root out
    root_reserved_connections: Annotated[int, Field(ge=0, le=65536)] = 16
    #: seconds a connection may sit without sending a complete request
    request_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: seconds a connection may stay open however busy it is (a request in
    #: flight is finished first): hello every few seconds keeps no slot
    connection_lifetime: Annotated[float, Field(gt=0, le=86400)] = 600.0
    #: fds one uid's connections may hold at once, sent with lines not yet
    #: complete or handled, beside the global budget (a quarter of tapd's
    #: open-file limit)
    max_fds_per_uid: Annotated[int, Field(ge=1, le=1 << 20)] = 1024
    #: seconds a closer may take over fds it was given before tapd deems it
    #: stuck, kills it and makes another (see tapd.closer)
    closer_timeout: Annotated[float, Field(gt=0, le=600)] = 2.0
    #: stuck closers (a FUSE flush that never returns keeps one for ever) at
    #: which tapd stops taking fds until one of them ends
    max_stuck_closers: Annotated[int, Field(ge=1, le=128)] = 8

    @field_validator("socket_mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f'{value!r} is not an octal mode such as "0660"') from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{value!r} is outside 0000..0777")
        return value

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


class TapsConfig(_Section):
    #: name of a new tap when the request gives no ifname.  {rand} is 8 random
    #: hex digits (never reused soon, unlike the kernel's tap%d), {uid} the
    #: requester's uid.  At most 15 bytes once filled in.
    name_template: str = "tap{rand}"
    tun_device: str = TUN_PATH
    #: what every ifname a client chooses must start with; None: any name
    ifname_prefix: str | None = None

    @field_validator("ifname_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Some name must be left to start with it: the prefix plus one byte.
        problem = ifname_problem(value + "0")
        if problem:
            raise ValueError(f"with one more character, {problem}")
        return value

    #: the guest MACs tapd draws (for grants whose request names none) start
    #: with these octets; locally administered, so never a vendor's
    guest_mac_prefix: str = DEFAULT_PREFIX

    @field_validator("guest_mac_prefix")
    @classmethod
    def _mac_prefix(cls, value: str) -> str:
        return check_prefix(value)

    #: live taps over every uid but root, beside each [[allow]] rule's
    #: per-uid max_taps (which uids a group rule matches is not bounded)
    max_taps: Annotated[int, Field(ge=1)] | None = 4096

    @field_validator("name_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{rand}" not in value:
            raise ValueError("must contain {rand} so that generated names do not collide")
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"is not a valid template: {exc}") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in ("rand", "uid"):
                raise ValueError(f"only {{rand}} and {{uid}} may appear, not {{{name}}}")
            if spec or conversion:
                raise ValueError(f"write {{{name}}} with nothing else inside the braces")
        problem = ifname_problem(value.format(rand="0" * 8, uid=4294967295))
        if problem:
            raise ValueError(f"filled in, {problem}")
        return value


def _program(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not an absolute path")
    if not os.access(path, os.X_OK) or not os.path.isfile(path):
        raise ValueError(f"{path!r} is not an executable file")
    return path


def _rate(value: object) -> object:
    return parse_rate(value) if isinstance(value, str) else value


#: a rate in bits a second, written as tc writes it ("10Mbit", "500kbit")
Rate = Annotated[int, BeforeValidator(_rate)]


def _ip_range(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f'{value!r} is not a network like "10.0.0.0/24": {exc}') from None


IpRange = Annotated[str, AfterValidator(_ip_range)]


def _vlans(value: object) -> object:
    """One VLAN id or a list of them; one is a list of one."""
    return (value,) if isinstance(value, int) and not isinstance(value, bool) else value


#: the most a trunk's VLANs may take in the lease tag (tapd.leases: the
#: rest of a tag with every field at its longest leaves about this much)
TRUNK_TAG_MAX = 64

#: an 802.1Q VLAN id (0 and 4095 are reserved)
VlanId = Annotated[int, Field(strict=True, ge=1, le=4094)]
Vlans = Annotated[tuple[VlanId, ...], BeforeValidator(_vlans)]

#: what clients name a helper or hook by (never a path)
ProgramName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Program = Annotated[str, AfterValidator(_program)]


class VhostConfig(_Section):
    #: the vhost-net device tapd opens once per queue for vhost=on
    device: str = "/dev/vhost-net"


class ProgramsConfig(_Section):
    """Programs the admin lets clients run by name: QEMU-protocol bridge helpers
    (``helper=NAME``) and network scripts (``script=NAME``, ``downscript=NAME``)."""

    helpers: dict[ProgramName, Program] = {}
    hooks: dict[ProgramName, Program] = {}
    #: seconds a helper may take to hand back its fd and exit
    helper_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    #: seconds a script may run
    hook_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    #: nft(8), for rules with ip_ranges (Debian's nftables package)
    nft: str = "/usr/sbin/nft"


class DenyRule(_Section):
    """A [[deny]] entry: these users/groups may not use these bridges.
    Users and groups are names or numeric ids, as strings."""

    users: tuple[User, ...] = ()
    groups: tuple[Group, ...] = ()
    bridges: tuple[BridgePattern, ...] = ("*",)

    @model_validator(mode="after")
    def _matches_someone(self) -> Self:
        if not self.users and not self.groups:
            raise ValueError("this rule matches nobody: give it users and/or groups")
        if not self.bridges:
            raise ValueError('this rule matches no bridge: give it bridges (or "*")')
        return self


class AllowRule(DenyRule):
    """An [[allow]] entry, with optional limits for those it allows.

    Unlike a deny rule, it names its bridges: a rule that forgot them would
    otherwise hand out every bridge on the host ("*" says so on purpose)."""

    bridges: tuple[BridgePattern, ...]

    #: the most queues one request may ask for
    max_queues: Annotated[int, Field(ge=1, le=256)] | None = None
    #: the most live taps one uid may hold through this rule
    max_taps: Annotated[int, Field(ge=1)] | None = None
    #: give taps granted by this rule to this group as well (TUNSETGROUP)
    tap_group: Group | None = None
    #: the guest may send only with its lease's guest_mac (a locked bridge
    #: port, learning off, one static FDB entry)
    mac_filtering: bool = False
    #: an isolated bridge port: reaches the uplink and the host, not other
    #: isolated ports
    port_isolation: bool = False
    #: the port's learning and unicast-flood flags (absent: the kernel's default)
    learning: bool | None = None
    flood: bool | None = None
    #: what one tap's guest may receive / send, as tc writes rates ("10Mbit")
    ingress_limit: Rate | None = None
    egress_limit: Rate | None = None
    #: the networks a guest's addresses must come from: a request then names
    #: its guest's addresses (guest_ips), and the tap passes no other (nftables)
    ip_ranges: tuple[IpRange, ...] = ()
    #: the access VLANs a tap this rule grants may be in, the first its
    #: default (a request's vlan picks another): the port is an untagged
    #: member of that one alone.  Needs a bridge with vlan_filtering.
    vlan: Vlans = ()
    #: VLANs every tap this rule grants carries tagged (a trunk)
    vlan_tagged: Vlans = ()

    @model_validator(mode="after")
    def _vlans_make_sense(self) -> Self:
        for key in ("vlan", "vlan_tagged"):
            ids: tuple[int, ...] = getattr(self, key)
            twice = sorted({v for v in ids if ids.count(v) > 1})
            if twice:
                raise ValueError(f"{key} names {', '.join(map(str, twice))} more than once")
        both = sorted(set(self.vlan) & set(self.vlan_tagged))
        if both:
            raise ValueError(
                f"VLAN {', '.join(map(str, both))} is in both vlan and vlan_tagged: a port "
                "carries a VLAN either untagged (vlan) or tagged (vlan_tagged), not both"
            )
        if len(trunk_tag(self.vlan_tagged)) > TRUNK_TAG_MAX:
            raise ValueError(
                "vlan_tagged names too many separate VLANs to record on each tap (its "
                "interface alias holds 255 bytes); runs of consecutive ids cost one each, "
                "so renumber them into fewer runs"
            )
        fences = [k for k in ("mac_filtering", "ip_ranges") if getattr(self, k)]
        if self.vlan_tagged and fences:
            raise ValueError(
                f"vlan_tagged (a trunk) cannot be fenced with {' or '.join(fences)}: those "
                "hold a guest to one MAC and its addresses in its access VLAN, and a trunk's "
                "guest (a router) sends in every tagged VLAN with addresses of each; give "
                "the trunk a rule of its own without them (port_isolation and the limits "
                "do apply to a trunk)"
            )
        return self


class Config(_Section):
    server: ServerConfig = ServerConfig()
    taps: TapsConfig = TapsConfig()
    vhost: VhostConfig = VhostConfig()
    programs: ProgramsConfig = ProgramsConfig()
    allow: tuple[AllowRule, ...] = (AllowRule(users=("0",), bridges=("*",)),)
    deny: tuple[DenyRule, ...] = ()

    @model_validator(mode="after")
    def _nft_for_ip_ranges(self) -> Self:
        if any(rule.ip_ranges for rule in self.allow):
            _program(self.programs.nft)  # rules that filter addresses need it
        return self


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists each one."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section at ``loc`` takes, for "unknown key" messages."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))[0]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return list(model.model_fields)


def parse(text: str, path: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}{_toml_hint(text, str(exc))}"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'])}: {_problem(e)}" for e in exc.errors(include_url=False)]
        raise ConfigError(path, problems) from None


def _problem(error: Any) -> str:
    """What is wrong with one value, in TOML's words, and how to put it right."""
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        return f"unknown key; valid here: {', '.join(_keys_at(loc[:-1]))}"
    if kind == "missing" and loc[-1] == "bridges":
        return 'missing: name the bridges it allows (bridges = ["br0"]), or "*" for every one'
    if kind == "missing":
        return "missing: this key is required"
    if _VLAN_KEYS & {part for part in loc if isinstance(part, str)}:
        if kind in ("tuple_type", "list_type", "int_type"):
            return f"must be a VLAN id or an array of them, e.g. {_vlan_key(loc)} = [10, 20]"
        if kind in ("greater_than_equal", "less_than_equal"):
            return f"{error['input']} is no VLAN id: 1 to 4094 (0 and 4095 are reserved)"
    if kind in ("tuple_type", "list_type"):
        example = {"users": "alice", "groups": "kvm", "bridges": "br0"}.get(str(loc[-1]), "...")
        return f'must be an array, e.g. {loc[-1]} = ["{example}"]'
    if kind == "string_type":
        name = next((part for part in reversed(loc) if isinstance(part, str)), "")
        return "must be a string, in quotes" + _STRING_HINTS.get(name, "")
    return str(error["msg"]).removeprefix("Value error, ")


_VLAN_KEYS = {"vlan", "vlan_tagged"}


def _vlan_key(loc: tuple[int | str, ...]) -> str:
    return next(str(part) for part in loc if part in _VLAN_KEYS)


#: how to write the strings people most often leave unquoted
_STRING_HINTS = {
    "users": ': a name or a uid ("1000", not 1000)',
    "groups": ': a name or a gid ("100", not 100)',
    "socket_mode": ': octal digits ("0660")',
}


def _toml_hint(text: str, message: str) -> str:
    """A hint for the TOML mistakes people make in this file."""
    at = re.search(r"at line (\d+)", message)
    lines = text.splitlines()
    if at is None or not 0 < int(at.group(1)) <= len(lines):
        return ""
    line = lines[int(at.group(1)) - 1]
    if re.search(r"=\s*0\d", line):
        return '; TOML has no numbers with a leading zero: write a mode in quotes ("0660")'
    if re.search(r"=\s*(yes|no|on|off|True|False)\s*(#.*)?$", line):
        return "; a flag is true or false"
    if re.search(r"=\s*[A-Za-z_][\w.-]*\s*(#.*)?$", line):
        return '; a string goes in quotes (name = "value")'
    return ""


def load(path: str | None) -> Config:
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read it: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, ["not UTF-8 text"]) from None
    return parse(text, path)
