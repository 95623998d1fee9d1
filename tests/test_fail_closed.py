"""When the store goes away mid-life, calls are refused (503), never run unguarded."""

from __future__ import annotations

from tests.conftest import ProxyFactory
from tests.support_idempotency import pg_schema
from tests.support_relay import PostgresRelay


async def test_store_that_goes_away_refuses_calls_and_never_reaches_the_tool(
    tool,
    make_proxy: ProxyFactory,  # type: ignore[no-untyped-def]
) -> None:
    server, seen = tool
    relay = PostgresRelay()
    port = await relay.start()
    async with pg_schema() as url:
        store = {"url": url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")}
        tools = {
            "crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "enforce"}}
        }
        proxy = await make_proxy(tools, store=store)
        ok = await proxy.post(
            "/tools/crm/contacts", json={"a": 1}, headers={"Idempotency-Key": "k-1"}
        )
        assert ok.status == 200
        await relay.stop()
        write = await proxy.post(
            "/tools/crm/contacts", json={"a": 2}, headers={"Idempotency-Key": "k-2"}
        )
        read = await proxy.get("/tools/crm/contacts")
        for resp in (write, read):
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "store_unavailable"
        assert seen.count() == 1
