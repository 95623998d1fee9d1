"""Both policy engines on the shipped policies, and how each fails closed.

The ``opa`` engine talks to tests/opa_api_server.py, which stands in for the OPA binary
(the package registries do not carry it) and evaluates the same files with real OPA
(``opa_bindings``) when installed, else with the embedded evaluator.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import PolicyConfig
from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy import engine_from_config
from proxy.policy.base import PolicyEngine
from proxy.policy.bundle import compile_policy
from proxy.policy.embedded import EmbeddedEngine, Isolation
from proxy.policy.opa_rest import OpaEngine
from proxy.policy.query import adopt, evaluate, thread_engine
from tests.conftest import free_port
from tests.opa_api_server import MODE, build_opa_app

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
ServerFactory = Callable[..., Awaitable[TestServer]]

BASE: dict[str, Any] = {
    "version": 1,
    "tool": {"name": "crm", "kind": "http"},
    "request": {"method": "GET", "path": "/contacts/42", "query": {}, "headers": {}, "body": None},
    "call": None,
    "agent": {"id": "sales-bot"},  # a named agent: an unnamed one may not write
    "run": {"id": "r-1", "calls": 0, "writes": 0, "denied": 0, "repeats": 0},
    "idempotency_key": None,
    "time": "2026-11-23T10:00:00Z",
}


def doc(**parts: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    for key, value in parts.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key].update(value)
        else:
            document[key] = value
    return document


def mcp(
    tool: str, name: str, arguments: dict[str, Any], agent: str = "sales-bot", **hints: bool
) -> dict[str, Any]:
    return doc(
        tool={"name": tool, "kind": "mcp"},
        request={"method": "POST", "path": "/mcp"},
        call={"name": name, "arguments": arguments, "annotations": hints},
        agent={"id": agent},
    )


# (name, input, allow, require_approval, reasons)
CASES: list[tuple[str, dict[str, Any], bool, bool, list[str]]] = [
    ("allowed_read", doc(), True, False, []),
    (
        "allowed_write",
        doc(request={"method": "POST", "path": "/contacts", "body": {"n": 1}}),
        True,
        False,
        [],
    ),
    (
        "collection_delete",
        doc(request={"method": "DELETE", "path": "/contacts"}),
        False,
        False,
        ["DELETE /contacts would delete a whole collection"],
    ),
    (
        "refund_needs_approval",
        mcp("payments", "refund", {"amount": 250}, "support-bot"),
        False,
        True,
        ["payments.refund amount=250 is over 100: needs a human's approval"],
    ),
    (
        "budget_spent",
        doc(request={"method": "POST", "path": "/contacts"}, run={"writes": 50}),
        False,
        False,
        ["run write budget spent: 50 of 50 writes"],
    ),
    (
        "loop",
        doc(run={"repeats": 7}),
        False,
        False,
        ["loop suspected: this run already made the same call 7 times (limit 5)"],
    ),
    (
        "destructive_tool",
        mcp("crm", "purge", {}, destructiveHint=True),
        False,
        False,
        ["crm.purge is marked destructive and is not allowed for agent sales-bot"],
    ),
    (
        "secret_in_arguments",
        mcp("crm", "note", {"text": "key sk-abcdefghijklmnopqrstuvwx"}),
        False,
        False,
        ["argument text looks like an API secret key (sk-...); secrets must not be sent to tools"],
    ),
    (
        "unknown_agent_tool",
        mcp("billing", "charge", {}, "support-bot"),
        False,
        False,
        ["agent support-bot may not call billing.charge"],
    ),
    (
        "reason_quoting_the_input",
        doc(agent={"id": 'a"b\\c'}, run={"repeats": 9}),
        False,
        False,
        ["loop suspected: this run already made the same call 9 times (limit 5)"],
    ),
]


@pytest.fixture
async def opa_server(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(build_opa_app(SHIPPED, slow_s=1.0))


@pytest.fixture(params=["process", "thread"])
def isolation(request: pytest.FixtureRequest) -> Isolation:
    """The embedded engine in worker processes (the default) and in threads."""
    value: Isolation = request.param
    return value


@pytest.fixture(params=["embedded-process", "embedded-thread", "opa"])
async def engine(
    request: pytest.FixtureRequest, aiohttp_server: ServerFactory
) -> AsyncIterator[PolicyEngine]:
    policy_engine: PolicyEngine
    if request.param == "embedded-process":
        policy_engine = engine_from_config(PolicyConfig(path=SHIPPED, watch=False))
    elif request.param == "embedded-thread":
        policy_engine = EmbeddedEngine(
            SHIPPED, "handrail/decision", watch=False, isolation="thread"
        )
    else:
        server = await aiohttp_server(build_opa_app(SHIPPED))
        url = str(server.make_url("")).rstrip("/")
        config = PolicyConfig(engine="opa", opa={"url": url, "timeout_ms": 2000})  # type: ignore[arg-type]
        policy_engine = engine_from_config(config)
    await policy_engine.start()
    yield policy_engine
    await policy_engine.close()


@pytest.mark.parametrize(
    ("name", "document", "allow", "approval", "reasons"), CASES, ids=[c[0] for c in CASES]
)
async def test_decision_is_the_same_on_both_engines(
    engine: PolicyEngine,
    name: str,
    document: dict[str, Any],
    allow: bool,
    approval: bool,
    reasons: list[str],
) -> None:
    decision = await engine.decide(document)
    assert (decision.allow, decision.require_approval, list(decision.reasons)) == (
        allow,
        approval,
        reasons,
    )
    assert decision.decision_id


async def test_visible_hides_tools_the_agent_may_not_call(engine: PolicyEngine) -> None:
    assert await engine.visible(mcp("payments", "refund", {}, "support-bot")) is True
    assert await engine.visible(mcp("billing", "charge", {}, "support-bot")) is False


async def test_engine_reports_ready(engine: PolicyEngine) -> None:
    assert engine.status().ready is True


# --- opa engine: every failure is a 503, a bad shape is a deny ----------------------------


async def opa_engine(server: TestServer, timeout_s: float = 0.3) -> OpaEngine:
    engine = OpaEngine(
        str(server.make_url("")).rstrip("/"), "handrail/decision", timeout_s=timeout_s
    )
    await engine.start()
    return engine


async def test_opa_decision_id_comes_from_the_server(opa_server: TestServer) -> None:
    engine = await opa_engine(opa_server, timeout_s=2)
    try:
        first, second = await engine.decide(doc()), await engine.decide(doc())
    finally:
        await engine.close()
    assert first.decision_id and second.decision_id and first.decision_id != second.decision_id


async def test_opa_down_fails_closed() -> None:
    engine = OpaEngine(f"http://127.0.0.1:{free_port()}", "handrail/decision", timeout_s=0.5)
    await engine.start()
    try:
        assert engine.status().ready is False
        with pytest.raises(PolicyUnavailable, match="unreachable"):
            await engine.decide(doc())
    finally:
        await engine.close()


async def test_slow_opa_fails_closed_after_timeout(opa_server: TestServer) -> None:
    opa_server.app[MODE]["mode"] = "slow"
    engine = await opa_engine(opa_server, timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PolicyUnavailable, match="longer than 200 ms"):
            await engine.decide(doc())
        assert asyncio.get_running_loop().time() - started < 0.9
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("mode", "message"),
    [("garbage", "not JSON"), ("no_result", "undefined"), ("error", "answered 500")],
)
async def test_bad_opa_answer_fails_closed(opa_server: TestServer, mode: str, message: str) -> None:
    opa_server.app[MODE]["mode"] = mode
    engine = await opa_engine(opa_server)
    try:
        with pytest.raises(PolicyUnavailable, match=message):
            await engine.decide(doc())
    finally:
        await engine.close()


async def test_opa_result_of_wrong_shape_is_a_deny(opa_server: TestServer) -> None:
    opa_server.app[MODE]["mode"] = "wrong_shape"
    engine = await opa_engine(opa_server)
    try:
        decision = await engine.decide(doc())
    finally:
        await engine.close()
    assert decision.allow is False
    assert decision.reasons == ('malformed decision: "allow" must be a boolean, is a string',)


async def test_opa_reload_checks_health(opa_server: TestServer) -> None:
    engine = await opa_engine(opa_server)
    try:
        assert engine.status().ready is True
        opa_server.app[MODE]["mode"] = "error"
        status = await engine.reload()
    finally:
        await engine.close()
    assert status.ready is False
    assert "500" in status.detail


async def test_opa_session_is_kept_alive(aiohttp_server: ServerFactory) -> None:
    peers: set[Any] = set()

    async def data(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.json_response({"result": {"allow": True}, "decision_id": "d"})

    app = web.Application()
    app.router.add_post("/v1/data/{path:.+}", data)
    app.router.add_get("/health", lambda request: web.json_response({}))  # type: ignore[arg-type,return-value]
    engine = await opa_engine(await aiohttp_server(app))
    try:
        for _ in range(5):
            await engine.decide(doc())
    finally:
        await engine.close()
    assert len(peers) == 1


# --- embedded engine: compile errors, reload, watch, bounds ----------------------------


ALLOW_ALL = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}
"""

