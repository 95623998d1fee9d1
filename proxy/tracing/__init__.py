"""Traces and the local journal: ``tracer_provider_from_config`` and ``journal_from_config``.

The only place that picks a journal backend; ``setup`` alone wires the OpenTelemetry SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from proxy.config import Config, TracingConfig
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.tracing.base import CallQuery, Journal
from proxy.tracing.journal import JournalDb, SqlJournal
from proxy.tracing.setup import build_tracer_provider, describe_exporter

__all__ = [
    "CallQuery",
    "Journal",
    "describe_exporter",
    "journal_from_config",
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

    ``writer=False`` is for readers such as ``handrail calls``: it neither creates the
    table nor writes nor purges.
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
    return SqlJournal(db, tracing.capture, tracing.journal, metrics, writer=writer)
