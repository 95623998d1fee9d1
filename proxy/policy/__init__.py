"""Policy engines: ``engine_from_config`` is the only code that imports a backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.policy.base import EngineStatus, PolicyEngine
from proxy.policy.decision import ResultDecision

if TYPE_CHECKING:
    from proxy.config import PolicyConfig

__all__ = ["EngineStatus", "PolicyEngine", "ResultDecision", "engine_from_config"]


def engine_from_config(config: PolicyConfig) -> PolicyEngine:
    """The configured engine, not yet started (``await engine.start()``)."""
    if config.engine == "opa":
        from proxy.policy.opa_rest import OpaEngine

        return OpaEngine(
            config.opa.url,
            config.entrypoint,
            timeout_s=config.opa.timeout_ms / 1000,
        )
    from proxy.policy.embedded import EmbeddedEngine

    return EmbeddedEngine(
        config.path,
        config.entrypoint,
        workers=config.workers,
        watch=config.watch,
        isolation=config.isolation,
        cache_entries=config.cache.max_entries,
    )
