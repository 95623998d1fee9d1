"""The store's hot path alone: µs per guarded call's store work, per backend.

    python bench/store_bench.py                      # sqlite and postgresql
    python bench/store_bench.py --backend sqlite -n 5000
    python bench/store_bench.py --impl /path/to/other_sqlite.py:SqliteStore   # compare

One sequence is what the pipeline does for a new write with an idempotency key:
``reserve_call``, ``claim``, ``complete`` (a run changes every 20 calls, as in
the wrk benchmark). Measured N times in a row, then with 32 tasks at once (as 32 wrk
connections would, each yielding to the loop where a call waits for the policy and the
tool), on a fresh SQLite file under a temporary directory and on a fresh schema of the local
PostgreSQL (``HANDRAIL_TEST_POSTGRES``, dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.call import StoredResponse  # noqa: E402
from proxy.store.base import Store  # noqa: E402

PG_URL = os.environ.get("HANDRAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id": 42}' * 20)
TASKS = 32


async def sequence(store: Store, prefix: str, i: int, between: bool = False) -> None:
    """A call's three statements; ``between``: a turn of the loop between them, where the
    pipeline waits for the policy or the tool (with other calls' work in that turn)."""
    run, key, fp = f"{prefix}-run-{i // 20}", f"{prefix}-key-{i}", f"fp-{i}"
    await store.reserve_call(run, fp, write=True)
    if between:
        await asyncio.sleep(0)
    claim = await store.claim("api", key, fp, lease_s=30.0, ttl_s=600.0)
    if between:
        await asyncio.sleep(0)
    await store.complete("api", key, claim.owner, RESPONSE)


async def sequential(store: Store, n: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    for i in range(n):
        await sequence(store, prefix, i)
    return (time.perf_counter() - started) / n * 1e6


async def concurrent(store: Store, n: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await sequence(store, prefix, i, between=True)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return (time.perf_counter() - started) / n * 1e6


def sqlite_factory(impl: str | None) -> Callable[[str], Store]:
    if impl is None:
        from proxy.store.sqlite import SqliteStore

        return SqliteStore
    path, _, name = impl.partition(":")
    spec = importlib.util.spec_from_file_location("store_bench_impl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factory: Callable[[str], Store] = getattr(module, name or "SqliteStore")
    return factory


async def measure(label: str, store: Store, n: int) -> None:
    await store.open()
    try:
        await sequential(store, min(n, 200))  # warm up caches and prepared statements
        seq = await sequential(store, n)
        conc = await concurrent(store, n)
    finally:
        await store.close()
    print(f"{label:<28} sequential {seq:8.1f} µs/seq   {TASKS} tasks {conc:8.1f} µs/seq")


async def postgres(n: int) -> None:
    import asyncpg

    from proxy.store.postgres import PostgresStore

    schema = f"store_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await measure("postgresql", PostgresStore(f"{PG_URL}?search_path={schema}"), n)
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "all"), default="all")
    parser.add_argument("-n", type=int, default=3000, help="sequences per measurement")
    parser.add_argument("--impl", help="another SQLite store class, FILE.py:CLASS")
    args = parser.parse_args(argv)
    if args.backend in ("sqlite", "all"):
        factory = sqlite_factory(args.impl)
        with tempfile.TemporaryDirectory() as tmp:
            label = f"sqlite ({Path(args.impl).name})" if args.impl else "sqlite"
            store: Any = factory(str(Path(tmp) / "handrail.db"))
            await measure(label, store, args.n)
    if args.backend in ("postgresql", "all"):
        await postgres(args.n)


if __name__ == "__main__":
    asyncio.run(main())
