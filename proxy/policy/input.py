"""The policy input document (version 1), built from a call: pure, credential-free."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from proxy.call import Call, RunCounters
from proxy.policy.refs import OPTIONAL_REQUEST_FIELDS

INPUT_VERSION = 1

CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)


@lru_cache(maxsize=4096)
def is_credential_header(name: str, tool_headers: frozenset[str], redact: tuple[str, ...]) -> bool:
    """Credentials by name; cached, as agents send the same few header names every call."""
    lowered = name.lower()
    return (
        lowered in CREDENTIAL_HEADERS
        or lowered in tool_headers
        or any(term.lower() in lowered for term in redact)
    )


def visible_headers(
    headers: list[tuple[str, str]], tool_headers: frozenset[str], redact: tuple[str, ...]
) -> dict[str, str]:
    """Lower-cased request headers, repeated ones joined; credentials never appear."""
    out: dict[str, str] = {}
    for name, value in headers:
        if is_credential_header(name, tool_headers, redact):
            continue
        lowered = name.lower()
        out[lowered] = f"{out[lowered]}, {value}" if lowered in out else value
    return out


def parsed_query(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Like opa-envoy's ``parsed_query``: every name maps to the list of its values."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


_last_second: list[tuple[int, str]] = [(-1, "")]


def rfc3339(seconds: float) -> str:
    """UTC to the second; formatted once per second, as every call in it shares the text."""
    whole = int(seconds)
    cached = _last_second[0]
    if cached[0] == whole:
        return cached[1]
    text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(whole))
    _last_second[0] = (whole, text)
    return text


def _content_type(headers: list[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "content-type":
            return value.strip()
    return None


@lru_cache(maxsize=256)
def _lowered_names(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


def policy_input(
    call: Call,
    counters: RunCounters,
    redact: tuple[str, ...],
    now: float | None = None,
    request_fields: frozenset[str] = OPTIONAL_REQUEST_FIELDS,
) -> dict[str, Any]:
    """The document for ``call``; ``request_fields``: which of the request's ``headers`` and
    ``query`` to include (the served policy's ``PolicyEngine.request_fields``)."""
    mcp = call.mcp
    request: dict[str, Any] = {"method": call.method, "path": call.path}
    if "query" in request_fields:
        request["query"] = parsed_query(call.query)
    if "headers" in request_fields:
        tool_headers = _lowered_names(tuple(call.tool.headers))
        request["headers"] = visible_headers(call.headers, tool_headers, redact)
    request["body"] = call.json_body
    # The raw body's facts beside the parsed one: what it was sent as, and how large.
    request["content_type"] = _content_type(call.headers)
    request["body_size"] = len(call.body)
    return {
        "version": INPUT_VERSION,
        "tool": {"name": call.tool_name, "kind": call.tool.kind},
        "request": request,
        "call": None
        if mcp is None
        # None (no listing could be had) stays null: policies must read unknown as riskiest.
        else {
            "name": mcp.name,
            "arguments": mcp.arguments,
            "annotations": mcp.annotations,
            "definition_changed": mcp.definition_changed,
        },
        "agent": {"id": call.agent_id},
        "run": {
            "id": call.run_id,
            "calls": counters.calls,
            "writes": counters.writes,
            "denied": counters.denied,
            "repeats": counters.repeats,
            "closed": counters.closed,
        },
        "idempotency_key": call.idempotency_key,
        "time": rfc3339(time.time() if now is None else now),
    }
