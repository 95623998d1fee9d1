"""What-if: each recorded call re-decided by candidate policies, on the input it was decided on.

No tool is called and nothing is written: the candidate engine gets the kept document (the
run's counters as they stood, the annotations, the time of the call) and its decision is
compared with the recorded one (``proxy.replay.compare``). A call is decided only when the
record holds every part of the input the candidate reads (``proxy.policy.refs``); otherwise
it is reported not replayable, with the parts it lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from proxy.config import Config
from proxy.errors import ConfigError, HandrailError
from proxy.policy import PolicyEngine, engine_from_config
from proxy.policy.bundle import read_policy_files
from proxy.policy.refs import impure_builtins, input_paths
from proxy.replay.compare import Change, Verdict, compare
from proxy.replay.source import InputPath, Missing, RecordedCall


@dataclass(frozen=True, slots=True)
class Candidate:
    """The policies a replay decides with, and what they read of the input."""

    engine: PolicyEngine
    label: str
    """Where they come from, for people: a directory and its revision, or an OPA server."""
    reads: tuple[InputPath, ...] | None
    """``input_paths`` of the served modules; ``None``: they may read any of it."""
    impure: frozenset[str] = frozenset()


class Status(StrEnum):
    SAME = "same"
    CHANGED = "changed"
    NOT_REPLAYABLE = "not_replayable"
    FAILED = "failed"
    """The candidate could not decide (an undefined decision, an evaluation error): live,
    the call would be refused (fail closed), so it counts as a change."""


@dataclass(frozen=True, slots=True)
class Redecided:
    call: RecordedCall
    status: Status
    new: Verdict | None = None
    change: Change | None = None
    lacks: tuple[Missing, ...] = ()
    """Why not replayable: the parts the candidate reads that the record lacks."""
    why: str | None = None
    """Why not replayable or failed, in words."""

    @property
    def counts_as_change(self) -> bool:
        return self.status in (Status.CHANGED, Status.FAILED)


@contextlib.asynccontextmanager
async def open_candidate(config: Config, policies: Path | None) -> AsyncIterator[Candidate]:
    """The configured policies, or those in ``policies``, served by an engine of their own
    (the configured engine's settings, in threads, never watched). ``ConfigError`` when
    they do not load."""
    settings = config.policy
    if policies is None and settings.engine == "opa":
        engine = engine_from_config(settings)
        label, reads, impure = f"OPA at {settings.opa.url}", None, frozenset[str]()
    else:
        root = policies if policies is not None else settings.path
        files = read_policy_files(root)
        sources = list(files.modules.values())
        label = f"{root} (revision {files.revision})"
        reads, impure = input_paths(sources), impure_builtins(sources)
        engine = engine_from_config(
            settings.model_copy(
                update={
                    "engine": "embedded",
                    "path": root,
                    "watch": False,
                    "isolation": "thread",
                    "workers": 1,
                }
            )
        )
    try:
        await engine.start()
    except HandrailError as exc:
        await engine.close()
        raise ConfigError(f"the policies in {label} do not load: {exc.message}") from None
    try:
        yield Candidate(engine, label, reads, impure)
    finally:
        await engine.close()


def overlaps(a: InputPath, b: InputPath) -> bool:
    """One path lies under the other (or they are the same)."""
    return a[: len(b)] == b or b[: len(a)] == a


def unreadable(missing: Sequence[Missing], reads: Sequence[InputPath] | None) -> list[Missing]:
    """The missing parts a policy reading ``reads`` would see (all of them when ``None``)."""
    if reads is None:
        return list(missing)
    return [m for m in missing if any(overlaps(m.path, path) for path in reads)]


async def redecide(call: RecordedCall, candidate: Candidate) -> Redecided:
    """The candidate's decision on one recorded call, beside the recorded one."""
    if call.verdict is None:
        why = f"no live decision to compare with (refused before the policy: {call.error})"
        return Redecided(call, Status.NOT_REPLAYABLE, why=why)
    if call.kept is None:
        return Redecided(call, Status.NOT_REPLAYABLE, why=call.lost)
    lacks = unreadable(call.missing, candidate.reads)
    if lacks:
        parts = ", ".join(m.describe() for m in lacks)
        why = f"the policy reads what the record lacks: {parts}"
        return Redecided(call, Status.NOT_REPLAYABLE, lacks=tuple(lacks), why=why)
    try:
        decision = await candidate.engine.decide(call.kept.document)
    except HandrailError as exc:
        return Redecided(call, Status.FAILED, why=f"the policy could not decide: {exc.message}")
    new = Verdict.of(decision)
    change = compare(call.verdict, new)
    return Redecided(call, Status.SAME if change is None else Status.CHANGED, new, change)
