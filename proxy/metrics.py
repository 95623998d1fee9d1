"""Prometheus metrics, on a registry per app so that tests can run many apps at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.calls = Counter(
            "handrail_calls",
            "Tool calls by tool, decision and status.",
            ["tool", "decision", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "handrail_call_duration_seconds",
            "Time from request to the last byte sent.",
            ["tool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_latency = Histogram(
            "handrail_policy_duration_seconds",
            "Policy evaluation time.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_cache_hits = Counter(
            "handrail_policy_cache_hits",
            "Decisions answered from the decision cache (policy.cache).",
            registry=r,
        )
        self.replays = Counter(
            "handrail_idempotent_replays",
            "Responses replayed from the store.",
            ["tool"],
            registry=r,
        )
        self.errors = Counter(
            "handrail_errors", "Errors answered by the proxy itself, by code.", ["code"], registry=r
        )
        self.export_dropped = Counter(
            "handrail_trace_export_dropped", "Spans or journal rows dropped.", ["sink"], registry=r
        )
        self.journal_retries = Counter(
            "handrail_journal_write_retries",
            "Journal batches whose insert failed and was tried again.",
            registry=r,
        )
        self.journal_recovered = Counter(
            "handrail_journal_recovered",
            "Journal rows recovered from the write-ahead spool (after a crash or an outage).",
            registry=r,
        )
        self.unknown_outcomes = Counter(
            "handrail_idempotency_unknown",
            "Keyed calls whose outcome the proxy could not know, moved to `unknown` (by reason).",
            ["tool", "reason"],
            registry=r,
        )
        self.settle_retries = Counter(
            "handrail_idempotency_settle_retries",
            "Attempts to record a call's outcome in the store that failed and were retried.",
            registry=r,
        )
        self.client_gone = Counter(
            "handrail_client_disconnects",
            "Agents that hung up before their answer was sent; the answer was still kept.",
            ["tool"],
            registry=r,
        )
        self.approvals = Counter(
            "handrail_approvals",
            "Approval requests: requested, approved, rejected, and used (let one call through).",
            ["kind", "outcome"],
            registry=r,
        )
        self.shadow_differences = Counter(
            "handrail_shadow_differences",
            "Calls the shadow policies (policy.shadow) decided otherwise than the live ones.",
            ["tool", "change"],
            registry=r,
        )
        self.approval_notify_failures = Counter(
            "handrail_approval_notify_failures",
            "Approval notifications the webhook did not take (the request still waits in /ui).",
            registry=r,
        )
