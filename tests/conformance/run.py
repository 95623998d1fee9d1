"""Run the official MCP conformance suite's server scenarios direct and through Handrail.

Handrail promises that whatever a client can do with an MCP server directly it can do
through the proxy. This holds it to that with the suite the SDKs are held to (npm
``@modelcontextprotocol/conformance``): every server scenario runs against the project's
fixture server (``tests/conformance/server.py``) once directly and once through a real
``handrail serve`` whose one tool is that server, with a policy that allows everything.

    python -m tests.conformance.run              # run, print, rewrite docs/conformance.md
    python -m tests.conformance.run --install    # only install Node 22 and the suite
    python -m tests.conformance.run --no-docs    # run and print only
    python -m tests.conformance.run ping tools-list   # just these (the doc is left alone)

Exit status 0 when every scenario passes direct (but the documented impossible ones) and
every one that passes direct passes through Handrail; 1 otherwise; 2 when the suite cannot
be installed. ``tests/test_conformance.py`` runs the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tests.conformance.results import (
    DOC,
    IMPOSSIBLE_DIRECT,
    Check,
    Outcome,
    Report,
    Row,
    checks_from_json,
    render_table,
    write_doc,
)
from tests.conformance.toolchain import (
    REPO,
    SUITE_PACKAGE,
    SUITE_VERSION,
    Scenario,
    SuiteUnavailable,
    Toolchain,
    ensure_toolchain,
    list_server_scenarios,
)

TOOL = "everything"
"""The name the fixture server has in Handrail's config: its URL is ``/tools/everything``."""

BATCH_TIMEOUT_S = 180.0
"""The whole suite against one target; it takes a few seconds when nothing hangs."""
SCENARIO_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0

_LISTENING = re.compile(r"listening on (http://\S+)")
_ADMIN = re.compile(r"admin on (http://\S+)")
_ERROR_METRIC = re.compile(r'^handrail_errors_total\{code="([^"]+)"\} ([0-9.e+]+)$', re.M)
_RESULT_DIR = re.compile(r"^server-(.+)-\d{4}-\d\d-\d\dT[\d-]+Z$")
_PERMISSIVE_POLICY = """package handrail

import rego.v1

default visible := true

decision := {"allow": true, "reasons": set(), "require_approval": false}
"""


# -- running the suite's client against one URL ------------------------------------------


