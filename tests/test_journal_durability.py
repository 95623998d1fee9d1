"""The journal keeps every call: through kill -9 mid-call, a PostgreSQL outage, a locked
SQLite file, and by the write-ahead spool's own rules (torn lines, rotation, live owners,
idempotent re-inserts). Real processes, real faults: nothing here mocks a database."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.call import Call, Decision
from proxy.config import CaptureConfig, JournalConfig, load_config, parse_config
from proxy.metrics import Metrics
from proxy.migrations import migrate_postgres, migrate_sqlite
from proxy.tracing import journal_from_config, journal_spool_dir
from proxy.tracing import journal_postgres as journal_postgres_module
from proxy.tracing import journal_sqlite as journal_sqlite_module
from proxy.tracing.base import COLUMNS, CallQuery, JournalDb, Where, begin_row, journal_row
from proxy.tracing.commands import calls_command
from proxy.tracing.journal import FLUSH_TIMEOUT_S, SqlJournal
from proxy.tracing.journal_postgres import PostgresJournalDb
from proxy.tracing.journal_sqlite import SqliteJournalDb
from proxy.tracing.spool import BEGIN, END, Spool, entry, take_dead
from tests.conftest import Seen
from tests.support_idempotency import REPO, pg_schema, send, start_proxy, write_config
from tests.support_relay import PostgresRelay
from tests.test_tracing import dropped, make_call

DEADLINE_S = 20.0


def _call(path: str = "/c", run: str = "r-d", **fields: Any) -> Call:
    decision = Decision(allow=True, reasons=(), decision_id="d")
    call = make_call(path=path, run_id=run, decision=decision, **fields)
    call.status = 200
    return call


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def _spooled_ends(directory: Path) -> int:
    return sum(p.read_bytes().count(b'["e",') for p in _segments(directory))


def _sqlite_config(tmp_path: Path) -> Any:
    return parse_config({"store": {"url": f"sqlite:///{tmp_path}/handrail.db"}})


async def _rows(journal: SqlJournal, run: str = "r-d") -> list[dict[str, Any]]:
    return list(reversed(await journal.query(CallQuery(run_id=run, limit=1000))))


async def _eventually(check: Callable[[], Any], deadline_s: float = DEADLINE_S) -> Any:
    """Poll an async check until it returns something truthy."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


# A journal in a process of its own, which the test kills with SIGKILL.
CHILD = """
import asyncio, json, sys
from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.tracing import journal_from_config
from proxy.call import Decision
from tests.test_tracing import make_call

async def main(options):
    config = parse_config({"store": {"url": options["url"]},
                           "tracing": {"journal": {"spool_dir": options["spool"]}}})
    journal = journal_from_config(config, Metrics())
    await journal.open()
    if options.get("max_entries"):
        journal._spool._max_entries = options["max_entries"]
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    def call(path):
        c = make_call(path=path, run_id="r-d", decision=Decision(allow=True, reasons=()))
        c.status = 200
        return c
    journal.begin(call("/in-flight"))
    for i in range(options["calls"]):
        c = call(f"/done/{i}")
        journal.begin(c)
        journal.append(c)
    if options.get("flush"):
        await journal.flush()
    print("written", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(json.loads(sys.argv[1])))
"""


