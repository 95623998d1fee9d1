"""The PostgreSQL store's schema, its versioned migrations and its statements.

Kept apart from ``postgres.py`` (the connection handling) so each stays readable; every
statement is one round trip, atomic on its own.
"""

from __future__ import annotations

from proxy.migrations import Migrations

COMPONENT = "store"
PURGE_BATCH = 1000

MIGRATIONS: Migrations = (
    (
        1,
        (
            """CREATE TABLE handrail_idempotency (
                tool text NOT NULL,
                key text NOT NULL,
                fingerprint text NOT NULL,
                state text NOT NULL,
                owner text NOT NULL,
                lease_until timestamptz NOT NULL,
                expires_at timestamptz NOT NULL,
                created_at timestamptz NOT NULL,
                status integer,
                headers text,
                body bytea,
                complete boolean,
                PRIMARY KEY (tool, key)
            )""",
            "CREATE INDEX handrail_idempotency_expires ON handrail_idempotency (expires_at)",
            """CREATE TABLE handrail_runs (
                run_id text PRIMARY KEY,
                calls bigint NOT NULL,
                writes bigint NOT NULL,
                denied bigint NOT NULL,
                updated_at timestamptz NOT NULL
            )""",
            "CREATE INDEX handrail_runs_updated ON handrail_runs (updated_at)",
            """CREATE TABLE handrail_run_calls (
                run_id text NOT NULL,
                fingerprint text NOT NULL,
                n bigint NOT NULL,
                updated_at timestamptz NOT NULL,
                PRIMARY KEY (run_id, fingerprint)
            )""",
            "CREATE INDEX handrail_run_calls_updated ON handrail_run_calls (updated_at)",
        ),
    ),
    (
        2,
        (
            # unknown: the call may have run and its outcome was lost (see store/records.py).
            "ALTER TABLE handrail_idempotency ADD COLUMN reason text",
            "ALTER TABLE handrail_idempotency ADD COLUMN attempts integer NOT NULL DEFAULT 1",
            "CREATE INDEX handrail_idempotency_unsettled ON handrail_idempotency (created_at) "
            "WHERE state <> 'completed'",
            "CREATE TABLE handrail_health (id integer PRIMARY KEY, at timestamptz NOT NULL)",
        ),
    ),
    (
        3,
        (  # a run's finish line: closed for every agent, on every replica
            """CREATE TABLE handrail_closed_runs (
                run_id text PRIMARY KEY,
                closed_at double precision NOT NULL,
                closed_by text NOT NULL
            )""",
        ),
    ),
)

# Owned: the first branch returns a row. Otherwise the second returns the record as this
# statement's snapshot sees it (``records.read_claim`` reads it); no row means a concurrent
# change we could not see yet, and the claim is simply tried again. A record is taken over
# when it expired (and is not in flight under a live lease), or, with $7 (the tool
# deduplicates the key itself), when it is unknown or its lease ran out.
CLAIM = """
WITH claimed AS (
    INSERT INTO handrail_idempotency AS r
        (tool, key, fingerprint, state, owner, lease_until, expires_at, created_at, attempts)
    VALUES ($1, $2, $3, 'in_flight', $4, now() + make_interval(secs => $5),
            now() + make_interval(secs => $6), now(), 1)
    ON CONFLICT (tool, key) DO UPDATE SET
        fingerprint = EXCLUDED.fingerprint, state = 'in_flight', owner = EXCLUDED.owner,
        lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at,
        created_at = EXCLUDED.created_at,
        status = NULL, headers = NULL, body = NULL, complete = NULL, reason = NULL,
        attempts = CASE WHEN r.expires_at <= now() THEN 1 ELSE r.attempts + 1 END
    WHERE (r.expires_at <= now() AND (r.state <> 'in_flight' OR r.lease_until <= now()))
       OR ($7 AND r.fingerprint = EXCLUDED.fingerprint
           AND (r.state = 'unknown' OR (r.state = 'in_flight' AND r.lease_until <= now())))
    RETURNING r.attempts
)
SELECT true AS owned, attempts, NULL::text AS fingerprint, NULL::text AS state,
       NULL::text AS owner, false AS lease_over, false AS expired,
       NULL::integer AS status, NULL::text AS headers, NULL::bytea AS body,
       NULL::boolean AS complete, NULL::text AS reason
FROM claimed
UNION ALL
SELECT false, attempts, fingerprint, state, owner, lease_until <= now(), expires_at <= now(),
       status, headers, body, complete, reason
FROM handrail_idempotency
WHERE tool = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM claimed)
"""

MARK_STALE = """
UPDATE handrail_idempotency SET state = 'unknown', reason = 'lease_expired'
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight' AND lease_until <= now()
"""

COMPLETE = """
UPDATE handrail_idempotency
SET state = 'completed', status = $4, headers = $5, body = $6, complete = $7, reason = NULL,
    expires_at = COALESCE(now() + make_interval(secs => $8::float8), expires_at)
WHERE tool = $1 AND key = $2 AND owner = $3 AND state IN ('in_flight', 'unknown')
"""

