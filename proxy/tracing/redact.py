"""Redaction and truncation of captured inputs and outputs: pure functions."""

from __future__ import annotations

import json
from typing import Any

REDACTED = "[REDACTED]"


def redact(value: Any, keys: frozenset[str]) -> Any:
    """Replace the value of every key named in ``keys`` (case-insensitive), at any depth."""
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in keys else redact(v, keys) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, keys) for v in value]
    return value


def truncate(text: str, max_bytes: int) -> str:
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode(errors="ignore") + f"...[truncated {len(data) - max_bytes} bytes]"


def capture_json(value: Any, keys: frozenset[str], max_bytes: int) -> str:
    return truncate(json.dumps(redact(value, keys), ensure_ascii=False, default=str), max_bytes)


def capture_body(body: bytes, keys: frozenset[str], max_bytes: int) -> str:
    """A body for a span or the journal: redacted JSON when it parses, else the text."""
    if not body:
        return ""
    try:
        return capture_json(json.loads(body), keys, max_bytes)
    except ValueError:
        return truncate(body[: max_bytes + 1].decode(errors="replace"), max_bytes)
