"""Holding a call for a person: the step the pipeline takes when the policy asks for one.

``Approvals.hold`` records (or finds) the call's approval request, tells the webhook about a
new one, and waits up to ``approvals.wait_s`` for a decision:

- approved: the approval is spent on this execution (one caller wins, across replicas) and
  the call goes on to the tool;
- rejected: 403 ``policy_denied`` with the approver's reason;
- still pending: 403 ``approval_pending`` with the approval's id and page. The agent's retry
  of the same call (same agent and payload fingerprint, hence the same key) finds the same
  request and, once it is approved, goes through once.

The wait is a poll of the store (decisions may be made on another replica) woken early by a
decision made here. While it waits, the call's key stays claimed (its lease kept alive), so
concurrent retries of the same key get 409 instead of a second request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from typing import Any

from proxy.approvals.model import Approval, Kind, State, new_id, sign
from proxy.approvals.notify import notify
from proxy.approvals.store import ApprovalStore
from proxy.background import Background
from proxy.call import Call
from proxy.config import Config
from proxy.errors import ApprovalPending, PolicyDenied
from proxy.metrics import Metrics
from proxy.tracing.attributes import captured

logger = logging.getLogger(__name__)

POLL_S = 0.25
PAGE_TOKEN_TTL_S = 3600.0
"""How long the link in a notification opens the approval's page without the admin token."""
REQUEST_STATE_PURPOSE = "mcp-approval"
PAGE_PURPOSE = "approval-page"


def signing_key(config: Config) -> bytes:
    """``approvals.signing_key``; else derived from the admin token; else random for this
    process (then a link or an MCP ``requestState`` is good on this replica only)."""
    if config.approvals.signing_key:
        return hashlib.sha256(config.approvals.signing_key.encode()).digest()
    if config.admin.token:
        return hashlib.sha256(b"handrail approvals\0" + config.admin.token.encode()).digest()
    return secrets.token_bytes(32)


