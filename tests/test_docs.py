"""Every config example in the docs is valid: it parses as YAML and loads as a config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "RELIABILITY.md", "SECURITY.md", "policies/README.md"]
ENV = {"HANDRAIL_ADMIN_TOKEN": "t", "CRM_TOKEN": "c"}


def _blocks() -> list[tuple[str, str]]:
    found = []
    for name in DOCS:
        text = (ROOT / name).read_text()
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S)):
            found.append((f"{name}#{i}", block))
    return found


@pytest.mark.parametrize(("where", "block"), _blocks(), ids=[w for w, _ in _blocks()])
def test_a_config_example_in_the_docs_loads(
    where: str, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    parse_config(yaml.safe_load(block), where)


@pytest.mark.parametrize("name", ["deploy/handrail.yaml", "examples/handrail.yaml"])
def test_a_shipped_config_loads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    path = ROOT / name
    parse_config(yaml.safe_load(path.read_text()), str(path), path.parent)


def _rego_examples() -> list[str]:
    return re.findall(r"```rego\n(.*?)```", (ROOT / "docs" / "policy.md").read_text(), re.S)


@pytest.mark.parametrize("example", _rego_examples())
async def test_a_policy_example_in_the_docs_decides_the_documented_input(
    example: str, tmp_path: Path
) -> None:
    """Each example compiles and gives a well-formed decision for the page's input."""
    import json

    from proxy.policy.embedded import EmbeddedEngine

    document = json.loads(
        re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "policy.md").read_text(), re.S)[0]
    )
    (tmp_path / "handrail.rego").write_text(example)
    (tmp_path / "data.json").write_text('{"agents": {"support-bot": {}}}')
    engine = EmbeddedEngine(tmp_path, "handrail/decision", watch=False, isolation="thread")
    await engine.start()
    try:
        decision = await engine.decide(document)
    finally:
        await engine.close()
    assert isinstance(decision.allow, bool)
