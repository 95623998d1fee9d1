"""The decision cache: a retried or repeated call is decided once, and nothing the policy
reads can be served a stale answer.

Unit cases for what the modules read (``refs.input_paths``), the impure builtins that turn
the cache off, and the cache's keys; then the real proxy on the shipped policy: a repeat is
answered from the cache (span, metric, /readyz), while a call that differs in anything the
policy reads (its body, its run's write count) is evaluated again, and a reload forgets
every cached decision.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.errors import PolicyUnavailable
from proxy.policy.cache import DecisionCache, trim
from proxy.policy.refs import impure_builtins, input_paths
from tests.conftest import ProxyFactory, Seen

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
HEADER = "package handrail\n\nimport rego.v1\n\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('allow if input.request.method == "GET"', {("request", "method")}),
        ("x := input.request.body[k]", {("request", "body")}),
        ("x := input.run.writes\ny := input.run", {("run",)}),
        ("import input.request.headers as h", {("request", "headers")}),
        ('# input.time\nmsg := "input.idempotency_key"', set()),
        (
            "a := input.agent.id\nb := input.call.annotations.readOnlyHint",
            {
                ("agent", "id"),
                ("call", "annotations", "readOnlyHint"),
            },
        ),
    ],
)
def test_the_input_paths_a_policy_reads(source: str, expected: set[tuple[str, ...]]) -> None:
    assert input_paths([HEADER + source]) == tuple(sorted(expected))


@pytest.mark.parametrize(
    "source", ["doc := input", 'x := object.get(input, "run", {})', 'x := input["run"]']
)
def test_a_policy_reading_the_whole_input_has_no_bounded_paths(source: str) -> None:
    assert input_paths([HEADER + source]) is None


def test_the_shipped_policy_reads_neither_the_key_nor_the_time() -> None:
    paths = input_paths([(SHIPPED / "handrail.rego").read_text()])
    assert paths is not None
    assert ("run", "writes") in paths and ("request", "body") in paths
    assert not any(p[0] in {"idempotency_key", "time"} or p == ("run", "id") for p in paths)
    assert impure_builtins([(SHIPPED / "handrail.rego").read_text()]) == frozenset()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("t := time.now_ns()", {"time.now_ns"}),
        ('r := http.send({"method": "get", "url": "http://x"})', {"http.send"}),
        ('allow if { print("here"); rand.intn("k", 10) > 2 }', {"print", "rand.intn"}),
        ('# time.now_ns()\nmsg := "print(1)"\ny := `http.send(x)`', set()),
        ("y := mine.print(1)\nz := reprint(2)\nn := time.parse_ns(a, b)", set()),
    ],
)
def test_impure_builtins_are_found_in_code_only(source: str, expected: set[str]) -> None:
    assert impure_builtins([HEADER + source]) == frozenset(expected)


def document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "agent": {"id": "a"},
        "run": {"id": "r-1", "writes": 3, "repeats": 0},
        "request": {"method": "POST", "body": {"amount": 5, "to": "x"}},
        "idempotency_key": "k-1",
        "time": "2026-11-24T10:00:00Z",
    }
    for dotted, value in overrides.items():
        node = doc
        *parents, last = dotted.split("__")
        for name in parents:
            node = node[name]
        node[last] = value
    return doc


def key(cache: DecisionCache, rule: str, doc: dict[str, Any]) -> bytes | None:
    """The cache key of ``doc``'s question (``None``: not cached)."""
    return cache.question(rule, doc).key


def serving(max_entries: int = 8) -> DecisionCache:
    cache = DecisionCache(max_entries)
    paths = (("agent", "id"), ("request",), ("run", "writes"), ("run", "repeats"))
    cache.serve(paths, frozenset())
    return cache


def test_the_policy_is_asked_only_what_it_reads() -> None:
    doc = document()
    doc["call"] = None
    paths = (("agent", "id"), ("call", "name"), ("request", "body"), ("run", "writes"))
    assert trim(doc, paths) == {
        "agent": {"id": "a"},
        "request": {"body": {"amount": 5, "to": "x"}},
        "run": {"writes": 3},
    }  # call.name does not resolve (call is null): undefined either way
    assert trim(doc, (("call",),)) == {"call": None}

    cache = serving()
    question = cache.question("decision", doc)
    assert question.document == trim(doc, cache._paths or ())
    assert question.encoded is not None and b"k-1" not in question.encoded  # no key, no time
    assert question.key is not None

    # An impure policy is asked the trimmed question too, but never from the cache.
    impure = DecisionCache(8)
    impure.serve((("run",),), frozenset({"time.now_ns"}))
    question = impure.question("decision", doc)
    assert question.document == {"run": doc["run"]} and question.key is None
    # A policy that reads the input as a whole gets all of it.
    whole = DecisionCache(8)
    whole.serve(None, frozenset())
    assert whole.question("decision", doc) == (doc, None, None)


