"""The op table and granting without root: Service over the fake kernel layer.

Peers are real processes; their uid is what the test says, so that policy
and quotas can be tried for several users from one unprivileged test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import Programs, Stack, open_fds, peer, process, stack

from tapd.config import Config
from tapd.errors import (
    BridgeNotFound,
    Denied,
    HookFailed,
    KernelError,
    LeaseNotFound,
    NotATap,
    OwnerGone,
    QuotaExceeded,
    TapdError,
    TapLeased,
)
from tapd.lifecycle import Grant
from tapd.models import HelloReply, ListReply, MetricsReply, StatusReply, TapReply
from tapd.owner import Peer
from tapd.protocol import decode_request

ALICE, BOB = 4101, 4102


def config(programs: Programs, taps: dict[str, Any] | None = None, **rule: Any) -> Config:
    return Config.model_validate(
        {
            "taps": taps or {},
            "programs": {
                "nft": programs.nft,
                "hooks": {
                    "up": programs.hook("up"),
                    "down": programs.hook("down"),
                    "broken": programs.hook("broken", status=3),
                },
            },
            "allow": [
                {"users": [str(os.getuid()), str(ALICE), str(BOB)], "bridges": ["*"], **rule}
            ],
        }
    )


@pytest.fixture
def programs(tmp_path: Path) -> Programs:
    return Programs(tmp_path)


async def ask(s: Stack, who: Peer, fds: list[int] | None = None, **request: Any) -> Grant:
    request.setdefault("op", "request")
    if request["op"] in ("request", "prepare"):
        request.setdefault("br", "br0")
    line = json.dumps(request).encode()
    return await s.service.handle(who, decode_request(line), fds or [], s.log)


async def test_a_granted_tap_is_on_its_bridge_leased_and_tagged(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        who = peer(uid=ALICE)
        g = await ask(s, who, queues=2, vhost=True)
        assert isinstance(g.reply, TapReply) and g.lease is not None
        assert (g.reply.fds, g.reply.vhostfds, g.reply.mtu) == (2, 2, 1400)
        assert len(g.fds) == 4 and g.rule is not None
        link = s.kernel.links[g.lease.ifindex]
        bridge = s.kernel.by_name("br0")
        assert bridge is not None and link.master == bridge.index and link.up
        assert link.multi_queue and link.owner == ALICE
        assert g.lease.tag() == link.alias
        assert s.lifecycle.registry.held_by(ALICE) == 1
        assert [s.kernel.by_fd(fd) for fd in g.fds[:2]] == [link, link]
        g.sent()
        assert g.fds == [] and s.log.named("request.granted")
        os.close(who.pidfd)


async def test_the_other_ops(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        alice, bob = peer(uid=ALICE), peer(uid=BOB)
        (await ask(s, alice)).sent()
        (await ask(s, bob)).sent()
        hello = (await ask(s, alice, op="hello")).reply
        assert isinstance(hello, HelloReply) and "bridge-helper" in hello.ops
        listed = (await ask(s, alice, op="list")).reply
        assert isinstance(listed, ListReply) and [x.uid for x in listed.leases] == [ALICE]
        status = (await ask(s, alice, op="status")).reply
        assert isinstance(status, StatusReply) and status.leases == 1
        scraped = (await ask(s, peer(uid=0), op="metrics")).reply
        assert isinstance(scraped, MetricsReply) and "tapd_" in scraped.text
        # Bob may not release Alice's lease: to him it does not exist.
        with pytest.raises(LeaseNotFound):
            await ask(s, bob, op="release", lease=listed.leases[0].id)
        os.close(alice.pidfd)
        os.close(bob.pidfd)


async def _race(s: Stack, *uids: int) -> list[Grant | TapdError]:
    """Requests from ``uids`` at once, all in flight while the first tap is
    being made."""
    hold = s.maker.hold("make")
    results: list[Grant | TapdError] = []

    async def one(uid: int) -> None:
        who = peer(uid=uid)
        try:
            results.append(await ask(s, who))
        except TapdError as exc:
            results.append(exc)
        finally:
            os.close(who.pidfd)

    async with trio.open_nursery() as nursery:
        for uid in uids:
            nursery.start_soon(one, uid)
        await hold.reached_by(1)
        await trio.testing.wait_all_tasks_blocked()
        hold.release()
    return results


async def test_parallel_requests_cannot_overshoot_a_rules_max_taps(programs: Programs) -> None:
    async with stack(config(programs, max_taps=1)) as s:
        results = await _race(s, ALICE, ALICE)
        granted = [x for x in results if isinstance(x, Grant)]
        refused = [x for x in results if isinstance(x, QuotaExceeded)]
        assert (len(granted), len(refused)) == (1, 1), results
        assert len(s.kernel.taps()) == 1 and s.lifecycle.registry.held_by(ALICE) == 1
        granted[0].sent()
        # Nothing is counted as in flight once the requests are done.
        assert not s.service.granter._making


async def test_parallel_requests_cannot_overshoot_taps_max_taps(programs: Programs) -> None:
    async with stack(config(programs, {"max_taps": 1})) as s:
        results = await _race(s, ALICE, BOB)
        granted = [x for x in results if isinstance(x, Grant)]
        refused = [x for x in results if isinstance(x, QuotaExceeded)]
        assert (len(granted), len(refused)) == (1, 1), results
        assert "taps.max_taps" in refused[0].message
        assert len(s.kernel.taps()) == 1
        granted[0].sent()


async def test_an_undelivered_grant_is_undone(programs: Programs) -> None:
    cfg = config(programs, egress_limit="5Mbit", ip_ranges=["10.1.0.0/24"])
    async with stack(cfg) as s:
        who = peer(uid=ALICE)
        before = open_fds()
        g = await ask(s, who, downscript="down", guest_ips=["10.1.0.9"])
        assert g.lease is not None
        index, ifname = g.lease.ifindex, g.lease.ifname
        # Part of a split reply reached the client: it holds a queue.
        partial = os.dup(g.fds[0])
        await g.abandon()
        # The lease is gone and the tap removed although a queue is held,
        # with its ifb, its address filter and its downscript.
        assert s.lifecycle.registry.get(index) is None
        assert index not in s.kernel.links and not s.kernel.taps()
        assert s.netlink.called("delete") == [index]
        assert programs.ran() == [f"down {ifname}"]
        assert "delete" in programs.nft_documents()[-1]
        assert not [x for x in s.kernel.links.values() if x.kind == "ifb"]
        assert not s.log.named("request.granted")  # never delivered
        os.close(partial)
        assert open_fds() == before  # tapd's own copies closed, nothing leaked
        os.close(who.pidfd)


async def test_an_undelivered_adoption_gives_the_tap_back(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        who = peer()
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        g = await ask(s, who, [mine], fd="3")
        link = s.kernel.by_name("vm0")
        assert link is not None and link.master is not None
        await g.abandon()
        assert (link.master, link.alias, link.up) == (None, "", False)
        assert link.index in s.kernel.links and len(s.lifecycle.registry) == 0
        os.fstat(mine)  # the client's fd stays the caller's
        os.close(mine)
        os.close(who.pidfd)


async def test_adoption_checks(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        who = peer(uid=ALICE)
        theirs = s.kernel.client_tap("vm1", owner=BOB)
        with pytest.raises(Denied, match="not yours"):
            await ask(s, who, [theirs], fd="3")
        mine = s.kernel.client_tap("vm2", owner=ALICE)
        g = await ask(s, who, [mine], fd="3")
        assert isinstance(g.reply, TapReply) and g.reply.fds == 0 and g.fds == []
        g.sent()
        with pytest.raises(TapLeased, match="lease"):
            await ask(s, who, [mine], fd="3")
        r, w = os.pipe()  # a pipe, but no tap's
        with pytest.raises(NotATap):
            await ask(s, who, [w], fd="3")
        for fd in (theirs, mine, r, w, who.pidfd):
            os.close(fd)


async def test_failures_leave_nothing_behind(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        who = peer(uid=ALICE)
        with pytest.raises(BridgeNotFound):
            await ask(s, who, br="nosuch")
        s.maker.fail["make"] = KernelError("no")
        with pytest.raises(KernelError):
            await ask(s, who)
        del s.maker.fail["make"]
        # A script that fails: the tap made for it goes.
        with pytest.raises(HookFailed):
            await ask(s, who, script="broken")
        assert s.maker.calls[-1][0] == "discard"
        s.kernel.sweep()
        assert not s.kernel.taps() and len(s.lifecycle.registry) == 0
        assert not s.service.granter._making
        assert not s.service.granter._reserved_macs
        g = await ask(s, who, script="up")
        assert g.lease is not None and programs.ran()[-1] == f"up {g.lease.ifname}"
        g.sent()
        os.close(who.pidfd)


async def test_a_prepared_tap_is_removed_if_its_lease_cannot_start(programs: Programs) -> None:
    async with stack(config(programs, port_isolation=True)) as s:
        who = peer(uid=ALICE)
        s.netlink.fail["set_port"] = KernelError("no port flags today")
        with pytest.raises(KernelError):
            await ask(s, who, op="prepare")
        assert not s.kernel.taps()  # persistent, so removed by index
        os.close(who.pidfd)


# -- the bridge helper's owner ----------------------------------------------------


def _vmm_socket(tmp_path: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A process ("QEMU") connected to a socket of ours: its peer is that process."""
    path = str(tmp_path / "helper.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        code = (
            "import socket, sys\n"
            f"s = socket.socket(socket.AF_UNIX); s.connect({path!r})\n"
            "sys.stdin.read()\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        sock, _ = listener.accept()
    return proc, sock


async def test_bridge_helper_lease_belongs_to_the_process_behind_the_socket(
    programs: Programs, tmp_path: Path
) -> None:
    async with stack(config(programs)) as s:
        qemu, sock = _vmm_socket(tmp_path)
        try:
            who = peer()
            g = await ask(s, who, [sock.fileno()], op="bridge-helper", br="br0")
            assert g.lease is not None and g.lease.pid == qemu.pid
            assert s.lifecycle.registry.get(g.lease.ifindex) is g.lease
            g.sent()
            # Not the peer's own: refused (unless the peer is root).
            stranger = peer(uid=ALICE)
            with pytest.raises(Denied, match="belongs to a process of uid"):
                await ask(s, stranger, [sock.fileno()], op="bridge-helper")
            # Anything but a socket is refused.
            r, w = os.pipe()
            with pytest.raises(Denied, match="helper socket"):
                await ask(s, who, [r], op="bridge-helper")
            for fd in (r, w, who.pidfd, stranger.pidfd):
                os.close(fd)
        finally:
            sock.close()
            assert qemu.stdin is not None
            qemu.stdin.close()
            qemu.wait()


async def test_bridge_helper_without_a_socket_belongs_to_the_callers_parent(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        with process() as helper:  # our child: we are its parent, the "VMM"
            who = peer(helper.pid)
            g = await ask(s, who, op="bridge-helper")
            assert g.lease is not None and g.lease.pid == os.getpid()
            g.sent()
            # A parent of another uid would get the lease: refused.
            stranger = peer(helper.pid, uid=ALICE)
            with pytest.raises(Denied, match="parent"):
                await ask(s, stranger, op="bridge-helper")
            os.close(who.pidfd)
            os.close(stranger.pidfd)


async def test_bridge_helper_cannot_serve_a_mac_filtered_port(programs: Programs) -> None:
    async with stack(config(programs, mac_filtering=True)) as s:
        with process() as helper:  # our child, so that we are its VMM
            who = peer(helper.pid)
            with pytest.raises(Denied, match="mac_filtering"):
                await ask(s, who, op="bridge-helper")
            assert not s.maker.calls
            os.close(who.pidfd)


async def test_a_requester_that_is_gone_gets_no_tap(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        with process() as vmm:
            who = peer(vmm.pid)
        # (killed and reaped: the pidfd says it exited) - a race, not policy
        with pytest.raises(OwnerGone, match="exited"):
            await ask(s, who)
        assert not s.maker.calls
        os.close(who.pidfd)


async def test_a_guest_may_not_have_the_hosts_address_on_the_bridge(programs: Programs) -> None:
    """A shared-bridge trial: with ip_ranges = 10.10.0.0/24 a guest was given
    10.10.0.1, the host's (router's) address on br0, and the subnet's
    broadcast address."""
    async with stack(config(programs, ip_ranges=["10.10.0.0/24", "fd00:10::/64"])) as s:
        s.netlink.host["br0"] = [("10.10.0.1", 24), ("fd00:10::1", 64)]
        who = peer(uid=ALICE)
        try:
            for address, code in [
                ("10.10.0.1", "guest-ip-in-use"),
                ("fd00:10::1", "guest-ip-in-use"),
                ("10.10.0.255", "invalid-value"),
                ("10.10.0.0", "invalid-value"),
            ]:
                with pytest.raises(TapdError) as refused:
                    await ask(s, who, guest_ips=[address])
                assert refused.value.code == code, (address, refused.value)
                assert "br0" in refused.value.message
            g = await ask(s, who, guest_ips=["10.10.0.5", "fd00:10::5"])
            assert g.lease is not None and g.lease.guest_ips == ("10.10.0.5", "fd00:10::5")
            await g.abandon()
            assert not s.kernel.taps()
        finally:
            os.close(who.pidfd)
