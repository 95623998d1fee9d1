"""Idempotency keys and the replay cache, end to end through the real proxy.

What an agent sees (status, body, ``Idempotent-Replayed``, the error code) and how many
times the fake tool really ran, on SQLite and on the shared PostgreSQL store, in one
proxy, across a restart, across two proxy processes, and after a proxy is killed mid-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import Config
from proxy.http.app import build_app
from tests.conftest import ProxyFactory, Seen, free_port, tool_app
from tests.support_idempotency import (
    Answer,
    pg_schema,
    proxy_processes,
    send,
    start_proxy,
    write_config,
)

KEY = {"Idempotency-Key": "order-7f3a"}
RUN = {"X-Agent-Id": "sales-bot", "X-Run-Id": "r-1"}
PAYLOAD = {"name": "Ada", "tags": ["vip", "eu"], "address": {"city": "Paris", "zip": "75001"}}
STORM = 50

ToolFixture = tuple[TestServer, Seen]
Client = TestClient[web.Request, web.Application]


def crm(upstream: str, mode: str = "enforce", **extra: Any) -> dict[str, Any]:
    idempotency = {"mode": mode, **extra.pop("idempotency", {})}
    return {"crm": {"upstream": upstream, "idempotency": idempotency, **extra}}


def api(server: TestServer) -> str:
    return str(server.make_url("/api"))


async def ask(
    proxy: Client,
    method: str,
    path: str,
    *,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    if body is not None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    return await send(proxy.session, method, str(proxy.make_url(path)), data=data, headers=headers)


def tool_headers(seen: Seen, index: int = -1) -> dict[str, str]:
    return {k.lower(): v for k, v in seen.requests[index]["headers"].items()}


# Replay of a retried write


async def test_retried_keyed_write_is_replayed_and_the_tool_runs_once(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts?status=201", body=PAYLOAD, headers=KEY)
    retry = await ask(proxy, "POST", "/tools/crm/contacts?status=201", body=PAYLOAD, headers=KEY)

    assert first.status == 201 and not first.replayed
    assert retry.status == 201
    assert retry.replayed
    assert retry.body == first.body
    assert retry.headers["X-Tool"] == "fake"
    assert retry.headers["Content-Type"] == first.headers["Content-Type"]
    assert seen.count() == 1


async def test_tool_4xx_answer_is_stored_and_replayed(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts?status=404", body=PAYLOAD, headers=KEY)
    retry = await ask(proxy, "POST", "/tools/crm/contacts?status=404", body=PAYLOAD, headers=KEY)

    assert first.status == 404 and not first.replayed
    assert retry.status == 404 and retry.replayed
    assert retry.body == first.body
    assert seen.count() == 1


async def test_tool_5xx_answer_releases_the_key_so_the_retry_runs(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts?status=503", body=PAYLOAD, headers=KEY)
    retry = await ask(proxy, "POST", "/tools/crm/contacts?status=503", body=PAYLOAD, headers=KEY)

    assert first.status == 503 and not first.replayed
    assert retry.status == 503 and not retry.replayed
    assert seen.count() == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_tool_that_runs_the_write_and_hangs_up_runs_it_once(
    make_proxy: ProxyFactory, method: str, tmp_path: Path
) -> None:
    """The tool reads the request, does the write, and closes the connection unanswered:
    the write may have happened, so it is neither re-sent (aiohttp re-sends PUT and DELETE
    on its own) nor run again by the agent's retry."""
    executed: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        executed.append(head.split(b" ", 1)[0])
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        allow_all = tmp_path / "allow_all"
        allow_all.mkdir()
        (allow_all / "p.rego").write_text(
            'package handrail\n\ndecision := {"allow": true, "reasons": [], '
            '"require_approval": false}\n\nvisible := true\n'
        )
        proxy = await make_proxy(
            crm(f"http://127.0.0.1:{port}", timeout_s=5),
            policy={"path": str(allow_all), "watch": False},
        )
        first = await ask(proxy, method, "/tools/crm/contacts/1", body=PAYLOAD, headers=KEY)
        retry = await ask(proxy, method, "/tools/crm/contacts/1", body=PAYLOAD, headers=KEY)
    finally:
        server.close()
        await server.wait_closed()

    assert first.status == 502 and first.error_code == "upstream_unavailable"
    assert retry.status == 409 and retry.error_code == "outcome_unknown"
    assert json.loads(retry.body)["error"]["reason"] == "connection_lost"
    assert executed == [method.encode()]


