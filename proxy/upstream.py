"""The upstream hop: a safe URL under the tool's base, clean headers, one pooled request.

Transport errors are translated here, where they arise, to ``UpstreamUnavailable``
and ``UpstreamTimeout``; nothing above this module sees an aiohttp client exception.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from opentelemetry.propagate import inject
from opentelemetry.trace import Span, set_span_in_context
from yarl import URL

from proxy.call import Call, Upstream
from proxy.errors import UpstreamTimeout, UpstreamUnavailable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy itself for the upstream hop, never taken from the agent. (The agent's
# Idempotency-Key passes through unless the proxy keys the call, which replaces it.)
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "traceparent", "tracestate"}
_NOT_RETURNED = HOP_BY_HOP | {"content-length", "server", "date"}

_CHUNK = 64 * 1024


def upstream_url(base: str, rest: str, query_string: str) -> URL:
    """``{upstream}{rest}?{query}``; ``rest`` has passed ``safe_rest_path``."""
    url = base + rest
    if query_string:
        url += "?" + query_string
    return URL(url, encoded=True)


def connection_tokens(headers: list[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop for this hop only (RFC 9110 7.6.1)."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(tokens)


def upstream_headers(call: Call, span: Span | None) -> CIMultiDict[str]:
    drop = _NOT_FORWARDED | connection_tokens(call.headers)
    configured = {name.lower() for name in call.tool.headers}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in call.headers:
        lowered = name.lower()
        if lowered not in drop and lowered not in configured:
            out.add(name, value)
    for name, value in call.tool.headers.items():
        out[name] = value
    if call.idempotency_key is not None:
        out["Idempotency-Key"] = call.idempotency_key
    carrier: dict[str, str] = {}
    inject(carrier, context=set_span_in_context(span) if span is not None else None)
    for name, value in carrier.items():
        if name.lower() != "baggage":  # the agent's baggage passes through as it came
            out[name] = value
    return out


def response_headers(headers: CIMultiDict[str] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    items = list(headers.items()) if isinstance(headers, CIMultiDict) else headers
    drop = _NOT_RETURNED | connection_tokens(items)
    return [(k, v) for k, v in items if k.lower() not in drop]


async def _body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_chunked(_CHUNK):
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeout("the tool did not finish its answer in time") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"the tool's answer broke off: {exc}") from exc
    finally:
        response.release()


def upstream_body(call: Call, span: Span | None) -> bytes:
    """The body as sent on; an MCP ``params._meta`` trace context is passed on as ours."""
    if call.mcp is None or span is None or b'"traceparent"' not in call.body:
        return call.body
    try:
        message = json.loads(call.body)
        meta = message["params"]["_meta"]
    except (ValueError, KeyError, TypeError):
        return call.body
    if not isinstance(meta, dict) or "traceparent" not in meta:
        return call.body
    carrier: dict[str, str] = {}
    inject(carrier, context=set_span_in_context(span))
    meta.update({k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")})
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


async def send_upstream(session: aiohttp.ClientSession, call: Call, span: Span | None) -> Upstream:
    url = upstream_url(call.tool.upstream, call.path, call.query_string)
    if span is not None:
        span.set_attribute("http.request.method", call.method)
        span.set_attribute("url.full", str(url.with_query(None)))
        span.set_attribute("server.address", url.host or "")
        if url.port is not None:
            span.set_attribute("server.port", url.port)
    timeout = aiohttp.ClientTimeout(total=call.tool.timeout_s)
    try:
        response = await session.request(
            call.method,
            url,
            headers=upstream_headers(call, span),
            data=upstream_body(call, span) or None,
            timeout=timeout,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"tool {call.tool_name!r} did not answer within {call.tool.timeout_s:g}s"
        ) from exc
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
        raise UpstreamUnavailable(f"tool {call.tool_name!r} is unreachable: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"tool {call.tool_name!r} failed: {exc}") from exc
    return Upstream(
        status=response.status,
        headers=response_headers(list(response.headers.items())),
        body=_body(response),
        content_length=response.content_length,
        release=response.release,
    )
