"""The idempotency key's life in one call: taken or derived, claimed while the policy
decides, acted on (run, replay, 409, 422), and settled truthfully once the call ends.

Settling follows what the proxy knows (``Call.outcome``), never what it hopes:

- the tool's whole answer was read: it is kept and replayed (a 5xx the tool answered
  itself frees the key, per ``release_on_5xx``), whether or not the agent was still there;
- the tool cannot have run it (connect refused, an MCP protocol refusal, an interim MCP
  ``input_required``): the key is freed so the retry runs;
- it may have run and its answer is lost (timeout or broken connection after the request
  was sent, an MCP stream that ended without the response, the proxy stopped mid-call):
  the key becomes ``unknown`` and retries get 409 ``outcome_unknown`` until an operator
  resolves it, or, where the tool deduplicates the key itself, the retry re-sends it.

A settle the store refuses is retried in the background (``SETTLE_DELAYS_S``); while it is
retried the key stays in flight (409), and if every attempt fails the lease runs out and
the key reads as ``unknown``: never free, so never run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import Span, Status, StatusCode

from proxy.call import (
    Call,
    Claim,
    ClaimState,
    Outcome,
    StoredResponse,
    UnknownReason,
)
from proxy.config import ToolConfig
from proxy.deps import Deps
from proxy.errors import (
    HandrailError,
    IdempotencyKeyInUse,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    OutcomeUnknown,
    ResponseNotReplayable,
)
from proxy.store.keys import canonical_json, canonical_payload, derive_key, fingerprint_payload
from proxy.store.sealed import is_sealed, seal, unseal
from proxy.tracing.attributes import OPENINFERENCE_SPAN_KIND, SPAN_KIND_CHAIN

logger = logging.getLogger(__name__)

_PLAIN = ToolConfig(upstream="http://127.0.0.1")
"""Settings of a tool no longer configured (a late settle after a reload): not sensitive."""
REPLAYED_HEADERS_DROP = frozenset({"date", "server", "content-length", "transfer-encoding"})
SETTLE_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits before each new attempt at a settle the store refused (about 16 s in all)."""

UNKNOWN_WHY = {
    UnknownReason.LEASE_EXPIRED: "the proxy handling it stopped, or lost its store, mid-call",
    UnknownReason.TIMEOUT: "the tool did not answer in time after the request was sent",
    UnknownReason.CONNECTION_LOST: "the connection to the tool broke after the request was sent",
    UnknownReason.ANSWER_BROKEN: "the tool's answer broke off before its end",
    UnknownReason.NO_RESPONSE: "the MCP server's stream ended without the call's response",
    UnknownReason.CANCELLED: "the MCP client cancelled it while the tool had it",
    UnknownReason.INTERRUPTED: "the proxy was interrupted while the tool had it",
}


def prepare_key(call: Call) -> None:
    """Fingerprint the payload; take, derive or demand the idempotency key."""
    content_type = ""
    if call.mcp is not None:
        payload = canonical_json({"name": call.mcp.name, "arguments": call.mcp.arguments})
    else:
        payload = canonical_payload(call.json_body, call.body)
        content_type = next((v for k, v in call.headers if k.lower() == "content-type"), "")
    call.fingerprint = fingerprint_payload(
        call.tool_name,
        call.method,
        call.path,
        call.query_string,
        payload,
        agent=call.agent_id,
        content_type=content_type.strip(),
    )
    mode = call.tool.idempotency.mode
    if mode == "off" or not call.unsafe or _exempt_read_only(call):
        call.idempotency_key = None
        return
    if call.idempotency_key is None:
        if mode == "enforce":
            raise IdempotencyKeyMissing(
                f"tool {call.tool_name!r} requires an Idempotency-Key header on {call.method}"
            )
        call.idempotency_key = derive_key(call.agent_id, call.run_id, call.fingerprint)
        call.key_derived = True


def _exempt_read_only(call: Call) -> bool:
    if call.mcp is None or not call.tool.idempotency.exempt_read_only:
        return False
    return bool((call.mcp.annotations or {}).get("readOnlyHint"))


def lease_s(call: Call) -> float:
    return call.tool.timeout_s + call.tool.idempotency.lease_margin_s


class Claiming:
    """The store's answer for the call's key, on its way while the policy decides."""

    def __init__(self, task: asyncio.Task[Claim], span: Span, owner: str) -> None:
        self.task = task
        self.span = span
        self.owner = owner


