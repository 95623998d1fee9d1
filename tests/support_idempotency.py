"""Helpers for the idempotency end-to-end tests: real proxy processes and PostgreSQL schemas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict

from tests.conftest import IN_CI

PG_URL = os.environ.get("HANDRAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"handrail listening on (http://\S+)")
STARTUP_TIMEOUT_S = 20.0


@asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema on the local PostgreSQL, dropped afterwards; yields the store URL.

    Skips when the server is missing, but fails in CI (CI=true): never a silent pass there.
    """
    schema = f"handrail_idem_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL at {PG_URL} is not reachable: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        yield f"{PG_URL}?search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


@dataclass
class ProxyProcess:
    """``python -m proxy.cli serve`` in a child process, listening on a port of its own."""

    process: asyncio.subprocess.Process
    url: str
    log: Path

    def tool_url(self, tool: str, rest: str) -> str:
        return f"{self.url}/tools/{tool}{rest}"

    def kill(self) -> None:
        """SIGKILL: no cleanup, no settling of keys, exactly like a crash."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """A handrail.yaml (JSON is YAML) that listens on ports the OS picks."""
    config = {"listen": {"port": 0}, "admin": {"port": 0}, "tracing": {"exporter": "none"}, **raw}
    # The journal's write-ahead spool beside the config, not in the working directory.
    tracing = config["tracing"] = dict(config["tracing"])
    tracing["journal"] = {"spool_dir": str(path.parent / "spool"), **tracing.get("journal", {})}
    path.write_text(json.dumps(config))
    return path


async def start_proxy(config: Path) -> ProxyProcess:
    log = config.with_suffix(".log")
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "-c",
            str(config),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError(
                        f"handrail serve exited ({await process.wait()}): {log.read_text()}"
                    )
                match = _LISTENING.search(line)
                if match:
                    return ProxyProcess(process, match.group(1), log)
    except BaseException:
        process.kill()
        await process.wait()
        raise


@asynccontextmanager
async def proxy_processes(configs: Iterable[Path]) -> AsyncIterator[list[ProxyProcess]]:
    """Start proxies side by side (in parallel: each takes a second to import and boot)."""
    started = await asyncio.gather(*(start_proxy(c) for c in configs), return_exceptions=True)
    running = [p for p in started if isinstance(p, ProxyProcess)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield running
    finally:
        await asyncio.gather(*(p.stop() for p in running))


@dataclass(frozen=True)
class Answer:
    """What the agent saw."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    @property
    def error_code(self) -> str | None:
        try:
            return str(json.loads(self.body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return None


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    async with session.request(method, url, data=data, headers=headers) as resp:
        body = await resp.read()
        return Answer(resp.status, CIMultiDict(resp.headers), body)
