"""An approval request, and the signed tokens that point at one: pure.

A held call becomes an ``Approval`` bound to what it would do: the tool, the agent and the
call's payload fingerprint (method, path, canonical body; for MCP the tool's name and
arguments). A person approves or rejects it; an approved request lets exactly one execution
through (``used``), and only before it expires. A changed payload is another fingerprint,
so it needs an approval of its own. ``kind`` is ``call`` for a held call and
``tool_definition`` for an MCP tool whose definition changed since it was pinned.

Tokens (``sign`` / ``verify``) are HMAC-SHA256 over a small JSON document, URL-safe: the
MCP ``requestState`` that brings a 2026-07-28 client back to its approval, and the link in a
notification that opens the approval page without the admin token. Each carries its
purpose and expiry, so one cannot stand in for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class State(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    USED = "used"  # approved, and the one execution it allows has gone through
    EXPIRED = "expired"  # shown, never stored: an undecided or unused request past its time


class Kind(StrEnum):
    CALL = "call"
    TOOL_DEFINITION = "tool_definition"


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    kind: Kind
    tool: str
    agent: str
    run_id: str
    fingerprint: str
    input: dict[str, Any]
    """What the person decides on: the call's redacted input, or the old and new definition."""
    reasons: tuple[str, ...]
    state: State
    created: float
    expires: float
    idempotency_key: str | None = None
    trace_id: str | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    reason: str | None = None
    """The approver's reason (told to the agent on a rejection)."""
    used_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def shown_state(self, now: float | None = None) -> State:
        """The state a reader sees: an open request past its expiry reads ``expired``."""
        open_ = self.state in (State.PENDING, State.APPROVED)
        if open_ and self.expires <= (time.time() if now is None else now):
            return State.EXPIRED
        return self.state

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kind"] = self.kind.value
        doc["state"] = self.shown_state().value
        doc["reasons"] = list(self.reasons)
        return doc


def new_id() -> str:
    return "apr_" + secrets.token_hex(10)


# -- tokens ----------------------------------------------------------------------------

PREFIX = "hr1."
"""Marks a token Handrail signed (an MCP ``requestState`` of its own, not the server's)."""


class BadToken(ValueError):
    """A token that is not Handrail's, was altered, is for another purpose, or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, purpose: str, claims: dict[str, Any], ttl_s: float) -> str:
    body = json.dumps(
        {**claims, "p": purpose, "exp": int(time.time() + ttl_s)},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return PREFIX + _b64(body) + "." + _b64(mac)


def verify(key: bytes, purpose: str, token: str) -> dict[str, Any]:
    """The claims of a valid, unexpired token for ``purpose``; else ``BadToken``."""
    if not token.startswith(PREFIX):
        raise BadToken("not a Handrail token")
    try:
        body_text, mac_text = token[len(PREFIX) :].split(".", 1)
        body, mac = _unb64(body_text), _unb64(mac_text)
    except (ValueError, binascii.Error):
        raise BadToken("a malformed token") from None
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), mac):
        raise BadToken("a token whose signature does not match")
    claims = json.loads(body)
    if not isinstance(claims, dict) or claims.get("p") != purpose:
        raise BadToken("a token for another purpose")
    if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
        raise BadToken("an expired token")
    return claims


def is_ours(token: Any) -> bool:
    return isinstance(token, str) and token.startswith(PREFIX)
