"""Where approval requests and pinned tool definitions live: beside the idempotency store,
in the same database (SQLite file or PostgreSQL), so replicas on PostgreSQL share them.

One small protocol, two backends (``sqlite.py``, ``postgres.py``). Every state change is a
single conditional statement, so two replicas deciding, or two retries using, the same
approval cannot both win: ``decide`` only moves a ``pending`` request, ``use`` only an
``approved`` one, and each says whether it did.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.approvals.model import Approval, State
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
