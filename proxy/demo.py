"""``handrail demo``: a sample tool, the proxy on the shipped policies, and a scripted agent.

Everything runs in this process on loopback ports; the store and journal go under
``.handrail/demo/`` so ``handrail calls`` can read them afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import parse_config, shipped_policies
from proxy.http.app import build_admin_app, build_app
from proxy.http.keys import DEPS

DEMO_DIR = Path(".handrail/demo")
KEYS_SEEN = web.AppKey("keys_seen", list)
"""The Idempotency-Key headers the sample tool received, in order."""


def sample_tool() -> tuple[web.Application, dict[str, int]]:
    """A tiny CRM: contacts and refunds, counting how often each write really ran."""
    ran = {"create_contact": 0, "refund": 0}
    contacts: dict[str, dict[str, Any]] = {}
    keys: list[str] = []

    async def export(request: web.Request) -> web.Response:
        # A tool that leaks a credential in its answer: the result check withholds it.
        return web.json_response({"id": "x-1", "sync": "aws_key=AKIAIOSFODNN7EXAMPLE"})

    async def list_contacts(request: web.Request) -> web.Response:
        return web.json_response({"contacts": list(contacts.values())})

    async def create_contact(request: web.Request) -> web.Response:
        ran["create_contact"] += 1
        keys.append(request.headers.get("Idempotency-Key", ""))
        data = await request.json()
        contact = {"id": f"c-{len(contacts) + 1}", **data}
        contacts[contact["id"]] = contact
        return web.json_response(contact, status=201)

    async def refund(request: web.Request) -> web.Response:
        ran["refund"] += 1
        return web.json_response({"refunded": (await request.json()).get("amount")})

    app = web.Application()
    app.router.add_get("/contacts", list_contacts)
    app.router.add_get("/export", export)
    app.router.add_post("/contacts", create_contact)
    app.router.add_post("/refunds", refund)
    app[KEYS_SEEN] = keys
    return app, ran


def _replay_with_a_changed_policy(config: Any, run_id: str, p: Any) -> int:
    """``handrail replay --run ID --policies CANDIDATE``: the run re-decided against a
    policy that refuses refunds over 400; the calls whose decision changes."""
    import io
    import shutil
    import tempfile

    from proxy.replay.commands import ReplayArgs, replay_command

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "policies"
        shutil.copytree(config.policy.path, candidate, ignore=shutil.ignore_patterns("*_test.rego"))
        data = json.loads((candidate / "data.json").read_text())
        for limit in data["handrail_settings"]["limits"].values():
            limit["amount"]["deny_over"] = 400  # refunds over 400: refused outright
        (candidate / "data.json").write_text(json.dumps(data))
        out = io.StringIO()
        code = replay_command(
            config,
            ReplayArgs(runs=[run_id], policies=candidate),
            out=out,
            err=out,
        )
    p("\n11. What if refunds over 400 were refused? The run, re-decided against that policy")
    p(f"    (handrail replay --run {run_id} --policies candidate/): exit {code}")
    for line in out.getvalue().splitlines():
        p(f"  {line}")
    return code


def _approve_from_cli(config: Any, admin_url: str, approval_id: str) -> int:
    """What ``handrail approvals approve ID`` does, printed as a person would see it."""
    import io

    from proxy.approvals.commands import approvals_command

    out, err = io.StringIO(), io.StringIO()
    code = approvals_command(
        config,
        "approve",
        approval_id,
        reason="order o-1 checked by a person",
        state="pending",
        admin_url=admin_url,
        as_json=False,
        out=out,
        err=err,
    )
    for line in (out.getvalue() + err.getvalue()).splitlines():
        print(f"  > {line}", flush=True)
    return code


def _config(tool_url: str, directory: Path) -> dict[str, Any]:
    return {
        "listen": {"port": 0},
        "admin": {"port": 0},
        "tools": {
            "crm": {"upstream": tool_url, "idempotency": {"mode": "attach"}},
            "payments": {"upstream": tool_url, "idempotency": {"mode": "attach"}},
        },
        "policy": {"path": str(_policies()), "watch": False},
        "approvals": {"wait_s": 0.5},
        "store": {"url": f"sqlite:///{(directory / 'handrail.db').resolve()}"},
        "tracing": {"exporter": "none"},
    }


def _serving_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config the demo leaves behind: the demo's store and journal (``handrail calls``,
    ``runs``, ``replay`` read them), real ports, and the sample tool of ``examples/`` as the
    upstream, so ``handrail serve -c`` on it serves once that tool runs."""
    sample = "http://127.0.0.1:9001"
    tools = {name: {**tool, "upstream": sample} for name, tool in raw["tools"].items()}
    return {
        **raw,
        "listen": {"port": 8787},
        "admin": {"port": 8788},
        "tools": tools,
        "approvals": {"wait_s": 30},
    }


