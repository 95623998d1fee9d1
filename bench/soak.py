"""Handrail's soak: many mixed calls through a real ``handrail serve`` while faults happen
for real, then a count of what the tool executed, what the agents saw and what the journal
kept.

    python bench/soak.py                      # 100k calls, SQLite store, kill -9 every 20 s
    python bench/soak.py --quick              # ~3000 calls in under a minute (smoke run)
    python bench/soak.py --store postgresql --calls 20000
    python bench/soak.py --calls 5000 --seconds 120 --concurrency 16 --kill-every 0

What runs, all on 127.0.0.1:

- the counting tool (``bench/soak_tool.py``, a child process): counts, per Idempotency-Key,
  how many times a write took effect; slow, 5xx, chunked, closing or breaking its answer
  off as each request's query asks;
- ``handrail serve`` (a child process, its own process group) with a config written to a
  temporary directory: the shipped policies, tracing exporter ``none`` (the journal is always
  kept), three tools: ``api`` (timeout 2 s), ``slow`` (timeout 0.3 s: a slow tool times out)
  and ``flaky`` (behind a gate that now and then refuses connections, as a restarting tool
  does, dropping the connections it had);
- with ``--store postgresql``: a fresh schema in the local database ``test``, reached through a
  TCP relay that is cut (listener closed, connections aborted) for a second now and then;
- the agents: ``--concurrency`` workers on raw sockets (no client library that re-sends a
  request on its own), each call with a ``traceparent`` of its own so that the journal's row
  can be found by trace id. The mix: reads, writes (POST/PUT/DELETE) with fresh keys
  (explicit ``Idempotency-Key`` or derived from the same ``X-Run-Id`` and body), blind retries
  of earlier writes (some at the same time as the original; most after a failure), and calls
  whose agent hangs up (before the answer, or mid-stream; FIN or RST);
- every ``--kill-every`` seconds the proxy's process group gets SIGKILL and a new proxy starts
  on the same store and ports.

Afterwards it reads the tool's ledger, the journal (the SQLite file ``handrail-journal.db``
beside the store, or the ``handrail_journal`` table) and the store's unsettled keys, prints a
report and writes ``soak.json`` (and ``calls.jsonl``, one line per call, and the proxies'
logs) to ``--out``. The soak never resolves an ``unknown`` key and no tool is configured
``upstream_dedupes``, so a key the tool executed twice is always a broken promise: exit status
0 when no key took effect more than once, 1 when one did, 2 when the soak could not run.

``SOAK_HANDRAIL`` replaces the ``handrail`` command line (e.g. with a debugging wrapper).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PG_PORT = 5432
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

CLIENT_TIMEOUT_S = 30.0
"""An agent gives up on an answer after this long (then closes the connection)."""
NAMED_AGENTS = ("sales-bot", "demo-agent", "bench-agent")
"""Agents the shipped policy names (policies/data.json): an unnamed one may only read."""
PROXY_WAIT_S = 30.0
"""An agent whose proxy refuses connections (it is restarting) waits this long, then gives up."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
"""A proxy gets this long to stop on SIGTERM (a pod's default grace), then SIGKILL."""
RETRIES_PER_WRITE = 3
"""Retries of one write, at most: the shipped policy denies a 6th repeat of a call in a run."""
CALLS_PER_RUN = 8
"""Fresh calls per X-Run-Id: with retries, a run stays under the policy's 50-write budget."""

TOOLS: dict[str, dict[str, Any]] = {
    "api": {"timeout_s": 2.0},
    "slow": {"timeout_s": 0.3},
    "flaky": {"timeout_s": 2.0},
}


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    calls: int
    seconds: float
    concurrency: int
    store: str
    out: Path
    kill_every: float
    pg_cut_every: float
    pg_cut_s: float
    tool_down_every: float
    tool_down_s: float
    rss_every: float
    seed: int
    keep: bool


QUICK = {
    "calls": 3000,
    "seconds": 45.0,
    "kill_every": 3.0,
    "pg_cut_every": 2.5,
    "pg_cut_s": 0.5,
    "tool_down_every": 2.0,
    "tool_down_s": 0.5,
    "rss_every": 0.5,
}
"""--quick: a smoke run, its faults packed closer together (the calls take seconds)."""
FULL = {
    "calls": 100_000,
    "seconds": 3600.0,
    "kill_every": 20.0,
    "pg_cut_every": 15.0,
    "pg_cut_s": 1.0,
    "tool_down_every": 10.0,
    "tool_down_s": 1.5,
    "rss_every": 2.0,
}


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--calls", type=int, help="calls to send (100000; --quick 3000)")
    add("--seconds", type=float, help="time cap, s (3600; --quick 45)")
    add("--concurrency", type=int, default=32, help="agents at once (32)")
    add("--store", choices=("sqlite", "postgresql"), default="sqlite")
    add("--out", type=Path, default=ROOT / "bench" / "out" / "soak", help="report directory")
    add("--kill-every", type=float, help="kill -9 of the proxy every so many s (20; 0: never)")
    add(
        "--pg-cut-every", type=float, help="cut the PostgreSQL relay every so many s (15; 0: never)"
    )
    add("--pg-cut-s", type=float, help="how long a PostgreSQL cut lasts, s (1)")
    add(
        "--tool-down-every",
        type=float,
        help="the flaky tool goes away every so many s (10; 0: never)",
    )
    add("--tool-down-s", type=float, help="how long it stays away, s (1.5)")
    add("--rss-every", type=float, help="sample the proxy's RSS every so many s (2)")
    add("--seed", type=int, help="random seed (default: a new one)")
    add("--keep", action="store_true", help="keep the temporary directory and PostgreSQL schema")
    add("--quick", action="store_true", help="~3000 calls, faults every few s: a smoke run")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    return Options(
        calls=max(1, pick("calls")),
        seconds=max(1.0, pick("seconds")),
        concurrency=max(1, args.concurrency),
        store=args.store,
        out=args.out,
        kill_every=max(0.0, pick("kill_every")),
        pg_cut_every=max(0.0, pick("pg_cut_every")),
        pg_cut_s=max(0.05, pick("pg_cut_s")),
        tool_down_every=max(0.0, pick("tool_down_every")),
        tool_down_s=max(0.05, pick("tool_down_s")),
        rss_every=max(0.2, pick("rss_every")),
        seed=args.seed if args.seed is not None else secrets.randbits(32),
        keep=args.keep,
    )


# -- child processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it listened")
        if await port_open(port):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT_S:g} s")


