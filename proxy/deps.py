"""What the pipeline needs from the running app, built once and closed once."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Tracer

from proxy.approvals.gate import Approvals
from proxy.approvals.pinning import Pinning
from proxy.background import Background
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.policy.base import PolicyEngine
from proxy.store.base import Store
from proxy.tracing.base import Journal
from proxy.upstream import Pools


@dataclass
class Deps:
    config: Config
    store: Store
    engine: PolicyEngine
    journal: Journal
    tracer: Tracer
    pools: Pools
    metrics: Metrics
    approvals: Approvals
    pinning: Pinning
    background: Background
    shadow: PolicyEngine | None = None
    """``policy.shadow``: candidate policies deciding every call beside the live ones."""
