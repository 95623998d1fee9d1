"""The benchmark's MCP server: FastMCP over Streamable HTTP, one cheap tool.

python bench/mcp_server.py --port 9100      # serves http://127.0.0.1:9100/mcp
"""

from __future__ import annotations

import argparse

from fastmcp import FastMCP

mcp = FastMCP("bench")


@mcp.tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    mcp.run(
        transport="http",
        host="127.0.0.1",
        port=args.port,
        stateless_http=True,
        json_response=True,
        log_level="warning",
        show_banner=False,
    )


if __name__ == "__main__":
    main()
