"""tapd's structure, enforced: which module may reach which part of the
kernel, and which module may import which (trio's ``test_exports`` style).

Read from the source with ``ast``, so nothing is imported and a rule holds
for every path through a module, not only the ones a test happens to run.
When a rule fails, either the code moves to the module that owns that part
of the kernel or layer, or the rule changes here with its reason.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tapd"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"tapd/{module}.py")


def imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in ``module``, at any depth (in a
    function, under TYPE_CHECKING): tapd's own modules as ``tapd.NAME``."""
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # tapd is flat: one level up is the package
                base = "tapd" + (f".{node.module}" if node.module else "")
            yield node.lineno, base
            if base == "tapd":  # from . import x: x is a module, or a name in __init__
                for alias in node.names:
                    if (PACKAGE / f"{alias.name}.py").exists():
                        yield node.lineno, f"tapd.{alias.name}"


def internal(module: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every tapd module ``module`` imports; the package
    itself (``__version__``) counts as ``__init__``."""
    for line, name in imports(module):
        parts = name.split(".")
        if parts[0] == "tapd":
            yield line, parts[1] if len(parts) > 1 else "__init__"


def _docstrings(root: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(root):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def names(module: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every name, attribute, imported name and string in
    ``module`` (``getattr(socket, "SO_PEERGROUPS")`` names it too), docstrings
    left out."""
    root = tree(module)
    skip = _docstrings(root)
    for node in ast.walk(root):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name.rpartition(".")[2]
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        ):
            yield node.lineno, node.value


@dataclass(frozen=True)
class Rule:
    """One way into the kernel beyond plain files and sockets."""

    what: str
    #: the modules that may take it, each with why it is there
    owners: dict[str, str]
    #: imports (top-level package names) that open this way
    imports: frozenset[str] = frozenset()
    #: names, attributes or strings that use it
    names: frozenset[str] = frozenset()
    #: string prefixes (paths) that use it
    prefixes: tuple[str, ...] = ()

    def uses(self, module: str) -> list[str]:
        found = {
            (line, f"import {name}")
            for line, name in imports(module)
            if name.split(".")[0] in self.imports
        }
        found |= {
            (line, text)
            for line, text in names(module)
            if text in self.names or text.startswith(self.prefixes)
        }
        return [f"tapd/{module}.py:{line}: {text}" for line, text in sorted(found)]


KERNEL = [
    Rule(
        "ioctl",
        {"tun": "/dev/net/tun, vhost-net and every ioctl, each constant with its header"},
        imports=frozenset({"fcntl"}),
        names=frozenset({"ioctl"}),
    ),
    Rule(
        "rtnetlink",
        {
            "netlink": "pyroute2 for lookups and removals, raw rtnetlink for the per-tap messages",
            "ports": "bridge ports: their flags, the FDB entries that fence them, their VLANs",
            "shaping": "the tbf qdiscs and ifb devices that hold a guest to its rates",
        },
        imports=frozenset({"pyroute2"}),
        names=frozenset({"AF_NETLINK", "IPRoute"}),
    ),
    Rule(
        "libc through ctypes",
        {
            "netlink": "the address of a BPF program for SO_ATTACH_FILTER on its own socket",
            "closer": "clone(CLONE_PIDFD | CLONE_FILES) and prctl(PR_SET_PDEATHSIG), which "
            "Python does not wrap",
            "owner": "libc getsockopt(SO_PEERGROUPS) for a peer in more groups than Python's "
            "1024-byte getsockopt() holds",
        },
        imports=frozenset({"ctypes"}),
    ),
    Rule(
        "fd passing (SCM_RIGHTS)",
        {
            "scm": "the message layout and the blocking send/receive, shared with the clients "
            "(standard library only)",
            "fdpass": "the daemon's side, on the trio loop",
            "aio": "the async clients' side, on the caller's own loop (asyncio or trio), which "
            "fdpass cannot serve without trio",
        },
        names=frozenset({"sendmsg", "recvmsg", "recvmsg_into", "SCM_RIGHTS"}),
    ),
    Rule(
        "pidfds",
        {
            "owner": "a pidfd for each peer and lease owner, so that a reused pid is never "
            "taken for the process it was",
            "closer": "the pidfds of its own helper processes, from clone(), to know when they "
            "exit and to kill one that hangs",
        },
        names=frozenset({"pidfd_open", "pidfd_send_signal", "CLONE_PIDFD", "SO_PEERPIDFD"}),
    ),
    Rule(
        "peer credentials",
        {"owner": "who is at the other end of a socket, worked out in one place"},
        names=frozenset({"SO_PEERCRED", "SO_PEERGROUPS", "SO_PEERPIDFD"}),
    ),
    Rule(
        "/proc",
        {
            "fdinfo": "what an fd a client sent is, answered by procfs without calling into "
            "the file's own code (a FUSE file could block an ioctl)",
            "owner": "/proc/PID/stat: a process's parent and start time",
            "closer": "/proc/self/task: no thread may run when it clones",
            "tun": "/proc/self/ns/net, to match TUNGETDEVNETNS: a tap named by a client is "
            "in tapd's own namespace",
        },
        prefixes=("/proc/",),
    ),
]


