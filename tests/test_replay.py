"""``handrail replay`` (#18): a recorded run re-decided by other policies, and re-issued.

A mixed run (an allowed write, a denied delete, a refund held for a person, a retry the
proxy replays, a read) is recorded through the real proxy into its real journal; replay
reads the journal back and decides each call with the candidate policies in a directory
of their own, or sends the run again through the proxy to a counting tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.call import DecisionKind
from proxy.config import Config
from proxy.http.app import build_app
from proxy.http.keys import DEPS
from proxy.metrics import Metrics
from proxy.replay.commands import ReplayArgs, replay_command
from proxy.replay.compare import ChangeKind, Verdict, change_kind, compare
from proxy.replay.phoenix import phoenix_runs
from proxy.replay.source import RecordedRun, UnknownRun, journal_runs
from proxy.tracing import tracer_provider_from_config
from tests.conftest import ProxyFactory, free_port
from tests.mcp_server import start_mcp_server

RECORDED_POLICY = """package handrail

import rego.v1

default allow := true

default visible := true

allow := false if _denied

_denied if input.request.method == "DELETE"

reasons contains "deletes are not allowed here" if _denied

default hold := false

hold if {
	input.request.method == "POST"
	startswith(input.request.path, "/refunds")
}

reasons contains "refunds need a person" if hold

decision := {"allow": allow, "reasons": reasons, "require_approval": hold}
"""

# Deletes allowed, small refunds no longer held: exactly calls #2 and #3 of the run change.
CANDIDATE_POLICY = """package handrail

import rego.v1

default allow := true

default hold := false

hold if {
	input.request.method == "POST"
	startswith(input.request.path, "/refunds")
	input.request.body.amount >= 100
}

reasons contains "large refunds need a person" if hold

decision := {"allow": allow, "reasons": reasons, "require_approval": hold}
"""

READS_THE_BODY = """package handrail

import rego.v1

default allow := true

allow := false if input.request.body.password == "hunter2"

allow := false if startswith(input.request.body.note, "x")

decision := {"allow": allow, "reasons": [], "require_approval": false}
"""

AGENT = "support-bot"


def _headers(run: str, **extra: str) -> dict[str, str]:
    return {"X-Agent-Id": AGENT, "X-Run-Id": run, **extra}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(RECORDED_POLICY)
    return directory


def _candidate(tmp_path: Path, name: str, source: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "handrail.rego").write_text(source)
    return directory


class CountingTool:
    """A tool that counts what reaches it and answers the same way every time, until told
    to answer differently."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.version = 1

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            body = await request.read()
            self.requests.append((request.method, request.path))
            got = json.loads(body) if body else None
            return web.json_response({"path": request.path, "got": got, "v": self.version})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


@pytest.fixture
async def counting(aiohttp_server: Callable[..., Any]) -> tuple[CountingTool, TestServer]:
    tool = CountingTool()
    return tool, await aiohttp_server(tool.app())


Rig = tuple[TestClient, Config, CountingTool]


@pytest.fixture
async def rig(
    make_proxy: ProxyFactory,
    make_config: Callable[..., Config],
    counting: tuple[CountingTool, TestServer],
) -> Rig:
    tool, server = counting
    tools = {"pay": {"upstream": str(server.make_url("/"))}}
    sections = {"approvals": {"wait_s": 0.2}}
    return await make_proxy(tools, **sections), make_config(tools, **sections), tool


async def _record_mixed_run(proxy: TestClient, run: str = "run-1") -> None:
    calls: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/orders", {"sku": "a-1"}, {"Idempotency-Key": f"{run}-order"}),
        ("DELETE", "/orders/7", None, {}),
        ("POST", "/refunds", {"order": "o-1", "amount": 40}, {}),
        ("POST", "/orders", {"sku": "a-1"}, {"Idempotency-Key": f"{run}-order"}),
        ("GET", "/orders", None, {}),
    ]
    statuses = []
    for method, path, body, extra in calls:
        async with proxy.request(
            method, f"/tools/pay{path}", json=body, headers=_headers(run, **extra)
        ) as response:
            await response.read()
            statuses.append((response.status, response.headers.get("Idempotent-Replayed")))
    assert statuses == [(200, None), (403, None), (403, None), (200, "true"), (200, None)]
    await proxy.server.app[DEPS].journal.flush()


