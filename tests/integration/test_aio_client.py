"""tapd.aio against a real tapd in a namespace of the test's own, on asyncio
and on trio: the same grants, leases and errors as tapd.client."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from tapdtest import Daemon, links, open_fds, taps, wait_until

from tapd import aio, client, tun


async def lifecycle_of_a_lease(daemon: Daemon) -> None:
    """Grant, see it listed, release it: the tap goes at once."""
    path = daemon.socket_path
    grant = await aio.request_tap(path=path, br="br0")
    with grant:
        (fd,) = grant.tap_fds
        assert tun.tap_info(fd).name == grant.ifname
        assert links(daemon.ns)[grant.ifname]["master"] == "br0"
        lease = grant.reply["lease"]
        assert [x["id"] for x in await aio.leases(path=path)] == [lease]
        assert (await aio.status(path=path))["leases"] == 1
        assert (await aio.hello(path=path))["protocol"] == 1
        assert (await aio.release(lease, path=path))["ifname"] == grant.ifname
        assert grant.ifname not in taps(daemon.ns)
    assert await aio.leases(path=path) == []


def test_asyncio_lease_lifecycle(daemon: Daemon) -> None:
    before = open_fds()
    asyncio.run(lifecycle_of_a_lease(daemon))
    assert open_fds() == before


async def test_trio_lease_lifecycle(daemon: Daemon) -> None:
    before = open_fds()
    await lifecycle_of_a_lease(daemon)
    assert open_fds() == before


async def refusals(daemon: Daemon) -> list[tuple[str, str]]:
    out = []
    for options in ({"br": "nope"}, {"br": "br0", "queues": 0}, {"br": "br0", "bogus": 1}):
        with pytest.raises(client.DaemonError) as caught:
            await aio.request_tap(path=daemon.socket_path, **options)
        out.append((caught.value.code, caught.value.message))
    with pytest.raises(client.DaemonError) as caught:
        await aio.release("no-such-lease", path=daemon.socket_path)
    out.append((caught.value.code, caught.value.message))
    return out


def sync_refusals(daemon: Daemon) -> list[tuple[str, str]]:
    out = []
    for options in ({"br": "nope"}, {"br": "br0", "queues": 0}, {"br": "br0", "bogus": 1}):
        with pytest.raises(client.DaemonError) as caught:
            client.request_tap(path=daemon.socket_path, **options)
        out.append((caught.value.code, caught.value.message))
    with pytest.raises(client.DaemonError) as caught:
        client.release("no-such-lease", path=daemon.socket_path)
    out.append((caught.value.code, caught.value.message))
    return out


def test_asyncio_errors_are_the_sync_clients(daemon: Daemon) -> None:
    got = asyncio.run(refusals(daemon))
    assert [code for code, _ in got] == [
        "bridge-not-found", "invalid-value", "unknown-key", "lease-not-found",
    ]  # fmt: skip
    assert got == sync_refusals(daemon)


async def test_trio_errors_are_the_sync_clients(daemon: Daemon) -> None:
    assert await refusals(daemon) == sync_refusals(daemon)


def test_asyncio_many_requests_at_once(daemon: Daemon) -> None:
    """Concurrent calls on one loop each get their own tap."""

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                *(aio.request_tap(path=daemon.socket_path, br="br0") for _ in range(16))
            )
        )

    grants = asyncio.run(main())
    try:
        assert len({g.ifname for g in grants}) == 16
    finally:
        for g in grants:
            g.close()
    wait_until(lambda: not taps(daemon.ns), what="the taps to go")


async def test_trio_sends_fds_for_adoption(daemon: Daemon) -> None:
    """fd=: the tap fds go with the request, as with the sync client."""
    a, b = socket.socketpair()
    with a, b, pytest.raises(client.DaemonError) as caught:
        await aio.request_tap(path=daemon.socket_path, br="br0", fd="3", send_fds=[a.fileno()])
    assert caught.value.code == "not-a-tap"
