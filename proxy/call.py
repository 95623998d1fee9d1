"""One tool call and the value types the pipeline steps hand each other.

Like mitmproxy's flow, a ``Call`` is created by the data plane for each request and
carries everything later steps need; a step ends the call by raising a ``HandrailError``
or by setting ``call.response`` (a replay).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from proxy.config import ToolConfig
    from proxy.errors import HandrailError

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class DecisionKind(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL = "approval"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer, already validated against the decision document's shape."""

    allow: bool
    reasons: tuple[str, ...] = ()
    require_approval: bool = False
    decision_id: str | None = None
    cached: bool = False
    """Answered without an evaluation of its own: from the decision cache, or shared with a
    call that asked the same question at the same time (``proxy.policy.cache``)."""

    @property
    def kind(self) -> DecisionKind:
        if self.require_approval:
            return DecisionKind.APPROVAL
        return DecisionKind.ALLOW if self.allow else DecisionKind.DENY


@dataclass(frozen=True, slots=True)
class RunCounters:
    """What a run has done so far, as the policy input's ``run`` object counts it."""

    calls: int = 0
    writes: int = 0
    denied: int = 0
    repeats: int = 0
    """How many times this run already made this very call (same fingerprint): loops."""
    closed: bool = False
    """The run's finish line was drawn (``handrail runs close``): nothing should write."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept for replay. ``complete`` is false when it was too large to keep."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    complete: bool = True


class ClaimState(StrEnum):
    OWNED = "owned"  # this caller claimed the key: run the tool
    IN_FLIGHT = "in_flight"  # another caller holds it: 409
    COMPLETED = "completed"  # finished before: replay ``response``
    MISMATCH = "mismatch"  # same key, other payload: 422
    UNKNOWN = "unknown"  # an earlier call may have run, its outcome was lost: 409


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    owner: str = ""
    response: StoredResponse | None = None
    reason: str | None = None
    """Why an ``UNKNOWN`` record is unknown (``UnknownReason``)."""
    resent: bool = False
    """``OWNED`` by taking over an unknown record: the tool may see this key a second time
    (allowed only where the tool deduplicates ``Idempotency-Key`` itself)."""


class UnknownReason(StrEnum):
    """Why a keyed call's outcome could not be known; each is a ``handrail_idempotency_unknown``
    label and part of the 409 ``outcome_unknown`` answer."""

    LEASE_EXPIRED = "lease_expired"  # its proxy died (or lost the store) mid-call
    TIMEOUT = "timeout"  # the tool did not answer in time after the request was sent
    CONNECTION_LOST = "connection_lost"  # the connection broke after the request was sent
    ANSWER_BROKEN = "answer_broken"  # the tool's answer broke off before its end
    NO_RESPONSE = "no_response"  # an MCP stream ended without the call's JSON-RPC response
    CANCELLED = "cancelled"  # the MCP client cancelled the call while the tool had it
    INTERRUPTED = "interrupted"  # the proxy was stopped while the tool had the call


class Outcome(StrEnum):
    """What the proxy knows of a forwarded call once it ends: how its key is settled."""

    ANSWERED = "answered"  # the tool's whole answer was read: keep it (a 5xx may release)
    NOT_RUN = "not_run"  # the tool cannot have run it (connect refused, a protocol refusal)
    INTERIM = "interim"  # an answer that is not the call's end (MCP input_required): release
    UNKNOWN = "unknown"  # it may have run, and its answer is lost: the key becomes unknown


@dataclass(frozen=True, slots=True)
class McpCall:
    """An MCP ``tools/call``: the tool's name, arguments and annotations, and the JSON-RPC id."""

    name: str
    arguments: dict[str, Any]
    annotations: dict[str, Any] | None
    request_id: str | int | None
    session_id: str | None
    method: str = "tools/call"
    protocol_version: str | None = None
    """The revision this request speaks (``None``: not known, e.g. a listing of our own)."""
    definition_changed: bool = False
    """Pinning saw the tool's definition change since it was approved."""


@dataclass(slots=True)
class Upstream:
    """The tool's answer as it arrives: status and headers now, the body as a stream."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    content_length: int | None = None
    release: Callable[[], None] = lambda: None
    """Returns the connection to the pool (or closes it); safe to call twice."""


class Reply(Protocol):
    """How a call's answer reaches the agent (plain HTTP or MCP render it differently)."""

    async def replay(self, call: Call, stored: StoredResponse) -> None: ...

    async def stream(self, call: Call, upstream: Upstream) -> None: ...

    def error_status(self, exc: HandrailError) -> int:
        """The HTTP status the agent gets for ``exc`` (MCP answers a deny with 200)."""
        ...


@dataclass(slots=True)
class Timings:
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    policy_s: float = 0.0
    upstream_s: float = 0.0
    total_s: float = 0.0


@dataclass(slots=True)
class Call:
    """Everything about one tool call, filled in step by step."""

    tool_name: str
    tool: ToolConfig
    method: str
    path: str
    query: list[tuple[str, str]]
    query_string: str
    headers: list[tuple[str, str]]
    body: bytes
    agent_id: str
    run_id: str
    trace_id: str
    span_id: str
    reply: Reply
    mcp: McpCall | None = None
    json_body: Any = None
    """The request body parsed as JSON (``None`` when empty or not JSON)."""
    idempotency_key: str | None = None
    key_derived: bool = False
    fingerprint: str | None = None
    counters: RunCounters = RunCounters()
    decision: Decision | None = None
    claim: Claim | None = None
    upstream: Upstream | None = None
    response: StoredResponse | None = None
    """Set when the answer comes from the store (a replay), not from the tool."""
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    captured_body: bytearray = field(default_factory=bytearray)
    """The response body as sent, kept up to the store/capture limit."""
    body_overflow: bool = False
    delivered: bool = False
    """The tool's whole answer was read (and kept, within the limits), whether or not the
    agent was still there to receive it."""
    client_gone: bool = False
    """The agent hung up before its answer was sent in full."""
    sent: bool = False
    """The request may have reached the tool (set once a connection to it was made)."""
    outcome: Outcome | None = None
    server_error: bool = False
    """The tool answered that it failed in a way a status does not show (an MCP JSON-RPC
    internal error): settled like a 5xx."""
    unknown_reason: UnknownReason | None = None
    on_progress: Callable[[], None] | None = None
    """Called as the tool's answer makes progress (an SSE event): keeps the key's lease."""
    on_answer: Callable[[], None] | None = None
    """Called when the call's whole answer is in hand before its stream ends (an MCP
    response ahead of the rest of its event stream): the key is settled at once."""
    replayed: bool = False
    error: HandrailError | None = None
    span: Span | None = None
    timings: Timings = field(default_factory=Timings)
    journal_entry: Any = None
    """The journal's handle on this call's write-ahead entry (``Journal.begin``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unsafe(self) -> bool:
        """POST, PUT, PATCH, DELETE and every MCP tools/call are writes."""
        return self.mcp is not None or self.method in UNSAFE_METHODS

    @property
    def call_name(self) -> str:
        return f"{self.tool_name}.{self.mcp.name}" if self.mcp else self.tool_name
