"""The ``result`` rule (SPEC "Result checks") on every engine: the same verdicts, fail closed.

One table of answers is checked by the embedded engine in worker processes and in threads,
by the ``opa`` engine against tests/opa_api_server.py evaluating with the embedded evaluator
(regorus), and, when ``opa_bindings`` (pip ``opa-golib-python-bindings``) is installed,
against the same server evaluating with OPA's own Go evaluator: any difference fails.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.errors import PolicyUnavailable
from proxy.policy.base import PolicyEngine
from proxy.policy.decision import ResultDecision, result_from_value
from proxy.policy.embedded import EmbeddedEngine, Isolation
from proxy.policy.opa_rest import OpaEngine
from tests.conftest import free_port
from tests.opa_api_server import MODE, Backend, build_opa_app
from tests.test_policy_engines import ALLOW_ALL, SHIPPED, doc
from tests.test_policy_workers import worker_pids

ServerFactory = Callable[..., Awaitable[TestServer]]
HAVE_OPA = importlib.util.find_spec("opa_bindings") is not None
ENGINES = ["embedded-process", "embedded-thread", "opa-embedded", "opa-real"]

WITHHELD = "the answer carries {}; it was withheld"
UNCONFIRMED = "the tool did not confirm the write (no id in its answer)"


def answered(call: dict[str, Any], body: Any, status: int = 200) -> dict[str, Any]:
    """The call's input document plus the tool's answer, as the pipeline builds it."""
    document = copy.deepcopy(call)
    document["response"] = {
        "status": status,
        "headers": {"content-type": "application/json"},
        "body": body,
    }
    return document


READ = doc(agent={"id": "report-bot"})  # not cleared for personal fields
WRITE = doc(request={"method": "POST", "path": "/contacts", "body": {"name": "Ada"}})
MCP_WRITE = doc(
    tool={"name": "crm", "kind": "mcp"},
    request={"method": "POST", "path": "/mcp"},
    call={"name": "create_contact", "arguments": {"name": "Ada"}, "annotations": {}},
)

# (name, input, allow, reasons, redact): the shipped starter rules.
CASES: list[tuple[str, dict[str, Any], bool, list[str], list[str]]] = [
    ("clean_read", answered(READ, {"contacts": [{"id": 1, "name": "Ada"}]}), True, [], []),
    (
        "aws_key",
        answered(READ, {"items": [{"note": "AKIAIOSFODNN7EXAMPLE"}]}),
        False,
        [WITHHELD.format("an AWS access key")],
        [],
    ),
    (
        "github_token",
        answered(READ, {"t": "ghs_0123456789abcdefghijABCDEFGHIJ012345"}),
        False,
        [WITHHELD.format("a GitHub token")],
        [],
    ),
    (
        "slack_token",
        answered(READ, {"t": "xoxp-123456789012-abcdefABCDEF"}),
        False,
        [WITHHELD.format("a Slack token")],
        [],
    ),
    (
        "stripe_key",
        answered(READ, {"t": "sk_live_0123456789abcdefABCDEF"}),
        False,
        [WITHHELD.format("a live Stripe key")],
        [],
    ),
    (
        "openai_key",
        answered(READ, ["sk-abcdefghijklmnopqrstuvwxyz0123"]),
        False,
        [WITHHELD.format("an OpenAI API key")],
        [],
    ),
    (
        "google_key",
        answered(READ, {"t": "AIza" + "B" * 35}),
        False,
        [WITHHELD.format("a Google API key")],
        [],
    ),
    (
        "private_key",
        answered(READ, {"pem": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n"}),
        False,
        [WITHHELD.format("a private key")],
        [],
    ),
    (
        "card_number",
        answered(READ, {"orders": [{"memo": "paid with 4111 1111 1111 1111"}]}),
        False,
        [WITHHELD.format("a payment card number")],
        [],
    ),
    ("not_luhn", answered(READ, {"ref": "4111-1111-1111-1112"}), True, [], []),
    ("card_as_json_number", answered(READ, {"amount": 4111111111111111}), True, [], []),
    ("timestamp_string", answered(READ, {"at": "1733011200000"}), True, [], []),
    (
        "several_credentials_sorted",
        answered(READ, {"a": "xoxb-123456789012-abcdef", "b": "AKIAIOSFODNN7EXAMPLE"}),
        False,
        [WITHHELD.format("a Slack token"), WITHHELD.format("an AWS access key")],
        [],
    ),
    (
        "credential_beside_quotes",
        answered(READ, {"k": 'say "hi" \\ then AKIAIOSFODNN7EXAMPLE', "é": "ü\n"}),
        False,
        [WITHHELD.format("an AWS access key")],
        [],
    ),
    (
        "personal_fields_redacted",
        answered(
            READ,
            {
                "contacts": [{"id": 1, "email": "a@x.org"}, {"id": 2, "Phone": "+1 555 0100"}],
                "owner": {"mobile": "+44 7700 900000"},
            },
        ),
        True,
        [],
        ["contacts.*.Phone", "contacts.*.email", "owner.mobile"],
    ),
    (
        "cleared_agent_sees_personal_fields",
        answered(doc(agent={"id": "support-bot"}), {"email": "a@x.org"}),
        True,
        [],
        [],
    ),
    (
        "mcp_personal_field",
        answered(
            doc(tool={"name": "crm", "kind": "mcp"}, agent={"id": "report-bot"}),
            {"content": [], "structuredContent": {"contact": {"e-mail": "a@x.org"}}},
        ),
        True,
        [],
        ["structuredContent.contact.e-mail"],
    ),
    ("write_unconfirmed", answered(WRITE, {"status": "queued"}), True, [UNCONFIRMED], []),
    ("write_confirmed", answered(WRITE, {"id": "c_1"}, 201), True, [], []),
    ("write_failed", answered(WRITE, {"error": "taken"}, 409), True, [], []),
    (
        "mcp_write_unconfirmed",
        answered(MCP_WRITE, {"content": [], "structuredContent": {"ok": True}}),
        True,
        [UNCONFIRMED],
        [],
    ),
    (
        "blocked_write_gives_only_the_block",
        answered(WRITE, {"token": "AKIAIOSFODNN7EXAMPLE"}),
        False,
        [WITHHELD.format("an AWS access key")],
        [],
    ),
    ("null_body", answered(READ, None), True, [], []),
    ("no_response_at_all", READ, True, [], []),
]

# A policy whose `result` is malformed or undefined on purpose, picked by the body's "case".
ODD_RESULTS = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}

result := {"allow": "yes"} if input.response.body.case == "allow_not_boolean"

result := {"reasons": ["x"]} if input.response.body.case == "allow_missing"

result := {"allow": true, "reasons": "one"} if input.response.body.case == "reasons_not_a_list"

result := {"allow": true, "redact": [1]} if input.response.body.case == "redact_not_strings"

result := "fine" if input.response.body.case == "not_an_object"

result := {"allow": true, "reasons": null, "redact": null} if input.response.body.case == "nulls"

result := {"allow": true, "redact": ["b.c", "a", "b.c"]} if input.response.body.case == "redact_twice"
"""

