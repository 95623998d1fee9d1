"""What the admin plane's JSON endpoints share: reading a request's JSON object body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest


async def json_object(request: web.Request) -> dict[str, Any]:
    """An admin request's JSON object body (empty: ``{}``); 400 ``bad_request`` otherwise."""
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
