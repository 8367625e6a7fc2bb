"""The man pages under systemd/man are the reference, and they cannot go stale:
every configuration key of the models, every request key and op, every error
code, every tapctl verb and long option, every tapd option and journal event
must be on its page, found there from the code itself, and every page renders
with groff without a warning."""

from __future__ import annotations

import ast
import itertools
import os
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from tapd import config, daemon, errors, exchange, models, tapctl

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "systemd" / "man"
#: a key, code, option or event as the pages write it: "poll-us", "--guest-ip", "lease.ended"
TOKEN = r"-*\w[\w.\-]*\w|-*\w"
PAGES = ("tapd.8", "tapctl.1", "tapd.toml.5", "tapd-protocol.7", "tapd-security.7")


def plain(roff: str) -> str:
    """A line of man(7) source as a reader sees its words."""
    text = re.sub(r"\\f(\[[^]]*\]|.)", "", roff)
    text = text.replace("\\-", "-").replace("\\:", "").replace("\\&", "").replace("\\e", "\\")
    text = re.sub(r"\\\(\w\w", " ", text)
    return re.sub(r"^\.(B|BR|RB|BI|IB|I|IR|RI)\s", "", text).replace('"', "")


def sections(page: str, macro: str = "SH") -> dict[str, list[str]]:
    """The page's lines under each .SH (or .SS) heading, by heading."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in (MAN / page).read_text().splitlines():
        if line.startswith(f".{macro} "):
            current = plain(line[4:]).strip()
            found[current] = []
        elif macro == "SS" and line.startswith(".SH "):
            current = ""
        elif current:
            found[current].append(line)
    return found


def tags(lines: list[str]) -> set[str]:
    """The words of every .TP entry's tag line."""
    words: set[str] = set()
    for before, tag in itertools.pairwise(lines):
        if before.startswith(".TP"):
            words.update(re.findall(TOKEN, plain(tag)))
    return words


def section(page: str, title: str, macro: str = "SH") -> list[str]:
    every = sections(page, macro)
    assert title in every, f"{page} has no {macro} {title!r}: it has {sorted(every)}"
    return every[title]


def words(lines: list[str]) -> set[str]:
    return set(re.findall(TOKEN, plain("\n".join(lines))))


def test_every_page_is_there() -> None:
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)


# -- tapd.toml(5) -----------------------------------------------------------


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            yield arg
        elif arg is not annotation:
            yield from _models_in(arg)


def config_keys() -> list[tuple[str, str]]:
    """(the page's section heading, key) for every key of the models: a model
    field is a [table], a list of models an [[array of tables]]; walked all the
    way down, so that a key added anywhere is found."""
    found: list[tuple[str, str]] = []

    def walk(model: type[BaseModel], heading: str) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            inner = list(_models_in(field.annotation))
            if inner:
                array = typing.get_origin(field.annotation) in (tuple, list)
                for sub in inner:
                    walk(sub, f"[[{key}]]" if array else f"[{key}]")
            else:
                found.append((heading, key))

    walk(config.Config, "")
    return sorted(set(found))


def toml_section(heading: str) -> list[str]:
    titles = [title for title in sections("tapd.toml.5") if heading in title.split()]
    assert titles, f"tapd.toml(5) has no section for {heading}"
    return section("tapd.toml.5", titles[0])


def test_the_config_walk_finds_every_table() -> None:
    # Guards the test below against a walk that finds nothing.
    found = config_keys()
    assert {h for h, _ in found} >= {"[server]", "[taps]", "[vhost]", "[programs]", "[[allow]]"}
    assert ("[[allow]]", "ip_ranges") in found and ("[server]", "closer_timeout") in found
    assert len(found) > 35


@pytest.mark.parametrize("heading,key", config_keys())
def test_every_config_key_is_in_tapd_toml_5(heading: str, key: str) -> None:
    assert key in tags(toml_section(heading)), f"tapd.toml(5) {heading} does not document {key}"


