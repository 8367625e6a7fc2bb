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
    req.add_argument("--br", required=True, help="bridge to attach the tap to")
    req.add_argument("--ifname", help="name for the tap (default: the daemon's template)")
    req.add_argument("--queues", type=int, help="number of queues (multiqueue tap)")
    vnet = req.add_mutually_exclusive_group()
    vnet.add_argument("--vnet-hdr", dest="vnet_hdr", action="store_const", const=True)
    vnet.add_argument("--no-vnet-hdr", dest="vnet_hdr", action="store_const", const=False)
    req.add_argument("--sndbuf", type=int, help="send buffer limit in bytes")
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


def _request(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    grant = client.request_tap(
        path=args.socket,
        br=args.br,
        ifname=args.ifname,
        queues=args.queues,
        vnet_hdr=args.vnet_hdr,
        sndbuf=args.sndbuf,
    )
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
