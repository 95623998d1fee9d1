"""Handrail's benchmark: every guard on, against a bare Python pass-through, in one run.

    python bench/run.py            # full run (about 4 minutes); writes bench/out/
    python bench/run.py --quick    # smoke check for CI (under a minute, no thresholds)
    python bench/run.py --guards   # also: Handrail with each guard removed in turn

Starts, as separate processes on loopback: a fast JSON tool, a bare aiohttp pass-through
(no policy, no store, no trace), an OTLP/HTTP sink, a FastMCP server, and Handrail with
every guard on (embedded policy on the shipped policies, enforce-mode idempotency with a new
key per request, the SQLite journal, spans exported over OTLP to the sink). wrk drives each
with the same POST+JSON load; the report gives throughput ratios, latency percentiles,
Handrail's memory, and the replay and deny paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

NEW_KEY_LUA = r"""
local counter = 0
local prefix = os.getenv("BENCH_PREFIX") or "b"
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", tostring(threads)) end
request = function()
  counter = counter + 1
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["X-Agent-Id"] = "bench-agent"
  headers["X-Run-Id"] = prefix .. "-" .. tid .. "-" .. math.floor(counter / 20)
  headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. counter
  -- a body no earlier call had (the prefix is new every run): the policy decides every call
  local body = '{"contact": {"name": "Ada", "email": "ada@example.com"}, "amount": ' .. counter .. ', "note": "benchmark call ' .. prefix .. '-' .. tid .. '"}'
  return wrk.format("POST", nil, headers, body)
end
"""

REPLAY_LUA = r"""
local prefix = os.getenv("BENCH_PREFIX") or "b"
local counter = 0
request = function()
  counter = counter + 1
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["X-Agent-Id"] = "bench-agent"
  -- a run per retry, so the policy's loop rule (5 repeats a run) does not deny the retries
  headers["X-Run-Id"] = prefix .. "-replay-" .. counter
  headers["Idempotency-Key"] = prefix .. "-the-same-key"
  return wrk.format("POST", nil, headers, '{"contact": {"name": "Ada"}, "amount": 1}')
end
"""

DENY_LUA = r"""
local counter = 0
request = function()
  counter = counter + 1
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["X-Agent-Id"] = "bench-agent"
  headers["Idempotency-Key"] = "deny-" .. counter
  return wrk.format("POST", nil, headers, '{"note": "key sk-live-4eC39HqLyjWDarjtT1zdp7dc"}')
end
"""

MCP_LUA = r"""
local counter = 0
local prefix = os.getenv("BENCH_PREFIX") or "b"
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
request = function()
  counter = counter + 1
  local headers = {}
  headers["Content-Type"] = "application/json"
  headers["Accept"] = "application/json, text/event-stream"
  headers["X-Agent-Id"] = "bench-agent"
  headers["X-Run-Id"] = "mcp-" .. prefix .. "-" .. tid .. "-" .. math.floor(counter / 20)
  -- arguments no earlier call had (the prefix is new every run): the policy decides every call
  local a = tid * 1000000 + counter
  local b = tonumber(prefix, 16) or 2
  return wrk.format("POST", nil, headers, '{"jsonrpc":"2.0","id":' .. counter .. ',"method":"tools/call","params":{"name":"add","arguments":{"a":' .. a .. ',"b":' .. b .. '}}}')
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a benchmark process exited early: {proc.args!r}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"port {port} did not open: {proc.args!r}")


