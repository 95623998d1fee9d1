"""The embedded engine: the policy files compiled in-process with regopy (rego-cpp).

The ``.rego`` modules (minus ``*_test.rego``) and data ``.json`` files under the policy path
are compiled once into a bundle; each decision runs a fresh interpreter on that bundle in a
dedicated thread pool (regopy releases the GIL), bounded by a timeout. A policy that stops
compiling on reload leaves the last good bundle serving; every failure is fail-closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regopy
from regopy import NodeKind
from regopy import rego_shared as rs

from proxy.call import Decision
from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.base import EngineStatus
from proxy.policy.decision import decision_from_value, visible_from_value

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
EVAL_TIMEOUT_S = 1.0

_ERROR_HEAD = re.compile(r"\(error (\d+):")
_ERROR_AT = re.compile(r"\|(\d+)\|(\d+)")
_ERROR_MSG = re.compile(r"\(errormsg (\d+):")
_WITH_KEYWORD = re.compile(r"\bwith\s+[A-Za-z_][A-Za-z0-9_.\[\]\"]*\s+as\b")
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    """What one compile reads: modules (name -> source) and the merged data document."""

    modules: dict[str, str]
    data: dict[str, Any]
    revision: str


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    bundle: Any = field(repr=False)
    decision: str
    visible: str | None
    """``{package}/visible`` when the package defines it (else every tool is visible)."""
    revision: str
    modules: int


def is_test_module(path: Path) -> bool:
    return path.name.endswith("_test.rego")


def _served(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(part.startswith(".") for part in parts)


def policy_paths(root: Path, tests: bool = False) -> list[Path]:
    """The served ``.rego`` and ``.json`` files under ``root`` (or only the test modules)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: the policy path is not a directory")
    found: list[Path] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _served(path, root):
            continue
        if path.suffix == ".rego" and is_test_module(path) == tests:
            found.append(path)
        elif path.suffix == ".json" and not tests:
            found.append(path)
    return found


def _merge(into: dict[str, Any], value: dict[str, Any], where: str, source: Path) -> None:
    for key, item in value.items():
        here = f"{where}.{key}" if where else key
        if key in into:
            if isinstance(into[key], dict) and isinstance(item, dict):
                _merge(into[key], item, here, source)
                continue
            raise ConfigError(f"{source}: data.{here} is already defined by another data file")
        into[key] = item


def read_policy_files(root: Path, with_tests: bool = False) -> PolicyFiles:
    """Read modules and data like ``opa run DIR``: ``x/y/data.json`` lands at ``data.x.y``."""
    paths = policy_paths(root)
    if with_tests:
        paths += policy_paths(root, tests=True)
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    digest = hashlib.sha256()
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        digest.update(str(path.relative_to(root)).encode() + b"\0" + raw + b"\0")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        if path.suffix == ".rego":
            modules[str(path)] = text
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        prefix = path.parent.relative_to(root).parts
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: a data file must hold a JSON object")
        for part in reversed(prefix):
            value = {part: value}
        _merge(data, value, "", path)
    if not any(not is_test_module(Path(name)) for name in modules):
        raise ConfigError(f"{root}: no .rego policy files found")
    return PolicyFiles(modules=modules, data=data, revision=digest.hexdigest()[:12])


def describe_rego_error(text: str, sources: dict[str, str]) -> str:
    """Turn regopy's error S-expression into ``file:line:col: message`` lines."""
    found: list[str] = []
    for head in _ERROR_HEAD.finditer(text):
        start = head.end()
        name = text[start : start + int(head.group(1))]
        rest = text[start + int(head.group(1)) :]
        message_match = _ERROR_MSG.search(rest)
        message = (
            rest[message_match.end() : message_match.end() + int(message_match.group(1))]
            if message_match
            else "error"
        )
        where = name
        at = _ERROR_AT.match(rest)
        if at and name in sources:
            encoded = sources[name].encode("utf-8")
            offset = int(at.group(1))
            line = encoded.count(b"\n", 0, offset) + 1
            column = offset - (encoded.rfind(b"\n", 0, offset) + 1) + 1
            where = f"{name}:{line}:{column}"
        found.append(f"{where}: {message}" if where else message)
    if not found:
        first = text.strip().splitlines()[0] if text.strip() else "unknown error"
        return first
    return "; ".join(found)


def _new_interpreter() -> Any:
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE  # errors reach us, not stdout
    return interpreter


def _defines(modules: dict[str, str], package: str, rule: str) -> bool:
    """Whether a module of ``package`` has a rule head named ``rule`` (regopy cannot tell)."""
    head = re.compile(rf"^(default\s+)?{re.escape(rule)}\b", re.MULTILINE)
    for source in modules.values():
        declared = _PACKAGE.search(source)
        if declared and declared.group(1) == package and head.search(source):
            return True
    return False


def _refuse_with(modules: dict[str, str]) -> None:
    """regopy aborts the whole process compiling ``with`` over rules calling builtins."""
    for name, source in modules.items():
        for number, line in enumerate(source.splitlines(), 1):
            if _WITH_KEYWORD.search(line.split("#", 1)[0]):
                raise ConfigError(
                    f"{name}:{number}: 'with ... as' is not supported in served policies by the "
                    "embedded engine (regopy); keep it in *_test.rego files"
                )


