"""The local journal seam: every call is written down, whatever the OTLP exporter does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.call import Call


@dataclass(frozen=True, slots=True)
class CallQuery:
    run_id: str | None = None
    tool: str | None = None
    decision: str | None = None
    since: float | None = None
    """Unix seconds."""
    limit: int = 100


class Journal(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None:
        """Flush what is queued, then close."""

    def begin(self, call: Call) -> None:
        """Write the call's entry ahead, once it is decided: it survives a crash mid-call."""

    def append(self, call: Call) -> None:
        """Queue the call's record; never blocks the call path."""

    async def flush(self) -> None: ...

    async def query(self, query: CallQuery) -> list[dict[str, Any]]:
        """Recorded calls, newest first, as JSON-ready dicts."""
