"""A small stdio MCP server for the ``k2 synth`` MCP-import tests, written with the ``mcp`` SDK: three tools with
typed arguments (one optional, one an enum). ``python _mcp_server.py`` serves over stdio; ``--dump`` prints the
tools as the server itself lists them in-process (no transport), the oracle of the import test."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

server = Server("k2-test-tools")


@server.tool()
def lookup_order(order_id: str, include_items: bool = False) -> str:
    """Look up an order by its id."""
    return json.dumps({"order_id": order_id, "status": "shipped", "items": [] if include_items else None})


@server.tool()
def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert an amount of money between two currencies."""
    return amount


@server.tool()
def set_thermostat(room: str, celsius: int, mode: Literal["heat", "cool", "auto"] = "auto") -> str:
    """Set the target temperature of a room."""
    return f"{room}: {celsius} C ({mode})"


if __name__ == "__main__":
    if sys.argv[1:] == ["--dump"]:
        tools = asyncio.run(server.list_tools())
        print(json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]))
    else:
        server.run("stdio")
