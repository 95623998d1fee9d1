"""Pinned MCP tool definitions (rug-pull protection, ``pinning.mode: hold``).

The first listing of a server's tools pins each tool's definition (name, description, input
schema, annotations) by its hash, in the store, so every replica holds the same pins. A
later listing whose definition of a tool differs from its pin:

- hides that tool from the agent's ``tools/list``;
- holds its calls (``approval_pending``) as one approval request of kind
  ``tool_definition`` showing the old and the new definition side by side;
- once a person approves the request, the new definition is pinned (``Approvals.decide``)
  and the tool is listed and callable again; a rejection keeps it hidden.

The policy sees ``input.call.definition_changed`` either way (``pinning.mode: off`` pins
nothing and it stays false). Known pins are kept in memory; a definition that differs from
the remembered pin is checked against the store before it counts as changed, so an approval
made on another replica is honoured here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from proxy.approvals.gate import Approvals
from proxy.approvals.model import Approval, Kind, State, new_id
from proxy.errors import ApprovalPending, PolicyDenied

logger = logging.getLogger(__name__)

FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
REASON = "the tool's definition changed since it was pinned"


def definition(tool: dict[str, Any]) -> dict[str, Any]:
    """What a pin covers: what tells a model what the tool does and takes."""
    return {name: tool.get(name) for name in FIELDS}


def digest(defn: dict[str, Any]) -> str:
    text = json.dumps(defn, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class Pinning:
    def __init__(self, approvals: Approvals, mode: str) -> None:
        self.approvals = approvals
        self.on = mode == "hold"
        self._pins: dict[tuple[str, str], str] = {}
        self._changed: dict[tuple[str, str], str] = {}
        """(server, tool) -> the open ``tool_definition`` approval's id."""

    async def review(self, server: str, tools: list[dict[str, Any]]) -> set[str]:
        """Pin what is new; the names of the listed tools whose definition changed."""
        if not self.on:
            return set()
        changed: set[str] = set()
        for tool in tools:
            name = tool.get("name")
            if not isinstance(name, str):
                continue
            defn = definition(tool)
            now = digest(defn)
            if self._pins.get((server, name)) == now:
                self._changed.pop((server, name), None)
                continue
            store = self.approvals.store
            pinned = await store.pin(server, name, now, defn)
            self._pins[(server, name)] = pinned
            if pinned == now:
                self._changed.pop((server, name), None)
                continue
            changed.add(name)
            old = await store.pinned(server, name)
            self._changed[(server, name)] = await self._request(
                server, name, old[1] if old else {}, defn, now
            )
        return changed

    def changed(self, server: str, name: str) -> str | None:
        """The open approval of a tool whose definition changed, if it did."""
        return self._changed.get((server, name)) if self.on else None

    async def hold(self, server: str, name: str) -> None:
        """A call to a tool whose definition changed waits for that change's approval."""
        approval_id = self.changed(server, name)
        if approval_id is None:
            return
        approval = await self.approvals.store.get(approval_id)
        state = approval.shown_state() if approval is not None else None
        if state in (State.APPROVED, State.USED):
            self._changed.pop((server, name), None)  # approved: the new definition is pinned
            self._pins.pop((server, name), None)
            return
        if approval is not None and state is State.REJECTED:
            raise PolicyDenied(
                f"the new definition of tool {name!r} was rejected by a person: "
                + (approval.reason or "no reason given"),
                reasons=[approval.reason or "the tool's new definition was rejected"],
                approval_id=approval_id,
            )
        raise ApprovalPending(
            f"the definition of tool {name!r} changed since it was pinned: a person must "
            f"approve the new definition ({approval_id}) before it can be called",
            approval_id=approval_id,
            approval_url=self.approvals.page_url(approval_id),
            reasons=[REASON],
            expires=approval.expires if approval is not None else None,
        )

    async def _request(
        self, server: str, name: str, old: dict[str, Any], new: dict[str, Any], now: str
    ) -> str:
        created = time.time()
        fresh = Approval(
            id=new_id(),
            kind=Kind.TOOL_DEFINITION,
            tool=server,
            agent="",
            run_id="",
            fingerprint=now,
            input={"old": old, "new": new},
            reasons=(REASON,),
            state=State.PENDING,
            created=created,
            expires=created + self.approvals.settings.ttl_s,
            extra={"name": name},
        )
        approval = await self.approvals.store.request(fresh)
        if approval.id == fresh.id:
            logger.warning(
                "the definition of MCP tool %r on %r changed since it was pinned: hidden and "
                "held until approved (%s)",
                name,
                server,
                approval.id,
            )
            self.approvals.requested(approval)
        return approval.id