ODD_CASES: list[tuple[str, bool, list[str], list[str]]] = [
    ("allow_not_boolean", False, ['malformed result: "allow" must be a boolean, is a string'], []),
    ("allow_missing", False, ['malformed result: "allow" must be a boolean, is missing'], []),
    ("reasons_not_a_list", False, ['malformed result: "reasons" must be a list of strings'], []),
    (
        "redact_not_strings",
        False,
        ['malformed result: "redact" must be a list of field paths (non-empty strings)'],
        [],
    ),
    ("not_an_object", False, ["malformed result: expected an object, got string"], []),
    ("nulls", True, [], []),
    ("redact_twice", True, [], ["b.c", "a"]),
    ("undefined", True, [], []),
]


def odd_policy(tmp_path: Path, source: str = ODD_RESULTS) -> Path:
    directory = tmp_path / "odd"
    directory.mkdir(exist_ok=True)
    (directory / "handrail.rego").write_text(source)
    return directory


async def opa_server(
    aiohttp_server: ServerFactory, path: Path, backend: Backend = "embedded"
) -> TestServer:
    if backend == "opa" and not HAVE_OPA:
        pytest.skip("opa_bindings (pip opa-golib-python-bindings) is not installed")
    server: TestServer = await aiohttp_server(build_opa_app(path, backend=backend))
    return server


