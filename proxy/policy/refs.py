"""Which parts of ``input.request`` a policy can read, found in its source text.

The request's headers and query are the bulk of a policy input document, and most policies
never look at them: building, sending and converting them is pure cost on every call. This
finds the ``input.request.<field>`` names the served modules mention, so the proxy can leave
out ``headers`` and ``query`` when no module does.

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


def request_fields(sources: Iterable[str]) -> frozenset[str] | None:
    """The ``input.request`` fields the modules name, or ``None``: they may read any."""
    fields: set[str] = set()
    for source in sources:
        for match in _LEXEME.finditer(source):
            lexeme = match.group(0)
            if not lexeme.startswith("input"):
                continue  # a string or a comment: never a reference
            path = [m.group(1) for m in _SEGMENT.finditer(lexeme, len("input"))]
            if not path or path[0] is None:
                return None  # the whole input, or input[...]
            if path[0] != "request":
                continue  # another top-level key: the request is not involved
            if len(path) < 2 or path[1] is None:
                return None  # input.request as a whole, or input.request[...]
            fields.add(path[1])
    return frozenset(fields)


def optional_fields_sent(sources: Iterable[str]) -> frozenset[str]:
    """Which of ``OPTIONAL_REQUEST_FIELDS`` the input must carry for these modules."""
    named = request_fields(sources)
    if named is None:
        return OPTIONAL_REQUEST_FIELDS
    return OPTIONAL_REQUEST_FIELDS & named
