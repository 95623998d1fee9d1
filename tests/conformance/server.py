"""The MCP conformance suite's server fixtures, as a FastMCP Streamable HTTP server.

The suite's server scenarios (npm ``@modelcontextprotocol/conformance``) call tools,
resources, prompts and completions by fixed names and check what comes back. Their own
reference server lives in the suite's repository, which CI cannot reach, so this is the
project's own: every name and behaviour a server scenario checks, and nothing else.

    python -m tests.conformance.server [--port 0]

prints ``conformance server listening on http://127.0.0.1:PORT/mcp`` once it accepts
connections. It listens on loopback only and validates Host and Origin (the
``dns-rebinding-protection`` scenario), and keeps an event store so a response stream it
closes mid-call can be resumed (``server-sse-polling``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import warnings
from typing import Any

import mcp_types
import uvicorn
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.prompts import Message
from fastmcp.server.completions import CompletionReference
from fastmcp.server.event_store import EventStore
from fastmcp.server.http import StarletteWithLifespan
from fastmcp.tools.function_tool import FunctionTool
from mcp.server.context import ServerRequestContext

from tests.conformance.payloads import (
    DEFAULTS_FORM,
    ENUMS_FORM,
    JSON_SCHEMA_2020_12,
    PNG,
    USER_FORM,
    WAV,
)

PATH = "/mcp"
RETRY_INTERVAL_MS = 500
"""What the server tells a client to wait before it resumes a stream the server closed."""


def _image() -> mcp_types.ImageContent:
    return mcp_types.ImageContent(data=PNG, mime_type="image/png")


def _embedded(uri: str, mime_type: str, text: str) -> mcp_types.EmbeddedResource:
    resource = mcp_types.TextResourceContents(uri=uri, mime_type=mime_type, text=text)
    return mcp_types.EmbeddedResource(resource=resource)


def _elicited(result: mcp_types.ElicitResult) -> str:
    return (
        f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"
    )


def add_content_tools(mcp: FastMCP[Any]) -> None:
    """Tools whose whole test is the content they return."""

    @mcp.tool
    def test_simple_text() -> str:
        """Tests simple text content response."""
        return "This is a simple text response for testing."

    @mcp.tool
    def test_image_content() -> list[mcp_types.ContentBlock]:
        """Tests image content response."""
        return [_image()]

    @mcp.tool
    def test_audio_content() -> list[mcp_types.ContentBlock]:
        """Tests audio content response."""
        return [mcp_types.AudioContent(data=WAV, mime_type="audio/wav")]

    @mcp.tool
    def test_embedded_resource() -> list[mcp_types.ContentBlock]:
        """Tests embedded resource content response."""
        text = "This is an embedded resource content."
        return [_embedded("test://embedded-resource", "text/plain", text)]

    @mcp.tool
    def test_multiple_content_types() -> list[mcp_types.ContentBlock]:
        """Tests response with multiple content types (text, image, resource)."""
        data = json.dumps({"test": "data", "value": 123})
        return [
            mcp_types.TextContent(text="Multiple content types test:"),
            _image(),
            _embedded("test://mixed-content-resource", "application/json", data),
        ]

    @mcp.tool
    def test_error_handling() -> str:
        """Tests error response handling."""
        raise ToolError("This tool intentionally returns an error for testing")

    def json_schema_2020_12_tool(name: str = "", address: dict[str, Any] | None = None) -> str:
        """Tool with JSON Schema 2020-12 features"""
        return f"got {name} at {address}"

    # The schema is given as written: derived from a signature it would lose the keywords.
    tool = FunctionTool.from_function(json_schema_2020_12_tool)
    mcp.add_tool(tool.model_copy(update={"parameters": JSON_SCHEMA_2020_12}))


def add_streaming_tools(mcp: FastMCP[Any]) -> None:
    """Tools that talk on the call's response stream before they answer."""

    @mcp.tool
    async def test_tool_with_logging(ctx: Context) -> str:
        """Tests tool that emits log messages during execution."""
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Tool with logging executed successfully"

    @mcp.tool
    async def test_tool_with_progress(ctx: Context) -> str:
        """Tests tool that reports progress notifications."""
        for done in (0, 50, 100):
            await ctx.report_progress(done, 100, f"Completed step {done} of 100")
            if done < 100:
                await asyncio.sleep(0.05)
        return "Tool with progress executed successfully"

    @mcp.tool
    async def test_reconnection(ctx: Context) -> str:
        """Closes its response stream mid-call; the client resumes it (SEP-1699)."""
        await asyncio.sleep(0.05)
        await ctx.close_sse_stream()
        await asyncio.sleep(0.1)  # answer after the client has had a chance to resume
        return (
            "Reconnection test completed successfully. If you received this, the client "
            "properly reconnected after stream closure."
        )