DENY_ALL = """package handrail

import rego.v1

decision := {"allow": false, "reasons": ["closed for maintenance"], "require_approval": false}
"""

BROKEN = """package handrail

import rego.v1

decision := {"allow": true,
"""


def policy_path(tmp_path: Path, source: str) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "handrail.rego").write_text(source)
    return directory


async def test_broken_policy_at_start_names_the_file(tmp_path: Path, isolation: Isolation) -> None:
    engine = EmbeddedEngine(
        policy_path(tmp_path, BROKEN), "handrail/decision", isolation=isolation, watch=False
    )
    with pytest.raises(ConfigError, match=r"handrail\.rego:\d+:\d+: "):
        await engine.start()
    await engine.close()


async def test_missing_decision_rule_fails_start(tmp_path: Path, isolation: Isolation) -> None:
    engine = EmbeddedEngine(
        policy_path(tmp_path, "package handrail\n\nx := 1\n"),
        "handrail/decision",
        isolation=isolation,
    )
    with pytest.raises(ConfigError, match="no rule 'decision' in package handrail"):
        await engine.start()


async def test_reload_picks_up_a_changed_policy(tmp_path: Path, isolation: Isolation) -> None:
    path = policy_path(tmp_path, ALLOW_ALL)
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    await engine.start()
    try:
        assert (await engine.decide(doc())).allow is True
        (path / "handrail.rego").write_text(DENY_ALL)
        status = await engine.reload()
        decision = await engine.decide(doc())
    finally:
        await engine.close()
    assert status.ready is True
    assert (decision.allow, decision.reasons) == (False, ("closed for maintenance",))


