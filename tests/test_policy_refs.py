"""The request's headers and query go to the policy only when a served module names them.

Unit cases for the source reading (``proxy.policy.refs``), then the real proxy: a policy
that reads a header still decides on it, a policy that reads the input in a way the reading
cannot bound gets everything, and a reload that starts reading headers gets them at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.policy.cache import trim
from proxy.policy.refs import (
    OPTIONAL_REQUEST_FIELDS,
    input_paths,
    optional_fields_sent,
    request_fields,
)
from tests.conftest import ProxyFactory, Seen

SHIPPED = Path(__file__).resolve().parent.parent / "policies"

HEADER = "package handrail\n\nimport rego.v1\n\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('allow if input.request.method == "GET"', {"method"}),
        ('x := input.request.headers["x-tenant"]', {"headers"}),
        ("some k, v in input.request.query", {"query"}),
        ("import input.request.headers as h", {"headers"}),
        ('allow if input.agent.id == "a"', set()),
        # Mentions that are not references: comments and strings.
        ('# input.request.headers would be nice\nallow if input.tool.name == "crm"', set()),
        ('msg := "input.request.headers and input"', set()),
        ("msg := `input.request.query`", set()),
        ("my_input := 1\ninput_x := 2", set()),
    ],
)
def test_named_request_fields(source: str, expected: set[str]) -> None:
    assert request_fields([HEADER + source]) == frozenset(expected)


@pytest.mark.parametrize(
    "source",
    [
        "doc := input",
        'x := object.get(input, "request", {})',
        "r := input.request\nallow if r.headers",
        'allow if input.request["headers"]',
        'allow if input["request"].headers',
        "import input.request",
        "allow if walk(input, [p, v])",
    ],
)
def test_unbounded_reads_send_everything(source: str) -> None:
    assert request_fields([HEADER + source]) is None
    assert optional_fields_sent([HEADER + source]) == OPTIONAL_REQUEST_FIELDS


def test_one_module_that_reads_everything_is_enough() -> None:
    modules = [HEADER + 'allow if input.tool.name == "crm"', HEADER + "doc := input"]
    assert optional_fields_sent(modules) == OPTIONAL_REQUEST_FIELDS


def test_the_shipped_policy_needs_neither_headers_nor_query() -> None:
    sources = [p.read_text() for p in SHIPPED.glob("*.rego") if not p.name.endswith("_test.rego")]
    assert optional_fields_sent(sources) == frozenset()


# Through the proxy

TENANT_POLICY = """package handrail

import rego.v1

default allow := true

allow := false if input.request.headers["x-tenant"] == "evil"

allow := false if input.request.query.mode[_] == "wipe"

decision := {"allow": allow, "reasons": [], "require_approval": false}
"""

WHOLE_REQUEST_POLICY = """package handrail

import rego.v1

default allow := true

request := input.request

allow := false if request.headers["x-tenant"] == "evil"

decision := {"allow": allow, "reasons": [], "require_approval": false}
"""

IGNORES_HEADERS_POLICY = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}
"""


def crm(server: TestServer) -> dict[str, Any]:
    return {"crm": {"upstream": str(server.make_url("/api")), "idempotency": {"mode": "off"}}}


async def evil_tenant_status(proxy: TestClient[Any, Any]) -> int:
    resp = await proxy.post("/tools/crm/x", json={}, headers={"X-Tenant": "evil"})
    return resp.status


@pytest.mark.parametrize("source", [TENANT_POLICY, WHOLE_REQUEST_POLICY])
async def test_a_policy_that_reads_a_header_decides_on_it(
    tool: tuple[TestServer, Seen], make_proxy: ProxyFactory, policy_dir: Path, source: str
) -> None:
    server, seen = tool
    (policy_dir / "handrail.rego").write_text(source)
    proxy = await make_proxy(crm(server))
    assert await evil_tenant_status(proxy) == 403
    assert (await proxy.post("/tools/crm/x", json={}, headers={"X-Tenant": "acme"})).status == 200
    assert seen.count() == 1


async def test_a_policy_that_reads_the_query_decides_on_it(
    tool: tuple[TestServer, Seen], make_proxy: ProxyFactory, policy_dir: Path
) -> None:
    server, seen = tool
    (policy_dir / "handrail.rego").write_text(TENANT_POLICY)
    proxy = await make_proxy(crm(server))
    assert (await proxy.post("/tools/crm/x?mode=wipe", json={})).status == 403
    assert (await proxy.post("/tools/crm/x?mode=keep", json={})).status == 200
    assert seen.count() == 1


async def test_a_reload_that_starts_reading_headers_gets_them(
    tool: tuple[TestServer, Seen],
    make_proxy: ProxyFactory,
    make_admin: Any,
    policy_dir: Path,
) -> None:
    server, _ = tool
    (policy_dir / "handrail.rego").write_text(IGNORES_HEADERS_POLICY)
    proxy = await make_proxy(crm(server))
    assert await evil_tenant_status(proxy) == 200

    (policy_dir / "handrail.rego").write_text(TENANT_POLICY)
    admin = await make_admin(proxy)
    assert (await admin.post("/policies/reload")).status == 200
    assert await evil_tenant_status(proxy) == 403


def test_a_whole_request_read_keeps_the_whole_request_and_trims_the_rest() -> None:
    paths = input_paths([HEADER + "r := input.request\nallow if r.headers"])
    assert paths == (("request",),)
    document = {
        "request": {"method": "GET", "headers": {"x-tenant": "a"}, "query": {}},
        "idempotency_key": "k",
    }
    assert trim(document, paths) == {"request": document["request"]}
