"""The steps of one tool call, in order; nothing else.

    prepare_key -> decide -> claim_key -> forward -> check_result -> deliver
    finally: settle_key, record

A step ends the call by raising a ``HandrailError`` or by setting ``call.response``
(a replay); later steps look at ``call.response`` first. ``settle_key`` and ``record``
always run, so a deny is counted, journaled and traced like any other call.

The store is asked for the key while the policy decides (``start_claim``): the two waits
overlap, which hides a PostgreSQL round trip, or the SQLite statement, behind the policy's
evaluation. Nothing is decided on the claim until the policy has allowed the call: a deny
or a policy failure wins over a replay, a 409 or a 422, as if the claim came second, and a
key claimed for a call that is then refused is released at once (a retry of that key in the
meantime gets the 409 of a call in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from proxy.call import Call, Claim, ClaimState, DecisionKind, StoredResponse
from proxy.deps import Deps
from proxy.errors import (
    HandrailError,
    IdempotencyKeyInUse,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    PolicyDenied,
    ResponseNotReplayable,
)
from proxy.policy.input import policy_input
from proxy.store.keys import canonical_json, canonical_payload, derive_key, fingerprint_payload
from proxy.tracing.attributes import DECISION_CACHED, record_span
from proxy.tracing.tracer import Span as TracerSpan
from proxy.upstream import send_upstream

logger = logging.getLogger(__name__)

REPLAYED_HEADERS_DROP = frozenset({"date", "server", "content-length", "transfer-encoding"})


async def run(call: Call, deps: Deps) -> None:
    try:
        prepare_key(call)
        claiming = start_claim(call, deps)
        try:
            await decide(call, deps)
        except BaseException:
            if claiming is not None:
                await asyncio.shield(drop_claim(claiming, call, deps))
            raise
        await claim_key(call, deps, claiming)
        await forward(call, deps)
        await check_result(call, deps)
        await deliver(call, deps)
    except HandrailError as exc:
        call.error = exc
        raise
    finally:
        try:
            if call.upstream is not None:
                call.upstream.release()
            await asyncio.shield(settle_key(call, deps))
        finally:
            record_after_answer(call, deps)


def prepare_key(call: Call) -> None:
    """Fingerprint the payload; take, derive or demand the idempotency key."""
    if call.mcp is not None:
        payload = canonical_json({"name": call.mcp.name, "arguments": call.mcp.arguments})
    else:
        payload = canonical_payload(call.json_body, call.body)
    call.fingerprint = fingerprint_payload(
        call.tool_name, call.method, call.path, call.query_string, payload
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


@contextmanager
def child_span(deps: Deps, name: str) -> Iterator[Span]:
    """A child of the call's span that is never made current: cheaper than a context switch."""
    span = deps.tracer.start_span(name)
    try:
        yield span
    except HandrailError as exc:
        span.set_status(Status(StatusCode.ERROR, exc.message))
        span.set_attribute("error.type", exc.code)
        raise
    finally:
        span.end()


