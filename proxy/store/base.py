"""The store: idempotency records and per-run counters, shared by every proxy replica.

One backend per module (``sqlite.py``, ``postgres.py``); only ``store_from_config``
imports them. Backends translate their driver's errors into ``StoreUnavailable``.
"""

from __future__ import annotations

from typing import Protocol

from proxy.call import Claim, RunCounters, StoredResponse


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema to the current version (migrations)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the store cannot be reached (for /readyz)."""

    async def claim(
        self, tool: str, key: str, fingerprint: str, *, lease_s: float, ttl_s: float
    ) -> Claim:
        """Atomically claim (tool, key). Exactly one concurrent caller gets ``OWNED``.

        An in-flight record whose lease has run out (its proxy crashed) is taken over.
        A completed record with the same fingerprint gives ``COMPLETED`` with its response;
        any record with another fingerprint gives ``MISMATCH``.
        """

    async def complete(self, tool: str, key: str, owner: str, response: StoredResponse) -> None:
        """Keep the response for replay until the record's expiry."""

    async def release(self, tool: str, key: str, owner: str) -> None:
        """Drop an owned in-flight record so that a retry runs the tool (5xx, transport error)."""

    async def purge_expired(self) -> int:
        """Delete expired records; returns how many."""

    async def run_counters(self, run_id: str, call_fingerprint: str) -> RunCounters:
        """What this run has done so far; ``repeats`` counts earlier calls with this fingerprint."""

    async def reserve_call(self, run_id: str, call_fingerprint: str, *, write: bool) -> RunCounters:
        """Count a call against its run before it is decided, and return the counters from
        before it, in one atomic step: calls made in parallel each see the ones before them,
        so a write budget cannot be overrun by sending writes at once."""

    async def refund_call(self, run_id: str, *, write: bool) -> None:
        """A reserved call was refused: take its write back and count it as denied."""
