"""Stored answers of sensitive tools, sealed at rest (AES-256-GCM).

A tool marked ``sensitive: true`` has its kept answer (status line aside: headers and body)
encrypted with ``store.encryption_key`` before it reaches the store, bound to its tool and
key (the associated data), so a sealed answer cannot be replayed under another key. The
store itself never sees the plaintext; a replica without the key cannot replay it.
"""

from __future__ import annotations

import base64
import json
import os
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.call import StoredResponse
from proxy.config import parse_key
from proxy.errors import StoreUnavailable

SEALED_HEADER = "X-Handrail-Sealed"
"""Marks a sealed record (never sent to an agent: the opened answer replaces it)."""
VERSION = "v1"
_NONCE = 12


@lru_cache(maxsize=4)
def _cipher(key_text: str) -> AESGCM:
    return AESGCM(parse_key(key_text))


def _aad(tool: str, key: str) -> bytes:
    return json.dumps([tool, key]).encode()


def seal(response: StoredResponse, key_text: str, tool: str, key: str) -> StoredResponse:
    plain = json.dumps(
        [list(map(list, response.headers)), base64.b64encode(response.body).decode()]
    )
    nonce = os.urandom(_NONCE)
    sealed = nonce + _cipher(key_text).encrypt(nonce, plain.encode(), _aad(tool, key))
    return StoredResponse(
        status=response.status,
        headers=((SEALED_HEADER, VERSION),),
        body=sealed,
        complete=response.complete,
    )


def is_sealed(response: StoredResponse) -> bool:
    return response.headers == ((SEALED_HEADER, VERSION),)


def unseal(response: StoredResponse, key_text: str | None, tool: str, key: str) -> StoredResponse:
    if key_text is None:
        raise StoreUnavailable(
            f"the stored answer for key {key!r} is sealed and store.encryption_key is not set"
        )
    body = response.body
    try:
        plain = _cipher(key_text).decrypt(body[:_NONCE], body[_NONCE:], _aad(tool, key))
    except (InvalidTag, ValueError):
        raise StoreUnavailable(
            f"the stored answer for key {key!r} cannot be opened with store.encryption_key"
        ) from None
    headers, encoded = json.loads(plain)
    return StoredResponse(
        status=response.status,
        headers=tuple((str(k), str(v)) for k, v in headers),
        body=base64.b64decode(encoded),
        complete=response.complete,
    )
