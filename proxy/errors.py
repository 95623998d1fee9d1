"""Every exception Handrail raises, each naming its contract status and code.

    HandrailError                      (500 internal_error)
    ├── ConfigError                    bad handrail.yaml or environment (CLI exit 2)
    ├── BadRequest                     400 bad_request
    ├── IdempotencyKeyMissing          400 idempotency_key_missing
    ├── OriginNotAllowed               403 origin_not_allowed
    ├── PolicyDenied                   403 policy_denied
    ├── ApprovalPending                403 approval_pending
    ├── UnknownTool                    404 unknown_tool
    ├── RequestTimeout                 408 request_timeout
    ├── IdempotencyKeyInUse            409 idempotency_key_in_use
    ├── OutcomeUnknown                 409 outcome_unknown
    ├── PayloadTooLarge                413 payload_too_large
    ├── MisdirectedRequest             421 misdirected_request
    ├── IdempotencyKeyReused           422 idempotency_key_reused
    ├── TooManyStreams                 429 too_many_streams
    ├── ResponseNotReplayable          409 response_not_replayable
    ├── UpstreamUnavailable            502 upstream_unavailable
    ├── ResultBlocked                  502 result_blocked
    ├── PolicyUnavailable              503 policy_unavailable
    ├── StoreUnavailable               503 store_unavailable
    └── UpstreamTimeout                504 upstream_timeout

Foreign errors are translated where they arise (``map_exceptions``-style), so the HTTP
middleware and the MCP renderer only ever see these.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HandrailError(Exception):
    """Base class; ``status`` and ``code`` are the contract's error status and code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details
        self.counted = False
        """Already counted in ``handrail_errors_total`` (by the pipeline's ``record``)."""

    def body(self, trace_id: str | None) -> dict[str, Any]:
        """The SPEC's error body: ``{"error": {"code", "message", "trace_id", ...}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message, "trace_id": trace_id}
        error.update(self.details)
        return {"error": error}


class ConfigError(HandrailError):
    code = "config_error"


class BadRequest(HandrailError):
    status, code = 400, "bad_request"


class IdempotencyKeyMissing(HandrailError):
    status, code = 400, "idempotency_key_missing"


class OriginNotAllowed(HandrailError):
    """A browser page from another site is calling (DNS rebinding, cross-site requests)."""

    status, code = 403, "origin_not_allowed"


class MisdirectedRequest(HandrailError):
    """The Host is not one this proxy answers to (DNS rebinding)."""

    status, code = 421, "misdirected_request"


class PolicyDenied(HandrailError):
    status, code = 403, "policy_denied"


class ApprovalPending(HandrailError):
    status, code = 403, "approval_pending"


class UnknownTool(HandrailError):
    status, code = 404, "unknown_tool"


class RequestTimeout(HandrailError):
    """The agent did not send its request's body in time."""

    status, code = 408, "request_timeout"


class IdempotencyKeyInUse(HandrailError):
    status, code = 409, "idempotency_key_in_use"


class OutcomeUnknown(HandrailError):
    """The key's earlier call may have run and its outcome was lost: it is not run again."""

    status, code = 409, "outcome_unknown"


class ResponseNotReplayable(HandrailError):
    """The original call ran, but its response was too large to keep for replay."""

    status, code = 409, "response_not_replayable"


class PayloadTooLarge(HandrailError):
    status, code = 413, "payload_too_large"


class IdempotencyKeyReused(HandrailError):
    status, code = 422, "idempotency_key_reused"


class TooManyStreams(HandrailError):
    """An agent holds as many event streams to a tool as it may."""

    status, code = 429, "too_many_streams"


class UpstreamUnavailable(HandrailError):
    status, code = 502, "upstream_unavailable"


class ResultBlocked(HandrailError):
    status, code = 502, "result_blocked"


class PolicyUnavailable(HandrailError):
    status, code = 503, "policy_unavailable"


class StoreUnavailable(HandrailError):
    status, code = 503, "store_unavailable"


class UpstreamTimeout(HandrailError):
    status, code = 504, "upstream_timeout"
