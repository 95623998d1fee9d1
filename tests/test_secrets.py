"""A tool's own credentials never reach the agent, in any form, whole or streamed."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import pytest

from proxy.credentials import (
    REDACTED,
    StreamScrubber,
    scrub,
    secret_forms,
    secret_values,
)
from proxy.tracing.base import CallQuery
from tests.conftest import ProxyFactory, Seen

TOKEN = "crm-s3cr3t/token+with=chars"
HEADER = f"Bearer {TOKEN}"


def _forms_of(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        quote(value, safe="").encode(),
        json.dumps(value)[1:-1].encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
    ]


def test_the_credential_and_its_token_are_both_secrets() -> None:
    assert set(secret_values([HEADER])) == {HEADER, TOKEN}
    assert secret_values(["short"]) == ()


@pytest.mark.parametrize("form", _forms_of(TOKEN) + _forms_of(HEADER))
def test_every_form_of_a_credential_is_scrubbed(form: bytes) -> None:
    forms = secret_forms(secret_values([HEADER]))
    out = scrub(b"before " + form + b" after", forms)
    assert form not in out and REDACTED in out


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 16, 64])
def test_a_credential_split_across_chunks_is_scrubbed(chunk_size: int) -> None:
    forms = secret_forms(secret_values([HEADER]))
    data = b"x" * 5 + TOKEN.encode() + b"y" * 9 + base64.b64encode(TOKEN.encode()) + b"z"
    scrubber = StreamScrubber(forms)
    out = b"".join(scrubber.feed(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))
    out += scrubber.flush()
    assert TOKEN.encode() not in out and base64.b64encode(TOKEN.encode()) not in out
    assert out.startswith(b"xxxxx") and out.endswith(b"z") and out.count(REDACTED) == 2


async def test_a_tool_echoing_its_credentials_never_shows_them_to_the_agent(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory
) -> None:
    server, seen = tool
    proxy = await make_proxy(
        {"crm": {"upstream": str(server.make_url("")), "headers": {"Authorization": HEADER}}}
    )
    leak = " ".join(f.decode() for f in _forms_of(TOKEN))
    answer = await proxy.post(
        "/tools/crm/echo", data=leak.encode(), headers={"Content-Type": "text/plain"}
    )
    body = await answer.read()
    assert answer.status == 200
    assert seen.requests[-1]["headers"]["Authorization"] == HEADER  # the tool got it
    for form in _forms_of(TOKEN):
        assert form not in body
    assert REDACTED in body


# What is recorded: credentials by their shape and in their other forms, query keys encoded


@pytest.mark.parametrize(
    "leak",
    [
        "AKIAIOSFODNN7EXAMPLE",
        "sk-proj-abcdefghijklmnopqrstuvwx",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ],
)
async def test_a_refused_calls_secret_is_not_recorded(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, leak: str
) -> None:
    from proxy.http.keys import DEPS

    server, seen = tool
    proxy = await make_proxy({"crm": {"upstream": str(server.make_url(""))}})
    answer = await proxy.delete(  # the test policy refuses every DELETE
        "/tools/crm/notes/1", json={"note": f"here: {leak}"}, headers={"X-Run-Id": "r-leak"}
    )
    assert answer.status == 403 and seen.count() == 0
    deps = proxy.server.app[DEPS]
    await deps.journal.flush()
    rows = await deps.journal.query(CallQuery(run_id="r-leak"))
    recorded = json.dumps(rows)
    assert rows and leak.split("\n")[0] not in recorded and "here:" in recorded


@pytest.mark.parametrize("query", ["api%5Fkey=abcd1234", "api_key=abcd1234", "Api-Key=abcd1234"])
def test_an_encoded_query_key_is_redacted(query: str) -> None:
    from proxy.tracing.redact import Redactor

    assert "abcd1234" not in Redactor.build(["api_key"]).text(f"a=1&{query}")


def test_other_forms_of_a_tool_credential_are_not_recorded() -> None:
    from proxy.tracing.redact import Redactor

    redactor = Redactor.build(["authorization"], [HEADER])
    for form in _forms_of(TOKEN):
        assert form.decode() not in redactor.text(f"x {form.decode()} y")


# Stored answers of sensitive tools are sealed at rest

STORE_KEY = base64.b64encode(b"k" * 32).decode()


async def test_a_sensitive_tools_answer_is_sealed_at_rest_and_replayed_in_clear(
    tool: tuple[Any, Seen], make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    import sqlite3

    server, seen = tool
    proxy = await make_proxy(
        {"vault": {"upstream": str(server.make_url("")), "sensitive": True}},
        store={"url": f"sqlite:///{tmp_path}/sealed.db", "encryption_key": STORE_KEY},
    )
    headers = {"Idempotency-Key": "k-sealed", "Content-Type": "application/json"}
    body = json.dumps({"ssn": "078-05-1120"})
    first = await proxy.post("/tools/vault/records", data=body, headers=headers)
    text = await first.text()
    retry = await proxy.post("/tools/vault/records", data=body, headers=headers)

    assert first.status == 200 and "078-05-1120" in text
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert await retry.text() == text and "X-Handrail-Sealed" not in retry.headers
    assert seen.count() == 1
    with sqlite3.connect(tmp_path / "sealed.db") as db:
        stored = db.execute("SELECT body, headers FROM handrail_idempotency").fetchall()
    assert stored and b"078-05-1120" not in stored[0][0] and "fake" not in stored[0][1]


def test_a_sensitive_tool_without_a_store_key_is_a_config_error() -> None:
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="encryption_key"):
        parse_config({"tools": {"vault": {"upstream": "http://x", "sensitive": True}}})
    with pytest.raises(ConfigError, match="32 bytes"):
        parse_config({"store": {"encryption_key": base64.b64encode(b"short").decode()}})


def test_a_sealed_answer_cannot_be_opened_under_another_key() -> None:
    from proxy.call import StoredResponse
    from proxy.errors import StoreUnavailable
    from proxy.store.sealed import seal, unseal

    sealed = seal(StoredResponse(200, (("A", "b"),), b"secret"), STORE_KEY, "vault", "k1")
    assert unseal(sealed, STORE_KEY, "vault", "k1").body == b"secret"
    with pytest.raises(StoreUnavailable):
        unseal(sealed, STORE_KEY, "vault", "k2")


def test_a_credential_spelled_in_json_escapes_is_scrubbed() -> None:
    forms = secret_forms(secret_values([HEADER]))
    escaped = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    body = ('{"leak": "' + escaped + '", "ok": 1}').encode()
    out = scrub(body, forms)
    assert json.loads(out)["leak"] == "[REDACTED]" and json.loads(out)["ok"] == 1
    assert TOKEN not in json.loads(out)["leak"]
