"""The ``handrail`` command: exit 0 on success, 1 on a finding, 2 on a usage or config error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.config import Config, load_config
from proxy.errors import ConfigError, HandrailError

logger = logging.getLogger(__name__)


def _config_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="CFG",
        required=required,
        help="handrail.yaml (default: the embedded default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handrail", description="Guardrails for AI agents' tool calls: a sidecar proxy."
    )
    parser.add_argument("--version", action="version", version=f"handrail {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="data-plane host (overrides listen.host)")
    serve.add_argument("--port", type=int, help="data-plane port (overrides listen.port)")

    check = commands.add_parser(
        "check", help="validate the config, compile the policies, reach the store and tools"
    )
    _config_arg(check)

    commands.add_parser("demo", help="a sample tool, the proxy and a scripted agent")

    policy = commands.add_parser("policy", help="evaluate or test policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="SUB")
    evaluate = policy_commands.add_parser("eval", help="print the decision for one input")
    _config_arg(evaluate)
    evaluate.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="FILE.json",
        help="a policy input document (see docs/policy.md)",
    )
    test = policy_commands.add_parser("test", help="run the *_test.rego files")
    _config_arg(test)

    calls = commands.add_parser(
        "calls", help="list recorded calls from the local journal, or verify its hash chain"
    )
    calls.add_argument(
        "action", nargs="?", choices=("verify",), help="verify: check the journal's hash chain"
    )
    _config_arg(calls)
    calls.add_argument("--run", metavar="ID", help="only this run's calls")
    calls.add_argument("--tool", metavar="T", help="only this tool's calls")
    calls.add_argument(
        "--decision", choices=("allow", "deny", "approval"), help="only calls so decided"
    )
    calls.add_argument("--since", metavar="TIME", help="ISO time or seconds ago (e.g. 300)")
    calls.add_argument(
        "--limit", type=int, default=50, metavar="N", help="the newest N (default 50)"
    )
    calls.add_argument(
        "--json", action="store_true", dest="as_json", help="a JSON array, for scripts"
    )

    runs = commands.add_parser(
        "runs", help="a run's ledger (every call, classified, with totals), or close a run"
    )
    runs.add_argument(
        "words", nargs="*", metavar="close ID", help="close ID: draw the run's finish line"
    )
    runs.add_argument("--run", metavar="ID", help="this run's ledger (default: recent runs)")
    runs.add_argument("--json", action="store_true", dest="as_json", help="JSON, for scripts")
    _config_arg(runs)

    traces = commands.add_parser("traces", help="query the trace backend for the proxy's spans")
    _config_arg(traces)
    traces.add_argument("--run", metavar="ID", help="only this run's calls")
    traces.add_argument("--trace-id", metavar="ID", help="only this trace")
    traces.add_argument("--tool", metavar="T", help="only this tool's calls")
    traces.add_argument(
        "--decision", choices=("allow", "deny", "approval"), help="only calls so decided"
    )
    traces.add_argument(
        "--limit", type=int, default=50, metavar="N", help="the newest N calls (default 50)"
    )
    traces.add_argument(
        "--json", action="store_true", dest="as_json", help="a JSON array, for scripts"
    )

    keys = commands.add_parser(
        "keys", help="list, show or resolve idempotency keys whose outcome is unknown"
    )
    keys.add_argument(
        "action",
        choices=("list", "show", "resolve"),
        help="list the unknown keys, show one, or resolve one",
    )
    keys.add_argument("tool", nargs="?", metavar="TOOL", help="the tool's name (show, resolve)")
    keys.add_argument("key", nargs="?", metavar="KEY", help="the Idempotency-Key (show, resolve)")
    keys.add_argument(
        "--failed", action="store_true", help="resolve: the call did not take effect; retry runs"
    )
    keys.add_argument(
        "--answer",
        type=Path,
        metavar="FILE",
        help='resolve: the call took effect with this answer, {"status", "headers", "body"}',
    )
    keys.add_argument("--json", action="store_true", dest="as_json", help="JSON, for scripts")
    _config_arg(keys)

    approvals = commands.add_parser(
        "approvals",
        help="list and decide held calls and changed MCP tool definitions (via the admin API)",
    )
    approvals.add_argument(
        "action", choices=("list", "approve", "reject"), help="what to do with held calls"
    )
    approvals.add_argument("id", nargs="?", help="the approval's id (approve, reject)")
    approvals.add_argument(
        "--reason", help="why, for the agent (told on a rejection) and the record"
    )
    approvals.add_argument(
        "--state",
        default="pending",
        choices=("pending", "approved", "rejected", "used", "expired", "all"),
        help="list: which requests (default: pending)",
    )
    approvals.add_argument(
        "--admin", metavar="URL", help="the admin API (default: the config's admin listener)"
    )
    approvals.add_argument("--json", action="store_true", dest="as_json", help="JSON, for scripts")
    _config_arg(approvals)

    replay = commands.add_parser(
        "replay",
        help="re-decide recorded runs against other policies (exit 1 if a decision changes), "
        "or re-issue them through a proxy",
    )
    replay.add_argument(
        "--run", action="append", default=[], metavar="ID", help="a recorded run (repeatable)"
    )
    replay.add_argument(
        "--runs-since",
        metavar="TIME",
        help="every call recorded since TIME (ISO time or 10m/2h/1d), grouped by run",
    )
    replay.add_argument(
        "--from",
        dest="source",
        choices=("journal", "phoenix"),
        default="journal",
        help="where the runs are read (default: the local journal)",
    )
    replay.add_argument(
        "--replay-id", metavar="ID", help="--execute: salts the fresh keys (same id: runs once)"
    )
    _config_arg(replay)
    replay.add_argument(
        "--policies", type=Path, metavar="DIR", help="candidate policies to decide with"
    )
    replay.add_argument("--execute", action="store_true", help="re-issue the calls through a proxy")
    replay.add_argument("--against", metavar="URL", help="the proxy to re-issue through")
    replay.add_argument("--json", action="store_true", dest="as_json", help="JSON, for scripts")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _load(path: str | None, *, read_only: bool = False) -> Config:
    """``read_only`` commands (journal, store, policies) need none of the tools' secrets."""
    return load_config(path, secrets_optional=read_only)


