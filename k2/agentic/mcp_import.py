"""MCP tool definitions from JSON files of ``tools/list`` results or from a live MCP server over stdio.

A file holds one ``tools/list`` result: ``{"tools": [...]}``, the whole JSON-RPC response ``{"jsonrpc": "2.0",
"result": {"tools": [...]}}``, or a bare list of tools. A live server is started from a command line (``"python
server.py --flag"``, split like a shell would) through the ``mcp`` SDK's stdio client; every page of ``tools/list``
is read (following ``nextCursor``) and the server is shut down. Tools come back as the MCP dicts the protocol
carries (``name``, ``description``, ``inputSchema``, ...); ``k2.agentic.tools.to_openai`` converts them.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import Any

from k2.errors import DataError


def tools_from_json(path: str | Path) -> list[dict[str, Any]]:
    """The tools of a ``tools/list`` result saved as JSON (``DataError`` naming the file for anything else)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read MCP tools ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("result"), dict):
        data = data["result"]
    if isinstance(data, dict):
        data = data.get("tools")
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise DataError(f'{path}: expected a tools/list result ({{"tools": [...]}}) or a list of tool objects')
    return data


async def _list_tools(command: list[str], timeout_s: float) -> list[dict[str, Any]]:
    from mcp import ClientSession, StdioServerParameters, types
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=command[0], args=command[1:])
    tools: list[dict[str, Any]] = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await asyncio.wait_for(session.initialize(), timeout_s)
        cursor = None
        while True:
            # The first page without arguments, which every SDK version accepts; later pages by cursor.
            if cursor:
                call = session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
            else:
                call = session.list_tools()
            result = await asyncio.wait_for(call, timeout_s)
            page = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            tools += page.get("tools", [])
            cursor = page.get("nextCursor")
            if not cursor:
                return tools


def tools_from_server(command_line: str, *, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The tools a stdio MCP server started with ``command_line`` lists (``DataError`` if it cannot be reached)."""
    command = shlex.split(command_line)
    if not command:
        raise DataError("--mcp-server: empty command line")
    try:
        return asyncio.run(_list_tools(command, timeout_s))
    except (OSError, TimeoutError) as e:
        raise DataError(f"MCP server {command_line!r}: {type(e).__name__}: {e}") from None
    except Exception as e:  # the SDK's errors (McpError, a closed stream, ...) have no common base
        if isinstance(e, DataError):
            raise
        raise DataError(f"MCP server {command_line!r}: tools/list failed ({type(e).__name__}: {e})") from None
