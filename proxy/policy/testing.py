"""Run the ``*_test.rego`` files on the embedded engine, as ``opa test`` would.

Each ``test_*`` rule is one test; it passes when it is defined and true. regopy fails any
rule evaluated under ``with input as ...`` that calls a builtin, so the runner feeds the
input another way: it lifts each test's ``with input as EXPR`` out of the module, evaluates
EXPR on its own, and evaluates the test with that document as the input. Real OPA runs the
same files unchanged. An internal error is a failure, never a pass; a test using another
kind of ``with`` (``with data...``) is reported as a failure saying so. The tests, their
inputs and the decision are compiled once into one bundle, so a run costs one compile, not
one per query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regopy
from regopy import rego_shared as rs

from proxy.errors import ConfigError, PolicyUnavailable
from proxy.policy.bundle import new_interpreter
from proxy.policy.embedded import (
    PolicyFiles,
    describe_rego_error,
    first_query_value,
    is_test_module,
    load_interpreter,
    read_policy_files,
)
from proxy.policy.query import read_output
from proxy.policy.regoinput import set_input

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


class _Queries:
    """Every query a run needs, compiled once into one bundle: each then costs a fraction of
    a millisecond instead of a parse of every module. Each query gets a fresh interpreter,
    so no test sees another's input."""

    def __init__(self, interpreter: Any, queries: list[str]) -> None:
        self.bundle = interpreter.build(None, [_entrypoint(q) for q in queries])
        if not self.bundle.ok():
            raise ConfigError("the policy and its tests did not compile into one bundle")

    def ask(self, query: str, document: Any = None, with_input: bool = False) -> tuple[bool, Any]:
        interpreter = new_interpreter()
        try:
            if with_input:
                set_input(interpreter._impl, document)
            output = rs.rego_bundle_query_entrypoint(
                interpreter._impl, self.bundle._impl, _entrypoint(query)
            )
        except Exception as exc:
            raise PolicyUnavailable(f"policy evaluation failed: {exc}") from None
        return read_output(interpreter, output)


def _entrypoint(query: str) -> str:
    return query.removeprefix("data.").replace(".", "/")


def _bundled(
    interpreter: Any,
    tests: list[_Test],
    input_rules: dict[tuple[str, str], str],
    decision_query: str,
) -> _Queries | None:
    """The run's queries in one bundle, or ``None`` (then each is asked the slow way, as a
    query that parses the modules again): never with a test that uses another kind of
    ``with``, which rego-cpp can abort on when building."""
    if any(test.problems for test in tests):
        return None
    queries = [decision_query]
    queries += [f"data.{package}.{rule}" for (package, _), rule in input_rules.items()]
    queries += [f"data.{test.package}.{test.rule}" for test in tests]
    try:
        return _Queries(interpreter, list(dict.fromkeys(queries)))
    except (regopy.RegoError, ConfigError):
        return None


def run_policy_tests(root: Path, entrypoint: str) -> list[TestResult]:
    """Every ``test_*`` rule under ``root``; a policy that does not compile raises ConfigError."""
    files, tests, input_rules = _prepare(read_policy_files(root, with_tests=True))
    inputs = load_interpreter(files)  # compile errors surface here, naming the file
    results: list[TestResult] = []
    decision_query = "data." + entrypoint.strip("/").replace("/", ".")
    undefined_for: list[str] = []
    bundled = _bundled(inputs, tests, input_rules, decision_query)
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
                rule = f"data.{test.package}.{input_rules[(test.package, next(iter(test.inputs)))]}"
                if bundled is not None:
                    defined, document = bundled.ask(rule)
                else:
                    defined, document = first_query_value(inputs, rule)
                if not defined:
                    results.append(TestResult(name, False, "its input expression is undefined"))
                    continue
            if bundled is not None:
                with_input = document is not None
                defined, value = bundled.ask(name, document, with_input)
                if with_input:
                    decided, _ = bundled.ask(decision_query, document, with_input)
                    if not decided:
                        undefined_for.append(test.rule)
            else:
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
