"""The decision cache: a pure policy asked the same question twice gives the same answer.

Agents retry and loop: the same call, from the same agent, with the same run counts, comes
back again and again. What a policy reads of its input lies under the paths its modules
name (``refs.input_paths``), so the engine puts to the policy only those parts (``trim``):
the question. Its JSON text is both what a policy worker receives and, for a policy that
calls no impure builtin (``refs.IMPURE_BUILTINS``: the clock, randomness, the network,
printing), the cache's key: an input that differs elsewhere (its ``idempotency_key``, its
``time``, headers the policy never reads) asks the same question, and one that differs in
anything the policy reads asks another.

What is cached and when:
- decisions and ``visible``, never ``result`` (the check of a tool's answer: the answer is
  new each time, and its body would make poor keys);
- the embedded engine only: it compiled the policy and its data and knows when they
  change; an OPA server's data can change behind the proxy's back;
- keys are a 128-bit BLAKE2b digest of the question, so an entry's size does not grow with
  the body, and a hit never keeps a body alive;
- a policy reload empties the cache, and an evaluation that started before the reload is
  not stored after it;
- failures are never cached: they fail closed, each time;
- at most ``max_entries`` decisions, least recently used out first; 0 turns the cache off;
- calls that ask the same question while it is being evaluated wait for that evaluation
  instead of starting their own (a burst of identical retries costs one evaluation); if
  the call evaluating it goes away first, they evaluate on their own.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import Any, NamedTuple, TypeVar, cast

T = TypeVar("T")

_encode = json.JSONEncoder(
    separators=(",", ":"), sort_keys=True, ensure_ascii=True, allow_nan=True
).encode


def trim(document: dict[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """``document`` with only what lies under ``paths``: a path that does not resolve (an
    absent key, or a value that is not an object on the way) is left out, which a policy
    reading it cannot tell from the original, where it is undefined too."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = document
        for name in path:
            if not isinstance(value, dict) or name not in value:
                break
            value = value[name]
        else:
            node = out
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = value
    return out


class Question(NamedTuple):
    """What the policy is asked: the input to evaluate, its JSON (``None``: not encoded
    yet), and its cache key (``None``: this policy's decisions are not cached)."""

    document: dict[str, Any]
    encoded: bytes | None
    key: bytes | None


class _Abandoned(Exception):
    """The call evaluating a shared question went away before the answer came."""


class DecisionCache:
    """Values the policy returned, by rule and the parts of the input the policy names."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[Any]] = {}
        self._paths: tuple[tuple[str, ...], ...] | None = None
        """What the served policy reads of its input (``None``: may read all of it)."""
        self._caching = False
        self.generation = 0
        """Bumped by ``serve``: an evaluation begun under an older policy is not stored."""
        self.off_reason: str | None = "no policy loaded"
        self.hits = 0
        self.misses = 0

    def serve(self, paths: tuple[tuple[str, ...], ...] | None, impure: frozenset[str]) -> None:
        """A new policy is served: forget every decision, and cache only if it is pure."""
        self._entries.clear()
        self._pending.clear()  # a question asked from now on is put to the new policy
        self.generation += 1
        self._paths = paths
        self._caching = False
        if self.max_entries <= 0:
            self.off_reason = "turned off (policy.cache.max_entries: 0)"
        elif impure:
            self.off_reason = "the policy calls " + ", ".join(sorted(impure))
        elif paths is None:
            self.off_reason = "the policy reads the input as a whole"
        else:
            self._caching = True
            self.off_reason = None

    def question(self, rule: str, document: dict[str, Any], keyed: bool = True) -> Question:
        """``document`` trimmed to what the policy reads, encoded once, and its key
        (none when not ``keyed``: a question whose answer must never be reused)."""
        paths = self._paths
        if paths is None:
            return Question(document, None, None)
        trimmed = trim(document, paths)
        try:
            encoded = _encode(trimmed).encode()
        except (TypeError, ValueError):  # the evaluators say what is wrong with it
            return Question(trimmed, None, None)
        if not self._caching or not keyed:
            return Question(trimmed, encoded, None)
        digest = blake2b(rule.encode(), digest_size=16)
        digest.update(b"\0")
        digest.update(encoded)
        return Question(trimmed, encoded, digest.digest())

    async def answer(
        self, key: bytes | None, evaluate: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """``(value, reused)``: from the cache, from the same question's evaluation already
        under way, or from ``evaluate()`` (kept if the policy is still the one it ran on)."""
        if key is None:
            return await evaluate(), False
        hit, kept = self.get(key)
        if hit:
            return cast(T, kept), True
        while (pending := self._pending.get(key)) is not None:
            try:
                answered = await asyncio.shield(pending)
            except _Abandoned:
                continue  # the first of its waiters to get here evaluates for the rest
            self.hits += 1
            return cast(T, answered), True
        self.misses += 1
        generation = self.generation
        shared: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        shared.add_done_callback(_retrieve)
        self._pending.setdefault(key, shared)
        try:
            value = await evaluate()
        except Exception as exc:
            shared.set_exception(exc)  # fail closed, all of them
            raise
        except BaseException:  # cancelled: the others evaluate on their own
            shared.set_exception(_Abandoned())
            raise
        else:
            shared.set_result(value)
            self.put(key, generation, value)
            return value, False
        finally:
            if self._pending.get(key) is shared:
                del self._pending[key]

    def get(self, key: bytes) -> tuple[bool, Any]:
        """The kept value for ``key`` (and a hit counted), if there is one."""
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
            self.hits += 1
            return True, entries[key]
        return False, None

    def put(self, key: bytes, generation: int, value: Any) -> None:
        if generation != self.generation or not self._caching:
            return
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> str:
        if self.off_reason is not None:
            return f"decision cache off: {self.off_reason}"
        return (
            f"decision cache: {len(self._entries)} of {self.max_entries} entries, "
            f"{self.hits} hits, {self.misses} misses"
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared evaluation's failure seen: no call may have waited for it."""
    if not future.cancelled():
        future.exception()
