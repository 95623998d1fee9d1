"""``GET /runs/{id}`` (the ledger) and ``POST /runs/{id}/close`` (the finish line), and the
same for ``handrail runs`` from the journal and the store directly."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest, HandrailError
from proxy.http.body import json_object
from proxy.http.keys import DEPS
from proxy.runs.ledger import Ledger, entry
from proxy.store.base import Store
from proxy.tracing.base import CallQuery, Journal

MAX_CALLS = 10_000
DATA_APP = web.AppKey("runs_data_app", web.Application)


class NotFound(HandrailError):
    status, code = 404, "not_found"


async def build_ledger(journal: Journal, store: Store, run_id: str) -> Ledger:
    await journal.flush()
    rows = await journal.query(CallQuery(run_id=run_id, limit=MAX_CALLS))
    rows.reverse()
    closed = await store.closed_run(run_id)
    return Ledger(
        run_id,
        [entry(row) for row in rows],
        {"at": closed[0], "by": closed[1]} if closed else None,
    )


async def get_run(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP][DEPS]
    ledger = await build_ledger(deps.journal, deps.store, request.match_info["id"])
    if not ledger.entries and ledger.closed is None:
        raise NotFound(f"no calls recorded for run {request.match_info['id']!r}")
    return web.json_response(ledger.to_json())


async def close_run(request: web.Request) -> web.Response:
    deps = request.app[DATA_APP][DEPS]
    body = await json_object(request)
    by = body.get("by") or "admin-api"
    if not isinstance(by, str) or len(by) > 200:
        raise BadRequest('"by" must be a string (who closes the run)')
    run_id = request.match_info["id"]
    newly = await deps.store.close_run(run_id, by)
    closed = await deps.store.closed_run(run_id)
    assert closed is not None
    return web.json_response(
        {"run": run_id, "closed": True, "was_open": newly, "closed_at": closed[0], "by": closed[1]}
    )


def add_routes(app: web.Application, data_app: web.Application) -> None:
    app[DATA_APP] = data_app
    app.router.add_get("/runs/{id}", get_run)
    app.router.add_post("/runs/{id}/close", close_run)