async def decide(call: Call, deps: Deps) -> None:
    """Count the call against its run, ask the policy; a deny or a hold ends the call.

    The call is counted (a write reserved) before the policy sees the counts, in one step
    with reading them: calls sent in parallel cannot all pass a budget's last write. A call
    the policy refuses, or cannot decide, gets its write back and is counted as denied.
    """
    assert call.fingerprint is not None
    with child_span(deps, "handrail.policy") as span:
        started = time.perf_counter()
        call.counters = await deps.store.reserve_call(
            call.run_id, call.fingerprint, write=call.unsafe
        )
        try:
            document = policy_input(
                call,
                call.counters,
                deps.config.tracing.capture.redact,
                request_fields=deps.engine.request_fields,
            )
            decision = await deps.engine.decide(document)
        except BaseException:
            await asyncio.shield(_refund_undecided(call, deps))
            raise
        finally:
            call.timings.policy_s = time.perf_counter() - started
            deps.metrics.policy_latency.observe(call.timings.policy_s)
        call.decision = decision
        deps.journal.begin(call)
        span.set_attribute("handrail.decision", decision.kind.value)
        span.set_attribute("handrail.policy.engine", deps.engine.name)
        if decision.decision_id:
            span.set_attribute("handrail.decision.id", decision.decision_id)
        if decision.cached:
            span.set_attribute(DECISION_CACHED, True)
            deps.metrics.policy_cache_hits.inc()
        if decision.kind is not DecisionKind.ALLOW:
            await deps.store.refund_call(call.run_id, write=call.unsafe)
    if decision.kind is DecisionKind.ALLOW:
        return
    reasons = list(decision.reasons)
    if decision.kind is DecisionKind.APPROVAL:
        # Human approval lands in a later release: until then a hold is refused (fail closed).
        reasons = reasons or ["the policy requires human approval"]
        raise PolicyDenied(
            "held for human approval, which this proxy does not offer yet: " + "; ".join(reasons),
            reasons=reasons,
            decision_id=decision.decision_id,
            require_approval=True,
        )
    raise PolicyDenied(
        "denied by policy: " + ("; ".join(reasons) if reasons else "no reason given"),
        reasons=reasons,
        decision_id=decision.decision_id,
    )


async def _refund_undecided(call: Call, deps: Deps) -> None:
    try:
        await deps.store.refund_call(call.run_id, write=call.unsafe)
    except HandrailError as exc:  # the call fails anyway: its own error is the answer
        logger.error(
            "could not count an undecided call as denied: %s",
            exc.message,
            extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
        )


class Claiming:
    """The store's answer for the call's key, on its way while the policy decides."""

    def __init__(self, task: asyncio.Task[Claim], span: Span) -> None:
        self.task = task
        self.span = span


def start_claim(call: Call, deps: Deps) -> Claiming | None:
    """Ask the store for the key now; ``claim_key`` or ``drop_claim`` settles the answer."""
    key = call.idempotency_key
    if key is None:
        return None
    assert call.fingerprint is not None
    idem = call.tool.idempotency
    span = deps.tracer.start_span("handrail.idempotency")
    span.set_attribute("handrail.idempotency.key", key)
    task = asyncio.ensure_future(
        deps.store.claim(
            call.tool_name,
            key,
            call.fingerprint,
            lease_s=call.tool.timeout_s + idem.lease_margin_s,
            ttl_s=idem.ttl_s,
        )
    )
    return Claiming(task, span)


async def drop_claim(claiming: Claiming, call: Call, deps: Deps) -> None:
    """The call was refused before it could use its key: free a key it claimed."""
    span = claiming.span
    try:
        claim = await claiming.task
    except BaseException as exc:  # the call already failed: its own error is the answer
        span.set_attribute("handrail.idempotency.state", "not_claimed")
        if isinstance(exc, HandrailError):
            span.set_attribute("error.type", exc.code)
        span.end()
        return
    state = claim.state.value
    if claim.state is ClaimState.OWNED:
        state = "released"
        try:
            await deps.store.release(call.tool_name, call.idempotency_key or "", claim.owner)
        except HandrailError as exc:
            # The record stays in flight until its lease runs out: a retry gets 409 meanwhile.
            logger.error(
                "could not release the key of a refused call: %s",
                exc.message,
                extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
            )
    span.set_attribute("handrail.idempotency.state", state)
    span.end()


async def claim_key(call: Call, deps: Deps, claiming: Claiming | None) -> None:
    """Act on the key's claim: run the tool, replay, 409 in flight, 422 reused."""
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
        span.end()
        raise
    call.claim = claim
    span.set_attribute("handrail.idempotency.state", claim.state.value)
    span.end()
    if claim.state is ClaimState.OWNED:
        return
    if claim.state is ClaimState.IN_FLIGHT:
        raise IdempotencyKeyInUse(f"a call with Idempotency-Key {key!r} is still in flight")
    if claim.state is ClaimState.MISMATCH:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used with a different payload"
        )
    stored = claim.response
    if stored is None or not stored.complete:
        raise ResponseNotReplayable(
            f"the call with Idempotency-Key {key!r} already ran, but its response was too "
            "large to keep for replay; it will not run again",
            original_status=stored.status if stored else None,
        )
    call.response = stored
    call.replayed = True
    deps.metrics.replays.labels(call.tool_name).inc()


async def forward(call: Call, deps: Deps) -> None:
    """Send the call to the tool; the answer's body stays a stream."""
    if call.response is not None:
        return
    span = deps.tracer.start_span(call.method, kind=SpanKind.CLIENT)
    call.extra["upstream_span"] = span
    started = time.perf_counter()
    try:
        call.upstream = await send_upstream(deps.session, call, span)
    except HandrailError as exc:
        span.set_status(Status(StatusCode.ERROR, exc.message))
        span.set_attribute("error.type", exc.code)
        span.end()
        call.extra.pop("upstream_span", None)
        raise
    finally:
        call.timings.upstream_s = time.perf_counter() - started
    span.set_attribute("http.response.status_code", call.upstream.status)
    if call.upstream.status >= 500:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(call.upstream.status))


async def check_result(call: Call, deps: Deps) -> None:
    """The place for the policy's ``result`` rule (a later release): passes everything now."""


async def deliver(call: Call, deps: Deps) -> None:
    if call.response is not None:
        call.status = call.response.status
        await call.reply.replay(call, call.response)
        return
    assert call.upstream is not None
    call.status = call.upstream.status
    try:
        await call.reply.stream(call, call.upstream)
    finally:
        span = call.extra.pop("upstream_span", None)
        if span is not None:
            span.end()


def _replay_headers(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() not in REPLAYED_HEADERS_DROP)


async def settle_key(call: Call, deps: Deps) -> None:
    """Keep 2xx/4xx answers for replay; release the key after 5xx or a transport failure."""
    claim = call.claim
    if claim is None or claim.state is not ClaimState.OWNED or call.idempotency_key is None:
        return
    key = call.idempotency_key
    try:
        if call.status is not None and call.status < 500:
            # The tool answered: even if the stream then broke, it ran. Keep the record so a
            # retry never runs it twice; a body we could not keep whole is not replayable.
            complete = (
                call.delivered
                and not call.body_overflow
                and len(call.captured_body) <= call.tool.idempotency.max_stored_bytes
            )
            stored = StoredResponse(
                status=call.status,
                headers=_replay_headers(call.response_headers),
                body=bytes(call.captured_body) if complete else b"",
                complete=complete,
            )
            await deps.store.complete(call.tool_name, key, claim.owner, stored)
        else:
            await deps.store.release(call.tool_name, key, claim.owner)
    except HandrailError as exc:
        logger.error(
            "could not settle idempotency key: %s",
            exc.message,
            extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
        )


def record_after_answer(call: Call, deps: Deps) -> None:
    """``record`` once the answer is on its way, as an access log is written: building the
    span's attributes and the journal row (redacting what is captured) then adds nothing to
    the call's latency. The call span is held open until then, with its end time kept."""
    span = call.span
    if not isinstance(span, TracerSpan) or not span.is_recording():
        record(call, deps)
        return
    span.hold()
    asyncio.get_running_loop().call_soon(_record_and_release, call, deps, span)


def _record_and_release(call: Call, deps: Deps, span: TracerSpan) -> None:
    try:
        record(call, deps)
    finally:
        span.release()


def record(call: Call, deps: Deps) -> None:
    """Metrics, the span's attributes and the journal: a deny is recorded like any call."""
    call.timings.total_s = time.perf_counter() - call.timings.started
    status = call.status if call.error is None else call.error.status
    decision = call.decision.kind.value if call.decision else "none"
    deps.metrics.calls.labels(call.tool_name, decision, str(status)).inc()
    deps.metrics.latency.labels(call.tool_name).observe(call.timings.total_s)
    if call.error is not None:
        deps.metrics.errors.labels(call.error.code).inc()
    if call.span is not None:
        record_span(call, call.span, deps.config.tracing.capture)
    deps.journal.append(call)
