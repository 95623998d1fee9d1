"""The journal's write-ahead spool: each call on local disk before the database has it.

A process appends JSON lines to segment files of its own (``<pid>-<token>-<seq>.jsonl`` in
``tracing.journal.spool_dir``), one ``os.write`` per entry and no fsync: a kill -9 keeps what
the kernel already has; a power loss may lose the last entries. The process holds an
exclusive ``flock`` on its segments while it lives, so proxies sharing the directory recover
only the segments of owners that are gone (``take_dead``). The lines:

- ``["h", {"journal": id}]`` first: the database the rows belong to (``JournalDb.identity``);
- ``["b", uid, row]``: a call was decided; ``row`` is what it leaves if it never ends;
- ``["e", uid, row]``: the call's finished row;
- ``["c", [uid, ...]]``: those rows are committed to the database.

A segment rotates after ``MAX_ENTRIES`` entries or ``MAX_BYTES``, carrying the begins of
calls still in flight, and is deleted once all its rows are committed, oldest first.

Rows here carry no hash: the writer that inserts them links them onto its own chain
(``chain``), in insert order, so a recovered or read-back row gets its link when the database
takes it, and a row lost here (torn, never written) leaves no gap to mistake for a deletion.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from proxy.tracing.base import Row

logger = logging.getLogger(__name__)

HEADER, BEGIN, END, COMMIT = "h", "b", "e", "c"
SUFFIX = ".jsonl"
MAX_ENTRIES = 10_000
MAX_BYTES = 16 * 1024 * 1024
REOPEN_S = 1.0
"""After a segment could not be created, wait this long before trying again."""
STALE_TMP_S = 60.0
RECOVERY_LOCK = "recovery.lock"
"""Held while a process recovers dead segments: one recovery at a time per directory."""


_encode = json.JSONEncoder(separators=(",", ":")).encode
"""One encoder for every line (``json.dumps`` with options builds one per call); ASCII
output, so any string (a lone surrogate too) survives the trip."""


def entry(kind: str, uid: str, row: Row) -> bytes:
    """A begin or end line."""
    return (_encode([kind, uid, row]) + "\n").encode()


def commit_entry(uids: Sequence[str]) -> bytes:
    return (_encode([COMMIT, list(uids)]) + "\n").encode()


@dataclass(eq=False, slots=True)
class Segment:
    """One file of this process's spool, locked while its descriptor is open."""

    path: Path
    fd: int
    entries: int
    size: int
    rows: int = 0
    """End rows written here (the journal counts them)."""
    settled: int = 0
    """Of those, how many the database has (or refused for good)."""
    spilled: int = 0
    """Of those, how many are only here (the memory queue was full): read back later."""
    closed: bool = False

    @property
    def finished(self) -> bool:
        return self.closed and self.settled >= self.rows


