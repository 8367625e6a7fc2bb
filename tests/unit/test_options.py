"""Judging ``NetdevTapOptions`` as QEMU would, and planning what tapd does.

The expected messages and the order of the rules are QEMU's, from
``net_init_tap()`` and ``net_init_tap_one()`` in net/tap.c (the seed
/work/shared/seeds/001_c7c9e19e4c1eda8a.txt), not from tapd.  Interface-name
rules come from the kernel: <linux/if.h> IFNAMSIZ is 16 including the NUL, and
net/core/dev.c dev_valid_name() refuses "", ".", "..", "/", ":" and whitespace.
The queue limit is the kernel's: drivers/net/tun.c MAX_TAP_QUEUES is 256.
"""

from __future__ import annotations

import pytest

from tapd import errors
from tapd.models import TapOptions
from tapd.options import AdoptPlan, CreatePlan, HelperPlan, check_qemu_rules, ifname_problem, plan

# net_init_tap(), verbatim.
WITH_FD = (
    "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= "
    "are invalid with fd="
)
WITH_FDS = (
    "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= are invalid with fds="
)
WITH_HELPER = (
    "ifname=, script=, downscript=, vnet_hdr=, queues=, and vhostfds= are invalid with helper="
)
COUNTS_DIFFER = "The number of fds passed does not match the number of vhostfds passed"
VHOSTFDS_WITHOUT_FDS = "vhostfds= is invalid if fds= wasn't specified"
# net_init_tap_one(), verbatim.
VHOSTFD_WITHOUT_VHOST = "vhostfd(s)= is not valid without vhost"

# One value of each member's type, to mark it "given" (has_X in QEMU).
GIVEN: dict[str, object] = {
    "ifname": "tap0",
    "script": "no",
    "downscript": "no",
    "vnet_hdr": False,  # has_vnet_hdr is true for vnet_hdr=off too
    "helper": "/usr/lib/qemu/qemu-bridge-helper",
    "queues": 1,  # has_queues is true for queues=1 too
    "fd": "3",
    "fds": "3:4",
    "vhostfd": "5",
    "vhostfds": "5:6",
}


def opts(**fields: object) -> TapOptions:
    return TapOptions.model_validate(fields)


def given(*names: str) -> dict[str, object]:
    return {name: GIVEN[name] for name in names}


# -- ifname_problem ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["tap0", "a", "a" * 15, "br-lan", "vlan.100", "veth_x", "a+b", "x@y", "...", ".hidden", "0"],
)
def test_valid_interface_names(name: str) -> None:
    assert ifname_problem(name) is None


def test_empty_name() -> None:
    problem = ifname_problem("")
    assert problem is not None
    assert "empty" in problem


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("a" * 16, 16),
        ("a" * 40, 40),
        ("a" * 14 + "é", 16),  # 15 characters, 16 bytes
        ("é" * 8, 16),  # 8 characters, 16 bytes
    ],
)
def test_too_long_counts_bytes_not_characters(name: str, size: int) -> None:
    problem = ifname_problem(name)
    assert problem is not None
    assert f"{size} bytes" in problem
    assert "15" in problem  # IFNAMSIZ - 1


@pytest.mark.parametrize(
    "name",
    [
        ".",
        "..",  # dev_valid_name()
        "a/b",
        "/",
        "a:b",
        "eth0:1",
        "a b",
        " a",
        "a\tb",
        "a\nb",
        "a\x0bb",  # dev_valid_name(): isspace()
        "tap%d",
        "%",  # the kernel would expand it as a name pattern
        "a\x00b",
        "a\x1bb",
        "a\x7fb",  # control characters
        "é",
        "tap\u00a0",
        "ta\u0440",  # non-ASCII (the last is Cyrillic "er")
        "-",
        "-x",
        "--help",  # an option to the admin's hook, which is run as HOOK IFNAME
    ],
)
def test_refused_characters_name_the_offending_name(name: str) -> None:
    problem = ifname_problem(name)
    assert problem is not None
    assert repr(name) in problem


