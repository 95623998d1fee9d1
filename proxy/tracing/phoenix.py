"""A small client for Arize Phoenix's REST API: the spans ``handrail traces`` shows.

``GET /v1/projects/{project}/spans`` with Phoenix's simple filters (``trace_id``,
``span_kind``, ``attribute=key:value``), following ``next_cursor``. Connection
failures become ``PhoenixUnavailable``; a project that does not exist yet has no spans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from proxy.config import TracingConfig

DEFAULT_URL = "http://127.0.0.1:6006"
PAGE = 1000
TIMEOUT_S = 10.0


class PhoenixUnavailable(Exception):
    """Phoenix could not be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class PhoenixSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    span_kind: str
    start_time: str
    end_time: str
    status_code: str
    status_message: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PhoenixSpan:
        context = data.get("context") or {}
        return cls(
            name=str(data.get("name", "")),
            trace_id=str(context.get("trace_id", "")),
            span_id=str(context.get("span_id", "")),
            parent_id=data.get("parent_id") or None,
            span_kind=str(data.get("span_kind", "UNKNOWN")),
            start_time=str(data.get("start_time", "")),
            end_time=str(data.get("end_time", "")),
            status_code=str(data.get("status_code", "UNSET")),
            status_message=str(data.get("status_message") or ""),
            attributes=dict(data.get("attributes") or {}),
        )


def phoenix_url(config: TracingConfig) -> str:
    """``phoenix_url``; else the OTLP http endpoint's scheme, host and port; else the default."""
    if config.phoenix_url:
        return config.phoenix_url.rstrip("/")
    endpoint = config.endpoint
    if endpoint is None and config.exporter == "otlp":
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme in ("http", "https") and parts.hostname:
            if config.protocol == "grpc":
                # Phoenix serves gRPC on its own port; its REST API is on the HTTP port.
                return f"{parts.scheme}://{parts.hostname}:6006"
            return f"{parts.scheme}://{parts.netloc}"
    return DEFAULT_URL


def attribute_filter(key: str, value: str | bool | int) -> str:
    """Phoenix's ``key:value``; strings are JSON-quoted so that ``"123"`` stays a string."""
    return f"{key}:{json.dumps(value)}"


class PhoenixClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session

    async def spans(
        self,
        project: str,
        *,
        trace_ids: Sequence[str] = (),
        span_kinds: Sequence[str] = (),
        attributes: Mapping[str, str | bool | int] | None = None,
        limit: int = PAGE,
    ) -> list[PhoenixSpan]:
        """Spans of ``project`` matching every filter, newest first, up to ``limit``."""
        params: list[tuple[str, str]] = [("trace_id", t) for t in trace_ids]
        params += [("span_kind", k) for k in span_kinds]
        params += [("attribute", attribute_filter(k, v)) for k, v in (attributes or {}).items()]
        url = f"{self.base_url}/v1/projects/{quote(project, safe='')}/spans"
        found: list[PhoenixSpan] = []
        cursor: str | None = None
        while len(found) < limit:
            page = [*params, ("limit", str(min(PAGE, limit - len(found))))]
            if cursor:
                page.append(("cursor", cursor))
            body = await self._get(url, page)
            if body is None:
                break
            found += [PhoenixSpan.from_json(item) for item in body.get("data") or []]
            cursor = body.get("next_cursor")
            if not cursor:
                break
        return found[:limit]

    async def _get(self, url: str, params: list[tuple[str, str]]) -> dict[str, Any] | None:
        try:
            async with self._session.get(
                url, params=params, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
            ) as response:
                if response.status == 404:
                    return None  # no such project: nothing was exported to it yet
                if response.status >= 400:
                    text = (await response.text())[:200]
                    raise PhoenixUnavailable(f"Phoenix answered {response.status}: {text}")
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PhoenixUnavailable(f"cannot reach Phoenix at {self.base_url}: {exc}") from exc
        if not isinstance(data, dict):
            raise PhoenixUnavailable(f"Phoenix at {self.base_url} answered something unexpected")
        return data