async def _replay(config: Config, **args: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(replay_command, config, ReplayArgs(**args), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def _replay_json(config: Config, **args: Any) -> tuple[int, dict[str, Any]]:
    code, out, err = await _replay(config, as_json=True, **args)
    assert out, err
    return code, json.loads(out)


def _calls(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [call for run in report["runs"] for call in run["calls"]]


# -- the shared comparison ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "kind"),
    [
        ("allow", "deny", ChangeKind.NEWLY_DENIED),
        ("approval", "deny", ChangeKind.NEWLY_DENIED),
        ("deny", "allow", ChangeKind.NEWLY_ALLOWED),
        ("approval", "allow", ChangeKind.APPROVAL_DROPPED),
        ("allow", "approval", ChangeKind.APPROVAL_REQUIRED),
        ("deny", "approval", ChangeKind.APPROVAL_REQUIRED),
    ],
)
def test_a_changed_decision_is_named_for_what_the_call_now_gets(
    before: str, after: str, kind: ChangeKind
) -> None:
    change = compare(Verdict.parse(before, ["a"]), Verdict.parse(after, ["a"]))
    assert change is not None and change.kind is kind


def test_the_same_decision_with_reasons_in_another_order_is_no_change() -> None:
    assert compare(Verdict.parse("deny", ["a", "b"]), Verdict.parse("deny", ["b", "a"])) is None
    change = compare(Verdict.parse("deny", ["a"]), Verdict(DecisionKind.DENY, ("b",)))
    assert change is not None and change.kind is ChangeKind.REASONS_CHANGED
    assert change.added_reasons == ("b",) and change.dropped_reasons == ("a",)


def test_change_kind_compares_plain_values() -> None:
    assert change_kind("allow", [], "deny", ["no"]) is ChangeKind.NEWLY_DENIED
    assert change_kind("deny", ["no"], "deny", ["no"]) is None


def test_a_shadow_record_reads_back_as_a_verdict() -> None:
    verdict = Verdict.from_json({"decision": "approval", "reasons": ["x"]})
    assert verdict == Verdict(DecisionKind.APPROVAL, ("x",))
    assert Verdict.from_json(None) is None
    assert Verdict.from_json({"decision": "maybe"}) is None


# -- what-if --------------------------------------------------------------------------------


async def test_the_same_policies_change_nothing_and_exit_0(rig: Rig) -> None:
    proxy, config, tool = rig
    await _record_mixed_run(proxy)
    before = len(tool.requests)
    code, report = await _replay_json(config, runs=["run-1"])
    assert code == 0
    assert [c["status"] for c in _calls(report)] == ["same"] * 5
    assert [(c["recorded"]["decision"], c["new"]["decision"]) for c in _calls(report)] == [
        ("allow", "allow"),
        ("deny", "deny"),
        ("approval", "approval"),
        ("allow", "allow"),
        ("allow", "allow"),
    ]
    assert len(tool.requests) == before  # no tool was called


async def test_a_changed_policy_reports_exactly_the_changed_calls_and_exits_1(
    rig: Rig, tmp_path: Path
) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy)
    candidate = _candidate(tmp_path, "candidate", CANDIDATE_POLICY)
    code, report = await _replay_json(config, runs=["run-1"], policies=candidate)
    assert code == 1
    changed = [(c["position"], c["change"]) for c in _calls(report) if c["change"]]
    assert [(position, change["kind"]) for position, change in changed] == [
        (2, "newly_allowed"),
        (3, "approval_dropped"),
    ]
    assert changed[1][1]["dropped_reasons"] == ["refunds need a person"]
    assert report["summary"]["changed"] == 2 and report["summary"]["same"] == 3


async def test_the_table_shows_old_and_new_decisions_and_marks_changes(
    rig: Rig, tmp_path: Path
) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy)
    candidate = _candidate(tmp_path, "candidate", CANDIDATE_POLICY)
    code, out, _ = await _replay(config, runs=["run-1"], policies=candidate)
    assert code == 1
    lines = out.splitlines()
    assert "pay DELETE /orders/7" in lines[3] and "deny     -> allow" in lines[3]
    assert "NEWLY ALLOWED" in lines[3]
    assert "APPROVAL NO LONGER REQUIRED" in lines[4]
    assert "NEWLY" not in lines[2] and "NEWLY" not in lines[5]
    assert lines[-1].startswith("summary: 5 calls in 1 run: 2 changed")