@dataclass
class Result:
    name: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int
    proxy_cpu_us: float | None = None
    """The proxy's CPU (Handrail: with its policy workers) per call during this load."""
    cached: float | None = None
    """Handrail: the share of calls its decision cache answered (no policy evaluation)."""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def cache_hits(admin: int) -> float:
    """``handrail_policy_cache_hits_total`` from Handrail's admin plane."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r"^handrail_policy_cache_hits_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wrk(
    name: str,
    url: str,
    script: Path,
    connections: int,
    seconds: float,
    watch: int | None = None,
    admin: int | None = None,
) -> Result:
    threads = 1 if connections == 1 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    # A fresh prefix per run: keys and run ids never collide with an earlier measurement.
    env = {**os.environ, "BENCH_PREFIX": secrets.token_hex(4)}
    before = cpu_s(watch) if watch else 0.0
    hits = cache_hits(admin) if admin else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    used = cpu_s(watch) - before if watch else None
    hits = cache_hits(admin) - hits if admin else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    result = Result(name, connections, rps, p50, p99, int(non.group(1)) if non else 0, total)
    if used is not None and total:
        result.proxy_cpu_us = used / total * 1e6
    if admin and total:
        result.cached = hits / total
    print(
        f"  {name:24} c={connections:<3} {rps:9.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
        + (f"  non-2xx {result.non_2xx}" if result.non_2xx else "")
        + (f"  proxy CPU {result.proxy_cpu_us:.0f} us/call" if result.proxy_cpu_us else "")
        + (f"  cached {100 * result.cached:.0f}%" if result.cached is not None else ""),
        flush=True,
    )
    return result


def _status_kb(pid: int, field: str) -> int:
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


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """The process and its children (Handrail's policy workers), in KiB."""
    return _status_kb(pid, field) + sum(rss_kb(child, field) for child in _children(pid))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process and its children (the policy workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        own = 0.0
    return own + sum(cpu_s(child) for child in _children(pid))


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd
        )
        self.procs.append(proc)
        wait_port(port, proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def handrail_config(
    work: Path,
    upstream: int,
    mcp: int,
    sink: int,
    port: int,
    admin: int,
    isolation: str = "process",
    workers: int = 2,
) -> Path:
    config = {
        "listen": {"port": port},
        "admin": {"port": admin},
        "tools": {
            "api": {"upstream": f"http://127.0.0.1:{upstream}", "idempotency": {"mode": "enforce"}},
            "slow": {
                "upstream": f"http://127.0.0.1:{upstream}/slow",
                "idempotency": {"mode": "enforce"},
            },
            "calc": {"upstream": f"http://127.0.0.1:{mcp}/mcp", "kind": "mcp"},
        },
        "policy": {
            "engine": "embedded",
            "path": str(ROOT / "policies"),
            "watch": False,
            "isolation": isolation,
            "workers": workers,
        },
        "store": {"url": f"sqlite:///{work}/handrail.db"},
        "tracing": {
            "exporter": "otlp",
            "endpoint": f"http://127.0.0.1:{sink}",
            "protocol": "http/protobuf",
            "capture": {"arguments": True, "results": True},
        },
    }
    path = work / "handrail.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def config_for(work: Path, ports: dict[str, int], args: Any) -> Path:
    """``handrail_config`` for this run's ports and ``--isolation``/``--workers``."""
    return handrail_config(
        work,
        ports["upstream"],
        ports["mcp"],
        ports["sink"],
        ports["handrail"],
        ports["admin"],
        args.isolation,
        args.workers,
    )


ALLOW_ALL_POLICY = """package handrail

import rego.v1

decision := {"allow": true, "reasons": [], "require_approval": false}
"""


def _no_export(config: dict[str, Any], work: Path) -> None:
    config["tracing"]["exporter"] = "none"


def _no_capture(config: dict[str, Any], work: Path) -> None:
    config["tracing"]["capture"] = {"arguments": False, "results": False}


def _no_idempotency(config: dict[str, Any], work: Path) -> None:
    config["tools"]["api"]["idempotency"] = {"mode": "off"}


def _allow_all_policy(config: dict[str, Any], work: Path) -> None:
    policies = work / "allow-all-policy"
    policies.mkdir(exist_ok=True)
    (policies / "handrail.rego").write_text(ALLOW_ALL_POLICY)
    config["policy"]["path"] = str(policies)
    # It reads nothing of the input, so every decision would come from the decision cache:
    # keep one evaluation per call, so that this row prices the shipped rules alone.
    config["policy"]["cache"] = {"max_entries": 0}


def _floor(config: dict[str, Any], work: Path) -> None:
    for strip in (_no_export, _no_capture, _no_idempotency, _allow_all_policy):
        strip(config, work)


def _floor_cached(config: dict[str, Any], work: Path) -> None:
    _floor(config, work)
    config["policy"]["cache"] = {"max_entries": 4096}


GUARDS: dict[str, Any] = {
    "every guard on": lambda config, work: None,
    "without OTLP export": _no_export,
    "without input/output capture": _no_capture,
    "without idempotency": _no_idempotency,
    "with a one-rule allow-all policy": _allow_all_policy,
    "all four of these off": _floor,
    "all four off, decided from the cache": _floor_cached,
}
"""What each guard costs: Handrail restarted with one of them removed (then all four).
The journal, the run counters, the four spans and one policy evaluation per call remain in
every variant; "all four off" is what Handrail's own plumbing costs. The last variant lets
the decision cache answer the allow-all policy: the plumbing without the policy worker's
round trip."""


def guard_costs(
    work: Path, ports: dict[str, int], script: Path, seconds: int, warm: int, args: Any
) -> list[Result]:
    """Handrail at 32 and 1 connection(s) for each of ``GUARDS``, one at a time."""
    results = []
    url = f"http://127.0.0.1:{ports['handrail']}/tools/api/contacts"
    for name, strip in GUARDS.items():
        where = work / "guards"
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        path = config_for(where, ports, args)
        config = json.loads(path.read_text())
        strip(config, where)
        path.write_text(json.dumps(config, indent=2))
        procs = Processes()
        try:
            handrail = procs.start(
                [PY, "-m", "proxy.cli", "serve", "-c", str(path)], ports["handrail"], cwd=where
            )
            wrk(f"warm-up ({name})", url, script, 8, warm)
            for conns in (32, 1):
                results.append(wrk(name, url, script, conns, seconds, handrail.pid))
        finally:
            procs.stop()
    return results


def plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[bench]')")
        return
    names = ["direct", "pass-through", "handrail"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, conns in zip(axes, (1, 32), strict=True):
        rows = [
            next((r for r in results if r.name == n and r.connections == conns), None)
            for n in names
        ]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [r.p50_ms if r else 0 for r in rows], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r.p99_ms if r else 0 for r in rows], 0.4, label="p99")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"HTTP POST, {conns} connection{'s' if conns > 1 else ''}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def markdown(summary: dict[str, Any]) -> str:
    """The run's tables, ready for BENCHMARKS.md."""
    lines = [
        "| load | connections | req/s | p50 ms | p99 ms | non-2xx | proxy CPU µs/call "
        "| decided from cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['name']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['non_2xx']} | "
            + (f"{r['proxy_cpu_us']:.0f} |" if r.get("proxy_cpu_us") else "|")
            + (f" {100 * r['cached']:.0f}% |" if r.get("cached") is not None else " |")
        )
    if summary.get("guards"):
        lines += [
            "",
            "| Handrail (32 connections) | req/s | proxy CPU µs/call | at 1 connection: p50 ms |",
            "|---|---|---|---|",
        ]
        rows = summary["guards"]
        for r in (r for r in rows if r["connections"] == 32):
            one = next(o for o in rows if o["name"] == r["name"] and o["connections"] == 1)
            lines.append(
                f"| {r['name']} | {r['rps']:.0f} | {r.get('proxy_cpu_us') or 0:.0f} | "
                f"{one['p50_ms']:.2f} |"
            )
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in summary["ratios"].items()]
    memory = summary["memory"]
    lines += [
        "",
        f"Handrail peak RSS (proxy + policy workers): {memory['peak_rss_kb'] / 1024:.1f} MiB",
    ]
    if "soak" in memory:
        lines.append(
            "Soak RSS (calls: MiB): "
            + ", ".join(f"{s['calls']}: {s['rss_kb'] / 1024:.1f}" for s in memory["soak"])
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run, no plot")
    parser.add_argument("--seconds", type=int, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--isolation", choices=("process", "thread"), default="process")
    parser.add_argument("--workers", type=int, default=2, help="policy evaluators")
    parser.add_argument(
        "--guards",
        action="store_true",
        help="also measure Handrail with each guard removed in turn (about 2 minutes more)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    seconds = args.seconds or (2 if args.quick else 10)
    out: Path = args.out
    if out.exists() and not args.quick:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    scripts = {}
    for name, text in (
        ("new_key", NEW_KEY_LUA),
        ("replay", REPLAY_LUA),
        ("deny", DENY_LUA),
        ("mcp", MCP_LUA),
    ):
        scripts[name] = out / f"{name}.lua"
        scripts[name].write_text(text)

    ports = {
        k: free_port() for k in ("upstream", "passthrough", "sink", "mcp", "handrail", "admin")
    }
    procs = Processes()
    results: list[Result] = []
    env = dict(os.environ)
    try:
        procs.start(
            [PY, str(ROOT / "bench/servers.py"), "upstream", "--port", str(ports["upstream"])],
            ports["upstream"],
        )
        passthrough = procs.start(
            [
                PY,
                str(ROOT / "bench/servers.py"),
                "passthrough",
                "--port",
                str(ports["passthrough"]),
                "--upstream",
                f"http://127.0.0.1:{ports['upstream']}",
            ],
            ports["passthrough"],
        )
        procs.start(
            [PY, str(ROOT / "bench/servers.py"), "otlp-sink", "--port", str(ports["sink"])],
            ports["sink"],
        )
        procs.start(
            [PY, str(ROOT / "bench/mcp_server.py"), "--port", str(ports["mcp"])], ports["mcp"]
        )
        config = config_for(out, ports, args)
        handrail = procs.start(
            [PY, "-m", "proxy.cli", "serve", "-c", str(config)], ports["handrail"], env=env, cwd=out
        )

        urls = {
            "direct": f"http://127.0.0.1:{ports['upstream']}/contacts",
            "pass-through": f"http://127.0.0.1:{ports['passthrough']}/tools/api/contacts",
            "handrail": f"http://127.0.0.1:{ports['handrail']}/tools/api/contacts",
        }
        warm = 1 if args.quick else 3
        for name, url in urls.items():
            wrk(f"warm-up {name}", url, scripts["new_key"], 8, warm)
        print("HTTP POST, a new key per call:")
        hr, ap = handrail.pid, ports["admin"]
        for conns in (1, 32):
            for name, url in urls.items():
                watch = {"handrail": hr, "pass-through": passthrough.pid}.get(name)
                admin = ports["admin"] if name == "handrail" else None
                results.append(wrk(name, url, scripts["new_key"], conns, seconds, watch, admin))
        print("Replay (the same key and payload) and deny (a secret in the arguments):")
        results.append(
            wrk("handrail replay", urls["handrail"], scripts["replay"], 32, seconds, hr, ap)
        )
        results.append(
            wrk("handrail replay", urls["handrail"], scripts["replay"], 1, seconds, hr, ap)
        )
        results.append(wrk("direct (for replay)", urls["direct"], scripts["replay"], 32, seconds))
        results.append(wrk("handrail deny", urls["handrail"], scripts["deny"], 32, seconds, hr, ap))
        print("Replay against a tool that takes 20 ms to answer:")
        slow_direct = f"http://127.0.0.1:{ports['upstream']}/slow/contacts"
        slow_proxy = f"http://127.0.0.1:{ports['handrail']}/tools/slow/contacts"
        results.append(wrk("direct (20 ms tool)", slow_direct, scripts["replay"], 1, seconds))
        results.append(
            wrk("handrail replay (20 ms tool)", slow_proxy, scripts["replay"], 1, seconds, hr, ap)
        )
        print("MCP tools/call, new arguments per call:")
        mcp_direct = f"http://127.0.0.1:{ports['mcp']}/mcp"
        mcp_proxy = f"http://127.0.0.1:{ports['handrail']}/tools/calc"
        wrk("warm-up mcp", mcp_proxy, scripts["mcp"], 8, warm)
        for conns in (1, 32):
            results.append(wrk("mcp direct", mcp_direct, scripts["mcp"], conns, seconds))
            results.append(wrk("mcp handrail", mcp_proxy, scripts["mcp"], conns, seconds, hr, ap))
        memory: dict[str, Any] = {"rss_kb_before_soak": rss_kb(handrail.pid)}
        if not args.quick:
            print("Soak: Handrail at 32 connections until at least 100k calls:")
            soak_calls = 0
            soak: list[dict[str, int]] = []
            while soak_calls < 100_000:
                r = wrk("handrail soak", urls["handrail"], scripts["new_key"], 32, 15)
                soak_calls += r.requests
                soak.append({"calls": soak_calls, "rss_kb": rss_kb(handrail.pid)})
            memory["soak"] = soak
        memory["peak_rss_kb"] = rss_kb(handrail.pid, "VmHWM")
        guard_results: list[Result] = []
        if args.guards:
            print("What each guard costs (Handrail restarted without it):")
            handrail.terminate()
            handrail.wait(timeout=20)
            guard_results = guard_costs(out, ports, scripts["new_key"], seconds, warm, args)
    finally:
        procs.stop()

    def get(name: str, conns: int) -> Result:
        return next(r for r in results if r.name == name and r.connections == conns)

    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "seconds_per_measurement": seconds,
        "ratios": {
            "handrail / pass-through at 32 connections": get("handrail", 32).rps
            / get("pass-through", 32).rps,
            "handrail / direct at 32 connections": get("handrail", 32).rps / get("direct", 32).rps,
            "added p50 over pass-through at 1 connection (ms)": get("handrail", 1).p50_ms
            - get("pass-through", 1).p50_ms,
            "replay / direct at 32 connections": get("handrail replay", 32).rps
            / get("direct (for replay)", 32).rps,
            "replay p50 at 1 connection (ms)": get("handrail replay", 1).p50_ms,
            "replay p50 / a 20 ms tool's p50 at 1 connection": get(
                "handrail replay (20 ms tool)", 1
            ).p50_ms
            / get("direct (20 ms tool)", 1).p50_ms,
            "mcp handrail / mcp direct at 32 connections": get("mcp handrail", 32).rps
            / get("mcp direct", 32).rps,
            "mcp handrail / mcp direct at 1 connection": get("mcp handrail", 1).rps
            / get("mcp direct", 1).rps,
        },
        "memory": memory,
        "results": [asdict(r) for r in results],
        "guards": [asdict(r) for r in guard_results],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    print("\nRatios (same run):")
    for key, value in summary["ratios"].items():
        print(f"  {key}: {value:.3f}")
    print(f"Handrail peak RSS (proxy + policy workers): {memory['peak_rss_kb'] / 1024:.1f} MiB")
    if "soak" in memory:
        print(
            "Soak RSS (MiB): "
            + ", ".join(f"{s['calls']}: {s['rss_kb'] / 1024:.1f}" for s in memory["soak"])
        )
    if not args.quick:
        plot(results, out / "latency.png")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
