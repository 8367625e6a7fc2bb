"""Policy as other users see it: clients running under other uids and groups ask a
real tapd, and the kernel says who owns what they were given.

Each client is ``setpriv --reuid=U --regid=G --clear-groups`` (or ``--groups=...``)
running this interpreter.  Where other uids cannot read the interpreter's own
files (a pyenv under /root), the client makes setpriv's three calls itself
(setgroups, setresgid, setresuid) once it has imported tapd: the kernel then
records the same credentials.  Either way the client first reports what it runs
as, with no capability left, and the test checks it.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from tapdtest import Daemon, ip, links, run_daemon, taps, wait_until

from tapd import client

REPO = str(Path(__file__).resolve().parents[2])

#: uids and gids with no passwd/group entry (setpriv and tapd need none), and nobody
U1, U2, U3 = 4242, 4243, 4244
G1, G2 = 4300, 4301
NOBODY = 65534

# A client under another uid.  It reports the credentials it runs with, then
# carries out one command per stdin line, answering one JSON line each, and
# holds every fd it was given until told to close them or until stdin ends.
_CLIENT = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
from tapd import client, tun

path = sys.argv[2]
if len(sys.argv) > 3:
    # No usable setpriv for this interpreter: the same three calls setpriv makes.
    os.setgroups([int(g) for g in sys.argv[5].split(",") if g])
    os.setresgid(int(sys.argv[4]), int(sys.argv[4]), int(sys.argv[4]))
    os.setresuid(int(sys.argv[3]), int(sys.argv[3]), int(sys.argv[3]))

held, lock = [], threading.Lock()

def call(request):
    try:
        reply, fds = client.call(request, path=path)
    except client.ClientError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message}
    except OSError as exc:  # not tapd's answer: say what happened instead
        return {"ok": False, "code": type(exc).__name__, "message": str(exc)}
    with lock:
        held.append(fds)
        return {"ok": True, "reply": reply, "grant": len(held) - 1, "nfds": len(fds)}

def parallel(requests):
    results = [None] * len(requests)
    start = threading.Barrier(len(requests))
    def one(i):
        start.wait()
        results[i] = call(requests[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:")][0]
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                  "groups": sorted(os.getgroups()), "caps": caps}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if "call" in command:
        out = call(command["call"])
    elif "parallel" in command:
        out = parallel(command["parallel"])
    else:
        tun.close_all(held[command["close"]])
        held[command["close"]] = []
        out = {"ok": True}
    print(json.dumps(out), flush=True)
"""


@functools.cache
def _setpriv_works() -> bool:
    """Can another uid run this interpreter and import tapd.client?  Not when
    the interpreter lives somewhere only root may read (a pyenv under /root)."""
    probe = subprocess.run(
        [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import tapd.client",
        ],
        capture_output=True,
        cwd="/",
    )  # fmt: skip
    return probe.returncode == 0


def share(daemon: Daemon) -> None:
    """Let every uid reach the daemon's socket: only policy decides what they get."""
    os.chmod(os.path.dirname(daemon.socket_path), 0o755)
    os.chmod(daemon.socket_path, 0o666)


