"""``handrail check``: one line per problem, exit 2 if any, nothing left running."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from tests.conftest import Seen, free_port, tool_app
from tests.mcp_server import McpServer, start_mcp_server

ROOT = Path(__file__).resolve().parent.parent


async def check(tmp_path: Path, tools: dict[str, Any], **extra: Any) -> tuple[int, str]:
    config = {
        "tools": tools,
        "policy": {"path": str(ROOT / "policies"), "watch": False},
        "store": {"url": f"sqlite:///{tmp_path}/h.db"},
        **extra,
    }
    path = tmp_path / "handrail.yaml"
    path.write_text(json.dumps(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "check",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return int(process.returncode or 0), out.decode()


async def test_a_ready_config_checks_ok(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    mcp_server: McpServer,
) -> None:
    server = await aiohttp_server(tool_app(Seen()))
    code, out = await check(
        tmp_path,
        {
            "crm": {"upstream": str(server.make_url(""))},
            "calc": {"upstream": mcp_server.url, "kind": "mcp"},
        },
    )
    assert code == 0, out
    assert "ok (2 tools" in out


async def test_every_problem_is_one_line_and_exit_2(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    seen = Seen()
    server = await aiohttp_server(tool_app(seen))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "p.rego").write_text("package handrail\n\nthis is not rego\n")
    code, out = await check(
        tmp_path,
        {
            "crm": {"upstream": f"http://127.0.0.1:{free_port()}"},
            "fake": {"upstream": str(server.make_url("/mcp")), "kind": "mcp"},
        },
        policy={"path": str(broken), "watch": False},
    )
    lines = [line for line in out.splitlines() if line.startswith("handrail check:")]
    assert code == 2, out
    assert any(
        line.startswith("handrail check: tools.crm.upstream") and "cannot connect" in line
        for line in lines
    )
    assert any("tools.fake.upstream" in line and "JSON-RPC" in line for line in lines)
    assert any(line.startswith("handrail check: policy.path") for line in lines)
    assert "Traceback" not in out


async def test_readyz_is_not_ready_while_an_mcp_upstream_does_not_speak_mcp(
    make_proxy: Any, make_admin: Any, tool: Any
) -> None:
    """A wrong URL for a kind: mcp tool (a plain JSON API) makes the proxy not ready."""

    server, _ = tool
    with start_mcp_server() as mcp:
        proxy = await make_proxy(
            {
                "wrong": {"upstream": str(server.make_url("/api")), "kind": "mcp"},
                "right": {"upstream": mcp.url, "kind": "mcp"},
            }
        )
        admin = await make_admin(proxy)
        response = await admin.get("/readyz")
        body = await response.json()
    assert response.status == 503 and body["ready"] is False
    assert body["checks"]["mcp:wrong"]["ready"] is False
    assert "JSON-RPC" in body["checks"]["mcp:wrong"]["detail"]
    assert body["checks"]["mcp:right"] == {"ready": True, "detail": "answers MCP"}
