"""The store's contract, run against every backend: SQLite files and the local PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from proxy.call import Claim, ClaimState, RunCounters, StoredResponse
from proxy.config import StoreConfig
from proxy.errors import StoreUnavailable
from proxy.store import purge_loop, store_from_config
from proxy.store.base import Store
from proxy.store.postgres import PostgresStore
from proxy.store.records import Next, Record, read_claim
from proxy.store.sqlite import SqliteStore
from tests.support_relay import PostgresRelay

T = TypeVar("T")
PG_URL = os.environ.get("HANDRAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
LEASE = 30.0
TTL = 600.0
OK = StoredResponse(
    status=201,
    headers=(("content-type", "application/json"), ("x-thing", "a"), ("x-thing", "b")),
    body=b'{"id": 42, "bytes": "\\u00e9"}\x00\xff',
)


def _dsn(schema: str) -> str:
    return f"{PG_URL}?search_path={schema}"


async def _pg_execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_aside(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a loop of its own (sync fixtures, inside a test's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class PgSchemas:
    """Fresh schemas on the local server, all dropped when the module is done."""

    def __init__(self) -> None:
        self.prefix = f"handrail_store_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []

    async def new(self) -> str:
        schema = f"{self.prefix}_{len(self.created)}"
        await _pg_execute(PG_URL, f"CREATE SCHEMA {schema}")
        self.created.append(schema)
        return _dsn(schema)


@pytest.fixture(scope="module")
def pg_schemas() -> Iterator[PgSchemas]:
    schemas = PgSchemas()
    try:
        _run_aside(_pg_execute(PG_URL, "SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {PG_URL} is not reachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield schemas

    async def drop() -> None:
        for schema in schemas.created:
            await _pg_execute(PG_URL, f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    _run_aside(drop())


@pytest.fixture(scope="module")
def pg_dsn(pg_schemas: PgSchemas) -> str:
    """One schema for the module's tests (each test uses its own keys and run ids)."""
    return _run_aside(pg_schemas.new())


class Backend:
    """Opens stores of one kind; ``fresh()`` gives a location no other test has touched."""

    def __init__(self, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.request = request
        self.opened: list[Store] = []
        self.default = str(tmp_path / "handrail.db") if name == "sqlite" else self._pg("pg_dsn")

    def _pg(self, fixture: str) -> Any:
        return self.request.getfixturevalue(fixture)

    async def fresh(self) -> str:
        if self.name == "sqlite":
            return str(self.tmp_path / f"fresh-{uuid.uuid4().hex}" / "handrail.db")
        schemas: PgSchemas = self._pg("pg_schemas")
        return await schemas.new()

    def build(self, location: str | None = None, **options: Any) -> Store:
        location = location or self.default
        if self.name == "sqlite":
            return SqliteStore(location, **options)
        return PostgresStore(location, **options)

    async def open(self, location: str | None = None, **options: Any) -> Store:
        store = self.build(location, **options)
        await store.open()
        self.opened.append(store)
        return store

    async def execute(self, location: str, sql: str) -> None:
        """Run SQL on a connection of its own, behind the stores' backs."""
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(location, isolation_level=None)) as conn:
                conn.executescript(sql)
        else:
            await _pg_execute(location, sql)

    def unreachable(self) -> Store:
        if self.name == "sqlite":
            blocker = self.tmp_path / "not-a-directory"
            blocker.write_text("a file where the database's directory should be")
            return SqliteStore(blocker / "handrail.db")
        return PostgresStore(
            f"postgresql://postgres@127.0.0.1:{_closed_port()}/test", timeout_s=2.0
        )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = Backend(request.param, tmp_path, request)
    yield backend
    for store in backend.opened:
        await store.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def _claim(
    store: Store, key: str, fingerprint: str = "fp-1", *, takeover: bool = False, **times: float
) -> Any:
    return await store.claim(
        "crm",
        key,
        fingerprint,
        lease_s=times.get("lease_s", LEASE),
        ttl_s=times.get("ttl_s", TTL),
        takeover=takeover,
    )


# Claims


async def test_first_claim_owns_the_key(store: Store) -> None:
    claim = await _claim(store, _key())
    assert claim.state is ClaimState.OWNED
    assert claim.owner
    assert claim.response is None


