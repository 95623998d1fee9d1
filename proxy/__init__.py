"""Handrail: a sidecar proxy that puts guardrails on AI agents' tool calls."""

from __future__ import annotations

__version__ = "0.1.0"
