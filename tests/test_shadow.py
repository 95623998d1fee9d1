"""Shadow policies (#18, ``policy.shadow``): candidates decide every live call off its path;
the live decision is enforced, the shadow one recorded and its differences counted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import TEST_POLICY, ProxyFactory, Seen

CANDIDATE = TEST_POLICY.replace(
    'reasons contains "deletes are not allowed here" if input.request.method == "DELETE"',
    'reasons contains "deletes are not allowed here" if input.request.method == "DELETE"\n\n'
    'reasons contains "refunds are frozen" if startswith(input.request.path, "/refunds")\n\n'
    '_denied if startswith(input.request.path, "/refunds")',
)


async def test_the_live_decision_is_enforced_and_the_shadow_one_recorded(
    make_proxy: ProxyFactory,
    make_admin: Callable[[TestClient], Awaitable[TestClient]],
    tool: tuple[TestServer, Seen],
    tmp_path: Path,
    spans: InMemorySpanExporter,
) -> None:
    assert CANDIDATE != TEST_POLICY
    shadow = tmp_path / "candidate"
    shadow.mkdir()
    (shadow / "handrail.rego").write_text(CANDIDATE)
    server, seen = tool
    proxy = await make_proxy(
        {"pay": {"upstream": str(server.make_url("/"))}}, policy={"shadow": str(shadow)}
    )
    admin = await make_admin(proxy)
    run = {"X-Run-Id": "r-shadow", "X-Agent-Id": "a"}
    refund = await proxy.post("/tools/pay/refunds", json={"amount": 5}, headers=run)
    assert refund.status == 200  # the live policy allows it: enforced
    assert seen.count("/refunds") == 1
    delete = await proxy.delete("/tools/pay/orders/1", headers=run)
    assert delete.status == 403
    rows: list[dict[str, Any]] = []
    for _ in range(100):
        rows = (await (await admin.get("/calls?run=r-shadow")).json())["calls"]
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    by_path = {r["path"]: r["shadow"] for r in rows}
    assert by_path["/refunds"]["decision"] == "deny"
    assert by_path["/refunds"]["change"] == "newly_denied"
    assert "refunds are frozen" in by_path["/refunds"]["reasons"]
    assert by_path["/orders/1"] == {
        "decision": "deny",
        "reasons": ["deletes are not allowed here"],
        "change": None,
    }
    metrics = await (await admin.get("/metrics")).text()
    assert 'handrail_shadow_differences_total{change="newly_denied",tool="pay"} 1.0' in metrics
    (span,) = [
        s
        for s in spans.get_finished_spans()
        if s.name == "execute_tool pay" and (s.attributes or {}).get("url.path") == "/refunds"
    ]
    assert (span.attributes or {})["handrail.shadow.change"] == "newly_denied"
