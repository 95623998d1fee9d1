"""Runs the data and admin listeners until a signal, then drains in-flight calls."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from proxy.config import Config
from proxy.http.app import build_admin_app, build_app
from proxy.tracing import describe_exporter

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Listening:
    data_url: str
    admin_url: str


class Server:
    """Both listeners of one proxy; ``start`` binds, ``stop`` drains and closes."""

    def __init__(self, config: Config, *, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.config = config
        self.app = build_app(config)
        self.admin_app = build_admin_app(self.app)
        self._runner = web.AppRunner(self.app, shutdown_timeout=grace_s, access_log=None)
        self._admin_runner = web.AppRunner(self.admin_app, access_log=None)

    async def start(self) -> Listening:
        await self._runner.setup()
        await self._admin_runner.setup()
        listen, admin = self.config.listen, self.config.admin
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        admin_site = web.TCPSite(self._admin_runner, admin.host, admin.port, reuse_address=True)
        await admin_site.start()
        return Listening(_url(self._runner), _url(self._admin_runner))

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._admin_runner.cleanup()


def redact_url(url: str) -> str:
    """A store URL fit for a log line: any password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def serve(config: Config, announce: Callable[[str], None]) -> None:
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    where = await server.start()
    tools = ", ".join(f"{n} ({t.kind})" for n, t in config.tools.items()) or "none"
    exporter = describe_exporter(config.tracing)
    policy = config.policy
    engine_at = policy.path if policy.engine == "embedded" else policy.opa.url
    announce(
        f"handrail listening on {where.data_url} (tools at /tools/NAME), "
        f"admin on {where.admin_url}\n"
        f"  engine: {policy.engine} ({engine_at})\n"
        f"  store: {redact_url(config.store.url)}\n"
        f"  exporter: {exporter}\n"
        f"  tools: {tools}"
    )
    await stop.wait()
    announce("handrail: shutting down, finishing in-flight calls")
    await server.stop()
