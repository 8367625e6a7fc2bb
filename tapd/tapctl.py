"""``tapctl`` and ``tapd-bridge-helper``: ask tapd for a tap from the shell, and
run a VMM with it.

Both start once per VM, so they import the standard library only (through
:mod:`tapd.client`), and ``tapd-bridge-helper`` reads QEMU's three arguments
itself rather than load argparse.  No traceback reaches a user: tapd's
refusals and the client's own failures print one line with their code, and
anything unexpected prints one line too (``TAPD_DEBUG=1`` shows where).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from . import __version__, client, scm
from .exchange import LocalError
from .wire import DEFAULT_SOCKET

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

#: sysexits.h EX_SOFTWARE: a bug in tapctl, not a refusal
EX_SOFTWARE = 70


class BadNetdev(LocalError):
    """``--netdev`` is not a QEMU option string tapctl can send."""

    CODE = "bad-netdev"


class NoSuchFd(LocalError):
    """The command names a placeholder for fds tapd did not return."""

    CODE = "no-such-fd"


class OutputFailed(LocalError):
    """``tapctl metrics --output FILE`` could not write FILE."""

    CODE = "output-failed"


class HandoffFailed(LocalError):
    """The helper has its tap but cannot pass it to QEMU on --fd."""

    CODE = "handoff-failed"


#: a verb's option: (flag, dest, kind, metavar, help); kind is "str",
#: "required" (a str that must be given), "int", "append" (a str, repeatable),
#: "on"/"off" (a store_const True/False, exclusive with its pair) or "flag"
#: (store_true).  argparse is built from these tables, and read_quickly()
#: reads the command lines of a VM start from them without argparse.
Option = tuple[str, str, str, "str | None", "str | None"]

_GUEST_OPTIONS: tuple[Option, ...] = (
    ("--guest-mac", "guest_mac", "str", "MAC",
     "the guest NIC's MAC (default: tapd picks a free one)"),
    ("--guest-ip", "guest_ips", "append", "ADDR",
     "an address the guest will use (repeat; needed where the rule has ip_ranges)"),
    ("--vlan", "vlan", "int", "N",
     "the access VLAN, one the rule permits (default: the rule's first)"),
)  # fmt: skip
REQUEST_OPTIONS: tuple[Option, ...] = (
    ("--br", "br", "str", None, "bridge to attach the tap to"),
    ("--ifname", "ifname", "str", None, "name for the tap (default: the daemon's template)"),
    ("--queues", "queues", "int", None, "number of queues (multiqueue tap)"),
    ("--vnet-hdr", "vnet_hdr", "on", None, "require vnet_hdr"),
    ("--no-vnet-hdr", "vnet_hdr", "off", None, "no vnet_hdr"),
    ("--sndbuf", "sndbuf", "int", None, "send buffer limit in bytes"),
    ("--vhost", "vhost", "on", None, "also get vhost-net fds"),
    ("--vhostforce", "vhostforce", "on", None, "fail without vhost"),
    ("--script", "script", "str", "NAME", "a network script the admin listed"),
    ("--downscript", "downscript", "str", "NAME", "a down script the admin listed"),
    ("--helper", "helper", "str", "NAME", "a bridge helper the admin listed"),
    *_GUEST_OPTIONS,
    ("--netdev", "netdev", "str", "OPTS",
     "QEMU -netdev tap options as is, e.g. 'tap,id=n0,queues=4,vhost=on' "
     "(fd=/fds= name tapctl's own fds, which are sent along)"),
    ("--json", "json", "flag", None, "print the reply as JSON"),
)  # fmt: skip
PREPARE_OPTIONS: tuple[Option, ...] = (
    ("--br", "br", "required", None, "bridge to attach the tap to"),
    ("--ifname", "ifname", "str", None, "name for the tap (default: the daemon's template)"),
    ("--queues", "queues", "int", None, "queues the VMM will attach (multiqueue tap)"),
    ("--vnet-hdr", "vnet_hdr", "on", None, None),
    ("--no-vnet-hdr", "vnet_hdr", "off", None, None),
    ("--script", "script", "str", "NAME", "a network script the admin listed"),
    ("--downscript", "downscript", "str", "NAME", "a down script the admin listed"),
    *_GUEST_OPTIONS,
    ("--json", "json", "flag", None, "print the reply as JSON"),
)  # fmt: skip
#: the verbs read_quickly() reads
QUICK_VERBS = {"request": REQUEST_OPTIONS, "prepare": PREPARE_OPTIONS}

if TYPE_CHECKING:
    from argparse import Namespace as Options
else:

    class Options:
        """What argparse.Namespace holds, for a command line read without argparse."""

        def __init__(self, **values: object) -> None:
            self.__dict__.update(values)


def _parser() -> argparse.ArgumentParser:
    import argparse  # here: tapd-bridge-helper, which shares this module, never needs it

    p = argparse.ArgumentParser(prog="tapctl", description="Talk to tapd.")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"tapd's socket (default: ${client.ENV_SOCKET}, else {DEFAULT_SOCKET})",
    )
    p.add_argument("--version", action="version", version=f"tapctl {__version__}")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    hello = verbs.add_parser("hello", help="show the daemon's protocol, version and ops")
    hello.add_argument("--json", action="store_true", help="print the reply as JSON")
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
    _add_options(req, REQUEST_OPTIONS)
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
    _add_options(prep, PREPARE_OPTIONS)
    prep.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    lst = verbs.add_parser("list", help="your leases (root: all of them)")
    lst.add_argument("--json", action="store_true", help="print a JSON list of leases")
    rel = verbs.add_parser(
        "release", help="end a lease now: its tap is removed (one passed with fd= is given back)"
    )
    rel.add_argument("lease", metavar="ID|IFNAME")
    rel.add_argument("--json", action="store_true", help="print the ended lease as JSON")
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
    helper.add_argument("--use-vnet", action="store_true", help="give the tap IFF_VNET_HDR")
    helper.add_argument("--fd", type=int, required=True, help="socket to send the tap fd on")
    helper.add_argument("--br", help="bridge (QEMU's default: br0)")
    return p


def _add_options(p: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """A verb's options, from its table."""
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    paired = _paired(options)
    for flag, dest, kind, metavar, text in options:
        if kind in ("on", "off") and dest in paired:  # --vnet-hdr or --no-vnet-hdr
            if dest not in exclusive:
                exclusive[dest] = p.add_mutually_exclusive_group()
            at: argparse._ActionsContainer = exclusive[dest]
        else:
            at = p
        if kind in ("on", "off"):
            at.add_argument(flag, dest=dest, action="store_const", const=kind == "on", help=text)
        elif kind == "flag":
            at.add_argument(flag, dest=dest, action="store_true", help=text)
        elif kind == "int":
            at.add_argument(flag, dest=dest, metavar=metavar, help=text, type=int)
        else:
            action = "append" if kind == "append" else "store"
            at.add_argument(
                flag, dest=dest, metavar=metavar, help=text, action=action,
                required=kind == "required",
            )  # fmt: skip


