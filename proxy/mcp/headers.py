"""MCP's routing headers (2026-07-28): ``Mcp-Method`` and ``Mcp-Name`` mirror the body so
routers need not parse it; the proxy decides on the body, so the two must agree. Pure."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from proxy.mcp.jsonrpc import Message

PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
MODERN_SINCE = "2026-07-28"
"""The first stateless revision: version and capabilities in each request's ``_meta``."""
DEFAULT_VERSION = "2025-03-26"
"""What a request without ``MCP-Protocol-Version`` speaks (the spec's own fallback)."""
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
"""Methods whose ``Mcp-Name`` header mirrors a body parameter, and which one."""
_B64_HEADER = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


def protocol_version(message: Message | None, headers: Mapping[str, str]) -> str:
    """The revision one request speaks: its ``_meta`` envelope's (2026-07-28 on), else the
    ``MCP-Protocol-Version`` header, else the spec's fallback. Chosen per request, as
    servers do, so every revision a current SDK speaks shares one endpoint."""
    meta = message.params.get("_meta") if message is not None else None
    version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
    if isinstance(version, str) and version:
        return version
    return headers.get("MCP-Protocol-Version") or DEFAULT_VERSION


def is_modern(version: str | None) -> bool:
    """2026-07-28 or later (revisions are dates, so they order as strings)."""
    return version is not None and version >= MODERN_SINCE


def decode_header_value(value: str | None) -> str | None:
    """``=?base64?...?=`` decoded (canonical base64, UTF-8), else the value; None if bad."""
    if value is None:
        return None
    match = _B64_HEADER.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def header_mismatch(message: Message, headers: Mapping[str, str]) -> str | None:
    """Why ``Mcp-Method`` / ``Mcp-Name`` / ``MCP-Protocol-Version`` disagree with the body,
    or None. A server or a router may act on the headers: the proxy decides on the body, so
    the two must say the same. Required under 2026-07-28 (the ``_meta`` envelope); checked
    whenever present otherwise."""
    meta = message.params.get("_meta")
    version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
    modern = version is not None
    method_header = headers.get("Mcp-Method")
    if modern:
        if headers.get("MCP-Protocol-Version") != version:
            return "the MCP-Protocol-Version header does not match params._meta's protocol version"
        if method_header is None:
            return "the Mcp-Method header is missing"
    if method_header is not None and method_header != message.method:
        return "the Mcp-Method header does not match the request body's method"
    key = NAME_PARAMS.get(message.method or "")
    name_header = headers.get("Mcp-Name")
    if key is not None and (modern or name_header is not None):
        body_value = message.params.get(key)
        if body_value is not None and decode_header_value(name_header) != body_value:
            return f"the Mcp-Name header does not match the request body's {key!r} parameter"
    return None
