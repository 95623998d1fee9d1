"""The store: idempotency records and per-run counters, shared by every proxy replica.

One backend per module (``sqlite.py``, ``postgres.py``); only ``store_from_config``
imports them. Backends translate their driver's errors into ``StoreUnavailable``.
"""

from __future__ import annotations

from typing import Protocol

from proxy.call import Claim, RunCounters, StoredResponse
from proxy.store.records import KeyRecord


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema to the current version (migrations)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the store cannot be written (for /readyz)."""

    async def claim(
        self,
        tool: str,
        key: str,
        fingerprint: str,
        *,
        lease_s: float,
        ttl_s: float,
        takeover: bool = False,
        owner: str | None = None,
    ) -> Claim:
        """Atomically claim (tool, key). Exactly one concurrent caller gets ``OWNED``.

        A completed record with the same fingerprint gives ``COMPLETED`` with its response;
        any live record with another fingerprint gives ``MISMATCH``. An in-flight record
        whose lease has run out (its proxy crashed) becomes ``UNKNOWN``, as does any record
        marked so, until it expires or an operator resolves it; with ``takeover`` (the tool
        deduplicates the key itself) such a record is claimed again instead (``resent``).
        ``owner`` (default: a new one) lets the caller free a claim whose answer it lost.
        """

    async def complete(
        self,
        tool: str,
        key: str,
        owner: str,
        response: StoredResponse,
        *,
        keep_s: float | None = None,
    ) -> bool:
        """Keep the response for replay until the record's expiry, or for ``keep_s`` from
        now when given (also from ``unknown``: a late answer of the owner's settles it).
        False: the record is no longer ours."""

    async def release(self, tool: str, key: str, owner: str) -> bool:
        """Drop an owned record so that a retry runs the tool: it cannot have run."""

    async def mark_unknown(self, tool: str, key: str, owner: str, reason: str) -> bool:
        """The owned call may have run and its outcome is lost: retries get 409."""

    async def extend(self, tool: str, key: str, owner: str, lease_s: float) -> bool:
        """The call is still making progress at the tool: push its lease out to ``lease_s``."""

    async def inspect(self, tool: str, key: str) -> KeyRecord | None: ...

    async def unknown_keys(self, limit: int) -> list[KeyRecord]:
        """Records in ``unknown``, oldest first: what an operator has to resolve."""

    async def resolve(self, tool: str, key: str, response: StoredResponse | None) -> str | None:
        """An operator settles an ``unknown`` record: ``None`` marks it failed (deleted, so
        the retry runs), a response completes it (replayed). Returns the state it had, or
        ``None`` when there is no such record; only ``unknown`` records are changed."""

    async def purge_expired(self) -> int:
        """Delete expired records; returns how many."""

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        """What this run has done so far; ``repeats`` counts earlier calls with this fingerprint."""

    async def reserve_call(
        self, run_id: str, call_fingerprint: str, *, write: bool, run: str = ""
    ) -> RunCounters:
        """Count a call against its run before it is decided, and return the counters from
        before it, in one atomic step: calls made in parallel each see the ones before them,
        so a write budget cannot be overrun by sending writes at once. ``run`` (the run id
        without the agent): whether that run was closed comes back in the same step."""

    async def close_run(self, run: str, by: str) -> bool:
        """Draw the run's finish line (for every agent): true if it was open."""

    async def closed_run(self, run: str) -> tuple[float, str] | None:
        """When and by whom the run was closed, or None."""

    async def refund_call(self, run_id: str, *, write: bool) -> None:
        """A reserved call was refused: take its write back and count it as denied."""
