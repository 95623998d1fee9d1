"""The policy engine seam: one document in, one validated ``Decision`` out.

Every failure (engine down, timeout, compile error, undefined decision) raises
``PolicyUnavailable`` so the pipeline fails closed; a malformed decision is a deny. The
same holds for the ``result`` rule that checks a tool's answer, except that an undefined
``result`` passes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.call import Decision
from proxy.policy.decision import ResultDecision


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

    @property
    def has_result(self) -> bool:
        """Whether the served package defines a ``result`` rule next to the decision
        (found when the policy is loaded or reloaded); ``result`` is asked only then."""

    async def result(self, document: dict[str, Any]) -> ResultDecision:
        """Evaluate ``result`` next to the decision on the call's input plus ``response``.

        Undefined: the answer passes (allow, no reasons). Never cached. Engine failure or
        timeout raises ``PolicyUnavailable``; a malformed value blocks the answer."""

    async def reload(self) -> EngineStatus:
        """Re-read the policies (embedded) or re-check the server (opa)."""

    def status(self) -> EngineStatus: ...

    @property
    def request_fields(self) -> frozenset[str]:
        """Which of ``input.request``'s ``headers`` and ``query`` the policy may read
        (``policy.refs``): the input leaves the others out."""
