"""Judging a request's ``NetdevTapOptions`` as QEMU would.  Pure logic.

The rules and their order follow ``net_init_tap()`` in QEMU's net/tap.c;
messages keep QEMU's wording so that a QEMU user recognises them.  Where QEMU
is lax (it silently truncates a long ifname, and accepts queue counts the
kernel will refuse), tapd refuses up front and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidIfname, InvalidOptions, InvalidValue, Unsupported
from .models import IFNAMSIZ, MAX_TAP_QUEUES, TapOptions

# Stricter than the kernel's dev_valid_name() (which forbids only "/", ":",
# whitespace, "." and ".."): tapd also keeps "%" out, which the kernel would
# expand as a name pattern, and anything that is not printable ASCII.
_IFNAME = re.compile(r"[A-Za-z0-9_.+@-]+")


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be an interface name, or None if it can."""
    size = len(name.encode())
    if size == 0:
        return "an interface name cannot be empty"
    if size >= IFNAMSIZ:
        return (
            f"{name!r} is {size} bytes; an interface name has at most "
            f"{IFNAMSIZ - 1} (QEMU would silently truncate it, tapd refuses)"
        )
    if name in (".", ".."):
        return f"{name!r} is not a valid interface name"
    if not _IFNAME.fullmatch(name):
        return (
            f"{name!r} has characters an interface name may not use here; "
            "use letters, digits and . _ - + @"
        )
    return None


def _given(value: object) -> bool:
    return value is not None


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
        if opts.vhostfds is not None and len(opts.fds.split(":")) != len(opts.vhostfds.split(":")):
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
        queues = 1 if opts.queues is None else opts.queues
        if queues > 1 and _given(opts.vhostfd):
            raise InvalidOptions("vhostfd= is invalid with multiple queues")
    # net_init_tap_one(): vhost is on when vhost=on, or (vhost absent) when a
    # vhostfd is given or vhostforce=on.
    if opts.vhost is False and (_given(opts.vhostfd) or _given(opts.vhostfds)):
        raise InvalidOptions("vhostfd(s)= is not valid without vhost")


@dataclass(frozen=True)
class TapPlan:
    """What tapd will build for a request that creates a tap."""

    bridge: str
    ifname: str | None
    queues: int
    vnet_hdr: bool | None  # None: use it if the kernel offers it
    sndbuf: int | None


def plan_create(opts: TapOptions) -> TapPlan:
    """Check a request that asks tapd to create the tap; say what to build."""
    check_qemu_rules(opts)
    for key, value in (
        ("fd", opts.fd),
        ("fds", opts.fds),
        ("helper", opts.helper),
        ("vhostfd", opts.vhostfd),
        ("vhostfds", opts.vhostfds),
    ):
        if value is not None:
            raise Unsupported(f"{key}= is not supported by this version of tapd yet")
    for key, value in (("script", opts.script), ("downscript", opts.downscript)):
        if value not in (None, "no", ""):
            raise Unsupported(
                f"{key}= hooks are not supported by this version of tapd yet; "
                f'leave {key} out or set it to "no"'
            )
    if opts.vhost or opts.vhostforce:
        raise Unsupported("vhost is not supported by this version of tapd yet")
    if opts.br is None:
        raise InvalidValue('br: name the bridge the tap should join, e.g. "br": "br0"')
    problem = ifname_problem(opts.br)
    if problem:
        raise InvalidValue(f"br: {problem}")
    if opts.ifname is not None:
        problem = ifname_problem(opts.ifname)
        if problem:
            raise InvalidIfname(f"ifname: {problem}")
    queues = 1 if opts.queues is None else opts.queues
    if not 1 <= queues <= MAX_TAP_QUEUES:
        raise InvalidValue(
            f"queues: {queues} is outside 1..{MAX_TAP_QUEUES}; a Linux multiqueue "
            f"tap has at most {MAX_TAP_QUEUES} queues (QEMU's own limit of 1024 "
            "cannot be reached)"
        )
    return TapPlan(
        bridge=opts.br,
        ifname=opts.ifname,
        queues=queues,
        vnet_hdr=opts.vnet_hdr,
        sndbuf=opts.sndbuf,
    )
