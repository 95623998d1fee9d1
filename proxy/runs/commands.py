"""``handrail runs [--run ID] [--json]`` and ``handrail runs close ID``: from the journal and
the store directly, so they work whether or not the proxy runs (no tool secrets needed)."""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, datetime
from typing import Any, TextIO

from proxy.config import Config
from proxy.metrics import Metrics
from proxy.runs.api import build_ledger
from proxy.runs.ledger import Ledger
from proxy.store import store_from_config
from proxy.tracing.base import CallQuery

RECENT = 2000


def runs_command(
    config: Config,
    action: str | None,
    run_id: str | None,
    *,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    if action == "close":
        if not run_id:
            err.write("handrail runs close ID\n")
            return 2
        newly, closed = asyncio.run(_close(config, run_id))
        word = "closed" if newly else "was already closed"
        out.write(f"run {run_id} {word} (at {_when(closed[0])} by {closed[1]})\n")
        return 0
    if run_id:
        ledger = asyncio.run(_ledger(config, run_id))
        if not ledger.entries and ledger.closed is None:
            err.write(f"handrail: no calls recorded for run {run_id!r}\n")
            return 2
        if as_json:
            out.write(json.dumps(ledger.to_json(), indent=2, ensure_ascii=False) + "\n")
        else:
            out.write(render(ledger))
        return 0
    runs = asyncio.run(_recent(config))
    if as_json:
        out.write(json.dumps(runs, indent=2) + "\n")
    else:
        for run in runs:
            out.write(
                f"{run['run']}  agent={run['agent'] or '-'}  calls={run['calls']}  "
                f"last {run['last']}\n"
            )
        if not runs:
            out.write("no runs recorded\n")
    return 0


def render(ledger: Ledger) -> str:
    data = ledger.to_json()
    lines = [
        f"run {ledger.run_id}" + (f"  CLOSED by {data['closed_by']}" if data["closed"] else "")
    ]
    for e in data["calls"]:
        what = e["call"] or f"{e['method']} {e['path']}"
        notes = [e["decision"] or "-", e["outcome"]]
        if e["replayed"]:
            notes.append("replayed")
        if e["approval_id"]:
            notes.append(f"approval {e['approval_id']}")
        if e["result_check"]:
            notes.append(f"result {e['result_check']}")
        lines.append(
            f"  {e['time']}  {e['tool']:12} {what:28} {e['status'] or '-':>4}  {'  '.join(notes)}"
        )
    totals = data["totals"]
    counts = ", ".join(f"{k} {v}" for k, v in totals["outcomes"].items() if v)
    lines.append(
        f"  {totals['calls']} calls ({counts}); {totals['writes']} writes ran; "
        f"{totals['replayed']} replayed"
    )
    return "\n".join(lines) + "\n"


async def _ledger(config: Config, run_id: str) -> Ledger:
    from proxy.tracing import journal_from_config

    journal = journal_from_config(config, Metrics(), writer=False)
    store = store_from_config(config.store)
    await journal.open()
    await store.open()
    try:
        return await build_ledger(journal, store, run_id)
    finally:
        await journal.close()
        await store.close()


async def _close(config: Config, run_id: str) -> tuple[bool, tuple[float, str]]:
    store = store_from_config(config.store)
    await store.open()
    try:
        newly = await store.close_run(run_id, f"cli:{getpass.getuser()}")
        closed = await store.closed_run(run_id)
        assert closed is not None
        return newly, closed
    finally:
        await store.close()


async def _recent(config: Config) -> list[dict[str, Any]]:
    from proxy.tracing import journal_from_config

    journal = journal_from_config(config, Metrics(), writer=False)
    await journal.open()
    try:
        rows = await journal.query(CallQuery(limit=RECENT))
    finally:
        await journal.close()
    runs: dict[str, dict[str, Any]] = {}
    for row in rows:  # newest first
        run = runs.setdefault(
            row["run"], {"run": row["run"], "agent": row["agent"], "calls": 0, "last": row["time"]}
        )
        run["calls"] += 1
    return list(runs.values())


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