async def started(
    kind: str, path: Path, aiohttp_server: ServerFactory, timeout_s: float = 5.0
) -> PolicyEngine:
    engine: PolicyEngine
    if kind.startswith("embedded-"):
        isolation: Isolation = "thread" if kind == "embedded-thread" else "process"
        engine = EmbeddedEngine(
            path, "handrail/decision", watch=False, isolation=isolation, timeout_s=timeout_s
        )
    else:
        backend: Backend = "opa" if kind == "opa-real" else "embedded"
        server = await opa_server(aiohttp_server, path, backend)
        url = str(server.make_url("")).rstrip("/")
        engine = OpaEngine(url, "handrail/decision", timeout_s=timeout_s)
    await engine.start()
    return engine


@pytest.fixture(params=ENGINES)
async def engine(
    request: pytest.FixtureRequest, aiohttp_server: ServerFactory
) -> AsyncIterator[PolicyEngine]:
    policy_engine = await started(request.param, SHIPPED, aiohttp_server)
    yield policy_engine
    await policy_engine.close()


def verdict(decision: ResultDecision) -> tuple[bool, list[str], list[str]]:
    return decision.allow, list(decision.reasons), list(decision.redact)


# --- parity: every engine gives the table's verdicts ----------------------------------


async def test_starter_result_rules_give_the_same_verdicts_on_every_engine(
    engine: PolicyEngine,
) -> None:
    assert engine.has_result is True
    wrong = []
    for name, document, allow, reasons, redact in CASES:
        decision = await engine.result(document)
        if verdict(decision) != (allow, reasons, redact):
            wrong.append((name, verdict(decision)))
        assert decision.decision_id
    assert wrong == []


