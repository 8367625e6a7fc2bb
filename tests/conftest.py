from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import kstage
import pytest
from tapdtest import Daemon, ip, netns, run_daemon

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TESTS = Path(__file__).resolve().parent

#: what a directory's tests need, marked here once for all of them:
#: ``tests/unit`` needs nothing (pure logic, runs as any user); ``tests/kernel``
#: runs inside Debian's own kernel, booted once for the session (tests/kstage.py)
NEEDS = {"integration": "root", "e2e": "e2e", "kernel": "kernel_stage"}


def pytest_configure(config: pytest.Config) -> None:
    kstage.configure(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.resolve().relative_to(TESTS).parts
        if len(where) > 1 and where[0] in NEEDS:
            item.add_marker(NEEDS[where[0]])


def require_root() -> None:
    """Kernel and QEMU tests need root.  Outside CI they are skipped without it;
    in CI (which is root) a missing privilege is a failure, never a skip."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        message = "needs root and /dev/net/tun"
        if IN_CI:
            pytest.fail(message + " (CI must provide both)")
        pytest.skip(message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture is set up, a module-scoped one included.
    if any(item.get_closest_marker(m) for m in ("root", "e2e", "kernel_stage")):
        require_root()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI every test runs: a skip there, for whatever reason, fails."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"
    return report


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


@pytest.fixture
def br0(ns: str) -> str:
    """A bridge with a non-default MTU, so copying it is visible."""
    ip("-n", ns, "link", "add", "br0", "mtu", "1400", "type", "bridge")
    ip("-n", ns, "link", "set", "br0", "up")
    return "br0"


@pytest.fixture
def daemon(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    with run_daemon(ns, tmp_path) as d:
        yield d
