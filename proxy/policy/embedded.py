"""The embedded engine: the policy files compiled in-process with regopy (rego-cpp).

The policy is compiled once into a bundle (``proxy.policy.bundle``); each decision runs it
in a dedicated thread pool (regopy releases the GIL) on that thread's interpreter
(``proxy.policy.query``), bounded by a timeout. A policy that stops compiling on reload
leaves the last good bundle serving; every failure is fail-closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from proxy.call import Decision
from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.base import EngineStatus
from proxy.policy.bundle import (
    CompiledPolicy,
    PolicyFiles,
    compile_policy,
    describe_rego_error,
    is_test_module,
    load_interpreter,
    policy_paths,
    read_policy_files,
)
from proxy.policy.decision import decision_from_value, visible_from_value
from proxy.policy.query import evaluate, first_query_value, node_value

__all__ = [
    "CompiledPolicy",
    "EmbeddedEngine",
    "PolicyFiles",
    "compile_policy",
    "describe_rego_error",
    "evaluate",
    "first_query_value",
    "is_test_module",
    "load_interpreter",
    "node_value",
    "policy_paths",
    "read_policy_files",
]

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
EVAL_TIMEOUT_S = 1.0


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


class EmbeddedEngine:
    """In-process Rego; ``decide`` costs tens of microseconds plus a thread hop."""

    name = "embedded"

    def __init__(
        self,
        path: Path,
        entrypoint: str,
        workers: int = 2,
        watch: bool = True,
        timeout_s: float = EVAL_TIMEOUT_S,
        watch_interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self.path = Path(path)
        self.entrypoint = entrypoint.strip("/")
        self.workers = workers
        self.watch = watch
        self.timeout_s = timeout_s
        self.watch_interval_s = watch_interval_s
        self._compiled: CompiledPolicy | None = None
        self._error: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stamps: tuple[tuple[str, int, int], ...] = ()

    async def start(self) -> None:
        """Compile the policy (a ConfigError names the bad file) and start the watcher."""
        loop = asyncio.get_running_loop()
        stamps = await loop.run_in_executor(None, _snapshot, self.path)
        self._compiled = await loop.run_in_executor(
            None, compile_policy, self.path, self.entrypoint
        )
        self._stamps = stamps
        self._error = None
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="handrail-rego")
        logger.info(
            "embedded policy loaded from %s (revision %s)",
            self.path,
            self._compiled.revision,
            extra={"policy_revision": self._compiled.revision},
        )
        if self.watch:
            self._watcher = asyncio.create_task(self._watch(), name="handrail-policy-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _run(self, entrypoint_of: str, document: dict[str, Any]) -> tuple[bool, Any]:
        compiled, executor = self._compiled, self._executor
        if compiled is None or executor is None:
            raise PolicyUnavailable("the embedded policy engine is not started")
        entrypoint = compiled.decision if entrypoint_of == "decision" else compiled.visible
        assert entrypoint is not None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor, evaluate, compiled.bundle, entrypoint, document)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise PolicyUnavailable(
                f"policy evaluation took longer than {self.timeout_s:g} s"
            ) from None
        except RuntimeError as exc:  # the executor was shut down under us
            raise PolicyUnavailable(f"policy engine stopped: {exc}") from None

    async def decide(self, document: dict[str, Any]) -> Decision:
        defined, value = await self._run("decision", document)
        if not defined:
            raise PolicyUnavailable(
                f"the decision data.{self.entrypoint.replace('/', '.')} is undefined"
            )
        return decision_from_value(value, uuid.uuid4().hex)

    async def visible(self, document: dict[str, Any]) -> bool:
        compiled = self._compiled
        if compiled is not None and compiled.visible is None:
            return True
        defined, value = await self._run("visible", document)
        return visible_from_value(defined, value)

    async def reload(self) -> EngineStatus:
        """Re-compile now; a failure keeps the last good policy and shows in ``status()``."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            stamps = await loop.run_in_executor(None, _snapshot, self.path)
            try:
                compiled = await loop.run_in_executor(
                    None, compile_policy, self.path, self.entrypoint
                )
            except ConfigError as exc:
                self._stamps = stamps
                self._error = exc.message
                logger.error(
                    "policy reload failed, %s: %s",
                    "serving the last good policy" if self._compiled else "no policy loaded",
                    exc.message,
                )
                return self.status()
            self._stamps = stamps
            self._compiled = compiled
            self._error = None
            logger.info("embedded policy reloaded (revision %s)", compiled.revision)
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

    def status(self) -> EngineStatus:
        compiled = self._compiled
        if compiled is None:
            why = self._error or "not started"
            return EngineStatus(ready=False, detail=f"embedded: no policy loaded: {why}")
        detail = (
            f"embedded: {compiled.modules} module(s) from {self.path}, revision {compiled.revision}"
        )
        if self._error:
            detail += f"; serving last good policy; reload failed: {self._error}"
        return EngineStatus(ready=True, detail=detail)