class Spool:
    """This process's segments: append, rotate (carrying begins in flight), delete when done."""

    def __init__(
        self,
        directory: Path,
        journal_id: str,
        carry: Callable[[], Iterable[bytes]],
        *,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.directory = directory
        self.journal_id = journal_id
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.segments: list[Segment] = []
        """Oldest first; the last is ``current`` unless it was sealed after a failed write."""
        self.current: Segment | None = None
        self._carry = carry
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._seq = 0
        self._retry_at = 0.0

    def open(self) -> None:
        """Create the directory and the first segment (blocking: run it off the event loop)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start(self._create(b""))

    def write(self, line: bytes) -> Segment | None:
        """Append one entry with one ``os.write``; None: it is not on disk."""
        segment = self.current
        if segment is None or self._full(segment):
            if time.monotonic() >= self._retry_at:
                self.rotate()
            segment = self.current
            if segment is None:
                return None
        try:
            written = os.write(segment.fd, line)
        except OSError as exc:
            written, reason = -1, str(exc)
        else:
            reason = f"short write ({written} of {len(line)} bytes)"
        if written != len(line):  # maybe torn: nothing more goes after it
            logger.warning("journal spool: sealing %s: %s", segment.path.name, reason)
            segment.closed = True
            self.current = None
            return None
        segment.entries += 1
        segment.size += written
        return segment

    def rotate(self) -> bool:
        """Start a new segment holding the begins of calls in flight; close the current one."""
        try:
            segment = self._create(b"".join(self._carry()))
        except OSError as exc:
            self._retry_at = time.monotonic() + REOPEN_S
            logger.warning("journal spool: cannot start a segment in %s: %s", self.directory, exc)
            return False
        self._start(segment)
        return True

    def collect(self, *, calls_in_flight: bool) -> None:
        """Delete finished segments, oldest first, so a begin left in a kept segment always
        has its end or commit beside it; the newest stays while calls are in flight."""
        while self.segments and self.segments[0].finished:
            if calls_in_flight and len(self.segments) == 1:
                return
            segment = self.segments.pop(0)
            with contextlib.suppress(OSError):
                os.unlink(segment.path)
            os.close(segment.fd)

    def close(self, *, calls_in_flight: bool) -> None:
        """Delete what is finished and let go of the rest (the next proxy recovers it)."""
        if self.current is not None and not calls_in_flight:
            self.current.closed = True
        self.collect(calls_in_flight=calls_in_flight)
        for segment in self.segments:
            os.close(segment.fd)
        self.segments.clear()
        self.current = None

    def _full(self, segment: Segment) -> bool:
        return segment.entries >= self._max_entries or segment.size >= self._max_bytes

    def _start(self, segment: Segment) -> None:
        if self.current is not None:
            self.current.closed = True
        self.current = segment
        self.segments.append(segment)

    def _create(self, carried: bytes) -> Segment:
        """A locked file with its header and carried begins, renamed into place only then:
        a recovering proxy never sees one of ours unlocked."""
        self._seq += 1
        name = f"{self.owner}-{self._seq:06d}{SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        header = json.dumps([HEADER, {"journal": self.journal_id}]).encode() + b"\n"
        data = header + carried
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.rename(tmp, self.directory / name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Segment(self.directory / name, fd, 1 + carried.count(b"\n"), len(data))


@dataclass(slots=True)
class _Entries:
    """Lines of one owner's segments merged by uid: an end beats a begin, a commit both."""

    journal_id: str
    ends: dict[str, Row] = field(default_factory=dict)
    begins: dict[str, Row] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    torn: int = 0

    def feed(self, file: BinaryIO) -> bool:
        """Read one segment, line by line; false (and nothing read) when its header names
        another journal, or none."""
        match _parse(file.readline()):
            case [str(kind), {"journal": str(journal_id)}] if kind == HEADER:
                if journal_id != self.journal_id:
                    return False
            case _:
                return False
        for line in file:
            self._take(_parse(line))
        return True

    def _take(self, item: Any) -> None:
        match item:
            case [str(kind), str(uid), list(row)] if kind in (BEGIN, END):
                if uid in self.committed:
                    return
                if kind == END:
                    self.ends[uid] = tuple(row)
                    self.begins.pop(uid, None)
                elif uid not in self.ends:
                    self.begins[uid] = tuple(row)
            case [str(kind), list(uids)] if kind == COMMIT:
                for uid in uids:
                    self.committed.add(uid)
                    self.ends.pop(uid, None)
                    self.begins.pop(uid, None)
            case _:
                self.torn += 1


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_uncommitted(path: Path, journal_id: str) -> list[tuple[str, Row]]:
    """The end rows of one of this process's own closed segments not marked committed in it."""
    entries = _Entries(journal_id)
    with path.open("rb") as file:
        entries.feed(file)
    return list(entries.ends.items())


@dataclass(eq=False)
class DeadSegments:
    """Segments whose owners died, locked by this process until ``release``."""

    rows: list[tuple[str, Row]]
    """Every uncommitted row, finished or interrupted (a begin that never ended), by time."""
    interrupted: int
    torn: int
    held: list[tuple[Path, int]]
    lock_fd: int

    def release(self, *, delete: bool) -> None:
        """Delete the segments (oldest first) once their rows are committed; unlock them."""
        for path, fd in self.held:
            if delete:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os.close(fd)
        self.held = []
        os.close(self.lock_fd)


def take_dead(directory: Path, journal_id: str, owner: str) -> DeadSegments | None:
    """Lock and read every segment of this journal whose owner is gone (blocking).

    None when another process is recovering this directory right now (it takes them all).
    """
    try:
        lock_fd = os.open(directory / RECOVERY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return None
    entries = _Entries(journal_id)
    held: list[tuple[Path, int]] = []
    foreign = 0
    try:
        for name in sorted(os.listdir(directory)):  # each owner's segments in order
            path = directory / name
            if name.startswith(".") and name.endswith(".tmp"):
                _remove_stale(path)
            if not name.endswith(SUFFIX) or name.startswith(owner + "-"):
                continue
            fd = _lock_if_dead(path)
            if fd is None:
                continue
            with open(fd, "rb", closefd=False) as file:
                ours = entries.feed(file)
            if ours:
                held.append((path, fd))
            else:
                foreign += 1
                os.close(fd)
    except BaseException:
        for _, fd in held:
            os.close(fd)
        os.close(lock_fd)
        raise
    if foreign:
        logger.debug("journal spool: %d segments in %s are another journal's", foreign, directory)
    interrupted = [item for item in entries.begins.items() if item[0] not in entries.ends]
    rows = sorted([*entries.ends.items(), *interrupted], key=lambda item: item[1][0])
    return DeadSegments(rows, len(interrupted), entries.torn, held, lock_fd)


def _lock_if_dead(path: Path) -> int | None:
    """An open, locked descriptor on ``path`` if no live process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone, or not ours to read
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not deleted by its owner meanwhile
    except (BlockingIOError, FileNotFoundError):
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def _remove_stale(path: Path) -> None:
    """A segment its owner died creating (it holds no entry of a call yet)."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > STALE_TMP_S:
            fd = _lock_if_dead(path)
            if fd is not None:
                os.unlink(path)
                os.close(fd)
