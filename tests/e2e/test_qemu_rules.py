"""tapd refuses exactly the tap option combinations QEMU refuses.

Every row of a generated table of ``NetdevTapOptions`` combinations is judged
twice: by a real QEMU (``netdev_add`` over QMP, see :mod:`qemu_rules`) and by
tapd (``decode_request`` then ``check_qemu_rules``).  The expected answer is
whatever QEMU said, never a list written here: a rule refusal (with its
message) or "passes the rules".  Both must agree row by row, message included.

Kept out of the table on purpose, where tapd is documented to be stricter than
QEMU outside ``check_qemu_rules``: ifnames over 15 bytes and queues over 256.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qemu_rules import RULE_MESSAGES, QemuJudge, QemuOutcome

from tapd import options, protocol
from tapd.errors import InvalidOptions, TapdError
from tapd.models import TapRequest

#: Stands for an ifname unique to its row (QEMU really creates the tap).
IFNAME = "@ifname"
FD = "tf"
FDS = "tq0:tq1"
VHOSTFD = "vf"
VHOSTFDS = "vq0:vq1"

MODES = ("fd", "fds", "helper", "none")
KEYS = (
    "ifname", "fd", "fds", "script", "downscript", "br", "helper", "sndbuf",
    "vnet_hdr", "vhost", "vhostfd", "vhostfds", "vhostforce", "queues", "poll-us",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    label: str
    opts: dict[str, Any]
    #: failures after the rules this row may also see (regular expressions)
    later: tuple[str, ...] = ()


def key_values(helper: str) -> dict[str, list[Any]]:
    """The values a key takes when present (booleans both ways; "" counts as given)."""
    return {
        "ifname": [IFNAME],
        "fd": [FD],
        "fds": [FDS],
        "script": ["no", ""],
        "downscript": ["no", ""],
        "br": ["br0"],
        "helper": [helper],
        "sndbuf": [1 << 20, 0],
        "vnet_hdr": [True, False],
        "vhost": [True, False],
        "vhostfd": [VHOSTFD],
        "vhostfds": [VHOSTFDS],
        "vhostforce": [True, False],
        "queues": [2, 1],
        "poll-us": [50],
    }


def base(mode: str, helper: str) -> dict[str, Any]:
    """The least a mode needs.  Without fd, fds or helper QEMU makes the tap
    itself: script="no" keeps it from running /etc/qemu-ifup (no rule looks at
    script= in that mode, so nothing is lost)."""
    return {
        "fd": {"fd": FD},
        "fds": {"fds": FDS},
        "helper": {"helper": helper},
        "none": {"script": "no", "downscript": "no"},
    }[mode]


def short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


def label(mode: str, opts: dict[str, Any], helper: str) -> str:
    shown = []
    for key, value in opts.items():
        if base(mode, helper).get(key) == value:
            continue
        if key == "helper":
            value = "H"
        shown.append(f"{key}={short(value)}")
    return f"{mode}: " + (" ".join(shown) or "(alone)")


#: QEMU's error for an fd name it does not know (monitor_fd_param)
NO_SUCH_FD = r"File descriptor named '.*' has not been found"


def _generate(helper: str) -> Iterator[tuple[str, dict[str, Any], tuple[str, ...]]]:
    for mode, opts in _combinations(helper):
        yield mode, opts, ()
    # An empty string is given all the same (QAPI's has_X): it picks the mode
    # and counts for the rules.  Past them, QEMU fails to find fd "" or run
    # helper "", so these rows never rely on a rule QEMU checks later.
    for mode in ("fd", "helper"):
        for key in (None, "ifname", "queues", "vhostfds"):
            opts = {mode: ""}
            if key is not None:
                opts[key] = {"ifname": "", "queues": 2, "vhostfds": VHOSTFDS}[key]
            yield mode, opts, (NO_SUCH_FD, "bridge helper failed")
    for mode in MODES:
        opts = {**base(mode, helper), "vhostfd": "", "vhost": False}
        yield mode, opts, ()
    yield "none", {**base("none", helper), "ifname": ""}, ()
    yield "fds", {"fds": "tq0", "vhostfd": ""}, ()


def _combinations(helper: str) -> Iterator[tuple[str, dict[str, Any]]]:
    values = key_values(helper)
    for mode in MODES:
        others = [k for k in KEYS if k != mode]
        yield mode, base(mode, helper)
        # every other key alone, then every pair of them, with every value
        for size in (1, 2):
            for keys in itertools.combinations(others, size):
                for chosen in itertools.product(*(values[k] for k in keys)):
                    yield mode, {**base(mode, helper), **dict(zip(keys, chosen, strict=True))}
        # vhost, vhostforce and the vhost fds, every way
        for vhost, force, vfd in itertools.product(
            (None, True, False), (None, True, False), (None, "vhostfd", "vhostfds")
        ):
            opts = base(mode, helper)
            if vhost is not None:
                opts["vhost"] = vhost
            if force is not None:
                opts["vhostforce"] = force
            if vfd is not None:
                opts[vfd] = VHOSTFD if vfd == "vhostfd" else VHOSTFDS
            yield mode, opts
    # QEMU makes the tap: queue counts against a vhostfd and vhost on/off
    for queues, vhostfd, vhost, force, ifname in itertools.product(
        (None, 0, 1, 2, 3), (False, True), (None, True, False), (None, True), (False, True)
    ):
        opts = base("none", helper)
        if ifname:
            opts["ifname"] = IFNAME
        if queues is not None:
            opts["queues"] = queues
        if vhostfd:
            opts["vhostfd"] = VHOSTFD
        if vhost is not None:
            opts["vhost"] = vhost
        if force is not None:
            opts["vhostforce"] = force
        yield "none", opts
    # fds= against vhostfds= of every count
    for nfds, nvhost, vhost in itertools.product((1, 2, 3), (None, 1, 2, 3), (None, False)):
        opts = {"fds": ":".join(f"tq{i}" for i in range(nfds))}
        if nvhost is not None:
            opts["vhostfds"] = ":".join(f"vq{i}" for i in range(nvhost))
        if vhost is not None:
            opts["vhost"] = vhost
        yield "fds", opts
    # how QEMU counts a colon-separated list (get_fds): "" is no fd, a trailing
    # ":" adds none, and it stops counting at MAX_TAP_QUEUES (1024)
    for fds, vhostfds in (
        ("", None),
        ("", ""),
        ("", "vq0"),
        ("tq0:", None),
        ("tq0:", "vq0"),
        ("tq0:", "vq0:"),
        ("tq0", "vq0:"),
        ("tq0:tq1:", "vq0:vq1"),
        ("tq0:tq1", "vq0:vq1:"),
        (":tq0", "vq0"),
    ):
        for vhost in (None, False):
            opts = {"fds": fds}
            if vhostfds is not None:
                opts["vhostfds"] = vhostfds
            if vhost is not None:
                opts["vhost"] = vhost
            yield "fds", opts
    for nfds, nvhost in ((1025, 1025), (1025, 1024), (1024, 1025)):
        yield (
            "fds",
            {
                "fds": ":".join(["tq0"] * nfds),
                "vhostfds": ":".join(["vq0"] * nvhost),
                "vhost": False,
            },
        )
    # QEMU makes no queue at all for queues=0, so nothing checks the vhostfd
    for vhost in (None, False):
        opts = {**base("none", helper), "queues": 0, "vhostfd": VHOSTFD}
        if vhost is not None:
            opts["vhost"] = vhost
        yield "none", opts


def build_table(helper: str) -> list[Case]:
    seen: set[str] = set()
    table: list[Case] = []
    for mode, opts, later in _generate(helper):
        key = json.dumps(opts, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if opts.get("ifname") == IFNAME:
            opts = {**opts, "ifname": f"qr{len(table)}"}
        table.append(Case(label(mode, opts, helper), opts, later))
    return table


@dataclass(frozen=True)
class TapdVerdict:
    rule: str | None  # the InvalidOptions message, if tapd refused by a rule
    other: str | None = None  # any other refusal (a harness or tapd bug here)


def tapd_verdict(opts: dict[str, Any]) -> TapdVerdict:
    line = json.dumps({"op": "request", **opts}).encode()
    try:
        request = protocol.decode_request(line)
        assert isinstance(request, TapRequest)
        options.check_qemu_rules(request)
    except InvalidOptions as exc:
        assert exc.code == "invalid-options"
        return TapdVerdict(rule=exc.message)
    except TapdError as exc:
        return TapdVerdict(rule=None, other=f"{exc.code}: {exc.message}")
    return TapdVerdict(rule=None)


def mode_of(opts: dict[str, Any]) -> str:
    return next((m for m in ("fd", "fds", "helper") if m in opts), "none")


@dataclass(frozen=True)
class Row:
    case: Case
    qemu: QemuOutcome
    tapd: TapdVerdict

    @property
    def agrees(self) -> bool:
        return self.tapd.other is None and self.tapd.rule == self.qemu.rule

    def explain(self) -> str:
        qemu = f"refuses: {self.qemu.rule}" if self.qemu.rule else "passes"
        if not self.qemu.rule and not self.qemu.ok:
            qemu += f" (then {self.qemu.describe()})"
        if self.tapd.other:
            tapd = f"other refusal: {self.tapd.other}"
        else:
            tapd = f"refuses: {self.tapd.rule}" if self.tapd.rule else "passes"
        shown = ", ".join(f"{json.dumps(k)}: {short(v)}" for k, v in self.case.opts.items())
        return f"{self.case.label}\n    options: {{{shown}}}\n    QEMU {qemu}\n    tapd {tapd}"


def summary(rows: list[Row], seconds: float, judge: QemuJudge) -> str:
    lines = [
        f"{len(rows)} combinations judged by QEMU {judge.version} in {seconds:.1f}s "
        f"({judge.restarts} QEMU restarts)",
        f"QEMU: {sum(r.qemu.ok for r in rows)} succeeded, "
        f"{sum(r.qemu.rule is not None for r in rows)} refused by a rule, "
        f"{sum(r.qemu.failed_later for r in rows)} failed after the rules "
        f"({sum(r.qemu.died for r in rows)} of them killed QEMU)",
    ]
    lines.append("QEMU's rule refusals, by mode (fd / fds / helper / none):")
    by_mode = Counter((r.qemu.rule, mode_of(r.case.opts)) for r in rows if r.qemu.rule)
    for message in sorted(RULE_MESSAGES):
        counts = " / ".join(f"{by_mode[message, m]:3}" for m in MODES)
        lines.append(f"  {counts}  {message}")
    # One key added to a mode's minimal options: does QEMU then refuse?
    lines.append("one key added to each mode (R: QEMU refuses, ok: it passes):")
    single: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        mode = row.case.label.split(":")[0]
        extra = [k for k in row.case.opts if k not in base(mode, judge.helper)]
        if len(extra) == 1:
            single.setdefault((mode, extra[0]), set()).add("R" if row.qemu.rule else "ok")
    lines.append("  " + " " * 10 + "".join(f"{m:>8}" for m in MODES))
    for key in KEYS:
        cells = ["/".join(sorted(single.get((m, key), {"-"}))) for m in MODES]
        lines.append(f"  {key:10}" + "".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def test_tapd_refuses_exactly_the_tap_options_qemu_refuses() -> None:
    started = time.monotonic()
    with QemuJudge(workers=4) as judge:
        table = build_table(judge.helper)
        outcomes = judge.judge([case.opts for case in table])
        rows = [
            Row(case, outcome, tapd_verdict(case.opts))
            for case, outcome in zip(table, outcomes, strict=True)
        ]
        report = summary(rows, time.monotonic() - started, judge)
        print(report)
        logs = judge.logs()

    # The harness must let QEMU reach its rules: a failure before them would
    # hide a rule, so every failure after the rules must be one we expect.
    unexplained = [r for r in rows if not r.qemu.explained(r.case.later)]
    assert not unexplained, "QEMU failed for a reason the harness did not expect:\n" + "\n".join(
        f"{r.explain()}\n    stderr: {r.qemu.stderr.strip()}" for r in unexplained[:20]
    )
    # The table exercises every rule, and every mode also passes.
    assert {r.qemu.rule for r in rows if r.qemu.rule} == RULE_MESSAGES, report
    assert {mode_of(r.case.opts) for r in rows if r.qemu.rule is None} == set(MODES), report
    assert any(r.qemu.ok for r in rows), logs[-2000:]

    disagreements = [r for r in rows if not r.agrees]
    assert not disagreements, (
        f"tapd and QEMU {judge.version} disagree on {len(disagreements)} of {len(rows)} "
        "combinations:\n" + "\n".join(r.explain() for r in disagreements)
    )
