"""``tapctl``: ask tapd for a tap from the shell, and run a VMM with it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence

from . import client, fdpass
from .config import DEFAULT_SOCKET


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
            "inherited, replacing {fd}, {fds}, {vhostfd}, {vhostfds}, {ifname} and {mac} "
            "(the guest NIC's MAC) in ARGS.  Without CMD, print the reply and exit: the "
            "tap vanishes when tapctl exits, because nothing holds its fds any more."
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
        "--guest-mac", metavar="MAC", help="the guest NIC's MAC (default: tapd picks a free one)"
    )
    req.add_argument(
        "--guest-ip", dest="guest_ips", metavar="ADDR", action="append",
        help="an address the guest will use (repeat; needed where the rule has ip_ranges)",
    )  # fmt: skip
    req.add_argument(
        "--netdev",
        metavar="OPTS",
        help="QEMU -netdev tap options as is, e.g. 'tap,id=n0,queues=4,vhost=on' "
        "(fd=/fds= name tapctl's own fds, which are sent along)",
    )
    req.add_argument("--json", action="store_true", help="print the reply as JSON")
    req.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    prep = verbs.add_parser(
        "prepare",
        help="make a persistent tap a VMM opens by name, and run the VMM",
        description=(
            "Ask tapd for a persistent tap on BR that a VMM opens itself by name "
            "(Firecracker, crosvm --tap-name, cloud-hypervisor tap=, libvirt "
            "ethernet, QEMU ifname=...,script=no).  With -- CMD ARGS, exec CMD "
            "replacing {ifname} and {mac} (the guest NIC's MAC) in ARGS: the lease "
            "belongs to this process, so the tap is removed when CMD exits.  Without "
            "CMD, print the reply and exit, which removes the tap again."
        ),
    )
    prep.add_argument("--br", required=True, help="bridge to attach the tap to")
    prep.add_argument("--ifname", help="name for the tap (default: the daemon's template)")
    prep.add_argument("--queues", type=int, help="queues the VMM will attach (multiqueue tap)")
    pvnet = prep.add_mutually_exclusive_group()
    pvnet.add_argument("--vnet-hdr", dest="vnet_hdr", action="store_const", const=True)
    pvnet.add_argument("--no-vnet-hdr", dest="vnet_hdr", action="store_const", const=False)
    prep.add_argument("--script", metavar="NAME", help="a network script the admin listed")
    prep.add_argument("--downscript", metavar="NAME", help="a down script the admin listed")
    prep.add_argument(
        "--guest-mac", metavar="MAC", help="the guest NIC's MAC (default: tapd picks a free one)"
    )
    prep.add_argument(
        "--guest-ip", dest="guest_ips", metavar="ADDR", action="append",
        help="an address the guest will use (repeat; needed where the rule has ip_ranges)",
    )  # fmt: skip
    prep.add_argument("--json", action="store_true", help="print the reply as JSON")
    prep.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    lst = verbs.add_parser("list", help="your leases (root: all of them)")
    lst.add_argument("--json", action="store_true", help="print a JSON list of leases")
    rel = verbs.add_parser(
        "release", help="end a lease now: its tap is removed (one passed with fd= is given back)"
    )
    rel.add_argument("lease", metavar="ID|IFNAME")
    st = verbs.add_parser("status", help="how the daemon is doing")
    st.add_argument("--json", action="store_true", help="print the reply as JSON")
    met = verbs.add_parser(
        "metrics",
        help="tapd's numbers in Prometheus's text format (root only)",
        description=(
            "Print tapd's counters, latency histogram and leases per bridge in "
            "Prometheus's text exposition format, or write them to FILE atomically "
            "(for node_exporter's textfile collector, which reads *.prom files)."
        ),
    )
    met.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    helper = verbs.add_parser(
        "helper",
        help="stand in for qemu-bridge-helper (QEMU runs this; see README)",
        description=(
            "QEMU's bridge helper protocol: -netdev bridge,br=BR,helper=... runs this "
            "with --use-vnet --fd=N --br=BR; it asks tapd for a tap on BR and sends "
            "it back on fd N.  The lease belongs to QEMU, the parent process."
        ),
    )
    _helper_arguments(helper)
    return p


def _helper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--use-vnet", action="store_true", help="give the tap IFF_VNET_HDR")
    p.add_argument("--fd", type=int, required=True, help="socket to send the tap fd on")
    p.add_argument("--br", help="bridge (QEMU's default: br0)")


def substitute(args: Sequence[str], grant: client.TapGrant) -> list[str]:
    """Fill the placeholders in ``args`` from the grant (plain text replacement,
    so any other braces in ARGS are left alone)."""
    values = {
        "{fd}": str(grant.tap_fds[0]) if grant.tap_fds else None,
        "{fds}": ":".join(map(str, grant.tap_fds)),
        "{vhostfd}": str(grant.vhost_fds[0]) if grant.vhost_fds else None,
        "{vhostfds}": ":".join(map(str, grant.vhost_fds)) or None,
        "{ifname}": grant.ifname,
        "{mac}": grant.guest_mac,
    }
    out = []
    for arg in args:
        for key, value in values.items():
            if key in arg:
                if value is None:
                    raise client.ClientError(
                        "no-such-fd", f"{key} is used, but tapd returned no such fd"
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
        "script", "downscript", "helper", "guest_mac", "guest_ips",
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


def _prepare(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    reply = client.prepare_tap(
        path=args.socket,
        br=args.br,
        ifname=args.ifname,
        queues=args.queues,
        vnet_hdr=args.vnet_hdr,
        script=args.script,
        downscript=args.downscript,
        guest_mac=args.guest_mac,
        guest_ips=args.guest_ips,
    )
    if not command:
        if args.json:
            print(json.dumps(reply))
        else:
            print(
                f"{reply['ifname']}: bridge {reply['bridge']} mac {reply['mac']} "
                f"mtu {reply['mtu']} queues {reply['queues']} (removed as tapctl exits)"
            )
        return 0
    argv = [
        arg.replace("{ifname}", str(reply["ifname"])).replace("{mac}", str(reply["guest_mac"]))
        for arg in command
    ]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"tapctl: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def _age(created: int) -> str:
    seconds = max(0, int(time.time()) - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _list(args: argparse.Namespace) -> int:
    leases = client.leases(path=args.socket)
    if args.json:
        print(json.dumps(leases))
        return 0
    rows = [("LEASE", "IFNAME", "BRIDGE", "QUEUES", "UID", "PID", "AGE")]
    rows += [
        (x["id"], x["ifname"], x["bridge"], str(x["queues"]), str(x["uid"]), str(x["pid"]),
         _age(x["created"]))
        for x in leases
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _status(args: argparse.Namespace) -> int:
    reply = client.status(path=args.socket)
    if args.json:
        print(json.dumps(reply))
        return 0
    print(
        f"tapd {reply['version']} (protocol {reply['protocol']}): up {reply['uptime']:.0f}s, "
        f"{reply['leases']} leases, {reply['connections']} connections, "
        f"config {reply['config'] or '(built-in)'}"
    )
    return 0


def _metrics(args: argparse.Namespace) -> int:
    reply, fds = client.call({"op": "metrics"}, path=args.socket)
    for fd in fds:
        os.close(fd)
    text = str(reply["text"])
    if args.output is None:
        sys.stdout.write(text)
        return 0
    # A reader must never see half a file: write a temporary file beside it
    # (same filesystem, and a name the textfile collector skips), then rename.
    directory, name = os.path.split(os.path.abspath(args.output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise client.ClientError(
            "output", f"cannot write {args.output}: {exc.strerror or exc}"
        ) from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600: node_exporter runs as its own user
        os.replace(tmp, args.output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise client.ClientError(
            "output", f"cannot write {args.output}: {exc.strerror or exc}"
        ) from None
    return 0


def _helper(args: argparse.Namespace) -> int:
    """QEMU's side of net_bridge_run_helper(): one byte with the fd, exit 0."""
    # As qemu-bridge-helper: --use-vnet means IFF_VNET_HDR if the kernel has it.
    vnet_hdr = None if args.use_vnet else False
    grant = client.bridge_helper(args.br, vnet_hdr, args.fd, path=args.socket)
    try:
        with socket.socket(fileno=args.fd) as sock:
            fdpass.send_line_sync(sock, b"\0", grant.tap_fds)
    except OSError as exc:
        raise client.ClientError(
            "helper", f"cannot hand the tap to QEMU on fd {args.fd}: {exc}"
        ) from None
    finally:
        grant.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "hello":
            print(json.dumps(client.hello(path=args.socket)))
            return 0
        if args.verb == "list":
            return _list(args)
        if args.verb == "release":
            lease = client.release(args.lease, path=args.socket)
            print(f"released {lease['id']} ({lease['ifname']})")
            return 0
        if args.verb == "status":
            return _status(args)
        if args.verb == "metrics":
            return _metrics(args)
        if args.verb == "helper":
            return _helper(args)
        if args.verb == "prepare":
            return _prepare(args)
        return _request(args)
    except client.ClientError as exc:
        print(f"tapctl: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1


def bridge_helper_main() -> int:
    """``tapd-bridge-helper``: the helper as a single executable path, for
    ``-netdev bridge,helper=/usr/local/bin/tapd-bridge-helper``."""
    p = argparse.ArgumentParser(prog="tapd-bridge-helper", description=_helper.__doc__)
    p.add_argument("--socket", metavar="PATH", help="tapd's socket")
    _helper_arguments(p)
    args = p.parse_args()
    try:
        return _helper(args)
    except client.ClientError as exc:
        print(f"tapd-bridge-helper: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