@pytest.mark.parametrize("kind", ENGINES)
async def test_malformed_and_undefined_results_are_judged_alike_on_every_engine(
    kind: str, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    engine = await started(kind, odd_policy(tmp_path), aiohttp_server)
    try:
        assert engine.has_result is True
        got = {
            case: verdict(await engine.result(answered(READ, {"case": case})))
            for case, *_ in ODD_CASES
        }
    finally:
        await engine.close()
    assert got == {case: (allow, reasons, redact) for case, allow, reasons, redact in ODD_CASES}


async def test_engines_agree_with_each_other_on_every_case(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """The same table side by side, so a change to the table cannot hide a difference."""
    kinds = [k for k in ENGINES if k != "opa-real" or HAVE_OPA]
    engines = [await started(kind, SHIPPED, aiohttp_server) for kind in kinds]
    try:
        table: dict[str, list[tuple[bool, list[str], list[str]]]] = {}
        for name, document, *_ in CASES:
            table[name] = [verdict(await e.result(document)) for e in engines]
    finally:
        for e in engines:
            await e.close()
    differing = {name: dict(zip(kinds, seen, strict=True)) for name, seen in table.items()}
    differing = {n: s for n, s in differing.items() if len({repr(v) for v in s.values()}) > 1}
    assert differing == {}


# --- the engine API --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedded-process", "embedded-thread", "opa-embedded"])
async def test_policy_without_a_result_rule_has_none(
    kind: str, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    engine = await started(kind, odd_policy(tmp_path, ALLOW_ALL), aiohttp_server)
    try:
        assert engine.has_result is False
        # Asked anyway, an undefined result passes the answer.
        assert verdict(await engine.result(answered(READ, {"x": 1}))) == (True, [], [])
    finally:
        await engine.close()


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_a_reload_finds_a_result_rule_added_later(
    tmp_path: Path, isolation: Isolation
) -> None:
    path = odd_policy(tmp_path, ALLOW_ALL)
    engine = EmbeddedEngine(path, "handrail/decision", watch=False, isolation=isolation)
    await engine.start()
    try:
        assert engine.has_result is False
        (path / "handrail.rego").write_text(ODD_RESULTS)
        assert (await engine.reload()).ready is True
        assert engine.has_result is True
        decision = await engine.result(answered(READ, {"case": "allow_missing"}))
        assert decision.allow is False
    finally:
        await engine.close()


async def test_a_result_is_cached_by_what_the_policy_reads_answer_included() -> None:
    """A replayed answer (the same answer to the same call) is not evaluated again; another
    answer is."""
    engine = EmbeddedEngine(SHIPPED, "handrail/decision", watch=False, isolation="thread")
    await engine.start()
    try:
        document = answered(READ, {"id": 1})
        for _ in range(3):
            await engine.result(document)
        assert (engine.cache.hits, engine.cache.misses) == (2, 1)
        await engine.result(answered(READ, {"id": 2}))
        assert (engine.cache.hits, engine.cache.misses) == (2, 2)
        first, second = await engine.result(document), await engine.result(document)
        assert first.decision_id != second.decision_id
    finally:
        await engine.close()


async def test_opa_result_is_asked_at_the_result_path(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    server = await opa_server(aiohttp_server, SHIPPED)
    engine = OpaEngine(str(server.make_url("")).rstrip("/"), "handrail/decision", timeout_s=5)
    await engine.start()
    try:
        assert "result checks on" in engine.status().detail
        decision = await engine.result(answered(READ, {"id": 1}))
    finally:
        await engine.close()
    assert server.app[MODE]["paths"] == ["handrail/result"]
    assert decision.decision_id  # the server's


async def test_opa_that_hides_its_policies_is_asked_every_time(
    aiohttp_server: ServerFactory,
) -> None:
    server = await opa_server(aiohttp_server, SHIPPED)
    server.app[MODE]["mode"] = "no_policies"
    engine = OpaEngine(str(server.make_url("")).rstrip("/"), "handrail/decision", timeout_s=5)
    await engine.start()
    try:
        assert engine.has_result is True
        assert "could not be read" in engine.status().detail
        server.app[MODE]["mode"] = "ok"
        assert (await engine.result(answered(READ, {"id": 1}))).allow is True
    finally:
        await engine.close()


def test_result_from_value_keeps_the_policys_order_of_reasons() -> None:
    decision = result_from_value({"allow": False, "reasons": ["b", "a"]}, "d-1")
    assert decision == ResultDecision(allow=False, reasons=("b", "a"), decision_id="d-1")


# --- fail closed -------------------------------------------------------------------------

# A body with "slow": true makes the result rule take seconds of regorus work.
SLOW_RESULT = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}

default _slow := false

_slow if input.response.body.slow == true

_n := count([1 | some x in numbers.range(1, 2000); some y in numbers.range(1, 2000); x % 7 == y % 5]) if _slow

else := 0

result := {"allow": _n >= 0, "reasons": [], "redact": []}
"""


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_hung_result_fails_closed_within_the_bound(
    tmp_path: Path, isolation: Isolation
) -> None:
    path = odd_policy(tmp_path, SLOW_RESULT)
    engine = EmbeddedEngine(
        path,
        "handrail/decision",
        watch=False,
        isolation=isolation,
        workers=1,
        timeout_s=0.3,
    )
    await engine.start()
    loop = asyncio.get_running_loop()
    try:
        begun = loop.time()
        with pytest.raises(PolicyUnavailable, match=r"took longer than 0\.3 s"):
            await engine.result(answered(READ, {"slow": True}))
        if isolation == "process":
            assert loop.time() - begun < 1.0
        # In a thread, regorus holds the GIL until it is done: the late answer is refused.
    finally:
        await engine.close()


async def test_killed_worker_fails_the_result_closed_then_recovers(tmp_path: Path) -> None:
    path = odd_policy(tmp_path, SLOW_RESULT)
    engine = EmbeddedEngine(path, "handrail/decision", watch=False, workers=1, timeout_s=10)
    await engine.start()
    try:
        call = asyncio.ensure_future(engine.result(answered(READ, {"slow": True})))
        await asyncio.sleep(0.2)  # the worker is evaluating it
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PolicyUnavailable, match="killed by signal 9"):
            await call
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:
                decision = await engine.result(answered(READ, {"slow": False}))
                break
            except PolicyUnavailable:
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
        assert decision.allow is True
    finally:
        await engine.close()


async def test_opa_down_fails_the_result_closed() -> None:
    engine = OpaEngine(f"http://127.0.0.1:{free_port()}", "handrail/decision", timeout_s=0.5)
    await engine.start()
    try:
        assert engine.has_result is True  # could not tell: checked, not skipped
        with pytest.raises(PolicyUnavailable, match="unreachable"):
            await engine.result(answered(READ, {"id": 1}))
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("mode", "message"),
    [("slow", "longer than 200 ms"), ("garbage", "not JSON"), ("error", "answered 500")],
)
async def test_bad_opa_answer_fails_the_result_closed(
    aiohttp_server: ServerFactory, mode: str, message: str
) -> None:
    server = await aiohttp_server(build_opa_app(SHIPPED, slow_s=1.0))
    engine = OpaEngine(str(server.make_url("")).rstrip("/"), "handrail/decision", timeout_s=0.2)
    await engine.start()
    server.app[MODE]["mode"] = mode
    try:
        with pytest.raises(PolicyUnavailable, match=message):
            await engine.result(answered(READ, {"id": 1}))
    finally:
        await engine.close()


async def test_opa_result_of_wrong_shape_blocks_the_answer(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(build_opa_app(SHIPPED))
    engine = OpaEngine(str(server.make_url("")).rstrip("/"), "handrail/decision", timeout_s=2)
    await engine.start()
    server.app[MODE]["mode"] = "wrong_shape"
    try:
        decision = await engine.result(answered(READ, {"id": 1}))
    finally:
        await engine.close()
    assert decision.allow is False
    assert decision.reasons == ('malformed result: "allow" must be a boolean, is a string',)


# --- the documentation ------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "policy.md"


def _docs_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.S)


@pytest.mark.parametrize("kind", ["embedded-thread", "opa-real"])
async def test_the_documented_input_gets_the_documented_result(
    kind: str, aiohttp_server: ServerFactory
) -> None:
    document, expected = (
        json.loads(block)
        for block in _docs_blocks("json")
        if "redact" in block or "response" in block
    )
    engine = await started(kind, SHIPPED, aiohttp_server)
    try:
        decision = await engine.result(document)
    finally:
        await engine.close()
    assert verdict(decision) == (expected["allow"], expected["reasons"], expected["redact"])


@pytest.mark.parametrize("kind", ["embedded-thread", "opa-real"])
async def test_the_documented_result_example_does_what_it_says(
    kind: str, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    (example,) = (block for block in _docs_blocks("rego") if "result :=" in block)
    engine = await started(kind, odd_policy(tmp_path, example), aiohttp_server)
    try:
        assert engine.has_result is True
        refund = doc(agent={"id": "sales-bot"}, call={"name": "refund", "arguments": {}})
        leaky = answered(refund, {"customer": {"address": "1 Main St"}, "host": "db.corp.internal"})
        support = answered(doc(agent={"id": "support-bot"}), {"customer": {"address": "x"}})
        got = [verdict(await engine.result(d)) for d in (leaky, support)]
    finally:
        await engine.close()
    assert got == [
        (
            False,
            ["the answer names an internal host", "the refund was answered without a status"],
            ["customer.address"],
        ),
        (True, [], []),
    ]
