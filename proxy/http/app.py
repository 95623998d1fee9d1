"""Builds the data-plane and admin apps; opens and closes every backend in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from proxy.approvals.gate import Approvals
from proxy.approvals.pinning import Pinning
from proxy.approvals.store import approvals_store as approvals_store_for
from proxy.background import Background
from proxy.config import Config, redact_url
from proxy.deps import Deps
from proxy.errors import ConfigError, StoreUnavailable
from proxy.http.admin import build_admin_app
from proxy.http.keys import CONFIG, DEPS, METRICS
from proxy.http.middleware import add_traceresponse, error_middleware, host_guard
from proxy.http.routes import handle_tool
from proxy.ingress.request import READ_TIMEOUT_S
from proxy.mcp.annotations import MCP_CATALOG, ToolCatalog
from proxy.mcp.inflight import MCP_IN_FLIGHT, McpInFlight
from proxy.mcp.readiness import MCP_READINESS, McpReadiness
from proxy.metrics import Metrics
from proxy.policy import engine_from_config
from proxy.store import purge_loop, store_from_config
from proxy.tracing import journal_from_config, tracer_provider_from_config
from proxy.tracing.tracer import Tracer
from proxy.upstream import Pools

logger = logging.getLogger(__name__)

PURGE_INTERVAL_S = 60.0
BACKGROUND_GRACE_S = 2.0
"""How long a stopping proxy gives settles the store refused (their keys read as unknown
after their lease if they cannot finish)."""
PROVIDER = web.AppKey("tracer_provider", TracerProvider)

__all__ = ["build_admin_app", "build_app"]


def build_app(config: Config, *, tracer_provider: TracerProvider | None = None) -> web.Application:
    """The agent-facing app. Backends open in ``cleanup_ctx`` and live under ``DEPS``."""
    largest = max((t.max_body_bytes for t in config.tools.values()), default=1 << 20)
    app = web.Application(
        middlewares=[error_middleware, host_guard(config.listen.hosts())],
        client_max_size=largest + 1,
        # aiohttp closes a connection that has not sent a whole request head within its
        # keep-alive timeout (from the connection's start, and between requests).
        handler_args={"keepalive_timeout": config.listen.read_timeout_s},
    )
    metrics = Metrics()
    app[CONFIG] = config
    app[READ_TIMEOUT_S] = config.listen.read_timeout_s
    app[METRICS] = metrics
    app[MCP_CATALOG] = ToolCatalog()
    app[MCP_IN_FLIGHT] = McpInFlight()
    app[MCP_READINESS] = McpReadiness(config)
    if tracer_provider is not None:
        app[PROVIDER] = tracer_provider
    app.cleanup_ctx.append(_backends)
    app.on_response_prepare.append(add_traceresponse)
    app.router.add_route("*", "/tools/{tool}", handle_tool)
    app.router.add_route("*", "/tools/{tool}/{rest:.*}", handle_tool)
    return app


async def _backends(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG], app[METRICS]
    own_provider = PROVIDER not in app
    provider = (
        app[PROVIDER] if not own_provider else tracer_provider_from_config(config.tracing, metrics)
    )
    async with contextlib.AsyncExitStack() as stack:
        if own_provider:
            # With a dead OTLP endpoint shutdown takes seconds: keep it off the loop.
            stack.push_async_callback(asyncio.to_thread, provider.shutdown)
        store = store_from_config(config.store)
        try:
            await store.open()
        except StoreUnavailable as exc:
            raise ConfigError(
                f"store.url ({redact_url(config.store.url)}): {exc.message}; check that the "
                "database is running and exists, or that the file's folder is writable"
            ) from None
        stack.push_async_callback(store.close)
        engine = engine_from_config(config.policy)
        await engine.start()
        stack.push_async_callback(engine.close)
        shadow = None
        if config.policy.shadow is not None:  # candidates: embedded, one evaluator, aside
            shadow = engine_from_config(
                config.policy.model_copy(
                    update={"engine": "embedded", "path": config.policy.shadow, "workers": 1}
                )
            )
            await shadow.start()
            stack.push_async_callback(shadow.close)
        journal = journal_from_config(config, metrics)
        await journal.open()
        stack.push_async_callback(journal.close)
        pools = Pools(config.tools)
        stack.push_async_callback(pools.close)
        approvals_store = approvals_store_for(config.store)
        try:
            await approvals_store.open()
        except StoreUnavailable as exc:
            raise ConfigError(
                f"store.url ({redact_url(config.store.url)}): {exc.message}"
            ) from None
        stack.push_async_callback(approvals_store.close)
        background = Background()
        approvals = Approvals(config, approvals_store, metrics, background)
        deps = Deps(
            config=config,
            store=store,
            engine=engine,
            journal=journal,
            tracer=Tracer(provider),
            pools=pools,
            metrics=metrics,
            approvals=approvals,
            pinning=Pinning(approvals, config.pinning.mode),
            shadow=shadow,
            background=background,
        )
        app[DEPS] = deps
        # Settles the store refused are retried for a while before the store closes.
        stack.push_async_callback(deps.background.drain, BACKGROUND_GRACE_S)
        purge = asyncio.create_task(purge_loop(store, PURGE_INTERVAL_S))
        stack.callback(purge.cancel)
        logger.info(
            "handrail ready: engine=%s store=%s exporter=%s",
            engine.name,
            config.store.url.split("://", 1)[0],
            config.tracing.exporter,
        )
        yield
