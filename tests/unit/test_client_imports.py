"""The entry points users start per VM import the standard library only.

tapctl (every verb), tapd-bridge-helper, tapd.client and tapd.aio each run in
a fresh interpreter, through a whole call to a fake tapd (so that imports made
on first use count too), and report what they loaded.  Whatever a bare
interpreter does not load already must be the standard library or one of the
client's own modules; the daemon's dependencies and the modules that pull
them in are named outright, so a failure says which one crept in.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faketapd import FakeTapd, fake_tapd

#: the modules of tapd a client may load: they import the standard library only
CLIENT_MODULES = {
    "tapd", "tapd.aio", "tapd.client", "tapd.errors", "tapd.exchange", "tapd.scm",
    "tapd.tapctl", "tapd.wire",
}  # fmt: skip
DAEMON_DEPENDENCIES = ("trio", "pydantic", "pydantic_core", "structlog", "pyroute2", "outcome")
#: standard modules the per-VM paths do without, for their import cost
#: (dataclasses pulls inspect; argparse and asyncio are large)
COSTLY = {"argparse", "asyncio", "dataclasses", "inspect", "typing"}

DUMP = "import json, sys; print(json.dumps(sorted(sys.modules)))"

CALLS = {
    "tapd.client": """
from tapd import client
client.request_tap(path=P, br="br0").close()
client.hello(path=P); client.status(path=P); client.leases(path=P); client.release("x", path=P)
""",
    "tapd-bridge-helper": """
import socket
from tapd.tapctl import bridge_helper_main
ours, qemus = socket.socketpair()
assert bridge_helper_main(["--socket", P, "--use-vnet", f"--fd={qemus.detach()}", "--br=br0"]) == 0
""",
    "tapctl helper": """
import socket
from tapd.tapctl import main
ours, qemus = socket.socketpair()
assert main(["--socket", P, "helper", "--use-vnet", f"--fd={qemus.detach()}", "--br=br0"]) == 0
""",
    "tapctl": """
from tapd.tapctl import main
for verb in (["request", "--br", "br0"], ["hello"], ["status"], ["list"], ["release", "x"]):
    for form in ([], ["--json"]):
        assert main(["--socket", P, *verb, *form]) == 0
""",
    "tapd.aio (asyncio)": """
import asyncio
from tapd import aio
async def main():
    (await aio.request_tap(path=P, br="br0")).close()
    await aio.status(path=P); await aio.leases(path=P); await aio.hello(path=P)
asyncio.run(main())
""",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTapd]:
    with fake_tapd() as fake:
        yield fake


@pytest.fixture(scope="module")
def bare() -> set[str]:
    out = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def loaded_by(code: str, path: str) -> set[str]:
    script = f"P = {path!r}\n{code}\n{DUMP}"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("entry", list(CALLS))
def test_entry_point_loads_only_the_standard_library(
    entry: str, fake: FakeTapd, bare: set[str]
) -> None:
    new = loaded_by(CALLS[entry], fake.path) - bare
    daemon_side = sorted(m for m in new if m.split(".")[0] in DAEMON_DEPENDENCIES)
    assert not daemon_side, f"{entry} loads the daemon's dependencies: {daemon_side}"
    tapd_modules = {m for m in new if m.split(".")[0] == "tapd"}
    assert tapd_modules <= CLIENT_MODULES, f"{entry} loads {sorted(tapd_modules - CLIENT_MODULES)}"
    foreign = sorted(
        m for m in new - tapd_modules if m.split(".")[0] not in sys.stdlib_module_names
    )
    assert not foreign, f"{entry} loads modules outside the standard library: {foreign}"


@pytest.mark.parametrize("entry", ["tapd.client", "tapd-bridge-helper", "tapctl helper"])
def test_per_vm_paths_stay_lean(entry: str, fake: FakeTapd, bare: set[str]) -> None:
    new = loaded_by(CALLS[entry], fake.path) - bare
    assert not new & COSTLY, f"{entry} loads {sorted(new & COSTLY)}"


def test_tapctl_loads_argparse_but_no_other_costly_module(fake: FakeTapd, bare: set[str]) -> None:
    new = loaded_by(CALLS["tapctl"], fake.path) - bare
    assert not new & (COSTLY - {"argparse"}), sorted(new & COSTLY)


def test_the_fake_answered_every_call(fake: FakeTapd) -> None:
    """The runs above went all the way to a reply (else they prove little)."""
    ops = {request["op"] for request in fake.requests}
    assert ops >= {"request", "bridge-helper", "hello", "status", "list", "release"}


# -- the per-VM processes, module by module -------------------------------------------

SCRIPTS = Path(__file__).resolve().parents[2] / "tapd" / "console-scripts"
#: runs a console script as installed (its file, as __main__) with argv[1:]
#: after P (the socket) and prints what it had loaded when it left: exit, or
#: the exec of tapctl's CMD (the process CMD then replaces)
AS_INSTALLED = """
import os, sys
def _leave(*_):
    loaded = sorted(sys.modules)  # before json, which the report itself needs
    import json
    print(json.dumps(loaded), flush=True)
    real_exit(0)
real_exit, os._exit, os.execvp = os._exit, _leave, _leave
script = sys.argv[1]
sys.argv = [script, *(P if a == "{P}" else a for a in sys.argv[2:])]
exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__"})
"""
BARE_AS_INSTALLED = (
    "import os, sys\nloaded = sorted(sys.modules)\nimport json\nprint(json.dumps(loaded))"
)
#: what each per-VM process may load beyond a bare interpreter, all of it: a
#: module added here costs every VM start its import (tests/bench measures)
PER_VM = {
    ("tapd-bridge-helper", "--use-vnet", "--fd={FD}", "--br=br0"),
    ("tapctl", "--socket", "{P}", "request", "--br", "br0", "--", "true", "{fd}"),
    ("tapctl", "--socket", "{P}", "prepare", "--br", "br0", "--", "true", "{ifname}"),
}
LEAN = {
    "tapd", "tapd.client", "tapd.errors", "tapd.exchange", "tapd.scm", "tapd.tapctl",
    "tapd.wire", "__future__", "_json", "_socket", "_struct", "struct", "errno",
}  # fmt: skip


@pytest.mark.parametrize("argv", sorted(PER_VM), ids=lambda argv: " ".join(argv[:4]))
def test_a_per_vm_process_loads_exactly_its_list(
    argv: tuple[str, ...], fake: FakeTapd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAPD_SOCKET", fake.path)
    bare = json.loads(
        subprocess.run(
            [sys.executable, "-c", BARE_AS_INSTALLED], capture_output=True, text=True, check=True
        ).stdout
    )
    ours, qemus = socket.socketpair()
    with ours, qemus:
        args = [a.replace("{FD}", str(qemus.fileno())) for a in argv[1:]]
        out = subprocess.run(
            [sys.executable, "-c", f"P = {fake.path!r}\n{AS_INSTALLED}", str(SCRIPTS / argv[0]),
             *args],
            capture_output=True, text=True, pass_fds=[qemus.fileno()], check=False,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1])) - set(bare)
    # (an editable install's finder loads some of the list before any of tapd)
    expected = LEAN - set(bare)
    assert loaded == expected, (
        f"{' '.join(argv)} loads {sorted(loaded - expected)} beyond its list"
        f" (and not {sorted(expected - loaded)})"
    )
