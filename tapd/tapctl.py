"""``tapctl``: ask tapd for a tap from the shell, and run a VMM with it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import client
from .config import DEFAULT_SOCKET

_PLACEHOLDERS = ("{fd}", "{fds}", "{vhostfd}", "{vhostfds}", "{ifname}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tapctl", description="Talk to tapd.")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"tapd's socket (default: ${client.ENV_SOCKET}, else {DEFAULT_SOCKET})",
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("hello", help="show the daemon's protocol and version")
    req = verbs.add_parser(
        "request",
        help="get a tap on a bridge, and optionally run a command with it",
        description=(
            "Ask tapd for a tap on BR.  With -- CMD ARGS, run CMD with the tap's fds "
            "inherited, replacing {fd}, {fds}, {vhostfd}, {vhostfds} and {ifname} in "
            "ARGS.  Without CMD, print the reply and exit: the tap vanishes when "
            "tapctl exits, because nothing holds its fds any more."
        ),
    )
    req.add_argument("--br", help="bridge to attach the tap to")
    req.add_argument("--ifname", help="name for the tap (default: the daemon's template)")
    req.add_argument("--queues", type=int, help="number of queues (multiqueue tap)")
    vnet = req.add_mutually_exclusive_group()
    vnet.add_argument(
        "--vnet-hdr", dest="vnet_hdr", action="store_const", const=True, help="require vnet_hdr"
    )
    vnet.add_argument(
        "--no-vnet-hdr", dest="vnet_hdr", action="store_const", const=False, help="no vnet_hdr"
    )
    req.add_argument("--sndbuf", type=int, help="send buffer limit in bytes")
    req.add_argument("--vhost", action="store_const", const=True, help="also get vhost-net fds")
    req.add_argument("--vhostforce", action="store_const", const=True, help="fail without vhost")
    req.add_argument("--script", metavar="NAME", help="a network script the admin listed")
    req.add_argument("--downscript", metavar="NAME", help="a down script the admin listed")
    req.add_argument("--helper", metavar="NAME", help="a bridge helper the admin listed")
    req.add_argument(
        "--netdev",
        metavar="OPTS",
        help="QEMU -netdev tap options as is, e.g. 'tap,id=n0,queues=4,vhost=on' "
        "(fd=/fds= name tapctl's own fds, which are sent along)",
    )
    req.add_argument("--json", action="store_true", help="print the reply as JSON")
    req.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def substitute(args: Sequence[str], grant: client.TapGrant) -> list[str]:
    """Fill the placeholders in ``args`` from the grant (plain text replacement,
    so any other braces in ARGS are left alone)."""
    values = {
        "{fd}": str(grant.tap_fds[0]) if grant.tap_fds else None,
        "{fds}": ":".join(map(str, grant.tap_fds)),
        "{vhostfd}": str(grant.vhost_fds[0]) if grant.vhost_fds else None,
        "{vhostfds}": ":".join(map(str, grant.vhost_fds)) or None,
        "{ifname}": grant.ifname,
    }
    out = []
    for arg in args:
        for key, value in values.items():
            if key in arg:
                if value is None:
                    raise client.ClientError(
                        "no-vhost", f"{key} is used, but tapd returned no vhost fds"
                    )
                arg = arg.replace(key, value)
        out.append(arg)
    return out


def _print_reply(reply: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply))
        return
    print(
        f"{reply['ifname']}: bridge {reply['bridge']} mac {reply['mac']} mtu {reply['mtu']} "
        f"queues {reply['fds']} vhostfds {reply.get('vhostfds', 0)} "
        f"vnet_hdr {'on' if reply.get('vnet_hdr') else 'off'}"
    )
    for warning in reply.get("warnings") or ():  # type: ignore[attr-defined]
        print(f"warning: {warning}", file=sys.stderr)


#: -netdev tap keys whose QAPI type is a number or a bool
_INT_KEYS = frozenset({"queues", "sndbuf", "poll-us"})
_BOOL_KEYS = frozenset({"vnet_hdr", "vhost", "vhostforce"})
_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_netdev(text: str) -> dict[str, object]:
    """QEMU's ``-netdev tap,...`` option string -> request keys.

    As QEMU's option parser: comma-separated ``key=value``, ``,,`` for a
    literal comma; a leading ``tap`` type and the ``id=`` are dropped.
    """
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    if parts and parts[0] == "tap":
        parts = parts[1:]
    options: dict[str, object] = {}
    for part in parts:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise client.ClientError("bad-netdev", f"--netdev: {part!r} is not key=value")
        if key in ("type", "id"):
            continue
        if key in _INT_KEYS:
            try:
                options[key] = int(value, 0)
            except ValueError:
                raise client.ClientError(
                    "bad-netdev", f"--netdev: {key}={value!r} is not a number"
                ) from None
        elif key in _BOOL_KEYS:
            if value.lower() not in _BOOLS:
                raise client.ClientError(
                    "bad-netdev", f"--netdev: {key}={value!r} is not on or off"
                )
            options[key] = _BOOLS[value.lower()]
        else:
            options[key] = value
    return options


def _fd_numbers(options: dict[str, object]) -> list[int]:
    """tapctl's own fds named by fd=/fds= (then vhostfd=/vhostfds=), to send."""
    numbers: list[int] = []
    for key in ("fd", "fds", "vhostfd", "vhostfds"):
        value = options.get(key)
        if isinstance(value, str):
            for name in value.split(":"):
                if not name.isdigit():
                    raise client.ClientError(
                        "bad-netdev", f"--netdev: {key}= must name fds by number here"
                    )
                numbers.append(int(name))
    return numbers


def _request(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    options = parse_netdev(args.netdev) if args.netdev else {}
    for key in (
        "br", "ifname", "queues", "vnet_hdr", "sndbuf", "vhost", "vhostforce",
        "script", "downscript", "helper",
    ):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    grant = client.request_tap(path=args.socket, send_fds=_fd_numbers(options), **options)
    if not command:
        _print_reply(grant.reply, args.json)
        grant.close()
        return 0
    argv = substitute(command, grant)
    for fd in grant.tap_fds + grant.vhost_fds:
        os.set_inheritable(fd, True)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        grant.close()
        print(f"tapctl: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "hello":
            print(json.dumps(client.hello(path=args.socket)))
            return 0
        return _request(args)
    except client.ClientError as exc:
        print(f"tapctl: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