async def _run_suite_process(command: Sequence[str], log: Path, timeout_s: float) -> bool:
    """Run one ``conformance server`` process; False if it had to be killed."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return False
    return True


def saved_checks(out_dir: Path) -> dict[str, tuple[Check, ...]]:
    """The checks the suite saved under ``-o DIR``, by scenario (``server-NAME-TIMESTAMP``)."""
    found = {}
    for saved in sorted(out_dir.glob("*/checks.json")):
        match = _RESULT_DIR.match(saved.parent.name)
        if match:
            found[match.group(1)] = checks_from_json(json.loads(saved.read_text()))
    return found


def _run_failed(message: str) -> tuple[Check, ...]:
    return (Check("scenario-run", "ScenarioRun", "FAILURE", message),)


async def run_scenario_once(
    toolchain: Toolchain, scenario: str, url: str, out_dir: Path
) -> tuple[Check, ...]:
    """``conformance server --scenario S -o DIR``: the checks it saves are the verdict."""
    out_dir.mkdir(parents=True)
    log = out_dir / "output.log"
    command = toolchain.command("server", "--url", url, "--scenario", scenario, "-o", str(out_dir))
    if not await _run_suite_process(command, log, SCENARIO_TIMEOUT_S):
        return _run_failed(f"timed out after {SCENARIO_TIMEOUT_S:.0f} s")
    checks = saved_checks(out_dir).get(scenario)
    if checks:
        return checks
    tail = " ".join(log.read_text(errors="replace").strip().splitlines()[-5:])[-600:]
    return _run_failed(f"no checks written: {tail or 'no output'}")


async def run_target(
    toolchain: Toolchain,
    scenarios: Sequence[str],
    target: str,
    url: str,
    work: Path,
    *,
    batch: bool = True,
) -> list[Outcome]:
    """Every scenario against one URL.

    One suite process runs them all (``--suite all``): a Node process costs half a CPU
    second to start, so 32 of them cost more than every scenario together. What that
    process did not finish (it hung or crashed) runs alone; a failure is rerun once, alone,
    so a flaky scenario is told from a broken one.
    """
    first: dict[str, tuple[Check, ...]] = {}
    if batch:
        batch_dir = work / "all"
        batch_dir.mkdir(parents=True)
        command = toolchain.command("server", "--url", url, "--suite", "all", "-o", str(batch_dir))
        await _run_suite_process(command, work / "all.log", BATCH_TIMEOUT_S)
        first = saved_checks(batch_dir)
    outcomes = []
    for scenario in scenarios:
        checks = first.get(scenario) or await run_scenario_once(
            toolchain, scenario, url, work / scenario / "1"
        )
        outcome = Outcome(scenario, target, checks)
        if not outcome.passed:
            again = await run_scenario_once(toolchain, scenario, url, work / scenario / "2")
            outcome = Outcome(scenario, target, again, attempts=2, first_failures=outcome.failures)
        outcomes.append(outcome)
    return outcomes


async def run_scenarios(
    toolchain: Toolchain,
    scenarios: Sequence[Scenario],
    targets: dict[str, str],
    work: Path,
    *,
    batch: bool = True,
) -> dict[tuple[str, str], Outcome]:
    """Every scenario against every target; the targets run side by side.

    Safe to overlap: each scenario opens sessions of its own, and the fixture server keeps
    no state one scenario could see of another's.
    """
    names = [s.name for s in scenarios]
    jobs = [
        run_target(toolchain, names, t, url, work / t, batch=batch) for t, url in targets.items()
    ]
    outcomes = [o for per_target in await asyncio.gather(*jobs) for o in per_target]
    return {(o.scenario, o.target): o for o in outcomes}


# -- the fixture server and Handrail, as real processes ----------------------------------


@dataclass
class Service:
    process: asyncio.subprocess.Process
    url: str
    log: Path


async def start_service(command: Sequence[str], log: Path, name: str) -> Service:
    """Start a server whose output names its URL (``... listening on http://...``)."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return Service(process, match.group(1), log)
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await stop_service(Service(process, "", log))
    raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-2000:]}")


async def stop_service(service: Service) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S: nothing of the run's state is kept."""
    if service.process.returncode is None:
        service.process.terminate()
        try:
            await asyncio.wait_for(service.process.wait(), STOP_GRACE_S)
        except TimeoutError:
            service.process.kill()
            await service.process.wait()


def handrail_command(config: Path) -> list[str]:
    """``handrail serve``: the console script beside this Python, as a user runs it."""
    script = Path(sys.executable).with_name("handrail")
    if script.exists():
        return [str(script), "serve", "-c", str(config)]
    return [sys.executable, "-m", "proxy.cli", "serve", "-c", str(config)]


def write_handrail_config(work: Path, upstream: str) -> Path:
    """One ``kind: mcp`` tool, a policy that allows everything, state under ``work``."""
    policies = work / "policies"
    policies.mkdir(parents=True)
    (policies / "handrail.rego").write_text(_PERMISSIVE_POLICY)
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        # Every scenario's client is the same anonymous agent, and each keeps its session's
        # GET stream open until the suite ends: more than one agent's usual share.
        "tools": {
            TOOL: {
                "upstream": upstream,
                "kind": "mcp",
                "timeout_s": 30,
                "max_streams_per_agent": 128,
            }
        },
        "policy": {"path": str(policies), "watch": False},
        "store": {"url": f"sqlite:///{work / 'handrail.db'}"},
        "tracing": {"exporter": "none", "journal": {"spool_dir": str(work / "spool")}},
    }
    path = work / "handrail.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def parse_error_counts(metrics: str) -> dict[str, int]:
    """``handrail_errors_total`` by code: the answers Handrail made itself, not the server."""
    counts = {code: int(float(n)) for code, n in _ERROR_METRIC.findall(metrics)}
    return {code: n for code, n in sorted(counts.items()) if n}


