"""The admin plane: health, readiness, metrics, the journal, unknown keys and policy reloads.

It runs on its own listener beside the data plane and reads the data app's backends.
A configured token is required as ``Authorization: Bearer <token>`` (constant-time compare),
except on the probes (``/healthz``, ``/readyz``).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import asdict

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.approvals import api as approvals_api
from proxy.approvals import ui as approvals_ui
from proxy.errors import BadRequest, HandrailError
from proxy.http.keys import CONFIG, DEPS, METRICS
from proxy.http.middleware import error_middleware
from proxy.mcp.readiness import MCP_READINESS
from proxy.runs import api as runs_api
from proxy.store.records import resolution
from proxy.tracing.base import CallQuery

logger = logging.getLogger(__name__)

DATA_APP = web.AppKey("data_app", web.Application)


class Unauthorized(HandrailError):
    status, code = 401, "unauthorized"


class NotFound(HandrailError):
    status, code = 404, "not_found"


class NotUnknown(HandrailError):
    status, code = 409, "not_unknown"


PROBES = frozenset({"/healthz", "/readyz"})
"""Open without the token: a kubelet's probe carries none, and they reveal no call data."""
UI_PREFIX = "/ui"
"""The approval page checks its own way in (a login cookie, or a signed link)."""


def _bearer_auth(token: str) -> web.middleware:  # type: ignore[valid-type]
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PROBES and not _is_ui(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized("a valid admin bearer token is required")
        return await handler(request)

    return check


def _is_ui(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP].get(DEPS)
    if deps is None:
        return web.json_response({"ready": False, "detail": "starting"}, status=503)
    checks: dict[str, dict[str, object]] = {}
    try:
        await deps.store.ping()
        checks["store"] = {"ready": True, "detail": deps.config.store.url.split("://", 1)[0]}
    except HandrailError as exc:
        checks["store"] = {"ready": False, "detail": exc.message}
    checks["policy"] = asdict(deps.engine.status())
    checks.update(await request.app[DATA_APP][MCP_READINESS].checks())
    ready = all(bool(c["ready"]) for c in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[DATA_APP][METRICS].registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def calls(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP][DEPS]
    try:
        limit = int(request.query.get("limit", "100"))
        since = float(request.query["since"]) if "since" in request.query else None
    except ValueError:
        raise BadRequest("limit and since must be numbers") from None
    await deps.journal.flush()
    rows = await deps.journal.query(
        CallQuery(
            run_id=request.query.get("run"),
            tool=request.query.get("tool"),
            decision=request.query.get("decision"),
            since=since,
            limit=max(1, min(limit, 10_000)),
        )
    )
    return web.json_response({"calls": rows})


async def verify_journal(request: web.Request) -> web.Response:
    """The journal's hash chain, walked: 200 intact, 409 altered or missing rows named."""
    deps = request.app[DATA_APP][DEPS]
    await deps.journal.flush()
    report = await deps.journal.verify()
    return web.json_response(report.to_json(), status=200 if report.intact else 409)


async def unknown_keys(request: web.Request) -> web.Response:
    """Keys whose outcome is unknown: what an operator has to resolve."""
    deps = request.app[DATA_APP][DEPS]
    try:
        limit = max(1, min(int(request.query.get("limit", "100")), 10_000))
    except ValueError:
        raise BadRequest("limit must be a number") from None
    records = await deps.store.unknown_keys(limit)
    return web.json_response({"keys": [r.as_dict() for r in records]})


async def key_record(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP][DEPS]
    tool, key = request.match_info["tool"], request.match_info["key"]
    record = await deps.store.inspect(tool, key)
    if record is None:
        raise NotFound(f"no record for key {key!r} of tool {tool!r}")
    return web.json_response(record.as_dict())


async def resolve_key(request: web.Request) -> web.Response:
    """``{"failed": true}`` lets the retry run; ``{"answer": {...}}`` replays that answer."""
    deps = request.app[DATA_APP][DEPS]
    tool, key = request.match_info["tool"], request.match_info["key"]
    try:
        document = await request.json()
    except ValueError:
        raise BadRequest('the body must be JSON: {"failed": true} or {"answer": {...}}') from None
    try:
        response = resolution(document)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    was = await deps.store.resolve(tool, key, response)
    if was is None:
        raise NotFound(f"no record for key {key!r} of tool {tool!r}")
    if was != "unknown":
        raise NotUnknown(f"key {key!r} of tool {tool!r} is {was}, not unknown: nothing to resolve")
    now = "released" if response is None else "completed"
    logger.warning("idempotency key %r of tool %r resolved by an operator: %s", key, tool, now)
    return web.json_response({"tool": tool, "key": key, "was": was, "now": now})


async def reload_policies(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP][DEPS]
    status = await deps.engine.reload()
    return web.json_response(asdict(status), status=200 if status.ready else 503)


def build_admin_app(data_app: web.Application) -> web.Application:
    token = data_app[CONFIG].admin.token
    middlewares = [error_middleware] + ([_bearer_auth(token)] if token else [])
    app = web.Application(middlewares=middlewares)
    app[DATA_APP] = data_app
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/calls", calls)
    app.router.add_get("/calls/verify", verify_journal)
    app.router.add_get("/keys", unknown_keys)
    app.router.add_get("/keys/{tool}/{key}", key_record)
    app.router.add_post("/keys/{tool}/{key}", resolve_key)
    app.router.add_post("/policies/reload", reload_policies)
    approvals_api.add_routes(app, data_app)
    approvals_ui.add_routes(app, data_app)
    runs_api.add_routes(app, data_app)
    return app
