"""What a key's record means to a claim: pure, shared by every store backend.

A record is ``in_flight`` (a proxy has the call at the tool, under a lease), ``completed``
(its answer is kept for replay) or ``unknown`` (the call may have run and its outcome was
lost: the proxy died mid-call, the tool timed out after the request was sent, the answer
could not be recorded). A retry never runs an ``unknown`` call again unless the tool
deduplicates ``Idempotency-Key`` itself (``takeover``) or an operator resolves it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from proxy.call import Claim, ClaimState, StoredResponse, UnknownReason


class Next(Enum):
    """The claim cannot be answered from this reading."""

    RETRY = "retry"  # changed under us (released, expired, taken over): claim again
    MARK_STALE = "mark_stale"  # an in-flight record whose lease ran out: its owner is gone


@dataclass(frozen=True, slots=True)
class Record:
    """A record as the claim reads it; ``lease_over`` and ``expired`` by the store's clock."""

    fingerprint: str
    state: str
    owner: str
    lease_over: bool
    expired: bool
    status: int | None = None
    headers: str | None = None
    body: bytes | None = None
    complete: bool | None = None
    reason: str | None = None


def read_claim(record: Record | None, fingerprint: str, owner: str, takeover: bool) -> Claim | Next:
    """The claim's answer from the record its insert could not take over."""
    if record is None:
        return Next.RETRY
    if record.state == "in_flight" and record.owner == owner:
        # Our own earlier attempt of this very claim reached the store; its answer did not.
        return Claim(ClaimState.OWNED, owner=owner)
    if record.expired and (record.state != "in_flight" or record.lease_over):
        return Next.RETRY  # the insert takes an expired record over
    if record.fingerprint != fingerprint:
        return Claim(ClaimState.MISMATCH)
    stale = record.state == "unknown" or (record.state == "in_flight" and record.lease_over)
    if stale and takeover:
        return Next.RETRY  # the insert takes it over (the tool deduplicates the key itself)
    if record.state == "in_flight":
        return Next.MARK_STALE if record.lease_over else Claim(ClaimState.IN_FLIGHT)
    if record.state == "unknown":
        return Claim(ClaimState.UNKNOWN, reason=record.reason or UnknownReason.LEASE_EXPIRED)
    return Claim(
        ClaimState.COMPLETED,
        response=StoredResponse(
            status=int(record.status or 0),
            headers=decode_headers(record.headers),
            body=bytes(record.body or b""),
            complete=bool(record.complete),
        ),
    )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A record as an operator sees it (``GET /keys/{tool}/{key}``, ``handrail keys``)."""

    tool: str
    key: str
    state: str
    reason: str | None
    attempts: int
    created_at: float
    expires_at: float
    status: int | None

    def as_dict(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "key": self.key,
            "state": self.state,
            "reason": self.reason,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "status": self.status,
        }


def encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    return json.dumps([[k, v] for k, v in headers], separators=(",", ":"))


def decode_headers(raw: str | None) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(raw or "[]"))


def parse_answer(document: object) -> StoredResponse:
    """An operator's answer for an unknown key: ``{"status": 201, "headers": {...} or
    [[name, value], ...], "body": "text"}`` (or ``"body_base64"``). Raises ValueError."""

    if not isinstance(document, dict):
        raise ValueError("the answer must be a JSON object with status, headers and body")
    unknown = set(document) - {"status", "headers", "body", "body_base64"}
    if unknown:
        raise ValueError(f"unknown answer field(s): {', '.join(sorted(unknown))}")
    status = document.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("answer.status must be an HTTP status code (100-599)")
    raw_headers = document.get("headers", {})
    if isinstance(raw_headers, dict):
        pairs = list(raw_headers.items())
    elif isinstance(raw_headers, list) and all(
        isinstance(p, list) and len(p) == 2 for p in raw_headers
    ):
        pairs = [(p[0], p[1]) for p in raw_headers]
    else:
        raise ValueError("answer.headers must be an object or a list of [name, value] pairs")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
        raise ValueError("answer.headers names and values must be strings")
    if "body" in document and "body_base64" in document:
        raise ValueError("give answer.body or answer.body_base64, not both")
    if "body_base64" in document:
        try:
            body = base64.b64decode(str(document["body_base64"]), validate=True)
        except ValueError as exc:
            raise ValueError(f"answer.body_base64 is not base64: {exc}") from None
    else:
        text = document.get("body", "")
        if not isinstance(text, str):
            raise ValueError("answer.body must be a string (or use body_base64)")
        body = text.encode()
    return StoredResponse(status=status, headers=tuple(pairs), body=body)


def resolution(document: object) -> StoredResponse | None:
    """``{"failed": true}`` -> None (free the key); ``{"answer": {...}}`` -> that answer."""
    if isinstance(document, dict) and set(document) == {"failed"} and document["failed"] is True:
        return None
    if isinstance(document, dict) and set(document) == {"answer"}:
        return parse_answer(document["answer"])
    raise ValueError('give {"failed": true} or {"answer": {"status", "headers", "body"}}')
