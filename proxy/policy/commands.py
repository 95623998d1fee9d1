"""The bodies of ``handrail policy eval`` and ``handrail policy test`` (cli.py parses args)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from proxy.config import Config
from proxy.errors import ConfigError, HandrailError
from proxy.policy import engine_from_config
from proxy.policy.testing import run_policy_tests


def _read_input(path: Path) -> dict[str, Any]:
    """The input document; an OPA-style ``{"input": {...}}`` wrapper is accepted too."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read input file ({exc.strerror})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    if isinstance(document, dict) and set(document) == {"input"}:
        document = document["input"]
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the policy input must be a JSON object")
    return document


async def _decide(config: Config, document: dict[str, Any]) -> dict[str, Any]:
    policy = config.policy.model_copy(update={"watch": False})
    engine = engine_from_config(policy)
    await engine.start()
    try:
        decision = await engine.decide(document)
    finally:
        await engine.close()
    return {
        "allow": decision.allow,
        "reasons": list(decision.reasons),
        "require_approval": decision.require_approval,
        "decision_id": decision.decision_id,
    }


def policy_eval(config: Config, input_path: Path, out: TextIO) -> int:
    """Print the decision for one input document: 0, or 2 with a one-line message."""
    try:
        document = _read_input(input_path)
        result = asyncio.run(_decide(config, document))
    except HandrailError as exc:
        print(f"handrail: {exc.message}", file=sys.stderr)
        return 2
    out.write(json.dumps(result, indent=2) + "\n")
    return 0


def policy_test(config: Config, out: TextIO) -> int:
    """One line per test, then a summary: 0 when all pass, 1 when any fails, 2 on errors."""
    try:
        results = run_policy_tests(config.policy.path, config.policy.entrypoint)
    except HandrailError as exc:
        print(f"handrail: {exc.message}", file=sys.stderr)
        return 2
    for result in results:
        line = f"PASS {result.name}" if result.passed else f"FAIL {result.name}: {result.message}"
        out.write(line + "\n")
    failed = sum(1 for result in results if not result.passed)
    if not results:
        out.write(f"no tests found under {config.policy.path}\n")
        return 0
    out.write(f"{len(results) - failed} passed, {failed} failed\n")
    return 1 if failed else 0
