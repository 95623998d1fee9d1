"""Result checks: the policy's ``result`` rule, after the tool answered, before the agent sees
the answer (SPEC, "Result checks").

The rule reads the call's policy input plus ``response`` (``status``, credential-free
``headers``, ``body`` parsed as JSON; for MCP the ``tools/call`` result). Its verdict:

- ``allow`` with no ``redact``: the answer passes as it came (``passed``);
- ``redact``: the named body fields (dotted paths, ``*`` for every member or item) become
  ``"[REDACTED]"`` in what the agent gets (``redacted``);
- ``allow: false``: the agent gets 502 ``result_blocked`` with the reasons (MCP: an
  ``isError`` result), and nothing of the answer (``blocked``).

The tool's real answer is what the idempotency record keeps (a retry is checked again, so it
is blocked or redacted the same way and never runs the tool again), and what the journal and
the trace capture (redacted as every capture is). An answer that cannot be checked (an event
stream, not JSON, larger than the capture limit) passes marked ``unchecked``, unless the
tool says ``result_checks: required``, which blocks it. Without a ``result`` rule nothing is
read ahead or evaluated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from proxy.call import Call, Outcome
from proxy.deps import Deps
from proxy.errors import PolicyUnavailable, ResultBlocked
from proxy.ingress.request import tee
from proxy.mcp.inflight import settle_on_response
from proxy.policy.input import policy_input, visible_headers
from proxy.tracing.attributes import OPENINFERENCE_SPAN_KIND, SPAN_KIND_GUARDRAIL

REDACTED = "[REDACTED]"


def redact_fields(value: Any, paths: tuple[str, ...]) -> tuple[Any, int]:
    """``value`` with every field a dotted path names replaced: pure (copies what it changes)."""
    count = 0
    for path in paths:
        value, n = _redact(value, [p for p in path.split(".") if p])
        count += n
    return value, count


def _redact(value: Any, parts: list[str]) -> tuple[Any, int]:
    if not parts:
        return REDACTED, 1
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        keys = list(value) if head == "*" else [head] if head in value else []
        if not keys:
            return value, 0
        out, count = dict(value), 0
        for key in keys:
            out[key], n = _redact(value[key], rest)
            count += n
        return out, count
    if isinstance(value, list):
        if head == "*":
            indices = range(len(value))
        elif head.isdigit() and int(head) < len(value):
            indices = range(int(head), int(head) + 1)
        else:
            return value, 0
        items, count = list(value), 0
        for i in indices:
            items[i], n = _redact(value[i], rest)
            count += n
        return items, count
    return value, 0


async def check(call: Call, deps: Deps) -> None:
    """The pipeline's ``check_result`` step (see the module's docstring)."""
    if not deps.engine.has_result:
        return
    span = deps.tracer.start_span("handrail.result")
    span.set_attribute(OPENINFERENCE_SPAN_KIND, SPAN_KIND_GUARDRAIL)
    try:
        if call.response is not None:
            await _check_replay(call, deps)
        else:
            await _check_answer(call, deps)
    finally:
        outcome = str(call.extra.get("result_check"))
        reasons = tuple(call.extra.get("result_reasons") or ())
        for target in (span, call.span):
            if target is not None:
                target.set_attribute("handrail.result.check", outcome)
                if reasons:
                    target.set_attribute("handrail.result.reasons", reasons)
        verdict = {"result_check": outcome, "reasons": list(reasons)}
        span.set_attribute("output.value", json.dumps(verdict))
        span.set_attribute("output.mime_type", "application/json")
        span.end()


async def _check_replay(call: Call, deps: Deps) -> None:
    stored = call.response
    assert stored is not None
    shown = await _verdict(call, deps, stored.status, list(stored.headers), stored.body)
    if shown is not None:
        call.response = replace(stored, body=shown)


async def _check_answer(call: Call, deps: Deps) -> None:
    upstream = call.upstream
    assert upstream is not None
    limit = deps.config.tracing.capture.max_bytes
    content_type = _header(upstream.headers, "content-type").lower()
    if "event-stream" in content_type:
        _unchecked(call, "an event stream (it is sent as it arrives)")
        return
    body, rest = await _read_ahead(upstream.body, limit)
    if rest is not None:
        upstream.body = _chain(body, rest)
        _unchecked(call, f"larger than the capture limit ({limit} bytes)")
        return
    try:
        shown = await _verdict(call, deps, upstream.status, upstream.headers, body)
    except (ResultBlocked, PolicyUnavailable):  # withheld, or not checkable now: the tool ran
        _keep_the_real_answer(call, body)
        raise
    if shown is None:
        upstream.body = _once(body)
        return
    call.extra["real_body"] = body  # kept for the record; the agent gets ``shown``
    upstream.body, upstream.content_length = _once(shown), len(shown)


async def _verdict(
    call: Call, deps: Deps, status: int, headers: list[tuple[str, str]], body: bytes
) -> bytes | None:
    """Decide on the answer: ``None`` to pass it as it is, else the body the agent gets;
    raises ``ResultBlocked``."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        _unchecked(call, "not JSON")
        return None
    message = parsed if call.mcp is not None else None
    checked = message.get("result") if isinstance(message, dict) else parsed
    if call.mcp is not None and not isinstance(checked, dict):
        _unchecked(call, "not a tools/call result")
        return None
    document = policy_input(
        call,
        call.counters,
        deps.config.tracing.capture.redact,
        request_fields=deps.engine.request_fields,
    )
    document["response"] = {
        "status": status,
        "headers": visible_headers(
            headers,
            frozenset(h.lower() for h in call.tool.headers),
            deps.config.tracing.capture.redact,
        ),
        "body": checked,
    }
    verdict = await deps.engine.result(document)
    reasons = list(verdict.reasons)
    call.extra["result_reasons"] = reasons
    if not verdict.allow:
        call.extra["result_check"] = "blocked"
        raise ResultBlocked(
            "the tool's answer was withheld by policy: " + ("; ".join(reasons) or "no reason"),
            reasons=reasons or ["the policy withheld the answer"],
        )
    if not verdict.redact:
        call.extra["result_check"] = "passed"
        return None
    redacted, count = redact_fields(checked, tuple(verdict.redact))
    if not count:
        call.extra["result_check"] = "passed"
        return None
    call.extra["result_check"] = "redacted"
    if message is not None:
        redacted = _text_follows_structure(checked, redacted)
        return json.dumps({**message, "result": redacted}, ensure_ascii=False).encode()
    return json.dumps(redacted, ensure_ascii=False).encode()


