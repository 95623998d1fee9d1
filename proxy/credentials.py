"""A tool's own credentials never reach the agent: scrubbed from every answer it is sent
(and, by ``tracing.redact``, from everything recorded).

Handrail injects a tool's credentials (``tools.NAME.headers``); the agent must never see
them, even when the tool echoes a request back or leaks its own headers. Every form a value
may take in a body is replaced: plain, URL-encoded, JSON-escaped and base64 (standard and
URL-safe, padded or not), for the whole header value and for the token after its scheme
(``Bearer <token>``). Streams are scrubbed chunk by chunk, keeping a tail across chunks so
a secret split between two chunks is still found.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote

from proxy.config import ToolConfig

REDACTED = b"[REDACTED]"
MIN_SECRET_LEN = 8
"""Shorter values are not scrubbed: they would match ordinary text."""


def secret_values(header_values: Iterable[str], min_len: int = MIN_SECRET_LEN) -> tuple[str, ...]:
    """The values to scrub: each header value, and the credential after its scheme."""
    values: set[str] = set()
    for value in header_values:
        value = value.strip()
        values.add(value)
        scheme, _, credential = value.partition(" ")
        if credential and scheme.isalpha():
            values.add(credential.strip())
    return tuple(v for v in values if len(v) >= min_len)


def secret_forms(values: Iterable[str], min_len: int = MIN_SECRET_LEN) -> tuple[bytes, ...]:
    """Every byte form of the values an answer may carry, longest first."""
    forms: set[bytes] = set()
    for value in values:
        raw = value.encode()
        forms.add(raw)
        forms.add(quote(value, safe="").encode())
        forms.add(json.dumps(value)[1:-1].encode())
        forms.add(json.dumps(value, ensure_ascii=False)[1:-1].encode())
        for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
            forms.add(encoded)
            forms.add(encoded.rstrip(b"="))
    return tuple(sorted((f for f in forms if len(f) >= min_len), key=len, reverse=True))


def scrub(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    """A whole answer scrubbed: every form replaced; and a JSON answer that spells a value
    in ``\\u`` escapes (which no byte form matches) is read, scrubbed and written again."""
    for form in forms:
        if form in data:
            data = data.replace(form, REDACTED)
    if b"\\u" in data:
        data = _scrub_escaped_json(data, forms)
    return data


def _scrub_escaped_json(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return data
    plain = [f.decode("utf-8", "replace") for f in forms]
    found = False

    def clean(value: object) -> object:
        nonlocal found
        if isinstance(value, str):
            for form in plain:
                if form in value:
                    value = value.replace(form, REDACTED.decode())
                    found = True
            return value
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        return value

    try:
        cleaned = clean(document)
    except RecursionError:
        return data
    if not found:
        return data
    return json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode()


class StreamScrubber:
    """Scrubs a stream: ``feed`` returns what may be sent now, ``flush`` the rest."""

    def __init__(self, forms: tuple[bytes, ...]) -> None:
        self.forms = forms
        self.keep = max((len(f) for f in forms), default=1) - 1
        self.tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = scrub(self.tail + chunk, self.forms)
        if len(data) <= self.keep:
            self.tail = data
            return b""
        cut = len(data) - self.keep
        self.tail = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        tail, self.tail = self.tail, b""
        return scrub(tail, self.forms)


@lru_cache(maxsize=256)
def _forms_of(header_values: tuple[str, ...]) -> tuple[bytes, ...]:
    return secret_forms(secret_values(header_values))


def answer_forms(tool: ToolConfig) -> tuple[bytes, ...]:
    """The forms of this tool's configured credentials (none: nothing to scrub)."""
    if not tool.headers:
        return ()
    return _forms_of(tuple(sorted(tool.headers.values())))
