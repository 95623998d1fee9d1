"""Run the ``*_test.rego`` files on the embedded engine, as ``opa test`` would.

Each ``test_*`` rule is one test; it passes when it is defined and true. regopy fails any
rule evaluated under ``with input as ...`` that calls a builtin, so the runner feeds the
input another way: it lifts each test's ``with input as EXPR`` out of the module, evaluates
EXPR on its own, and evaluates the test with that document as the input. Real OPA runs the
same files unchanged. An internal error is a failure, never a pass; a test using another
kind of ``with`` (``with data...``) is reported as a failure saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.embedded import (
    PolicyFiles,
    describe_rego_error,
    first_query_value,
    is_test_module,
    load_interpreter,
    read_policy_files,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WITH = re.compile(r"with\s+([A-Za-z_][A-Za-z0-9_.\[\]\"]*)\s+as\s+")
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
    package: str
    rule: str
    inputs: set[str]
    problems: list[str]


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


def lift_inputs(source: str) -> tuple[str, dict[str, set[str]], dict[str, list[str]]]:
    """Remove ``with input as EXPR``; per rule, the EXPR texts and any unsupported ``with``."""
    out: list[str] = []
    inputs: dict[str, set[str]] = {}
    problems: dict[str, list[str]] = {}
    i = start = 0
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
        match = _WITH.match(source, i) if boundary and char == "w" else None
        if match is None:
            i += 1
            continue
        rule = _rule_at(source, i) or "?"
        end = _term_end(source, match.end())
        target = match.group(1)
        if target == "input":
            inputs.setdefault(rule, set()).add(source[match.end() : end].strip())
            out.append(source[start:i].rstrip(" \t"))
            start = end
        else:
            problems.setdefault(rule, []).append(
                f"'with {target} as ...' is not supported by the embedded test runner "
                "(regopy); only 'with input as ...' is"
            )
        i = end
    out.append(source[start:])
    return "".join(out), inputs, problems


def _prepare(files: PolicyFiles) -> tuple[PolicyFiles, list[_Test], dict[tuple[str, str], str]]:
    """The files with test modules rewritten, the tests, and the synthetic input rules."""
    modules: dict[str, str] = {}
    tests: list[_Test] = []
    input_rules: dict[tuple[str, str], str] = {}
    for name, source in files.modules.items():
        if not is_test_module(Path(name)):
            modules[name] = source
            continue
        declared = _PACKAGE.search(source)
        package = declared.group(1) if declared else ""
        rewritten, inputs, problems = lift_inputs(source)
        extra: list[str] = []
        for expressions in inputs.values():
            for expression in sorted(expressions):
                if (package, expression) not in input_rules:
                    rule = f"{_INPUT_RULE}{len(input_rules)}"
                    input_rules[(package, expression)] = rule
                    extra.append(f"\n{rule} := {expression}\n")
        modules[name] = rewritten + "".join(extra)
        seen: set[str] = set()
        for head in _TEST_HEAD.finditer(source):
            rule = head.group(1)
            if rule in seen:
                continue
            seen.add(rule)
            tests.append(_Test(package, rule, inputs.get(rule, set()), problems.get(rule, [])))
    return PolicyFiles(modules, files.data, files.revision), tests, input_rules


def run_policy_tests(root: Path, entrypoint: str) -> list[TestResult]:
    """Every ``test_*`` rule under ``root``; a policy that does not compile raises ConfigError."""
    files, tests, input_rules = _prepare(read_policy_files(root, with_tests=True))
    inputs = load_interpreter(files)  # compile errors surface here, naming the file
    results: list[TestResult] = []
    decision_query = "data." + entrypoint.strip("/").replace("/", ".")
    undefined_for: list[str] = []
    for test in tests:
        name = f"data.{test.package}.{test.rule}"
        if test.problems:
            results.append(TestResult(name, False, test.problems[0]))
            continue
        if len(test.inputs) > 1:
            results.append(
                TestResult(name, False, "uses more than one input document; split the test")
            )
            continue
        document: Any = None
        try:
            if test.inputs:
                rule = input_rules[(test.package, next(iter(test.inputs)))]
                defined, document = first_query_value(inputs, f"data.{test.package}.{rule}")
                if not defined:
                    results.append(TestResult(name, False, "its input expression is undefined"))
                    continue
            interpreter = load_interpreter(files)
            if document is not None:
                interpreter.set_input(document)
            defined, value = first_query_value(interpreter, name)
            if document is not None:
                decided, _ = first_query_value(interpreter, decision_query)
                if not decided:
                    undefined_for.append(test.rule)
        except (PolicyUnavailable, ConfigError) as exc:
            results.append(TestResult(name, False, exc.message))
            continue
        if not defined:
            results.append(TestResult(name, False, "undefined (a condition in the test failed)"))
        elif value is not True:
            results.append(TestResult(name, False, f"evaluated to {value!r}, not true"))
        else:
            results.append(TestResult(name, True))
    if any(test.inputs for test in tests):
        check = f"{decision_query} is defined for every test input"
        if undefined_for:
            why = "undefined for the input of " + ", ".join(sorted(set(undefined_for)))
            results.append(TestResult(check, False, why))
        else:
            results.append(TestResult(check, True))
    return results


__all__ = ["TestResult", "describe_rego_error", "lift_inputs", "run_policy_tests"]
