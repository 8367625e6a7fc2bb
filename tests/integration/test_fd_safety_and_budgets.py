"""Attacks on tapd as other uids: fds that block whoever closes them, and
budgets that one or two uids could use up for everyone (issue 11, items 1, 6
and 8).

Each attacker is this interpreter started as root and dropping to its uid
itself (setgroups, setresgid, setresuid) once its imports are done: another
uid cannot run a pyenv interpreter under /root (see FACTS.md).  The kernel
then records that uid for every socket it connects.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tapdtest import Daemon, run_daemon, taps, wait_until

from tapd import client, closer, tun

REPO = str(Path(__file__).resolve().parents[2])
U1, U2, U3 = 4242, 4243, 4244
G1 = 4300

_DROP = r"""
# Everything is imported before the uid changes: /root is closed to others.
import contextlib, ctypes, encodings.idna, errno, json, os, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from tapd import fdpass, protocol
PATH = sys.argv[2]
ARGS = json.loads(sys.argv[4])
os.setgroups([int(g) for g in ARGS.get("groups", [])])
os.setresgid(int(sys.argv[3]), int(sys.argv[3]), int(sys.argv[3]))
os.setresuid(int(sys.argv[3]), int(sys.argv[3]), int(sys.argv[3]))

def say(**what):
    print(json.dumps(what), flush=True)

def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(PATH)
    return sock

kept = []  # fds tapd sent us: held until we exit

def reply(sock):
    buf = b""
    while not buf.endswith(b"\n"):
        got = fdpass.recv_sync(sock)
        kept.extend(got.fds)
        if not got.data:
            break
        buf += got.data
    return protocol.decode_reply(buf.splitlines()[0]) if buf else None
"""


class Attacker:
    """``body`` run as ``uid`` (optionally inside network namespace ``ns``),
    after :data:`_DROP`.  It reports with JSON lines and lives until
    :meth:`end`."""

    def __init__(
        self, daemon: Daemon, uid: int, body: str, ns: str | None = None, **args: Any
    ) -> None:
        argv = [sys.executable, "-c", _DROP + body, REPO, daemon.socket_path, str(uid)]
        argv.append(json.dumps(args))
        if ns is not None:
            argv = ["ip", "netns", "exec", ns, *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the attacker died (status {self.proc.poll()})"
        return json.loads(line)

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def attackers() -> Iterator[list[Attacker]]:
    started: list[Attacker] = []
    yield started
    for attacker in started:
        attacker.end()


def share(daemon: Daemon) -> None:
    os.chmod(os.path.dirname(daemon.socket_path), 0o755)
    os.chmod(daemon.socket_path, 0o666)


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log() if e["event"] == name]


def hello(daemon: Daemon, fds: list[int] | None = None) -> dict[str, Any]:
    """Root's hello, with ``fds`` beside it; waits 20 s at most."""
    try:
        reply, _ = daemon.call({"op": "hello"}, fds=fds or [], timeout=20)
    except client.ClientError as exc:
        return {"ok": False, "code": exc.code}
    return reply


def closed_by_tapd(daemon: Daemon) -> None:
    """Send the write end of a pipe with a hello and see tapd let go of it:
    the read end reaches EOF once no copy is left."""
    r, w = os.pipe()
    try:
        assert hello(daemon, [w])["ok"] is True
        os.close(w)
        w = -1
        os.set_blocking(r, True)
        wait_until(lambda: _at_eof(r), timeout=20, what="tapd to close the fd it was sent")
    finally:
        tun.close_all([fd for fd in (r, w) if fd >= 0])


def _at_eof(fd: int) -> bool:
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable) and os.read(fd, 1) == b""


# -- 1. nothing a client sends can block tapd ----------------------------------------

_LINGER = r"""
# A TCP connection nobody reads, its send queue full, SO_LINGER set: whoever
# drops the last reference waits in tcp_close() for the linger time.
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
tcp = socket.create_connection(listener.getsockname())
tcp.setblocking(False)
try:
    while True:
        tcp.send(b"x" * 65536)
except BlockingIOError:
    pass
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 600))
sock = connect()
# The fd goes with the start of a line, our copy is closed, then the line ends:
# tapd's is the last reference when it lets go of it.
fdpass.send_line_sync(sock, b'{"op": "hello"', [tcp.fileno()])
tcp.close()
time.sleep(0.2)
sock.sendall(b"}\n")
say(reply=reply(sock), pid=os.getpid())
sys.stdin.read()
"""


