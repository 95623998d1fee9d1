"""Handrail's own tracer hands the SDK's processors the spans the SDK would."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from proxy.tracing.tracer import Tracer


def _setup(**kwargs: object) -> tuple[Tracer, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(**kwargs)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return Tracer(provider), memory


def test_children_of_a_remote_parent_form_one_trace() -> None:
    tracer, memory = _setup()
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span(
        "execute_tool crm",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
    ) as server:
        server.set_attributes({"tool.name": "crm", "reasons": ["a", "b"]})
        child = tracer.start_span("handrail.policy")
        child.set_attribute("handrail.decision", "allow")
        child.end()
        child.set_attribute("after.end", "ignored")
    finished = {s.name: s for s in memory.get_finished_spans()}
    call, policy = finished["execute_tool crm"], finished["handrail.policy"]
    assert call.context is not None and policy.context is not None
    assert call.parent == remote and call.kind is SpanKind.SERVER
    assert call.context.trace_id == policy.context.trace_id == 0xABC
    assert policy.parent == call.context
    assert dict(call.attributes or {}) == {"tool.name": "crm", "reasons": ("a", "b")}
    assert dict(policy.attributes or {}) == {"handrail.decision": "allow"}
    assert call.end_time is not None and call.start_time is not None
    assert call.end_time >= call.start_time


def test_the_providers_sampler_decides() -> None:
    tracer, memory = _setup(sampler=ALWAYS_OFF)
    with tracer.start_as_current_span("execute_tool crm") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid  # ids still exist for traceresponse
        tracer.start_span("child").end()
    assert memory.get_finished_spans() == ()
    tracer, memory = _setup(sampler=TraceIdRatioBased(1.0))
    tracer.start_span("root").end()
    assert [s.name for s in memory.get_finished_spans()] == ["root"]


def test_status_and_exceptions_as_the_sdk_records_them() -> None:
    tracer, memory = _setup()
    with pytest.raises(RuntimeError):
        with tracer.start_as_current_span("failing"):
            raise RuntimeError("the tool broke")
    ok = tracer.start_span("ok")
    ok.set_status(Status(StatusCode.OK))
    ok.set_status(Status(StatusCode.ERROR, "too late"))
    ok.end()
    failing, done = memory.get_finished_spans()
    assert failing.status.status_code is StatusCode.ERROR
    assert [e.name for e in failing.events] == ["exception"]
    assert failing.events[0].attributes["exception.message"] == "the tool broke"  # type: ignore[index]
    assert done.status.status_code is StatusCode.OK


def test_a_held_span_keeps_its_end_time_and_takes_attributes_until_released() -> None:
    tracer, memory = _setup()
    with tracer.start_as_current_span("execute_tool crm", kind=SpanKind.SERVER) as span:
        span.hold()  # type: ignore[attr-defined]
    assert memory.get_finished_spans() == ()  # ended, but held: no processor has it yet
    assert span.is_recording()
    span.set_attribute("handrail.decision", "allow")
    span.release()  # type: ignore[attr-defined]
    span.set_attribute("after.release", "ignored")
    (finished,) = memory.get_finished_spans()
    assert dict(finished.attributes or {}) == {"handrail.decision": "allow"}
    assert span.end_time is not None  # type: ignore[attr-defined]
    assert finished.end_time == span.end_time  # type: ignore[attr-defined]


def test_releasing_a_held_span_that_was_never_ended_ends_it_now() -> None:
    tracer, memory = _setup()
    span = tracer.start_span("handrail.policy")
    span.hold()  # type: ignore[attr-defined]
    span.release()  # type: ignore[attr-defined]
    (finished,) = memory.get_finished_spans()
    assert finished.end_time is not None and finished.start_time is not None
    assert finished.end_time >= finished.start_time
