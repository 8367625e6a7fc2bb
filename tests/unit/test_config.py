"""tapd's TOML configuration: defaults, and refusals that name the key path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tapd import config, policy
from tapd.config import ConfigError
from tapd.errors import Denied


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(text)
    assert caught.value.problems
    return caught.value.problems


def only_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# -- defaults --------------------------------------------------------------------------


def test_no_file_means_defaults() -> None:
    cfg = config.load(None)
    assert cfg == config.parse("")
    assert cfg.server.socket == "/run/tapd.sock"
    assert cfg.server.mode == 0o660


def test_by_default_only_uid_0_is_served() -> None:
    served = policy.Policy(config.load(None))
    assert served.check(policy.Peer(uid=0, gid=0, pid=1), "br0").rule.startswith("allow")
    for peer in (
        policy.Peer(uid=65534, gid=65534, pid=2),
        policy.Peer(uid=1000, gid=0, pid=3),  # gid 0 is not uid 0
        policy.Peer(uid=1000, gid=1000, pid=4, groups=(0,)),
    ):
        with pytest.raises(Denied):
            served.check(peer, "br0")


def test_a_file_sets_what_it_names_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "tapd.toml"
    path.write_text(
        '[server]\nsocket = "/run/other.sock"\nsocket_mode = "0600"\n'
        '[[allow]]\ngroups = ["nogroup"]\nbridges = ["br0"]\nmax_queues = 4\n'
    )
    cfg = config.load(str(path))
    assert cfg.server.socket == "/run/other.sock"
    assert cfg.server.mode == 0o600
    assert cfg.server.max_connections == config.Config().server.max_connections
    assert [(r.groups, r.bridges, r.max_queues) for r in cfg.allow] == [(("nogroup",), ("br0",), 4)]


# -- refusals name the key path -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("bogus = 1\n", "bogus"),
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[taps]\nsocket = '/x'\n", "taps.socket"),
        ("[[allow]]\nbridges = ['*']\nusers = ['0']\nbogus = 1\n", "allow[0].bogus"),
        ("[[allow]]\nbridges = ['*']\nusers = ['0']\n[[deny]]\nuser = 'nobody'\n", "deny[0].user"),
    ],
)
def test_unknown_key(text: str, path: str) -> None:
    problem = only_problem(text)
    assert problem.startswith(f"{path}:")
    assert "unknown key" in problem


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("[server]\nbogus = 1\n", "socket_mode"),
        ("[taps]\nbogus = 1\n", "name_template"),
        ("[[allow]]\nbridges = ['*']\nusers = ['0']\nbogus = 1\n", "max_queues"),
    ],
)
def test_unknown_key_says_what_is_valid_there(text: str, valid: str) -> None:
    assert valid in only_problem(text)


@pytest.mark.parametrize("mode", ["rw", "0999", "1777", "", "-1", "0o1000"])
def test_bad_socket_mode(mode: str) -> None:
    problem = only_problem(f'[server]\nsocket_mode = "{mode}"\n')
    assert problem.startswith("server.socket_mode:")
    assert repr(mode) in problem


def test_socket_mode_must_be_a_string() -> None:
    assert only_problem("[server]\nsocket_mode = 660\n").startswith("server.socket_mode:")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[server]\nrequest_timeout = 0\n", "server.request_timeout"),
        ("[server]\nsocket = 5\n", "server.socket"),
        ("[[allow]]\nbridges = ['*']\nusers = [0]\n", "allow[0].users[0]"),
        ("[[allow]]\nbridges = ['*']\nusers = ['0']\nmax_queues = 0\n", "allow[0].max_queues"),
        # drivers/net/tun.c: MAX_TAP_QUEUES is 256.
        ("[[allow]]\nbridges = ['*']\nusers = ['0']\nmax_queues = 257\n", "allow[0].max_queues"),
        (
            "[[allow]]\nbridges = ['*']\nusers = ['0']\n[[allow]]\nbridges = 'br0'\n",
            "allow[1].bridges",
        ),
    ],
)
def test_bad_value(text: str, path: str) -> None:
    assert only_problem(text).startswith(f"{path}:")


@pytest.mark.parametrize(
    ("text", "path", "named"),
    [
        (
            "[[allow]]\nbridges = ['*']\nusers = ['nosuchuser-tapd']\n",
            "allow[0].users[0]",
            "nosuchuser-tapd",
        ),
        ("[[deny]]\ngroups = ['nosuchgroup-tapd']\n", "deny[0].groups[0]", "nosuchgroup-tapd"),
        (
            "[[allow]]\nbridges = ['*']\nusers = ['0']\ntap_group = 'nosuchgroup-tapd'\n",
            "allow[0].tap_group",
            "",
        ),
        ("[server]\nsocket_group = 'nosuchgroup-tapd'\n", "server.socket_group", ""),
        # "\u00b2" (superscript two) passes str.isdigit() but is no decimal id
        ('[[allow]]\nbridges = ["*"]\nusers = ["\u00b2"]\n', "allow[0].users[0]", ""),
        ('[[allow]]\nbridges = ["*"]\ngroups = ["\u00b2"]\n', "allow[0].groups[0]", ""),
    ],
)
def test_users_and_groups_must_exist_or_be_ids(text: str, path: str, named: str) -> None:
    problem = only_problem(text)
    assert problem.startswith(f"{path}:")
    assert named in problem


@pytest.mark.parametrize("section", ["allow", "deny"])
def test_a_rule_must_match_someone_somewhere(section: str) -> None:
    assert only_problem(f"[[{section}]]\nbridges = ['br0']\n").startswith(f"{section}[0]")
    assert only_problem(f"[[{section}]]\nusers = ['0']\nbridges = []\n").startswith(f"{section}[0]")


@pytest.mark.parametrize("bridge", ["", "br/0", "a" * 16, "br*", "br 0"])
def test_rule_bridges_are_names_or_star(bridge: str) -> None:
    problem = only_problem(f"[[allow]]\nusers = ['0']\nbridges = ['{bridge}']\n")
    assert problem.startswith("allow[0].bridges[0]:")


def test_every_problem_is_reported_each_with_its_path() -> None:
    problems = problems_of(
        '[server]\nsocket_mode = "rw"\nmax_connections = 0\nbogus = 1\n'
        '[taps]\nname_template = "tap"\n'
    )
    assert sorted(p.split(":", 1)[0] for p in problems) == [
        "server.bogus",
        "server.max_connections",
        "server.socket_mode",
        "taps.name_template",
    ]


# -- name_template -----------------------------------------------------------------
# {rand} is 8 hex digits and {uid} up to 10 decimal digits (uid_t is 32 bits);
# <linux/if.h> IFNAMSIZ leaves 15 bytes for a name.


@pytest.mark.parametrize("template", ["tap{rand}", "{rand}", "tapabcd{rand}", "v{rand}x"])
def test_good_name_template(template: str) -> None:
    assert config.parse(f'[taps]\nname_template = "{template}"\n').taps.name_template == template


def test_name_template_needs_rand() -> None:
    problem = only_problem('[taps]\nname_template = "tap{uid}"\n')
    assert problem.startswith("taps.name_template:")
    assert "{rand}" in problem


@pytest.mark.parametrize(("template", "named"), [("tap{rand}{foo}", "foo"), ("{rand}{0}", "0")])
def test_name_template_with_unknown_placeholder(template: str, named: str) -> None:
    problem = only_problem(f'[taps]\nname_template = "{template}"\n')
    assert problem.startswith("taps.name_template:")
    assert named in problem.removeprefix("taps.name_template:").replace("{rand}", "")


@pytest.mark.parametrize(
    "template", ["{rand}{", "{rand}}", "tap{rand}{rand.real}", "tap{rand}{uid[0]}", "{rand}{uid.x}"]
)
def test_name_template_that_is_not_a_plain_format_is_a_config_error(template: str) -> None:
    problem = only_problem(f'[taps]\nname_template = "{template}"\n')
    assert problem.startswith("taps.name_template:")


@pytest.mark.parametrize(
    ("template", "size"),
    [
        ("tapabcde{rand}", 16),
        ("{rand}{uid}", 18),
        ("\u00e9\u00e9\u00e9\u00e9{rand}", 16),  # 12 characters, 16 bytes
    ],
)
def test_name_template_too_long_once_filled(template: str, size: int) -> None:
    problem = only_problem(f'[taps]\nname_template = "{template}"\n')
    assert problem.startswith("taps.name_template:")
    assert str(size) in problem


def test_name_template_placeholders_take_nothing_inside_the_braces() -> None:
    problem = only_problem('[taps]\nname_template = "{rand}{rand:>8}"\n')
    assert problem.startswith("taps.name_template:") and "{rand}" in problem


@pytest.mark.parametrize("template", ["t/{rand}", "t:{rand}", "t {rand}", "t\\t{rand}"])
def test_name_template_that_can_never_make_a_valid_name(template: str) -> None:
    # net/core/dev.c dev_valid_name(): "/", ":" and whitespace are never valid,
    # so every name made from such a template is refused by the kernel.
    problem = only_problem(f'[taps]\nname_template = "{template}"\n')
    assert problem.startswith("taps.name_template:")


# -- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[server", "a = ", "a = 1\na = 2\n", "[server]\nsocket = '/x\n"])
def test_invalid_toml(text: str, tmp_path: Path) -> None:
    path = tmp_path / "tapd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert caught.value.path == str(path)
    assert len(caught.value.problems) == 1
    assert "TOML" in caught.value.problems[0]
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.path == path
    assert os.strerror(errno.ENOENT) in caught.value.problems[0]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(str(tmp_path))
    assert os.strerror(errno.EISDIR) in caught.value.problems[0]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tapd.toml"
    path.write_bytes(b'[server]\nsocket = "/run/\xff.sock"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(str(path))
    assert "UTF-8" in caught.value.problems[0]


def test_parse_error_names_the_given_path() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse("bogus = 1\n", "/etc/tapd/tapd.toml")
    assert str(caught.value).startswith("/etc/tapd/tapd.toml: bogus:")


# -- ifname_prefix ------------------------------------------------------------------


def test_ifname_prefix_is_unset_by_default() -> None:
    assert config.parse("").taps.ifname_prefix is None
    assert config.parse('[taps]\nifname_prefix = "vm-"\n').taps.ifname_prefix == "vm-"


@pytest.mark.parametrize(
    ("prefix", "says"),
    [("-vm", "'-'"), ("a" * 15, "bytes"), ("vm 1", "characters"), ("vm/", "characters")],
)
def test_an_ifname_prefix_no_name_could_start_with_is_refused(prefix: str, says: str) -> None:
    problem = only_problem(f'[taps]\nifname_prefix = "{prefix}"\n')
    assert problem.startswith("taps.ifname_prefix:") and says in problem, problem


# -- budgets and closers (issue 11) ------------------------------------------------------


def test_budget_defaults_leave_room_for_others_and_root() -> None:
    server = config.load(None).server
    assert 2 * server.max_connections_per_uid < server.max_connections
    assert server.root_reserved_connections > 0
    assert server.connection_lifetime > server.request_timeout
    assert config.load(None).taps.max_taps == 4096


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[server]\nmax_stuck_closers = 0\n", "server.max_stuck_closers"),
        ("[server]\ncloser_timeout = 0\n", "server.closer_timeout"),
        ("[server]\nmax_fds_per_uid = 0\n", "server.max_fds_per_uid"),
        ("[server]\nconnection_lifetime = -1\n", "server.connection_lifetime"),
        ("[server]\nroot_reserved_connections = -1\n", "server.root_reserved_connections"),
        ("[taps]\nmax_taps = 0\n", "taps.max_taps"),
    ],
)
def test_budget_keys_are_checked(text: str, where: str) -> None:
    assert only_problem(text).startswith(where)


# -- the mistakes people make, and what tapd says to put them right -----------------


def test_an_allow_rule_must_name_its_bridges() -> None:
    """A rule that forgot its bridges would hand out every bridge on the host."""
    problem = only_problem("[[allow]]\nusers = ['0']\n")
    assert problem.startswith("allow[0].bridges: missing")
    assert 'bridges = ["br0"]' in problem and '"*"' in problem
    # A deny rule without bridges denies every bridge, as before.
    cfg = config.parse("[[allow]]\nusers = ['0']\nbridges = ['*']\n[[deny]]\nusers = ['0']\n")
    assert cfg.deny[0].bridges == ("*",)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[allow]]\nusers = [65534]\nbridges = ['br0']\n", '("1000", not 1000)'),
        ("[[allow]]\ngroups = [100]\nbridges = ['br0']\n", '("100", not 100)'),
        ("[server]\nsocket_mode = 660\n", '("0660")'),
        ("[[allow]]\nusers = ['0']\nbridges = 'br0'\n", 'must be an array, e.g. bridges = ["br0"]'),
        ("[[allow]]\nusers = '0'\nbridges = ['br0']\n", 'users = ["alice"]'),
        ("[server]\nsocket_mode = 0660\n", "no numbers with a leading zero"),
        ("[server]\nsocket_group = kvm\n", '(name = "value")'),
        ("[[allow]]\nusers = ['0']\nbridges = ['*']\nmac_filtering = yes\n", "true or false"),
    ],
)
def test_common_mistakes_say_how_to_write_it(text: str, says: str) -> None:
    assert says in only_problem(text)
