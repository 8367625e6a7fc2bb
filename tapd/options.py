"""Judging a request's ``NetdevTapOptions`` as QEMU would.  Pure logic.

The rules and their order follow ``net_init_tap()`` in QEMU's net/tap.c;
messages keep QEMU's wording so that a QEMU user recognises them.  Where QEMU
is lax (it silently truncates a long ifname, and accepts queue counts the
kernel will refuse), tapd refuses up front and says so.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import Denied, InvalidIfname, InvalidOptions, InvalidValue, NotApplicable
from .fence import IFB_PREFIX
from .models import IFNAMSIZ, MAX_TAP_QUEUES, TapOptions

# Stricter than the kernel's dev_valid_name() (which forbids only "/", ":",
# whitespace, "." and ".."): tapd also keeps "%" out, which the kernel would
# expand as a name pattern, and anything that is not printable ASCII.
_IFNAME = re.compile(r"[A-Za-z0-9_.+@-]+")


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be an interface name, or None if it can."""
    # surrogatepass: a lone surrogate must be judged, not crash the judge
    size = len(name.encode("utf-8", "surrogatepass"))
    if size == 0:
        return "an interface name cannot be empty"
    if size >= IFNAMSIZ:
        return (
            f"{name!r} is {size} bytes; an interface name has at most "
            f"{IFNAMSIZ - 1} (QEMU would silently truncate it, tapd refuses)"
        )
    if name in (".", ".."):
        return f"{name!r} is not a valid interface name"
    if name.startswith("-"):
        # The name is the argument of the admin's hooks (QEMU runs a script
        # as `SCRIPT IFNAME`): "--help" would be read as an option.
        return f"{name!r} starts with '-', which programs given it would take for an option"
    if name.startswith(IFB_PREFIX):
        # tapd finds the ifb that shapes tap N by its name (tapd.fence.ifb_name):
        # a tap of a client's so named would be handed another guest's traffic.
        return f"{name!r} starts with {IFB_PREFIX!r}, the names of tapd's own shaping devices"
    if not _IFNAME.fullmatch(name):
        return (
            f"{name!r} has characters an interface name may not use here; "
            "use letters, digits and . _ - + @"
        )
    return None


def _given(value: object) -> bool:
    return value is not None


#: QEMU's own MAX_TAP_QUEUES: get_fds() stops counting there
QEMU_MAX_TAP_QUEUES = 1024


def qemu_fd_count(names: str) -> int:
    """How many fd names QEMU's get_fds() finds in ``names``: a trailing ':'
    adds none, an empty string is none, and it stops at 1024."""
    if not names:
        return 0
    return min(len(names.split(":")) - names.endswith(":"), QEMU_MAX_TAP_QUEUES)


def check_qemu_rules(opts: TapOptions) -> None:
    """QEMU's mutual exclusions, in net_init_tap()'s order."""
    if _given(opts.fd):
        if any(
            _given(v)
            for v in (
                opts.ifname,
                opts.script,
                opts.downscript,
                opts.vnet_hdr,
                opts.helper,
                opts.queues,
                opts.fds,
                opts.vhostfds,
            )
        ):
            raise InvalidOptions(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, "
                "and vhostfds= are invalid with fd="
            )
    elif opts.fds is not None:
        if any(
            _given(v)
            for v in (
                opts.ifname,
                opts.script,
                opts.downscript,
                opts.vnet_hdr,
                opts.helper,
                opts.queues,
                opts.vhostfd,
            )
        ):
            raise InvalidOptions(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, "
                "and vhostfd= are invalid with fds="
            )
        if opts.vhostfds is not None and qemu_fd_count(opts.fds) != qemu_fd_count(opts.vhostfds):
            raise InvalidOptions(
                "The number of fds passed does not match the number of vhostfds passed"
            )
    elif _given(opts.helper):
        if any(
            _given(v)
            for v in (
                opts.ifname,
                opts.script,
                opts.downscript,
                opts.vnet_hdr,
                opts.queues,
                opts.vhostfds,
            )
        ):
            raise InvalidOptions(
                "ifname=, script=, downscript=, vnet_hdr=, queues=, and vhostfds= "
                "are invalid with helper="
            )
    else:
        if _given(opts.vhostfds):
            raise InvalidOptions("vhostfds= is invalid if fds= wasn't specified")
    # net_init_tap_one(), run once per queue made: vhost is on when vhost=on,
    # or (vhost absent) when a vhostfd is given or vhostforce=on.  With no
    # queue to make (fds="" or queues=0) QEMU never gets there.
    if opts.fds is not None:
        makes_a_queue = qemu_fd_count(opts.fds) > 0
    elif opts.fd is None and opts.helper is None:
        makes_a_queue = opts.queues != 0
    else:
        makes_a_queue = True
    if makes_a_queue and opts.vhost is False and (_given(opts.vhostfd) or _given(opts.vhostfds)):
        raise InvalidOptions("vhostfd(s)= is not valid without vhost")


