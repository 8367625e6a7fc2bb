"""Which directories may hold tapd's socket, or lie on the way to it."""

from __future__ import annotations

import pytest

from tapd.listen import directory_problem


@pytest.mark.parametrize(
    ("mode", "uid", "holds", "says"),
    [
        (0o040755, 0, True, None),  # /run
        (0o040700, 0, True, None),
        (0o040755, 1000, True, "belongs to uid 1000"),  # /run/user/1000
        (0o040775, 0, True, "writable by its group"),
        (0o040777, 0, False, "mode 0777"),
        (0o041777, 0, True, "mode 1777"),  # /tmp cannot hold it...
        (0o041777, 0, False, None),  # ...but may be above a root-only directory
        (0o041777, 1000, False, "belongs to uid 1000"),
        (0o040755, 4242, True, None),  # tapd's own euid, when it is not root
    ],
)
def test_directory_problem(mode: int, uid: int, holds: bool, says: str | None) -> None:
    problem = directory_problem(mode, uid, 4242, holds_socket=holds)
    assert (problem is None) if says is None else (problem is not None and says in problem)
