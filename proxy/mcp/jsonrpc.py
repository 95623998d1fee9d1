"""JSON-RPC 2.0 and SSE for MCP Streamable HTTP: pure parsing, validation and rendering.

Nothing here does IO. ``parse_body`` turns a POST body into typed messages or raises a
``JsonRpcError`` (-32700 parse error, -32600 invalid request); ``SseParser`` splits a
``text/event-stream`` body into events incrementally, keeping each event's raw bytes so
untouched events pass through byte for byte; ``with_id`` re-renders a message under a new
id while copying every other member's bytes as they were.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.ingress.canonical import strict_loads

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
REQUEST_CANCELLED = -32800
"""The answer some servers give a request the client cancelled (its work may be done)."""
"""Implementation-defined server error: what the proxy's own refusals use."""

BATCH_PROTOCOL_VERSIONS = frozenset({"2024-11-05", "2025-03-26"})
"""Revisions whose Streamable HTTP/JSON-RPC allowed batches (2025-06-18 removed them)."""

RequestId = str | int


class MessageKind(StrEnum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Message:
    """One validated JSON-RPC message; ``payload`` is the object as parsed."""

    kind: MessageKind
    payload: dict[str, Any]
    method: str | None = None
    id: RequestId | None = None

    @property
    def params(self) -> dict[str, Any]:
        params = self.payload.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def is_request(self) -> bool:
        return self.kind is MessageKind.REQUEST

    @property
    def is_response(self) -> bool:
        return self.kind in (MessageKind.RESPONSE, MessageKind.ERROR)


@dataclass(frozen=True, slots=True)
class Body:
    """A POST body: one message, or a batch (a JSON array) of them."""

    messages: tuple[Message, ...]
    batch: bool

    @property
    def requests(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.is_request)


class JsonRpcError(Exception):
    """A message the proxy cannot accept; rendered as a JSON-RPC error with HTTP 400."""

    def __init__(self, code: int, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def payload(self) -> dict[str, Any]:
        return error_message(self.request_id, self.code, self.message)


def loads(data: bytes | str) -> Any:
    """Strict JSON (no NaN/Infinity, no duplicate members, bounded nesting): a message
    the proxy decides must read the same to the server; raises ValueError."""
    return strict_loads(data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_answer(data: bytes | str) -> Any:
    """A server's message: read as it is (no NaN/Infinity), to be rewritten or kept."""
    return json.loads(data, parse_constant=_reject_constant)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _valid_id(value: Any) -> bool:
    return (isinstance(value, str) or isinstance(value, int)) and not isinstance(value, bool)


def parse_message(obj: Any) -> Message:
    """Validate one JSON-RPC 2.0 object; raise ``JsonRpcError`` (-32600) when it is not one."""
    if not isinstance(obj, dict):
        raise JsonRpcError(INVALID_REQUEST, "a JSON-RPC message must be a JSON object")
    raw_id = obj.get("id")
    known_id = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        raise JsonRpcError(INVALID_REQUEST, 'a JSON-RPC message needs "jsonrpc": "2.0"', known_id)
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise JsonRpcError(INVALID_REQUEST, '"method" must be a non-empty string', known_id)
        if "params" in obj and not isinstance(obj["params"], dict):
            raise JsonRpcError(INVALID_REQUEST, '"params" must be an object in MCP', known_id)
        if "result" in obj or "error" in obj:
            raise JsonRpcError(INVALID_REQUEST, "a request cannot carry result or error", known_id)
        if "id" not in obj:
            return Message(MessageKind.NOTIFICATION, obj, method=method)
        if known_id is None:
            raise JsonRpcError(INVALID_REQUEST, '"id" must be a string or an integer')
        return Message(MessageKind.REQUEST, obj, method=method, id=known_id)
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error:
        raise JsonRpcError(
            INVALID_REQUEST,
            'a message needs "method", or exactly one of "result" and "error"',
            known_id,
        )
    if raw_id is not None and known_id is None:
        raise JsonRpcError(INVALID_REQUEST, '"id" must be a string, an integer or null')
    if has_error:
        error = obj["error"]
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("code"), int)
            or isinstance(error.get("code"), bool)
            or not isinstance(error.get("message"), str)
        ):
            raise JsonRpcError(
                INVALID_REQUEST,
                '"error" must be an object with an integer code and a message',
                known_id,
            )
        return Message(MessageKind.ERROR, obj, id=known_id)
    if known_id is None:
        raise JsonRpcError(INVALID_REQUEST, 'a result needs an "id"')
    return Message(MessageKind.RESPONSE, obj, id=known_id)


def parse_body(data: bytes) -> Body:
    """Parse a POST body: -32700 for anything that is not JSON, -32600 for a bad shape."""
    try:
        obj = loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonRpcError(PARSE_ERROR, f"parse error: {exc}") from None
    if isinstance(obj, list):
        if not obj:
            raise JsonRpcError(INVALID_REQUEST, "an empty batch is not a JSON-RPC message")
        return Body(tuple(parse_message(item) for item in obj), batch=True)
    return Body((parse_message(obj),), batch=False)


def batches_allowed(protocol_version: str | None) -> bool:
    """No ``MCP-Protocol-Version`` header means 2025-03-26, which still had batches."""
    return protocol_version is None or protocol_version in BATCH_PROTOCOL_VERSIONS


def error_message(
    request_id: RequestId | None, code: int, message: str, data: Any = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def result_message(request_id: RequestId | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


# -- raw member spans: re-render a message with a new id, other bytes untouched --------

_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def raw_members(text: str) -> list[tuple[str, str]]:
    """The members of a top-level JSON object as (key, raw value text), in order."""
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise ValueError("not a JSON object")
    pos = _skip(text, pos + 1)
    members: list[tuple[str, str]] = []
    if text.startswith("}", pos):
        return members
    while True:
        if not text.startswith('"', pos):
            raise ValueError("expected a member name")
        key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise ValueError("expected ':'")
        start = _skip(text, pos + 1)
        _, end = _DECODER.raw_decode(text, start)
        members.append((key, text[start:end]))
        pos = _skip(text, end)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
            continue
        if text.startswith("}", pos):
            if _skip(text, pos + 1) != len(text):
                raise ValueError("trailing data after the object")
            return members
        raise ValueError("expected ',' or '}'")


def with_id(message: bytes | str, new_id: RequestId | None) -> bytes:
    """The same JSON-RPC message under ``new_id``; every other member's bytes are kept."""
    text = message.decode() if isinstance(message, bytes) else message
    parts = []
    for key, raw in raw_members(text):
        value = json.dumps(new_id) if key == "id" else raw
        parts.append(json.dumps(key, ensure_ascii=False) + ":" + value)
    return ("{" + ",".join(parts) + "}").encode()


# -- Server-Sent Events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event; ``raw`` is its block as received, blank line included."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    raw: bytes = b""
    has_data: bool = True


class SseParser:
    """Incremental ``text/event-stream`` parser (WHATWG HTML, "event stream interpretation").

    ``feed`` takes chunks as they arrive and returns the events they complete; blocks that
    hold only comments come back too (with ``has_data`` false) so a proxy can pass them on.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._block = bytearray()
        self._lines: list[str] = []
        self._first = True

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        for raw_line, line in self._take_lines(final=False):
            self._block += raw_line
            if line:
                self._lines.append(line)
                continue
            events.append(self._dispatch())
        return events

    def close(self) -> list[SseEvent]:
        """The stream ended: an unterminated last block is dropped, as browsers do."""
        for raw_line, line in self._take_lines(final=True):
            self._block += raw_line
            if not line:
                return [self._dispatch()]
            self._lines.append(line)
        return []

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a dispatched event."""
        return bytes(self._block) + self._buffer

    def _take_lines(self, *, final: bool) -> Iterator[tuple[bytes, str]]:
        buf = self._buffer
        pos = 0
        while True:
            cr, lf = buf.find(b"\r", pos), buf.find(b"\n", pos)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if buf[end : end + 1] == b"\r":
                if end + 1 == len(buf) and not final:
                    break  # a "\r\n" may be split across chunks
                stop = end + 2 if buf[end + 1 : end + 2] == b"\n" else end + 1
            else:
                stop = end + 1
            raw = buf[pos:stop]
            text = buf[pos:end].decode("utf-8", errors="replace")
            if self._first:
                text = text.removeprefix("\ufeff")
                self._first = False
            pos = stop
            self._buffer = buf[pos:]
            yield raw, text
        self._buffer = buf[pos:]

    def _dispatch(self) -> SseEvent:
        data: list[str] = []
        event, event_id, retry = "message", None, None
        has_data = False
        for line in self._lines:
            if line.startswith(":"):
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
                has_data = True
            elif name == "event":
                event = value or "message"
            elif name == "id" and "\x00" not in value:
                event_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)
        raw = bytes(self._block)
        self._block = bytearray()
        self._lines = []
        return SseEvent("\n".join(data), event, event_id, retry, raw, has_data)


def render_event(data: str, *, event: str | None = "message", event_id: str | None = None) -> bytes:
    """One SSE event block; multi-line data becomes several ``data:`` lines."""
    lines: list[str] = []
    if event:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def event_message(event: SseEvent) -> Any:
    """The JSON an SSE ``message`` event carries, or ``None`` (priming events, other JSON)."""
    if not event.has_data or event.event != "message" or not event.data:
        return None
    try:
        return loads_answer(event.data)
    except ValueError:
        return None


def response_in(body: bytes, content_type: str, request_id: RequestId | None) -> bytes | None:
    """The raw JSON-RPC response to ``request_id`` in a JSON or SSE body, or ``None``."""
    if content_type.lower().startswith("text/event-stream"):
        parser = SseParser()
        events = parser.feed(body) + parser.close()
        for event in events:
            obj = event_message(event)
            if _answers(obj, request_id):
                return event.data.encode()
        return None
    try:
        obj = loads_answer(body)
    except ValueError:
        return None
    return body if _answers(obj, request_id) else None


def _answers(obj: Any, request_id: RequestId | None) -> bool:
    return (
        isinstance(obj, dict)
        and ("result" in obj or "error" in obj)
        and "method" not in obj
        and (request_id is None or obj.get("id") == request_id)
    )


HEADER_MISMATCH = -32020
"""2026-07-28: a routing header that disagrees with the body it travels with."""
MISSING_CLIENT_CAPABILITY = -32021
UNSUPPORTED_PROTOCOL_VERSION = -32022
URL_ELICITATION_REQUIRED = -32042
"""2025-11-25: the server wants the user at a URL before it serves the request."""

PROTOCOL_ERRORS = frozenset(
    {
        PARSE_ERROR,
        INVALID_REQUEST,
        METHOD_NOT_FOUND,
        INVALID_PARAMS,
        HEADER_MISMATCH,
        MISSING_CLIENT_CAPABILITY,
        UNSUPPORTED_PROTOCOL_VERSION,
        URL_ELICITATION_REQUIRED,
    }
)
"""JSON-RPC errors that refuse a request before it is served: a tools/call so answered did
not run its tool, so its key is released and the corrected call runs (Stripe keeps no
result for a request that failed validation)."""


class ResponseKind(StrEnum):
    """What a ``tools/call`` response says of the tool (how its key is settled)."""

    RESULT = "result"  # the tool ran: its result (``isError`` included) is the answer
    REFUSED = "refused"  # a protocol-level error: the tool did not run
    FAILED = "failed"  # a server error (internal, or -32000..-32099): like an HTTP 5xx
    INTERIM = "interim"  # 2026-07-28 ``input_required``: the call goes on in a retry
    CANCELLED = "cancelled"  # the request was cancelled: it may have done its work


def response_kind(obj: dict[str, Any]) -> ResponseKind:
    error = obj.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        if code == REQUEST_CANCELLED:
            return ResponseKind.CANCELLED
        return ResponseKind.REFUSED if code in PROTOCOL_ERRORS else ResponseKind.FAILED
    result = obj.get("result")
    if isinstance(result, dict) and result.get("resultType") == "input_required":
        return ResponseKind.INTERIM
    return ResponseKind.RESULT
