"""The e2e tests' reader of a guest's serial output (tests/e2e/guest.py),
checked without a guest."""

from __future__ import annotations

from guest import parse_guest_output


def test_parse_guest_output() -> None:
    text = (
        "[    1.0] some kernel line\r\n"
        "TAPD-GUEST nic=eth0 mac=52:54:00:12:34:56 rxqueues=2\r\n"
        "noise TAPD-GUEST ping=fail tries=15\n"
        "TAPD-GUEST ping=ok tries=1\n"
        "TAPD-GUEST done\n"
    )
    assert parse_guest_output(text) == {
        "nic": "eth0",
        "mac": "52:54:00:12:34:56",
        "rxqueues": "2",
        "ping": "ok",
        "tries": "1",
        "done": "",
    }