def test_keys_ignore_what_the_policy_does_not_read() -> None:
    cache = serving()
    first = key(cache, "decision", document())
    assert first == key(cache, "decision", document(idempotency_key="k-2", time="later"))
    assert first == key(cache, "decision", document(run__id="r-2"))
    # Key order inside an object is not a difference.
    assert first == key(cache, "decision", document(request__body={"to": "x", "amount": 5}))


@pytest.mark.parametrize(
    "change",
    [
        {"run__writes": 4},
        {"request__body": {"amount": 5.5, "to": "x"}},
        {"request__body": {"amount": "5", "to": "x"}},
        {"request__body": {"amount": 5, "to": "x", "extra": None}},
        {"agent__id": "b"},
    ],
)
def test_keys_differ_on_anything_the_policy_reads(change: dict[str, Any]) -> None:
    cache = serving()
    assert key(cache, "decision", document()) != key(cache, "decision", document(**change))


def test_a_missing_value_is_not_a_null_one_and_rules_do_not_share_keys() -> None:
    cache = serving()
    without = document()
    del without["run"]["repeats"]
    assert key(cache, "decision", without) != key(cache, "decision", document(run__repeats=None))
    assert key(cache, "decision", document()) != key(cache, "visible", document())


def test_least_recently_used_out_first_and_reload_forgets() -> None:
    cache = serving(max_entries=2)
    keys = [key(cache, "decision", document(run__writes=n)) for n in range(3)]
    assert all(k is not None for k in keys)
    k0, k1, k2 = (k for k in keys if k is not None)
    cache.put(k0, cache.generation, "zero")
    cache.put(k1, cache.generation, "one")
    assert cache.get(k0) == (True, "zero")  # k0 is now the most recent
    cache.put(k2, cache.generation, "two")
    assert cache.get(k1) == (False, None)
    assert cache.get(k0) == (True, "zero") and cache.get(k2) == (True, "two")

    started_under = cache.generation
    cache.serve((("run",),), frozenset())
    assert len(cache) == 0
    cache.put(k0, started_under, "decided by the old policy")
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("entries", "paths", "impure", "why"),
    [
        (0, (("run",),), frozenset(), "turned off"),
        (8, None, frozenset(), "reads the input as a whole"),
        (8, (("run",),), frozenset({"time.now_ns"}), "calls time.now_ns"),
    ],
)
def test_when_the_cache_is_off(entries: int, paths: Any, impure: frozenset[str], why: str) -> None:
    cache = DecisionCache(entries)
    cache.serve(paths, impure)
    assert key(cache, "decision", document()) is None
    assert why in cache.describe()


# --- the real proxy -------------------------------------------------------------------


@pytest.fixture
def shipped(policy_dir: Path) -> Path:
    shutil.rmtree(policy_dir)
    shutil.copytree(SHIPPED, policy_dir)
    return policy_dir


