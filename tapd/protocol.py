"""The daemon's side of the wire, with no I/O: bytes in, requests out; replies out as bytes.

The framing (lines of strict JSON, at most :data:`MAX_LINE` bytes) is
:mod:`tapd.wire`'s, shared with the clients; this module adds what only the
daemon needs: every request validated into its pydantic model.  Every request
has ``"op"``; every reply has ``"ok"``.  Nothing here touches a socket, so it
is tested by feeding bytes and fuzzed; the only exceptions that leave this
module are :class:`ProtocolError` subclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidValue, MissingOp, ProtocolError, UnknownKey, UnknownOp
from .models import REQUEST_MODELS, Request
from .wire import MAX_LINE, LineBuffer, decode_reply, dumps_line, loads_object

__all__ = ["MAX_LINE", "LineBuffer", "decode_reply", "decode_request", "encode", "loads_object"]


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
        return dumps_line(message.model_dump(mode="json", by_alias=True, exclude_none=True))
    return dumps_line(message)
