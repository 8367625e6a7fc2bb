"""tapctl and tapd-bridge-helper as a user meets them: the console scripts in
a process of their own, against a fake tapd (no root).  The real daemon's
answers are in tests/integration/test_tapctl_verbs.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from faketapd import GRANT, LEASE, fake_tapd

import tapd
from tapd import tapctl

BIN = Path(sys.executable).parent
TAPCTL = str(BIN / "tapctl")
HELPER = str(BIN / "tapd-bridge-helper")


def run(*argv: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TAPD_DEBUG"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, pass_fds=pass_fds, env=env
    )


def one_line_no_traceback(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    return out.stderr


@pytest.mark.parametrize("script", [TAPCTL, HELPER])
def test_version(script: str) -> None:
    out = run(script, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [Path(script).name, tapd.__version__]


def test_status_on_the_built_in_defaults() -> None:
    """Issue 15: the reply has no "config" when tapd runs without a file."""
    with fake_tapd() as fake:
        human = run(TAPCTL, "--socket", fake.path, "status")
        as_json = run(TAPCTL, "--socket", fake.path, "status", "--json")
    assert human.returncode == 0, human.stderr
    assert "config (built-in defaults)" in human.stdout
    assert "up 12s, 1 leases" in human.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert "config" not in json.loads(as_json.stdout)


@pytest.mark.parametrize(
    ("verb", "human"),
    [
        (["hello"], "tapd 0.1.0 (protocol 1): ops hello, request"),
        (["list"], "5c0f3a9e61d2  tap3f9c01aa  br0"),
        (["release", "tap3f9c01aa"], "released 5c0f3a9e61d2 (tap3f9c01aa)"),
        (["request", "--br", "br0"], "tap3f9c01aa: bridge br0 mac fe:41:9d:0c:77:e2"),
    ],
)
def test_every_verb_human_and_json(verb: list[str], human: str) -> None:
    with fake_tapd() as fake:
        text = run(TAPCTL, "--socket", fake.path, *verb)
        as_json = run(TAPCTL, "--socket", fake.path, *verb, "--json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert human in text.stdout
    parsed = json.loads(as_json.stdout)
    if verb[0] == "release":
        assert parsed == LEASE
    elif verb[0] == "list":
        assert parsed == [LEASE]


def test_the_request_line_names_the_guest_mac_and_addresses() -> None:
    """The MAC the user must give the guest's NIC, on the line tapctl prints
    (a shared-bridge trial found it only under --json)."""
    grant = {**GRANT, "guest_mac": "52:54:00:12:34:56", "guest_ips": ["10.0.0.5", "fd00::5"]}
    with fake_tapd(request=grant) as fake:
        out = run(TAPCTL, "--socket", fake.path, "request", "--br", "br0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("guest_mac 52:54:00:12:34:56 guest_ips 10.0.0.5,fd00::5")


def test_tapds_warnings_reach_the_user_before_a_command_runs() -> None:
    """Issue found in a new user's trial: `--vhost -- CMD vhostfds={vhostfds}`
    failed with only "no such value", the reason (no /dev/vhost-net) lost."""
    warning = "tap: open vhost char device failed: No such file or directory"
    grant = {**GRANT, "fds": 2, "warnings": [warning]}
    with fake_tapd(request=grant) as fake:
        ran = run(TAPCTL, "--socket", fake.path, "request", "--br", "br0", "--", "true")
        failed = run(
            TAPCTL, "--socket", fake.path, "request", "--br", "br0", "--vhost",
            "--", "echo", "vhostfds={vhostfds}",
        )  # fmt: skip
    assert ran.returncode == 0
    assert ran.stderr == f"tapctl: warning: {warning}\n"
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[0] == f"tapctl: warning: {warning}"
    assert "[no-such-fd]" in failed.stderr.splitlines()[1]


def test_daemon_errors_keep_their_code() -> None:
    refusal = {"ok": False, "error": {"code": "bridge-not-found", "message": "no br9"}}
    with fake_tapd(request=refusal) as fake:
        out = run(TAPCTL, "--socket", fake.path, "request", "--br", "br9")
    assert out.returncode == 1
    assert one_line_no_traceback(out) == "tapctl: no br9 [bridge-not-found]\n"


def test_a_refusal_with_json_is_json_on_stdout_too() -> None:
    refusal = {"ok": False, "error": {"code": "bridge-not-found", "message": "no br9"}}
    with fake_tapd(request=refusal) as fake:
        out = run(TAPCTL, "--socket", fake.path, "request", "--br", "br9", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == refusal
    assert one_line_no_traceback(out) == "tapctl: no br9 [bridge-not-found]\n"


def test_an_unreachable_daemon_is_one_line(tmp_path: Path) -> None:
    out = run(TAPCTL, "--socket", str(tmp_path / "none"), "status")
    assert out.returncode == 1
    assert one_line_no_traceback(out).endswith("[unreachable]\n")


def test_an_unexpected_error_is_one_line_not_a_traceback() -> None:
    """A reply tapctl cannot format (a daemon of another version, say)."""
    strange = {"ok": True, "version": "9", "protocol": 1, "uptime": "a while"}
    with fake_tapd(status=strange) as fake:
        out = run(TAPCTL, "--socket", fake.path, "status")
        debug = subprocess.run(
            [TAPCTL, "--socket", fake.path, "status"], capture_output=True, text=True,
            env={**os.environ, "TAPD_DEBUG": "1"}, check=False,
        )  # fmt: skip
    assert out.returncode == tapctl.EX_SOFTWARE
    line = one_line_no_traceback(out)
    assert line.startswith("tapctl: unexpected error: ValueError:")
    assert "TAPD_DEBUG=1" in line
    assert "Traceback" in debug.stderr  # for the bug report


def test_any_exception_in_a_verb_is_caught(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TAPD_DEBUG", raising=False)

    def broken(**_: object) -> object:
        raise KeyError("config")

    monkeypatch.setattr(tapctl.client, "status", broken)
    assert tapctl.main(["status"]) == tapctl.EX_SOFTWARE
    err = capsys.readouterr().err
    assert err == (
        "tapctl: unexpected error: KeyError: 'config' (a bug; run with TAPD_DEBUG=1 "
        "for the traceback)\n"
    )


@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_closed_stdout_is_no_traceback(unbuffered: bool) -> None:
    """tapctl list | head -0: the write fails at once, or at the flush at exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("TAPD_DEBUG", "PYTHONUNBUFFERED")}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with fake_tapd() as fake:
        with subprocess.Popen(
            [TAPCTL, "--socket", fake.path, "list"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ) as proc:  # fmt: skip
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            err = proc.stderr.read()
        assert fake.requests  # it did get as far as printing
    assert "Traceback" not in err and "Exception ignored" not in err


# -- tapd-bridge-helper -------------------------------------------------------------------


def test_helper_hands_the_tap_to_qemu() -> None:
    ours, qemus = socket.socketpair()
    with fake_tapd() as fake, ours, qemus:
        out = run(
            HELPER, f"--socket={fake.path}", "--use-vnet", f"--fd={qemus.fileno()}", "--br=br0",
            pass_fds=(qemus.fileno(),),
        )  # fmt: skip
        got = ours.recvmsg(16, socket.CMSG_SPACE(4))
        assert fake.requests[-1] == {"op": "bridge-helper", "br": "br0"}
    assert out.returncode == 0, out.stderr
    data, ancdata, _, _ = got
    assert data == b"\0" and len(ancdata) == 1
    os.close(int.from_bytes(ancdata[0][2][:4], sys.byteorder))


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], "--fd=N is required"),
        (["--fd=x"], "not a file descriptor number"),
        (["--fd=3", "--bogus"], "unknown argument '--bogus'"),
        (["--fd"], "--fd needs a value"),
    ],
)
def test_helper_usage_errors(argv: list[str], problem: str) -> None:
    out = run(HELPER, *argv)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert problem in out.stderr


