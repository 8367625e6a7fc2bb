"""tapd.wire parses and writes lines with the C engine of the standard
library's json, without the json package (whose import pulls in re): for any
line, what it makes of it is what json.loads and json.dumps make of it."""

from __future__ import annotations

import json
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tapd import wire

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
#: pieces that make lines: valid JSON, broken JSON, and what lies between
pieces = st.one_of(
    values.map(json.dumps),
    st.sampled_from(
        [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            '"',
            "\\",
            " ",
            "\t",
            "\n",
            "\r",
            "\ufeff",
            "NaN",
            "Infinity",
            "-",
            "1e",
            "01",
            "tru",
            '"\\ud800"',
            '"\\u00e9"',
            '{"a":1,"a":2}',
            "\x00",
        ],
    ),
    st.text(max_size=3),
)


def by_json(text: str) -> object:
    return json.loads(
        text, object_pairs_hook=wire._no_duplicates, parse_constant=wire._no_constants
    )


def outcome(parse: object, text: str) -> tuple[str, object]:
    try:
        return "value", parse(text)  # type: ignore[operator]
    except (ValueError, RecursionError, wire.MalformedJson) as exc:
        return type(exc).__name__, str(exc)


def same(a: object, b: object) -> bool:
    """Equal, NaN being equal to NaN and a float never equal to an int."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[call-overload]
    return a == b


@settings(max_examples=600)
@given(st.lists(pieces, max_size=6).map("".join))
@example('  {"op": "hello"}  ')
@example('{"op": "hello"} x')
@example('{"a": }')
@example("[" * 5000)
@example("1" * 5000)
@example("")
def test_a_line_parses_as_json_loads_parses_it(text: str) -> None:
    ours, theirs = outcome(wire._loads, text), outcome(by_json, text)
    assert ours[0] == theirs[0] and same(ours[1], theirs[1]), (ours, theirs)


@given(values)
def test_a_value_is_written_as_json_dumps_writes_it(value: object) -> None:
    assert wire._dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_what_json_cannot_write_is_refused_as_json_refuses_it() -> None:
    for value in ({"a": {1, 2}}, [b"x"], {(1, 2): 3}):
        try:
            json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except TypeError as exc:
            theirs = str(exc)
        try:
            wire._dumps(value)
        except TypeError as exc:
            assert str(exc) == theirs
        else:
            raise AssertionError(f"{value!r} was written")
    loop: list[object] = []
    loop.append(loop)
    try:
        wire._dumps(loop)
    except ValueError as exc:
        assert str(exc) == "Circular reference detected"
    else:
        raise AssertionError("a circular list was written")