def test_a_lingering_tcp_socket_sent_by_a_user_blocks_nobody(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    config = "[server]\ncloser_timeout = 1.0\n"
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        attacker = Attacker(daemon, U1, _LINGER, ns=ns)
        attackers.append(attacker)
        sent = attacker.read()
        assert sent["reply"]["ok"] is True
        # tapd lets go of the socket after that reply; everyone else is served.
        assert hello(daemon)["ok"] is True
        reply = daemon.request(br=br0)
        reply.close()
        # The closer that waits in tcp_close() is found, named, and replaced.
        wait_until(lambda: events(daemon, "closer.stuck"), timeout=20, what="closer.stuck")
        (stuck,) = events(daemon, "closer.stuck")
        assert f"uid={U1} pid={sent['pid']}" in stuck["owner"], stuck
        wait_until(lambda: events(daemon, "closer.started"), timeout=20, what="a fresh closer")
        closed_by_tapd(daemon)
        assert daemon.proc.poll() is None


_FUSE = r"""
# A FUSE file system of our own (a user namespace may mount one) that answers
# what it takes to open a file, and never answers FLUSH but from our child.
libc = ctypes.CDLL(None, use_errno=True)

def check(ret, what):
    if ret:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

uid = os.getuid()
check(libc.prctl(4, 1, 0, 0, 0), "PR_SET_DUMPABLE")  # or /proc/self/uid_map is root's
check(libc.unshare(0x10000000 | 0x00020000), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {uid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
check(libc.mount(b"none", b"/", None, 0x4000 | (1 << 18), None), "making / private")
dev = os.open(ARGS["device"], os.O_RDWR)
options = f"fd={dev},rootmode=40000,user_id=0,group_id=0".encode()
check(libc.mount(b"fuse", ARGS["mnt"].encode(), b"fuse", 2 | 4, options), "mounting fuse")

HDR_IN = struct.Struct("<IIQQIIIHH")
HDR_OUT = struct.Struct("<IiQ")
ATTR = struct.Struct("<6Q10I")

def attr(node):
    mode = 0o040755 if node == 1 else 0o100644
    return ATTR.pack(node, 0, 0, 0, 0, 0, 0, 0, 0, mode, 2 if node == 1 else 1, 0, 0, 0, 4096, 0)

def answer(unique, body=b"", error=0):
    os.write(dev, HDR_OUT.pack(HDR_OUT.size + len(body), -error, unique) + body)

child = os.fork()
if child == 0:
    os.close(dev)
    f = os.open(ARGS["mnt"] + "/f", os.O_RDONLY)
    sock = connect()
    fdpass.send_line_sync(sock, b'{"op": "hello"', [f])
    os.close(f)  # our own FLUSH: answered
    sock.sendall(b"}\n")
    say(reply=reply(sock), pid=os.getpid())
    os._exit(0)

unanswered = []
while True:
    try:
        request = os.read(dev, 1 << 20)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            continue  # an interrupted request
        raise
    _, opcode, unique, node, _, _, pid, _, _ = HDR_IN.unpack_from(request)
    body = request[HDR_IN.size:]
    if opcode == 26:  # INIT: protocol 7.31, nothing optional
        init_in = struct.unpack_from("<IIII", body)
        answer(unique, struct.pack("<IIIIHHIIHHI", 7, 31, init_in[2], 0, 16, 12,
                                   1 << 17, 1, 32, 0, 0) + bytes(28))
    elif opcode == 1:  # LOOKUP
        if body.rstrip(b"\0") == b"f":
            answer(unique, struct.pack("<QQQQII", 2, 1, 60, 60, 0, 0) + attr(2))
        else:
            answer(unique, error=errno.ENOENT)
    elif opcode == 3:  # GETATTR
        answer(unique, struct.pack("<QII", 60, 0, 0) + attr(node))
    elif opcode == 14:  # OPEN
        answer(unique, struct.pack("<QII", 1, 0, 0))
    elif opcode == 25:  # FLUSH
        if pid == child:
            answer(unique)
        else:
            unanswered.append(pid)
    elif opcode == 18:  # RELEASE
        answer(unique)
    elif opcode in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no reply
        pass
    else:
        answer(unique, error=errno.ENOSYS)
"""


@pytest.fixture
def fuse_device() -> Iterator[tuple[str, str]]:
    """A node for the FUSE device that every uid may open, as /dev/fuse is on
    most distributions (0666); this machine's own is 0600, and is left alone.
    And an empty directory to mount on."""
    where = tempfile.mkdtemp(prefix="tapd-fuse-")
    try:
        os.chmod(where, 0o755)
        device = os.path.join(where, "fuse")
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(10, 229))
        os.chmod(device, 0o666)
        mnt = os.path.join(where, "mnt")
        os.mkdir(mnt, 0o755)
        yield device, mnt
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(where, "fuse"))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(where, "mnt"))
            os.rmdir(where)


