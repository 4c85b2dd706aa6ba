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
  Errors are OpenAI-shaped JSON (`error.message`, `error.code`: the operator's reason); a stream that fails after
  it started ends with an error event (`data: {"error": ...}`) and `data: [DONE]`.
- DELETE /v1/conversations/{id}: end a conversation now (the caller's own; another's is 404).
- GET /metrics (conserve_router_*), /health, /conserve/backends (the pool's servers, its P/D decider settings and
  what the router observes of each server, JSON; administrators only).

Every request is checked before anything is done for it: its caller (`conserve.router.auth`: 401, 403), its size
(413 over `max_body_bytes`, refused on its Content-Length before it is read) and its fields
(`conserve.router.validation`: 400 naming the field). The headers that name servers (`X-Conserve-Decoder`,
`X-Conserve-Prefill`) go to administrators only. A client that goes away ends the turn: its request to the server is
closed, which aborts it there (vLLM and gpu-sim stop generating).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from conserve.probes import add_health_and_metrics
from conserve.router.auth import Authenticator, AuthError, Identity
from conserve.router.policy import (
    DECODER_RESPONSE_HEADER,
    GENERATION_RESPONSE_HEADER,
    PREFILL_RESPONSE_HEADER,
    PREFILL_SITE_RESPONSE_HEADER,
)
from conserve.router.service import Router
from conserve.router.turns import TurnError, TurnRequest, TurnResult, TurnStarted
from conserve.router.validation import DEFAULT_MAX_BODY_BYTES, RequestInvalid, check_headers, parse_body

ROUTER_KEY = web.AppKey("router", Router)


def build_app(
    router: Router,
    registry: CollectorRegistry,
    *,
    authenticator: Authenticator | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app[ROUTER_KEY] = router
    auth = authenticator or Authenticator()

    async def on_startup(_app: web.Application) -> None:
        await router.start()

    async def on_cleanup(_app: web.Application) -> None:
        await router.stop()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _serve(request, router, auth, "chat", max_body_bytes)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _serve(request, router, auth, "completions", max_body_bytes)

    async def close(request: web.Request) -> web.Response:
        return await _close(request, router, auth)

    async def backends(request: web.Request) -> web.Response:
        try:
            identity = auth.identify(request.headers)
        except AuthError as err:
            return _refused(err)
        if not identity.admin:
            return _error(403, "the servers are shown to administrators only", code="Forbidden")
        return web.json_response(_backends_json(router, request.query.get("pool") or router.config.pool))

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


async def _close(request: web.Request, router: Router, auth: Authenticator) -> web.Response:
    try:
        identity = auth.identify(request.headers)
    except AuthError as err:
        return _refused(err)
    conversation_id = request.match_info["conversation_id"]
    if not await router.close_conversation(conversation_id, identity.name):
        return _error(404, f"conversation {conversation_id} not found", code="NotFound")
    return web.json_response({"closed": True})


def _backends_json(router: Router, pool: str) -> dict[str, Any]:
    prefills, decoders = router.backends(pool)
    settings = router.control.pool_pd_settings(pool)
    return {
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


def _refused(err: AuthError) -> web.Response:
    response = _error(err.status, str(err), code="Unauthorized" if err.status == 401 else "Forbidden")
    if err.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _started_headers(started: TurnStarted, identity: Identity) -> dict[str, str]:
    """The turn's response headers; the servers' names for an administrator only."""
    headers = {
        GENERATION_RESPONSE_HEADER: str(started.generation),
        PREFILL_SITE_RESPONSE_HEADER: "pool" if started.prefill is not None else "decoder",
    }
    if identity.admin:
        headers[DECODER_RESPONSE_HEADER] = started.decoder.name
        if started.prefill is not None:
            headers[PREFILL_RESPONSE_HEADER] = started.prefill.name
    return headers


async def _read_request(
    request: web.Request, auth: Authenticator, kind: str, max_body_bytes: int
) -> tuple[Identity, dict[str, Any]]:
    """The caller and the checked body, or AuthError / RequestInvalid (nothing created yet)."""
    identity = auth.identify(request.headers)
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise RequestInvalid(413, f"body: {request.content_length} bytes, over the limit of {max_body_bytes}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestInvalid(413, f"body: over the limit of {max_body_bytes} bytes") from None
    check_headers(request.headers)
    return identity, parse_body(raw, kind)


async def _serve(
    request: web.Request, router: Router, auth: Authenticator, kind: str, max_body_bytes: int
) -> web.StreamResponse:
    try:
        identity, body = await _read_request(request, auth, kind, max_body_bytes)
    except AuthError as err:
        return _refused(err)
    except RequestInvalid as err:
        return _error(err.status, str(err), code="InvalidRequest")
    stream = bool(body.get("stream"))
    include_usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
    reply = _Reply(request, identity, stream=stream, include_usage=include_usage)
    try:
        # aclosing: a client gone mid-stream closes the turn (and its request to the server) now, not at GC.
        async with contextlib.aclosing(router.turn(TurnRequest(kind, request.headers, body, identity))) as items:
            async for item in items:
                await reply.take(item)
    except TurnError as err:
        if reply.response is None:
            return _error(err.status, str(err), retry_after_s=err.retry_after_s, code=err.code)
        return await reply.fail(err)
    return await reply.finish(kind, body)


class _Reply:
    """A turn's items made into the HTTP reply: server-sent events as they come, or one JSON answer at the end."""

    def __init__(self, request: web.Request, identity: Identity, *, stream: bool, include_usage: bool) -> None:
        self._request, self._stream, self._include_usage = request, stream, include_usage
        self._identity = identity
        self.response: web.StreamResponse | None = None
        self._started: TurnStarted | None = None
        self._result: TurnResult | None = None

    async def take(self, item: dict[str, Any] | TurnStarted | TurnResult) -> None:
        if isinstance(item, TurnStarted):
            self._started = item
            if self._stream:
                headers = {
                    **_started_headers(item, self._identity),
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                }
                self.response = web.StreamResponse(headers=headers)
                await self.response.prepare(self._request)
        elif isinstance(item, TurnResult):
            self._result = item
        elif self.response is not None:
            # The usage-only chunk is the router's own request to the decoder; pass it on only if asked.
            if item.get("usage") and not item.get("choices") and not self._include_usage:
                return
            await self.response.write(b"data: " + json.dumps(item).encode() + b"\n\n")

    async def fail(self, err: TurnError) -> web.StreamResponse:
        """A stream that fails after it started: an error event, then `[DONE]`."""
        assert self.response is not None
        error = {"message": str(err), "type": "conserve_router_error", "code": err.code or str(err.status)}
        with contextlib.suppress(ConnectionError):
            await self.response.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
        return self.response

    async def finish(self, kind: str, body: dict[str, Any]) -> web.StreamResponse:
        if self.response is not None:
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
            return self.response
        result = self._result
        if result is None:
            return _error(502, "decoder returned nothing")
        started = self._started or TurnStarted(result.decoder, result.prefill, result.generation)
        headers = _started_headers(started, self._identity)
        return web.json_response(_completion_json(kind, body, result), headers=headers)


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
