"""The ``opa`` engine: an OPA server's REST Data API, over one keep-alive session.

``POST {url}/v1/data/{entrypoint}`` with ``{"input": ...}``; the answer's ``result`` is the
decision and its ``decision_id`` is kept. Anything but a 200 with a JSON ``result`` (refused,
timed out, 5xx, not JSON, undefined) raises ``PolicyUnavailable``: the proxy fails closed.

The ``result`` rule next to the decision checks a tool's answer (``POST .../result``). Whether
the server's package defines one is read from ``GET /v1/policies`` when the engine starts
and on every reload; when that cannot be read, answers are checked (an undefined ``result``
passes them), so a check is never skipped for want of knowing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import aiohttp

from proxy.call import Decision
from proxy.errors import PolicyUnavailable
from proxy.policy.base import EngineStatus
from proxy.policy.decision import (
    ResultDecision,
    decision_from_value,
    result_from_value,
    visible_from_value,
)
from proxy.policy.refs import OPTIONAL_REQUEST_FIELDS, defines_rule

logger = logging.getLogger(__name__)

_MAX_BODY = 4 * 1024 * 1024


class OpaEngine:
    name = "opa"
    request_fields = OPTIONAL_REQUEST_FIELDS
    """The server's policies are not known here: the input always carries everything."""

    def __init__(self, url: str, entrypoint: str, timeout_s: float = 0.25) -> None:
        self.url = url.rstrip("/")
        self.entrypoint = entrypoint.strip("/")
        package = self.entrypoint.rpartition("/")[0]
        self.package = package.replace("/", ".")
        self.visible_path = f"{package}/visible" if package else "visible"
        self.result_path = f"{package}/result" if package else "result"
        self._has_result: bool | None = None
        """Whether the server's package defines ``result`` (``None``: could not tell)."""
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._status = EngineStatus(ready=False, detail=f"opa: {self.url} not checked yet")

    async def start(self) -> None:
        """Open the session and check the server once; a down server is not fatal here."""
        self._session = aiohttp.ClientSession(
            timeout=self.timeout,
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
        )
        await self.reload()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _query(self, path: str, document: dict[str, Any]) -> tuple[bool, Any, str | None]:
        """``(defined, result, decision_id)`` for ``data/{path}``; failures raise 503."""
        session = self._session
        if session is None:
            raise PolicyUnavailable("the opa policy engine is not started")
        where = f"{self.url}/v1/data/{path}"
        try:
            async with session.post(where, json={"input": document}) as response:
                if response.status != 200:
                    text = (await response.content.read(512)).decode("utf-8", "replace")
                    raise PolicyUnavailable(
                        f"OPA answered {response.status} for data/{path}: {text.strip()[:200]}"
                    )
                raw = await response.content.read(_MAX_BODY + 1)
        except PolicyUnavailable:
            raise
        except TimeoutError:
            raise PolicyUnavailable(
                f"OPA at {self.url} took longer than {self.timeout_s * 1000:g} ms"
            ) from None
        except aiohttp.ClientError as exc:
            raise PolicyUnavailable(f"OPA at {self.url} is unreachable: {exc}") from None
        if len(raw) > _MAX_BODY:
            raise PolicyUnavailable(f"OPA's answer for data/{path} is too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise PolicyUnavailable(f"OPA's answer for data/{path} is not JSON") from None
        if not isinstance(body, dict):
            raise PolicyUnavailable(f"OPA's answer for data/{path} is not a JSON object")
        decision_id = body.get("decision_id")
        if not isinstance(decision_id, str):
            decision_id = None
        if "result" not in body:
            return False, None, decision_id
        return True, body["result"], decision_id

    async def decide(self, document: dict[str, Any]) -> Decision:
        defined, result, decision_id = await self._query(self.entrypoint, document)
        if not defined:
            raise PolicyUnavailable(
                f"the decision data.{self.entrypoint.replace('/', '.')} is undefined on OPA"
            )
        return decision_from_value(result, decision_id)

    async def visible(self, document: dict[str, Any]) -> bool:
        defined, result, _ = await self._query(self.visible_path, document)
        return visible_from_value(defined, result)

    @property
    def has_result(self) -> bool:
        return self._has_result is not False

    async def result(self, document: dict[str, Any]) -> ResultDecision:
        defined, value, decision_id = await self._query(self.result_path, document)
        if not defined:
            return ResultDecision(allow=True, decision_id=decision_id)
        return result_from_value(value, decision_id)

    async def _find_result(self, session: aiohttp.ClientSession) -> bool | None:
        """Whether a module of the entrypoint's package defines ``result``, from the
        server's ``GET /v1/policies`` (each module's ``raw`` source); ``None``: unknown."""
        try:
            async with session.get(f"{self.url}/v1/policies") as response:
                if response.status != 200:
                    return None
                listing = json.loads(await response.content.read(_MAX_BODY + 1))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None
        modules = listing.get("result") if isinstance(listing, dict) else None
        if not isinstance(modules, list):
            return None
        sources = [m.get("raw") if isinstance(m, dict) else None for m in modules]
        if not all(isinstance(source, str) for source in sources):
            return None  # a module without its source: cannot tell
        return defines_rule(cast(list[str], sources), self.package, "result")

    async def reload(self) -> EngineStatus:
        """OPA loads its own bundles: re-check that the server is healthy, and whether its
        package defines ``result``."""
        session = self._session
        if session is None:
            self._status = EngineStatus(ready=False, detail="opa: not started")
            return self._status
        try:
            async with session.get(f"{self.url}/health") as response:
                healthy = response.status == 200
                why = f"GET /health answered {response.status}"
        except (TimeoutError, aiohttp.ClientError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            healthy, why = False, f"unreachable ({type(exc).__name__}: {exc})"
        if healthy:
            self._has_result = await self._find_result(session)
            checks = {True: "on", False: "off", None: "on (the policies could not be read)"}
            self._status = EngineStatus(
                ready=True,
                detail=f"opa: {self.url} healthy; result checks {checks[self._has_result]}",
            )
        else:
            logger.warning("OPA at %s is not healthy: %s", self.url, why)
            self._status = EngineStatus(ready=False, detail=f"opa: {self.url} {why}")
        return self._status

    def status(self) -> EngineStatus:
        return self._status
