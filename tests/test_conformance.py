"""The official MCP conformance suite's server scenarios pass through Handrail wherever they
pass direct (SPEC: whatever a client can do with the server directly, it can do through
Handrail).

One run of ``tests/conformance/run.py`` serves every test here: the suite's clients against
the fixture server directly and through a real ``handrail serve``. It needs Node 22 and the
suite (``python -m tests.conformance.run --install``, as ``.ci/run`` does); without them the
tests skip, and fail in CI (CI=true).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.results import (
    EXPECTED_PROXY_ERRORS,
    IMPOSSIBLE_DIRECT,
    Report,
    Row,
    describe_proxy_errors,
)
from tests.conformance.run import regressions, run_suite, unexplained_direct_failures
from tests.conformance.toolchain import SuiteUnavailable, ensure_toolchain
from tests.conftest import IN_CI


@pytest.fixture(scope="module")
def report() -> Report:
    try:
        toolchain = ensure_toolchain()
    except SuiteUnavailable as exc:
        message = f"the MCP conformance suite is not available here: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return asyncio.run(run_suite(toolchain))


def _explain(rows: list[Row], report: Report, *, with_log: bool) -> str:
    lines = []
    for row in rows:
        for label, outcome in (("direct", row.direct), ("through Handrail", row.handrail)):
            failed = "; ".join(c.describe() for c in outcome.failures) or "passed"
            lines.append(f"{row.scenario.name} {label}: {failed}")
    if with_log:
        lines.append(f"handrail's log ends:\n{report.handrail_log}")
    return "\n".join(lines)


def test_every_server_scenario_ran(report: Report) -> None:
    assert len(report.rows) >= 30, [r.scenario.name for r in report.rows]
    assert all(r.direct.checks and r.handrail.checks for r in report.rows)


def test_every_scenario_that_passes_direct_passes_through_handrail(report: Report) -> None:
    broken = regressions(report)
    assert not broken, _explain(broken, report, with_log=True)


def test_no_check_that_succeeds_direct_is_weaker_through_handrail(report: Report) -> None:
    """Scenario verdicts count failures only; a check that turns into a warning through
    Handrail (a priming event lost, say) is a difference a client can see, too."""
    weaker = {r.scenario.name: [c.describe() for c in r.weaker_checks] for r in report.rows}
    assert not {name: checks for name, checks in weaker.items() if checks}


def test_the_fixture_server_passes_every_scenario_but_the_documented_ones(
    report: Report,
) -> None:
    failing = unexplained_direct_failures(report)
    assert not failing, _explain(failing, report, with_log=False)


def test_a_scenario_documented_as_impossible_still_fails_direct(report: Report) -> None:
    """Keeps IMPOSSIBLE_DIRECT (and docs/conformance.md) honest as the SDKs move."""
    now_passing = [r.scenario.name for r in report.rows if r.direct.passed]
    assert not set(now_passing) & set(IMPOSSIBLE_DIRECT)


def test_handrail_answered_nothing_itself_but_the_expected(report: Report) -> None:
    """A refused side channel (a GET event stream turned away, say) fails no scenario's
    check, since the clients shrug it off, but it is a difference a client can meet."""
    unexpected = {
        code: n for code, n in report.proxy_errors.items() if code not in EXPECTED_PROXY_ERRORS
    }
    assert not unexpected, describe_proxy_errors(report.proxy_errors)
