"""The wire protocol, with no I/O: bytes in, requests out; replies in, bytes out.

One JSON object per line, UTF-8, ``\\n``-terminated, at most :data:`MAX_LINE`
bytes including the newline.  Every request has ``"op"``; every reply has
``"ok"``.  Nothing here touches a socket, so it is tested by feeding bytes and
fuzzed; the only exceptions that leave this module are :class:`ProtocolError`
subclasses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import (
    InvalidValue,
    LineTooLong,
    MalformedJson,
    MissingOp,
    NotAnObject,
    ProtocolError,
    UnknownKey,
    UnknownOp,
)
from .models import REQUEST_MODELS, Request

MAX_LINE = 64 * 1024


class LineBuffer:
    """Splits a byte stream into lines, refusing any longer than ``limit``.

    ``feed()`` what arrived, then take lines with ``next_line()`` until it
    returns None.  A line that grows past the limit raises
    :class:`LineTooLong` as soon as that is certain, without waiting for its end,
    so a hostile peer cannot make the daemon buffer more than ``limit`` bytes.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its ``\\n``, or None."""
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if len(self._buf) >= self._limit:
                raise LineTooLong(
                    f"request line is longer than {self._limit} bytes; "
                    "send one JSON object per line, each under 64 KiB"
                )
            return None
        if end + 1 > self._limit:
            raise LineTooLong(
                f"request line is {end + 1} bytes, more than the {self._limit} "
                "allowed; send one JSON object per line, each under 64 KiB"
            )
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        return line

    @property
    def pending(self) -> int:
        """Bytes received that are not yet a complete line."""
        return len(self._buf)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # Two readers of the same request must never see different values.
            raise MalformedJson(f"key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise MalformedJson(f"{name} is not valid JSON")


def loads_object(line: bytes) -> dict[str, Any]:
    """Parse one line as a JSON object (strict: UTF-8, no NaN, no duplicate keys)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(
            f"line is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON"
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"line is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        # e.g. an integer of more digits than Python converts (4300 by default)
        raise MalformedJson(f"line is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJson("line nests JSON too deeply") from None
    # JSON may spell a lone surrogate ("\\ud800"), which is no character:
    # refuse it here, before any of it becomes a name or a log line.  Only a
    # line with a \\u escape can hold one, so only such a line pays the check.
    if "\\u" in text:
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise MalformedJson("line holds a \\u escape that is not a character") from None
    if not isinstance(obj, dict):
        raise NotAnObject(
            f'a request must be a JSON object, not {_json_type(obj)}; for example {{"op": "hello"}}'
        )
    return obj


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(request)"


def _validation_error(op: str, exc: ValidationError) -> ProtocolError:
    errors = exc.errors(include_url=False, include_input=False)
    unknown = [_field(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        valid = ", ".join(sorted(_wire_fields(op)))
        return UnknownKey(
            f"unknown key(s) {', '.join(repr(u) for u in unknown)} for op "
            f"{op!r}; valid keys are: {valid}"
        )
    problems = "; ".join(
        (f"{_field(e['loc'])}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
        for e in errors
    )
    return InvalidValue(f"invalid {op!r} request: {problems}")


def _wire_fields(op: str) -> list[str]:
    model = REQUEST_MODELS[op]
    return [f.alias or name for name, f in model.model_fields.items()]


def decode_request(line: bytes) -> Request:
    """One line of bytes -> a validated request model."""
    obj = loads_object(line)
    op = obj.get("op")
    if op is None:
        raise MissingOp('every request needs an "op"; one of: ' + ", ".join(REQUEST_MODELS))
    model = REQUEST_MODELS.get(op) if isinstance(op, str) else None
    if model is None:
        raise UnknownOp(f"unknown op {op!r}; this tapd knows: " + ", ".join(REQUEST_MODELS))
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _validation_error(op, exc) from None


def encode(message: BaseModel | Mapping[str, Any]) -> bytes:
    """A reply (or request) as one wire line."""
    if isinstance(message, BaseModel):
        data: Any = message.model_dump(mode="json", by_alias=True, exclude_none=True)
    else:
        data = message
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode_reply(line: bytes) -> dict[str, Any]:
    """A reply line -> its object, checked for the ``"ok"`` every reply has."""
    obj = loads_object(line)
    if not isinstance(obj.get("ok"), bool):
        raise MalformedJson('reply has no boolean "ok"')
    return obj