def _text_follows_structure(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """An MCP result often repeats ``structuredContent`` as JSON text in ``content``: a field
    redacted in one must not be left readable in the other."""
    structured = before.get("structuredContent")
    content = after.get("content")
    if structured is None or not isinstance(content, list):
        return after
    items = []
    for item in content:
        if isinstance(item, dict) and item.get("type") == "text":
            try:
                same = json.loads(item.get("text", "")) == structured
            except (TypeError, ValueError):
                same = False
            if same:
                text = json.dumps(after.get("structuredContent"), ensure_ascii=False)
                item = {**item, "text": text}
        items.append(item)
    return {**after, "content": items}


def _unchecked(call: Call, why: str) -> None:
    call.extra["result_check"] = "unchecked"
    call.extra["result_reasons"] = [f"the answer could not be checked: {why}"]
    if call.tool.result_checks == "required":
        call.extra["result_check"] = "blocked"
        raise ResultBlocked(
            f"the tool's answer could not be checked ({why}) and tool {call.tool_name!r} "
            "requires result checks (result_checks: required)",
            reasons=[f"the answer could not be checked: {why}"],
        )


def _keep_the_real_answer(call: Call, body: bytes) -> None:
    """A blocked answer still happened: the record keeps it, so a retry is blocked again
    instead of running the tool a second time."""
    upstream = call.upstream
    assert upstream is not None
    call.status = upstream.status
    call.response_headers = list(upstream.headers)
    tee(call, body, max(call.tool.idempotency.max_stored_bytes, len(body)))
    call.delivered = True
    if call.mcp is not None:
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if isinstance(message, dict):
            settle_on_response(call, message)
            return
    call.outcome = Outcome.ANSWERED


def restore_the_real_answer(call: Call) -> None:
    """After a redacted answer went out: the record keeps what the tool really said."""
    real = call.extra.pop("real_body", None)
    if real is not None:
        call.captured_body = bytearray(real)
        call.body_overflow = len(real) > call.tool.idempotency.max_stored_bytes


async def _read_ahead(
    body: AsyncIterator[bytes], limit: int
) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """Up to ``limit`` bytes of the body; the rest of the stream if there is more."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), body
    return b"".join(chunks), None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


async def _chain(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")
