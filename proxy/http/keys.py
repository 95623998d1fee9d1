"""Typed keys for what the apps and requests carry (aiohttp ``AppKey``)."""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web

from proxy.config import Config
from proxy.deps import Deps
from proxy.metrics import Metrics


class TraceIds(NamedTuple):
    trace_id: str
    span_id: str
    flags: int


CONFIG = web.AppKey("config", Config)
DEPS = web.AppKey("deps", Deps)
METRICS = web.AppKey("metrics", Metrics)
TRACE_IDS = web.RequestKey("trace_ids", TraceIds)
