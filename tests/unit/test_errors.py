"""The error tree: stable wire codes, whose fault, and the one way to the wire."""

from __future__ import annotations

import errno
import os
import re

import pytest

from tapd import errors, protocol

KEBAB = re.compile(r"^[a-z]+(-[a-z]+)*$")


def tree(root: type[errors.TapdError]) -> list[type[errors.TapdError]]:
    found = [root]
    for sub in root.__subclasses__():
        found.extend(tree(sub))
    return found


ALL = tree(errors.TapdError)


def make(cls: type[errors.TapdError]) -> errors.TapdError:
    return cls(f"something about {cls.__name__}")


def test_the_tree_is_not_trivially_small() -> None:
    # Guards the tests below against walking an empty tree.
    assert errors.KernelPermission in ALL
    assert errors.LineTooLong in ALL


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.__name__)
def test_code_is_kebab_case(cls: type[errors.TapdError]) -> None:
    assert KEBAB.match(cls.code), cls.code


def test_codes_are_shared_only_with_an_ancestor() -> None:
    """A class may keep its parent's code (it is a finer kind of the same
    error); two unrelated classes never share one, or a client could not tell
    them apart."""
    for a in ALL:
        for b in ALL:
            if a is not b and a.code == b.code:
                assert issubclass(a, b) or issubclass(b, a), (a, b, a.code)


def test_which_classes_share_their_ancestors_code() -> None:
    sharing = {
        cls.__name__
        for cls in ALL
        if any(base.code == cls.code for base in cls.__mro__[1:] if base in ALL)
    }
    # ProtocolError is the generic "bad-request" of ClientError; InternalError
    # is the base's "internal-error" made concrete.
    assert sharing == {"ProtocolError", "InternalError"}


@pytest.mark.parametrize(
    "cls", [c for c in ALL if c is not errors.TapdError], ids=lambda cls: cls.__name__
)
def test_every_error_says_whose_fault_it_is(cls: type[errors.TapdError]) -> None:
    assert issubclass(cls, errors.ClientError) != issubclass(cls, errors.SystemFault)


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.__name__)
def test_wire_shape(cls: type[errors.TapdError]) -> None:
    exc = make(cls)
    wire = exc.to_wire()
    assert wire == {"ok": False, "error": {"code": cls.code, "message": exc.message}}
    assert errors.to_wire(exc) == wire
    assert protocol.decode_reply(protocol.encode(wire)[:-1]) == wire


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
