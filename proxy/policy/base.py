"""The policy engine seam: one document in, one validated ``Decision`` out.

Every failure (engine down, timeout, compile error, undefined result) raises
``PolicyUnavailable`` so the pipeline fails closed; a malformed decision is a deny.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.call import Decision


@dataclass(frozen=True, slots=True)
class EngineStatus:
    ready: bool
    detail: str
    """What /readyz shows: the engine, the policy version, or why it is not ready."""


class PolicyEngine(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def decide(self, document: dict[str, Any]) -> Decision:
        """Evaluate the decision at the configured entrypoint."""

    async def visible(self, document: dict[str, Any]) -> bool:
        """Evaluate the ``visible`` rule next to the decision; undefined means visible."""

    async def reload(self) -> EngineStatus:
        """Re-read the policies (embedded) or re-check the server (opa)."""

    def status(self) -> EngineStatus: ...

    @property
    def request_fields(self) -> frozenset[str]:
        """Which of ``input.request``'s ``headers`` and ``query`` the policy may read
        (``policy.refs``): the input leaves the others out."""