@pytest.mark.parametrize("name", ["\ud800", "tap\udfff"])
def test_lone_surrogate_is_a_problem_not_a_crash(name: str) -> None:
    # A JSON request can carry "\ud800"; it has no UTF-8 bytes at all.
    assert ifname_problem(name) is not None


# -- check_qemu_rules: what QEMU refuses ----------------------------------------------


@pytest.mark.parametrize(
    "other", ["ifname", "script", "downscript", "vnet_hdr", "helper", "queues", "fds", "vhostfds"]
)
def test_fd_excludes(other: str) -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(**given("fd", other)))
    assert caught.value.code == "invalid-options"
    assert caught.value.message == WITH_FD


@pytest.mark.parametrize(
    "other", ["ifname", "script", "downscript", "vnet_hdr", "helper", "queues", "vhostfd"]
)
def test_fds_excludes(other: str) -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(**given("fds", other)))
    assert caught.value.message == WITH_FDS


@pytest.mark.parametrize(
    "other", ["ifname", "script", "downscript", "vnet_hdr", "queues", "vhostfds"]
)
def test_helper_excludes(other: str) -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(**given("helper", other)))
    assert caught.value.message == WITH_HELPER


# get_fds() counts names the way its loop reads: while (i < max && ptr < str + len)
# - so a trailing ":" ends the list, and "" names no fd at all.
@pytest.mark.parametrize(
    ("fds", "vhostfds", "message"),
    [
        pytest.param("3:4", "5:6", None, id="equal"),
        pytest.param("3", "5", None, id="one-each"),
        pytest.param("3:4:5", "6:7", COUNTS_DIFFER, id="more-fds"),
        pytest.param("3", "5:6", COUNTS_DIFFER, id="more-vhostfds"),
        pytest.param("3::4", "5:6:7", None, id="empty-name-in-the-middle-counts"),
        pytest.param("3:4:", "5:6", None, id="trailing-colon-in-fds-names-nothing"),
        pytest.param("3:4", "5:6:", None, id="trailing-colon-in-vhostfds-names-nothing"),
        pytest.param("", "5", COUNTS_DIFFER, id="empty-fds-names-no-fd"),
        pytest.param("", "", None, id="both-empty"),
    ],
)
def test_fds_and_vhostfds_counts_as_qemu_counts_them(
    fds: str, vhostfds: str, message: str | None
) -> None:
    options = opts(fds=fds, vhostfds=vhostfds)
    if message is None:
        check_qemu_rules(options)
    else:
        with pytest.raises(errors.InvalidOptions) as caught:
            check_qemu_rules(options)
        assert caught.value.message == message


def test_vhostfds_without_fds() -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(vhostfds="5:6", br="br0"))
    assert caught.value.message == VHOSTFDS_WITHOUT_FDS


@pytest.mark.parametrize(
    "fields",
    [
        {"vhostfd": "5"},
        {"vhostfd": "5", "queues": 2},  # net_init_tap_one() runs per queue; same check
        {"fd": "3", "vhostfd": "5"},
        {"fds": "3:4", "vhostfds": "5:6"},
        {"helper": "h", "vhostfd": "5"},
        {"vhostfd": "5", "vhostforce": True},  # has_vhost decides, not vhostforce
    ],
)
def test_vhostfd_with_vhost_off(fields: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(vhost=False, **fields))
    assert caught.value.message == VHOSTFD_WITHOUT_VHOST


def test_fd_is_judged_before_fds() -> None:
    # net_init_tap() takes the has_fd branch first.
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(fd="3", fds="3:4", vhostfd="5"))
    assert caught.value.message == WITH_FD


def test_fds_is_judged_before_helper() -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(fds="3", helper="h", ifname="tap0"))
    assert caught.value.message == WITH_FDS