def _write_config(raw: dict[str, Any]) -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    (DEMO_DIR / "handrail.yaml").write_text(json.dumps(raw, indent=2) + "\n")


def _policies() -> Path:
    local = Path("policies")
    return local.resolve() if (local / "handrail.rego").is_file() else shipped_policies()


def _tree(spans: list[ReadableSpan], trace_id: int) -> list[str]:
    mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
    children: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in mine if s.context is not None}
    for span in mine:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            attrs = span.attributes or {}
            notes = [
                f"{k}={attrs[k]!s}"
                for k in (
                    "handrail.decision",
                    "handrail.idempotency.replayed",
                    "http.response.status_code",
                )
                if k in attrs
            ]
            lines.append(f"{'  ' * depth}- {span.name}  {' '.join(notes)}".rstrip())
            assert span.context is not None
            walk(span.context.span_id, depth + 1)

    walk(None, 2)
    return lines


async def _demo(out: TextIO) -> int:
    tool_app, ran = sample_tool()
    tool_runner = web.AppRunner(tool_app, access_log=None)
    await tool_runner.setup()
    site = web.TCPSite(tool_runner, "127.0.0.1", 0)
    await site.start()
    tool_url = f"http://127.0.0.1:{tool_runner.addresses[0][1]}"

    raw = _config(tool_url, DEMO_DIR)
    _write_config(_serving_config(raw))
    config = parse_config(raw, str(DEMO_DIR / "handrail.yaml"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app(config, tracer_provider=provider)
    runner = web.AppRunner(app, access_log=None)
    admin_runner = web.AppRunner(build_admin_app(app), access_log=None)
    await runner.setup()
    await admin_runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    await web.TCPSite(admin_runner, "127.0.0.1", 0).start()
    proxy = f"http://127.0.0.1:{runner.addresses[0][1]}/tools/"
    admin_url = f"http://127.0.0.1:{admin_runner.addresses[0][1]}"
    app[DEPS].approvals.admin_url = admin_url
    run_id = "demo-" + secrets.token_hex(3)
    agent = {"X-Agent-Id": "demo-agent", "X-Run-Id": run_id}

    def p(line: str = "") -> None:
        print(line, file=out, flush=True)

    p(
        f"Handrail demo: a sample tool at {tool_url} and the proxy at {proxy}{{crm,payments}}"
        " (both stop when the demo ends)"
    )
    p(f"Policies from {config.policy.path}")
    p(f"The agent 'demo-agent' runs '{run_id}'; every call goes through the proxy.\n")
    ok = True
    async with aiohttp.ClientSession(headers=agent) as http:

        async def call(
            title: str,
            method: str,
            path: str,
            body: Any = None,
            headers: dict[str, str] | None = None,
        ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
            async with http.request(method, proxy + path, json=body, headers=headers) as resp:
                data = await resp.json()
                p(
                    f"{title}\n  {method} /tools/{path} -> {resp.status}"
                    + (" (Idempotent-Replayed)" if resp.headers.get("Idempotent-Replayed") else "")
                )
                return resp.status, data, resp

        status, data, _ = await call("1. Read: allowed by policy", "GET", "crm/contacts")
        ok &= status == 200
        status, data, resp = await call(
            "2. Write: allowed, an idempotency key is attached",
            "POST",
            "crm/contacts",
            {"name": "Ada Lovelace", "email": "ada@example.com"},
        )
        ok &= status == 201
        p(f"  the tool created {data.get('id')}")
        attached = tool_app[KEYS_SEEN][-1] if tool_app[KEYS_SEEN] else "(none)"
        p(
            f"  the proxy attached Idempotency-Key {attached}, derived from the agent, the run,"
            " the tool, the method, the path and the payload"
        )
        status, data, resp = await call(
            "3. The agent blindly retries the same write (the same JSON, fields reordered)",
            "POST",
            "crm/contacts",
            {"email": "ada@example.com", "name": "Ada Lovelace"},
        )
        ok &= status == 201 and resp.headers.get("Idempotent-Replayed") == "true"
        p(f"  replayed from the store: the tool ran create_contact {ran['create_contact']} time(s)")
        replay_trace = int(resp.headers["traceresponse"].split("-")[1], 16)
        status, data, _ = await call(
            "4. Write with a secret in its arguments: denied with reasons",
            "POST",
            "crm/contacts",
            {"name": "Eve", "note": "use key sk-live-4eC39HqLyjWDarjtT1zdp7dc"},
        )
        ok &= status == 403
        error = data.get("error", {})
        for reason in error.get("reasons", []):
            p(f"  reason: {reason}")
        p(f"  (the tool was not called; decision {error.get('decision_id')})")
        big_refund = {"amount": 500, "order": "o-1"}
        status, data, _ = await call(
            "5. A refund over the approval limit: held for a person",
            "POST",
            "payments/refunds",
            big_refund,
        )
        error = data.get("error", {})
        approval_id = str(error.get("approval_id"))
        p(f"  {error.get('code')} ({approval_id}); the tool did not run")
        p(f"  the page a person opens: {error.get('approval_url', '').split('?')[0]}")
        ok &= status == 403 and error.get("code") == "approval_pending" and ran["refund"] == 0
        p(f"  a person approves it: handrail approvals approve {approval_id} --reason ...")
        decided = await asyncio.to_thread(_approve_from_cli, config, admin_url, approval_id)
        ok &= decided == 0
        status, data, _ = await call(
            "6. The agent retries the refund: approved, it runs once",
            "POST",
            "payments/refunds",
            big_refund,
        )
        ok &= status == 200
        status, data, _ = await call(
            "7. ...and retries it again: replayed, not refunded twice",
            "POST",
            "payments/refunds",
            big_refund,
        )
        p(f"  the tool ran refund {ran['refund']} time(s)")
        ok &= status == 200 and ran["refund"] == 1 and ran["create_contact"] == 1
        status, data, _ = await call(
            "8. A tool's answer carries a leaked key: the result check withholds it",
            "GET",
            "crm/export",
        )
        error = data.get("error", {})
        for reason in error.get("reasons", []):
            p(f"  reason: {reason}")
        ok &= status == 502 and error.get("code") == "result_blocked"
        ok &= "AKIA" not in json.dumps(data)
        async with http.post(f"{admin_url}/runs/{run_id}/close", json={"by": "demo"}) as resp:
            ok &= resp.status == 200
        p(f"\n9. The task is done: the run's finish line is drawn (handrail runs close {run_id})")
        status, data, _ = await call(
            "10. A write after the finish line: refused",
            "POST",
            "crm/contacts",
            {"name": "Late Write"},
        )
        p(f"  reason: {'; '.join(data.get('error', {}).get('reasons', []))}")
        ok &= status == 403 and ran["create_contact"] == 1
        async with http.get(f"{admin_url}/runs/{run_id}") as resp:
            ledger = await resp.json()
        totals = ledger["totals"]
        counts = ", ".join(f"{k} {v}" for k, v in totals["outcomes"].items() if v)
        p(
            f"\nThe run's ledger (GET /runs/{run_id}, handrail runs --run {run_id}): "
            f"{totals['calls']} calls: {counts}; {totals['writes']} writes ran, "
            f"{totals['replayed']} replayed; closed by {ledger['closed_by']}"
        )
        ok &= ledger["closed"] is True

    deps = app[DEPS]
    await deps.journal.flush()
    from proxy.tracing.base import CallQuery

    rows = await deps.journal.query(CallQuery(run_id=run_id, limit=20))
    p(f"\nThe journal recorded {len(rows)} calls for run {run_id}:")
    for row in reversed(rows):
        where = f"{row.get('tool', '')}{row.get('path', '')}"
        p(
            f"  {row.get('method', ''):6} {where:20} decision={row.get('decision')} "
            f"status={row.get('status')} replayed={row.get('replayed')}"
        )
    p(f"\nThe trace of the replayed retry ({replay_trace:032x}):")
    for line in _tree(list(exporter.get_finished_spans()), replay_trace):
        p(line)
    replayed = await asyncio.to_thread(_replay_with_a_changed_policy, config, run_id, p)
    ok &= replayed == 1
    p(f"\nSee them again with: handrail calls -c {DEMO_DIR / 'handrail.yaml'} --run {run_id}")
    p(
        f"Serve the same config yourself: python examples/sample_tool.py & "
        f"handrail serve -c {DEMO_DIR / 'handrail.yaml'}"
    )
    p("\nWhat next:")
    p("  - traces in Phoenix: pip install -e '.[phoenix]' && phoenix serve, then set")
    p("    tracing: {exporter: otlp, endpoint: http://127.0.0.1:6006} and handrail traces --run ID")
    p("  - guard your own tool (and an MCP server): handrail serve -c examples/handrail.yaml,")
    p("    see 'Guard your own tool in five minutes' in README.md")
    p("  - write policies: docs/policy.md; check a config: handrail check -c handrail.yaml")

    await admin_runner.cleanup()
    await runner.cleanup()
    await tool_runner.cleanup()
    provider.shutdown()
    p("\ndemo " + ("finished: every call behaved as expected" if ok else "FAILED: see above"))
    return 0 if ok else 1


def run_demo(out: TextIO) -> int:
    return asyncio.run(_demo(out))
