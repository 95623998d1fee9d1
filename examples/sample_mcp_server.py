"""A sample MCP server for examples/handrail.yaml, on 127.0.0.1:9002/mcp (FastMCP).

    python examples/sample_mcp_server.py [--port 9002]

``add`` is read-only; ``wipe`` is marked destructive, so the shipped policy refuses it and
hides it from tools/list.
"""

from __future__ import annotations

import argparse

from fastmcp import FastMCP

mcp: FastMCP = FastMCP("calc")


@mcp.tool(annotations={"readOnlyHint": True})
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@mcp.tool(annotations={"destructiveHint": True})
def wipe() -> str:
    """Forget everything (refused by the shipped policy)."""
    return "wiped"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9002, help="port on 127.0.0.1")
    port = parser.parse_args().port
    mcp.run(transport="http", host="127.0.0.1", port=port, path="/mcp")
