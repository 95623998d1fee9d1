"""Phoenix's own UI, in a real browser, shows a run recorded through the real proxy.

One run of the agent ``sales-bot`` (a write that is allowed, a delete the policy denies, an
order, and its retry that is replayed) goes through the real proxy to a real aiohttp tool
and is exported over OTLP to the session's Phoenix, under a project of its own. The agent
sends no ``traceparent``, so each call is a trace of its own; ``traceresponse`` tells the
test which. Headless Chromium then opens the project's Traces page and two traces' details
and reads what a person would. ``HANDRAIL_SCREENSHOTS=1`` saves ``docs/phoenix-run.png``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Config, parse_config
from proxy.http.app import build_app
from proxy.metrics import Metrics
from proxy.tracing import tracer_provider_from_config
from proxy.tracing.phoenix import PhoenixClient
from tests.conftest import IN_CI, TEST_POLICY, Seen, tool_app

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # the ``tab`` fixture skips (fails in CI) without it
    async_playwright = expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.async_api import Locator, Page, ViewportSize

pytestmark = pytest.mark.phoenix

# As in test_phoenix.py: keep arize-phoenix-client's pytest plugin offline.
os.environ.setdefault("PHOENIX_TEST_TRACKING", "false")

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
LOADING_MS = 15_000
"""How long a page or a trace may take to show: Phoenix's UI is ~6 MB of JavaScript."""
VIEWPORT: ViewportSize = {"width": 1720, "height": 1000}
AGENT = "sales-bot"
ORDER = {"sku": "a-1", "quantity": 2}
CALLS: tuple[tuple[str, str, str, dict[str, Any] | None, dict[str, str]], ...] = (
    ("contact", "POST", "/tools/crm/contacts", {"name": "Ada Lovelace"}, {}),
    ("delete", "DELETE", "/tools/crm/contacts/42", None, {}),
    ("order", "POST", "/tools/crm/orders", ORDER, {"Idempotency-Key": "order-1"}),
    ("retry", "POST", "/tools/crm/orders", ORDER, {"Idempotency-Key": "order-1"}),
)
"""(label, method, path, body, headers): TEST_POLICY denies the DELETE and allows the rest."""
SPANS = 4 + 3 + 4 + 3
"""Each call span with its policy and key spans, and the tool request unless denied or replayed."""


@dataclass(frozen=True)
class RecordedRun:
    phoenix: str
    project: str
    project_id: str
    run_id: str
    traces: dict[str, str]
    """label -> trace id, as the proxy's ``traceresponse`` named it."""

    @property
    def traces_page(self) -> str:
        return f"{self.phoenix}/projects/{self.project_id}/traces"


async def _drive(config: Config, run_id: str) -> dict[str, str]:
    tool = TestServer(tool_app(Seen()), host="127.0.0.1")
    await tool.start_server()
    tools = {"crm": {"upstream": str(tool.make_url("/api"))}}
    config = config.model_copy(update={"tools": parse_config({"tools": tools}).tools})
    provider = tracer_provider_from_config(config.tracing, Metrics())
    client = TestClient(TestServer(build_app(config, tracer_provider=provider), host="127.0.0.1"))
    await client.start_server()
    answers: list[tuple[int, str | None]] = []
    traces: dict[str, str] = {}
    try:
        for label, method, path, body, extra in CALLS:
            headers = {"X-Agent-Id": AGENT, "X-Run-Id": run_id, **extra}
            async with client.request(method, path, json=body, headers=headers) as response:
                await response.read()
            answers.append((response.status, response.headers.get("Idempotent-Replayed")))
            traces[label] = response.headers["traceresponse"].split("-")[1]
    finally:
        await client.close()
        await tool.close()
        await asyncio.to_thread(provider.shutdown)  # sends what is queued to Phoenix
    assert answers == [(200, None), (403, None), (200, None), (200, "true")]
    return traces


async def _wait_for_spans(phoenix: str, project: str, traces: dict[str, str]) -> str:
    """Waits until Phoenix holds every span of the run; returns the project's id."""
    async with aiohttp.ClientSession() as session:
        client = PhoenixClient(phoenix, session)
        deadline = time.monotonic() + 20.0
        while len(await client.spans(project, trace_ids=list(traces.values()))) < SPANS:
            assert time.monotonic() < deadline, f"Phoenix did not store {SPANS} spans in 20 s"
            await asyncio.sleep(0.2)
        async with session.get(f"{phoenix}/v1/projects/{project}") as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["data"]["id"])