async def proxy_errors(handrail: Service) -> dict[str, int]:
    """Scraped from the admin plane's /metrics once the scenarios are done.

    A scenario's checks see only what its client could tell; an error the proxy answered
    on a side channel (a refused GET event stream, say) shows here even when they pass.
    """
    match = _ADMIN.search(handrail.log.read_text(errors="replace"))
    if match is None:
        return {}

    def scrape() -> str:
        with urllib.request.urlopen(f"{match.group(1)}/metrics", timeout=10) as response:
            return str(response.read().decode())

    try:
        return parse_error_counts(await asyncio.to_thread(scrape))
    except OSError:
        return {}


# -- the whole run -----------------------------------------------------------------------


async def run_against_both(
    toolchain: Toolchain, scenarios: Sequence[Scenario], work: Path, *, batch: bool
) -> tuple[dict[tuple[str, str], Outcome], dict[str, int]]:
    """Start the fixture server and Handrail in front of it; run the scenarios on both."""
    command = [sys.executable, "-m", "tests.conformance.server", "--port", "0"]
    server = await start_service(command, work / "server.log", "the fixture server")
    handrail: Service | None = None
    try:
        config = write_handrail_config(work / "handrail", server.url)
        handrail = await start_service(handrail_command(config), work / "handrail.log", "handrail")
        targets = {"direct": server.url, "handrail": f"{handrail.url}/tools/{TOOL}"}
        outcomes = await run_scenarios(toolchain, scenarios, targets, work / "runs", batch=batch)
        return outcomes, await proxy_errors(handrail)
    finally:
        # The server first: its end closes the event streams Handrail still relays, which
        # would otherwise hold Handrail's drain until the server next wrote to them.
        await stop_service(server)
        if handrail is not None:
            await stop_service(handrail)


async def run_suite(toolchain: Toolchain, only: Sequence[str] = ()) -> Report:
    """Every server scenario of the suite (or ``only`` these), direct and through Handrail."""
    started = time.monotonic()
    scenarios = [s for s in list_server_scenarios(toolchain) if not only or s.name in only]
    with tempfile.TemporaryDirectory(prefix="handrail-conformance-") as tmp:
        work = Path(tmp)
        outcomes, errors = await run_against_both(toolchain, scenarios, work, batch=not only)
        handrail_log = (work / "handrail.log").read_text(errors="replace")[-4000:]
    rows = tuple(
        Row(s, outcomes[(s.name, "direct")], outcomes[(s.name, "handrail")]) for s in scenarios
    )
    return Report(
        rows=rows,
        suite_version=SUITE_VERSION,
        sdk_version=toolchain.sdk_version,
        node_version=toolchain.node_version,
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
        seconds=time.monotonic() - started,
        handrail_revision=handrail_revision(),
        proxy_errors=errors,
        handrail_log=handrail_log,
    )


def handrail_revision() -> str:
    """The commit the proxy was run from, ``+`` when the work tree had changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def regressions(report: Report) -> list[Row]:
    """Scenarios that pass direct and fail through Handrail: the promise broken."""
    return [r for r in report.rows if r.direct.passed and not r.handrail.passed]


def unexplained_direct_failures(report: Report) -> list[Row]:
    """Scenarios the fixture server fails direct without a documented reason."""
    failed = [r for r in report.rows if not r.direct.passed]
    return [r for r in failed if r.scenario.name not in IMPOSSIBLE_DIRECT]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="only install Node and the suite")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the doc's table")
    parser.add_argument("scenario", nargs="*", help="run only these scenarios")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        toolchain = ensure_toolchain()
        if args.install:
            count = len(list_server_scenarios(toolchain))
    except SuiteUnavailable as exc:
        print(f"conformance suite unavailable: {exc}", file=sys.stderr)
        return 2
    if args.install:
        print(f"Node {toolchain.node_version}: {toolchain.node}")
        print(f"{SUITE_PACKAGE} {SUITE_VERSION}: {toolchain.cli} ({count} server scenarios)")
        print(f"ready in {time.monotonic() - started:.1f} s")
        return 0
    report = asyncio.run(run_suite(toolchain, args.scenario))
    print(render_table(report))
    if not args.no_docs and not args.scenario:
        write_doc(report)
        print(f"wrote {DOC.relative_to(REPO)}")
    return 1 if regressions(report) or unexplained_direct_failures(report) else 0


if __name__ == "__main__":
    sys.exit(main())
