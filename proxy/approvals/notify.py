"""Telling people that a call waits: one JSON POST per new approval request.

The body suits an incoming Slack or Teams webhook as it is (``text``, with the link to the
approval's page) and carries the facts a relay may want (``id``, ``kind``, ``tool``,
``agent``, ``run_id``, ``reasons``, ``url``, ``expires``). Sent off the call's path; a
failure is logged and counted (``handrail_approval_notify_failures_total``), never retried
into a storm, and never blocks the call: the request stays visible in ``/ui`` and the API.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from proxy.approvals.model import Approval, Kind
from proxy.config import NotifyConfig
from proxy.metrics import Metrics

logger = logging.getLogger(__name__)


def message(approval: Approval, url: str) -> dict[str, Any]:
    who = approval.agent or "an unnamed agent"
    reasons = "; ".join(approval.reasons) or "the policy asks for a person"
    if approval.kind is Kind.TOOL_DEFINITION:
        name = approval.extra.get("name")
        what = f"the definition of MCP tool {name!r} on {approval.tool!r} changed"
    else:
        what = f"{who} wants to call {approval.tool!r}"
    return {
        "text": f"Handrail: approval needed: {what} ({reasons}). Approve or reject: {url}",
        "id": approval.id,
        "kind": approval.kind.value,
        "tool": approval.tool,
        "agent": approval.agent,
        "run_id": approval.run_id,
        "reasons": list(approval.reasons),
        "url": url,
        "expires": approval.expires,
    }


async def notify(config: NotifyConfig, approval: Approval, url: str, metrics: Metrics) -> None:
    assert config.url is not None
    try:
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(config.url, json=message(approval, url)) as response:
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        metrics.approval_notify_failures.inc()
        logger.warning("could not notify approvals.notify.url of %s: %s", approval.id, exc)