def _run_async(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro)  # type: ignore[arg-type]


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.host or args.port is not None:
        listen = config.listen.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
        config = config.model_copy(update={"listen": listen})
    from proxy.server import serve

    _run_async(serve(config, lambda line: print(line, flush=True)))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        from proxy.check import check_command

        return check_command(_load(args.config), sys.stdout)
    if args.command == "demo":
        from proxy.demo import run_demo

        return run_demo(sys.stdout)
    if args.command == "policy":
        config = _load(args.config, read_only=True)
        from proxy.policy.commands import policy_eval, policy_test

        if args.policy_command == "eval":
            return policy_eval(config, args.input, sys.stdout)
        return policy_test(config, sys.stdout)
    if args.command == "runs":
        from proxy.runs.commands import runs_command

        words = list(args.words)
        if words and (words[0] != "close" or len(words) != 2):
            print(
                "handrail: usage: handrail runs [--run ID] [--json] | runs close ID",
                file=sys.stderr,
            )
            return 2
        return runs_command(
            _load(args.config, read_only=True),
            "close" if words else None,
            words[1] if words else args.run,
            as_json=args.as_json,
            out=sys.stdout,
            err=sys.stderr,
        )
    if args.command == "calls" and args.action == "verify":
        from proxy.tracing.commands import verify_command

        return verify_command(
            _load(args.config, read_only=True), out=sys.stdout, as_json=args.as_json
        )
    if args.command == "calls":
        config = _load(args.config, read_only=True)
        from proxy.tracing.commands import calls_command

        return calls_command(
            config,
            run=args.run,
            tool=args.tool,
            decision=args.decision,
            since=args.since,
            limit=args.limit,
            as_json=args.as_json,
            out=sys.stdout,
        )
    if args.command == "traces":
        config = _load(args.config, read_only=True)
        from proxy.tracing.commands import traces_command

        return traces_command(
            config,
            run=args.run,
            trace_id=args.trace_id,
            tool=args.tool,
            decision=args.decision,
            limit=args.limit,
            as_json=args.as_json,
            out=sys.stdout,
        )
    if args.command == "keys":
        config = _load(args.config, read_only=True)
        from proxy.store.commands import keys_command

        return keys_command(
            config,
            args.action,
            args.tool,
            args.key,
            failed=args.failed,
            answer=args.answer,
            as_json=args.as_json,
            out=sys.stdout,
            err=sys.stderr,
        )
    if args.command == "approvals":
        from proxy.approvals.commands import approvals_command

        return approvals_command(
            _load(args.config, read_only=True),
            args.action,
            args.id,
            reason=args.reason,
            state=args.state,
            admin_url=args.admin,
            as_json=args.as_json,
            out=sys.stdout,
            err=sys.stderr,
        )
    from proxy.replay.commands import ReplayArgs, replay_command

    return replay_command(
        _load(args.config, read_only=True),
        ReplayArgs(
            runs=list(args.run),
            runs_since=args.runs_since,
            policies=args.policies,
            as_json=args.as_json,
            execute=args.execute,
            against=args.against,
            source=args.source,
            replay_id=args.replay_id,
        ),
        out=sys.stdout,
        err=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, quiet=args.command != "serve")
    try:
        return dispatch(args)
    except ConfigError as exc:
        print(f"handrail: {exc.message}", file=sys.stderr)
        return 2
    except HandrailError as exc:  # a backend that would not start: one line, no traceback
        print(f"handrail: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