def test_exclusions_are_judged_before_vhost() -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        check_qemu_rules(opts(helper="h", queues=2, vhost=False, vhostfd="5"))
    assert caught.value.message == WITH_HELPER


# -- check_qemu_rules: what QEMU accepts -----------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"br": "br0"},
        {
            "ifname": "tap0",
            "script": "no",
            "downscript": "no",
            "vnet_hdr": True,
            "queues": 4,
            "sndbuf": 0,
            "br": "br0",
        },
        {"fd": "3", "br": "br0", "sndbuf": 1, "vhost": True, "vhostfd": "5", "poll-us": 10},
        {"fd": "3", "vhostforce": True},
        {"fds": "3:4", "vhostfds": "5:6", "vhost": True, "vhostforce": True},
        {"helper": "h", "br": "br0", "vhostfd": "5"},
        {"vhost": False},
        {"vhost": False, "vhostforce": True},
        {"vhost": True, "vhostfd": "5"},
        # QEMU has no rule against one vhostfd with several queues: net_init_tap()
        # passes vhostfdname to every net_init_tap_one() and fails only later.
        {"queues": 2, "vhostfd": "5"},
    ],
)
def test_combinations_qemu_accepts(fields: dict[str, object]) -> None:
    check_qemu_rules(opts(**fields))


# -- plan(): a tap tapd creates ------------------------------------------------------


def create(**fields: object) -> CreatePlan:
    made = plan(opts(**fields))
    assert isinstance(made, CreatePlan)
    return made


def test_minimal_plan() -> None:
    made = create(br="br0")
    assert made.bridge == "br0"
    assert made.ifname is None
    assert made.queues == 1  # queues = tap->has_queues ? tap->queues : 1
    assert made.vnet_hdr is None  # not given: use it if the kernel offers it
    assert made.sndbuf is None
    assert (made.script, made.downscript) == (None, None)
    assert not made.vhost.on


def test_plan_carries_the_request() -> None:
    made = create(br="br0", ifname="vm0", queues=8, vnet_hdr=False, sndbuf=1 << 20)
    assert (made.bridge, made.ifname, made.queues, made.vnet_hdr, made.sndbuf) == (
        "br0",
        "vm0",
        8,
        False,
        1 << 20,
    )