async def test_unreachable_tool_releases_the_key_so_the_retry_runs(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_proxy: ProxyFactory
) -> None:
    port = free_port()
    proxy = await make_proxy(crm(f"http://127.0.0.1:{port}/api"))
    down = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    assert down.status == 502
    assert down.error_code == "upstream_unavailable"

    seen = Seen()
    await aiohttp_server(tool_app(seen), port=port)
    retry = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    assert retry.status == 200 and not retry.replayed
    assert seen.count() == 1


async def test_replayed_body_is_byte_identical_to_the_original(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "PUT", "/tools/crm/contacts/42", body=PAYLOAD, headers=KEY)
    retry = await ask(proxy, "PUT", "/tools/crm/contacts/42", body=PAYLOAD, headers=KEY)

    assert retry.replayed
    assert retry.body == first.body
    assert json.loads(retry.body)["got"]["path"] == "/api/contacts/42"
    assert seen.count() == 1


async def test_replayed_streamed_body_is_byte_identical_to_the_original(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    path = "/tools/crm/export?stream=6&size=1500"
    first = await ask(proxy, "POST", path, data=b"export everything", headers=KEY)
    retry = await ask(proxy, "POST", path, data=b"export everything", headers=KEY)

    assert first.headers.get("Transfer-Encoding") == "chunked"  # it really streamed
    assert len(first.body) == 6 * 1500
    assert retry.replayed
    assert retry.body == first.body
    assert retry.headers["Content-Type"] == first.headers["Content-Type"]
    assert seen.count() == 1


async def test_response_over_max_stored_bytes_is_not_replayed_and_not_rerun(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), idempotency={"max_stored_bytes": 1000}))
    path = "/tools/crm/report?stream=50&size=1024"
    first = await ask(proxy, "POST", path, data=b"build the report", headers=KEY)
    retry = await ask(proxy, "POST", path, data=b"build the report", headers=KEY)

    assert first.status == 200
    assert len(first.body) == 50 * 1024  # the agent got all of it the first time
    assert retry.status == 409
    assert retry.error_code == "response_not_replayable"
    assert seen.count() == 1


# The key's lifecycle: in flight, reused, missing, off, safe methods


async def test_same_key_while_in_flight_is_409(tool: ToolFixture, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    slow = asyncio.ensure_future(
        ask(proxy, "POST", "/tools/crm/contacts?sleep=0.6", body=PAYLOAD, headers=KEY)
    )
    while seen.count() == 0:
        await asyncio.sleep(0.01)
    busy = await ask(proxy, "POST", "/tools/crm/contacts?sleep=0.6", body=PAYLOAD, headers=KEY)
    first = await slow

    assert busy.status == 409
    assert busy.error_code == "idempotency_key_in_use"
    assert first.status == 200 and not first.replayed
    assert seen.count() == 1


async def test_same_key_with_another_payload_is_422(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    other = await ask(
        proxy, "POST", "/tools/crm/contacts", body={**PAYLOAD, "name": "Bob"}, headers=KEY
    )

    assert first.status == 200
    assert other.status == 422
    assert other.error_code == "idempotency_key_reused"
    assert seen.count() == 1


async def test_enforce_mode_refuses_a_write_without_a_key(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    answer = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD)

    assert answer.status == 400
    assert answer.error_code == "idempotency_key_missing"
    assert seen.count() == 0


async def test_enforce_mode_forwards_the_agents_key_upstream(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)

    assert tool_headers(seen)["idempotency-key"] == KEY["Idempotency-Key"]


async def test_mode_off_forwards_writes_without_a_key_every_time(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="off"))
    first = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=RUN)
    again = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=RUN)

    assert first.status == again.status == 200
    assert not again.replayed
    assert seen.count() == 2
    assert "idempotency-key" not in tool_headers(seen)


async def test_get_is_never_keyed(tool: ToolFixture, make_proxy: ProxyFactory) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    plain = await ask(proxy, "GET", "/tools/crm/contacts/42")
    keyed = await ask(proxy, "GET", "/tools/crm/contacts/42", headers=KEY)
    again = await ask(proxy, "GET", "/tools/crm/contacts/42", headers=KEY)

    assert plain.status == keyed.status == again.status == 200
    assert not again.replayed
    assert seen.count() == 3


