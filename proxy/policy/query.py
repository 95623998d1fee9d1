"""Asking a compiled policy one rule for one input document, on this thread's engine.

A ``regorus.Engine`` must stay on the thread that built it, so each thread keeps one for
the policy it last served: built once per policy load (``adopt`` hands over the one the
compile built), then every evaluation only replaces its input. The input goes in as JSON
and the value comes back as JSON, sets sorted as OPA sorts them; no value is converted node
by node in Python. After any failure the thread's engine is dropped and the next call
builds a fresh one.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from proxy.errors import PolicyUnavailable
from proxy.policy.bundle import CompiledPolicy, describe_rego_error, is_engine_failure, new_engine

_UNDEFINED = '"<undefined>"'
"""What ``eval_rule_as_json`` answers for an undefined rule, and for the string
``"<undefined>"``: ``eval_rule`` (``None`` only when undefined) tells them apart."""

_local = threading.local()
_encode = json.JSONEncoder(separators=(",", ":")).encode


def adopt(compiled: CompiledPolicy, engine: Any) -> None:
    """Serve ``compiled`` on this thread with ``engine``, built on this thread."""
    _local.policy, _local.engine = compiled, engine


def drop() -> None:
    """Forget this thread's engine (the next evaluation builds a fresh one)."""
    _local.policy = _local.engine = None


def thread_engine(compiled: CompiledPolicy) -> Any:
    """This thread's engine for ``compiled`` (built on first use after a load)."""
    if getattr(_local, "policy", None) is not compiled:
        drop()
        engine = new_engine(compiled.files)
        adopt(compiled, engine)
    return _local.engine


def rule_json(engine: Any, rule: str) -> str | None:
    """``rule``'s value on ``engine`` as JSON text, or ``None`` when it is undefined."""
    value: str = engine.eval_rule_as_json(rule)
    if value == _UNDEFINED and engine.eval_rule(rule) is None:
        return None
    return value


def evaluate_json(compiled: CompiledPolicy, rule: str, document: str) -> str | None:
    """``rule``'s value as JSON text for the input ``document`` (JSON text), or ``None``
    when it is undefined; every failure is a ``PolicyUnavailable`` (fail closed)."""
    try:
        engine = thread_engine(compiled)
        engine.set_input_json(document)
        return rule_json(engine, rule)
    except BaseException as exc:
        if not is_engine_failure(exc):
            raise
        message = getattr(exc, "message", None) or describe_rego_error(str(exc))
    # Out here, no traceback keeps an engine alive (to be dropped on another thread).
    engine = None
    drop()
    raise PolicyUnavailable(f"policy evaluation failed: {message}")


def evaluate(compiled: CompiledPolicy, rule: str, document: Any) -> tuple[bool, Any]:
    """``(defined, value)`` of ``rule`` for the Python ``document``; failures raise 503."""
    try:
        text = _encode(document)
    except (TypeError, ValueError) as exc:
        raise PolicyUnavailable(f"policy input is not JSON: {exc}") from None
    value = evaluate_json(compiled, rule, text)
    return (False, None) if value is None else (True, json.loads(value))