def test_helper_checks_its_fd_before_asking_tapd() -> None:
    with fake_tapd() as fake:
        out = run(HELPER, "--socket", fake.path, "--fd=987", "--br=br0")
        assert fake.requests == []  # no tap made for nobody
    assert out.returncode == 1
    assert one_line_no_traceback(out).endswith("[handoff-failed]\n")


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        (["--use-vnet", "--fd=5", "--br=br0"], (None, "br0", True, 5)),
        (["--br=br1", "--fd=5"], (None, "br1", False, 5)),  # libvirt's order
        (["--socket", "/s", "--fd", "5"], ("/s", None, False, 5)),
    ],
)
def test_helper_arguments(argv: list[str], parsed: tuple[object, ...]) -> None:
    assert tapctl.parse_helper_args(argv) == parsed


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        (["--socket", "/s", "helper", "--use-vnet", "--fd=5", "--br=br0"], ("/s", "br0", True, 5)),
        (["--socket=/s", "helper", "--fd=5"], ("/s", None, False, 5)),
        (["helper", "--br=br1", "--fd=5"], (None, "br1", False, 5)),
        # argparse reads everything else, and says what is wrong
        (["helper", "--fd=x"], None),
        (["helper", "--socket", "/s", "--fd=5"], None),
        (["helper", "--help"], None),
        (["status"], None),
        (["--socket", "helper"], None),
    ],
)
def test_tapctl_helper_as_qemu_runs_it(argv: list[str], parsed: object) -> None:
    assert tapctl._as_qemu_runs_helper(argv) == parsed


