"""Run the ``*_test.rego`` files on the embedded engine, as ``opa test`` does.

Each ``test_*`` rule is one test; it passes when it is defined and true, and an error is a
failure, never a pass. regorus runs the test modules as written (``with`` included) with
OPA's semantics, and sets no input, as ``opa test`` does. One check goes beyond
``opa test``: the decision must be defined for every ``with input as EXPR`` of a test. Each
EXPR is added to its module as a rule of its own, in a second engine, evaluated there, and
the decision asked with that document as the input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.policy.bundle import (
    PolicyFiles,
    describe_rego_error,
    is_engine_failure,
    is_test_module,
    new_engine,
    read_policy_files,
    rule_path,
)
from proxy.policy.query import rule_json

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WITH_INPUT = re.compile(r"with\s+input\s+as\s+")
_RULE_HEAD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
_TEST_HEAD = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)
_NOT_RULES = frozenset({"package", "import", "default"})
_INPUT_RULE = "__handrail_test_input_"


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str
    passed: bool
    message: str = ""


@dataclass(slots=True)
class _Test:
    module: str
    package: str
    rule: str
    inputs: set[str]

    @property
    def name(self) -> str:
        return f"data.{self.package}.{self.rule}"


def _skip_string(text: str, i: int) -> int:
    """Index just past the string literal starting at ``i``."""
    quote = text[i]
    i += 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    return i


def _skip_balanced(text: str, i: int) -> int:
    closing = {"{": "}", "[": "]", "(": ")"}
    stack = [closing[text[i]]]
    i += 1
    while i < len(text) and stack:
        char = text[i]
        if char in '"`':
            i = _skip_string(text, i)
            continue
        if char == "#":
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            continue
        if char in closing:
            stack.append(closing[char])
        elif char == stack[-1]:
            stack.pop()
        i += 1
    return i


def _term_end(text: str, i: int) -> int:
    """Index just past the Rego term starting at ``i`` (literal, collection, ref or call)."""
    if i >= len(text):
        return i
    if text[i] in "{[(":
        return _skip_balanced(text, i)
    if text[i] in '"`':
        return _skip_string(text, i)
    match = _IDENT.match(text, i) or re.compile(r"-?[0-9][0-9.eE+-]*").match(text, i)
    if match is None:
        return i
    i = match.end()
    while i < len(text):
        if text[i] == "." and _IDENT.match(text, i + 1):
            i = _IDENT.match(text, i + 1).end()  # type: ignore[union-attr]
        elif text[i] in "[(":
            i = _skip_balanced(text, i)
        else:
            break
    return i


def _rule_at(text: str, offset: int) -> str | None:
    rule = None
    for head in _RULE_HEAD.finditer(text, 0, offset):
        if head.group(1) not in _NOT_RULES:
            rule = head.group(1)
    return rule


def input_expressions(source: str) -> dict[str, set[str]]:
    """Per rule, the ``EXPR`` texts of its ``with input as EXPR`` (strings and comments
    skipped)."""
    inputs: dict[str, set[str]] = {}
    i = 0
    while i < len(source):
        char = source[i]
        if char in '"`':
            i = _skip_string(source, i)
            continue
        if char == "#":
            end = source.find("\n", i)
            i = len(source) if end < 0 else end
            continue
        boundary = i == 0 or not (source[i - 1].isalnum() or source[i - 1] == "_")
        match = _WITH_INPUT.match(source, i) if boundary and char == "w" else None
        if match is None:
            i += 1
            continue
        end = _term_end(source, match.end())
        inputs.setdefault(_rule_at(source, i) or "?", set()).add(source[match.end() : end].strip())
        i = end
    return inputs


def _tests(files: PolicyFiles) -> list[_Test]:
    tests: list[_Test] = []
    for name, source in files.modules.items():
        if not is_test_module(Path(name)):
            continue
        declared = _PACKAGE.search(source)
        package = declared.group(1) if declared else ""
        inputs = input_expressions(source)
        seen: set[str] = set()
        for head in _TEST_HEAD.finditer(source):
            rule = head.group(1)
            if rule not in seen:
                seen.add(rule)
                tests.append(_Test(name, package, rule, inputs.get(rule, set())))
    return tests


def _ask(engine: Any, rule: str) -> tuple[bool, Any]:
    """``(defined, value)``; raises ``ConfigError`` with regorus's one-line message."""
    try:
        value = rule_json(engine, rule)
    except BaseException as exc:
        if not is_engine_failure(exc):
            raise
        raise ConfigError(describe_rego_error(str(exc))) from None
    return (False, None) if value is None else (True, json.loads(value))


def _run(files: PolicyFiles, tests: list[_Test]) -> list[TestResult]:
    engine = new_engine(files)  # compile errors surface here, naming the file
    results: list[TestResult] = []
    for test in tests:
        try:
            defined, value = _ask(engine, test.name)
        except ConfigError as exc:
            results.append(TestResult(test.name, False, exc.message))
            engine = new_engine(files)  # nothing of a failed evaluation is kept
            continue
        if not defined:
            results.append(
                TestResult(test.name, False, "undefined (a condition in the test failed)")
            )
        elif value is not True:
            results.append(TestResult(test.name, False, f"evaluated to {value!r}, not true"))
        else:
            results.append(TestResult(test.name, True))
    return results


def _decision_check(files: PolicyFiles, tests: list[_Test], decision: str) -> TestResult:
    """Whether ``decision`` is defined for the input of every test that sets one."""
    check = f"{decision} is defined for every test input"
    modules = dict(files.modules)
    rules: dict[tuple[str, str], str] = {}
    for test in tests:
        for expression in sorted(test.inputs):
            if (test.module, expression) not in rules:
                rule = f"{_INPUT_RULE}{len(rules)}"
                rules[(test.module, expression)] = f"data.{test.package}.{rule}"
                modules[test.module] += f"\n\n{rule} := {expression}\n"
    undefined_for: list[str] = []
    try:
        engine = new_engine(PolicyFiles(modules, files.data, files.revision))
        documents = {key: _ask(engine, rule) for key, rule in rules.items()}
        for test in tests:
            for expression in test.inputs:
                defined, document = documents[(test.module, expression)]
                if defined:
                    engine.set_input_json(json.dumps(document))
                    defined, _ = _ask(engine, decision)
                if not defined:
                    undefined_for.append(test.rule)
    except ConfigError as exc:
        return TestResult(check, False, f"a test's input cannot be evaluated: {exc.message}")
    if undefined_for:
        why = "undefined for the input of " + ", ".join(sorted(set(undefined_for)))
        return TestResult(check, False, why)
    return TestResult(check, True)


def run_policy_tests(root: Path, entrypoint: str) -> list[TestResult]:
    """Every ``test_*`` rule under ``root``; a policy that does not compile raises ConfigError."""
    files = read_policy_files(root, with_tests=True)
    tests = _tests(files)
    results = _run(files, tests)
    with_input = [test for test in tests if test.inputs]
    if with_input:
        package, _, rule = entrypoint.strip("/").rpartition("/")
        results.append(_decision_check(files, with_input, rule_path(package, rule)))
    return results


__all__ = ["TestResult", "describe_rego_error", "input_expressions", "run_policy_tests"]
