"""Real faults on loopback for the "never twice, never lost" tests, no mocks.

- ``fault_tool_app``: a fake HTTP tool that counts what reaches it and keeps the exact
  bytes it answered (slow, 5xx, chunked streams, paced answers with a Content-Length);
  ``running_app`` serves it as a real server does (no handler cancelled on a hang-up).
- ``running_proxy`` / ``proxy_starter``: the production ``proxy.server.Server`` (data and
  admin listeners) in the test's loop. aiohttp's test server would cancel the proxy's
  handler when the agent hangs up, which ``handrail serve`` never does.
- ``hang_up``: an agent on a raw TCP socket that sends its request by hand and hangs up
  (RST with ``SO_LINGER 0``, or a plain close) at a chosen moment of the answer.
- ``HangUpTool``: a raw asyncio "tool" that reads the request and then breaks the
  connection (closes, resets, or answers part of a response).
- ``start_serve``: ``handrail serve`` in a child process (optionally under ``prlimit
  --fsize``), with both its data and admin URLs, that a test can ``kill -9``.
- ``PinnedRelay``: a ``PostgresRelay`` that comes back on the port it had.
- ``metric``: one sample of the admin plane's ``/metrics``.
- ``start_fault_mcp``: a FastMCP server (Streamable HTTP, SSE answers) whose tools count
  their executions, behind an ASGI layer that counts the tools/calls reaching it and can
  end a call's stream without its response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from aiohttp import web
from fastmcp import Context, FastMCP
from fastmcp.server.middleware import Middleware
from mcp.shared.exceptions import MCPError
from yarl import URL

from proxy.config import Config
from proxy.mcp.jsonrpc import SseParser
from proxy.server import Server
from tests.conftest import Seen
from tests.support_idempotency import REPO
from tests.support_relay import PostgresRelay

# -- the fake HTTP tool -----------------------------------------------------------------


def fault_tool_app(seen: Seen) -> web.Application:
    """Each request is one entry of ``seen.requests`` with ``sent`` (the body bytes it
    answered), ``done`` (its answer was written to the end) and ``ended`` (it finished,
    answered or not).

    Query: ``sleep=S`` (or the header ``X-Tool-Sleep``, which is not part of the call's
    fingerprint) before answering, ``status=N``; ``stream=N&size=M&gap=S``: N chunks
    of M bytes, chunked (no Content-Length); ``paced=N&size=M&gap=S``: the same with a
    Content-Length; otherwise a JSON answer naming the request's number.
    """

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "headers": dict(request.headers),
            "body": body,
            "sent": b"",
            "done": False,
            "ended": False,
        }
        seen.requests.append(entry)
        try:
            return await _answer(request, entry)
        finally:
            entry["ended"] = True

    async def _answer(request: web.Request, entry: dict[str, Any]) -> web.StreamResponse:
        query = request.query
        status = int(query.get("status", "200"))
        if delay := float(request.headers.get("X-Tool-Sleep", query.get("sleep", "0"))):
            await asyncio.sleep(delay)
        if "stream" in query or "paced" in query:
            count = int(query.get("stream") or query["paced"])
            size, gap = int(query.get("size", "1024")), float(query.get("gap", "0"))
            response = web.StreamResponse(status=status, headers={"Content-Type": "text/plain"})
            if "paced" in query:
                response.content_length = count * size
            await response.prepare(request)
            for i in range(count):
                chunk = bytes([65 + i % 26]) * size
                await response.write(chunk)
                entry["sent"] += chunk
                if gap and i < count - 1:
                    await asyncio.sleep(gap)
            await response.write_eof()
            entry["done"] = True
            return response
        payload = json.dumps({"n": len(seen.requests), "path": entry["path"]}).encode()
        entry["sent"], entry["done"] = payload, True
        return web.Response(status=status, body=payload, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@asynccontextmanager
async def running_app(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 as a real server does: a handler is not cancelled when
    its client goes away (aiohttp's test server cancels it)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1]
        yield f"http://127.0.0.1:{bound}"
    finally:
        await runner.cleanup()


@dataclass
class Proxy:
    """A running proxy as an agent and an operator reach it."""

    url: str
    admin_url: str
    session: aiohttp.ClientSession

    @property
    def host(self) -> str:
        return str(URL(self.url).host)

    @property
    def port(self) -> int:
        return int(URL(self.url).port or 0)

    def tool_url(self, tool: str, rest: str = "") -> str:
        return f"{self.url}/tools/{tool}{rest}"

    async def metrics(self) -> str:
        async with self.session.get(f"{self.admin_url}/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, f"{self.admin_url}{path}", json=body) as response:
            return response.status, await response.json(content_type=None)


@asynccontextmanager
async def running_proxy(config: Config, session: aiohttp.ClientSession) -> AsyncIterator[Proxy]:
    """The production server (``proxy.server.Server``: both listeners, as ``handrail serve``
    runs them) in this event loop, on ports the OS picks."""
    listen = config.listen.model_copy(update={"port": 0})
    admin = config.admin.model_copy(update={"port": 0})
    server = Server(config.model_copy(update={"listen": listen, "admin": admin}), grace_s=5)
    where = await server.start()
    try:
        yield Proxy(where.data_url, where.admin_url, session)
    finally:
        await server.stop()


ALLOW_ALL = """package handrail