async def test_file_watch_picks_up_a_changed_policy(tmp_path: Path, isolation: Isolation) -> None:
    path = policy_path(tmp_path, ALLOW_ALL)
    engine = EmbeddedEngine(
        path, "handrail/decision", isolation=isolation, watch=True, watch_interval_s=0.05
    )
    await engine.start()
    try:
        (path / "handrail.rego").write_text(DENY_ALL)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not (await engine.decide(doc())).allow:
                break
        decision = await engine.decide(doc())
    finally:
        await engine.close()
    assert decision.reasons == ("closed for maintenance",)


async def test_broken_reload_keeps_the_last_good_policy(
    tmp_path: Path, isolation: Isolation
) -> None:
    path = policy_path(tmp_path, DENY_ALL)
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    await engine.start()
    try:
        (path / "handrail.rego").write_text(BROKEN)
        status = await engine.reload()
        decision = await engine.decide(doc())
    finally:
        await engine.close()
    assert decision.reasons == ("closed for maintenance",)
    assert status.ready is True
    assert "serving last good policy; reload failed:" in status.detail
    assert "handrail.rego:" in status.detail


async def test_undefined_decision_fails_closed(tmp_path: Path, isolation: Isolation) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        'decision := {"allow": true} if input.agent.id == "x"\n'
    )
    engine = EmbeddedEngine(
        policy_path(tmp_path, source), "handrail/decision", isolation=isolation, watch=False
    )
    await engine.start()
    try:
        with pytest.raises(PolicyUnavailable, match="undefined"):
            await engine.decide(doc())
    finally:
        await engine.close()