@pytest.mark.parametrize("fields", [{"ifname": "tap0"}, {"fd": "3"}, {"fds": "3:4"}])
def test_bridge_is_required(fields: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        plan(opts(**fields))
    assert caught.value.code == "invalid-value"
    assert caught.value.message.startswith("br:")


@pytest.mark.parametrize("br", ["", "a" * 16, "br/0", "br 0", "..", "br%d"])
@pytest.mark.parametrize("fields", [{}, {"fd": "3"}, {"helper": "bridge-helper"}])
def test_bridge_name_is_validated(br: str, fields: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        plan(opts(br=br, **fields))
    assert caught.value.message.startswith("br:")


@pytest.mark.parametrize(
    "ifname",
    ["", "a" * 16, "tap/0", "tap:0", ".", "tap%d", "tap\u00e9", "-x", "--help", "tapdifb1a"],
)
def test_ifname_is_validated(ifname: str) -> None:
    with pytest.raises(errors.InvalidIfname) as caught:
        plan(opts(br="br0", ifname=ifname))
    assert caught.value.code == "invalid-ifname"
    assert caught.value.message.startswith("ifname:")


@pytest.mark.parametrize("ifname", ["eth1", "docker0", "wg0", "vm", "xvm-1"])
def test_a_client_chosen_name_outside_the_admins_prefix_is_denied(ifname: str) -> None:
    with pytest.raises(errors.Denied) as caught:
        plan(opts(br="br0", ifname=ifname), ifname_prefix="vm-")
    assert caught.value.code == "denied"
    assert caught.value.message.startswith("ifname:")
    assert repr(ifname) in caught.value.message and "ifname_prefix" in caught.value.message


def test_the_prefix_binds_only_names_clients_choose() -> None:
    made = plan(opts(br="br0", ifname="vm-1"), ifname_prefix="vm-")
    assert isinstance(made, CreatePlan) and made.ifname == "vm-1"
    assert isinstance(plan(opts(br="br0"), ifname_prefix="vm-"), CreatePlan)
    # A bad name is told so first, whatever the prefix.
    with pytest.raises(errors.InvalidIfname):
        plan(opts(br="br0", ifname="-vm"), ifname_prefix="vm-")


@pytest.mark.parametrize("field", ["br", "ifname"])
def test_lone_surrogate_name_is_refused_as_the_clients_fault(field: str) -> None:
    with pytest.raises(errors.ClientError):
        plan(opts(**{"br": "br0", field: "tap\ud800"}))


@pytest.mark.parametrize("queues", [0, 257, 1024, 2**32 - 1])
def test_queues_outside_what_the_kernel_takes(queues: int) -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        plan(opts(br="br0", queues=queues))
    assert caught.value.message.startswith("queues:")
    assert str(queues) in caught.value.message
    assert "256" in caught.value.message


@pytest.mark.parametrize("queues", [1, 2, 256])
def test_queues_the_kernel_takes(queues: int) -> None:
    assert create(br="br0", queues=queues).queues == queues


# net_tap_init(): a script runs only if it is neither "" nor "no".
@pytest.mark.parametrize("value", ["no", ""])
def test_script_no_means_no_script(value: str) -> None:
    made = create(br="br0", script=value, downscript=value)
    assert (made.script, made.downscript) == (None, None)


def test_scripts_are_named_not_paths() -> None:
    made = create(br="br0", script="ifup", downscript="ifdown")
    assert (made.script, made.downscript) == ("ifup", "ifdown")


@pytest.mark.parametrize("key", ["script", "downscript", "helper"])
@pytest.mark.parametrize("value", ["/etc/qemu-ifup", "../ifup", "ifup; reboot", "a b"])
def test_a_path_or_command_for_a_program_is_refused(key: str, value: str) -> None:
    with pytest.raises(errors.ClientError) as caught:
        plan(opts(br="br0", **{key: value}))
    assert f"{key}=" in caught.value.message
    assert repr(value) in caught.value.message


# -- plan(): vhost, as net_init_tap_one() decides it ---------------------------------
# if (tap->has_vhost ? tap->vhost : vhostfdname || (has_vhostforce && vhostforce))


@pytest.mark.parametrize(
    ("fields", "on"),
    [
        ({}, False),
        ({"vhost": True}, True),
        ({"vhost": False}, False),
        ({"vhostforce": True}, True),
        ({"vhostforce": False}, False),
        ({"vhost": False, "vhostforce": True}, False),
        ({"vhostfd": "5"}, True),
        ({"vhost": True, "vhostfd": "5"}, True),
    ],
)
def test_vhost_on(fields: dict[str, object], on: bool) -> None:
    assert create(br="br0", **fields).vhost.on is on


def test_vhostfds_turn_vhost_on() -> None:
    assert plan(opts(br="br0", fds="3:4", vhostfds="5:6")).vhost.on


def test_vhostforce_is_kept() -> None:
    assert create(br="br0", vhostforce=True).vhost.force
    assert not create(br="br0", vhost=True).vhost.force


# -- plan(): fds the client brings, and a helper ----------------------------------------


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"fd": "3"}, ("3",)),
        ({"fds": "3"}, ("3",)),
        ({"fds": "3:4:5"}, ("3", "4", "5")),
        ({"fds": "tap-a:tap-b"}, ("tap-a", "tap-b")),
    ],
)
def test_adopt_keeps_the_fd_names_in_order(
    fields: dict[str, object], names: tuple[str, ...]
) -> None:
    adopted = plan(opts(br="br0", sndbuf=4096, **fields))
    assert isinstance(adopted, AdoptPlan)
    assert adopted.names == names
    assert adopted.bridge == "br0"
    assert adopted.sndbuf == 4096


