"""A small server speaking OPA's REST API, standing in for the OPA binary in tests.

The package registries do not carry the ``opa`` binary (and there is no Docker here), so the
``opa`` engine is tested against this: ``POST /v1/data/{path}`` with ``{"input": ...}``
answers ``{"result": ..., "decision_id": ...}`` (no ``result`` when the document is
undefined, like OPA), ``GET /v1/policies`` lists the served modules with their ``raw``
source (as OPA does, minus the AST) and ``GET /health`` answers 200. Any data path can be
asked: the decision, ``visible`` or ``result``.

It evaluates the same policy files with OPA's own Go evaluator (``opa_bindings``, pip
``opa-golib-python-bindings``) when that is installed, so the ``opa`` engine is tested against
real OPA semantics; without it (or with ``backend="embedded"``) with the embedded engine's
evaluator (regorus). ``mode`` lets a test make it
misbehave: ``slow``, ``garbage`` (not JSON), ``no_result``, ``wrong_shape``, ``error`` (500),
``no_policies`` (``GET /v1/policies`` answers 403, as an OPA with authorization would).
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from proxy.errors import PolicyUnavailable
from proxy.policy.bundle import compile_files, rule_path
from proxy.policy.embedded import evaluate, read_policy_files
from proxy.policy.query import adopt
from proxy.policy.refs import defines_rule

MODE = web.AppKey("mode", dict)

Backend = Literal["embedded", "opa"]
HAVE_OPA = importlib.util.find_spec("opa_bindings") is not None
DEFAULT_BACKEND: Backend = "opa" if HAVE_OPA else "embedded"
_Evaluate = Callable[[str, Any], tuple[bool, Any]]
"""``(data path, input) -> (defined, value)``; raises ``PolicyUnavailable`` on failure."""


def _embedded(root: Path) -> _Evaluate:
    files = read_policy_files(root)
    compiled, engine = compile_files(root, files, "handrail/decision")
    adopt(compiled, engine)  # evaluated on this (the loop's) thread

    def run(path: str, document: Any) -> tuple[bool, Any]:
        package, _, rule = path.rpartition("/")
        if not defines_rule(files.modules.values(), package.replace("/", "."), rule):
            return False, None  # OPA: an undefined document, not an error
        return evaluate(compiled, rule_path(package, rule), document)

    return run


def _opa(root: Path) -> _Evaluate:
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

    files = read_policy_files(root)
    engine = OpaEngine()
    for name, source in files.modules.items():
        engine.add_policy(name, source)
    engine.add_data(files.data)

    def run(path: str, document: Any) -> tuple[bool, Any]:
        try:
            return True, engine.eval_document(path.replace("/", "."), document)
        except OpaUndefinedError:
            return False, None
        except OpaError as exc:
            raise PolicyUnavailable(f"OPA: {exc}") from None

    return run


def build_opa_app(
    policy_path: Path, slow_s: float = 2.0, backend: Backend = DEFAULT_BACKEND
) -> web.Application:
    app = web.Application()
    state: dict[str, Any] = {"mode": "ok", "requests": 0, "paths": []}
    app[MODE] = state
    engine: dict[str, _Evaluate] = {}

    def evaluator() -> _Evaluate:
        if "run" not in engine:
            engine["run"] = _opa(policy_path) if backend == "opa" else _embedded(policy_path)
        return engine["run"]

    async def data(request: web.Request) -> web.StreamResponse:
        state["requests"] += 1
        path = request.match_info["path"].strip("/")
        state["paths"].append(path)
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
        try:
            defined, value = evaluator()(path, body.get("input"))
        except PolicyUnavailable as exc:
            return web.json_response({"code": "internal_error", "message": exc.message}, status=500)
        answer: dict[str, Any] = {"decision_id": decision_id}
        if defined:
            answer["result"] = value
        return web.json_response(answer)

    async def policies(request: web.Request) -> web.Response:
        if state["mode"] == "no_policies":
            return web.json_response({"code": "unauthorized"}, status=403)
        # `opa run -s DIR` serves the test modules too.
        modules = read_policy_files(policy_path, with_tests=True).modules
        listing = [{"id": name, "raw": source} for name, source in modules.items()]
        return web.json_response({"result": listing})

    async def health(request: web.Request) -> web.Response:
        if state["mode"] == "error":
            return web.json_response({"error": "unhealthy"}, status=500)
        return web.json_response({})

    def reload() -> None:
        engine.clear()

    state["reload"] = reload
    app.router.add_post("/v1/data/{path:.+}", data)
    app.router.add_get("/v1/policies", policies)
    app.router.add_get("/health", health)
    return app