def test_tapctl_helper_through_a_shell_as_qemu_runs_it() -> None:
    """-netdev bridge,helper="tapctl --socket S helper": QEMU appends its
    arguments and runs the line with sh -c."""
    ours, qemus = socket.socketpair()
    with fake_tapd() as fake, ours, qemus:
        line = f"{TAPCTL} --socket {fake.path} helper --use-vnet --fd={qemus.fileno()} --br=br0"
        out = subprocess.run(
            ["sh", "-c", line], pass_fds=(qemus.fileno(),), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        data, ancdata, _, _ = ours.recvmsg(16, socket.CMSG_SPACE(4))
    assert out.returncode == 0, out.stderr
    assert data == b"\0"
    os.close(int.from_bytes(ancdata[0][2][:4], sys.byteorder))


def test_an_fd_named_to_send_that_is_not_open() -> None:
    """--netdev fd=N sends tapctl's fd N: a closed one is the user's mistake,
    said as such, not a bug."""
    with fake_tapd() as fake:
        out = run(TAPCTL, "--socket", fake.path, "request", "--netdev", "tap,br=br0,fd=987")
        assert fake.requests == []
    assert out.returncode == 1
    assert one_line_no_traceback(out).endswith("[send-failed]\n")


def test_vlan_is_asked_for_and_shown() -> None:
    grant = {**GRANT, "vlan": 20, "vlan_tagged": [30, 40]}
    lease = {**LEASE, "vlan": 20, "vlan_tagged": [30, 40]}
    with fake_tapd(request=grant, list={"ok": True, "leases": [lease]}) as fake:
        out = run(TAPCTL, "--socket", fake.path, "request", "--br", "br0", "--vlan", "20")
        listed = run(TAPCTL, "--socket", fake.path, "list")
    assert out.returncode == listed.returncode == 0, out.stderr + listed.stderr
    assert out.stdout.rstrip().endswith("vlan 20 vlan_tagged 30,40")
    assert listed.stdout.splitlines()[0].split()[-1] == "VLAN"
    assert listed.stdout.splitlines()[1].split()[-1] == "20+t30,40"
    asked = [r for r in fake.requests if r.get("op") == "request"]
    assert [r["vlan"] for r in asked] == [20]