def test_fd_names_exactly_one_fd() -> None:
    # QEMU hands fd= whole to monitor_fd_param(); only fds= goes through get_fds().
    try:
        adopted = plan(opts(br="br0", fd="3:4"))
    except errors.ClientError:
        return
    assert isinstance(adopted, AdoptPlan)
    assert adopted.names == ("3:4",)


def test_more_fds_than_a_tap_has_queues() -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        plan(opts(br="br0", fds=":".join(map(str, range(257)))))
    assert caught.value.message.startswith("fds:")
    assert "256" in caught.value.message


def test_helper_runs_for_br_or_qemus_default_bridge() -> None:
    # net_init_tap(): tap->has_br ? tap->br : DEFAULT_BRIDGE_INTERFACE ("br0", net/net.h)
    helped = plan(opts(helper="bridge-helper"))
    assert isinstance(helped, HelperPlan)
    assert (helped.helper, helped.bridge) == ("bridge-helper", "br0")
    helped = plan(opts(helper="bridge-helper", br="lan", vhostfd="5"))
    assert isinstance(helped, HelperPlan)
    assert helped.bridge == "lan"
    assert helped.vhost.on


def test_an_empty_helper_is_no_program_name() -> None:
    # Unlike script=, helper= has no "" or "no" meaning "none" in QEMU.
    with pytest.raises(errors.ClientError) as caught:
        plan(opts(helper=""))
    assert "helper=" in caught.value.message


def test_qemu_rules_come_first() -> None:
    with pytest.raises(errors.InvalidOptions) as caught:
        plan(opts(br="br0", fd="3", queues=2))
    assert caught.value.message == WITH_FD


# -- the prepare op: a tap the VMM opens by name ---------------------------------


def test_prepare_plans_a_persistent_tap_with_the_keys_that_apply() -> None:
    from tapd.options import prepare_plan

    got = prepare_plan(
        TapOptions.model_validate(
            {"br": "br0", "ifname": "vm1", "queues": 4, "vnet_hdr": False, "script": "ifup"}
        )
    )
    assert isinstance(got, CreatePlan)
    assert got.persistent
    assert (got.bridge, got.ifname, got.queues, got.vnet_hdr, got.script) == (
        "br0", "vm1", 4, False, "ifup",
    )  # fmt: skip
    assert not got.vhost.provide
    # the request op's plan stays a tap tapd hands out by fd
    assert not plan(TapOptions.model_validate({"br": "br0"})).persistent  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "key", ["fd", "fds", "helper", "sndbuf", "vhost", "vhostfd", "vhostfds", "vhostforce",
            "poll-us"],
)  # fmt: skip
def test_prepare_names_the_key_that_cannot_apply(key: str) -> None:
    from tapd.options import prepare_plan

    with pytest.raises(errors.NotApplicable, match=f"^{key} does not apply to the prepare op"):
        value = {"sndbuf": 0, "vhost": False, "vhostforce": False, "poll-us": 0}.get(key)
        prepare_plan(
            TapOptions.model_validate({"br": "br0", key: GIVEN[key] if value is None else value})
        )


def test_prepare_judges_the_rest_as_request_does() -> None:
    from tapd.options import prepare_plan

    with pytest.raises(errors.InvalidIfname):
        prepare_plan(TapOptions.model_validate({"br": "br0", "ifname": "a b"}))
    with pytest.raises(errors.InvalidValue, match="queues"):
        prepare_plan(TapOptions.model_validate({"br": "br0", "queues": 0}))
    with pytest.raises(errors.InvalidValue, match="br"):
        prepare_plan(TapOptions.model_validate({}))