def load_interpreter(files: PolicyFiles) -> Any:
    """An interpreter holding every module and the data: raises ConfigError on a bad module."""
    interpreter = _new_interpreter()
    for name, source in files.modules.items():
        try:
            interpreter.add_module(name, source)
        except regopy.RegoError as exc:
            raise ConfigError(describe_rego_error(str(exc), files.modules)) from None
    if files.data:
        try:
            interpreter.add_data_json(json.dumps(files.data))
        except regopy.RegoError as exc:
            raise ConfigError(f"policy data: {describe_rego_error(str(exc), {})}") from None
    return interpreter


def compile_policy(root: Path, entrypoint: str) -> CompiledPolicy:
    """Read and compile the served files; ``ConfigError`` names the file and line."""
    files = read_policy_files(root)
    package, _, rule = entrypoint.rpartition("/")
    dotted = package.replace("/", ".")
    if not _defines(files.modules, dotted, rule):
        raise ConfigError(f"{root}: no rule {rule!r} in package {dotted or '(none)'}")
    visible = f"{package}/visible" if _defines(files.modules, dotted, "visible") else None
    _refuse_with(files.modules)
    interpreter = load_interpreter(files)
    entrypoints = [entrypoint] if visible is None else [entrypoint, visible]
    try:
        bundle = interpreter.build(None, entrypoints)
    except regopy.RegoError as exc:
        raise ConfigError(describe_rego_error(str(exc), files.modules)) from None
    if not bundle.ok():
        raise ConfigError(f"{root}: the policy did not compile")
    return CompiledPolicy(
        bundle=bundle,
        decision=entrypoint,
        visible=visible,
        revision=files.revision,
        modules=len(files.modules),
    )


def node_value(node: Any) -> Any:
    """A regopy result node as a Python value.

    Not ``Output``'s JSON: regopy does not escape quotes or backslashes in the strings it
    prints, so a reason quoting the input would not parse. Nodes hold the raw strings.
    """
    kind = rs.rego_node_type(node)
    if kind in (NodeKind.Term, NodeKind.Scalar):
        return node_value(rs.rego_node_get(node, 0))
    if kind == NodeKind.String:
        return _string(rs.rego_node_value(node))
    if kind == NodeKind.Int:
        return int(rs.rego_node_value(node))
    if kind == NodeKind.Float:
        return float(rs.rego_node_value(node))
    if kind in (NodeKind.Boolean, NodeKind.True_, NodeKind.False_):
        return (
            rs.rego_node_value(node) == "true"
            if kind == NodeKind.Boolean
            else kind == NodeKind.True_
        )
    if kind == NodeKind.Null:
        return None
    size = rs.rego_node_size(node)
    if kind in (NodeKind.Array, NodeKind.Set):
        return [node_value(rs.rego_node_get(node, i)) for i in range(size)]
    if kind == NodeKind.Object:
        items: dict[Any, Any] = {}
        for i in range(size):
            item = rs.rego_node_get(node, i)
            key = node_value(rs.rego_node_get(item, 0))
            items[key if isinstance(key, str) else json.dumps(key)] = node_value(
                rs.rego_node_get(item, 1)
            )
        return items
    raise ValueError(f"unexpected result node {rs.rego_node_type_name(node)}")


def _string(raw: str) -> str:
    """regopy hands some strings (e.g. ``concat``'s) back still JSON-quoted."""
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        try:
            decoded = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(decoded, str):
            return decoded
    return raw


def _first_value(output: Any) -> tuple[bool, Any]:
    root = rs.rego_output_node(output)
    if rs.rego_node_type(root) != NodeKind.Results or rs.rego_node_size(root) == 0:
        return False, None
    result = rs.rego_node_get(root, 0)
    for i in range(rs.rego_node_size(result)):
        terms = rs.rego_node_get(result, i)
        if rs.rego_node_type(terms) == NodeKind.Terms:
            if rs.rego_node_size(terms) == 0:
                return False, None
            return True, node_value(rs.rego_node_get(terms, 0))
    return False, None


def _read_output(interpreter: Any, output: Any) -> tuple[bool, Any]:
    try:
        # A failed output kills the process when printed: check ok() before anything else.
        if not rs.rego_output_ok(output):
            error = rs.rego_get_error(interpreter._impl)
            raise PolicyUnavailable(f"policy evaluation failed: {describe_rego_error(error, {})}")
        return _first_value(output)
    except PolicyUnavailable:
        raise
    except Exception as exc:
        raise PolicyUnavailable(f"policy evaluation failed: {type(exc).__name__}: {exc}") from None
    finally:
        rs.rego_free_output(output)


def first_query_value(interpreter: Any, query: str) -> tuple[bool, Any]:
    """Run an ad-hoc query (re-parses the modules: for tests and tools, not per call)."""
    try:
        output = rs.rego_query(interpreter._impl, query)
    except Exception as exc:
        error = describe_rego_error(str(exc), {})
        raise PolicyUnavailable(f"policy evaluation failed: {error}") from None
    return _read_output(interpreter, output)


def evaluate(bundle: Any, entrypoint: str, document: Any) -> tuple[bool, Any]:
    """One evaluation on a fresh interpreter: ``(defined, value)``; failures raise 503."""
    try:
        interpreter = _new_interpreter()
        interpreter.set_input(document)
        output = rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)
    except Exception as exc:
        raise PolicyUnavailable(f"policy evaluation failed: {type(exc).__name__}: {exc}") from None
    return _read_output(interpreter, output)


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
