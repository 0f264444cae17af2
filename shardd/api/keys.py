"""Typed application keys shared by the API modules."""

from __future__ import annotations

from aiohttp import web

from ..cluster import Cluster
from ..config import Settings
from ..logs import AccessLog
from .auth import TokenTable

CLUSTER = web.AppKey("cluster", Cluster)
SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenTable)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
OPENAPI = web.AppKey("openapi", bytes)  # the document, serialized once