def start_claim(call: Call, deps: Deps) -> Claiming | None:
    """Ask the store for the key now; ``claim_key`` or ``drop_claim`` settles the answer."""
    key = call.idempotency_key
    if key is None:
        return None
    assert call.fingerprint is not None
    idem = call.tool.idempotency
    span = deps.tracer.start_span("handrail.idempotency")
    span.set_attribute(OPENINFERENCE_SPAN_KIND, SPAN_KIND_CHAIN)
    span.set_attribute("handrail.idempotency.key", key)
    owner = uuid.uuid4().hex
    task = asyncio.ensure_future(
        deps.store.claim(
            call.tool_name,
            key,
            call.fingerprint,
            lease_s=lease_s(call),
            ttl_s=idem.ttl_s,
            takeover=idem.upstream_dedupes,
            owner=owner,
        )
    )
    return Claiming(task, span, owner)


async def drop_claim(claiming: Claiming, call: Call, deps: Deps) -> None:
    """The call was refused before it could use its key: free a key it claimed."""
    span = claiming.span
    try:
        claim = await claiming.task
    except BaseException as exc:  # the call already failed: its own error is the answer
        span.set_attribute("handrail.idempotency.state", "not_claimed")
        if isinstance(exc, HandrailError):
            span.set_attribute("error.type", exc.code)
            _release_lost_claim(claiming, call, deps)
        span.end()
        return
    state = claim.state.value
    if claim.state is ClaimState.OWNED:
        state = "released"
        settle = Settlement("release")
        await _settle_or_retry(call, deps, claim.owner, settle)
    span.set_attribute("handrail.idempotency.state", state)
    span.end()


def _release_lost_claim(claiming: Claiming, call: Call, deps: Deps) -> None:
    """The store failed the claim, yet its insert may have landed (an answer lost on the way):
    free it in the background, so a tool that never ran is not left ``unknown``."""
    if call.idempotency_key is not None:
        deps.background.spawn(
            _settle_later(
                call.tool_name,
                call.idempotency_key,
                claiming.owner,
                deps,
                Settlement("release"),
                call.trace_id,
            )
        )


async def claim_key(call: Call, deps: Deps, claiming: Claiming | None) -> None:
    """Act on the key's claim: run the tool, replay, 409 in flight or unknown, 422 reused."""
    if claiming is None:
        return
    key = call.idempotency_key
    span = claiming.span
    try:
        claim = await claiming.task
    except BaseException as exc:
        if isinstance(exc, HandrailError):
            span.set_status(Status(StatusCode.ERROR, exc.message))
            span.set_attribute("error.type", exc.code)
            _release_lost_claim(claiming, call, deps)
        span.end()
        raise
    call.claim = claim
    span.set_attribute("handrail.idempotency.state", claim.state.value)
    if claim.resent:
        span.set_attribute("handrail.idempotency.resent", True)
    span.end()
    if claim.state is ClaimState.OWNED:
        call.on_progress = _lease_keeper(call, deps, claim.owner)
        return
    if claim.state is ClaimState.IN_FLIGHT:
        raise IdempotencyKeyInUse(f"a call with Idempotency-Key {key!r} is still in flight")
    if claim.state is ClaimState.MISMATCH:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used for another call (a different "
            "payload, Content-Type or agent): send a new key for a new call"
        )
    if claim.state is ClaimState.UNKNOWN:
        reason = UnknownReason(claim.reason or UnknownReason.LEASE_EXPIRED)
        raise OutcomeUnknown(
            f"the earlier call with Idempotency-Key {key!r} may have run, but its outcome was "
            f"not recorded ({UNKNOWN_WHY[reason]}); it will not run again until it is "
            f"resolved: `handrail keys resolve {call.tool_name} {key} --failed` lets the "
            "retry run, `--answer FILE` replays a known answer",
            idempotency_key=key,
            tool=call.tool_name,
            reason=reason.value,
        )
    stored = claim.response
    if stored is not None and is_sealed(stored):
        stored = unseal(stored, deps.config.store.encryption_key, call.tool_name, key or "")
    if stored is None or not stored.complete:
        raise ResponseNotReplayable(
            f"the call with Idempotency-Key {key!r} already ran, but its response was too "
            "large to keep for replay; it will not run again",
            original_status=stored.status if stored else None,
        )
    call.response = stored
    call.replayed = True
    deps.metrics.replays.labels(call.tool_name).inc()


def _lease_keeper(call: Call, deps: Deps, owner: str) -> Callable[[], None]:
    """While the tool's answer makes progress (MCP events), keep the key's lease alive."""
    lease = lease_s(call)
    last = time.monotonic()
    key = call.idempotency_key or ""

    def touch() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < lease / 3:
            return
        last = now
        deps.background.spawn(_extend(call.tool_name, key, owner, lease, deps))

    return touch


async def _extend(tool: str, key: str, owner: str, lease: float, deps: Deps) -> None:
    try:
        await deps.store.extend(tool, key, owner, lease)
    except HandrailError as exc:
        logger.warning("could not extend the lease of key %r: %s", key, exc.message)


