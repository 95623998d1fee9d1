"""What a policy can read of its input, and whether it is pure, found in its source text.

The request's headers and query are the bulk of a policy input document, and most policies
never look at them: building, sending and converting them is pure cost on every call.
``request_fields`` finds the ``input.request.<field>`` names the served modules mention, so
the proxy can leave out ``headers`` and ``query`` when no module does; ``input_paths``
finds every input path they mention, which the engine trims the document to and keys its
decision cache on (``proxy.policy.cache``); ``impure_builtins`` finds the calls that keep a
decision out of that cache; ``defines_rule`` finds which optional rules (``visible``,
``result``) a package defines, for either engine.

The reading is deliberately conservative: after dropping comments and string literals, any
mention of ``input`` that is not a plain dotted path to a field of ``input.request`` or of
another top-level key (bare ``input``, ``input[...]``, ``input.request`` on its own or
indexed, ``import input``) means "may read anything", and the whole document is sent. A
field is left out only when no module names it at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

OPTIONAL_REQUEST_FIELDS = frozenset({"headers", "query"})
"""What may be left out of ``input.request``; the rest of the document is always sent."""

_LEXEME = re.compile(
    r'"(?:[^"\\\n]|\\.)*"'  # a string literal
    r"|`[^`]*`"  # a raw string literal
    r"|#[^\n]*"  # a comment
    r"|\binput\b(?:\s*(?:\.\s*[A-Za-z_][A-Za-z0-9_]*|\[))*"  # a reference to the input
)
_SEGMENT = re.compile(r"\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[")
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)


def package_of(source: str) -> str | None:
    """The module's dotted package name, if it declares one."""
    declared = _PACKAGE.search(source)
    return declared.group(1) if declared else None


def defines_rule(sources: Iterable[str], package: str, rule: str) -> bool:
    """Whether a module of the dotted ``package`` has a rule head named ``rule`` at the
    start of a line (``default`` or not), as ``opa fmt`` writes them."""
    head = re.compile(rf"^(default\s+)?{re.escape(rule)}\b", re.MULTILINE)
    return any(package_of(source) == package and head.search(source) for source in sources)


def request_fields(sources: Iterable[str]) -> frozenset[str] | None:
    """The ``input.request`` fields the modules name, or ``None``: they may read any."""
    return fields_of(input_paths(sources))


def fields_of(paths: tuple[tuple[str, ...], ...] | None) -> frozenset[str] | None:
    """``request_fields`` from ``input_paths``' answer."""
    if paths is None or ("request",) in paths:
        return None  # the whole input, or input.request as a whole (or indexed)
    return frozenset(path[1] for path in paths if path[0] == "request")


def input_paths(sources: Iterable[str]) -> tuple[tuple[str, ...], ...] | None:
    """Every ``input`` path the modules name, cut at the first ``[``, outermost only
    (``input.run`` covers ``input.run.writes``), or ``None``: they may read any of it.

    What a policy reads of its input lies under these paths, so two inputs that agree on
    all of them get the same decision from a pure policy (``proxy.policy.cache``).
    """
    paths: set[tuple[str, ...]] = set()
    for source in sources:
        for match in _LEXEME.finditer(source):
            lexeme = match.group(0)
            if not lexeme.startswith("input"):
                continue
            path: list[str] = []
            for m in _SEGMENT.finditer(lexeme, len("input")):
                if m.group(1) is None:
                    break  # input.a[...]: anything under input.a
                path.append(m.group(1))
            if not path:
                return None  # the whole input, or input[...]
            paths.add(tuple(path))
    outermost = [p for p in paths if not any(p[: len(q)] == q for q in paths if q != p)]
    return tuple(sorted(outermost))


IMPURE_BUILTINS = (
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "http.send",
    "net.lookup_ip_addr",
    "opa.runtime",
    "io.jwt.decode_verify",
    "io.jwt.encode_sign",
    "io.jwt.encode_sign_raw",
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "print",
    "trace",
)
"""Builtins whose answer (or effect) is not a function of their arguments: the clock,
randomness, the network, the runtime, and output a cached decision would not repeat."""

_CALL = re.compile(
    r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*'
    r"|(?<![\w.])(" + "|".join(re.escape(name) for name in IMPURE_BUILTINS) + r")\s*\("
)


def impure_builtins(sources: Iterable[str]) -> frozenset[str]:
    """The ``IMPURE_BUILTINS`` the modules call (strings and comments do not count)."""
    return frozenset(
        match.group(1)
        for source in sources
        for match in _CALL.finditer(source)
        if match.group(1) is not None
    )


def optional_fields_sent(sources: Iterable[str]) -> frozenset[str]:
    """Which of ``OPTIONAL_REQUEST_FIELDS`` the input must carry for these modules."""
    return optional_fields_of(input_paths(sources))


def optional_fields_of(paths: tuple[tuple[str, ...], ...] | None) -> frozenset[str]:
    """``optional_fields_sent`` from ``input_paths``' answer."""
    named = fields_of(paths)
    if named is None:
        return OPTIONAL_REQUEST_FIELDS
    return OPTIONAL_REQUEST_FIELDS & named


_IMPORT = re.compile(r"^import\s+data\.([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)


def split_package_imports(modules: dict[str, str]) -> list[str]:
    """``import data.X`` lines that regorus cannot be trusted with, as ``file: message``.

    When package X (or one under it) is split across modules, regorus 0.13 answers
    *undefined* for some of its rules reached through the import's name (``X.rule``; some
    rules of a module after the first refer to later rules of that module), where OPA
    answers their value: a ``not X.rule`` would then hold. ``data.X.rule`` written in
    full is evaluated right, so such an import is refused, not served.
    """
    counts: dict[str, int] = {}
    for source in modules.values():
        package = package_of(source)
        if package is not None:
            counts[package] = counts.get(package, 0) + 1
    split = [package for package, count in counts.items() if count > 1]
    problems: list[str] = []
    for name, source in modules.items():
        for match in _IMPORT.finditer(source):
            imported = match.group(1)
            hit = [p for p in split if p == imported or p.startswith(imported + ".")]
            if hit:
                line = source.count("\n", 0, match.start()) + 1
                problems.append(
                    f"{name}:{line}: 'import data.{imported}': package {hit[0]} is split "
                    f"across {counts[hit[0]]} modules, and the embedded engine (regorus) can "
                    f"get its rules wrong through an import; write data.{imported}.<rule> in "
                    "full, or keep the package in one module"
                )
    return problems
