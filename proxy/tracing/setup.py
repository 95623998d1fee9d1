"""The OpenTelemetry SDK wiring: the app's TracerProvider and its OTLP export.

The only module that touches the SDK and the OTLP exporters. Export never gets in the way
of a call: ended spans go to a bounded queue that a background thread drains in batches;
each export has a short timeout; a full queue or a failed export drops spans, and every
dropped span is counted (``handrail_trace_export_dropped{sink="otlp"}``) and reported in a
rate-limited warning. Shutting down is bounded too, whatever state the endpoint is in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from proxy.config import TracingConfig
from proxy.metrics import Metrics
from proxy.tracing.otlp_proto import SpanEncoder, pre_encode

logger = logging.getLogger(__name__)

PROJECT_NAME = "openinference.project.name"
OTLP_SINK = "otlp"

QUEUE_SIZE = 4096
BATCH_SIZE = 512
"""Spans per export. Spans bound for the fast OTLP/HTTP exporter are encoded as they end
(``otlp_proto.pre_encode``), so a batch is joined, not encoded, in the export thread: it no
longer holds the GIL for milliseconds (with the old encode-per-batch, 512 put the p99 at one
connection at 16.8 ms, 128 at 7.9 ms), and a bigger batch means fewer requests."""
SCHEDULE_DELAY_MS = 500
EXPORT_TIMEOUT_S = 3.0
"""Per export request, unless ``OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`` says otherwise."""
SHUTDOWN_BUDGET_S = 3.0
"""How long shutdown may spend sending what is still queued before dropping it."""
WARN_EVERY_S = 60.0

_TRACES_PATH = "/v1/traces"


def service_name(config: TracingConfig) -> str:
    """The configured name; else ``OTEL_SERVICE_NAME``; else the default ``handrail``."""
    if "service_name" not in config.model_fields_set and os.environ.get("OTEL_SERVICE_NAME"):
        return os.environ["OTEL_SERVICE_NAME"]
    return config.service_name


def project_name(config: TracingConfig) -> str:
    """Phoenix's project for our spans: ``project_name``, else the service name."""
    return config.project_name or service_name(config)


class _HashedResource(Resource):
    """A Resource whose hash is computed once.

    The OTLP encoder groups every exported span by resource, and ``Resource.__hash__``
    JSON-encodes all its attributes on each call: per span, that was a tenth of the export
    thread's time. A resource never changes after start-up, so its hash can be kept.
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def build_resource(config: TracingConfig) -> Resource:
    """``service.name`` and ``openinference.project.name`` (OTEL_RESOURCE_ATTRIBUTES merge in)."""
    created = Resource.create(
        {SERVICE_NAME: service_name(config), PROJECT_NAME: project_name(config)}
    )
    return _HashedResource(created)


def http_traces_endpoint(endpoint: str) -> str:
    """A base URL (``http://host:4318``) gets ``/v1/traces``; a full signal URL is kept."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + _TRACES_PATH
    return endpoint


def _export_timeout() -> float | None:
    """``None`` lets the exporter read ``OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`` itself."""
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    ):
        return None
    return EXPORT_TIMEOUT_S


def _protocol(config: TracingConfig) -> str:
    """The configured protocol; with no endpoint configured, the OTEL_* variable may choose."""
    if config.endpoint is None and "protocol" not in config.model_fields_set:
        env = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        if env in ("grpc", "http/protobuf"):
            return env
    return config.protocol


class FastHttpSpanExporter(HttpSpanExporter):
    """The OTLP/HTTP exporter with ``otlp_proto``'s encoder (2-3x less CPU per span).

    Everything else (endpoint, headers, compression, TLS, retries) is the SDK's. It
    reaches the SDK's HTTP client, which is private: where an SDK version lays it out
    differently, this falls back to the SDK's own export (a test pins the fast path).
    """

    encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if self._shutdown or client is None or not hasattr(client, "export"):
            return super().export(spans)
        data = self.encoder.encode(spans)
        limit = getattr(self, "_max_request_size", None)
        if limit is not None and len(data) > limit:
            logger.warning("dropping a span batch of %d bytes (limit %d)", len(data), limit)
            return SpanExportResult.FAILURE
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


def otlp_exporter(config: TracingConfig) -> SpanExporter:
    """The OTLP span exporter for ``protocol``; unset ``endpoint`` leaves OTEL_* in charge."""
    timeout = _export_timeout()
    if _protocol(config) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        endpoint = config.endpoint
        insecure = None
        if endpoint is not None:
            insecure = urlsplit(endpoint).scheme != "https"
        return GrpcSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)

    endpoint = http_traces_endpoint(config.endpoint) if config.endpoint else None
    return FastHttpSpanExporter(endpoint=endpoint, timeout=timeout)


