"""The store seam: ``store_from_config`` picks the backend, ``purge_loop`` keeps it small."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import urlsplit

from proxy.config import StoreConfig
from proxy.errors import ConfigError, StoreUnavailable
from proxy.store.base import Store

logger = logging.getLogger(__name__)

PURGE_INTERVAL_S = 60.0

__all__ = ["PURGE_INTERVAL_S", "Store", "purge_loop", "sqlite_path", "store_from_config"]


def sqlite_path(url: str) -> Path | str:
    """``sqlite:///rel/path`` is relative to the working directory, ``sqlite:////abs`` absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(
            f"store.url: a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path, "
            f"got {url!r}"
        )
    path = url[len(prefix) :].split("?", 1)[0]
    if not path:
        raise ConfigError(f"store.url: {url!r} names no database file")
    return path if path == ":memory:" else Path(path)


def store_from_config(config: StoreConfig) -> Store:
    """The configured backend, not yet opened (``await store.open()`` connects and migrates)."""
    scheme = urlsplit(config.url).scheme
    if scheme == "sqlite":
        from proxy.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(config.url))
    if scheme in ("postgresql", "postgres"):
        from proxy.store.postgres import PostgresStore

        return PostgresStore(config.url)
    raise ConfigError(f"store.url: unknown scheme {scheme!r}")


async def purge_loop(store: Store, interval_s: float = PURGE_INTERVAL_S) -> None:
    """Purge expired records now and every ``interval_s`` until cancelled; never raises."""
    while True:
        try:
            await store.purge_expired()
        except StoreUnavailable as exc:
            logger.warning("could not purge expired store records: %s", exc.message)
        except Exception:
            logger.exception("purging expired store records failed")
        await asyncio.sleep(interval_s)
