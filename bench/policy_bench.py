"""Per-decision cost of the embedded policy engine on the shipped policies.

    python bench/policy_bench.py              # 3000 decisions per case
    python bench/policy_bench.py -n 500       # quicker
    python bench/policy_bench.py --policies DIR

For three representative inputs (an HTTP POST with a JSON body, an MCP tools/call, a deny)
it prints median and p99 microseconds, single-threaded, for: converting the input document
to a regopy input (``conversion``; regopy's own converter shown for comparison), running the
compiled bundle on a prepared input (``query``), and the whole ``evaluate`` call the engine
makes per decision (``total``).
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

from proxy.policy import embedded  # noqa: E402

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
    """name -> function building a regopy input pointer (the caller frees it)."""
    found: dict[str, Callable[[Any], Any]] = {"regopy": rs.rego_input_from_value}
    try:
        from proxy.policy import regoinput
    except ImportError:
        return found
    found["handrail"] = regoinput.new_input
    return found


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
    """Run the bundle on an input built once (what the query costs without conversion)."""
    interpreter = embedded._new_interpreter()  # noqa: SLF001
    p_input = rs.rego_input_from_value(document)
    rs.rego_set_input(interpreter._impl, p_input)  # noqa: SLF001

    def run() -> Any:
        output = rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)  # noqa: SLF001
        rs.rego_free_output(output)

    run.keep = (interpreter, p_input)  # type: ignore[attr-defined]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="decisions per case")
    parser.add_argument("--policies", type=Path, default=ROOT / "policies")
    args = parser.parse_args(argv)
    compiled = embedded.compile_policy(args.policies, "handrail/decision")
    bundle, entrypoint = compiled.bundle, compiled.decision
    converters = _converters()
    print(f"policy {args.policies} revision {compiled.revision}; {args.n} decisions per case")
    for name, document in CASES.items():
        defined, value = embedded.evaluate(bundle, entrypoint, document)
        allow = value.get("allow") if defined and isinstance(value, dict) else None
        print(f"\n{name}: allow={allow} reasons={value.get('reasons') if defined else None}")
        for label, convert in converters.items():

            def conversion(convert: Callable[[Any], Any] = convert) -> None:
                rs.rego_free_input(convert(document))

            print(f"  conversion ({label:8s}) {_summary(_time(conversion, args.n))}")
        print(f"  query                 {_summary(_time(_query_fn(bundle, entrypoint, document), args.n))}")
        total = _time(lambda: embedded.evaluate(bundle, entrypoint, document), args.n)
        print(f"  total (evaluate)      {_summary(total)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
