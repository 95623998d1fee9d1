"""Runs the data and admin listeners until a signal, then drains in-flight calls."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.config import Config, redact_url
from proxy.errors import ConfigError
from proxy.http.app import build_admin_app, build_app
from proxy.http.keys import DEPS
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
        """Bind both listeners first, then open the backends: a port in use stops start-up
        before a store is opened or a policy worker started."""
        listen, admin = self.config.listen, self.config.admin
        data_sock = _bind("listen", listen.host, listen.port)
        try:
            admin_sock = _bind("admin", admin.host, admin.port)
        except BaseException:
            data_sock.close()
            raise
        try:
            await self._runner.setup()
            await self._admin_runner.setup()
            await web.SockSite(self._runner, data_sock).start()
            await web.SockSite(self._admin_runner, admin_sock).start()
        except BaseException:
            data_sock.close()
            admin_sock.close()
            raise
        listening = Listening(_url(self._runner), _url(self._admin_runner))
        self.app[DEPS].approvals.admin_url = listening.admin_url
        return listening

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._admin_runner.cleanup()


def _bind(key: str, host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            reuse_port=False,
        )
    except OSError as exc:
        why = "is in use (another handrail?)" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(
            f"{key}: cannot listen on {host}:{port}: the address {why}; "
            f"set {key}.port (or --port) to a free port"
        ) from None
    sock.setblocking(False)
    return sock


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
    tools = ", ".join(f"{n} ({t.kind})" for n, t in config.tools.items()) or (
        "none yet: add one under tools: in a handrail.yaml (see examples/handrail.yaml) "
        "and run handrail serve -c handrail.yaml"
    )
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