@pytest.fixture(scope="module")
def recorded(phoenix: str, tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    work = tmp_path_factory.mktemp("ui-run")
    (work / "policies").mkdir()
    (work / "policies" / "handrail.rego").write_text(TEST_POLICY)
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    project = f"handrail-ui-{uuid.uuid4().hex[:6]}"
    config = parse_config(
        {
            "policy": {"path": str(work / "policies"), "watch": False},
            "store": {"url": f"sqlite:///{work}/handrail.db"},
            "tracing": {"exporter": "otlp", "endpoint": phoenix, "project_name": project},
        }
    )

    async def record() -> RecordedRun:
        traces = await _drive(config, run_id)
        project_id = await _wait_for_spans(phoenix, project, traces)
        return RecordedRun(phoenix, project, project_id, run_id, traces)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, record()).result()


@pytest.fixture
async def tab() -> AsyncIterator[Page]:
    """A fresh headless Chromium page; a skip (a failure in CI) naming what is missing."""
    missing = None
    if async_playwright is None:
        missing = "Playwright for Python (pip install playwright)"
    elif not Path(CHROMIUM).exists():
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if IN_CI:
            pytest.fail(f"the browser test needs {missing}")
        pytest.skip(f"the browser test needs {missing}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield await browser.new_page(viewport=VIEWPORT)
        finally:
            await browser.close()


async def open_traces(tab: Page, run: RecordedRun) -> Locator:
    """The project's Traces page; returns its table's rows, once the run's four are shown."""
    await tab.goto(run.traces_page)
    await expect(tab.get_by_text(run.project, exact=True)).to_be_visible(timeout=LOADING_MS)
    rows = tab.locator("tbody tr")
    await expect(rows).to_have_count(4, timeout=LOADING_MS)
    return rows


def row_of(tab: Page, rows: Locator, trace_id: str) -> Locator:
    return rows.filter(has=tab.locator(f'a[href*="/traces/{trace_id}"]'))


async def open_trace(tab: Page, run: RecordedRun, label: str) -> Locator:
    """Clicks the call's name on the Traces page, as a person would; returns the trace's panel."""
    rows = await open_traces(tab, run)
    await row_of(tab, rows, run.traces[label]).get_by_role("link").click()
    panel = tab.get_by_role("dialog")
    await expect(panel.get_by_test_id("trace-tree").first).to_be_visible(timeout=LOADING_MS)
    await expect(panel.get_by_text(run.traces[label], exact=True)).to_be_visible()
    return panel


async def show_attributes(panel: Locator, span: str) -> Locator:
    """Selects a span in the trace's tree; returns the rows of its attribute table."""
    await panel.get_by_test_id("trace-tree").first.get_by_text(span, exact=True).click()
    await expect(panel.get_by_text(span, exact=True)).to_have_count(2)  # the tree, the header
    await panel.get_by_role("tab", name="Attributes").click()
    return panel.locator("tr")


def attribute(rows: Locator, key: str) -> Locator:
    """The value cell of the attribute ``key`` in the rows ``show_attributes`` returned."""
    return rows.filter(has=rows.page.get_by_text(key, exact=True)).locator("td").nth(1)


async def test_the_traces_page_shows_each_call_its_agent_and_the_deny(
    recorded: RecordedRun, tab: Page
) -> None:
    rows = await open_traces(tab, recorded)
    assert tab.url.startswith(recorded.traces_page)
    for label in ("contact", "delete", "order", "retry"):
        row = row_of(tab, rows, recorded.traces[label])
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("execute_tool crm")
        await expect(row).to_contain_text(AGENT)  # user.id: the agent
    await expect(row_of(tab, rows, recorded.traces["contact"])).to_contain_text(
        '{"name":"Ada Lovelace"}'
    )
    denied = row_of(tab, rows, recorded.traces["delete"])
    await expect(denied).to_contain_text('"code":"policy_denied"')
    await expect(denied).to_contain_text("deletes are not allowed here")
    await expect(row_of(tab, rows, recorded.traces["order"])).not_to_contain_text("policy_denied")

    await tab.get_by_role("button", name="Expand all rows").click()
    await expect(rows).to_have_count(SPANS)
    for name, kind in [
        ("execute_tool crm", "tool"),
        ("handrail.policy", "guardrail"),
        ("handrail.idempotency", "chain"),
    ]:
        of_name = rows.filter(has=tab.get_by_role("link", name=name, exact=True))
        await expect(of_name).to_have_count(4)
        await expect(of_name.filter(has=tab.get_by_text(kind, exact=True))).to_have_count(4)
    # The tool was asked twice: the deny and the replay never reached it.
    upstream = rows.filter(has=tab.get_by_role("link", name="POST", exact=True))
    await expect(upstream).to_have_count(2)

    if os.environ.get("HANDRAIL_SCREENSHOTS") == "1":
        await widen_column(tab, "input_value", 40)
        await widen_column(tab, "output_value", 220)
        await tab.screenshot(path=str(DOCS / "phoenix-run.png"), full_page=True)


async def widen_column(tab: Page, column_id: str, by: float) -> None:
    """Drags a column's edge (for the screenshot: the deny's code and the input in view)."""
    edge = await tab.locator(f'th[data-column-id="{column_id}"] .resizer').bounding_box()
    assert edge is not None
    x, y = edge["x"] + edge["width"] / 2, edge["y"] + edge["height"] / 2
    await tab.mouse.move(x, y)
    await tab.mouse.down()
    await tab.mouse.move(x + by, y, steps=5)
    await tab.mouse.up()
    await tab.mouse.move(0, VIEWPORT["height"] - 1)  # away from any header's tooltip


async def test_a_denied_calls_trace_shows_the_guardrail_that_decided(
    recorded: RecordedRun, tab: Page
) -> None:
    panel = await open_trace(tab, recorded, "delete")
    tree = panel.get_by_test_id("trace-tree").first
    for span in ("execute_tool crm", "handrail.idempotency", "handrail.policy"):
        await expect(tree.get_by_text(span, exact=True)).to_be_visible()
    await expect(tree.get_by_text("POST", exact=True)).to_have_count(0)  # the tool never ran
    output = panel.get_by_test_id("span-info-wrap")  # the call's output: the proxy's answer
    await expect(output.get_by_text('"policy_denied"', exact=True)).to_be_visible()
    await expect(output.get_by_text('"deletes are not allowed here"', exact=True)).to_be_visible()

    attributes = await show_attributes(panel, "handrail.policy")
    await expect(panel.get_by_text("guardrail", exact=True)).to_be_visible()  # its kind
    await expect(attribute(attributes, "handrail.decision")).to_have_text("deny")
    await expect(attribute(attributes, "openinference.span.kind")).to_have_text("GUARDRAIL")

    attributes = await show_attributes(panel, "handrail.idempotency")
    await expect(panel.get_by_text("chain", exact=True)).to_be_visible()
    state = attribute(attributes, "handrail.idempotency.state")
    await expect(state).to_have_text("released")  # the deny freed the key it held


async def test_a_replayed_retrys_trace_shows_the_key_and_no_tool_request(
    recorded: RecordedRun, tab: Page
) -> None:
    panel = await open_trace(tab, recorded, "retry")
    tree = panel.get_by_test_id("trace-tree").first
    await expect(tree.get_by_text("handrail.idempotency", exact=True)).to_be_visible()
    await expect(tree.get_by_text("POST", exact=True)).to_have_count(0)  # answered from the store

    attributes = await show_attributes(panel, "execute_tool crm")
    await expect(attribute(attributes, "handrail.decision")).to_have_text("allow")
    await expect(attribute(attributes, "handrail.idempotency.replayed")).to_have_text("true")
    await expect(attribute(attributes, "handrail.idempotency.key")).to_have_text("order-1")
    await expect(attribute(attributes, "user.id")).to_have_text(AGENT)
    await expect(attribute(attributes, "session.id")).to_have_text(recorded.run_id)

    attributes = await show_attributes(panel, "handrail.idempotency")
    state = attribute(attributes, "handrail.idempotency.state")
    await expect(state).to_have_text("completed")  # found the first order's response
