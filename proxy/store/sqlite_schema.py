"""The SQLite store's schema, its versioned migrations and its statements.

Kept apart from ``sqlite.py`` (the connection handling) so each stays readable.
"""

from __future__ import annotations

import logging
import sqlite3

from proxy.migrations import Migrations, migrate_sqlite

logger = logging.getLogger(__name__)

COMPONENT = "store"
"""This schema's row in ``handrail_schema`` (the journal keeps its own)."""
PURGE_BATCH = 1000

MIGRATIONS: Migrations = (
    (
        1,
        (
            """CREATE TABLE handrail_idempotency (
                tool TEXT NOT NULL,
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                state TEXT NOT NULL,
                owner TEXT NOT NULL,
                lease_until REAL NOT NULL,
                expires_at REAL NOT NULL,
                created_at REAL NOT NULL,
                status INTEGER,
                headers TEXT,
                body BLOB,
                complete INTEGER,
                PRIMARY KEY (tool, key)
            )""",
            "CREATE INDEX handrail_idempotency_expires ON handrail_idempotency (expires_at)",
            # last_fingerprint feeds the trigger below, so RESERVE is one statement.
            """CREATE TABLE handrail_runs (
                run_id TEXT PRIMARY KEY,
                calls INTEGER NOT NULL,
                writes INTEGER NOT NULL,
                denied INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                last_fingerprint TEXT NOT NULL
            )""",
            "CREATE INDEX handrail_runs_updated ON handrail_runs (updated_at)",
            """CREATE TABLE handrail_run_calls (
                run_id TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                n INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (run_id, fingerprint)
            )""",
            "CREATE INDEX handrail_run_calls_updated ON handrail_run_calls (updated_at)",
            """CREATE TRIGGER handrail_runs_count_insert AFTER INSERT ON handrail_runs
            BEGIN
                INSERT INTO handrail_run_calls (run_id, fingerprint, n, updated_at)
                VALUES (NEW.run_id, NEW.last_fingerprint, 1, NEW.updated_at)
                ON CONFLICT (run_id, fingerprint)
                DO UPDATE SET n = n + 1, updated_at = excluded.updated_at;
            END""",
            """CREATE TRIGGER handrail_runs_count_update AFTER UPDATE OF calls ON handrail_runs
            BEGIN
                INSERT INTO handrail_run_calls (run_id, fingerprint, n, updated_at)
                VALUES (NEW.run_id, NEW.last_fingerprint, 1, NEW.updated_at)
                ON CONFLICT (run_id, fingerprint)
                DO UPDATE SET n = n + 1, updated_at = excluded.updated_at;
            END""",
        ),
    ),
)

CLAIM = """
INSERT INTO handrail_idempotency AS r
    (tool, key, fingerprint, state, owner, lease_until, expires_at, created_at)
VALUES (:tool, :key, :fp, 'in_flight', :owner, :lease_until, :expires_at, :now)
ON CONFLICT (tool, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'in_flight', owner = excluded.owner,
    lease_until = excluded.lease_until, expires_at = excluded.expires_at,
    created_at = excluded.created_at,
    status = NULL, headers = NULL, body = NULL, complete = NULL
WHERE (r.state = 'completed' AND r.expires_at <= :now)
   OR (r.state = 'in_flight' AND r.lease_until <= :now)
RETURNING 1
"""

READ = """
SELECT fingerprint, state, lease_until, expires_at, status, headers, body, complete
FROM handrail_idempotency WHERE tool = ? AND key = ?
"""

COMPLETE = """
UPDATE handrail_idempotency
SET state = 'completed', status = ?, headers = ?, body = ?, complete = ?
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
"""

RELEASE = """
DELETE FROM handrail_idempotency
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
"""

RUN_COUNTERS = """
SELECT r.calls, r.writes, r.denied, c.n
FROM (SELECT 1) AS one
LEFT JOIN handrail_runs AS r ON r.run_id = :run
LEFT JOIN handrail_run_calls AS c ON c.run_id = :run AND c.fingerprint = :fp
"""

# One statement, so atomic: RETURNING gives the run's row after this call (minus it: the
# counts before), and its subquery sees handrail_run_calls before the AFTER trigger counts
# this call (SQLite: RETURNING reflects no change made by triggers), i.e. earlier repeats.
RESERVE = """
INSERT INTO handrail_runs AS r (run_id, calls, writes, denied, updated_at, last_fingerprint)
VALUES (:run, 1, :write, 0, :now, :fp)
ON CONFLICT (run_id) DO UPDATE SET
    calls = r.calls + 1, writes = r.writes + excluded.writes,
    updated_at = excluded.updated_at, last_fingerprint = excluded.last_fingerprint
RETURNING calls - 1, writes - :write, denied,
    (SELECT n FROM handrail_run_calls AS c WHERE c.run_id = :run AND c.fingerprint = :fp)
"""

REFUND = """
UPDATE handrail_runs SET writes = writes - ?, denied = denied + 1, updated_at = ?
WHERE run_id = ?
"""

PURGE_WHERE = {
    "handrail_idempotency": "expires_at <= ?1 AND (state = 'completed' OR lease_until <= ?1)",
    "handrail_runs": "updated_at <= ?",
    "handrail_run_calls": "updated_at <= ?",
}


def migrate(conn: sqlite3.Connection) -> None:
    migrate_sqlite(conn, COMPONENT, MIGRATIONS, "SQLite store")


def purge(conn: sqlite3.Connection, cutoffs: dict[str, float]) -> dict[str, int]:
    """Delete in batches of ``PURGE_BATCH`` rows, each its own short write transaction."""
    purged = dict.fromkeys(PURGE_WHERE, 0)
    for table, condition in PURGE_WHERE.items():
        sql = (
            f"DELETE FROM {table} WHERE rowid IN "
            f"(SELECT rowid FROM {table} WHERE {condition} LIMIT {PURGE_BATCH})"
        )
        while True:
            deleted = conn.execute(sql, (cutoffs[table],)).rowcount
            purged[table] += deleted
            if deleted < PURGE_BATCH:
                break
    return purged
