"""Redaction and truncation of captured inputs and outputs: pure functions.

What leaves the proxy in a span or a journal row is always redacted first, then truncated:

- a JSON (or form-encoded) body has the value of every key that names a secret replaced by
  ``[REDACTED]``, at any depth, case-insensitively;
- text that does not parse (a cut-off body, an SSE stream) is scrubbed by pattern, so a
  ``"password": "..."`` inside it is still removed;
- the tool's configured credentials (its injected header values) are removed wherever
  they appear, even when a tool echoes them back;
- the result is cut to ``max_bytes`` (UTF-8), with a marker saying how much was dropped.

A key names a secret when the redact term appears in it as whole words: with the term
``token``, ``token``, ``Access-Token``, ``accessToken`` and ``refresh_token`` are redacted,
``max_tokens`` is not. ``apikey`` also matches the term ``api_key`` (separators ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

from proxy.credentials import secret_forms, secret_values

REDACTED = "[REDACTED]"

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")
_PARSE_FACTOR = 4
_PARSE_MIN = 64 * 1024
_SCRUB_MARGIN = 4096
"""Text is scrubbed a little past the limit, so that a secret cut by the limit is still found."""
_MIN_SECRET_LEN = 4
"""Shorter configured values are not scrubbed from text (they would match everywhere)."""


def _words(key: str) -> tuple[str, ...]:
    spaced = _CAMEL.sub(r"\1_\2", key).lower()
    return tuple(w for w in _SEPARATORS.split(spaced) if w)


@lru_cache(maxsize=4096)
def _is_secret_key(terms: tuple[tuple[str, ...], ...], key: str) -> bool:
    words = _words(key)
    if not words:
        return False
    compact = "".join(words)
    for term in terms:
        n = len(term)
        if compact == "".join(term):
            return True
        if any(words[i : i + n] == term for i in range(len(words) - n + 1)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Redactor:
    """Which keys and which literal values never leave the proxy."""

    terms: tuple[tuple[str, ...], ...]
    secrets: tuple[str, ...] = ()

    @classmethod
    def build(cls, keys: Iterable[str], secrets: Iterable[str] = ()) -> Redactor:
        terms = tuple(w for w in (_words(k) for k in keys) if w)
        # Every form a credential may take (plain, URL-encoded, JSON-escaped, base64), the
        # header value and the token after its scheme; longest first, so a value is
        # removed whole before any part of it.
        values = secret_values(secrets, _MIN_SECRET_LEN)
        forms = secret_forms(values, _MIN_SECRET_LEN)
        return cls(terms, tuple(f.decode("utf-8", errors="replace") for f in forms))

    def is_secret_key(self, key: object) -> bool:
        return _is_secret_key(self.terms, str(key))

    def value(self, value: Any) -> Any:
        """A copy of a JSON-like value with every secret key's value replaced, at any depth."""
        if isinstance(value, dict):
            return {
                k: REDACTED if self.is_secret_key(k) else self.value(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, str):
            # A string may hold a document of its own (an MCP text result, an echoed body).
            return self.text(value) if ("=" in value or ":" in value) else self.scrub_secrets(value)
        return value

    def scrub_secrets(self, text: str) -> str:
        """Remove the configured credential values wherever they appear, and whatever looks
        like a credential by its shape (cloud and API keys, tokens, private keys)."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if _MAY_HOLD_SECRET.search(text):
            text = _SECRET_SHAPES.sub(REDACTED, text)
        return text

    def text(self, text: str) -> str:
        """Scrub text that is not a parsed document: ``"key": value`` and ``key=value``."""
        if self.terms:
            text = _JSON_PAIR.sub(self._json_pair, text)
            if '\\"' in text:
                text = _ESCAPED_JSON_PAIR.sub(self._escaped_json_pair, text)
            text = _FORM_PAIR.sub(self._form_pair, text)
        return self.scrub_secrets(text)

    def _json_pair(self, match: re.Match[str]) -> str:
        if not self.is_secret_key(match.group("key")):
            return match.group(0)
        return f'{match.group("head")}"{REDACTED}"'

    def _escaped_json_pair(self, match: re.Match[str]) -> str:
        if not self.is_secret_key(match.group("key")):
            return match.group(0)
        return f'{match.group("head")}\\"{REDACTED}\\"'

    def _form_pair(self, match: re.Match[str]) -> str:
        if not self.is_secret_key(unquote_plus(match.group("key"))):
            return match.group(0)
        return f"{match.group('head')}{REDACTED}"


# "key": "string" | number | literal  (the value may be cut off at the end of the text)
_JSON_PAIR = re.compile(
    r'(?P<head>"(?P<key>(?:[^"\\]|\\.){1,200})"\s*:\s*)'
    r'(?P<value>"(?:[^"\\]|\\.)*(?:"|$)|[^\s,}\]]+)'
)
# the same, inside a JSON string: \"key\": \"value\"
_ESCAPED_JSON_PAIR = re.compile(
    r'(?P<head>\\"(?P<key>[^"\\]{1,200})\\"\s*:\s*)'
    r'(?P<value>\\"(?:[^"\\]|\\[^"])*(?:\\"|$)|[^\s,}\]\\]+)'
)
# key=value in a query string or form body (the key may be percent-encoded: api%5Fkey)
_FORM_PAIR = re.compile(
    r"(?P<head>(?:^|(?<=[&?\s;]))(?P<key>[A-Za-z0-9_.%+\-\[\]]{1,200})=)[^&\s;\"]*"
)
# Credentials recognised by their shape wherever they are (the policy's screen, widened):
# API secret keys, live payment keys, AWS access key ids, GitHub and Slack tokens, JWTs,
# PEM private keys (to their end, or the end of the text).
_SECRET_SHAPES = re.compile(
    r"sk-[A-Za-z0-9_-]{16,}|[rs]k_live_[A-Za-z0-9]{16,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[baprs]-[A-Za-z0-9-]{10,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.|\n)*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)
_MAY_HOLD_SECRET = re.compile(r"sk-|k_live_|AKIA|ASIA|gh[pousr]_|xox|eyJ|PRIVATE KEY")
"""A cheap first look: most text holds none of these, and skips the full pattern."""


def truncate(text: str, max_bytes: int, *, original_bytes: int | None = None) -> str:
    """At most ``max_bytes`` of UTF-8, ending in a marker when something was cut.

    ``original_bytes`` is the size of what ``text`` was taken from, when that was larger.
    """
    data = text.encode()
    total = max(len(data), original_bytes or 0)
    if total <= max_bytes and len(data) <= max_bytes:
        return text
    keep = min(len(data), max_bytes - len(f"...[truncated {total} bytes]"))
    if keep <= 0:
        return data[:max_bytes].decode(errors="ignore")
    return data[:keep].decode(errors="ignore") + f"...[truncated {total - keep} bytes]"


def capture_json(value: Any, redactor: Redactor, max_bytes: int) -> str:
    """A parsed document, redacted, as compact JSON cut to ``max_bytes``."""
    text = json.dumps(redactor.value(value), ensure_ascii=False, separators=(",", ":"), default=str)
    return truncate(text, max_bytes)


def capture_body(body: bytes, redactor: Redactor, max_bytes: int, parsed: Any = None) -> str:
    """A body for a span or the journal: redacted JSON when it parses, else scrubbed text
    (a form body, an SSE stream, or JSON cut off at the capture limit).

    ``parsed`` is the body already parsed as JSON, if the caller has it: not parsed again.
    A body far over the limit is not parsed (that would cost the call path milliseconds):
    only its head is scrubbed as text and kept.
    """
    if not body or max_bytes <= 0:
        return ""
    if len(body) <= max(_PARSE_FACTOR * max_bytes, _PARSE_MIN):
        try:
            return capture_json(json.loads(body) if parsed is None else parsed, redactor, max_bytes)
        except (ValueError, RecursionError):
            pass  # not JSON, or nested too deep to walk: scrubbed as text below
    head = body[: max_bytes + _SCRUB_MARGIN]
    if b"\x00" in head[:1024]:
        return f"[{len(body)} bytes of binary data]"
    text = redactor.text(head.decode("utf-8", errors="replace"))
    return truncate(text, max_bytes, original_bytes=len(body) if len(body) > len(head) else None)
