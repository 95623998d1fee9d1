"""The journal's hash chain on SQLite and PostgreSQL: calls made through a real proxy verify
intact; an edited or deleted row is named by ``handrail calls verify``; two proxies on one
PostgreSQL, retention and a spool recovered after kill -9 all keep it verifiable."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.call import Call, Decision
from proxy.config import CaptureConfig, Config, parse_config
from proxy.http.keys import DEPS
from proxy.metrics import Metrics
from proxy.migrations import migrate_postgres, migrate_sqlite
from proxy.store import sqlite_path
from proxy.tracing import journal_from_config
from proxy.tracing import journal_postgres as journal_postgres_module
from proxy.tracing import journal_sqlite as journal_sqlite_module
from proxy.tracing.base import (
    COLUMNS,
    INSERT_COLUMNS,
    OUTCOMES,
    CallQuery,
    begin_row,
    journal_row,
    row_dict,
)
from proxy.tracing.chain import (
    CHAIN_COLUMNS,
    GENESIS,
    BreakKind,
    ChainEntry,
    ChainWalk,
    Head,
    VerifyReport,
    link,
    row_hash,
)
from proxy.tracing.commands import verify_command
from proxy.tracing.journal import SqlJournal
from proxy.tracing.journal_sqlite import journal_path
from tests.conftest import ProxyFactory
from tests.support_idempotency import pg_schema
from tests.test_journal_durability import journal_child
from tests.test_tracing import make_call

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/handrail.db"
        return
    async with pg_schema() as url:
        yield url


def _config(url: str, tmp_path: Path, **journal: Any) -> Config:
    return parse_config(
        {
            "store": {"url": url},
            "tracing": {"journal": {"spool_dir": str(tmp_path / "spool"), **journal}},
        }
    )


def _call(path: str = "/c", run: str = "r-c", **fields: Any) -> Call:
    call = make_call(
        path=path, run_id=run, decision=Decision(allow=True, decision_id="d"), **fields
    )
    call.status = 200
    return call


async def _sql(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Straight to the journal's database, as someone with access to it would."""
    if url.startswith("sqlite:"):
        db = sqlite3.connect(journal_path(sqlite_path(url)), isolation_level=None)
        try:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]
        finally:
            db.close()
    count = iter(range(1, len(params) + 1))
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch(re.sub(r"\?", lambda _: f"${next(count)}", sql), *params)
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def _chained_ids(url: str) -> list[int]:
    rows = await _sql(url, "SELECT id FROM handrail_journal WHERE chain IS NOT NULL ORDER BY id")
    return [int(r[0]) for r in rows]


async def _verify(config: Config, *, as_json: bool = False) -> tuple[int, str]:
    """``handrail calls verify``: its exit code and what it printed."""
    out = io.StringIO()
    code = await asyncio.to_thread(verify_command, config, out=out, as_json=as_json)
    return code, out.getvalue()


async def _journaled(config: Config, calls: list[Call]) -> VerifyReport:
    journal = journal_from_config(config, Metrics())
    await journal.open()
    try:
        for call in calls:
            journal.begin(call)
            journal.append(call)
        await journal.flush()
        return await journal.verify()
    finally:
        await journal.close()


# -- a real proxy -----------------------------------------------------------------------------


async def _proxy_calls(
    make_proxy: ProxyFactory, tool: Any, url: str, tmp_path: Path, run: str = "run-h"
) -> SqlJournal:
    """Six calls through a real proxy: allowed, denied, replayed; the proxy's journal."""
    server, _ = tool
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url("/api"))}},
        store={"url": url},
        tracing={"journal": {"spool_dir": str(tmp_path / f"spool-{run}")}},
    )
    headers = {"X-Run-Id": run, "X-Agent-Id": "bot"}
    for i in range(3):
        assert (await proxy.post(f"/tools/crm/a/{i}", json={"i": i}, headers=headers)).status == 200
    assert (await proxy.delete("/tools/crm/a/0", headers=headers)).status == 403
    for _ in range(2):
        keyed = {**headers, "Idempotency-Key": f"k-{run}"}
        assert (await proxy.post("/tools/crm/b", json={}, headers=keyed)).status == 200
    journal: SqlJournal = proxy.server.app[DEPS].journal
    await journal.flush()
    return journal