def crm(server: TestServer) -> dict[str, Any]:
    return {"crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}}}


async def policy_detail(admin: TestClient) -> str:
    """What /readyz says of the policy engine (the decision cache's line is in it)."""
    return str((await (await admin.get("/readyz")).json())["checks"]["policy"]["detail"])


def cached_flags(spans: InMemorySpanExporter) -> list[bool]:
    """``handrail.decision.cached`` of each ``handrail.policy`` span, in order."""
    return [bool(s.get("handrail.decision.cached", False)) for s in policy_spans(spans)]


def policy_spans(spans: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [
        dict(s.attributes or {}) for s in spans.get_finished_spans() if s.name == "handrail.policy"
    ]


async def test_a_repeated_call_is_decided_from_the_cache(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    make_admin: Any,
    shipped: Path,
    spans: InMemorySpanExporter,
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    # An agent retrying a denied call, each time in a new run: the same question each time.
    answers = []
    for attempt in range(3):
        resp = await proxy.post(
            "/tools/crm/notes",
            json={"text": "AKIAABCDEFGHIJKLMNOP"},
            headers={"X-Agent-Id": "support-bot", "X-Run-Id": f"retry-{attempt}"},
        )
        assert resp.status == 403
        answers.append((await resp.json())["error"])
    assert seen.count() == 0
    assert answers[0]["reasons"] == answers[1]["reasons"] == answers[2]["reasons"]
    assert len({a["decision_id"] for a in answers}) == 3  # every decision has its own id
    cached = cached_flags(spans)
    assert cached == [False, True, True]
    calls = [s for s in spans.get_finished_spans() if s.name == "execute_tool crm"]
    assert [(s.attributes or {}).get("handrail.decision.cached", False) for s in calls] == [
        False,
        True,
        True,
    ]

    admin = await make_admin(proxy)
    metrics = await (await admin.get("/metrics")).text()
    assert "handrail_policy_cache_hits_total 2.0" in metrics
    assert "decision cache: 1 of 4096 entries, 2 hits, 1 misses" in await policy_detail(admin)


async def test_what_the_policy_reads_is_never_answered_from_the_cache(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    spans: InMemorySpanExporter,
) -> None:
    server, seen = tool
    proxy = await make_proxy(
        {"payments": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}}},
        approvals={"wait_s": 0.1},
    )
    # payments.refund's limits: over 100 needs a human (policies/data.json).
    headers = {"X-Agent-Id": "sales-bot", "X-Run-Id": "run-1"}
    assert (
        await proxy.post("/tools/payments/refunds", json={"amount": 50}, headers=headers)
    ).status == 200
    # Over the approval limit: the body differs where the policy reads it.
    held = await proxy.post("/tools/payments/refunds", json={"amount": 500}, headers=headers)
    assert held.status == 403
    assert (await held.json())["error"]["code"] == "approval_pending"
    # The first body again, in a run whose write count the policy reads: evaluated again.
    again = await proxy.post("/tools/payments/refunds", json={"amount": 50}, headers=headers)
    assert again.status == 200
    assert cached_flags(spans) == [
        False,
        False,
        False,
    ]
    assert seen.count() == 2


async def test_a_cached_allow_does_not_outlive_the_run_write_budget(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    spans: InMemorySpanExporter,
) -> None:
    # support-bot may write 20 times a run. Run "a" makes 20 writes; run "b" makes the same
    # 20 and is answered from the cache; run "c" spends its budget on other writes, then
    # sends run a's first write, which was allowed at 0 writes and is refused at 20.
    server, seen = tool
    proxy = await make_proxy(crm(server))

    async def write(run: str, name: str) -> int:
        resp = await proxy.post(
            "/tools/crm/contacts",
            json={"name": name},
            headers={"X-Agent-Id": "support-bot", "X-Run-Id": f"budget-{run}"},
        )
        return resp.status

    assert [await write("a", f"Ada {i}") for i in range(20)] == [200] * 20
    assert [await write("b", f"Ada {i}") for i in range(20)] == [200] * 20
    assert [await write("c", f"Bob {i}") for i in range(20)] == [200] * 20
    assert await write("c", "Ada 0") == 403
    assert seen.count() == 60
    cached = cached_flags(spans)
    assert cached == [False] * 20 + [True] * 20 + [False] * 21


async def test_a_reload_forgets_cached_decisions(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    make_admin: Any,
    policy_dir: Path,
) -> None:
    server, seen = tool
    allow_all = HEADER + 'decision := {"allow": true, "reasons": []}\n'
    (policy_dir / "handrail.rego").write_text(allow_all)
    proxy = await make_proxy(crm(server))
    for _ in range(2):
        assert (await proxy.post("/tools/crm/contacts", json={"name": "Ada"})).status == 200

    (policy_dir / "handrail.rego").write_text(
        HEADER + 'decision := {"allow": false, "reasons": ["closed for the night"]}\n'
    )
    admin = await make_admin(proxy)
    assert (await admin.post("/policies/reload")).status == 200
    resp = await proxy.post("/tools/crm/contacts", json={"name": "Ada"})
    assert resp.status == 403
    assert (await resp.json())["error"]["reasons"] == ["closed for the night"]
    assert seen.count() == 2


async def test_an_impure_policy_is_evaluated_every_time(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    make_admin: Any,
    policy_dir: Path,
    spans: InMemorySpanExporter,
) -> None:
    server, _ = tool
    (policy_dir / "handrail.rego").write_text(
        HEADER + 'decision := {"allow": time.now_ns() > 0, "reasons": []}\n'
    )
    proxy = await make_proxy(crm(server))
    for _ in range(3):
        assert (await proxy.post("/tools/crm/contacts", json={"name": "Ada"})).status == 200
    assert not any(cached_flags(spans))
    admin = await make_admin(proxy)
    assert "decision cache off: the policy calls time.now_ns" in await policy_detail(admin)


async def test_the_cache_can_be_turned_off(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    spans: InMemorySpanExporter,
) -> None:
    server, _ = tool
    proxy: TestClient = await make_proxy(crm(server), policy={"cache": {"max_entries": 0}})
    for _ in range(3):
        assert (await proxy.get("/tools/crm/contacts/42")).status == 200
    assert not any(cached_flags(spans))


# --- the same question asked while it is being evaluated ------------------------------


class SlowPolicy:
    """Stands in for the evaluators: counts evaluations, answers after ``delay_s``."""

    def __init__(self, delay_s: float = 0.05, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.evaluations = 0

    async def evaluate(self) -> str:
        self.evaluations += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise PolicyUnavailable("policy evaluation took longer than 1 s")
        return "allow"


async def test_a_burst_of_the_same_question_costs_one_evaluation() -> None:
    cache = serving()
    policy = SlowPolicy()
    answers = await asyncio.gather(
        *(cache.answer(key(cache, "decision", document()), policy.evaluate) for _ in range(10))
    )
    assert policy.evaluations == 1
    assert sorted(answers) == [("allow", False)] + [("allow", True)] * 9
    assert (cache.hits, cache.misses) == (9, 1)
    # Another question is not held up behind it, nor answered by it.
    other = await cache.answer(
        key(cache, "decision", document(run__writes=9)), SlowPolicy(0).evaluate
    )
    assert other == ("allow", False)


async def test_a_failed_evaluation_fails_everyone_waiting_for_it() -> None:
    cache = serving()
    policy = SlowPolicy(fail=True)
    answers = await asyncio.gather(
        *(cache.answer(key(cache, "decision", document()), policy.evaluate) for _ in range(5)),
        return_exceptions=True,
    )
    assert policy.evaluations == 1
    assert all(isinstance(a, PolicyUnavailable) for a in answers)
    assert len(cache) == 0  # failures are never kept
    assert await cache.answer(key(cache, "decision", document()), SlowPolicy(0).evaluate) == (
        "allow",
        False,
    )


async def test_when_the_evaluating_call_goes_away_the_others_evaluate() -> None:
    cache = serving()
    policy = SlowPolicy()
    first = asyncio.ensure_future(cache.answer(key(cache, "decision", document()), policy.evaluate))
    await asyncio.sleep(0.01)
    waiting = [
        asyncio.ensure_future(cache.answer(key(cache, "decision", document()), policy.evaluate))
        for _ in range(3)
    ]
    await asyncio.sleep(0.01)
    first.cancel()
    answers = await asyncio.gather(*waiting)
    assert first.cancelled()
    assert [value for value, _ in answers] == ["allow"] * 3
    assert policy.evaluations == 2  # the first, abandoned; then one for the three


async def test_after_a_reload_a_question_is_not_joined_to_the_old_policy() -> None:
    cache = serving()
    old = SlowPolicy()
    before = asyncio.ensure_future(cache.answer(key(cache, "decision", document()), old.evaluate))
    await asyncio.sleep(0.01)
    cache.serve((("agent", "id"), ("request",), ("run", "writes"), ("run", "repeats")), frozenset())
    new = SlowPolicy(0)
    assert await cache.answer(key(cache, "decision", document()), new.evaluate) == ("allow", False)
    assert new.evaluations == 1
    assert await before == ("allow", False)


async def test_parallel_identical_calls_are_evaluated_once(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    spans: InMemorySpanExporter,
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(server))
    # An agent framework firing the same refused call ten times at once (each its own run).
    answers = await asyncio.gather(
        *(proxy.post("/tools/crm/notes", json={"text": "AKIAABCDEFGHIJKLMNOP"}) for _ in range(10))
    )
    assert [a.status for a in answers] == [403] * 10
    assert seen.count() == 0
    cached = cached_flags(spans)
    assert sorted(cached) == [False] + [True] * 9