async def test_malformed_decision_is_a_deny(tmp_path: Path, isolation: Isolation) -> None:
    source = (
        'package handrail\n\nimport rego.v1\n\ndecision := {"allow": true, "reasons": "fine"}\n'
    )
    engine = EmbeddedEngine(
        policy_path(tmp_path, source), "handrail/decision", isolation=isolation, watch=False
    )
    await engine.start()
    try:
        decision = await engine.decide(doc())
    finally:
        await engine.close()
    assert (decision.allow, decision.reasons) == (
        False,
        ('malformed decision: "reasons" must be a list of strings',),
    )


async def test_slow_evaluation_fails_closed(tmp_path: Path, isolation: Isolation) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        "_n := count([x | some x in numbers.range(1, 200000); x % 7 == 0])\n\n"
        'decision := {"allow": _n > 0}\n'
    )
    engine = EmbeddedEngine(
        policy_path(tmp_path, source),
        "handrail/decision",
        isolation=isolation,
        watch=False,
        timeout_s=0.001,
    )
    await engine.start()
    try:
        with pytest.raises(PolicyUnavailable, match="took longer than"):
            await engine.decide(doc())
    finally:
        await engine.close()


async def test_data_files_load_under_their_directory(tmp_path: Path, isolation: Isolation) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        "_ok if {\n\tdata.limits.max == 3\n\tdata.top == 1\n}\n\n"
        "default _ok := false\n\n"
        'decision := {"allow": _ok, "reasons": []}\n'
    )
    path = policy_path(tmp_path, source)
    (path / "data.json").write_text('{"top": 1}')
    (path / "limits").mkdir()
    (path / "limits" / "data.json").write_text('{"max": 3}')
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    await engine.start()
    try:
        assert (await engine.decide(doc())).allow is True
    finally:
        await engine.close()


async def test_test_modules_are_not_served(tmp_path: Path, isolation: Isolation) -> None:
    path = policy_path(tmp_path, ALLOW_ALL)
    (path / "handrail_test.rego").write_text("package handrail_test\n\nthis does not parse {\n")
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    await engine.start()
    try:
        assert (await engine.decide(doc())).allow is True
    finally:
        await engine.close()


async def test_policy_without_visible_shows_every_tool(
    tmp_path: Path, isolation: Isolation
) -> None:
    engine = EmbeddedEngine(
        policy_path(tmp_path, ALLOW_ALL), "handrail/decision", isolation=isolation, watch=False
    )
    await engine.start()
    try:
        assert await engine.visible(mcp("x", "y", {})) is True
    finally:
        await engine.close()


async def test_shipped_policies_copy_serves_the_demo_decisions(
    tmp_path: Path, isolation: Isolation
) -> None:
    path = tmp_path / "copy"
    shutil.copytree(SHIPPED, path)
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    await engine.start()
    try:
        allowed = await engine.decide(doc())
        denied = await engine.decide(doc(request={"method": "DELETE", "path": "/contacts"}))
    finally:
        await engine.close()
    assert allowed.allow is True
    assert denied.allow is False and denied.reasons


