"""The soak's counting tool: an aiohttp server that counts, per ``Idempotency-Key``, how many
times a write took effect, and misbehaves when the request's query asks it to.

    python bench/soak_tool.py --port 9001

Every path answers (``/contacts/7``, ``/orders`` ...). The query's ``fault=`` chooses what
it does; a write "takes effect" (is counted for its key) unless said otherwise:

- (none): a JSON answer with Content-Length;
- ``slow``: takes effect on arrival, answers after ``delay_ms``;
- ``5xx``: no effect (the tool says it failed): ``status`` (default 503) with a JSON error;
- ``stream``: a chunked answer (no Content-Length), ``chunks`` chunks ``gap_ms`` apart;
- ``close``: takes effect, then closes the connection without answering;
- ``close_early``: no effect, closes the connection at once without answering;
- ``break``: takes effect, starts a chunked answer and cuts it off after its first chunk.

A write's fault strikes the first time the tool sees its key only (a transient fault: the
tool answers normally afterwards), unless ``always=1``; ``slow`` is always slow. Reads (GET)
are counted as reads and may carry any fault.

``GET /__soak/stats`` returns the ledger: executions, failures and arrivals per key, and the
history of every key that took effect more than once (``?events=all``: of every key), and
the trace id of every request that reached it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict

import uvloop
from aiohttp import web

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STATS_PATH = "/__soak/stats"


class Ledger:
    """What the tool did, per idempotency key."""

    def __init__(self) -> None:
        self.started = time.time()
        self.executions: defaultdict[str, int] = defaultdict(int)
        self.failures: defaultdict[str, int] = defaultdict(int)
        self.arrivals: defaultdict[str, int] = defaultdict(int)
        self.events: defaultdict[str, list[tuple[float, str]]] = defaultdict(list)
        """Per key: (unix time, what happened), in order."""
        self.reads = 0
        self.unkeyed_writes = 0
        self.requests = 0
        self.traces: set[str] = set()
        """Trace ids of every request that reached the tool (from the ``traceparent`` the proxy
        sends on: the call's own trace)."""

    def note(self, key: str, method: str, path: str, what: str) -> None:
        self.events[key].append((round(time.time(), 4), f"{method} {path} {what}"))

    def stats(self, all_events: bool) -> dict[str, object]:
        twice = {k: n for k, n in self.executions.items() if n > 1}
        keys = self.events.keys() if all_events else twice.keys()
        return {
            "started": self.started,
            "requests": self.requests,
            "reads": self.reads,
            "unkeyed_writes": self.unkeyed_writes,
            "executions": dict(self.executions),
            "failures": dict(self.failures),
            "arrivals": dict(self.arrivals),
            "events": {k: self.events[k] for k in keys},
            "traces": sorted(self.traces),
        }


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default


async def _close_without_answer(request: web.Request) -> web.StreamResponse:
    """Hang up on the proxy: the request was read, no status line is ever sent."""
    if request.transport is not None:
        request.transport.close()
    # Nothing can be written any more; aiohttp drops the response of a closed connection.
    return web.Response(status=204)


def tool_app() -> web.Application:
    ledger = Ledger()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(ledger.stats(request.query.get("events") == "all"))

    async def handle(request: web.Request) -> web.StreamResponse:
        ledger.requests += 1
        body = await request.read()
        method = request.method
        key = request.headers.get("Idempotency-Key")
        fault = request.query.get("fault", "")
        parts = request.headers.get("traceparent", "").split("-")
        trace = parts[1] if len(parts) == 4 else "?"
        ledger.traces.add(trace)
        path = f"{request.path} [trace {trace}]"
        if method not in WRITES:
            ledger.reads += 1
        elif key is None:
            ledger.unkeyed_writes += 1
        if key is not None and method in WRITES:
            ledger.arrivals[key] += 1
            first = ledger.arrivals[key] == 1
            if fault != "slow" and not first and request.query.get("always") != "1":
                fault = ""  # a transient fault: this key's later attempts go through
        else:
            key = None

        def effect(what: str) -> None:
            if key is not None:
                ledger.executions[key] += 1
                ledger.note(key, method, path, f"executed ({what})")

        if fault == "5xx":
            if key is not None:
                ledger.failures[key] += 1
                ledger.note(key, method, path, "answered 5xx (no effect)")
            await asyncio.sleep(_int(request, "delay_ms", 0) / 1000)
            status = _int(request, "status", 503)
            return web.json_response({"error": "the tool failed"}, status=status)
        if fault == "close_early":
            if key is not None:
                ledger.note(key, method, path, "closed the connection (no effect)")
            return await _close_without_answer(request)
        effect(fault or "ok")
        await asyncio.sleep(_int(request, "delay_ms", 0) / 1000)
        answer = {
            "ok": True,
            "method": method,
            "path": request.path,
            "key": key,
            "bytes": len(body),
        }
        if fault == "close":
            if key is not None:
                ledger.note(key, method, path, "closed the connection after the effect")
            return await _close_without_answer(request)
        if fault in ("stream", "break"):
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunks = max(1, _int(request, "chunks", 4))
            gap = _int(request, "gap_ms", 20) / 1000
            await response.write(b'{"ok": true, "parts": [')
            for i in range(chunks):
                await asyncio.sleep(gap)
                await response.write(json.dumps({"i": i, "pad": "x" * 200}).encode() + b",")
                if fault == "break":
                    if key is not None:
                        ledger.note(key, method, path, "broke its answer off mid-body")
                    if request.transport is not None:
                        request.transport.abort()
                    return response
            await response.write(json.dumps(answer).encode() + b"]}")
            await response.write_eof()
            return response
        return web.json_response(answer, status=201 if method == "POST" else 200)

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get(STATS_PATH, stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.install()
    web.run_app(tool_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