class User:
    """A client process running as ``uid``/``gid`` with supplementary ``groups``."""

    def __init__(
        self, daemon: Daemon, uid: int, gid: int | None = None, groups: Sequence[int] = ()
    ) -> None:
        gid = uid if gid is None else gid
        if _setpriv_works():
            drop = [f"--reuid={uid}", f"--regid={gid}"]
            drop.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
            argv = ["setpriv", *drop, sys.executable, "-c", _CLIENT, REPO, daemon.socket_path]
        else:
            argv = [sys.executable, "-c", _CLIENT, REPO, daemon.socket_path]
            argv += [str(uid), str(gid), ",".join(map(str, groups))]
        self.uid = uid
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        self.creds = self._read()
        assert self.creds == {
            "uid": uid,
            "euid": uid,
            "gid": gid,
            "groups": sorted(groups),
            "caps": "0000000000000000",
        }, self.creds

    def _read(self) -> Any:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line, f"the client as uid {self.uid} died (status {self.proc.poll()})"
        return json.loads(line)

    def _send(self, command: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply (``ok``, ``reply``, ``grant``) or the error (``ok``, ``code``, ``message``)."""
        out: dict[str, Any] = self._send({"call": request})
        return out

    def request(self, **options: Any) -> dict[str, Any]:
        return self.call({"op": "request", **options})

    def granted(self, **options: Any) -> dict[str, Any]:
        out = self.request(**options)
        assert out["ok"], out
        reply: dict[str, Any] = out["reply"]
        reply["grant"] = out["grant"]
        return reply

    def refused(self, code: str, **options: Any) -> str:
        out = self.request(**options)
        assert not out["ok"] and out["code"] == code, out
        return str(out["message"])

    def parallel(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._send({"parallel": requests})
        return out

    def close(self, grant: int) -> None:
        """Close the fds of the ``grant``-th granted request."""
        assert self._send({"close": grant}) == {"ok": True}

    def exit(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


Users = Callable[..., User]


@pytest.fixture
def users() -> Iterator[Users]:
    """Start clients as other users; every one is ended after the test."""
    started: list[User] = []

    def start(daemon: Daemon, uid: int, gid: int | None = None, groups: Sequence[int] = ()) -> User:
        user = User(daemon, uid, gid, groups)
        started.append(user)
        return user

    yield start
    for user in started:
        user.exit()


@pytest.fixture
def br1(ns: str, br0: str) -> str:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    ip("-n", ns, "link", "set", "br1", "up")
    return "br1"


def tap_info_data(ns: str, ifname: str) -> dict[str, Any]:
    data: dict[str, Any] = links(ns)[ifname]["linkinfo"]["info_data"]
    return data


def _names(value: object, number: int, lookup: Any) -> bool:
    """iproute2 prints a tap's owner and group by name when there is one, else
    the number."""
    try:
        name = lookup(number)[0]
    except KeyError:
        name = None
    return str(value) == str(number) or (name is not None and value == name)


def names_uid(value: object, uid: int) -> bool:
    return _names(value, uid, pwd.getpwuid)


def names_gid(value: object, gid: int) -> bool:
    return _names(value, gid, grp.getgrgid)


def lease_ended(daemon: Daemon, ifname: str) -> None:
    wait_until(
        lambda: ifname not in {lease["ifname"] for lease in daemon.leases()},
        what=f"the lease on {ifname} to end",
    )


# -- who is allowed ----------------------------------------------------------------


def test_a_uid_no_allow_rule_matches_is_denied(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    config = f'[[allow]]\nusers = ["{U1}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        message = users(daemon, NOBODY).refused("denied", br=br0)
        assert f"uid {NOBODY}" in message and "no allow rule" in message
        # The file's rules replace the built-in one for root: root is asked like anyone.
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br=br0)
        assert exc.value.code == "denied"
        assert taps(ns) == []
        daemon.stop()
        denials = [e for e in daemon.log() if e["event"] == "request.denied"]
        assert [(e["uid"], e["code"]) for e in denials] == [(NOBODY, "denied"), (0, "denied")]


def test_a_uid_allowed_on_one_bridge_is_denied_another(
    ns: str, br0: str, br1: str, tmp_path: Path, users: Users
) -> None:
    config = f'[[allow]]\nusers = ["{U1}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        user = users(daemon, U1)
        message = user.refused("denied", br=br1)
        assert "'br1'" in message and "no allow rule" in message
        assert user.granted(br=br0)["bridge"] == "br0"
        assert taps(ns) != [] and all(links(ns)[t]["master"] == "br0" for t in taps(ns))


@pytest.mark.parametrize("uid", [NOBODY, U1])
def test_an_allowed_uid_gets_a_tap_the_kernel_says_is_theirs(
    ns: str, br0: str, tmp_path: Path, users: Users, uid: int
) -> None:
    config = f'[[allow]]\nusers = ["{uid}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        user = users(daemon, uid)
        reply = user.granted(br=br0)
        ifname = reply["ifname"]
        link = links(ns)[ifname]
        assert link["master"] == "br0" and "UP" in link["flags"]
        data = link["linkinfo"]["info_data"]
        assert names_uid(data["user"], uid), data
        assert "group" not in data  # no tap_group: any group of that user may use it
        (lease,) = daemon.leases()
        assert (lease["ifname"], lease["uid"], lease["pid"]) == (ifname, uid, user.proc.pid)
        # The tap lives as long as its holder: the client goes, so do the tap and the lease.
        user.exit()
        wait_until(lambda: ifname not in links(ns), what=f"{ifname} to vanish")
        lease_ended(daemon, ifname)


def test_group_rules_match_supplementary_and_primary_groups(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    config = f'[[allow]]\ngroups = ["{G1}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        member = users(daemon, U1, U1, groups=[G2, G1])
        ifname = member.granted(br=br0)["ifname"]
        assert names_uid(tap_info_data(ns, ifname)["user"], U1)
        assert users(daemon, U2, G1).granted(br=br0)["bridge"] == "br0"
        outsider = users(daemon, U3, U3, groups=[G2])
        assert "no allow rule" in outsider.refused("denied", br=br0)
        assert "no allow rule" in users(daemon, U1).refused("denied", br=br0)


def test_tap_group_makes_the_tap_the_groups_too(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    config = f'[[allow]]\nusers = ["{U1}"]\nbridges = ["br0"]\ntap_group = "{G2}"\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        ifname = users(daemon, U1).granted(br=br0)["ifname"]
        data = tap_info_data(ns, ifname)
        assert names_uid(data["user"], U1) and names_gid(data["group"], G2), data


def test_deny_wins_over_allow_and_names_its_rule(
    ns: str, br0: str, br1: str, tmp_path: Path, users: Users
) -> None:
    config = f"""
[[allow]]
bridges = ["*"]
users = ["{U1}", "{U2}"]
[[deny]]
users = ["{U1}"]
[[deny]]
groups = ["{G1}"]
bridges = ["br0"]
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        message = users(daemon, U1).refused("denied", br=br0)
        assert "deny[0]" in message and f"uid {U1}" in message
        in_group = users(daemon, U2, U2, groups=[G1])
        assert "deny[1]" in in_group.refused("denied", br=br0)
        assert in_group.granted(br=br1)["bridge"] == "br1"  # deny[1] names br0 only
        assert users(daemon, U2).granted(br=br0)["bridge"] == "br0"
        assert {lease["uid"] for lease in daemon.leases()} == {U2}


# -- limits --------------------------------------------------------------------------


def test_max_taps_counts_live_taps_per_uid(ns: str, br0: str, tmp_path: Path, users: Users) -> None:
    config = f'[[allow]]\nusers = ["{U1}", "{U2}"]\nbridges = ["br0"]\nmax_taps = 2\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        user = users(daemon, U1)
        first = user.granted(br=br0)
        user.granted(br=br0)
        message = user.refused("quota-exceeded", br=br0)
        assert "max_taps = 2" in message and "allow[0]" in message
        assert len(taps(ns)) == 2
        # Releasing one (closing its fds) makes room once its lease has ended.
        user.close(first["grant"])
        lease_ended(daemon, first["ifname"])
        third = user.granted(br=br0)
        assert first["ifname"] not in taps(ns) and third["ifname"] in taps(ns)
        assert len(taps(ns)) == 2
        # The count is per uid: another uid of the same rule has its own two,
        # and requests made at the same moment cannot overshoot it.  Two
        # queues each: a multi-queue tap is made in the kernel thread, so the
        # requests are in flight together between the check and the grant
        # (a single-queue tap is made without yielding, and would pass even
        # without the in-flight count).
        results = users(daemon, U2).parallel([{"op": "request", "br": br0, "queues": 2}] * 6)
        codes = sorted("ok" if r["ok"] else r["code"] for r in results)
        assert codes == ["ok"] * 2 + ["quota-exceeded"] * 4, results
        held = sorted(lease["uid"] for lease in daemon.leases())
        assert held == [U1, U1, U2, U2]
        assert len(taps(ns)) == 4


def test_requests_at_the_same_moment_cannot_overshoot_the_global_max_taps(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    # No per-uid max_taps here: only [taps] max_taps and its in-flight count
    # stand between six two-queue requests (made in the kernel thread, so
    # they yield between check and grant) and a third tap.
    config = f'[taps]\nmax_taps = 2\n[[allow]]\nusers = ["{U2}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        results = users(daemon, U2).parallel([{"op": "request", "br": br0, "queues": 2}] * 6)
        codes = sorted("ok" if r["ok"] else r["code"] for r in results)
        assert codes == ["ok"] * 2 + ["quota-exceeded"] * 4, results
        refusals = [r["message"] for r in results if not r["ok"]]
        assert all("taps.max_taps = 2" in message for message in refusals), refusals
        assert len(taps(ns)) == 2


def test_max_queues_bounds_one_request(ns: str, br0: str, tmp_path: Path, users: Users) -> None:
    config = f'[[allow]]\nusers = ["{U1}"]\nbridges = ["br0"]\nmax_queues = 4\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        user = users(daemon, U1)
        message = user.refused("denied", br=br0, queues=5)
        assert "at most 4 queues" in message and "allow[0]" in message
        assert taps(ns) == []
        reply = user.granted(br=br0, queues=4)
        assert reply["fds"] == 4
        assert tap_info_data(ns, reply["ifname"])["numqueues"] == 4


# -- leases are private ----------------------------------------------------------------


def test_a_uid_cannot_see_or_release_another_uids_lease(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    config = f'[[allow]]\nbridges = ["*"]\nusers = ["0", "{U1}", "{U2}"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        owner, other = users(daemon, U1), users(daemon, U2)
        mine = owner.granted(br=br0)
        theirs = other.granted(br=br0)
        lease, ifname = mine["lease"], mine["ifname"]

        listed = other.call({"op": "list"})["reply"]["leases"]
        assert [x["id"] for x in listed] == [theirs["lease"]]
        # Another uid's lease, by id or by name, is answered exactly as one
        # that does not exist.
        answers = set()
        for key in (lease, ifname, "000000000000", "tapnosuch"):
            out = other.call({"op": "release", "lease": key})
            assert not out["ok"] and out["code"] == "lease-not-found", out
            answers.add(out["message"].replace(repr(key), "KEY"))
        assert len(answers) == 1, answers
        assert ifname in taps(ns)
        status = other.call({"op": "status"})["reply"]
        assert status["leases"] == 1

        # Root sees every lease; the owner sees its own and may end it.
        assert {x["id"] for x in daemon.leases()} == {lease, theirs["lease"]}
        assert [x["id"] for x in owner.call({"op": "list"})["reply"]["leases"]] == [lease]
        released = owner.call({"op": "release", "lease": ifname})
        assert released["ok"] and released["reply"]["lease"]["id"] == lease
        wait_until(lambda: ifname not in links(ns), what=f"{ifname} to be removed")
        assert [x["id"] for x in daemon.leases()] == [theirs["lease"]]


# -- reload -----------------------------------------------------------------------------


def _log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log() if e["event"] == event]


def test_sighup_reloads_the_policy_and_keeps_it_when_the_file_is_bad(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    with run_daemon(ns, tmp_path, '[[allow]]\nbridges = ["*"]\nusers = ["0"]\n') as daemon:
        share(daemon)
        cfg = tmp_path / "tapd.toml"
        user = users(daemon, U1)
        assert "no allow rule" in user.refused("denied", br=br0)

        cfg.write_text(f'[[allow]]\nbridges = ["*"]\nusers = ["0", "{U1}"]\n')
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: _log_events(daemon, "config.reload.complete"), what="the reload")
        user.granted(br=br0)

        # Applied even in part, this would take U1's rule away.
        cfg.write_text('[[allow]]\nbridges = ["*"]\nusers = ["0"]\nmax_taps = "many"\n')
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: _log_events(daemon, "config.reload.failed"), what="the failed reload")
        (failed,) = _log_events(daemon, "config.reload.failed")
        assert failed["path"] == str(cfg)
        assert any("allow[0].max_taps" in p for p in failed["problems"]), failed
        # The previous configuration still applies, and the daemon still runs.
        user.granted(br=br0)
        assert daemon.proc.poll() is None
        assert len(_log_events(daemon, "config.reload.complete")) == 1


# -- peers the kernel describes unusually ----------------------------------------------


def test_a_peer_in_very_many_groups_is_answered_and_its_deny_rule_holds(
    ns: str, br0: str, tmp_path: Path, users: Users
) -> None:
    # SO_PEERGROUPS needs a larger buffer than tapd's 1024 bytes for more than
    # 256 groups; such a peer must still be judged with all of them, never
    # handed a tap past a [[deny]] naming one, nor refused one an [[allow]]
    # gives it through its 299th group.
    many = [G1 + 1000 + i for i in range(300)]
    config = f"""
[[allow]]
bridges = ["*"]
users = ["{U1}"]
[[allow]]
bridges = ["*"]
groups = ["{many[-2]}"]
[[deny]]
groups = ["{many[-1]}"]
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        user = users(daemon, U1, U1, groups=many)
        message = user.refused("denied", br=br0)
        assert "deny[0]" in message, message
        assert taps(ns) == []
        allowed = users(daemon, U2, U2, groups=many[:-1])
        assert allowed.granted(br=br0)["bridge"] == "br0"
        assert len(taps(ns)) == 1
        assert daemon.call({"op": "hello"})[0]["ok"] is True
