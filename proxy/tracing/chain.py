"""The journal's hash chain: each row carries the hash of the row before it (pure).

Each writer (one journal instance, i.e. one proxy process) appends to a chain of its own,
``chain`` id and ``seq`` 1, 2, ...; a row's ``hash`` is SHA-256 over a canonical encoding of
its ``uid``, every ``COLUMNS`` value, its chain, seq and ``prev_hash`` (the first row's is
``GENESIS``). Rows are hashed by the writer as its batch is inserted, in insert order: recovered
spool rows join the recovering writer's chain, and a row lost before the database took it
leaves no gap. ``CHAIN_TABLE`` keeps each chain's head (last seq and hash, updated in the
insert's transaction: cutting rows off the end shows) and anchor (the last row retention
pruned: verification starts there). ``ChainWalk`` checks rows in (chain, seq) order.

A hash chain is evident to an edit of a row, or a deletion, that does not rewrite every hash
after it and the chain's entry too; record ``VerifyReport`` heads elsewhere to catch that.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from proxy.tracing.base import COLUMNS, INSERT_COLUMNS, Row, iso_time

CHAIN_TABLE = "handrail_journal_chain"
CHAIN_COLUMNS: tuple[str, ...] = ("chain", "seq", "prev_hash", "hash")
"""Appended to ``INSERT_COLUMNS`` by the writer at insert time."""
GENESIS = "0" * 64
"""The ``prev_hash`` of a chain's first row."""
ENCODING = "handrail-journal/1"
MAX_BREAKS = 100
"""A report lists at most this many breaks (``truncated`` says there were more)."""

Record = Any
"""A stored row by column name: a ``sqlite3.Row``, an ``asyncpg.Record``, a dict."""

_FLOATS = frozenset({"time", "total_ms", "policy_ms", "upstream_ms"})
_BOOLS = frozenset({"replayed"})
_SORTED = sorted(range(len(COLUMNS)), key=COLUMNS.__getitem__)
"""Column positions by name: the encoding is independent of column order."""
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def new_chain_id() -> str:
    return secrets.token_hex(8)


def _value(name: str, value: Any) -> Any:
    """A value as both databases give it back: REAL as float, SQLite's 0/1 as a bool."""
    if name in _FLOATS:
        return float(value)
    if name in _BOOLS:
        return bool(value)
    return value


