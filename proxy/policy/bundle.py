"""Reading and compiling the policy files for the embedded engine (regorus).

The ``.rego`` modules (minus ``*_test.rego``) and data ``.json`` files under the policy path
are read like ``opa run DIR`` and compiled once per load into a ``regorus.Engine``; each
evaluation then only replaces the engine's input. A ``ConfigError`` names the file and line
of what is wrong. An engine may only be used on the thread that built it (regorus panics
otherwise), so ``compile_files`` checks the files and ``proxy.policy.query`` builds and
keeps one engine per thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regorus  # type: ignore[import-untyped]  # no stubs or py.typed

from proxy.errors import ConfigError
from proxy.policy.refs import defines_rule, split_package_imports

_LOCATION = re.compile(r"^\s*-->\s*(\S+)\s*$", re.MULTILINE)
_MESSAGE = re.compile(r"^error:\s*(.+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    """What one compile reads: modules (name -> source) and the merged data document."""

    modules: dict[str, str]
    data: dict[str, Any]
    revision: str


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """Files that compiled, and the rules to ask (``data.<package>.<rule>``)."""

    files: PolicyFiles
    decision: str
    visible: str | None
    """``data.{package}.visible`` when the package defines it (else every tool is visible)."""
    result: str | None
    """``data.{package}.result`` when the package defines it (else answers are not checked)."""
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


def describe_rego_error(text: str) -> str:
    """regorus's error as one line: ``file:line:col: message``, without the Rust backtrace."""
    text = text.split("Stack backtrace:", 1)[0]
    message = _MESSAGE.search(text)
    where = _LOCATION.search(text)
    if message and where:
        return f"{where.group(1)}: {message.group(1).strip()}"
    if message:
        return message.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def is_engine_failure(exc: BaseException) -> bool:
    """An error from regorus: an ``Exception``, or pyo3's ``PanicException`` (a Rust panic,
    which derives from ``BaseException``); never an interrupt or a cancellation."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _defines(modules: dict[str, str], package: str, rule: str) -> bool:
    """Whether a served module of ``package`` has a rule head named ``rule`` (asking
    regorus for a rule it does not have is an error, not an undefined value)."""
    served = (source for name, source in modules.items() if not is_test_module(Path(name)))
    return defines_rule(served, package, rule)


def new_engine(files: PolicyFiles) -> Any:
    """A ``regorus.Engine`` holding every module and the data, checked as a whole (unsafe
    variables, conflicting rule kinds...): raises ``ConfigError`` naming the file and line.
    Use it only on the thread that called this."""
    problems = split_package_imports(files.modules)
    if problems:
        raise ConfigError("; ".join(problems))
    engine = regorus.Engine()
    try:
        for name, source in files.modules.items():
            engine.add_policy(name, source)
        if files.data:
            engine.add_data_json(json.dumps(files.data))
        # regorus analyses the modules on the first query, not when they are added.
        engine.eval_query("true")
    except BaseException as exc:
        if not is_engine_failure(exc):
            raise
        message = describe_rego_error(str(exc))
    else:
        return engine
    # Raised out here, where no traceback keeps the engine alive to be dropped elsewhere.
    del engine
    raise ConfigError(message)


def rule_path(package: str, rule: str) -> str:
    """``handrail``/``handrail/x`` and ``decision`` -> ``data.handrail.decision``."""
    return f"data.{package.replace('/', '.')}.{rule}"


def served_visible(root: Path, files: PolicyFiles, entrypoint: str) -> str | None:
    """Check the decision rule exists (pure Python) and find the ``visible`` rule.

    Raises ``ConfigError`` when the decision rule is missing; returns its package's
    ``visible`` rule path when it is defined.
    """
    package, _, rule = entrypoint.strip("/").rpartition("/")
    dotted = package.replace("/", ".")
    if not _defines(files.modules, dotted, rule):
        raise ConfigError(f"{root}: no rule {rule!r} in package {dotted or '(none)'}")
    return rule_path(package, "visible") if _defines(files.modules, dotted, "visible") else None


def served_result(files: PolicyFiles, entrypoint: str) -> str | None:
    """The ``result`` rule path when the decision's package defines a ``result`` rule."""
    package = entrypoint.strip("/").rpartition("/")[0]
    defined = _defines(files.modules, package.replace("/", "."), "result")
    return rule_path(package, "result") if defined else None


def compile_files(root: Path, files: PolicyFiles, entrypoint: str) -> tuple[CompiledPolicy, Any]:
    """Compile files already read: the policy and its engine (for this thread only);
    ``ConfigError`` names the file and line."""
    visible = served_visible(root, files, entrypoint)
    result = served_result(files, entrypoint)
    engine = new_engine(files)
    package, _, rule = entrypoint.strip("/").rpartition("/")
    compiled = CompiledPolicy(
        files=files,
        decision=rule_path(package, rule),
        visible=visible,
        result=result,
        revision=files.revision,
        modules=len(files.modules),
    )
    return compiled, engine


def check_files(root: Path, files: PolicyFiles, entrypoint: str) -> CompiledPolicy:
    """``compile_files`` keeping only the policy: the engine is dropped on this thread,
    the only one allowed to drop it (pyo3 leaks an engine dropped elsewhere)."""
    compiled, _ = compile_files(root, files, entrypoint)
    return compiled


def compile_policy(root: Path, entrypoint: str) -> tuple[CompiledPolicy, Any]:
    """Read and compile the served files; ``ConfigError`` names the file and line."""
    return compile_files(root, read_policy_files(root), entrypoint)