# -- settling -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the key's record becomes: ``complete`` (with ``response``), ``release``, or
    ``unknown`` (with ``reason``)."""

    action: str
    response: StoredResponse | None = None
    reason: UnknownReason | None = None
    keep_s: float | None = None
    """How long a completed record replays (a derived key's window), else its ``ttl_s``."""


def settlement(call: Call) -> Settlement:
    """The truthful settlement of an owned key, from what the call knows: pure."""
    outcome = call.outcome
    if outcome is None:  # the call stopped before anything said what became of it
        outcome = Outcome.UNKNOWN if call.sent else Outcome.NOT_RUN
    idem = call.tool.idempotency
    if outcome in (Outcome.NOT_RUN, Outcome.INTERIM):
        return Settlement("release")
    failed = (call.status is not None and call.status >= 500) or call.server_error
    if failed and idem.release_on_5xx:
        return Settlement("release")  # the tool said it failed (even if its answer broke off)
    if outcome is Outcome.UNKNOWN:
        return Settlement("unknown", reason=call.unknown_reason or UnknownReason.INTERRUPTED)
    assert call.status is not None
    complete = not call.body_overflow and len(call.captured_body) <= idem.max_stored_bytes
    return Settlement(
        "complete",
        response=StoredResponse(
            status=call.status,
            headers=tuple(
                (k, v) for k, v in call.response_headers if k.lower() not in REPLAYED_HEADERS_DROP
            ),
            body=bytes(call.captured_body) if complete else b"",
            complete=complete,
        ),
        keep_s=idem.derived_ttl_s if call.key_derived else None,
    )


def settle_now(call: Call, deps: Deps) -> None:
    """The answer is in hand while its stream goes on: settle the key now (in the
    background), so the agent's next call, sent as soon as it read the answer, finds the
    record complete instead of a call still in flight."""
    if not call.extra.get("settled_early"):
        call.extra["settled_early"] = True  # the pipeline's end leaves it be
        deps.background.spawn(settle_key(call, deps))


async def settle_key(call: Call, deps: Deps) -> None:
    """Settle an owned key as ``settlement`` says; a refused settle is retried later."""
    claim = call.claim
    if claim is None or claim.state is not ClaimState.OWNED or call.idempotency_key is None:
        return
    settle = settlement(call)
    if settle.reason is not None:
        deps.metrics.unknown_outcomes.labels(call.tool_name, settle.reason.value).inc()
        logger.warning(
            "the outcome of a keyed call is unknown (%s): retries get 409 outcome_unknown",
            settle.reason.value,
            extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
        )
    await _settle_or_retry(call, deps, claim.owner, settle)


async def _settle_or_retry(call: Call, deps: Deps, owner: str, settle: Settlement) -> None:
    key = call.idempotency_key or ""
    try:
        await _apply(deps, call.tool_name, key, owner, settle)
    except HandrailError as exc:
        deps.metrics.settle_retries.inc()
        logger.error(
            "could not settle idempotency key %r (%s), retrying in the background: %s",
            key,
            settle.action,
            exc.message,
            extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
        )
        deps.background.spawn(
            _settle_later(call.tool_name, key, owner, deps, settle, call.trace_id)
        )


async def _apply(deps: Deps, tool: str, key: str, owner: str, settle: Settlement) -> None:
    if settle.action == "complete":
        assert settle.response is not None
        response = settle.response
        secret = deps.config.store.encryption_key
        if secret is not None and deps.config.tools.get(tool, _PLAIN).sensitive:
            response = seal(response, secret, tool, key)
        await deps.store.complete(tool, key, owner, response, keep_s=settle.keep_s)
    elif settle.action == "release":
        await deps.store.release(tool, key, owner)
    else:
        assert settle.reason is not None
        await deps.store.mark_unknown(tool, key, owner, settle.reason.value)


async def _settle_later(
    tool: str, key: str, owner: str, deps: Deps, settle: Settlement, trace_id: str
) -> None:
    for delay in SETTLE_DELAYS_S:
        await asyncio.sleep(delay)
        try:
            await _apply(deps, tool, key, owner, settle)
        except HandrailError:
            deps.metrics.settle_retries.inc()
            continue
        logger.info("settled idempotency key %r (%s) after a retry", key, settle.action)
        return
    deps.metrics.unknown_outcomes.labels(tool, "store_unavailable").inc()
    logger.error(
        "gave up settling idempotency key %r (%s): it reads as unknown once its lease runs "
        "out (resolve it with `handrail keys resolve`)",
        key,
        settle.action,
        extra={"tool": tool, "trace_id": trace_id},
    )