class Approvals:
    def __init__(
        self, config: Config, store: ApprovalStore, metrics: Metrics, background: Background
    ) -> None:
        self.config = config
        self.settings = config.approvals
        self.store = store
        self.metrics = metrics
        self.background = background
        self.key = signing_key(config)
        self.admin_url: str | None = None
        """The admin listener as bound (its port may have been 0), for links to ``/ui``."""
        self._decided: dict[str, asyncio.Event] = {}

    # -- the pipeline's step ------------------------------------------------------------

    async def hold(self, call: Call, bound: str | None = None) -> Approval:
        """Return the spent approval once the call may go on; raise when it may not.

        ``bound``: the approval an MCP client's signed ``requestState`` names (already
        checked to be this agent's, for this payload)."""
        started = time.monotonic()
        deadline = started + self.settings.wait_s
        approval = await self._request(call, bound)
        while True:
            state = approval.shown_state()
            if state is State.APPROVED:
                if await self.store.use(approval.id):
                    self._event(call, "approval.decided", approval, started)
                    self.metrics.approvals.labels(approval.kind.value, "used").inc()
                    return approval
                approval = await self._request(call, None)  # spent by another execution
                continue
            if state is State.REJECTED:
                self._event(call, "approval.decided", approval, started)
                raise PolicyDenied(
                    "rejected by a person: " + (approval.reason or "no reason given"),
                    reasons=[approval.reason or "rejected by a person"],
                    approval_id=approval.id,
                    decided_by=approval.decided_by,
                )
            if state in (State.EXPIRED, State.USED):
                approval = await self._request(call, None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if call.on_progress is not None:
                call.on_progress()  # the key stays claimed while a person decides
            await self._wait(approval.id, min(POLL_S, remaining))
            approval = await self.store.get(approval.id) or approval
        self._event(call, "approval.pending", approval, started)
        raise ApprovalPending(
            f"held for human approval ({approval.id}): ask a person to approve it, then "
            "retry the same call; it runs once approved",
            approval_id=approval.id,
            approval_url=self.page_url(approval.id),
            expires=approval.expires,
            reasons=list(approval.reasons),
        )

    async def _request(self, call: Call, bound: str | None) -> Approval:
        if bound is not None:
            found = await self.store.get(bound)
            if (
                found is not None
                and found.kind is Kind.CALL
                and found.agent == call.agent_id
                and found.fingerprint == call.fingerprint
                and found.shown_state() in (State.PENDING, State.APPROVED)
            ):
                return found
        now = time.time()
        fresh = Approval(
            id=new_id(),
            kind=Kind.CALL,
            tool=call.tool_name,
            agent=call.agent_id,
            run_id=call.run_id,
            fingerprint=call.fingerprint or "",
            input=call_input(call, self.config),
            reasons=tuple(call.decision.reasons if call.decision else ()),
            state=State.PENDING,
            created=now,
            expires=now + self.settings.ttl_s,
            idempotency_key=call.idempotency_key,
            trace_id=call.trace_id,
        )
        approval = await self.store.request(fresh)
        if approval.id == fresh.id:
            self.requested(approval)
            if call.span is not None:
                call.span.add_event("approval.requested", {"handrail.approval.id": approval.id})
        call.extra["approval_id"] = approval.id
        return approval

    def requested(self, approval: Approval) -> None:
        """A new request: counted, logged, and sent to the webhook (off the call's path)."""
        self.metrics.approvals.labels(approval.kind.value, "requested").inc()
        logger.info(
            "approval %s requested: %s wants %s",
            approval.id,
            approval.agent or "(anonymous)",
            approval.tool,
            extra={"tool": approval.tool, "run_id": approval.run_id},
        )
        if self.settings.notify.url:
            self.background.spawn(
                notify(self.settings.notify, approval, self.page_url(approval.id), self.metrics)
            )

    async def _wait(self, approval_id: str, seconds: float) -> None:
        event = self._decided.setdefault(approval_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def _event(self, call: Call, name: str, approval: Approval, started: float) -> None:
        call.extra["approval_id"] = approval.id
        if call.span is None:
            return
        attributes: dict[str, Any] = {
            "handrail.approval.id": approval.id,
            "handrail.approval.state": approval.shown_state().value,
            "handrail.approval.wait_s": round(time.monotonic() - started, 3),
        }
        if approval.decided_by:
            attributes["handrail.approval.decided_by"] = approval.decided_by
        call.span.add_event(name, attributes)
        call.span.set_attribute("handrail.approval.id", approval.id)

    # -- people's side --------------------------------------------------------------------

    async def decide(
        self, approval_id: str, approve: bool, by: str, reason: str | None
    ) -> tuple[Approval | None, bool]:
        approval, changed = await self.store.decide(approval_id, approve, by, reason)
        if changed and approval is not None:
            outcome = "approved" if approve else "rejected"
            self.metrics.approvals.labels(approval.kind.value, outcome).inc()
            logger.info("approval %s %s by %s", approval_id, outcome, by)
            if approve and approval.kind is Kind.TOOL_DEFINITION:
                new = approval.input.get("new")
                if isinstance(new, dict):
                    await self.store.repin(
                        approval.tool, str(approval.extra.get("name")), approval.fingerprint, new
                    )
        event = self._decided.pop(approval_id, None)
        if event is not None:
            event.set()
        return approval, changed

    def page_url(self, approval_id: str) -> str:
        admin = self.admin_url or f"http://{self.config.admin.host}:{self.config.admin.port}"
        base = self.settings.ui_url or f"{admin}/ui"
        token = sign(self.key, PAGE_PURPOSE, {"id": approval_id}, PAGE_TOKEN_TTL_S)
        return f"{base.rstrip('/')}/approvals/{approval_id}?t={token}"


def call_input(call: Call, config: Config) -> dict[str, Any]:
    """What the person sees of the call: redacted and bounded as traces capture it."""
    input_value, _ = captured(call, config.tracing.capture)
    shown: Any = input_value
    if input_value is not None:
        try:
            shown = json.loads(input_value)
        except ValueError:
            pass
    return {
        "method": call.method,
        "path": call.path,
        "call": call.mcp.name if call.mcp is not None else None,
        "input": shown,
    }
