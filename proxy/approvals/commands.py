"""``handrail approvals list|approve ID|reject ID [--reason R]``: through the admin API.

Deciding goes through the running proxy (not the store behind it) so a call that is
waiting wakes at once, and so the decision is made under the admin token like any other.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from proxy.config import Config

TIMEOUT_S = 10.0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(approval: dict[str, Any]) -> str:
    what = approval["input"].get("call") or approval["input"].get("path") or ""
    if approval["kind"] == "tool_definition":
        what = f"definition of {approval.get('extra', {}).get('name')}"
    reasons = "; ".join(approval["reasons"]) or "-"
    return (
        f"{approval['id']}  {approval['state']}  {approval['tool']} {what}  "
        f"agent={approval['agent'] or '-'}  run={approval['run_id']}  ({reasons})  "
        f"expires {_when(approval['expires'])}"
    )


def approvals_command(
    config: Config,
    action: str,
    approval_id: str | None,
    *,
    reason: str | None,
    state: str,
    admin_url: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    if action in ("approve", "reject") and not approval_id:
        err.write(f"handrail approvals {action} ID [--reason R]\n")
        return 2
    base = (admin_url or f"http://{config.admin.host}:{config.admin.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {config.admin.token}"} if config.admin.token else {}
    try:
        status, body = asyncio.run(_call(base, action, approval_id, reason, state, headers))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        err.write(f"handrail: cannot reach the admin API at {base}: {exc or 'timed out'}\n")
        err.write(
            "  is `handrail serve` running with this config? (--admin URL to point elsewhere)\n"
        )
        return 2
    if status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        err.write(f"handrail: {error.get('code', status)}: {error.get('message', body)}\n")
        return 1 if status == 409 else 2
    if as_json:
        out.write(json.dumps(body, indent=2) + "\n")
    elif action == "list":
        found = body["approvals"]
        for approval in found:
            out.write(_line(approval) + "\n")
        if not found:
            out.write(f"no {state} approvals ({base})\n")
    else:
        out.write(_line(body) + f"  decided by {body['decided_by']}\n")
    return 0


async def _call(
    base: str,
    action: str,
    approval_id: str | None,
    reason: str | None,
    state: str,
    headers: dict[str, str],
) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        if action == "list":
            request = session.get(f"{base}/approvals", params={"state": state})
        else:
            decision = {
                "approve": action == "approve",
                "reason": reason,
                "by": f"cli:{getpass.getuser()}",
            }
            request = session.post(f"{base}/approvals/{approval_id}", json=decision)
        async with request as response:
            return response.status, await response.json(content_type=None)