async def test_several_runs_and_runs_since_are_replayed_together(rig: Rig, tmp_path: Path) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy, "run-a")
    await _record_mixed_run(proxy, "run-b")
    candidate = _candidate(tmp_path, "candidate", CANDIDATE_POLICY)
    code, report = await _replay_json(config, runs=["run-a", "run-b"], policies=candidate)
    assert code == 1 and [r["run"] for r in report["runs"]] == ["run-a", "run-b"]
    code, report = await _replay_json(config, runs_since="1h", policies=candidate)
    assert code == 1 and sorted(r["run"] for r in report["runs"]) == ["run-a", "run-b"]
    assert report["summary"]["changed"] == 4


async def test_an_unknown_run_exits_2(rig: Rig) -> None:
    _, config, _ = rig
    code, out, err = await _replay(config, runs=["no-such-run"])
    assert code == 2 and out == ""
    assert err.strip() == "handrail: run 'no-such-run' has no recorded calls in the journal"


async def test_a_missing_run_selection_is_a_usage_error(rig: Rig) -> None:
    _, config, _ = rig
    code, _, err = await _replay(config)
    assert code == 2 and "--run" in err


async def test_what_the_record_lacks_and_the_policy_reads_is_not_replayable(
    rig: Rig, tmp_path: Path
) -> None:
    proxy, config, _ = rig
    headers = _headers("run-secret")
    await proxy.post(
        "/tools/pay/login", json={"user": "ada", "password": "hunter2"}, headers=headers
    )
    await proxy.post("/tools/pay/notes", json={"note": "x" * 70_000}, headers=headers)
    await proxy.post("/tools/pay/orders", json={"sku": "b-2"}, headers=headers)
    await proxy.server.app[DEPS].journal.flush()
    candidate = _candidate(tmp_path, "reads-body", READS_THE_BODY)
    code, report = await _replay_json(config, runs=["run-secret"], policies=candidate)
    assert code == 0  # nothing that could be re-decided changed
    calls = _calls(report)
    assert [c["status"] for c in calls] == ["not_replayable", "not_replayable", "same"]
    assert calls[0]["lacks"] == [{"path": "request.body.password", "why": "redacted"}]
    assert calls[1]["lacks"] == [{"path": "request.body", "why": "truncated"}]
    # The recorded policy reads no body: the same records are replayable against it.
    code, report = await _replay_json(config, runs=["run-secret"])
    assert code == 0 and [c["status"] for c in _calls(report)] == ["same"] * 3


async def test_not_replayable_calls_are_warned_about(rig: Rig, tmp_path: Path) -> None:
    proxy, config, _ = rig
    body = {"user": "ada", "password": "hunter2"}
    await proxy.post("/tools/pay/login", json=body, headers=_headers("run-w"))
    await proxy.post("/tools/pay/orders", json={}, headers=_headers("run-w"))
    await proxy.server.app[DEPS].journal.flush()
    candidate = _candidate(tmp_path, "reads-body", READS_THE_BODY)
    code, out, err = await _replay(config, runs=["run-w"], policies=candidate)
    assert code == 0
    assert "NOT REPLAYABLE: the policy reads what the record lacks: " in out
    assert "input.request.body.password (redacted)" in out
    assert "1 of 2 calls could not be re-decided" in err


async def test_headers_the_live_policy_did_not_read_are_not_replayable(
    rig: Rig, tmp_path: Path
) -> None:
    proxy, config, _ = rig
    await proxy.post("/tools/pay/orders", json={}, headers=_headers("run-h"))
    await proxy.server.app[DEPS].journal.flush()
    reads_headers = RECORDED_POLICY.replace(
        'input.request.method == "DELETE"', 'input.request.headers["x-env"] == "prod"'
    )
    candidate = _candidate(tmp_path, "reads-headers", reads_headers)
    code, out, err = await _replay(config, runs=["run-h"], policies=candidate)
    assert code == 2  # the only call could not be re-decided: nothing was checked
    assert "input.request.headers (not recorded)" in out
    assert "none of the 1 recorded calls could be re-decided" in err


async def test_policies_that_do_not_compile_exit_2(rig: Rig, tmp_path: Path) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy)
    broken = _candidate(tmp_path, "broken", "package handrail\n\ndecision := {\n")
    code, out, err = await _replay(config, runs=["run-1"], policies=broken)
    assert code == 2 and out == "" and err.startswith("handrail: ")


async def test_an_unreachable_phoenix_exits_2_with_one_line(rig: Rig) -> None:
    _, config, _ = rig
    tracing = config.tracing.model_copy(update={"phoenix_url": f"http://127.0.0.1:{free_port()}"})
    config = config.model_copy(update={"tracing": tracing})
    code, out, err = await _replay(config, runs=["run-1"], source="phoenix")
    assert code == 2 and out == ""
    assert err.startswith("handrail: cannot reach Phoenix at http://127.0.0.1:")
    assert err.count("\n") == 1


