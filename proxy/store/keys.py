"""Idempotency keys and payload fingerprints: pure functions over a call's parts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAX_KEY_LENGTH = 255


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace, so key order and spacing never matter."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def canonical_payload(json_body: Any, raw_body: bytes) -> bytes:
    """The canonical JSON of a parsed body, else the raw bytes as sent."""
    if json_body is not None:
        try:
            return canonical_json(json_body)
        except ValueError:
            pass
    return raw_body


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def fingerprint_payload(
    tool: str,
    method: str,
    path: str,
    query: str,
    payload: bytes,
    *,
    agent: str = "",
    content_type: str = "",
) -> str:
    """What a key is bound to: the same key with another fingerprint is a reuse (422).

    The agent is part of it, so one agent's key never replays another agent's answer
    (their calls differ: 422), and so is the Content-Type, which changes what a body means.
    """
    return _digest(tool, method.upper(), path, query, payload, agent, content_type.lower())


def derive_key(agent_id: str, run_id: str, fingerprint: str) -> str:
    """``attach`` mode: a blind retry of the same call in the same run gets the same key."""
    return "hr-" + _digest(agent_id, run_id, fingerprint)[:40]


def parse_key_header(value: str) -> str:
    """Accept a plain token or the IETF draft's sf-string form (``"..."``); raise ValueError."""
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"must be 1 to {MAX_KEY_LENGTH} characters")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError("must be printable ASCII without spaces")
    return key