def test_a_fuse_file_whose_server_never_answers_blocks_nobody(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker], fuse_device: tuple[str, str]
) -> None:
    device, mnt = fuse_device
    config = "[server]\ncloser_timeout = 1.0\nmax_stuck_closers = 1\n"
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        attacker = Attacker(daemon, U1, _FUSE, device=device, mnt=mnt)
        try:
            sent = attacker.read()
            assert sent["reply"]["ok"] is True, sent
            # tapd's FLUSH is never answered, and tapd goes on serving everyone.
            assert hello(daemon)["ok"] is True
            daemon.request(br=br0).close()
            wait_until(lambda: events(daemon, "closer.stuck"), timeout=20, what="closer.stuck")
            (stuck,) = events(daemon, "closer.stuck")
            assert f"uid={U1} pid={sent['pid']}" in stuck["owner"], stuck
            # A closer in a FUSE flush outlives SIGKILL; with max_stuck_closers
            # of them, fds are refused (and held, not closed) until one ends.
            r, w = os.pipe()
            try:
                refused = hello(daemon, [w])
                assert refused == {"ok": False, "code": "fds-refused"}, refused
                (logged,) = [
                    e for e in events(daemon, "request.refused") if e["code"] == "fds-refused"
                ]
                assert logged["uid"] == 0 and logged["stuck_closers"] == 1
                assert hello(daemon)["ok"] is True
                os.close(w)
                w = -1
            finally:
                if w >= 0:
                    os.close(w)
            # The FUSE server goes: its requests fail, the closer ends, another
            # takes over and closes what waited.
            attacker.end()
            wait_until(lambda: _at_eof(r), timeout=20, what="the refused fd to be closed")
            os.close(r)
            wait_until(lambda: events(daemon, "closer.released"), what="closer.released")
            closed_by_tapd(daemon)
        finally:
            attacker.end()


