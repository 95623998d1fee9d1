"""Where approval requests and pinned tool definitions live: beside the idempotency store,
in the same database (SQLite file or PostgreSQL), so replicas on PostgreSQL share them.

One small protocol, two backends (``sqlite.py``, ``postgres.py``). Every state change is a
single conditional statement, so two replicas deciding, or two retries using, the same
approval cannot both win: ``decide`` only moves a ``pending`` request, ``use`` only an
``approved`` one, and each says whether it did.
"""

from __future__ import annotations

import json
from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.approvals.model import Approval, Kind, State
from proxy.config import StoreConfig
from proxy.errors import ConfigError


class ApprovalStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def request(self, approval: Approval) -> Approval:
        """The standing request for the same kind, tool, agent and fingerprint: a rejection
        until it expires (the answer stays no), else the open one (pending or approved,
        unexpired), else ``approval`` stored as new."""

    async def get(self, approval_id: str) -> Approval | None: ...

    async def list(self, state: State | None, limit: int) -> list[Approval]:
        """Newest first; ``state`` as a reader sees it (``expired`` included)."""

    async def decide(
        self, approval_id: str, approve: bool, by: str, reason: str | None
    ) -> tuple[Approval | None, bool]:
        """Approve or reject a pending, unexpired request: ``(request, changed)``."""

    async def use(self, approval_id: str) -> bool:
        """Spend an approved, unexpired request on one execution: true for one caller only."""

    async def pin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> str:
        """Pin a tool's definition unless one is pinned: the digest now pinned."""

    async def pinned(self, server: str, name: str) -> tuple[str, dict[str, Any]] | None: ...

    async def repin(self, server: str, name: str, digest: str, definition: dict[str, Any]) -> None:
        """Pin a new definition in place of the old (a person approved the change)."""


def approvals_store(config: StoreConfig) -> ApprovalStore:
    """The backend for ``store.url``, not yet opened."""
    scheme = urlsplit(config.url).scheme
    if scheme == "sqlite":
        from proxy.approvals.sqlite import SqliteApprovals
        from proxy.store import sqlite_path

        return SqliteApprovals(sqlite_path(config.url))
    if scheme in ("postgresql", "postgres"):
        from proxy.approvals.postgres import PostgresApprovals

        return PostgresApprovals(config.url)
    raise ConfigError(f"store.url: unknown scheme {scheme!r}")


COLUMNS = (
    "id, kind, tool, agent, run_id, fingerprint, input, reasons, state, created, expires, "
    "idempotency_key, trace_id, decided_by, decided_at, reason, used_at, extra"
)


def from_row(row: Any) -> Approval:
    """An ``Approval`` from a row in ``COLUMNS`` order (JSON columns as text)."""
    return Approval(
        id=row[0],
        kind=Kind(row[1]),
        tool=row[2],
        agent=row[3],
        run_id=row[4],
        fingerprint=row[5],
        input=json.loads(row[6]),
        reasons=tuple(json.loads(row[7])),
        state=State(row[8]),
        created=float(row[9]),
        expires=float(row[10]),
        idempotency_key=row[11],
        trace_id=row[12],
        decided_by=row[13],
        decided_at=None if row[14] is None else float(row[14]),
        reason=row[15],
        used_at=None if row[16] is None else float(row[16]),
        extra=json.loads(row[17]) if row[17] else {},
    )


def to_row(a: Approval) -> tuple[Any, ...]:
    return (
        a.id,
        a.kind.value,
        a.tool,
        a.agent,
        a.run_id,
        a.fingerprint,
        json.dumps(a.input, ensure_ascii=False, sort_keys=True),
        json.dumps(list(a.reasons), ensure_ascii=False),
        a.state.value,
        a.created,
        a.expires,
        a.idempotency_key,
        a.trace_id,
        a.decided_by,
        a.decided_at,
        a.reason,
        a.used_at,
        json.dumps(a.extra, ensure_ascii=False, sort_keys=True),
    )
