"""The official SDK clients (Python, TypeScript) through Handrail behave as they do direct.

A test drives one feature against a real FastMCP server (``tests/sdk_server.py``) straight
and through the proxy, with the same expectations, on both protocol eras where the feature
exists in both (``legacy``: the 2025-11-25 initialize handshake; ``2026-07-28``: stateless).
Where a tool has a side effect the server counts it: one logical call runs it once, however
many requests the protocol needed. The TypeScript SDK runs a scripted session
(``tests/ts_client/client.mjs``) both ways and the two summaries must match.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import PromptsListChanged, ToolsListChanged

from tests.conftest import IN_CI, ProxyFactory
from tests.sdk_server import CITIES, SdkServer, start_sdk_server

# These tests are about the protocol passing through: everything is allowed but one tool.
SDK_POLICY = """package handrail

import rego.v1

default allow := true

allow := false if count(reasons) > 0

reasons contains "dropping tables is not allowed" if input.call.name == "drop_table"

default visible := true

decision := {"allow": allow, "reasons": reasons, "require_approval": false}
"""

LEGACY, MODERN = "legacy", "2026-07-28"
ERAS = [LEGACY, MODERN]
ROUTES = ["direct", "handrail"]


def cases(eras: list[str] = ERAS) -> list[Any]:
    """(era, route) pairs."""
    params = []
    for era in eras:
        for route in ROUTES:
            params.append(pytest.param(era, route, id=f"{era}-{route}"))
    return params


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "handrail.rego").write_text(SDK_POLICY)
    return directory


@pytest.fixture(scope="module")
def running_server() -> Iterator[SdkServer]:
    with start_sdk_server() as server:
        yield server


@pytest.fixture
def sdk_server(running_server: SdkServer) -> SdkServer:
    """One server for the module (starting one takes longer than most tests): fresh counts."""
    running_server.executions.clear()
    running_server.cancelled.clear()
    return running_server


Endpoint = Callable[..., Awaitable[str]]


@pytest.fixture
def endpoint(make_proxy: ProxyFactory, sdk_server: SdkServer) -> Endpoint:
    """The URL a client uses: the server's own, or a proxy's in front of it."""

    async def url(route: str, **tool: Any) -> str:
        if route == "direct":
            return sdk_server.url
        config = {"upstream": sdk_server.url, "kind": "mcp", "timeout_s": 10, **tool}
        proxy = await make_proxy({"sdk": config})
        return str(proxy.make_url("/tools/sdk"))

    return url


@asynccontextmanager
async def connect(url: str, era: str, **kwargs: Any) -> AsyncIterator[Client]:
    with anyio.fail_after(15):
        async with Client(url, mode=era, cache=None, **kwargs) as client:
            yield client


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


class Answers:
    """The client's side of elicitation and sampling: scripted answers, and what was asked."""

    def __init__(self, elicit_action: Literal["accept", "decline", "cancel"] = "accept") -> None:
        self.elicit_action = elicit_action
        self.asked: list[str] = []

    async def elicit(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        self.asked.append(params.message)
        if self.elicit_action != "accept":
            return types.ElicitResult(action=self.elicit_action)
        return types.ElicitResult(action="accept", content={"confirm": True})

    async def sample(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        content = params.messages[0].content
        self.asked.append(getattr(content, "text", ""))
        reply = types.TextContent(type="text", text="three words only")
        return types.CreateMessageResult(role="assistant", content=reply, model="scripted")


@pytest.mark.parametrize("route", ROUTES)
async def test_auto_mode_settles_on_2026_07_28(route: str, endpoint: Endpoint) -> None:
    """The client probes with ``server/discover`` and adopts the stateless revision."""
    async with connect(await endpoint(route), "auto") as client:
        version = client.protocol_version
        result = await client.call_tool("echo", {"text": "probed"})
    assert version == MODERN
    assert text_of(result) == "probed"


# -- progress, cancellation, long calls ------------------------------------------------


@pytest.mark.parametrize(("era", "route"), cases())
async def test_progress_notifications_arrive_in_order(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(await endpoint(route), era) as client:
        result = await client.call_tool("count_slowly", {"n": 3}, progress_callback=on_progress)
    assert text_of(result) == "counted to 3"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert sdk_server.executions["count_slowly"] == 1


@pytest.mark.parametrize(("era", "route"), cases())
async def test_cancelling_a_call_stops_the_tool_on_the_server(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async with connect(await endpoint(route), era) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(partial(client.call_tool, "wait_for_cancel", {}, None, on_progress))
            await started.wait()
            group.cancel_scope.cancel()
        stopped = await anyio.to_thread.run_sync(sdk_server.cancelled.wait, 1)
        after = await client.call_tool("echo", {"text": "still here"})
    assert stopped, "the server's tool was never cancelled"
    assert text_of(after) == "still here"
    assert sdk_server.executions["wait_for_cancel"] == 1


@pytest.mark.parametrize(("era", "route"), cases())
async def test_a_long_call_that_keeps_reporting_progress_is_not_cut(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    # 4 steps 0.1 s apart: longer than the proxy's timeout_s, never silent for as long.
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    url = await endpoint(route, timeout_s=0.25)
    async with connect(url, era) as client:
        result = await client.call_tool(
            "long_job", {"steps": 4, "gap_s": 0.1}, progress_callback=on_progress
        )
    assert not result.is_error and text_of(result) == "done after 4 steps"
    assert seen == [1, 2, 3, 4]
    assert sdk_server.executions["long_job"] == 1


@pytest.mark.parametrize("era", ERAS)
async def test_a_silent_call_past_timeout_s_is_cut(era: str, endpoint: Endpoint) -> None:
    """The control for the test above: the same timeout_s does cut a call that says nothing."""
    url = await endpoint("handrail", timeout_s=0.25)
    async with connect(url, era) as client:
        with anyio.fail_after(5), pytest.raises(MCPError):
            await client.call_tool("silent_job", {"seconds": 1.0})


@pytest.mark.parametrize("era", ERAS)
async def test_a_denied_call_reaches_the_sdk_as_a_tool_error(
    era: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    """A result the proxy makes itself must parse in the client's era (2026-07-28: it
    carries ``resultType``); the session goes on after it."""
    async with connect(await endpoint("handrail"), era) as client:
        denied = await client.call_tool("drop_table", {"name": "users"})
        after = await client.call_tool("echo", {"text": "next"})
    assert denied.is_error
    assert text_of(denied) == "Denied by policy: dropping tables is not allowed"
    assert text_of(after) == "next"
    assert (sdk_server.executions["drop_table"], sdk_server.executions["echo"]) == (0, 1)


# -- elicitation, sampling: server requests (handshake era), input_required (2026-07-28) ---


@pytest.mark.parametrize(("era", "route"), cases())
async def test_an_elicited_confirmation_runs_the_action_once(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    answers = Answers()
    async with connect(await endpoint(route), era, elicitation_callback=answers.elicit) as client:
        result = await client.call_tool("send_invoice", {"to": "bob@example.com"})
    assert text_of(result) == "invoice #1 sent to bob@example.com"
    assert answers.asked == ["Send the invoice to bob@example.com?"]
    assert sdk_server.executions["send_invoice.asked"] == 1
    assert sdk_server.executions["send_invoice"] == 1


@pytest.mark.parametrize(("era", "route"), cases())
async def test_a_declined_elicitation_runs_nothing(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    answers = Answers(elicit_action="decline")
    async with connect(await endpoint(route), era, elicitation_callback=answers.elicit) as client:
        result = await client.call_tool("send_invoice", {"to": "eve@example.com"})
    assert text_of(result) == "not sent (decline)"
    assert sdk_server.executions["send_invoice"] == 0


@pytest.mark.parametrize(("era", "route"), cases())
async def test_sampling_answers_from_the_client_model_once(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    answers = Answers()
    async with connect(await endpoint(route), era, sampling_callback=answers.sample) as client:
        result = await client.call_tool("summarize", {"text": "a long story"})
    assert text_of(result) == "summary: three words only"
    assert answers.asked == ["Summarize: a long story"]
    assert (sdk_server.executions["summarize.asked"], sdk_server.executions["summarize"]) == (1, 1)


@pytest.mark.parametrize(("era", "route"), cases(eras=[MODERN]))
async def test_an_input_required_round_is_retried_with_the_responses(
    era: str, route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    """Multi round-trip requests driven by hand: the first answer asks, the retry carries
    ``inputResponses`` and the echoed ``requestState``, the action runs once."""
    async with connect(await endpoint(route), era) as client:
        first = await client.session.call_tool(
            "send_invoice", {"to": "ann@example.com"}, allow_input_required=True
        )
        assert isinstance(first, types.InputRequiredResult), first
        assert list(first.input_requests or {}) == ["confirm"]
        assert first.request_state
        assert sdk_server.executions["send_invoice"] == 0
        answer = types.ElicitResult(action="accept", content={"confirm": True})
        final = await client.session.call_tool(
            "send_invoice",
            {"to": "ann@example.com"},
            input_responses={"confirm": answer},
            request_state=first.request_state,
            allow_input_required=True,
        )
    assert isinstance(final, types.CallToolResult), final
    assert text_of(final) == "invoice #1 sent to ann@example.com"
    assert (sdk_server.executions["send_invoice.asked"], sdk_server.executions["send_invoice"]) == (
        1,
        1,
    )


# -- resources, prompts, completion ----------------------------------------------------


@pytest.mark.parametrize(("era", "route"), cases())
async def test_resources_list_read_and_templates(era: str, route: str, endpoint: Endpoint) -> None:
    async with connect(await endpoint(route), era) as client:
        resources = await client.list_resources()
        templates = await client.list_resource_templates()
        info = await client.read_resource("info://server")
        note = await client.read_resource("note://todo")
    assert [(r.uri, r.mime_type) for r in resources.resources] == [
        ("info://server", "application/json")
    ]
    assert [t.uri_template for t in templates.resource_templates] == ["note://{name}"]
    assert json.loads(info.contents[0].text) == {"name": "handrail-sdk-test"}  # type: ignore[union-attr]
    assert [(c.uri, c.text) for c in note.contents] == [("note://todo", "buy milk")]  # type: ignore[union-attr]


@pytest.mark.parametrize(("era", "route"), cases())
async def test_prompts_list_and_get(era: str, route: str, endpoint: Endpoint) -> None:
    async with connect(await endpoint(route), era) as client:
        prompts = await client.list_prompts()
        prompt = await client.get_prompt("plan_trip", {"city": "Bern", "days": "2"})
    (listed,) = prompts.prompts
    assert listed.name == "plan_trip"
    assert [(a.name, a.required) for a in listed.arguments or []] == [
        ("city", True),
        ("days", False),
    ]
    assert [(m.role, m.content.text) for m in prompt.messages] == [  # type: ignore[union-attr]
        ("user", "Plan 2 days in Bern.")
    ]


@pytest.mark.parametrize(("era", "route"), cases())
async def test_completion_of_prompt_and_template_arguments(
    era: str, route: str, endpoint: Endpoint
) -> None:
    prompt = types.PromptReference(type="ref/prompt", name="plan_trip")
    template = types.ResourceTemplateReference(type="ref/resource", uri="note://{name}")
    async with connect(await endpoint(route), era) as client:
        cities = await client.complete(prompt, {"name": "city", "value": "Ber"})
        notes = await client.complete(template, {"name": "name", "value": "i"})
    assert cities.completion.values == [c for c in CITIES if c.startswith("Ber")]
    assert notes.completion.values == ["ideas"]


# -- list changes ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_list_changed_notifications_reach_the_client(
    route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    """Handshake era: the server announces changes on the response stream of the call."""
    tools_changed, prompts_changed = anyio.Event(), anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            tools_changed.set()
        if isinstance(message, types.PromptListChangedNotification):
            prompts_changed.set()

    async with connect(await endpoint(route), LEGACY, message_handler=on_message) as client:
        await client.call_tool("add_tool", {"name": "fresh_tool"})
        await client.call_tool("touch_prompts", {})
        with anyio.fail_after(5):
            await tools_changed.wait()
            await prompts_changed.wait()
        names = [t.name for t in (await client.list_tools()).tools]
    assert "fresh_tool" in names


@pytest.mark.parametrize("route", ROUTES)
async def test_a_listen_stream_delivers_list_changed_events(
    route: str, endpoint: Endpoint, sdk_server: SdkServer
) -> None:
    """2026-07-28: ``subscriptions/listen`` is a long-lived stream of change events."""
    async with connect(await endpoint(route), MODERN) as client:
        async with client.listen(tools_list_changed=True, prompts_list_changed=True) as events:
            assert events.honored.tools_list_changed and events.honored.prompts_list_changed
            await client.call_tool("add_tool", {"name": "fresh_tool"})
            await client.call_tool("touch_prompts", {})
            seen: list[object] = []
            with anyio.fail_after(5):
                async for event in events:
                    seen.append(event)
                    if len(seen) == 2:
                        break
        names = [t.name for t in (await client.list_tools()).tools]
    assert seen == [ToolsListChanged(), PromptsListChanged()]
    assert "fresh_tool" in names


# -- the TypeScript SDK ------------------------------------------------------------------

TS_CLIENT = Path(__file__).parent / "ts_client"
TS_EXPECTED: dict[str, Any] = {
    "tools/list": [
        *("add_tool", "count_slowly", "drop_table", "echo", "long_job", "send_invoice"),
        *("silent_job", "summarize", "touch_prompts", "wait_for_cancel"),
    ],
    "progress": {"text": "counted to 3", "progress": [[i, 3, f"step {i}"] for i in (1, 2, 3)]},
    "long call": {"isError": False, "text": "done after 8 steps", "progress": list(range(1, 9))},
    "cancel": {"began": True, "outcome": "aborted", "after": "still here"},
    "elicitation": "invoice #1 sent to bob@example.com",
    "sampling": "summary: three words only",
    "resources": {
        "listed": [["info://server", "application/json"]],
        "templates": ["note://{name}"],
        "info": {"name": "handrail-sdk-test"},
        "note": [["note://todo", "buy milk"]],
    },
    "prompts": {
        "listed": [["plan_trip", [["city", True], ["days", False]]]],
        "messages": [["user", "Plan 2 days in Bern."]],
    },
    "completion": {"cities": ["Berlin", "Bern", "Bergen"], "notes": ["ideas"]},
    "list changed": {"tools": True, "prompts": True, "listed": True},
}
TS_EXECUTIONS = {
    "count_slowly": 1,
    "long_job": 1,
    "wait_for_cancel": 1,
    "echo": 1,
    "send_invoice.asked": 1,
    "send_invoice": 1,
    "summarize.asked": 1,
    "summarize": 1,
    "add_tool": 1,
    "touch_prompts": 1,
}


@pytest.fixture(scope="module")
def ts_client() -> Path:
    """The scripted TypeScript client, its npm packages installed beside it on first use.

    Skipped where npm cannot install them; in CI that is a failure."""
    script = TS_CLIENT / "client.mjs"
    if (TS_CLIENT / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json").exists():
        return script
    problem = None
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        problem = "node and npm are needed for the TypeScript SDK client"
    else:
        command = [npm, "install", "--no-package-lock", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(
                command, cwd=TS_CLIENT, capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired:
            problem = "npm install of the TypeScript SDK took over 300 s"
        else:
            if done.returncode != 0:
                problem = f"npm install of the TypeScript SDK failed: {done.stderr[-2000:]}"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    return script


async def run_ts_client(script: Path, url: str, version: str) -> dict[str, Any]:
    node = shutil.which("node") or "node"
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        url,
        version,
        cwd=TS_CLIENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    summary: dict[str, Any] = json.loads(out)
    return summary


@pytest.mark.parametrize("version", ["2025-11-25", "2025-06-18"])
async def test_the_typescript_client_sees_the_same_through_handrail(
    version: str, ts_client: Path, make_proxy: ProxyFactory
) -> None:
    """One scripted session of the TypeScript SDK (handshake era only: its 1.x speaks no
    2026-07-28), each route against a fresh server, both at once. The proxy's timeout_s
    (0.5 s) is shorter than the long call, which keeps reporting progress."""
    summaries: dict[str, dict[str, Any]] = {}
    ran: dict[str, tuple[dict[str, int], bool]] = {}

    async def session(route: str, server: SdkServer) -> None:
        url = server.url
        if route == "handrail":
            tool = {"upstream": server.url, "kind": "mcp", "timeout_s": 0.5}
            url = str((await make_proxy({"sdk": tool})).make_url("/tools/sdk"))
        summaries[route] = await run_ts_client(ts_client, url, version)
        cancelled = await anyio.to_thread.run_sync(server.cancelled.wait, 3)
        ran[route] = (dict(server.executions), cancelled)

    with start_sdk_server() as first, start_sdk_server() as second:
        async with anyio.create_task_group() as group:
            group.start_soon(session, "direct", first)
            group.start_soon(session, "handrail", second)
    direct = summaries["direct"]
    assert direct["protocolVersion"] == version
    assert direct["steps"] == TS_EXPECTED
    assert direct["asked"] == [
        "elicit: Send the invoice to bob@example.com?",
        "sample: Summarize: a long story",
    ]
    assert ran["direct"] == (TS_EXECUTIONS, True)
    assert summaries["handrail"] == direct
    assert ran["handrail"] == ran["direct"]