import rego.v1

default allow := true

default visible := true

decision := {"allow": allow, "reasons": set(), "require_approval": false}
"""

StartProxy = Callable[..., Awaitable[Proxy]]


def proxy_starter(
    stack: contextlib.AsyncExitStack, make_config: Callable[..., Config]
) -> StartProxy:
    """``start(tools, **sections)``: a running proxy on the conftest config, closed with
    ``stack``."""

    async def start(tools: dict[str, Any], **sections: Any) -> Proxy:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        config = make_config(tools, **sections)
        return await stack.enter_async_context(running_proxy(config, session))

    return start


# -- the agent that hangs up ------------------------------------------------------------


class Cut(StrEnum):
    """When the agent hangs up."""

    BEFORE_ANSWER = "before_answer"  # the tool has the request; nothing came back yet
    AFTER_HEADERS = "after_headers"  # the answer's head arrived, none of its body read
    MID_BODY = "mid_body"  # part of the body read
    BEFORE_END = "before_end"  # all but the last part of the body read


@dataclass
class Heard:
    """What the agent had received when it hung up."""

    head: bytes = b""
    body: bytes = b""

    @property
    def status(self) -> int | None:
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.head)
        return int(match.group(1)) if match else None


def http_request(
    method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """The request's bytes, as a hand-written client sends them."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def hang_up(
    host: str,
    port: int,
    request: bytes,
    cut: Cut,
    *,
    ready: Callable[[], bool] | None = None,
    body_bytes: int = 0,
    rst: bool = True,
    timeout_s: float = 10.0,
) -> Heard:
    """Send ``request`` on a fresh socket and hang up at ``cut``.

    ``BEFORE_ANSWER`` hangs up once ``ready()`` is true (the tool has the call) and nothing
    was received; ``MID_BODY`` and ``BEFORE_END`` once at least ``body_bytes`` bytes of
    the body (as sent on the wire) were read. ``rst``: an abortive close (RST), else FIN.
    """
    reader, writer = await asyncio.open_connection(host, port)
    heard = Heard()
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request)
            await writer.drain()
            if cut is Cut.BEFORE_ANSWER:
                assert ready is not None
                while not ready():
                    await asyncio.sleep(0.005)
                return heard
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = await reader.read(1)
                if not chunk:
                    raise AssertionError(f"the proxy closed before the head ended: {raw!r}")
                raw += chunk
            heard.head = raw
            if cut is Cut.AFTER_HEADERS:
                return heard
            while len(heard.body) < body_bytes:
                chunk = await reader.read(body_bytes - len(heard.body))
                if not chunk:
                    raise AssertionError(
                        f"the answer ended after {len(heard.body)} body bytes, "
                        f"before the cut at {body_bytes}"
                    )
                heard.body += chunk
            return heard
    finally:
        if rst:
            _reset_on_close(writer)
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# -- a tool that breaks the connection ----------------------------------------------------


class Break(StrEnum):
    """What the raw tool does once it has read a request."""

    CLOSE = "close"  # closes (FIN) without a byte of answer
    RESET = "reset"  # resets (RST) without a byte of answer
    PARTIAL_BODY = "partial_body"  # a head with Content-Length: 100, 10 bytes, then closes
    PARTIAL_CHUNKED = "partial_chunked"  # a chunked head, one chunk, then closes