RELEASE = """
DELETE FROM handrail_idempotency
WHERE tool = $1 AND key = $2 AND owner = $3 AND state IN ('in_flight', 'unknown')
"""

MARK_UNKNOWN = """
UPDATE handrail_idempotency SET state = 'unknown', reason = $4
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight'
"""

EXTEND = """
UPDATE handrail_idempotency
SET lease_until = greatest(lease_until, now() + make_interval(secs => $4))
WHERE tool = $1 AND key = $2 AND owner = $3 AND state = 'in_flight'
"""

# What an operator may resolve: unknown, or in flight past its lease (its proxy is gone).
UNSETTLED = "(state = 'unknown' OR (state = 'in_flight' AND lease_until <= now()))"

KEY_COLUMNS = f"""
tool, key, CASE WHEN {UNSETTLED} THEN 'unknown' ELSE state END AS state,
CASE WHEN state = 'in_flight' AND lease_until <= now() THEN 'lease_expired' ELSE reason END
    AS reason,
attempts, extract(epoch FROM created_at)::float8 AS created_at,
extract(epoch FROM expires_at)::float8 AS expires_at, status
"""

INSPECT = f"SELECT {KEY_COLUMNS} FROM handrail_idempotency WHERE tool = $1 AND key = $2"

UNKNOWN_KEYS = f"""
SELECT {KEY_COLUMNS} FROM handrail_idempotency
WHERE state <> 'completed' AND {UNSETTLED} ORDER BY created_at LIMIT $1
"""

RESOLVE_FAILED = f"DELETE FROM handrail_idempotency WHERE tool = $1 AND key = $2 AND {UNSETTLED}"

RESOLVE_ANSWER = f"""
UPDATE handrail_idempotency
SET state = 'completed', status = $3, headers = $4, body = $5, complete = true, reason = NULL
WHERE tool = $1 AND key = $2 AND {UNSETTLED}
"""

PING = """
INSERT INTO handrail_health (id, at) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now()
"""

RUN_COUNTERS = """
SELECT r.calls, r.writes, r.denied, c.n
FROM (SELECT 1) AS one
LEFT JOIN handrail_runs AS r ON r.run_id = $1
LEFT JOIN handrail_run_calls AS c ON c.run_id = $1 AND c.fingerprint = $2
"""

# Both rows are locked in the same order by every caller: no deadlocks. One statement, so
# calls made at once each see the counts before them (RETURNING gives the rows after it).
RESERVE = """
WITH run AS (
    INSERT INTO handrail_runs AS r (run_id, calls, writes, denied, updated_at)
    VALUES ($1, 1, $3, 0, now())
    ON CONFLICT (run_id) DO UPDATE SET
        calls = r.calls + 1, writes = r.writes + EXCLUDED.writes,
        updated_at = EXCLUDED.updated_at
    RETURNING r.calls, r.writes, r.denied
), seen AS (
    INSERT INTO handrail_run_calls AS c (run_id, fingerprint, n, updated_at)
    VALUES ($1, $2, 1, now())
    ON CONFLICT (run_id, fingerprint) DO UPDATE SET n = c.n + 1, updated_at = EXCLUDED.updated_at
    RETURNING c.n
)
SELECT run.calls - 1, run.writes - $3, run.denied, seen.n - 1,
    EXISTS (SELECT 1 FROM handrail_closed_runs WHERE run_id = $4)
FROM run, seen
"""

CLOSE_RUN = """
INSERT INTO handrail_closed_runs (run_id, closed_at, closed_by) VALUES ($1, $2, $3)
ON CONFLICT (run_id) DO NOTHING
"""
CLOSED_RUN = "SELECT closed_at, closed_by FROM handrail_closed_runs WHERE run_id = $1"

REFUND = """
UPDATE handrail_runs SET writes = writes - $2, denied = denied + 1, updated_at = now()
WHERE run_id = $1
"""

PURGE_RECORDS = f"""
WITH gone AS (
    DELETE FROM handrail_idempotency
    WHERE (tool, key) IN (
        SELECT tool, key FROM handrail_idempotency
        WHERE expires_at <= now() AND (state <> 'in_flight' OR lease_until <= now())
        LIMIT {PURGE_BATCH}
    ) AND expires_at <= now() AND (state <> 'in_flight' OR lease_until <= now())
    RETURNING 1
)
SELECT count(*) FROM gone
"""

PURGE_RUNS = f"""
WITH gone AS (
    DELETE FROM handrail_runs
    WHERE run_id IN (
        SELECT run_id FROM handrail_runs
        WHERE updated_at <= now() - make_interval(secs => $1) LIMIT {PURGE_BATCH}
    ) AND updated_at <= now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT count(*) FROM gone
"""

PURGE_RUN_CALLS = f"""
WITH gone AS (
    DELETE FROM handrail_run_calls
    WHERE (run_id, fingerprint) IN (
        SELECT run_id, fingerprint FROM handrail_run_calls
        WHERE updated_at <= now() - make_interval(secs => $1) LIMIT {PURGE_BATCH}
    ) AND updated_at <= now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT count(*) FROM gone
"""
