"""Traces and the local journal: ``tracer_provider_from_config`` and ``journal_from_config``.

The only place that picks a journal backend; ``setup`` alone wires the OpenTelemetry SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from proxy.config import Config, TracingConfig
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.tracing.base import CallQuery, Journal, JournalDb
from proxy.tracing.journal import SqlJournal
from proxy.tracing.setup import build_tracer_provider, describe_exporter

__all__ = [
    "CallQuery",
    "Journal",
    "describe_exporter",
    "journal_from_config",
    "journal_spool_dir",
    "tracer_provider_from_config",
]


def tracer_provider_from_config(
    config: TracingConfig,
    metrics: Metrics,
    extra_processors: Sequence[SpanProcessor] = (),
) -> TracerProvider:
    """The app's own provider (never the global one): OTLP export unless ``exporter: none``."""
    return build_tracer_provider(config, metrics, extra_processors)


def journal_from_config(config: Config, metrics: Metrics, *, writer: bool = True) -> SqlJournal:
    """The journal beside the store (``store.url``), not yet opened.

    A SQLite store's ``handrail.db`` gets ``handrail-journal.db`` next to it, so journal
    batches never take the store's write lock; PostgreSQL keeps it in the store's database.
    The write-ahead spool goes in ``tracing.journal.spool_dir`` (``journal_spool_dir``).

    ``writer=False`` is for readers such as ``handrail calls``: it neither creates the
    table nor writes nor purges, and never touches the spool.
    """
    url = config.store.url
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from proxy.store import sqlite_path
        from proxy.tracing.journal_sqlite import SqliteJournalDb

        db: JournalDb = SqliteJournalDb(sqlite_path(url))
    elif scheme in ("postgresql", "postgres"):
        from proxy.tracing.journal_postgres import PostgresJournalDb

        db = PostgresJournalDb(url)
    else:
        raise ConfigError(f"store.url: unknown scheme {scheme!r}")
    tracing = config.tracing
    return SqlJournal(
        db,
        tracing.capture,
        tracing.journal,
        metrics,
        spool_dir=journal_spool_dir(config) if writer else None,
        writer=writer,
    )


def journal_spool_dir(config: Config) -> Path | None:
    """``tracing.journal.spool_dir``, else beside the SQLite journal's file
    (``dir/handrail-journal.spool/``), else ``.handrail/journal-spool`` for PostgreSQL.

    None for an in-memory SQLite store: its journal dies with the process, so there is
    nothing a spool could be replayed into.
    """
    url = config.store.url
    if urlsplit(url).scheme == "sqlite":
        from proxy.store import sqlite_path
        from proxy.tracing.journal_sqlite import journal_path

        path = journal_path(sqlite_path(url))
        if path == ":memory:":
            return None
        return config.tracing.journal.spool_dir or Path(path).with_suffix(".spool")
    return config.tracing.journal.spool_dir or Path(".handrail/journal-spool")
