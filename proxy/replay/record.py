"""What the journal keeps of a call's policy input, so that a run can be re-decided later
exactly as it was decided (the run's counters as they stood, the annotations, the time): pure.

Kept redacted as every capture is (the values of secret-looking keys become
``"[REDACTED]"``) and bounded: past ``MAX_BYTES`` the request body, then the MCP arguments,
are left out. Either way the record names what it is missing (``redacted`` and ``truncated``
paths), so a replay never decides on partial data without saying so: a call whose missing
parts the candidate policy reads is reported as not replayable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.tracing.redact import REDACTED, Redactor

MAX_BYTES = 64 * 1024
TRUNCATED = "[TRUNCATED]"
DROPPABLE = (("request", "body"), ("call", "arguments"))
"""What goes first when a document is too large, in this order."""


@dataclass(frozen=True, slots=True)
class Kept:
    document: dict[str, Any]
    redacted: tuple[tuple[str, ...], ...]
    truncated: tuple[tuple[str, ...], ...]


def keep(document: dict[str, Any], redactor: Redactor, max_bytes: int = MAX_BYTES) -> str:
    """The journal's text for a policy input document."""
    redacted: list[tuple[str, ...]] = []
    shown = _redact(document, redactor, (), redacted)
    truncated: list[tuple[str, ...]] = []
    text = _dumps(shown)
    for path in DROPPABLE:
        if len(text.encode()) <= max_bytes:
            break
        parent = shown.get(path[0])
        if isinstance(parent, dict) and parent.get(path[1]) is not None:
            shown = {**shown, path[0]: {**parent, path[1]: TRUNCATED}}
            truncated.append(path)
            text = _dumps(shown)
    if len(text.encode()) > max_bytes:
        return _dumps({"document": None, "redacted": [], "truncated": [[]]})
    return _dumps(
        {
            "document": shown,
            "redacted": [list(p) for p in redacted],
            "truncated": [list(p) for p in truncated],
        }
    )


def load(text: str | None) -> Kept | None:
    """The kept record, or ``None`` when the row has none (written before replay existed,
    or too large to keep at all)."""
    if not text:
        return None
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("document"), dict):
        return None
    return Kept(
        data["document"],
        tuple(tuple(p) for p in data.get("redacted", [])),
        tuple(tuple(p) for p in data.get("truncated", [])),
    )


def _redact(
    value: Any, redactor: Redactor, path: tuple[str, ...], out: list[tuple[str, ...]]
) -> Any:
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            here = (*path, str(key))
            if redactor.is_secret_key(key) and item is not None:
                result[key] = REDACTED
                out.append(here)
            else:
                result[key] = _redact(item, redactor, here, out)
        return result
    if isinstance(value, list):
        return [_redact(item, redactor, (*path, str(i)), out) for i, item in enumerate(value)]
    if isinstance(value, str):
        scrubbed = redactor.scrub_secrets(value)
        if scrubbed != value:
            out.append(path)
        return scrubbed
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
