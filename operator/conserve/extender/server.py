"""The thin aiohttp layer: routes, body limits, error responses, metrics. The logic is in `service`.

Routes: POST /filter, /prioritize (and /bind, which always answers that this extender does not bind);
GET /healthz (the process answers), /readyz (the watch cache has synced), /metrics (Prometheus text).

Errors: a body over the limit gets HTTP 413, a malformed one HTTP 400, both with a JSON `{"Error": ...}` body
and a log line; an unexpected exception gets HTTP 500 the same way. The server never dies on a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from conserve.extender.metrics import ExtenderMetrics
from conserve.extender.service import (
    DEFAULT_MAX_BODY_BYTES,
    BadRequest,
    ExtenderService,
    parse_args,
    parse_binding_args,
)

log = logging.getLogger(__name__)

JSON = "application/json"


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"Error": message}).encode(), content_type=JSON)


class ExtenderApp:
    """Builds the aiohttp application around an `ExtenderService`."""

    def __init__(
        self,
        service: ExtenderService,
        *,
        metrics: ExtenderMetrics | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ready: Callable[[], bool] = lambda: True,
        cache_sizes: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics if metrics is not None else ExtenderMetrics()
        self.max_body_bytes = max_body_bytes
        self.ready = ready
        self.cache_sizes = cache_sizes

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/filter", self._filter)
        app.router.add_post("/prioritize", self._prioritize)
        app.router.add_post("/bind", self._bind)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        return await request.read()

    async def _verb(self, verb: str, request: web.Request, answer: Callable[[bytes], bytes]) -> web.Response:
        started = time.perf_counter()
        outcome = "ok"
        try:
            body = await self._body(request)
            payload = answer(body)
            return web.Response(body=payload, content_type=JSON)
        except web.HTTPRequestEntityTooLarge:
            outcome = "bad_request"
            message = f"request body over the limit of {self.max_body_bytes} bytes"
            log.warning("extender %s from %s: %s", verb, request.remote, message)
            return _error(413, message)
        except BadRequest as exc:
            outcome = "bad_request"
            log.warning("extender %s from %s: %s", verb, request.remote, exc)
            return _error(400, str(exc))
        except Exception as exc:  # never crash on a request
            outcome = "error"
            log.exception("extender %s failed", verb)
            return _error(500, f"conserve extender internal error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.request_duration_seconds.labels(verb=verb).observe(time.perf_counter() - started)
            self.metrics.requests_total.labels(verb=verb, outcome=outcome).inc()

    def answer_filter(self, body: bytes) -> bytes:
        args = parse_args(body)
        outcome = self.service.filter(args)
        self.metrics.record_filtered(outcome.rejected)
        if args.NodeNames is not None:
            nodes = len(args.NodeNames)
        else:
            nodes = len((args.Nodes.items if args.Nodes is not None else None) or [])
        self.metrics.request_nodes.labels(verb="filter").observe(nodes)
        log.debug("extender filter %s", outcome.summary)
        return outcome.result.to_json_bytes()

    def answer_prioritize(self, body: bytes) -> bytes:
        args = parse_args(body)
        result = self.service.prioritize(args)
        self.metrics.request_nodes.labels(verb="prioritize").observe(len(result))
        if log.isEnabledFor(logging.DEBUG) and len(result) <= 20:
            log.debug("extender prioritize %s", dict(zip(result.hosts, result.scores, strict=True)))
        return result.to_json_bytes()

    def answer_bind(self, body: bytes) -> bytes:
        return self.service.bind(parse_binding_args(body)).to_json_bytes()

    async def _filter(self, request: web.Request) -> web.Response:
        return await self._verb("filter", request, self.answer_filter)

    async def _prioritize(self, request: web.Request) -> web.Response:
        return await self._verb("prioritize", request, self.answer_prioritize)

    async def _bind(self, request: web.Request) -> web.Response:
        return await self._verb("bind", request, self.answer_bind)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.ready():
            return web.Response(text="ok")
        return web.Response(status=503, text="watch cache not synced")

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.cache_sizes is not None:
            nodes, pods = self.cache_sizes()
            self.metrics.cache_nodes.set(nodes)
            self.metrics.cache_pods.set(pods)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class BackgroundServer:
    """Serves an application from its own event loop in a daemon thread (tests, benchmarks, embedding).

    `port=0` picks a free port; `url` is known once `start()` returns.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="conserve-extender", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_site(self._app, self.host, self.port), self._loop)
        self._runner = future.result(timeout=30)
        if self.port == 0:
            addresses = self._runner.addresses
            self.port = int(addresses[0][1])
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()
