"""The benchmark's other processes: a fast tool, a bare pass-through proxy, an OTLP sink.

python bench/servers.py upstream --port 9001
python bench/servers.py passthrough --port 9002 --upstream http://127.0.0.1:9001
python bench/servers.py otlp-sink --port 4318
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import uvloop
from aiohttp import web

SLOW_TOOL_S = 0.020
"""Under ``/slow/``: a tool that does some work before it answers, as a SaaS API write does."""


def upstream_app() -> web.Application:
    """A fast JSON tool: answers every call at once, with a small body (``/slow/``: after
    ``SLOW_TOOL_S``)."""
    count = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        body = await request.read()
        if request.path.startswith("/slow/"):
            await asyncio.sleep(SLOW_TOOL_S)
        return web.json_response({"ok": True, "n": count, "bytes": len(body)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
}


def passthrough_app(upstream: str) -> web.Application:
    """The floor for a Python hop: pooled aiohttp forwarding, no policy, store or trace."""

    async def start(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256), auto_decompress=False
        )
        yield
        await app["session"].close()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = upstream + "/" + request.match_info["tail"]
        async with request.app["session"].request(
            request.method, url, headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(start)
    app.router.add_route("*", "/tools/{tool}/{tail:.*}", handle)
    return app


def otlp_sink_app() -> web.Application:
    """Accepts OTLP/HTTP exports and counts them, so export cost is real but cheap."""
    stats = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        stats["requests"] += 1
        stats["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def show(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(stats))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", show)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("upstream", "passthrough", "otlp-sink"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args()
    app = {
        "upstream": upstream_app,
        "otlp-sink": otlp_sink_app,
        "passthrough": lambda: passthrough_app(args.upstream),
    }[args.role]()
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