async def test_with_in_a_served_module_is_evaluated_as_opa_does(
    tmp_path: Path, isolation: Isolation
) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        "_x := count(input.l)\n\n"
        '_y := r if {\n\tr := _x with input as {"l": [1, 2]}\n}\n\n'
        'decision := {"allow": _y == 2, "reasons": [], "require_approval": false}\n'
    )
    engine = EmbeddedEngine(
        policy_path(tmp_path, source), "handrail/decision", isolation=isolation, watch=False
    )
    await engine.start()
    try:
        assert (await engine.decide(doc())).allow is True
    finally:
        await engine.close()


async def test_an_import_of_a_package_split_across_modules_is_refused(
    tmp_path: Path, isolation: Isolation
) -> None:
    path = policy_path(tmp_path, ALLOW_ALL)
    (path / "lib_a.rego").write_text("package lib\n\nimport rego.v1\n\nx := 1\n")
    (path / "lib_b.rego").write_text("package lib\n\nimport rego.v1\n\ny := count(z)\n\nz := [1]\n")
    (path / "uses.rego").write_text(
        "package uses\n\nimport rego.v1\n\nimport data.lib\n\nw := lib.y\n"
    )
    engine = EmbeddedEngine(path, "handrail/decision", isolation=isolation, watch=False)
    with pytest.raises(
        ConfigError, match=r"uses\.rego:5: 'import data\.lib': package lib is split"
    ):
        await engine.start()


# --- the embedded engine's evaluation on each thread ------------------------------------


def test_int_beyond_64_bits_is_not_wrapped_around(tmp_path: Path) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        'decision := {"allow": input.amount <= 100, "reasons": [], "require_approval": false}\n'
    )
    compiled, _ = compile_policy(policy_path(tmp_path, source), "handrail/decision")
    for amount, allowed in ((50, True), (2**64 + 50, False), (2**63 + 50, False), (-(2**64), True)):
        assert evaluate(compiled, compiled.decision, {"amount": amount})[1]["allow"] is allowed


def test_unconvertible_input_fails_closed() -> None:
    compiled, _ = compile_policy(SHIPPED, "handrail/decision")
    with pytest.raises(PolicyUnavailable, match="not JSON"):
        evaluate(compiled, compiled.decision, doc(request={"body": {"x": object()}}))
    with pytest.raises(PolicyUnavailable, match="policy evaluation failed"):
        evaluate(compiled, compiled.decision, doc(request={"body": {"x": float("nan")}}))
    assert evaluate(compiled, compiled.decision, doc())[1]["allow"] is True


def test_each_thread_builds_its_engine_once_per_policy() -> None:
    compiled, engine = compile_policy(SHIPPED, "handrail/decision")
    adopt(compiled, engine)
    assert thread_engine(compiled) is engine
    seen: list[bool] = []

    def other_thread() -> None:
        evaluate(compiled, compiled.decision, doc())  # never the main thread's engine
        own = thread_engine(compiled)
        seen.extend([own is thread_engine(compiled), own is not engine])

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [True, True]
    reloaded, _ = compile_policy(SHIPPED, "handrail/decision")
    assert thread_engine(reloaded) is not engine


def test_failed_evaluation_replaces_the_thread_engine(tmp_path: Path) -> None:
    source = (
        "package handrail\n\nimport rego.v1\n\n"
        "_n := 1 if input.a\n\n_n := 2 if input.a\n\n"  # conflicting values when input.a
        'decision := {"allow": true, "reasons": [], "require_approval": _n == 0} if input\n'
    )
    compiled, engine = compile_policy(policy_path(tmp_path, source), "handrail/decision")
    adopt(compiled, engine)
    with pytest.raises(PolicyUnavailable, match=r"handrail\.rego:\d+:\d+: "):
        evaluate(compiled, compiled.decision, {"a": True})
    assert thread_engine(compiled) is not engine
    assert evaluate(compiled, compiled.decision, {"a": False}) == (False, None)


def test_rego_errors_are_one_line_without_the_rust_backtrace(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_policy(policy_path(tmp_path, BROKEN), "handrail/decision")
    assert "\n" not in caught.value.message
    assert "backtrace" not in caught.value.message.lower()