async def test_key_expires_after_ttl_and_the_same_key_runs_again(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), idempotency={"ttl_s": 1}))
    first = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    await asyncio.sleep(1.3)
    later = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)

    assert first.status == 200
    assert later.status == 200
    assert not later.replayed, "the record outlived its ttl_s"
    assert seen.count() == 2


async def test_key_still_in_flight_after_its_ttl_is_still_409(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), idempotency={"ttl_s": 0.2}))
    slow = asyncio.ensure_future(
        ask(proxy, "POST", "/tools/crm/contacts?sleep=0.8", body=PAYLOAD, headers=KEY)
    )
    while seen.count() == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)  # past ttl_s, well inside the lease
    busy = await ask(proxy, "POST", "/tools/crm/contacts?sleep=0.8", body=PAYLOAD, headers=KEY)
    first = await slow

    assert busy.status == 409
    assert busy.error_code == "idempotency_key_in_use"
    assert first.status == 200
    assert seen.count() == 1


# The policy and the key: the store is asked while the policy decides, the policy wins

BLOCKED = {"X-Agent-Id": "blocked"}


async def test_a_refused_call_leaves_its_key_free_for_the_allowed_retry(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    refused = await ask(
        proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers={**KEY, **BLOCKED}
    )
    allowed = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)

    assert (refused.status, refused.error_code) == (403, "policy_denied")
    assert allowed.status == 200 and not allowed.replayed
    assert seen.count() == 1


async def test_a_refused_call_is_refused_even_when_its_key_would_replay(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    refused = await ask(
        proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers={**KEY, **BLOCKED}
    )
    retry = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)

    assert first.status == 200
    assert (refused.status, refused.error_code) == (403, "policy_denied")
    assert "Idempotent-Replayed" not in refused.headers
    assert retry.status == 200 and retry.replayed
    assert seen.count() == 1


async def test_a_refused_call_is_refused_even_when_its_key_is_in_flight(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    slow = asyncio.ensure_future(
        ask(proxy, "POST", "/tools/crm/contacts?sleep=0.5", body=PAYLOAD, headers=KEY)
    )
    while seen.count() == 0:
        await asyncio.sleep(0.01)
    refused = await ask(
        proxy, "POST", "/tools/crm/contacts?sleep=0.5", body=PAYLOAD, headers={**KEY, **BLOCKED}
    )
    first = await slow
    retry = await ask(proxy, "POST", "/tools/crm/contacts?sleep=0.5", body=PAYLOAD, headers=KEY)

    assert (refused.status, refused.error_code) == (403, "policy_denied")
    assert first.status == 200 and not first.replayed
    assert retry.status == 200 and retry.replayed  # the refusal did not touch the owner's record
    assert seen.count() == 1


async def test_the_key_is_claimed_while_the_policy_decides(
    tool: ToolFixture, make_proxy: ProxyFactory, spans: InMemorySpanExporter
) -> None:
    server, _ = tool
    proxy = await make_proxy(crm(api(server)))
    answer = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    refused = await ask(
        proxy,
        "POST",
        "/tools/crm/contacts",
        body=PAYLOAD,
        headers={"Idempotency-Key": "k-2", **BLOCKED},
    )
    assert answer.status == 200 and refused.status == 403

    finished = spans.get_finished_spans()
    policy = [s for s in finished if s.name == "handrail.policy"]
    claims = [s for s in finished if s.name == "handrail.idempotency"]
    assert len(policy) == len(claims) == 2
    for decided, claimed in zip(policy, claims, strict=True):
        assert claimed.parent == decided.parent  # both children of the call's span
        assert claimed.start_time is not None and decided.end_time is not None
        assert claimed.start_time < decided.end_time  # asked before the decision was in
    states = [dict(s.attributes or {})["handrail.idempotency.state"] for s in claims]
    assert states == ["owned", "released"]


# attach mode: keys derived for blind retries


async def test_attach_mode_recognises_a_blind_retry_despite_key_order_and_spacing(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="attach"))
    compact = b'{"name":"Ada","tags":["vip","eu"],"address":{"city":"Paris","zip":"75001"}}'
    shuffled = b'{ "address": {"zip": "75001",  "city": "Paris"},\n  "tags": ["vip", "eu"], "name": "Ada" }'
    headers = {**RUN, "Content-Type": "application/json"}
    first = await ask(proxy, "POST", "/tools/crm/contacts", data=compact, headers=headers)
    retry = await ask(proxy, "POST", "/tools/crm/contacts", data=shuffled, headers=headers)

    assert first.status == 200 and not first.replayed
    assert retry.status == 200 and retry.replayed
    assert retry.body == first.body
    assert seen.count() == 1