async def test_same_key_on_another_tool_is_a_separate_record(store: Store) -> None:
    key = _key()
    await _claim(store, key)
    other = await store.claim("billing", key, "fp-1", lease_s=LEASE, ttl_s=TTL)
    assert other.state is ClaimState.OWNED


async def test_storm_of_identical_claims_gives_exactly_one_owner(store: Store) -> None:
    key = _key()
    claims = await asyncio.gather(*(_claim(store, key) for _ in range(50)))
    states = [c.state for c in claims]
    assert states.count(ClaimState.OWNED) == 1
    assert states.count(ClaimState.IN_FLIGHT) == 49


async def test_two_replicas_racing_give_exactly_one_owner(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    key = _key()
    claims = await asyncio.gather(*(_claim(s, key) for _ in range(25) for s in (first, second)))
    states = [c.state for c in claims]
    assert states.count(ClaimState.OWNED) == 1
    assert states.count(ClaimState.IN_FLIGHT) == 49


async def test_completed_key_replays_the_stored_response(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    await store.complete("crm", key, claim.owner, OK)
    again = await _claim(store, key)
    assert again.state is ClaimState.COMPLETED
    assert again.response == OK


async def test_incomplete_response_round_trips_as_not_replayable(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    too_large = StoredResponse(200, (("content-type", "text/plain"),), b"", complete=False)
    await store.complete("crm", key, claim.owner, too_large)
    again = await _claim(store, key)
    assert again.state is ClaimState.COMPLETED
    assert again.response == too_large
    assert again.response is not None and again.response.complete is False


async def test_other_payload_is_a_mismatch_while_in_flight(store: Store) -> None:
    key = _key()
    await _claim(store, key, "fp-1")
    assert (await _claim(store, key, "fp-2")).state is ClaimState.MISMATCH


async def test_other_payload_is_a_mismatch_after_completion(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key, "fp-1")
    await store.complete("crm", key, claim.owner, OK)
    mismatch = await _claim(store, key, "fp-2")
    assert mismatch.state is ClaimState.MISMATCH
    assert mismatch.response is None


async def test_released_key_is_owned_by_the_next_claim(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    await store.release("crm", key, claim.owner)
    again = await _claim(store, key)
    assert again.state is ClaimState.OWNED
    assert again.owner != claim.owner


async def test_expired_lease_makes_the_key_unknown_not_free(store: Store) -> None:
    key = _key()
    await _claim(store, key, lease_s=0.5)
    assert (await _claim(store, key)).state is ClaimState.IN_FLIGHT
    await asyncio.sleep(0.6)
    first = await _claim(store, key)
    again = await _claim(store, key)
    assert first.state is ClaimState.UNKNOWN and first.reason == "lease_expired"
    assert again.state is ClaimState.UNKNOWN and again.reason == "lease_expired"
    assert (await _claim(store, key, "fp-other")).state is ClaimState.MISMATCH


async def test_expired_lease_is_taken_over_where_the_tool_dedupes(store: Store) -> None:
    key = _key()
    crashed = await _claim(store, key, lease_s=0.3)
    assert (await _claim(store, key, takeover=True)).state is ClaimState.IN_FLIGHT
    await asyncio.sleep(0.4)
    taken = await _claim(store, key, takeover=True)
    assert taken.state is ClaimState.OWNED and taken.resent
    assert taken.owner != crashed.owner
    assert (await _claim(store, key, "fp-other", takeover=True)).state is ClaimState.MISMATCH


async def test_a_fresh_claim_is_not_resent(store: Store) -> None:
    assert not (await _claim(store, _key(), takeover=True)).resent


async def test_owner_settles_its_own_unknown_record_late(store: Store) -> None:
    key = _key()
    slow = await _claim(store, key, lease_s=0.2)
    await asyncio.sleep(0.3)
    assert (await _claim(store, key)).state is ClaimState.UNKNOWN
    assert await store.complete("crm", key, slow.owner, OK)
    assert (await _claim(store, key)).response == OK


async def test_old_owner_cannot_complete_a_taken_over_key(store: Store) -> None:
    key = _key()
    crashed = await _claim(store, key, lease_s=0.2)
    await asyncio.sleep(0.3)
    taken = await _claim(store, key, takeover=True)
    assert not await store.complete("crm", key, crashed.owner, StoredResponse(200, (), b"stale"))
    assert (await _claim(store, key)).state is ClaimState.IN_FLIGHT
    assert await store.complete("crm", key, taken.owner, OK)
    assert (await _claim(store, key)).response == OK


async def test_old_owner_cannot_release_a_taken_over_key(store: Store) -> None:
    key = _key()
    crashed = await _claim(store, key, lease_s=0.2)
    await asyncio.sleep(0.3)
    await _claim(store, key, takeover=True)
    assert not await store.release("crm", key, crashed.owner)
    assert (await _claim(store, key)).state is ClaimState.IN_FLIGHT


async def test_marked_unknown_key_refuses_retries_with_its_reason(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    assert await store.mark_unknown("crm", key, claim.owner, "timeout")
    answer = await _claim(store, key)
    assert answer.state is ClaimState.UNKNOWN and answer.reason == "timeout"
    assert not await store.mark_unknown("crm", key, "someone-else", "timeout")


async def test_extended_lease_keeps_the_key_in_flight(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key, lease_s=0.3)
    await asyncio.sleep(0.2)
    assert await store.extend("crm", key, claim.owner, 0.5)
    await asyncio.sleep(0.2)
    assert (await _claim(store, key)).state is ClaimState.IN_FLIGHT


async def test_unknown_key_resolved_as_failed_runs_again(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    await store.mark_unknown("crm", key, claim.owner, "timeout")
    listed = [(r.tool, r.key, r.reason) for r in await store.unknown_keys(1000)]
    assert ("crm", key, "timeout") in listed
    assert await store.resolve("crm", key, None) == "unknown"
    assert (await _claim(store, key)).state is ClaimState.OWNED
    assert ("crm", key, "timeout") not in [
        (r.tool, r.key, r.reason) for r in await store.unknown_keys(1000)
    ]


async def test_unknown_key_resolved_with_an_answer_replays_it(store: Store) -> None:
    key = _key()
    await _claim(store, key, lease_s=0.1)
    await asyncio.sleep(0.2)  # its proxy died: in flight past the lease, resolvable as it is
    record = await store.inspect("crm", key)
    assert record is not None and record.state == "unknown" and record.reason == "lease_expired"
    assert await store.resolve("crm", key, OK) == "unknown"
    assert (await _claim(store, key)).response == OK


async def test_only_unknown_keys_can_be_resolved(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    assert await store.resolve("crm", key, None) == "in_flight"
    await store.complete("crm", key, claim.owner, OK)
    assert await store.resolve("crm", key, StoredResponse(500, (), b"no")) == "completed"
    assert (await _claim(store, key)).response == OK
    assert await store.resolve("crm", _key(), None) is None


async def test_unknown_record_expires_after_its_ttl(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key, ttl_s=0.3)
    await store.mark_unknown("crm", key, claim.owner, "timeout")
    await asyncio.sleep(0.4)
    assert (await _claim(store, key)).state is ClaimState.OWNED


async def test_owner_cannot_complete_a_key_twice(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key)
    await store.complete("crm", key, claim.owner, OK)
    await store.complete("crm", key, claim.owner, StoredResponse(500, (), b"late"))
    await store.release("crm", key, claim.owner)
    assert (await _claim(store, key)).response == OK


async def test_expired_record_is_claimed_afresh(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key, lease_s=0.1, ttl_s=0.5)
    await store.complete("crm", key, claim.owner, OK)
    assert (await _claim(store, key)).state is ClaimState.COMPLETED
    await asyncio.sleep(0.6)
    again = await _claim(store, key, "fp-other")
    assert again.state is ClaimState.OWNED


async def test_keep_s_shortens_a_completed_records_life(store: Store) -> None:
    """A derived key's window: the record replays for ``keep_s`` after it completed, then a
    new claim of the same key owns it (a deliberate repeat runs)."""
    short, long = _key(), _key()
    claim = await _claim(store, short, ttl_s=3600)
    assert await store.complete("crm", short, claim.owner, OK, keep_s=0.3)
    claim = await _claim(store, long, ttl_s=3600)
    assert await store.complete("crm", long, claim.owner, OK)
    assert (await _claim(store, short)).state is ClaimState.COMPLETED
    await asyncio.sleep(0.5)
    assert (await _claim(store, short)).state is ClaimState.OWNED
    assert (await _claim(store, long)).state is ClaimState.COMPLETED


async def test_purge_deletes_expired_records_only(store: Store) -> None:
    expiring, kept = _key(), _key()
    claim = await _claim(store, expiring, lease_s=0.1, ttl_s=0.2)
    await store.complete("crm", expiring, claim.owner, OK)
    claim = await _claim(store, kept)
    await store.complete("crm", kept, claim.owner, OK)
    await asyncio.sleep(0.3)
    assert await store.purge_expired() >= 1
    assert await store.purge_expired() == 0
    assert (await _claim(store, kept)).response == OK


async def test_purge_loop_purges_in_the_background(store: Store) -> None:
    key = _key()
    claim = await _claim(store, key, lease_s=0.1, ttl_s=0.1)
    await store.complete("crm", key, claim.owner, OK)
    await asyncio.sleep(0.2)
    task = asyncio.create_task(purge_loop(store, interval_s=0.05))
    await asyncio.sleep(0.2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await store.purge_expired() == 0


# Run counters


async def test_unknown_run_has_zero_counters(store: Store) -> None:
    assert await store.run_counters(f"run-{uuid.uuid4()}", "fp") == RunCounters()


async def test_reserve_and_refund_count_calls_writes_and_denied(store: Store) -> None:
    run = f"run-{uuid.uuid4()}"
    await store.reserve_call(run, "a", write=True)
    await store.reserve_call(run, "b", write=True)
    await store.refund_call(run, write=True)  # "b" was refused: its write back, one denied
    await store.reserve_call(run, "c", write=False)
    counters = await store.run_counters(run, "d")
    assert counters == RunCounters(calls=3, writes=1, denied=1, repeats=0)


async def test_repeats_count_earlier_identical_calls_in_the_same_run_only(store: Store) -> None:
    run, other_run = f"run-{uuid.uuid4()}", f"run-{uuid.uuid4()}"
    for _ in range(3):
        await store.reserve_call(run, "same", write=True)
    await store.reserve_call(run, "different", write=True)
    await store.reserve_call(other_run, "same", write=True)
    assert (await store.run_counters(run, "same")).repeats == 3
    assert (await store.run_counters(run, "different")).repeats == 1
    assert (await store.run_counters(other_run, "same")).repeats == 1
    assert (await store.run_counters(run, "new")).repeats == 0


async def test_concurrent_reserves_lose_no_update(store: Store) -> None:
    run = f"run-{uuid.uuid4()}"
    await asyncio.gather(*(store.reserve_call(run, "same", write=True) for _ in range(40)))
    assert await store.run_counters(run, "same") == RunCounters(40, 40, 0, 40)


async def test_a_reservation_returns_the_counts_before_the_call(store: Store) -> None:
    run = f"run-{uuid.uuid4()}"
    seen = [await store.reserve_call(run, "same", write=True) for _ in range(3)]
    seen.append(await store.reserve_call(run, "other", write=False))
    assert seen == [
        RunCounters(0, 0, 0, 0),
        RunCounters(1, 1, 0, 1),
        RunCounters(2, 2, 0, 2),
        RunCounters(3, 3, 0, 0),
    ]


async def test_parallel_reservations_each_see_the_ones_before_them(store: Store) -> None:
    run = f"run-{uuid.uuid4()}"
    seen = await asyncio.gather(*(store.reserve_call(run, "same", write=True) for _ in range(40)))
    assert sorted(c.writes for c in seen) == list(range(40))  # no two saw the same count
    assert sorted(c.repeats for c in seen) == list(range(40))


async def test_idle_runs_are_purged(backend: Backend) -> None:
    store = await backend.open(run_ttl_s=0.2)
    run = f"run-{uuid.uuid4()}"
    await store.reserve_call(run, "same", write=True)
    await asyncio.sleep(0.3)
    await store.purge_expired()
    assert await store.run_counters(run, "same") == RunCounters()


# Durability and schema


async def test_records_and_counters_survive_a_restart(backend: Backend) -> None:
    store = await backend.open()
    key, run = _key(), f"run-{uuid.uuid4()}"
    claim = await _claim(store, key)
    await store.complete("crm", key, claim.owner, OK)
    await store.reserve_call(run, "same", write=True)
    await store.close()

    restarted = await backend.open()
    assert (await _claim(restarted, key)).response == OK
    assert await restarted.run_counters(run, "same") == RunCounters(1, 1, 0, 1)


async def test_schema_version_is_recorded_beside_other_components(backend: Backend) -> None:
    location = await backend.fresh()
    store = await backend.open(location)
    await backend.execute(
        location, "INSERT INTO handrail_schema (component, version) VALUES ('journal', 7)"
    )
    await store.close()
    await backend.open(location)
    rows = await _schema_rows(backend, location)
    assert rows == {"journal": 7, "store": 3}


async def test_replicas_starting_together_migrate_once(backend: Backend) -> None:
    location = await backend.fresh()
    stores = await asyncio.gather(*(backend.open(location) for _ in range(3)))
    assert (await _claim(stores[0], "k")).state is ClaimState.OWNED
    assert (await _claim(stores[2], "k")).state is ClaimState.IN_FLIGHT
    assert await _schema_rows(backend, location) == {"store": 3}


async def _schema_rows(backend: Backend, location: str) -> dict[str, int]:
    if backend.name == "sqlite":
        with contextlib.closing(sqlite3.connect(location)) as conn:
            return dict(conn.execute("SELECT component, version FROM handrail_schema"))
    conn = await asyncpg.connect(location)
    try:
        return dict(await conn.fetch("SELECT component, version FROM handrail_schema"))
    finally:
        await conn.close()


# Failing closed


def _every_method(store: Store) -> list[Callable[[], Awaitable[Any]]]:
    return [
        store.ping,
        lambda: _claim(store, "k"),
        lambda: store.complete("crm", "k", "owner", OK),
        lambda: store.release("crm", "k", "owner"),
        lambda: store.mark_unknown("crm", "k", "owner", "timeout"),
        lambda: store.extend("crm", "k", "owner", 1.0),
        lambda: store.inspect("crm", "k"),
        lambda: store.unknown_keys(10),
        lambda: store.resolve("crm", "k", None),
        store.purge_expired,
        lambda: store.run_counters("run", "fp"),
        lambda: store.reserve_call("run", "fp", write=True),
    ]


async def test_unreachable_store_is_unavailable(backend: Backend) -> None:
    store = backend.unreachable()
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_every_method_fails_closed_on_driver_errors(backend: Backend) -> None:
    location = await backend.fresh()
    store = await backend.open(location)
    await store.ping()
    await backend.execute(
        location,
        "DROP TABLE handrail_schema; DROP TABLE handrail_idempotency; "
        "DROP TABLE handrail_runs; DROP TABLE handrail_run_calls; DROP TABLE handrail_health;",
    )
    for method in _every_method(store):
        with pytest.raises(StoreUnavailable):
            await method()


async def test_closed_store_is_unavailable(store: Store) -> None:
    await store.close()
    for method in _every_method(store):
        with pytest.raises(StoreUnavailable):
            await method()


@pytest.mark.postgres
async def test_postgres_that_goes_away_is_unavailable(pg_dsn: str) -> None:
    relay = PostgresRelay()
    port = await relay.start()
    store = PostgresStore(pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{port}"), timeout_s=2.0)
    await store.open()
    try:
        await store.ping()
        await relay.stop()
        for method in _every_method(store):
            with pytest.raises(StoreUnavailable):
                await method()
    finally:
        await store.close()


# SQLite on the event loop: a locked or busy database never stalls the loop


class LoopLag:
    """A ticker on the loop: the longest it was kept from running past its tick."""

    TICK_S = 0.002

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.TICK_S)
            self.worst_s = max(self.worst_s, time.perf_counter() - before - self.TICK_S)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the block ends."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")


async def test_sqlite_write_waits_for_a_held_lock_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handrail.db"
    store = SqliteStore(path, busy_timeout_ms=3000)
    await store.open()
    run = f"run-{uuid.uuid4()}"
    try:
        with _write_lock_held(path) as other:
            # Held for 0.3 s: a loop blocked on the lock would stall that long; a busy
            # shared machine stalls it for tens of ms anyway, hence the 0.15 s bound.
            asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
            async with LoopLag() as lag:
                started = time.monotonic()
                await store.reserve_call(run, "fp", write=True)
                waited = time.monotonic() - started
            other.execute("BEGIN")  # for the block's closing ROLLBACK
        assert waited >= 0.25
        assert lag.worst_s < 0.05, f"the loop stalled for {lag.worst_s * 1000:.0f} ms"
        assert await store.run_counters(run, "fp") == RunCounters(1, 1, 0, 1)
    finally:
        await store.close()


async def test_sqlite_lock_held_past_the_bound_is_unavailable_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handrail.db"
    store = SqliteStore(path, busy_timeout_ms=300)
    await store.open()
    try:
        with _write_lock_held(path):
            async with LoopLag() as lag:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="locked"):
                    await _claim(store, _key())
                waited = time.monotonic() - started
        assert 0.25 <= waited < 1.0
        assert lag.worst_s < 0.05, f"the loop stalled for {lag.worst_s * 1000:.0f} ms"
    finally:
        await store.close()


async def test_sqlite_reads_go_on_while_another_connection_writes(tmp_path: Path) -> None:
    path = tmp_path / "handrail.db"
    store = SqliteStore(path, busy_timeout_ms=0)
    await store.open()
    try:
        with _write_lock_held(path):
            assert await store.run_counters("run", "fp") == RunCounters()
    finally:
        await store.close()


async def _concurrent_calls(store: SqliteStore, keys: list[str], run: str) -> list[Any]:
    """Each key a call: counted, claimed and completed, all calls at once (as under load)."""

    async def call(key: str) -> Any:
        await store.reserve_call(run, key, write=True)
        claim = await _claim(store, key)
        await asyncio.sleep(0)  # the tool's answer arrives in a later turn of the loop
        await store.complete("crm", key, claim.owner, OK)
        return claim

    return await asyncio.gather(*(call(key) for key in keys))


async def test_sqlite_statements_of_concurrent_calls_are_committed_before_they_answer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handrail.db"
    store = SqliteStore(path)
    await store.open()
    keys = [_key() for _ in range(64)]
    try:
        claims = await _concurrent_calls(store, keys, "run-a")
        assert all(c.state is ClaimState.OWNED for c in claims)
        # What each call was told is on disk for any other connection (another replica).
        with contextlib.closing(sqlite3.connect(path)) as other:
            rows = dict(other.execute("SELECT key, state FROM handrail_idempotency").fetchall())
            (calls,) = other.execute("SELECT calls FROM handrail_runs").fetchone()
        assert rows == dict.fromkeys(keys, "completed")
        assert calls == 64
        replays = await asyncio.gather(*(_claim(store, key) for key in keys))
        assert {r.state for r in replays} == {ClaimState.COMPLETED}
    finally:
        await store.close()


async def test_sqlite_concurrent_calls_wait_out_a_held_lock_together(tmp_path: Path) -> None:
    path = tmp_path / "handrail.db"
    store = SqliteStore(path, busy_timeout_ms=3000)
    await store.open()
    keys = [_key() for _ in range(16)]
    try:
        with _write_lock_held(path) as other:
            # Held for 0.3 s: a loop blocked on the lock would stall that long; a busy
            # shared machine stalls it for tens of ms anyway, hence the 0.15 s bound.
            asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
            async with LoopLag() as lag:
                claims = await _concurrent_calls(store, keys, "run-b")
            other.execute("BEGIN")  # for the block's closing ROLLBACK
        assert all(c.state is ClaimState.OWNED for c in claims)
        assert lag.worst_s < 0.15, f"the loop stalled for {lag.worst_s * 1000:.0f} ms"
        assert await store.run_counters("run-b", keys[0]) == RunCounters(16, 16, 0, 1)
    finally:
        await store.close()


async def test_sqlite_a_failing_statement_fails_only_its_own_caller(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "handrail.db")
    await store.open()
    try:
        results = await asyncio.gather(
            store.reserve_call("run-c", "fp-1", write=True),
            store._fetch("SELECT nothing FROM no_such_table", ()),  # a broken statement
            store.reserve_call("run-c", "fp-2", write=False),
            return_exceptions=True,
        )
        assert isinstance(results[0], RunCounters) and isinstance(results[2], RunCounters)
        assert isinstance(results[1], StoreUnavailable)
        assert await store.run_counters("run-c", "fp-1") == RunCounters(2, 1, 0, 1)
    finally:
        await store.close()


async def test_sqlite_checkpoints_keep_the_wal_from_growing_with_writes(tmp_path: Path) -> None:
    path, limit = tmp_path / "handrail.db", 1024 * 1024
    store = SqliteStore(path, checkpoint_every_s=0.02, wal_limit_bytes=limit)
    await store.open()
    wal = Path(f"{path}-wal")
    sizes = []
    try:
        # Each round commits 900 times, 4 KB pages each: unchecked, the WAL would pass 15 MB.
        for round_ in range(4):
            for i in range(300):
                key = f"key-{round_}-{i}"
                claim = await _claim(store, key)
                await store.complete("crm", key, claim.owner, OK)
                await store.reserve_call(f"run-{i // 20}", key, write=True)
            await asyncio.sleep(0.2)  # the checkpointer's turn
            sizes.append(wal.stat().st_size)
    finally:
        await store.close()
    assert max(sizes) <= limit, f"the WAL grew: {sizes}"


# The factory


async def test_relative_sqlite_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_from_config(StoreConfig(url="sqlite:///state/nested/handrail.db"))
    await store.open()
    await store.close()
    assert (tmp_path / "state" / "nested" / "handrail.db").is_file()


async def test_absolute_sqlite_url_is_absolute(tmp_path: Path) -> None:
    store = store_from_config(StoreConfig(url=f"sqlite:///{tmp_path}/abs/handrail.db"))
    await store.open()
    await store.close()
    assert (tmp_path / "abs" / "handrail.db").is_file()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_urls_build_the_postgres_store(scheme: str) -> None:
    store = store_from_config(StoreConfig(url=f"{scheme}://user@db.internal/handrail"))
    assert isinstance(store, PostgresStore)


# The claim's reading of a record (pure)


def _record(**fields: Any) -> Record:
    base: dict[str, Any] = {
        "fingerprint": "fp-1",
        "state": "in_flight",
        "owner": "them",
        "lease_over": False,
        "expired": False,
    }
    return Record(**{**base, **fields})


def test_a_claim_that_reached_the_store_is_recognised_as_its_own() -> None:
    answer = read_claim(_record(owner="me"), "fp-1", "me", takeover=False)
    assert isinstance(answer, Claim) and answer.state is ClaimState.OWNED


def test_a_record_past_its_lease_is_marked_unknown_unless_the_tool_dedupes() -> None:
    assert read_claim(_record(lease_over=True), "fp-1", "me", False) is Next.MARK_STALE
    assert read_claim(_record(lease_over=True), "fp-1", "me", True) is Next.RETRY


def test_an_unknown_record_with_another_payload_is_a_mismatch() -> None:
    answer = read_claim(_record(state="unknown", reason="timeout"), "fp-2", "me", True)
    assert isinstance(answer, Claim) and answer.state is ClaimState.MISMATCH


async def test_a_closed_run_is_closed_for_every_agent_in_the_same_step(store: Store) -> None:
    run = _key()
    before = await store.reserve_call(f"agent-a\x1f{run}", "fp", write=True, run=run)
    assert not before.closed
    assert await store.close_run(run, "orchestrator")
    assert not await store.close_run(run, "someone else")  # closed once
    closed_at, by = await store.closed_run(run) or (0.0, "")
    assert by == "orchestrator" and closed_at > 0
    for agent in ("agent-a", "agent-b"):
        after = await store.reserve_call(f"{agent}\x1f{run}", "fp", write=True, run=run)
        assert after.closed
    assert await store.closed_run(_key()) is None
