"""A FastMCP server on loopback for the SDK-client tests: every feature an SDK client drives.

Progress, cancellation, sampling and elicitation (server requests on the handshake era,
``input_required`` results on 2026-07-28), resources and templates, prompts, completion,
a long call that keeps reporting progress, and list-changed events (on the response
stream for the handshake era, on ``subscriptions/listen`` streams for 2026-07-28).

Like ``tests/mcp_server.py`` it runs under uvicorn in a thread with its own event loop;
tests read ``executions`` (how often each side effect ran) and wait on the
``threading.Event`` flags directly.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types
import uvicorn
from fastmcp import Context, FastMCP
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.subscriptions import PromptsListChanged, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

CITIES = ["Berlin", "Bern", "Bergen", "Boston"]
NOTES = {"todo": "buy milk", "ideas": "a proxy with handrails"}
ELICIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"confirm": {"type": "boolean"}},
    "required": ["confirm"],
}


@dataclass
class SdkServer:
    url: str
    """The Streamable HTTP endpoint, e.g. ``http://127.0.0.1:PORT/mcp``."""
    executions: Counter[str] = field(default_factory=Counter)
    """Side effects that ran, by name; ``*.asked`` counts rounds that only asked for input."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when ``wait_for_cancel`` saw its call cancelled."""


def _modern(ctx: Context) -> bool:
    rc = ctx.request_context
    return rc is not None and rc.protocol_version in MODERN_PROTOCOL_VERSIONS


def _confirm_request(message: str) -> mcp_types.ElicitRequest:
    return mcp_types.ElicitRequest(
        params=mcp_types.ElicitRequestFormParams(message=message, requested_schema=ELICIT_SCHEMA)
    )


def _sampling_request(prompt: str) -> mcp_types.CreateMessageRequest:
    return mcp_types.CreateMessageRequest(
        params=mcp_types.CreateMessageRequestParams(messages=[_user(prompt)], max_tokens=50)
    )


def _user(text: str) -> mcp_types.SamplingMessage:
    return mcp_types.SamplingMessage(
        role="user", content=mcp_types.TextContent(type="text", text=text)
    )


def _sampled_text(result: Any) -> str:
    content = result.content if not isinstance(result, dict) else result["content"]
    if isinstance(content, list):
        content = content[0]
    return str(content.text if not isinstance(content, dict) else content["text"])


