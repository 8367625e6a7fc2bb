"""tapctl reads the command lines of a VM start (request and prepare) without
argparse, from the same option tables argparse is built from: for any
command line, what it reads is what argparse reads, or it leaves the line
to argparse."""

from __future__ import annotations

import contextlib
import io

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tapd import tapctl

FLAGS = sorted({o[0] for table in tapctl.QUICK_VERBS.values() for o in table})
values = st.sampled_from(["br0", "", "3", "-1", "0x10", " 7", "+2", "x=y", "--", "-", "٣"])
words = st.one_of(
    st.sampled_from(FLAGS),
    st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLAGS), values),
    values,
    st.sampled_from(["--socket", "--socket=/s", "--help", "-h", "--qu", "--br0", "--vlan=", "x"]),
)
tails = st.lists(st.sampled_from(["qemu", "-x", "{fd}", "--", "--br"]), max_size=3)


def by_argparse(argv: list[str]) -> dict[str, object] | None:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return vars(tapctl._parser().parse_args(argv))
        except SystemExit:
            return None


@settings(max_examples=1500)
@given(
    st.lists(st.sampled_from(["--socket", "/run/s", "--socket=/x"]), max_size=2),
    st.sampled_from(["request", "prepare", "list", "helper"]),
    st.lists(words, max_size=6),
    st.none() | tails,
)
@example([], "request", ["--br", "br0"], ["qemu", "-netdev", "tap,fd={fd}"])
@example([], "prepare", ["--queues", "2"], None)
@example([], "request", ["--vnet-hdr", "--no-vnet-hdr"], None)
@example(["--socket", "/s"], "request", ["--guest-ip", "a", "--guest-ip=b", "--json"], [])
def test_a_command_line_reads_as_argparse_reads_it(
    before: list[str], verb: str, options: list[str], tail: list[str] | None
) -> None:
    argv = [*before, verb, *options, *([] if tail is None else ["--", *tail])]
    quick = tapctl.read_quickly(argv)
    if quick is not None:
        assert vars(quick) == by_argparse(argv), argv


def test_the_lines_a_vm_start_runs_are_read_without_argparse() -> None:
    for argv in (
        ["request", "--br", "br0", "--", "qemu-system-x86_64", "-netdev", "tap,id=n0,fd={fd}"],
        ["--socket", "/run/tapd.sock", "request", "--br=br0", "--queues=4", "--vhost", "--"],
        ["prepare", "--br", "br0", "--guest-mac", "52:54:00:12:34:56", "--", "vmm", "{ifname}"],
    ):
        assert tapctl.read_quickly(argv) is not None, argv
