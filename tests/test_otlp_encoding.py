"""Handrail's own OTLP encoder writes exactly what the SDK's encoder writes.

Each case parses our bytes as an ``ExportTraceServiceRequest`` and compares the message
with the one the OpenTelemetry encoder builds for the same spans, field by field. Then a
real OTLP/HTTP round trip: the exporter Handrail builds posts those bytes to a local
aiohttp sink, which decodes them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from proxy.config import TracingConfig
from proxy.metrics import Metrics
from proxy.tracing.otlp_proto import WIRE, SpanEncoder, pre_encode
from proxy.tracing.setup import ExportProcessor, FastHttpSpanExporter, otlp_exporter


def _spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "handrail", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("proxy", "1.2.3", attributes={"scope.attr": "x"})
    other = TracerProvider(resource=Resource.create({"service.name": "other"}))
    other.add_span_processor(SimpleSpanProcessor(memory))
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "o")]),
    )
    parent = set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span(
        "execute_tool crm", context=parent, kind=SpanKind.SERVER
    ) as server:
        server.set_attributes(
            {
                "gen_ai.tool.name": "crm",
                "http.response.status_code": 200,
                "handrail.idempotency.replayed": False,
                "replayed.true": True,
                "negative": -42,
                "big": 2**62,
                "ratio": 0.25,
                "handrail.decision.reasons": ["a reason", "ünïcödé ✓"],
                "ints": [1, 2, 3],
                "long.text": "x" * 300,
                "empty": "",
            }
        )
        server.add_event("retry", {"attempt": 2})
        child = tracer.start_span(
            "handrail.policy", links=[Link(remote, {"link.attr": "y"})], kind=SpanKind.INTERNAL
        )
        child.set_status(Status(StatusCode.ERROR, "the policy engine is down"))
        child.end()
        client = tracer.start_span("POST", kind=SpanKind.CLIENT)
        client.set_status(Status(StatusCode.OK))
        client.end()
    other.get_tracer("other").start_span("bare").end()
    return list(memory.get_finished_spans())


def test_our_bytes_parse_to_the_sdk_encoders_message() -> None:
    spans = _spans()
    assert len(spans) == 4
    ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert ours == encode_spans(spans)
    assert len(ours.resource_spans) == 2  # grouped by resource, then scope


def test_encoder_cache_does_not_change_the_next_batch() -> None:
    encoder = SpanEncoder()
    spans = _spans()
    first = encoder.encode(spans)
    assert encoder.encode(spans) == first
    assert ExportTraceServiceRequest.FromString(encoder.encode(spans[:1])) == encode_spans(
        spans[:1]
    )


def test_spans_encoded_as_they_end_give_the_same_request() -> None:
    spans = _spans()
    whole = SpanEncoder().encode(spans)
    for span in spans[::2]:  # some encoded early, some in the batch
        pre_encode(span)
    assert SpanEncoder().encode(spans) == whole
    assert ExportTraceServiceRequest.FromString(whole) == encode_spans(spans)


def test_the_export_processor_encodes_spans_as_they_end(
    sink: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = sink
    exporter = otlp_exporter(TracingConfig(exporter="otlp", endpoint=url))
    processor = ExportProcessor(exporter, Metrics(), schedule_delay_millis=10_000)
    spans = _spans()
    for span in spans:
        processor.on_end(span)
        assert getattr(span, WIRE, None) is not None  # encoded on the ending thread
    processor.shutdown()
    assert received == [encode_spans(spans)]


def test_an_unencodable_value_is_refused() -> None:
    span = ReadableSpan(
        "x",
        context=SpanContext(1, 2, is_remote=False),
        attributes={"bad": object()},  # type: ignore[dict-item]
    )
    with pytest.raises(TypeError, match="cannot encode"):
        SpanEncoder().encode([span])


def test_ending_a_span_the_encoder_refuses_never_fails_the_caller(
    sink: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = sink
    metrics = Metrics()
    exporter = otlp_exporter(TracingConfig(exporter="otlp", endpoint=url))
    processor = ExportProcessor(exporter, metrics, schedule_delay_millis=10_000)
    bad = ReadableSpan(
        "x",
        context=SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(1)),
        attributes={"bad": object()},  # type: ignore[dict-item]
    )
    processor.on_end(bad)  # no exception here, on the call's path
    processor.shutdown()
    assert received == []
    assert metrics.export_dropped.labels("otlp")._value.get() == 1


@pytest.fixture
def sink() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_the_http_exporter_posts_our_encoding(
    sink: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = sink
    exporter = otlp_exporter(TracingConfig(exporter="otlp", endpoint=url))
    assert isinstance(exporter, FastHttpSpanExporter)
    # The fast path needs the SDK's HTTP client: if an SDK upgrade moves it, this fails.
    assert hasattr(exporter, "_client") and hasattr(exporter._client, "export")
    spans = _spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()  # type: ignore[no-untyped-call]
    assert received == [encode_spans(spans)]