# -- tapd-protocol(7) -------------------------------------------------------


def _op_table() -> list[str]:
    """The ops of service.py's op table, read from its source."""
    tree = ast.parse((REPO / "tapd" / "service.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Attribute) and t.attr == "_ops" for t in targets):
                assert isinstance(node.value, ast.Dict)
                return [str(k.value) for k in node.value.keys if isinstance(k, ast.Constant)]
    raise AssertionError("service.py has no op table")


OPS = _op_table()


def op_entries() -> dict[str, list[str]]:
    """Each op's .TP entry in FRAMING: its tag and body lines."""
    lines = section("tapd-protocol.7", "FRAMING")
    entries: dict[str, list[str]] = {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith(".TP"):
            body = []
            for nxt in lines[i + 2 :]:
                if nxt.startswith((".TP", ".PP", ".SS", ".SH")):
                    break
                body.append(nxt)
            entries[plain(lines[i + 1]).strip()] = body
    return entries


def op_part(op: str, part: str) -> set[str]:
    """The words of an op's "Request:" or "Reply:" part in FRAMING."""
    text = "\n".join(op_entries()[op])
    assert "Request:" in text and "Reply:" in text, f"{op}'s entry has no Request: and Reply:"
    request, reply = text.split("Reply:", 1)
    return words([request if part == "Request" else reply])


def test_the_op_table_is_the_wire_s() -> None:
    assert len(OPS) >= 8
    assert set(OPS) == set(models.REQUEST_MODELS)


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_in_tapd_protocol_7(op: str) -> None:
    assert op in op_entries(), f"tapd-protocol(7) FRAMING has no entry for the op {op!r}"


def request_keys() -> list[tuple[str, str]]:
    found = []
    for op, model in models.REQUEST_MODELS.items():
        for name, field in model.model_fields.items():
            key = field.alias or name
            if key != "op":
                found.append((op, key))
    return found


TAP_OPS = ("request", "prepare")
REQUEST_KEYS = section("tapd-protocol.7", "The request keys of request and prepare", "SS")


def test_the_request_keys_are_found() -> None:
    found = request_keys()
    assert ("request", "poll-us") in found and ("request", "guest_mac") in found
    assert ("release", "lease") in found


@pytest.mark.parametrize("op,key", request_keys())
def test_every_request_key_is_in_tapd_protocol_7(op: str, key: str) -> None:
    if op in TAP_OPS:
        assert key in tags(REQUEST_KEYS), f"tapd-protocol(7) does not document {op}'s key {key}"
    else:
        assert key in op_part(op, "Request"), f"tapd-protocol(7)'s {op} request lacks {key}"


def wire_codes() -> set[str]:
    def tree(root: type[errors.TapdError]) -> list[type[errors.TapdError]]:
        return [root, *(c for sub in root.__subclasses__() for c in tree(sub))]

    return {cls.code for cls in tree(errors.TapdError) if hasattr(cls, "code")}


def local_codes() -> set[str]:
    def tree(root: type[exchange.LocalError]) -> list[type[exchange.LocalError]]:
        return [root, *(c for sub in root.__subclasses__() for c in tree(sub))]

    assert tapctl.BadNetdev in tree(exchange.LocalError)  # tapctl's own are loaded
    return {cls.CODE for cls in tree(exchange.LocalError) if hasattr(cls, "CODE")}


def documented_codes() -> set[str]:
    """The tags of the ERRORS section, before its client-library subsection."""
    lines = section("tapd-protocol.7", "ERRORS")
    return tags(lines[: next(i for i, line in enumerate(lines) if line.startswith(".SS"))])


def test_every_wire_code_is_in_tapd_protocol_7_and_only_those() -> None:
    codes, documented = wire_codes(), documented_codes()
    assert len(codes) > 30
    assert codes - documented == set(), "codes a reply may carry that tapd-protocol(7) lacks"
    assert documented - codes == set(), "codes tapd-protocol(7) lists that no class carries"


def test_every_client_code_is_in_tapd_protocol_7() -> None:
    lines = section("tapd-protocol.7", "Codes of the client libraries", "SS")
    assert local_codes() - tags(lines) == set()


# -- tapctl(1) and tapd(8) ---------------------------------------------------


def long_options(parser: typing.Any) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def verbs() -> dict[str, typing.Any]:
    parser = tapctl._parser()
    (sub,) = [a for a in parser._actions if a.choices and a.dest == "verb"]
    assert isinstance(sub.choices, dict)
    return dict(sub.choices)


def test_tapctl_s_parser_is_read() -> None:
    assert {"request", "prepare", "metrics", "helper"} <= set(verbs())
    assert "--guest-ip" in long_options(verbs()["request"])


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_every_tapctl_verb_and_its_options_are_in_tapctl_1(verb: str) -> None:
    text = words(section("tapctl.1", verb, "SS"))
    # every verb's --help is argparse's, said once under GLOBAL OPTIONS
    missing = {opt for opt in long_options(verbs()[verb]) - {"--help"} if opt not in text}
    assert missing == set(), f"tapctl(1)'s {verb} does not document {sorted(missing)}"


def test_tapctl_s_global_options_are_in_tapctl_1() -> None:
    text = words(section("tapctl.1", "GLOBAL OPTIONS"))
    assert long_options(tapctl._parser()) - text == set()


def test_every_tapd_option_is_in_tapd_8() -> None:
    options = long_options(daemon._parser())
    assert "--check-config" in options
    assert options - {"--help"} - tags(section("tapd.8", "OPTIONS")) == set()


def journal_events() -> set[str]:
    """Every event name tapd's modules log: a log call's first argument."""
    found: set[str] = set()
    levels = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
    for path in (REPO / "tapd").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", node.args[0].value)
            ):
                found.add(node.args[0].value)
    return found


def test_every_journal_event_is_in_tapd_8() -> None:
    events = journal_events()
    assert {"request.granted", "closer.stuck", "tapd.crashed"} <= events
    assert events - tags(section("tapd.8", "JOURNAL EVENTS")) == set()


# -- rendering and installing -------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_a_warning(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (.ci/setup installs groff-base)")
    done = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / page)],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_the_readme_s_systemd_install_installs_every_page() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("\n## systemd\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    for page in PAGES:
        assert f"systemd/man/{page}" in block, f"the README's systemd install leaves out {page}"


#: which reply model answers each op (a new reply model must be named here)
REPLIES = {
    "hello": models.HelloReply,
    "request": models.TapReply,
    "bridge-helper": models.TapReply,
    "prepare": models.PrepareReply,
    "list": models.ListReply,
    "release": models.ReleaseReply,
    "status": models.StatusReply,
    "metrics": models.MetricsReply,
}


def reply_fields() -> list[tuple[str, str]]:
    found = []
    for op, model in REPLIES.items():
        fields = [f.alias or name for name, f in model.model_fields.items()]
        if model is models.ListReply:
            fields += [f.alias or name for name, f in models.LeaseInfo.model_fields.items()]
        found += [(op, key) for key in fields if key != "ok"]
    return found


def test_every_reply_model_answers_an_op() -> None:
    replies = {
        cls
        for name, cls in vars(models).items()
        if name.endswith("Reply") and isinstance(cls, type)
    }
    assert replies == set(REPLIES.values())
    assert set(REPLIES) == set(OPS)


@pytest.mark.parametrize("op,key", reply_fields())
def test_every_reply_field_is_in_tapd_protocol_7(op: str, key: str) -> None:
    # bridge-helper's reply is request's, said so on its page
    reply = op_part("request" if op == "bridge-helper" else op, "Reply")
    assert key in reply, f"tapd-protocol(7)'s {op} reply lacks the field {key}"
