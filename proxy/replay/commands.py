"""``handrail replay``: a recorded run re-decided by other policies, or re-issued through a proxy.

Exit status: 0 nothing changed; 1 a decision changed (or, with ``--execute``, an answer
differed); 2 on an error: a usage error, a run with no recorded calls, the journal, Phoenix,
the policies or the proxy unreachable, or no call of the selection that could be re-decided
at all. Calls that cannot be replayed (their record lacks what the policy reads) or
re-issued (their input was redacted or truncated) are listed, and warned about on stderr,
but do not by themselves make the exit status 1: a gate that must check every call can
read ``summary.not_replayable`` from ``--json``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from proxy.config import Config
from proxy.errors import ConfigError
from proxy.replay.answers import Outcome
from proxy.replay.execute import ProxyUnreachable, Reissuer
from proxy.replay.phoenix import phoenix_runs
from proxy.replay.report import (
    DecidedRun,
    ExecutedRun,
    decided_json,
    decided_text,
    executed_json,
    executed_text,
)
from proxy.replay.source import RecordedRun, UnknownRun, journal_runs
from proxy.replay.whatif import Status, open_candidate, redecide
from proxy.tracing.commands import UsageError, parse_since
from proxy.tracing.phoenix import PhoenixUnavailable

SOURCES = ("journal", "phoenix")


@dataclass(frozen=True, slots=True)
class ReplayArgs:
    runs: list[str] = field(default_factory=list)
    """``--run ID``, repeatable."""
    runs_since: str | None = None
    """``--runs-since TIME``: every call recorded since (ISO time, or ``10m``/``2h``/``1d`` ago)."""
    policies: Path | None = None
    """``--policies DIR``: the candidate policies (default: the configured ones)."""
    as_json: bool = False
    execute: bool = False
    against: str | None = None
    """``--against URL``: the proxy to re-issue through (default: the config's listener)."""
    source: str = "journal"
    """``--from journal|phoenix``."""
    replay_id: str | None = None
    """``--replay-id ID``: salts the replay's run and keys; the same id (or none, twice)
    re-issues nothing that already ran."""


class ReplayFailed(Exception):
    """A one-line reason to exit 2."""


def replay_command(config: Config, args: ReplayArgs, *, out: TextIO, err: TextIO) -> int:
    try:
        since = _check(args)
        return asyncio.run(_replay(config, args, since, out, err))
    except (ReplayFailed, UsageError, UnknownRun, PhoenixUnavailable, ProxyUnreachable) as exc:
        err.write(f"handrail: {exc}\n")
    except ConfigError as exc:
        err.write(f"handrail: {exc.message}\n")
    return 2


def _check(args: ReplayArgs) -> float | None:
    if not args.runs and args.runs_since is None:
        raise UsageError("replay needs --run ID (repeatable) or --runs-since TIME")
    if args.source not in SOURCES:
        raise UsageError(f"--from must be journal or phoenix, not {args.source!r}")
    if args.execute and args.policies is not None:
        raise UsageError(
            "--policies re-decides without running anything; --execute re-issues "
            "the calls through a proxy, which decides with its own policies"
        )
    if args.against is not None and not args.execute:
        raise UsageError("--against names the proxy for --execute")
    if args.runs_since is None:
        return None
    try:
        return parse_since(args.runs_since)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--since", "--runs-since", 1)) from None


async def _replay(
    config: Config, args: ReplayArgs, since: float | None, out: TextIO, err: TextIO
) -> int:
    runs = await _read(config, args, since)
    if not any(run.calls for run in runs):
        raise ReplayFailed(f"no calls recorded since {args.runs_since}")
    if args.execute:
        return await _execute(config, args, runs, out, err)
    return await _decide(config, args, runs, out, err)


async def _read(config: Config, args: ReplayArgs, since: float | None) -> list[RecordedRun]:
    if args.source == "phoenix":
        return await phoenix_runs(config, args.runs, since)
    try:
        return await journal_runs(config, args.runs, since)
    except (UnknownRun, ConfigError):
        raise
    except Exception as exc:
        raise ReplayFailed(f"cannot read the journal: {exc}") from exc


async def _decide(
    config: Config, args: ReplayArgs, runs: Sequence[RecordedRun], out: TextIO, err: TextIO
) -> int:
    decided: list[DecidedRun] = []
    async with open_candidate(config, args.policies) as candidate:
        for run in runs:
            decided.append((run.run, [await redecide(call, candidate) for call in run.calls]))
    label = candidate.label
    _write(
        out,
        args.as_json,
        lambda: decided_json(label, decided),
        lambda: decided_text(label, decided),
    )
    items = [r for _, found in decided for r in found]
    if candidate.impure:
        names = ", ".join(sorted(candidate.impure))
        err.write(
            f"handrail: warning: the policies call {names}: a decision may differ "
            "from the recorded one for that reason alone\n"
        )
    unreplayable = sum(1 for r in items if r.status is Status.NOT_REPLAYABLE)
    if unreplayable == len(items):
        raise ReplayFailed(f"none of the {len(items)} recorded calls could be re-decided")
    if unreplayable:
        err.write(
            f"handrail: warning: {unreplayable} of {len(items)} calls could not be "
            "re-decided (listed as NOT REPLAYABLE): they were not checked\n"
        )
    return 1 if any(r.counts_as_change for r in items) else 0


async def _execute(
    config: Config, args: ReplayArgs, runs: Sequence[RecordedRun], out: TextIO, err: TextIO
) -> int:
    against = args.against or listen_url(config)
    executed: list[ExecutedRun] = []
    async with aiohttp.ClientSession() as session:
        reissuer = Reissuer(config, against, session)
        for run in runs:
            rid, found = await reissuer.run(run, args.replay_id)
            executed.append((run.run, rid, found))
    _write(
        out,
        args.as_json,
        lambda: executed_json(against, executed),
        lambda: executed_text(against, executed),
    )
    items = [r for _, _, found in executed for r in found]
    skipped = sum(1 for r in items if r.judgement.outcome in (Outcome.NOT_EXECUTABLE, Outcome.HELD))
    if skipped:
        err.write(
            f"handrail: warning: {skipped} of {len(items)} calls were not run or are "
            "waiting for a person: their answers were not compared\n"
        )
    return 1 if any(r.judgement.outcome.differs for r in items) else 0


def listen_url(config: Config) -> str:
    """The config's data plane, as a client reaches it."""
    host = config.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.listen.port}"


def _write(
    out: TextIO, as_json: bool, document: Callable[[], dict[str, Any]], text: Callable[[], str]
) -> None:
    if as_json:
        json.dump(document(), out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(text())