#: QEMU's DEFAULT_BRIDGE_INTERFACE, the bridge a helper is run for without br=
DEFAULT_HELPER_BRIDGE = "br0"

_PROGRAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Vhost:
    """What net_init_tap_one() would do about vhost, and what tapd must."""

    on: bool  # vhost=on, or (vhost absent) a vhostfd given or vhostforce=on
    force: bool
    provide: bool  # tapd opens the device: on, and the client named no vhost fd


@dataclass(frozen=True)
class CreatePlan:
    """tapd creates the tap (no fd=, fds= or helper=)."""

    bridge: str
    ifname: str | None
    queues: int
    vnet_hdr: bool | None  # None: if the kernel offers it
    sndbuf: int | None
    vhost: Vhost
    script: str | None
    downscript: str | None
    #: the prepare op: a persistent tap the VMM opens by name; tapd keeps no fd
    persistent: bool = False


@dataclass(frozen=True)
class AdoptPlan:
    """The client sent tap fds of its own (fd= or fds=) to attach to ``bridge``."""

    bridge: str
    names: tuple[str, ...]  # the client's names for the tap fds, in order
    sndbuf: int | None
    vhost: Vhost

    @property
    def queues(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class HelperPlan:
    """Run the admin's helper ``helper`` for ``bridge`` and forward its fd."""

    bridge: str
    helper: str
    sndbuf: int | None
    vhost: Vhost
    queues: int = 1  # a QEMU bridge helper hands back one queue


Plan = CreatePlan | AdoptPlan | HelperPlan


def _vhost(opts: TapOptions) -> Vhost:
    force = bool(opts.vhostforce)
    named = opts.vhostfd is not None or opts.vhostfds is not None
    on = opts.vhost if opts.vhost is not None else (named or force)
    return Vhost(on=on, force=force, provide=on and not named)


def _bridge(value: str | None, default: str | None = None) -> str:
    bridge = value if value is not None else default
    if bridge is None:
        raise InvalidValue('br: name the bridge the tap should join, e.g. "br": "br0"')
    problem = ifname_problem(bridge)
    if problem:
        raise InvalidValue(f"br: {problem}")
    return bridge


def program_name(key: str, value: str | None) -> str | None:
    """A script/helper value: None for none, else a name (never a path)."""
    if value is None or (key != "helper" and value in ("", "no")):
        return None
    if not _PROGRAM_NAME.fullmatch(value):
        raise Denied(
            f"{key}= takes the name of a program the administrator listed in tapd's "
            f"configuration, not a path or command: {value!r}"
        )
    return value


def _fd_names(key: str, value: str) -> tuple[str, ...]:
    names = tuple(value.split(":"))
    if any(not n for n in names):
        raise InvalidValue(f"{key}: {value!r} has an empty fd name; separate names with ':'")
    if len(names) > MAX_TAP_QUEUES:
        raise InvalidValue(
            f"{key}: {len(names)} fds is more than a tap has queues ({MAX_TAP_QUEUES})"
        )
    return names


#: keys of QEMU's that cannot apply to a tap the VMM opens itself by name, and why
_NOT_FOR_PREPARE = {
    "fd": "a VMM that opens its tap by name passes no fd; use the request op to adopt one",
    "fds": "a VMM that opens its tap by name passes no fds; use the request op to adopt them",
    "helper": "prepare makes the tap itself; use the request op to run a helper",
    "sndbuf": "the send buffer belongs to each queue's fd: the VMM sets it when it opens the tap",
    "vhost": "the VMM opens /dev/vhost-net itself for a tap it opens by name",
    "vhostfd": "the VMM opens /dev/vhost-net itself for a tap it opens by name",
    "vhostfds": "the VMM opens /dev/vhost-net itself for a tap it opens by name",
    "vhostforce": "the VMM opens /dev/vhost-net itself for a tap it opens by name",
    "poll-us": "busy polling is set by the VMM on its own vhost fds",
}


def prepare_plan(opts: TapOptions, ifname_prefix: str | None = None) -> CreatePlan:
    """What the prepare op makes: a persistent tap, by QEMU's rules for the
    keys that apply (``br``, ``ifname``, ``queues``, ``vnet_hdr``, ``script``,
    ``downscript``); any other key is refused with the reason it cannot apply."""
    for key in opts.given():
        reason = _NOT_FOR_PREPARE.get(key)
        if reason is not None:
            raise NotApplicable(f"{key} does not apply to the prepare op: {reason}")
    what = plan(opts, ifname_prefix)
    assert isinstance(what, CreatePlan)  # no fd=, fds= or helper= got this far
    return dataclasses.replace(what, persistent=True)


def plan(opts: TapOptions, ifname_prefix: str | None = None) -> Plan:
    """Judge a request as QEMU would, then say what tapd will do for it.
    A client-chosen ``ifname`` must start with ``ifname_prefix`` if given."""
    check_qemu_rules(opts)
    vhost = _vhost(opts)
    if opts.fd is not None:
        # fd= names one fd (QEMU reads it as one name; "3:4" is not two).
        if not opts.fd:
            raise InvalidValue("fd: name the tap fd sent with the request")
        return AdoptPlan(
            bridge=_bridge(opts.br),
            names=(opts.fd,),
            sndbuf=opts.sndbuf,
            vhost=vhost,
        )
    if opts.fds is not None:
        return AdoptPlan(
            bridge=_bridge(opts.br),
            names=_fd_names("fds", opts.fds),
            sndbuf=opts.sndbuf,
            vhost=vhost,
        )
    if opts.helper is not None:
        helper = program_name("helper", opts.helper)
        assert helper is not None
        return HelperPlan(
            bridge=_bridge(opts.br, DEFAULT_HELPER_BRIDGE),
            helper=helper,
            sndbuf=opts.sndbuf,
            vhost=vhost,
        )
    if opts.ifname is not None:
        problem = ifname_problem(opts.ifname)
        if problem:
            raise InvalidIfname(f"ifname: {problem}")
        if ifname_prefix is not None and not opts.ifname.startswith(ifname_prefix):
            # So that a client cannot take a name the admin means to give
            # something else (docker0, wg0, eth1) before it exists.
            raise Denied(
                f"ifname: {opts.ifname!r} does not start with {ifname_prefix!r}, which "
                "the administrator requires of the names clients choose "
                "([taps] ifname_prefix); choose such a name or leave ifname out"
            )
    queues = 1 if opts.queues is None else opts.queues
    if not 1 <= queues <= MAX_TAP_QUEUES:
        raise InvalidValue(
            f"queues: {queues} is outside 1..{MAX_TAP_QUEUES}; a Linux multiqueue "
            f"tap has at most {MAX_TAP_QUEUES} queues (QEMU's own limit of 1024 "
            "cannot be reached)"
        )
    return CreatePlan(
        bridge=_bridge(opts.br),
        ifname=opts.ifname,
        queues=queues,
        vnet_hdr=opts.vnet_hdr,
        sndbuf=opts.sndbuf,
        vhost=vhost,
        script=program_name("script", opts.script),
        downscript=program_name("downscript", opts.downscript),
    )
