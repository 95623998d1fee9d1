"""The canonical request: what the policy decides is byte for byte what the tool gets.

Table-driven over the classes of ambiguity (percent-encoded paths, fragments and path
parameters, JSON bodies hidden behind a Content-Type, a BOM or whitespace, compressed
bodies, duplicate members, NaN, deep nesting, method overrides), then end to end through
the proxy with the shipped policy against a real aiohttp tool.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import string
from pathlib import Path
from typing import Any

import pytest

from proxy.config import shipped_policies
from proxy.errors import BadRequest
from proxy.ingress.canonical import MAX_JSON_DEPTH, canonical_path, json_body, strict_loads
from tests.conftest import ProxyFactory, Seen

# -- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", "/"),
        ("/", "/"),
        ("/contacts/42", "/contacts/42"),
        ("/%61dmin", "/admin"),
        ("/%63ontacts", "/contacts"),
        ("/%7Euser/a-b_c.d", "/~user/a-b_c.d"),
        ("/a%3ab", "/a%3Ab"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/q%20r", "/q%20r"),
        ("/x@y:z!$&'()*+,=", "/x@y:z!$&'()*+,="),
    ],
)
def test_a_path_is_brought_to_one_form(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical
    assert canonical_path(canonical) == canonical  # canonical is a fixed point


@pytest.mark.parametrize(
    "raw",
    [
        "contacts",
        "/contacts#1",
        "/contacts;id=1",
        "/a%2fb",
        "/a%2Fb",
        "/a%5cb",
        "/a\\b",
        "/%2e%2e/admin",
        "/%2E/x",
        "/a/%252e%252e/b",
        "/a%25",
        "/a%00b",
        "/a%0a",
        "/a%7f",
        "/a%zz",
        "/a%4",
        "//evil.example/x",
        "/a//b",
        "/a/./b",
        "/a/../b",
        "/a/..",
        "/a b",
        '/a"b',
        "/a<b>",
        "/é",
    ],
)
def test_an_ambiguous_path_is_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        canonical_path(raw)


def test_random_paths_are_refused_or_canonical_and_stable() -> None:
    """Property: any input is refused, or gives a path that is its own canonical form and
    that holds no escape of an unreserved character (no second reading exists)."""
    rng = random.Random(20261201)
    alphabet = string.ascii_letters + string.digits + "-._~/%;#?\\:@!$&'()*+,= " + "é"
    hexes = "0123456789abcdefABCDEF"
    for _ in range(20_000):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                parts.append("%" + rng.choice(hexes) + rng.choice(hexes))
            else:
                parts.append(rng.choice(alphabet))
        raw = "/" + "".join(parts)
        try:
            path = canonical_path(raw)
        except BadRequest:
            continue
        assert canonical_path(path) == path
        for i, ch in enumerate(path):
            if ch == "%":
                decoded = chr(int(path[i + 1 : i + 3], 16))
                assert decoded not in string.ascii_letters + string.digits + "-._~"
        assert "/../" not in path + "/" and "/./" not in path + "/" and "//" not in path


# -- bodies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "parsed"),
    [
        ("application/json", b'{"a": 1}', {"a": 1}),
        ("", b'{"a": 1}', {"a": 1}),
        ("text/plain", b' {"a": 1}', {"a": 1}),
        ("text/plain", b'\n\t{"a": 1}', {"a": 1}),
        ("application/octet-stream", b'\xef\xbb\xbf{"a": 1}', {"a": 1}),
        ("application/x-www-form-urlencoded", b"\r\n[1, 2]", [1, 2]),
        ("text/plain", b"hello", None),
        ("", b"", None),
        ("application/json", b'"just a string"', "just a string"),
    ],
)
def test_a_body_a_tool_could_read_as_json_is_parsed(
    content_type: str, body: bytes, parsed: Any
) -> None:
    assert json_body(content_type, "", body) == parsed


@pytest.mark.parametrize(
    ("content_type", "encoding", "body"),
    [
        ("application/json", "", b'{"amount": 1, "amount": 100000}'),
        ("text/plain", "", b' {"a": {"b": 1, "b": 2}}'),
        ("application/json", "", b'{"amount": NaN}'),
        ("application/json", "", b'{"amount": Infinity}'),
        ("", "", b'{"amount": -Infinity}'),
        ("application/json", "", b'{"a": 1,}'),
        ("text/plain", "", b"  {not json"),
        ("application/json", "gzip", gzip.compress(b'{"a": 1}')),
        ("application/json", "gzip", gzip.compress(gzip.compress(b'{"a": 1}'))),
        ("application/json", "deflate, gzip", b'{"a": 1}'),
        ("text/plain", "br", b"anything"),
        ("application/json", "", b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)),
        ("application/json", "", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("application/json", "", b'{"amount": 1e400}'),
        ("application/json", "", b'{"amount": -1e400}'),
        ("application/json", "", b'{"amount": ' + b"9" * 5000 + b"}"),
        ("application/json", "", b"[" + b",".join([b"[]"] * 100_001) + b"]"),
    ],
)
def test_a_body_the_policy_could_misread_is_refused(
    content_type: str, encoding: str, body: bytes
) -> None:
    with pytest.raises(BadRequest):
        json_body(content_type, encoding, body)


def test_nesting_up_to_the_limit_is_accepted() -> None:
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert strict_loads(deep) is not None


# -- end to end: the shipped policy decides what the tool gets ----------------------------


def _shipped_tools(server: Any) -> dict[str, Any]:
    tool = {"upstream": str(server.make_url("")), "idempotency": {"mode": "attach"}}
    return {"crm": tool, "payments": tool}


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    return shipped_policies()


async def _proxy(make_proxy: ProxyFactory, tool: Any, policies: Path) -> Any:
    server, _ = tool
    return await make_proxy(_shipped_tools(server), policy={"path": str(policies), "watch": False})


AGENT = {"X-Agent-Id": "sales-bot", "X-Run-Id": "r-canonical"}


@pytest.mark.parametrize("path", ["/%63ontacts", "/c%6Fntacts", "/%63%6f%6e%74%61%63%74%73"])
async def test_an_encoded_collection_delete_is_decided_as_itself(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, shipped: Path, path: str
) -> None:
    proxy = await _proxy(make_proxy, tool, shipped)
    answer = await proxy.request("DELETE", f"/tools/crm{path}", headers=AGENT)
    body = await answer.json()
    assert answer.status == 403, body
    assert any("whole collection" in r for r in body["error"]["reasons"])
    assert tool[1].count() == 0


@pytest.mark.parametrize(
    "path", ["/contacts#1", "/contacts;1", "/contacts%2F1", "/x/%2e%2e/contacts"]
)
async def test_an_ambiguous_path_never_reaches_the_tool(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, shipped: Path, path: str
) -> None:
    proxy = await _proxy(make_proxy, tool, shipped)
    status, body = await _raw(proxy, "DELETE", f"/tools/crm{path}")  # as sent, '#' too
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert tool[1].count() == 0


async def _raw(proxy: Any, method: str, target: str) -> tuple[int, bytes]:
    """One request written by hand: HTTP clients drop a fragment, an attacker need not."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    head = f"{method} {target} HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in AGENT.items()) + "\r\n"
    writer.write(head.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_the_tool_gets_the_path_the_policy_decided(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, shipped: Path
) -> None:
    proxy = await _proxy(make_proxy, tool, shipped)
    status, _ = await _raw(proxy, "GET", "/tools/crm/%63ontacts/a%3ab")
    assert status == 200
    assert tool[1].requests[-1]["path"] == "/contacts/a%3Ab"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "text/plain"}, b' {"amount": 5000000}'),
        ({}, b'\xef\xbb\xbf{"amount": 5000000}'),
        ({"Content-Type": "application/octet-stream"}, b'\n{"amount": 5000000}'),
    ],
)
async def test_a_json_body_behind_another_content_type_is_seen_by_the_policy(
    tool: tuple[Any, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    headers: dict[str, str],
    body: bytes,
) -> None:
    proxy = await _proxy(make_proxy, tool, shipped)
    answer = await proxy.post("/tools/payments/refunds", data=body, headers={**AGENT, **headers})
    assert answer.status == 403, await answer.text()  # amount over the shipped deny limit
    assert tool[1].count() == 0


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            gzip.compress(b'{"amount": 5000000}'),
        ),
        ({"Content-Type": "application/json"}, b'{"amount": 1, "amount": 5000000}'),
        ({"Content-Type": "application/json"}, b'{"amount": NaN}'),
        ({"Content-Type": "application/json"}, b"[" * 600 + b"]" * 600),
        ({"Content-Type": "application/json"}, b"[" * 100_000 + b"]" * 100_000),
        ({"Content-Type": "application/json", "X-HTTP-Method-Override": "DELETE"}, b"{}"),
    ],
)
async def test_a_body_or_header_the_policy_could_misread_never_reaches_the_tool(
    tool: tuple[Any, Seen],
    make_proxy: ProxyFactory,
    shipped: Path,
    headers: dict[str, str],
    body: bytes,
) -> None:
    proxy = await _proxy(make_proxy, tool, shipped)
    answer = await proxy.post("/tools/crm/contacts", data=body, headers={**AGENT, **headers})
    assert answer.status == 400, await answer.text()
    assert (await answer.json())["error"]["code"] == "bad_request"
    assert tool[1].count() == 0


