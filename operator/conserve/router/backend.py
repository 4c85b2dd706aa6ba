"""HTTP to the serving backends (vLLM, or conserve gpu-sim): the disaggregated-prefill protocol.

Prefill: the request with max_tokens 1, no streaming, and `kv_transfer_params: {"do_remote_decode": true, ...}`
(what vLLM's NixlConnector proxy sends); the response's `kv_transfer_params` go into the decode request, whose
server then pulls the KV from the prefill server. Decode: always streamed (with usage) so the router can time
the first token, whatever the client asked for.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from conserve.router.policy import CONVERSATION_HEADER
from conserve.router.turns import TurnResult

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class BackendUnavailable(Exception):
    """The server could not be reached or refused the request before sending anything."""


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = copy.copy(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.copy(body)
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}
    out.pop("kv_transfer_params", None)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


def _headers(conversation_id: str | None) -> dict[str, str]:
    return {CONVERSATION_HEADER: conversation_id} if conversation_id else {}


async def prefill(
    session: aiohttp.ClientSession, endpoint: str, kind: str, body: dict[str, Any], conversation_id: str | None
) -> dict[str, Any] | None:
    """Run the prefill; returns the kv_transfer_params for the decoder (None if the server gave none)."""
    url = f"http://{endpoint}{PATHS[kind]}"
    try:
        async with session.post(url, json=prefill_body(body), headers=_headers(conversation_id)) as resp:
            if resp.status >= 400:
                raise BackendUnavailable(f"prefill {endpoint}: HTTP {resp.status}: {(await resp.text())[:200]}")
            data = await resp.json()
    except (aiohttp.ClientConnectionError, TimeoutError) as err:
        raise BackendUnavailable(f"prefill {endpoint}: {err}") from err
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return params if isinstance(params, dict) else None


async def stream_decode(
    session: aiohttp.ClientSession,
    endpoint: str,
    kind: str,
    body: dict[str, Any],
    conversation_id: str | None,
    kv_transfer_params: dict[str, Any] | None,
) -> AsyncIterator[dict[str, Any]]:
    """Yields the decoder's SSE chunks (parsed). BackendUnavailable before the first chunk means nothing was
    generated, so the caller may retry elsewhere."""
    url = f"http://{endpoint}{PATHS[kind]}"
    try:
        resp = await session.post(url, json=decode_body(body, kv_transfer_params), headers=_headers(conversation_id))
    except (aiohttp.ClientConnectionError, TimeoutError) as err:
        raise BackendUnavailable(f"decode {endpoint}: {err}") from err
    async with resp:
        if resp.status >= 400:
            raise BackendUnavailable(f"decode {endpoint}: HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                yield chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            parts.append(delta["content"])
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


def note_usage_and_finish(chunk: dict[str, Any], result: TurnResult) -> None:
    """The decoder's own count of output tokens and its finish reason, when a chunk carries them."""
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            result.finish_reason = str(choice["finish_reason"])
