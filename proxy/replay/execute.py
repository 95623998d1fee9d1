"""``--execute``: a recorded run re-issued, in order, through a running proxy.

Each call goes out under the run ``replay-<id>`` with a fresh idempotency key derived from
the replay id and the call's recorded key, so a second attempt of the same replay sends the
same keys and the proxy answers from its store instead of running anything twice (and two
calls that shared a key, a retry the proxy replayed, share one again). Safe calls (GET,
HEAD) carry no key: they run each time. A call whose input was redacted or truncated in the
record cannot be rebuilt and is not sent.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.mcp.jsonrpc import SseParser
from proxy.replay.answers import Answer, Judgement, Outcome, judge
from proxy.replay.source import RecordedCall, RecordedRun
from proxy.replay.whatif import overlaps
from proxy.tracing.redact import REDACTED, Redactor, capture_body

MCP_VERSION = "2025-06-18"
"""The revision replay speaks to an MCP endpoint (with the handshake every server knows)."""
_TRUNCATED = re.compile(r"\.\.\.\[truncated \d+ bytes\]$")
_BINARY = re.compile(r"^\[\d+ bytes of binary data\]$")


class ProxyUnreachable(Exception):
    """The proxy to re-issue through did not answer."""


class NotExecutable(Exception):
    """The record lacks part of what the call sent."""


def replay_id(run: str, salt: str | None = None) -> str:
    """The same run (and salt) always gives the same id: a repeated replay runs nothing."""
    return hashlib.sha256(f"{salt or ''}\0{run}".encode()).hexdigest()[:16]


def replay_key(rid: str, call: RecordedCall) -> str:
    basis = call.idempotency_key or f"#{call.position}"
    return "replay-" + hashlib.sha256(f"{rid}\0{basis}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A recorded call as it will be sent again."""

    method: str
    target: str
    """``/tools/{tool}{path}?{query}``, as recorded (already canonical)."""
    body: bytes | None
    content_type: str | None
    mcp_arguments: dict[str, Any] | None = None


def _from_text(text: str | None, what: str) -> str:
    if text is None:
        raise NotExecutable(f"its {what} was not captured")
    if REDACTED in text:
        raise NotExecutable(f"its {what} was redacted")
    if _TRUNCATED.search(text) or _BINARY.match(text):
        raise NotExecutable(f"its {what} was cut at the capture limit")
    return text


def _kept_part(call: RecordedCall, path: tuple[str, str]) -> tuple[bool, Any]:
    """(found, value) of a part of the kept document; ``NotExecutable`` if it is incomplete."""
    if call.kept is None:
        return False, None
    for missing in call.missing:
        if missing.why != "not recorded" and overlaps(missing.path, path):
            raise NotExecutable(f"its input.{'.'.join(missing.path)} was {missing.why}")
    parent = call.kept.document.get(path[0])
    return isinstance(parent, dict), parent.get(path[1]) if isinstance(parent, dict) else None


def rebuild(call: RecordedCall) -> Rebuilt:
    """The request to send again, from the record; ``NotExecutable`` says what it lacks."""
    query = _from_text(call.query, "query string") if call.query else ""
    target = f"/tools/{call.tool}{call.path}" + (f"?{query}" if query else "")
    if call.call is not None:
        found, arguments = _kept_part(call, ("call", "arguments"))
        if not found:
            arguments = json.loads(_from_text(call.input, "arguments") or "{}")
        if not isinstance(arguments, dict):
            raise NotExecutable("its arguments were not recorded as an object")
        return Rebuilt("POST", target, None, "application/json", arguments)
    found, body = _kept_part(call, ("request", "body"))
    request = call.kept.document.get("request") if call.kept is not None else None
    content_type = request.get("content_type") if isinstance(request, dict) else None
    if found and body is not None:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return Rebuilt(call.method, target, data, content_type or "application/json")
    if found and isinstance(request, dict) and request.get("body_size") == 0:
        return Rebuilt(call.method, target, None, content_type)
    text = _from_text(call.input, "body")  # not JSON, or no kept input: the captured text
    return Rebuilt(call.method, target, text.encode() if text else None, content_type)


@dataclass(frozen=True, slots=True)
class Reissued:
    call: RecordedCall
    judgement: Judgement
    key: str | None = None
    answer: Answer | None = None
    new_output: str | None = None
    why: str | None = None
    """Why it was not sent."""


