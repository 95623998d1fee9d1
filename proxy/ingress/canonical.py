"""The canonical request: the one form the policy decides and the tool receives.

A proxy that decides on one reading of a request and forwards another lets a refused call
through (``/%61dmin`` decided as itself, served as ``/admin``). So the path and the JSON
body are brought to one form here, before anything reads them, and that form is what is
forwarded; what cannot be made unambiguous is refused (400 ``bad_request``). After Envoy's
path normalisation (``normalize_path``, ``path_with_escaped_slashes_action: REJECT``).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Iterable
from typing import Any

from proxy.errors import BadRequest

UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
"""RFC 3986 unreserved characters: an escape of one of them means the character itself."""
_SUB_DELIMS = frozenset("!$&'()*+,=:@")
_PLAIN = UNRESERVED | _SUB_DELIMS | {"/"}
"""Characters a canonical path carries as they are (``;`` is refused: path parameters are
read differently by different servers)."""
_NEVER_DECODED = frozenset("/\\.%")
"""Escapes that would change the path's structure if decoded, or be decoded twice."""
_HEX = frozenset(string.hexdigits)

MAX_JSON_NODES = 100_000
"""Arrays and objects in one body, at most: past it a body is work for the policy, not a call."""
MAX_JSON_DEPTH = 64
"""Nesting past this is refused: a deeper body is no call a tool expects, and it is where
parsers (and the recorders of what was decided) give out."""


def canonical_path(raw: str) -> str:
    """The path below ``/tools/{tool}`` as the policy sees it and the tool gets it.

    Escapes of unreserved characters are decoded (``%61`` -> ``a``), other escapes are kept
    with upper-case hex; escaped ``/``, ``\\``, ``.``, ``%`` (a double encoding), controls,
    fragments, ``;`` parameters, empty, ``.`` and ``..`` segments are refused.
    """
    if not raw:
        return "/"
    if not raw.startswith("/"):
        raise BadRequest("the tool path must start with '/'")
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise BadRequest(f"the tool path has a malformed escape at {raw[i : i + 3]!r}")
            decoded = chr(int(digits, 16))
            if decoded in _NEVER_DECODED or ord(decoded) < 0x20 or ord(decoded) == 0x7F:
                raise BadRequest(
                    f"the escape {raw[i : i + 3]!r} is ambiguous in a tool path "
                    "(encoded '/', '\\', '.', '%' and control characters are refused)"
                )
            if decoded in UNRESERVED:
                out.append(decoded)
            else:
                out.append("%" + digits.upper())
            i += 3
            continue
        if ch not in _PLAIN:
            what = "a fragment" if ch == "#" else "path parameters" if ch == ";" else repr(ch)
            raise BadRequest(f"the tool path may not contain {what}: escape it or leave it out")
        out.append(ch)
        i += 1
    path = "".join(out)
    for segment in path.split("/")[1:]:
        if segment in ("", ".", "..") and path != "/":
            raise BadRequest("empty, '.' and '..' path segments are not allowed in a tool path")
    return path


# -- JSON bodies ------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the member {key!r} appears twice in one object")
            seen.add(key)
    return result


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def strict_loads(text: str | bytes) -> Any:
    """JSON as every reader agrees on it: no duplicate members, no NaN or Infinity (written
    or overflowing, ``1e400``), nesting at most ``MAX_JSON_DEPTH``, at most
    ``MAX_JSON_NODES`` values. Raises ValueError saying what is wrong."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_members,
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _brackets(text) > MAX_JSON_DEPTH:  # fewer cannot nest deeper: most bodies skip the walk
        check_depth(value)
    return value


def _brackets(text: str | bytes) -> int:
    if isinstance(text, bytes):
        return text.count(b"{") + text.count(b"[")
    return text.count("{") + text.count("[")


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH, nodes: int = MAX_JSON_NODES) -> None:
    """Raise ValueError when ``value`` nests past ``limit`` or holds more than ``nodes``
    arrays and objects (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        nodes -= 1
        if nodes < 0:
            raise ValueError(f"more than {MAX_JSON_NODES} arrays and objects")
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


_BOM = b"\xef\xbb\xbf"
_JSON_WS = b" \t\r\n"


def looks_like_json(body: bytes) -> bool:
    """What a lenient tool would parse as JSON: ``{`` or ``[`` after a BOM and whitespace."""
    start = body[3:] if body.startswith(_BOM) else body
    return start.lstrip(_JSON_WS)[:1] in (b"{", b"[")


def json_body(content_type: str, content_encoding: str, body: bytes) -> Any:
    """The body as JSON for the policy, or ``None`` when it is empty or not JSON.

    Whatever the Content-Type says, a body a tool could read as JSON is parsed, strictly,
    so the policy sees what the tool will: one that does not parse is refused, as is any
    ``Content-Encoding`` (a compressed body would be invisible to the policy).
    """
    if not body:
        return None
    encoding = content_encoding.strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequest(
            f"Content-Encoding {content_encoding!r} is refused: send the body uncompressed "
            "so the policy can read what the tool will"
        )
    declared = "json" in content_type.lower()
    if not declared and not looks_like_json(body):
        return None
    text = body[3:] if body.startswith(_BOM) else body
    try:
        return strict_loads(text)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