async def test_attach_mode_does_not_merge_the_same_call_in_two_runs(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="attach"))
    one = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=RUN)
    two = await ask(
        proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers={**RUN, "X-Run-Id": "r-2"}
    )

    assert not one.replayed and not two.replayed
    assert seen.count() == 2
    assert tool_headers(seen, 0)["idempotency-key"] != tool_headers(seen, 1)["idempotency-key"]


async def test_attach_mode_does_not_merge_two_agents(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="attach"))
    one = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=RUN)
    two = await ask(
        proxy,
        "POST",
        "/tools/crm/contacts",
        body=PAYLOAD,
        headers={**RUN, "X-Agent-Id": "support-bot"},
    )

    assert not one.replayed and not two.replayed
    assert seen.count() == 2


@pytest.mark.parametrize("other", ["support-bot", "SALES-BOT", ""])
async def test_one_agents_key_never_replays_another_agents_answer(
    tool: ToolFixture, make_proxy: ProxyFactory, other: str
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    first = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers={**RUN, **KEY})
    theirs = {**RUN, **KEY, "X-Agent-Id": other} if other else {**KEY, "X-Run-Id": "r-1"}
    stolen = await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=theirs)

    assert first.status == 200
    assert stolen.status == 422 and not stolen.replayed
    assert stolen.error_code == "idempotency_key_reused"
    assert first.body not in stolen.body
    assert seen.count() == 1


async def test_the_same_key_with_another_content_type_is_a_reuse(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server)))
    body = b"a=1&b=2"
    form = {**RUN, **KEY, "Content-Type": "application/x-www-form-urlencoded"}
    first = await ask(proxy, "POST", "/tools/crm/contacts", data=body, headers=form)
    other = {**form, "Content-Type": "text/csv"}
    again = await ask(proxy, "POST", "/tools/crm/contacts", data=body, headers=other)

    assert first.status == 200
    assert again.status == 422 and again.error_code == "idempotency_key_reused"
    assert seen.count() == 1


async def test_attach_mode_forwards_the_derived_key_upstream(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="attach"))
    await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=RUN)
    await ask(proxy, "POST", "/tools/crm/contacts", body={"other": 1}, headers=RUN)

    first, second = tool_headers(seen, 0), tool_headers(seen, 1)
    assert first["idempotency-key"]
    assert second["idempotency-key"] and second["idempotency-key"] != first["idempotency-key"]


