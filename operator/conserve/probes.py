"""The two routes the ConServe HTTP servers (router, gpu-sim) share: a liveness probe and a Prometheus scrape."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest


def add_health_and_metrics(app: web.Application, registry: CollectorRegistry) -> None:
    """GET /health answers "ok"; GET /metrics the registry in Prometheus' text format."""

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