def _leading_socket(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """tapctl's ``--socket PATH`` before the verb, and the rest; a value
    argparse would not take as one is left in place (it then refuses it)."""
    if argv[:1] == ["--socket"] and len(argv) > 2 and not argv[1].startswith("-"):
        return argv[1], list(argv[2:])
    if argv[:1] and argv[0].startswith("--socket=") and argv[0][9:10] != "-":
        return argv[0][9:], list(argv[1:])
    return None, list(argv)


def _paired(options: tuple[Option, ...]) -> set[str]:
    """The dests of an "on" option whose "off" twin excludes it."""
    return {dest for _, dest, kind, _, _ in options if kind == "off"}


def read_quickly(argv: Sequence[str]) -> Options | None:
    """``tapctl [--socket PATH] request|prepare [OPTION...] [-- CMD ARGS]``,
    the command lines a VM start runs, read from the verbs' option tables
    without argparse (whose import, with re, enum and gettext, costs more than
    the rest of tapctl).  The options as argparse would give them, or None
    for anything else (--help, an abbreviation, a bad value, CMD without
    ``--``), which argparse then reads and words the error of, as ever."""
    socket_path, argv = _leading_socket(argv)
    table = QUICK_VERBS.get(argv[0]) if argv else None
    if table is None:
        return None
    by_flag = {option[0]: option for option in table}
    values: dict[str, Any] = {"socket": socket_path, "verb": argv[0]}
    values.update((dest, False if kind == "flag" else None) for _, dest, kind, _, _ in table)
    values["command"] = []
    used: set[str] = set()
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            values["command"] = ["--", *rest]  # as argparse.REMAINDER keeps it
            break
        flag, eq, value = arg.partition("=")
        option = by_flag.get(flag)
        if option is None:
            return None
        _, dest, kind, _, _ = option
        used.add(flag)
        if kind in ("on", "off", "flag"):
            if eq:
                return None
            values[dest] = kind != "off"
            continue
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if value.startswith("-"):
            return None
        if kind == "int":
            try:
                values[dest] = int(value)
            except ValueError:
                return None
        elif kind == "append":
            values[dest] = [*(values[dest] or []), value]
        else:
            values[dest] = value
    if any({flag for flag, dest_, kind, _, _ in table if dest_ == dest} <= used
           for dest in _paired(table)):  # fmt: skip
        return None
    if any(kind == "required" and values[dest] is None for _, dest, kind, _, _ in table):
        return None
    return Options(**values)


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
                    raise NoSuchFd(f"{key} is used, but tapd's reply has no such value")
                arg = arg.replace(key, value)
        out.append(arg)
    return out


def _print_json(value: object) -> None:
    """``--json``'s output; json is imported here, on the paths that print it
    (it imports re, and so enum, functools and collections, as tapd.wire does
    not)."""
    import json

    print(json.dumps(value))


def _print_reply(reply: dict[str, object], as_json: bool) -> None:
    if as_json:
        _print_json(reply)
        return
    # An adopted tap's reply (fd=/fds=) may say less: print what it says.
    ips = reply.get("guest_ips")
    print(
        f"{reply.get('ifname')}: bridge {reply.get('bridge')} mac {reply.get('mac', '-')} "
        f"mtu {reply.get('mtu', '-')} queues {reply.get('fds', 0)} "
        f"vhostfds {reply.get('vhostfds', 0)} vnet_hdr {'on' if reply.get('vnet_hdr') else 'off'}"
        + (f" guest_mac {reply['guest_mac']}" if reply.get("guest_mac") else "")
        + (f" guest_ips {','.join(map(str, ips))}" if isinstance(ips, list) and ips else "")
        + _vlans(reply)
    )
    _warn(reply)


def _vlans(reply: dict[str, Any]) -> str:
    """`` vlan 10 vlan_tagged 20,30`` as a reply or lease says, else ""."""
    tagged = reply.get("vlan_tagged")
    return (f" vlan {reply['vlan']}" if reply.get("vlan") is not None else "") + (
        f" vlan_tagged {','.join(map(str, tagged))}" if isinstance(tagged, list) and tagged else ""
    )


def _warn(reply: dict[str, object]) -> None:
    """tapd's warnings (vhost asked for but unavailable, ...), on stderr: also
    before a command runs, which would otherwise fail with no reason given."""
    warnings = reply.get("warnings")
    for warning in warnings if isinstance(warnings, list) else ():
        print(f"tapctl: warning: {warning}", file=sys.stderr, flush=True)


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
            raise BadNetdev(f"--netdev: {part!r} is not key=value")
        if key in ("type", "id"):
            continue
        if key in _INT_KEYS:
            try:
                options[key] = int(value, 0)
            except ValueError:
                raise BadNetdev(f"--netdev: {key}={value!r} is not a number") from None
        elif key in _BOOL_KEYS:
            if value.lower() not in _BOOLS:
                raise BadNetdev(f"--netdev: {key}={value!r} is not on or off")
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
                    raise BadNetdev(f"--netdev: {key}= must name fds by number here")
                numbers.append(int(name))
    return numbers


def _request(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    options: dict[str, Any] = parse_netdev(args.netdev) if args.netdev else {}
    for key in (
        "br", "ifname", "queues", "vnet_hdr", "sndbuf", "vhost", "vhostforce",
        "script", "downscript", "helper", "guest_mac", "guest_ips", "vlan",
    ):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    grant = client.request_tap(path=args.socket, send_fds=_fd_numbers(options), **options)
    if not command:
        _print_reply(grant.reply, args.json)
        grant.close()
        return 0
    _warn(grant.reply)
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
        vlan=args.vlan,
    )
    if not command:
        if args.json:
            _print_json(reply)
        else:
            print(
                f"{reply.get('ifname')}: bridge {reply.get('bridge')} guest mac "
                f"{reply.get('guest_mac')} mtu {reply.get('mtu')} queues {reply.get('queues')} "
                "(removed as tapctl exits)"
            )
        return 0
    _warn(reply)
    values = {"{ifname}": str(reply.get("ifname")), "{mac}": str(reply.get("guest_mac"))}
    argv = []
    for arg in command:
        for key, value in values.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"tapctl: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def _metrics(args: argparse.Namespace) -> int:
    reply, fds = client.call({"op": "metrics"}, path=args.socket)
    scm.close_all(fds)
    text = str(reply["text"])
    if args.output is None:
        sys.stdout.write(text)
        return 0
    import tempfile  # here: only this verb writes files

    # A reader must never see half a file: write a temporary file beside it
    # (same filesystem, and a name the textfile collector skips), then rename.
    directory, name = os.path.split(os.path.abspath(args.output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputFailed(f"cannot write {args.output}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600: node_exporter runs as its own user
        os.replace(tmp, args.output)
    except OSError as exc:
        try:  # noqa: SIM105 (contextlib: one more import for a process started per VM)
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputFailed(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def _age(created: int) -> str:
    seconds = max(0, int(time.time()) - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _list(args: argparse.Namespace) -> int:
    leases = client.leases(path=args.socket)
    if args.json:
        _print_json(leases)
        return 0
    rows: list[tuple[str, ...]] = [("LEASE", "IFNAME", "BRIDGE", "QUEUES", "UID", "PID", "AGE")]
    rows += [
        (x["id"], x["ifname"], x["bridge"], str(x["queues"]), str(x["uid"]), str(x["pid"]),
         _age(x["created"]))
        for x in leases
    ]  # fmt: skip
    if any(x.get("vlan") is not None or x.get("vlan_tagged") for x in leases):
        # A column only where some lease has VLANs: the table stays as it was.
        rows[0] += ("VLAN",)
        rows[1:] = [(*row, _vlan_cell(x)) for row, x in zip(rows[1:], leases, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _vlan_cell(lease: dict[str, Any]) -> str:
    """A lease's VLANs for list: ``10``, ``10+t20,30`` with tagged ones, ``-``."""
    access = lease.get("vlan")
    tagged = lease.get("vlan_tagged") or []
    cell = "" if access is None else str(access)
    if tagged:
        cell += ("+" if cell else "") + "t" + ",".join(map(str, tagged))
    return cell or "-"


def _status(args: argparse.Namespace) -> int:
    reply = client.status(path=args.socket)
    if args.json:
        _print_json(reply)
        return 0
    # "config" is absent when tapd runs on its built-in defaults.
    print(
        f"tapd {reply.get('version')} (protocol {reply.get('protocol')}): "
        f"up {float(reply.get('uptime', 0)):.0f}s, {reply.get('leases')} leases, "
        f"{reply.get('connections')} connections, "
        f"config {reply.get('config') or '(built-in defaults)'}"
    )
    return 0


def _hello(args: argparse.Namespace) -> int:
    reply = client.hello(path=args.socket)
    if args.json:
        _print_json(reply)
        return 0
    ops = reply.get("ops")
    print(
        f"tapd {reply.get('version')} (protocol {reply.get('protocol')}): ops "
        + ", ".join(map(str, ops if isinstance(ops, list) else ()))
    )
    return 0


def _release(args: argparse.Namespace) -> int:
    lease = client.release(args.lease, path=args.socket)
    if args.json:
        _print_json(lease)
    else:
        print(f"released {lease.get('id')} ({lease.get('ifname')})")
    return 0


def _helper(socket_path: str | None, br: str | None, use_vnet: bool, fd: int) -> int:
    """QEMU's side of net_bridge_run_helper(): one byte with the fd, exit 0."""
    # As qemu-bridge-helper: --use-vnet means IFF_VNET_HDR if the kernel has it.
    vnet_hdr = None if use_vnet else False
    try:
        # Before asking tapd: a tap that could not be handed over is no use.
        # (_socket: the C module socket.py wraps; see tapd.scm for why.)
        vmm = _socket.socket(fileno=fd)
    except OSError as exc:
        raise HandoffFailed(f"--fd={fd} is not a socket from QEMU: {exc.strerror}") from None
    try:
        grant = client.bridge_helper(br, vnet_hdr, fd, path=socket_path)
        try:
            scm.send_line_sync(vmm, b"\0", grant.tap_fds)
        except OSError as exc:
            raise HandoffFailed(f"cannot hand the tap to QEMU on fd {fd}: {exc}") from None
        finally:
            grant.close()
    finally:
        vmm.close()
    return 0


_VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "hello": _hello,
    "list": _list,
    "release": _release,
    "status": _status,
    "request": _request,
    "prepare": _prepare,
    "metrics": _metrics,
    "helper": lambda args: _helper(args.socket, args.br, args.use_vnet, args.fd),
}


def _guarded(prog: str, run: Callable[[], int]) -> int:
    """Run a command line; whatever goes wrong is one line on stderr."""
    try:
        code = run()
        sys.stdout.flush()  # here, not at exit, where a closed pipe would be a traceback
        return code
    except client.CallError as exc:
        _say(f"{prog}: {exc.message} [{exc.code}]")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (tapctl list | head): not an error
        # worth a word.  Point stdout at /dev/null so that the flush at exit
        # does not fail again (the Python docs' "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if os.environ.get("TAPD_DEBUG"):
            raise
        _say(
            f"{prog}: unexpected error: {type(exc).__name__}: {exc} "
            "(a bug; run with TAPD_DEBUG=1 for the traceback)"
        )
        return EX_SOFTWARE


def _say(line: str) -> None:
    try:  # noqa: SIM105 (contextlib: one more import for a process started per VM)
        print(line, file=sys.stderr)
    except OSError:
        pass


def _as_qemu_runs_helper(argv: list[str]) -> tuple[str | None, str | None, bool, int] | None:
    """``tapctl [--socket PATH] helper --use-vnet --fd=N --br=BR``, the form
    QEMU runs once per VM start, read without argparse (whose import and
    parser cost more than the rest of the helper's Python).  None for any
    other command line, which argparse then reads as usual."""
    socket_path, argv = _leading_socket(argv)
    if argv[:1] != ["helper"]:
        return None
    parsed = parse_helper_args(argv[1:])
    if isinstance(parsed, str) or parsed[0] is not None:  # an error, or --socket after the verb
        return None
    return (socket_path, *parsed[1:])


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        qemus = _as_qemu_runs_helper(sys.argv[1:] if argv is None else argv)
        if qemus is not None:
            return _helper(*qemus)
        args = read_quickly(sys.argv[1:] if argv is None else argv) or _parser().parse_args(argv)
        try:
            return _VERBS[args.verb](args)
        except client.CallError as exc:
            if getattr(args, "json", False):
                # --json's promise holds for a refusal too: the reply, as tapd
                # words it, on stdout (the one line on stderr as ever).
                error = {"code": exc.code, "message": exc.message}
                _print_json({"ok": False, "error": error})
            raise

    return _guarded("tapctl", run)


HELPER_USAGE = """\
usage: tapd-bridge-helper [--socket PATH] [--use-vnet] --fd=N [--br=BRIDGE]

QEMU's bridge helper, asking tapd instead of being setuid: QEMU runs it with
--use-vnet --fd=N --br=BR, and it sends the tap back on fd N.  The socket is
--socket, else $TAPD_SOCKET, else the socket set in /etc/tapd/client.conf,
else /run/tapd.sock.
"""


def parse_helper_args(argv: Sequence[str]) -> tuple[str | None, str | None, bool, int] | str:
    """(socket, bridge, use_vnet, fd) from the helper's arguments, or what is
    wrong with them.  Each option as ``--opt=value`` (QEMU's and libvirt's
    spelling) or ``--opt value``."""
    values: dict[str, str] = {}
    use_vnet = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--use-vnet":
            use_vnet = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--fd", "--br", "--socket"):
            return f"unknown argument {arg!r}"
        if not eq:
            if not args:
                return f"{name} needs a value"
            value = args.pop(0)
        values[name] = value
    fd = values.get("--fd")
    if fd is None:
        return "--fd=N is required (QEMU passes it)"
    if not fd.isdigit():
        return f"--fd={fd!r} is not a file descriptor number"
    return values.get("--socket"), values.get("--br"), use_vnet, int(fd)


def bridge_helper_main(argv: list[str] | None = None) -> int:
    """``tapd-bridge-helper``: the helper as a single executable path, for
    ``-netdev bridge,helper=/usr/local/bin/tapd-bridge-helper``."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(HELPER_USAGE, end="")
        return 0
    if "--version" in args:
        print(f"tapd-bridge-helper {__version__}")
        return 0

    def run() -> int:
        parsed = parse_helper_args(args)
        if isinstance(parsed, str):
            _say(f"{HELPER_USAGE.splitlines()[0]}\ntapd-bridge-helper: {parsed}")
            return 2
        return _helper(*parsed)

    return _guarded("tapd-bridge-helper", run)


def _leave(code: int) -> NoReturn:
    """Exit at once, without the interpreter's finalisation: a process that
    has flushed its output has nothing left to clean up (the kernel closes its
    fds), and tearing down its modules would cost ~3 ms, a sixth of an
    interpreter's start.  (tapctl request has exec'd its command by now.)"""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 (contextlib: one more import for a process started per VM)
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def tapctl_script() -> NoReturn:
    """The ``tapctl`` console script: :func:`main`, then :func:`_leave`."""
    _leave(main())


def bridge_helper_script() -> NoReturn:
    """The ``tapd-bridge-helper`` console script."""
    _leave(bridge_helper_main())


if __name__ == "__main__":
    tapctl_script()