def row_hash(chain: str, seq: int, prev_hash: str, row: Row) -> str:
    """SHA-256 (hex) of one ``INSERT_COLUMNS`` row in its place in a chain.

    NULL columns are left out, so a column added later (NULL in older rows) keeps their
    hashes; each other value goes in with its column's name.
    """
    values: list[Any] = [ENCODING, chain, seq, prev_hash, row[0]]
    for i in _SORTED:
        value = row[i + 1]
        if value is not None:
            name = COLUMNS[i]
            values.append(name)
            values.append(_value(name, value))
    return hashlib.sha256(_encode(values).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """A chain's last row: where the next one links."""

    seq: int = 0
    hash: str = GENESIS


def link(chain: str, head: Head, rows: Iterable[Row]) -> tuple[list[Row], Head]:
    """``rows`` (``INSERT_COLUMNS``) with ``CHAIN_COLUMNS`` appended, after ``head``."""
    linked: list[Row] = []
    seq, prev = head.seq, head.hash
    for row in rows:
        seq += 1
        digest = row_hash(chain, seq, prev, row)
        linked.append((*row, chain, seq, prev, digest))
        prev = digest
    return linked, Head(seq, prev)


# -- verification -------------------------------------------------------------------------------


class BreakKind(StrEnum):
    ALTERED = "altered"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """A chain's row in ``CHAIN_TABLE``."""

    chain: str
    started: float
    head: Head
    anchor: Head


@dataclass(frozen=True, slots=True)
class RowRef:
    """Enough of a row to find it: ``handrail calls`` shows the same facts."""

    id: int
    seq: int
    time: float
    tool: str
    run: str

    @classmethod
    def of(cls, record: Record) -> RowRef:
        return cls(
            int(record["id"]),
            _int(record["seq"]),
            _float(record["time"]),
            str(record["tool"]),
            str(record["run_id"]),
        )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """Where a chain stops proving itself: the row altered, or the seqs missing."""

    kind: BreakKind
    chain: str
    seq: int
    """The altered row's seq, or the first missing one."""
    last_seq: int
    """The last missing seq (``seq`` for an altered row)."""
    row: RowRef | None
    """The altered row, or the row after the missing ones (None: they were the chain's end)."""
    before: RowRef | None
    """The row before the missing ones (None: they were the chain's start)."""
    detail: str


@dataclass(frozen=True, slots=True)
class ChainSummary:
    chain: str
    started: float | None
    rows: int
    first_seq: int | None
    last_seq: int | None
    head: str
    """The hash of the chain's last row (record it elsewhere to catch a rewritten end)."""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    rows: int = 0
    """Chained rows checked."""
    unchained: int = 0
    """Rows written before the journal had a chain (schema version 3 or older): not checked."""
    chains: tuple[ChainSummary, ...] = ()
    breaks: tuple[ChainBreak, ...] = ()
    """Oldest row first."""
    truncated: bool = False

    @property
    def intact(self) -> bool:
        return not self.breaks

    def to_json(self) -> dict[str, Any]:
        def ref(row: RowRef | None) -> dict[str, Any] | None:
            return None if row is None else {**asdict(row), "time": iso_time(row.time)}

        def started(at: float | None) -> str | None:
            return None if at is None else iso_time(at)

        return {
            "intact": self.intact,
            "rows": self.rows,
            "unchained": self.unchained,
            "chains": [{**asdict(c), "started": started(c.started)} for c in self.chains],
            "breaks": [
                {**asdict(b), "kind": b.kind.value, "row": ref(b.row), "before": ref(b.before)}
                for b in self.breaks
            ],
            "truncated": self.truncated,
        }


def _position(item: ChainBreak) -> tuple[int, int]:
    """Breaks in the order of the rows they name."""
    row = item.row or item.before
    return (row.id if row is not None else 0, item.seq)


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


@dataclass(slots=True)
class _Walk:
    """One chain being walked."""

    entry: ChainEntry | None
    expect_seq: int
    expect_prev: str
    rows: int = 0
    first_seq: int | None = None
    last: RowRef | None = None
    last_hash: str = GENESIS


@dataclass(slots=True)
class ChainWalk:
    """Feed it every chained row in (chain, seq) order, then take the ``report``."""

    entries: dict[str, ChainEntry]
    rows: int = 0
    breaks: list[ChainBreak] = field(default_factory=list)
    broken: int = 0
    summaries: list[ChainSummary] = field(default_factory=list)
    _chain: str | None = None
    _walk: _Walk | None = None

    @classmethod
    def over(cls, entries: Iterable[ChainEntry]) -> ChainWalk:
        return cls({e.chain: e for e in entries})

    def feed(self, record: Record) -> None:
        """One row: ``id``, ``INSERT_COLUMNS`` and ``CHAIN_COLUMNS`` by name."""
        chain = str(record["chain"])
        if chain != self._chain or self._walk is None:
            self._finish()
            self._chain = chain
            self._walk = self._start(chain, record)
        walk = self._walk
        here = RowRef.of(record)
        self.rows += 1
        walk.rows += 1
        try:
            seq, stored = int(record["seq"]), str(record["hash"])
            self._check(chain, walk, record, seq, stored, here)
        except (TypeError, ValueError):  # a blanked seq, a value of the wrong type
            self._break(
                BreakKind.ALTERED,
                chain,
                here.seq,
                here.seq,
                here,
                walk.last,
                "its chain columns or values are not what the writer stores",
            )

    def _check(
        self, chain: str, walk: _Walk, record: Record, seq: int, stored: str, here: RowRef
    ) -> None:
        if walk.first_seq is None:
            walk.first_seq = seq
        if seq > walk.expect_seq:
            where = "at the chain's start" if walk.last is None else f"after row {walk.last.id}"
            self._break(
                BreakKind.MISSING,
                chain,
                walk.expect_seq,
                seq - 1,
                here,
                walk.last,
                f"{_seqs(walk.expect_seq, seq - 1)} deleted {where}",
            )
        elif seq < walk.expect_seq:
            self._break(
                BreakKind.ALTERED,
                chain,
                seq,
                seq,
                here,
                walk.last,
                f"seq {seq} is at or before the chain's pruning anchor (seq {walk.expect_seq - 1})",
            )
        elif record["prev_hash"] != walk.expect_prev and walk.last is not None:
            self._break(
                BreakKind.ALTERED,
                chain,
                walk.last.seq,
                walk.last.seq,
                walk.last,
                None,
                f"its hash is not the one row {here.id} (seq {seq}) links to: "
                "this row, or that link, was rewritten",
            )
        elif record["prev_hash"] != walk.expect_prev:
            self._break(
                BreakKind.ALTERED,
                chain,
                seq,
                seq,
                here,
                None,
                "its link does not match the chain's pruning anchor",
            )
        row = tuple(record[c] for c in INSERT_COLUMNS)
        if row_hash(chain, seq, str(record["prev_hash"]), row) != stored:
            self._break(
                BreakKind.ALTERED,
                chain,
                seq,
                seq,
                here,
                None,
                "its content does not match its hash",
            )
        walk.expect_seq = seq + 1
        walk.expect_prev = stored
        walk.last = here
        walk.last_hash = stored

    def feed_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.feed(record)

    def report(self, *, unchained: int = 0) -> VerifyReport:
        """After the last row: chains with no rows left, ends cut off."""
        self._finish()
        for entry in sorted(self.entries.values(), key=lambda e: e.started):
            walk = _Walk(entry, entry.anchor.seq + 1, entry.anchor.hash)
            self._end(entry.chain, walk)
        self.entries.clear()
        breaks = sorted(self.breaks, key=_position)
        return VerifyReport(
            self.rows,
            unchained,
            tuple(self.summaries),
            tuple(breaks),
            self.broken > len(breaks),
        )

    def _start(self, chain: str, record: Record) -> _Walk:
        entry = self.entries.pop(chain, None)
        if entry is None:
            here = RowRef.of(record)
            self._break(
                BreakKind.MISSING,
                chain,
                here.seq,
                here.seq,
                here,
                None,
                f"the chain's entry in {CHAIN_TABLE} is gone",
            )
            return _Walk(None, 1, GENESIS)
        return _Walk(entry, entry.anchor.seq + 1, entry.anchor.hash)

    def _finish(self) -> None:
        if self._walk is not None and self._chain is not None:
            self._end(self._chain, self._walk)
        self._chain, self._walk = None, None

    def _end(self, chain: str, walk: _Walk) -> None:
        """Compare where the rows stop with the head the writer recorded."""
        entry = walk.entry
        last_seq = walk.expect_seq - 1
        if entry is not None:
            if entry.head.seq > last_seq:
                where = "at the chain's end" if walk.last is None else f"after row {walk.last.id}"
                self._break(
                    BreakKind.MISSING,
                    chain,
                    last_seq + 1,
                    entry.head.seq,
                    None,
                    walk.last,
                    f"{_seqs(last_seq + 1, entry.head.seq)} deleted {where} (the chain's end)",
                )
            elif entry.head.seq < last_seq and walk.last is not None:
                self._break(
                    BreakKind.ALTERED,
                    chain,
                    last_seq,
                    last_seq,
                    walk.last,
                    None,
                    f"the chain's recorded end is seq {entry.head.seq}: rows were added after it",
                )
            elif walk.last is not None and entry.head.hash != walk.last_hash:
                self._break(
                    BreakKind.ALTERED,
                    chain,
                    last_seq,
                    last_seq,
                    walk.last,
                    None,
                    "its hash is not the chain's recorded end: it was rewritten",
                )
        self.summaries.append(
            ChainSummary(
                chain,
                entry.started if entry is not None else None,
                walk.rows,
                walk.first_seq,
                walk.last.seq if walk.last is not None else None,
                walk.last_hash if walk.last is not None else walk.expect_prev,
            )
        )

    def _break(
        self,
        kind: BreakKind,
        chain: str,
        seq: int,
        last_seq: int,
        row: RowRef | None,
        before: RowRef | None,
        detail: str,
    ) -> None:
        self.broken += 1
        if len(self.breaks) < MAX_BREAKS:
            self.breaks.append(ChainBreak(kind, chain, seq, last_seq, row, before, detail))


def entries_from(records: Iterable[Record]) -> list[ChainEntry]:
    """``CHAIN_TABLE`` rows as ``ChainEntry`` values."""
    return [
        ChainEntry(
            str(r["chain"]),
            float(r["started"]),
            Head(int(r["head_seq"]), str(r["head_hash"])),
            Head(int(r["anchor_seq"]), str(r["anchor_hash"])),
        )
        for r in records
    ]