@pytest.mark.parametrize("rule", KERNEL, ids=lambda rule: rule.what)
def test_the_kernel_is_reached_from_named_modules_only(rule: Rule) -> None:
    assert set(rule.owners) <= set(MODULES), "an owner of the rule no longer exists"
    used = [use for module in MODULES if module not in rule.owners for use in rule.uses(module)]
    assert not used, f"{rule.what} outside {sorted(rule.owners)}:\n" + "\n".join(used)


@pytest.mark.parametrize("rule", KERNEL, ids=lambda rule: rule.what)
def test_each_named_module_uses_what_it_is_named_for(rule: Rule) -> None:
    """A stale allowance would let the next use slip in unnoticed."""
    idle = [module for module in rule.owners if not rule.uses(module)]
    assert not idle, f"{idle} no longer use {rule.what}: take them off its list"


#: tapd's layers, bottom up, from the README's Layout table: a module imports
#: from its own layer and those below it, never from one above
LAYERS: list[tuple[str, set[str]]] = [
    ("the package, errors and logging", {"__init__", "errors", "log"}),
    ("lines and fds, shared with the clients", {"wire", "scm", "exchange"}),
    (
        "requests, connections and rules, no I/O",
        {"protocol", "connection", "models", "options", "fence", "nft"},
    ),
    ("the kernel", {"tun", "netlink", "ports", "shaping", "fdinfo", "fdpass", "worker"}),
    (
        "taps made, programs run, and who asks, in intentions",
        {"taps", "making", "programs", "owner"},
    ),
    (
        "configuration, policy, leases and their lifecycle",
        {"config", "policy", "leases", "lifecycle", "metrics"},
    ),
    ("granting taps, and what each op does", {"grants", "service"}),
    ("the daemon", {"server", "listen", "sdnotify", "closer", "daemon"}),
    ("the clients", {"client", "aio", "tapctl"}),
]
LAYER = {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer() -> None:
    assert sorted(LAYER) == MODULES


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_upward(module: str) -> None:
    upward = [
        f"tapd/{module}.py:{line}: imports {name} ({LAYERS[LAYER[name]][0]})"
        for line, name in internal(module)
        if LAYER[name] > LAYER[module]
    ]
    assert not upward, f"{module} ({LAYERS[LAYER[module]][0]}) reaches up:\n" + "\n".join(upward)


#: what a client may load (tests/unit/test_client_imports.py checks the same
#: at run time, for the paths its calls take)
CLIENT_SIDE = {"__init__", "aio", "client", "errors", "exchange", "scm", "tapctl", "wire"}


@pytest.mark.parametrize("module", sorted(CLIENT_SIDE))
def test_the_client_side_imports_the_standard_library_and_itself_only(module: str) -> None:
    wrong = [
        f"tapd/{module}.py:{line}: import {name}"
        for line, name in imports(module)
        if name.split(".")[0] != "tapd" and name.split(".")[0] not in sys.stdlib_module_names
    ]
    wrong += [
        f"tapd/{module}.py:{line}: imports tapd.{name}"
        for line, name in internal(module)
        if name not in CLIENT_SIDE
    ]
    assert not wrong, "\n".join(wrong)
