"""Handrail's tracer: OpenTelemetry spans without the SDK's per-span machinery.

The SDK's ``Tracer.start_span`` and ``Span`` take a lock per attribute, validate and copy
every value, keep bounded lists and build a ``ReadableSpan`` at the end: for the four spans
of a call that cost more CPU than the proxy's own work (``bench/run.py``). Handrail sets a
small, known set of attributes, so its spans keep them in a plain dict and hand the SDK's
span processors the same ``ReadableSpan`` they would get from the SDK.

What stays the SDK's: the provider's sampler (asked for every span, as the SDK does), its
id generator, resource and processors (export, tests' in-memory exporters). Processors'
``on_start`` is not called: none of Handrail's needs it. The SDK's span limits
(``OTEL_SPAN_ATTRIBUTE_*``) are not applied: a call span has about 25 attributes, and the
captured input and output are already cut to ``tracing.capture.max_bytes``.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util.types import Attributes, AttributeValue

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)


class Tracer(trace_api.Tracer):
    """Starts :class:`Span` objects for ``provider``; ended spans go to its processors."""

    def __init__(self, provider: TracerProvider, name: str = "proxy") -> None:
        self._scope = InstrumentationScope(name)
        self._resource = provider.resource
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        # The provider's fan-out to its processors (the SDK's own spans use the same).
        self._processor = provider._active_span_processor

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
        result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        sampled = result.decision.is_sampled()  # type: ignore[no-untyped-call]
        span_context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
            trace_state=result.trace_state,
        )
        if not result.decision.is_recording():  # type: ignore[no-untyped-call]
            return NonRecordingSpan(span_context)
        values: dict[str, AttributeValue] = {}
        if result.attributes:
            values.update(result.attributes)
        return Span(
            self, name, span_context, parent, kind, values, tuple(links or ()), start_time
        ).set_many(attributes)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, False
        )
        with trace_api.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current

    def finish(self, span: Span, end_time: int) -> None:
        self._processor.on_end(
            ReadableSpan(
                span.name,
                context=span.context,
                parent=span.parent,
                resource=self._resource,
                attributes=span.attributes,
                events=span.events,
                links=span.links,
                kind=span.kind,
                status=span.status,
                start_time=span.start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )


def _clean(value: AttributeValue) -> AttributeValue:
    if isinstance(value, list):
        return tuple(value)
    return value


class Span(trace_api.Span):
    """A recording span: attributes in a dict, no lock (spans live on the event loop)."""

    __slots__ = (
        "attributes",
        "context",
        "end_time",
        "ended",
        "events",
        "held",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: tuple[Link, ...],
        start_time: int | None,
    ) -> None:
        self.tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.events: list[Event] = []
        self.links = links
        self.status = _UNSET
        self.start_time = start_time or time_ns()
        self.ended = False
        self.held = False
        self.end_time: int | None = None

    def set_many(self, attributes: Attributes) -> Span:
        if attributes:
            self.set_attributes(attributes)
        return self

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self.ended

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self.ended and value is not None:
            self.attributes[key] = _clean(value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self.ended:
            return
        for key, value in attributes.items():
            if value is not None:
                self.attributes[key] = _clean(value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if not self.ended:
            self.events.append(Event(name, attributes, timestamp or time_ns()))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if not self.ended and context.is_valid:
            self.links = (*self.links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if not self.ended:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: a status set to OK stays OK.
        if self.ended or self.status.status_code is StatusCode.OK:
            return
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        values: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            values.update(attributes)
        self.add_event("exception", values, timestamp)

    def hold(self) -> None:
        """Until ``release``, ``end`` only notes the time: the span stays open to attributes
        (the call's, set once its answer is on the wire) and reaches no processor."""
        self.held = not self.ended

    def release(self) -> None:
        """End a held span, at the time ``end`` noted (or now, if it was not called)."""
        if self.held:
            self.held = False
            self.end(self.end_time)

    def end(self, end_time: int | None = None) -> None:
        if self.ended:
            return
        if self.held:
            if self.end_time is None:
                self.end_time = end_time or time_ns()
            return
        self.ended = True
        self.tracer.finish(self, end_time or time_ns())