def add_client_request_tools(mcp: FastMCP[Any]) -> None:
    """Tools that ask the client something (sampling, elicitation) before they answer."""

    @mcp.tool
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Tests server-initiated sampling (LLM completion request)."""
        message = mcp_types.SamplingMessage(role="user", content=mcp_types.TextContent(text=prompt))
        with warnings.catch_warnings():  # deprecated in 2026-07-28; the scenario is 2025's
            warnings.simplefilter("ignore")
            result = await ctx.session.create_message(
                [message], max_tokens=100, related_request_id=ctx.request_id
            )
        content = result.content
        text = content.text if isinstance(content, mcp_types.TextContent) else str(content)
        return f"LLM response: {text}"

    @mcp.tool
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Tests server-initiated elicitation (user input request)."""
        result = await ctx.session.elicit_form(message, USER_FORM, ctx.request_id)
        return f"User response: action={result.action}, content={json.dumps(result.content)}"

    @mcp.tool
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Tests elicitation with default values per SEP-1034."""
        message = "Please review and update the form fields with defaults"
        return _elicited(await ctx.session.elicit_form(message, DEFAULTS_FORM, ctx.request_id))

    @mcp.tool
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Tests elicitation with enum schema improvements per SEP-1330."""
        message = "Please select options from the enum fields"
        return _elicited(await ctx.session.elicit_form(message, ENUMS_FORM, ctx.request_id))


def add_resources(mcp: FastMCP[Any]) -> None:
    """Static resources, one template, and the resource the subscribe scenarios watch."""

    @mcp.resource(
        "test://static-text",
        name="Static Text Resource",
        description="A static text resource for testing",
        mime_type="text/plain",
    )
    def static_text() -> str:
        return "This is the content of the static text resource."

    @mcp.resource(
        "test://static-binary",
        name="Static Binary Resource",
        description="A static binary resource (image) for testing",
        mime_type="image/png",
    )
    def static_binary() -> bytes:
        return base64.b64decode(PNG)

    @mcp.resource(
        "test://template/{id}/data",
        name="Resource Template",
        description="A resource template with parameter substitution",
        mime_type="application/json",
    )
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @mcp.resource(
        "test://watched-resource",
        name="Watched Resource",
        description="A resource that can be subscribed to",
        mime_type="text/plain",
    )
    def watched() -> str:
        return "Watched resource content"


def add_subscriptions(mcp: FastMCP[Any]) -> None:
    """resources/subscribe and /unsubscribe, which FastMCP does not serve itself.

    Registering the handler is also what declares ``resources.subscribe``.
    """
    subscribed: set[str] = set()

    async def subscribe(
        ctx: ServerRequestContext[Any], params: mcp_types.SubscribeRequestParams
    ) -> mcp_types.EmptyResult:
        subscribed.add(str(params.uri))
        return mcp_types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any], params: mcp_types.UnsubscribeRequestParams
    ) -> mcp_types.EmptyResult:
        subscribed.discard(str(params.uri))
        return mcp_types.EmptyResult()

    low_level = mcp._mcp_server
    low_level.add_request_handler(
        "resources/subscribe", mcp_types.SubscribeRequestParams, subscribe
    )
    low_level.add_request_handler(
        "resources/unsubscribe", mcp_types.UnsubscribeRequestParams, unsubscribe
    )


def add_prompts(mcp: FastMCP[Any]) -> None:
    """Prompts with and without arguments, embedded resources and images."""

    @mcp.prompt(description="A simple prompt without arguments")
    def test_simple_prompt() -> str:
        return "This is a simple prompt for testing."

    @mcp.prompt(description="A prompt with required arguments")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @mcp.prompt(description="A prompt that includes an embedded resource")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
        text = "Embedded resource content for testing."
        return [
            Message(_embedded(resourceUri, "text/plain", text)),
            Message("Please process the embedded resource above."),
        ]

    @mcp.prompt(description="A prompt that includes image content")
    def test_prompt_with_image() -> list[Message]:
        return [Message(_image()), Message("Please analyze the image above.")]

    @mcp.completion
    def complete(
        ref: CompletionReference,
        argument: mcp_types.CompletionArgument,
        context: mcp_types.CompletionContext | None,
    ) -> list[str]:
        """Declares completions; the scenario checks the shape, not the values."""
        return []


def build_server() -> FastMCP[Any]:
    """Every fixture the server scenarios call, on one FastMCP server."""
    # dereference_schemas=False: inlining `$ref`s would drop the `$defs` SEP-1613 checks for.
    mcp: FastMCP[Any] = FastMCP("handrail-conformance", dereference_schemas=False)
    add_content_tools(mcp)
    add_streaming_tools(mcp)
    add_client_request_tools(mcp)
    add_resources(mcp)
    add_subscriptions(mcp)
    add_prompts(mcp)
    return mcp


def build_app() -> StarletteWithLifespan:
    """The ASGI app: Host/Origin checked on loopback, streams resumable from the store."""
    return build_server().http_app(
        path=PATH,
        event_store=EventStore(),
        retry_interval=RETRY_INTERVAL_MS,
        host_origin_protection=True,
    )


async def serve(port: int) -> None:
    """Serve on loopback; say where once listening (port 0 picks a free one)."""
    config = uvicorn.Config(
        build_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise SystemExit("the conformance server did not start")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    print(f"conformance server listening on http://127.0.0.1:{bound}{PATH}", flush=True)
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