def test_a_non_tap_fd_is_told_apart_before_any_ioctl(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(client.ClientError) as exc:
            daemon.call({"op": "request", "br": "br0", "fd": str(r)}, fds=[r])
        assert exc.value.code == "not-a-tap"
        assert "pipe:[" in exc.value.message
    finally:
        tun.close_all([r, w])


# -- 6. budgets one or two uids cannot exhaust ----------------------------------------

_HOLD = r"""
# Connections, each answered once, then held open doing nothing else.
held = []
for _ in range(ARGS["count"]):
    sock = connect()
    with contextlib.suppress(OSError):  # refused at once: the reply is there to read
        sock.sendall(b'{"op": "hello"}\n')
    held.append((sock, reply(sock)))
say(codes=[r["ok"] if r and r["ok"] else (r or {}).get("error", {}).get("code") for _, r in held])
sys.stdin.read()
"""


def test_idle_connections_of_two_uids_do_not_lock_root_out(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    config = "[server]\nmax_connections = 8\nmax_connections_per_uid = 4\n"
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        for uid in (U1, U2):
            attackers.append(Attacker(daemon, uid, _HOLD, count=5))
        for attacker in attackers:
            assert attacker.read()["codes"] == [True] * 4 + ["overloaded"]
        # Every slot is taken; root still gets in.
        outsider = Attacker(daemon, U3, _HOLD, count=1)
        attackers.append(outsider)
        assert outsider.read()["codes"] == ["overloaded"]
        assert hello(daemon)["ok"] is True
        daemon.request(br=br0).close()


_KEEPALIVE = r"""
# One connection kept busy with a hello every 0.2 s, for as long as tapd lets it.
sock = connect()
start = time.monotonic()
while time.monotonic() - start < 60:
    with contextlib.suppress(OSError):
        sock.sendall(b'{"op": "hello"}\n')  # fails once tapd has closed; its reply stays
    try:
        answer = reply(sock)
    except OSError:
        answer = None
    if answer is None or not answer["ok"]:
        code = answer and answer["error"]["code"]
        say(code=code, after=round(time.monotonic() - start, 1))
        break
    time.sleep(0.2)
else:
    say(code=None, after=60)
sys.stdin.read()
"""


def test_hello_does_not_keep_a_connection_beyond_its_lifetime(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    config = "[server]\nconnection_lifetime = 2.0\n"
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        attacker = Attacker(daemon, U1, _KEEPALIVE)
        attackers.append(attacker)
        ended = attacker.read()
        assert ended["code"] == "timeout", ended
        wait_until(lambda: daemon.call({"op": "status"})[0]["connections"] == 1)


_PARK = r"""
# fds parked on lines never finished: the same fd number sent many times is
# many fds in tapd.
r, w = os.pipe()
held, codes = [], []
left = ARGS["fds"]
while left > 0:
    count = min(250, left)
    sock = connect()
    fdpass.send_line_sync(sock, b'{"op": "hel', [w] * count)
    sock.sendall(b"l")
    held.append(sock)
    left -= count
# A refused connection is answered and closed; a parked one hears nothing.
for sock in held:
    sock.settimeout(1)
    try:
        answer = reply(sock)
        codes.append(answer["error"]["code"] if answer else "closed")
    except TimeoutError:
        codes.append("parked")
say(codes=codes)
sys.stdin.read()
"""


def _fd_budget(daemon: Daemon) -> int:
    """A quarter of tapd's open-file limit: its budget for fds from clients."""
    for line in Path(f"/proc/{daemon.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return max(512, int(line.split()[3]) // 4)
    raise AssertionError("no open-file limit for tapd")


def test_fds_parked_by_one_uid_do_not_starve_another(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    config = "[server]\nmax_fds_per_uid = 600\n"
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        wait_until(lambda: hello(daemon)["ok"] is True)
        budget = _fd_budget(daemon)
        parker = Attacker(daemon, U1, _PARK, fds=budget)
        attackers.append(parker)
        codes = parker.read()["codes"]
        # Which of its connections tapd reads first is up to the scheduler.
        assert sorted(codes) == ["parked"] * 2 + ["too-many-fds"] * (len(codes) - 2), codes
        # Another uid still gets its fds taken.
        other = Attacker(daemon, U2, _PARK, fds=100)
        attackers.append(other)
        assert other.read()["codes"] == ["parked"]
        refusals = [e for e in events(daemon, "request.refused") if e["code"] == "too-many-fds"]
        assert refusals and {e["uid"] for e in refusals} == {U1}


_REQUEST = r"""
# Requests on one connection each, holding every fd granted.
held = []
for request in ARGS["requests"]:
    sock = connect()
    fdpass.send_line_sync(sock, (json.dumps(request) + "\n").encode(), [])
    got, buf = [], b""
    while not buf.endswith(b"\n"):
        part = fdpass.recv_sync(sock)
        got += part.fds
        if not part.data:
            break
        buf += part.data
    held.append(got)
    answer = protocol.decode_reply(buf.splitlines()[0])
    say(ok=answer["ok"], code=None if answer["ok"] else answer["error"]["code"],
        message=None if answer["ok"] else answer["error"]["message"],
        lease=answer.get("lease"))
sys.stdin.read()
"""


def test_a_global_max_taps_bounds_every_uid_a_group_rule_matches(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    # A group rule's max_taps is per uid, and subordinate uids keep the group:
    # only a total over uids bounds them.
    config = f"""
[taps]
max_taps = 3
[[allow]]
bridges = ["*"]
users = ["0"]
[[allow]]
groups = ["{G1}"]
bridges = ["br0"]
max_taps = 2
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        request = {"op": "request", "br": "br0"}
        first = Attacker(daemon, U1, _REQUEST, groups=[G1], requests=[request] * 3)
        attackers.append(first)
        answers = [first.read() for _ in range(3)]
        assert [a["code"] for a in answers] == [None, None, "quota-exceeded"]
        assert "max_taps = 2" in answers[2]["message"]  # the rule's own, per uid
        second = Attacker(daemon, U2, _REQUEST, groups=[G1], requests=[request] * 2)
        attackers.append(second)
        answers = [second.read() for _ in range(2)]
        assert [a["code"] for a in answers] == [None, "quota-exceeded"]
        assert "taps.max_taps = 3" in answers[1]["message"]
        assert len(taps(ns)) == 3
        # Root is not counted, nor bounded by it.
        daemon.request(br=br0).close()


# -- 8. bridge-helper without a socket ---------------------------------------------------

_HELPER = r"""
# bridge-helper without a socket: the lease goes to our parent.  With
# ARGS["fork"], that parent is a process of our own uid.
if ARGS["fork"]:
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        say(parent=os.getpid(), **json.loads(os.read(r, 65536)))
        sys.stdin.read()
        os._exit(0)
    os.close(r)
sock = connect()
sock.sendall(b'{"op": "bridge-helper", "br": "br0"}\n')
answer = reply(sock)
out = {"ok": answer["ok"]}
if not answer["ok"]:
    out.update(answer["error"])
if ARGS["fork"]:
    os.write(w, json.dumps(out).encode())
    sys.stdin.read()  # keep the tap's fd (QEMU would have it) until the test ends
    os._exit(0)
say(parent=os.getppid(), **out)
sys.stdin.read()
"""


def test_bridge_helper_gives_the_lease_only_to_a_parent_of_the_same_uid(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    config = f'[[allow]]\nusers = ["0", "{U1}"]\nbridges = ["br0"]\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        share(daemon)
        # Started by this test, the helper's parent is root's: no lease for it.
        under_root = Attacker(daemon, U1, _HELPER, fork=False)
        attackers.append(under_root)
        refused = under_root.read()
        assert refused["parent"] == os.getpid()
        assert refused["ok"] is False and refused["code"] == "denied", refused
        assert "runs as uid 0" in refused["message"] and f"not as uid {U1}" in refused["message"]
        assert taps(ns) == [] and daemon.leases() == []
        # Under a process of its own uid, that process holds the lease.
        own = Attacker(daemon, U1, _HELPER, fork=True)
        attackers.append(own)
        granted = own.read()
        assert granted["ok"] is True, granted
        (lease,) = daemon.leases()
        assert (lease["uid"], lease["pid"]) == (U1, granted["parent"])


def test_a_root_peer_may_give_its_lease_to_any_parent(daemon: Daemon) -> None:
    reply, fds = daemon.call({"op": "bridge-helper", "br": "br0"})
    tun.close_all(fds)
    assert reply["ok"] is True


def test_the_closers_share_tapds_fd_table_and_die_with_it(daemon: Daemon) -> None:
    hello(daemon)
    pid = daemon.proc.pid
    kids = _children(pid)
    assert len(kids) == 1  # the spawner
    (spawner,) = kids
    (closer,) = _children(spawner)
    for other in (spawner, closer):
        assert _same_fd_table(pid, other)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    wait_until(lambda: not _alive(spawner) and not _alive(closer), what="closers to die with tapd")


#: kcmp(2): KCMP_FILES; __NR_kcmp on x86_64 and arm64
_KCMP_FILES = 2
_NR_KCMP = {"x86_64": 312, "aarch64": 272}


def _same_fd_table(a: int, b: int) -> bool:
    """kcmp(KCMP_FILES) is 0 when two processes share one fd table."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(_NR_KCMP[platform.machine()], a, b, _KCMP_FILES, 0, 0)
    assert result >= 0, os.strerror(ctypes.get_errno())
    return bool(result == 0)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        found += [int(x) for x in text.split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- the unit's confinement lets the closers work ----------------------------------------

#: what tapd.closer calls (besides read, write, close): the raw clone, the
#: death signal, the pidfd it gets and signals, the pipes and shared counters
_CLOSER_SYSCALLS = ("clone", "prctl", "pidfd_send_signal", "pipe2", "mmap", "getppid", "poll")


def _syscall_set(name: str) -> set[str]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    found: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        found |= _syscall_set(word) if word.startswith("@") else {word}
    return found


def test_the_units_syscall_filter_allows_what_the_closers_call() -> None:
    unit = Path(REPO, "systemd", "tapd.service").read_text().splitlines()
    filters = [
        line.split("=", 1)[1].split() for line in unit if line.startswith("SystemCallFilter=")
    ]
    allowed: set[str] = set()
    denied: set[str] = set()
    for words in filters:
        if words[0].startswith("~"):
            words = [words[0][1:], *words[1:]]
            for word in words:
                denied |= _syscall_set(word) if word.startswith("@") else {word}
        else:
            for word in words:
                allowed |= _syscall_set(word) if word.startswith("@") else {word}
    for call in _CLOSER_SYSCALLS:
        assert call in allowed and call not in denied, call
    # CLONE_FILES is no namespace flag: RestrictNamespaces= does not see it,
    # and the closers' shared memory is never executable (MemoryDenyWriteExecute=).
    assert (closer.CLONE_FILES | closer.CLONE_PIDFD) & 0x7E02_0000 == 0  # every CLONE_NEW*


# tapd under the unit's syscall filter, rebuilt with libseccomp as systemd 252
# builds it: @system-service allowed, @privileged and @resources taken away,
# EPERM for the rest; RestrictNamespaces= (clone with a CLONE_NEW* flag
# refused, clone3 ENOSYS so that libc falls back to clone) and
# MemoryDenyWriteExecute= (no mapping both writable and executable, no
# mprotect adding PROT_EXEC) as argument filters.
_CONFINED = r"""
import ctypes, errno, os, sys
allowed = set(sys.argv[1].split(","))
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

ALLOW, MASKED_EQ = 0x7FFF0000, 7
def errno_(e):
    return 0x00050000 | e
ctx = ctypes.c_void_p(lib.seccomp_init(errno_(errno.EPERM)))

def rule(action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return
    array = (Cmp * max(1, len(cmps)))(*cmps)
    assert lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) == 0, name

special = {"clone", "clone3", "mmap", "mprotect", "pkey_mprotect", "shmat"}
for name in allowed - special:
    rule(ALLOW, name)
rule(ALLOW, "clone", Cmp(0, MASKED_EQ, 0x7E020000, 0))
rule(errno_(errno.ENOSYS), "clone3")
for prot in (0, 2, 4):  # PROT_WRITE, PROT_EXEC, never both
    rule(ALLOW, "mmap", Cmp(2, MASKED_EQ, 6, prot))
rule(ALLOW, "mprotect", Cmp(2, MASKED_EQ, 4, 0))
rule(ALLOW, "pkey_mprotect", Cmp(2, MASKED_EQ, 4, 0))
assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert lib.seccomp_load(ctx) == 0
os.execv(sys.executable, [sys.executable, "-m", "tapd.daemon", *sys.argv[2:]])
"""


def _unit_syscalls() -> set[str]:
    unit = Path(REPO, "systemd", "tapd.service").read_text().splitlines()
    allowed: set[str] = set()
    for line in unit:
        if line.startswith("SystemCallFilter="):
            words = line.split("=", 1)[1].split()
            deny = words[0].startswith("~")
            found: set[str] = set()
            for word in [words[0].lstrip("~"), *words[1:]]:
                found |= _syscall_set(word) if word.startswith("@") else {word}
            allowed = allowed - found if deny else allowed | found
    return allowed


def test_closers_work_under_the_units_syscall_filter(
    ns: str, br0: str, tmp_path: Path, attackers: list[Attacker]
) -> None:
    path = tempfile.mkdtemp(prefix="tapd-") + "/s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    (tmp_path / "tapd.toml").write_text("[server]\ncloser_timeout = 1.0\n")
    argv = [sys.executable, "-c", _CONFINED, ",".join(sorted(_unit_syscalls()))]
    argv += ["--listen-fd", str(listener.fileno()), "--config", str(tmp_path / "tapd.toml")]
    log_path = tmp_path / "tapd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            pass_fds=[listener.fileno()],
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    listener.close()
    daemon = Daemon(ns=ns, socket_path=path, proc=proc, log_path=log_path)
    try:
        share(daemon)
        wait_until(lambda: proc.poll() is not None or _ok(daemon), timeout=20, what="tapd up")
        assert proc.poll() is None, log_path.read_text()
        assert Path(f"/proc/{proc.pid}/status").read_text().count("Seccomp:\t2") == 1
        daemon.request(br=br0).close()
        closed_by_tapd(daemon)
        # The stuck path too: kill (pidfd_send_signal) and a fresh closer (clone).
        attacker = Attacker(daemon, U1, _LINGER, ns=ns)
        attackers.append(attacker)
        assert attacker.read()["reply"]["ok"] is True
        wait_until(lambda: events(daemon, "closer.started"), timeout=20, what="a fresh closer")
        (stuck,) = events(daemon, "closer.stuck")
        assert stuck["killed"] is True
        closed_by_tapd(daemon)
    finally:
        daemon.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))


def _ok(daemon: Daemon) -> bool:
    try:
        return hello(daemon).get("ok") is True
    except OSError:
        return False