class DropCounter:
    """Counts dropped spans and warns about them at most once a minute."""

    def __init__(self, metrics: Metrics, sink: str = OTLP_SINK) -> None:
        self._counter = metrics.export_dropped.labels(sink)
        self._sink = sink
        self._lock = threading.Lock()
        self._unreported = 0
        self._last_warning = float("-inf")

    def drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        self._counter.inc(count)
        with self._lock:
            self._unreported += count
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY_S:
                return
            count, self._unreported, self._last_warning = self._unreported, 0, now
        logger.warning("dropped %d spans (%s): %s", count, self._sink, why)


class GuardedExporter(SpanExporter):
    """Wraps the OTLP exporter: counts what fails, and gives up on time at shutdown."""

    def __init__(self, inner: SpanExporter, drops: DropCounter) -> None:
        self._inner = inner
        self._drops = drops
        self._deadline: float | None = None
        self._abort: threading.Timer | None = None
        self._lock = threading.Lock()
        self._inner_down = False
        self.taken = 0
        """Spans handed to ``export`` so far (the batch queue's outflow)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._drops.drop(len(spans), "shutting down, no time left to export")
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            self._drops.drop(len(spans), f"export raised {type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._drops.drop(len(spans), "the OTLP endpoint did not accept them")
        return result

    def begin_shutdown(self, budget_s: float) -> None:
        """From now on, exports may only use ``budget_s``; then in-flight retries are cut."""
        self._deadline = time.monotonic() + budget_s
        self._abort = threading.Timer(budget_s, self._shutdown_inner)
        self._abort.daemon = True
        self._abort.start()

    def _shutdown_inner(self) -> None:
        with self._lock:
            if self._inner_down:
                return
            self._inner_down = True
        self._inner.shutdown()

    def shutdown(self) -> None:
        if self._abort is not None:
            self._abort.cancel()
        self._shutdown_inner()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class ExportProcessor(SpanProcessor):
    """A BatchSpanProcessor whose queue overflow and export failures are counted."""

    def __init__(
        self,
        exporter: SpanExporter,
        metrics: Metrics,
        *,
        max_queue_size: int = QUEUE_SIZE,
        max_export_batch_size: int = BATCH_SIZE,
        schedule_delay_millis: float = SCHEDULE_DELAY_MS,
        shutdown_budget_s: float = SHUTDOWN_BUDGET_S,
    ) -> None:
        self._drops = DropCounter(metrics)
        self._exporter = GuardedExporter(exporter, self._drops)
        self._batch = BatchSpanProcessor(
            self._exporter,
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
        )
        self._max_queue = max_queue_size
        self._shutdown_budget_s = shutdown_budget_s
        self._emitted = 0
        self._lock = threading.Lock()
        self._pre_encode = isinstance(exporter, FastHttpSpanExporter)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._batch.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._lock:
            queued = self._emitted - self._exporter.taken
            if queued >= self._max_queue:
                # The batch queue is full: appending pushes out its oldest span.
                self._drops.drop(1, "the export queue is full (the endpoint is slow or down)")
            else:
                self._emitted += 1
        if self._pre_encode:
            # A value the encoder refuses is met again in the export thread, which counts
            # the drop: ending a span never fails the call.
            with contextlib.suppress(Exception):
                pre_encode(span)
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._exporter.begin_shutdown(self._shutdown_budget_s)
        self._batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
)


class _OncePerMinute(logging.Filter):
    """Lets each distinct message of the SDK's export loggers through once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, object], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < WARN_EVERY_S:
                return False
            self._last[key] = now
        return True


_export_log_filter = _OncePerMinute()


def quiet_export_logs() -> None:
    """A dead endpoint makes the SDK log every retry; keep one line a minute of each kind."""
    for name in _EXPORT_LOGGERS:
        export_logger = logging.getLogger(name)
        if _export_log_filter not in export_logger.filters:
            export_logger.addFilter(_export_log_filter)


def build_tracer_provider(
    config: TracingConfig,
    metrics: Metrics,
    extra_processors: Sequence[SpanProcessor] = (),
) -> TracerProvider:
    """The app's provider: OTLP export unless ``exporter: none``, plus any extra processors.

    With no exporting processor the spans are still real (trace ids for errors and
    ``traceresponse``); the local journal keeps the calls either way.
    """
    provider = TracerProvider(resource=build_resource(config))
    if config.exporter == "otlp":
        quiet_export_logs()
        provider.add_span_processor(ExportProcessor(otlp_exporter(config), metrics))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider


def describe_exporter(config: TracingConfig) -> str:
    """One line for ``handrail serve``: where the spans go."""
    if config.exporter == "none":
        return "none (local journal only)"
    protocol = _protocol(config)
    if config.endpoint:
        endpoint = config.endpoint
        if protocol == "http/protobuf":
            endpoint = http_traces_endpoint(endpoint)
    else:
        endpoint = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "the OTEL_EXPORTER_OTLP_* default"
        )
    return f"otlp {protocol} {endpoint} (project {project_name(config)})"
