"""The admin plane's approvals: ``GET /approvals``, ``GET /approvals/{id}``,
``POST /approvals/{id}`` with ``{"approve": true|false, "reason": "...", "by": "..."}``.

A decision is taken once: deciding a request that is no longer pending answers 409 with the
request as it stands (who decided, when), so two people clicking at once learn which won.
"""

from __future__ import annotations

from aiohttp import web

from proxy.approvals.gate import Approvals
from proxy.approvals.model import State
from proxy.errors import BadRequest, HandrailError
from proxy.http.body import json_object
from proxy.http.keys import DEPS

MAX_LIST = 500
DATA_APP = web.AppKey("approvals_data_app", web.Application)


class NotFound(HandrailError):
    status, code = 404, "not_found"


class AlreadyDecided(HandrailError):
    status, code = 409, "already_decided"


def approvals_of(request: web.Request) -> Approvals:
    return request.app[DATA_APP][DEPS].approvals


async def list_approvals(request: web.Request) -> web.Response:
    raw_state = request.query.get("state", "pending")
    try:
        state = None if raw_state == "all" else State(raw_state)
    except ValueError:
        choices = ", ".join([s.value for s in State] + ["all"])
        raise BadRequest(f"state must be one of {choices}") from None
    try:
        limit = min(int(request.query.get("limit", "100")), MAX_LIST)
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    found = await approvals_of(request).store.list(state, limit)
    return web.json_response({"approvals": [a.to_json() for a in found]})


async def get_approval(request: web.Request) -> web.Response:
    approval = await approvals_of(request).store.get(request.match_info["id"])
    if approval is None:
        raise NotFound(f"no approval {request.match_info['id']!r}")
    return web.json_response(approval.to_json())


async def decide(request: web.Request) -> web.Response:
    body = await json_object(request)
    approve = body.get("approve")
    if not isinstance(approve, bool):
        raise BadRequest('the body needs "approve": true or false')
    reason, by = body.get("reason"), body.get("by") or "admin-api"
    if reason is not None and not isinstance(reason, str):
        raise BadRequest('"reason" must be a string')
    if not isinstance(by, str) or len(by) > 200:
        raise BadRequest('"by" must be a string (who decides)')
    approval_id = request.match_info["id"]
    approval, changed = await approvals_of(request).decide(approval_id, approve, by, reason)
    if approval is None:
        raise NotFound(f"no approval {approval_id!r}")
    if not changed:
        state = approval.shown_state().value
        raise AlreadyDecided(
            f"approval {approval_id} is {state}, not pending: nothing to decide",
            approval=approval.to_json(),
        )
    return web.json_response(approval.to_json())


def add_routes(app: web.Application, data_app: web.Application) -> None:
    app[DATA_APP] = data_app
    app.router.add_get("/approvals", list_approvals)
    app.router.add_get("/approvals/{id}", get_approval)
    app.router.add_post("/approvals/{id}", decide)
