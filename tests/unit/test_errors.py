"""The error tree: stable wire codes, whose fault, and the one way to the wire."""

from __future__ import annotations

import errno
import itertools
import os
import re
from pathlib import Path

import pytest

from tapd import errors, protocol
from tapd.config import Config
from tapd.leases import Lease
from tapd.lifecycle import Lifecycle
from tapd.metrics import Recorder
from tapd.netlink import Netlink
from tapd.worker import KernelWorker

KEBAB = re.compile(r"^[a-z]+(-[a-z]+)*$")
PAGE = Path(__file__).resolve().parents[2] / "systemd" / "man" / "tapd-protocol.7"


def tree(root: type[errors.TapdError]) -> list[type[errors.TapdError]]:
    found = [root]
    for sub in root.__subclasses__():
        found.extend(tree(sub))
    return found


ALL = tree(errors.TapdError)
#: the classes a reply can come from: those with a code
CONCRETE = [cls for cls in ALL if hasattr(cls, "code")]
ABSTRACT = [cls for cls in ALL if not hasattr(cls, "code")]


def make(cls: type[errors.TapdError]) -> errors.TapdError:
    return cls(f"something about {cls.__name__}")


def page_codes() -> set[str]:
    """The codes tapd-protocol(7)'s ERRORS section lists: the tag line of each
    .TP entry, before the client libraries' subsection."""
    text = PAGE.read_text()
    section = text.split("\n.SH ERRORS\n", 1)[1].split("\n.S", 1)[0].splitlines()
    codes: set[str] = set()
    for before, tag in itertools.pairwise(section):
        if before == ".TP":
            codes.update(re.findall(r"\\fB(.*?)\\fR", tag.replace("\\-", "-")))
    return codes


def test_the_tree_is_not_trivially_small() -> None:
    # Guards the tests below against walking an empty tree.
    assert errors.KernelPermission in CONCRETE
    assert errors.LineTooLong in CONCRETE
    assert len(page_codes()) > 30


def test_the_abstract_bases_are_these() -> None:
    assert set(ABSTRACT) == {
        errors.TapdError, errors.ClientError, errors.ProtocolError, errors.SystemFault,
    }  # fmt: skip


@pytest.mark.parametrize("cls", ABSTRACT, ids=lambda cls: cls.__name__)
def test_an_abstract_error_cannot_be_made(cls: type[errors.TapdError]) -> None:
    with pytest.raises(TypeError, match="abstract"):
        make(cls)


@pytest.mark.parametrize("cls", ABSTRACT, ids=lambda cls: cls.__name__)
def test_an_abstract_error_raised_by_mistake_is_an_internal_error(
    cls: type[errors.TapdError],
) -> None:
    # What the server's catch-all would get in its place: the TypeError.
    with pytest.raises(TypeError) as caught:
        make(cls)
    assert errors.to_wire(caught.value)["error"]["code"] == "internal-error"


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_code_is_kebab_case(cls: type[errors.TapdError]) -> None:
    assert KEBAB.match(cls.code), cls.code


def test_no_two_classes_share_a_code() -> None:
    """A client tells errors apart by code alone."""
    by_code: dict[str, list[str]] = {}
    for cls in CONCRETE:
        by_code.setdefault(cls.code, []).append(cls.__name__)
    assert {code: names for code, names in by_code.items() if len(names) > 1} == {}


def test_every_code_is_in_the_protocol_page_and_every_listed_code_is_sent() -> None:
    codes = {cls.code for cls in CONCRETE}
    documented = page_codes()
    assert codes - documented == set(), (
        "codes a reply may carry that tapd-protocol(7) does not list"
    )
    assert documented - codes == set(), "codes tapd-protocol(7) lists that no class carries"


def test_no_code_on_the_wire_went() -> None:
    # Every code a client could be sent before the abstract bases lost
    # theirs ("bad-request" and "system-error" were never listed, nor raised).
    before = {
        "malformed-json", "not-an-object", "missing-op", "unknown-op", "unknown-key",
        "invalid-value", "invalid-options", "line-too-long", "too-many-fds", "timeout",
        "invalid-ifname", "ifname-taken", "bridge-not-found", "not-a-bridge", "not-a-tap",
        "denied", "quota-exceeded", "lease-not-found", "option-not-applicable",
        "guest-ips-required", "guest-ip-in-use", "guest-mac-in-use", "unsupported",
        "kernel-permission-denied", "bridge-full", "tun-unavailable", "vhost-unavailable",
        "script-failed", "helper-failed", "tap-intruded", "kernel-error", "overloaded",
        "config-invalid", "fds-refused", "internal-error",
    }  # fmt: skip
    assert before - {cls.code for cls in CONCRETE} == set()


@pytest.mark.parametrize(
    "cls", [c for c in ALL if c is not errors.TapdError], ids=lambda cls: cls.__name__
)
def test_every_error_says_whose_fault_it_is(cls: type[errors.TapdError]) -> None:
    assert issubclass(cls, errors.ClientError) != issubclass(cls, errors.SystemFault)


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_wire_shape(cls: type[errors.TapdError]) -> None:
    exc = make(cls)
    wire = errors.to_wire(exc)
    assert wire == {"ok": False, "error": {"code": cls.code, "message": exc.message}}
    assert protocol.decode_reply(protocol.encode(wire)[:-1]) == wire


