"""``handrail keys``: list, show and resolve idempotency keys whose outcome is unknown.

It works on the store directly (the proxy need not run; no tool secrets are needed), so an
operator can settle a key after a crash, from the config the proxy used.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from proxy.config import Config
from proxy.errors import HandrailError
from proxy.store import store_from_config
from proxy.store.records import KeyRecord, parse_answer


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(record: KeyRecord) -> str:
    return (
        f"{record.tool}  {record.key}  {record.state}"
        f"{f' ({record.reason})' if record.reason else ''}  attempts={record.attempts}  "
        f"since {_when(record.created_at)}  expires {_when(record.expires_at)}"
    )


def keys_command(
    config: Config,
    action: str,
    tool: str | None,
    key: str | None,
    *,
    failed: bool,
    answer: Path | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    if action == "resolve" and (tool is None or key is None or failed == (answer is not None)):
        err.write("handrail keys resolve TOOL KEY needs exactly one of --failed, --answer FILE\n")
        return 2
    if action == "show" and (tool is None or key is None):
        err.write("handrail keys show TOOL KEY\n")
        return 2
    response = None
    if answer is not None:
        try:
            response = parse_answer(json.loads(answer.read_text(encoding="utf-8")))
        except OSError as exc:
            err.write(f"handrail: {answer}: cannot read the answer ({exc.strerror})\n")
            return 2
        except ValueError as exc:
            err.write(f"handrail: {answer}: {exc}\n")
            return 2
    try:
        return asyncio.run(_run(config, action, tool, key, response, as_json, out, err))
    except HandrailError as exc:
        err.write(f"handrail: {exc.message}\n")
        return 2


async def _run(
    config: Config,
    action: str,
    tool: str | None,
    key: str | None,
    response: object,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    from proxy.call import StoredResponse

    store = store_from_config(config.store)
    await store.open()
    try:
        if action == "list":
            records = await store.unknown_keys(10_000)
            if as_json:
                out.write(json.dumps([r.as_dict() for r in records], indent=2) + "\n")
            elif not records:
                out.write("no keys with an unknown outcome\n")
            for record in [] if as_json else records:
                out.write(_line(record) + "\n")
            return 0
        assert tool is not None and key is not None
        if action == "show":
            found = await store.inspect(tool, key)
            if found is None:
                err.write(f"handrail: no record for key {key!r} of tool {tool!r}\n")
                return 1
            out.write((json.dumps(found.as_dict(), indent=2) if as_json else _line(found)) + "\n")
            return 0
        assert response is None or isinstance(response, StoredResponse)
        was = await store.resolve(tool, key, response)
        if was is None:
            err.write(f"handrail: no record for key {key!r} of tool {tool!r}\n")
            return 1
        if was != "unknown":
            err.write(f"handrail: key {key!r} of tool {tool!r} is {was}, not unknown\n")
            return 1
        now = (
            "released: the next retry runs the tool"
            if response is None
            else ("completed: retries get this answer")
        )
        out.write(f"{tool} {key}: {now}\n")
        return 0
    finally:
        await store.close()
