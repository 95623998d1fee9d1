"""The embedded engine: the policy files compiled with regorus (Microsoft's Rust Rego
interpreter), which evaluates Rego as OPA does.

With ``isolation="process"`` (the default) regorus runs only in worker processes
(``proxy.policy.pool``, ``proxy.policy.worker``): a crash in it cannot take the proxy down,
and evaluation never holds the proxy's GIL (regorus keeps the GIL while it evaluates). With
``isolation="thread"`` the policy runs in-process on a dedicated thread pool, one engine per
thread, built on it (``proxy.policy.query``): cheaper per call, but an evaluation blocks the
event loop while it runs, so a slow one is refused when it ends, not cut off at the timeout.
Either way no answer is used after the timeout, a policy that stops compiling on reload
leaves the last good one serving, and every failure is fail-closed. The ``result`` rule
(checks of a tool's answer) runs the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from proxy.call import Decision
from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.base import EngineStatus
from proxy.policy.bundle import (
    CompiledPolicy,
    PolicyFiles,
    check_files,
    compile_policy,
    describe_rego_error,
    is_test_module,
    policy_paths,
    read_policy_files,
    served_result,
    served_visible,
)
from proxy.policy.cache import DecisionCache, Question
from proxy.policy.decision import (
    ResultDecision,
    decision_from_value,
    result_from_value,
    visible_from_value,
)
from proxy.policy.pool import WorkerPool
from proxy.policy.query import evaluate
from proxy.policy.refs import (
    OPTIONAL_REQUEST_FIELDS,
    impure_builtins,
    input_paths,
    optional_fields_of,
)
from proxy.policy.worker import load_message

__all__ = [
    "CompiledPolicy",
    "EmbeddedEngine",
    "PolicyFiles",
    "compile_policy",
    "describe_rego_error",
    "evaluate",
    "is_test_module",
    "policy_paths",
    "read_policy_files",
]

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
EVAL_TIMEOUT_S = 1.0

Isolation = Literal["process", "thread"]


def _snapshot(root: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        paths = policy_paths(root)
    except ConfigError:
        return ()
    stamps: list[tuple[str, int, int]] = []
    for path in paths:
        with contextlib.suppress(OSError):
            stat = path.stat()
            stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


@dataclass(frozen=True, slots=True)
class _Served:
    """What ``status()`` reports about the policy being served."""

    revision: str
    modules: int
    visible: bool
    request_fields: frozenset[str] = OPTIONAL_REQUEST_FIELDS
    input_paths: tuple[tuple[str, ...], ...] | None = None
    """What the modules read of the input (``None``: may read all of it)."""
    impure: frozenset[str] = frozenset()
    """The impure builtins the modules call: their decisions are not cached."""
    result: bool = False
    """The package defines ``result``: answers are checked."""


class _Evaluators(Protocol):
    """Where the compiled policy runs: worker processes or in-process threads."""

    async def start(self, root: Path, files: PolicyFiles, entrypoint: str) -> None: ...

    async def load(self, root: Path, files: PolicyFiles, entrypoint: str) -> None:
        """Switch to ``files`` only if they compile (``ConfigError`` keeps the old ones)."""

    async def evaluate(
        self, rule: str, document: dict[str, Any], encoded: bytes | None = None
    ) -> tuple[bool, Any]:
        """``encoded``: ``document`` as JSON, if the caller has it already."""

    def problem(self) -> str | None: ...

    async def close(self) -> None: ...


class _Processes:
    def __init__(self, workers: int, timeout_s: float) -> None:
        self.pool = WorkerPool(workers, timeout_s)

    async def start(self, root: Path, files: PolicyFiles, entrypoint: str) -> None:
        await self.pool.start(load_message(root, entrypoint, files))

    async def load(self, root: Path, files: PolicyFiles, entrypoint: str) -> None:
        message = load_message(root, entrypoint, files)
        await self.pool.check(message)
        await self.pool.load(message)

    async def evaluate(
        self, rule: str, document: dict[str, Any], encoded: bytes | None = None
    ) -> tuple[bool, Any]:
        return await self.pool.evaluate(rule, document, encoded)

    def problem(self) -> str | None:
        return self.pool.problem()

    async def close(self) -> None:
        await self.pool.close()


class _Threads:
    def __init__(self, workers: int, timeout_s: float) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.compiled: CompiledPolicy | None = None
        self.executor: ThreadPoolExecutor | None = None

    async def start(self, root: Path, files: PolicyFiles, entrypoint: str) -> None:
        await self.load(root, files, entrypoint)
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="handrail-rego")

    async def load(self, root: Path, files: PolicyFiles, entrypoint: str) -> None:
        """Compile once to check the files; each pool thread then builds its own engine
        on its first call (an engine cannot move between threads)."""
        loop = asyncio.get_running_loop()
        self.compiled = await loop.run_in_executor(None, check_files, root, files, entrypoint)

    async def evaluate(
        self, rule: str, document: dict[str, Any], encoded: bytes | None = None
    ) -> tuple[bool, Any]:
        compiled, executor = self.compiled, self.executor
        if compiled is None or executor is None:
            raise PolicyUnavailable("the embedded policy engine is not started")
        entrypoint = _entrypoint(compiled, rule)
        if entrypoint is None:
            return False, None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout_s
        future = loop.run_in_executor(
            executor, _evaluate_by, deadline, compiled, entrypoint, document
        )
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise PolicyUnavailable(
                f"policy evaluation took longer than {self.timeout_s:g} s"
            ) from None
        except RuntimeError as exc:  # the executor was shut down under us
            raise PolicyUnavailable(f"policy engine stopped: {exc}") from None

    def problem(self) -> str | None:
        return None

    async def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None


def _evaluate_by(
    deadline: float, compiled: CompiledPolicy, rule: str, document: dict[str, Any]
) -> tuple[bool, Any]:
    """``evaluate``, refusing an answer that came after ``deadline``. regorus keeps the GIL
    while it evaluates, so the loop's own timeout cannot fire before a slow evaluation
    ends, and then the answer would win the race: it must fail closed instead."""
    answer = evaluate(compiled, rule, document)
    if time.monotonic() > deadline:
        raise TimeoutError
    return answer


def _entrypoint(compiled: CompiledPolicy, rule: str) -> str | None:
    if rule == "decision":
        return compiled.decision
    if rule == "visible":
        return compiled.visible
    if rule == "result":
        return compiled.result
    raise PolicyUnavailable(f"no such policy rule: {rule}")


def _read(root: Path, entrypoint: str) -> tuple[PolicyFiles, _Served]:
    """Read and check the files in pure Python (no regorus): ConfigError names the file."""
    files = read_policy_files(root)
    visible = served_visible(root, files, entrypoint)
    served = [text for name, text in files.modules.items() if not is_test_module(Path(name))]
    paths = input_paths(served)
    return files, _Served(
        files.revision,
        len(files.modules),
        visible is not None,
        optional_fields_of(paths),
        paths,
        impure_builtins(served),
        result=served_result(files, entrypoint) is not None,
    )


class EmbeddedEngine:
    """Rego on regorus: ``decide`` costs a few hundred microseconds plus a hop to a worker."""

    name = "embedded"

    def __init__(
        self,
        path: Path,
        entrypoint: str,
        workers: int = 2,
        watch: bool = True,
        timeout_s: float = EVAL_TIMEOUT_S,
        watch_interval_s: float = WATCH_INTERVAL_S,
        isolation: Isolation = "process",
        cache_entries: int = 4096,
    ) -> None:
        self.path = Path(path)
        self.entrypoint = entrypoint.strip("/")
        self.workers = workers
        self.watch = watch
        self.timeout_s = timeout_s
        self.watch_interval_s = watch_interval_s
        self.isolation = isolation
        self._served: _Served | None = None
        self._evaluators: _Evaluators | None = None
        self._error: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stamps: tuple[tuple[str, int, int], ...] = ()
        self.cache = DecisionCache(cache_entries)

    async def start(self) -> None:
        """Compile the policy (a ConfigError names the bad file) and start the watcher."""
        loop = asyncio.get_running_loop()
        stamps = await loop.run_in_executor(None, _snapshot, self.path)
        files, served = await loop.run_in_executor(None, _read, self.path, self.entrypoint)
        evaluators: _Evaluators = (
            _Processes(self.workers, self.timeout_s)
            if self.isolation == "process"
            else _Threads(self.workers, self.timeout_s)
        )
        await evaluators.start(self.path, files, self.entrypoint)
        self._evaluators, self._served = evaluators, served
        self.cache.serve(served.input_paths, served.impure)
        self._stamps = stamps
        self._error = None
        logger.info(
            "embedded policy loaded from %s (revision %s, %d worker %s)",
            self.path,
            served.revision,
            self.workers,
            "processes" if self.isolation == "process" else "threads",
            extra={"policy_revision": served.revision},
        )
        if self.watch:
            self._watcher = asyncio.create_task(self._watch(), name="handrail-policy-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._evaluators is not None:
            await self._evaluators.close()
            self._evaluators = None

    async def _run(self, rule: str, question: Question) -> tuple[bool, Any]:
        evaluators = self._evaluators
        if evaluators is None:
            raise PolicyUnavailable("the embedded policy engine is not started")
        return await evaluators.evaluate(rule, question.document, question.encoded)

    async def decide(self, document: dict[str, Any]) -> Decision:
        question = self.cache.question("decision", document)

        async def evaluate() -> Decision:
            defined, value = await self._run("decision", question)
            if not defined:
                raise PolicyUnavailable(
                    f"the decision data.{self.entrypoint.replace('/', '.')} is undefined"
                )
            return decision_from_value(value)

        decision, reused = await self.cache.answer(question.key, evaluate)
        return replace(decision, decision_id=uuid.uuid4().hex, cached=reused)

    async def visible(self, document: dict[str, Any]) -> bool:
        served = self._served
        if served is not None and not served.visible:
            return True
        question = self.cache.question("visible", document)

        async def evaluate() -> bool:
            defined, value = await self._run("visible", question)
            return visible_from_value(defined, value)

        shown, _ = await self.cache.answer(question.key, evaluate)
        return bool(shown)

    @property
    def has_result(self) -> bool:
        served = self._served
        return served is not None and served.result

    async def result(self, document: dict[str, Any]) -> ResultDecision:
        """The ``result`` rule on the call's input plus ``response``. Cached as decisions
        are (by what the policy reads, answer included, and only while it is pure): a
        replayed answer is checked again without a second evaluation."""
        question = self.cache.question("result", document)

        async def evaluate() -> ResultDecision:
            defined, value = await self._run("result", question)
            return result_from_value(value) if defined else ResultDecision(allow=True)

        verdict, _ = await self.cache.answer(question.key, evaluate)
        return replace(verdict, decision_id=uuid.uuid4().hex)

    async def reload(self) -> EngineStatus:
        """Re-compile now; a failure keeps the last good policy and shows in ``status()``."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            stamps = await loop.run_in_executor(None, _snapshot, self.path)
            try:
                files, served = await loop.run_in_executor(None, _read, self.path, self.entrypoint)
                if self._evaluators is None:
                    raise ConfigError("the embedded policy engine is not started")
                await self._evaluators.load(self.path, files, self.entrypoint)
            except ConfigError as exc:
                self._stamps = stamps
                self._error = exc.message
                logger.error(
                    "policy reload failed, %s: %s",
                    "serving the last good policy" if self._served else "no policy loaded",
                    exc.message,
                )
                return self.status()
            self._stamps = stamps
            self._served = served
            self.cache.serve(served.input_paths, served.impure)
            self._error = None
            logger.info("embedded policy reloaded (revision %s)", served.revision)
            return self.status()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                stamps = await loop.run_in_executor(None, _snapshot, self.path)
                if stamps != self._stamps:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad reload
                logger.exception("policy watch failed")

    @property
    def request_fields(self) -> frozenset[str]:
        served = self._served
        return served.request_fields if served is not None else OPTIONAL_REQUEST_FIELDS

    def status(self) -> EngineStatus:
        served = self._served
        if served is None:
            why = self._error or "not started"
            return EngineStatus(ready=False, detail=f"embedded: no policy loaded: {why}")
        detail = (
            f"embedded: {served.modules} module(s) from {self.path}, revision {served.revision}"
        )
        detail += f"; {self.cache.describe()}"
        if self._error:
            detail += f"; serving last good policy; reload failed: {self._error}"
        problem = self._evaluators.problem() if self._evaluators is not None else "stopped"
        if problem:
            return EngineStatus(ready=False, detail=f"{detail}; {problem}")
        return EngineStatus(ready=True, detail=detail)
