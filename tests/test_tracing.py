"""Traces: redaction and truncation, the call span's attributes, the SDK wiring and OTLP export."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.call import Call, Decision, McpCall, StoredResponse
from proxy.config import CaptureConfig, ToolConfig, TracingConfig
from proxy.errors import PolicyDenied, UpstreamTimeout, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.tracing import tracer_provider_from_config
from proxy.tracing.attributes import call_attributes, record_span, span_name
from proxy.tracing.redact import REDACTED, Redactor, capture_body, capture_json, truncate
from proxy.tracing.setup import ExportProcessor, http_traces_endpoint, otlp_exporter
from tests.conftest import ProxyFactory

KEYS = ("authorization", "password", "token", "secret", "api_key")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def redactor(*secrets: str) -> Redactor:
    return Redactor.build(KEYS, secrets)


def dropped(metrics: Metrics, sink: str) -> float:
    value = metrics.registry.get_sample_value("handrail_trace_export_dropped_total", {"sink": sink})
    return value or 0.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _NoReply:
    async def replay(self, call: Call, stored: StoredResponse) -> None: ...

    async def stream(self, call: Call, upstream: Any) -> None: ...

    def error_status(self, exc: Any) -> int:
        return int(exc.status)


def make_call(**fields: Any) -> Call:
    tool = fields.pop("tool", ToolConfig(upstream="http://127.0.0.1:9"))
    call = Call(
        tool_name=fields.pop("tool_name", "crm"),
        tool=tool,
        method=fields.pop("method", "POST"),
        path=fields.pop("path", "/contacts/42"),
        query=[],
        query_string=fields.pop("query_string", ""),
        headers=[],
        body=fields.pop("body", b'{"name": "Ada"}'),
        agent_id=fields.pop("agent_id", "sales-bot"),
        run_id=fields.pop("run_id", "r-17"),
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        reply=_NoReply(),
    )
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def finished_span(call: Call, capture: CaptureConfig | None = None) -> ReadableSpan:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("test").start_span("execute_tool crm", kind=SpanKind.SERVER)
    record_span(call, span, capture or CaptureConfig())
    span.end()
    (finished,) = exporter.get_finished_spans()
    return finished


# -- redaction and truncation (pure) ----------------------------------------------------------


def test_secret_keys_are_redacted_at_any_depth_whatever_their_case() -> None:
    value = {"user": "ada", "PassWord": "p1", "nested": [{"auth": {"API_KEY": "k", "Token": 3}}]}
    out = json.loads(capture_json(value, redactor(), 10_000))
    assert out == {
        "user": "ada",
        "PassWord": REDACTED,
        "nested": [{"auth": {"API_KEY": REDACTED, "Token": REDACTED}}],
    }


@pytest.mark.parametrize(
    "key", ["accessToken", "refresh_token", "X-Api-Key", "apikey", "client_secret", "db-password"]
)
def test_keys_containing_a_secret_word_are_redacted(key: str) -> None:
    assert redactor().is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["max_tokens", "user", "tokenizer", "secretary_name", "passwords_seen"]
)
def test_keys_that_merely_resemble_a_secret_word_are_kept(key: str) -> None:
    assert not redactor().is_secret_key(key)


def test_configured_tool_credentials_are_scrubbed_even_when_echoed() -> None:
    body = json.dumps(
        {"got": {"headers": {"X-Auth": "Bearer tool-s3cret-value"}, "note": "tool-s3cret-value"}}
    )
    out = capture_body(body.encode(), redactor("Bearer tool-s3cret-value"), 10_000)
    assert "tool-s3cret-value" not in out
    assert out.count(REDACTED) == 2


def test_json_cut_off_at_the_limit_is_still_redacted() -> None:
    out = capture_body(b'{"user": "ada", "password": "hunter2-and-mo', redactor(), 10_000)
    assert "hunter2" not in out
    assert '"user": "ada"' in out


@pytest.mark.parametrize("cut", [None, -5, "hunter2"])
def test_json_inside_a_json_string_is_redacted_whole_or_cut(cut: int | str | None) -> None:
    inner = json.dumps({"user": "ada", "password": "hunter2"})
    outer = json.dumps({"content": [{"type": "text", "text": inner}], "x": "y"})
    end = outer.index(cut) + 3 if isinstance(cut, str) else cut
    out = capture_body(outer[:end].encode(), redactor(), 10_000)
    assert "hun" not in out and REDACTED in out


def test_form_and_event_stream_bodies_are_redacted() -> None:
    form = capture_body(b"user=ada&password=hunter2&x=1", redactor(), 10_000)
    sse = capture_body(
        b'event: message\ndata: {"jsonrpc":"2.0","token":"abc123"}\n\n', redactor(), 10_000
    )
    assert form == f"user=ada&password={REDACTED}&x=1"
    assert "abc123" not in sse and REDACTED in sse


def test_capture_is_truncated_to_max_bytes_on_a_character_boundary() -> None:
    text = "é" * 1000  # 2 bytes each
    out = truncate(text, 101)
    assert len(out.encode()) <= 101
    assert out.startswith("é") and out.endswith("bytes]")
    assert "truncated" in out
    assert truncate("short", 100) == "short"


def test_a_huge_body_is_cut_without_parsing_and_still_scrubbed() -> None:
    body = b'{"password": "hunter2", "blob": "' + b"x" * 500_000 + b'"}'
    started = time.perf_counter()
    out = capture_body(body, redactor(), 1024)
    assert time.perf_counter() - started < 0.05
    assert len(out.encode()) <= 1024
    assert "hunter2" not in out
    assert out.endswith("bytes]") and "truncated" in out


def test_binary_bodies_are_described_not_captured() -> None:
    assert capture_body(b"\x00\x01\x02\xff" * 10, redactor(), 100) == "[40 bytes of binary data]"


# -- the call span's attributes ---------------------------------------------------------------


def test_allowed_call_span_has_the_contract_attributes() -> None:
    call = make_call(
        decision=Decision(allow=True, decision_id="d-1"),
        idempotency_key="k-1",
        status=201,
        captured_body=bytearray(b'{"id": 42, "token": "t"}'),
        body=b'{"name": "Ada", "password": "hunter2"}',
    )
    span = finished_span(call)
    attrs = dict(span.attributes or {})
    assert span.name == "execute_tool crm"
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == attrs["tool.name"] == "crm"
    assert attrs["gen_ai.tool.call.id"] == "k-1"
    assert attrs["gen_ai.agent.id"] == "sales-bot"
    assert attrs["openinference.span.kind"] == "TOOL"
    assert attrs["session.id"] == "r-17"
    assert attrs["handrail.decision"] == "allow"
    assert attrs["handrail.decision.id"] == "d-1"
    assert attrs["handrail.idempotency.key"] == "k-1"
    assert attrs["handrail.idempotency.replayed"] is False
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == 201
    assert json.loads(str(attrs["input.value"])) == {"name": "Ada", "password": REDACTED}
    assert json.loads(str(attrs["output.value"])) == {"id": 42, "token": REDACTED}
    assert attrs["input.mime_type"] == "application/json"
    assert span.status.status_code is StatusCode.UNSET


def test_denied_call_is_a_decision_with_reasons_not_an_error() -> None:
    decision = Decision(
        allow=False, reasons=("amount over limit", "after hours"), decision_id="d-9"
    )
    error = PolicyDenied("denied by policy", reasons=list(decision.reasons), decision_id="d-9")
    span = finished_span(make_call(decision=decision, error=error))
    attrs = dict(span.attributes or {})
    assert attrs["handrail.decision"] == "deny"
    assert list(attrs["handrail.decision.reasons"]) == ["amount over limit", "after hours"]  # type: ignore[arg-type]
    assert attrs["http.response.status_code"] == 403
    assert "error.type" not in attrs
    assert span.status.status_code is StatusCode.UNSET
    assert "amount over limit" in str(attrs["output.value"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamTimeout("too slow"), "upstream_timeout"),
        (UpstreamUnavailable("refused"), "upstream_unavailable"),
    ],
)
def test_upstream_failures_set_error_status_and_type(error: Exception, code: str) -> None:
    span = finished_span(make_call(decision=Decision(allow=True), error=error))
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == code


def test_a_tools_own_5xx_is_an_error_too() -> None:
    span = finished_span(make_call(decision=Decision(allow=True), status=503))
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "503"


def test_mcp_call_span_has_mcp_attributes_and_call_name() -> None:
    mcp = McpCall(
        name="get_weather",
        arguments={"city": "Oslo", "api_key": "k"},
        annotations=None,
        request_id=7,
        session_id="sess-1",
    )
    call = make_call(mcp=mcp, decision=Decision(allow=True), status=200)
    span = finished_span(call)
    attrs = dict(span.attributes or {})
    assert span.name == "execute_tool crm.get_weather"
    assert attrs["gen_ai.tool.name"] == "get_weather"
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["mcp.session.id"] == "sess-1"
    assert attrs["jsonrpc.request.id"] == "7"
    assert attrs["gen_ai.tool.call.id"] == "7"
    assert json.loads(str(attrs["input.value"])) == {"city": "Oslo", "api_key": REDACTED}


def test_capture_can_be_switched_off() -> None:
    call = make_call(decision=Decision(allow=True), status=200, captured_body=bytearray(b"{}"))
    attrs = call_attributes(call, CaptureConfig(arguments=False, results=False))
    assert "input.value" not in attrs and "output.value" not in attrs


def test_span_name_for_plain_http_is_the_tool() -> None:
    assert span_name(make_call()) == "execute_tool crm"


# -- the SDK wiring ---------------------------------------------------------------------------


def test_resource_names_the_service_and_the_phoenix_project() -> None:
    provider = tracer_provider_from_config(
        TracingConfig(service_name="billing-proxy", project_name="agents"), Metrics()
    )
    attrs = provider.resource.attributes
    assert attrs["service.name"] == "billing-proxy"
    assert attrs["openinference.project.name"] == "agents"


def test_otel_service_name_applies_when_the_config_sets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    attrs = tracer_provider_from_config(TracingConfig(), Metrics()).resource.attributes
    assert attrs["service.name"] == "from-env"
    assert attrs["openinference.project.name"] == "from-env"


def test_exporter_none_still_gives_real_trace_ids() -> None:
    provider = tracer_provider_from_config(TracingConfig(exporter="none"), Metrics())
    with provider.get_tracer("t").start_as_current_span("x") as span:
        assert span.get_span_context().trace_id != 0
        assert span.is_recording()
    provider.shutdown()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:6006/", "http://127.0.0.1:6006/v1/traces"),
        ("http://collector:4318/custom/v1/traces", "http://collector:4318/custom/v1/traces"),
    ],
)
def test_http_endpoint_base_url_gets_the_traces_path(endpoint: str, expected: str) -> None:
    assert http_traces_endpoint(endpoint) == expected


def test_unset_endpoint_leaves_the_otel_variables_in_charge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://10.1.2.3:4318")
    exporter = otlp_exporter(TracingConfig(exporter="otlp"))
    assert exporter._endpoint == "http://10.1.2.3:4318/v1/traces"  # type: ignore[attr-defined]
    exporter.shutdown()


def test_grpc_protocol_builds_the_grpc_exporter() -> None:
    exporter = otlp_exporter(
        TracingConfig(exporter="otlp", protocol="grpc", endpoint="http://127.0.0.1:4317")
    )
    assert "grpc" in type(exporter).__module__
    exporter.shutdown()


@pytest.fixture
def dead_endpoint_provider() -> Iterator[tuple[TracerProvider, Metrics]]:
    metrics = Metrics()
    config = TracingConfig(exporter="otlp", endpoint=f"http://127.0.0.1:{closed_port()}")
    provider = tracer_provider_from_config(config, metrics)
    yield provider, metrics
    provider.shutdown()


def test_dead_otlp_endpoint_never_slows_span_creation(
    dead_endpoint_provider: tuple[TracerProvider, Metrics],
) -> None:
    provider, _ = dead_endpoint_provider
    tracer = provider.get_tracer("t")
    started = time.perf_counter()
    for i in range(200):
        with tracer.start_as_current_span(f"execute_tool t{i}") as span:
            span.set_attribute("n", i)
    assert time.perf_counter() - started < 0.5


def test_dead_otlp_endpoint_shutdown_is_bounded_and_drops_are_counted(
    dead_endpoint_provider: tuple[TracerProvider, Metrics],
) -> None:
    provider, metrics = dead_endpoint_provider
    tracer = provider.get_tracer("t")
    for i in range(200):
        tracer.start_span(f"s{i}").end()
    started = time.perf_counter()
    provider.shutdown()
    assert time.perf_counter() - started < 5.0
    assert dropped(metrics, "otlp") == 200


def test_dropped_spans_are_warned_about_once_not_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    exporter = otlp_exporter(
        TracingConfig(exporter="otlp", endpoint=f"http://127.0.0.1:{closed_port()}")
    )
    processor = ExportProcessor(
        exporter,
        metrics,
        max_export_batch_size=5,
        schedule_delay_millis=10_000,
        shutdown_budget_s=0.3,
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    with caplog.at_level(logging.WARNING, logger="proxy.tracing.setup"):
        for i in range(50):
            provider.get_tracer("t").start_span(f"s{i}").end()
        provider.shutdown()
    warnings = [r for r in caplog.records if r.name == "proxy.tracing.setup"]
    assert dropped(metrics, "otlp") == 50
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "dropped" in warnings[0].getMessage()


def test_a_full_export_queue_drops_and_counts_every_span() -> None:
    metrics = Metrics()
    exporter = otlp_exporter(
        TracingConfig(exporter="otlp", endpoint=f"http://127.0.0.1:{closed_port()}")
    )
    processor = ExportProcessor(
        exporter,
        metrics,
        max_queue_size=20,
        max_export_batch_size=10,
        schedule_delay_millis=50,
        shutdown_budget_s=0.5,
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for i in range(100):
        tracer.start_span(f"s{i}").end()
    assert dropped(metrics, "otlp") >= 60  # the queue holds 20, a batch or two is in flight
    provider.shutdown()
    # Every span is counted; one may be counted twice: the queue's fill is read while the
    # export thread takes a batch, so a span that just found room can be counted as pushed
    # out, and then again when its export fails.
    assert 100 <= dropped(metrics, "otlp") <= 101


async def test_live_otlp_endpoint_receives_the_spans(aiohttp_server: Any) -> None:
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(content_type="application/x-protobuf", body=b"")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(app)
    metrics = Metrics()
    config = TracingConfig(exporter="otlp", endpoint=str(server.make_url("/")), project_name="p1")
    provider = tracer_provider_from_config(config, metrics)
    provider.get_tracer("t").start_span("execute_tool crm").end()
    await asyncio.to_thread(provider.force_flush)
    await asyncio.to_thread(provider.shutdown)
    spans = [
        s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    assert [s.name for s in spans] == ["execute_tool crm"]
    resource = {
        a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes
    }
    assert resource["openinference.project.name"] == "p1"
    assert dropped(metrics, "otlp") == 0


# -- through the real proxy ---------------------------------------------------------------------


def _crm(server: Any, **extra: Any) -> dict[str, Any]:
    return {"crm": {"upstream": str(server.make_url("/api")), **extra}}


def _by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans.get_finished_spans()}


async def test_proxy_call_span_is_a_child_of_the_agents_traceparent(
    tool: Any, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, _ = tool
    proxy = await make_proxy(_crm(server))
    resp = await proxy.post(
        "/tools/crm/contacts",
        json={"name": "Ada"},
        headers={"traceparent": TRACEPARENT, "X-Agent-Id": "sales-bot", "X-Run-Id": "r-1"},
    )
    assert resp.status == 200
    found = _by_name(spans)
    call = found["execute_tool crm"]
    assert call.kind is SpanKind.SERVER
    assert format(call.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert call.parent is not None and format(call.parent.span_id, "016x") == "b7ad6b7169203331"
    children = [
        s
        for s in spans.get_finished_spans()
        if s.parent and s.parent.span_id == call.context.span_id
    ]
    assert {s.name for s in children} >= {"handrail.policy", "handrail.idempotency", "POST"}
    assert resp.headers["traceresponse"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    attrs = dict(call.attributes or {})
    assert attrs["session.id"] == "r-1" and attrs["gen_ai.agent.id"] == "sales-bot"
    assert attrs["handrail.decision"] == "allow"


async def test_proxy_denied_call_span_shows_the_deny_and_reasons(
    tool: Any, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, seen = tool
    proxy = await make_proxy(_crm(server))
    resp = await proxy.delete("/tools/crm/contacts/1", headers={"X-Run-Id": "r-2"})
    assert resp.status == 403
    call = _by_name(spans)["execute_tool crm"]
    attrs = dict(call.attributes or {})
    assert attrs["handrail.decision"] == "deny"
    assert list(attrs["handrail.decision.reasons"]) == ["deletes are not allowed here"]  # type: ignore[arg-type]
    assert call.status.status_code is StatusCode.UNSET
    assert seen.count() == 0


async def test_proxy_replayed_call_span_says_replayed(
    tool: Any, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, seen = tool
    proxy = await make_proxy(_crm(server))
    for _ in range(2):
        resp = await proxy.post(
            "/tools/crm/orders", json={"sku": "a"}, headers={"Idempotency-Key": "order-1"}
        )
        assert resp.status == 200
    calls = [s for s in spans.get_finished_spans() if s.name == "execute_tool crm"]
    assert [(s.attributes or {})["handrail.idempotency.replayed"] for s in calls] == [False, True]
    assert all((s.attributes or {})["handrail.idempotency.key"] == "order-1" for s in calls)
    assert seen.count() == 1


async def test_proxy_unreachable_tool_marks_the_span_as_error(
    make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    proxy = await make_proxy({"crm": {"upstream": f"http://127.0.0.1:{closed_port()}"}})
    resp = await proxy.get("/tools/crm/x")
    assert resp.status == 502
    call = _by_name(spans)["execute_tool crm"]
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["error.type"] == "upstream_unavailable"


async def test_proxy_spans_never_hold_passwords_or_tool_credentials(
    tool: Any, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, seen = tool
    proxy = await make_proxy(_crm(server, headers={"Authorization": "Bearer tool-cred-123456"}))
    resp = await proxy.post("/tools/crm/login", json={"user": "ada", "password": "hunter2"})
    assert resp.status == 200
    assert "tool-cred-123456" in seen.requests[-1]["headers"]["Authorization"]
    # The fake tool echoes what it got; the agent never sees the tool's credential.
    assert "tool-cred-123456" not in await resp.text()
    everything = json.dumps([dict(s.attributes or {}) for s in spans.get_finished_spans()])
    assert "hunter2" not in everything
    assert "tool-cred-123456" not in everything
    assert REDACTED in everything


def test_a_body_already_parsed_is_captured_as_if_parsed_again() -> None:
    redactor = Redactor.build(("password",), ())
    body = b'{"user": "ada", "password": "hunter2", "items": [1, {"password": "x"}]}'
    parsed = json.loads(body)
    again = capture_body(body, redactor, 4096)
    assert capture_body(body, redactor, 4096, parsed) == again
    assert "hunter2" not in again and REDACTED in again
    assert parsed["password"] == "hunter2"  # the call's own document is left as it was


async def test_spans_carry_openinference_kinds_and_the_agent_as_user(
    tool: Any, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, _ = tool
    proxy = await make_proxy(_crm(server))
    resp = await proxy.post(
        "/tools/crm/contacts",
        json={"name": "Ada"},
        headers={"X-Agent-Id": "sales-bot", "X-Run-Id": "r-kinds", "Idempotency-Key": "k-kinds"},
    )
    assert resp.status == 200
    for _ in range(100):
        found = _by_name(spans)
        if "execute_tool crm" in found:
            break
        await asyncio.sleep(0.01)
    kinds = {name: (s.attributes or {}).get("openinference.span.kind") for name, s in found.items()}
    assert kinds["execute_tool crm"] == "TOOL"
    assert kinds["handrail.policy"] == "GUARDRAIL"
    assert kinds["handrail.idempotency"] == "CHAIN"
    assert (found["execute_tool crm"].attributes or {})["user.id"] == "sales-bot"
