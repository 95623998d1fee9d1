"""Per-decision cost of the embedded policy engine on the shipped policies.

    python bench/policy_bench.py              # 3000 decisions per case
    python bench/policy_bench.py -n 500       # quicker
    python bench/policy_bench.py --policies DIR

For three representative inputs (an HTTP POST with a JSON body, an MCP tools/call, a deny)
it prints median and p99 microseconds, single-threaded, for: converting the input document
to a rego-cpp input (``conversion``: Handrail's converter and regopy's own), running the
compiled bundle on an input already set (``query``), and the whole ``evaluate`` call the
engine makes per decision (``total``). ``total (regopy path)`` is the way the engine used
to evaluate: a fresh interpreter per call and regopy's ``set_input``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from regopy import rego_shared as rs  # noqa: E402

from proxy.policy import query, regoinput  # noqa: E402
from proxy.policy.bundle import compile_policy, new_interpreter  # noqa: E402

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

CASES = {"http_post": HTTP_POST, "mcp_call": MCP_CALL, "deny": DENY}


def _converters() -> dict[str, Callable[[Any], Any]]:
    """name -> function building a rego-cpp input (the caller frees it)."""
    return {"handrail": regoinput.new_input, "regopy": rs.rego_input_from_value}


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


def _query_fn(bundle: Any, entrypoint: str, document: Any) -> Callable[[], Any]:
    """Run the bundle on an input set once (what the query costs without conversion)."""
    interpreter = new_interpreter()
    regoinput.set_input(interpreter._impl, document)

    def run() -> Any:
        output = rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)
        rs.rego_free_output(output)
        return interpreter

    return run


def _regopy_path(bundle: Any, entrypoint: str, document: Any) -> Callable[[], Any]:
    """The engine's old per-call path: a fresh interpreter, regopy's input conversion."""

    def run() -> Any:
        interpreter = new_interpreter()
        interpreter.set_input(document)
        output = rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)
        return query.read_output(interpreter, output)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="decisions per case")
    parser.add_argument("--policies", type=Path, default=ROOT / "policies")
    args = parser.parse_args(argv)
    compiled = compile_policy(args.policies, "handrail/decision")
    bundle, entrypoint = compiled.bundle, compiled.decision
    print(f"policy {args.policies} revision {compiled.revision}; {args.n} decisions per case")
    for name, document in CASES.items():
        defined, value = query.evaluate(bundle, entrypoint, document)
        allow = value.get("allow") if defined and isinstance(value, dict) else None
        reasons = value.get("reasons") if defined and isinstance(value, dict) else None
        print(f"\n{name}: allow={allow} reasons={reasons}")
        for label, convert in _converters().items():

            def conversion(convert: Callable[[Any], Any] = convert, doc: Any = document) -> None:
                rs.rego_free_input(convert(doc))

            print(f"  conversion ({label:8s})   {_summary(_time(conversion, args.n))}")
        run_query = _query_fn(bundle, entrypoint, document)
        print(f"  query                   {_summary(_time(run_query, args.n))}")

        def total(doc: Any = document) -> Any:
            return query.evaluate(bundle, entrypoint, doc)

        print(f"  total (evaluate)        {_summary(_time(total, args.n))}")
        before = _regopy_path(bundle, entrypoint, document)
        print(f"  total (regopy path)     {_summary(_time(before, args.n))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
