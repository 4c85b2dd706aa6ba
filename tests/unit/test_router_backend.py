"""The router's HTTP to a model server over loopback, against a server that misbehaves on purpose: an error answer
is `BackendRejected` with the server's message, a connection that breaks after the answer started is
`BackendBroken`, no connection is `BackendUnavailable`, and every request carries the servers' Authorization."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conserve.devcluster.cluster import free_port
from conserve.router import backend

pytestmark = pytest.mark.unit

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"127.0.0.1:{port}"


async def _chunks(endpoint: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        stream: AsyncIterator[dict[str, Any]] = backend.stream_decode(
            session, endpoint, "chat", BODY, "c1", None, headers or {}
        )
        return [chunk async for chunk in stream]


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def test_an_error_answer_is_rejected_with_the_servers_message() -> None:
    async def refuse(_: web.Request) -> web.Response:  # vLLM's error shape
        return web.json_response({"object": "error", "message": "max_tokens too large", "code": 400}, status=400)

    async def main() -> None:
        runner, endpoint = await _serve(refuse)
        try:
            with pytest.raises(backend.BackendRejected) as rejected:
                await _chunks(endpoint)
            assert rejected.value.status == 400
            assert rejected.value.message == "max_tokens too large"
            async with aiohttp.ClientSession() as session:
                with pytest.raises(backend.BackendRejected, match="max_tokens too large"):
                    await backend.prefill(session, endpoint, "chat", BODY, "c1")
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_a_connection_broken_mid_answer_is_broken_and_before_it_unavailable() -> None:
    async def break_after_one_chunk(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event({"choices": [{"index": 0, "delta": {"content": "a"}}]}))
        assert request.transport is not None
        request.transport.abort()  # the server dies mid-answer
        return response

    async def break_at_once(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def main() -> None:
        broken, endpoint = await _serve(break_after_one_chunk)
        try:
            with pytest.raises(backend.BackendBroken, match="mid-answer"):
                await _chunks(endpoint)
        finally:
            await broken.cleanup()
        silent, endpoint = await _serve(break_at_once)
        try:
            with pytest.raises(backend.BackendUnavailable):
                await _chunks(endpoint)
        finally:
            await silent.cleanup()
        with pytest.raises(backend.BackendUnavailable):  # nobody listening
            await _chunks(f"127.0.0.1:{free_port()}")

    asyncio.run(main())


def test_every_request_carries_the_servers_authorization_and_the_conversation() -> None:
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        body = await request.json()
        if not body.get("stream"):  # the prefill
            return web.json_response({"choices": [], "kv_transfer_params": {"remote_engine_id": "e"}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def main() -> None:
        runner, endpoint = await _serve(answer)
        auth = {"Authorization": "Bearer vllm-key"}
        try:
            async with aiohttp.ClientSession() as session:
                params = await backend.prefill(session, endpoint, "chat", BODY, "c1", auth)
            assert params == {"remote_engine_id": "e"}
            assert len(await _chunks(endpoint, auth)) == 1
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert [h.get("Authorization") for h in seen] == ["Bearer vllm-key"] * 2
    assert [h.get("X-Conversation-Id") for h in seen] == ["c1"] * 2