async def test_attach_mode_forwards_the_agents_own_key_when_given(
    tool: ToolFixture, make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(crm(api(server), mode="attach"))
    await ask(proxy, "POST", "/tools/crm/contacts", body=PAYLOAD, headers={**RUN, **KEY})

    assert tool_headers(seen)["idempotency-key"] == KEY["Idempotency-Key"]


# Storms: many identical retries at once run the tool once


async def storm(session: aiohttp.ClientSession, urls: list[str]) -> list[Answer]:
    """Fire the same keyed write at every URL at once."""
    body = json.dumps(PAYLOAD).encode()
    headers = {"Content-Type": "application/json", **KEY}
    return await asyncio.gather(
        *(send(session, "POST", u, data=body, headers=headers) for u in urls)
    )


def assert_ran_once(answers: list[Answer], seen: Seen) -> None:
    ran = [a for a in answers if a.status == 200 and not a.replayed]
    assert len(ran) == 1, [(a.status, a.error_code) for a in answers]
    for answer in answers:
        if answer.replayed:
            assert answer.status == 200 and answer.body == ran[0].body
        elif answer is not ran[0]:
            assert (answer.status, answer.error_code) == (409, "idempotency_key_in_use")
    assert seen.count() == 1


@pytest.fixture
async def pg_store() -> AsyncIterator[str]:
    async with pg_schema() as url:
        yield url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_storm_of_identical_keyed_writes_runs_the_tool_once(
    tool: ToolFixture, make_proxy: ProxyFactory, backend: str
) -> None:
    server, seen = tool
    async with contextlib.AsyncExitStack() as stack:
        sections: dict[str, Any] = {}
        if backend == "postgresql":
            sections["store"] = {"url": await stack.enter_async_context(pg_schema())}
        proxy = await make_proxy(crm(api(server)), **sections)
        stack.push_async_callback(proxy.close)  # before its schema is dropped
        url = str(proxy.make_url("/tools/crm/contacts?sleep=0.3"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            answers = await storm(session, [url] * STORM)

    assert_ran_once(answers, seen)


async def test_storm_over_two_proxy_processes_on_postgresql_runs_the_tool_once(
    tool: ToolFixture, pg_store: str, policy_dir: Path, tmp_path: Path
) -> None:
    server, seen = tool
    raw = {
        "tools": crm(api(server)),
        "policy": {"path": str(policy_dir), "watch": False},
        "store": {"url": pg_store},
    }
    configs = [write_config(tmp_path / f"proxy{i}.yaml", raw) for i in (1, 2)]
    async with proxy_processes(configs) as (one, two):
        urls = [
            p.tool_url("crm", "/contacts?sleep=0.3") for p in (one, two) for _ in range(STORM // 2)
        ]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            answers = await storm(session, urls)

    assert_ran_once(answers, seen)


# Durability: restarts and crashes


async def test_retry_after_a_proxy_restart_is_replayed(
    tool: ToolFixture,
    aiohttp_client: Callable[..., Awaitable[Client]],
    make_config: Callable[..., Config],
) -> None:
    server, seen = tool
    config = make_config(crm(api(server)))  # a SQLite file under tmp_path
    before = await aiohttp_client(build_app(config))
    first = await ask(before, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)
    await before.close()

    after = await aiohttp_client(build_app(config))
    retry = await ask(after, "POST", "/tools/crm/contacts", body=PAYLOAD, headers=KEY)

    assert first.status == 200
    assert retry.status == 200 and retry.replayed
    assert retry.body == first.body
    assert seen.count() == 1


async def test_key_left_in_flight_by_a_killed_proxy_is_never_run_again(
    tool: ToolFixture, make_proxy: ProxyFactory, policy_dir: Path, tmp_path: Path
) -> None:
    server, seen = tool
    timeout_s, margin_s = 1.0, 0.5
    store = {"url": f"sqlite:///{tmp_path}/crash.db"}
    raw = {
        "tools": crm(api(server), timeout_s=timeout_s, idempotency={"lease_margin_s": margin_s}),
        "policy": {"path": str(policy_dir), "watch": False},
        "store": store,
    }
    path = "/contacts?sleep=1.5"
    body = json.dumps(PAYLOAD).encode()
    headers = {"Content-Type": "application/json", **KEY}
    doomed = await start_proxy(write_config(tmp_path / "doomed.yaml", raw))
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(
                send(session, "POST", doomed.tool_url("crm", path), data=body, headers=headers)
            )
            while seen.count() == 0:  # the tool is working on it
                await asyncio.sleep(0.01)
            claimed_by = time.monotonic()
            doomed.kill()
            with pytest.raises(aiohttp.ClientError):
                await pending
    finally:
        await doomed.stop()

    # A new proxy on the same store; this one waits long enough for the slow tool.
    survivor = await make_proxy(crm(api(server), timeout_s=5), store=store)
    early = await ask(survivor, "POST", f"/tools/crm{path}", data=body, headers=headers)
    assert early.status == 409
    assert early.error_code == "idempotency_key_in_use"

    lease_s = timeout_s + margin_s
    await asyncio.sleep(max(0.0, claimed_by + lease_s + 0.2 - time.monotonic()))
    late = await ask(survivor, "POST", f"/tools/crm{path}", data=body, headers=headers)
    assert late.status == 409
    assert late.error_code == "outcome_unknown"
    assert json.loads(late.body)["error"]["reason"] == "lease_expired"
    assert seen.count() == 1
