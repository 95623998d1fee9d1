"""The local journal on SQLite and PostgreSQL, ``handrail calls``, and the journal of a real proxy."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.call import Decision
from proxy.config import Config, parse_config
from proxy.errors import PolicyDenied
from proxy.metrics import Metrics
from proxy.tracing import journal_from_config
from proxy.tracing.base import CallQuery
from proxy.tracing.commands import calls_command, parse_since
from proxy.tracing.journal import SqlJournal
from proxy.tracing.journal_sqlite import journal_path
from tests.conftest import ProxyFactory
from tests.test_tracing import dropped, make_call

PG_URL = os.environ.get("HANDRAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _run_aside(coro: Any) -> Any:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_prefix() -> Iterator[str]:
    prefix = f"handrail_journal_{uuid.uuid4().hex[:8]}"
    try:
        _run_aside(_pg("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {PG_URL} is not reachable: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    yield prefix

    async def drop_all() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix + "%"
            )
            for row in rows:
                await conn.execute(f"DROP SCHEMA {row['nspname']} CASCADE")
        finally:
            await conn.close()

    _run_aside(drop_all())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/handrail.db"
    monkeypatch.chdir(tmp_path)  # the default spool, .handrail/journal-spool, goes there
    prefix = request.getfixturevalue("pg_prefix")
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await _pg(f"CREATE SCHEMA {schema}")
    return f"{PG_URL}?search_path={schema}"


def config_for(url: str, **tracing: Any) -> Config:
    return parse_config({"store": {"url": url}, "tracing": tracing})


JournalFactory = Callable[..., Any]


@pytest.fixture
async def make_journal(store_url: str) -> AsyncIterator[JournalFactory]:
    opened: list[SqlJournal] = []

    async def make(**tracing: Any) -> SqlJournal:
        journal = journal_from_config(config_for(store_url, **tracing), Metrics())
        await journal.open()
        opened.append(journal)
        return journal

    yield make
    for journal in opened:
        await journal.close()


def _call(run: str = "r-1", tool: str = "crm", allow: bool = True, **fields: Any) -> Any:
    decision = Decision(allow=allow, reasons=() if allow else ("not today",), decision_id="d")
    call = make_call(run_id=run, tool_name=tool, decision=decision, **fields)
    if allow:
        call.status = call.status or 200
    else:
        call.error = PolicyDenied("denied", reasons=["not today"])
    call.timings.total_s = 0.0123
    return call


async def test_appended_calls_land_without_a_flush(make_journal: JournalFactory) -> None:
    journal = await make_journal()
    for i in range(3):
        journal.append(_call(path=f"/c/{i}"))
    deadline = time.monotonic() + 2.0
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(rows) < 3:
        await asyncio.sleep(0.05)
        rows = await journal.query(CallQuery())
    assert [r["path"] for r in rows] == ["/c/2", "/c/1", "/c/0"]


async def test_many_calls_are_written_in_batches_and_all_land(make_journal: JournalFactory) -> None:
    journal = await make_journal()
    batches: list[int] = []
    insert = journal.db.insert

    async def counting(rows: Any) -> None:
        batches.append(len(rows))
        await insert(rows)

    journal.db.insert = counting
    for i in range(1000):
        journal.append(_call(path=f"/c/{i}"))
    await journal.flush()
    rows = await journal.query(CallQuery(limit=5000))
    assert len(rows) == 1000
    assert max(batches) == 256 and len(batches) <= 8


async def test_a_row_holds_the_calls_facts(make_journal: JournalFactory) -> None:
    journal = await make_journal()
    call = _call(
        run="r-9",
        idempotency_key="k-1",
        replayed=True,
        body=b'{"password": "x", "n": 1}',
        captured_body=bytearray(b'{"ok": true}'),
        query_string="a=1&token=zzz",
    )
    journal.append(call)
    await journal.flush()
    (row,) = await journal.query(CallQuery(run_id="r-9"))
    assert row["tool"] == "crm" and row["agent"] == "sales-bot" and row["run"] == "r-9"
    assert row["trace_id"] == call.trace_id and row["span_id"] == call.span_id
    assert (row["method"], row["path"], row["status"]) == ("POST", "/contacts/42", 200)
    assert row["decision"] == "allow" and row["decision_id"] == "d"
    assert row["idempotency_key"] == "k-1" and row["replayed"] is True
    assert row["total_ms"] == pytest.approx(12.3)
    assert json.loads(row["input"]) == {"password": "[REDACTED]", "n": 1}
    assert json.loads(row["output"]) == {"ok": True}
    assert "zzz" not in row["query"]
    assert row["time"].endswith("Z")


async def test_a_denied_call_keeps_its_decision_reasons_and_error(
    make_journal: JournalFactory,
) -> None:
    journal = await make_journal()
    journal.append(_call(allow=False))
    await journal.flush()
    (row,) = await journal.query(CallQuery())
    assert (row["decision"], row["reasons"], row["status"], row["error"]) == (
        "deny",
        ["not today"],
        403,
        "policy_denied",
    )


async def test_query_filters_by_run_tool_decision_and_since(make_journal: JournalFactory) -> None:
    journal = await make_journal()
    old = _call(run="r-1", tool="crm")
    old.timings.started_wall = time.time() - 3600
    journal.append(old)
    journal.append(_call(run="r-1", tool="mail"))
    journal.append(_call(run="r-2", tool="crm", allow=False))
    journal.append(_call(run="r-2", tool="crm"))
    await journal.flush()

    async def count(**kw: Any) -> int:
        return len(await journal.query(CallQuery(**kw)))

    assert await count(run_id="r-1") == 2
    assert await count(tool="crm") == 3
    assert await count(decision="deny") == 1
    assert await count(run_id="r-2", decision="allow") == 1
    assert await count(since=time.time() - 60) == 3
    assert await count(limit=2) == 2


async def test_retention_purges_old_rows_and_keeps_at_most_max_rows(
    make_journal: JournalFactory,
) -> None:
    journal = await make_journal(journal={"retention_days": 1, "max_rows": 5})
    for age_days in (3, 2):
        call = _call(path=f"/old/{age_days}")
        call.timings.started_wall = time.time() - age_days * 86400
        journal.append(call)
    for i in range(8):
        journal.append(_call(path=f"/new/{i}"))
    await journal.flush()
    removed = await journal.purge()
    rows = await journal.query(CallQuery(limit=100))
    assert removed == 5
    assert [r["path"] for r in rows] == [f"/new/{i}" for i in (7, 6, 5, 4, 3)]


async def test_retention_runs_in_the_background(store_url: str) -> None:
    config = config_for(store_url, journal={"retention_days": 1})
    journal = journal_from_config(config, Metrics())
    journal._purge_every_s = 0.05
    await journal.open()
    try:
        call = _call()
        call.timings.started_wall = time.time() - 2 * 86400
        journal.append(call)
        await journal.flush()
        await asyncio.sleep(0.3)
        assert await journal.query(CallQuery()) == []
    finally:
        await journal.close()


async def test_a_full_queue_leaves_calls_in_the_spool_until_the_database_catches_up(
    store_url: str,
) -> None:
    metrics = Metrics()
    journal = journal_from_config(config_for(store_url), metrics)
    journal._queue_size = 5
    await journal.open()
    try:
        for i in range(8):  # no await in between: the writer cannot drain meanwhile
            journal.append(_call(path=f"/c/{i}"))
        await journal.flush()
        rows = await journal.query(CallQuery())
        assert sorted(r["path"] for r in rows) == [f"/c/{i}" for i in range(8)]
        assert dropped(metrics, "journal") == 0
        assert metrics.registry.get_sample_value("handrail_journal_recovered_total") == 3
    finally:
        await journal.close()


async def test_a_full_queue_without_a_spool_drops_calls_and_counts_them() -> None:
    metrics = Metrics()
    journal = journal_from_config(config_for("sqlite:///:memory:"), metrics)
    journal._queue_size = 5
    await journal.open()
    try:
        for _ in range(8):
            journal.append(_call())
        assert dropped(metrics, "journal") == 3
        await journal.flush()
        assert len(await journal.query(CallQuery())) == 5
    finally:
        await journal.close()


async def test_append_is_cheap(make_journal: JournalFactory) -> None:
    journal = await make_journal()
    calls = [_call(body=json.dumps({"x": "y" * 200, "i": i}).encode()) for i in range(2000)]
    started = time.perf_counter()
    for call in calls:
        journal.append(call)
    per_call_us = (time.perf_counter() - started) / len(calls) * 1e6
    await journal.flush()
    assert per_call_us < 500, f"append took {per_call_us:.0f} µs per call"


async def test_close_writes_what_is_queued(store_url: str) -> None:
    config = config_for(store_url)
    journal = journal_from_config(config, Metrics())
    await journal.open()
    for _ in range(10):
        journal.append(_call())
    await journal.close()
    reader = journal_from_config(config, Metrics(), writer=False)
    try:
        assert len(await reader.query(CallQuery())) == 10
    finally:
        await reader.close()


async def test_sqlite_journal_lives_in_its_own_file_beside_the_store(tmp_path: Path) -> None:
    store_file = tmp_path / "handrail.db"
    journal = journal_from_config(config_for(f"sqlite:///{store_file}"), Metrics())
    await journal.open()
    journal.append(_call())
    await journal.close()
    with sqlite3.connect(tmp_path / "handrail-journal.db") as db:
        versions = dict(db.execute("SELECT component, version FROM handrail_schema").fetchall())
        rows = db.execute("SELECT count(*) FROM handrail_journal").fetchone()[0]
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert (versions, rows, mode) == ({"journal": 5}, 1, "wal")
    assert not store_file.exists()


async def test_journal_batches_never_take_the_stores_write_lock(tmp_path: Path) -> None:
    store_file = tmp_path / "handrail.db"
    journal = journal_from_config(config_for(f"sqlite:///{store_file}"), Metrics())
    await journal.open()
    with sqlite3.connect(store_file, isolation_level=None) as store_db:
        store_db.execute("BEGIN IMMEDIATE")  # the store's write lock, held
        try:
            journal.append(_call())
            await asyncio.wait_for(journal.flush(), 2.0)
        finally:
            store_db.execute("ROLLBACK")
    assert len(await journal.query(CallQuery())) == 1
    await journal.close()


@pytest.mark.parametrize(
    ("store", "journal"),
    [
        ("state/handrail.db", "state/handrail-journal.db"),
        ("state/handrail", "state/handrail-journal.db"),
        (":memory:", ":memory:"),
    ],
)
def test_journal_file_is_named_after_the_store_file(store: str, journal: str) -> None:
    assert str(journal_path(store)) == journal


@pytest.mark.postgres
async def test_postgres_schema_version_is_recorded_beside_the_stores(pg_prefix: str) -> None:
    schema = f"{pg_prefix}_{uuid.uuid4().hex[:8]}"
    await _pg(
        f"CREATE SCHEMA {schema}; "
        f"CREATE TABLE {schema}.handrail_schema (component text PRIMARY KEY, version integer NOT NULL); "
        f"INSERT INTO {schema}.handrail_schema VALUES ('store', 7)"
    )
    url = f"{PG_URL}?search_path={schema}"
    for _ in range(2):  # opening twice migrates once
        journal = journal_from_config(config_for(url), Metrics())
        await journal.open()
        await journal.close()
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT component, version FROM handrail_schema")
    finally:
        await conn.close()
    assert {r["component"]: r["version"] for r in rows} == {"store": 7, "journal": 5}


# -- handrail calls ---------------------------------------------------------------------------


async def _record(url: str, calls: list[Any]) -> None:
    journal = journal_from_config(config_for(url), Metrics())
    await journal.open()
    for call in calls:
        journal.append(call)
    await journal.close()


async def test_calls_command_prints_a_table_oldest_first(store_url: str) -> None:
    first = _call(run="r-5", path="/contacts/1")
    first.timings.started_wall -= 1
    await _record(
        store_url, [first, _call(run="r-5", allow=False, method="DELETE"), _call(run="r-6")]
    )
    out = io.StringIO()
    code = await asyncio.to_thread(
        calls_command,
        config_for(store_url),
        run="r-5",
        tool=None,
        decision=None,
        since=None,
        limit=50,
        as_json=False,
        out=out,
    )
    lines = out.getvalue().splitlines()
    assert code == 0
    assert lines[0].split() == [
        "TIME",
        "RUN",
        "AGENT",
        "CALL",
        "REQUEST",
        "DECISION",
        "STATUS",
        "MS",
        "NOTE",
    ]
    assert len(lines) == 3
    assert "POST /contacts/1" in lines[1] and "allow" in lines[1] and "200" in lines[1]
    assert (
        "DELETE" in lines[2]
        and "deny" in lines[2]
        and "403" in lines[2]
        and "not today" in lines[2]
    )


async def test_calls_command_json_is_an_array_for_scripts(store_url: str) -> None:
    await _record(store_url, [_call(run="r-7"), _call(run="r-7", allow=False)])
    out = io.StringIO()
    code = await asyncio.to_thread(
        calls_command,
        config_for(store_url),
        run="r-7",
        tool=None,
        decision="deny",
        since="10m",
        limit=50,
        as_json=True,
        out=out,
    )
    rows = json.loads(out.getvalue())
    assert code == 0
    assert [(r["run"], r["decision"], r["reasons"]) for r in rows] == [
        ("r-7", "deny", ["not today"])
    ]


def test_calls_command_on_a_fresh_install_lists_nothing_and_creates_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    path = tmp_path / "none" / "handrail.db"
    code = calls_command(
        config_for(f"sqlite:///{path}"),
        run=None,
        tool=None,
        decision=None,
        since=None,
        limit=10,
        as_json=False,
        out=out,
    )
    assert code == 0
    assert out.getvalue() == "no calls recorded\n"
    assert not path.exists()


def test_calls_command_rejects_a_bad_since(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = calls_command(
        config_for(f"sqlite:///{tmp_path}/h.db"),
        run=None,
        tool=None,
        decision=None,
        since="yesterday-ish",
        limit=10,
        as_json=False,
        out=io.StringIO(),
    )
    assert code == 2
    assert "--since" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "ago"), [("300", 300), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5s", 1.5)]
)
def test_since_accepts_durations(text: str, ago: float) -> None:
    assert parse_since(text, now=10_000_000) == pytest.approx(10_000_000 - ago)


def test_since_accepts_iso_times() -> None:
    assert parse_since("2026-11-24T10:00:00Z") == parse_since("2026-11-24T10:00:00+00:00")


# -- the journal of a real proxy ----------------------------------------------------------------


async def test_proxy_journals_allowed_denied_and_replayed_calls(
    tool: Any, make_proxy: ProxyFactory, make_admin: Any, tmp_path: Path
) -> None:
    server, _ = tool
    proxy = await make_proxy({"crm": {"upstream": str(server.make_url("/api"))}})
    headers = {"X-Run-Id": "run-j", "X-Agent-Id": "bot"}
    await proxy.post("/tools/crm/a", json={"password": "hunter2"}, headers=headers)
    await proxy.delete("/tools/crm/a", headers=headers)
    for _ in range(2):
        await proxy.post("/tools/crm/b", json={}, headers={**headers, "Idempotency-Key": "k"})
    admin = await make_admin(proxy)
    resp = await admin.get("/calls", params={"run": "run-j"})
    rows = (await resp.json())["calls"]
    assert [(r["method"], r["decision"], r["status"], r["replayed"]) for r in reversed(rows)] == [
        ("POST", "allow", 200, False),
        ("DELETE", "deny", 403, False),
        ("POST", "allow", 200, False),
        ("POST", "allow", 200, True),
    ]
    assert "hunter2" not in json.dumps(rows)