@pytest.mark.parametrize(
    "params",
    [
        b'{"name": "read", "name": "delete_all", "arguments": {}}',
        b'{"name": "refund", "arguments": {"amount": 1e400}}',
        b'{"name": "refund", "arguments": {"amount": NaN}}',
        b'{"name": "refund", "arguments": {"a": {"b": 1, "b": 2}}}',
    ],
)
async def test_mcp_arguments_the_policy_could_misread_are_refused_before_the_server(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, policy_dir: Path, params: bytes
) -> None:
    server, seen = tool
    proxy = await make_proxy({"m": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"}})
    raw = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ' + params + b"}"
    answer = await proxy.post(
        "/tools/m", data=raw, headers={"Content-Type": "application/json", **AGENT}
    )
    message = json.loads(await answer.read())
    assert message["error"]["code"] == -32700
    assert seen.count() == 0


def test_a_deep_answer_is_still_recorded_redacted() -> None:
    """An answer nested past what the recorders walk is kept as scrubbed text, never dropped."""
    from proxy.tracing.redact import Redactor, capture_body

    deep = b'{"password": "hunter2", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    text = capture_body(deep, Redactor.build(["password"]), 16384)
    assert text and "hunter2" not in text


SIZE_POLICY = """package handrail

import rego.v1

default allow := false

allow if {
	input.request.body_size <= 64
	input.request.content_type == "application/json"
}

decision := {"allow": allow, "reasons": [r | not allow; r := "raw body facts"], "require_approval": false}

visible := true
"""


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/json"}, b'{"a": 1}', 200),
        ({"Content-Type": "application/json"}, b'{"a": "' + b"x" * 100 + b'"}', 403),
        ({"Content-Type": "text/plain"}, b'{"a": 1}', 403),
    ],
)
async def test_the_policy_sees_the_raw_bodys_facts(
    tool: tuple[Any, Seen],
    make_proxy: ProxyFactory,
    tmp_path: Path,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    server, seen = tool
    policies = tmp_path / "size"
    policies.mkdir()
    (policies / "p.rego").write_text(SIZE_POLICY)
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url(""))}},
        policy={"path": str(policies), "watch": False},
    )
    answer = await proxy.post("/tools/crm/x", data=body, headers={**AGENT, **headers})
    assert answer.status == status
    assert seen.count() == (1 if status == 200 else 0)