# -- re-execution ---------------------------------------------------------------------------


async def test_execute_runs_each_recorded_call_once_and_a_second_replay_nothing(
    rig: Rig,
) -> None:
    proxy, config, tool = rig
    await _record_mixed_run(proxy)
    ran = list(tool.requests)
    assert ran == [("POST", "/orders"), ("GET", "/orders")]
    against = str(proxy.make_url("")).rstrip("/")
    code, report = await _replay_json(config, runs=["run-1"], execute=True, against=against)
    assert code == 0, report
    assert [c["outcome"] for c in _calls(report)] == ["same"] * 5
    assert tool.requests[len(ran) :] == ran  # the write once (its retry replayed), the read
    assert report["runs"][0]["replay_run"].startswith("replay-")
    code, report = await _replay_json(config, runs=["run-1"], execute=True, against=against)
    assert code == 0
    assert tool.requests[2 * len(ran) :] == [("GET", "/orders")]  # reads carry no key
    assert [c["new"]["replayed"] for c in _calls(report)] == [True, False, False, True, False]


async def test_a_changed_tool_answer_is_a_tool_side_change(rig: Rig) -> None:
    proxy, config, tool = rig
    await _record_mixed_run(proxy)
    tool.version = 2
    against = str(proxy.make_url("")).rstrip("/")
    code, report = await _replay_json(config, runs=["run-1"], execute=True, against=against)
    assert code == 1
    outcomes = [(c["position"], c["outcome"]) for c in _calls(report)]
    assert outcomes == [
        (1, "tool_change"),
        (2, "same"),
        (3, "same"),
        (4, "tool_change"),
        (5, "tool_change"),
    ]
    assert all(c["change"] is None for c in _calls(report))
    code, out, _ = await _replay(config, runs=["run-1"], execute=True, against=against)
    assert code == 1 and "TOOL CHANGE: body v: 1 -> 2" in out


async def test_a_changed_policy_on_the_proxy_is_a_policy_change(rig: Rig, policy_dir: Path) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy)
    (policy_dir / "handrail.rego").write_text(CANDIDATE_POLICY)
    await proxy.server.app[DEPS].engine.reload()
    against = str(proxy.make_url("")).rstrip("/")
    code, report = await _replay_json(
        config, runs=["run-1"], execute=True, against=against, replay_id="after-reload"
    )
    assert code == 1
    kinds = [(c["outcome"], (c["change"] or {}).get("kind")) for c in _calls(report)]
    assert kinds[1] == ("policy_change", "newly_allowed")
    assert kinds[2] == ("policy_change", "approval_dropped")


async def test_a_redacted_input_is_not_re_executed(rig: Rig) -> None:
    proxy, config, tool = rig
    body = {"user": "ada", "password": "hunter2"}
    await proxy.post("/tools/pay/login", json=body, headers=_headers("run-x"))
    await proxy.server.app[DEPS].journal.flush()
    before = len(tool.requests)
    against = str(proxy.make_url("")).rstrip("/")
    code, report = await _replay_json(config, runs=["run-x"], execute=True, against=against)
    assert code == 0 and len(tool.requests) == before
    (call,) = _calls(report)
    assert call["outcome"] == "not_executable"
    assert call["why"] == "its input.request.body.password was redacted"


async def test_an_unreachable_proxy_exits_2(rig: Rig) -> None:
    proxy, config, _ = rig
    await _record_mixed_run(proxy)
    against = f"http://127.0.0.1:{free_port()}"
    code, out, err = await _replay(config, runs=["run-1"], execute=True, against=against)
    assert code == 2 and out == ""
    assert err.startswith(f"handrail: cannot reach the proxy at {against}")


# -- MCP ------------------------------------------------------------------------------------

MCP_POLICY = """package handrail

import rego.v1

default allow := true

allow := false if count(reasons) > 0

reasons contains "mail may only go to example.com" if {
	input.call.name == "send_email"
	not endswith(input.call.arguments.to, "@example.com")
}

default visible := true

decision := {"allow": allow, "reasons": reasons, "require_approval": false}
"""

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def _mcp_post(proxy: TestClient, message: Any, headers: dict[str, str]) -> Any:
    response = await proxy.post(
        "/tools/mcp", data=json.dumps(message), headers={**MCP_HEADERS, **headers}
    )
    await response.read()
    return response


