"""The approval page at ``/ui`` on the admin listener (to be built)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application, data_app: web.Application) -> None:
    """Register ``/ui`` routes; they check their own way in (cookie or signed link)."""