def build_server(server: SdkServer) -> FastMCP[Any]:
    executions = server.executions
    mcp: FastMCP[Any] = FastMCP("handrail-sdk-test")
    bus = InMemorySubscriptionBus()
    # fastmcp 4.2.3 does not serve subscriptions/listen itself: the SDK's handler does.
    mcp._mcp_server.add_request_handler(
        "subscriptions/listen", mcp_types.SubscriptionsListenRequestParams, ListenHandler(bus)
    )

    @mcp.tool(annotations={"readOnlyHint": True})
    def echo(text: str) -> str:
        """Say the text back."""
        executions["echo"] += 1
        return text

    @mcp.tool(annotations={"destructiveHint": True})
    def drop_table(name: str) -> str:
        """Denied by the test policy: must never run through the proxy."""
        executions["drop_table"] += 1
        return f"dropped {name}"

    @mcp.tool
    async def count_slowly(n: int, ctx: Context) -> str:
        """Reports progress n times before it answers."""
        executions["count_slowly"] += 1
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i}")
        return f"counted to {n}"

    @mcp.tool
    async def long_job(steps: int, gap_s: float, ctx: Context) -> str:
        """Runs steps * gap_s seconds, reporting progress after every step."""
        executions["long_job"] += 1
        for i in range(1, steps + 1):
            await anyio.sleep(gap_s)
            await ctx.report_progress(i, steps)
        return f"done after {steps} steps"

    @mcp.tool
    async def silent_job(seconds: float) -> str:
        """Runs for a while without a word."""
        executions["silent_job"] += 1
        await anyio.sleep(seconds)
        return "finished"

    @mcp.tool
    async def wait_for_cancel(ctx: Context) -> str:
        """Reports one progress step, then waits (2 s at most) for its call to be cancelled."""
        executions["wait_for_cancel"] += 1
        try:
            await ctx.report_progress(1, None, "started")
            await anyio.sleep(2)
        except anyio.get_cancelled_exc_class():
            server.cancelled.set()
            raise
        return "never cancelled"

    @mcp.tool
    async def send_invoice(to: str, ctx: Context) -> str | mcp_types.InputRequiredResult:
        """Asks the user to confirm (elicitation), then sends: the send runs once per call."""
        if _modern(ctx):
            responses = ctx.input_responses
            if not responses or "confirm" not in responses:
                executions["send_invoice.asked"] += 1
                return mcp_types.InputRequiredResult(
                    input_requests={"confirm": _confirm_request(f"Send the invoice to {to}?")},
                    request_state=f"invoice:{to}",
                )
            answer = responses["confirm"]
            assert isinstance(answer, mcp_types.ElicitResult)
            if ctx.request_state != f"invoice:{to}":
                return f"request state lost: {ctx.request_state!r}"
            action, content = answer.action, answer.content or {}
        else:
            executions["send_invoice.asked"] += 1
            elicited = await ctx.session.elicit(
                message=f"Send the invoice to {to}?",
                requested_schema=ELICIT_SCHEMA,
                related_request_id=ctx.request_id,
            )
            action, content = elicited.action, elicited.content or {}
        if action != "accept" or content.get("confirm") is not True:
            return f"not sent ({action})"
        executions["send_invoice"] += 1
        return f"invoice #{executions['send_invoice']} sent to {to}"

    @mcp.tool
    async def summarize(text: str, ctx: Context) -> str | mcp_types.InputRequiredResult:
        """Asks the client's model (sampling) and records the summary once per call."""
        if _modern(ctx):
            responses = ctx.input_responses
            if not responses or "summary" not in responses:
                executions["summarize.asked"] += 1
                return mcp_types.InputRequiredResult(
                    input_requests={"summary": _sampling_request(f"Summarize: {text}")}
                )
            summary = _sampled_text(responses["summary"])
        else:
            executions["summarize.asked"] += 1
            sampled = await ctx.session.create_message(
                [_user(f"Summarize: {text}")], max_tokens=50, related_request_id=ctx.request_id
            )
            summary = _sampled_text(sampled)
        executions["summarize"] += 1
        return f"summary: {summary}"

    @mcp.tool
    async def add_tool(name: str, ctx: Context) -> str:
        """Adds a tool, tells clients the tool list changed (handshake era: on this response
        stream; 2026-07-28: on subscriptions/listen streams)."""
        executions["add_tool"] += 1

        def added() -> str:
            return name

        mcp.tool(added, name=name)
        if _modern(ctx):
            await bus.publish(ToolsListChanged())
        else:
            await ctx.send_notification(mcp_types.ToolListChangedNotification())
        return f"added {name}"

    @mcp.tool
    async def touch_prompts(ctx: Context) -> str:
        """Announces a prompt list change."""
        executions["touch_prompts"] += 1
        if _modern(ctx):
            await bus.publish(PromptsListChanged())
        else:
            await ctx.send_notification(mcp_types.PromptListChangedNotification())
        return "touched"

    @mcp.resource("info://server", mime_type="application/json")
    def server_info() -> dict[str, str]:
        """What this server is."""
        return {"name": "handrail-sdk-test"}

    @mcp.resource("note://{name}")
    def note(name: str) -> str:
        """One note by name."""
        return NOTES.get(name, "")

    @mcp.prompt
    def plan_trip(city: str, days: str = "3") -> str:
        """A trip-planning prompt."""
        return f"Plan {days} days in {city}."

    @mcp.completion
    def complete(
        ref: mcp_types.PromptReference | mcp_types.ResourceTemplateReference,
        argument: mcp_types.CompletionArgument,
        context: mcp_types.CompletionContext | None,
    ) -> list[str]:
        if isinstance(ref, mcp_types.PromptReference) and argument.name == "city":
            return [c for c in CITIES if c.lower().startswith(argument.value.lower())]
        if isinstance(ref, mcp_types.ResourceTemplateReference) and argument.name == "name":
            return sorted(n for n in NOTES if n.startswith(argument.value))
        return []

    return mcp


@contextmanager
def start_sdk_server() -> Iterator[SdkServer]:
    server = SdkServer(url="")
    app = build_server(server).http_app(path="/mcp")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="sdk-test-server", daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if uv.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the SDK test server did not start")
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("the SDK test server did not start in time")
        port = uv.servers[0].sockets[0].getsockname()[1]
        server.url = f"http://127.0.0.1:{port}/mcp"
        yield server
    finally:
        uv.should_exit = True
        thread.join(timeout=5)
