"""Per-decision cost of the embedded policy engine (regorus) on the shipped policies.

    python bench/policy_bench.py              # 3000 decisions per case
    python bench/policy_bench.py -n 500       # quicker
    python bench/policy_bench.py --policies DIR

For representative inputs (an HTTP POST with a JSON body, an MCP tools/call, a deny, a POST
with a 200-field body, and one tool answer for the ``result`` rule) it prints median and p99
microseconds, single-threaded, for: encoding the input document as JSON (``encode``, paid by
the proxy), what a worker process does per call (``worker``: the JSON handed to regorus,
the rule evaluated, its JSON answer taken as is), and the whole ``evaluate`` call of the
thread isolation (``total``: encode, evaluate, parse the answer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.policy import query  # noqa: E402
from proxy.policy.bundle import compile_policy  # noqa: E402

HEADERS = {
    "host": "127.0.0.1:8080",
    "user-agent": "wrk",
    "content-type": "application/json",
    "content-length": "87",
    "x-agent-id": "bench-agent",
    "x-run-id": "b-81723-3",
    "idempotency-key": "b-81723-61",
}

HTTP_POST: dict[str, Any] = {
    "version": 1,
    "tool": {"name": "crm", "kind": "http"},
    "request": {
        "method": "POST",
        "path": "/contacts",
        "query": {},
        "headers": HEADERS,
        "body": {
            "contact": {"name": "Ada", "email": "ada@example.com"},
            "amount": 61,
            "note": "benchmark call",
        },
    },
    "call": None,
    "agent": {"id": "bench-agent"},
    "run": {"id": "b-81723-3", "calls": 2, "writes": 2, "denied": 0, "repeats": 0},
    "idempotency_key": "b-81723-61",
    "time": "2026-11-23T10:00:00Z",
}

MCP_CALL: dict[str, Any] = {
    "version": 1,
    "tool": {"name": "payments", "kind": "mcp"},
    "request": {
        "method": "POST",
        "path": "/mcp",
        "query": {},
        "headers": {**HEADERS, "mcp-session-id": "5f0c2a", "accept": "application/json"},
        "body": {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "refund", "arguments": {"charge_id": "ch_1042", "amount": 40}},
        },
    },
    "call": {
        "name": "refund",
        "arguments": {"charge_id": "ch_1042", "amount": 40},
        "annotations": {"readOnlyHint": False, "destructiveHint": False},
    },
    "agent": {"id": "support-bot"},
    "run": {"id": "r-9", "calls": 4, "writes": 1, "denied": 0, "repeats": 0},
    "idempotency_key": "k-77",
    "time": "2026-11-23T10:00:00Z",
}

DENY: dict[str, Any] = {
    **HTTP_POST,
    "request": {
        **HTTP_POST["request"],
        "body": {"note": "use key sk-abcdefghijklmnopqrstuvwx", "card": "4111 1111 1111 1111"},
    },
}

BIG_BODY: dict[str, Any] = {
    **HTTP_POST,
    "request": {
        **HTTP_POST["request"],
        "body": {f"field_{i}": {"n": i, "s": f"value {i}"} for i in range(200)},
    },
}

ANSWER: dict[str, Any] = {
    **HTTP_POST,
    "request": {**HTTP_POST["request"], "method": "GET", "body": None},
    "response": {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {"contacts": [{"id": i, "name": f"Ada {i}"} for i in range(10)], "total": 10},
    },
}

CASES = {
    "http_post": ("decision", HTTP_POST),
    "mcp_call": ("decision", MCP_CALL),
    "deny": ("decision", DENY),
    "body_200_fields": ("decision", BIG_BODY),
    "answer_10_rows": ("result", ANSWER),
}


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    for _ in range(min(200, n)):
        fn()
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        fn()
        out.append((clock() - start) / 1000)
    return out


def _summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered):7.1f} us   p99 {p99:7.1f} us"


def _worker_fn(compiled: Any, rule: str, document: Any) -> Callable[[], Any]:
    """What a worker process does per call, from the JSON it is sent to the JSON it answers."""
    text = json.dumps(document, separators=(",", ":"))

    def run() -> Any:
        return query.evaluate_json(compiled, rule, text)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="decisions per case")
    parser.add_argument("--policies", type=Path, default=ROOT / "policies")
    args = parser.parse_args(argv)
    compiled, engine = compile_policy(args.policies, "handrail/decision")
    query.adopt(compiled, engine)
    print(f"policy {args.policies} revision {compiled.revision}; {args.n} decisions per case")
    for name, (kind, document) in CASES.items():
        rule = compiled.decision if kind == "decision" else compiled.result
        assert rule is not None
        defined, value = query.evaluate(compiled, rule, document)
        allow = value.get("allow") if defined and isinstance(value, dict) else None
        reasons = value.get("reasons") if defined and isinstance(value, dict) else None
        print(f"\n{name} ({kind}): allow={allow} reasons={reasons}")

        def encode(doc: Any = document) -> Any:
            return json.dumps(doc, separators=(",", ":"))

        print(f"  encode                  {_summary(_time(encode, args.n))}")
        print(
            f"  worker                  {_summary(_time(_worker_fn(compiled, rule, document), args.n))}"
        )

        def total(doc: Any = document, rule: str = rule) -> Any:
            return query.evaluate(compiled, rule, doc)

        print(f"  total (evaluate)        {_summary(_time(total, args.n))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
