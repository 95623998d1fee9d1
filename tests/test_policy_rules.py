"""The shipped Rego tests, the ``*_test.rego`` runner and the ``policy eval``/``test`` commands."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from proxy.config import Config, PolicyConfig
from proxy.policy.commands import policy_eval, policy_test
from proxy.policy.testing import input_expressions, run_policy_tests

SHIPPED = Path(__file__).resolve().parent.parent / "policies"


def config_for(path: Path) -> Config:
    return Config(policy=PolicyConfig(path=path, watch=False))


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    path = tmp_path / "policies"
    shutil.copytree(SHIPPED, path)
    return path


def test_shipped_policy_tests_all_pass() -> None:
    results = run_policy_tests(SHIPPED, "handrail/decision")
    failures = [(r.name, r.message) for r in results if not r.passed]
    assert failures == []
    assert len(results) >= 20


def test_wrong_expectation_is_reported_as_fail(policies: Path) -> None:
    (policies / "extra_test.rego").write_text(
        "package extra_test\n\nimport rego.v1\n\n"
        "test_delete_is_allowed if {\n"
        "\td := data.handrail.decision with input as {\n"
        '\t\t"request": {"method": "DELETE", "path": "/x"}, "tool": {"name": "crm"},\n'
        '\t\t"agent": {"id": ""}, "call": null, "run": {"writes": 0, "repeats": 0},\n'
        "\t}\n"
        "\td.allow == true\n}\n"
    )
    results = {r.name: r for r in run_policy_tests(policies, "handrail/decision")}
    result = results["data.extra_test.test_delete_is_allowed"]
    assert result.passed is False
    assert "undefined" in result.message


def test_with_data_overrides_the_data_as_on_opa(policies: Path) -> None:
    (policies / "extra_test.rego").write_text(
        "package extra_test\n\nimport rego.v1\n\n"
        "test_data_override if {\n"
        "\tdata.handrail._write_budget == 0"
        ' with data.handrail_settings as {"default_agent": {"write_budget": 0}}'
        ' with input as {"agent": {"id": "x"}}\n}\n'
    )
    results = {r.name: r for r in run_policy_tests(policies, "handrail/decision")}
    assert results["data.extra_test.test_data_override"].passed is True


def test_an_error_in_a_test_is_a_failure_naming_the_line(policies: Path) -> None:
    (policies / "extra_test.rego").write_text(
        'package extra_test\n\nimport rego.v1\n\ntest_bad_regex if {\n\tregex.match("[", "a")\n}\n'
    )
    results = {r.name: r for r in run_policy_tests(policies, "handrail/decision")}
    result = results["data.extra_test.test_bad_regex"]
    assert result.passed is False
    assert "extra_test.rego:6:" in result.message


def test_undefined_decision_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.mkdir()
    (path / "handrail.rego").write_text(
        'package handrail\n\nimport rego.v1\n\ndecision := {"allow": true} if input.ok\n'
    )
    (path / "handrail_test.rego").write_text(
        "package handrail_test\n\nimport rego.v1\n\n"
        'test_nothing if {\n\tnot data.handrail.decision with input as {"ok": false}\n}\n'
    )
    results = {r.name: r for r in run_policy_tests(path, "handrail/decision")}
    assert results["data.handrail_test.test_nothing"].passed is True
    check = results["data.handrail.decision is defined for every test input"]
    assert check.passed is False
    assert "test_nothing" in check.message


def test_input_expressions_are_found_per_test() -> None:
    source = (
        "package t\n\ntest_a if {\n"
        '\tx := data.p.d with input as object.union(_base, {"a": [1, "}"]})\n'
        "\tx.allow # with input as ignored\n}\n"
        'test_b if {\n\tdata.p.d with data.q as 1 with input as {"with input as": 2}\n}\n'
    )
    assert input_expressions(source) == {
        "test_a": {'object.union(_base, {"a": [1, "}"]})'},
        "test_b": {'{"with input as": 2}'},
    }


def test_policy_test_command_prints_one_line_per_test(policies: Path) -> None:
    out = io.StringIO()
    code = policy_test(config_for(policies), out)
    lines = out.getvalue().splitlines()
    assert code == 0
    assert "PASS data.handrail_test.test_anonymous_read_is_allowed" in lines
    assert lines[-1].endswith(" passed, 0 failed")


def test_policy_test_command_exits_1_on_a_failing_test(policies: Path) -> None:
    (policies / "extra_test.rego").write_text(
        "package extra_test\n\nimport rego.v1\n\ntest_false if {\n\t1 == 2\n}\n"
    )
    out = io.StringIO()
    code = policy_test(config_for(policies), out)
    assert code == 1
    assert "FAIL data.extra_test.test_false: undefined" in out.getvalue()
    assert out.getvalue().splitlines()[-1].endswith(" passed, 1 failed")


def test_policy_eval_prints_the_decision(tmp_path: Path) -> None:
    document = {
        "tool": {"name": "crm", "kind": "http"},
        "request": {"method": "DELETE", "path": "/contacts", "body": None},
        "call": None,
        "agent": {"id": "sales-bot"},
        "run": {"writes": 0, "repeats": 0},
    }
    file = tmp_path / "input.json"
    file.write_text(json.dumps({"input": document}))
    out = io.StringIO()
    code = policy_eval(config_for(SHIPPED), file, out)
    printed = json.loads(out.getvalue())
    assert code == 0
    assert printed["allow"] is False
    assert printed["reasons"] == ["DELETE /contacts would delete a whole collection"]
    assert printed["require_approval"] is False


def test_policy_eval_bad_input_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "input.json"
    file.write_text("{not json")
    code = policy_eval(config_for(SHIPPED), file, io.StringIO())
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"handrail: {file}:1:2: not valid JSON")
    assert len(err.splitlines()) == 1
