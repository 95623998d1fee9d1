"""What a conformance run found, and the table docs/conformance.md keeps of it.

The suite reports each scenario as a list of checks (SUCCESS, FAILURE, WARNING, INFO); a
scenario passes when none failed, as the suite itself counts. A row pairs a scenario's
outcome direct with its outcome through Handrail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.conformance.toolchain import REPO, SUITE_PACKAGE, Scenario

DOC = REPO / "docs" / "conformance.md"
DOC_BEGIN = "<!-- conformance-table:begin (written by tests/conformance/run.py) -->"
DOC_END = "<!-- conformance-table:end -->"

# Scenarios that cannot pass direct against a Python SDK server, and why (none, today).
IMPOSSIBLE_DIRECT: dict[str, str] = {}

# What a reader of the table needs to know that the checks themselves do not say.
NOTES: dict[str, str] = {
    "server-sse-polling": (
        "pending in the suite; its raw POST claims protocol 2025-03-26, too old for priming "
        "events or a server-closed stream (the Python SDK rightly sends neither), so it ends "
        "with warnings and never reaches the resume"
    ),
    "json-schema-2020-12": "pending in the suite",
}

# Errors Handrail is meant to answer itself during the run, and what causes them.
EXPECTED_PROXY_ERRORS: dict[str, str] = {
    "misdirected_request": "the forged Host of dns-rebinding-protection",
}


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    name: str
    status: str
    """SUCCESS, FAILURE, WARNING or INFO, as the suite reports it."""
    message: str = ""

    def describe(self) -> str:
        return f"{self.name}: {self.message}" if self.message else self.name


def checks_from_json(raw: object) -> tuple[Check, ...]:
    """A scenario's ``checks.json`` as the suite saves it under ``-o DIR``."""
    if not isinstance(raw, list):
        return ()
    return tuple(
        Check(
            id=str(c.get("id", "")),
            name=str(c.get("name", c.get("id", ""))),
            status=str(c.get("status", "")),
            message=str(c.get("errorMessage") or ""),
        )
        for c in raw
        if isinstance(c, dict)
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """One scenario against one target; ``attempts`` is 2 when a failure was rerun."""

    scenario: str
    target: str
    checks: tuple[Check, ...]
    attempts: int = 1
    first_failures: tuple[Check, ...] = ()
    """The first attempt's failed checks, kept when a rerun passed (a flaky scenario)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not self.failures

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "FAILURE")

    @property
    def warnings(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "WARNING")

    @property
    def flaky(self) -> bool:
        return self.attempts > 1 and self.passed


@dataclass(frozen=True, slots=True)
class Row:
    scenario: Scenario
    direct: Outcome
    handrail: Outcome

    @property
    def weaker_checks(self) -> tuple[Check, ...]:
        """Checks that succeed direct but not through Handrail (a warning counts)."""
        succeeded = {c.id for c in self.direct.checks if c.status == "SUCCESS"}
        return tuple(c for c in self.handrail.checks if c.id in succeeded and c.status != "SUCCESS")


@dataclass(frozen=True, slots=True)
class Report:
    rows: tuple[Row, ...]
    suite_version: str
    sdk_version: str
    node_version: str
    date: str
    seconds: float
    handrail_revision: str = "unknown"
    """The commit ``proxy/`` was run from; ``+`` when it had uncommitted changes."""
    proxy_errors: dict[str, int] = field(default_factory=dict)
    """Errors Handrail answered itself during the run, by code (its /metrics)."""
    handrail_log: str = field(default="", repr=False)
    """The end of Handrail's log, for a reader chasing a failure through it."""


def _verdict(outcome: Outcome) -> str:
    if outcome.flaky:
        return "pass (on rerun)"
    return "pass" if outcome.passed else "**FAIL**"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def note_for(row: Row) -> str:
    """What the verdicts do not say: documented impossibilities, flakes, failures, warnings."""
    name = row.scenario.name
    parts = [f"cannot pass direct: {IMPOSSIBLE_DIRECT[name]}"] if name in IMPOSSIBLE_DIRECT else []
    if name in NOTES:
        parts.append(NOTES[name])
    for label, outcome in (("direct", row.direct), ("through Handrail", row.handrail)):
        if outcome.flaky:
            failed = "; ".join(c.describe() for c in outcome.first_failures)
            parts.append(f"{label} failed once, then passed ({failed})")
        if outcome.failures:
            parts.append(f"{label}: " + "; ".join(c.describe() for c in outcome.failures))
    direct_warnings = {c.id for c in row.direct.warnings}
    if direct_warnings:
        parts.append("warnings direct: " + ", ".join(c.name for c in row.direct.warnings))
    own = [c for c in row.handrail.warnings if c.id not in direct_warnings]
    if own:
        parts.append("warnings only through Handrail: " + "; ".join(c.describe() for c in own))
    return _cell("; ".join(parts))


def describe_proxy_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "Handrail answered no errors of its own during the run (its `/metrics`)."
    parts = []
    for code, count in errors.items():
        why = EXPECTED_PROXY_ERRORS.get(code)
        parts.append(f"`{code}`: {count}" + (f" (expected: {why})" if why else ""))
    return f"Errors Handrail answered itself during the run (its `/metrics`): {', '.join(parts)}."


def render_table(report: Report) -> str:
    """The pass/fail table with its date and versions, as Markdown."""
    passed_direct = sum(r.direct.passed for r in report.rows)
    passed_handrail = sum(r.handrail.passed for r in report.rows)
    lines = [
        f"Measured {report.date}, Handrail at {report.handrail_revision}, with "
        f"`{SUITE_PACKAGE}` {report.suite_version} (its clients: "
        f"`@modelcontextprotocol/sdk` {report.sdk_version}, Node {report.node_version}): "
        f"{len(report.rows)} server scenarios, {passed_direct} pass direct, "
        f"{passed_handrail} pass through Handrail; the run took {report.seconds:.0f} s.",
        "",
        "| scenario | spec | direct | through Handrail | note |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows:
        spec = ", ".join(row.scenario.spec_versions)
        verdicts = f"{_verdict(row.direct)} | {_verdict(row.handrail)}"
        lines.append(f"| `{row.scenario.name}` | {spec} | {verdicts} | {note_for(row)} |")
    lines += ["", describe_proxy_errors(report.proxy_errors)]
    return "\n".join(lines) + "\n"


def write_doc(report: Report, doc: Path = DOC) -> None:
    """Replace the table between the markers in docs/conformance.md; the prose stays."""
    block = f"{DOC_BEGIN}\n{render_table(report)}{DOC_END}"
    text = doc.read_text() if doc.exists() else "# MCP conformance\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = f"{head}{block}{rest.split(DOC_END, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    doc.write_text(text)
