"""OTLP trace export requests written straight to protobuf wire format.

The OTLP/HTTP exporter's encoder builds a protobuf object for every span, attribute and
value, with Python-level type dispatch for each one: for Handrail's four spans per call
that was about as much CPU as the rest of the tracing put together (``bench/run.py``).
This module writes the same ``ExportTraceServiceRequest`` bytes directly. Field numbers are
those of ``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto``; the
tests parse what it writes and compare it with the SDK encoder's message, field by field.

What it encodes is what the SDK's encoder encodes, including the span flags that say
whether the parent is remote, empty status messages and dropped counts (and, as the SDK
does, no trace state on links).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack

_SMALL = [bytes((n,)) for n in range(128)]

# OTLP's SpanKind counts from UNSPECIFIED=0; the SDK's from INTERNAL=0.
_KIND = {kind: bytes((0x30, kind.value + 1)) for kind in SpanKind}

_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200
_FLAGS_LOCAL = b"\x85\x01" + _pack_fixed32(_FLAG_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _pack_fixed32(_FLAG_HAS_IS_REMOTE | _FLAG_IS_REMOTE)


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64  # int64 two's complement: ten bytes on the wire
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag`` is the encoded key (field number, wire type 2)."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else _varint(n)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8", "surrogatepass"))


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message's bytes (without its own tag and length)."""
    if value.__class__ is str:
        return _string(b"\x0a", value)
    if value is None:
        return b""
    if value.__class__ is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(
            b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()])
        )
    raise TypeError(f"cannot encode an attribute value of type {type(value).__name__}")


_KEYS: dict[str, bytes] = {}
"""Attribute keys, encoded once: Handrail's span attribute names are a small fixed set."""


def _key_value(key: str, value: Any) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _string(b"\x0a", key)
        if len(_KEYS) < 4096:
            _KEYS[key] = encoded
    return encoded + _field(b"\x12", _any_value(value))


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    small = _SMALL
    keys = _KEYS
    out = []
    for key, value in attributes.items():
        if value.__class__ is str:  # most attributes: the same steps, inlined
            encoded_key = keys.get(key)
            if encoded_key is None:
                return b"".join([_field(tag, _key_value(k, v)) for k, v in attributes.items()])
            raw = value.encode("utf-8", "surrogatepass")
            n = len(raw)
            any_value = b"\x0a" + (small[n] if n < 128 else _varint(n)) + raw
            n = len(any_value)
            pair = encoded_key + b"\x12" + (small[n] if n < 128 else _varint(n)) + any_value
        else:
            pair = _key_value(key, value)
        n = len(pair)
        out.append(tag + (small[n] if n < 128 else _varint(n)) + pair)
    return b"".join(out)


def _flags(parent: SpanContext | None) -> bytes:
    return _FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL


def _trace_state(context: SpanContext) -> bytes:
    state = context.trace_state
    if not state:
        return b""
    return _string(b"\x1a", ",".join([f"{k}={v}" for k, v in state.items()]))


def _status(span: ReadableSpan) -> bytes:
    status = span.status
    out = b""
    if status.description:
        out = _string(b"\x12", status.description)
    if status.status_code.value:
        out += b"\x18" + _SMALL[status.status_code.value]
    return _field(b"\x7a", out)


def _count(tag: bytes, n: int) -> bytes:
    return tag + _varint(n) if n else b""


def _event(event: Any) -> bytes:
    out = b""
    if event.timestamp:
        out += b"\x09" + _pack_fixed64(event.timestamp)
    if event.name:
        out += _string(b"\x12", event.name)
    return out + _attributes(b"\x1a", event.attributes) + _count(b"\x20", event.dropped_attributes)


def _link(link: Any) -> bytes:
    context: SpanContext = link.context
    return (
        b"\x0a\x10"
        + context.trace_id.to_bytes(16, "big")
        + b"\x12\x08"
        + context.span_id.to_bytes(8, "big")
        + _attributes(b"\x22", link.attributes)
        + _count(b"\x28", link.dropped_attributes)
        + b"\x35"
        + _pack_fixed32(_FLAG_HAS_IS_REMOTE | (_FLAG_IS_REMOTE if context.is_remote else 0))
    )


def encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message's bytes (without its own tag and length)."""
    context = span.context
    assert context is not None
    parent = span.parent
    out = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        _trace_state(context),
        b"\x22\x08" + parent.span_id.to_bytes(8, "big") if parent is not None else b"",
        _string(b"\x2a", span.name) if span.name else b"",
        _KIND[span.kind],
        b"\x39" + _pack_fixed64(span.start_time) if span.start_time else b"",
        b"\x41" + _pack_fixed64(span.end_time) if span.end_time else b"",
        _attributes(b"\x4a", span.attributes),
        _count(b"\x50", span.dropped_attributes),
    ]
    if span.events:
        out.append(b"".join([_field(b"\x5a", _event(e)) for e in span.events]))
    out.append(_count(b"\x60", span.dropped_events))
    if span.links:
        out.append(b"".join([_field(b"\x6a", _link(link)) for link in span.links]))
    out.append(_count(b"\x70", span.dropped_links))
    out.append(_status(span))
    out.append(_flags(parent))
    return b"".join(out)


def _resource(resource: Resource) -> bytes:
    return _attributes(b"\x0a", resource.attributes)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    out = _string(b"\x0a", scope.name) if scope.name else b""
    if scope.version:
        out += _string(b"\x12", scope.version)
    return out + _attributes(b"\x1a", scope.attributes)


WIRE = "_handrail_wire"
"""The attribute a span's encoded ``Span`` field is kept under by ``pre_encode``."""


def pre_encode(span: ReadableSpan) -> None:
    """Encode ``span`` now and keep the bytes on it, for the batch that exports it later.

    The export thread then only joins bytes: the encoding runs where the span ended (on the
    event loop, a few microseconds at a time) instead of in one long hold of the GIL per batch.
    """
    setattr(span, WIRE, _field(b"\x12", encode_span(span)))


class SpanEncoder:
    """Encodes batches of finished spans; a resource's and a scope's bytes are kept."""

    def __init__(self) -> None:
        self._resources: dict[Resource, bytes] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}

    def _resource_bytes(self, resource: Resource) -> bytes:
        encoded = self._resources.get(resource)
        if encoded is None:
            encoded = _field(b"\x0a", _resource(resource))
            if resource.schema_url:
                encoded += _string(b"\x1a", resource.schema_url)
            if len(self._resources) < 64:
                self._resources[resource] = encoded
        return encoded

    def _scope_bytes(self, scope: InstrumentationScope | None) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            encoded = _field(b"\x0a", _scope(scope))
            if len(self._scopes) < 64:
                self._scopes[scope] = encoded
        return encoded

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An ``ExportTraceServiceRequest``: spans grouped by resource, then by scope."""
        groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
        for span in spans:
            scope = span.instrumentation_scope or None
            wire = getattr(span, WIRE, None)
            groups.setdefault(span.resource, {}).setdefault(scope, []).append(
                wire if wire is not None else _field(b"\x12", encode_span(span))
            )
        out = []
        for resource, scopes in groups.items():
            scope_spans = []
            for scope, encoded in scopes.items():
                schema = scope.schema_url if scope is not None else None
                scope_spans.append(
                    _field(
                        b"\x12",
                        self._scope_bytes(scope)
                        + b"".join(encoded)
                        + (_string(b"\x1a", schema) if schema else b""),
                    )
                )
            out.append(_field(b"\x0a", self._resource_bytes(resource) + b"".join(scope_spans)))
        return b"".join(out)
