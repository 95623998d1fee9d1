"""Shared fixtures: a real fake tool, real proxies on loopback, an in-memory span exporter."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import Config, parse_config
from proxy.http.app import build_admin_app, build_app

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A small policy for the core tests, independent of the shipped starter set.
TEST_POLICY = """package handrail

import rego.v1

default allow := true

allow := false if _denied

reasons contains "agent is blocked" if input.agent.id == "blocked"

reasons contains "deletes are not allowed here" if input.request.method == "DELETE"

_denied if input.agent.id == "blocked"

_denied if input.request.method == "DELETE"

default visible := true

decision := {"allow": allow, "reasons": reasons, "require_approval": false}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    """What the fake tool received: one entry per request that reached it."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r["path"] == path)


def tool_app(seen: Seen) -> web.Application:
    """A fake tool: echoes what it got, and misbehaves on request (slow, 5xx, streams)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry = {
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "query": request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "",
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
            "host": request.host,
        }
        seen.requests.append(entry)
        status = int(request.query.get("status", "200"))
        delay = float(request.query.get("sleep", "0"))
        if delay:
            await asyncio.sleep(delay)
        if "stream" in request.query:
            chunks, size = int(request.query["stream"]), int(request.query.get("size", "1024"))
            response = web.StreamResponse(status=status, headers={"Content-Type": "text/plain"})
            response.headers["X-Tool"] = "fake"
            await response.prepare(request)
            for i in range(chunks):
                await response.write(bytes([65 + i % 26]) * size)
                await asyncio.sleep(float(request.query.get("gap", "0")))
            await response.write_eof()
            return response
        return web.json_response(
            {"n": len(seen.requests), "got": entry},
            status=status,
            headers={
                "X-Tool": "fake",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
            },
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def tool(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[tuple[TestServer, Seen]]:
    seen = Seen()
    server = await aiohttp_server(tool_app(seen))
    yield server, seen


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(TEST_POLICY)
    return directory


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


ProxyFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_config(tmp_path: Path, policy_dir: Path) -> Callable[..., Config]:
    def make(tools: dict[str, Any], **sections: Any) -> Config:
        raw: dict[str, Any] = {
            "tools": tools,
            "policy": {"path": str(policy_dir), "watch": False},
            "store": {"url": f"sqlite:///{tmp_path}/handrail.db"},
            "tracing": {"exporter": "none"},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return parse_config(json.loads(json.dumps(raw)), "test config")

    return make


@pytest.fixture
def make_proxy(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    make_config: Callable[..., Config],
    spans: InMemorySpanExporter,
) -> ProxyFactory:
    """Start the real proxy app on loopback; returns an aiohttp TestClient for it."""

    async def make(tools: dict[str, Any], **sections: Any) -> TestClient:
        config = make_config(tools, **sections)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        app = build_app(config, tracer_provider=provider)
        return await aiohttp_client(app)

    return make


@pytest.fixture
def make_admin(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> Callable[[TestClient], Awaitable[TestClient]]:
    async def make(proxy: TestClient) -> TestClient:
        return await aiohttp_client(build_admin_app(proxy.server.app))

    return make


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Phoenix for the whole session (it takes ~10 s to start): each test writes
    to a project of its own."""
    from tests.phoenix_server import phoenix_installed, running_phoenix

    os.environ.setdefault("PHOENIX_TEST_TRACKING", "false")
    if not phoenix_installed():
        message = "arize-phoenix is not installed (pip install 'handrail[phoenix]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with running_phoenix(tmp_path_factory.mktemp("phoenix")) as url:
        yield url


@pytest.fixture
def mcp_server() -> Iterator[Any]:
    """The FastMCP test server on loopback (``tests/mcp_server.py``), counting executions."""
    from tests.mcp_server import start_mcp_server

    with start_mcp_server() as server:
        yield server
