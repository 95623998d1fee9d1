"""Renders every error the proxy makes as the contract's JSON body; stamps traceresponse."""

from __future__ import annotations

import logging
import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.errors import HandrailError, MisdirectedRequest, OriginNotAllowed
from proxy.http.keys import METRICS, TRACE_IDS, TraceIds

logger = logging.getLogger(__name__)


def trace_ids(request: web.Request) -> TraceIds:
    """The call's trace ids; a request that made no span gets the agent's trace or a new one."""
    ids: TraceIds | None = request.get(TRACE_IDS)
    if ids is None:
        parts = request.headers.get("traceparent", "").split("-")
        trace_id = parts[1] if len(parts) == 4 and len(parts[1]) == 32 else secrets.token_hex(16)
        ids = TraceIds(trace_id, secrets.token_hex(8), 0)
        request[TRACE_IDS] = ids
    return ids


def error_response(request: web.Request, exc: HandrailError) -> web.Response:
    metrics = request.app.get(METRICS)
    if metrics is not None and not exc.counted:
        metrics.errors.labels(exc.code).inc()
        exc.counted = True
    return web.json_response(exc.body(trace_ids(request).trace_id), status=exc.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HandrailError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        body = {
            "error": {"code": code, "message": exc.reason, "trace_id": trace_ids(request).trace_id}
        }
        return web.json_response(
            body,
            status=exc.status,
            headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
        )
    except Exception:
        ids = trace_ids(request)
        logger.exception(
            "unexpected error handling %s %s",
            request.method,
            request.path,
            extra={"trace_id": ids.trace_id},
        )
        return error_response(request, HandrailError("the proxy failed unexpectedly; see its log"))


async def add_traceresponse(request: web.Request, response: web.StreamResponse) -> None:
    """W3C Trace Context Level 2: every answer names the trace it was recorded under."""
    ids = trace_ids(request)
    response.headers["traceresponse"] = f"00-{ids.trace_id}-{ids.span_id}-{ids.flags:02x}"


def _host_name(value: str) -> tuple[str, str]:
    """``name`` and ``name:port`` of a Host value (IPv6 in brackets), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, f"{name}{rest}"
    name, _, _ = value.partition(":")
    return name, value


def host_guard(allowed: frozenset[str]) -> web.middleware:  # type: ignore[valid-type]
    """Answer only to our own Host names and Origins, as an MCP server must against DNS
    rebinding: the tool behind us only ever sees Handrail's Host, so it cannot check."""
    any_host = "*" in allowed

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not any_host:
            name, full = _host_name(request.headers.get("Host", ""))
            if name not in allowed and full not in allowed:
                raise MisdirectedRequest(
                    f"Host {request.headers.get('Host', '')!r} is not one this proxy answers "
                    "to (listen.allowed_hosts)"
                )
            origin = request.headers.get("Origin")
            if origin is not None and origin != "null":
                authority = origin.partition("://")[2]
                o_name, o_full = _host_name(authority)
                if o_name not in allowed and o_full not in allowed:
                    raise OriginNotAllowed(
                        f"Origin {origin!r} may not call this proxy (listen.allowed_hosts)"
                    )
            elif origin == "null":
                raise OriginNotAllowed("an opaque Origin ('null') may not call this proxy")
        return await handler(request)

    return guard
