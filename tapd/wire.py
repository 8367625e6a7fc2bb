"""The wire's framing, shared by the daemon and every client: lines of strict JSON.

One JSON object per line, UTF-8, ``\\n``-terminated, at most :data:`MAX_LINE`
bytes including the newline.  This module is the one definition of those
rules for both sides of the socket, so it imports the standard library and
:mod:`tapd.errors` only: a client that needs it pays for no pydantic, trio or
daemon module (``tests/unit/test_client_imports.py`` holds that).  The
daemon's request models and their validation live in :mod:`tapd.protocol`.

No I/O here: bytes in, objects out; the only exceptions that leave it are
:class:`~tapd.errors.ProtocolError` subclasses.

Lines are parsed and written by the standard library's own JSON engine, the C
scanner and encoder of ``_json`` that :func:`json.loads` and
:func:`json.dumps` run, called here directly with the settings those give
them.  The :mod:`json` package around them imports :mod:`re`, and so
:mod:`enum`, :mod:`functools` and :mod:`collections`: a third of what a
per-VM client would otherwise import.  A line the scanner refuses is parsed
again by :mod:`json` itself, so that a refusal says what :mod:`json` says;
tapd is CPython's, whose :mod:`json` has had ``_json`` since 2.6.
"""

from __future__ import annotations

import _json

from .errors import LineTooLong, MalformedJson, NotAnObject

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: where the daemon listens unless told otherwise (its config, --socket)
DEFAULT_SOCKET = "/run/tapd.sock"

#: a line's limit, newline included
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


class _Strict:
    """What :func:`json.loads` hands the C scanner, with tapd's two hooks: the
    attributes ``_json.make_scanner`` reads."""

    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_no_duplicates)
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constants)


_scan = _json.make_scanner(_Strict)  # type: ignore[arg-type]  # reads the attributes only
#: what JSON allows around a value
_WHITESPACE = " \t\n\r"


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _dumps(value: object) -> str:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``: its
    encoder, a fresh one per call as json.dumps makes (circular-reference
    markers and all)."""
    if isinstance(value, str):  # json.dumps quotes a lone string without its encoder
        return _json.encode_basestring(value)
    encode = _json.make_encoder(
        {}, _unserializable, _json.encode_basestring, None, ":", ",", False, False, True
    )
    return "".join(encode(value, 0))


def _loads(text: str) -> Any:
    """``json.loads(text)`` with tapd's hooks, by the scanner alone when the
    line is valid; :mod:`json` itself words the refusal of one that is not."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        obj, end = _scan(text, start)
    except (StopIteration, ValueError):
        pass  # json.loads below raises the same, in its words
    else:
        if end == len(text) or not text[end:].strip(_WHITESPACE):
            return obj
    import json

    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def loads_object(line: bytes) -> dict[str, Any]:
    """Parse one line as a JSON object (strict: UTF-8, no NaN, no duplicate keys)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(
            f"line is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON"
        ) from None
    try:
        obj = _loads(text)
    except ValueError as exc:
        # json.JSONDecodeError, or e.g. an integer of more digits than Python
        # converts (4300 by default)
        msg, colno = getattr(exc, "msg", None), getattr(exc, "colno", None)
        if msg is not None and colno is not None:
            raise MalformedJson(f"line is not valid JSON: {msg} at column {colno}") from None
        raise MalformedJson(f"line is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJson("line nests JSON too deeply") from None
    # JSON may spell a lone surrogate ("\\ud800"), which is no character:
    # refuse it here, before any of it becomes a name or a log line.  Only a
    # line with a \\u escape can hold one, so only such a line pays the check.
    if "\\u" in text:
        try:
            _dumps(obj).encode()
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


def dumps_line(message: Mapping[str, Any]) -> bytes:
    """A request or reply object as one wire line."""
    return _dumps(message).encode() + b"\n"


def decode_reply(line: bytes) -> dict[str, Any]:
    """A reply line -> its object, checked for the ``"ok"`` every reply has."""
    obj = loads_object(line)
    if not isinstance(obj.get("ok"), bool):
        raise MalformedJson('reply has no boolean "ok"')
    return obj
