"""The upstream hop: a safe URL under the tool's base, clean headers, one pooled request.

Transport errors are translated here, where they arise, to ``UpstreamUnavailable``
and ``UpstreamTimeout``; nothing above this module sees an aiohttp client exception.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping

import aiohttp
from multidict import CIMultiDict
from opentelemetry.propagate import inject
from opentelemetry.trace import Span, set_span_in_context
from yarl import URL

from proxy.call import Call, Outcome, UnknownReason, Upstream
from proxy.config import ToolConfig
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
    """``{upstream}{rest}?{query}``; ``rest`` is canonical (``ingress.canonical``)."""
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


async def _body(
    response: aiohttp.ClientResponse, call: Call, deadline: float | None
) -> AsyncIterator[bytes]:
    """The answer's body as it arrives; a failure here comes after the tool had the call."""
    loop = asyncio.get_running_loop()
    try:
        if deadline is None:
            async for chunk in response.content.iter_chunked(_CHUNK):
                yield chunk
            return
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(response.content.readany(), left)
            if not chunk:
                return
            yield chunk
    except TimeoutError as exc:
        _lost(call, UnknownReason.TIMEOUT)
        raise UpstreamTimeout("the tool did not finish its answer in time") from exc
    except aiohttp.ClientError as exc:
        _lost(call, UnknownReason.ANSWER_BROKEN)
        raise UpstreamUnavailable(f"the tool's answer broke off: {exc}") from exc
    finally:
        response.release()


def _lost(call: Call, reason: UnknownReason) -> None:
    call.outcome = Outcome.UNKNOWN
    call.unknown_reason = reason


def client_timeout(tool: ToolConfig) -> aiohttp.ClientTimeout:
    """http: ``timeout_s`` bounds the whole exchange. mcp: an answer may be a long SSE
    stream, so ``timeout_s`` bounds the silence between its events (``max_duration_s``,
    if set, the whole of it)."""
    if tool.kind == "mcp":
        return aiohttp.ClientTimeout(
            total=None,
            connect=tool.timeout_s,
            sock_connect=tool.timeout_s,
            sock_read=tool.timeout_s,
        )
    return aiohttp.ClientTimeout(
        total=tool.timeout_s, connect=tool.timeout_s, sock_connect=tool.timeout_s
    )


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
    loop = asyncio.get_running_loop()
    limit = call.tool.max_duration_s if call.tool.kind == "mcp" else None
    deadline = loop.time() + limit if limit else None
    call.sent = True  # from here on the tool may have the request, unless connecting fails
    try:
        async with asyncio.timeout_at(deadline):
            response = await session.request(
                call.method,
                url,
                headers=upstream_headers(call, span),
                data=upstream_body(call, span) or None,
                timeout=client_timeout(call.tool),
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
    except aiohttp.ConnectionTimeoutError as exc:
        call.sent, call.outcome = False, Outcome.NOT_RUN
        raise UpstreamTimeout(
            f"no connection to tool {call.tool_name!r} within {call.tool.timeout_s:g}s (it "
            f"does not accept, or all {call.tool.max_connections} of its connections are busy)"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        call.sent, call.outcome = False, Outcome.NOT_RUN
        raise UpstreamUnavailable(f"tool {call.tool_name!r} is unreachable: {exc}") from exc
    except TimeoutError as exc:
        _lost(call, UnknownReason.TIMEOUT)
        raise UpstreamTimeout(
            f"tool {call.tool_name!r} did not answer within {call.tool.timeout_s:g}s"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        _lost(call, UnknownReason.CONNECTION_LOST)
        raise UpstreamUnavailable(f"tool {call.tool_name!r} failed: {exc}") from exc
    return Upstream(
        status=response.status,
        headers=response_headers(list(response.headers.items())),
        body=_body(response, call, deadline),
        content_length=response.content_length,
        release=response.release,
    )


class Pools:
    """One connection pool per tool, so one tool's load (or a crowd of idle MCP event
    streams) cannot starve another; ``tools.NAME.max_connections`` bounds each, and a call
    that waits past ``timeout_s`` for a connection is refused (504) without reaching it."""

    def __init__(self, tools: Mapping[str, ToolConfig]) -> None:
        self._sessions = {name: _session(tool.max_connections) for name, tool in tools.items()}

    def session(self, tool: str) -> aiohttp.ClientSession:
        """The pool of a configured tool (calls name no other: 404 before they get here)."""
        return self._sessions[tool]

    async def close(self) -> None:
        for each in self._sessions.values():
            await each.close()


def _session(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=30)
    session = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )
    # aiohttp re-sends a PUT or DELETE, once, on a pooled connection the server closed
    # without answering: the tool may then run a keyed write twice, and the proxy could
    # not know. Handrail decides retries itself (aio-libs/aiohttp#10790: no public switch;
    # aiohttp's own test client sets the same attribute).
    session._retry_connection = False
    return session
