"""A small server speaking OPA's REST Data API, standing in for the OPA binary in tests.

The package registries do not carry the ``opa`` binary (and there is no Docker here), so the
``opa`` engine is tested against this: ``POST /v1/data/{path}`` with ``{"input": ...}``
answers ``{"result": ..., "decision_id": ...}`` (no ``result`` when the document is
undefined, like OPA) and ``GET /health`` answers 200. It evaluates the same policy files
with regopy. ``mode`` lets a test make it misbehave: ``slow``, ``garbage`` (not JSON),
``no_result``, ``wrong_shape``, ``error`` (500).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.errors import PolicyUnavailable
from proxy.policy.embedded import evaluate, load_interpreter, read_policy_files

MODE = web.AppKey("mode", dict)


def _compile(root: Path, path: str) -> Any:
    interpreter = load_interpreter(read_policy_files(root))
    return interpreter.build(None, [path])


def build_opa_app(policy_path: Path, slow_s: float = 2.0) -> web.Application:
    app = web.Application()
    state: dict[str, Any] = {"mode": "ok", "requests": 0}
    app[MODE] = state
    bundles: dict[str, Any] = {}

    async def data(request: web.Request) -> web.StreamResponse:
        state["requests"] += 1
        path = request.match_info["path"].strip("/")
        mode = state["mode"]
        if mode == "slow":
            await asyncio.sleep(slow_s)
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if mode == "error":
            return web.json_response({"code": "internal_error", "message": "boom"}, status=500)
        body = await request.json()
        decision_id = str(uuid.uuid4())
        if mode == "no_result":
            return web.json_response({"decision_id": decision_id})
        if mode == "wrong_shape":
            return web.json_response({"result": {"allow": "yes"}, "decision_id": decision_id})
        if path not in bundles:
            bundles[path] = _compile(policy_path, path)
        try:
            defined, value = evaluate(bundles[path], path, body.get("input"))
        except PolicyUnavailable as exc:
            return web.json_response({"code": "internal_error", "message": exc.message}, status=500)
        answer: dict[str, Any] = {"decision_id": decision_id}
        if defined:
            answer["result"] = value
        return web.json_response(answer)

    async def health(request: web.Request) -> web.Response:
        if state["mode"] == "error":
            return web.json_response({"error": "unhealthy"}, status=500)
        return web.json_response({})

    def reload() -> None:
        bundles.clear()

    state["reload"] = reload
    app.router.add_post("/v1/data/{path:.+}", data)
    app.router.add_get("/health", health)
    return app