class HangUpTool:
    """A raw asyncio server in place of a tool; ``requests`` counts the requests it read."""

    def __init__(self, behaviour: Break) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            self.requests += 1
            if self.behaviour is Break.RESET:
                _reset_on_close(writer)
                writer.transport.abort()
                return
            if self.behaviour is Break.PARTIAL_BODY:
                writer.write(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n" + b'{"id": 1, '
                )
            elif self.behaviour is Break.PARTIAL_CHUNKED:
                writer.write(
                    b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
                )
                await writer.drain()
                await asyncio.sleep(0.2)
            await writer.drain()
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            writer.transport.abort()


# -- handrail serve in a child process ----------------------------------------------------

_LISTENING = re.compile(r"handrail listening on (http://\S+) .*admin on (http://\S+)")


@dataclass
class ServeProcess:
    """``handrail serve`` in a child process; its stderr is kept in ``log``."""

    process: asyncio.subprocess.Process
    url: str
    admin_url: str
    log: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def tool_url(self, tool: str, rest: str) -> str:
        return f"{self.url}/tools/{tool}{rest}"

    def kill(self) -> None:
        """SIGKILL: no cleanup, no settling of keys: a crash."""
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
        if self.drain is not None:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await asyncio.wait_for(self.drain, 5)

    def text(self) -> str:
        return "".join(self.log)


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))


async def start_serve(config: Path, *, fsize: int | None = None) -> ServeProcess:
    """``python -m proxy.cli serve -c CONFIG``; with ``fsize``, under ``prlimit`` with that
    soft limit on the size of the files it writes (the hard limit stays unlimited, so
    ``set_fsize`` can move the soft one later)."""
    command = [sys.executable, "-m", "proxy.cli", "serve", "-c", str(config)]
    if fsize is not None:
        command = ["prlimit", f"--fsize={fsize}:unlimited", "--", *command]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    log: list[str] = []
    drain = asyncio.ensure_future(_drain(process.stderr, log))
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    await process.wait()
                    await drain
                    raise AssertionError(f"handrail serve exited ({process.returncode}): {log}")
                if match := _LISTENING.search(line):
                    return ServeProcess(process, match.group(1), match.group(2), log, drain)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise


async def set_fsize(pid: int, soft: int | str) -> None:
    """Move a running process's soft limit on file size (``prlimit --pid``)."""
    process = await asyncio.create_subprocess_exec(
        "prlimit", "--pid", str(pid), f"--fsize={soft}:unlimited", stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


@asynccontextmanager
async def serving(config: Path, *, fsize: int | None = None) -> AsyncIterator[ServeProcess]:
    proxy = await start_serve(config, fsize=fsize)
    try:
        yield proxy
    finally:
        proxy.kill()
        await proxy.stop()


def write_json_config(path: Path, raw: dict[str, Any]) -> Path:
    config = {"listen": {"port": 0}, "admin": {"port": 0}, "tracing": {"exporter": "none"}, **raw}
    path.write_text(json.dumps(config))
    return path


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


async def handrail_cli(*args: str) -> Ran:
    """``python -m proxy.cli ARGS`` as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


# -- PostgreSQL that goes away and comes back -------------------------------------------


class PinnedRelay(PostgresRelay):
    """A relay that can be started on a given port: the same port after a stop."""

    async def start(self, port: int = 0) -> int:  # type: ignore[override]
        self.writers = []
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", port, reuse_address=True)
        bound: int = self.server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self.server is not None:
            await super().stop()
            self.server = None


def with_port(url: str, port: int) -> str:
    """The PostgreSQL URL ``url`` (127.0.0.1:5432) pointed at ``port`` instead."""
    return url.replace("127.0.0.1:5432", f"127.0.0.1:{port}", 1)


# -- metrics ------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == name and not labels:
            return float(value)
        if sample.startswith(name + "{"):
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample[len(name) :]))
            if have == labels:
                return float(value)
    return 0.0


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


# -- an MCP server with faults ------------------------------------------------------------


@dataclass
class FaultMcp:
    url: str
    executions: Counter[str] = field(default_factory=Counter)
    """How many times each tool's body ran."""
    arrivals: Counter[str] = field(default_factory=Counter)
    """How many tools/calls for each name reached the server (run or refused)."""
    vanish: set[str] = field(default_factory=set)
    """Tools whose answer stream is ended without the call's response."""


def _build_mcp(state: FaultMcp) -> Any:
    executions = state.executions
    mcp: Any = FastMCP("handrail-faults")

    class ProtocolErrors(Middleware):  # type: ignore[misc]
        """Unknown tools and bad arguments of ``picky`` as JSON-RPC errors (-32602)."""

        async def on_call_tool(self, context: Any, call_next: Any) -> Any:
            name = context.message.name
            if name not in {"charge", "slow", "vanish", "progressing", "silent", "picky"}:
                raise MCPError(-32602, f"Unknown tool: {name}")
            if name == "picky" and not isinstance((context.message.arguments or {}).get("n"), int):
                raise MCPError(-32602, "Invalid params: n must be an integer")
            return await call_next(context)

    mcp.add_middleware(ProtocolErrors())

    @mcp.tool
    async def charge(amount: int, wait: float = 0.0) -> str:
        """Charges once per execution."""
        executions["charge"] += 1
        n = executions["charge"]
        if wait:
            await asyncio.sleep(wait)
        return f"charged {amount} (execution #{n})"

    @mcp.tool
    async def vanish(amount: int) -> str:
        """Runs; its response never reaches the client (see ``_Vanisher``)."""
        executions["vanish"] += 1
        return f"vanished {amount}"

    @mcp.tool
    async def slow(seconds: float) -> str:
        executions["slow"] += 1
        await asyncio.sleep(seconds)
        return "slow done"

    @mcp.tool
    async def progressing(seconds: float, every: float, ctx: Context) -> str:
        """Reports progress every ``every`` seconds for ``seconds``."""
        executions["progressing"] += 1
        steps = max(1, round(seconds / every))
        for i in range(steps):
            await ctx.report_progress(i, steps, f"step {i}")
            await asyncio.sleep(every)
        return f"progressed {steps} steps"

    @mcp.tool
    async def silent(seconds: float, ctx: Context) -> str:
        """One progress event, then silence for ``seconds``."""
        executions["silent"] += 1
        await ctx.report_progress(0, 1, "started")
        await asyncio.sleep(seconds)
        return "silent done"

    @mcp.tool
    async def picky(n: int) -> str:
        executions["picky"] += 1
        return f"picked {n}"

    return mcp


class _Vanisher:
    """ASGI layer: counts tools/calls, and ends a vanishing call's stream without its
    response (the server stops writing just before the JSON-RPC response event)."""

    def __init__(self, app: Any, state: FaultMcp) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        name = None
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict) and parsed.get("method") == "tools/call":
                name = str(parsed["params"]["name"])
                self.state.arrivals[name] += 1
        except (ValueError, KeyError, TypeError):
            pass
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if name not in self.state.vanish:
            await self.app(scope, replay, send)
            return
        ended = False

        async def cut(message: Any) -> None:
            nonlocal ended
            if ended:
                return
            if message["type"] == "http.response.body":
                data = message.get("body", b"")
                if b'"result"' in data or b'"error"' in data:
                    ended = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
            await send(message)

        await self.app(scope, replay, cut)


@contextmanager
def start_fault_mcp(*, stateless: bool = True) -> Iterator[FaultMcp]:
    """A FastMCP server (SSE answers) on loopback, in a thread of its own; stateless (no
    sessions: each POST stands alone) unless ``stateless`` is false."""
    state = FaultMcp(url="")
    app = _build_mcp(state).http_app(path="/mcp", stateless_http=stateless)
    config = uvicorn.Config(
        _Vanisher(app, state), host="127.0.0.1", port=0, log_level="critical", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fault-mcp-server", daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the MCP fault server did not start")
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("the MCP fault server did not start in time")
        port = server.servers[0].sockets[0].getsockname()[1]
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=5)


MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-11-25",
}


def tools_call(request_id: Any, name: str, arguments: dict[str, Any], **meta: Any) -> bytes:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    return json.dumps(message).encode()


def jsonrpc_messages(content_type: str, body: bytes) -> list[Any]:
    """The JSON-RPC messages of an answer, JSON or SSE."""
    if content_type.startswith("text/event-stream"):
        return [json.loads(e.data) for e in SseParser().feed(body) if e.data]
    return [json.loads(body)] if body.strip() else []