async def test_calls_through_a_real_proxy_verify_intact(
    store_url: str, tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    journal = await _proxy_calls(make_proxy, tool, store_url, tmp_path)
    report = await journal.verify()
    assert report.intact and report.rows == 6 and len(report.chains) == 1
    (chain,) = report.chains
    assert (chain.first_seq, chain.last_seq, chain.rows) == (1, 6, 6)

    code, printed = await _verify(_config(store_url, tmp_path), as_json=True)
    verified = json.loads(printed)
    assert code == 0 and verified["intact"] is True and verified["rows"] == 6
    assert verified["chains"][0]["head"] == chain.head
    rows = await journal.query(CallQuery(run_id="run-h"))
    assert {r["outcome"] for r in rows} <= OUTCOMES
    assert [r["outcome"] for r in reversed(rows)][2:4] == ["ok", "refused"]


async def test_an_edited_row_fails_verify_naming_it(
    store_url: str, tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    await _proxy_calls(make_proxy, tool, store_url, tmp_path)
    ids = await _chained_ids(store_url)
    edited = ids[2]
    await _sql(store_url, "UPDATE handrail_journal SET status = 500 WHERE id = ?", edited)

    code, printed = await _verify(_config(store_url, tmp_path))
    assert code == 1
    assert printed.splitlines()[0].startswith("journal BROKEN: 1 problem in 6 rows")
    (line,) = printed.splitlines()[1:]
    assert line.startswith(f"ALTERED  row {edited}  ")
    assert "tool crm  run run-h" in line and "seq 3" in line
    assert "does not match its hash" in line


async def test_a_row_rehashed_after_an_edit_is_caught_by_the_next_rows_link(
    store_url: str, tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    journal = await _proxy_calls(make_proxy, tool, store_url, tmp_path)
    ids = await _chained_ids(store_url)
    columns = ", ".join(INSERT_COLUMNS)
    ((chain, seq, prev, *values),) = await _sql(
        store_url,
        f"SELECT chain, seq, prev_hash, {columns} FROM handrail_journal WHERE id = ?",
        ids[1],
    )
    values[INSERT_COLUMNS.index("status")] = 201
    forged = row_hash(chain, seq, prev, tuple(values))
    await _sql(
        store_url, "UPDATE handrail_journal SET status = 201, hash = ? WHERE id = ?", forged, ids[1]
    )

    report = await journal.verify()
    (found,) = report.breaks
    assert found.kind is BreakKind.ALTERED and found.row is not None
    assert (found.row.id, found.seq) == (ids[1], 2)
    assert f"row {ids[2]}" in found.detail


async def test_a_deleted_row_fails_verify_naming_the_gap(
    store_url: str, tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    await _proxy_calls(make_proxy, tool, store_url, tmp_path)
    ids = await _chained_ids(store_url)
    await _sql(store_url, "DELETE FROM handrail_journal WHERE id = ?", ids[3])

    code, printed = await _verify(_config(store_url, tmp_path))
    assert code == 1
    (line,) = printed.splitlines()[1:]
    assert line.startswith(f"MISSING  before row {ids[4]}  ")
    assert "seq 4)" in line and f"seq 4 deleted after row {ids[2]}" in line

    code, printed = await _verify(_config(store_url, tmp_path), as_json=True)
    (found,) = json.loads(printed)["breaks"]
    assert (found["kind"], found["seq"], found["row"]["id"], found["before"]["id"]) == (
        "missing",
        4,
        ids[4],
        ids[2],
    )


async def test_rows_cut_off_the_end_of_a_chain_are_missing(
    store_url: str, tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    journal = await _proxy_calls(make_proxy, tool, store_url, tmp_path)
    ids = await _chained_ids(store_url)
    await _sql(store_url, "DELETE FROM handrail_journal WHERE id >= ?", ids[4])

    (found,) = (await journal.verify()).breaks
    assert found.kind is BreakKind.MISSING and (found.seq, found.last_seq) == (5, 6)
    assert found.row is None and found.before is not None and found.before.id == ids[3]
    code, printed = await _verify(_config(store_url, tmp_path))
    assert code == 1 and f"MISSING  after row {ids[3]}" in printed


@pytest.mark.postgres
async def test_two_proxies_on_one_postgres_each_keep_a_chain_that_verifies(
    tool: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async with pg_schema() as url:
        first, second = await asyncio.gather(
            _proxy_calls(make_proxy, tool, url, tmp_path, run="run-1"),
            _proxy_calls(make_proxy, tool, url, tmp_path, run="run-2"),
        )
        assert first.db.chain != second.db.chain
        code, printed = await _verify(_config(url, tmp_path), as_json=True)
        report = json.loads(printed)
        assert code == 0 and report["rows"] == 12
        assert sorted(c["rows"] for c in report["chains"]) == [6, 6]

        ids = await _chained_ids(url)
        await _sql(url, "UPDATE handrail_journal SET tool = 'mail' WHERE id = ?", ids[5])
        code, printed = await _verify(_config(url, tmp_path))
        assert code == 1 and f"ALTERED  row {ids[5]}" in printed


# -- retention --------------------------------------------------------------------------------


async def test_pruning_keeps_the_chain_verifiable(store_url: str, tmp_path: Path) -> None:
    config = _config(store_url, tmp_path, retention_days=1, max_rows=5)
    journal = journal_from_config(config, Metrics())
    await journal.open()
    try:
        for age_days in (3, 2):
            old = _call(f"/old/{age_days}")
            old.timings.started_wall = time.time() - age_days * 86400
            journal.append(old)
        for i in range(8):
            journal.append(_call(f"/new/{i}"))
        await journal.flush()
        assert await journal.purge() == 5
        report = await journal.verify()
        assert report.intact and report.rows == 5
        assert (report.chains[0].first_seq, report.chains[0].last_seq) == (6, 10)
        ((anchor_seq,),) = await _sql(store_url, "SELECT anchor_seq FROM handrail_journal_chain")
        assert anchor_seq == 5

        journal.append(_call("/after"))  # the chain goes on past the pruning
        await journal.flush()
        assert (await journal.verify()).intact
        ids = await _chained_ids(store_url)
        await _sql(store_url, "DELETE FROM handrail_journal WHERE id = ?", ids[0])
        (found,) = (await journal.verify()).breaks
        assert found.kind is BreakKind.MISSING and found.seq == 6
    finally:
        await journal.close()


async def test_pruning_a_whole_chain_leaves_it_linked_to_its_anchor(
    store_url: str, tmp_path: Path
) -> None:
    journal = journal_from_config(_config(store_url, tmp_path, retention_days=1), Metrics())
    await journal.open()
    try:
        old = _call("/old")
        old.timings.started_wall = time.time() - 2 * 86400
        journal.append(old)
        await journal.flush()
        assert await journal.purge() == 1
        journal.append(_call("/new"))
        await journal.flush()
        report = await journal.verify()
        assert report.intact and report.rows == 1 and report.chains[0].first_seq == 2

        await _sql(store_url, "DELETE FROM handrail_journal")
        await _sql(store_url, "UPDATE handrail_journal_chain SET anchor_seq = 2, updated = 0")
        await journal.purge()  # an idle chain with nothing left: its entry goes
        assert await _sql(store_url, "SELECT chain FROM handrail_journal_chain") == []
        journal.append(_call("/newer"))  # and the writer starts the chain over
        await journal.flush()
        report = await journal.verify()
        assert report.intact and report.chains[0].first_seq == 1
    finally:
        await journal.close()


async def test_retention_prunes_a_chain_from_its_start_only(store_url: str, tmp_path: Path) -> None:
    """A recovered old row linked after a fresh one waits until the fresh one goes too."""
    journal = journal_from_config(_config(store_url, tmp_path, retention_days=1), Metrics())
    await journal.open()
    try:
        journal.append(_call("/fresh"))
        late = _call("/recovered-late")
        late.timings.started_wall = time.time() - 2 * 86400
        journal.append(late)
        await journal.flush()
        assert await journal.purge() == 0
        assert (await journal.verify()).intact
        assert len(await journal.query(CallQuery())) == 2
    finally:
        await journal.close()


# -- recovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flushed", [False, True], ids=["unwritten", "written"])
async def test_a_spool_recovered_after_kill_9_verifies(
    store_url: str, tmp_path: Path, flushed: bool
) -> None:
    config = _config(store_url, tmp_path)
    spool = str(tmp_path / "spool")
    async with journal_child(url=store_url, spool=spool, calls=5, flush=flushed) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.stdout.readline(), 20) == b"written\n"
        child.kill()

    report = await _journaled(config, [_call("/after")])
    assert report.intact, report.breaks
    assert report.rows == 7  # five done, the one in flight (interrupted), one after
    if flushed:  # the dead proxy's chain and the recovering proxy's
        assert len(report.chains) == 2
    reader = journal_from_config(config, Metrics(), writer=False)
    try:
        rows = await reader.query(CallQuery(run_id="r-d"))
    finally:
        await reader.close()
    assert sorted((r["path"], r["error"]) for r in rows) == sorted(
        [*((f"/done/{i}", None) for i in range(5)), ("/in-flight", "interrupted")]
    )


async def test_rows_inserted_twice_take_one_link_each(store_url: str, tmp_path: Path) -> None:
    """Recovery re-inserts rows a dead proxy committed without marking them: no gap."""
    first = ("u-1", *journal_row(_call("/first"), CaptureConfig()))
    second = ("u-2", *journal_row(_call("/second"), CaptureConfig()))
    old = ("u-3", *journal_row(_call("/old-proxy"), CaptureConfig())[: COLUMNS.index("outcome")])
    journal = journal_from_config(_config(store_url, tmp_path), Metrics())
    await journal.open()
    try:
        await journal.db.insert([first])
        await journal.db.insert([first, second, second])
        await journal.db.insert([second, old])  # a spool row from before migration 4
        report = await journal.verify()
        rows = await journal.query(CallQuery())
    finally:
        await journal.close()
    assert report.intact and (report.rows, report.chains[0].last_seq) == (3, 3)
    assert rows[0]["path"] == "/old-proxy" and rows[0]["result_reasons"] == []


# -- the columns ------------------------------------------------------------------------------


def test_a_row_keeps_the_outcome_and_the_result_check() -> None:
    call = _call()
    call.extra.update(
        outcome_class="ok", result_check="redacted", result_reasons=["card number in output"]
    )
    row = journal_row(call, CaptureConfig())
    stored = dict(zip(COLUMNS, row, strict=True))
    assert (stored["outcome"], stored["result_check"]) == ("ok", "redacted")
    assert json.loads(stored["result_reasons"]) == ["card number in output"]
    begun = dict(zip(COLUMNS, begin_row(call), strict=True))
    assert (begun["outcome"], begun["result_check"], begun["result_reasons"]) == (None,) * 3
    shown = row_dict({"id": 1, **stored})
    assert shown["result_reasons"] == ["card number in output"] and shown["outcome"] == "ok"


async def test_the_columns_round_trip_and_older_rows_stay_unchained(
    store_url: str, tmp_path: Path
) -> None:
    v3 = COLUMNS[: COLUMNS.index("outcome")]
    old_row = journal_row(_call("/v3"), CaptureConfig())[: len(v3)]
    marks = ", ".join("?" for _ in v3)
    insert = f"INSERT INTO handrail_journal ({', '.join(v3)}) VALUES ({marks})"
    if store_url.startswith("sqlite:"):
        conn = sqlite3.connect(journal_path(sqlite_path(store_url)), isolation_level=None)
        migrate_sqlite(conn, "journal", journal_sqlite_module.MIGRATIONS[:3], "v3")
        conn.close()
    else:
        pg = await asyncpg.connect(store_url)
        try:
            await migrate_postgres(pg, "journal", journal_postgres_module.MIGRATIONS[:3], "v3")
        finally:
            await pg.close()
    await _sql(store_url, insert, *old_row)

    call = _call("/v4")
    call.extra.update(outcome_class="tool_failure", result_check="blocked", result_reasons=["x"])
    report = await _journaled(_config(store_url, tmp_path), [call])
    assert report.intact and (report.rows, report.unchained) == (1, 1)
    code, printed = await _verify(_config(store_url, tmp_path))
    assert code == 0 and "1 older rows from before the chain" in printed
    reader = journal_from_config(_config(store_url, tmp_path), Metrics(), writer=False)
    try:
        rows = {r["path"]: r for r in await reader.query(CallQuery())}
    finally:
        await reader.close()
    assert (rows["/v4"]["outcome"], rows["/v4"]["result_check"]) == ("tool_failure", "blocked")
    assert rows["/v4"]["result_reasons"] == ["x"]
    assert (rows["/v3"]["outcome"], rows["/v3"]["result_reasons"]) == (None, [])


def test_verify_on_a_fresh_install_is_intact_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none" / "handrail.db"
    out = io.StringIO()
    code = verify_command(_config(f"sqlite:///{path}", tmp_path), out=out, as_json=False)
    assert (code, out.getvalue()) == (0, "journal intact: 0 rows in 0 chains\n")
    assert not path.parent.exists()


def test_verify_on_an_unreachable_database_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config("postgresql://nobody@127.0.0.1:1/none", tmp_path)
    assert verify_command(config, out=io.StringIO(), as_json=False) == 2
    assert "cannot read the journal" in capsys.readouterr().err


# -- the chain itself (pure) --------------------------------------------------------------------


def _linked(count: int) -> list[dict[str, Any]]:
    rows = [(f"u-{i}", *journal_row(_call(f"/p/{i}"), CaptureConfig())) for i in range(count)]
    linked, _ = link("c1", Head(), rows)
    return [
        dict(zip(("id", *INSERT_COLUMNS, *CHAIN_COLUMNS), (i + 1, *r), strict=True))
        for i, r in enumerate(linked)
    ]


def _other(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return "x" if value is None else value + "x"


def test_a_hash_covers_every_column_and_the_link() -> None:
    call = _call(query_string="a=1", idempotency_key="k")
    call.extra.update(approval_id="a", outcome_class="ok", result_check="passed")
    row = ("u-1", *journal_row(call, CaptureConfig()))
    digest = row_hash("c1", 1, GENESIS, row)
    assert digest == row_hash("c1", 1, GENESIS, row)
    changed = {
        row_hash("c2", 1, GENESIS, row),
        row_hash("c1", 2, GENESIS, row),
        row_hash("c1", 1, "1" * 64, row),
        *(
            row_hash("c1", 1, GENESIS, (*row[:i], _other(row[i]), *row[i + 1 :]))
            for i in range(len(row))
        ),
    }
    assert digest not in changed and len(changed) == len(row) + 3


def test_the_hash_reads_sqlites_integers_as_postgres_bools_and_floats() -> None:
    row = ("u-1", *journal_row(_call(), CaptureConfig()))
    as_sqlite = tuple(
        int(v) if isinstance(v, bool) else int(v) if isinstance(v, float) and v == int(v) else v
        for v in row
    )
    assert row_hash("c", 1, GENESIS, as_sqlite) == row_hash("c", 1, GENESIS, row)


def test_a_chain_entry_missing_for_rows_is_reported() -> None:
    walk = ChainWalk.over([])
    walk.feed_all(_linked(3))
    (found,) = walk.report().breaks
    assert found.kind is BreakKind.MISSING and "entry" in found.detail


def test_hashing_a_batch_costs_microseconds_a_row() -> None:
    rows = [(f"u-{i}", *journal_row(_call(f"/p/{i}"), CaptureConfig())) for i in range(2000)]
    started = time.perf_counter()
    link("c1", Head(), rows)
    per_row_us = (time.perf_counter() - started) / len(rows) * 1e6
    assert per_row_us < 100, f"hashing took {per_row_us:.1f} µs per row"


def test_a_blanked_link_is_an_altered_row_not_a_crash() -> None:
    records = _linked(3)
    records[1] = {**records[1], "seq": None}
    entry = ChainEntry("c1", 0.0, Head(3, records[2]["hash"]), Head())
    walk = ChainWalk.over([entry])
    walk.feed_all([records[1], records[0], records[2]])  # NULL sorts first
    found = walk.report().breaks
    assert [(b.kind, b.row.id if b.row else None) for b in found] == [
        (BreakKind.ALTERED, 2),
        (BreakKind.MISSING, 3),
    ]