def test_one_way_to_the_wire() -> None:
    assert not hasattr(errors.TapdError, "to_wire")


# -- log context ------------------------------------------------------------------------


def test_about_adds_log_context_that_never_reaches_the_wire() -> None:
    exc = errors.Denied("no")
    assert exc.about(rule="deny[0]") is exc
    assert exc.context == {"rule": "deny[0]"}
    assert errors.to_wire(exc) == {"ok": False, "error": {"code": "denied", "message": "no"}}


def test_about_keeps_what_was_said_nearer_the_raise() -> None:
    # service.py adds the bridge and queues to whatever a deeper layer raised;
    # a deeper layer's own word on a key stays.
    exc = errors.Denied("no").about(rule="allow[2]", bridge="br1")
    exc.about(bridge="br0", queues=4, rule="")
    assert exc.context == {"rule": "allow[2]", "bridge": "br1", "queues": 4}


# -- races are not policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code"), [(errors.OwnerGone, "owner-gone"), (errors.TapLeased, "tap-leased")]
)
def test_a_race_has_its_own_code_and_is_no_denial(cls: type[errors.ClientError], code: str) -> None:
    assert cls.code == code
    assert issubclass(cls, errors.ClientError)
    assert not issubclass(cls, errors.Denied)
    # so the metrics count it as refused, not denied by a rule
    recorder = Recorder()
    recorder.refused(make(cls))
    assert list(recorder.requests) == [("", "refused", code, "")]


def test_a_policy_denial_is_counted_as_denied() -> None:
    recorder = Recorder()
    recorder.refused(errors.Denied("no").about(rule="deny[1]"))
    assert list(recorder.requests) == [("", "denied", "denied", "deny[1]")]


def test_a_second_lease_on_a_tap_is_tap_leased() -> None:
    worker = KernelWorker()
    try:
        lifecycle = Lifecycle(Config(), worker, Netlink())
        lease = Lease(
            id="l7", ifname="tap7", ifindex=7, bridge="br0", queues=1,
            uid=0, gid=0, pid=os.getpid(), starttime=0, created=0,
        )  # fmt: skip
        lifecycle.registry.add(lease)
        pidfd = os.pidfd_open(os.getpid())
        with pytest.raises(errors.TapLeased, match="'tap7' already has a lease"):
            lifecycle.begin(lease, pidfd)
        with pytest.raises(OSError):
            os.fstat(pidfd)  # begin took the pidfd, and closed it
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("err", "cls", "code"),
    [
        (errno.EPERM, errors.KernelPermission, "kernel-permission-denied"),
        (errno.EACCES, errors.KernelPermission, "kernel-permission-denied"),
        (errno.EXFULL, errors.BridgeFull, "bridge-full"),
        (errno.ENOENT, errors.KernelError, "kernel-error"),
        (errno.EBUSY, errors.KernelError, "kernel-error"),
        (errno.EINVAL, errors.KernelError, "kernel-error"),
        (errno.E2BIG, errors.KernelError, "kernel-error"),
    ],
)
def test_kernel_error_mapping(err: int, cls: type[errors.KernelError], code: str) -> None:
    exc = errors.kernel_error(OSError(err, os.strerror(err)), "attaching tap0 to br0")
    assert type(exc) is cls
    assert exc.code == code
    assert exc.errno == err
    assert isinstance(exc, errors.SystemFault)
    assert "attaching tap0 to br0" in exc.message


@pytest.mark.parametrize("err", [errno.ENOENT, errno.EBUSY, errno.EPERM])
def test_kernel_error_message_gives_the_kernels_reason(err: int) -> None:
    exc = errors.kernel_error(OSError(err, "ignored"), "creating tap0")
    assert os.strerror(err) in exc.message


def test_bridge_full_names_the_kernels_port_limit() -> None:
    # net/bridge/br_private.h: BR_MAX_PORTS is 1024, and br_if.c find_portno()
    # keeps port number 0 reserved, so a bridge holds 1023 ports.
    exc = errors.kernel_error(OSError(errno.EXFULL, "x"), "attaching tap0 to br0")
    assert "1023" in exc.message


def test_kernel_error_without_errno_keeps_the_text() -> None:
    exc = errors.kernel_error(OSError("netlink said no"), "setting up tap0")
    assert type(exc) is errors.KernelError
    assert not exc.errno
    assert "netlink said no" in exc.message


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("secret /etc/shadow detail"),
        KeyError("secret /etc/shadow detail"),
        RuntimeError("secret /etc/shadow detail"),
        OSError(errno.EIO, "secret /etc/shadow detail"),
    ],
)
def test_foreign_exception_is_an_internal_error_that_leaks_nothing(exc: Exception) -> None:
    wire = errors.to_wire(exc)
    assert wire["ok"] is False
    assert wire["error"]["code"] == "internal-error"
    assert set(wire["error"]) == {"code", "message"}
    assert "secret" not in wire["error"]["message"]
    assert "shadow" not in wire["error"]["message"]