class Reissuer:
    """Sends a run's calls through the proxy at ``base_url`` and judges each answer."""

    def __init__(self, config: Config, base_url: str, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.base = base_url.rstrip("/")
        self.session = session
        self._sessions: dict[tuple[str, str, str | None], str | None] = {}
        tools = config.tools.values()
        slowest = max((t.timeout_s for t in tools), default=30.0)
        self.timeout = aiohttp.ClientTimeout(total=config.approvals.wait_s + slowest + 30.0)

    async def run(self, run: RecordedRun, salt: str | None) -> tuple[str, list[Reissued]]:
        rid = replay_id(run.run, salt)
        return rid, [await self.one(call, rid) for call in run.calls]

    async def one(self, call: RecordedCall, rid: str) -> Reissued:
        try:
            rebuilt = rebuild(call)
        except (NotExecutable, ValueError) as exc:
            return Reissued(call, Judgement(Outcome.NOT_EXECUTABLE), why=str(exc))
        key = replay_key(rid, call)
        headers = {"X-Run-Id": f"replay-{rid}", "Idempotency-Key": key}
        if call.agent:
            headers["X-Agent-Id"] = call.agent
        if rebuilt.mcp_arguments is not None:
            answer = await self._mcp_call(call, rebuilt, headers)
            text = json.dumps(answer.message).encode() if answer.message is not None else b""
        else:
            if rebuilt.content_type:
                headers["Content-Type"] = rebuilt.content_type
            answer, _ = await self._send(rebuilt.method, rebuilt.target, rebuilt.body, headers)
            text = answer.body
        captured = self._capture(call, text)
        return Reissued(call, judge(call, answer, captured), key, answer, captured)

    def _capture(self, call: RecordedCall, body: bytes) -> str | None:
        capture = self.config.tracing.capture
        if not capture.results:
            return None
        tool = self.config.tools.get(call.tool)
        secrets = sorted(tool.headers.values()) if tool is not None else []
        return capture_body(body, Redactor.build(capture.redact, secrets), capture.max_bytes)

    async def _send(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[Answer, str | None]:
        """The answer, and the MCP session it names (if any)."""
        url = URL(self.base + target, encoded=True)
        mcp = "Mcp-Session-Id" in headers or "MCP-Protocol-Version" in headers
        try:
            async with self.session.request(
                method, url, data=body, headers=headers, timeout=self.timeout
            ) as response:
                data = await response.read()
                kind = response.headers.get("Content-Type", "")
                answer = Answer(
                    response.status,
                    data,
                    _message(kind, data) if mcp else None,
                    response.headers.get("Idempotent-Replayed") == "true",
                )
                return answer, response.headers.get("Mcp-Session-Id")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProxyUnreachable(f"cannot reach the proxy at {self.base}: {exc}") from None

    async def _mcp_call(
        self, call: RecordedCall, rebuilt: Rebuilt, headers: dict[str, str]
    ) -> Answer:
        mcp = {**headers, "Accept": "application/json, text/event-stream"}
        mcp["Content-Type"] = "application/json"
        session = await self._mcp_session(rebuilt.target, mcp)
        if session is not None:
            mcp["Mcp-Session-Id"] = session
        mcp["MCP-Protocol-Version"] = MCP_VERSION
        params = {"name": call.call, "arguments": rebuilt.mcp_arguments}
        body = {"jsonrpc": "2.0", "id": call.position, "method": "tools/call", "params": params}
        answer, _ = await self._send("POST", rebuilt.target, json.dumps(body).encode(), mcp)
        return answer if answer.message is not None else Answer(answer.status, answer.body, {})

    async def _mcp_session(self, target: str, headers: dict[str, str]) -> str | None:
        """One handshake per endpoint, agent and replay run; ``None``: the server keeps none."""
        path = target.split("?", 1)[0]
        scope = (path, headers["X-Run-Id"], headers.get("X-Agent-Id"))
        if scope in self._sessions:
            return self._sessions[scope]
        hello = {
            "protocolVersion": MCP_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "handrail-replay", "version": "1"},
        }
        message = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}
        plain = {k: v for k, v in headers.items() if k != "Idempotency-Key"}
        _, session = await self._send("POST", path, json.dumps(message).encode(), plain)
        if session is not None:
            note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            ready = {**plain, "Mcp-Session-Id": session, "MCP-Protocol-Version": MCP_VERSION}
            await self._send("POST", path, json.dumps(note).encode(), ready)
        self._sessions[scope] = session
        return session


def _message(content_type: str, data: bytes) -> dict[str, Any] | None:
    """The JSON-RPC response in an MCP answer (the last one of an SSE stream)."""
    if content_type.startswith("text/event-stream"):
        parser = SseParser()
        texts = [event.data for event in [*parser.feed(data), *parser.close()] if event.data]
    else:
        texts = [data.decode("utf-8", errors="replace")]
    found = None
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and ("result" in value or "error" in value):
            found = value
    return found
