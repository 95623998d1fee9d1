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
    (
        2,
        (
            # unknown: the call may have run and its outcome was lost (see store/records.py).
            "ALTER TABLE handrail_idempotency ADD COLUMN reason TEXT",
            "ALTER TABLE handrail_idempotency ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",
            "CREATE INDEX handrail_idempotency_unsettled ON handrail_idempotency (created_at) "
            "WHERE state != 'completed'",
            "CREATE TABLE handrail_health (id INTEGER PRIMARY KEY, at REAL NOT NULL)",
        ),
    ),
    (
        3,
        (  # a run's finish line: closed for every agent, on every replica
            """CREATE TABLE handrail_closed_runs (
                run_id TEXT PRIMARY KEY,
                closed_at REAL NOT NULL,
                closed_by TEXT NOT NULL
            )""",
        ),
    ),
)

# A record is taken over when it expired (and is not in flight under a live lease), or, with
# :takeover (the tool deduplicates the key itself), when it is unknown or its lease ran out.
CLAIM = """
INSERT INTO handrail_idempotency AS r
    (tool, key, fingerprint, state, owner, lease_until, expires_at, created_at, attempts)
VALUES (:tool, :key, :fp, 'in_flight', :owner, :lease_until, :expires_at, :now, 1)
ON CONFLICT (tool, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'in_flight', owner = excluded.owner,
    lease_until = excluded.lease_until, expires_at = excluded.expires_at,
    created_at = excluded.created_at,
    status = NULL, headers = NULL, body = NULL, complete = NULL, reason = NULL,
    attempts = CASE WHEN r.expires_at <= :now THEN 1 ELSE r.attempts + 1 END
WHERE (r.expires_at <= :now AND (r.state != 'in_flight' OR r.lease_until <= :now))
   OR (:takeover AND r.fingerprint = excluded.fingerprint
       AND (r.state = 'unknown' OR (r.state = 'in_flight' AND r.lease_until <= :now)))
RETURNING attempts
"""

READ = """
SELECT fingerprint, state, owner, lease_until <= :now, expires_at <= :now,
       status, headers, body, complete, reason
FROM handrail_idempotency WHERE tool = :tool AND key = :key
"""

MARK_STALE = """
UPDATE handrail_idempotency SET state = 'unknown', reason = 'lease_expired'
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight' AND lease_until <= ?
"""

COMPLETE = """
UPDATE handrail_idempotency
SET state = 'completed', status = ?, headers = ?, body = ?, complete = ?, reason = NULL,
    expires_at = COALESCE(?, expires_at)
WHERE tool = ? AND key = ? AND owner = ? AND state IN ('in_flight', 'unknown')
"""

RELEASE = """
DELETE FROM handrail_idempotency
WHERE tool = ? AND key = ? AND owner = ? AND state IN ('in_flight', 'unknown')
"""

MARK_UNKNOWN = """
UPDATE handrail_idempotency SET state = 'unknown', reason = ?
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
"""

EXTEND = """
UPDATE handrail_idempotency SET lease_until = max(lease_until, ?)
WHERE tool = ? AND key = ? AND owner = ? AND state = 'in_flight'
"""

# What an operator may resolve: unknown, or in flight past its lease (its proxy is gone).
UNSETTLED = "(state = 'unknown' OR (state = 'in_flight' AND lease_until <= :now))"

INSPECT = """
SELECT tool, key, CASE WHEN state = 'in_flight' AND lease_until <= :now THEN 'unknown'
       ELSE state END, CASE WHEN state = 'in_flight' AND lease_until <= :now
       THEN 'lease_expired' ELSE reason END, attempts, created_at, expires_at, status
FROM handrail_idempotency WHERE tool = :tool AND key = :key
"""

UNKNOWN_KEYS = f"""
SELECT tool, key, 'unknown', coalesce(reason, 'lease_expired'), attempts, created_at,
       expires_at, status
FROM handrail_idempotency WHERE state != 'completed' AND {UNSETTLED}
ORDER BY created_at LIMIT :limit
"""

RESOLVE_FAILED = f"""
DELETE FROM handrail_idempotency WHERE tool = :tool AND key = :key AND {UNSETTLED}
"""

RESOLVE_ANSWER = f"""
UPDATE handrail_idempotency
SET state = 'completed', status = :status, headers = :headers, body = :body, complete = 1,
    reason = NULL
WHERE tool = :tool AND key = :key AND {UNSETTLED}
"""

PING = """
INSERT INTO handrail_health (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at
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
    (SELECT n FROM handrail_run_calls AS c WHERE c.run_id = :run AND c.fingerprint = :fp),
    EXISTS (SELECT 1 FROM handrail_closed_runs WHERE run_id = :closed)
"""

CLOSE_RUN = """
INSERT INTO handrail_closed_runs (run_id, closed_at, closed_by) VALUES (?, ?, ?)
ON CONFLICT (run_id) DO NOTHING
"""
CLOSED_RUN = "SELECT closed_at, closed_by FROM handrail_closed_runs WHERE run_id = ?"

REFUND = """
UPDATE handrail_runs SET writes = writes - ?, denied = denied + 1, updated_at = ?
WHERE run_id = ?
"""

PURGE_WHERE = {
    "handrail_idempotency": "expires_at <= ?1 AND (state != 'in_flight' OR lease_until <= ?1)",
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