@asynccontextmanager
async def journal_child(**options: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """Starts the child; the test writes a line to its stdin to make it write its calls."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        json.dumps(options),
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), DEADLINE_S)
        assert line == b"open\n", line
        yield child
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def _write_and_wait(child: asyncio.subprocess.Process) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b"go\n")
    await child.stdin.drain()
    line = await asyncio.wait_for(child.stdout.readline(), DEADLINE_S)
    assert line == b"written\n", line


# -- kill -9 ------------------------------------------------------------------------------------


async def test_a_killed_proxy_loses_no_answered_call_and_leaves_the_one_in_flight_interrupted(
    tool: tuple[Any, Seen], policy_dir: Path, tmp_path: Path
) -> None:
    server, seen = tool
    raw = {
        "tools": {"crm": {"upstream": str(server.make_url("/api")), "timeout_s": 30}},
        "policy": {"path": str(policy_dir), "watch": False},
        "store": {"url": f"sqlite:///{tmp_path}/handrail.db"},
    }
    config_path = write_config(tmp_path / "handrail.yaml", raw)
    config = load_config(config_path)
    spool = journal_spool_dir(config)
    assert spool is not None
    headers = {"X-Run-Id": "run-k", "X-Agent-Id": "bot"}
    doomed = await start_proxy(config_path)
    try:
        async with aiohttp.ClientSession() as session:
            slow_url = doomed.tool_url("crm", "/slow?sleep=10")
            slow = asyncio.ensure_future(send(session, "GET", slow_url, headers=headers))
            while seen.count() == 0:  # the tool is working on it
                await asyncio.sleep(0.01)
            for i in range(5):
                answer = await send(
                    session, "GET", doomed.tool_url("crm", f"/fast/{i}"), headers=headers
                )
                assert answer.status == 200
            # The pipeline records a call once its key is settled, a store write after the
            # answer: kill as soon as the last call's end is spooled, well before the
            # writer's next batch, and before the tool answers the slow call.
            while _spooled_ends(spool) < 5:
                await asyncio.sleep(0.001)
            doomed.kill()
            with pytest.raises(aiohttp.ClientError):
                await slow
    finally:
        await doomed.stop()
    assert len(_segments(spool)) == 1
    with sqlite3.connect(tmp_path / "handrail-journal.db") as db:
        before = [row[0] for row in db.execute("SELECT path FROM handrail_journal")]
    assert "/slow" not in before  # (and, most often, a few answered calls are not either)

    survivor = await start_proxy(config_path)
    try:

        async def listed() -> list[dict[str, Any]]:
            out = io.StringIO()
            kwargs: dict[str, Any] = {"tool": None, "decision": None, "since": None, "limit": 50}
            await asyncio.to_thread(
                calls_command, config, run="run-k", as_json=True, out=out, **kwargs
            )
            rows: list[dict[str, Any]] = json.loads(out.getvalue())
            return rows if len(rows) >= 6 else []

        rows = await _eventually(listed)
        assert sorted((r["path"], r["status"], r["error"]) for r in rows) == [
            *[(f"/fast/{i}", 200, None) for i in range(5)],
            ("/slow", None, "interrupted"),
        ]
        (slow_row,) = [r for r in rows if r["path"] == "/slow"]
        assert slow_row["decision"] == "allow" and slow_row["agent"] == "bot"
        assert [p.name.split("-")[0] for p in _segments(spool)] == [str(survivor.process.pid)]
    finally:
        await survivor.stop()
    assert _segments(spool) == []  # a clean stop leaves nothing to recover


async def test_rotation_carries_the_begins_of_calls_in_flight(tmp_path: Path) -> None:
    config = _sqlite_config(tmp_path)
    spool = tmp_path / "handrail-journal.spool"
    url = config.store.url
    async with journal_child(
        url=url, spool=str(spool), max_entries=4, calls=12, flush=True
    ) as child:
        await _write_and_wait(child)
        child.kill()
    dead = _segments(spool)
    assert len(dead) == 1  # the committed segments went, the newest holds the begin in flight
    assert b'"/in-flight"' in dead[0].read_bytes()

    metrics = Metrics()
    journal = journal_from_config(config, metrics)
    await journal.open()
    try:
        await journal.flush()
        rows = await _rows(journal)
    finally:
        await journal.close()
    assert sorted((r["path"], r["error"]) for r in rows) == sorted(
        [*((f"/done/{i}", None) for i in range(12)), ("/in-flight", "interrupted")]
    )
    assert _sample(metrics, "handrail_journal_recovered_total") == 1


async def test_a_live_proxys_spool_is_left_to_it(tmp_path: Path) -> None:
    config = _sqlite_config(tmp_path)
    spool = tmp_path / "handrail-journal.spool"
    async with journal_child(url=config.store.url, spool=str(spool), calls=0) as child:
        await _write_and_wait(child)  # its begin is in its spool; it is alive and holds the lock
        journal = journal_from_config(config, Metrics())
        await journal.open()
        try:
            await journal.flush()
            assert await _rows(journal) == []
            child.kill()
            await child.wait()
            await journal._recover_dead()  # what the writer does every RECOVER_EVERY_S
            assert [(r["path"], r["error"]) for r in await _rows(journal)] == [
                ("/in-flight", "interrupted")
            ]
        finally:
            await journal.close()


async def test_a_torn_last_line_is_skipped_and_counted_as_lost(tmp_path: Path) -> None:
    db = SqliteJournalDb(tmp_path / "handrail.db")
    await db.open(create=True)
    journal_id = await db.identity()
    await db.close()
    spool_dir = tmp_path / "handrail-journal.spool"
    dead = Spool(spool_dir, journal_id, lambda: ())
    dead.open()
    done, cut = _call("/done"), _call("/cut")
    dead.write(entry(END, "u-done", journal_row(done, CaptureConfig())))
    dead.write(entry(BEGIN, "u-cut", begin_row(cut)))
    line = entry(END, "u-cut", journal_row(cut, CaptureConfig()))
    dead.write(line[: len(line) // 2])  # the write kill -9 interrupted
    dead.close(calls_in_flight=True)  # the owner is gone: its lock with it

    metrics = Metrics()
    journal = journal_from_config(_sqlite_config(tmp_path), metrics)
    await journal.open()
    try:
        await journal.flush()
        rows = await _rows(journal)
    finally:
        await journal.close()
    assert [(r["path"], r["status"], r["error"]) for r in rows] == [
        ("/done", 200, None),
        ("/cut", None, "interrupted"),
    ]
    assert dropped(metrics, "journal") == 1
    assert _sample(metrics, "handrail_journal_recovered_total") == 2
    assert _segments(spool_dir) == []


def test_dead_segments_of_another_journal_are_not_taken(tmp_path: Path) -> None:
    other = Spool(tmp_path, "another-journal", lambda: ())
    other.open()
    other.write(entry(BEGIN, "u-1", begin_row(_call())))
    other.close(calls_in_flight=True)
    dead = take_dead(tmp_path, "this-journal", owner="me")
    assert dead is not None and dead.rows == [] and dead.held == []
    dead.release(delete=True)
    assert len(_segments(tmp_path)) == 1


async def test_a_call_the_spool_cannot_take_still_reaches_the_database(tmp_path: Path) -> None:
    metrics = Metrics()
    journal = journal_from_config(_sqlite_config(tmp_path), metrics)
    await journal.open()
    try:
        assert journal._spool is not None and journal._spool.current is not None
        full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        os.dup2(full, journal._spool.current.fd)
        os.close(full)
        for i in range(3):  # the first is refused by the spool, the next go to a new segment
            call = _call(f"/c/{i}")
            journal.begin(call)
            journal.append(call)
        await journal.flush()
        assert [r["path"] for r in await _rows(journal)] == ["/c/0", "/c/1", "/c/2"]
        assert dropped(metrics, "journal") == 0
        (segment,) = _segments(tmp_path / "handrail-journal.spool")  # the sealed one is gone
        assert segment.name.endswith("-000002.jsonl")
    finally:
        await journal.close()


# -- store outages ------------------------------------------------------------------------------


async def test_rows_wait_out_a_locked_sqlite_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_sqlite_module, "BUSY_TIMEOUT_MS", 100)
    metrics = Metrics()
    journal = journal_from_config(_sqlite_config(tmp_path), metrics)
    await journal.open()
    try:
        blocker = sqlite3.connect(tmp_path / "handrail-journal.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for i in range(10):
                journal.append(_call(f"/locked/{i}"))

            async def retried() -> bool:
                return _sample(metrics, "handrail_journal_write_retries_total") >= 2

            assert await _eventually(retried)
            assert blocker.execute("SELECT count(*) FROM handrail_journal").fetchone()[0] == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await journal.flush()
        assert len(await _rows(journal)) == 10
        assert dropped(metrics, "journal") == 0
    finally:
        await journal.close()


class _Relay(PostgresRelay):
    """The test relay, which can come back on the port it had."""

    async def restart(self, port: int) -> None:
        self.writers = []
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", port)


async def _pg_count(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM handrail_journal"))
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_calls_made_while_postgres_is_away_arrive_when_it_returns(tmp_path: Path) -> None:
    async with pg_schema() as url:
        relay = _Relay()
        port = await relay.start()
        metrics = Metrics()
        db = PostgresJournalDb(url.replace("127.0.0.1:5432", f"127.0.0.1:{port}"))
        spool = tmp_path / "spool"
        journal = SqlJournal(
            db, CaptureConfig(), JournalConfig(), metrics, spool_dir=spool, queue_size=20
        )
        await journal.open()
        try:
            for i in range(10):
                call = _call(f"/before/{i}")
                journal.begin(call)
                journal.append(call)
            await journal.flush()
            await relay.stop()
            for i in range(60):  # calls keep coming: more than the memory queue holds
                call = _call(f"/away/{i}")
                journal.begin(call)
                journal.append(call)
                await asyncio.sleep(0.005)
            started = time.monotonic()
            await journal.flush()  # gives up waiting, rows still pending
            assert time.monotonic() - started < FLUSH_TIMEOUT_S + 1
            assert await _pg_count(url) == 10

            await relay.restart(port)

            async def arrived() -> bool:
                return await _pg_count(url) == 70

            assert await _eventually(arrived)
            assert dropped(metrics, "journal") == 0
            assert _sample(metrics, "handrail_journal_write_retries_total") >= 1
            assert _sample(metrics, "handrail_journal_recovered_total") > 0  # read back
        finally:
            await journal.close()
            await relay.stop()
        assert _segments(spool) == []


@pytest.mark.postgres
async def test_a_proxy_killed_while_postgres_is_away_loses_nothing(tmp_path: Path) -> None:
    async with pg_schema() as url:
        relay = _Relay()
        port = await relay.start()
        spool = tmp_path / "spool"
        relayed = url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
        async with journal_child(url=relayed, spool=str(spool), calls=20) as child:
            await relay.stop()
            await _write_and_wait(child)
            child.kill()
        assert await _pg_count(url) == 0

        metrics = Metrics()
        config = parse_config(
            {"store": {"url": url}, "tracing": {"journal": {"spool_dir": str(spool)}}}
        )
        journal = journal_from_config(config, metrics)
        await journal.open()
        try:
            await journal.flush()
            rows = await _rows(journal)
        finally:
            await journal.close()
        assert sorted((r["path"], r["error"]) for r in rows) == sorted(
            [*((f"/done/{i}", None) for i in range(20)), ("/in-flight", "interrupted")]
        )
        assert _sample(metrics, "handrail_journal_recovered_total") == 21
        assert dropped(metrics, "journal") == 0


# -- the database's part ------------------------------------------------------------------------


@asynccontextmanager
async def _journal_db(kind: str, tmp_path: Path) -> AsyncIterator[tuple[JournalDb, str]]:
    """An opened backend and the store URL it lives in."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/handrail.db"
        db: JournalDb = SqliteJournalDb(tmp_path / "handrail.db")
        await db.open(create=True)
        try:
            yield db, url
        finally:
            await db.close()
        return
    async with pg_schema() as url:
        db = PostgresJournalDb(url)
        await db.open(create=True)
        try:
            yield db, url
        finally:
            await db.close()


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_inserting_a_row_again_changes_nothing(kind: str, tmp_path: Path) -> None:
    first = ("u-1", *journal_row(_call("/first"), CaptureConfig()))
    second = ("u-2", *journal_row(_call("/second"), CaptureConfig()))
    async with _journal_db(kind, tmp_path) as (db, _):
        await db.insert([first])
        await db.insert([first, second])  # what recovery does after a crash mid-batch
        await db.insert([second])
        rows = await db.select(Where.of(CallQuery()))
    assert sorted(r["path"] for r in rows) == ["/first", "/second"]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_row_the_database_refuses_is_dropped_alone(kind: str, tmp_path: Path) -> None:
    async with _journal_db(kind, tmp_path) as (_, url):
        metrics = Metrics()
        config = parse_config(
            {"store": {"url": url}, "tracing": {"journal": {"spool_dir": str(tmp_path / "s")}}}
        )
        journal = journal_from_config(config, metrics)
        await journal.open()
        try:
            for i in range(3):
                journal.append(_call(f"/good/{i}"))
            journal.append(_call("/bad", tool_name=None))  # NOT NULL: no retry can help
            await journal.flush()
            rows = await _rows(journal)
        finally:
            await journal.close()
    assert sorted(r["path"] for r in rows) == ["/good/0", "/good/1", "/good/2"]
    assert dropped(metrics, "journal") == 1
    assert _sample(metrics, "handrail_journal_write_retries_total") == 0


async def test_close_leaves_no_spool_once_everything_is_written(tmp_path: Path) -> None:
    journal = journal_from_config(_sqlite_config(tmp_path), Metrics())
    await journal.open()
    spool = tmp_path / "handrail-journal.spool"
    for i in range(5):
        call = _call(f"/c/{i}")
        journal.begin(call)
        journal.append(call)
    assert len(_segments(spool)) == 1
    await journal.close()
    assert _segments(spool) == []
    assert os.listdir(spool) == ["recovery.lock"]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_version_1_journal_keeps_its_rows_through_the_uid_migration(
    kind: str, tmp_path: Path
) -> None:
    v1 = COLUMNS[: COLUMNS.index("approval_id")]  # the columns version 1 had
    old_row = journal_row(_call("/old"), CaptureConfig())[: len(v1)]
    columns = ", ".join(v1)
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/handrail.db"
        conn = sqlite3.connect(tmp_path / "handrail-journal.db", isolation_level=None)
        migrate_sqlite(conn, "journal", journal_sqlite_module.MIGRATIONS[:1], "v1")
        marks = ", ".join("?" for _ in v1)
        conn.execute(f"INSERT INTO handrail_journal ({columns}) VALUES ({marks})", old_row)
        conn.close()
        await _migrate_and_write(url, tmp_path)
        return
    async with pg_schema() as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate_postgres(conn, "journal", journal_postgres_module.MIGRATIONS[:1], "v1")
            marks = ", ".join(f"${i}" for i in range(1, len(v1) + 1))
            await conn.execute(
                f"INSERT INTO handrail_journal ({columns}) VALUES ({marks})", *old_row
            )
        finally:
            await conn.close()
        await _migrate_and_write(url, tmp_path)


async def _migrate_and_write(url: str, tmp_path: Path) -> None:
    config = parse_config(
        {"store": {"url": url}, "tracing": {"journal": {"spool_dir": str(tmp_path / "s")}}}
    )
    journal = journal_from_config(config, Metrics())
    await journal.open()
    try:
        call = _call("/new")
        journal.begin(call)
        journal.append(call)
        await journal.flush()
        assert sorted(r["path"] for r in await _rows(journal)) == ["/new", "/old"]
    finally:
        await journal.close()


@pytest.mark.parametrize(
    ("store", "configured", "spool"),
    [
        ("sqlite:///state/handrail.db", None, "state/handrail-journal.spool"),
        ("sqlite:///state/handrail.db", "/var/spool/h", "/var/spool/h"),
        ("sqlite:///:memory:", "/var/spool/h", None),
        ("postgresql://h@db/handrail", None, ".handrail/journal-spool"),
        ("postgresql://h@db/handrail", "/var/spool/h", "/var/spool/h"),
    ],
)
def test_the_spool_lives_beside_the_journal_unless_configured(
    store: str, configured: str | None, spool: str | None
) -> None:
    journal: dict[str, Any] = {"spool_dir": configured} if configured else {}
    config = parse_config({"store": {"url": store}, "tracing": {"journal": journal}})
    found = journal_spool_dir(config)
    assert (str(found) if found is not None else None) == spool
