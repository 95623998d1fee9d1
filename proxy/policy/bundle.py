"""Reading and compiling the policy files for the embedded engine (regopy, rego-cpp).

The ``.rego`` modules (minus ``*_test.rego``) and data ``.json`` files under the policy path
are compiled once into a bundle, read like ``opa run DIR``; a ``ConfigError`` names the file
and line of what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regopy
from regopy import rego_shared as rs

from proxy.errors import ConfigError
from proxy.policy.refs import defines_rule

_ERROR_HEAD = re.compile(r"\(error (\d+):")
_ERROR_AT = re.compile(r"\|(\d+)\|(\d+)")
_ERROR_MSG = re.compile(r"\(errormsg (\d+):")
_WITH_KEYWORD = re.compile(r"\bwith\s+[A-Za-z_][A-Za-z0-9_.\[\]\"]*\s+as\b")


def new_interpreter() -> Any:
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE  # errors reach us, not stdout
    return interpreter


def _prepare(bundle: Any) -> None:
    """Make rego-cpp turn the built AST into its runnable bundle now, on this thread.

    It does so lazily on a bundle's first query, unguarded: two worker threads making the
    first queries at once would race on it. Asking for an entrypoint that does not exist
    does the conversion and nothing else.
    """
    interpreter = new_interpreter()
    output = rs.rego.regoBundleQueryEntrypoint(
        interpreter._impl, bundle._impl, b"__handrail_prepare__/none"
    )
    if output:
        rs.rego_free_output(output)


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
    result: str | None
    """``{package}/result`` when the package defines it (else answers are not checked)."""
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


def _defines(modules: dict[str, str], package: str, rule: str) -> bool:
    """Whether a module of ``package`` has a rule head named ``rule`` (regopy cannot tell)."""
    served = (source for name, source in modules.items() if not is_test_module(Path(name)))
    return defines_rule(served, package, rule)


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
    interpreter = new_interpreter()
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


def served_visible(root: Path, files: PolicyFiles, entrypoint: str) -> str | None:
    """Check the files can be served (pure Python, no rego-cpp) and find the ``visible`` rule.

    Raises ``ConfigError`` when the decision rule is missing or a module uses ``with``
    (compiling that aborts rego-cpp); returns ``{package}/visible`` when it is defined.
    """
    package, _, rule = entrypoint.rpartition("/")
    dotted = package.replace("/", ".")
    if not _defines(files.modules, dotted, rule):
        raise ConfigError(f"{root}: no rule {rule!r} in package {dotted or '(none)'}")
    visible = f"{package}/visible" if _defines(files.modules, dotted, "visible") else None
    _refuse_with(files.modules)
    return visible


def served_result(files: PolicyFiles, entrypoint: str) -> str | None:
    """``{package}/result`` when the decision's package defines a ``result`` rule."""
    package = entrypoint.rpartition("/")[0]
    defined = _defines(files.modules, package.replace("/", "."), "result")
    return f"{package}/result" if defined else None


def compile_files(root: Path, files: PolicyFiles, entrypoint: str) -> CompiledPolicy:
    """Compile files already read; ``ConfigError`` names the file and line."""
    visible = served_visible(root, files, entrypoint)
    result = served_result(files, entrypoint)
    interpreter = load_interpreter(files)
    entrypoints = [e for e in (entrypoint, visible, result) if e is not None]
    try:
        bundle = interpreter.build(None, entrypoints)
    except regopy.RegoError as exc:
        raise ConfigError(describe_rego_error(str(exc), files.modules)) from None
    if not bundle.ok():
        raise ConfigError(f"{root}: the policy did not compile")
    _prepare(bundle)
    return CompiledPolicy(
        bundle=bundle,
        decision=entrypoint,
        visible=visible,
        result=result,
        revision=files.revision,
        modules=len(files.modules),
    )


def compile_policy(root: Path, entrypoint: str) -> CompiledPolicy:
    """Read and compile the served files; ``ConfigError`` names the file and line."""
    return compile_files(root, read_policy_files(root), entrypoint)
