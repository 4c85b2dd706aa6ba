"""The router's HTTP face (aiohttp, thin): OpenAI-compatible endpoints over conserve.router.service.Router.

- POST /v1/chat/completions, /v1/completions: streaming (SSE) when the body says `"stream": true`, else one
  JSON answer. Headers: `X-Conversation-Id` (the conversation; falls back to the body's `user`, then
  `metadata.conversation_id`), `X-Conversation-End: true` (last turn), `X-Conserve-Effective: false` (a turn the
  user does not see), `X-Conserve-Routing: conversation|per-turn`, `X-Conserve-Pool`. Responses carry
  `X-Conserve-Decoder`, `X-Conserve-Prefill` (the prefill server, when one ran the prompt),
  `X-Conserve-Prefill-Site` (`pool` or `decoder`: where the prompt was prefilled) and
  `X-Conserve-Placement-Generation`. A turn waits (a stream sends
  nothing) while its conversation waits in the pool's queue; HTTP 429 with `Retry-After` when the pool refuses it
  (queue wait past its `maxQueueWaitSeconds`, or `whenFull: Reject`): a retry with the same id queues it afresh.
  Errors are OpenAI-shaped JSON (`error.message`, `error.code`: the operator's reason).
- DELETE /v1/conversations/{id}: end a conversation now.
- GET /metrics (conserve_router_*), /health, /conserve/backends (the pool's servers, its P/D decider settings and
  what the router observes of each server, JSON).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from conserve.probes import add_health_and_metrics
from conserve.router.policy import (
    DECODER_RESPONSE_HEADER,
    GENERATION_RESPONSE_HEADER,
    PREFILL_RESPONSE_HEADER,
    PREFILL_SITE_RESPONSE_HEADER,
)
from conserve.router.service import Router
from conserve.router.turns import TurnError, TurnRequest, TurnResult, TurnStarted

ROUTER_KEY = web.AppKey("router", Router)


def build_app(router: Router, registry: CollectorRegistry) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ROUTER_KEY] = router

    async def on_startup(_app: web.Application) -> None:
        await router.start()

    async def on_cleanup(_app: web.Application) -> None:
        await router.stop()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _serve(request, router, "chat")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _serve(request, router, "completions")

    async def close(request: web.Request) -> web.Response:
        found = await router.close_conversation(request.match_info["conversation_id"])
        return web.json_response({"closed": found}, status=200 if found else 404)

    async def backends(request: web.Request) -> web.Response:
        pool = request.query.get("pool") or router.config.pool
        prefills, decoders = router.backends(pool)
        settings = router.control.pool_pd_settings(pool)
        return web.json_response(
            {
                "prefills": [{"name": b.name, "endpoint": b.endpoint} for b in prefills],
                "decoders": [{"name": b.name, "endpoint": b.endpoint} for b in decoders],
                "prefillDecider": {
                    "rule": settings.rule.value,
                    "decoderMaxTokens": settings.decoder_max_tokens,
                    "stallWeight": settings.stall_weight,
                    "kvLinkBytesPerSecond": settings.kv_link_bytes_per_s,
                    "kvBytesPerToken": settings.kv_bytes_per_token,
                },
                "observed": router.signals.snapshot(),
            }
        )

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_delete("/v1/conversations/{conversation_id}", close)
    add_health_and_metrics(app, registry)
    app.router.add_get("/conserve/backends", backends)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _error(status: int, message: str, *, retry_after_s: int | None = None, code: str = "") -> web.Response:
    error: dict[str, Any] = {"message": message, "type": "conserve_router_error"}
    if code:
        error["code"] = code
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": error}, status=status, headers=headers)


def _started_headers(started: TurnStarted) -> dict[str, str]:
    headers = {
        DECODER_RESPONSE_HEADER: started.decoder.name,
        GENERATION_RESPONSE_HEADER: str(started.generation),
        PREFILL_SITE_RESPONSE_HEADER: "pool" if started.prefill is not None else "decoder",
    }
    if started.prefill is not None:
        headers[PREFILL_RESPONSE_HEADER] = started.prefill.name
    return headers


async def _serve(request: web.Request, router: Router, kind: str) -> web.StreamResponse:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    stream = bool(body.get("stream"))
    include_usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
    reply = _Reply(request, stream=stream, include_usage=include_usage)
    try:
        async for item in router.turn(TurnRequest(kind, request.headers, body)):
            await reply.take(item)
    except TurnError as err:
        if reply.response is None:
            return _error(err.status, str(err), retry_after_s=err.retry_after_s, code=err.code)
        raise
    return await reply.finish(kind, body)


class _Reply:
    """A turn's items made into the HTTP reply: server-sent events as they come, or one JSON answer at the end."""

    def __init__(self, request: web.Request, *, stream: bool, include_usage: bool) -> None:
        self._request, self._stream, self._include_usage = request, stream, include_usage
        self.response: web.StreamResponse | None = None
        self._started: TurnStarted | None = None
        self._result: TurnResult | None = None

    async def take(self, item: dict[str, Any] | TurnStarted | TurnResult) -> None:
        if isinstance(item, TurnStarted):
            self._started = item
            if self._stream:
                headers = {**_started_headers(item), "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                self.response = web.StreamResponse(headers=headers)
                await self.response.prepare(self._request)
        elif isinstance(item, TurnResult):
            self._result = item
        elif self.response is not None:
            # The usage-only chunk is the router's own request to the decoder; pass it on only if asked.
            if item.get("usage") and not item.get("choices") and not self._include_usage:
                return
            await self.response.write(b"data: " + json.dumps(item).encode() + b"\n\n")

    async def finish(self, kind: str, body: dict[str, Any]) -> web.StreamResponse:
        if self.response is not None:
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
            return self.response
        result = self._result
        if result is None:
            return _error(502, "decoder returned nothing")
        started = self._started or TurnStarted(result.decoder, result.prefill, result.generation)
        return web.json_response(_completion_json(kind, body, result), headers=_started_headers(started))


def _completion_json(kind: str, body: dict[str, Any], result: TurnResult) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason or "stop"}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + f"{time.time_ns():x}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [choice],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }
