"""The steps of one tool call, in order; nothing else.

    prepare_key -> decide -> claim_key -> hold -> forward -> check_result -> deliver
    finally: settle_key, record

A step ends the call by raising a ``HandrailError`` or by setting ``call.response``
(a replay); later steps look at ``call.response`` first. ``settle_key`` and ``record``
always run, so a deny is counted, journaled and traced like any other call.

The key's steps live in ``proxy.idempotency``, which also says how a key is settled; a call
the policy holds for a person waits in ``hold`` (``proxy.approvals.gate``) with its key
claimed, so its retries find the same request and the approval lets one execution through.
The store is asked for the key while the policy decides (``start_claim``): the two waits
overlap, which hides a PostgreSQL round trip, or the SQLite statement, behind the policy's
evaluation. Nothing is decided on the claim until the policy has allowed the call: a deny
or a policy failure wins over a replay, a 409 or a 422, as if the claim came second, and a
key claimed for a call that is then refused is released at once (a retry of that key in the
meantime gets the 409 of a call in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from proxy import results
from proxy.call import Call, DecisionKind, Outcome, UnknownReason
from proxy.deps import Deps
from proxy.errors import BadRequest, HandrailError, PolicyDenied
from proxy.idempotency import (
    claim_key,
    drop_claim,
    prepare_key,
    settle_key,
    settle_now,
    start_claim,
)
from proxy.policy.input import policy_input
from proxy.policy.shadow import WAIT_S as SHADOW_WAIT_S
from proxy.policy.shadow import shadow_record
from proxy.runs.ledger import classify
from proxy.tracing.attributes import (
    DECISION_CACHED,
    OPENINFERENCE_SPAN_KIND,
    SPAN_KIND_GUARDRAIL,
    final_status,
    record_span,
)
from proxy.tracing.tracer import Span as TracerSpan
from proxy.upstream import send_upstream

logger = logging.getLogger(__name__)

CONNECTED_POLL_S = 0.25
"""How often a call that ends when its agent leaves looks whether the agent is still there."""


async def run_to_the_end(call: Call, deps: Deps) -> None:
    """``run``, carried on when the agent's request is cancelled (a server that cancels the
    handlers of closed connections, a shutdown): a call that reached the tool still has its
    answer read and its key settled, so the retry is replayed instead of refused."""
    task = deps.background.keep(run(call, deps))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        _hold_until_recorded(call, task)
        raise


async def run_while_connected(call: Call, deps: Deps, connected: Callable[[], bool]) -> None:
    """``run``, cancelled when the agent leaves before the call's answer is in hand.

    MCP 2026-07-28: a client cancels a request by closing its stream, and the server stops
    the tool when it sees the close; so does Handrail, by closing its own request to the
    server. The key's outcome is then ``unknown`` (the tool may have done its work before
    the cancel reached it): a re-issued call gets 409 ``outcome_unknown``, never a second
    run. Once the answer is in hand (``call.delivered``) the call finishes and is kept.
    """
    task = deps.background.keep(run(call, deps))
    try:
        while not task.done() and not call.delivered:
            await asyncio.wait({task}, timeout=CONNECTED_POLL_S)
            if not task.done() and not call.delivered and not connected():
                _cancel(call, task)
                with contextlib.suppress(asyncio.CancelledError, HandrailError):
                    await task
                return
        await asyncio.shield(task)
    except asyncio.CancelledError:  # the server cancelled the handler: the agent has gone
        if not task.done() and not call.delivered:
            _cancel(call, task)
        _hold_until_recorded(call, task)
        raise


def _cancel(call: Call, task: asyncio.Task[None]) -> None:
    call.client_gone = True
    call.unknown_reason = UnknownReason.CANCELLED
    task.cancel()


def _hold_until_recorded(call: Call, task: asyncio.Task[None]) -> None:
    """The handler unwinds before the call is recorded: its span must not end unnamed."""
    if not task.done() and isinstance(call.span, TracerSpan):
        call.span.hold()


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
        await hold(call, deps)
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
        finally:
            # Journaled before the key is settled: a crash during the settle must not
            # leave an answered call looking interrupted.
            record_after_answer(call, deps)
            if not call.extra.get("settled_early"):  # else settled when the answer came
                await asyncio.shield(settle_key(call, deps))


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
        span.set_attribute(OPENINFERENCE_SPAN_KIND, SPAN_KIND_GUARDRAIL)
        started = time.perf_counter()
        call.counters = await deps.store.reserve_call(
            run_key(call), call.fingerprint, write=call.unsafe, run=call.run_id
        )
        try:
            document = policy_input(
                call,
                call.counters,
                deps.config.tracing.capture.redact,
                request_fields=deps.engine.request_fields,
            )
            call.extra["policy_input"] = document  # kept (redacted) for replay
            if deps.shadow is not None:  # candidates decide beside, never waited for here
                call.extra["shadow_task"] = deps.background.keep(deps.shadow.decide(document))
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
        # The guardrail's verdict as its output: what Phoenix shows in its table's column.
        span.set_attribute(
            "output.value",
            json.dumps({"decision": decision.kind.value, "reasons": list(decision.reasons)}),
        )
        span.set_attribute("output.mime_type", "application/json")
        span.set_attribute("handrail.policy.engine", deps.engine.name)
        if decision.decision_id:
            span.set_attribute("handrail.decision.id", decision.decision_id)
        if decision.cached:
            span.set_attribute(DECISION_CACHED, True)
            deps.metrics.policy_cache_hits.inc()
        if decision.kind is DecisionKind.DENY:
            await deps.store.refund_call(run_key(call), write=call.unsafe)
    if decision.kind is not DecisionKind.DENY:
        return  # allowed, or held: ``hold`` waits for a person once the key is claimed
    reasons = list(decision.reasons)
    raise PolicyDenied(
        "denied by policy: " + ("; ".join(reasons) if reasons else "no reason given"),
        reasons=reasons,
        decision_id=decision.decision_id,
    )


def run_key(call: Call) -> str:
    """A run's counters are the agent's own: another agent naming the same run id cannot
    spend its budget (nor see its counts)."""
    return f"{call.agent_id}\x1f{call.run_id}"


async def _refund_undecided(call: Call, deps: Deps) -> None:
    try:
        await deps.store.refund_call(run_key(call), write=call.unsafe)
    except HandrailError as exc:  # the call fails anyway: its own error is the answer
        logger.error(
            "could not count an undecided call as denied: %s",
            exc.message,
            extra={"tool": call.tool_name, "run_id": call.run_id, "trace_id": call.trace_id},
        )


async def hold(call: Call, deps: Deps) -> None:
    """A call the policy holds waits for a person (``proxy.approvals.gate``); a replay of
    an earlier execution needs no approval, it runs nothing."""
    if call.response is not None:
        return
    if call.mcp is not None and call.mcp.definition_changed:
        await deps.pinning.hold(call.tool_name, call.mcp.name)
    if call.decision is None or call.decision.kind is not DecisionKind.APPROVAL:
        return
    bound_id = None
    if (bound := call.extra.get("approval_bound")) is not None:
        bound_id, fingerprint = bound
        if fingerprint != call.fingerprint:
            raise BadRequest(
                "requestState names an approval given for other arguments: send the call "
                "again without it, for an approval of its own"
            )
    try:
        approval = await deps.approvals.hold(call, bound_id)
    except BaseException:
        await asyncio.shield(deps.store.refund_call(run_key(call), write=call.unsafe))
        raise
    call.extra["approval_id"] = approval.id


async def forward(call: Call, deps: Deps) -> None:
    """Send the call to the tool; the answer's body stays a stream."""
    if call.response is not None:
        return
    span = deps.tracer.start_span(call.method, kind=SpanKind.CLIENT)
    call.extra["upstream_span"] = span
    started = time.perf_counter()
    try:
        call.upstream = await send_upstream(deps.pools.session(call.tool_name), call, span)
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
    """The policy's ``result`` rule on the tool's answer (``proxy.results``)."""
    await results.check(call, deps)


async def deliver(call: Call, deps: Deps) -> None:
    if call.response is not None:
        call.status = call.response.status
        await call.reply.replay(call, call.response)
        return
    assert call.upstream is not None
    call.status = call.upstream.status
    call.on_answer = lambda: settle_now(call, deps)
    try:
        await call.reply.stream(call, call.upstream)
        results.restore_the_real_answer(call)
    finally:
        span = call.extra.pop("upstream_span", None)
        if span is not None:
            span.end()


def record_after_answer(call: Call, deps: Deps) -> None:
    """``record`` once the answer is on its way, as an access log is written: building the
    span's attributes and the journal row (redacting what is captured) then adds nothing to
    the call's latency. The call span is held open until then, with its end time kept."""
    span = call.span
    if not isinstance(span, TracerSpan) or not span.is_recording():
        record(call, deps)
        return
    span.hold()
    loop = asyncio.get_running_loop()
    shadow = call.extra.get("shadow_task")
    if shadow is None or shadow.done():
        loop.call_soon(_record_and_release, call, deps, span)
        return
    # The record waits for the shadow decision (the answer is already on its way).
    once: list[bool] = []

    def record_once(*_: object) -> None:
        if not once:
            once.append(True)
            _record_and_release(call, deps, span)

    shadow.add_done_callback(record_once)
    loop.call_later(SHADOW_WAIT_S, record_once)


def _record_and_release(call: Call, deps: Deps, span: TracerSpan) -> None:
    try:
        record(call, deps)
    finally:
        span.release()


def record(call: Call, deps: Deps) -> None:
    """Metrics, the span's attributes and the journal: a deny is recorded like any call."""
    call.timings.total_s = time.perf_counter() - call.timings.started
    status = final_status(call)
    decision = call.decision.kind.value if call.decision else "none"
    deps.metrics.calls.labels(call.tool_name, decision, str(status)).inc()
    deps.metrics.latency.labels(call.tool_name).observe(call.timings.total_s)
    if call.error is not None and not call.error.counted:
        deps.metrics.errors.labels(call.error.code).inc()
        call.error.counted = True
    if call.client_gone:
        deps.metrics.client_gone.labels(call.tool_name).inc()
    outcome = classify(
        error=call.error.code if call.error is not None else None,
        status=status,
        tool_error=bool(call.extra.get("tool_error")),
        failed=call.server_error,
        unknown=call.outcome is Outcome.UNKNOWN and call.claim is not None,
    )
    call.extra["outcome_class"] = outcome.value
    task = call.extra.pop("shadow_task", None)
    if task is not None:
        shadowed = shadow_record(call.decision, task)
        call.extra["shadow"] = shadowed
        if shadowed.get("change"):
            deps.metrics.shadow_differences.labels(call.tool_name, shadowed["change"]).inc()
        if call.span is not None and shadowed.get("decision"):
            call.span.set_attribute("handrail.shadow.decision", shadowed["decision"])
            if shadowed.get("change"):
                call.span.set_attribute("handrail.shadow.change", shadowed["change"])
    if call.span is not None:
        call.span.set_attribute("handrail.outcome", outcome.value)
        record_span(call, call.span, deps.config.tracing.capture)
    deps.journal.append(call)
