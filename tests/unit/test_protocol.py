"""The wire protocol, fed plain bytes: lines, requests, replies.

Expectations come from the wire contract (one UTF-8 JSON object per line, at
most 64 KiB including the newline) and from QAPI's ``NetdevTapOptions``
(qapi/net.json), whose members a request mirrors.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapd import errors, protocol
from tapd.models import TAPD_REQUEST_KEYS, HelloReply, HelloRequest, TapRequest

KIB = 1024

#: qapi/net.json, NetdevTapOptions: every member, spelled as QMP spells it.
QAPI_TAP_MEMBERS = {
    "ifname": str,
    "fd": str,
    "fds": str,
    "script": str,
    "downscript": str,
    "br": str,
    "helper": str,
    "sndbuf": int,  # size (uint64)
    "vnet_hdr": bool,
    "vhost": bool,
    "vhostfd": str,
    "vhostfds": str,
    "vhostforce": bool,
    "queues": int,  # uint32
    "poll-us": int,  # uint32
}

SAMPLE: dict[type, object] = {str: "x", int: 1, bool: True}

FUZZ = settings(max_examples=300, deadline=None)


def request_line(**fields: object) -> bytes:
    return json.dumps({"op": "request", **fields}).encode()


def drain_into(buf: protocol.LineBuffer, lines: list[bytes]) -> None:
    while (line := buf.next_line()) is not None:
        lines.append(line)


def drain(buf: protocol.LineBuffer) -> list[bytes]:
    lines: list[bytes] = []
    drain_into(buf, lines)
    return lines


# -- LineBuffer -----------------------------------------------------------------


def test_max_line_is_64_kib() -> None:
    assert protocol.MAX_LINE == 64 * KIB


def test_line_of_exactly_the_limit_including_newline_is_accepted() -> None:
    buf = protocol.LineBuffer()
    buf.feed(b"x" * (64 * KIB - 1) + b"\n")
    assert buf.next_line() == b"x" * (64 * KIB - 1)
    assert buf.pending == 0


def test_line_one_byte_over_the_limit_is_refused_even_with_its_newline() -> None:
    buf = protocol.LineBuffer()
    buf.feed(b"x" * (64 * KIB) + b"\n")
    with pytest.raises(errors.LineTooLong) as caught:
        buf.next_line()
    assert caught.value.code == "line-too-long"
    assert str(64 * KIB) in caught.value.message


def test_refused_as_soon_as_the_buffer_reaches_the_limit_without_newline() -> None:
    buf = protocol.LineBuffer()
    buf.feed(b"x" * (64 * KIB - 1))
    assert buf.next_line() is None  # one more byte could still be the newline
    buf.feed(b"x")
    with pytest.raises(errors.LineTooLong) as caught:
        buf.next_line()
    assert str(64 * KIB) in caught.value.message


def test_limit_is_reached_across_many_small_feeds() -> None:
    buf = protocol.LineBuffer(limit=10)
    for _ in range(9):
        buf.feed(b"y")
        assert buf.next_line() is None
    buf.feed(b"y")
    with pytest.raises(errors.LineTooLong):
        buf.next_line()


def test_several_lines_in_one_feed() -> None:
    buf = protocol.LineBuffer()
    buf.feed(b'{"op":"hello"}\n\n{"a":1}\npartial')
    assert drain(buf) == [b'{"op":"hello"}', b"", b'{"a":1}']
    assert buf.pending == len(b"partial")


def test_line_split_across_feeds() -> None:
    buf = protocol.LineBuffer()
    for piece in (b'{"op"', b':"hel', b'lo"}'):
        buf.feed(piece)
        assert buf.next_line() is None
    buf.feed(b"\n{")
    assert buf.next_line() == b'{"op":"hello"}'
    assert buf.next_line() is None
    assert buf.pending == 1


def test_short_lines_after_a_long_one_are_each_judged_alone() -> None:
    buf = protocol.LineBuffer(limit=8)
    buf.feed(b"1234567\n" + b"1234567\n" + b"ab\n")
    assert drain(buf) == [b"1234567", b"1234567", b"ab"]


def expected_lines(data: bytes, limit: int) -> tuple[list[bytes], bool]:
    """The lines a correct splitter yields from ``data``, and whether it must
    refuse (some line, finished or not, cannot fit in ``limit`` with its newline)."""
    *complete, rest = data.split(b"\n")
    good = []
    for line in complete:
        if len(line) + 1 > limit:
            return good, True
        good.append(line)
    return good, len(rest) + 1 > limit


@FUZZ
@given(
    limit=st.integers(min_value=1, max_value=48),
    chunks=st.lists(st.one_of(st.binary(max_size=40), st.just(b"\n")), max_size=20),
)
def test_fuzz_line_buffer_splits_like_bytes_split_or_raises_line_too_long(
    limit: int, chunks: list[bytes]
) -> None:
    buf = protocol.LineBuffer(limit=limit)
    got: list[bytes] = []
    seen = b""
    for chunk in chunks:
        seen += chunk
        want, must_refuse = expected_lines(seen, limit)
        buf.feed(chunk)
        if must_refuse:
            with pytest.raises(errors.LineTooLong):
                drain_into(buf, got)
            assert got == want  # every good line before the bad one came out
            return
        drain_into(buf, got)
        assert got == want
    assert buf.pending == len(seen.rsplit(b"\n", 1)[-1])


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_fuzz_line_buffer_raises_nothing_but_line_too_long(chunks: list[bytes]) -> None:
    buf = protocol.LineBuffer(limit=64)
    try:
        for chunk in chunks:
            buf.feed(chunk)
            drain(buf)
    except errors.LineTooLong:
        pass


# -- decode_request: what is accepted -------------------------------------------


def test_hello() -> None:
    assert protocol.decode_request(b'{"op":"hello"}') == HelloRequest(op="hello")


def test_request_keeps_every_value_as_sent() -> None:
    req = protocol.decode_request(
        request_line(br="br0", ifname="vm0", queues=4, vnet_hdr=True, sndbuf=0, **{"poll-us": 50})
    )
    assert isinstance(req, TapRequest)
    assert req.given() == {
        "op": "request",
        "br": "br0",
        "ifname": "vm0",
        "queues": 4,
        "vnet_hdr": True,
        "sndbuf": 0,
        "poll-us": 50,
    }


def test_request_keys_are_exactly_qapi_netdev_tap_options_and_tapds_own() -> None:
    wire_keys = {field.alias or name for name, field in TapRequest.model_fields.items()}
    assert wire_keys == {"op", *QAPI_TAP_MEMBERS, *TAPD_REQUEST_KEYS}
    # tapd's own keys never take a name QEMU uses for a tap
    assert not TAPD_REQUEST_KEYS & set(QAPI_TAP_MEMBERS)


def test_every_qapi_member_at_once_is_accepted() -> None:
    fields = {name: SAMPLE[kind] for name, kind in QAPI_TAP_MEMBERS.items()}
    req = protocol.decode_request(request_line(**fields))
    assert req.given() == {"op": "request", **fields}


@pytest.mark.parametrize(
    ("field", "largest"),
    [("queues", 2**32 - 1), ("poll-us", 2**32 - 1), ("sndbuf", 2**64 - 1)],
)
def test_unsigned_fields_take_their_qapi_maximum(field: str, largest: int) -> None:
    req = protocol.decode_request(request_line(**{field: largest}))
    assert req.given()[field] == largest


@pytest.mark.parametrize("field", ["ifname", "queues", "vnet_hdr", "poll-us"])
def test_null_is_refused_as_qmp_refuses_it(field: str) -> None:
    # QMP: "Invalid parameter type for 'ifname', expected: string".  Absent is
    # the only way to leave a member out.
    with pytest.raises(errors.InvalidValue) as exc:
        protocol.decode_request(request_line(**{field: None}))
    assert exc.value.code == "invalid-value"
    assert f"{field}: null" in exc.value.message


# -- decode_request: what is refused, and how --------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b"op",
        b"{'op': 'hello'}",
        b'{"op":"hello",}',
        b'{"op":"hello"} {"op":"hello"}',
        b'{"op":"hello"}\x00',
    ],
)
def test_not_json_is_malformed_json(line: bytes) -> None:
    with pytest.raises(errors.MalformedJson) as caught:
        protocol.decode_request(line)
    assert caught.value.code == "malformed-json"


@pytest.mark.parametrize("line", [b'{"op":"\xff"}', b'{"op":"hello","br":"\xc3"}', b"\xef\xbb"])
def test_invalid_utf8_is_malformed_json(line: bytes) -> None:
    with pytest.raises(errors.MalformedJson) as caught:
        protocol.decode_request(line)
    assert "UTF-8" in caught.value.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    with pytest.raises(errors.MalformedJson) as caught:
        protocol.decode_request(f'{{"op":"request","queues":{constant}}}'.encode())
    assert constant in caught.value.message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b'{"op":"hello","op":"hello"}', "op"),
        (b'{"op":"request","br":"br0","br":"br1"}', "br"),
        (b'{"op":"request","br":{"x":1,"x":2}}', "x"),
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(line: bytes, key: str) -> None:
    with pytest.raises(errors.MalformedJson) as caught:
        protocol.decode_request(line)
    assert repr(key) in caught.value.message


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"op":"request","br":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=["arrays", "inside-a-request", "objects"],
)
def test_deep_nesting_within_one_line_is_malformed_json(line: bytes) -> None:
    assert len(line) < protocol.MAX_LINE
    with pytest.raises(errors.MalformedJson):
        protocol.decode_request(line)


def test_huge_integer_is_a_protocol_error() -> None:
    # 5000 digits fit easily in one line; Python refuses to convert more than
    # 4300 decimal digits to an int (sys.get_int_max_str_digits) with ValueError.
    line = b'{"op":"request","queues":' + b"9" * 5000 + b"}"
    assert len(line) < protocol.MAX_LINE
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(line)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"[]", "array"),
        (b'"hello"', "string"),
        (b"1", "number"),
        (b"1.5", "number"),
        (b"true", "boolean"),
        (b"null", "null"),
    ],
)
def test_a_request_must_be_an_object(line: bytes, kind: str) -> None:
    with pytest.raises(errors.NotAnObject) as caught:
        protocol.decode_request(line)
    assert caught.value.code == "not-an-object"
    assert kind in caught.value.message


@pytest.mark.parametrize("line", [b"{}", b'{"br":"br0"}', b'{"Op":"hello"}'])
def test_missing_op(line: bytes) -> None:
    with pytest.raises(errors.MissingOp) as caught:
        protocol.decode_request(line)
    assert caught.value.code == "missing-op"
    assert "hello" in caught.value.message
    assert "request" in caught.value.message


@pytest.mark.parametrize(
    ("op", "named"),
    [
        ("destroy", "'destroy'"),
        ("Hello", "'Hello'"),
        ("", "''"),
        (1, "1"),
        (True, "True"),
        (["request"], "['request']"),
        ({"op": "hello"}, "'hello'"),
    ],
)
def test_unknown_or_non_string_op(op: object, named: str) -> None:
    with pytest.raises(errors.UnknownOp) as caught:
        protocol.decode_request(json.dumps({"op": op}).encode())
    assert caught.value.code == "unknown-op"
    assert named in caught.value.message


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        ({"op": "request", "br": "br0", "bogus": 1}, "bogus"),
        ({"op": "request", "poll_us": 5}, "poll_us"),
        ({"op": "request", "Br": "br0"}, "Br"),
        ({"op": "request", "vnet-hdr": True}, "vnet-hdr"),
        ({"op": "hello", "br": "br0"}, "br"),
    ],
)
def test_unknown_key_is_named(obj: dict[str, object], key: str) -> None:
    with pytest.raises(errors.UnknownKey) as caught:
        protocol.decode_request(json.dumps(obj).encode())
    assert caught.value.code == "unknown-key"
    assert repr(key) in caught.value.message


def test_unknown_key_message_lists_the_wire_spelling_of_poll_us() -> None:
    with pytest.raises(errors.UnknownKey) as caught:
        protocol.decode_request(request_line(poll_us=5))
    assert "poll-us" in caught.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queues", "4"),
        ("queues", 4.0),
        ("queues", True),
        ("queues", -1),
        ("queues", 2**32),
        ("poll-us", "50"),
        ("poll-us", 2**32),
        ("sndbuf", -1),
        ("sndbuf", 2**64),
        ("vnet_hdr", 1),
        ("vnet_hdr", "on"),
        ("vhost", 0),
        ("vhostforce", "true"),
        ("br", 5),
        ("br", ["br0"]),
        ("ifname", {"name": "tap0"}),
        ("fd", 3),
        ("fds", [3, 4]),
    ],
)
def test_wrong_type_or_range_is_invalid_value_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(errors.InvalidValue) as caught:
        protocol.decode_request(request_line(**{field: value}))
    assert caught.value.code == "invalid-value"
    assert f"{field}:" in caught.value.message


def test_lone_surrogate_escape_is_refused() -> None:
    # "\ud800" is valid JSON syntax but names no Unicode character: no UTF-8
    # encoding exists, so it can be neither an interface name nor echoed back.
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(b'{"op":"request","br":"\\ud800"}')


# -- strategies ------------------------------------------------------------------------

uint32 = st.integers(min_value=0, max_value=2**32 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=20)


def member_values(name: str, kind: type) -> st.SearchStrategy[object]:
    if kind is bool:
        return st.booleans()
    if kind is int:
        return uint64 if name == "sndbuf" else uint32
    return text


valid_requests = st.fixed_dictionaries(
    {"op": st.just("request")},
    optional={name: member_values(name, kind) for name, kind in QAPI_TAP_MEMBERS.items()},
)
tap_requests = valid_requests.map(TapRequest.model_validate)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
any_key = st.one_of(st.sampled_from(["op", *QAPI_TAP_MEMBERS]), st.text(max_size=10))
request_shaped = st.one_of(
    valid_requests,
    # a valid request with one member set to anything, or one key added
    st.builds(lambda base, key, value: {**base, key: value}, valid_requests, any_key, json_values),
    st.dictionaries(any_key, json_values, max_size=6),
)


# -- fuzzing: nothing but ProtocolError comes out --------------------------------------


def decode_or_protocol_error(line: bytes) -> HelloRequest | TapRequest | None:
    try:
        return protocol.decode_request(line)
    except errors.ProtocolError:
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(line: bytes) -> None:
    decode_or_protocol_error(line)


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json_values(value: object) -> None:
    decode_or_protocol_error(json.dumps(value).encode())


@FUZZ
@given(request_shaped)
def test_fuzz_request_shaped_objects_are_kept_exactly_or_refused(obj: dict[str, object]) -> None:
    req = decode_or_protocol_error(json.dumps(obj).encode())
    if req is not None:
        # Strict models: anything accepted is kept exactly as sent, never coerced.
        kept = req.model_dump(by_alias=True, exclude_none=True)
        assert kept == {k: v for k, v in obj.items() if v is not None}


# -- round trips -------------------------------------------------------------------------


@FUZZ
@given(tap_requests)
def test_fuzz_encode_then_decode_is_identity(req: TapRequest) -> None:
    line = protocol.encode(req)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert protocol.decode_request(line[:-1]) == req


def test_encode_is_compact_utf8_on_one_line() -> None:
    line = protocol.encode({"ok": True, "note": "é\nü"})
    assert line == '{"ok":true,"note":"é\\nü"}\n'.encode()


def test_reply_model_round_trip() -> None:
    reply = HelloReply(protocol=1, version="9.9", ops=("hello", "request"))
    decoded = protocol.decode_reply(protocol.encode(reply)[:-1])
    assert decoded == {"ok": True, "protocol": 1, "version": "9.9", "ops": ["hello", "request"]}


def test_error_reply_round_trip() -> None:
    wire = errors.to_wire(errors.Denied("no"))
    assert protocol.decode_reply(protocol.encode(wire)[:-1]) == wire


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{}", errors.MalformedJson),
        (b'{"ok":1}', errors.MalformedJson),
        (b'{"ok":"true"}', errors.MalformedJson),
        (b'{"ok":null}', errors.MalformedJson),
        (b"[true]", errors.NotAnObject),
        (b'{"ok":true', errors.MalformedJson),
        (b'{"ok":true,"ok":false}', errors.MalformedJson),
    ],
)
def test_decode_reply_refuses_what_is_not_a_reply(
    line: bytes, error: type[errors.ProtocolError]
) -> None:
    with pytest.raises(error):
        protocol.decode_reply(line)