async def test_mcp_calls_are_re_decided_and_re_issued_as_tools_call(
    make_proxy: ProxyFactory, make_config: Callable[..., Config], policy_dir: Path
) -> None:
    (policy_dir / "handrail.rego").write_text(MCP_POLICY)
    with start_mcp_server() as server:
        tools = {"mcp": {"upstream": server.url, "kind": "mcp", "timeout_s": 10}}
        proxy, config = await make_proxy(tools), make_config(tools)
        hello = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        run = _headers("run-mcp")
        started = await _mcp_post(
            proxy, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}, run
        )
        session = {**run, "Mcp-Session-Id": started.headers["Mcp-Session-Id"]}
        session["MCP-Protocol-Version"] = "2025-11-25"
        await _mcp_post(proxy, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        for i, (name, arguments) in enumerate(
            [
                ("send_email", {"to": "a@example.com", "body": "hi"}),
                ("send_email", {"to": "b@elsewhere.org", "body": "hi"}),
                ("echo", {"text": "hello"}),
            ],
            1,
        ):
            params = {"name": name, "arguments": arguments}
            message = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}
            await _mcp_post(proxy, message, session)
        await proxy.server.app[DEPS].journal.flush()
        assert (server.executions["send_email"], server.executions["echo"]) == (1, 1)

        code, report = await _replay_json(config, runs=["run-mcp"])
        assert code == 0
        assert [(c["call"], c["new"]["decision"]) for c in _calls(report)] == [
            ("send_email", "allow"),
            ("send_email", "deny"),
            ("echo", "allow"),
        ]

        against = str(proxy.make_url("")).rstrip("/")
        code, report = await _replay_json(config, runs=["run-mcp"], execute=True, against=against)
        assert (server.executions["send_email"], server.executions["echo"]) == (2, 2)
        # The server counts its mails in its answer: "sent #1" then "sent #2".
        assert [c["outcome"] for c in _calls(report)] == ["tool_change", "same", "same"]
        (difference,) = _calls(report)[0]["differences"]
        assert (
            difference.startswith("body result.")
            and '"sent #1 to a@example.com" -> "sent #2' in difference
        )
        assert code == 1
        await _replay_json(config, runs=["run-mcp"], execute=True, against=against)
        assert server.executions["send_email"] == 2


# -- read back from Phoenix -----------------------------------------------------------------


@pytest.mark.phoenix
async def test_a_run_read_back_from_phoenix_is_re_decided_as_the_journal_has_it(
    phoenix: str,
    aiohttp_client: Callable[..., Any],
    make_config: Callable[..., Config],
    counting: tuple[CountingTool, TestServer],
    tmp_path: Path,
) -> None:
    _, server = counting
    tools = {"pay": {"upstream": str(server.make_url("/"))}}
    tracing = {
        "exporter": "otlp",
        "endpoint": phoenix,
        "project_name": f"replay-{uuid.uuid4().hex[:6]}",
    }
    config = make_config(tools, approvals={"wait_s": 0.2}, tracing=tracing)
    provider = tracer_provider_from_config(config.tracing, Metrics())
    proxy = await aiohttp_client(build_app(config, tracer_provider=provider))
    await _record_mixed_run(proxy)
    await asyncio.to_thread(provider.force_flush)
    deadline = time.monotonic() + 30
    runs: list[RecordedRun] = []
    while time.monotonic() < deadline and sum(len(r.calls) for r in runs) < 5:
        await asyncio.sleep(0.25)
        with contextlib.suppress(UnknownRun):  # Phoenix stores what it gets in batches
            runs = await phoenix_runs(config, ["run-1"], None)
    (from_phoenix,) = runs
    (from_journal,) = await journal_runs(config, ["run-1"], None)
    assert [c.verdict for c in from_phoenix.calls] == [c.verdict for c in from_journal.calls]
    # The run's counters, recounted from the spans, are those the live policy saw.
    assert [c.kept.document["run"] for c in from_phoenix.calls if c.kept] == [
        {k: v for k, v in c.kept.document["run"].items() if k not in ("repeats", "closed")}
        for c in from_journal.calls
        if c.kept
    ]
    code, report = await _replay_json(config, runs=["run-1"], source="phoenix")
    assert code == 0 and [c["status"] for c in _calls(report)] == ["same"] * 5
    candidate = _candidate(tmp_path, "candidate", CANDIDATE_POLICY)
    code, report = await _replay_json(config, runs=["run-1"], source="phoenix", policies=candidate)
    assert code == 1
    assert [c["position"] for c in _calls(report) if c["change"]] == [2, 3]