def start_child(args: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """A child in a process group of its own (so kill -9 takes its workers too)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's process group (its pid is the group's id), if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def stop_child(proc: subprocess.Popen[bytes], grace_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the child (as a container runtime sends it), then SIGKILL to its group if
    it has not exited in ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
    signal_group(proc, signal.SIGKILL)  # policy workers left behind, if any


def last_line(log: Path) -> str:
    """The last line of a child's log: why it stopped."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def handrail_command() -> list[str]:
    """The venv's ``handrail`` (``SOAK_HANDRAIL``: another command line, e.g. a debug wrapper)."""
    override = os.environ.get("SOAK_HANDRAIL")
    if override:
        return shlex.split(override)
    script = Path(PY).parent / "handrail"
    return [str(script)] if script.exists() else [PY, "-m", "proxy.cli"]


def _status_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_kb(pid: int) -> int:
    """VmRSS of the process and its children (Handrail's policy workers), in KiB."""
    return _status_kb(pid) + sum(rss_kb(child) for child in _children(pid))


class Proxy:
    """``handrail serve`` on fixed ports: started, killed with SIGKILL, restarted, stopped.

    ``gen`` counts the proxies; it moves on *before* a kill, so an agent whose connection
    breaks can tell that a kill -9 came in between."""

    def __init__(self, config: Path, work: Path, out: Path, port: int, admin: int) -> None:
        self.config = config
        self.work = work
        self.out = out
        self.port = port
        self.admin = admin
        self.gen = 1
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = asyncio.Event()
        self.history: list[dict[str, Any]] = []
        self.died_alone: list[dict[str, Any]] = []
        self.start_failures: list[dict[str, Any]] = []
        self.stop_s: float | None = None
        """How long the last proxy took to stop on SIGTERM (SIGKILL after ``STOP_TIMEOUT_S``)."""
        self.kill_windows: list[tuple[float, float]] = []
        """(SIGKILL sent, process reaped): a dying proxy's listener may still accept."""
        self.lock = asyncio.Lock()
        """One change of proxy at a time (a kill, a restart after a crash, the stop)."""

    async def start(self) -> None:
        """Start a proxy. One that exits before it listens (its store is away: it refuses to
        start) is started again, as an orchestrator would, for up to ``START_TIMEOUT_S``."""
        log = self.out / f"proxy-{self.gen}.log"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            started = time.time()
            proc = start_child(
                [*handrail_command(), "serve", "-c", str(self.config)], log, self.work
            )
            self.proc = proc
            try:
                await wait_port(self.port, proc, f"handrail serve (proxy {self.gen})")
                break
            except RuntimeError:
                await stop_child(proc, 5)
                self.proc = None
                why = last_line(log)
                self.start_failures.append({"gen": self.gen, "at": started, "why": why})
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"no proxy could start for {START_TIMEOUT_S:g} s: {why}"
                    ) from None
                await asyncio.sleep(0.25)
        self.history.append(
            {"gen": self.gen, "pid": proc.pid, "started": started, "ready_s": time.time() - started}
        )
        self.ready.set()

    async def kill9(self) -> None:
        """SIGKILL to the proxy and its policy workers: no cleanup, exactly like a crash."""
        async with self.lock:
            await self._kill9()

    async def _kill9(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.ready.clear()
        self.gen += 1  # before the signal: a connection that breaks from now on was killed
        self.kill_windows.append((time.time(), float("inf")))  # open until the proxy is gone
        signal_group(proc, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
        self.kill_windows[-1] = (self.kill_windows[-1][0], time.time())
        self.history[-1]["ended"] = time.time()
        self.history[-1]["how"] = "kill -9"
        self.proc = None
        await self.start()

    def killed_during(self, since: float, gen: int) -> bool:
        """Did a kill -9 strike a call sent at ``since`` to proxy ``gen``?"""
        if self.gen != gen:
            return True
        return any(end >= since for _, end in self.kill_windows[-3:])

    async def check_alive(self) -> None:
        """A proxy that exited without being told to (a crash of its own): record it, start
        another."""
        async with self.lock:
            await self._check_alive()

    async def _check_alive(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is None or not self.ready.is_set():
            return
        self.ready.clear()
        self.died_alone.append({"gen": self.gen, "exit": proc.returncode, "at": time.time()})
        self.history[-1]["ended"] = time.time()
        self.history[-1]["how"] = f"died on its own (exit {proc.returncode})"
        self.gen += 1
        await self.start()

    async def stop(self) -> None:
        async with self.lock:
            await self._stop()

    async def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.ready.clear()
        self.proc = None
        asked = time.time()
        await stop_child(proc)
        self.stop_s = time.time() - asked
        if self.history:
            self.history[-1]["ended"] = time.time()
            self.history[-1]["how"] = f"SIGTERM (exit {proc.returncode}) in {self.stop_s:.1f} s"

    def rss(self) -> tuple[int, int] | None:
        """(proxy + policy workers, proxy alone) in KiB, or None when no proxy runs."""
        proc = self.proc
        if proc is None or proc.poll() is not None or not self.ready.is_set():
            return None
        return rss_kb(proc.pid), _status_kb(proc.pid)


# -- fault injectors in this process ------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 that can be cut: listener closed, every connection aborted,
    then listening again on the same port (a store or a tool going away and coming back)."""

    def __init__(self, name: str, target_port: int) -> None:
        self.name = name
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.BaseTransport] = set()
        self.cuts: list[tuple[float, float, int]] = []
        """(unix time, seconds, connections aborted)."""

    async def start(self) -> int:
        self.server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def cut(self, seconds: float) -> None:
        aborted = await self._drop()
        self.cuts.append((time.time(), seconds, aborted))
        await asyncio.sleep(seconds)
        await self.start()

    async def close(self) -> None:
        await self._drop()

    async def _drop(self) -> int:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        transports, self.transports = self.transports, set()
        for transport in transports:
            transport.abort()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        return len(transports) // 2

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, up_writer.transport)
        self.transports.update(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.transports.difference_update(pair)


# -- the agent's side: a minimal HTTP/1.1 client ------------------------------------------


class Broken(Exception):
    """The connection broke; ``got`` says whether any of the answer had arrived."""

    def __init__(self, got: bool) -> None:
        super().__init__("connection broke")
        self.got = got


_BROKEN = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        line = await reader.readline()
    except _BROKEN:
        raise Broken(False) from None
    if not line.endswith(b"\n"):
        raise Broken(bool(line))
    try:
        status = int(line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise Broken(True)
            if line in (b"\r\n", b"\n"):
                return status, headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    except _BROKEN:
        raise Broken(True) from None


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    try:
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await reader.readline()
                if not size_line.endswith(b"\n"):
                    raise Broken(True)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (line := await reader.readline()) not in (b"\r\n", b"\n"):
                        if not line:
                            raise Broken(True)
                    return bytes(body)
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        return await reader.read()
    except _BROKEN:
        raise Broken(True) from None


def close_writer(writer: asyncio.StreamWriter, reset: bool = False) -> None:
    """FIN (``close``) or RST (``abort``)."""
    with contextlib.suppress(Exception):
        if reset:
            writer.transport.abort()
        else:
            writer.close()


@dataclass
class KeepAlive:
    """A worker's keep-alive connection to the proxy, tagged with the proxy it was made to."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    gen: int = 0

    def drop(self) -> None:
        if self.writer is not None:
            close_writer(self.writer)
        self.reader = self.writer = None


# -- the calls ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What an agent sends; a retry sends the same spec again (same key or derived key)."""

    write: int
    """The write's number (0 for a read): retries of one write share it."""
    tool: str
    method: str
    path: str
    query: str
    body: bytes
    agent: str
    run: str
    key: str | None
    fault: str
    hangup: str | None = None
    """None, ``before`` (close before the answer) or ``mid`` (close mid-stream)."""

    def request(self, host: str, trace_id: str, span_id: str) -> bytes:
        target = f"/tools/{self.tool}{self.path}" + (f"?{self.query}" if self.query else "")
        lines = [
            f"{self.method} {target} HTTP/1.1",
            f"Host: {host}",
            f"X-Agent-Id: {self.agent}",
            f"X-Run-Id: {self.run}",
            f"traceparent: 00-{trace_id}-{span_id}-01",
            f"Content-Length: {len(self.body)}",
        ]
        if self.body:
            lines.append("Content-Type: application/json")
        if self.key is not None:
            lines.append(f"Idempotency-Key: {self.key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass(slots=True)
class Record:
    """One call as the agent saw it."""

    n: int
    kind: str
    """read | write | retry"""
    write: int
    tool: str
    method: str
    fault: str
    hangup: str | None
    key: str | None
    trace_id: str
    concurrent: bool = False
    gen: int = 0
    t0: float = 0.0
    t1: float = 0.0
    outcome: str = ""
    """answered | cut (the answer broke off) | lost (no answer: the connection broke) |
    hung_up (the agent closed on purpose) | client_timeout | not_sent (no proxy to take it)"""
    killed: bool = False
    """A kill -9 came between the call's sending and its end."""
    status: int | None = None
    code: str | None = None
    """The proxy's error code, ``tool`` for an error body the tool made, else None."""
    replayed: bool = False
    trace_ok: bool | None = None
    """The answer's ``traceresponse`` names the trace the agent sent."""
    answer_key: str | None = None
    """The Idempotency-Key the tool's answer names (it echoes the one it received)."""

    @property
    def label(self) -> str:
        if self.outcome == "answered":
            return (
                f"{self.status}"
                + (f" {self.code}" if self.code else "")
                + (" (replayed)" if self.replayed else "")
            )
        if self.outcome == "lost":
            return "no answer: connection broke" + (" (kill -9)" if self.killed else "")
        if self.outcome == "cut":
            return f"{self.status} answer broke off" + (" (kill -9)" if self.killed else "")
        return {"hung_up": "agent hung up", "client_timeout": "agent timed out"}.get(
            self.outcome, self.outcome
        )


def answer_key(body: bytes) -> str | None:
    """The key the counting tool echoed in a 2xx answer (plain, or the last part of a stream)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("parts"), list) and answer["parts"]:
        answer = answer["parts"][-1]
    key = answer.get("key") if isinstance(answer, dict) else None
    return key if isinstance(key, str) else None


def error_code(status: int, body: bytes) -> str | None:
    if status < 400:
        return None
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return "non-json"
    if isinstance(error, dict) and "code" in error:
        return str(error["code"])
    return "tool"


class Mix:
    """Chooses the calls: which tool, method, fault, key and hang-up."""

    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.writes = 0
        self.reads = 0

    def fault(self, tool: str) -> tuple[str, str]:
        """(fault label, query string)."""
        r = self.rng
        if tool == "slow":
            delay = r.randint(50, 700)
            return "timeout" if delay > 300 else "slow", f"fault=slow&delay_ms={delay}"
        if tool == "flaky":
            if r.random() < 0.15:
                return "stream", "fault=stream&chunks=3&gap_ms=10"
            return "none", ""
        choice = r.choices(
            ("none", "slow", "5xx", "stream", "close", "close_early", "break"),
            (55, 8, 8, 12, 6, 5, 6),
        )[0]
        if choice == "none":
            return "none", ""
        if choice == "slow":
            return "slow", f"fault=slow&delay_ms={r.randint(20, 300)}"
        if choice == "5xx":
            return "5xx", f"fault=5xx&status={r.choice((500, 502, 503))}"
        if choice == "stream":
            return "stream", f"fault=stream&chunks={r.randint(2, 6)}&gap_ms={r.randint(5, 30)}"
        return choice, f"fault={choice}"

    def tool(self) -> str:
        return self.rng.choices(("api", "slow", "flaky"), (70, 15, 15))[0]

    def read(self, agent: str, run: str) -> Spec:
        self.reads += 1
        tool = self.tool()
        fault, query = self.fault(tool)
        path = f"/contacts/{self.rng.randint(1, 10_000)}"
        return Spec(0, tool, "GET", path, query, b"", agent, run, None, fault)

    def write(self, agent: str, run: str) -> Spec:
        self.writes += 1
        n = self.writes
        r = self.rng
        tool = self.tool()
        fault, query = self.fault(tool)
        method = r.choices(("POST", "PUT", "DELETE"), (50, 30, 20))[0]
        path = "/orders" if method == "POST" else f"/contacts/{n}"
        body = b""
        if method != "DELETE":
            body = json.dumps(
                {
                    "n": n,
                    "name": f"soak contact {n}",
                    "note": f"soak {self.tag}",
                    "qty": r.randint(1, 9),
                }
            ).encode()
        key = f"soak-{self.tag}-{n}" if r.random() < 0.4 else None
        return Spec(n, tool, method, path, query, body, agent, run, key, fault)

    def hang_up(self, spec: Spec) -> Spec:
        """The same call, with an answer slow enough to hang up on, and a hang-up mode."""
        r = self.rng
        if r.random() < 0.5:
            query = f"fault=stream&chunks={r.randint(4, 8)}&gap_ms={r.randint(20, 50)}"
            return replace(spec, query=query, fault="stream", hangup="mid")
        if r.random() < 0.5:
            query = f"fault=slow&delay_ms={r.randint(50, 250)}"
            return replace(spec, query=query, fault="slow", hangup="before")
        query = f"fault=stream&chunks={r.randint(3, 6)}&gap_ms={r.randint(20, 50)}"
        return replace(spec, query=query, fault="stream", hangup="before")


# -- the soak -----------------------------------------------------------------------------


class Soak:
    """Runs the agents and the fault injectors; collects what the agents saw."""

    def __init__(self, opts: Options, proxy: Proxy, gate: Relay, pg_relay: Relay | None) -> None:
        self.opts = opts
        self.proxy = proxy
        self.gate = gate
        self.pg_relay = pg_relay
        self.rng = random.Random(opts.seed)
        self.tag = f"{opts.seed:08x}"
        self.mix = Mix(self.rng, self.tag)
        self.host = f"127.0.0.1:{proxy.port}"
        self.records: list[Record] = []
        self.issued = 0
        self.inflight = 0
        self.started = 0.0
        self.deadline = 0.0
        self.done = asyncio.Event()
        self.retry_due: list[tuple[float, int, Spec]] = []
        """A heap of (when, n, write): failed writes an agent will retry."""
        self.retry_pool: deque[Spec] = deque(maxlen=5000)
        self.retries_left: dict[int, int] = {}
        self.kills: list[dict[str, Any]] = []
        self.rss: list[dict[str, Any]] = []
        self.proxy_waits = 0
        self.fatal: str | None = None

    # -- running ---------------------------------------------------------------------

    async def run(self) -> None:
        self.started = time.time()
        self.deadline = time.monotonic() + self.opts.seconds
        workers = [
            asyncio.create_task(self.worker(w), name=f"agent-{w}")
            for w in range(self.opts.concurrency)
        ]
        side = [
            asyncio.create_task(self.sample_rss(), name="rss"),
            asyncio.create_task(self.progress(), name="progress"),
        ]
        if self.opts.kill_every > 0:
            side.append(asyncio.create_task(self.kill_loop(), name="kill-9"))
        if self.opts.tool_down_every > 0:
            side.append(
                asyncio.create_task(
                    self.cut_loop(self.gate, self.opts.tool_down_every, self.opts.tool_down_s)
                )
            )
        if self.pg_relay is not None and self.opts.pg_cut_every > 0:
            side.append(
                asyncio.create_task(
                    self.cut_loop(self.pg_relay, self.opts.pg_cut_every, self.opts.pg_cut_s)
                )
            )
        try:
            await asyncio.gather(*workers)
        finally:
            self.done.set()
            for task in workers:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            await asyncio.gather(*workers, return_exceptions=True)

    def take(self, n: int) -> int:
        """Tickets for ``n`` calls (fewer near the end); 0 once the count or time is up."""
        if self.done.is_set() or time.monotonic() >= self.deadline:
            return 0
        n = min(n, self.opts.calls - self.issued)
        self.issued += max(0, n)
        return max(0, n)

    async def worker(self, w: int) -> None:
        agent = NAMED_AGENTS[w % len(NAMED_AGENTS)]
        keep = KeepAlive()
        fresh = 0
        try:
            while self.take(1):
                run = f"soak-{self.tag}-w{w}-r{fresh // CALLS_PER_RUN}"
                fresh += 1
                await self.one_action(agent, run, keep)
        finally:
            keep.drop()

    async def one_action(self, agent: str, run: str, keep: KeepAlive) -> None:
        r = self.rng
        now = time.monotonic()
        if self.retry_due and self.retry_due[0][0] <= now and r.random() < 0.8:
            _, _, spec = heapq.heappop(self.retry_due)
            await self.call(spec, "retry", keep)
            return
        pick = r.random()
        if pick < 0.25:
            await self.call(self.mix.read(agent, run), "read", keep)
        elif pick < 0.70:
            await self.call(self.mix.write(agent, run), "write", keep)
        elif pick < 0.85 and self.retry_pool:
            spec = self.retry_pool[r.randrange(len(self.retry_pool))]
            if self.retries_left.get(spec.write, 0) > 0:
                self.retries_left[spec.write] -= 1
                await self.call(spec, "retry", keep)
            else:
                await self.call(self.mix.write(agent, run), "write", keep)
        elif pick < 0.92:
            await self.concurrent_group(self.mix.write(agent, run))
        else:
            spec = self.mix.write(agent, run) if r.random() < 0.7 else self.mix.read(agent, run)
            await self.call(self.mix.hang_up(spec), "write" if spec.write else "read", None)

    async def concurrent_group(self, spec: Spec) -> None:
        """The original and one or two blind retries of it, at (nearly) the same time."""
        copies = self.take(self.rng.randint(1, 2))
        self.retries_left[spec.write] = RETRIES_PER_WRITE - copies

        async def copy(delay: float) -> None:
            await asyncio.sleep(delay)
            await self.call(spec, "retry", None, concurrent=True, schedule=False)

        await asyncio.gather(
            self.call(spec, "write", None, concurrent=True),
            *(copy(self.rng.uniform(0, 0.03)) for _ in range(copies)),
        )

    # -- one call --------------------------------------------------------------------

    async def call(
        self,
        spec: Spec,
        kind: str,
        keep: KeepAlive | None,
        *,
        concurrent: bool = False,
        schedule: bool = True,
    ) -> Record:
        rec = Record(
            n=len(self.records),
            kind=kind,
            write=spec.write,
            tool=spec.tool,
            method=spec.method,
            fault=spec.fault,
            hangup=spec.hangup,
            key=spec.key,
            trace_id=secrets.token_hex(16),
            concurrent=concurrent,
        )
        self.records.append(rec)
        if kind == "write" and spec.write not in self.retries_left:
            self.retries_left[spec.write] = RETRIES_PER_WRITE
        self.inflight += 1
        try:
            await self.exchange(spec, rec, keep)
        finally:
            self.inflight -= 1
            rec.t1 = time.time()
        if spec.write and schedule:
            self.after_write(spec, rec)
        return rec

    def after_write(self, spec: Spec, rec: Record) -> None:
        """An agent retries most failed writes (a while later); the others may be retried
        blindly at any time."""
        failed = rec.outcome != "answered" or (rec.status or 0) >= 500 or rec.status == 409
        left = self.retries_left.get(spec.write, 0)
        retry = replace(spec, hangup=None)
        if failed and left > 0 and self.rng.random() < 0.7:
            self.retries_left[spec.write] = left - 1
            when = time.monotonic() + self.rng.uniform(0.05, 3.0)
            heapq.heappush(self.retry_due, (when, rec.n, retry))
        elif left > 0:
            self.retry_pool.append(retry)

    async def connect(
        self, keep: KeepAlive | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        """A connection to the proxy (the worker's kept one if its proxy still lives), and
        the number of the proxy it was made to; waits while the proxy restarts."""
        if keep is not None and keep.writer is not None:
            assert keep.reader is not None
            if keep.gen == self.proxy.gen and not keep.writer.is_closing():
                return keep.reader, keep.writer, keep.gen
            keep.drop()
        deadline = time.monotonic() + PROXY_WAIT_S
        while True:
            if not self.proxy.ready.is_set():
                self.proxy_waits += 1
                while not self.proxy.ready.is_set() and not self.done.is_set():
                    if time.monotonic() >= deadline:
                        raise ConnectionRefusedError("no proxy")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.proxy.ready.wait(), 0.25)
            gen = self.proxy.gen
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
            except OSError:
                if time.monotonic() >= deadline or self.done.is_set():
                    raise
                self.proxy_waits += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proxy.ready.wait(), 0.5)
                await asyncio.sleep(0.02)
                continue
            if keep is not None:
                keep.reader, keep.writer, keep.gen = reader, writer, gen
            return reader, writer, gen

    async def exchange(self, spec: Spec, rec: Record, keep: KeepAlive | None) -> None:
        try:
            reader, writer, rec.gen = await self.connect(keep)
        except OSError:
            rec.outcome = "not_sent"
            return
        rec.t0 = time.time()
        try:
            writer.write(spec.request(self.host, rec.trace_id, secrets.token_hex(8)))
            await writer.drain()
            if spec.hangup is not None:
                await self.hang_up(spec, rec, reader, writer)
                return
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                status, headers = await read_head(reader)
                rec.status = status
                body = await read_body(reader, headers)
        except TimeoutError:
            rec.outcome = "client_timeout"
            self.forget(keep, writer)
            return
        except (Broken, OSError) as exc:
            got = exc.got if isinstance(exc, Broken) else False
            rec.outcome = "cut" if got and rec.status is not None else "lost"
            rec.killed = self.proxy.killed_during(rec.t0, rec.gen)
            self.forget(keep, writer)
            return
        rec.outcome = "answered"
        rec.code = error_code(status, body)
        rec.replayed = headers.get("idempotent-replayed") == "true"
        if spec.write and 200 <= status < 300:
            rec.answer_key = answer_key(body)
        parts = headers.get("traceresponse", "").split("-")
        rec.trace_ok = len(parts) == 4 and parts[1] == rec.trace_id
        if keep is None or headers.get("connection", "").lower() == "close":
            self.forget(keep, writer)

    async def hang_up(
        self, spec: Spec, rec: Record, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Close the connection before the answer, or once some of the body has arrived."""
        reset = self.rng.random() < 0.5
        try:
            if spec.hangup == "before":
                try:
                    async with asyncio.timeout(self.rng.uniform(0.0, 0.2)):
                        status, headers = await read_head(reader)
                        rec.status = status
                        body = await read_body(reader, headers)
                except TimeoutError:
                    rec.outcome = "hung_up"
                    return
                rec.outcome = "answered"  # it came in time after all
                rec.code = error_code(status, body)
                rec.replayed = headers.get("idempotent-replayed") == "true"
                return
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                rec.status, _ = await read_head(reader)
                await reader.read(64)
            rec.outcome = "hung_up"
        except TimeoutError:
            rec.outcome = "client_timeout"
        except (Broken, OSError):
            rec.outcome = "cut" if rec.status is not None else "lost"
            rec.killed = self.proxy.killed_during(rec.t0, rec.gen)
        finally:
            close_writer(writer, reset)

    @staticmethod
    def forget(keep: KeepAlive | None, writer: asyncio.StreamWriter) -> None:
        if keep is not None and keep.writer is writer:
            keep.drop()
        else:
            close_writer(writer)

    # -- fault injectors and watchers -------------------------------------------------

    def jitter(self, period: float) -> float:
        return period * self.rng.uniform(0.75, 1.25)

    async def pause(self, seconds: float) -> bool:
        """Sleep unless the soak ends first; True when it is still running."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), seconds)
        return not self.done.is_set()

    def fail(self, why: str) -> None:
        """The soak cannot go on (no proxy would start): stop the agents, report what we have."""
        self.fatal = why
        self.done.set()

    async def kill_loop(self) -> None:
        while await self.pause(self.jitter(self.opts.kill_every)):
            inflight, gen, at = self.inflight, self.proxy.gen, time.time()
            try:
                await self.proxy.kill9()
            except RuntimeError as exc:
                self.fail(str(exc))
            self.kills.append(
                {"at": at, "gen": gen, "calls_in_flight": inflight, "restart_s": time.time() - at}
            )

    async def cut_loop(self, relay: Relay, every: float, seconds: float) -> None:
        while await self.pause(self.jitter(every)):
            await relay.cut(seconds)

    async def sample_rss(self) -> None:
        while True:
            try:
                await self.proxy.check_alive()
            except RuntimeError as exc:
                self.fail(str(exc))
            sample = self.proxy.rss()
            if sample is not None:
                self.rss.append(
                    {
                        "t": round(time.time() - self.started, 1),
                        "gen": self.proxy.gen,
                        "calls": len(self.records),
                        "rss_kb": sample[0],
                        "proxy_rss_kb": sample[1],
                    }
                )
            if not await self.pause(self.opts.rss_every):
                return

    async def progress(self) -> None:
        last = 0
        while await self.pause(5.0):
            n = len(self.records)
            rss = self.rss[-1]["rss_kb"] / 1024 if self.rss else 0.0
            print(
                f"  {time.time() - self.started:6.0f} s  calls {n:>7}/{self.opts.calls}"
                f"  ({(n - last) / 5:5.0f}/s)  proxy #{self.proxy.gen}  kills {len(self.kills)}"
                f"  tool outages {len(self.gate.cuts)}"
                + (f"  store cuts {len(self.pg_relay.cuts)}" if self.pg_relay else "")
                + f"  RSS {rss:.0f} MiB",
                flush=True,
            )
            last = n


# -- reading back: the tool's ledger, the journal, the store -----------------------------


def tool_stats(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/__soak/stats"  # events of the keys run more than once
    with urllib.request.urlopen(url, timeout=60) as resp:
        stats: dict[str, Any] = json.loads(resp.read())
    return stats


JOURNAL_COLUMNS = (
    "trace_id",
    "time",
    "tool",
    "method",
    "idempotency_key",
    "replayed",
    "status",
    "error_code",
)
UNSETTLED_SQL = (
    "SELECT tool, key, state, reason FROM handrail_idempotency WHERE state <> 'completed'"
)


def read_sqlite(work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(journal rows, unsettled keys, keys in the store) from the SQLite files."""
    journal = work / "handrail-journal.db"
    rows: list[dict[str, Any]] = []
    if journal.exists():
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            sql = f"SELECT {', '.join(JOURNAL_COLUMNS)} FROM handrail_journal"
            rows = [dict(zip(JOURNAL_COLUMNS, r, strict=True)) for r in db.execute(sql)]
    with contextlib.closing(
        sqlite3.connect(f"file:{work / 'handrail.db'}?mode=ro", uri=True)
    ) as db:
        unsettled = [
            dict(zip(("tool", "key", "state", "reason"), r, strict=True))
            for r in db.execute(UNSETTLED_SQL)
        ]
        total = int(db.execute("SELECT count(*) FROM handrail_idempotency").fetchone()[0])
    return rows, unsettled, total


async def read_postgres(schema: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    import asyncpg

    conn = await asyncpg.connect(PG_URL, timeout=10, server_settings={"search_path": schema})
    try:
        sql = f"SELECT {', '.join(JOURNAL_COLUMNS)} FROM handrail_journal"
        rows = [dict(r) for r in await conn.fetch(sql)]
        unsettled = [dict(r) for r in await conn.fetch(UNSETTLED_SQL)]
        total = int(await conn.fetchval("SELECT count(*) FROM handrail_idempotency"))
    finally:
        await conn.close()
    return rows, unsettled, total


async def pg_schema(create: bool, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        if create:
            await conn.execute(f"CREATE SCHEMA {schema}")
        else:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


# -- the report ---------------------------------------------------------------------------


def mib(kb: int) -> float:
    return round(kb / 1024, 1)


def rss_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        return {}
    per_gen: dict[int, list[int]] = defaultdict(list)
    for s in samples:
        per_gen[s["gen"]].append(s["rss_kb"])
    return {
        "first_mib": mib(samples[0]["rss_kb"]),
        "last_mib": mib(samples[-1]["rss_kb"]),
        "max_mib": mib(max(s["rss_kb"] for s in samples)),
        "per_proxy": {
            str(g): {
                "first_mib": mib(v[0]),
                "last_mib": mib(v[-1]),
                "max_mib": mib(max(v)),
                "samples": len(v),
            }
            for g, v in sorted(per_gen.items())
        },
    }


KILL_AFTER_S = 5.0
"""A call the agent gave up on may still be running in the proxy this long afterwards."""


def journal_check(
    records: list[Record], rows: list[dict[str, Any]], kills: list[float], tool_traces: set[str]
) -> dict[str, Any]:
    """Every call that reached the proxy must have a row; compare each with what the agent saw.

    A call with no row is told apart by whether its request reached the tool (then it was
    decided and allowed, so its row is owed) or not (it may have died with its proxy before
    the decision, when no row is owed yet)."""
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_trace[row["trace_id"]].append(row)
    ours = {r.trace_id for r in records}
    result: dict[str, Any] = {
        "rows": len(rows),
        "interrupted_rows": sum(1 for r in rows if r["error_code"] == "interrupted"),
        "rows_of_no_soak_call": sum(1 for t in by_trace if t not in ours),
        "calls_with_more_than_one_row": sum(1 for t in ours if len(by_trace.get(t, ())) > 1),
    }
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    samples: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        if rec.outcome == "not_sent":
            continue
        group = rec.outcome + (" (kill -9)" if rec.killed else "")
        found = by_trace.get(rec.trace_id, [])
        if not found:
            reached = rec.trace_id in tool_traces
            state = "missing, reached the tool" if reached else "missing, not at the tool"
            if not rec.killed and any(rec.t0 <= at <= rec.t1 + KILL_AFTER_S for at in kills):
                state += ", kill -9 soon after"
        elif found[0]["error_code"] == "interrupted":
            state = "interrupted"
        elif rec.outcome == "answered" and found[0]["status"] != rec.status:
            state = "status differs"
        else:
            state = "ok"
        groups[group][state] += 1
        if state != "ok" and state != "interrupted" and len(samples[group]) < 5:
            samples[group].append(
                f"{rec.trace_id} {rec.kind} {rec.method} {rec.tool} fault={rec.fault} "
                f"hangup={rec.hangup} agent saw {rec.label}; {state}"
                + (f", row says {found[0]['status']} {found[0]['error_code']}" if found else "")
            )
    result["by_outcome"] = {g: dict(c) for g, c in sorted(groups.items())}
    answered = groups.get("answered", Counter())
    result["answered_missing_rows"] = sum(n for k, n in answered.items() if k.startswith("missing"))
    result["answered_rows_interrupted"] = answered.get("interrupted", 0)
    result["answered_status_differs"] = answered.get("status differs", 0)
    result["missing_rows"] = sum(
        n for c in groups.values() for k, n in c.items() if k.startswith("missing")
    )
    result["missing_rows_reached_tool"] = sum(
        n for c in groups.values() for k, n in c.items() if k.startswith("missing, reached")
    )
    result["samples"] = dict(samples)
    return result


def explain_key(
    key: str,
    stats: dict[str, Any],
    calls_by_trace: dict[str, Record],
    rows_by_key: dict[str, list[dict[str, Any]]],
    faults: list[tuple[float, str]],
    t0: float,
) -> dict[str, Any]:
    """Everything known of one key that took effect more than once: the tool's history, the
    calls that carried it (by the journal's rows and the trace ids the tool saw), and the
    injected faults around it."""
    events = [(t, what) for t, what in stats["events"].get(key, [])]
    rows = sorted(rows_by_key.get(key, []), key=lambda r: r["time"])
    traces = {r["trace_id"] for r in rows}
    traces.update(what.split("[trace ", 1)[1][:32] for _, what in events if "[trace " in what)
    calls = sorted((calls_by_trace[t] for t in traces if t in calls_by_trace), key=lambda c: c.t0)
    times = [t for t, _ in events] + [r["time"] for r in rows] or [t0]
    lo, hi = min(times) - 5, max(times) + 5
    return {
        "key": key,
        "executions": stats["executions"].get(key, 0),
        "tool": [f"{t - t0:9.3f}s {what}" for t, what in events],
        "calls": [
            f"{c.t0 - t0:9.3f}s {c.kind}{' (concurrent)' if c.concurrent else ''} {c.method} "
            f"{c.tool} fault={c.fault} hangup={c.hangup} -> {c.label} [trace {c.trace_id}]"
            for c in calls
        ],
        "journal": [
            f"{r['time'] - t0:9.3f}s {r['method']} {r['tool']} status={r['status']} "
            f"error={r['error_code']} replayed={bool(r['replayed'])} [trace {r['trace_id']}]"
            for r in rows
        ],
        "faults_nearby": [f"{t - t0:9.3f}s {what}" for t, what in faults if lo <= t <= hi],
    }


def pattern(detail: dict[str, Any]) -> str:
    """How a key came to take effect twice, in the tool's words: ``PUT: close, ok``."""
    whats = [
        line.split(" executed ", 1)[1].strip("()")
        for line in detail["tool"]
        if " executed " in line
    ]
    methods = sorted({line.split()[1] for line in detail["tool"]})
    return f"{'/'.join(methods)}: {', '.join(whats)}"


def build_report(
    opts: Options,
    soak: Soak,
    stats: dict[str, Any],
    rows: list[dict[str, Any]],
    unsettled: list[dict[str, Any]],
    store_keys: int,
    elapsed: float,
    spool_left: int,
) -> dict[str, Any]:
    records = soak.records
    sent = [r for r in records if r.outcome != "not_sent"]
    answers = Counter(r.label for r in records)
    executions: dict[str, int] = stats["executions"]
    twice = sorted(k for k, n in executions.items() if n > 1)
    rows_by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["idempotency_key"]:
            rows_by_key[row["idempotency_key"]].append(row)
    t0 = soak.started
    faults = sorted(
        [
            (k["at"], f"kill -9 of proxy #{k['gen']} ({k['calls_in_flight']} calls in flight)")
            for k in soak.kills
        ]
        + [(t, f"tool gate down {s:g} s ({n} connections aborted)") for t, s, n in soak.gate.cuts]
        + (
            [
                (t, f"store relay cut {s:g} s ({n} connections aborted)")
                for t, s, n in soak.pg_relay.cuts
            ]
            if soak.pg_relay
            else []
        )
    )
    by_trace = {r.trace_id: r for r in records}
    details = [explain_key(k, stats, by_trace, rows_by_key, faults, t0) for k in twice[:2000]]
    key_of_trace = {row["trace_id"]: row["idempotency_key"] for row in rows}
    wrong_key = [
        r.trace_id
        for r in records
        if r.answer_key is not None and r.answer_key != (key_of_trace.get(r.trace_id) or r.key)
    ]
    unknown_answers = [r for r in records if r.code == "outcome_unknown"]
    unknown_keys_seen = {
        key_of_trace.get(r.trace_id) or r.key or r.trace_id for r in unknown_answers
    }
    kinds = Counter(r.kind + (" (concurrent)" if r.concurrent else "") for r in records)
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "elapsed_s": round(elapsed, 1),
        "calls": {
            "total": len(records),
            "sent": len(sent),
            "not_sent_proxy_down": len(records) - len(sent),
            "rate_per_s": round(len(records) / elapsed, 1) if elapsed else 0.0,
            "by_kind": dict(sorted(kinds.items())),
            "by_fault": dict(sorted(Counter(r.fault for r in records).items())),
            "hang_ups": dict(Counter(r.hangup for r in records if r.hangup)),
            "agent_waits_for_proxy": soak.proxy_waits,
            "traceresponse_mismatch": sum(1 for r in records if r.trace_ok is False),
            "answers_of_another_key": len(wrong_key),
            "answers_of_another_key_examples": wrong_key[:10],
        },
        "answers": dict(answers.most_common()),
        "faults": {
            "kills": len(soak.kills),
            "kill_details": soak.kills,
            "tool_outages": len(soak.gate.cuts),
            "store_cuts": len(soak.pg_relay.cuts) if soak.pg_relay else 0,
            "proxy_deaths_not_ours": soak.proxy.died_alone,
            "proxy_start_failures": soak.proxy.start_failures,
            "fatal": soak.fatal,
            "proxies": soak.proxy.history,
        },
        "tool": {
            "requests": stats["requests"],
            "reads": stats["reads"],
            "unkeyed_writes": stats["unkeyed_writes"],
            "keys_executed": len(executions),
            "executions": sum(executions.values()),
            "max_executions_per_key": max(executions.values(), default=0),
            "keys_executed_more_than_once": len(twice),
            "keys_answered_5xx": len(stats["failures"]),
            "details": details,
            "patterns": dict(Counter(pattern(d) for d in details).most_common()),
        },
        "outcome_unknown": {
            "keys_in_store": sum(1 for u in unsettled if u["state"] == "unknown"),
            "keys_left_in_flight": sum(1 for u in unsettled if u["state"] == "in_flight"),
            "by_reason": dict(
                Counter(
                    (u["reason"] or "lease_expired")
                    if u["state"] == "unknown"
                    else "in flight (orphaned by kill -9)"
                    for u in unsettled
                )
            ),
            "answers_409_outcome_unknown": len(unknown_answers),
            "keys_answered_409_outcome_unknown": len(unknown_keys_seen),
            "store_keys_total": store_keys,
        },
        "journal": journal_check(
            records, rows, [at for at, _ in soak.proxy.kill_windows], set(stats["traces"])
        )
        | {"spool_files_left": spool_left},
        "rss": rss_summary(soak.rss),
        "rss_samples": soak.rss,
        "passed": not twice,
    }


def print_faults(report: dict[str, Any]) -> None:
    calls, faults, opts = report["calls"], report["faults"], report["options"]
    print(
        f"Soak: {calls['total']} calls in {report['elapsed_s']} s ({calls['rate_per_s']}/s), "
        f"store {opts['store']}, concurrency {opts['concurrency']}, seed {opts['seed']}"
    )
    print(
        f"Faults: {faults['kills']} kill -9, {faults['tool_outages']} tool outages, "
        f"{faults['store_cuts']} store cuts; proxy deaths not ours: "
        f"{len(faults['proxy_deaths_not_ours'])}; proxies that would not start: "
        f"{len(faults['proxy_start_failures'])}"
    )
    whys = Counter(f["why"] for f in faults["proxy_start_failures"])
    for why, n in whys.most_common(3):
        print(f"  {n} x would not start: {why[:160]}")
    stop_s = faults["final_stop_s"]
    if stop_s is not None:
        late = " (SIGKILL: it did not exit in time)" if stop_s >= STOP_TIMEOUT_S else ""
        print(f"  the last proxy took {stop_s:.1f} s to stop on SIGTERM{late}")
    if faults["spool_recovery"]:
        rec = faults["spool_recovery"]
        print(
            f"  it left {rec['spool_files_before']} spool files: a recovery proxy read them back "
            f"({rec['spool_files_after']} left)"
        )
    if faults["fatal"]:
        print(f"  THE SOAK STOPPED EARLY: {faults['fatal']}")


def print_calls(report: dict[str, Any]) -> None:
    calls = report["calls"]
    print("Calls: " + ", ".join(f"{k} {v}" for k, v in calls["by_kind"].items()))
    print(
        "  faults asked of the tool: " + ", ".join(f"{k} {v}" for k, v in calls["by_fault"].items())
    )
    print(
        f"  hang-ups: {calls['hang_ups']}; not sent (no proxy for {PROXY_WAIT_S:g} s): "
        f"{calls['not_sent_proxy_down']}; traceresponse mismatches: {calls['traceresponse_mismatch']}; "
        f"2xx answers naming another key: {calls['answers_of_another_key']}"
    )
    print("\n  answer                                           calls")
    for label, n in report["answers"].items():
        print(f"  {label:<48} {n:>6}")


def print_tool(report: dict[str, Any]) -> None:
    tool = report["tool"]
    print(
        f"\nTool: {tool['requests']} requests, {tool['keys_executed']} keys took effect "
        f"({tool['executions']} executions), max per key {tool['max_executions_per_key']}, "
        f"keys executed more than once: {tool['keys_executed_more_than_once']}"
    )
    if tool["patterns"]:
        print("  how (the tool's history of each such key: method: what each execution was):")
        for how, n in tool["patterns"].items():
            print(f"    {n:>6}  {how}")
    shown: Counter[str] = Counter()
    for detail in tool["details"]:
        how = pattern(detail)
        shown[how] += 1
        if shown[how] > 2:
            continue  # two examples of each
        print(f"  key {detail['key']}: {detail['executions']} executions ({how})")
        for source in ("tool", "calls", "journal", "faults_nearby"):
            for line in detail[source]:
                print(f"     {source.split('_')[0]:<8}{line}")


def print_journal(report: dict[str, Any]) -> None:
    unknown, journal = report["outcome_unknown"], report["journal"]
    print(
        f"Outcome unknown: {unknown['keys_in_store']} keys unknown in the store, "
        f"{unknown['keys_left_in_flight']} left in flight by a kill (unknown once their lease ends); "
        f"by reason {unknown['by_reason']}; {unknown['answers_409_outcome_unknown']} answers "
        f"409 outcome_unknown for {unknown['keys_answered_409_outcome_unknown']} keys"
    )
    print(
        f"Journal: {journal['rows']} rows ({journal['interrupted_rows']} interrupted, "
        f"{journal['rows_of_no_soak_call']} of no soak call, "
        f"{journal['calls_with_more_than_one_row']} calls with >1 row); "
        f"missing rows: {journal['missing_rows']} (of answered calls: "
        f"{journal['answered_missing_rows']}, of calls that reached the tool: "
        f"{journal['missing_rows_reached_tool']}); "
        f"answered but the row is interrupted: {journal['answered_rows_interrupted']}; "
        f"status differs: {journal['answered_status_differs']}; spool files left: {journal['spool_files_left']}"
    )
    print("  calls by what the agent saw, and their rows:")
    for group, states in journal["by_outcome"].items():
        print(f"    {group:<26} " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    for group, lines in journal["samples"].items():
        for line in lines:
            print(f"    e.g. {group}: {line}")


def print_rss(report: dict[str, Any]) -> None:
    rss = report["rss"]
    if not rss:
        return
    print(
        f"RSS (proxy + policy workers): first {rss['first_mib']} MiB, last {rss['last_mib']} MiB, "
        f"max {rss['max_mib']} MiB over {len(report['rss_samples'])} samples"
    )
    print(
        "  per proxy (first -> last, max): "
        + ", ".join(
            f"#{g} {p['first_mib']} -> {p['last_mib']} ({p['max_mib']})"
            for g, p in rss["per_proxy"].items()
        )
    )


def print_report(report: dict[str, Any]) -> None:
    print()
    print_faults(report)
    print_calls(report)
    print_tool(report)
    print_journal(report)
    print_rss(report)
    tool = report["tool"]
    print(
        "\nResult: "
        + (
            "PASS: no key took effect more than once"
            if report["passed"]
            else f"FAIL: {tool['keys_executed_more_than_once']} keys took effect more than once"
        )
    )


# -- main ---------------------------------------------------------------------------------


def write_config(work: Path, store_url: str, ports: dict[str, int]) -> Path:
    tool_port = ports["tool"]
    config = {
        "listen": {"host": "127.0.0.1", "port": ports["proxy"]},
        "admin": {"host": "127.0.0.1", "port": ports["admin"]},
        "tools": {
            "api": {"upstream": f"http://127.0.0.1:{tool_port}", **TOOLS["api"]},
            "slow": {"upstream": f"http://127.0.0.1:{tool_port}", **TOOLS["slow"]},
            "flaky": {"upstream": f"http://127.0.0.1:{ports['gate']}", **TOOLS["flaky"]},
        },
        "policy": {"engine": "embedded", "path": str(ROOT / "policies"), "watch": False},
        "store": {"url": store_url},
        "tracing": {"exporter": "none"},
    }
    path = work / "handrail.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def spool_files(work: Path) -> int:
    return sum(1 for _ in work.rglob("*.jsonl"))


async def recover_spool(proxy: Proxy, work: Path) -> dict[str, Any] | None:
    """If the last proxy left journal entries in its spool (it had to be killed), start one
    more proxy, as the next deployment would, so that it reads them into the journal."""
    left = spool_files(work)
    if not left:
        return None
    print(f"soak: {left} spool files left; starting a proxy to recover them", flush=True)
    stop_before = proxy.stop_s
    proxy.gen += 1
    await proxy.start()
    for _ in range(60):  # up to 15 s
        if not spool_files(work):
            break
        await asyncio.sleep(0.25)
    await proxy.stop()
    return {
        "spool_files_before": left,
        "spool_files_after": spool_files(work),
        "last_stop_s": stop_before,
        "recovery_proxy_stop_s": proxy.stop_s,
    }


async def soak_main(opts: Options) -> int:
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    for old in (*out.glob("proxy-*.log"), out / "tool.log"):
        old.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="handrail-soak-"))
    schema = f"handrail_soak_{secrets.token_hex(6)}"
    ports = {"tool": free_port(), "proxy": free_port(), "admin": free_port()}
    tool = start_child(
        [PY, str(ROOT / "bench" / "soak_tool.py"), "--port", str(ports["tool"])],
        out / "tool.log",
        ROOT,
    )
    gate = Relay("tool gate", ports["tool"])
    pg_relay: Relay | None = None
    proxy: Proxy | None = None
    schema_made = False
    print(f"soak: seed {opts.seed}, store {opts.store}, work dir {work}, out {out}", flush=True)
    try:
        await wait_port(ports["tool"], tool, "the counting tool")
        ports["gate"] = await gate.start()
        if opts.store == "postgresql":
            await pg_schema(True, schema)
            schema_made = True
            pg_relay = Relay("postgresql relay", PG_PORT)
            relay_port = await pg_relay.start()
            store_url = f"postgresql://postgres@127.0.0.1:{relay_port}/test?search_path={schema}"
        else:
            store_url = f"sqlite:///{work / 'handrail.db'}"
        config = write_config(work, store_url, ports)
        proxy = Proxy(config, work, out, ports["proxy"], ports["admin"])
        await proxy.start()
        soak = Soak(opts, proxy, gate, pg_relay)
        started = time.time()
        try:
            await soak.run()
        finally:
            if pg_relay is not None and pg_relay.server is None:
                await pg_relay.start()
            if gate.server is None:
                await gate.start()
        elapsed = time.time() - started
        print(f"soak: {len(soak.records)} calls in {elapsed:.0f} s; stopping the proxy", flush=True)
        await proxy.stop()
        final_stop_s = proxy.stop_s
        recovery = await recover_spool(proxy, work)
        stats = await asyncio.to_thread(tool_stats, ports["tool"])
        if opts.store == "postgresql":
            rows, unsettled, store_keys = await read_postgres(schema)
        else:
            rows, unsettled, store_keys = await asyncio.to_thread(read_sqlite, work)
        report = build_report(
            opts, soak, stats, rows, unsettled, store_keys, elapsed, spool_files(work)
        )
        report["faults"]["spool_recovery"] = recovery
        report["faults"]["final_stop_s"] = final_stop_s
        with (out / "calls.jsonl").open("w") as f:
            for rec in soak.records:
                f.write(json.dumps({k: getattr(rec, k) for k in Record.__slots__}) + "\n")
        (out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
        print_report(report)
        print(
            f"report: {out / 'soak.json'} (calls: {out / 'calls.jsonl'}, logs: {out}/proxy-*.log)"
        )
        if not report["passed"]:
            return 1
        return 2 if soak.fatal else 0
    finally:
        if proxy is not None:
            await proxy.stop()
        await stop_child(tool, 10)
        await gate.close()
        if pg_relay is not None:
            await pg_relay.close()
        if schema_made and not opts.keep:
            with contextlib.suppress(Exception):
                await pg_schema(False, schema)
        if opts.keep:
            print(f"kept: {work}" + (f", schema {schema}" if schema_made else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)


def cancel_on_signals() -> None:
    """SIGINT and SIGTERM cancel the soak, once: its ``finally`` clauses then stop every child
    process, close the relays and drop the schema (a second signal is ignored)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    cancelled = False

    def cancel() -> None:
        nonlocal cancelled
        if task is not None and not cancelled:
            cancelled = True
            print("soak: interrupted; cleaning up", file=sys.stderr, flush=True)
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel)


async def guarded_main(opts: Options) -> int:
    cancel_on_signals()
    return await soak_main(opts)


def main(argv: Iterable[str] | None = None) -> int:
    opts = parse_options(list(argv) if argv is not None else None)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        return run(guarded_main(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
